"""RoPE scaling (linear, dynamic NTK) against transformers' LlamaForCausalLM with the same ``rope_scaling``."""
import json
import subprocess
import sys

import pytest
import torch

from models.configuration_baichuan import BaiChuanConfig
from test_model import make_model, to_llama

MAX_POS = 32


def tiny_model(seed=0, rope_scaling=None, vocab_size=256):
    return make_model(seed, vocab_size=vocab_size, max_position_embeddings=MAX_POS, rope_scaling=rope_scaling)


llama_twin = to_llama


@pytest.mark.parametrize("kind", ["linear", "dynamic"])
@pytest.mark.parametrize("length", [20, 3 * MAX_POS])
def test_scaled_rope_equals_transformers_llama(kind, length):
    model = tiny_model(rope_scaling={"type": kind, "factor": 4.0})
    ids = torch.randint(3, 256, (2, length))
    with torch.no_grad():
        ours = model(ids, use_cache=False).logits
        ref = llama_twin(model)(ids, use_cache=False).logits  # a fresh Llama: its dynamic state starts at MAX_POS
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    if length > MAX_POS:
        # Scaling changes the numbers past the training length (the comparison above is not vacuous).
        plain = tiny_model()(ids, use_cache=False).logits
        assert (ours - plain).abs().max() > 1e-3
    elif kind == "dynamic":
        # Within max_position_embeddings dynamic NTK is plain RoPE.
        torch.testing.assert_close(ours, tiny_model()(ids, use_cache=False).logits, rtol=0, atol=0)


def test_dynamic_scaling_depends_on_the_call_not_on_history():
    model = tiny_model(rope_scaling={"type": "dynamic", "factor": 2.0})
    ids = torch.randint(3, 256, (1, 2 * MAX_POS))
    with torch.no_grad():
        before = model(ids[:, :MAX_POS + 8], use_cache=False).logits
        model(ids, use_cache=False)  # a longer call must leave no state behind
        after = model(ids[:, :MAX_POS + 8], use_cache=False).logits
    torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_dynamic_scaling_refuses_stale_cached_keys():
    model = tiny_model(rope_scaling={"type": "dynamic", "factor": 2.0})
    ids = torch.randint(3, 256, (1, MAX_POS + 4))
    with torch.no_grad():
        # Within the training length the base is the plain one, so the cache stays valid and exact.
        out = model(ids[:, :MAX_POS - 4], use_cache=True)
        step = model(ids[:, MAX_POS - 4:MAX_POS], past_key_values=out.past_key_values, use_cache=True)
        torch.testing.assert_close(step.logits, model(ids[:, :MAX_POS], use_cache=False).logits[:, -4:],
                                   rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="dynamic RoPE scaling .* keys cached at length 32"):
            model(ids[:, MAX_POS:], past_key_values=step.past_key_values, use_cache=True)
    # Linear scaling is a fixed change of the frequencies: a cache is exact at any length.
    linear = tiny_model(rope_scaling={"type": "linear", "factor": 2.0})
    with torch.no_grad():
        out = linear(ids[:, :MAX_POS], use_cache=True)
        step = linear(ids[:, MAX_POS:], past_key_values=out.past_key_values, use_cache=True)
        torch.testing.assert_close(step.logits, linear(ids, use_cache=False).logits[:, MAX_POS:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("bad, match", [
    ({"type": "yarn", "factor": 2.0}, "type must be one of"),
    ({"type": "linear"}, "factor must be a number >= 1"),
    ({"type": "linear", "factor": 0.5}, "factor must be a number >= 1"),
    ({"type": "linear", "factor": 2.0, "original_max_position_embeddings": 8}, "unsupported fields"),
    ({"type": "linear", "rope_type": "dynamic", "factor": 2.0}, "names two types"),
    ("linear", "must be a dict"),
])
def test_bad_rope_scaling_is_a_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        BaiChuanConfig(rope_scaling=bad)


def test_rope_scaling_round_trips_and_loads_without_this_repo(tmp_path):
    model = tiny_model(rope_scaling={"rope_type": "dynamic", "factor": 3.0})
    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["rope_scaling"]
    assert saved == {"type": "dynamic", "rope_type": "dynamic", "factor": 3.0}
    assert BaiChuanConfig.from_name(str(tmp_path / "out")).rope_scaling == saved
    ids = [[5, 9, 17] * (MAX_POS // 2)]  # 48 tokens: past max_position_embeddings, where scaling acts
    with torch.no_grad():
        expected = model(torch.tensor(ids)).logits[0, -1, :5].tolist()
    code = (
        "import json, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r}, trust_remote_code=True)\n"
        f"print(json.dumps({{'scaling': m.config.rope_scaling,\n"
        f"  'logits': m(torch.tensor({ids!r}), use_cache=False).logits[0, -1, :5].tolist()}}))\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["scaling"] == saved
    assert got["logits"] == pytest.approx(expected, abs=1e-5)
