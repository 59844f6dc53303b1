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
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .cache import (EOS_TOKEN_ID, MAX_BAD_LINE_FRACTION, MIN_LINE_TOKENS, TokenCache, TokenStream,
                    release_freed_memory, resolve_cache_dir)
from .dist import resolve_world, sync_steps
from .sources import check_engine_args, files_for_rank, list_data_files

logger = logging.getLogger(__name__)

STATE_FORMAT = 1



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
        max_bad_line_fraction: a file with more undecodable lines than this, or any NUL byte, is refused.
        files: only these files of data_dir (one --data_mix source, for the per-source validation loss).
    """

    def __init__(self, data_dir, tokenizer_path, micro_batch_size: int, max_length: int,
                 world_size: Optional[int] = None, rank: Optional[int] = None, seed: int = 42,
                 cache_dir=None, num_workers: Optional[int] = None, device="cpu", *,
                 min_line_tokens: int = MIN_LINE_TOKENS, eos_id: int = EOS_TOKEN_ID,
                 show_progress: Optional[bool] = None, max_bad_line_fraction: float = MAX_BAD_LINE_FRACTION,
                 holdout: Optional[Tuple[float, bool]] = None, files: Optional[Sequence[Path]] = None):
        self.data_dir = check_engine_args(data_dir, seed, micro_batch_size=micro_batch_size, max_length=max_length)
        self.micro_batch_size, self.max_length = int(micro_batch_size), int(max_length)
        self.sample_length = self.max_length + 1
        self.seed, self.device = int(seed), device
        self.min_line_tokens, self.eos_id = int(min_line_tokens), int(eos_id)
        self.world_size, self.rank = resolve_world(world_size, rank)
        self.cache_dir = resolve_cache_dir(cache_dir, self.data_dir)
        self.cache = TokenCache(self.cache_dir, tokenizer_path, min_line_tokens=min_line_tokens, eos_id=eos_id,
                                num_workers=num_workers, max_bad_line_fraction=max_bad_line_fraction,
                                holdout=holdout)
        # (fraction, want_held_out): train on the documents outside a held-out share, or validate on it.
        self.holdout = self.cache.holdout
        self.tokenizer_path, self.vocab_size = self.cache.tokenizer_path, self.cache.vocab_size
        self.tokenizer_sha256, self.num_workers = self.cache.tokenizer_sha256, self.cache.num_workers

        exclude = [self.cache_dir] if self.cache_dir is not None else []
        self.all_files = list_data_files(self.data_dir, exclude=exclude)
        if files is not None:  # one source of a mixture (training/validation.py)
            chosen = {Path(f).resolve() for f in files}
            self.all_files = [f for f in self.all_files if f.resolve() in chosen]
        if not self.all_files:
            raise ValueError(f"no data files in {self.data_dir} (hidden files and folders, such as the cache folder "
                             ".cache, are ignored)")
        if len(self.all_files) < self.world_size:
            raise ValueError(
                f"{self.data_dir} holds {len(self.all_files)} data file(s) but world_size is {self.world_size}: each "
                f"rank reads whole files, so at least {self.world_size} files are needed (split the corpus into "
                f"a multiple of {self.world_size} shards of similar size)")
        self.files = files_for_rank(self.all_files, self.world_size, self.rank)
        self.show_progress = (self.rank == 0) if show_progress is None else bool(show_progress)
        self.fingerprint = self._fingerprint()

        self.file_stats: List[dict] = []
        self._stream: Optional[TokenStream] = None
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
        fewest, most = sync_steps(local_steps, self.world_size)
        if error is not None:
            raise error
        if fewest == 0:
            raise RuntimeError(f"rank {self.rank}: another rank could not load its data (see that rank's error); "
                               "stopping here instead of waiting for it")
        self.steps_per_epoch = fewest
        self._order_epoch, self._order = -1, None
        release_freed_memory()
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
        entries, from_cache = self.cache.load(self.files, show_progress=self.show_progress,
                                              desc=f"tokenizing (rank {self.rank})")
        # A file may hold no held-out document at all; only the training side needs every file to give text.
        validation_side = self.holdout is not None and self.holdout[1]
        unusable = [f"{p} ({e.stats['lines']} lines)" for p, e in zip(self.files, entries)
                    if e.stats["kept"] == 0 and not validation_side]
        if unusable:
            raise ValueError(f"no line of at least {self.min_line_tokens} tokens (EOS included) in: "
                             + "; ".join(unusable) + ". Remove these files or give them real text.")
        self.file_stats = [dict(e.stats, file=str(p), tokens=len(e)) for p, e in zip(self.files, entries)]
        self._stream = TokenStream(entries, self.vocab_size)
        self.num_tokens = self._stream.total
        self.num_samples = self.num_tokens // self.sample_length
        if self.num_samples < self.micro_batch_size:
            raise ValueError(
                f"rank {self.rank} holds {self.num_tokens} tokens in {len(self.files)} file(s) "
                f"({', '.join(map(str, self.files))}): fewer than one batch of micro_batch_size x (max_length + 1) = "
                f"{self.micro_batch_size} x {self.sample_length} tokens. Add data, use fewer ranks, or lower "
                "max_length / micro_batch_size.")
        return from_cache

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

    def load_state_dict(self, state: dict, allow_data_change: bool = False) -> None:
        """Continue where `state` stopped: the next get_data() is the first batch that run had not served.
        allow_data_change continues at the saved step despite other data or settings (never another world size:
        this order is tied to it)."""
        self._require_loaded()
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown data state format {state.get('format')!r} (expected {STATE_FORMAT})")
        mine = self.state_dict()
        problems = [f"{k}: checkpoint {state.get(k)!r}, now {mine[k]!r}"
                    for k in ("world_size", "micro_batch_size", "max_length", "seed", "fingerprint",
                              "steps_per_epoch")
                    if state.get(k) != mine[k]]
        if problems and allow_data_change and state.get("world_size") == self.world_size:
            logger.warning("data settings changed (%s): continuing at step %s under the new order",
                           "; ".join(problems), state.get("step"))
        elif problems:
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
