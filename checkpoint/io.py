"""Checkpoints in and out of training: complete-only DeepSpeed checkpoints, and Hugging Face weights in.

(The way out, a DeepSpeed checkpoint to a Hugging Face folder, is checkpoint/export.py; it picks its
tag with ``resolve_checkpoint_tag`` below.)

A DeepSpeed checkpoint under ``<save_dir>/<tag>/`` counts as complete once ``<tag>/complete.json`` exists; it
is written after every rank has finished writing, and only then does ``<save_dir>/latest`` move to the tag
(written under a temporary name and renamed). A job killed while saving therefore resumes from the
previous checkpoint, and a half-written one is never taken for a good one. Re-writing a tag (after resuming
from an earlier one) first removes its seal, so a kill in between cannot leave old seal over new files.

Tags are names, not paths (``validate_tag``): a ``--tag``, ``--resume`` or ``latest`` naming ``../x`` or an
absolute path is an error. Before a tag is read, ``open_tag`` checks its files against the sizes recorded in
the seal and reads every ``*.pt`` once without running code (checkpoint/safety.py).
"""
import json
import os
import re
import time
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import torch

from checkpoint.safety import CheckpointWriteError, SaveGuard, check_write, file_sizes, safe_load, verify_tag_files
from common import all_ranks_ok, read_json, write_atomic  # noqa: F401 - re-exported for callers of this module

COMPLETE_MARKER = "complete.json"
# Fields that decide the weights' shapes: a folder whose config differs in one of them cannot be loaded.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


# step<N>, step<N>_universal ... or a plain name: one path component, never "..", hidden or absolute.
TAG_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def validate_tag(tag: str, where: str = "checkpoint tag") -> str:
    """`tag` if it is a plain name (step2000, step2000_universal, final); else ValueError naming `where`."""
    if not isinstance(tag, str) or not TAG_PATTERN.fullmatch(tag) or ".." in tag:
        raise ValueError(f"{where}: {tag!r} is not a checkpoint tag (a name such as step2000, made of letters, "
                         "digits, '_', '-' and '.'; not a path)")
    return tag


def unseal(save_dir: Path, tag: str) -> None:
    """Rank 0, before a tag's files are (re)written: drop its seal, durably, so that it counts as half-written
    until mark_complete seals it again."""
    marker = Path(save_dir) / validate_tag(tag) / COMPLETE_MARKER
    if marker.exists():
        check_write(marker)
        marker.unlink()
        _fsync_dir(marker.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mark_complete(save_dir: Path, tag: str, info: dict) -> None:
    """Rank 0, after a barrier that follows every rank's save: seal the tag (recording its files' sizes) and
    point `latest` at it; both written atomically and fsynced."""
    tag_dir = Path(save_dir) / validate_tag(tag)
    check_write(tag_dir / COMPLETE_MARKER)
    write_atomic(tag_dir / COMPLETE_MARKER, json.dumps(dict(info, files=file_sizes(tag_dir)), indent=2))
    _fsync_dir(tag_dir)
    check_write(Path(save_dir) / "latest")
    write_atomic(Path(save_dir) / "latest", tag)
    _fsync_dir(Path(save_dir))


def point_latest(save_dir: Path, tag: str) -> None:
    """Rank 0, after resuming from `tag`: `latest` names it, so a later --resume auto follows this run and not
    tags a run abandoned by resuming earlier left behind."""
    latest = Path(save_dir) / "latest"
    if not latest.is_file() or latest.read_text(encoding="utf-8").strip() != tag:
        write_atomic(latest, validate_tag(tag))


def last_valid(save_dir: Path) -> str:
    """A phrase naming the checkpoint a failed save leaves valid."""
    latest = Path(save_dir) / "latest"
    try:
        tag = latest.read_text(encoding="utf-8").strip()
    except OSError:
        return f"No complete checkpoint exists in {save_dir} yet."
    return f"The last complete checkpoint, {Path(save_dir) / tag} (named by `latest`), stays valid."


def save_checkpoint(engine, save_dir: Path, tag: str, client_state: dict, seal_info: dict,
                    files: dict = None) -> None:
    """Every rank: write `tag` with DeepSpeed, then seal it. `files` ({name: source path}) are copied into the
    tag by rank 0 (the tokenizer, so that the tag describes itself).

    A write that fails on any rank (disk full, permission) stops every rank with an error that names the file,
    the errno and the checkpoint that stays valid; the tag is left unsealed."""
    import torch.distributed as dist

    save_dir, rank = Path(save_dir), dist.get_rank()
    tag_dir = save_dir / validate_tag(tag)
    error = None
    if rank == 0:
        try:
            save_dir.mkdir(parents=True, exist_ok=True)
            unseal(save_dir, tag)
        except OSError as e:
            error = CheckpointWriteError(e.errno, f"preparing {tag_dir} failed: {e}. {last_valid(save_dir)}")
    all_ranks_ok(error, f"saving checkpoint {tag}")
    with SaveGuard(engine) as guard:
        guard.valid = last_valid(save_dir)
        engine.save_checkpoint(str(save_dir), tag=tag, client_state=client_state, save_latest=False)
    # Every rank's files are on disk (or its error is known) before the tag is sealed.
    all_ranks_ok(guard.error, f"saving checkpoint {tag}")
    error = None
    if rank == 0:
        try:
            for name, source in (files or {}).items():
                check_write(tag_dir / name)
                write_atomic(tag_dir / name, Path(source).read_bytes())
            mark_complete(save_dir, tag, dict(seal_info, time=time.time()))
        except OSError as e:
            error = CheckpointWriteError(e.errno, f"sealing {tag_dir} failed: [Errno {e.errno}] {e.strerror or e} "
                                     f"({getattr(e, 'filename', None) or tag_dir}). {last_valid(save_dir)}")
    all_ranks_ok(error, f"sealing checkpoint {tag}")


def open_tag(save_dir: Path, tag: str) -> dict:
    """Check a complete tag before anything loads it: its files against the seal, every *.pt without running
    code. Returns train.py's client state (step, data position, model config, run settings), read safely."""
    tag_dir = Path(save_dir) / validate_tag(tag)
    seal = read_json(tag_dir / COMPLETE_MARKER, f"the seal of {tag_dir}")
    verify_tag_files(tag_dir, seal.get("files"))
    return read_client_state(tag_dir)


def read_client_state(tag_dir: Path) -> dict:
    """train.py's client state (step, data position, model_config, run_settings ...) from the tag's model-state
    file, loaded with weights_only=True."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):  # ZeRO-1/2, ZeRO-3
        path = Path(tag_dir) / name
        if path.is_file():
            # mmap: under ZeRO-2 this file also holds the full module weights, which are not needed here.
            state = safe_load(path)
            return {k: v for k, v in state.items() if k not in ("module", "optimizer", "lr_scheduler")}
    raise FileNotFoundError(f"{tag_dir}: no DeepSpeed model-state file (mp_rank_00_model_states.pt or "
                            "zero_pp_rank_0_mp_rank_00_model_states.pt); is this a train.py checkpoint?")


def resolve_resume_tag(save_dir: Path, resume: str) -> Optional[str]:
    """The tag to resume from: `none` -> None; `auto` -> the tag `latest` names, or None when there is no `latest`
    (a fresh run); else that tag. A named tag that is absent or half-written is an error (resolve_checkpoint_tag)."""
    if resume == "none" or (resume == "auto" and not (Path(save_dir) / "latest").is_file()):
        return None
    return resolve_checkpoint_tag(save_dir, None if resume == "auto" else resume, flag="--resume")


def list_tags(save_dir: Path) -> Tuple[list, list]:
    """(complete, half_written) checkpoint tags in `save_dir`, each sorted by step: sub-folders with the complete
    marker, and those without it that hold .pt files or are named step<N> (other folders are not checkpoints)."""
    complete, partial = [], []
    for folder in Path(save_dir).iterdir():
        if folder.is_dir() and ((folder / COMPLETE_MARKER).is_file() or any(folder.glob("*.pt"))
                                or (folder.name.startswith("step") and folder.name[4:].isdigit())):
            (complete if (folder / COMPLETE_MARKER).is_file() else partial).append(folder.name)
    key = lambda t: (int(t[4:]) if t.startswith("step") and t[4:].isdigit() else float("inf"), t)  # noqa: E731
    return sorted(complete, key=key), sorted(partial, key=key)


def resolve_checkpoint_tag(save_dir: Path, tag: Optional[str] = None, flag: str = "--tag") -> str:
    """The complete checkpoint tag to read (export, evaluation): `tag`, or the one `latest` names.

    Raises an error naming the folder and listing the tags present when `latest` is absent, the tag does not
    exist, or it is half-written (no complete.json), instead of DeepSpeed's bare "file not found".
    """
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        raise FileNotFoundError(f"checkpoint folder {save_dir} does not exist (pass train.py's "
                                "--checkpoint_saving_path)")
    complete, partial = list_tags(save_dir)

    def present() -> str:
        listed = f"complete tags: {', '.join(complete) or 'none'}"
        return listed + (f"; half-written: {', '.join(partial)}" if partial else "")

    if tag is None:
        latest = save_dir / "latest"
        if not latest.is_file():
            raise FileNotFoundError(f"{save_dir} has no `latest` file, so no checkpoint was completed there by "
                                    f"train.py; pass {flag} to pick one ({present()})")
        tag = latest.read_text(encoding="utf-8").strip()
        validate_tag(tag, f"`latest` in {save_dir}")
        where = f"`latest` in {save_dir} names {tag!r}, but"
    else:
        validate_tag(tag, flag)
        where = f"{flag} {tag}:"
    if not (save_dir / tag).is_dir():
        raise FileNotFoundError(f"{where} there is no checkpoint folder {save_dir / tag} ({present()})")
    if not (save_dir / tag / COMPLETE_MARKER).is_file():
        raise ValueError(f"{where} {save_dir / tag} is a half-written checkpoint (no {COMPLETE_MARKER}; the job "
                         f"stopped while saving it). Pick a complete one ({present()}).")
    return tag


# ----------------------------------------------------------------------------------------------------------
# Hugging Face model folders (the released baichuan-7B layout, or one this project exported)
# ----------------------------------------------------------------------------------------------------------

def check_folder_config(folder: Path, config) -> None:
    """Raise ValueError listing each shape-deciding field where the folder's config.json differs from `config`."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--init_from {folder}: no config.json (expected a Hugging Face model folder)")
    theirs = read_json(path, f"--init_from {folder}")
    # Another architecture (LLaMA, Baichuan2's NormHead ...) can share every size with ours; say so by name
    # rather than as a list of missing weights.
    model_type, archs = theirs.get("model_type"), theirs.get("architectures") or []
    if model_type not in (None, "baichuan") or (archs and not any(a.lower() == "baichuanforcausallm" for a in archs)):
        raise ValueError(f"--init_from {folder}: config.json describes model_type {model_type!r}, architectures "
                         f"{archs}; this trainer builds BaiChuanForCausalLM (model_type 'baichuan')")
    diffs = [f"{k}: folder {theirs.get(k)!r} vs --model_config {getattr(config, k)!r}"
             for k in SHAPE_FIELDS if theirs.get(k) != getattr(config, k)]
    if diffs:
        raise ValueError(f"--init_from {folder} does not match --model_config: " + "; ".join(diffs))


def _weight_files(folder: Path):
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            weight_map = read_json(index, "weight index")["weight_map"]
            files = sorted({folder / f for f in weight_map.values()})
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise FileNotFoundError(f"{index} lists shard(s) missing from the folder: {absent}")
            return files
        if (folder / single).is_file():
            return [folder / single]
    raise FileNotFoundError(f"{folder}: no model.safetensors, pytorch_model.bin or their .index.json")


def iter_folder_tensors(folder: Path) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, tensor) for every weight in the folder, one shard at a time (memory-mapped where possible)."""
    from safetensors import safe_open

    for path in _weight_files(Path(folder)):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            yield from state.items()
            del state


def folder_shapes(folder: Path) -> Dict[str, Tuple[int, ...]]:
    """Every weight's shape, from safetensors headers without reading the data (a .bin is memory-mapped, so
    its tensors are not read either)."""
    from safetensors import safe_open

    shapes = {}
    for path in _weight_files(Path(folder)):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                shapes.update((name, tuple(f.get_slice(name).get_shape())) for name in f.keys())
        else:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            shapes.update((name, tuple(t.shape)) for name, t in state.items())
    return shapes


def load_folder_weights(model: torch.nn.Module, folder: Path, zero3: bool = False) -> None:
    """Copy a Hugging Face folder's weights into `model` (under ZeRO-3 too); every rank calls this.

    Missing, unexpected (except the released rotary inv_freq) and misshaped weights are errors naming them,
    checked before anything is copied. Every rank reads the same files (memory-mapped), so the checks agree
    everywhere and no rank waits in a collective for one that failed.
    """
    folder = Path(folder)
    params = dict(model.named_parameters())
    want = {n: tuple(p.ds_shape if zero3 else p.shape) for n, p in params.items()}
    have = {n: s for n, s in folder_shapes(folder).items() if not n.endswith("rotary_emb.inv_freq")}
    problems = []
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    if missing:
        problems.append(f"missing {len(missing)} weight(s): {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} weight(s): {unexpected[:6]}")
    wrong = [f"{n} {have[n]} (model wants {want[n]})" for n in sorted(set(want) & set(have)) if have[n] != want[n]]
    if wrong:
        problems.append("wrong shapes: " + ", ".join(wrong[:6]))
    if problems:
        raise ValueError(f"--init_from {folder}: " + "; ".join(problems))

    if zero3:
        import deepspeed

        rank = torch.distributed.get_rank()
    with torch.no_grad():
        for name, tensor in iter_folder_tensors(folder):
            param = params.get(name)
            if param is None:
                continue
            if zero3:
                # Gathering is a collective: every rank enters it for every parameter, rank 0 writes.
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    if rank == 0:
                        param.data.copy_(tensor.to(param.dtype))
            else:
                param.data.copy_(tensor.to(param.dtype))


# ----------------------------------------------------------------------------------------------------------
# Resuming on another world size (DeepSpeed universal checkpoints)
# ----------------------------------------------------------------------------------------------------------

UNIVERSAL_DIR = "universal"  # <save_dir>/universal/<tag>/: a tag converted for loading on any world size


def universal_client_state() -> dict:
    """Client state that makes every checkpoint convertible by ds_to_universal (which refuses one without it)."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY, \
        UNIVERSAL_CHECKPOINT_VERSION_VALUE

    return {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


def prepare_resume(save_dir: Path, tag: str, world_size: int, ds_config: dict) -> Tuple[str, str]:
    """(load_dir, tag) for engine.load_checkpoint. Same world size as the checkpoint: the tag itself. Another:
    rank 0 converts the tag once into <save_dir>/universal/<tag> (sealed with complete.json like any tag) and
    ds_config gets checkpoint.load_universal, which makes DeepSpeed re-partition the model and optimizer state.
    Call on every rank after torch.distributed is up and before deepspeed.initialize; a failed conversion stops
    every rank. Our `latest` and seals stay the truth; DeepSpeed's own latest_universal is never read."""
    import torch.distributed as dist

    save_dir = Path(save_dir)
    info = read_json(save_dir / tag / COMPLETE_MARKER, f"checkpoint {tag}")
    saved_world = info.get("world_size")
    if saved_world == world_size:
        return str(save_dir), tag
    out = save_dir / UNIVERSAL_DIR / tag
    error = None
    if dist.get_rank() == 0 and not (out / COMPLETE_MARKER).is_file():
        try:
            import shutil
            from types import SimpleNamespace

            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            shutil.rmtree(out, ignore_errors=True)  # a conversion that died half-way
            ds_to_universal(SimpleNamespace(input_folder=str(save_dir / tag), output_folder=str(out),
                                            num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                            strict=True, inject_missing_state=False))
            write_atomic(out / COMPLETE_MARKER, json.dumps(dict(info, universal_from=tag), indent=2))
        except Exception as e:  # any failure: every rank must stop, not wait in the next collective
            error = RuntimeError(f"converting checkpoint {save_dir / tag} (world size {saved_world}) to a universal "
                                 f"checkpoint for world size {world_size} failed: {e}")
    from deepspeed import get_accelerator

    flag = torch.tensor([error is not None], dtype=torch.int64, device=get_accelerator().current_device_name())
    dist.all_reduce(flag)
    if error is not None:
        raise error
    if flag.item():
        raise RuntimeError("the universal checkpoint conversion failed on rank 0; see its error")
    ds_config.setdefault("checkpoint", {})["load_universal"] = True
    return str(save_dir / UNIVERSAL_DIR), tag
