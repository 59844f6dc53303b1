"""The global sample order: which samples make global batch b, whatever the number of ranks.

A sample is ``max_length + 1`` consecutive tokens of one source's stream (its files' tokens in sorted order), so
source s holds ``n_s = tokens_s // (max_length + 1)`` samples; sample j of source s has the global id
``offsets[s] + j``. The order is a pure function of (sample counts, weights, seed, global batch size B):

1. Counts. In every global batch source s gets floor(w_s B) or ceil(w_s B) samples. The ceil goes to the sources
   whose carried remainder (the sum of their fractional parts w_s B - floor(w_s B) over past batches, minus the
   extra samples they already got) is largest; ties go to the earlier source. So the shares over any run of
   batches stay within one sample of w_s B per source, deterministically.
2. Draws. Source s serves its samples in epochs; epoch e is a permutation of 0..n_s-1 seeded by (seed, s, e).
   A source that runs out starts its next epoch on its own (upsampling), independent of the others.
3. Positions. Within a batch, the sources' samples are interleaved by a counter-based hash of (seed, position),
   so rank r's slice is not all one source.

None of these depends on how far ahead the order is computed, so an index built for more steps begins with the
same batches. ``build_index`` writes the order for ``num_batches`` batches to a .npy file (int64 global sample
ids, 8 bytes per sample) that every rank memory-maps; on a node the page cache holds it once.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

INDEX_FORMAT = 1


def mixture_counts(weights: Sequence[float], batch_size: int, num_batches: int) -> np.ndarray:
    """[num_batches, S] samples per source per batch (rows sum to batch_size); see the module docstring, step 1."""
    w = np.asarray(weights, dtype=np.float64)
    ideal = w * batch_size
    base = np.floor(ideal + 1e-9).astype(np.int64)  # 1e-9: 0.7 * 10 is 6.999... in floating point
    frac = np.clip(ideal - base, 0.0, None)
    extra = int(batch_size - base.sum())
    counts = np.tile(base, (num_batches, 1))
    if extra == 0:
        return counts
    carry = np.zeros(len(w))
    for b in range(num_batches):  # cheap: a few sources, and the result is cached in the index file
        carry += frac
        top = np.argsort(-carry, kind="stable")[:extra]
        counts[b, top] += 1
        carry[top] -= 1.0
    return counts


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A bijective 64-bit hash (splitmix64's finalizer): random-looking keys from counters, no generator state."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def epoch_permutation(seed: int, source: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, source, epoch]).permutation(n)


def compute_order(sample_counts: Sequence[int], weights: Sequence[float], seed: int, batch_size: int,
                  num_batches: int) -> np.ndarray:
    """int64 [num_batches * batch_size] global sample ids, batch after batch."""
    out = np.empty(num_batches * batch_size, dtype=np.int64)
    write_order(out, sample_counts, weights, seed, batch_size, num_batches)
    return out


def write_order(out: np.ndarray, sample_counts: Sequence[int], weights: Sequence[float], seed: int, batch_size: int,
                num_batches: int, chunk_samples: int = 1 << 22) -> None:
    """Fill `out` (an array or a memory map of num_batches * batch_size int64) chunk by chunk, so the builder
    holds a few chunk-sized arrays and one epoch permutation per source, never the whole order twice."""
    n = np.asarray(sample_counts, dtype=np.int64)
    if (n[np.asarray(weights) > 0] < 1).any():
        raise ValueError("every source with a positive weight needs at least one sample")
    offsets = np.concatenate([[0], np.cumsum(n)[:-1]])
    counts = mixture_counts(weights, batch_size, num_batches)  # [num_batches, S]
    seed_key = np.uint64(seed * 0x2545F4914F6CDD1D % (1 << 64))
    drawn = np.zeros(len(n), dtype=np.int64)  # draws each source has served before this chunk
    perms = {}  # source -> (epoch, permutation): draws only move forward, so one epoch per source suffices
    step = max(1, chunk_samples // batch_size)
    for b0 in range(0, num_batches, step):
        b1 = min(num_batches, b0 + step)
        lo, hi = b0 * batch_size, b1 * batch_size
        # Source of each position: sources in order within each batch, then interleaved by hashed keys.
        src = np.repeat(np.tile(np.arange(len(n)), b1 - b0), counts[b0:b1].ravel())  # [hi - lo]
        keys = _splitmix64(np.arange(lo, hi, dtype=np.uint64) ^ seed_key)
        within = np.argsort(keys.reshape(b1 - b0, batch_size), axis=1, kind="stable")  # [b1 - b0, batch_size]
        src = np.take_along_axis(src.reshape(b1 - b0, batch_size), within, axis=1).ravel()  # [hi - lo]
        chunk = np.empty(hi - lo, dtype=np.int64)
        for s in range(len(n)):
            where = np.flatnonzero(src == s)  # the k-th position here is source s's (drawn[s] + k)-th draw
            k = drawn[s] + np.arange(len(where))
            epochs, within_epoch = np.divmod(k, n[s]) if len(where) else (k, k)
            for e in np.unique(epochs):
                if perms.get(s, (None,))[0] != e:
                    perms[s] = (e, epoch_permutation(seed, s, int(e), int(n[s])))
                sel = epochs == e
                chunk[where[sel]] = offsets[s] + perms[s][1][within_epoch[sel]]
            drawn[s] += len(where)
        out[lo:hi] = chunk


def build_index(path: Path, sample_counts: Sequence[int], weights: Sequence[float], seed: int, batch_size: int,
                num_batches: int) -> np.ndarray:
    """The order as a read-only memory map of `path`, computing and writing it first when the file is absent.
    Written under a temporary name and renamed, so concurrent builders and crashes leave only whole files."""
    path = Path(path)
    if not path.is_file():
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(num_batches * batch_size,))
        write_order(out, sample_counts, weights, seed, batch_size, num_batches)
        out.flush()
        del out
        os.replace(tmp, path)
    index = np.load(path, mmap_mode="r")
    if index.shape != (num_batches * batch_size,) or index.dtype != np.int64:
        raise ValueError(f"sample index {path} has shape {index.shape} {index.dtype}, expected "
                         f"({num_batches * batch_size},) int64: delete it to rebuild")
    return index
