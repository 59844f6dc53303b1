"""models/kernels.py against the plain computation, the loss paths of the model that use it, and the benchmark.

The model-level parity of the chunked loss with the plain one, of the attention kernels and of activation
checkpointing is in tests/test_model.py; here: the fused linear + cross-entropy itself, the ZeRO-3 fallback,
the single vocabulary projection of the unchunked loss, compiled layers, the peak-memory drop of the fused loss,
and a smoke run of benchmarks/benchmark_train.py.
"""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from models.configuration_baichuan import BaiChuanConfig
from models.flops import flops_per_token, peak_tflops_for
from models.kernels import compile_decoder_layers, linear_cross_entropy
from models.modeling_baichuan import BaiChuanForCausalLM

torch.set_grad_enabled(True)


def plain_loss_and_grads(hidden, weight, labels):
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = F.cross_entropy(F.linear(h, w).float(), labels, ignore_index=-100, reduction="sum")
    (loss / 3.0).backward()  # a non-unit upstream gradient, as the model's mean gives
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 7, 40, 41, 1000])
def test_linear_cross_entropy_equals_plain(chunk):
    torch.manual_seed(0)
    hidden, weight = torch.randn(41, 16) * 2, torch.randn(97, 16)
    labels = torch.randint(0, 97, (41,))
    labels[[0, 5, 6, 40]] = -100
    ref_loss, ref_dh, ref_dw = plain_loss_and_grads(hidden, weight, labels)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, labels, chunk)
    (loss / 3.0).backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(h.grad, ref_dh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, ref_dw, rtol=1e-5, atol=1e-6)
    assert h.grad[[0, 5, 6, 40]].abs().max() == 0  # ignored positions pass no gradient


def test_linear_cross_entropy_partial_and_no_grad():
    torch.manual_seed(1)
    hidden, weight = torch.randn(20, 8), torch.randn(30, 8)
    labels = torch.randint(0, 30, (20,))
    ref_loss, ref_dh, _ = plain_loss_and_grads(hidden, weight, labels)
    h = hidden.clone().requires_grad_()
    loss = linear_cross_entropy(h, weight, labels, 6)  # a frozen weight: only the hidden gradient
    (loss / 3.0).backward()
    torch.testing.assert_close(h.grad, ref_dh, rtol=1e-5, atol=1e-6)
    assert weight.grad is None
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels, 6), ref_loss, rtol=1e-6, atol=1e-5)
    all_ignored = torch.full((20,), -100)
    assert linear_cross_entropy(hidden, weight, all_ignored, 6).item() == 0.0
    w = weight.clone().requires_grad_()  # no tokens at all (a 1-token sequence predicts nothing): zero gradient
    linear_cross_entropy(torch.randn(0, 8), w, torch.zeros(0, dtype=torch.long), 6).backward()
    assert w.grad is not None and w.grad.abs().max() == 0


def test_linear_cross_entropy_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="expected hidden"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 9), torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long), 0)


def tiny(loss_chunk_size=BaiChuanForCausalLM.loss_chunk_size, **overrides):
    fields = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128)
    fields.update(overrides)
    torch.manual_seed(0)
    model = BaiChuanForCausalLM(BaiChuanConfig(**fields)).train()
    model.loss_chunk_size = loss_chunk_size
    return model


def loss_and_grads(model, ids, labels):
    loss = model(ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_zero3_fallback_equals_fused_chunked_loss():
    """Under ZeRO-3 (parameters carry ds_id) the loss projects through lm_head per chunk with recomputation."""
    ids = torch.randint(3, 512, (2, 25))
    labels = ids.clone()
    labels[1, :9] = -100
    fused = loss_and_grads(tiny(loss_chunk_size=8), ids, labels)
    model = tiny(loss_chunk_size=8)
    model.lm_head.weight.ds_id = 0  # what deepspeed.zero.Init marks partitioned parameters with
    calls = []
    model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    loss = model(ids, labels=labels).loss
    assert len(calls) == 6  # 2 x 24 predictions in chunks of 8, each through the module so ZeRO-3 can gather
    loss.backward()
    assert len(calls) == 12  # and each recomputed in backward
    torch.testing.assert_close(loss.detach(), fused[0], rtol=0, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, fused[1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_unchunked_loss_projects_the_vocabulary_once():
    model = tiny(loss_chunk_size=0)
    calls = []
    model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    ids = torch.randint(3, 512, (2, 12))
    out = model(ids, labels=ids)
    assert len(calls) == 1 and out.logits.shape == (2, 12, 512)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_compiled_layers_same_loss_and_grads():
    # aot_eager traces the layers through dynamo and AOTAutograd, the graph capture inductor also relies on,
    # without its C++ code generation, which takes minutes on a small CPU; the benchmark runs inductor.
    ids = torch.randint(3, 512, (2, 16))
    plain = loss_and_grads(tiny(loss_chunk_size=8), ids, ids)
    model = tiny(loss_chunk_size=8)
    assert compile_decoder_layers(model, backend="aot_eager") == 2
    assert all(n.count("_orig_mod") == 0 for n in model.state_dict())  # names stay checkpoint-compatible
    compiled = loss_and_grads(model, ids, ids)
    torch.testing.assert_close(compiled[0], plain[0], rtol=1e-6, atol=1e-6)
    for name, g in plain[1].items():
        torch.testing.assert_close(compiled[1][name], g, rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="no model.layers"):
        compile_decoder_layers(torch.nn.Linear(2, 2))


def test_decoder_layer_compiles_to_one_graph():
    """A graph break (a host read such as .item(), a logging call) splits the fused kernels and, on CUDA, makes
    each layer wait for the device."""
    layer = tiny().model.layers[0]
    explained = torch._dynamo.explain(layer)(torch.randn(2, 8, 64), torch.arange(8).expand(2, 8), None, None)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def test_peak_tflops_by_device_name_and_flops_per_token():
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops_for("NVIDIA H200") == 989.0 and peak_tflops_for("NVIDIA H20") == 148.0
    assert peak_tflops_for("NVIDIA A800-SXM4-80GB") == 312.0 and peak_tflops_for("Tesla T4") is None
    # 7B at 4096 tokens: 6 x 6.74e9 non-embedding parameters + 12 x 32 layers x 4096 x 4096 for attention
    flops = flops_per_token(BaiChuanConfig.from_name("7b"), 4096)
    assert flops == 6 * (7_000_559_616 - 64000 * 4096) + 12 * 32 * 4096 * 4096
    assert 46e9 < flops < 47e9


PEAK_RSS_SCRIPT = textwrap.dedent("""
    import os, resource, sys, torch
    from models.kernels import linear_cross_entropy
    torch.manual_seed(0)
    n, h, v, chunk = 2048, 64, 64000, int(sys.argv[1])
    hidden = torch.randn(n, h, requires_grad=True)
    weight = (torch.randn(v, h) * 0.02).requires_grad_()
    labels = torch.randint(0, v, (n,))
    def status_kib(field):
        return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])
    # Reset the peak (VmHWM) to the current size, so imports' transient peaks do not count.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_kib("VmRSS:")
    if chunk:
        loss = linear_cross_entropy(hidden, weight, labels, chunk)
    else:
        loss = torch.nn.functional.cross_entropy(hidden @ weight.t(), labels, reduction="sum")
    loss.backward()
    print((status_kib("VmHWM:") - before) * 1024, loss.item())
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and ru_maxrss in KiB (Linux)")
def test_fused_loss_lowers_peak_memory():
    """2048 tokens x 64000 vocab: the plain loss holds 0.5 GiB of fp32 logits and as much again for their
    gradient; the fused one a 256-token block (64 MiB) at a time. Each runs in a fresh process for its own peak."""
    results = {}
    for chunk in (0, 256):
        proc = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT.format(root=str(ROOT)), str(chunk)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        growth, loss = proc.stdout.split()
        results[chunk] = (int(growth), float(loss))
    assert results[256][1] == pytest.approx(results[0][1], rel=1e-5)
    logits_bytes = 2048 * 64000 * 4
    assert results[0][0] > logits_bytes  # the plain loss really did hold the logits
    assert results[256][0] < results[0][0] / 3, results


def test_benchmark_script_runs_both_models(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "benchmark_train.py"), "--preset", "tiny", "--vocab_size", "512",
         "--seq_len", "32", "--micro_batch", "2", "--warmup", "1", "--steps", "2", "--loss_chunk_size", "0", "16",
         "--peak_tflops", "1", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"ours (loss chunk off)", "ours (loss chunk 16)", "llama (transformers)"}
    for r in rows.values():
        assert len(r["step_seconds_all"]) == 2 and r["tokens_per_sec"] > 0 and r["peak_mem_gib"] > 0
        assert r["mfu"] == pytest.approx(r["tflops"] / 1.0)
        # Same seed, same shape, same tokens: each model starts near ln(vocab) and both loss paths agree.
        assert abs(r["first_loss"] - torch.log(torch.tensor(512.0)).item()) < 0.5
    assert rows["ours (loss chunk 16)"]["first_loss"] == pytest.approx(rows["ours (loss chunk off)"]["first_loss"])
    assert rows["llama (transformers)"]["speed_vs_llama"] == 1.0
    assert "| llama (transformers) |" in proc.stdout and "speed vs llama" in proc.stdout
