"""The token cache: each text file tokenized once into ``<cache_dir>/<key>.bin`` (raw uint16/uint32 ids) and
``<key>.json`` (dtype, token count, line statistics, blake2b checksum of the .bin).

The key is a hash of the file's bytes, the tokenizer file's bytes, the line rules (minimum line length, EOS id)
and the per-document filter's name, so changing any of them gives a new entry. Entries are written under a
temporary name and renamed, metadata last: a crash leaves no half-written entry, and any number of processes
(ranks, scripts/tokenize_data.py) may fill one folder at once.

An entry is trusted only after its checksum and its largest id (below the vocabulary size) have been checked
(``CacheEntry.verify``): by the global engine at start, once per node; otherwise when a process first reads it.
A damaged .bin of the right size is therefore an error naming the file instead of silent zeros or ids past
the embedding table. A check that passed leaves ``<key>.verified`` (the .bin's size, inode, modification and
change times, checksum and largest id): a later start whose .bin still matches it skips the read, so an elastic
restart on a large corpus does not read the whole cache again. Any write to the .bin changes its change time,
which no user tool can set back, and brings the full check back; delete the stamps to force it.

Only text is tokenized: a file holding NUL bytes, or whose undecodable lines exceed ``max_bad_line_fraction``,
is refused with its name (binary files, such as an .so dropped into data_dir, would otherwise supply tokens).
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import sentencepiece as spm

from common import write_atomic

logger = logging.getLogger(__name__)

EOS_TOKEN_ID = 2
MIN_LINE_TOKENS = 20
CACHE_FORMAT = 2  # 2: blake2b checksum and NUL count in the metadata; bump when the layout or rule changes
CHUNK_BYTES = 256 << 10  # unit of work for a tokenizer process: IPC stays negligible, the last chunk ends soon
MAX_BAD_LINE_FRACTION = 0.5  # a file mostly undecodable is taken for binary data
# Below this many bytes tokenizing in this process beats starting worker processes (each imports the launching
# script, torch and DeepSpeed included): the shipped sample tokenizes in about a second.
IN_PROCESS_BYTES = 16 << 20


class DataWarning(UserWarning):
    """Input used after a repair (undecodable bytes replaced by U+FFFD); the message says where and how often."""


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


def split_lines(raw: bytes) -> List[bytes]:
    """The lines of `raw`, one document each."""
    lines = raw.split(b"\n")  # safe on UTF-8: byte 0x0A never occurs inside a multi-byte character
    if lines and lines[-1] == b"":
        lines.pop()  # the text after the final newline is a line only if it is not empty
    return lines


def document_text(line: bytes) -> Tuple[str, bool]:
    """(text, undecodable): a line as the data path tokenizes it and hashes it for the validation split,
    stripped, with undecodable bytes as U+FFFD (`undecodable` says there were some)."""
    try:
        return line.decode("utf-8").strip(), False
    except UnicodeDecodeError:
        return line.decode("utf-8", errors="replace").strip(), True


def held_out_lines(raw: bytes, fraction: float) -> List[Tuple[int, str]]:
    """(line index, text) of the non-empty documents of `raw` that ``--val_fraction fraction`` holds out: the
    documents encode_lines gives the validation side and withholds from training."""
    out = []
    for i, line in enumerate(split_lines(raw)):
        text = document_text(line)[0]
        if text and is_held_out(text, fraction):
            out.append((i, text))
    return out


def encode_lines(sp, raw: bytes, min_tokens: int, eos_id: int, dtype,
                 holdout: Optional[Tuple[float, bool]] = None) -> Tuple[np.ndarray, dict]:
    """Tokenize the lines of `raw` (bytes ending on a line boundary) -> (flat token array, line statistics).

    A kept line contributes its ids plus EOS; a line is kept when that count is at least `min_tokens`.
    Undecodable bytes become U+FFFD; `bad` counts those lines and `first_bad` is the first one's index in `raw`;
    `nul` counts NUL bytes (text never holds them, binary files do).
    ``holdout=(fraction, want_held_out)`` keeps only the lines on one side of the validation split
    (``is_held_out``); `split_off` counts the lines left to the other side.
    """
    lines = split_lines(raw)
    encode = sp.EncodeAsIds
    kept, n_tokens, short, bad, first_bad, split_off = [], 0, 0, 0, -1, 0
    for i, line in enumerate(lines):
        text, undecodable = document_text(line)
        if undecodable:
            bad += 1
            if first_bad < 0:
                first_bad = i
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
                    "nul": raw.count(b"\x00"), "split_off": split_off}


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


def _hash_file(path: Path, algorithm: str = "sha256", bufsize: int = 1 << 20) -> str:
    h, buf = hashlib.new(algorithm), bytearray(bufsize)  # one reused buffer: no allocation per read
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    return _hash_file(path, "sha256")


def default_num_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no sched_getaffinity
        cpus = os.cpu_count() or 1
    # Every rank on a node tokenizes at the same time; share the cores instead of oversubscribing them.
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, cpus // local_ranks)


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS. glibc keeps it by default, so the tokenizer model (about 10 MB)
    and the tokenization buffers would otherwise stay in the resident set for the whole training run."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass


def check_text_stats(path, stats: dict, max_bad_line_fraction: float) -> None:
    """Refuse a file that is not text: NUL bytes, or more undecodable lines than allowed."""
    if max_bad_line_fraction >= 1:
        return
    lines = max(1, stats["lines"])
    if stats.get("nul", 0) or stats["bad"] / lines > max_bad_line_fraction:
        raise ValueError(
            f"{path} does not look like UTF-8 text ({stats.get('nul', 0)} NUL byte(s), {stats['bad']} of "
            f"{stats['lines']} line(s) undecodable; the limit is {max_bad_line_fraction:.0%} and no NUL): remove it "
            "from data_dir, or raise --max_bad_line_fraction to 1 to tokenize it anyway")


# ----------------------------------------------------------------------------------------------------------------
# Cache folder and entries


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
        return True
    except OSError:
        return False


def resolve_cache_dir(cache_dir, data_dir: Path) -> Optional[Path]:
    if cache_dir is False:
        return None
    if cache_dir is not None:
        path = Path(cache_dir).expanduser()
        if not _writable_dir(path):
            raise PermissionError(f"cache_dir {path} is not a writable folder (pass cache_dir=False to keep tokens in "
                                  "memory without a cache)")
        return path
    for candidate in (Path(data_dir) / ".cache", Path.home() / ".cache" / "baichuan-data"):
        if _writable_dir(candidate):
            return candidate
    warnings.warn(f"neither {Path(data_dir) / '.cache'} nor ~/.cache/baichuan-data is writable: tokens are kept in "
                  "memory and every run tokenizes again (pass cache_dir=... to fix)", DataWarning, stacklevel=3)
    return None


class CacheEntry:
    """One file's tokens (memory-mapped, or in memory without a cache) and the facts needed to trust them."""

    def __init__(self, source: Path, tokens: np.ndarray, stats: dict, bin_path: Optional[Path] = None,
                 checksum: Optional[str] = None):
        self.source, self.tokens, self.stats = Path(source), tokens, stats
        self.bin_path, self.checksum = bin_path, checksum
        self.verified = bin_path is None  # tokens made in this process need no check

    def __len__(self) -> int:
        return len(self.tokens)

    def _signature(self) -> dict:
        st = os.stat(self.bin_path)
        return {"size": st.st_size, "inode": st.st_ino, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
                "blake2b": self.checksum}

    def stamp(self, max_id: int) -> None:
        """Record that the .bin as it is now holds its checksum and ids up to `max_id`. Best effort: a read-only
        cache is checked in full at every start instead."""
        try:
            write_atomic(self.bin_path.with_suffix(".verified"), json.dumps(dict(self._signature(), max_id=max_id)),
                         fsync=False)
        except OSError:
            pass

    def _stamped_below(self, vocab_size: int) -> bool:
        try:
            stamp = json.loads(self.bin_path.with_suffix(".verified").read_text())
            signature = self._signature()
            return {k: stamp.get(k) for k in signature} == signature and int(stamp["max_id"]) < vocab_size
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def verify(self, vocab_size: int) -> None:
        """Checksum and id range, once per process; raises ValueError naming the entry and its source file.
        Reads the .bin with plain reads, not through the memory map, so the check adds nothing to the resident
        set of a process that later maps only some of the entry. Skipped when the entry's stamp still matches."""
        if self.verified:
            return
        if self._stamped_below(vocab_size):
            self.verified = True
            return
        h, top = hashlib.blake2b(digest_size=16), 0
        buf = np.empty(1 << 23, dtype=self.tokens.dtype)  # 8M ids a read: bounded memory, one pass
        raw = memoryview(buf).cast("B")
        with open(self.bin_path, "rb", buffering=0) as f:
            while n := f.readinto(raw):
                h.update(raw[:n])
                top = max(top, int(buf[:n // buf.itemsize].max()))
        if h.hexdigest() != self.checksum:
            raise ValueError(f"token cache entry {self.bin_path} (for {self.source}) fails its checksum: the file is "
                             "damaged. Delete it (and its .json) and start again to tokenize that file anew.")
        if top >= vocab_size:
            raise ValueError(f"token cache entry {self.bin_path} (for {self.source}) holds id {top}, past the "
                             f"tokenizer's {vocab_size} pieces: it was built by another tokenizer or is damaged. "
                             "Delete it and start again.")
        self.verified = True
        self.stamp(top)


class _FileSink:
    """Collects one data file's tokens: streamed into a temporary cache file (a big shard never sits in memory
    twice), or kept in memory when there is no cache. Hashes what it writes, for the entry's checksum."""

    def __init__(self, bin_path: Optional[Path], dtype):
        self.bin_path, self.dtype, self.count, self.max_id = bin_path, dtype, 0, 0
        self.hash = hashlib.blake2b(digest_size=16)
        if bin_path is not None:
            self.tmp = bin_path.with_name(f"{bin_path.name}.tmp-{os.getpid()}")
            self.fh = open(self.tmp, "wb")
        else:
            self.parts = []

    def add(self, tokens: np.ndarray) -> None:
        self.count += len(tokens)
        self.max_id = max(self.max_id, int(tokens.max())) if len(tokens) else self.max_id
        self.hash.update(tokens.tobytes())
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

    def commit(self, source: Path, meta: dict) -> CacheEntry:
        checksum = self.hash.hexdigest()
        if self.bin_path is None:
            tokens = np.concatenate(self.parts) if self.parts else np.zeros(0, self.dtype)
            return CacheEntry(source, tokens, meta["stats"])
        self.fh.close()
        os.replace(self.tmp, self.bin_path)
        meta = dict(meta, blake2b=checksum)
        meta_path = self.bin_path.with_suffix(".json")
        # Written last: an entry counts only once its metadata exists. No fsync: a cache entry lost to a crash is
        # found damaged (size or checksum) and tokenized again.
        write_atomic(meta_path, json.dumps(meta, indent=1, ensure_ascii=False), fsync=False)
        entry = CacheEntry(source, np.memmap(self.bin_path, dtype=self.dtype, mode="r", shape=(self.count,)),
                           meta["stats"], self.bin_path, checksum)
        entry.verified = True  # written by this process from the tokenizer's own output
        entry.stamp(self.max_id)
        return entry


class TokenCache:
    """Keys, lookups and parallel tokenization for one tokenizer and one set of line rules."""

    def __init__(self, cache_dir: Optional[Path], tokenizer_path, *, min_line_tokens: int = MIN_LINE_TOKENS,
                 eos_id: int = EOS_TOKEN_ID, num_workers: Optional[int] = None,
                 max_bad_line_fraction: float = MAX_BAD_LINE_FRACTION,
                 holdout: Optional[Tuple[float, bool]] = None):
        self.cache_dir = cache_dir
        self.tokenizer_path = Path(tokenizer_path)
        sp = load_tokenizer(self.tokenizer_path)
        if sp.eos_id() != eos_id:
            raise ValueError(f"tokenizer {self.tokenizer_path} has EOS id {sp.eos_id()} but the data uses "
                             f"eos_id={eos_id}; pass eos_id={sp.eos_id()} if that tokenizer is intended")
        self.vocab_size = sp.GetPieceSize()
        self.token_dtype = np.dtype(np.uint16 if self.vocab_size <= 1 << 16 else np.uint32)
        self.tokenizer_sha256 = _sha256_file(self.tokenizer_path)
        self.min_line_tokens, self.eos_id = int(min_line_tokens), int(eos_id)
        self.num_workers = default_num_workers() if num_workers is None else max(1, int(num_workers))
        if not 0 <= max_bad_line_fraction <= 1:
            raise ValueError(f"max_bad_line_fraction must be within [0, 1], got {max_bad_line_fraction}")
        self.max_bad_line_fraction = float(max_bad_line_fraction)
        # The per-document filter applied at tokenization: (fraction, want_held_out) keeps one side of the
        # validation split. Its name goes into every key, so entries made under another filter are never reused.
        self.holdout = None if holdout is None else (float(holdout[0]), bool(holdout[1]))
        self.filter_name = "" if holdout is None else f"holdout={self.holdout[0]!r},{self.holdout[1]}"

    def rules_id(self) -> str:
        """What besides the text decides the tokens (for fingerprints that must not hash every file)."""
        return f"{CACHE_FORMAT}|{self.tokenizer_sha256}|{self.min_line_tokens}|{self.eos_id}|{self.filter_name}"

    def key(self, path: Path) -> str:
        """The entry's name: a hash of the file's content and the rules. Hashing the content is one read of the
        file; a small memo under <cache_dir>/keys, named by the file's path, size and mtime, spares the other
        ranks and later runs that read (a changed file has another size or mtime, so it misses the memo)."""
        memo = None
        if self.cache_dir is not None:
            st = Path(path).stat()
            stamp = f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}|{self.rules_id()}"
            memo = self.cache_dir / "keys" / (hashlib.sha256(stamp.encode()).hexdigest()[:32] + ".key")
            try:
                key = memo.read_text().strip()
                if len(key) == 32:
                    return key
            except OSError:
                pass
        key = hashlib.sha256(f"{_sha256_file(path)}|{self.rules_id()}".encode()).hexdigest()[:32]
        if memo is not None:
            memo.parent.mkdir(exist_ok=True)
            write_atomic(memo, key, fsync=False)
        return key

    def keys(self, paths: Sequence[Path]) -> List[str]:
        # hashlib releases the GIL on large buffers, so threads hash several files at once.
        with ThreadPoolExecutor(max_workers=max(1, min(len(paths), self.num_workers))) as pool:
            return list(pool.map(self.key, paths))

    def lookup(self, path: Path, key: str) -> Optional[CacheEntry]:
        """The entry for `key` if it exists and its metadata fits its .bin; damaged metadata warns and misses."""
        if self.cache_dir is None:
            return None
        bin_path, meta_path = self.cache_dir / f"{key}.bin", self.cache_dir / f"{key}.json"
        if not meta_path.exists():
            return None
        dtype = self.token_dtype
        try:
            meta = json.loads(meta_path.read_text())
            ok = (meta.get("format") == CACHE_FORMAT and meta.get("dtype") == dtype.name and meta["tokens"] > 0
                  and bin_path.stat().st_size == meta["tokens"] * dtype.itemsize and "blake2b" in meta)
        except (OSError, ValueError, KeyError, TypeError) as e:
            ok, meta = False, {"error": str(e)}
        if not ok:
            warnings.warn(f"ignoring a damaged cache entry {meta_path} ({meta.get('error', 'size or format mismatch')}"
                          "); tokenizing that file again", DataWarning, stacklevel=3)
            return None
        tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(meta["tokens"],))
        return CacheEntry(path, tokens, meta["stats"], bin_path, meta["blake2b"])

    def tokenize(self, paths: Sequence[Path], keys: Sequence[str], show_progress: bool = False,
                 desc: str = "tokenizing") -> List[CacheEntry]:
        """Tokenize `paths` in `num_workers` processes (spawn, safe after CUDA/NCCL started) into the cache."""
        tasks = []  # (file index, offset, length), in file order
        for i, path in enumerate(paths):
            tasks.extend((i, off, length) for off, length in _line_spans(path, path.stat().st_size, CHUNK_BYTES))
        remaining = [0] * len(paths)
        for i, _, _ in tasks:
            remaining[i] += 1
        payloads = [(str(paths[i]), off, length, self.min_line_tokens, self.eos_id, self.token_dtype.name,
                     self.holdout) for i, off, length in tasks]
        workers = min(self.num_workers, len(tasks))
        if sum(length for _, _, length in tasks) < IN_PROCESS_BYTES:
            workers = 1
        sinks, totals, entries = {}, {}, [None] * len(paths)
        from tqdm import tqdm  # here, not at the top: tokenizer workers import this module and never need it

        bar = tqdm(total=sum(length for _, _, length in tasks), unit="B", unit_scale=True, desc=desc,
                   disable=not show_progress, file=sys.stderr)
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
                    totals[i] = {"lines": 0, "kept": 0, "short": 0, "bad": 0, "first_bad": None, "nul": 0,
                                 "split_off": 0}
                tot = totals[i]
                if st["bad"] and tot["first_bad"] is None:
                    tot["first_bad"] = tot["lines"] + st["first_bad"] + 1  # 1-based line number in the file
                for k in ("lines", "kept", "short", "bad", "nul", "split_off"):
                    tot[k] += st[k]
                sinks[i].add(tokens)
                bar.update(length)
                remaining[i] -= 1
                if remaining[i] == 0:
                    sink = sinks.pop(i)
                    try:
                        check_text_stats(paths[i], tot, self.max_bad_line_fraction)
                    except ValueError:
                        sink.discard()
                        raise
                    if tot["kept"] == 0:  # nothing to cache; the caller reports the file
                        sink.discard()
                        entries[i] = CacheEntry(paths[i], np.zeros(0, self.token_dtype), tot)
                    else:
                        entries[i] = sink.commit(paths[i], {
                            "format": CACHE_FORMAT, "source": str(paths[i]), "dtype": self.token_dtype.name,
                            "tokens": sink.count, "stats": tot, "tokenizer": str(self.tokenizer_path)})
        finally:
            global _worker_sp
            _worker_sp = None  # the in-process tokenizer is not needed once loading is done
            bar.close()
            for sink in sinks.values():  # only left on an error: drop the partial temporary files
                sink.discard()
            if pool is not None:
                pool.terminate()
                pool.join()
        return entries

    def load(self, paths: Sequence[Path], keys: Optional[Sequence[str]] = None, show_progress: bool = False,
             desc: str = "tokenizing") -> Tuple[List[CacheEntry], int]:
        """Entries for `paths` from the cache, tokenizing the missing ones -> (entries, how many were cached).

        Every entry's text statistics are checked here (binary files refused, repaired lines warned about)."""
        keys = self.keys(paths) if keys is None else keys
        entries = [self.lookup(p, k) for p, k in zip(paths, keys)]
        todo = [i for i, e in enumerate(entries) if e is None]
        if todo:
            made = self.tokenize([paths[i] for i in todo], [keys[i] for i in todo], show_progress, desc)
            for i, e in zip(todo, made):
                entries[i] = e
        for path, e in zip(paths, entries):
            check_text_stats(path, e.stats, self.max_bad_line_fraction)
            if e.stats["bad"]:
                warnings.warn(f"{path}: {e.stats['bad']} line(s) had undecodable UTF-8 bytes, replaced by U+FFFD; "
                              f"first at line {e.stats['first_bad']}", DataWarning, stacklevel=3)
        return entries, len(paths) - len(todo)


class TokenStream:
    """Several entries' tokens read as one stream (samples may cross file boundaries). Each entry is verified
    (checksum, id range) the first time a read touches it."""

    def __init__(self, entries: List[CacheEntry], vocab_size: int):
        self.entries, self.vocab_size = entries, vocab_size
        self.starts = np.cumsum([0] + [len(e) for e in entries])
        self.total = int(self.starts[-1])

    def read(self, start: int, out: np.ndarray) -> None:
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        pos, length = 0, len(out)
        while pos < length:
            entry = self.entries[i]
            entry.verify(self.vocab_size)
            lo = start + pos - int(self.starts[i])
            n = min(length - pos, len(entry) - lo)
            out[pos:pos + n] = entry.tokens[lo:lo + n]
            pos += n
            i += 1
