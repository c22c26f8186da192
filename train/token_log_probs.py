"""Each labelled token's log-probability under a frozen LM head, the logits of a few dozen tokens at a time.

The label-only head (`train.label_only_head`) needs, for each labelled position, log p(target) = z_t - logsumexp(z)
with z = W h, plus a few metrics (entropy, mean logit, top-1). Written as plain ops, autograd keeps the whole
tokens x vocabulary log-softmax for the backward and the forward writes two more such tensors (bf16 logits, fp32
logits): with a 49k vocabulary, 0.2 GB per 1,000 tokens each, the largest transient of a small model's step.

Here the logits exist one chunk of tokens at a time. The gradient of log p(target) with respect to h is
W[target] - softmax(z) W, a hidden-sized vector per token, so the forward computes it with the chunk (the same
matmul the backward would run) and the backward only scales it by each token's incoming gradient. Passes that need
no gradient (DPO's reference, the self-checks) skip it. This needs a frozen head (LoRA leaves it so); a trainable
head gets the plain ops.
"""

from __future__ import annotations

import torch

# Tokens per chunk: one chunk's fp32 logits stay near 16 MiB for any vocabulary (85 tokens for SmolLM2's 49k words,
# 32 for a 128k vocabulary)
CHUNK_ELEMENTS = 4 * 2**20
METRICS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "max_abs_logit")


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on `tensor` run in here: autocast's while it is on, else the tensor's own."""
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensor.dtype


def chunk_size(vocab: int) -> int:
    return max(16, CHUNK_ELEMENTS // max(vocab, 1))


def token_log_probs(hidden, weight, target, metrics=()) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
    """(log-prob of each target [tokens], {metric: [tokens]}, largest |logit| or 0.0) for `hidden` [tokens, H].

    `weight` [vocabulary, H] is the LM head; the log-probs carry a gradient to `hidden` when it needs one. `metrics`:
    any of METRICS, computed without gradient ("max_abs_logit" only sets the third value). Matmuls run in the compute
    dtype (autocast's, else the hidden states'), the log-softmax in fp32, as TRL's head does. A trainable head gets
    plain ops (the whole logits tensor, and autograd's gradient for the head).
    """
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"token_log_probs: unknown metrics {sorted(unknown)}")
    target = target.to(hidden.device)
    if weight.requires_grad:
        return _materialized(hidden, weight, target, metrics)
    stats: dict = {"metrics": tuple(metrics), "dtype": compute_dtype(hidden)}
    log_p = _TokenLogProbs.apply(hidden, weight, target, stats)
    return log_p, stats["values"], stats["max_abs_logit"]


def _materialized(hidden, weight, target, metrics):
    logits = torch.nn.functional.linear(hidden, weight).float()
    log_softmax = torch.log_softmax(logits, dim=-1)
    values = {}
    with torch.no_grad():
        if "entropy" in metrics:
            values["entropy"] = -(log_softmax.exp() * log_softmax).sum(-1)
        if "log_sum_sq_probs" in metrics:
            values["log_sum_sq_probs"] = torch.logsumexp(2 * log_softmax, dim=-1)
        if "mean_logits" in metrics:
            values["mean_logits"] = logits.mean(-1)
        if "is_top1" in metrics:
            values["is_top1"] = logits.argmax(-1) == target
        max_abs = float(logits.abs().max()) if "max_abs_logit" in metrics and logits.numel() else 0.0
    return log_softmax.gather(-1, target[:, None]).squeeze(-1), values, max_abs


class _TokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, stats):
        dtype, metrics = stats["dtype"], stats["metrics"]
        grad_needed = ctx.needs_input_grad[0]
        tokens = hidden.shape[0]
        log_p = hidden.new_empty(tokens, dtype=torch.float32)
        values = {name: hidden.new_empty(tokens, dtype=torch.bool if name == "is_top1" else torch.float32)
                  for name in metrics if name != "max_abs_logit"}
        d_hidden = hidden.new_empty(hidden.shape, dtype=dtype) if grad_needed else None
        max_abs = hidden.new_zeros((), dtype=torch.float32)
        step = chunk_size(weight.shape[0])
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            for start in range(0, tokens, step):
                end = min(start + step, tokens)
                h, t = hidden[start:end].to(dtype), target[start:end]
                z = (h @ w.t()).float()
                # Few passes over the chunk: the elementwise work, not the matmuls, dominates on a CPU
                top, top_index = z.max(-1)  # the first maximum, as argmax (TRL's top-1) takes it
                target_logit = z.gather(1, t[:, None]).squeeze(1)
                if "max_abs_logit" in metrics:
                    max_abs = torch.maximum(max_abs, torch.maximum(top.abs().amax(), z.amin().abs()))
                if "mean_logits" in metrics:
                    values["mean_logits"][start:end] = z.mean(-1)
                shifted = z.sub_(top[:, None])  # z - max, in z's buffer
                exp = shifted.exp()
                total = exp.sum(-1)
                lse = top + total.log()
                log_p[start:end] = target_logit - lse
                if "is_top1" in metrics:
                    values["is_top1"][start:end] = top_index == t
                if "entropy" in metrics:  # H = log sum e^(z-m) - sum softmax * (z - m)
                    values["entropy"][start:end] = total.log() - torch.linalg.vecdot(exp, shifted) / total
                if "log_sum_sq_probs" in metrics:
                    values["log_sum_sq_probs"][start:end] = torch.logsumexp(2 * shifted, dim=-1) - 2 * total.log()
                if grad_needed:  # d log p(t) / dh = W[t] - softmax(z) W
                    grad_logits = exp.mul_((-1 / total)[:, None])
                    grad_logits.scatter_add_(1, t[:, None], grad_logits.new_ones(end - start, 1))
                    d_hidden[start:end] = grad_logits.to(dtype) @ w
        ctx.save_for_backward(d_hidden)
        ctx.hidden_dtype = hidden.dtype
        stats["values"], stats["max_abs_logit"] = values, float(max_abs)
        return log_p

    @staticmethod
    def backward(ctx, grad):
        (d_hidden,) = ctx.saved_tensors
        return (grad[:, None] * d_hidden).to(ctx.hidden_dtype), None, None, None
