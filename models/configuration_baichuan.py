"""Configuration of the baichuan-7B architecture, with the released ``config.json`` field names.

Named presets live as JSON files in ``config/model/<name>.json`` (``7b``, ``tiny``, ...), so the same
file is what ``BaiChuanConfig.from_name`` reads, what ``train.py --model_config`` takes and what a
model folder's ``config.json`` looks like.
"""
import inspect
import json
from pathlib import Path

from transformers.configuration_utils import PretrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

# The presets sit beside the repository; an exported model folder has no config/ and does not need it.
PRESETS_DIR = Path(__file__).resolve().parents[1] / "config" / "model"

# Run settings that configs written by earlier versions carried; they now belong to the model object or to
# train.py (attn_implementation, set_norm_backend, loss_chunk_size, gradient_checkpointing_enable), so a file
# holding them still loads, without them.
RETIRED_FIELDS = ("attention_backend", "norm_backend", "loss_chunk_size")
# transformers' names: "linear" divides positions by the factor (Position Interpolation); "dynamic" (NTK-aware)
# raises the rotary base with the sequence length once it passes max_position_embeddings.
ROPE_SCALING_TYPES = ("linear", "dynamic")


def normalize_rope_scaling(rope_scaling):
    """``rope_scaling`` with transformers' field names, or None; ValueError naming what is wrong.

    transformers' LlamaConfig reads ``rope_type`` (``type`` is its older spelling); both are written, so the
    same dict configures a LlamaForCausalLM identically.
    """
    if rope_scaling is None:
        return None
    if not isinstance(rope_scaling, dict):
        raise ValueError(f"BaiChuanConfig: rope_scaling must be a dict like {{'type': 'linear', 'factor': 4.0}} "
                         f"or null, got {rope_scaling!r}")
    unknown = sorted(set(rope_scaling) - {"type", "rope_type", "factor"})
    if unknown:
        raise ValueError(f"BaiChuanConfig: rope_scaling has unsupported fields {unknown}; "
                         "only 'type' (or 'rope_type') and 'factor' are read")
    kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if "type" in rope_scaling and "rope_type" in rope_scaling and rope_scaling["type"] != rope_scaling["rope_type"]:
        raise ValueError(f"BaiChuanConfig: rope_scaling names two types, {rope_scaling['type']!r} and "
                         f"{rope_scaling['rope_type']!r}")
    if kind not in ROPE_SCALING_TYPES:
        raise ValueError(f"BaiChuanConfig: rope_scaling type must be one of {ROPE_SCALING_TYPES}, got {kind!r}")
    factor = rope_scaling.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 1.0:
        raise ValueError(f"BaiChuanConfig: rope_scaling factor must be a number >= 1, got {factor!r}")
    return {"type": kind, "rope_type": kind, "factor": float(factor)}


class BaiChuanConfig(PretrainedConfig):
    model_type = "baichuan"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=64000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        hidden_act="silu",
        max_position_embeddings=4096,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        use_cache=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        rope_scaling=None,
        **kwargs,
    ):
        retired = sorted(k for k in RETIRED_FIELDS if kwargs.pop(k, None) is not None)
        if retired:
            logger.warning("BaiChuanConfig: ignoring run settings %s from an older config (no longer part of the "
                           "model config)", ", ".join(retired))
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        # {"type": "linear" | "dynamic", "factor": f}, f relative to max_position_embeddings; None = plain RoPE.
        self.rope_scaling = normalize_rope_scaling(rope_scaling)
        self.use_cache = use_cache
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate()

    def validate(self):
        """Raise ValueError naming the field when sizes cannot make a model."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"BaiChuanConfig: {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"BaiChuanConfig: hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError(
                f"BaiChuanConfig: the head size hidden_size/num_attention_heads = "
                f"{self.hidden_size // self.num_attention_heads} must be even for rotary embeddings")
        if self.hidden_act != "silu":
            raise ValueError(f"BaiChuanConfig: hidden_act must be 'silu' (SwiGLU), got {self.hidden_act!r}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"BaiChuanConfig: rms_norm_eps must be positive, got {self.rms_norm_eps!r}")

    @property
    def rope_scaling_type(self):
        return self.rope_scaling["type"] if self.rope_scaling else None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @staticmethod
    def preset_names():
        return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))

    @classmethod
    def from_name(cls, name: str, **overrides) -> "BaiChuanConfig":
        """A named preset from config/model/<name>.json, or a config.json path / model folder."""
        path = Path(name)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            path = PRESETS_DIR / f"{name}.json"
        if not path.is_file():
            raise ValueError(
                f"unknown model config {name!r}: not a file or model folder, and not a preset "
                f"(known presets: {', '.join(cls.preset_names()) or 'none'}, in {PRESETS_DIR})")
        with open(path, encoding="utf-8") as f:
            try:
                fields = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"model config {path} is not valid JSON: {e}") from e
        # A typo in an override would otherwise become a silent extra attribute.
        known = (set(inspect.signature(cls.__init__).parameters) | set(PretrainedConfig().to_dict())
                 | {"attn_implementation"})
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"BaiChuanConfig.from_name({name!r}): unknown config fields {unknown}")
        fields.update(overrides)
        return cls(**fields)

    def num_parameters(self) -> int:
        """Trainable parameters, computed from the sizes (no model needed)."""
        h, i, v, n = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        per_layer = 4 * h * h + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + n * per_layer + h + head
