"""The model against transformers' LlamaForCausalLM, its kernels against eager, its cache, loading and packaging."""
import json
import logging
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import ROOT
from models.configuration_baichuan import BaiChuanConfig
from models.modeling_baichuan import (ATTENTION_FUNCTIONS, BaiChuanForCausalLM, build_attention_mask,
                                      flash_attn_func)

torch.set_grad_enabled(True)


def tiny_config(**overrides):
    # Small vocab keeps these tests fast; the shipped tiny preset keeps the real 64000.
    fields = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128)
    fields.update(overrides)
    return BaiChuanConfig(**fields)


def make_model(seed=0, loss_chunk_size=BaiChuanForCausalLM.loss_chunk_size, **overrides):
    torch.manual_seed(seed)
    model = BaiChuanForCausalLM(tiny_config(**overrides)).eval()
    model.loss_chunk_size = loss_chunk_size
    # Non-trivial norm weights, so a swapped or missing norm cannot hide behind ones.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def to_llama(model: BaiChuanForCausalLM) -> LlamaForCausalLM:
    """The same weights in transformers' LlamaForCausalLM, with the same rope_scaling dict."""
    c = model.config
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_attention_heads, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=False,
        rope_scaling=c.rope_scaling, attn_implementation="eager")).eval()
    state = {}
    for name, tensor in model.state_dict().items():
        if "W_pack" in name:
            q, k, v = tensor.chunk(3, dim=0)  # W_pack rows are q, k, v in that order
            for part, t in zip("qkv", (q, k, v)):
                state[name.replace("W_pack", f"{part}_proj")] = t
        else:
            state[name] = tensor
    missing, unexpected = llama.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return llama


def test_matches_transformers_llama_fp32():
    model = make_model()
    llama = to_llama(model)
    ids = torch.randint(3, 512, (2, 24))
    ours = model(ids, labels=ids, return_logits=True)  # the loss chunked, as by default
    ref = llama(ids, labels=ids)
    assert ours.logits.shape == (2, 24, 512)
    torch.testing.assert_close(ours.logits, ref.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.loss, ref.loss, rtol=0, atol=1e-5)


def test_loss_ignores_minus_100_and_shifts():
    model = make_model()
    ids = torch.randint(3, 512, (2, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    out = model(ids, labels=labels, return_logits=True)
    logits = out.logits[:, :-1].reshape(-1, 512)
    expected = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("backend", [b for b in ATTENTION_FUNCTIONS if b != "eager"])
def test_attention_backends_equal_eager(backend):
    if backend == "flash_attention_2" and (flash_attn_func is None or not torch.cuda.is_available()):
        pytest.skip("flash-attn needs CUDA and the flash_attn package; tested on the GPU machine")
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 10, 16) for _ in range(3))
    causal = ATTENTION_FUNCTIONS[backend](q, k, v, None)
    torch.testing.assert_close(causal, ATTENTION_FUNCTIONS["eager"](q, k, v, None), atol=1e-5, rtol=1e-5)
    if backend == "flash_attention_2":
        return  # flash-attn runs unpadded batches only; padded ones go to SDPA (select_attention)
    pad = torch.ones(2, 10, dtype=torch.long)
    pad[1, :3] = 0
    mask = build_attention_mask(pad, 10, 10)
    torch.testing.assert_close(ATTENTION_FUNCTIONS[backend](q, k, v, mask),
                               ATTENTION_FUNCTIONS["eager"](q, k, v, mask), atol=1e-5, rtol=1e-5)
    # A block of 4 queries after a 6-token cache: bottom-right causal alignment.
    tail = ATTENTION_FUNCTIONS[backend](q[:, :, 6:], k, v, None)
    torch.testing.assert_close(tail, causal[:, :, 6:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_model_backends_agree(backend):
    ids = torch.randint(3, 512, (2, 16))
    ref = make_model(attn_implementation="eager")(ids).logits
    torch.testing.assert_close(make_model(attn_implementation=backend)(ids).logits, ref, atol=1e-5, rtol=1e-5)


def test_chosen_backend_is_logged_once(caplog):
    import models.modeling_baichuan as modeling

    modeling._logged_backends.clear()
    caplog.set_level(logging.INFO, logger=modeling.logger.name)
    model = make_model()  # no attn_implementation: "auto"
    model(torch.tensor([[5, 6, 7]]))
    model(torch.tensor([[5, 6, 7, 8]]))
    messages = [r.getMessage() for r in caplog.records if "backend" in r.getMessage()]
    assert messages.count("baichuan: attention backend = sdpa") == 1, messages
    assert messages.count("baichuan: rmsnorm backend = torch") == 1, messages


def test_forced_flash_without_package_is_a_clear_error():
    if flash_attn_func is not None:
        pytest.skip("flash_attn is installed here")
    with pytest.raises(RuntimeError, match="flash_attn is not importable"):
        make_model(attn_implementation="flash_attention_2")


def test_chunked_loss_equals_plain_loss_and_gradients():
    ids = torch.randint(3, 512, (2, 33))
    labels = ids.clone()
    labels[0, :7] = -100
    grads = []
    for chunk in (0, 10):
        model = make_model(loss_chunk_size=chunk).train()
        loss = model(ids, labels=labels).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=1e-6)
    for name, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_chunked_loss_returns_no_logits_unless_asked():
    model = make_model(loss_chunk_size=8)
    ids = torch.randint(3, 512, (1, 20))
    assert model(ids, labels=ids).logits is None
    assert model(ids, labels=ids, return_logits=True).logits.shape == (1, 20, 512)
    assert model(ids).logits.shape == (1, 20, 512)


@pytest.mark.parametrize("every", [1, 2])
def test_gradient_checkpointing_same_loss_and_grads(every):
    ids = torch.randint(3, 512, (2, 16))
    results = []
    for ckpt in (False, True):
        model = make_model(num_hidden_layers=3).train()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False},
                                                checkpoint_every=every)
            assert model.model.gradient_checkpointing
        loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


def test_greedy_generation_with_cache_equals_without():
    model = make_model()
    prompt = torch.randint(3, 512, (1, 7))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    with_cache = model.generate(prompt, use_cache=True, **kw)
    without = model.generate(prompt, use_cache=False, **kw)
    assert with_cache.shape == (1, 19)
    assert torch.equal(with_cache, without)


def test_left_padded_batch_generation_matches_single_prompts():
    model = make_model()
    prompts = [torch.randint(3, 512, (n,)) for n in (9, 4, 6)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    batched = model.generate(ids, attention_mask=mask, use_cache=True, **kw)
    batched_nocache = model.generate(ids, attention_mask=mask, use_cache=False, **kw)
    assert torch.equal(batched, batched_nocache)
    for i, p in enumerate(prompts):
        single = model.generate(p[None], use_cache=True, **kw)
        assert torch.equal(batched[i, width:], single[0, len(p):]), i


def test_padded_forward_is_finite_and_matches_unpadded():
    model = make_model()
    ids = torch.randint(3, 512, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    out = model(padded, attention_mask=mask).logits
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 3:], model(ids).logits, atol=1e-5, rtol=1e-5)


def test_7b_preset_parameter_count_and_names_on_meta():
    config = BaiChuanConfig.from_name("7b")
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size) == \
        (4096, 32, 11008, 64000)
    with torch.device("meta"):
        model = BaiChuanForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == 7_000_559_616 == config.num_parameters()
    names = set(model.state_dict())
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(32):
        expected |= {f"model.layers.{i}.self_attn.W_pack.weight", f"model.layers.{i}.self_attn.o_proj.weight",
                     f"model.layers.{i}.input_layernorm.weight", f"model.layers.{i}.post_attention_layernorm.weight"}
        expected |= {f"model.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    assert names == expected
    assert model.model.layers[0].self_attn.W_pack.weight.shape == (3 * 4096, 4096)


def test_unknown_preset_and_bad_sizes_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model config 'huge'.*known presets: .*7b.*tiny"):
        BaiChuanConfig.from_name("huge")
    with pytest.raises(ValueError, match=r"hidden_size \(100\) must be divisible by num_attention_heads \(3\)"):
        BaiChuanConfig(hidden_size=100, num_attention_heads=3)
    with pytest.raises(ValueError, match="num_hidden_layers must be a positive integer"):
        BaiChuanConfig(num_hidden_layers=0)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        BaiChuanConfig.from_name(str(bad))


def test_config_round_trips_through_config_json(tmp_path):
    config = BaiChuanConfig.from_name("tiny")
    config.save_pretrained(tmp_path)
    again = BaiChuanConfig.from_name(str(tmp_path))
    assert again.to_dict() == config.to_dict()
    assert BaiChuanConfig.from_name(str(tmp_path / "config.json")).hidden_size == 64


def released_layout(model, path):
    """A folder laid out as the released baichuan-7B: config.json and pytorch_model.bin with inv_freq keys."""
    path.mkdir(exist_ok=True)
    c = model.config
    (path / "config.json").write_text(json.dumps({
        "architectures": ["BaiChuanForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_baichuan.BaiChuanConfig",
                     "AutoModelForCausalLM": "modeling_baichuan.BaiChuanForCausalLM"},
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": c.hidden_size,
        "initializer_range": 0.02, "intermediate_size": c.intermediate_size,
        "max_position_embeddings": c.max_position_embeddings, "model_type": "baichuan",
        "num_attention_heads": c.num_attention_heads, "num_hidden_layers": c.num_hidden_layers, "pad_token_id": 0,
        "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "torch_dtype": "float32",
        "transformers_version": "4.29.1", "use_cache": True, "vocab_size": c.vocab_size}))
    state = dict(model.state_dict())
    inv_freq = 1.0 / (10000 ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim))
    for i in range(c.num_hidden_layers):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq
    torch.save(state, path / "pytorch_model.bin")
    return state


def test_released_layout_folder_loads_without_warnings(tmp_path, caplog):
    model = make_model()
    state = released_layout(model, tmp_path / "released")
    caplog.set_level(logging.WARNING)
    loaded = BaiChuanForCausalLM.from_pretrained(tmp_path / "released").eval()
    assert not [r for r in caplog.records if "not used" in r.getMessage() or "newly initialized" in r.getMessage()]
    ids = torch.randint(3, 512, (1, 10))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    # Plain strict load_state_dict takes the released keys too.
    fresh = BaiChuanForCausalLM(model.config)
    fresh.load_state_dict(state, strict=True)


def test_missing_and_misshaped_weights_are_clear_errors(tmp_path):
    model = make_model()
    state = released_layout(model, tmp_path / "m")
    del state["model.layers.1.mlp.up_proj.weight"]
    torch.save(state, tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"lacks weights \['model.layers.1.mlp.up_proj.weight'\]"):
        BaiChuanForCausalLM.from_pretrained(tmp_path / "m")
    state = released_layout(model, tmp_path / "s")
    state["model.norm.weight"] = torch.ones(65)
    torch.save(state, tmp_path / "s" / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"other shapes than this config: model.norm.weight \(this config wants \(64,\)\)"):
        BaiChuanForCausalLM.from_pretrained(tmp_path / "s")


def test_save_pretrained_folder_loads_without_this_repo(tmp_path):
    vocab = ROOT / "tokenizer.model"
    from models.tokenization_baichuan import BaiChuanTokenizer
    model = make_model(vocab_size=64000)
    model.save_pretrained(tmp_path / "out")
    BaiChuanTokenizer(vocab_file=str(vocab)).save_pretrained(tmp_path / "out")
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "model.safetensors", "modeling_baichuan.py", "configuration_baichuan.py",
            "tokenization_baichuan.py", "tokenizer.model", "tokenizer_config.json"} <= files
    auto_map = json.loads((tmp_path / "out" / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_baichuan.BaiChuanForCausalLM"
    import sentencepiece as spm
    ids = [1] + spm.SentencePieceProcessor(model_file=str(vocab)).encode("登鹳雀楼")
    expected = model(torch.tensor([ids])).logits[0, -1, :5].tolist()
    code = (
        "import sys, json, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r}, trust_remote_code=True)\n"
        f"t = AutoTokenizer.from_pretrained({str(tmp_path / 'out')!r}, trust_remote_code=True)\n"
        "ids = t('登鹳雀楼').input_ids\n"
        "print(json.dumps({'cls': type(m).__name__, 'tok': type(t).__name__, 'ids': ids,\n"
        "  'logits': m(torch.tensor([ids])).logits[0, -1, :5].tolist()}))\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["cls"] == "BaiChuanForCausalLM" and got["tok"] == "BaiChuanTokenizer"
    assert got["ids"] == ids
    assert got["logits"] == pytest.approx(expected, abs=1e-5)
