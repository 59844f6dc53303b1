"""Small helpers shared by training, evaluation, scripts, benchmarks and tests: one home for each."""
import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Optional, Union

REPO_ROOT = Path(__file__).resolve().parent
# The benchmarks and the real-data tests read the official files where they lie; users point this variable at
# their own copy (see the README's evaluation section).
SHARED_DATA_ENV = "BAICHUAN_SHARED_DATA"


def shared_data_dir() -> Path:
    """Where the real benchmark and corpus files lie: $BAICHUAN_SHARED_DATA, else ../shared/data beside the repo."""
    return Path(os.environ.get(SHARED_DATA_ENV, REPO_ROOT.parent / "shared" / "data"))


def write_atomic(path: Union[str, Path], data: Union[str, bytes], fsync: bool = True) -> None:
    """Write to a temporary file beside `path`, then rename: a reader sees the old file or the new, never half.

    fsync before the rename, so that after a crash the name points at complete contents."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates owner-only files; these are shared outputs
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_json(path: Union[str, Path], what: str):
    """Parse a JSON file, or raise ValueError naming `what` (a flag or role) and the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: {path} is not valid JSON: {e}") from e


def free_port() -> int:
    """A TCP port free on this machine now, for a launcher's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux
        import psutil

        return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def pick_device_and_dtype(device: str = "auto", dtype: str = "auto", flag: str = "--device"):
    """('cuda' or 'cpu' or as given, torch dtype): bf16 (fp16 without bf16 support) on a GPU, fp32 on the CPU."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"{flag} {device}: CUDA is not available on this machine (use {flag} cpu)")
    if dtype == "auto":
        if device.startswith("cuda"):
            return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return device, torch.float32
    return device, getattr(torch, dtype)


def all_ranks_ok(error: Optional[BaseException], where: str) -> None:
    """Agree across ranks whether `where` succeeded, so one rank's error never leaves the others in a collective.

    Every rank calls this; a rank with an error raises it, the others raise an error that quotes it (so every
    rank's log says why, not only that a peer went away)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if error is not None:
            raise error
        return
    device = "cpu" if dist.get_backend() == "gloo" else torch.device("cuda", torch.cuda.current_device())
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int64, device=device)
    dist.all_reduce(flag)
    if not flag.item():
        return
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
    failed = "; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None)
    if error is None:
        print(f"rank {dist.get_rank()}: {where} failed on another rank: {failed}", file=sys.stderr, flush=True)
    dist.barrier()  # the failing rank exits (and its launcher kills the rest) only after every log says why
    if error is not None:
        raise error
    raise RuntimeError(f"{where} failed on {flag.item()} other rank(s): {failed}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the module docstring's layout and shows every flag's default."""


def run_cli(main, *args, expected: tuple = ()):
    """Run an entry point; Ctrl-C ends it with one line and exit status 130 instead of a traceback per process.
    The `expected` errors (bad input the user can fix, whose message names the file, row or flag) end with that
    message and exit status 1, without a traceback."""
    try:
        return main(*args)
    except KeyboardInterrupt:
        print(f"{Path(sys.argv[0]).name}: interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130)
    except expected as e:
        raise SystemExit(f"error: {e}")
