"""Recovery time under torchrun: from SIGKILLing one rank (or one node) to the first step of the restarted job.

    python benchmarks/bench_recovery.py --nproc 2 --kill_at 6 --save_every 4
    python benchmarks/bench_recovery.py --lose_node --kill_at 6 --save_every 4

Trains the tiny preset (max_length 64, fp32) under `torchrun --rdzv-backend c10d` on this machine's GPUs or,
without one, on CPU ranks, and reads metrics.jsonl for the restart event and the first new step. Prints the
phases and the total in seconds; the steps lost since the last checkpoint are trained again and are counted
separately.

Default: one agent with --nproc ranks; local rank 1 is SIGKILLed once step --kill_at is logged, and the agent
restarts both. --lose_node: two agents on this machine, one rank each, as two nodes of an elastic job
(`--nnodes 1:2`); the second agent and its rank are SIGKILLed, and the first restarts alone, on one rank,
through a universal checkpoint. An uninterrupted 2-rank run of the same job is trained first, and the losses
after the restart are compared with it (the global batch, 4 samples, is the same on 1 and 2 ranks).
"""
import argparse
import json
import signal
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


def torchrun(work: Path, save: Path, max_steps: int, args, endpoint: str, nnodes: str, nproc: int):
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", nnodes, "--nproc-per-node", str(nproc),
            "--max-restarts", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "bench",
            # a short last call: the survivors of a lost node need not wait 30 s for a node that will not come
            "--rdzv-conf", "last_call_timeout=5", str(ROOT / "train.py"),
            "--deepspeed", "--deepspeed_config", str(work / "ds.json"), "--model_config", "tiny",
            "--data_dir", str(ROOT / "data_dir"), "--max_length", "64", "--max_steps", str(max_steps),
            "--save_every", str(args.save_every), "--checkpoint_saving_path", str(save),
            "--cache_dir", str(work / "token-cache"), "--num_workers", "1"]


def kill_tree(pid: int) -> None:
    import psutil

    try:
        parent = psutil.Process(pid)
        victims = parent.children(recursive=True) + [parent]
    except psutil.Error:
        return
    for p in victims:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass


def kill_local_rank_1(agent_pid: int) -> bool:
    import psutil

    for child in psutil.Process(agent_pid).children(recursive=True):
        try:
            if child.environ().get("LOCAL_RANK") == "1" and str(ROOT / "train.py") in child.cmdline():
                child.kill()
                return True
        except psutil.Error:
            pass
    return False


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="ranks of the one agent (default 2; not with --lose_node)")
    p.add_argument("--lose_node", action="store_true",
                   help="two one-rank agents (--nnodes 1:2); kill the second node instead of one rank")
    p.add_argument("--kill_at", type=int, default=6, help="kill once this step is logged (default 6)")
    p.add_argument("--save_every", type=int, default=4, help="checkpoint interval (default 4)")
    p.add_argument("--timeout", type=float, default=600, help="give up after this many seconds (default 600)")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    config = json.loads((ROOT / "config" / "deepspeed_tiny.json").read_text())
    config.pop("train_batch_size", None)  # the checkpoint's global batch then holds on fewer ranks
    config.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1, steps_per_print=1,
                  bf16={"enabled": False}, tensorboard={"enabled": False})
    (work / "ds.json").write_text(json.dumps(config))
    save = work / "ckpt"
    max_steps = args.kill_at + args.save_every + 2
    endpoint = f"127.0.0.1:{free_port()}"
    reference = None
    if args.lose_node:
        ref_save = work / "uninterrupted"
        with open(work / "uninterrupted.log", "w") as log:
            ref = subprocess.run(torchrun(work, ref_save, max_steps, args, f"127.0.0.1:{free_port()}", "1", 2),
                                 cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout)
        if ref.returncode != 0:
            sys.exit(f"the uninterrupted run failed; see {work / 'uninterrupted.log'}")
        reference = {r["step"]: r["loss"] for r in records(ref_save / "metrics.jsonl") if "loss" in r}
        agents = [subprocess.Popen(torchrun(work, save, max_steps, args, endpoint, "1:2", 1), cwd=ROOT,
                                   stdout=open(work / f"node{i}.log", "w"), stderr=subprocess.STDOUT)
                  for i in range(2)]
    else:
        agents = [subprocess.Popen(torchrun(work, save, max_steps, args, endpoint, "1", args.nproc), cwd=ROOT,
                                   stdout=open(work / "node0.log", "w"), stderr=subprocess.STDOUT)]
    metrics, killed_at, deadline = save / "metrics.jsonl", None, time.time() + args.timeout
    while agents[0].poll() is None and time.time() < deadline:
        if killed_at is None and any(r.get("step", 0) >= args.kill_at and "event" not in r for r in records(metrics)):
            if args.lose_node:
                kill_tree(agents[1].pid)
                killed_at = time.time()
            elif kill_local_rank_1(agents[0].pid):
                killed_at = time.time()
        time.sleep(0.05)
    for agent in agents:
        if agent.poll() is None:
            kill_tree(agent.pid)
            agent.wait()
    if time.time() >= deadline:
        sys.exit(f"timed out; see {work}/node0.log")
    rows = records(metrics)
    restart = next((i for i, r in enumerate(rows) if r.get("event") == "restart"), None)
    if agents[0].returncode != 0 or killed_at is None or restart is None:
        sys.exit(f"the run failed (exit {agents[0].returncode}, killed: {killed_at is not None}); "
                 f"see {work}/node0.log")
    resumed, first = rows[restart], rows[restart + 1]
    print(f"| phase | seconds |\n|---|---|\n"
          f"| kill -> restarted workers resumed from step{resumed['step']} | {resumed['time'] - killed_at:.1f} |\n"
          f"| resumed -> first new step ({first['step']}) logged | {first['time'] - resumed['time']:.1f} |\n"
          f"| **kill -> first new step** | **{first['time'] - killed_at:.1f}** |\n"
          f"\nkilled: {'node 1 (agent and rank)' if args.lose_node else 'local rank 1'}; ranks before -> after: "
          f"{resumed.get('checkpoint_world_size')} -> {resumed.get('world_size')}; steps trained again (since the "
          f"checkpoint): {args.kill_at - resumed['step']}; logs: {work}")
    if reference is not None:
        after = {r["step"]: r["loss"] for r in rows[restart + 1:] if "loss" in r}
        diff = max(abs(after[s] - reference[s]) for s in after)
        print(f"losses of steps {min(after)}-{max(after)} after the restart vs the uninterrupted 2-rank run: "
              f"max |difference| {diff:.2e}")
        if diff > 1e-5 or max(after) != max_steps:
            sys.exit("the restarted run does not reproduce the uninterrupted one")


if __name__ == "__main__":
    main()
