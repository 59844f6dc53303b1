"""Held-out validation loss during training (``--val_dir`` or ``--val_fraction``, every ``--eval_every`` steps).

The held-out set is fixed for the whole run: ``ceil(eval_tokens / max_length)`` packed samples of
``max_length + 1`` tokens (each gives ``max_length`` predictions), read in stream order, never shuffled.

* ``--val_dir DIR``: a separate folder of text shards, tokenized and packed like the training data. Every rank
  reads the whole folder (it is small) and evaluates samples ``rank, rank + world, ...``, so the set does not
  depend on the world size.
* ``--val_fraction F``: documents of ``--data_dir`` chosen by a hash of their content (data_utils.is_held_out)
  are held out: the training stream skips them, and each rank's validation stream keeps only those of its own
  files. Each rank evaluates the first ``ceil(samples / world)`` samples of its stream.

With ``--data_mix``, the set is drawn from each source in equal shares (``ceil(samples / sources)`` samples each,
from the source's files under ``--val_dir`` or its held-out documents under ``--val_fraction``), and
``val_loss/<source>`` and ``val_ppl/<source>`` are logged beside the overall ``val_loss``.

Every rank runs the same number of forward passes (a rank with fewer real samples repeats one at weight 0), as
ZeRO-3 gathers parameters in collectives inside forward. Summed losses and prediction counts are all-reduced,
so ``val_loss`` is the mean over every held-out prediction. Evaluation reads no random numbers and touches
neither the optimizer nor the training data, so a run with it trains exactly as one without.
"""
import math
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
import torch.distributed as dist

from data.sources import read_mixture
from data_utils import DataEngine, list_data_files
from training.documents import document_inputs


def check_val_args(args, parser) -> None:
    """Refuse bad validation flags at launch, naming the flag."""
    if args.val_dir is not None and args.val_fraction is not None:
        parser.error("pass --val_dir or --val_fraction, not both")
    if args.val_fraction is not None and not 0 < args.val_fraction <= 0.5:
        parser.error(f"--val_fraction must lie in (0, 0.5], got {args.val_fraction}")
    if args.eval_tokens < 1 or args.eval_every < 0:
        parser.error("--eval_tokens must be at least 1 and --eval_every at least 0")


class Validation:
    """This rank's share of the fixed held-out samples of each source, and the loss over all of them."""

    def __init__(self, samples: Dict[str, List[np.ndarray]], per_rank: int, device, document_mask: bool,
                 eos_id: int):
        """`samples`: source name -> this rank's samples of it ({"all": ...} without a mixture); `per_rank`:
        forward passes per source on every rank."""
        self.names = list(samples)
        self.batches = []  # (sample [1, max_length + 1], weight, source index)
        for i, name in enumerate(self.names):
            if not samples[name]:
                raise ValueError(f"validation needs at least one held-out sample of source {name!r} on every rank")
            mine = [(torch.from_numpy(a)[None], 1.0, i) for a in samples[name]]  # [1, max_length + 1] each
            # Pad to per_rank forward passes with weight-0 repeats of a real sample.
            self.batches += mine + [(mine[0][0], 0.0, i)] * (per_rank - len(mine))
        self.device, self.document_mask, self.eos_id = device, document_mask, eos_id

    @torch.no_grad()
    def evaluate(self, engine) -> dict:
        """{"val_loss", "val_ppl", "val_tokens"} over every rank's samples, and with more than one source
        "val_loss/<source>" and "val_ppl/<source>"; call on every rank."""
        was_training = engine.training
        engine.eval()
        total = torch.zeros(len(self.names), 2, dtype=torch.float64, device=self.device)  # [source, (loss, count)]
        for batch, weight, source in self.batches:
            batch = batch.to(self.device)
            inputs = document_inputs(batch, self.eos_id) if self.document_mask else {"labels": batch}
            predictions = (inputs["labels"][:, 1:] != -100).sum()
            loss = engine(batch, **inputs).loss  # mean over this sample's predictions
            total[source] += weight * torch.stack([loss.double() * predictions, predictions.double()])
        if dist.is_initialized():
            dist.all_reduce(total)
        if was_training:
            engine.train()
        result = _losses("", total.sum(0))
        if len(self.names) > 1:
            for name, row in zip(self.names, total):
                result.update(_losses(f"/{name}", row))
        return result


def _losses(suffix: str, row: torch.Tensor) -> dict:
    loss = (row[0] / row[1]).item()
    out = {f"val_loss{suffix}": loss, f"val_ppl{suffix}": math.exp(min(loss, 700.0))}
    if not suffix:
        out["val_tokens"] = int(row[1].item())
    return out


def validation_sources(args, folder: str) -> Dict[str, object]:
    """Source name -> the files of `folder` it takes (None: the whole folder). With --data_mix, the mixture's
    folders and globs are matched under `folder` (--data_dir, or --val_dir laid out the same way)."""
    if args.data_mix is None:
        return {"all": None}
    root = Path(folder)
    sources, _ = read_mixture(args.data_mix, root, list_data_files(root))
    return {s.name: s.files for s in sources}


def build_validation(args, rank: int, world: int, device) -> Validation:
    """The Validation of `args` (``--val_dir`` or ``--val_fraction``, per ``--data_mix`` source) for this rank.
    Raises ValueError or OSError naming the flag, source and folder when the held-out data is missing, empty or
    too small."""
    common = dict(micro_batch_size=1, max_length=args.max_length, seed=args.seed, num_workers=args.num_workers,
                  show_progress=False)
    if args.val_dir is not None:
        flag = f"--val_dir {args.val_dir}"
    else:
        flag = f"--val_fraction {args.val_fraction}"
    folder = args.val_dir if args.val_dir is not None else args.data_dir
    try:
        sources = validation_sources(args, folder)
    except (OSError, ValueError) as e:
        raise type(e)(f"{flag}: {e}") from e
    wanted = math.ceil(math.ceil(args.eval_tokens / args.max_length) / len(sources))  # samples per source
    per_rank = math.ceil(wanted / world)
    samples = {}
    for name, files in sources.items():
        where = flag if files is None else f"{flag}, source {name!r}"
        if args.val_dir is not None:
            try:
                data = DataEngine(args.val_dir, args.tokenizer_path, world_size=1, rank=0, cache_dir=args.cache_dir,
                                  files=files, **common).load_data()
            except (OSError, ValueError) as e:
                raise type(e)(f"{where}: {e}") from e
            if data.num_samples < wanted:
                raise ValueError(f"{where} holds {data.num_samples} sample(s) of {args.max_length + 1} tokens, "
                                 f"fewer than the {wanted} that --eval_tokens {args.eval_tokens} asks for")
            indices = range(rank, wanted, world)
        else:
            try:
                data = DataEngine(args.data_dir, args.tokenizer_path, world_size=world, rank=rank,
                                  cache_dir=args.cache_dir, holdout=(args.val_fraction, True), files=files,
                                  **common).load_data()
            except (OSError, ValueError) as e:
                raise type(e)(f"{where}: held-out documents of {args.data_dir}: {e}") from e
            if data.num_samples < per_rank:
                raise ValueError(f"{where}: rank {rank}'s files hold {data.num_samples} held-out sample(s) of "
                                 f"{args.max_length + 1} tokens, fewer than the {per_rank} per rank that "
                                 f"--eval_tokens {args.eval_tokens} asks for (raise --val_fraction or lower "
                                 "--eval_tokens)")
            indices = range(per_rank)
        samples[name] = [data.sample_array(i) for i in indices]
    return Validation(samples, per_rank, device, args.document_mask, data.eos_id)
