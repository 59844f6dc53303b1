"""Recovery: torchrun restarts after a killed and a hung rank, non-finite steps, spike rollback, retention, clean end.

Two launches carry the end-to-end checks: a reference run with the deepspeed launcher that steps over two data
batches by design, and a torchrun run (--max-restarts 2) where those batches go bad on purpose (a NaN loss, a
loss spike rolled back) while a rank is SIGKILLed and another hangs. Both must log the same losses.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from training import recovery
from conftest import ROOT
from test_train import TOKENIZER, ds_config, free_port, run, train_cmd

pytestmark = pytest.mark.skipif(not TOKENIZER.is_file(), reason="tokenizer.model missing at the repo root")

STEPS, EVERY = 16, 4
# Global batch 5 gives a NaN loss on rank 1 (skipped), batch 13 a spike (rolled back and stepped over).
NAN_BATCH, SPIKE_BATCH = 5, 13
G = 4  # samples per global batch (micro-batch 2 x 2 ranks): the global order's data positions count samples
RECOVERY_FLAGS = ("--max_steps", STEPS, "--save_every", EVERY, "--spike_window", 4, "--spike_k", 10)


def losses(save: Path):
    """Step losses from metrics.jsonl, leaving out the restart and spike events."""
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "event" not in r}


def shm_buffers(port: int):
    return {p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("recovery")


@pytest.fixture(scope="module")
def reference(workdir):
    """The deepspeed launcher, stepping over the NaN and spike batches by design (the skip list)."""
    save = workdir / "reference"
    save.mkdir()
    (save / recovery.SKIP_FILE).write_text(json.dumps({"ranges": [[NAN_BATCH * G, (NAN_BATCH + 1) * G],
                                                                  [SPIKE_BATCH * G, (SPIKE_BATCH + 1) * G]]}))
    port = free_port()
    cmd = train_cmd(save, ds_config(workdir / "ds.json"), *RECOVERY_FLAGS, "--keep_last", 1,
                    launcher=["--num_gpus", "2", "--master_port", str(port)])
    proc = run(cmd, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "training complete: reached --max_steps 16" in proc.stdout
    assert not shm_buffers(port), "the run left its shared-memory all-reduce buffers in /dev/shm"
    return save, cmd


def torchrun_cmd(save: Path, config: Path, *extra):
    cmd = train_cmd(save, config, *extra)
    script = cmd.index(str(ROOT / "train.py"))
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "2",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", *cmd[script:]]


def test_torchrun_survives_a_kill_a_hang_a_nan_and_a_spike(reference, workdir):
    import psutil

    save = workdir / "elastic"
    cmd = torchrun_cmd(save, ds_config(workdir / "ds.json"), *RECOVERY_FLAGS, "--rollback_on_spike",
                       "--hang_timeout", 8)
    env = dict(os.environ,
               BAICHUAN_TEST_NAN=json.dumps({"rank": 1, "batches": [NAN_BATCH]}),
               BAICHUAN_TEST_HANG=json.dumps({"rank": 1, "batches": [10], "attempt": 1}),
               BAICHUAN_TEST_SPIKE=json.dumps({"rank": 0, "batches": [SPIKE_BATCH], "attempt": 2}))
    log = open(workdir / "elastic.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    killed, deadline = False, time.time() + 300
    try:
        while proc.poll() is None:
            assert time.time() < deadline, "the torchrun job did not finish"
            if not killed and (save / "metrics.jsonl").exists() and max(losses(save), default=0) >= 7:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    try:
                        if child.environ().get("RANK") == "1" and str(ROOT / "train.py") in child.cmdline():
                            child.kill()  # SIGKILL, as a node failure would
                            killed = True
                    except psutil.Error:
                        pass
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        proc.wait()
    output = (workdir / "elastic.log").read_text()
    assert killed and proc.returncode == 0, output[-4000:]
    assert "watchdog: no training step completed" in output and "in apply_test_hooks" in output  # the stack
    assert "update skipped" in output and "loss spike" in output

    got, want = losses(save), losses(reference[0])
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == pytest.approx(want, abs=1e-5)
    events = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines() if "event" in line]
    assert [e["restart"] for e in events if e["event"] == "restart"] == [1, 2]
    spike = [e for e in events if e["event"] == "spike"]
    assert len(spike) == 1 and spike[0]["data_batches"] == [SPIKE_BATCH * G, (SPIKE_BATCH + 1) * G]
    assert recovery.load_skips(save) == [[SPIKE_BATCH * G, (SPIKE_BATCH + 1) * G]]
    last = json.loads([line for line in (save / "metrics.jsonl").read_text().splitlines()
                       if "event" not in line][-1])
    assert last["skipped_steps"] == 1


def test_a_finished_run_says_already_complete_without_building_the_engine(reference):
    save, cmd = reference
    before = (save / "metrics.jsonl").read_text()
    proc = run(cmd, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already complete" in proc.stdout and "step16" in proc.stdout
    assert "resumed from" not in proc.stdout and "DeepSpeed Final Optimizer" not in proc.stdout + proc.stderr
    assert (save / "metrics.jsonl").read_text() == before
    assert sorted(p.name for p in save.glob("step*")) == ["step16"]  # --keep_last 1


# ---- in-process ------------------------------------------------------------------------------------------

def make_tags(save: Path, steps, complete=True):
    for s in steps:
        (save / f"step{s}").mkdir(parents=True)
        (save / f"step{s}" / "mp_rank_00_model_states.pt").write_bytes(b"x")
        if complete:
            (save / f"step{s}" / "complete.json").write_text("{}")


def test_retention_after_ten_checkpoints(tmp_path):
    kept_by_rule = []
    for n in range(1, 11):  # saves every 100 steps, pruned after each as train.py does
        make_tags(tmp_path, [n * 100])
        (tmp_path / "latest").write_text(f"step{n * 100}")
        if n == 4:
            (tmp_path / "step400_universal").mkdir()
        recovery.prune_checkpoints(tmp_path, keep_last=2, keep_every=3, steps_per_save=100)
        kept_by_rule.append(sorted(int(p.name[4:]) for p in tmp_path.glob("step*") if p.name[4:].isdigit()))
    assert kept_by_rule[-1] == [300, 600, 900, 1000]  # the last 2 and every 3rd save
    assert not (tmp_path / "step400_universal").exists()  # derived folders go with their checkpoint
    make_tags(tmp_path, [1100], complete=False)  # being written: never counted, never deleted
    recovery.prune_checkpoints(tmp_path, keep_last=1, keep_every=0, steps_per_save=100)
    assert sorted(p.name for p in tmp_path.glob("step*")) == ["step1000", "step1100"]
    recovery.prune_checkpoints(tmp_path, keep_last=0, keep_every=0, steps_per_save=100)  # 0 keeps everything
    assert (tmp_path / "step1000").is_dir()


def test_spike_detector_needs_a_full_window_and_ignores_falls():
    spikes = recovery.SpikeDetector(window=4, k=3.0)
    assert not any(spikes.is_spike(x) for x in (10.0, 9.0, 8.0, 7.5, 2.0))  # a fall is never a spike
    assert spikes.is_spike(50.0)
    assert not spikes.is_spike(7.0)  # the spike did not enter the window
    assert not recovery.SpikeDetector(window=0, k=3.0).is_spike(1e9)


def test_skip_list_moves_the_data_position(tmp_path):
    assert recovery.load_skips(tmp_path) == []
    recovery.add_skip(tmp_path, 7, 9)
    recovery.add_skip(tmp_path, 2, 3)
    recovery.add_skip(tmp_path, 7, 9)
    assert recovery.load_skips(tmp_path) == [[2, 3], [7, 9]]

    class Data:
        step = 7

        def state_dict(self):
            return {"step": self.step}

        def load_state_dict(self, state):
            self.step = state["step"]

    data = Data()
    recovery.step_over_skips(data, recovery.load_skips(tmp_path))
    assert data.step == 9
    (tmp_path / recovery.SKIP_FILE).write_text('{"ranges": [[5, 5]]}')
    with pytest.raises(ValueError, match=r"skipped_batches.json: not a valid skip list"):
        recovery.load_skips(tmp_path)


def test_consecutive_non_finite_steps_stop_naming_step_position_and_files(tmp_path):
    import torch
    import torch.distributed as dist

    from data import DataEngine

    (tmp_path / "data").mkdir()
    line = "recovery names the source file of every bad batch, one line of text long enough to keep\n"
    (tmp_path / "data" / "only.txt").write_text(line * 40)
    data = DataEngine(tmp_path / "data", TOKENIZER, 2, 16, world_size=1, rank=0, cache_dir=False,
                      num_workers=1).load_data()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        guard = recovery.NonFiniteGuard(max_consecutive=2)
        engine = SimpleNamespace(skipped_steps=0)
        data.get_data()
        assert not guard.after_step(engine, 0, 0, data, 0, [torch.tensor(1.0)], 0)
        engine.skipped_steps = 1
        data.get_data()
        assert guard.after_step(engine, 0, 1, data, 1, [torch.tensor(float("nan"))], 1)
        engine.skipped_steps = 2
        data.get_data()
        with pytest.raises(recovery.NonFiniteError, match=r"2 consecutive steps .* stopped at step 2, data "
                                                          r"position 2-2 .*rank 0: .*only.txt"):
            guard.after_step(engine, 1, 1, data, 2, [torch.tensor(float("nan"))], 2)
    finally:
        dist.destroy_process_group()


def test_shutdown_distributed_destroys_the_group_and_is_a_no_op_without_one():
    """train.py ends through this: a gloo group left to the interpreter's teardown aborted a finished rank in CI
    (exit -6, "terminate called without an active exception"), which failed the launch."""
    import torch
    import torch.distributed as dist

    recovery.shutdown_distributed()  # no group yet: nothing to wait for
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        dist.all_reduce(torch.ones(2))
        recovery.shutdown_distributed()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_watchdog_dumps_every_stack_and_exits_nonzero():
    code = ("import time, training.recovery as recovery\n"
            "w = recovery.Watchdog(0.5)\n"
            "time.sleep(30)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == recovery.EXIT_HANG
    assert "no training step completed" in proc.stderr
    assert "in _watch" in proc.stderr and "Thread 0x" in proc.stderr  # the watchdog's own thread and the others
    assert 'File "<string>", line 3' in proc.stderr  # the main thread, stuck where it was


def test_schedule_length_on_resume():
    assert recovery.schedule_length(24, None, keep=False) == 24
    assert recovery.schedule_length(48, 24, keep=False) == 48
    assert recovery.schedule_length(48, 24, keep=True) == 24


def test_restart_cap(tmp_path, monkeypatch):
    metrics = tmp_path / "metrics.jsonl"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    recovery.note_restart(metrics, 0, max_per_hour=2)
    assert not metrics.exists()  # the first attempt is no restart
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    recovery.note_restart(metrics, 4, max_per_hour=2, world_size=1, checkpoint_world_size=2)
    recovery.note_restart(metrics, 4, max_per_hour=2)
    with pytest.raises(RuntimeError, match=r"3 restarts within the last hour"):
        recovery.note_restart(metrics, 4, max_per_hour=2)
    events = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [e["event"] for e in events] == ["restart"] * 3
    assert (events[0]["world_size"], events[0]["checkpoint_world_size"]) == (1, 2)  # an elastic job that shrank
