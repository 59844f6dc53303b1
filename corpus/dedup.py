"""De-duplication indexes for prepare_data.py: exact-hash table and MinHash LSH at document/sentence level.

Two LSH backends answer the same questions ("which kept documents share a band with this signature?"):

* ``datasketch``: datasketch.MinHashLSH, the reference implementation. It keeps a Python set per band
  bucket and a list per key: measured ~3.6 KB per indexed signature (num_perm 128, threshold 0.8).
* ``compact`` (default): the same banding -- (b, r) chosen by datasketch's optimiser for the threshold,
  a candidate is anything sharing one whole band -- but each band is stored as a 64-bit hash in a sorted
  numpy array with a uint32 owner: 12 bytes per band, ~110 bytes per signature at b=9. Measured by
  benchmarks/bench_prepare_data.py on a 50 MB slice, 2 processes: peak RSS 621 MiB against 1,667 MiB,
  and 3.3x the throughput, with byte-identical shards.

Both backends return identical candidates except when two different bands collide in 64 bits
(probability ~ n^2 / 2^65 for n stored bands), so tests can compare them one to one.

A band match is only a candidate. prepare_data.py checks each candidate against the threshold with
the exact Jaccard similarity of the two shingle sets (`jaccard`, on the kept document's text read back from the
spill file) before it removes anything, and a document whose candidates all fail is kept and indexed beside them
(a key may then have several owners). Because the check removes the false positives, the document banding is
chosen for recall (`recall_params`) instead of datasketch's balance of false positives and false negatives. Sentence candidates are
checked the same way against texts kept in a scratch file (`SentenceStore`).
"""
from __future__ import annotations

import array
import itertools
import math
import os

import numpy as np
from datasketch import LeanMinHash, MinHashLSH

NO_OWNER = -1


class KeyTable:
    """Append-only map uint64 key -> uint32 owner with vectorised look-ups.

    Keys live in a sorted numpy array (12 bytes per key with its owner); inserts go to a dict and are merged
    into the arrays every `merge_every` keys, so a whole batch is looked up in the sorted part with one
    np.searchsorted call and only the recent dict is probed, by C-level set operations.
    """

    def __init__(self, merge_every: int = 1 << 19):
        self.keys = np.empty(0, dtype=np.uint64)
        self.owners = np.empty(0, dtype=np.uint32)
        self.recent: dict[int, int] = {}
        self.extra: dict[int, list[int]] = {}  # recent keys with more than one owner: the owners after the first
        self.merge_every = merge_every

    def __len__(self) -> int:
        return len(self.keys) + len(self.recent)

    def lookup_sorted(self, keys: np.ndarray) -> np.ndarray:
        """Position (int64, NO_OWNER when absent) of the first copy of each key among the merged keys."""
        if len(self.keys) == 0:
            return np.full(keys.shape, NO_OWNER, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return np.where(self.keys[pos] == keys, pos, NO_OWNER)

    def add(self, keys: list[int], owner: int, fresh: bool = True) -> None:
        """Add the keys for `owner`. fresh: the caller's query found none of them (the fast path); otherwise a
        key that already has an owner keeps it and gains `owner` beside it."""
        if fresh:
            self.recent.update(zip(keys, itertools.repeat(owner)))
            return
        for key in keys:
            if self.recent.setdefault(key, owner) != owner:
                self.extra.setdefault(key, []).append(owner)

    def maybe_merge(self, force: bool = False) -> None:
        """Merge the recent dict into the sorted arrays; call only between batches (look-ups of a batch
        against the sorted arrays must not change under it)."""
        if not self.recent or (len(self.recent) < self.merge_every and not force):
            return
        more = [(key, owner) for key, owners in self.extra.items() for owner in owners]
        new_keys = np.fromiter(itertools.chain(self.recent.keys(), (k for k, _ in more)), dtype=np.uint64,
                               count=len(self.recent) + len(more))
        new_owners = np.fromiter(itertools.chain(self.recent.values(), (o for _, o in more)), dtype=np.uint32,
                                 count=len(self.recent) + len(more))
        order = np.argsort(new_keys, kind="stable")
        new_keys, new_owners = new_keys[order], new_owners[order]
        pos = np.searchsorted(self.keys, new_keys)
        self.keys = np.insert(self.keys, pos, new_keys)
        self.owners = np.insert(self.owners, pos, new_owners)
        self.recent.clear()
        self.extra.clear()

    def nbytes(self) -> int:
        # ~100 bytes per dict entry (entry, index slot, int key and value objects)
        return self.keys.nbytes + self.owners.nbytes + 100 * len(self.recent)

    def batch(self, keys: np.ndarray):
        """Look up a (n, k) array of keys against the sorted part, once per batch."""
        sorted_pos = self.lookup_sorted(keys)
        return keys.tolist(), sorted_pos, (sorted_pos != NO_OWNER).any(axis=1).tolist()

    def query(self, batch, i: int) -> set[int]:
        """Owners of any of the keys of row i. Fast path: no sorted hit and no key in the recent dict."""
        rows, sorted_pos, sorted_hit = batch
        if not sorted_hit[i] and self.recent.keys().isdisjoint(rows[i]):
            return set()
        owners = set()
        for key, pos in zip(rows[i], sorted_pos[i].tolist()):
            while 0 <= pos < len(self.keys) and int(self.keys[pos]) == key:  # a key may repeat, once per owner
                owners.add(int(self.owners[pos]))
                pos += 1
        for key in rows[i]:
            if key in self.recent:
                owners.add(self.recent[key])
                owners.update(self.extra.get(key, ()))
        return owners


class _KeyTableIndex:
    """The query/insert/end_batch protocol over a KeyTable; subclasses say how a batch becomes keys."""

    def query(self, batch, i: int) -> set[int]:
        return self.table.query(batch, i)

    def insert(self, batch, i: int, owner: int, fresh: bool = True) -> None:
        """fresh: query(batch, i) came back empty."""
        self.table.add(batch[0][i], owner, fresh)

    def end_batch(self) -> None:
        self.table.maybe_merge()

    def nbytes(self) -> int:
        return self.table.nbytes()


class ExactIndex(_KeyTableIndex):
    """Exact de-duplication: 64-bit digest of each kept document's text.

    Like the LSH classes: batch() once per batch of digests, query(batch, i) -> owners, insert(batch, i, owner)
    only for an item whose query came back empty, end_batch() between batches."""

    def __init__(self):
        self.table = KeyTable()

    def batch(self, digests: np.ndarray):
        return self.table.batch(digests.reshape(-1, 1))


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) that datasketch's optimiser picks for this threshold (equal FP/FN weights)."""
    probe = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return probe.b, probe.r


def recall_params(threshold: float, num_perm: int, target: float = 0.995) -> tuple[int, int]:
    """(bands, rows) for LSH whose candidates are checked afterwards: a pair at exactly `threshold` becomes a
    candidate with probability >= target (1 - (1 - t^r)^b), and among such bandings the one with the most rows
    (then the fewest bands) is taken, which keeps candidates of unrelated pairs rare and so the checks cheap.
    E.g. threshold 0.8, 128 permutations: 18 bands of 6 rows (datasketch's optimiser picks 9 of 13, which finds
    a pair at 0.8 with probability 0.48)."""
    best = None
    for rows in range(1, num_perm + 1):
        p = threshold ** rows
        if p >= 1.0:
            continue
        if p * num_perm < 1e-3:  # more rows only make it rarer
            break
        bands = max(1, math.ceil(math.log(1.0 - target) / math.log1p(-p)))
        if bands * rows <= num_perm:
            best = (bands, rows)
    if best is None:
        raise ValueError(f"no banding of {num_perm} permutations finds pairs at Jaccard {threshold} with probability "
                         f"{target}; use more permutations (--num-perm) or a higher threshold")
    return best


def shingle_set(signer, text: str) -> np.ndarray:
    """Sorted distinct 32-bit shingle hashes of a text, the set that MinHash signatures estimate."""
    return np.unique(signer.shingle_hashes(text))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two shingle_set arrays."""
    common = len(np.intersect1d(a, b, assume_unique=True))
    union = len(a) + len(b) - common
    return common / union if union else 1.0


class SentenceStore:
    """Texts of indexed sentences by id, in a scratch file (8 bytes of memory per sentence), for the check."""

    def __init__(self, path):
        self.file = open(path, "w+b")
        self.offsets = array.array("q", [0])

    def add(self, text: str) -> int:
        self.file.write(text.encode("utf-8"))
        self.offsets.append(self.file.tell())
        return len(self.offsets) - 2

    def text_of(self, sentence_id: int) -> str:
        self.file.flush()
        start, end = self.offsets[sentence_id], self.offsets[sentence_id + 1]
        return os.pread(self.file.fileno(), end - start, start).decode("utf-8")

    def close(self) -> None:
        self.file.close()


def confirm(signer, threshold: float, text: str, owners, text_of) -> tuple[int | None, int]:
    """(first owner, lowest id first, whose exact Jaccard with `text` reaches the threshold or None, owners
    rejected before it)."""
    mine = shingle_set(signer, text)
    for rejected, owner in enumerate(sorted(owners)):
        if jaccard(mine, shingle_set(signer, text_of(owner))) >= threshold:
            return owner, rejected
    return None, len(owners)


class CandidateCheck:
    """Confirms document LSH candidates by the exact Jaccard of the shingle sets before anything is removed.

    Kept documents are read back from the spill file (`spill`, written by prepare_data.py, one document per
    `offsets` run). Sentence de-duplication may have shortened a kept document after it was signed, so the full
    text of such a document goes to a scratch file and is read from there."""

    def __init__(self, signer, threshold: float, spill, offsets, scratch_path):
        self.signer, self.threshold = signer, threshold
        self.spill, self.offsets = spill, offsets
        self.scratch = open(scratch_path, "w+b")
        self.full_at: dict[int, tuple[int, int]] = {}  # ordinal -> (offset, length) in scratch, shortened ones only
        self.checked = self.rejected = 0

    def kept(self, ordinal: int, text: str, final: str) -> None:
        """Note kept document `ordinal`, signed as `text` and written to the spill as `final`."""
        if final != text:
            data = text.encode("utf-8")
            self.full_at[ordinal] = (self.scratch.seek(0, 2), len(data))
            self.scratch.write(data)

    def text_of(self, ordinal: int) -> str:
        if ordinal in self.full_at:
            offset, length = self.full_at[ordinal]
            self.scratch.flush()
            return os.pread(self.scratch.fileno(), length, offset).decode("utf-8")
        self.spill.flush()
        start, end = self.offsets[ordinal], self.offsets[ordinal + 1]
        return os.pread(self.spill.fileno(), end - start, start).decode("utf-8").rstrip("\n")

    def confirm(self, text: str, owners) -> int | None:
        """The first kept owner (lowest ordinal) whose Jaccard with `text` reaches the threshold, or None."""
        owner, rejected = confirm(self.signer, self.threshold, text, owners, self.text_of)
        self.checked += rejected + (owner is not None)
        self.rejected += rejected
        return owner

    def close(self) -> None:
        self.scratch.close()


_MIX = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: odd, well spread bits
_MIX2 = np.uint64(0xBF58476D1CE4E5B9)  # splitmix64 finaliser constant


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) uint64 keys, one per band of each signature; the band index is mixed in so equal values
    in different bands never meet."""
    n = len(sigs)
    x = sigs[:, :bands * rows].reshape(n, bands, rows).astype(np.uint64)
    h = np.broadcast_to(np.arange(1, bands + 1, dtype=np.uint64) * _MIX, (n, bands)).copy()
    with np.errstate(over="ignore"):
        for j in range(rows):
            h = (h ^ x[:, :, j]) * _MIX
            h ^= h >> np.uint64(31)
        h = (h ^ (h >> np.uint64(30))) * _MIX2
        h ^= h >> np.uint64(27)
    return h


class CompactLSH(_KeyTableIndex):
    """MinHash LSH with datasketch's banding, bands stored as 64-bit keys in a KeyTable."""

    name = "compact"

    def __init__(self, threshold: float, num_perm: int, seed: int, params: tuple[int, int] | None = None):
        self.bands, self.rows = params or lsh_params(threshold, num_perm)
        self.table = KeyTable()

    def batch(self, sigs: np.ndarray):
        return self.table.batch(band_keys(sigs, self.bands, self.rows))


class DatasketchLSH:
    """datasketch.MinHashLSH keyed by the owner (several signatures may share one owner key)."""

    name = "datasketch"

    def __init__(self, threshold: float, num_perm: int, seed: int, params: tuple[int, int] | None = None):
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, params=params)
        self.bands, self.rows = self.lsh.b, self.lsh.r
        self.seed = seed

    def batch(self, sigs: np.ndarray):
        return [LeanMinHash(seed=self.seed, hashvalues=row, scheme="affine32") for row in sigs]

    def query(self, batch, i: int) -> set[int]:
        return set(self.lsh.query(batch[i]))

    def insert(self, batch, i: int, owner: int, fresh: bool = True) -> None:
        self.lsh.insert(owner, batch[i], check_duplication=False)

    def end_batch(self) -> None:
        pass

    def nbytes(self) -> int:
        return -1  # unknown without walking the Python objects; the benchmark measures RSS instead


BACKENDS = {"compact": CompactLSH, "datasketch": DatasketchLSH}
