"""Llama-style RMSNorm layers as one autograd node each, for CPU training.

The models' RMSNorm (`w * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)`) is eight small ops, and
autograd keeps their fp32 intermediates (an fp32 copy of the residual stream per norm) for the backward. This node
computes the same forward with the same ops (outputs equal bit for bit), keeps only the input and one scale per
token, and writes the backward by hand (`rstd * (g - n * mean(g * n))` with `n` the normalized input and `g` the
gradient reaching it). The gain is memory (7% of what a DPO micro-batch saves for the backward); in isolation a
norm's forward and backward take 0.9 ms instead of 1.9 ms on a thousand tokens, but no training step measured faster.

    fused = FusedRMSNorm(model)   # wraps every norm whose forward it reproduces exactly; `fused.wrapped` counts them
    fused.remove()                # the models' own forward again

Each norm class is checked once, on random inputs in fp32 and under bf16 autocast: a norm whose output differs in
any bit (Gemma's `1 + weight`, a norm with a bias, another epsilon placement) keeps its own forward, as does any
call where the norm's weight is trained or no gradient is needed.
"""

from __future__ import annotations

import types

import torch


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = x.to(torch.float32)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        # The gradient reaching the normalized input in its forward dtype, as autograd would round it, then in fp32
        g = (grad * weight).to(x.dtype).to(torch.float32, copy=True)
        n = x.to(torch.float32) * rstd
        dot = (g * n).mean(-1, keepdim=True)
        return g.sub_(n.mul_(dot)).mul_(rstd).to(x.dtype), None, None


def _epsilon(norm) -> float | None:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return eps if isinstance(eps, float) else None


def _same_forward(norm) -> bool:
    """Whether this node gives `norm`'s own output bit for bit, in fp32 and under bf16 autocast."""
    weight, eps = norm.weight, _epsilon(norm)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, weight.shape[0], generator=generator) * 3
    with torch.no_grad():
        for dtype, autocast in ((torch.float32, False), (torch.bfloat16, True)):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                own = norm._own_forward(x.to(dtype).to(weight.device))
                ours = _RMSNorm.apply(x.to(dtype).to(weight.device), weight, eps)
            if own.dtype != ours.dtype or not torch.equal(own, ours):
                return False
    return True


class FusedRMSNorm:
    def __init__(self, model):
        self.layers = []
        self.skipped: dict[str, str] = {}  # norm class -> why its forward stays
        checked: dict[type, bool] = {}
        for module in model.modules():
            kind = type(module)
            if not kind.__name__.endswith("RMSNorm") or hasattr(module, "_own_forward"):
                continue
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or _epsilon(module) is None:
                self.skipped[kind.__name__] = "no weight vector and epsilon"
                continue
            module._own_forward = module.forward
            if kind not in checked:
                checked[kind] = _same_forward(module)
                if not checked[kind]:
                    self.skipped[kind.__name__] = "its output differs from the fused node's"
            if checked[kind]:
                module.forward = types.MethodType(_forward, module)
                self.layers.append(module)
            else:
                del module._own_forward
        self.wrapped = len(self.layers)

    def remove(self):
        for module in self.layers:
            module.forward = module._own_forward
            del module._own_forward
        self.layers = []


def _forward(norm, x, *args, **kwargs):
    if args or kwargs or norm.weight.requires_grad or not (torch.is_grad_enabled() and x.requires_grad):
        return norm._own_forward(x, *args, **kwargs)
    return _RMSNorm.apply(x, norm.weight, _epsilon(norm))
