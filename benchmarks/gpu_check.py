"""Run every GPU check in one go and write what it measured to gpu_check.json and gpu_check.md.

Run it through benchmarks/gpu_check.sh (which installs carried wheels and puts the repository on PYTHONPATH):

    bash benchmarks/gpu_check.sh                    # outputs/gpu_check/
    bash benchmarks/gpu_check.sh --out /some/dir
    bash benchmarks/gpu_check.sh --only env fused_loss
    bash benchmarks/gpu_check.sh --smoke            # on CPU: the GPU steps too, at tiny shapes (checks the script)

Steps, fastest first (benchmarks/gpu_check_steps.py holds them): the environment; correctness on the device
(attention kernels, fused loss, KV cache and generate.py, the evaluation engine, document masking); a 1-GPU
DeepSpeed run and its resume through the real launcher; throughput against Llama, eager then compiled. Without a
GPU the steps that need one are reported as skipped and the rest run on CPU at small shapes.

Each step runs in its own process with its own time limit, so a crash, a CUDA error or a hang in one step is
recorded as that step's failure and the next step runs; the whole run stays within --budget_s (each step's limit
is cut to what is left). The JSON and the summary are rewritten after every step, so a run stopped from outside
still leaves what it finished. Exit status: 0 when no step failed, 1 otherwise.
"""
import argparse
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from common import HelpFormatter, run_cli, write_atomic

ROOT = Path(__file__).resolve().parents[1]
# name, needs a GPU, time limit in seconds (on a GPU; each limit is cut to the budget left)
STEPS = (
    ("env", False, 90),
    ("attention_parity", False, 120),
    ("fused_loss", False, 60),
    ("kv_cache_generation", False, 90),
    ("evaluation_engine", False, 90),
    ("document_mask", False, 60),
    ("deepspeed_train", True, 200),
    ("throughput", True, 200),
    ("throughput_compiled", True, 240),
)
STEP_NAMES = [s[0] for s in STEPS]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", default=str(ROOT / "outputs" / "gpu_check"),
                   help="folder for gpu_check.json, gpu_check.md and gpu_check.log")
    p.add_argument("--budget_s", type=float, default=None,
                   help="wall-clock cap for the whole run (default: 480 with a GPU, 90 without)")
    p.add_argument("--only", nargs="+", choices=STEP_NAMES, default=None,
                   help="run these steps only; the others are reported as skipped (env always runs)")
    p.add_argument("--smoke", action="store_true",
                   help="without a GPU, run the GPU steps too, on CPU at tiny shapes: checks this script, "
                        "measures nothing")
    args = p.parse_args(argv)
    if args.budget_s is not None and args.budget_s <= 0:
        p.error("--budget_s must be positive")
    return args


def _child(name, device, workdir, deadline, smoke, result_path, log_path):
    """Body of a step process: its own process group (so its launcher and ranks can be killed with it), its
    output into the step's log, then the step."""
    os.setsid()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from benchmarks import gpu_check_steps  # preloaded by the fork server

    gpu_check_steps.run_step(name, device, workdir, deadline, smoke, result_path, log_path)


def run_one(ctx, name, device, timeout, smoke, work: Path) -> dict:
    result_path, log_path = work / f"{name}.result.json", work / f"{name}.log"
    result_path.unlink(missing_ok=True)
    start = time.time()
    proc = ctx.Process(target=_child, args=(name, device, str(work / name), start + timeout, smoke,
                                            str(result_path), str(log_path)))
    proc.start()
    try:
        proc.join(timeout)
        timed_out = proc.is_alive()
    finally:  # also on Ctrl-C: the step has its own session, so the terminal's signal does not reach it
        try:  # the step's whole process group: a launcher and its ranks too
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.join()
    log = log_path.read_text(encoding="utf-8", errors="replace") if log_path.exists() else ""
    if result_path.exists() and not timed_out:
        result = json.loads(result_path.read_text(encoding="utf-8"))
    elif timed_out:
        result = {"status": "failed", "error": f"timed out after {timeout:.0f} s (killed)"}
    else:
        result = {"status": "failed", "error": f"the step process exited with {proc.exitcode} without a result"}
    if result["status"] == "failed":
        result["log_tail"] = log[-4000:]
    result["seconds"] = round(time.time() - start, 1)
    return {"name": name, **result}, log


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    started = time.time()
    report = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv[1:],
              "wheels": {"installed": os.environ.get("GPU_CHECK_WHEELS", "").split(),
                         "pip_status": os.environ.get("GPU_CHECK_WHEELS_STATUS")},
              "steps": []}

    # Steps fork from a server that has imported torch, transformers and the model once (seconds per step
    # saved); it must not start CUDA, so torch's availability check there goes through NVML.
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["benchmarks.gpu_check_steps"])
    logs = []

    env, log = run_one(ctx, "env", "cpu", 90, False, work)
    if env.get("data", {}).get("cuda_error"):
        # CUDA was started in the fork server after all: fresh interpreters for every step instead.
        report["start_method"] = f"spawn (the fork server broke CUDA: {env['data']['cuda_error']})"
        ctx = mp.get_context("spawn")
        env, log = run_one(ctx, "env", "cpu", 90, False, work)
    report.setdefault("start_method", ctx.get_start_method())
    logs.append(("env", log))
    gpu = bool(env.get("data", {}).get("cuda_available")) and not env.get("data", {}).get("cuda_error")
    device = "cuda" if gpu else "cpu"
    budget = args.budget_s or (480 if gpu else 90)
    deadline = started + budget
    report.update(device=device, budget_s=budget, gpu=env.get("data", {}).get("gpu"),
                  versions=env.get("data", {}).get("versions"))
    report["steps"].append(env)
    write_report(out, report, logs)

    for name, needs_gpu, limit in STEPS[1:]:
        left = deadline - time.time()
        if args.only and name not in args.only:
            result = {"name": name, "status": "skipped", "reason": "not selected (--only)"}
        elif needs_gpu and not gpu and not args.smoke:
            result = {"name": name, "status": "skipped", "reason": "no GPU"}
        elif left < 5:
            result = {"name": name, "status": "skipped", "reason": f"the {budget:.0f} s budget was spent"}
        else:
            if args.smoke and needs_gpu:
                limit *= 3  # CPU ranks, and the CPU's compiler for torch.compile
            print(f"gpu_check: {name} (limit {min(limit, left):.0f} s)", flush=True)
            result, log = run_one(ctx, name, device, min(limit, left), args.smoke and needs_gpu, work)
            logs.append((name, log))
        report["steps"].append(result)
        print(f"gpu_check: {name}: {result['status']} {result.get('reason') or result.get('error') or ''}"
              .splitlines()[0], flush=True)
        write_report(out, report, logs)

    report["seconds"] = round(time.time() - started, 1)
    write_report(out, report, logs)
    shutil.rmtree(work, ignore_errors=True)
    print((out / "gpu_check.md").read_text(encoding="utf-8"))
    return 1 if any(s["status"] == "failed" for s in report["steps"]) else 0


# ------------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------------

def write_report(out: Path, report: dict, logs):
    names = [s["name"] for s in report["steps"]]
    pending = [{"name": n, "status": "not run", "reason": "the run stopped before this step"}
               for n in STEP_NAMES if n not in names]
    full = dict(report, steps=report["steps"] + pending)
    write_atomic(out / "gpu_check.json", json.dumps(full, indent=2, default=str))
    write_atomic(out / "gpu_check.md", summary(full))
    write_atomic(out / "gpu_check.log", "".join(f"===== {name} =====\n{log}\n" for name, log in logs))


def _fmt(x, spec):
    """A number in ``spec``; None as n/a; anything else (a "nan" from the JSON) as it is."""
    return "n/a" if x is None else format(x, spec) if isinstance(x, (int, float)) else str(x)


def summary(report: dict) -> str:
    v = report.get("versions") or {}
    lines = ["# GPU check", "",
             f"Device: {report.get('gpu') or 'no GPU (CPU mode)'}; started {report['started']}; "
             f"budget {report.get('budget_s')} s; took {report.get('seconds', '...')} s; steps started by "
             f"{report.get('start_method')}.",
             "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + ".", "",
             "| step | status | seconds | detail |", "|---|---|---|---|"]
    for s in report["steps"]:
        detail = s.get("reason") or s.get("error") or "; ".join(
            c["name"] + (f" ({_fmt(c['error'], '.2g')} <= {_fmt(c['tolerance'], '.2g')})" if "tolerance" in c else "")
            for c in s.get("checks", [])[:4]) or ""
        lines.append(f"| {s['name']} | {s['status']} | {s.get('seconds', '')} | "
                     f"{detail.splitlines()[0][:300] if detail else ''} |")
    failed = [(s["name"], c) for s in report["steps"] for c in s.get("checks", []) if not c["passed"]]
    if failed:
        lines += ["", "Failed checks:"]
        lines += [f"- {name}: {c['name']}: " + json.dumps({k: val for k, val in c.items()
                                                             if k not in ("name", "passed")}, default=str)[:400]
                  for name, c in failed]
    for s in report["steps"]:
        data = s.get("data") or {}
        if data.get("table"):
            lines += ["", f"## {s['name']}", "", f"`python {data.get('command', '')}`", ""] + data["table"]
            for variant, r in (data.get("ratios") or {}).items():
                lines.append(f"- {variant}: MFU {_fmt(r['mfu'], '.1%')}, speed vs Llama "
                             f"{_fmt(r['speed_vs_llama'], '.2f')}x, memory vs Llama {_fmt(r['mem_vs_llama'], '.2f')}x")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(run_cli(main))
