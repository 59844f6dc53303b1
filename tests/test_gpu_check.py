"""benchmarks/gpu_check.sh in its CPU mode, and the isolation of its steps (a failing, crashing or hanging step
is recorded as such and the run goes on)."""
import json
import os
import subprocess
import time

import multiprocessing as mp
import pytest
import torch.nn.functional as F

from benchmarks import gpu_check, gpu_check_steps
from conftest import ROOT

CPU_STEPS = ("env", "attention_parity", "fused_loss", "kv_cache_generation", "evaluation_engine")
GPU_STEPS = ("deepspeed_train", "throughput", "throughput_compiled")


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, GPU_CHECK_WHEELS=str(out / "no-wheels"))  # install nothing, whatever .whl/ holds
    start = time.time()
    # The script caps itself at 90 s without a GPU; the margin covers interpreter start and a loaded machine.
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=150)
    return proc, out, time.time() - start


def test_cpu_mode_names_every_step_with_a_status(cpu_run):
    proc, out, seconds = cpu_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert [s["name"] for s in report["steps"]] == gpu_check.STEP_NAMES
    assert report["device"] == "cpu" and report["budget_s"] == 90 and report["seconds"] <= 95, report["seconds"]
    for name in CPU_STEPS:
        assert steps[name]["status"] == "passed", steps[name]
        assert steps[name]["checks"] and all(c["passed"] for c in steps[name]["checks"]), name
    for name in GPU_STEPS:
        assert steps[name] == {"name": name, "status": "skipped", "reason": "no GPU"}
    assert steps["document_mask"]["status"] in ("passed", "skipped")
    versions = report["versions"]
    assert versions["torch"] and versions["transformers"] and versions["python"]
    assert report["wheels"]["pip_status"] == "none carried"
    summary = (out / "gpu_check.md").read_text()
    for name in gpu_check.STEP_NAMES:
        assert f"| {name} | {steps[name]['status']} |" in summary
    assert not (out / "work").exists()  # scratch removed


def test_cpu_mode_checks_compare_against_a_tolerance(cpu_run):
    """The bf16 checks carry their error and the tolerance it was held to; the fp32 ones are tight."""
    _, out, _ = cpu_run
    checks = [c for s in json.loads((out / "gpu_check.json").read_text())["steps"] for c in s.get("checks", [])]
    bf16 = [c for c in checks if c["name"].startswith("bf16")]
    fp32 = [c for c in checks if c["name"].startswith("fp32") and "tolerance" in c]
    assert len(bf16) >= 10 and len(fp32) >= 6
    for c in bf16:
        assert 0 <= c["error"] <= c["tolerance"] == pytest.approx(2 * c["eager_bf16_error"] + 2 ** -8), c
    assert all(c["error"] <= c["tolerance"] == 1e-4 for c in fp32)


def test_a_wrong_attention_kernel_fails_its_checks(monkeypatch, tmp_path):
    def top_left_causal(q, k, v, mask):  # the alignment bug select_attention exists to avoid after a cache
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=q.shape[-2] > 1)

    monkeypatch.setitem(gpu_check_steps.ATTENTION_FUNCTIONS, "sdpa", top_left_causal)
    c = gpu_check_steps.Context(device="cpu", workdir=tmp_path, deadline=time.time() + 60, log=tmp_path / "log")
    gpu_check_steps.attention_kernels(c, ["sdpa"])
    verdicts = {ch["name"]: ch["passed"] for ch in c.checks}
    assert verdicts["bf16 sdpa kernel output"]  # a full causal block is right either way
    assert not verdicts["bf16 sdpa kernel, 7 queries after a cache"]


def _boom(c):
    raise ValueError("boom")


def _crash(c):
    os._exit(3)


def _hang(c):
    # A grandchild too, as a launcher's ranks would be: the step's process group is killed with it.
    child = subprocess.Popen(["sleep", "60"])
    (c.workdir.parent / "grandchild.pid").write_text(str(child.pid))
    time.sleep(60)


def _skip(c):
    raise gpu_check_steps.Skip("not here")


def _fails_a_check(c):
    c.check("two is three", 2 == 3, found=2)


def running(pid: int) -> bool:
    """Alive and not a zombie waiting for its new parent to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_each_step_is_isolated(monkeypatch, tmp_path):
    for f in (_boom, _crash, _hang, _skip, _fails_a_check):
        monkeypatch.setitem(gpu_check_steps.STEPS, f.__name__, f)
    ctx = mp.get_context("fork")  # the patched table travels with the fork
    results = {name: gpu_check.run_one(ctx, name, "cpu", 3, False, tmp_path)[0]
               for name in ("_boom", "_crash", "_hang", "_skip", "_fails_a_check")}
    assert results["_boom"]["status"] == "failed" and results["_boom"]["error"] == "ValueError: boom"
    assert "ValueError: boom" in results["_boom"]["traceback"]
    assert results["_crash"] == {**results["_crash"], "status": "failed",
                                 "error": "the step process exited with 3 without a result"}
    assert results["_hang"]["status"] == "failed" and results["_hang"]["error"] == "timed out after 3 s (killed)"
    assert results["_hang"]["seconds"] < 10
    grandchild = int((tmp_path / "grandchild.pid").read_text())
    time.sleep(0.2)
    assert not running(grandchild)
    assert results["_skip"]["status"] == "skipped" and results["_skip"]["reason"] == "not here"
    assert results["_fails_a_check"]["status"] == "failed"
    assert results["_fails_a_check"]["checks"] == [{"name": "two is three", "passed": False, "found": 2}]
