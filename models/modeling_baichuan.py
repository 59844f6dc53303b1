"""The baichuan-7B architecture: a LLaMA-style decoder with a fused ``W_pack`` QKV projection.

Parameter names match the released checkpoints (``model.layers.{i}.self_attn.W_pack.weight`` ...), so a
released ``pytorch_model.bin`` loads as it is. Kernels (flash-attn 2, PyTorch SDPA, eager; apex's fused
RMSNorm) are chosen in one place, ``ATTENTION_FUNCTIONS`` / ``select_attention``, from the tensors at hand,
never from ``self.training``: training and inference take the same path. transformers' ``attn_implementation``
(``from_pretrained(..., attn_implementation="eager")`` or ``model.set_attn_implementation``) forces one; by
default ("auto") flash-attn runs where it can, else SDPA. ``set_norm_backend`` forces the RMSNorm kernel.

Shapes: b = batch, s = query length, t = key length (cache included), h = hidden, n = heads, d = head size.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import logging

from .configuration_baichuan import BaiChuanConfig
from .kernels import linear_cross_entropy

try:  # optional CUDA kernels: absent on CPU machines, where the PyTorch paths below run
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:
    flash_attn_func = flash_attn_varlen_func = None
try:
    from apex.normalization.fused_layer_norm import fused_rms_norm_affine
except ImportError:
    fused_rms_norm_affine = None

logger = logging.get_logger(__name__)
_logged_backends = set()


def _log_backend_once(kind: str, name: str):
    if torch.compiler.is_compiling():
        return  # a logging call would split a torch.compile graph in two; eager calls log it
    if (kind, name) not in _logged_backends:
        _logged_backends.add((kind, name))
        logger.info("baichuan: %s backend = %s", kind, name)


# ----------------------------------------------------------------------------------------------------
# Kernels. Each attention function takes q, k, v as [b, n, s|t, d] and a boolean mask [b, 1, s, t]
# (True = may attend), a DocumentMask (packed documents, causal within each) or None for plain causal
# attention, and returns [b, n, s, d].
# ----------------------------------------------------------------------------------------------------

class DocumentMask:
    """Causal attention that stays inside each document of a packed row (no cache).

    ``ids`` [b, s]: the document index of every token, non-decreasing along a row (training/documents.py
    derives it from the EOS ids). SDPA and eager get it as a dense boolean mask; flash-attn as the
    variable-length layout (cumulative document lengths over the flattened batch), which skips the masked
    blocks instead of computing them.
    """

    def __init__(self, ids: torch.Tensor):
        self.ids = ids
        self._dense = None

    def dense(self) -> torch.Tensor:
        if self._dense is None:
            s = self.ids.shape[1]
            causal = torch.ones(s, s, dtype=torch.bool, device=self.ids.device).tril()  # [s, s]
            same = self.ids[:, :, None] == self.ids[:, None, :]  # [b, s, s]
            self._dense = (same & causal)[:, None]  # [b, 1, s, s]
        return self._dense

    def varlen(self):
        """(cu_seqlens int32 [documents + 1], longest document) over the row-major flattened batch."""
        b, s = self.ids.shape
        # A document starts where the id changes along a row, and at every row's first token.
        starts = torch.ones_like(self.ids, dtype=torch.bool)  # [b, s]
        starts[:, 1:] = self.ids[:, 1:] != self.ids[:, :-1]
        begin = starts.reshape(-1).nonzero().squeeze(1)  # [documents]
        cu = torch.cat([begin, begin.new_tensor([b * s])]).to(torch.int32)  # [documents + 1]
        return cu, int((cu[1:] - cu[:-1]).max())


def eager_attention(q, k, v, mask):
    s, t = q.shape[-2], k.shape[-2]
    if isinstance(mask, DocumentMask):
        mask = mask.dense()
    if mask is None:
        # Bottom-right aligned causal mask, so a query block after a cache sees the whole cache.
        mask = torch.ones(s, t, dtype=torch.bool, device=q.device).tril(diagonal=t - s)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [b, n, s, t]
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, v)  # [b, n, s, d]


def sdpa_attention(q, k, v, mask):
    s, t = q.shape[-2], k.shape[-2]
    if isinstance(mask, DocumentMask):
        mask = mask.dense()
    if mask is None and s != t and s > 1:
        # SDPA's is_causal aligns top-left; a multi-token block after a cache needs bottom-right.
        mask = torch.ones(s, t, dtype=torch.bool, device=q.device).tril(diagonal=t - s)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and s > 1)


def flash_attention(q, k, v, mask):
    if isinstance(mask, DocumentMask):
        b, n, s, d = q.shape
        cu, longest = mask.varlen()
        # [b, n, s, d] -> [b*s, n, d]: the documents laid end to end, as the variable-length kernel wants
        q, k, v = (x.transpose(1, 2).reshape(b * s, n, d) for x in (q, k, v))
        out = flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=True)  # [b*s, n, d]
        return out.view(b, s, n, d).transpose(1, 2)  # [b, n, s, d]
    assert mask is None, "flash_attention handles unpadded causal attention only"
    # flash-attn wants [b, s, n, d]; its causal mask is bottom-right aligned (flash-attn >= 2.1).
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)  # [b, s, n, d]
    return out.transpose(1, 2)  # [b, n, s, d]


ATTENTION_FUNCTIONS = {
    "flash_attention_2": flash_attention,
    "sdpa": sdpa_attention,
    "eager": eager_attention,
}
# The names transformers' attn_implementation may take here; "auto" (nothing requested) decides per call.
ATTENTION_BACKENDS = ("auto", *ATTENTION_FUNCTIONS)
NORM_BACKENDS = ("auto", "apex", "torch")


def select_attention(requested: str, q: torch.Tensor, mask: Optional[torch.Tensor]) -> str:
    """The one place an attention kernel is chosen, from the request and the tensors at hand."""
    flash_ok = (flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
                and (mask is None or isinstance(mask, DocumentMask)))
    if requested == "flash_attention_2":
        if flash_attn_func is None:
            raise RuntimeError("attn_implementation='flash_attention_2' was forced but flash_attn is not "
                               "importable (pip install -r requirements-gpu.txt)")
        if not flash_ok:
            # A padded batch or fp32/CPU tensors: flash-attn cannot run them; SDPA computes the same thing.
            _log_backend_once("attention", "sdpa (flash_attention_2 forced, but these inputs need a mask, "
                                           "CUDA and fp16/bf16)")
            return "sdpa"
        return requested
    if requested == "auto":
        return "flash_attention_2" if flash_ok else "sdpa"
    return requested


def rms_norm(x, weight, eps, backend):
    if backend in ("auto", "apex") and fused_rms_norm_affine is not None and x.is_cuda:
        _log_backend_once("rmsnorm", "apex")
        return fused_rms_norm_affine(x, weight, weight.shape, eps)
    if backend == "apex" and fused_rms_norm_affine is None:
        raise RuntimeError("the 'apex' RMSNorm backend was forced but apex is not importable")
    _log_backend_once("rmsnorm", "torch")
    input_dtype = x.dtype
    variance = x.float().pow(2).mean(-1, keepdim=True)  # in fp32: bf16 squares lose too much
    x = x.float() * torch.rsqrt(variance + eps)
    return weight * x.to(input_dtype)


# ----------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """``backend``: "auto" (apex's fused kernel on CUDA when importable, else PyTorch), "apex" or "torch"."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, backend: str = "auto"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.backend = backend

    def forward(self, x):
        return rms_norm(x, self.weight, self.variance_epsilon, self.backend)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding, rotate-half convention, base ``rope_theta``, with transformers' RoPE scaling.

    Holds no state: cos/sin are computed in fp32 from the positions at hand on every call (b x s x d values, no
    table). Nothing here reads a tensor back to the host, so a CUDA step never waits on it and torch.compile
    traces a whole layer as one graph. Released checkpoints carry ``rotary_emb.inv_freq``; it is a pure function
    of the sizes, so it is dropped on load.

    ``scaling`` = {"type", "factor"} (the config's ``rope_scaling``), as transformers' Llama computes it:
    linear divides the frequencies by the factor; dynamic NTK raises the base to
    ``base * (factor * L / max_pos - (factor - 1)) ** (d / (d - 2))`` for a call whose largest position is L - 1
    with L > max_pos. Unlike transformers, L is that of the call alone (transformers keeps the largest L it has
    seen), so the same tokens give the same numbers whatever ran before.
    """

    def __init__(self, dim: int, max_position_embeddings: int = 4096, base: float = 10000.0,
                 scaling: Optional[dict] = None):
        super().__init__()
        self.dim, self.base = dim, base
        self.max_position_embeddings = max_position_embeddings
        self.scaling_type = scaling["type"] if scaling else None
        self.factor = scaling["factor"] if scaling else 1.0

    def inv_freq(self, position_ids: torch.Tensor) -> torch.Tensor:
        exponents = torch.arange(0, self.dim, 2, dtype=torch.float32, device=position_ids.device) / self.dim  # [d/2]
        base = self.base
        if self.scaling_type == "dynamic":
            # A device tensor, not a Python number: reading the largest position back would sync the GPU.
            length = (position_ids.max() + 1).clamp(min=self.max_position_embeddings).float()
            base = base * (self.factor * length / self.max_position_embeddings - (self.factor - 1)) ** (
                self.dim / (self.dim - 2))
        inv_freq = 1.0 / (base ** exponents)  # [d/2]
        if self.scaling_type == "linear":
            inv_freq = inv_freq / self.factor
        return inv_freq

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        inv_freq = self.inv_freq(position_ids)  # [d/2]
        freqs = position_ids[..., None].float() * inv_freq  # [b, s, d/2], in fp32: bf16 positions lose integers
        emb = torch.cat((freqs, freqs), dim=-1)  # [b, s, d]
        # [b, s, d] -> [b, 1, s, d] to broadcast over heads
        return emb.cos().unsqueeze(1).to(dtype), emb.sin().unsqueeze(1).to(dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "inv_freq", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    def __init__(self, config: BaiChuanConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.hidden_size = config.hidden_size
        self.W_pack = nn.Linear(self.hidden_size, 3 * self.hidden_size, bias=False)  # q, k, v in that order
        self.o_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        self.rotary_emb = RotaryEmbedding(self.head_dim, config.max_position_embeddings, config.rope_theta,
                                          config.rope_scaling)

    def forward(self, x, position_ids, mask, past_key_value: Optional[Cache] = None):
        b, s, _ = x.shape
        qkv = self.W_pack(x).view(b, s, 3, self.num_heads, self.head_dim)  # [b, s, 3h] -> [b, s, 3, n, d]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [b, n, s, d]
        cos, sin = self.rotary_emb(position_ids, q.dtype)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_value is not None:
            k, v = past_key_value.update(k, v, self.layer_idx)  # [b, n, t, d]
        backend = select_attention(self.config._attn_implementation, q, mask)
        _log_backend_once("attention", backend)
        out = ATTENTION_FUNCTIONS[backend](q, k, v, mask)  # [b, n, s, d]
        out = out.transpose(1, 2).reshape(b, s, self.hidden_size)  # [b, n, s, d] -> [b, s, h]
        return self.o_proj(out)


class DecoderLayer(nn.Module):
    def __init__(self, config: BaiChuanConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, position_ids, mask, past_key_value=None):
        x = x + self.self_attn(self.input_layernorm(x), position_ids, mask, past_key_value)
        return x + self.mlp(self.post_attention_layernorm(x))


class BaiChuanPreTrainedModel(PreTrainedModel):
    config_class = BaiChuanConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _supports_cache_class = True
    _supports_sdpa = True
    _supports_flash_attn_2 = True
    # Released checkpoints carry the rotary inverse frequencies; they are recomputed from the sizes.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    def _check_and_adjust_attn_implementation(self, attn_implementation, is_init_check: bool = False) -> str:
        """transformers' ``attn_implementation`` mapped onto ATTENTION_FUNCTIONS; None (nothing asked) = "auto".

        Replaces transformers' check, which would turn None into "sdpa" and so rule out flash-attn by default.
        """
        requested = attn_implementation or "auto"
        if requested not in ATTENTION_BACKENDS:
            raise ValueError(f"attn_implementation must be one of {ATTENTION_BACKENDS}, got {requested!r}")
        if requested == "flash_attention_2" and flash_attn_func is None:
            raise RuntimeError("attn_implementation='flash_attention_2' was forced but flash_attn is not "
                               "importable (pip install -r requirements-gpu.txt)")
        return requested

    def set_norm_backend(self, backend: str):
        """Force the RMSNorm kernel of every norm: "auto", "apex" or "torch" (the reference for tests)."""
        if backend not in NORM_BACKENDS:
            raise ValueError(f"norm backend must be one of {NORM_BACKENDS}, got {backend!r}")
        if backend == "apex" and fused_rms_norm_affine is None:
            raise RuntimeError("the 'apex' RMSNorm backend was forced but apex is not importable")
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.backend = backend

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, checkpoint_every: int = 1):
        """Recompute activations in backward, in decoder layers i with i % checkpoint_every == 0 (1 = all).

        Layers always run torch.utils.checkpoint non-reentrant; ``gradient_checkpointing_kwargs`` is accepted
        for transformers' signature and must not ask for the reentrant variant.
        """
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be an integer >= 1, got {checkpoint_every!r}")
        if (gradient_checkpointing_kwargs or {}).get("use_reentrant", False):
            raise ValueError("BaiChuan checkpoints its layers non-reentrantly; use_reentrant=True is not supported")
        base = self.model if isinstance(self, BaiChuanForCausalLM) else self
        base.gradient_checkpointing = True
        base.checkpoint_every = checkpoint_every

    def gradient_checkpointing_disable(self):
        base = self.model if isinstance(self, BaiChuanForCausalLM) else self
        base.gradient_checkpointing = False

    def _init_weights(self, module):
        params = list(module.parameters(recurse=False))
        if any(hasattr(p, "ds_id") for p in params):
            # Built under deepspeed.zero.Init: each rank holds a slice. Gather, initialise on rank 0, re-slice.
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                self._init_module(module)
        else:
            self._init_module(module)

    def _init_module(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
        elif isinstance(module, RMSNorm):
            module.weight.data.fill_(1.0)

    @classmethod
    def from_pretrained(cls, *args, allow_missing_weights: bool = False, **kwargs):
        """As transformers', but weights missing from the checkpoint or of another shape are an error naming
        them, rather than a random initialisation or a message naming only the submodule."""
        want_info = kwargs.pop("output_loading_info", False)
        strict_shapes = not kwargs.get("ignore_mismatched_sizes", False)
        kwargs["ignore_mismatched_sizes"] = True  # so the loader reports every mismatch by full name
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        if info["mismatched_keys"] and strict_shapes:
            shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            detail = ", ".join(f"{k} (this config wants {shapes.get(k)})" for k in info["mismatched_keys"])
            raise ValueError(f"checkpoint {source} has weights of other shapes than this config: {detail}")
        missing = sorted(set(info["missing_keys"]) - set(info["mismatched_keys"]))
        if missing and not allow_missing_weights:
            raise ValueError(f"checkpoint {source} lacks weights {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                             f"({len(missing)} in all); pass allow_missing_weights=True to initialise them randomly")
        return (model, info) if want_info else model


def build_attention_mask(attention_mask: Optional[torch.Tensor], s: int, t: int) -> Optional[torch.Tensor]:
    """Boolean [b, 1, s, t] mask (True = may attend), or None when plain causal attention is exact.

    ``attention_mask`` is the tokenizer's [b, t] mask (1 = token, 0 = padding) over cache + new tokens.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    causal = torch.ones(s, t, dtype=torch.bool, device=attention_mask.device).tril(diagonal=t - s)  # [s, t]
    mask = causal[None, None] & attention_mask[:, None, None, :].bool()  # [b, 1, s, t]
    # A padding query attends to nothing, and a fully masked softmax row is NaN, which then leaks
    # through 0 * NaN in later layers. Letting every query see its own key keeps padding finite.
    diagonal = torch.ones(s, t, dtype=torch.bool, device=mask.device).tril(t - s).triu(t - s)  # [s, t]
    mask |= diagonal[None, None]
    return mask


class BaiChuanModel(BaiChuanPreTrainedModel):
    def __init__(self, config: BaiChuanConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.checkpoint_every = 1  # set by gradient_checkpointing_enable: layers i with i % checkpoint_every == 0
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, return_dict=None, cache_position=None, document_ids=None,
                **kwargs):
        """``document_ids`` [b, s] (training on packed rows, no cache, no padding): attention stays within each
        document; pass the matching ``position_ids`` (restarting at every document) with it."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # [b, s, h]
        b, s, _ = inputs_embeds.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False  # recomputation would append to the cache twice
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        elif isinstance(past_key_values, (tuple, list)):
            past_key_values = DynamicCache.from_legacy_cache(past_key_values)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past and self.config.rope_scaling_type == "dynamic" and past + s > self.config.max_position_embeddings:
            # The cached keys were rotated with the base of a shorter length; mixing them with this call's base
            # would give neither length's numbers.
            raise ValueError(
                f"dynamic RoPE scaling sets the rotary base from the sequence length, so keys cached at length "
                f"{past} cannot be reused past max_position_embeddings ({self.config.max_position_embeddings}); "
                "run the whole sequence in one call (use_cache=False when generating)")
        if attention_mask is not None and attention_mask.shape != (b, past + s):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(b, past + s)} "
                             "(cache length + new tokens)")
        if position_ids is None:
            if attention_mask is not None:
                # Left padding: positions count real tokens only, as in an unpadded sequence.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # [b, s]
            else:
                position_ids = torch.arange(past, past + s, device=inputs_embeds.device).expand(b, s)
        if document_ids is not None:
            if attention_mask is not None or past:
                raise ValueError("document_ids (packed documents) cannot be combined with padding or a cache")
            mask = DocumentMask(document_ids)
        else:
            mask = build_attention_mask(attention_mask, s, past + s)

        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and i % self.checkpoint_every == 0:
                x = checkpoint(layer, x, position_ids, mask, None, use_reentrant=False)
            else:
                x = layer(x, position_ids, mask, past_key_values)
        x = self.norm(x)
        return BaseModelOutputWithPast(last_hidden_state=x, past_key_values=past_key_values if use_cache else None)


def _chunk_loss_sum(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()  # [chunk, vocab], upcast so the softmax is exact in bf16 training
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


class BaiChuanForCausalLM(BaiChuanPreTrainedModel, GenerationMixin):
    # Tokens per chunk of the vocabulary projection in the loss (see loss); 0 = one piece. A run setting, not
    # architecture: train.py --loss_chunk_size sets it on the model.
    loss_chunk_size: int = 1024

    def __init__(self, config: BaiChuanConfig):
        super().__init__(config)
        self.model = BaiChuanModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_decoder(self):
        return self.model

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean next-token cross-entropy of ``hidden`` [b, s, h] against ``labels`` [b, s] (-100 ignored).

        With ``self.loss_chunk_size`` > 0 (the default) the vocabulary projection runs over chunks of that many tokens,
        gradients computed chunk by chunk (models/kernels.py), so the fp32 logits [b, s, vocab] (1 GiB per
        4096-token sequence at vocab 64000) never exist at once. The result and gradients equal the unchunked
        computation. ``logits`` [b, s, vocab], when the caller has them already, are used rather than recomputed.
        """
        labels = labels[:, 1:].to(hidden.device)  # [b, s-1]: position i predicts token i+1
        count = (labels != -100).sum()
        if logits is not None:
            # Shifting the labels (the last position predicts nothing) rather than the logits avoids a copy.
            labels = F.pad(labels, (0, 1), value=-100).reshape(-1)  # [b*s]
            total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels, ignore_index=-100,
                                    reduction="sum")
            return total / count.clamp(min=1)
        labels = labels.reshape(-1)  # [b*(s-1)]
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # [b*(s-1), h]
        chunk = self.loss_chunk_size
        if chunk <= 0:
            total = _chunk_loss_sum(self.lm_head, hidden, labels)
        elif not hasattr(self.lm_head.weight, "ds_id"):
            total = linear_cross_entropy(hidden, self.lm_head.weight, labels, chunk)
        else:
            # ZeRO-3 gathers lm_head.weight only inside lm_head's own forward, so the fused function cannot
            # see it: project chunk by chunk through the module and recompute each chunk in backward instead.
            total = sum(checkpoint(_chunk_loss_sum, self.lm_head, hidden[i:i + chunk], labels[i:i + chunk],
                                   use_reentrant=False)
                        for i in range(0, hidden.shape[0], chunk))
        # All labels ignored gives 0/0; return 0 with a graph so every rank can still call backward.
        return total / count.clamp(min=1)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, cache_position=None, logits_to_keep=0,
                return_logits=None, document_ids=None, **kwargs):
        """``logits_to_keep`` > 0 computes logits for the last that many positions only (generation and
        evaluation need the last one). With labels and a chunked loss, logits are returned only when
        ``return_logits=True``, as computing them is what chunking avoids."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         document_ids=document_ids)
        hidden = out.last_hidden_state  # [b, s, h]
        loss = logits = None
        chunked = labels is not None and self.loss_chunk_size > 0
        if return_logits or (return_logits is None and not chunked):
            keep = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
            logits = self.lm_head(keep)  # [b, s or logits_to_keep, vocab]
        if labels is not None:
            # Unchunked, the loss reuses the full logits rather than projecting the vocabulary a second time.
            loss = self.loss(hidden, labels, logits if logits is not None and not chunked and not logits_to_keep
                             else None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)


BaiChuanConfig.register_for_auto_class()
BaiChuanForCausalLM.register_for_auto_class("AutoModelForCausalLM")
