"""An LM head for SFTTrainer/DPOTrainer that scores only the positions that carry a label.

TRL's fused head on devices without Triton scores *every* position (prompt and padding included) in 32768-wide
fp32 tiles, with about fifteen elementwise passes per tile, forward and backward. This one scores the labelled
positions only, a chunk of tokens at a time (`train.token_log_probs`), and fills the same `FusedCausalLMOutput`
fields (loss, per-token log-probs, entropy, token accuracy, mean logits). Optional parts: DPO pairs' prompts
computed once (`train.shared_prompt`) and MLPs on real tokens only (`train.unpadded_mlp`).

It replaces the forward TRL installs (`add_fused_lm_head`), a TRL-private hook: `trl_hook_problem` says when the
installed TRL lacks it. Each path checks itself against the plain one on the first batch it handles (the padded
path against TRL's own head, the shared-prompt path against the padded forward) and falls back, with a warning,
when they disagree (with the recipe's `on`: raises instead).
"""

import contextlib
import functools
import logging
import types

logger = logging.getLogger(__name__)

TESTED_TRL = "1.16"  # the TRL minor version whose fused-head call and output this head reproduces
# FusedCausalLMOutput fields the head fills
FUSED_FIELDS = ("loss", "log_probs", "label_mask", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# Logit transforms the label-only head does not reproduce: models with any of these keep TRL's head
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def trl_hook_problem() -> tuple[str | None, str | None]:
    """(why the installed TRL cannot take this head, or None; a version warning, or None)."""
    import dataclasses

    import trl

    try:
        from trl.trainer.utils import FusedCausalLMOutput, add_fused_lm_head  # noqa: F401
    except ImportError:
        return f"TRL {trl.__version__} has no fused LM head (trl.trainer.utils.FusedCausalLMOutput)", None
    fields = {f.name for f in dataclasses.fields(FusedCausalLMOutput)}
    missing = [f for f in FUSED_FIELDS if f not in fields]
    if missing:
        return f"TRL {trl.__version__}'s FusedCausalLMOutput lacks {', '.join(missing)}", None
    version = ".".join(trl.__version__.split(".")[:2])
    if version != TESTED_TRL:
        return None, f"checked against TRL {TESTED_TRL}, installed {trl.__version__}"
    return None, None


def model_problem(model) -> str | None:
    """Why the label-only head cannot replace TRL's on `model` (the bare causal LM), or None when it can."""
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


def _tolerance(dtype, max_abs_logit: float) -> float:
    """The largest log-prob difference two correct computations of the same logits can show in `dtype`.

    A 16-bit float stores a logit z to within eps * |z| / 2 (bf16: eps = 2^-7). Two computations that each round the
    same logits (another tiling, another summation order) differ in a token's log-prob z_t - logsumexp(z) by at most
    2 * eps * max|z|: about 0.4 for bf16 logits near 25, 0.003 for fp16, 1e-5 for fp32. A wrong position, mask or
    layout moves log-probs by whole nats. 1e-3 is left for fp32's accumulation order.
    """
    import torch

    return 1e-3 + 2 * torch.finfo(dtype).eps * max_abs_logit


class LabelOnlyHead:
    """The replacement forward of one model (`install` binds it); it keeps what its self-checks found."""

    def __init__(self, model, outputs, shared_prompt=False, unpad_mlp=False, head_required=False,
                 prompt_required=False):
        from train.unpadded_mlp import UnpaddedMLP

        self.model, self.outputs = model, outputs
        self.head_required, self.prompt_required = head_required, prompt_required
        self.previous_forward = model.forward
        self.unpad = UnpaddedMLP(model) if unpad_mlp else None
        self.shared_prompt = shared_prompt
        self.active = True  # False after the padded path disagreed with TRL's head: TRL's head from then on
        # Each path is compared once against the plain one, and dropped if they disagree
        self.head_checked = False
        self.prompt_checked = not shared_prompt
        self.checks: dict[str, str] = {}

    def install(self):
        model = self.model

        @functools.wraps(type(model).forward)  # `generate` checks its kwargs against the forward's signature
        def forward(bound, *args, **kwargs):
            return self(bound, *args, **kwargs)

        model.forward = types.MethodType(forward, model)
        return self

    def token_log_probs(self, hidden, target, metrics=()):
        """(log-prob of each target, {metric: values}, largest |logit|): `train.token_log_probs` on this model's head."""
        from train.token_log_probs import token_log_probs

        weight = self.model.get_output_embeddings().weight
        return token_log_probs(hidden.to(weight.device), weight, target, metrics)

    def __call__(self, model, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                 **kwargs):
        if not fused_lm_head or not self.active:
            if fused_lm_head:
                kwargs["fused_lm_head"] = True
            return self.previous_forward(*args, labels=labels, shift_labels=shift_labels,
                                         num_items_in_batch=num_items_in_batch, **kwargs)
        plain_kwargs = dict(kwargs)
        out, padded = self._label_only(model, args, kwargs, labels, shift_labels, num_items_in_batch)
        if padded and not self.head_checked:
            self.head_checked = True
            if not self._check_against_trl(args, plain_kwargs, labels, shift_labels, num_items_in_batch, out):
                self.active = False
                return self.previous_forward(*args, fused_lm_head=True, labels=labels, shift_labels=shift_labels,
                                             num_items_in_batch=num_items_in_batch, **plain_kwargs)
        return out

    def _label_only(self, model, args, kwargs, labels, shift_labels, num_items_in_batch):
        """(FusedCausalLMOutput, whether the padded path computed it)."""
        import torch
        from trl.trainer.utils import FusedCausalLMOutput

        from train import shared_prompt
        from train.token_log_probs import compute_dtype

        kwargs["use_cache"] = False
        layout = None
        checkpointing = model.is_activation_checkpointing  # recomputation would run outside the unpadded block
        # PEFT passes its optional arguments on as None
        plain_inputs = {k for k, v in kwargs.items() if v is not None} <= {"input_ids", "attention_mask", "use_cache"}
        if self.shared_prompt and not args and shift_labels is None and plain_inputs and not checkpointing:
            sliding = getattr(model.config, "sliding_window", None)
            if not (sliding and kwargs["input_ids"].shape[1] > sliding):
                layout = shared_prompt.pair_layout(kwargs["input_ids"], kwargs.get("attention_mask"), labels)
        if shift_labels is None:
            shift_labels = labels[:, 1:]
            shifted = True
        else:
            shifted = False
        mask = shift_labels != -100
        if layout is not None:
            hidden, target = shared_prompt.completion_hidden(model.base_model, kwargs["input_ids"], *layout,
                                                             unpad=self.unpad)
            if not self.prompt_checked:
                self.prompt_checked = True
                with torch.no_grad():
                    plain = model.base_model(*args, **kwargs).last_hidden_state[:, :-1][mask]
                    shared_log_p, _, max_abs_logit = self.token_log_probs(hidden, target, ("max_abs_logit",))
                    diff = (shared_log_p - self.token_log_probs(plain, shift_labels[mask])[0]).abs().max()
                    bound = _tolerance(compute_dtype(hidden), max_abs_logit)
                if not torch.equal(target, shift_labels[mask]) or not diff <= bound:
                    message = (f"DPO shared-prompt forward disagrees with the plain forward on this model (max log-prob "
                               f"difference {float(diff):.3g}, bound {bound:.3g})")
                    if self.prompt_required:
                        raise RuntimeError(f"shared_prompt: on, but the {message[4:]}; set shared_prompt: auto or off")
                    logger.warning("%s: using the plain forward", message)
                    self.checks["shared_prompt"] = f"fell back: max log-prob difference {float(diff):.3g}"
                    self.shared_prompt = False
                    layout = None
                else:
                    logger.info("DPO shared-prompt forward checked against the plain one: max diff %.2g (bound %.2g)",
                                float(diff), bound)
                    self.checks["shared_prompt"] = f"checked: max log-prob difference {float(diff):.2g} (bound {bound:.2g})"
        if layout is None:
            padding, ids = kwargs.get("attention_mask"), kwargs.get("input_ids")
            if checkpointing or padding is None or ids is None or padding.shape != ids.shape:
                padding = None  # packed rows (padding_free) carry no mask: nothing to skip
            with self.unpad.tokens(padding) if self.unpad else contextlib.nullcontext():
                hidden = model.base_model(*args, **kwargs).last_hidden_state
            if shifted:
                hidden = hidden[:, :-1]
            # Only labelled positions go through the head: with assistant-only loss and padding, about half of them
            hidden, target = hidden[mask], shift_labels[mask]
        mask = mask.to(self.model.get_output_embeddings().weight.device)
        # Metrics only, as in SFTTrainer and DPOTrainer; not for DPO's reference forward (no grad in training)
        metrics = torch.is_grad_enabled() or not model.training
        wanted = list(self.outputs) if metrics else []
        if not self.head_checked:  # the first batch's largest logit sets its check's rounding bound
            wanted.append("max_abs_logit")
        token_log_p, values, self.max_abs_logit = self.token_log_probs(hidden, target, wanted)

        def spread(x):  # back to (batch, seq), zero on ignored positions, like TRL's head
            return x.new_zeros(mask.shape).masked_scatter(mask, x)

        fields = dict.fromkeys(("entropy", "log_sum_sq_probs", "mean_logits", "is_top1"))
        fields.update({name: spread(value) for name, value in values.items()})
        log_probs = spread(token_log_p)
        denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -token_log_p.sum() / denominator
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, label_mask=mask, **fields), layout is None

    def _check_against_trl(self, args, kwargs, labels, shift_labels, num_items_in_batch, out) -> bool:
        """Compare this batch's label-only output with TRL's own head; whether they agree."""
        import torch

        from train.token_log_probs import compute_dtype

        device = out.log_probs.device
        # The RNG is forked so that the extra forward leaves dropout masks (and so the losses) as they were
        rng = torch.random.fork_rng(devices=[]) if device.type == "cpu" else \
            torch.random.fork_rng(devices=[device], device_type=device.type)
        with rng, torch.no_grad():
            plain = self.previous_forward(*args, fused_lm_head=True, labels=labels, shift_labels=shift_labels,
                                          num_items_in_batch=num_items_in_batch, **kwargs)
        diff = float((out.log_probs.detach() - plain.log_probs.to(device)).abs().max()) if plain.log_probs.numel() else 0.0
        bound = _tolerance(compute_dtype(self.model.get_output_embeddings().weight), self.max_abs_logit)
        same_mask = torch.equal(out.label_mask.to(device), plain.label_mask.to(device))
        if same_mask and diff <= bound:
            logger.info("Label-only LM head checked against TRL's head on the first batch: max log-prob diff %.2g "
                        "(bound %.2g)", diff, bound)
            self.checks["label_only_head"] = f"checked: max log-prob difference {diff:.2g} (bound {bound:.2g}) against TRL's head"
            return True
        message = (f"label-only LM head disagrees with TRL's head on this model (max log-prob difference {diff:.3g}, "
                   f"bound {bound:.3g})")
        if self.head_required:
            raise RuntimeError(f"label_only_head: on, but the {message}; set label_only_head: auto or off")
        logger.warning("The %s: using TRL's head", message)
        self.checks["label_only_head"] = f"fell back to TRL's head: max log-prob difference {diff:.3g}"
        return False
