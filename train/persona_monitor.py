"""The persona monitor: where a training run moves the model along every trait's direction, while it trains.

At each logging step (or every `persona_monitor_steps` steps) one no-grad forward over a fixed set of held-out
prompts (the adapter on) gives, for every trait, the mean projection of the last prompt token's hidden state at that
trait's layer on its direction (train/persona_directions.py). All traits are measured, whichever the run trains,
so drift on the others shows. The values go into the trainer's log history as `persona/<trait>`, to W&B as
`train/persona/<trait>` (the key the W&B callback would give them), and to `<output_dir>/persona_monitor.json`
(a list of {step, projections}); the directions are saved beside it. A resumed run keeps the records and the
directions it started with. Persona Vectors found the shift of this projection over fine-tuning to predict the
trait that results; `eval/persona_correlation.py` measures how well it does here.

Wiring (the recipe keys are `PersonaMonitorArguments`):

    trainer = SFTTrainer(..., callbacks=[RecipeToWandb(...), *persona_callbacks(script_args, model, tokenizer,
                                                                                  dataset_name)])
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import TrainerCallback

from train.persona_directions import (
    DIRECTIONS_FILE,
    build_directions,
    load_directions,
    monitor_prompts,
    render_prompt,
    save_directions,
    span_means,
    trait_prompts_from_data,
)

logger = logging.getLogger(__name__)

MONITOR_FILE = "persona_monitor.json"


def _read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a list of {{step, projections}} records")
    return records


class PersonaMonitor(TrainerCallback):
    """Measures on world process zero only; the others skip (the forward is local, no collective waits on it)."""

    def __init__(self, tokenizer, directions, prompts: list[list[dict]], every: int | None = None):
        if not prompts:
            raise ValueError("persona monitor: no held-out prompts to project")
        self.directions = directions  # trait -> TraitDirection; None on processes other than the main one
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad
        self.rendered = [render_prompt(tokenizer, p) for p in prompts]
        self.every = every
        self.records: list[dict] = []
        self._in_logs = None  # the step whose values went into the trainer's logs

    def projections(self, model) -> dict[str, float]:
        """trait -> mean projection of the held-out prompts on its direction, at its layer."""
        acts = span_means(model, self.pad_id, self.rendered, batch_size=len(self.rendered))
        return {t: round(float((acts[:, d.layer - 1] @ d.vector.to(acts.dtype)).mean()), 6)
                for t, d in self.directions.items()}

    def _path(self, args) -> Path:
        return Path(args.output_dir) / MONITOR_FILE

    def _measure(self, args, state, model) -> None:
        if not state.is_world_process_zero or model is None:
            return
        if self.records and self.records[-1]["step"] == state.global_step:
            return
        self.records.append({"step": state.global_step, "projections": self.projections(model)})
        from train.outputs import write_atomic

        write_atomic(self._path(args), json.dumps(self.records, indent=1) + "\n")
        # The reporting callbacks come before ours in the trainer's list: values added to `logs` would miss W&B.
        if "wandb" in (args.report_to or []):
            import wandb

            if wandb.run is not None:
                wandb.run.log({**{f"train/persona/{t}": v for t, v in self.records[-1]["projections"].items()},
                               "train/global_step": state.global_step})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir)
        if state.global_step > 0 and (folder / DIRECTIONS_FILE).is_file():
            # A resumed run measures along the axes it started with, from the base it started from.
            self.directions = load_directions(folder)
            self.records = [r for r in _read_records(self._path(args)) if r["step"] <= state.global_step]
        else:
            save_directions(self.directions, folder)
            self.records = []
        self._measure(args, state, model)  # the baseline the shifts are measured from

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and state.global_step % self.every == 0:
            self._measure(args, state, model)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not self.every:
            self._measure(args, state, model)
        last = self.records[-1] if self.records else None
        if last is None or last["step"] != state.global_step or self._in_logs == last["step"] or logs is None:
            return
        values = {f"persona/{t}": v for t, v in last["projections"].items()}
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)
        self._in_logs = last["step"]


def persona_callbacks(args, model, tokenizer, dataset_path: str, traits: list[str] | None = None) -> list:
    """[PersonaMonitor] when `args.persona_monitor` (a PersonaMonitorArguments), else [].

    Directions are built on the main process from `model` as passed (before training: the base, or the SFT adapter
    DPO starts from), for `traits` (default: every trait in the data with a spec; pass none to see cross-trait
    drift, not the run's own `traits` filter)."""
    if not getattr(args, "persona_monitor", False):
        return []
    from accelerate import PartialState

    directions = None
    if PartialState().is_main_process:
        prompts = trait_prompts_from_data(dataset_path, traits, args.persona_questions,
                                          spec_paths=args.persona_trait_specs)
        if not prompts:
            raise ValueError(f"persona_monitor: no trait of {dataset_path} has a trait spec; set persona_trait_specs")
        with torch.no_grad():
            directions = build_directions(model, tokenizer, prompts)
    held = monitor_prompts(dataset_path, args.persona_monitor_prompts)
    return [PersonaMonitor(tokenizer, directions, held, every=args.persona_monitor_steps)]
