"""Training that survives failures: restart under torch elastic, non-finite steps, loss spikes, hangs, retention.

train.py calls into this module at a few points; docs/recovery.md describes the behaviour for users.

- ``init_distributed``: the process group of a torchrun restart lives on a store prefix of its own, so restarted
  workers never read the keys of the attempt that died; plain ``deepspeed``-launcher runs are unchanged.
- ``remove_shm_buffers``: DeepSpeed's CPU all-reduce leaves a buffer per rank in /dev/shm; a run removes its own
  when it starts (a killed attempt's buffer under the same name) and when it ends.
- ``NonFiniteGuard``: counts the updates DeepSpeed's ZeRO optimizer discarded for a non-finite gradient norm and
  stops the job after too many in a row, naming the step, the data position and the batch's source files.
- ``SpikeDetector`` and the skip list (``skipped_batches.json``): a loss spike can roll the run back to the last
  complete checkpoint and step over the batches that caused it.
- ``Watchdog``: a step that never completes makes the process exit non-zero with every thread's stack.
- ``prune_checkpoints``: ``--keep_last`` / ``--keep_every`` retention, run after a newer tag is sealed.
- ``note_restart``: a ``restart`` event in metrics.jsonl and a cap on restarts per hour.
"""
import atexit
import faulthandler
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections import deque
from datetime import timedelta
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# The global order's sample index covers --max_steps batches and these: skipped steps and rolled-back batches
# use data without making a step, so a run may skip this many in all before the index runs out (an error).
SPARE_BATCHES = 1000
SKIP_FILE = "skipped_batches.json"  # data ranges stepped over after a spike; outlives the rollback it causes
SHM_DIR = Path("/dev/shm")
EXIT_HANG = 3  # the watchdog's exit status
EXIT_ROLLBACK = 4  # a spike asked for a rollback: the elastic agent restarts from the last complete checkpoint


class NonFiniteError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------------------
# Distributed init and shared memory
# ----------------------------------------------------------------------------------------------------------

def restart_count() -> Optional[int]:
    """The torch elastic attempt number (0 for the first), or None outside torchrun."""
    value = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    return None if value is None else int(value)


def shm_buffer_path(rank: int) -> Path:
    """The name DeepSpeed's shared-memory all-reduce gives this rank's buffer (deepspeed/ops/csrc/cpu/comm/shm.cpp)."""
    return SHM_DIR / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                      f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def remove_shm_buffers(rank: int) -> None:
    """Remove this rank's all-reduce buffer. Before the process group exists, this clears the buffer a killed
    attempt left under the same name (its stale state would be read as the new attempt's); at exit, the run's own.
    A peer that already mapped the buffer keeps its mapping: unlinking frees the memory once all have unmapped."""
    try:
        shm_buffer_path(rank).unlink()
    except FileNotFoundError:
        pass


def remove_shm_buffers_at_exit(rank: int) -> None:
    """Remove this rank's buffer at a normal exit, an exception, and the SIGTERM a launcher sends to the ranks
    that survive a failed one (whose default action would skip the clean-up)."""
    atexit.register(remove_shm_buffers, rank)

    def on_sigterm(signum, frame):
        remove_shm_buffers(rank)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)


def init_distributed(timeout: timedelta) -> None:
    """Create the default process group; under torchrun, on a store prefix named after the restart count.

    torchrun's agent keeps one TCPStore (MASTER_ADDR:MASTER_PORT) across restarts. Restarted workers that
    rendezvous on it as plain ``init_process_group`` does read the previous attempt's keys and wait for peers
    that no longer exist (gloo's connectFullMesh, past any timeout). A prefix per attempt starts them clean.
    The same path serves NCCL: only the store under the process group changes.
    """
    import deepspeed

    attempt = restart_count()
    rank = int(os.environ.get("RANK", "0"))
    remove_shm_buffers(rank)
    if attempt is not None:
        world = int(os.environ["WORLD_SIZE"])
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                              timeout=timeout)
        backend = deepspeed.get_accelerator().communication_backend_name()
        kwargs = {}
        if backend == "nccl":  # bind the device as DeepSpeed's own init does
            kwargs["device_id"] = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, store=dist.PrefixStore(f"baichuan_attempt{attempt}/", store), rank=rank,
                                world_size=world, timeout=timeout, **kwargs)
    deepspeed.init_distributed(timeout=timeout)  # with a group in place, this only sets DeepSpeed's backend up
    # DeepSpeed maps the peers' shared-memory buffers after its own, waiting for each name to exist: no rank may
    # exit (and remove its buffer) before every rank has mapped them, or that peer waits forever.
    dist.barrier()


def shutdown_distributed() -> None:
    """Destroy the process group once every rank is done with it, on success only.

    A gloo group left for the interpreter's teardown can abort a rank that finished its work ("terminate called
    without an active exception", exit -6: pytorch/pytorch#190489), and the launcher then fails the whole run. A
    rank that raises skips this, as torchtitan's trainer does: it must not wait here for a peer stuck in a
    collective."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# Resume checks and a clean end
# ----------------------------------------------------------------------------------------------------------

def read_complete_info(save_dir: Path, tag: Optional[str]) -> dict:
    if not tag:
        return {}
    return json.loads((Path(save_dir) / tag / "complete.json").read_text(encoding="utf-8"))


def schedule_length(max_steps: int, saved: Optional[int], keep: bool) -> int:
    """The learning-rate schedule's length on resume: --max_steps, or with `keep` the checkpoint's own."""
    if saved is None or saved == max_steps:
        return max_steps
    if keep:
        logger.warning("--keep_schedule: the learning-rate schedule keeps its length of %d steps (--max_steps %d)",
                       saved, max_steps)
        return saved
    logger.warning("--max_steps %d differs from the checkpoint's schedule length %d: the learning-rate schedule is "
                   "stretched to the new length, so the rate jumps at this step (pass --keep_schedule to keep the "
                   "old schedule)", max_steps, saved)
    return max_steps


def set_schedule_length(engine, schedule_steps: Optional[int]) -> None:
    """After loading a checkpoint: its scheduler state carries the old length (training/schedule.py's
    WarmupCosine is saved with its parameters); give it the length schedule_length chose."""
    if schedule_steps is None:
        return
    for fn in getattr(engine.lr_scheduler, "lr_lambdas", []):
        if hasattr(fn, "total"):
            fn.total = schedule_steps


# ----------------------------------------------------------------------------------------------------------
# Non-finite loss or gradient norm
# ----------------------------------------------------------------------------------------------------------

def check_skip_supported(engine) -> None:
    """DeepSpeed discards an update whose gradient norm is not finite in its ZeRO and fp16 optimizers, all-reduced
    before any parameter or Adam moment moves and without stepping the schedule; bf16 does so only with
    ``bf16.check_grad_overflow`` (on by default). Without ZeRO in fp32, nothing would discard it."""
    if not hasattr(engine.optimizer, "overflow"):
        raise ValueError("non-finite steps cannot be skipped with this DeepSpeed config: use ZeRO stage 1-3 or "
                         "fp16/bf16 (DeepSpeed's plain fp32 optimizer applies NaN updates)")
    if engine.bfloat16_enabled() and not engine._config.bfloat16_config.check_grad_overflow:
        raise ValueError('"bf16": {"check_grad_overflow": false} in the DeepSpeed config lets NaN gradients into '
                         "the weights; remove it so that non-finite steps are skipped")


def batch_sources(data, micro_step: int) -> List[str]:
    """The files (or sources) the rows of this rank's micro-batch `micro_step` were packed from."""
    if hasattr(data, "sample_ids"):  # the global order: sample ids index the sources' concatenation
        import numpy as np

        ids = data.sample_ids(micro_step)
        return sorted({str(data.sources[s].name) for s in np.searchsorted(data.offsets, ids, side="right") - 1})
    epoch, position = divmod(micro_step, data.steps_per_epoch)
    mbs, length = data.micro_batch_size, data.sample_length
    ends, total = [], 0
    for st in data.file_stats:
        total += st["tokens"]
        ends.append(total)
    files = set()
    for sample in data._epoch_order(epoch)[position * mbs:(position + 1) * mbs]:
        start, stop = int(sample) * length, (int(sample) + 1) * length
        for i, end in enumerate(ends):
            if end > start and (i == 0 or ends[i - 1] < stop):
                files.add(data.file_stats[i]["file"])
    return sorted(files)


class NonFiniteGuard:
    """Watches DeepSpeed's count of discarded updates (engine.skipped_steps, kept in its checkpoints); raises
    NonFiniteError after `max_consecutive` in a row."""

    def __init__(self, max_consecutive: int):
        self.max_consecutive, self.consecutive = max_consecutive, 0

    def after_step(self, engine, skipped_before: int, step: int, data, data_start: int, local_losses,
                   micro_start: int) -> bool:
        """Call after the accumulation boundary's engine.step(); True when DeepSpeed discarded the update.
        `data_start` is the data position before the step, `micro_start` the engine's micro-batch count then."""
        if engine.skipped_steps == skipped_before:
            self.consecutive = 0
            return False
        self.consecutive += 1
        bad_here = [i for i, v in enumerate(local_losses) if not math.isfinite(v)]
        logger.warning("step %d: non-finite loss or gradient norm; update skipped (%d in a row, %d in all), data "
                       "position %d-%d", step + 1, self.consecutive, engine.skipped_steps, data_start,
                       data_position(data) - 1)
        if self.consecutive >= self.max_consecutive:
            # Every rank says which of its batches went bad; the error names them all.
            mine = {"rank": dist.get_rank(), "nonfinite_micro_batches": bad_here,
                    "files": sorted({f for b in range(micro_start, data.step) for f in batch_sources(data, b)})}
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
            culprits = [r for r in everyone if r["nonfinite_micro_batches"]] or everyone
            detail = "; ".join(f"rank {r['rank']}: {', '.join(r['files'])}" for r in culprits)
            raise NonFiniteError(
                f"{self.consecutive} consecutive steps had a non-finite loss or gradient norm (--max_skipped_steps "
                f"{self.max_consecutive}); stopped at step {step + 1}, data position {data_start}-"
                f"{data_position(data) - 1} "
                f"(epoch {data.epoch}); source files of the last batch: {detail}. The last complete checkpoint "
                f"stays the resume point.")
        return True


# ----------------------------------------------------------------------------------------------------------
# Loss spikes and the skip list
# ----------------------------------------------------------------------------------------------------------

class SpikeDetector:
    """A loss above mean + k * std of the previous `window` step losses (once the window is full) is a spike.
    Spikes do not enter the window, so one does not hide the next."""

    def __init__(self, window: int, k: float):
        self.window, self.k = window, k
        self.history = deque(maxlen=window)

    def is_spike(self, loss: float) -> bool:
        if self.window > 0 and len(self.history) == self.window:
            mean = sum(self.history) / self.window
            std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / self.window)
            if loss > mean + self.k * std:
                return True
        self.history.append(loss)
        return False

    def check(self, step_loss: torch.Tensor, step: int, data_batches: List[int], metrics_path: Path) -> bool:
        """Every rank: average `step_loss` over the ranks and test it; rank 0 logs a spike event."""
        if self.window <= 0:
            return False
        mean = step_loss.detach().clone()
        dist.all_reduce(mean)
        loss = mean.item() / dist.get_world_size()
        if not self.is_spike(loss):
            return False
        if dist.get_rank() == 0:
            event = {"event": "spike", "step": step, "loss": loss, "data_batches": data_batches, "time": time.time()}
            print(f"loss spike: {event}", flush=True)
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(event) + "\n")
        return True


def data_position(data) -> int:
    """Where the data stands between optimizer steps, the same on every rank: global samples consumed under the
    global order (independent of the world size), batches served per rank under the per-rank order."""
    return data.global_samples if hasattr(data, "global_samples") else data.step


def batch_number(data, gas: int) -> int:
    """The number of the global batch the next optimizer step trains on (for the test hooks)."""
    if hasattr(data, "global_samples"):
        return data.global_samples // data.global_batch_size
    return data.step // gas


def set_data_position(data, position: int) -> None:
    state = data.state_dict()
    state["global_samples" if hasattr(data, "global_samples") else "step"] = position
    data.load_state_dict(state)


def load_skips(save_dir: Path) -> List[List[int]]:
    """[start, end) ranges of data positions (data_position) that every later run steps over (written when a spike
    rolled back)."""
    path = Path(save_dir) / SKIP_FILE
    if not path.is_file():
        return []
    try:
        ranges = json.loads(path.read_text(encoding="utf-8"))["ranges"]
        if not all(isinstance(a, int) and isinstance(b, int) and 0 <= a < b for a, b in ranges):
            raise ValueError("each range must be [start, end) with 0 <= start < end")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a valid skip list ({{\"ranges\": [[start, end], ...]}}): {e}") from e
    return sorted(ranges)


def add_skip(save_dir: Path, start: int, end: int) -> None:
    from checkpoint.io import write_atomic

    ranges = load_skips(save_dir)
    if [start, end] not in ranges:
        ranges.append([start, end])
    write_atomic(Path(save_dir) / SKIP_FILE, json.dumps({"ranges": sorted(ranges)}, indent=1))


def step_over_skips(data, ranges) -> None:
    """Move the data position past any skipped range it stands in (between optimizer steps)."""
    for start, end in sorted(ranges):
        if start <= data_position(data) < end:
            set_data_position(data, end)


# ----------------------------------------------------------------------------------------------------------
# Hangs
# ----------------------------------------------------------------------------------------------------------

class Watchdog:
    """Exit with EXIT_HANG and every thread's stack when beat() has not been called for `timeout` seconds, so
    an elastic agent restarts the job instead of it waiting for a collective's timeout."""

    def __init__(self, timeout: float, on_exit=None):
        self.timeout, self.on_exit = timeout, on_exit
        self.last = time.monotonic()
        self._stop = threading.Event()
        if timeout > 0:
            threading.Thread(target=self._watch, name="hang-watchdog", daemon=True).start()

    def beat(self) -> None:
        self.last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            idle = time.monotonic() - self.last
            if idle > self.timeout:
                sys.stderr.write(f"\nwatchdog: no training step completed for {idle:.0f}s (--hang_timeout "
                                 f"{self.timeout:g}); stacks of every thread follow, then exit {EXIT_HANG}\n")
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                if self.on_exit is not None:
                    self.on_exit()
                os._exit(EXIT_HANG)


# ----------------------------------------------------------------------------------------------------------
# Retention
# ----------------------------------------------------------------------------------------------------------

def prune_checkpoints(save_dir: Path, keep_last: int, keep_every: int, steps_per_save: int) -> List[str]:
    """Rank 0, right after a tag is sealed: delete complete checkpoints that neither are among the newest
    `keep_last` nor fall on every `keep_every`-th save (step a multiple of keep_every * steps_per_save), with
    their derived folders (<tag>_universal). The tag `latest` names is always kept; 0 turns a rule off (keep_last
    0 keeps everything). Returns the deleted tags."""
    from checkpoint.io import list_tags

    if keep_last <= 0:
        return []
    save_dir = Path(save_dir)
    complete, _ = list_tags(save_dir)
    latest_file = save_dir / "latest"
    latest = latest_file.read_text(encoding="utf-8").strip() if latest_file.is_file() else None
    keep = set(complete[-keep_last:]) | {latest}
    if keep_every > 0:
        keep |= {t for t in complete if t[4:].isdigit() and int(t[4:]) % (keep_every * steps_per_save) == 0}
    deleted = []
    for tag in complete:
        if tag in keep:
            continue
        # The seal goes first, so a deletion cut short leaves a half-written folder, never a "complete" one.
        (save_dir / tag / "complete.json").unlink()
        for folder in (save_dir / tag, save_dir / f"{tag}_universal"):
            shutil.rmtree(folder, ignore_errors=True)
        deleted.append(tag)
    if deleted:
        logger.info("retention: deleted %s", ", ".join(deleted))
    return deleted


# ----------------------------------------------------------------------------------------------------------
# Restart bookkeeping
# ----------------------------------------------------------------------------------------------------------

def note_restart(metrics_path: Path, step: int, max_per_hour: int, world_size: Optional[int] = None,
                 checkpoint_world_size: Optional[int] = None) -> None:
    """Rank 0 of a restarted torchrun attempt: append a `restart` event, and raise when more than `max_per_hour`
    restarts happened in the last hour (a crash that repeats deterministically would otherwise burn the job's
    restarts and hours). The event keeps both world sizes: an elastic job that lost a node shows it shrank."""
    attempt = restart_count()
    if not attempt:
        return
    now = time.time()
    recent = 0
    if metrics_path.exists():
        for line in metrics_path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line) if line.strip() else {}
            if record.get("event") == "restart" and now - record.get("time", 0) < 3600:
                recent += 1
    with open(metrics_path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"event": "restart", "step": step, "restart": attempt, "world_size": world_size,
                            "checkpoint_world_size": checkpoint_world_size, "time": now}) + "\n")
    if recent + 1 > max_per_hour:
        raise RuntimeError(f"{recent + 1} restarts within the last hour (--max_restarts_per_hour {max_per_hour}; "
                           f"see the restart events in {metrics_path}): the failure repeats, so stopping here. "
                           "Fix its cause and start the job again.")


# ----------------------------------------------------------------------------------------------------------
# Test hooks (environment variables read only by tests; not flags, so no production run sets them by accident)
# ----------------------------------------------------------------------------------------------------------

def _hook(name: str) -> dict:
    """BAICHUAN_TEST_<NAME>='{"rank": 1, "batches": [5], "attempt": 0}' -> that dict, or {}."""
    value = os.environ.get(f"BAICHUAN_TEST_{name}")
    return json.loads(value) if value else {}


def apply_test_hooks(loss: torch.Tensor, data_step: int, rank: int):
    """Apply the test hooks to the loss of global batch number `data_step` (batch_number): NAN makes it NaN (so
    the gradients are too), SPIKE
    adds 100 to the value the detector sees only, HANG sleeps forever. Returns (loss, spike offset)."""
    attempt = restart_count() or 0
    for name in ("NAN", "SPIKE", "HANG"):
        hook = _hook(name)
        if (hook and hook.get("rank", rank) == rank and data_step in hook["batches"]
                and hook.get("attempt", attempt) == attempt):
            if name == "NAN":
                loss = loss * float("nan")
            elif name == "SPIKE":
                return loss, 100.0
            else:
                while True:
                    time.sleep(3600)
    return loss, 0.0
