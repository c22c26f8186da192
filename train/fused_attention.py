"""Eager attention as one autograd node, for CPU training.

transformers' eager attention repeats each key/value head for its group of query heads (a copy of both, and a sum
over the group in the backward), scales the scores in a separate op, and autograd keeps the fp32 softmax for the
backward. This node computes the same thing with each key/value head's query group stacked into one matmul (no
repeats), keeps only the probabilities in the compute dtype, and writes the softmax backward by hand: on SmolLM2's
shapes (9 query / 3 key-value heads, 169 tokens, batch 8) forward and backward took 4.8 ms a layer against 6.1 ms.

It is registered with transformers as an attention function (`NAME`) and a model switches to it only from `eager`
(`FusedAttention(model)`; `remove()` switches back). The masks stay eager's. A call keeps the model's own eager
attention when this node would not compute the same thing: dropout, logit soft-capping or attention sinks, attention
weights asked for, a mask per head, or no gradient needed (DPO's reference pass). The first call of each attention
class is also computed by the model's own eager function; if the outputs differ beyond bf16 rounding, that class
keeps its own attention for good (`checks` says so).
"""

from __future__ import annotations

import importlib
import logging

import torch

from train.token_log_probs import compute_dtype

logger = logging.getLogger(__name__)

NAME = "eager_fused_cpu"
TOLERANCE = 2**-7  # bf16's relative rounding, twice: the check's bound on |ours - eager| / max |eager|
_SEMANTIC_KWARGS = ("softcap", "s_aux", "sinks", "output_attentions")  # eager arguments this node does not compute


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, mask, scaling):
        # The matmuls in the compute dtype, as autocast runs eager's (a base in fp32 under bf16 autocast gives fp32
        # queries and keys from the rotary embedding and bf16 values)
        dtype = compute_dtype(query)
        b, heads, s, d = query.shape
        kv_heads, t = key.shape[1], key.shape[2]
        group = heads // kv_heads
        with torch.autocast(query.device.type, enabled=False):
            # query heads j*group .. j*group+group-1 share key/value head j
            q, k, v = query.reshape(b, kv_heads, group * s, d).to(dtype), key.to(dtype), value.to(dtype)
            scores = (q @ k.transpose(2, 3)) * scaling
            if mask is not None:
                scores = (scores.view(b, kv_heads, group, s, t) + mask[:, :, None]).view(b, kv_heads, group * s, t)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
            out = probs @ v  # [b, kv_heads, group * s, dv]
        ctx.save_for_backward(q, k, v, probs)
        ctx.scaling, ctx.query_shape = scaling, query.shape
        ctx.dtypes = query.dtype, key.dtype, value.dtype
        return out.view(b, heads, s, -1).transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx, grad):
        q, key, value, probs = ctx.saved_tensors
        b, heads, s, d = ctx.query_shape
        with torch.autocast(grad.device.type, enabled=False):
            grad = grad.transpose(1, 2).reshape(b, key.shape[1], -1, value.shape[-1]).to(value.dtype)
            d_value = probs.transpose(2, 3) @ grad
            d_probs = (grad @ value.transpose(2, 3)).float()
            d_scores = torch._softmax_backward_data(d_probs, probs.float(), -1, torch.float32)
            d_scores = (d_scores * ctx.scaling).to(q.dtype)
            d_query = (d_scores @ key).view(b, heads, s, d)
            d_key = d_scores.transpose(2, 3) @ q
        query_dtype, key_dtype, value_dtype = ctx.dtypes
        return d_query.to(query_dtype), d_key.to(key_dtype), d_value.to(value_dtype), None, None


def own_eager(module):
    """The eager attention function of `module`'s own modeling file, or None."""
    return getattr(importlib.import_module(type(module).__module__), "eager_attention_forward", None)


def _why_own(query, key, mask, dropout, kwargs) -> str | None:
    if dropout:
        return "dropout"
    if any(kwargs.get(name) is not None and kwargs.get(name) is not False for name in _SEMANTIC_KWARGS):
        return "soft-capping, sinks or attention weights"
    if not (torch.is_grad_enabled() and query.requires_grad):
        return "no gradient"
    if query.shape[1] % key.shape[1] or (mask is not None and (mask.dim() != 4 or mask.shape[1] != 1)):
        return "head layout or mask"
    return None


_checked: dict[type, bool] = {}
checks: dict[str, str] = {}  # attention class -> what its first call's comparison found


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature: (output [b, s, heads, d], weights or None)."""
    own = own_eager(module)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if _why_own(query, key, attention_mask, dropout, kwargs) or not _checked.get(type(module), True):
        return own(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    out = _Attention.apply(query, key, value, attention_mask, scaling)
    kind = type(module)
    if kind not in _checked:  # the first call: eager's own output, returned instead should the node disagree
        expected = own(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        with torch.no_grad():
            error = float((out.float() - expected[0].float()).abs().max()
                          / expected[0].float().abs().max().clamp_min(1e-30))
        _checked[kind] = error <= TOLERANCE
        checks[kind.__name__] = f"{'passed' if _checked[kind] else 'fell back'}: max difference {error:.1e} of the " \
                                f"largest output (tolerance {TOLERANCE:.1e})"
        if not _checked[kind]:
            logger.warning("fused_attention: %s differs from its own eager attention (%s); it keeps its own",
                           kind.__name__, checks[kind.__name__])
            return expected
    return out, None


def problem(model) -> str | None:
    """Why `model` cannot switch to this attention, or None."""
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation != "eager":
        return f"the model runs {implementation} attention (this replaces eager only)"
    if getattr(model.config, "output_attentions", False):
        # transformers returns the weights a config asks for only under eager itself: switched, they would vanish
        return "the model's config asks for attention weights (output_attentions)"
    modules = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "config")]
    if not modules:
        return "no attention modules found"
    missing = sorted({type(m).__name__ for m in modules if own_eager(m) is None})
    if missing:
        return f"no eager attention function beside {', '.join(missing)}"
    return None


class FusedAttention:
    """Switch `model` (eager attention) to this node; `checks` holds the first calls' comparisons once they ran."""

    def __init__(self, model):
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import eager_mask

        self.model = model
        _checked.clear()
        checks.clear()
        AttentionInterface.register(NAME, attention)
        AttentionMaskInterface.register(NAME, eager_mask)
        model.set_attn_implementation(NAME)
        if model.config._attn_implementation != NAME:  # transformers declines some classes with a warning only
            raise ValueError(f"{type(model).__name__} kept {model.config._attn_implementation} attention")

    @property
    def checks(self) -> dict[str, str]:
        """{"fused_attention": what the first call of each attention class found}, as the speed-up records show it."""
        if not checks:
            return {}
        failed = [name for name, result in checks.items() if result.startswith("fell back")]
        found = "; ".join(f"{name} {result}" for name, result in checks.items())
        return {"fused_attention": f"fell back ({found})" if failed else found}

    def remove(self):
        self.model.set_attn_implementation("eager")
