"""Training kernels written in plain PyTorch, each checked against the unfused computation in tests/test_kernels.py.

* ``linear_cross_entropy``: the vocabulary projection and the cross-entropy in one autograd function that
  walks the tokens in chunks and computes the gradients as it goes, so neither the ``[tokens, vocab]`` logits
  nor their fp32 copy ever exist whole, and nothing is recomputed in backward (the recipe of Liger kernels'
  fused linear cross-entropy, without Triton).
* ``compile_decoder_layers``: ``torch.compile`` on each decoder layer ("regional compilation"), which fuses
  RMSNorm, SwiGLU and rotary into a few kernels on any device PyTorch's inductor supports.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum over tokens of cross_entropy(hidden @ weight.T, labels), gradients computed in forward, chunk by chunk.

    hidden [N, h], weight [V, h], labels [N] (IGNORE_INDEX rows count nothing). The softmax of each chunk's
    logits runs in fp32, as the unfused path's upcast does; d(loss)/d(logits) = softmax - one_hot is then cast
    to the weight's dtype for the two gradient matmuls, which is what autograd does on the unfused path.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size):
        n = hidden.shape[0]
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        # Accumulated in the weight's dtype, as autograd accumulates per-chunk gradients: an fp32 accumulator
        # would add vocab x hidden x 4 bytes (1 GiB at 7B) just when activation memory peaks. The first chunk
        # writes it whole; zeros are needed only when there is no chunk at all.
        grad_weight = None
        if want_weight:
            grad_weight = torch.empty_like(weight) if n else torch.zeros_like(weight)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            h = hidden[start:start + chunk_size]  # [c, h]
            y = labels[start:start + chunk_size]  # [c]
            ignored = y == IGNORE_INDEX
            target = y.masked_fill(ignored, 0)[:, None]  # [c, 1]; any real index for ignored rows
            # fp32 log-probabilities straight from the (bf16) logits: no separate fp32 copy of the logits
            logp = torch.log_softmax(F.linear(h, weight), dim=-1, dtype=torch.float32)  # [c, V]
            total -= logp.gather(1, target).squeeze(1).masked_fill(ignored, 0).sum()
            if not (want_hidden or want_weight):
                continue
            probs = logp.exp_()  # in place: d(loss)/d(logits) = softmax - one_hot
            probs.scatter_add_(1, target, torch.full_like(target, -1, dtype=probs.dtype))
            g = probs.to(weight.dtype)  # [c, V]
            # Ignored rows pass no gradient. Zeroing them in the [c, h] tensors rather than in g saves a pass
            # over [c, V] and needs no host-side test of whether any row is ignored (a CUDA sync).
            if want_hidden:
                out = grad_hidden[start:start + chunk_size]
                torch.mm(g, weight, out=out)  # [c, h]
                out.masked_fill_(ignored[:, None], 0)
            if want_weight:
                h = h.masked_fill(ignored[:, None], 0)
                if start == 0:
                    torch.mm(g.t(), h, out=grad_weight)  # [V, h]
                else:
                    grad_weight.addmm_(g.t(), h)
        ctx.grads = (grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.grads
        del ctx.grads  # hand the buffers to autograd without a second reference
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_total.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_total.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_size: int) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=-100, reduction="sum")``, fp32,
    without materialising the logits: peak extra memory is one ``[chunk_size, vocab]`` block.

    hidden [N, h], weight [V, h] (an ``nn.Linear``'s weight, no bias), labels [N] of class ids or -100.
    Gradients are computed during forward: call backward on the result (or a function of it) once.
    """
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1] or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"linear_cross_entropy: expected hidden [N, h], weight [V, h], labels [N]; got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}")
    if chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be at least 1, got {chunk_size}")
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk_size)


def compile_decoder_layers(model: nn.Module, **compile_kwargs) -> int:
    """``torch.compile`` each decoder layer of a BaiChuanForCausalLM or LlamaForCausalLM in place.

    Compiling layer by layer rather than the whole model compiles one graph reused by every layer (all layers
    have the same shapes), keeps the Python loop, activation checkpointing and the loss outside the graph, and
    leaves parameter names unchanged for checkpoints and DeepSpeed. Returns the number of layers compiled.
    """
    layers: Optional[nn.ModuleList] = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"compile_decoder_layers: {type(model).__name__} has no model.layers")
    for layer in layers:
        layer.compile(**compile_kwargs)
    return len(layers)
