"""Run each decoder layer's MLP on the batch's real tokens only, skipping padding.

A padded batch spends the same FLOPs on padding as on tokens. Attention needs the padded `[batch, seq]`
layout, but the MLP (three quarters of a Llama-style layer's weights) works token by token, so it can run on
the real tokens gathered into one `[tokens, hidden]` matrix and scatter its output back. Real tokens get the
same values (padding never reaches them: attention masks it); padded positions get zeros instead of an MLP
output nobody reads. Used by the label-only LM head (`train.label_only_head`) only while the batch's mask is set:

    unpad = UnpaddedMLP(model)          # wraps model.get_decoder().layers[i].mlp; None-safe
    with unpad.tokens(attention_mask):  # [batch, seq] bool, True on real tokens
        hidden = model.get_decoder()(input_ids=..., attention_mask=...)
"""

from __future__ import annotations

import contextlib
import types


class UnpaddedMLP:
    def __init__(self, model):
        self.mask = self.rows = None
        self.wrapped = 0
        layers = getattr(model.get_decoder(), "layers", None) or []
        for layer in layers:
            mlp = getattr(layer, "mlp", None)
            if mlp is None or getattr(mlp, "_unpadded", False):
                continue
            mlp.forward = types.MethodType(self._forward(mlp.forward), mlp)
            mlp._unpadded = True
            self.wrapped += 1

    def _forward(self, previous):
        def forward(mlp, x, *args, **kwargs):
            mask, rows = self.mask, self.rows
            if rows is None or args or kwargs or x.dim() != 3 or mask.shape != x.shape[:2]:
                return previous(x, *args, **kwargs)
            out = previous(x.flatten(0, 1).index_select(0, rows))
            return out.new_zeros(mask.numel(), out.shape[-1]).index_copy(0, rows, out).view(*mask.shape, -1)

        return forward

    @contextlib.contextmanager
    def tokens(self, mask):
        """Within this block, MLP inputs shaped like `mask` run on the positions where it is True."""
        previous = self.mask, self.rows
        self.mask = mask.bool() if mask is not None else None
        # Row indices of the real tokens, found once per block rather than once per layer; None: nothing to skip
        self.rows = None if self.mask is None or self.mask.all() else self.mask.flatten().nonzero().squeeze(1)
        try:
            yield
        finally:
            self.mask, self.rows = previous
