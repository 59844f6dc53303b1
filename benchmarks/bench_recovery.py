"""Recovery time under torchrun: from SIGKILLing one rank to the first training step of the restarted job.

    python benchmarks/bench_recovery.py --nproc 2 --kill_at 6 --save_every 4

Trains the tiny preset (max_length 64, fp32) under `torchrun --max-restarts 1 --rdzv-backend c10d` on this
machine's GPUs or, without one, on CPU ranks, SIGKILLs local rank 1 once step --kill_at is logged, and reads
metrics.jsonl for the restart event and the first new step. Prints the phases and the total in seconds; the
steps lost since the last checkpoint are trained again and are counted separately.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO_ROOT as ROOT, free_port


def records(path: Path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="ranks (default 2)")
    p.add_argument("--kill_at", type=int, default=6, help="SIGKILL rank 1 once this step is logged (default 6)")
    p.add_argument("--save_every", type=int, default=4, help="checkpoint interval (default 4)")
    p.add_argument("--timeout", type=float, default=600, help="give up after this many seconds (default 600)")
    args = p.parse_args()
    import psutil

    work = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    config = json.loads((ROOT / "config" / "deepspeed_tiny.json").read_text())
    config.update(train_micro_batch_size_per_gpu=2, steps_per_print=1, bf16={"enabled": False},
                  tensorboard={"enabled": False})
    (work / "ds.json").write_text(json.dumps(config))
    save = work / "ckpt"
    max_steps = args.kill_at + args.save_every + 2
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc), "--max-restarts", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", str(ROOT / "train.py"),
           "--deepspeed", "--deepspeed_config", str(work / "ds.json"), "--model_config", "tiny",
           "--data_dir", str(ROOT / "data_dir"), "--max_length", "64", "--max_steps", str(max_steps),
           "--save_every", str(args.save_every), "--checkpoint_saving_path", str(save),
           "--cache_dir", str(work / "token-cache"), "--num_workers", "1"]
    log = open(work / "train.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    metrics, killed_at, deadline = save / "metrics.jsonl", None, time.time() + args.timeout
    while proc.poll() is None and time.time() < deadline:
        if killed_at is None and any(r.get("step", 0) >= args.kill_at and "event" not in r for r in records(metrics)):
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    if child.environ().get("LOCAL_RANK") == "1" and str(ROOT / "train.py") in child.cmdline():
                        child.kill()
                        killed_at = time.time()
                except psutil.Error:
                    pass
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
        sys.exit(f"timed out; see {work / 'train.log'}")
    rows = records(metrics)
    restart = next((i for i, r in enumerate(rows) if r.get("event") == "restart"), None)
    if proc.returncode != 0 or killed_at is None or restart is None:
        sys.exit(f"the run failed (exit {proc.returncode}, killed: {killed_at is not None}); see {work / 'train.log'}")
    resumed, first = rows[restart], rows[restart + 1]
    print(f"| phase | seconds |\n|---|---|\n"
          f"| kill -> restarted workers resumed from step{resumed['step']} | {resumed['time'] - killed_at:.1f} |\n"
          f"| resumed -> first new step ({first['step']}) logged | {first['time'] - resumed['time']:.1f} |\n"
          f"| **kill -> first new step** | **{first['time'] - killed_at:.1f}** |\n"
          f"\nsteps trained again (since the checkpoint): {args.kill_at - resumed['step']}; ranks: {args.nproc}; "
          f"log: {work / 'train.log'}")


if __name__ == "__main__":
    main()
