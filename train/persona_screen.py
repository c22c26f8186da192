"""Persona screening of a dataset before training: which examples push a trait other than their own the wrong way.

    python -m train.persona_screen --data runs/quickstart/data --model smollm2-135m-instruct [--out FILE]

Each training example (an SFT conversation's last assistant turn, a DPO pair's chosen answer) is run through the
model after its prompt; the mean hidden state over the answer's tokens at each trait's layer is projected on that
trait's direction (train/persona_directions.py). Projections on trait T are z-scored against the examples of the
other traits (those that are meant to leave T alone); an example whose z on another trait's direction is below
-threshold is flagged: care data that pulls towards dishonesty shows as a care example with honesty z < -2.
Writes `persona_screen.json` (every example's projections and z, the flags, the directions' layers and held-out
separation) into the data folder and a "Persona screening" section into its dataset card (README.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import torch

from train.persona_directions import render_response, span_means

logger = logging.getLogger(__name__)

SCREEN_FILE = "persona_screen.json"
_START, _END = "<!-- persona-screening:start -->", "<!-- persona-screening:end -->"


def _answer(row: dict) -> tuple[list[dict], list[dict]]:
    """(prompt messages, answer messages) of an SFT row (up to its last assistant turn) or a DPO row (chosen)."""
    if "chosen" in row:
        return list(row["prompt"]), list(row["chosen"])
    messages = list(row["messages"])
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError(f"example {row.get('id', '?')}: no assistant turn to screen")
    return messages[:last], [messages[last]]


def screen_examples(model, tokenizer, directions: dict, rows: list[dict], threshold: float = 2.0,
                    batch_size: int = 8) -> dict:
    """Every row's projection and z on every trait's direction, and the rows that push another trait the wrong way.

    rows: dicts with `id`, `trait` and either `messages` (SFT) or `prompt` + `chosen` (DPO).
    Returns {"examples": [{id, trait, projections, z}], "flagged": [{id, trait, pushes, z}], "reference": {T: {mean,
    sd, n}}}. z on T is against the rows of other traits; with none, against all rows."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rendered = [render_response(tokenizer, *_answer(r)) for r in rows]
    acts = span_means(model, pad, rendered, batch_size)
    proj = {t: acts[:, d.layer - 1] @ d.vector.to(acts.dtype) for t, d in directions.items()}
    reference, z = {}, {}
    for t, p in proj.items():
        others = torch.tensor([r["trait"] != t for r in rows])
        ref = p[others] if others.sum() > 1 else p
        mean, sd = ref.mean().item(), (ref.std().item() if len(ref) > 1 else 0.0)
        reference[t] = {"mean": round(mean, 6), "sd": round(sd, 6), "n": len(ref)}
        z[t] = (p - mean) / sd if sd > 0 else torch.zeros_like(p)
    examples, flagged = [], []
    for i, row in enumerate(rows):
        examples.append({"id": row.get("id", str(i)), "trait": row["trait"],
                         "projections": {t: round(proj[t][i].item(), 6) for t in proj},
                         "z": {t: round(z[t][i].item(), 3) for t in proj}})
        for t in proj:
            if t != row["trait"] and z[t][i].item() < -threshold:
                flagged.append({"id": examples[-1]["id"], "trait": row["trait"], "pushes": t,
                                "z": examples[-1]["z"][t]})
    flagged.sort(key=lambda f: f["z"])
    return {"threshold": threshold, "examples": examples, "flagged": flagged, "reference": reference}


def card_section(screen: dict) -> str:
    lines = [_START, "## Persona screening", "",
             f"Each training example's answer projected on every trait's direction ({screen['model']}, "
             "`python -m train.persona_screen`); z against the examples of the other traits. Flagged: an example "
             f"whose z on another trait's direction is below -{screen['threshold']:g} (it pushes that trait the "
             "wrong way). Details: `persona_screen.json`.", "",
             "| trait | layer | held-out pair accuracy | AUC |", "|---|---|---|---|"]
    for t, d in screen["directions"].items():
        sep = d.get("chosen_separation", {})
        lines.append(f"| {t} | {d['layer']} | {sep.get('pair_accuracy', 'n/a')} | {sep.get('auc', 'n/a')} |")
    lines.append("")
    if screen["flagged"]:
        lines += ["| example | its trait | pushes | z |", "|---|---|---|---|"]
        lines += [f"| {f['id']} | {f['trait']} | {f['pushes']} | {f['z']} |" for f in screen["flagged"]]
    else:
        lines.append(f"No example flagged ({len(screen['examples'])} screened).")
    return "\n".join(lines + [_END, ""])


def update_card(readme: Path, section: str) -> None:
    """Replace the card's screening section (or append one), leaving the YAML header and the rest as they are."""
    from train.outputs import write_atomic

    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    pattern = re.compile(re.escape(_START) + r".*?" + re.escape(_END) + r"\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    write_atomic(readme, text)


@dataclasses.dataclass
class ScreenArguments:
    data: str = dataclasses.field(metadata={"help": "data_gen output folder (holds sft/ and dpo/)."})
    model: str = dataclasses.field(default="smollm2-135m-instruct", metadata={"help": "Model (name or path)."})
    out: str | None = dataclasses.field(default=None, metadata={"help": f"Default: <data>/{SCREEN_FILE}."})
    threshold: float = dataclasses.field(default=2.0, metadata={"help": "Flag z below -threshold."})
    persona_questions: int = dataclasses.field(default=16, metadata={"help": "User requests per trait direction."})
    persona_trait_specs: list[str] | None = dataclasses.field(
        default=None, metadata={"help": "Trait spec YAML files for traits that are not built in."})
    card: bool = dataclasses.field(default=True, metadata={"help": "Add the section to <data>/README.md."})


def make_parser():
    from train.recipe import recipe_parser

    return recipe_parser((ScreenArguments,), "Screen a data_gen folder's training examples against the persona "
                         "directions; writes a JSON and a dataset-card section.", prog="python -m train.persona_screen")


def main(argv: list[str] | None = None) -> dict:
    from train.data import load_split
    from train.models import load_model, load_tokenizer
    from train.outputs import write_atomic
    from train.persona_directions import build_directions, trait_prompts_from_data
    from train.recipe import RecipeError, parse_recipe

    try:  # a typo or a bad value fails here, naming the key, before the model loads
        (args,) = parse_recipe(make_parser(), argv)
    except RecipeError as err:
        raise SystemExit(f"error: {err}") from None
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model)
    prompts = trait_prompts_from_data(args.data, questions=args.persona_questions, spec_paths=args.persona_trait_specs)
    if not prompts:
        raise ValueError(f"{args.data}: no trait has a trait spec; pass --persona_trait_specs")
    directions = build_directions(model, tokenizer, prompts)
    screens = {}
    for kind, column in (("sft", "messages"), ("dpo", "chosen")):
        if not (Path(args.data) / kind).is_dir():
            continue
        rows = list(load_split(args.data, kind, "train", (column,)))
        screens[kind] = screen_examples(model, tokenizer, directions, rows, args.threshold)
    screen = {"model": args.model, "threshold": args.threshold, "directions": {t: d.meta() for t, d in directions.items()},
              "examples": [dict(e, kind=k) for k, s in screens.items() for e in s["examples"]],
              "flagged": sorted((dict(f, kind=k) for k, s in screens.items() for f in s["flagged"]), key=lambda f: f["z"]),
              "reference": {k: s["reference"] for k, s in screens.items()}}
    out = Path(args.out) if args.out else Path(args.data) / SCREEN_FILE
    write_atomic(out, json.dumps(screen, indent=1) + "\n")
    if args.card:
        update_card(Path(args.data) / "README.md", card_section(screen))
    print(f"persona screening: {len(screen['examples'])} examples, {len(screen['flagged'])} flagged -> {out}")
    return screen


if __name__ == "__main__":
    main()
