"""Pretraining data for train.py: tokenize text shards once, pack them into fixed-length samples, serve batches.

How data flows
--------------
``data_dir`` holds UTF-8 text, one document or paragraph per line. Its files are listed recursively in sorted
order of their relative paths; hidden files and folders (names starting with ``.``, such as the default cache
folder ``.cache``) and the cache folder are ignored. Rank ``r`` of ``world_size`` reads the files with index
``i % world_size == r``, as the reference does, so every run and node agrees on who reads what.

Each line is stripped, encoded with SentencePiece and followed by EOS (id 2). A line with fewer than 20 tokens,
counting that EOS, is dropped (the reference's rule). The kept tokens of this rank's files, in file order, make
one stream that is cut into samples of ``max_length + 1`` tokens. A line that does not fit into one sample goes
on in the next one; the reference threw that rest away. Only the last, incomplete sample of the stream is left
unused. ``get_data()`` returns ``micro_batch_size`` samples as a ``[micro_batch_size, max_length + 1]``
LongTensor: the model takes ``[:, :-1]`` as input and ``[:, 1:]`` as labels.

Memory and the cache
--------------------
Tokens are stored as uint16 (uint32 when the vocabulary has more than 65536 pieces) in one raw file per data
file, ``<cache_dir>/<key>.bin``. A ``<key>.json`` file holds the dtype, the token count and the per-file
line statistics. The key is the sha256 of the data file's bytes, the tokenizer file's bytes and the packing
rules (minimum line length, EOS id), so changing any of them gives a new entry. The bin files are
memory-mapped, so a shard costs 2 bytes per token of page cache and nothing on the Python heap. A sample is
an offset into this stream, never a copy. Cache files are written under a temporary name and then renamed
(os.replace). A crash therefore leaves no half-written entry behind, and two ranks can share one cache folder.
The default cache folder is ``<data_dir>/.cache`` if it is writable, else ``~/.cache/baichuan-data``. Pass
``cache_dir=False`` to keep the tokens in memory and write nothing.

Tokenization runs in ``num_workers`` processes (spawn start method, so it is safe after CUDA or NCCL have
started). Each file is split at line boundaries into chunks of about 256 KB, and each worker loads its own
SentencePiece processor. Rank 0 shows a tqdm progress bar.

Order, epochs and equal steps
-----------------------------
Samples are shuffled every epoch by a generator seeded with ``(seed, rank, epoch)``. The same files, seed and
world size therefore give the same batches on every run. The engine never runs out of data: after the last
batch of an epoch the next epoch starts. Every rank can call ``get_data()`` the same number of times, so a
collective never waits on a rank that has stopped. If ``torch.distributed`` is initialized before
``load_data()``, ``steps_per_epoch`` is the minimum over the ranks, so epochs also end at the same step
everywhere. A rank that holds more samples uses a different random subset of them in each epoch. train.py
should therefore run for a fixed number of steps (or epochs x ``steps_per_epoch``) and not "until the data
ends".

``state_dict()`` holds the number of batches served (``step``, the same on every rank because all ranks call
get_data() equally often), the epoch and position it stands for, and a fingerprint of the data and settings.
``load_state_dict()`` on a fresh engine, after ``load_data()``, makes the next batch the first one the saved run
had not yet seen.

Bad input raises an error that names the file or setting, or gives a ``DataWarning`` that counts the affected
lines. Nothing is skipped silently.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import sentencepiece as spm

logger = logging.getLogger(__name__)

EOS_TOKEN_ID = 2
MIN_LINE_TOKENS = 20
CACHE_FORMAT = 1  # bump when the cache layout or the tokenization rule changes, so old entries are not reused
CHUNK_BYTES = 256 << 10  # unit of work for a tokenizer process: IPC stays negligible, the last chunk ends soon
STATE_FORMAT = 1


class DataWarning(UserWarning):
    """Input used after a repair (undecodable bytes replaced by U+FFFD); the message says where and how often."""


# ----------------------------------------------------------------------------------------------------------------
# Listing and assigning files


def list_data_files(data_dir: Union[str, Path], exclude: Sequence[Union[str, Path]] = ()) -> List[Path]:
    """Regular files under data_dir, recursively, sorted by relative path; hidden names and `exclude` skipped."""
    root = Path(data_dir)
    excluded = {Path(p).resolve() for p in exclude}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so os.walk does not descend into hidden or excluded folders (the cache lives in one).
        dirnames[:] = [d for d in dirnames
                       if not d.startswith(".") and (Path(dirpath) / d).resolve() not in excluded]
        found.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def files_for_rank(files: Sequence[Path], world_size: int, rank: int) -> List[Path]:
    """The reference's assignment: file i goes to rank i % world_size."""
    return [f for i, f in enumerate(files) if i % world_size == rank]


def _resolve_world(world_size: Optional[int], rank: Optional[int]) -> Tuple[int, int]:
    if world_size is None or rank is None:
        # Only look at torch.distributed if the caller already imported it: a process that never imported torch
        # cannot have a process group, and importing torch here would cost a second for nothing.
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            default_ws, default_rank = dist.get_world_size(), dist.get_rank()
        else:
            default_ws = int(os.environ.get("WORLD_SIZE", "1"))
            default_rank = int(os.environ.get("RANK", "0"))
        world_size = default_ws if world_size is None else world_size
        rank = default_rank if rank is None else rank
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not valid for world_size {world_size} (need 0 <= rank < world_size)")
    return int(world_size), int(rank)


def _default_num_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no sched_getaffinity
        cpus = os.cpu_count() or 1
    # Every rank on a node tokenizes at the same time; share the cores instead of oversubscribing them.
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, cpus // local_ranks)


def _sync_steps(steps: int, world_size: int) -> Tuple[int, int]:
    """(min, max) of `steps` over the ranks when a process group is up, else (steps, steps)."""
    dist = sys.modules.get("torch.distributed")
    if (world_size == 1 or dist is None or not dist.is_available() or not dist.is_initialized()
            or dist.get_world_size() != world_size):
        return steps, steps
    import torch

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([steps, -steps], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t[0].item()), int(-t[1].item())


# ----------------------------------------------------------------------------------------------------------------
# Tokenization (runs in worker processes; kept free of torch so a worker starts in a fraction of a second)


def load_tokenizer(tokenizer_path: Union[str, Path]) -> spm.SentencePieceProcessor:
    path = Path(tokenizer_path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer not found: {path} (expected a SentencePiece .model file)")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except Exception as e:  # sentencepiece raises OSError or RuntimeError depending on the failure
        raise ValueError(f"could not load the SentencePiece tokenizer {path}: {e}") from e
    return sp


def is_held_out(text: str, fraction: float) -> bool:
    """Whether a document (a stripped line) belongs to the held-out validation share `fraction`: decided by a
    hash of its content alone, so the split does not move when files are added, renamed or spread over
    another number of ranks."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return h < fraction * 2 ** 64


def encode_lines(sp, raw: bytes, min_tokens: int, eos_id: int, dtype,
                 holdout: Optional[Tuple[float, bool]] = None) -> Tuple[np.ndarray, dict]:
    """Tokenize the lines of `raw` (bytes ending on a line boundary) -> (flat token array, line statistics).

    A kept line contributes its ids plus EOS; a line is kept when that count is at least `min_tokens`.
    Undecodable bytes become U+FFFD; `bad` counts those lines and `first_bad` is the first one's index in `raw`.
    ``holdout=(fraction, want_held_out)`` keeps only the lines on one side of the validation split
    (``is_held_out``); `split_off` counts the lines left to the other side.
    """
    lines = raw.split(b"\n")  # safe on UTF-8: byte 0x0A never occurs inside a multi-byte character
    if lines and lines[-1] == b"":
        lines.pop()  # the text after the final newline is a line only if it is not empty
    encode = sp.EncodeAsIds
    kept, n_tokens, short, bad, first_bad, split_off = [], 0, 0, 0, -1, 0
    for i, line in enumerate(lines):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            text = line.decode("utf-8", errors="replace")
            bad += 1
            if first_bad < 0:
                first_bad = i
        text = text.strip()
        if holdout is not None and is_held_out(text, holdout[0]) != holdout[1]:
            split_off += 1
            continue
        ids = encode(text)
        if len(ids) + 1 < min_tokens:
            short += 1
            continue
        ids.append(eos_id)
        kept.append(ids)
        n_tokens += len(ids)
    tokens = np.fromiter(chain.from_iterable(kept), dtype=dtype, count=n_tokens)
    return tokens, {"lines": len(lines), "kept": len(kept), "short": short, "bad": bad, "first_bad": first_bad,
                    "split_off": split_off}


_worker_sp = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_sp
    _worker_sp = spm.SentencePieceProcessor()
    _worker_sp.Load(tokenizer_path)


def _encode_span(task) -> Tuple[np.ndarray, dict]:
    path, offset, length, min_tokens, eos_id, dtype, holdout = task
    with open(path, "rb") as f:
        f.seek(offset)
        raw = f.read(length)
    return encode_lines(_worker_sp, raw, min_tokens, eos_id, np.dtype(dtype), holdout)


def _line_spans(path: Path, size: int, chunk_bytes: int) -> List[Tuple[int, int]]:
    """(offset, length) pieces of about chunk_bytes that end right after a newline (or at the end of the file)."""
    if size == 0:
        return [(0, 0)]  # still one piece, so an empty file is reported like any file without a usable line
    spans, start = [], 0
    with open(path, "rb") as f:
        while start < size:
            end = start + chunk_bytes
            if end < size:
                f.seek(end - 1)
                f.readline()  # move to just after the next newline at or past end - 1
                end = f.tell()
            else:
                end = size
            spans.append((start, end - start))
            start = end
    return spans


def _sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h, buf = hashlib.sha256(), bytearray(bufsize)  # one reused buffer: no allocation per read
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _release_freed_memory() -> None:
    """Give freed heap memory back to the OS. glibc keeps it by default, so the tokenizer model loaded in
    __init__ (about 10 MB) and the tokenization buffers would otherwise stay in the resident set for the
    whole training run."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass


# ----------------------------------------------------------------------------------------------------------------
# Cache


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
        return True
    except OSError:
        return False


def _resolve_cache_dir(cache_dir, data_dir: Path) -> Optional[Path]:
    if cache_dir is False:
        return None
    if cache_dir is not None:
        path = Path(cache_dir).expanduser()
        if not _writable_dir(path):
            raise PermissionError(f"cache_dir {path} is not a writable folder (pass cache_dir=False to keep tokens in "
                                  "memory without a cache)")
        return path
    for candidate in (data_dir / ".cache", Path.home() / ".cache" / "baichuan-data"):
        if _writable_dir(candidate):
            return candidate
    warnings.warn(f"neither {data_dir / '.cache'} nor ~/.cache/baichuan-data is writable: tokens are kept in memory "
                  "and every run tokenizes again (pass cache_dir=... to fix)", DataWarning, stacklevel=3)
    return None


class _FileSink:
    """Collects one data file's tokens: streamed into a temporary cache file (a big shard never sits in memory
    twice), or kept in memory when there is no cache."""

    def __init__(self, bin_path: Optional[Path], dtype):
        self.bin_path, self.dtype, self.count = bin_path, dtype, 0
        if bin_path is not None:
            self.tmp = bin_path.with_name(f"{bin_path.name}.tmp-{os.getpid()}")
            self.fh = open(self.tmp, "wb")
        else:
            self.parts = []

    def add(self, tokens: np.ndarray) -> None:
        self.count += len(tokens)
        if self.bin_path is not None:
            tokens.tofile(self.fh)
        else:
            self.parts.append(tokens)

    def discard(self) -> None:
        if self.bin_path is not None:
            self.fh.close()
            self.tmp.unlink(missing_ok=True)
        else:
            self.parts = []

    def commit(self, meta: dict) -> np.ndarray:
        if self.bin_path is None:
            return np.concatenate(self.parts) if self.parts else np.zeros(0, self.dtype)
        self.fh.close()
        os.replace(self.tmp, self.bin_path)
        meta_path = self.bin_path.with_suffix(".json")
        tmp_meta = meta_path.with_name(f"{meta_path.name}.tmp-{os.getpid()}")
        tmp_meta.write_text(json.dumps(meta, indent=1, ensure_ascii=False))
        os.replace(tmp_meta, meta_path)  # written last: an entry counts only once its metadata exists
        return np.memmap(self.bin_path, dtype=self.dtype, mode="r", shape=(self.count,))


def _read_cache(cache_dir: Optional[Path], key: str, dtype) -> Optional[Tuple[np.ndarray, dict]]:
    if cache_dir is None:
        return None
    bin_path, meta_path = cache_dir / f"{key}.bin", cache_dir / f"{key}.json"
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        ok = (meta.get("format") == CACHE_FORMAT and meta.get("dtype") == np.dtype(dtype).name
              and bin_path.stat().st_size == meta["tokens"] * np.dtype(dtype).itemsize and meta["tokens"] > 0)
    except (OSError, ValueError, KeyError) as e:
        ok, meta = False, {"error": str(e)}
    if not ok:
        warnings.warn(f"ignoring a damaged cache entry {meta_path} ({meta.get('error', 'size or format mismatch')}); "
                      "tokenizing that file again", DataWarning, stacklevel=3)
        return None
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(meta["tokens"],)), meta["stats"]


class _TokenStream:
    """This rank's files' token arrays, read as one stream (samples may cross file boundaries)."""

    def __init__(self, arrays: List[np.ndarray]):
        self.arrays = arrays
        self.starts = np.cumsum([0] + [len(a) for a in arrays])
        self.total = int(self.starts[-1])

    def read(self, start: int, out: np.ndarray) -> None:
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        pos, length = 0, len(out)
        while pos < length:
            lo = start + pos - int(self.starts[i])
            n = min(length - pos, len(self.arrays[i]) - lo)
            out[pos:pos + n] = self.arrays[i][lo:lo + n]
            pos += n
            i += 1


# ----------------------------------------------------------------------------------------------------------------
# The engine


class DataEngine:
    """Serves this rank's packed, shuffled pretraining batches; see the module docstring for the full contract.

    Args:
        data_dir: folder of UTF-8 text files, one document or paragraph per line (searched recursively).
        tokenizer_path: SentencePiece .model file.
        micro_batch_size: samples per get_data() call.
        max_length: model context length; every sample holds max_length + 1 tokens (inputs plus shifted labels).
        world_size, rank: default to torch.distributed when it is initialized, else env WORLD_SIZE/RANK, else 1/0.
        seed: shuffling seed (the same on every rank; the rank is mixed in).
        cache_dir: where tokenized shards are cached; None picks <data_dir>/.cache or ~/.cache/baichuan-data,
            False disables the cache.
        num_workers: tokenizer processes; default: usable CPU cores / LOCAL_WORLD_SIZE.
        device: where get_data() puts its batch ("cpu", "cuda", a torch.device).
        min_line_tokens: lines with fewer tokens (EOS included) are dropped; 20 as in the reference.
        eos_id: appended after every line; must be the tokenizer's EOS id (2 for the baichuan tokenizer).
        show_progress: show the tokenization progress bar; default: on rank 0 only.
    """

    def __init__(self, data_dir, tokenizer_path, micro_batch_size: int, max_length: int,
                 world_size: Optional[int] = None, rank: Optional[int] = None, seed: int = 42,
                 cache_dir=None, num_workers: Optional[int] = None, device="cpu", *,
                 min_line_tokens: int = MIN_LINE_TOKENS, eos_id: int = EOS_TOKEN_ID,
                 show_progress: Optional[bool] = None, holdout: Optional[Tuple[float, bool]] = None):
        for name, value in (("micro_batch_size", micro_batch_size), ("max_length", max_length)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.data_dir = Path(data_dir)
        if not self.data_dir.exists():
            raise FileNotFoundError(f"data_dir not found: {self.data_dir}")
        if not self.data_dir.is_dir():
            raise NotADirectoryError(f"data_dir is not a folder: {self.data_dir}")
        self.micro_batch_size, self.max_length = int(micro_batch_size), int(max_length)
        self.sample_length = self.max_length + 1
        self.seed, self.device = int(seed), device
        self.min_line_tokens, self.eos_id = int(min_line_tokens), int(eos_id)
        # (fraction, want_held_out): train on the documents outside a held-out share, or validate on it.
        self.holdout = None if holdout is None else (float(holdout[0]), bool(holdout[1]))
        self.world_size, self.rank = _resolve_world(world_size, rank)

        self.tokenizer_path = Path(tokenizer_path)
        sp = load_tokenizer(self.tokenizer_path)
        if sp.eos_id() != self.eos_id:
            raise ValueError(f"tokenizer {self.tokenizer_path} has EOS id {sp.eos_id()} but the data uses "
                             f"eos_id={self.eos_id}; pass eos_id={sp.eos_id()} if that tokenizer is intended")
        self.vocab_size = sp.GetPieceSize()
        self.token_dtype = np.dtype(np.uint16 if self.vocab_size <= 1 << 16 else np.uint32)
        self.tokenizer_sha256 = _sha256_file(self.tokenizer_path)

        self.cache_dir = _resolve_cache_dir(cache_dir, self.data_dir)
        exclude = [self.cache_dir] if self.cache_dir is not None else []
        self.all_files = list_data_files(self.data_dir, exclude=exclude)
        if not self.all_files:
            raise ValueError(f"no data files in {self.data_dir} (hidden files and folders, such as the cache folder "
                             ".cache, are ignored)")
        if len(self.all_files) < self.world_size:
            raise ValueError(
                f"{self.data_dir} holds {len(self.all_files)} data file(s) but world_size is {self.world_size}: each "
                f"rank reads whole files, so at least {self.world_size} files are needed (split the corpus into "
                f"a multiple of {self.world_size} shards of similar size)")
        self.files = files_for_rank(self.all_files, self.world_size, self.rank)
        self.num_workers = _default_num_workers() if num_workers is None else max(1, int(num_workers))
        self.show_progress = (self.rank == 0) if show_progress is None else bool(show_progress)
        self.fingerprint = self._fingerprint()

        self.file_stats: List[dict] = []
        self._stream: Optional[_TokenStream] = None
        self.num_tokens = self.num_samples = self.steps_per_epoch = 0
        self._step = 0
        self._order_epoch, self._order = -1, None

    # -- loading ---------------------------------------------------------------------------------------------

    def _fingerprint(self) -> str:
        """Same on every rank: all files' names and sizes, the tokenizer and the packing rules (cheap to compute,
        unlike a hash of every file's content, which each rank only takes for its own files)."""
        listing = [(p.relative_to(self.data_dir).as_posix(), p.stat().st_size) for p in self.all_files]
        blob = json.dumps([listing, self.tokenizer_sha256, self.min_line_tokens, self.eos_id]
                          + ([list(self.holdout)] if self.holdout else []))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _cache_key(self, path: Path) -> str:
        blob = f"{CACHE_FORMAT}|{_sha256_file(path)}|{self.tokenizer_sha256}|{self.min_line_tokens}|{self.eos_id}"
        if self.holdout is not None:
            blob += f"|holdout={self.holdout[0]!r},{self.holdout[1]}"
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def load_data(self) -> "DataEngine":
        """Tokenize this rank's files (or map them from the cache) and compute the samples. Returns self.

        With torch.distributed initialized, all ranks meet once at the end to agree on steps_per_epoch. A rank
        whose data fails still joins that meeting before raising its error, and the other ranks then stop with
        an error too, so none of them waits forever in a collective."""
        t0 = time.perf_counter()
        error = None
        try:
            from_cache = self._load_local()
            local_steps = self.num_samples // self.micro_batch_size
        except Exception as e:  # re-raised below, after the other ranks have been told
            error, local_steps, self._stream = e, 0, None
        fewest, most = _sync_steps(local_steps, self.world_size)
        if error is not None:
            raise error
        if fewest == 0:
            raise RuntimeError(f"rank {self.rank}: another rank could not load its data (see that rank's error); "
                               "stopping here instead of waiting for it")
        self.steps_per_epoch = fewest
        self._order_epoch, self._order = -1, None
        _release_freed_memory()
        lines = sum(st["lines"] for st in self.file_stats)
        short = sum(st["short"] for st in self.file_stats)
        logger.info("rank %d/%d: %d file(s) (%d from cache), %d lines (%d under %d tokens dropped), %d tokens, "
                    "%d samples of %d, %d steps per epoch%s; %.1fs", self.rank, self.world_size, len(self.files),
                    from_cache, lines, short, self.min_line_tokens, self.num_tokens, self.num_samples,
                    self.sample_length, self.steps_per_epoch,
                    f" (ranks hold {fewest}..{most}; the larger ones use a random subset per epoch)"
                    if most != fewest else "", time.perf_counter() - t0)
        if self.holdout is not None:
            logger.info("rank %d: %d line(s) left to the %s side of the %.4g held-out split", self.rank,
                        sum(st.get("split_off", 0) for st in self.file_stats),
                        "training" if self.holdout[1] else "validation", self.holdout[0])
        return self

    def _load_local(self) -> int:
        """This rank's part of load_data(); returns how many files came from the cache."""
        n = len(self.files)
        arrays: List[Optional[np.ndarray]] = [None] * n
        stats: List[Optional[dict]] = [None] * n
        # hashlib releases the GIL on large buffers, so threads hash several files at once.
        with ThreadPoolExecutor(max_workers=max(1, min(n, self.num_workers))) as pool:
            keys = list(pool.map(self._cache_key, self.files))
        for i, key in enumerate(keys):
            hit = _read_cache(self.cache_dir, key, self.token_dtype)
            if hit is not None:
                arrays[i], stats[i] = hit
        todo = [i for i in range(n) if arrays[i] is None]
        if todo:
            self._tokenize(todo, keys, arrays, stats)

        # A file may hold no held-out document at all; only the training side needs every file to give text.
        validation_side = self.holdout is not None and self.holdout[1]
        unusable = [f"{self.files[i]} ({stats[i]['lines']} lines)" for i in range(n)
                    if stats[i]["kept"] == 0 and not validation_side]
        if unusable:
            raise ValueError(f"no line of at least {self.min_line_tokens} tokens (EOS included) in: "
                             + "; ".join(unusable) + ". Remove these files or give them real text.")
        for path, st in zip(self.files, stats):
            if st["bad"]:
                warnings.warn(f"{path}: {st['bad']} line(s) had undecodable UTF-8 bytes, replaced by U+FFFD; "
                              f"first at line {st['first_bad']}", DataWarning, stacklevel=3)
        self.file_stats = [dict(st, file=str(p), tokens=len(a)) for p, st, a in zip(self.files, stats, arrays)]

        self._stream = _TokenStream(arrays)
        self.num_tokens = self._stream.total
        self.num_samples = self.num_tokens // self.sample_length
        if self.num_samples < self.micro_batch_size:
            raise ValueError(
                f"rank {self.rank} holds {self.num_tokens} tokens in {n} file(s) ({', '.join(map(str, self.files))}): "
                f"fewer than one batch of micro_batch_size x (max_length + 1) = {self.micro_batch_size} x "
                f"{self.sample_length} tokens. Add data, use fewer ranks, or lower max_length / micro_batch_size.")
        return n - len(todo)

    def _tokenize(self, todo: List[int], keys: List[str], arrays: list, stats: list) -> None:
        tasks = []  # (file index, offset, length), in file order
        for i in todo:
            path = self.files[i]
            tasks.extend((i, off, length) for off, length in _line_spans(path, path.stat().st_size, CHUNK_BYTES))
        remaining = {i: 0 for i in todo}
        for i, _, _ in tasks:
            remaining[i] += 1
        payloads = [(str(self.files[i]), off, length, self.min_line_tokens, self.eos_id, self.token_dtype.name,
                     self.holdout)
                    for i, off, length in tasks]
        workers = min(self.num_workers, len(tasks))
        sinks, totals = {}, {}
        total_bytes = sum(length for _, _, length in tasks)
        from tqdm import tqdm  # here, not at the top: tokenizer workers import this module and never need it

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"tokenizing (rank {self.rank})",
                   disable=not self.show_progress, file=sys.stderr)
        pool = None
        try:
            if workers > 1:
                # spawn, not fork: forking a process that holds CUDA or NCCL state is unsafe.
                pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker,
                                                    initargs=(str(self.tokenizer_path),))
                results = pool.imap(_encode_span, payloads)
            else:
                _init_worker(str(self.tokenizer_path))
                results = map(_encode_span, payloads)
            for (i, _, length), (tokens, st) in zip(tasks, results):
                if i not in sinks:
                    bin_path = self.cache_dir / f"{keys[i]}.bin" if self.cache_dir is not None else None
                    sinks[i] = _FileSink(bin_path, self.token_dtype)
                    totals[i] = {"lines": 0, "kept": 0, "short": 0, "bad": 0, "first_bad": None,
                                 "split_off": 0}
                tot = totals[i]
                if st["bad"] and tot["first_bad"] is None:
                    tot["first_bad"] = tot["lines"] + st["first_bad"] + 1  # 1-based line number in the file
                for k in ("lines", "kept", "short", "bad", "split_off"):
                    tot[k] += st[k]
                sinks[i].add(tokens)
                bar.update(length)
                remaining[i] -= 1
                if remaining[i] == 0:
                    sink = sinks.pop(i)
                    stats[i] = tot
                    if tot["kept"] == 0:  # nothing to cache; load_data reports the file
                        sink.discard()
                        arrays[i] = np.zeros(0, self.token_dtype)
                    else:
                        arrays[i] = sink.commit({"format": CACHE_FORMAT, "source": str(self.files[i]),
                                                 "dtype": self.token_dtype.name, "tokens": sink.count,
                                                 "stats": tot, "tokenizer": str(self.tokenizer_path)})
        finally:
            global _worker_sp
            _worker_sp = None  # the in-process tokenizer is not needed once loading is done
            bar.close()
            for sink in sinks.values():  # only left on an error: drop the partial temporary files
                sink.discard()
            if pool is not None:
                pool.terminate()
                pool.join()

    # -- serving ---------------------------------------------------------------------------------------------

    def _require_loaded(self) -> None:
        if self._stream is None:
            raise RuntimeError("DataEngine: call load_data() first")

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            rng = np.random.default_rng([self.seed, self.rank, epoch])
            self._order = rng.permutation(self.num_samples)[: self.steps_per_epoch * self.micro_batch_size]
            self._order_epoch = epoch
        return self._order

    def sample_array(self, index: int) -> np.ndarray:
        """The int64 [max_length + 1] sample `index` of this rank's stream in stream order (no shuffling): the
        fixed held-out set of training/validation.py."""
        self._require_loaded()
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} of {self.num_samples}")
        out = np.empty(self.sample_length, dtype=np.int64)
        self._stream.read(index * self.sample_length, out)
        return out

    def batch_array(self, step: int) -> np.ndarray:
        """The int64 [micro_batch_size, max_length + 1] batch served at `step` (0-based), without moving on."""
        self._require_loaded()
        epoch, position = divmod(step, self.steps_per_epoch)
        mbs, length = self.micro_batch_size, self.sample_length
        order = self._epoch_order(epoch)
        batch = np.empty((mbs, length), dtype=np.int64)
        for row, sample in enumerate(order[position * mbs:(position + 1) * mbs]):
            self._stream.read(int(sample) * length, batch[row])
        return batch

    def get_data(self):
        """The next batch: a LongTensor [micro_batch_size, max_length + 1] on `device`. Never runs out: a new
        epoch (reshuffled) starts after the last batch of the previous one."""
        import torch  # imported here so tokenizer workers, which import this module, start without torch

        batch = self.batch_array(self._step)
        self._step += 1
        return torch.from_numpy(batch).to(self.device)

    @property
    def step(self) -> int:
        """Batches served so far (across epochs)."""
        return self._step

    @property
    def epoch(self) -> int:
        self._require_loaded()
        return self._step // self.steps_per_epoch

    @property
    def position(self) -> int:
        """Batches served within the current epoch."""
        self._require_loaded()
        return self._step % self.steps_per_epoch

    # -- checkpoint state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Small JSON-able state; `step` is the same on every rank, so rank 0's copy can restore all ranks."""
        self._require_loaded()
        return {"format": STATE_FORMAT, "step": self._step, "epoch": self.epoch, "position": self.position,
                "steps_per_epoch": self.steps_per_epoch, "seed": self.seed, "world_size": self.world_size,
                "micro_batch_size": self.micro_batch_size, "max_length": self.max_length,
                "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` stopped: the next get_data() is the first batch that run had not served."""
        self._require_loaded()
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown data state format {state.get('format')!r} (expected {STATE_FORMAT})")
        mine = self.state_dict()
        problems = [f"{k}: checkpoint {state.get(k)!r}, now {mine[k]!r}"
                    for k in ("world_size", "micro_batch_size", "max_length", "seed", "fingerprint",
                              "steps_per_epoch")
                    if state.get(k) != mine[k]]
        if problems:
            raise ValueError("cannot resume the data position: the checkpoint was made with different data or "
                             "settings (the fingerprint covers the data files' names and sizes, the tokenizer and "
                             "the line rules): " + "; ".join(problems))
        if "step" in state:
            step = int(state["step"])
        else:
            step = int(state["epoch"]) * self.steps_per_epoch + int(state["position"])
        if step < 0:
            raise ValueError(f"data state step must be >= 0, got {step}")
        self._step = step

    def __repr__(self) -> str:
        return (f"DataEngine(rank {self.rank}/{self.world_size}, {len(self.files)} file(s), {self.num_tokens} tokens, "
                f"{self.num_samples} samples of {self.sample_length}, {self.steps_per_epoch} steps/epoch)")
