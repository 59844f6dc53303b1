"""Which settings a resumed run may change: one table, stored with every checkpoint, checked on resume.

A checkpoint records the value of every setting that changes what is trained (client state ``run_settings``).
Resuming compares them with the current run's and refuses each difference by name, unless
``--allow_config_change NAME`` lists it (repeatable). NAME is a setting (``model.rope_theta``), a prefix of
settings (``model``, ``optimizer``, ``scheduler.params``) or a group (``data``: everything that decides which
tokens a step sees; ``--allow_data_change`` is the same as ``--allow_config_change data``).

Refused unless allowed (REFUSED below):
    model.<field>       every field of the model config (architecture only) except use_cache
    seed, max_length, global_batch_size, tokenizer, data_fingerprint          (group ``data``)
    optimizer.*, gradient_clipping, scheduler.*      (the resolved schedule: an "auto" length follows --max_steps)
    precision.bf16, precision.fp16, zero_stage
Free (never compared): world size (with the global batch unchanged), --max_steps, checkpoint and evaluation
settings, paths (the tokenizer and data are compared by content), kernels and memory savers
(--attention_backend, --gradient_checkpointing, --torch_compile, --loss_chunk_size), worker counts, timeouts.
"""
import hashlib
import inspect
from pathlib import Path
from typing import Dict, Iterable, List, Optional

# (name or prefix, group, why it is refused). A prefix covers every dotted setting under it.
REFUSED = (
    ("model", "model", "the architecture and its numerics; the checkpoint stores the config"),
    ("seed", "data", "seeds the data order (the weights come from the checkpoint)"),
    ("max_length", "data", "tokens per sequence: changes every batch"),
    ("global_batch_size", "data", "micro-batch x accumulation x world size: changes every step"),
    ("tokenizer", "data", "sha256 of the tokenizer file: the ids the model learned"),
    ("data_fingerprint", "data", "the data files and line rules the order was drawn from"),
    ("optimizer", "optimizer", "type and hyper-parameters of the DeepSpeed optimizer"),
    ("gradient_clipping", "optimizer", "the DeepSpeed config's gradient_clipping"),
    ("scheduler", "schedule", "the learning-rate schedule, with 'auto' lengths resolved"),
    ("precision", "precision", "bf16 / fp16 enabled"),
    ("zero_stage", "zero", "ZeRO stage: the optimizer state's layout"),
)
GROUPS = sorted({group for _, group, _ in REFUSED})
# Model config fields that do not change the function computed (kernels and the loss chunk are not config fields).
FREE_MODEL_FIELDS = ("use_cache",)


def tokenizer_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def model_fields(config) -> Dict[str, object]:
    """model.<field> for the config class's own arguments (not transformers' generic bookkeeping)."""
    names = [n for n in inspect.signature(type(config).__init__).parameters if n not in ("self", "kwargs")]
    return {f"model.{n}": getattr(config, n) for n in names if n not in FREE_MODEL_FIELDS}


def flatten(prefix: str, value) -> Dict[str, object]:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(flatten(f"{prefix}.{k}", v))
        return out
    return {prefix: list(value) if isinstance(value, tuple) else value}


def run_settings(config, ds_config: dict, seed: int, max_length: int, world_size: int, tokenizer_path,
                 data_fingerprint: Optional[str] = None) -> Dict[str, object]:
    """The current run's refused-unless-allowed settings, flat {name: value}, as stored in a checkpoint."""
    micro = ds_config.get("train_micro_batch_size_per_gpu", 1)
    gas = ds_config.get("gradient_accumulation_steps", 1)
    settings = dict(model_fields(config))
    settings.update(seed=seed, max_length=max_length, global_batch_size=micro * gas * world_size,
                    tokenizer=tokenizer_sha256(tokenizer_path), data_fingerprint=data_fingerprint,
                    gradient_clipping=ds_config.get("gradient_clipping", 0.0),
                    zero_stage=ds_config.get("zero_optimization", {}).get("stage", 0))
    settings.update(flatten("optimizer", ds_config.get("optimizer", {})))
    settings.update(flatten("scheduler", ds_config.get("scheduler", {})))
    for name in ("bf16", "fp16"):
        settings[f"precision.{name}"] = bool(ds_config.get(name, {}).get("enabled", False))
    return settings


def stored_settings(client_state: dict) -> Dict[str, object]:
    """The settings a checkpoint recorded; for one written before run_settings existed, its model config."""
    if client_state.get("run_settings"):
        return client_state["run_settings"]
    if client_state.get("model_config"):
        from models.configuration_baichuan import BaiChuanConfig

        return model_fields(BaiChuanConfig.from_dict(dict(client_state["model_config"])))
    return {}


def _covers(pattern: str, name: str) -> bool:
    return name == pattern or name.startswith(pattern + ".")


def check_allowed_names(allowed: Iterable[str]) -> List[str]:
    """Validate --allow_config_change values against the table; returns them."""
    allowed = list(allowed or [])
    roots = [row for row, _, _ in REFUSED]
    for name in allowed:
        if name not in GROUPS and not any(_covers(root, name) for root in roots):
            raise ValueError(f"--allow_config_change {name!r}: not a setting of the resume table; use a group "
                             f"({', '.join(GROUPS)}), a setting ({', '.join(roots)}) or a dotted field under one "
                             "(e.g. model.rope_theta)")
    return allowed


def _is_allowed(name: str, allowed: Iterable[str]) -> bool:
    group = next((g for root, g, _ in REFUSED if _covers(root, name)), None)
    return any(a == group or _covers(a, name) for a in allowed)


def compare_settings(stored: Dict[str, object], current: Dict[str, object], allowed: Iterable[str] = (),
                     where: str = "the checkpoint") -> List[str]:
    """Raise ValueError naming every refused difference between `stored` and `current`; return the allowed ones
    (for the log). A setting the checkpoint does not record is not compared."""
    allowed = check_allowed_names(allowed)
    diffs, let_through = [], []
    for name in sorted(set(stored) | set(current)):
        if name not in stored:  # a checkpoint from before this setting was recorded
            continue
        if stored.get(name) != current.get(name):
            line = f"{name}: checkpoint {stored.get(name)!r}, now {current.get(name)!r}"
            (let_through if _is_allowed(name, allowed) else diffs).append(line)
    if diffs:
        names = sorted({d.split(":")[0] for d in diffs})
        raise ValueError(f"resuming from {where} would change {len(diffs)} setting(s) that change what is trained: "
                         + "; ".join(diffs) + ". Restore them, or pass "
                         + " ".join(f"--allow_config_change {n}" for n in names)
                         + " to resume anyway (see docs/security.md)")
    return let_through
