"""Run settings (kernels, loss chunk, activation recompute) live on the model, not in its config.

The config holds architecture only; transformers' attn_implementation picks the attention kernel; the loss
chunk is a model attribute, chunked by default; gradient_checkpointing_enable takes the recompute interval;
configs and checkpoints written with the old run-setting fields still load.
"""
import ast
import json
import logging

import pytest
import torch

import models.modeling_baichuan as modeling
from checkpoint.export import export_config
from conftest import ROOT
from models.configuration_baichuan import RETIRED_FIELDS, BaiChuanConfig
from models.modeling_baichuan import BaiChuanForCausalLM

SIZES = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             max_position_embeddings=64)
OLD_RUN_SETTINGS = {"attention_backend": "eager", "norm_backend": "torch", "loss_chunk_size": 0}


def count_backend_calls(monkeypatch):
    calls = []
    for name, fn in list(modeling.ATTENTION_FUNCTIONS.items()):
        monkeypatch.setitem(modeling.ATTENTION_FUNCTIONS, name,
                            lambda *a, _name=name, _fn=fn: calls.append(_name) or _fn(*a))
    return calls


def test_config_holds_architecture_only(tmp_path):
    config = BaiChuanConfig.from_name("tiny")
    assert not set(RETIRED_FIELDS) & set(config.to_dict())
    BaiChuanForCausalLM(BaiChuanConfig(**SIZES)).save_pretrained(tmp_path)
    assert not set(RETIRED_FIELDS) & set(json.loads((tmp_path / "config.json").read_text()))
    # An override is checked against the known fields: a retired run setting or a typo is an error, not a
    # silent extra attribute.
    for bad in ({"loss_chunk_size": 8}, {"hiden_size": 64}):
        with pytest.raises(ValueError, match=f"unknown config fields \\['{next(iter(bad))}'\\]"):
            BaiChuanConfig.from_name("tiny", **bad)


def test_old_config_and_checkpoint_state_with_run_settings_load(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)
    (tmp_path / "config.json").write_text(json.dumps({**SIZES, **OLD_RUN_SETTINGS}))
    with caplog.at_level(logging.WARNING):
        config = BaiChuanConfig.from_name(str(tmp_path))
    notes = [r.getMessage() for r in caplog.records if "ignoring run settings" in r.getMessage()]
    assert len(notes) == 1 and "attention_backend, loss_chunk_size, norm_backend" in notes[0], notes
    assert config.hidden_size == 32 and not set(RETIRED_FIELDS) & set(config.to_dict())
    # The forced kernel of the old file is not applied: nothing asked for means "auto".
    assert BaiChuanForCausalLM(config).config._attn_implementation == "auto"
    # A train.py checkpoint's client state recorded model_config with those fields: the export drops them.
    exported = export_config({**config.to_dict(), **OLD_RUN_SETTINGS}, torch.float32).to_dict()
    assert not set(RETIRED_FIELDS) & set(exported) and exported["use_cache"] is True


def test_attn_implementation_selects_the_kernel(tmp_path, monkeypatch):
    torch.manual_seed(0)
    BaiChuanForCausalLM(BaiChuanConfig(**SIZES)).save_pretrained(tmp_path)
    calls = count_backend_calls(monkeypatch)
    ids = torch.randint(3, 256, (1, 8))
    eager = BaiChuanForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert eager.config._attn_implementation == "eager"
    eager(ids)
    assert calls == ["eager", "eager"]  # one per layer
    calls.clear()
    auto = BaiChuanForCausalLM.from_pretrained(tmp_path).eval()
    assert auto.config._attn_implementation == "auto"
    auto(ids)
    assert calls == ["sdpa", "sdpa"]  # "auto" on CPU: SDPA
    calls.clear()
    auto.set_attn_implementation("eager")  # transformers' API for a built model
    torch.testing.assert_close(auto(ids).logits, eager(ids).logits, rtol=0, atol=1e-5)
    assert calls == ["eager"] * 4
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        BaiChuanForCausalLM.from_pretrained(tmp_path, attn_implementation="flex_attention")


def test_gradient_checkpointing_enable_takes_the_interval(monkeypatch):
    calls = []
    real = modeling.checkpoint
    monkeypatch.setattr(modeling, "checkpoint", lambda fn, *a, **kw: calls.append(fn) or real(fn, *a, **kw))
    torch.manual_seed(0)
    model = BaiChuanForCausalLM(BaiChuanConfig(**{**SIZES, "num_hidden_layers": 4})).train()
    model.loss_chunk_size = 0  # the ZeRO-3 chunk path would checkpoint too; count layers only
    ids = torch.randint(3, 256, (1, 8))
    for every, layers in ((2, [0, 2]), (1, [0, 1, 2, 3]), (3, [0, 3])):
        calls.clear()
        model.gradient_checkpointing_enable(checkpoint_every=every)
        model(ids, labels=ids).loss.backward()
        assert calls == [model.model.layers[i] for i in layers], every
    model.gradient_checkpointing_disable()
    calls.clear()
    model(ids, labels=ids)
    assert calls == []
    with pytest.raises(ValueError, match="checkpoint_every must be an integer >= 1"):
        model.gradient_checkpointing_enable(checkpoint_every=0)


def test_training_default_is_the_chunked_loss(monkeypatch):
    chunks = []
    real = modeling.linear_cross_entropy
    monkeypatch.setattr(modeling, "linear_cross_entropy",
                        lambda h, w, y, chunk: chunks.append(chunk) or real(h, w, y, chunk))
    torch.manual_seed(0)
    model = BaiChuanForCausalLM(BaiChuanConfig(**SIZES)).train()
    ids = torch.randint(3, 256, (2, 16))
    out = model(ids, labels=ids)
    assert chunks == [1024] and out.logits is None
    model.loss_chunk_size = 0
    torch.testing.assert_close(model(ids, labels=ids).loss, out.loss, rtol=0, atol=1e-6)
    assert chunks == [1024]
    # train.py's flag defaults to the same chunk (read from its source: importing train.py costs seconds).
    tree = ast.parse((ROOT / "train.py").read_text())
    defaults = [kw.value.value for node in ast.walk(tree) if isinstance(node, ast.Call)
                and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == "--loss_chunk_size"
                for kw in node.keywords if kw.arg == "default"]
    assert defaults == [BaiChuanForCausalLM.loss_chunk_size]
