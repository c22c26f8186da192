"""Fast LoRA training on CPU with TRL's own trainers: config overrides chosen by the hardware, a cheaper LM head.

Measured on SmolLM2-135M-Instruct (2 cores, `scripts/bench_train.py`), TRL's defaults lose most of the time to:

- OpenMP threads spinning at barriers when the cores are shared (the default wait policy): every elementwise op
  waits for a descheduled thread. `OMP_WAIT_POLICY=PASSIVE` fixes it, but costs 15-20% on an idle CPU, so
  `set_cpu_thread_env()` sets it only when the CPU is busy with other work at start; it must run before torch is
  imported, so the training scripts call it first thing.
- TRL's fused LM head: on devices without Triton it scores *every* position (prompt and padding included) in
  32768-wide fp32 tiles, with about fifteen elementwise passes per tile, forward and backward. `use_label_only_lm_head`
  scores only the positions that carry a label, with one log-softmax, and fills the same output fields.
- glibc's allocator: tensors over 32 MiB (the LM head's logits) get fresh pages from the OS on every step, and
  each page is faulted in and zeroed again; `keep_freed_memory` keeps freed memory for reuse.
- DPO runs each pair's prompt through the model twice per forward, and pads both completions to the longest row;
  the label-only head computes each prompt once for both completions (`train.shared_prompt`).
- Padding: every padded position goes through every MLP. The label-only head runs the MLPs on real tokens only
  (`train.unpadded_mlp`; attention keeps the padded layout).
- Gradient checkpointing (TRL's default) re-runs the forward; a small model's activations fit in RAM.
- `bf16=True` on a CPU without AVX512-BF16/AMX: bf16 matmuls are emulated and run ~4x slower than fp32.
- LoRA dropout: PEFT draws a fresh mask for every adapted layer (210 with all-linear on SmolLM2-135M) every step,
  a quarter of the step. The quickstart recipe sets `lora_dropout: 0.0` (a recipe choice, so the same recipe trains
  the same way on a GPU); `scripts/bench_train.py` compares against TRL's 0.05.

Not used: `torch.compile` of the decoder layers (a DPO step took 7.25 s with and without it, after ~55 s of
compilation). `padding_free=True` (SFT). It trains on real tokens only, but packs the batch into one row, and SDPA on CPU
then attends over the whole row under a block-diagonal mask (8 x 135 tokens: 1080 x 1080 instead of 8 x 135 x 135,
~1 s more per step), which costs more than the padding it saves: 205 vs 256 tokens/s at batch 8 on 2 quiet cores.

Use (the training scripts):

    from train.cpu_speed import set_cpu_thread_env
    set_cpu_thread_env()                      # before torch is imported
    ...
    overrides = fast_cpu_overrides("sft")     # {} on GPU machines
    trainer = SFTTrainer(...)
    use_label_only_lm_head(trainer)           # no-op off CPU
    keep_freed_memory(trainer.args.device)    # no-op off CPU
"""

import contextlib
import functools
import logging
import os
import sys
import time
import types
from pathlib import Path

logger = logging.getLogger(__name__)

# CPU flags with native bf16 matmuls (AVX512-BF16 on Cooper Lake/Sapphire Rapids/Zen 4, AMX on Sapphire Rapids+)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# glibc mallopt() parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
# Logit transforms the label-only head does not reproduce: models with any of these keep TRL's head
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def cpu_busy_fraction(seconds: float = 0.25, stat: str | Path = "/proc/stat") -> float | None:
    """Fraction of this machine's CPU time spent by running work over the next `seconds` (None: no /proc/stat)."""

    def sample():
        fields = [int(x) for x in Path(stat).read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle  # guest time is already counted in user

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return 1 - (idle1 - idle0) / (total1 - total0)


def set_cpu_thread_env(busy_threshold: float = 0.25) -> str | None:
    """Choose how OpenMP threads wait at barriers, from how busy the CPU is now (unless the user chose a policy).

    With spinning threads (libgomp's default), a shared CPU makes each elementwise op wait for a descheduled thread:
    measured 15 ms instead of 0.5 ms for a 0.8M-element multiply, and a DPO step 2x slower under load. On an idle
    CPU, spinning is what keeps back-to-back ops fast: sleeping threads made the same DPO step 15-20% slower
    (6.9 s against 5.8 s). So: `OMP_WAIT_POLICY=PASSIVE` when other work already uses more than `busy_threshold`
    of the CPU when the run starts, libgomp's default otherwise. libgomp reads the policy once, when torch loads
    it, so this must run before `import torch`. Returns the policy set, or None when it left the default.
    """
    if "OMP_WAIT_POLICY" in os.environ:
        return os.environ["OMP_WAIT_POLICY"]
    if "torch" in sys.modules:
        logger.warning("set_cpu_thread_env() called after torch was imported: OMP_WAIT_POLICY has no effect now")
    busy = cpu_busy_fraction()
    if busy is not None and busy > busy_threshold:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        return "PASSIVE"
    return None


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


def keep_freed_memory(device) -> bool:
    """On CPU (`device`, a torch.device or its name), stop glibc handing large freed blocks back to the OS.

    Returns whether it applied.

    By default glibc serves allocations over 32 MiB with a fresh mmap and unmaps them on free, so every large
    tensor (the LM head's `tokens x vocabulary` logits, ~150 MiB for a DPO batch) is page-faulted in again on every
    step: ~0.6-0.9 million page faults per DPO step measured on SmolLM2-135M, and a log_softmax + exp over
    [778, 49152] took 189 ms instead of 74 ms. Raising the mmap and trim thresholds, with a single arena, keeps
    freed memory in the heap for reuse (what jemalloc/tcmalloc give PyTorch on CPU). The process keeps its peak
    memory until it exits.
    """
    import ctypes

    if str(device).split(":")[0] != "cpu" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return False
    # One arena: with per-thread arenas (capped at 64 MiB heaps) big blocks still came from mmap: 244k faults per
    # DPO step with the thresholds alone, ~40 with one arena too.
    settings = ((M_MMAP_THRESHOLD, 1 << 30), (M_TRIM_THRESHOLD, 1 << 30), (M_ARENA_MAX, 1))
    return all(libc.mallopt(param, value) for param, value in settings)


def _label_only_forward(model, outputs, shared_prompt, unpad_mlp):
    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    from train.shared_prompt import completion_hidden, pair_layout
    from train.unpadded_mlp import UnpaddedMLP

    previous_forward = model.forward
    unpad = UnpaddedMLP(model) if unpad_mlp else None
    # The shared-prompt path is compared once against the plain one, and dropped if they disagree
    state = {"shared_prompt": shared_prompt, "checked": not shared_prompt}

    def token_log_probs(hidden, target, full=True):
        """(logits, log-softmax or None, log-prob of each target); full=False skips the vocabulary-wide log-softmax."""
        lm_head = model.get_output_embeddings()
        logits = lm_head(hidden.to(lm_head.weight.device)).float()
        target = target.to(logits.device).unsqueeze(-1)
        if not full:  # one pass over the logits instead of writing a second tokens x vocabulary tensor
            return logits, None, logits.gather(-1, target).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        log_p = torch.log_softmax(logits, dim=-1)
        return logits, log_p, log_p.gather(-1, target).squeeze(-1)

    @functools.wraps(type(model).forward)  # `generate` checks its kwargs against the forward's signature
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            return previous_forward(
                *args, labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch, **kwargs
            )
        kwargs["use_cache"] = False
        layout = None
        checkpointing = self.is_activation_checkpointing  # recomputation would run outside the unpadded block
        # PEFT passes its optional arguments on as None
        plain_inputs = {k for k, v in kwargs.items() if v is not None} <= {"input_ids", "attention_mask", "use_cache"}
        if state["shared_prompt"] and not args and shift_labels is None and plain_inputs and not checkpointing:
            sliding = getattr(self.config, "sliding_window", None)
            if not (sliding and kwargs["input_ids"].shape[1] > sliding):
                layout = pair_layout(kwargs["input_ids"], kwargs.get("attention_mask"), labels)
        if shift_labels is None:
            shift_labels = labels[:, 1:]
            shifted = True
        else:
            shifted = False
        mask = shift_labels != -100
        if layout is not None:
            hidden, target = completion_hidden(self.base_model, kwargs["input_ids"], *layout, unpad=unpad)
            if not state["checked"]:
                state["checked"] = True
                with torch.no_grad():
                    plain = self.base_model(*args, **kwargs).last_hidden_state[:, :-1][mask]
                    diff = (token_log_probs(hidden, target)[2] - token_log_probs(plain, shift_labels[mask])[2]).abs().max()
                tolerance = 1e-3 if hidden.dtype == torch.float32 else 1e-1
                if not torch.equal(target, shift_labels[mask]) or not diff <= tolerance:
                    logger.warning(
                        "DPO shared-prompt forward disagrees with the plain forward on this model (max log-prob "
                        "difference %.3g): using the plain forward", float(diff),
                    )
                    state["shared_prompt"] = False
                    layout = None
                else:
                    logger.info("DPO shared-prompt forward checked against the plain one: max diff %.2g", float(diff))
        if layout is None:
            padding, ids = kwargs.get("attention_mask"), kwargs.get("input_ids")
            if checkpointing or padding is None or ids is None or padding.shape != ids.shape:
                padding = None  # packed rows (padding_free) carry no mask: nothing to skip
            with unpad.tokens(padding) if unpad else contextlib.nullcontext():
                hidden = self.base_model(*args, **kwargs).last_hidden_state
            if shifted:
                hidden = hidden[:, :-1]
            # Only labelled positions go through the head: with assistant-only loss and padding, about half of them
            hidden, target = hidden[mask], shift_labels[mask]
        mask = mask.to(model.get_output_embeddings().weight.device)
        # Metrics only, as in SFTTrainer and DPOTrainer; not for DPO's reference forward (no grad in training)
        metrics = torch.is_grad_enabled() or not self.training
        logits, log_p, token_log_p = token_log_probs(hidden, target, full=metrics)

        def spread(x):  # back to (batch, seq), zero on ignored positions, like TRL's head
            return x.new_zeros(mask.shape).masked_scatter(mask, x)

        fields = dict.fromkeys(("entropy", "log_sum_sq_probs", "mean_logits", "is_top1"))
        if metrics:
            with torch.no_grad():
                if "entropy" in outputs:
                    fields["entropy"] = spread(-(log_p.exp() * log_p).sum(-1))
                if "log_sum_sq_probs" in outputs:
                    fields["log_sum_sq_probs"] = spread(torch.logsumexp(2 * log_p, dim=-1))
                if "mean_logits" in outputs:
                    fields["mean_logits"] = spread(logits.mean(-1))
                if "is_top1" in outputs:  # argmax takes the first maximum, as TRL's head does
                    fields["is_top1"] = spread(logits.argmax(-1) == target.to(logits.device))
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


def use_label_only_lm_head(trainer, shared_prompt: bool | None = None, unpad_mlp: bool = True) -> bool:
    """On CPU, replace the fused LM head SFTTrainer/DPOTrainer installed with one that scores labelled positions only.

    Same outputs (per-token log-probs with gradient; entropy, token accuracy, mean logits for the logged metrics),
    same loss, a fraction of the work on CPU. It materialises the logits of the labelled tokens (batch tokens x
    vocabulary, fp32), which CPU batches afford; GPU runs keep TRL's tiled head. For DPOTrainer it also computes
    each pair's prompt once (`train.shared_prompt`; `shared_prompt=False` turns that off), checked against the plain
    forward on the first batch. The MLPs run on real tokens only (`train.unpadded_mlp`; `unpad_mlp=False` turns that
    off). Returns whether it patched.
    """
    from peft import PeftModel
    from trl import DPOTrainer

    if trainer.args.device.type != "cpu":
        return False
    if shared_prompt is None:
        shared_prompt = isinstance(trainer, DPOTrainer)
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
        model.forward = types.MethodType(_label_only_forward(model, outputs, shared_prompt, unpad_mlp), model)
        patched = True
    return patched
