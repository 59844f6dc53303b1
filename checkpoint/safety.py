"""What a checkpoint folder may do to this process: hand over tensors and plain values, nothing else.

A DeepSpeed checkpoint is a set of pickles (``*.pt``). DeepSpeed 0.19.8 loads them with ``torch.load(...,
weights_only=False)`` (its checkpoint engine, ZeRO-3 optimizer loading, universal loading, ``zero_to_fp32`` and
``ds_to_universal``), which runs whatever code a crafted file names. So before DeepSpeed reads a tag, every
``*.pt`` in it is read once here with ``weights_only=True`` and the short allow-list of DeepSpeed classes its
checkpoints hold (``safe_globals()``); a file that names anything else is refused, as is one whose size differs
from the size recorded when the tag was sealed (a truncated or replaced file). The files are memory-mapped, so
this reads the pickles' small headers, not the tensors.

Saving goes through ``SaveGuard``: DeepSpeed's checkpoint engine writes each file through it, so a failed
write (disk full, permission) becomes an error naming the file, the errno, the space needed and free, and the
checkpoint that stays valid. The error is kept rather than raised inside DeepSpeed's save (whose collectives the
other ranks are in), and every rank learns it afterwards through ``common.all_ranks_ok``.
"""
import errno
import os
import pickle
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

# Classes DeepSpeed's checkpoints hold besides tensors and builtins (found by loading ZeRO-1/2/3, fp32/bf16
# checkpoints of train.py with weights_only=True): the fp32/ZeRO-2 optimizer state keeps the loss scaler, the
# ZeRO stage enum and the partition map's fragment addresses.
def safe_globals():
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that names code to run, or that is damaged: it is not loaded."""


class CheckpointWriteError(OSError):
    """A failed checkpoint write; its message already names the errno."""

    def __str__(self):
        return self.strerror


# Tests replace this to simulate a failing disk (ENOSPC) or a folder that became read-only (EACCES, EROFS):
# called with the path before every write to a checkpoint folder (check_write), and raises the OSError.
io_fault_hook: Optional[Callable[[Path], None]] = None


def check_write(path: Path) -> None:
    """Where a checkpoint file is about to be written, created or removed: the test hook's fault, if any."""
    if io_fault_hook is not None:
        io_fault_hook(Path(path))


def safe_load(path, what: str = "checkpoint file"):
    """torch.load with weights_only=True and the DeepSpeed allow-list; memory-mapped when the file allows it.

    Raises UnsafeCheckpointError naming the file for a pickle that names other code or a damaged file."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(safe_globals()):
            try:
                return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # a legacy (non-zip) file cannot be memory-mapped; read it whole
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).split("\n\n")[0].strip()
        raise UnsafeCheckpointError(f"{what} {path} is refused: loading it would run code or build objects that "
                                    f"are not on the allow-list ({first})") from e
    except (RuntimeError, EOFError, ValueError) as e:
        raise UnsafeCheckpointError(f"{what} {path} is damaged (truncated or not a torch file?): "
                                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def file_sizes(tag_dir: Path) -> dict:
    """{file name: bytes} of the tag's files (recorded in the seal, which is not one of them)."""
    return {p.name: p.stat().st_size for p in sorted(Path(tag_dir).iterdir())
            if p.is_file() and p.name != "complete.json" and not p.name.startswith(".")}


def verify_tag_files(tag_dir: Path, recorded_sizes: Optional[dict]) -> None:
    """Refuse a tag whose files differ from those recorded at sealing, or any of whose *.pt would run code.

    Call before anything (DeepSpeed's load, zero_to_fp32, ds_to_universal) reads the tag with weights_only=False."""
    tag_dir = Path(tag_dir)
    for name, size in (recorded_sizes or {}).items():
        path = tag_dir / name
        if not path.is_file():
            raise UnsafeCheckpointError(f"{path} is missing: it was written when {tag_dir.name} was sealed; the "
                                        "checkpoint was damaged after saving")
        if path.stat().st_size != size:
            raise UnsafeCheckpointError(f"{path} has {path.stat().st_size} bytes but was sealed with {size}: it was "
                                        "truncated or replaced after saving")
    for path in sorted(tag_dir.glob("*.pt")):
        safe_load(path)


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------

def _tensor_bytes(obj) -> int:
    """Bytes of the tensors in a nested state (what the file will need on disk, roughly)."""
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes() if obj.device.type != "meta" else 0
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def describe_write_error(path: Path, error: BaseException, needed: Optional[int], valid: str) -> str:
    """One line: the file, the errno (with space needed and free for ENOSPC) and the checkpoint that stays valid."""
    code = getattr(error, "errno", None)
    text = f"writing {path} failed: "
    if code is not None:
        text += f"[Errno {code} {errno.errorcode.get(code, '?')}] {os.strerror(code)}"
    else:
        text += f"{type(error).__name__}: {error}"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        text += f"; {path.parent} is not writable (permissions changed, or the file system is mounted read-only)"
    if code == errno.ENOSPC:
        try:
            free = shutil.disk_usage(path.parent).free
        except OSError:
            free = None
        text += (f"; this file needs about {_gb(needed)}" if needed else "") + \
                (f", {_gb(free)} free on that file system" if free is not None else "")
    return f"{text}. {valid}"


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e7 else f"{n / 1e6:.2f} MB"


class SaveGuard:
    """Wraps a DeepSpeed engine's checkpoint writes: files are written through a Python file (so a failure
    carries its errno), fsynced, and a failure is kept in ``error`` instead of raised inside DeepSpeed's save.

    ``valid`` describes the checkpoint that stays valid, for the error message."""

    def __init__(self, engine):
        self.checkpoint_engine = engine.checkpoint_engine
        self._save = self.checkpoint_engine.save
        self.error: Optional[CheckpointWriteError] = None
        self.valid = ""

    def __enter__(self):
        self.error = None
        self.checkpoint_engine.save = self.save
        return self

    def __exit__(self, *exc):
        self.checkpoint_engine.save = self._save
        return False

    def save(self, state_dict, path):
        if self.error is not None:
            return  # this rank already failed; the rest of the tag is not worth writing
        path = Path(path)
        try:
            check_write(path)
            with open(path, "wb") as f:
                torch.save(state_dict, f)
                f.flush()
                os.fsync(f.fileno())  # the seal, written after this, must not outlive the data after a crash
        except (OSError, RuntimeError) as e:
            cause = e if isinstance(e, OSError) else (_os_error_of(e) or e)
            message = describe_write_error(path, cause, _tensor_bytes(state_dict), self.valid)
            self.error = CheckpointWriteError(getattr(cause, "errno", None) or errno.EIO, message)
            path.unlink(missing_ok=True)  # half a file only takes space; the tag stays unsealed either way


def _os_error_of(error: BaseException) -> Optional[OSError]:
    while error is not None:
        if isinstance(error, OSError):
            return error
        error = error.__cause__ or error.__context__
    return None
