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
"""
from __future__ import annotations

import itertools

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
        self.merge_every = merge_every

    def __len__(self) -> int:
        return len(self.keys) + len(self.recent)

    def lookup_sorted(self, keys: np.ndarray) -> np.ndarray:
        """Owner (int64, NO_OWNER when absent) of each key among the merged keys."""
        if len(self.keys) == 0:
            return np.full(keys.shape, NO_OWNER, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return np.where(self.keys[pos] == keys, self.owners[pos].astype(np.int64), NO_OWNER)

    def add(self, keys: list[int], owner: int) -> None:
        """Add keys that are absent (the caller's query found none of them) or already belong to `owner`."""
        self.recent.update(zip(keys, itertools.repeat(owner)))

    def maybe_merge(self, force: bool = False) -> None:
        """Merge the recent dict into the sorted arrays; call only between batches (look-ups of a batch
        against the sorted arrays must not change under it)."""
        if not self.recent or (len(self.recent) < self.merge_every and not force):
            return
        new_keys = np.fromiter(self.recent.keys(), dtype=np.uint64, count=len(self.recent))
        new_owners = np.fromiter(self.recent.values(), dtype=np.uint32, count=len(self.recent))
        order = np.argsort(new_keys)
        new_keys, new_owners = new_keys[order], new_owners[order]
        pos = np.searchsorted(self.keys, new_keys)
        self.keys = np.insert(self.keys, pos, new_keys)
        self.owners = np.insert(self.owners, pos, new_owners)
        self.recent.clear()

    def nbytes(self) -> int:
        # ~100 bytes per dict entry (entry, index slot, int key and value objects)
        return self.keys.nbytes + self.owners.nbytes + 100 * len(self.recent)

    def batch(self, keys: np.ndarray):
        """Look up a (n, k) array of keys against the sorted part, once per batch."""
        sorted_owner = self.lookup_sorted(keys)
        return keys.tolist(), sorted_owner, (sorted_owner != NO_OWNER).any(axis=1).tolist()

    def query(self, batch, i: int) -> set[int]:
        """Owners of any of the keys of row i. Fast path: no sorted hit and no key in the recent dict."""
        rows, sorted_owner, sorted_hit = batch
        if not sorted_hit[i] and self.recent.keys().isdisjoint(rows[i]):
            return set()
        owners = {int(o) for o in sorted_owner[i] if o != NO_OWNER}
        owners.update(self.recent[k] for k in rows[i] if k in self.recent)
        return owners


class _KeyTableIndex:
    """The query/insert/end_batch protocol over a KeyTable; subclasses say how a batch becomes keys."""

    def query(self, batch, i: int) -> set[int]:
        return self.table.query(batch, i)

    def insert(self, batch, i: int, owner: int) -> None:
        self.table.add(batch[0][i], owner)

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

    def __init__(self, threshold: float, num_perm: int, seed: int):
        self.bands, self.rows = lsh_params(threshold, num_perm)
        self.table = KeyTable()

    def batch(self, sigs: np.ndarray):
        return self.table.batch(band_keys(sigs, self.bands, self.rows))


class DatasketchLSH:
    """datasketch.MinHashLSH keyed by the owner (several signatures may share one owner key)."""

    name = "datasketch"

    def __init__(self, threshold: float, num_perm: int, seed: int):
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.bands, self.rows = self.lsh.b, self.lsh.r
        self.seed = seed

    def batch(self, sigs: np.ndarray):
        return [LeanMinHash(seed=self.seed, hashvalues=row, scheme="affine32") for row in sigs]

    def query(self, batch, i: int) -> set[int]:
        return set(self.lsh.query(batch[i]))

    def insert(self, batch, i: int, owner: int) -> None:
        self.lsh.insert(owner, batch[i], check_duplication=False)

    def end_batch(self) -> None:
        pass

    def nbytes(self) -> int:
        return -1  # unknown without walking the Python objects; the benchmark measures RSS instead


BACKENDS = {"compact": CompactLSH, "datasketch": DatasketchLSH}
