"""The global-order engine train.py uses by default: sources, token cache and global order tied together.

Every rank lists all files, tokenizes its share of the missing cache entries (file i on rank i % world), then
maps every entry; a cache folder that is not shared by all ranks (node-local disks) is detected by the entries
still missing after that round, which this node then tokenizes itself (the log says so). Local rank 0 of each
node writes the sample index (data/order.py) into ``<cache_dir>/index/``; the other ranks map it.

Global batch b holds the samples at positions [b*B, (b+1)*B) of the index (B = global batch size). Rank r's
micro-step m of that batch takes positions b*B + r*micro*gas + m*micro onwards, micro of them. The position is
saved as the count of global samples consumed, so a checkpoint resumes on any world size that divides B.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import List, Optional, Tuple

import numpy as np

from . import dist
from .cache import (EOS_TOKEN_ID, MAX_BAD_LINE_FRACTION, MIN_LINE_TOKENS, TokenCache, TokenStream,
                    release_freed_memory, resolve_cache_dir)
from .order import INDEX_FORMAT, build_index, compute_order
from .sources import Source, check_engine_args, list_data_files, read_mixture, resolve_weights

logger = logging.getLogger(__name__)

STATE_FORMAT = 2
# Settings whose change alters which samples follow the checkpoint; compared on resume (see compare_fingerprints).
FINGERPRINT_FIELDS = ("data_order", "files", "mixture", "seed", "max_length", "global_batch_size")


def _local():
    """(local rank, ranks on this node); without a launcher, as if all ranks shared one node."""
    return int(os.environ.get("LOCAL_RANK", "0")), max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def split_global_batch(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Gradient accumulation steps = global / (micro x world), or a ValueError naming the three numbers."""
    gas, rest = divmod(global_batch_size, micro_batch_size * world_size)
    if rest or gas < 1:
        raise ValueError(f"global batch {global_batch_size} is not a whole multiple of micro-batch "
                         f"{micro_batch_size} x world size {world_size}: pick a micro-batch or world size that "
                         f"divides it (the global batch stays fixed so that the data order does)")
    return gas


def compare_fingerprints(saved: dict, current: dict) -> List[str]:
    """One line per data setting that differs between a checkpoint and this run."""
    return [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}"
            for k in FINGERPRINT_FIELDS if saved.get(k) != current.get(k)]


class GlobalDataEngine:
    """Serves rank `rank`'s slice of each global batch. Interface as data.per_rank.DataEngine (get_data,
    state_dict, load_state_dict, epoch, vocab_size), plus tokens_by_source and sample_ids.

    Args beyond the per-rank engine's:
        global_batch_size: samples per optimizer step over all ranks; fixed for the run, whatever its world size.
        num_batches: how many global batches the index covers (train.py: --max_steps).
        data_mix: a --data_mix JSON file (see data/sources.py), or None for one source of all files.
        holdout: (fraction, False) trains only on documents outside the --val_fraction held-out share.
    """

    def __init__(self, data_dir, tokenizer_path, micro_batch_size: int, max_length: int, global_batch_size: int,
                 num_batches: int, world_size: Optional[int] = None, rank: Optional[int] = None, seed: int = 42,
                 cache_dir=None, num_workers: Optional[int] = None, device="cpu", *, data_mix=None,
                 min_line_tokens: int = MIN_LINE_TOKENS, eos_id: int = EOS_TOKEN_ID,
                 show_progress: Optional[bool] = None, max_bad_line_fraction: float = MAX_BAD_LINE_FRACTION,
                 holdout: Optional[Tuple[float, bool]] = None):
        self.data_dir = check_engine_args(data_dir, seed, micro_batch_size=micro_batch_size, max_length=max_length,
                                          global_batch_size=global_batch_size, num_batches=num_batches)
        self.micro_batch_size, self.max_length = int(micro_batch_size), int(max_length)
        self.sample_length = self.max_length + 1
        self.global_batch_size, self.num_batches = int(global_batch_size), int(num_batches)
        self.seed, self.device = int(seed), device
        self.world_size, self.rank = dist.resolve_world(world_size, rank)
        self.gas = split_global_batch(self.global_batch_size, self.micro_batch_size, self.world_size)
        self.cache_dir = resolve_cache_dir(cache_dir, self.data_dir)
        self.cache = TokenCache(self.cache_dir, tokenizer_path, min_line_tokens=min_line_tokens, eos_id=eos_id,
                                num_workers=num_workers, max_bad_line_fraction=max_bad_line_fraction,
                                holdout=holdout)
        self.vocab_size, self.eos_id = self.cache.vocab_size, self.cache.eos_id
        self.show_progress = (self.rank == 0) if show_progress is None else bool(show_progress)

        exclude = [self.cache_dir] if self.cache_dir is not None else []
        self.all_files = list_data_files(self.data_dir, exclude=exclude)
        if not self.all_files:
            raise ValueError(f"no data files in {self.data_dir} (hidden files and folders, such as the cache folder "
                             ".cache, are ignored)")
        if data_mix is None:
            self.sources, self.temperature = [Source("all", "", 1.0, list(self.all_files))], None
        else:
            self.sources, self.temperature = read_mixture(data_mix, self.data_dir, self.all_files)
        self.weights: List[float] = []
        self.streams: List[TokenStream] = []
        self.index: Optional[np.ndarray] = None
        self._step = 0  # micro-batches served by this rank since start_sample
        self.start_sample = 0  # global samples consumed before this engine's first batch (set on resume)
        self._seen = None  # global samples per source up to the current global batch

    # -- loading ---------------------------------------------------------------------------------------------

    def load_data(self) -> "GlobalDataEngine":
        """Tokenize (this rank's share), map every source, build or map the index. Returns self. A failure on any
        rank stops every rank with an error (never a hang in a collective)."""
        t0 = time.perf_counter()
        entries, tokenized_here = self._load_entries()
        error = None
        try:
            self._assemble(entries)
            # Checksums and id ranges once per node, split over its local ranks (each rank would otherwise read
            # the whole corpus); the entries are trusted everywhere once every rank has agreed.
            local_rank, local_world = _local()
            for i, e in enumerate(entries):
                if i % local_world == local_rank:
                    e.verify(self.vocab_size)
        except (OSError, ValueError) as e:
            error = e
        dist.agree(error, self.world_size, "loading the data")
        for e in entries:
            e.verified = True
        self.index = self._load_index()
        self._seen = np.zeros(len(self.sources), dtype=np.int64)
        release_freed_memory()
        if self.rank == 0:
            stats = [e.stats for e in entries]
            logger.info("%d file(s) (%d tokenized by this rank), %d lines (%d under %d tokens dropped, %d with "
                        "undecodable bytes replaced), %d tokens; sources: %s; global batch %d = micro %d x world %d "
                        "x accumulation %d; %.1fs", len(entries), tokenized_here, sum(s["lines"] for s in stats),
                        sum(s["short"] for s in stats), self.cache.min_line_tokens, sum(s["bad"] for s in stats),
                        self.num_tokens, ", ".join(f"{s.name} {w:.3f} ({st.total} tokens, {n} samples)" for s, w, st, n
                                                   in zip(self.sources, self.weights, self.streams,
                                                          self.samples_per_source)),
                        self.global_batch_size, self.micro_batch_size, self.world_size, self.gas,
                        time.perf_counter() - t0)
        return self

    def _load_entries(self):
        files, n = self.all_files, len(self.all_files)
        entries, error, tokenized = [None] * n, None, 0
        # Round 1: each rank tokenizes its share into the cache; round 2: a node whose cache lacks entries after
        # that (node-local cache folders) fills them, split over its local ranks; then every rank maps all.
        local_rank, local_world = _local()

        def fill(indices, **kwargs) -> int:
            """Load (from the cache, else by tokenizing) the files at `indices`; returns how many were tokenized."""
            got, cached = self.cache.load([files[i] for i in indices], show_progress=self.show_progress, **kwargs)
            for i, e in zip(indices, got):
                entries[i] = e
            return len(indices) - cached

        for round_, (share, of) in enumerate(((self.rank, self.world_size), (local_rank, local_world))):
            try:
                mine = [i for i in range(n) if i % of == share and entries[i] is None]
                if round_ == 1:
                    keys = self.cache.keys(files)
                    for i in range(n):
                        if entries[i] is None:
                            entries[i] = self.cache.lookup(files[i], keys[i])
                    mine = [i for i in mine if entries[i] is None]
                    missing = sum(e is None for e in entries)
                    if missing and self.cache_dir is not None and self.rank == local_rank == 0:
                        logger.warning("cache folder %s is not shared by all ranks: %d of %d file(s) are tokenized "
                                       "again on this node", self.cache_dir, missing, n)
                if mine:
                    tokenized += fill(mine, desc=f"tokenizing (rank {self.rank})")
            except (OSError, ValueError) as e:
                error = e
            dist.agree(error, self.world_size, "tokenizing the data")
            if self.cache_dir is None:
                break  # nothing shared: every rank tokenizes everything in round 3
        rest = [i for i in range(n) if entries[i] is None]
        try:
            if rest:  # without a cache, or a node-local cache another node's rank filled
                tokenized += fill(rest)
        except (OSError, ValueError) as e:
            error = e
        dist.agree(error, self.world_size, "tokenizing the data")
        return entries, tokenized

    def _assemble(self, entries) -> None:
        by_path = dict(zip(self.all_files, entries))
        unusable = [f"{p} ({e.stats['lines']} lines)" for p, e in by_path.items() if e.stats["kept"] == 0]
        if unusable:
            raise ValueError(f"no line of at least {self.cache.min_line_tokens} tokens (EOS included) in: "
                             + "; ".join(unusable) + ". Remove these files or give them real text.")
        self.streams = [TokenStream([by_path[p] for p in s.files], self.vocab_size) for s in self.sources]
        self.samples_per_source = [st.total // self.sample_length for st in self.streams]
        self.num_tokens = sum(st.total for st in self.streams)
        self.weights = resolve_weights(self.sources, [st.total for st in self.streams], self.temperature)
        for s, w, n in zip(self.sources, self.weights, self.samples_per_source):
            if w > 0 and n < 1:
                raise ValueError(f"source {s.name!r} holds fewer than max_length + 1 = {self.sample_length} tokens "
                                 f"({len(s.files)} file(s)): not one sample. Add data or lower --max_length.")
        self.offsets = np.concatenate([[0], np.cumsum(self.samples_per_source)]).astype(np.int64)
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> dict:
        """Plain JSON: what decides the order. Files enter as a digest of names and sizes (cheap on every rank)."""
        listing = [(p.relative_to(self.data_dir).as_posix(), p.stat().st_size) for p in self.all_files]
        files = hashlib.sha256(json.dumps([listing, self.cache.rules_id()]).encode()).hexdigest()[:16]
        mixture = [[s.name, s.pattern, round(w, 12)] for s, w in zip(self.sources, self.weights)]
        return {"data_order": "global", "files": files, "mixture": mixture, "seed": self.seed,
                "max_length": self.max_length, "global_batch_size": self.global_batch_size}

    def _load_index(self) -> np.ndarray:
        args = (self.samples_per_source, self.weights, self.seed, self.global_batch_size, self.num_batches)
        if self.cache_dir is None:
            return compute_order(*args)
        blob = json.dumps([INDEX_FORMAT, self.fingerprint, self.samples_per_source, self.num_batches])
        path = self.cache_dir / "index" / f"{hashlib.sha256(blob.encode()).hexdigest()[:32]}.npy"
        error = None
        if _local()[0] == 0:
            try:
                path.parent.mkdir(exist_ok=True)
                build_index(path, *args)
            except (OSError, ValueError) as e:
                error = e
        dist.agree(error, self.world_size, "building the sample index")
        if not path.is_file():  # a cache folder shared by ranks of different nodes is fine; one per rank is too
            build_index(path, *args)
        return build_index(path, *args)

    # -- serving ---------------------------------------------------------------------------------------------

    def _positions(self, step: int) -> range:
        """Index positions of this rank's micro-batch number `step` (counted from start_sample)."""
        batch, micro = divmod(step, self.gas)
        first = (self.start_sample + batch * self.global_batch_size
                 + self.rank * self.micro_batch_size * self.gas + micro * self.micro_batch_size)
        return range(first, first + self.micro_batch_size)

    def sample_ids(self, step: int) -> np.ndarray:
        """Global sample ids of this rank's micro-batch `step` (0-based, counted from the resume point)."""
        if self.index is None:
            raise RuntimeError("GlobalDataEngine: call load_data() first")
        pos = self._positions(step)
        if pos.stop > len(self.index):
            raise ValueError(f"the sample index covers {self.num_batches} global batches (num_batches, train.py's "
                             f"--max_steps); global sample {pos.stop - 1} lies past it")
        return np.asarray(self.index[pos.start:pos.stop])

    def batch_array(self, step: int) -> np.ndarray:
        """The int64 [micro_batch_size, max_length + 1] batch of micro-step `step`, without moving on."""
        ids = self.sample_ids(step)
        sources = np.searchsorted(self.offsets, ids, side="right") - 1
        batch = np.empty((len(ids), self.sample_length), dtype=np.int64)
        for row, (g, s) in enumerate(zip(ids, sources)):
            self.streams[s].read(int(g - self.offsets[s]) * self.sample_length, batch[row])
        return batch

    def get_data(self):
        """The next micro-batch: a LongTensor [micro_batch_size, max_length + 1] on `device`."""
        import torch

        if self._step % self.gas == 0:  # a new global batch: count its samples per source (same on every rank)
            lo = self.start_sample + (self._step // self.gas) * self.global_batch_size
            self._count(lo, lo + self.global_batch_size)
        batch = self.batch_array(self._step)
        self._step += 1
        return torch.from_numpy(batch).to(self.device)

    def _count(self, lo: int, hi: int) -> None:
        step = 1 << 22
        for a in range(lo, min(hi, len(self.index)), step):
            ids = np.asarray(self.index[a:min(hi, a + step)])
            src = np.searchsorted(self.offsets, ids, side="right") - 1
            self._seen += np.bincount(src, minlength=len(self.sources))

    @property
    def step(self) -> int:
        return self._step

    @property
    def global_samples(self) -> int:
        """Global samples consumed by whole optimizer steps (what a checkpoint saves)."""
        return self.start_sample + (self._step // self.gas) * self.global_batch_size

    @property
    def epoch(self) -> float:
        """Global samples served over the corpus's samples (a mixture upsamples some sources sooner)."""
        return self.global_samples / max(1, int(self.offsets[-1]))

    def tokens_by_source(self) -> dict:
        """Training tokens (max_length per sample) per source name, over all ranks, up to the current batch."""
        return {s.name: int(n) * self.max_length for s, n in zip(self.sources, self._seen)}

    # -- checkpoint state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        if self._step % self.gas:
            raise RuntimeError(f"state_dict() in the middle of a global batch (micro-step {self._step} with "
                               f"accumulation {self.gas}): save after the optimizer step")
        return {"format": STATE_FORMAT, "global_samples": self.global_samples, "fingerprint": self.fingerprint,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict, allow_data_change: bool = False) -> None:
        """Continue after the saved global sample count. A changed data setting (see FINGERPRINT_FIELDS) is an
        error naming it, unless allow_data_change: then the run goes on from the same sample count under the new
        order, and the log says so."""
        if state.get("format") != STATE_FORMAT or "global_samples" not in state:
            raise ValueError(f"the checkpoint's data state has format {state.get('format')!r}, not the global order's "
                             f"{STATE_FORMAT} (it was saved with --data_order per_rank; resume with that)")
        diffs = compare_fingerprints(state.get("fingerprint", {}), self.fingerprint)
        if diffs and not allow_data_change:
            raise ValueError("the data settings differ from the checkpoint's: " + "; ".join(diffs)
                             + ". Pass --allow_data_change to continue from the same global sample count under "
                             "the new order.")
        if diffs:
            logger.warning("data settings changed (%s): continuing at global sample %d under the new order",
                           "; ".join(diffs), state["global_samples"])
        self.start_sample, self._step = int(state["global_samples"]), 0
        self._seen[:] = 0
        self._count(0, self.start_sample)

    def __repr__(self) -> str:
        return (f"GlobalDataEngine(rank {self.rank}/{self.world_size}, {len(self.sources)} source(s), "
                f"{self.num_tokens} tokens, global batch {self.global_batch_size}, {self.num_batches} batches)")
