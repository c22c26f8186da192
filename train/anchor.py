"""Anchored training: TRL's SFT or DPO loss plus `anchor_weight` x KL(policy || base) on neutral replay text.

    trainer_cls = anchored_trainer_class(SFTTrainer, script_args)   # SFTTrainer itself when both options are off
    trainer = trainer_cls(model=..., callbacks=[..., *budget_callbacks(script_args, tokenizer)], ...)

`AnchorMixin` overrides `compute_loss`: TRL computes its loss (one forward through the DDP-wrapped model, as
always), then a small batch of neutral news paragraphs goes through the unwrapped model twice: under no_grad with
the LoRA adapter switched off (the base: no second copy of the model) and with it on. The per-token KL between the
two, averaged over the batch's tokens, is added to the loss. Both forwards reach the same parameters, whose
gradients autograd sums into one accumulator each before DDP's hooks fire, so DDP still reduces once per step.

The replay paragraphs come from the end of the reference file eval reads its drift text from the start of
(`train.forgetting_budget.replay_texts`), so the anchor never trains on what eval measures. The KL is logged as
`anchor_kl` with TRL's metrics (the logged `loss` includes the anchor term). With LoRA's B initialised to zero it
is exactly 0 at step 0. The budget's checks (`budget/*`) join the training logs of their step through `log`.
"""

import torch
from trl import DPOTrainer, SFTTrainer

from train.anchor_args import anchor_on, budget_on
from train.forgetting_budget import (
    REPLAY_MAX_TOKENS,
    ForgettingBudget,
    base_of,
    check_disjoint_from_eval,
    full_log_probs,
    padded,
    replay_texts,
    text_ids,
    token_kl,
)
from train.recipe import RecipeError


class AnchorMixin:
    """Adds the anchor to a TRL trainer's loss and the forgetting budget's checks to its logs (either may be off;
    `anchored_trainer_class` uses the plain trainer when both are).

    Put it before the TRL trainer in the bases; the constructor takes `anchor_args` (the recipe's AnchorArguments
    fields) on top of the trainer's own arguments.
    """

    def __init__(self, *args, anchor_args, **kwargs):
        super().__init__(*args, **kwargs)
        self.anchor_weight = float(anchor_args.anchor_weight)
        self.anchor_info = None
        if self.accelerator.distributed_type == "FSDP":
            raise RecipeError("anchor_weight / budget_max_*: their forwards run on the unwrapped model, which FSDP "
                             "shards; use DDP or DeepSpeed, or turn both off")
        base_of(self.model)  # refuses a model without a LoRA adapter before the run starts
        if self.anchor_weight > 0:
            check_disjoint_from_eval(anchor_args)  # replay text that eval also measures would hide drift
            texts, source = replay_texts(anchor_args.anchor_replay_texts)
            tokenizer = self.processing_class
            tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor carries its tokenizer
            self._replay_ids = text_ids(tokenizer, texts, REPLAY_MAX_TOKENS)
            self._replay_pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            self._replay_batch = min(anchor_args.anchor_batch_size, len(texts))
            self._replay_calls = 0
            self.anchor_info = {"weight": self.anchor_weight, "replay_texts": source,
                                "batch_size": self._replay_batch, "max_tokens": REPLAY_MAX_TOKENS, "kl": "per token, KL(policy || base), base = adapter off"}

    def _replay_batch_ids(self) -> list[list[int]]:
        """This rank's next replay paragraphs: ranks take different ones, and all cycle through the set."""
        n, size = len(self._replay_ids), self._replay_batch
        start = (self._replay_calls * self.accelerator.num_processes + self.accelerator.process_index) * size
        self._replay_calls += 1
        return [self._replay_ids[(start + i) % n] for i in range(size)]

    def anchor_kl(self, model) -> torch.Tensor:
        """Mean per-token KL(policy || base) on the next replay batch; differentiable in the adapter."""
        input_ids, mask = padded(self._replay_batch_ids(), self._replay_pad, next(model.parameters()).device)
        with torch.no_grad(), base_of(model):
            base_logp = full_log_probs(model, input_ids, mask)
        kl = token_kl(full_log_probs(model, input_ids, mask), base_logp)
        scored = mask[:, 1:].to(kl.dtype)
        return (kl * scored).sum() / scored.sum().clamp(min=1)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self.anchor_weight <= 0 or not self.model.training or not torch.is_grad_enabled():
            return out
        loss, outputs = out if return_outputs else (out, None)
        kl = self.anchor_kl(self.accelerator.unwrap_model(model))
        self._metrics["train"]["anchor_kl"].append(self.accelerator.gather(kl.detach()).mean().item())
        # Trainer divides the loss by the accumulation steps unless the loss says it is already scaled for them
        # (SFT with num_items_in_batch); the anchor is a per-micro-batch mean either way
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
                self.compute_loss_func is not None
        steps = self.current_gradient_accumulation_steps if scaled else 1
        loss = loss + self.anchor_weight * kl.to(loss.dtype) / steps
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if self.model.training:  # the budget's latest check goes with the training logs of its step
            for callback in self.callback_handler.callbacks:
                if isinstance(callback, ForgettingBudget):
                    logs.update(callback.pop_logs())
        super().log(logs, start_time)


class AnchoredSFTTrainer(AnchorMixin, SFTTrainer):
    """TRL's SFTTrainer with the anchor (`AnchorMixin`)."""


class AnchoredDPOTrainer(AnchorMixin, DPOTrainer):
    """TRL's DPOTrainer with the anchor (`AnchorMixin`): KL towards the base, not DPO's reference (the SFT adapter),
    since the base is what eval measures drift against."""


def anchored_trainer_class(base_cls, args):
    """The trainer to construct: `base_cls` itself when anchor and budget are off, else its anchored subclass
    with the recipe's AnchorArguments bound (called with the trainer's usual keyword arguments)."""
    import functools

    if not anchor_on(args) and not budget_on(args):
        return base_cls
    for anchored in (AnchoredSFTTrainer, AnchoredDPOTrainer):
        if base_cls in anchored.__bases__:
            return functools.partial(anchored, anchor_args=args)
    raise TypeError(f"anchor_weight / budget_max_*: no anchored trainer for {base_cls.__name__}")


def anchor_record(trainer) -> dict:
    """The manifest's keys for these options ({} when both are off): `run.manifest(..., **anchor_record(trainer))`."""
    out = {}
    if getattr(trainer, "anchor_info", None):
        out["anchor"] = trainer.anchor_info
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, ForgettingBudget):
            out["forgetting_budget"] = callback.record
    return out
