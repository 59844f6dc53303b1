"""Held-out validation loss during training (``--val_dir`` or ``--val_fraction``, every ``--eval_every`` steps).

The held-out set is fixed for the whole run: ``ceil(eval_tokens / max_length)`` packed samples of
``max_length + 1`` tokens (each gives ``max_length`` predictions), read in stream order, never shuffled.

* ``--val_dir DIR``: a separate folder of text shards, tokenized and packed like the training data. Every rank
  reads the whole folder (it is small) and evaluates samples ``rank, rank + world, ...``, so the set does not
  depend on the world size.
* ``--val_fraction F``: documents of ``--data_dir`` chosen by a hash of their content (data_utils.is_held_out)
  are held out: the training stream skips them, and each rank's validation stream keeps only those of its own
  files. Each rank evaluates the first ``ceil(samples / world)`` samples of its stream.

Every rank runs the same number of forward passes (a rank with fewer real samples repeats one at weight 0), as
ZeRO-3 gathers parameters in collectives inside forward. Summed losses and prediction counts are all-reduced,
so ``val_loss`` is the mean over every held-out prediction. Evaluation reads no random numbers and touches
neither the optimizer nor the training data, so a run with it trains exactly as one without.
"""
import math
from typing import List

import numpy as np
import torch
import torch.distributed as dist

from data_utils import DataEngine
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
    """This rank's share of the fixed held-out samples, and the loss over all of them."""

    def __init__(self, samples: List[np.ndarray], per_rank: int, device, document_mask: bool, eos_id: int):
        if not samples:
            raise ValueError("validation needs at least one held-out sample on every rank")
        # Pad to per_rank forward passes with weight-0 repeats of a real sample.
        self.batches = [(torch.from_numpy(a)[None], 1.0) for a in samples]  # [1, max_length + 1] each
        self.batches += [(self.batches[0][0], 0.0)] * (per_rank - len(samples))
        self.device, self.document_mask, self.eos_id = device, document_mask, eos_id

    @torch.no_grad()
    def evaluate(self, engine) -> dict:
        """{"val_loss", "val_ppl", "val_tokens"} over every rank's samples; call on every rank."""
        was_training = engine.training
        engine.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # [summed loss, predictions]
        for batch, weight in self.batches:
            batch = batch.to(self.device)
            inputs = document_inputs(batch, self.eos_id) if self.document_mask else {"labels": batch}
            predictions = (inputs["labels"][:, 1:] != -100).sum()
            loss = engine(batch, **inputs).loss  # mean over this sample's predictions
            total += weight * torch.stack([loss.double() * predictions, predictions.double()])
        dist.all_reduce(total)
        if was_training:
            engine.train()
        loss = (total[0] / total[1]).item()
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_tokens": int(total[1].item())}


def build_validation(args, rank: int, world: int, device) -> Validation:
    """The Validation of `args` (``--val_dir`` or ``--val_fraction``) for this rank. Raises ValueError or
    OSError naming the flag and folder when the held-out data is missing, empty or too small."""
    wanted = math.ceil(args.eval_tokens / args.max_length)
    per_rank = math.ceil(wanted / world)
    common = dict(micro_batch_size=1, max_length=args.max_length, seed=args.seed, num_workers=args.num_workers,
                  show_progress=False)
    if args.val_dir is not None:
        flag = f"--val_dir {args.val_dir}"
        try:
            data = DataEngine(args.val_dir, args.tokenizer_path, world_size=1, rank=0, cache_dir=args.cache_dir,
                              **common).load_data()
        except (OSError, ValueError) as e:
            raise type(e)(f"{flag}: {e}") from e
        if data.num_samples < wanted:
            raise ValueError(f"{flag} holds {data.num_samples} sample(s) of {args.max_length + 1} tokens, fewer "
                             f"than the {wanted} that --eval_tokens {args.eval_tokens} asks for")
        indices = range(rank, wanted, world)
    else:
        flag = f"--val_fraction {args.val_fraction}"
        try:
            data = DataEngine(args.data_dir, args.tokenizer_path, world_size=world, rank=rank,
                              cache_dir=args.cache_dir, holdout=(args.val_fraction, True), **common).load_data()
        except (OSError, ValueError) as e:
            raise type(e)(f"{flag}: held-out documents of {args.data_dir}: {e}") from e
        if data.num_samples < per_rank:
            raise ValueError(f"{flag}: rank {rank}'s files hold {data.num_samples} held-out sample(s) of "
                             f"{args.max_length + 1} tokens, fewer than the {per_rank} per rank that --eval_tokens "
                             f"{args.eval_tokens} asks for (raise --val_fraction or lower --eval_tokens)")
        indices = range(per_rank)
    return Validation([data.sample_array(i) for i in indices], per_rank, device, args.document_mask, data.eos_id)
