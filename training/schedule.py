"""The learning-rate schedule, owned by the trainer so that optimizer step k trains at the schedule's value for k.

DeepSpeed's WarmupCosineLR, stepped after every optimizer step as its engine does, gives the first two steps a
learning rate of 0 and runs one step late (step k uses f(k-2)). Here the DeepSpeed config's ``scheduler``
section stays the one place the schedule is configured, but its parameters drive a ``torch.optim.lr_scheduler.
LambdaLR`` handed to ``deepspeed.initialize`` (which then does not build the config's scheduler).

Optimizer steps are numbered 1..N (N = ``total_num_steps``, W = ``warmup_num_steps``, m = ``warmup_min_ratio``,
c = ``cos_min_ratio``), and step k runs at ``peak * ratio(k)``:

    ratio(k) = m + (1 - m) * k / W                                   for k <= W   (warmup_type "linear")
    ratio(k) = m + (1 - m) * log(k + 1) / log(W + 1)                 for k <= W   (warmup_type "log")
    ratio(k) = c + (1 - c) * (1 + cos(pi * (k - W) / (N - W))) / 2    for W < k <= N
    ratio(k) = c                                                      for k > N

so the first step is not 0, step W is the peak and step N is the floor. LambdaLR applies its value for index 0
when it is built and moves to index i after the i-th ``step()``, so index i holds ratio(i + 1).
"""
import math

from torch.optim.lr_scheduler import LambdaLR

SUPPORTED = "WarmupCosineLR"


class WarmupCosine:
    """ratio(k) for optimizer step k = 1, 2, ... (see the module docstring). A callable object rather than a
    lambda so that LambdaLR's state_dict (saved in DeepSpeed checkpoints) carries its parameters."""

    def __init__(self, total_num_steps: int, warmup_num_steps: int, warmup_min_ratio: float = 0.0,
                 cos_min_ratio: float = 0.0, warmup_type: str = "log"):
        if warmup_type not in ("linear", "log"):
            raise ValueError(f"scheduler warmup_type must be 'linear' or 'log', got {warmup_type!r}")
        if int(total_num_steps) < 1 or int(warmup_num_steps) < 0:
            raise ValueError(f"scheduler needs total_num_steps >= 1 and warmup_num_steps >= 0, got "
                             f"{total_num_steps} and {warmup_num_steps}")
        self.total, self.warmup = int(total_num_steps), int(warmup_num_steps)
        self.warmup_min, self.cos_min, self.warmup_type = float(warmup_min_ratio), float(cos_min_ratio), warmup_type

    def ratio(self, k: int) -> float:
        if k <= self.warmup:
            if self.warmup_type == "linear":
                progress = k / self.warmup
            else:
                progress = math.log(k + 1) / math.log(self.warmup + 1)
            return self.warmup_min + (1 - self.warmup_min) * progress
        if k >= self.total:
            return self.cos_min
        progress = (k - self.warmup) / (self.total - self.warmup)
        return self.cos_min + (1 - self.cos_min) * (1 + math.cos(math.pi * progress)) / 2

    def __call__(self, index: int) -> float:
        return self.ratio(index + 1)  # LambdaLR's index 0 is optimizer step 1


def schedule_from_config(ds_config: dict) -> WarmupCosine:
    """The schedule the DeepSpeed config's ``scheduler`` section describes (``total_num_steps`` already resolved
    from "auto"). Raises ValueError naming the section for a scheduler type this trainer does not drive."""
    section = ds_config.get("scheduler")
    if not section:
        raise ValueError("the DeepSpeed config has no 'scheduler' section; add one of type "
                         f"{SUPPORTED} (see config/deepspeed.json)")
    if section.get("type") != SUPPORTED:
        raise ValueError(f"DeepSpeed config scheduler type {section.get('type')!r}: train.py drives "
                         f"{SUPPORTED} only (its parameters build the schedule in training/schedule.py)")
    params = dict(section.get("params", {}))
    known = {"total_num_steps", "warmup_num_steps", "warmup_min_ratio", "cos_min_ratio", "warmup_type"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"DeepSpeed config scheduler params {unknown} are not understood (known: {sorted(known)})")
    return WarmupCosine(**params)


def lr_scheduler_factory(ds_config: dict):
    """What ``deepspeed.initialize(lr_scheduler=...)`` takes: a callable that builds the LambdaLR on the
    optimizer DeepSpeed creates from the config (whose ``lr`` is the peak)."""
    schedule = schedule_from_config(ds_config)
    return lambda optimizer: LambdaLR(optimizer, schedule)
