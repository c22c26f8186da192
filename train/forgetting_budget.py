"""A forgetting budget that guards a LoRA run: drift from the base measured while training, against limits.

Every `budget_check_steps` optimizer steps (and before the first, where the base is also measured with the adapter
switched off) `ForgettingBudget` measures, on a small held-out set:

- mean per-token KL(tuned || base) on neutral news paragraphs (the per-text mean, averaged, as eval reports it);
- capability-probe accuracy: a probe is passed when the true sentence gets the higher mean per-token log-likelihood
  than the false one (as eval's probes suite scores it), reported as a drop in points against the base.

Past `budget_max_kl` or `budget_max_probe_drop`, `budget_action: stop` saves a checkpoint and ends training (the run
then finishes as usual: adapter, manifest), `warn` logs a warning and trains on. Every check goes to the trainer's
logs (`budget/kl`, `budget/probe_acc`) and the whole record to `<output_dir>/forgetting_budget.json`.

The held-out texts never meet eval's or the anchor's: eval reads the FIRST `reference_paragraphs` paragraphs of the
reference file, the budget the last `BUDGET_TEXTS` distinct ones, the anchor's replay the `anchor_replay_texts`
before those (`check_disjoint_from_eval` refuses an eval recipe that reads that far).
The probe set must share no sentence with the probe sets eval scores the run on.
"""

import json
import logging
import os
from pathlib import Path

import torch
from transformers import TrainerCallback

from train.anchor_args import budget_on
from train.assets import BUDGET_RECORD as RECORD
from train.assets import DEFAULT_PROBES, probe_path, reference_paragraphs
from train.recipe import RecipeError

logger = logging.getLogger(__name__)

BUDGET_TEXTS = 12  # held-out neutral paragraphs per check (two forwards each: a check costs a few steps on CPU)
MAX_TOKENS = 128  # each held-out paragraph cut to this many tokens (eval's reference_max_tokens default)
REPLAY_MAX_TOKENS = 64  # each replay paragraph: the anchor runs every micro-batch, so it is kept short
# eval's default (eval/config.py; train must not import eval, tests/test_anchor.py checks they agree)
EVAL_DEFAULT_REFERENCE_PARAGRAPHS = 60


def _distinct_paragraphs() -> list[str]:
    return list(dict.fromkeys(reference_paragraphs()))  # the file repeats a few paragraphs, some near its end


def held_out_texts() -> tuple[list[str], str]:
    paras = _distinct_paragraphs()
    return paras[-BUDGET_TEXTS:], f"lee_background.cor distinct paragraphs [{len(paras) - BUDGET_TEXTS}:{len(paras)}]"


def replay_texts(n: int) -> tuple[list[str], str]:
    """The anchor's replay paragraphs: the `n` before the budget's, so neither trains on what the other measures."""
    paras = _distinct_paragraphs()
    end = len(paras) - BUDGET_TEXTS
    if n > end:
        raise RecipeError(f"anchor_replay_texts: {n} is more than the {end} paragraphs left before the budget's")
    return paras[end - n:end], f"lee_background.cor distinct paragraphs [{end - n}:{end}]"


def check_disjoint_from_eval(args) -> None:
    """Refuse a budget probe set or texts that eval would score too (the budget would then train eval's test)."""
    import yaml

    probe_sets, eval_paragraphs, source = list(DEFAULT_PROBES), EVAL_DEFAULT_REFERENCE_PARAGRAPHS, "eval defaults"
    if args.budget_eval_recipe:
        recipe = yaml.safe_load(Path(args.budget_eval_recipe).read_text(encoding="utf-8")) or {}
        probe_sets = recipe.get("probe_sets", probe_sets)
        eval_paragraphs = recipe.get("reference_paragraphs", eval_paragraphs)
        source = args.budget_eval_recipe
    ours = {s for p in load_probes(args.budget_probe_set) for s in (_norm(p["text"]), _norm(p["false"]))}
    for name in probe_sets:
        shared = ours & {s for p in load_probes(name) for s in (_norm(p["text"]), _norm(p["false"]))}
        if shared:
            raise RecipeError(f"budget_probe_set: {args.budget_probe_set} shares {len(shared)} sentence(s) with eval's "
                             f"probe set {name} ({source}), e.g. {sorted(shared)[0]!r}; choose a set eval does not score")
    texts = set(held_out_texts()[0]) | (set(replay_texts(args.anchor_replay_texts)[0]) if args.anchor_weight > 0 else set())
    first_ours = min(i for i, p in enumerate(reference_paragraphs()) if p in texts)
    if eval_paragraphs > first_ours:
        raise RecipeError(f"{source}: reference_paragraphs {eval_paragraphs} reaches the anchor's or budget's texts "
                         f"(the first is paragraph {first_ours}); lower it or anchor_replay_texts")


def _norm(sentence: str) -> str:
    return " ".join(sentence.lower().split())


def load_probes(name: str) -> list[dict]:
    path = probe_path(name)
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON list of probe items")
    for i, item in enumerate(data):
        if not isinstance(item, dict) or not isinstance(item.get("text"), str) or not isinstance(item.get("false"), str):
            raise ValueError(f"{path}: item {i} needs string fields 'text' (true) and 'false'")
    return data


def text_ids(tokenizer, texts: list[str], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    """Token ids of plain texts, scored from the second token on (the first has no context), as eval does."""
    return [tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] for t in texts]


def padded(ids: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
    return input_ids.to(device), mask.to(device)


def full_log_probs(model, input_ids, attention_mask) -> torch.Tensor:
    """Next-token log-probs over the whole vocabulary, (batch, seq - 1, vocab), in fp32.

    A plain forward returns the full logits even with TRL's fused head or the label-only head installed (both act
    only on `fused_lm_head=True`); should a patched forward return anything else, the backbone and LM head are
    called directly.
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    logits = getattr(out, "logits", None)
    head = model.get_output_embeddings()
    if logits is None or tuple(logits.shape) != (*input_ids.shape, head.weight.shape[0]):
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        hidden = causal_lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        logits = head(hidden.last_hidden_state)
    return logits[:, :-1].float().log_softmax(-1)


def token_kl(policy_logp, base_logp) -> torch.Tensor:
    """Per-position KL(policy || base), (batch, seq - 1)."""
    return (policy_logp.exp() * (policy_logp - base_logp)).sum(-1)


def base_of(model):
    """The context in which `model` is the base: its LoRA adapter(s) switched off (no second copy)."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise RecipeError("anchor_weight / budget_max_*: need a LoRA adapter (use_peft: true, or DPO's sft_adapter), "
                         "whose base is the same model with the adapter switched off")
    return model.disable_adapter()


class ForgettingBudget(TrainerCallback):
    """Checks drift against the recipe's budget during training; `record` is what the manifest and the JSON hold."""

    def __init__(self, args, tokenizer, batch_size: int = 8):
        check_disjoint_from_eval(args)
        self.limits = {"max_kl": args.budget_max_kl, "max_probe_drop": args.budget_max_probe_drop}
        self.action, self.every, self.batch_size = args.budget_action, args.budget_check_steps, batch_size
        texts, texts_source = held_out_texts()
        probes = load_probes(args.budget_probe_set)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.text_ids = text_ids(tokenizer, texts)
        self.probe_ids = text_ids(tokenizer, [s for p in probes for s in (p["text"], p["false"])])
        self.record = {
            "limits": self.limits, "action": self.action, "check_steps": self.every,
            "held_out": {"texts": texts_source, "max_tokens": MAX_TOKENS, "probe_set": args.budget_probe_set,
                         "probes": len(probes)},
            "base": None, "checks": [], "exceeded_at_step": None, "stopped_at_step": None, "held": True,
        }
        self._pending: dict = {}
        self._stop_next = False

    # Measurement -----------------------------------------------------------------------------------------------

    def _batches(self, ids):
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # similar lengths together: little padding
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            yield idx, [ids[i] for i in idx]

    def _probe_accuracy(self, model, device) -> float:
        mean_lp = torch.zeros(len(self.probe_ids), dtype=torch.float64)
        for idx, batch in self._batches(self.probe_ids):
            input_ids, mask = padded(batch, self.pad_id, device)
            logp = full_log_probs(model, input_ids, mask).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
            scored = mask[:, 1:].float()
            mean_lp[idx] = ((logp * scored).sum(-1) / scored.sum(-1).clamp(min=1)).double().cpu()
        return float((mean_lp[0::2] > mean_lp[1::2]).double().mean())

    def _kl(self, model, device) -> float:
        per_text = []
        for _, batch in self._batches(self.text_ids):
            input_ids, mask = padded(batch, self.pad_id, device)
            with base_of(model):
                base_logp = full_log_probs(model, input_ids, mask)
            kl = token_kl(full_log_probs(model, input_ids, mask), base_logp)
            scored = mask[:, 1:].float()
            per_text += ((kl * scored).sum(-1) / scored.sum(-1).clamp(min=1)).tolist()
        return sum(per_text) / len(per_text)

    @torch.no_grad()
    def measure(self, model, base: bool = False) -> dict:
        """{"kl", "probe_acc"} of the tuned model, or the base's probe accuracy (`base=True`); same on every rank."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        try:
            if base:
                with base_of(model):
                    result = {"probe_acc": self._probe_accuracy(model, device)}
            else:
                result = {"kl": self._kl(model, device), "probe_acc": self._probe_accuracy(model, device)}
        finally:
            model.train(was_training)
        # Ranks hold the same weights, so they measure the same; rank 0's numbers make the stop decision identical
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            shared = [result]
            torch.distributed.broadcast_object_list(shared, src=0)
            result = shared[0]
        return result

    def _check(self, model, state, step: int) -> None:
        result = self.measure(model)
        drop = 100.0 * (self.record["base"]["probe_acc"] - result["probe_acc"])
        check = {"step": step, "kl": result["kl"], "probe_acc": result["probe_acc"], "probe_drop": drop}
        over = []
        if self.limits["max_kl"] is not None and result["kl"] > self.limits["max_kl"]:
            over.append(f"KL {result['kl']:.4f} > budget_max_kl {self.limits['max_kl']}")
        if self.limits["max_probe_drop"] is not None and drop > self.limits["max_probe_drop"]:
            over.append(f"probe drop {drop:.1f} points > budget_max_probe_drop {self.limits['max_probe_drop']}")
        check["exceeded"] = bool(over)
        self.record["checks"].append(check)
        self._pending.update({"budget/kl": result["kl"], "budget/probe_acc": result["probe_acc"],
                              "budget/probe_drop": drop})
        if over:
            self.record["held"] = False
            if self.record["exceeded_at_step"] is None:
                self.record["exceeded_at_step"] = step
            if self.action == "stop":
                self._stop_next = True
            if state.is_world_process_zero:
                what = "saving and stopping training" if self.action == "stop" else "training on (budget_action: warn)"
                logger.warning("FORGETTING BUDGET EXCEEDED at step %d: %s; %s", step, "; ".join(over), what)

    # Callback events -------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.every is None:
            self.every = args.logging_steps if args.logging_steps >= 1 else max(1, int(args.logging_steps * state.max_steps))
            self.record["check_steps"] = self.every
        self.output_dir = args.output_dir
        previous = Path(args.output_dir) / RECORD
        if state.global_step > 0 and previous.is_file():  # resumed: keep the checks made before the checkpoint
            old = json.loads(previous.read_text(encoding="utf-8"))
            self.record["checks"] = [c for c in old.get("checks", []) if c["step"] <= state.global_step]
            exceeded = [c["step"] for c in self.record["checks"] if c.get("exceeded")]
            self.record["exceeded_at_step"] = exceeded[0] if exceeded else None
            self.record["held"] = not exceeded
        self.record["base"] = self.measure(model, base=True)
        self._pending["budget/base_probe_acc"] = self.record["base"]["probe_acc"]
        if state.global_step == 0:
            self._check(model, state, 0)  # the stop, if any, takes effect after the first step: Trainer's loop
        self._write(state)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self._check(model, state, state.global_step)
            control.should_log = True  # the numbers reach the trainer's logs at this step (`AnchorMixin.log`)
            self._write(state)
        if self._stop_next:
            self._stop_next = False
            control.should_save = True
            control.should_training_stop = True
            self.record["stopped_at_step"] = state.global_step
            self._write(state)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending and logs is not None:  # a trainer without `AnchorMixin.log`: late for earlier callbacks
            logs.update(self.pop_logs())

    def pop_logs(self) -> dict:
        logs, self._pending = self._pending, {}
        return logs

    def _write(self, state) -> None:
        if not state.is_world_process_zero:
            return
        path = Path(self.output_dir) / RECORD
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.record, indent=2), encoding="utf-8")
        os.replace(tmp, path)  # atomic: a reader sees the previous record or this one


def budget_callbacks(args, tokenizer) -> list:
    """[ForgettingBudget] when the recipe sets a budget, else []: `callbacks=[..., *budget_callbacks(...)]`."""
    return [ForgettingBudget(args, tokenizer)] if budget_on(args) else []
