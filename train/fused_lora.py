"""PEFT's LoRA linear layers as one autograd node each, for CPU training.

PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as separate ops: it casts each layer's input to the
adapter's fp32 (which autocast casts straight back to bf16), multiplies by `scaling` forward and backward, and
records five or six autograd nodes per layer, 210 layers deep in a small model. On a CPU that bookkeeping and those
casts cost more than the rank-16 matmuls themselves. This node computes the same thing in the compute dtype
(autocast's, else the input's), with `scaling` folded into B, and its own backward: gradients for the input and the
two LoRA matrices (fp32, like the parameters), none for the frozen base.

    fused = FusedLora(peft_model)   # wraps every plain LoRA Linear; `fused.wrapped` counts them
    fused.remove()                  # PEFT's forward again

A layer keeps PEFT's forward whenever this node would not compute the same thing: adapters disabled or merged
(DPO's reference pass), several active adapters, dropout, DoRA or other variants, a base layer other than
`nn.Linear` (quantized), `fan_in_fan_out`, or no gradient needed.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from train.token_log_probs import compute_dtype


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        dtype = compute_dtype(x)
        with torch.autocast("cpu", enabled=False):
            xc, w, a = x.to(dtype), weight.to(dtype), lora_a.to(dtype)
            b = (lora_b * scaling).to(dtype)
            xa = xc @ a.t()
            out = torch.nn.functional.linear(xc, w, None if bias is None else bias.to(dtype))
            out = out + xa @ b.t()
        ctx.save_for_backward(xc, xa, w, a, b)
        ctx.scaling, ctx.x_dtype = scaling, x.dtype
        ctx.ab_dtypes = (lora_a.dtype, lora_b.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        xc, xa, w, a, b = ctx.saved_tensors
        with torch.autocast("cpu", enabled=False):
            g = grad.to(w.dtype).reshape(-1, grad.shape[-1])
            g_xa = g @ b  # [tokens, r]
            grad_x = torch.addmm(g @ w, g_xa, a).view(*grad.shape[:-1], w.shape[1]).to(ctx.x_dtype)
            grad_a = (g_xa.t() @ xc.reshape(-1, xc.shape[-1])).to(ctx.ab_dtypes[0])
            grad_b = ((g.t() @ xa.reshape(-1, xa.shape[-1])) * ctx.scaling).to(ctx.ab_dtypes[1])
        return grad_x, None, None, grad_a, grad_b, None


def fusable(layer) -> str | None:
    """Why `layer` (a PEFT LoRA Linear) must keep PEFT's forward for good, or None."""
    if type(layer.get_base_layer()) is not nn.Linear:
        return f"base layer is {type(layer.get_base_layer()).__name__}"
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out"
    if getattr(layer, "lora_variant", None):
        return "a LoRA variant (DoRA, ...)"
    if not all(isinstance(dropout, nn.Identity) for dropout in layer.lora_dropout.values()):
        return "LoRA dropout"
    return None


class FusedLora:
    def __init__(self, model):
        from peft.tuners.lora.layer import Linear as LoraLinear

        self.layers = []
        for module in model.modules():
            if type(module) is LoraLinear and fusable(module) is None and not hasattr(module, "_peft_forward"):
                module._peft_forward = module.forward
                module.forward = types.MethodType(_forward, module)
                self.layers.append(module)
        self.wrapped = len(self.layers)

    def remove(self):
        for module in self.layers:
            module.forward = module._peft_forward
            del module._peft_forward
        self.layers = []


def _forward(layer, x, *args, **kwargs):
    adapters = layer.active_adapters
    name = adapters[0] if len(adapters) == 1 else None
    if (args or kwargs or name is None or layer.disable_adapters or layer.merged or name not in layer.lora_A
            or fusable(layer) is not None or not torch.is_grad_enabled() or layer.get_base_layer().weight.requires_grad):
        return layer._peft_forward(x, *args, **kwargs)
    base = layer.get_base_layer()
    return _LoraLinear.apply(x, base.weight, base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight,
                             layer.scaling[name])
