"""Fast LoRA training on CPU with TRL's own trainers: config overrides chosen by the hardware, and a cheaper LM head.

Measured on SmolLM2-135M-Instruct (2 cores, `scripts/bench_train.py`), TRL's defaults lose most of the time to:

- OpenMP threads spinning at barriers when the cores are shared (the default wait policy): every elementwise op
  waits for a descheduled thread. `OMP_WAIT_POLICY=PASSIVE` fixes it; it must be set before torch is imported, so
  the training scripts call `set_cpu_thread_env()` first thing.
- TRL's fused LM head: on devices without Triton it scores *every* position (prompt and padding included) in
  32768-wide fp32 tiles, with about fifteen elementwise passes per tile, forward and backward. `use_label_only_lm_head`
  scores only the positions that carry a label, with one log-softmax, and fills the same output fields.
- Gradient checkpointing (TRL's default) re-runs the forward; a small model's activations fit in RAM.
- `bf16=True` on a CPU without AVX512-BF16/AMX: bf16 matmuls are emulated and run ~4x slower than fp32.
- LoRA dropout: PEFT draws a fresh mask for every adapted layer (210 with all-linear on SmolLM2-135M) every step,
  a quarter of the step. The quickstart recipe sets `lora_dropout: 0.0` (a recipe choice, so the same recipe trains
  the same way on a GPU); `scripts/bench_train.py` compares against TRL's 0.05.

Not used: `padding_free=True` (SFT). It trains on real tokens only, but packs the batch into one row, and SDPA on CPU
then attends over the whole row under a block-diagonal mask (8 x 135 tokens: 1080 x 1080 instead of 8 x 135 x 135,
~1 s more per step), which costs more than the padding it saves: 205 vs 256 tokens/s at batch 8 on 2 quiet cores.

Use (the training scripts):

    from train.cpu_speed import set_cpu_thread_env
    set_cpu_thread_env()                      # before torch is imported
    ...
    overrides = fast_cpu_overrides("sft")     # {} on GPU machines
    trainer = SFTTrainer(...)
    use_label_only_lm_head(trainer)           # no-op off CPU
"""

import functools
import logging
import os
import sys
import types
from pathlib import Path

logger = logging.getLogger(__name__)

# CPU flags with native bf16 matmuls (AVX512-BF16 on Cooper Lake/Sapphire Rapids/Zen 4, AMX on Sapphire Rapids+)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# Logit transforms the label-only head does not reproduce: models with any of these keep TRL's head
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def set_cpu_thread_env() -> None:
    """Make OpenMP threads sleep rather than spin at barriers (unless the user chose a policy).

    With spinning threads, a shared CPU (other jobs, or more threads than free cores) makes each elementwise op wait
    for a descheduled thread: measured 15 ms instead of 0.5 ms for a 0.8M-element multiply. libgomp reads the
    policy once, when torch loads it, so this must run before `import torch`.
    """
    if "torch" in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
        logger.warning("set_cpu_thread_env() called after torch was imported: OMP_WAIT_POLICY has no effect now")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags of the first processor listed in `cpuinfo` (empty when the file is absent)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cpu_supports_bf16(flags: set[str] | None = None) -> bool:
    """Whether the CPU runs bf16 matmuls natively (else bf16 is emulated and slower than fp32)."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in BF16_CPU_FLAGS)


def fast_cpu_overrides(stage: str, flags: set[str] | None = None, accelerator: bool | None = None) -> dict:
    """SFTConfig/DPOConfig field values that make TRL fast on this CPU; `{}` when a GPU (or other accelerator) is present.

    `stage` is "sft" or "dpo". `flags` and `accelerator` default to this machine's (parameters for tests). Apply them
    as defaults that a recipe or the command line can still override (`parser.set_defaults(**overrides)`).
    """
    if stage not in ("sft", "dpo"):
        raise ValueError(f"stage must be 'sft' or 'dpo', got {stage!r}")
    if accelerator is None:
        import torch

        accelerator = torch.accelerator.is_available()
    if accelerator:
        return {}
    overrides = {
        # The old name on purpose: a recipe's `gradient_checkpointing` or `activation_checkpointing` still wins
        "gradient_checkpointing": False,
        "bf16": cpu_supports_bf16(flags),
        "use_cpu": True,  # transformers accepts bf16 on a machine without GPU only with use_cpu
        "dataloader_pin_memory": False,  # nothing to pin for on CPU
    }
    return overrides


def _label_only_forward(model, outputs):
    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    previous_forward = model.forward

    @functools.wraps(type(model).forward)  # `generate` checks its kwargs against the forward's signature
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            return previous_forward(
                *args, labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch, **kwargs
            )
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        lm_head = self.get_output_embeddings()
        labels = labels.to(lm_head.weight.device)
        mask = labels != -100
        target = labels[mask]
        # Only labelled positions go through the head: with assistant-only loss and padding, about half of them
        logits = lm_head(hidden.to(lm_head.weight.device)[mask]).float()
        log_p = torch.log_softmax(logits, dim=-1)
        token_log_p = log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1)

        def spread(x):  # back to (batch, seq), zero on ignored positions, like TRL's head
            return x.new_zeros(mask.shape).masked_scatter(mask, x)

        fields = dict.fromkeys(("entropy", "log_sum_sq_probs", "mean_logits", "is_top1"))
        with torch.no_grad():  # metrics only, as in SFTTrainer and DPOTrainer
            if "entropy" in outputs:
                fields["entropy"] = spread(-(log_p.exp() * log_p).sum(-1))
            if "log_sum_sq_probs" in outputs:
                fields["log_sum_sq_probs"] = spread(torch.logsumexp(2 * log_p, dim=-1))
            if "mean_logits" in outputs:
                fields["mean_logits"] = spread(logits.mean(-1))
            if "is_top1" in outputs:  # argmax takes the first maximum, as TRL's head does
                fields["is_top1"] = spread(logits.argmax(-1) == target)
        log_probs = spread(token_log_p)
        denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -token_log_p.sum() / denominator
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, label_mask=mask, **fields)

    return forward


def _patchable(model) -> str | None:
    """Why the label-only head cannot replace TRL's on `model`, or None when it can."""
    config = model.config
    if config.get_text_config() is not config:
        return "multimodal model"
    for name in _LOGIT_TRANSFORMS:
        if getattr(config, name, None) not in (None, 1.0):
            return f"the model scales its logits ({name})"
    if getattr(config, "output_router_logits", False):
        return "MoE router loss"
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        return "LM head with a bias"
    return None


def use_label_only_lm_head(trainer) -> bool:
    """On CPU, replace the fused LM head SFTTrainer/DPOTrainer installed with one that scores labelled positions only.

    Same outputs (per-token log-probs with gradient; entropy, token accuracy, mean logits for the logged metrics),
    same loss, a fraction of the work on CPU. It materialises the logits of the labelled tokens (batch tokens x
    vocabulary, fp32), which CPU batches afford; GPU runs keep TRL's tiled head. Returns whether it patched.
    """
    from peft import PeftModel

    if trainer.args.device.type != "cpu":
        return False
    models = [trainer.model, getattr(trainer, "ref_model", None)]
    patched = False
    for model in models:
        if model is None:
            continue
        model = trainer.accelerator.unwrap_model(model)
        if isinstance(model, PeftModel):
            model = model.get_base_model()
        reason = _patchable(model)
        if reason:
            logger.warning("Keeping TRL's LM head (%s): training runs slower on CPU", reason)
            continue
        outputs = ("entropy", "mean_logits", "is_top1")
        if getattr(trainer, "use_weighting", False):
            outputs += ("log_sum_sq_probs",)
        model.forward = types.MethodType(_label_only_forward(model, outputs), model)
        patched = True
    return patched
