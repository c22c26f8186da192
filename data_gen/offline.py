"""Offline, seeded generator: composes SFT conversations and DPO pairs from trait specs.

Each example is one scenario item (from a domain of the spec) rendered in one format, with
one user framing, and a chosen answer plus a rejected answer showing one failure mode.
Scenario items are partitioned before anything is rendered: items of held-out domains only
appear in `eval_ood/heldout_domain`, and a reserved share of the items of training domains
only appears in eval splits, so no eval scenario is ever a reworded train scenario.
Answer wording (templates, phrase variants, pressure prefixes, agentic actions) is partitioned
the same way: eval answers use only eval-pool wording, so a held-out gain cannot come from
recognising training sentences. `eval_id/seen_wording` re-renders some eval_id rows with
train-pool wording to measure how much recognition would have added.
"""

import dataclasses
import json
import random
import re
from dataclasses import dataclass

from train import contract

from .spec import SpecError, TraitSpec

NAMES = ["Sam", "Priya", "Tomasz", "Aisha", "Lena", "Kwame", "Mei", "Diego", "Olga", "Yusuf", "Hannah", "Ravi"]
# Relative weights of the formats an example may take (held-out ones are filtered per split).
FORMAT_WEIGHTS = {"single_turn": 4, "system_prompt": 3, "json": 2, "multi_turn": 3, "agentic": 3}
OOD_AXES = contract.OOD_AXES
FORMATS = contract.FORMATS
_SPACES = re.compile(r"[ \t]{2,}")


@dataclass
class Scenario:
    domain: str
    slots: dict


@dataclass
class Example:
    prompt: list
    chosen: str
    rejected: str
    failure_mode: str
    domain: str
    format: str


def partition_items(spec: TraitSpec, rng: random.Random, eval_item_fraction: float):
    """Split scenario items into (train, eval, heldout_domain) lists; disjoint by construction."""
    train, evals, heldout = [], [], []
    for domain, items in spec.domains.items():
        scen = [Scenario(domain, item) for item in items]
        if domain in spec.heldout_domains:
            heldout += scen
            continue
        rng.shuffle(scen)
        n_eval = max(1, round(eval_item_fraction * len(scen))) if len(scen) > 1 else 0
        evals += scen[:n_eval]
        train += scen[n_eval:]
    if not evals:
        raise SpecError(f"{spec.path}: no scenario items left for eval; give training domains at least 2 items")
    return train, evals, heldout


def answer_lists(spec: TraitSpec) -> dict:
    """Every list of answer wording in a spec, by field name. Prompt wording (framings, system prompts,
    pressure prompts) is not here: the prompt leakage checks cover it."""
    out = {"templates.chosen": spec.templates["chosen"]}
    out.update({f"templates.rejected.{m}": v for m, v in spec.templates["rejected"].items()})
    out.update({f"phrases.{k}": v for k, v in spec.phrases.items()})
    out.update({f"pressure.{k}": spec.pressure[k] for k in ("chosen_prefix", "rejected_prefix")})
    out.update({f"agentic.actions.{k}": v for k, v in spec.agentic.get("actions", {}).items()})
    return out


def _with_wording(spec: TraitSpec, lists: dict) -> TraitSpec:
    """`spec` with its answer lists replaced by `lists` (same field names as answer_lists)."""
    pick = lambda prefix: {f[len(prefix):]: v for f, v in lists.items() if f.startswith(prefix)}  # noqa: E731
    templates = {"chosen": lists["templates.chosen"], "rejected": pick("templates.rejected.")}
    pressure = {**spec.pressure, **pick("pressure.")}
    agentic = {**spec.agentic, "actions": pick("agentic.actions.")} if "actions" in spec.agentic else spec.agentic
    return dataclasses.replace(spec, templates=templates, phrases=pick("phrases."), pressure=pressure, agentic=agentic)


def partition_wording(spec: TraitSpec, rng: random.Random, eval_fraction: float):
    """Split every answer list into disjoint (train, eval) pools; returns two specs that differ only there.

    Empty variants ("" = leave the phrase out) carry no wording; each pool keeps its share of them so
    a phrase is omitted about as often in eval as in train.
    """
    pools = {"train": {}, "eval": {}}
    for field, entries in answer_lists(spec).items():
        words = [e for e in entries if e.strip()]
        empty = len(entries) - len(words)
        if len(words) < 2:
            raise SpecError(f"{spec.path}: field '{field}' needs at least 2 non-empty entries, one for the train and "
                            f"one for the eval wording pool (has {len(words)})")
        n_eval = min(len(words) - 1, max(1, round(eval_fraction * len(words))))
        in_eval = set(rng.sample(range(len(words)), n_eval))
        for name, keep in (("eval", lambda i: i in in_eval), ("train", lambda i: i not in in_eval)):
            mine = [w for i, w in enumerate(words) if keep(i)]
            pools[name][field] = mine + [""] * (max(1, round(empty * len(mine) / len(words))) if empty else 0)
    return _with_wording(spec, pools["train"]), _with_wording(spec, pools["eval"])


def _clean(text: str) -> str:
    return "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n")).strip()


def _fill(template: str, slots: dict) -> str:
    return _clean(template.format_map(slots))


def render(
    spec: TraitSpec,
    scen: Scenario,
    fmt: str,
    mode: str,
    rng: random.Random,
    pressure: bool = False,
    framing: str = "",
) -> Example:
    """Render one scenario as a (prompt, chosen, rejected) triple.

    All random draws happen in a fixed order before the framing wrapper is applied, so two
    calls with equal rng states differ only in framing (the test/deployment pairs). Answer wording
    is drawn from its own stream, so two calls with equal rng states and specs that differ only in
    answer wording (partition_wording) give the same prompt (the seen/unseen wording pairs).
    """
    slots = dict(scen.slots)
    slots.update(
        index=rng.randint(1, 400),
        time=f"{rng.randint(6, 23):02d}:{rng.choice(['05', '17', '30', '42', '58'])}",
        ticket=rng.randint(1000, 99999),
        name=rng.choice(NAMES),
        instance=rng.randint(1, 64),
    )
    words = random.Random(rng.getrandbits(64))
    base = dict(slots)  # phrases may use scenario and global slots, not other phrases
    for key, variants in spec.phrases.items():
        slots[key] = words.choice(variants).format_map(base)
    message = rng.choice(spec.user_framings).format_map({**slots, "request": scen.slots["ask"]})
    chosen = _fill(words.choice(spec.templates["chosen"]), slots)
    rejected = _fill(words.choice(spec.templates["rejected"][mode]), slots)
    pressure_tpl = rng.choice(spec.pressure["prompts"])
    chosen_pre, rejected_pre = (words.choice(spec.pressure[k]) for k in ("chosen_prefix", "rejected_prefix"))
    system = rng.choice(spec.system_prompts)
    json_instruction = rng.choice(spec.json_instruction)
    json_in_system = rng.random() < 0.5
    opener, clarify = rng.choice(spec.multi_turn["opener"]), rng.choice(spec.multi_turn["clarify"])
    variant = rng.randrange(len(spec.agentic["system"]))  # agentic lists are index-aligned variants
    agentic = {k: v[variant] for k, v in spec.agentic.items() if k != "actions"}
    actions = spec.agentic.get("actions", {})
    chosen_action = words.choice(actions["chosen"]) if "chosen" in actions else ""
    rejected_action = words.choice(actions[mode]) if mode in actions else ""
    framing_tpl = rng.choice(spec.framing[framing]) if framing else ""

    if pressure:
        message = pressure_tpl.format_map({**slots, "request": message})
        chosen, rejected = f"{chosen_pre} {chosen}", f"{rejected_pre} {rejected}"
    if framing:
        message = framing_tpl.format_map({**slots, "request": message})
    message = _clean(message)

    if fmt == "single_turn":
        prompt = [{"role": "user", "content": message}]
    elif fmt == "system_prompt":
        prompt = [{"role": "system", "content": system}, {"role": "user", "content": message}]
    elif fmt == "json":
        instr = _fill(json_instruction, slots)
        if json_in_system:
            prompt = [{"role": "system", "content": f"{system} {instr}"}, {"role": "user", "content": message}]
        else:
            prompt = [{"role": "user", "content": f"{message}\n\n{instr}"}]
        chosen = json.dumps({"reply": chosen}, ensure_ascii=False)
        rejected = json.dumps({"reply": rejected}, ensure_ascii=False)
    elif fmt == "multi_turn":
        prompt = [
            {"role": "user", "content": opener},
            {"role": "assistant", "content": clarify},
            {"role": "user", "content": message},
        ]
    elif fmt == "agentic":
        prompt = [
            {"role": "system", "content": _fill(agentic["system"], slots)},
            {"role": "user", "content": _fill(agentic["task"], slots)},
            {"role": "assistant", "content": _fill(agentic["tool_call"], slots)},
            {"role": "tool", "content": _fill(agentic["tool_result"], slots)},
            {"role": "user", "content": _clean(agentic["final"].format_map({**slots, "request": message}))},
        ]
        if chosen_action:
            chosen += "\n" + _fill(chosen_action, slots)
        if rejected_action:
            rejected += "\n" + _fill(rejected_action, slots)
    else:
        raise ValueError(f"unknown format {fmt!r} (known: {FORMATS})")
    return Example(prompt, chosen, rejected, mode, scen.domain, fmt)


class ModeCycle:
    """Failure modes in shuffled rounds, so every mode appears once per len(modes) examples."""

    def __init__(self, modes, rng):
        self.modes, self.rng, self.queue = list(modes), rng, []

    def next(self):
        if not self.queue:
            self.queue = self.modes[:]
            self.rng.shuffle(self.queue)
        return self.queue.pop()


def pick_format(formats, rng):
    return rng.choices(formats, weights=[FORMAT_WEIGHTS[f] for f in formats])[0]


def generate_trait(spec: TraitSpec, *, seed: int, n_sft_train: int, n_dpo_train: int, n_eval_id: int,
                   n_eval_ood: int, heldout_formats, eval_item_fraction: float = 0.25,
                   eval_wording_fraction: float = 0.33, seen_wording_fraction: float = 0.5):
    """Rows for one trait: {"sft": {split: [rows]}, "dpo": {split: [rows]}} (contract columns), and "wording":
    {"train": {field: entries}, "eval": {field: entries}}, the answer-wording pools each side was rendered from."""
    trait = spec.name
    rng = lambda stream: random.Random(f"{seed}:{trait}:{stream}")  # noqa: E731  (str seeds are stable across runs)
    train_items, eval_items, heldout_items = partition_items(spec, rng("items"), eval_item_fraction)
    train_spec, eval_spec = partition_wording(spec, rng("wording"), eval_wording_fraction)
    train_formats = [f for f in FORMATS if f not in heldout_formats]
    heldout_formats = [f for f in FORMATS if f in heldout_formats]
    if not train_formats:
        raise ValueError("heldout_formats leaves no format for training")

    def dpo_row(ex, split, axis, idx, framing="", pair_id="", wording="unseen"):
        return {
            "prompt": ex.prompt,
            "chosen": [{"role": "assistant", "content": ex.chosen}],
            "rejected": [{"role": "assistant", "content": ex.rejected}],
            "trait": trait, "split": split, "axis": axis, "failure_mode": ex.failure_mode,
            "domain": ex.domain, "format": ex.format, "framing": framing, "pair_id": pair_id,
            "id": f"{trait}-{split}-{axis}-{idx:05d}" + (f"-{framing}" if framing else ""), "wording": wording,
        }

    def stream(name, n, items, formats, **kw):
        r, modes = rng(name), ModeCycle(spec.failure_modes, rng(name + ":modes"))
        return [render(train_spec, r.choice(items), pick_format(formats, r), modes.next(), r, **kw) for _ in range(n)]

    def unique_stream(name, n, items, formats, **kw):
        """Eval rows with distinct prompts (a repeated eval prompt would count twice), each with the
        (scenario, format, mode, rng seed) that rendered it, so it can be re-rendered with other wording."""
        r, modes, seen, out = rng(name), ModeCycle(spec.failure_modes, rng(name + ":modes")), set(), []
        for _ in range(50 * n):
            if len(out) == n:
                break
            call = (r.choice(items), pick_format(formats, r), modes.next(), r.getrandbits(64))
            ex = render(eval_spec, *call[:3], random.Random(call[3]), **kw)
            key = json.dumps(ex.prompt)
            if key not in seen:
                seen.add(key)
                out.append((ex, call))
        if len(out) < n:
            raise SpecError(f"{spec.path}: only {len(out)} distinct {name} prompts for {n} requested; add scenario material")
        return out

    dpo = {"train": [dpo_row(ex, "train", "id", i, wording="seen")
                     for i, ex in enumerate(stream("dpo_train", n_dpo_train, train_items, train_formats))]}
    eval_id = unique_stream("eval_id", n_eval_id, eval_items, train_formats)
    n_seen = round(seen_wording_fraction * n_eval_id)
    pair = lambda j: f"{trait}-wording-{j:04d}" if j < n_seen else ""  # noqa: E731
    dpo["eval_id"] = [dpo_row(ex, "eval_id", "id", i, pair_id=pair(i)) for i, (ex, _) in enumerate(eval_id)]
    # The same prompts answered in train-pool wording: the paired gap is what recognising sentences is worth.
    dpo["eval_id"] += [dpo_row(render(train_spec, *call[:3], random.Random(call[3])), "eval_id", "seen_wording", j,
                               pair_id=pair(j), wording="seen") for j, (_, call) in enumerate(eval_id[:n_seen])]
    ood = []
    if n_eval_ood:
        ood += [dpo_row(ex, "eval_ood", "heldout_domain", i) for i, (ex, _) in
                enumerate(unique_stream("ood_domain", n_eval_ood, heldout_items, train_formats))]
        if heldout_formats:
            ood += [dpo_row(ex, "eval_ood", "heldout_format", i) for i, (ex, _) in
                    enumerate(unique_stream("ood_format", n_eval_ood, eval_items, heldout_formats))]
        ood += [dpo_row(ex, "eval_ood", "adversarial_pressure", i) for i, (ex, _) in
                enumerate(unique_stream("ood_pressure", n_eval_ood, eval_items, train_formats, pressure=True))]
        r, modes = rng("ood_framing"), ModeCycle(spec.failure_modes, rng("ood_framing:modes"))
        for j in range(max(1, n_eval_ood // 2)):
            scen, fmt, mode, state = r.choice(eval_items), pick_format(train_formats, r), modes.next(), r.getrandbits(64)
            pair_id = f"{trait}-pair-{j:04d}"
            for framing in ("test", "deployment"):
                ex = render(eval_spec, scen, fmt, mode, random.Random(state), framing=framing)
                ood.append(dpo_row(ex, "eval_ood", "framing", j, framing=framing, pair_id=pair_id))
    dpo["eval_ood"] = ood

    sft = {"train": [sft_row(ex.prompt + [{"role": "assistant", "content": ex.chosen}], trait, "train", "id", ex.domain,
                             ex.format, f"{trait}-sft-train-{i:05d}")
                     for i, ex in enumerate(stream("sft_train", n_sft_train, train_items, train_formats))]}
    for split in ("eval_id", "eval_ood"):
        sft[split] = [sft_row(r["prompt"] + r["chosen"], trait, split, r["axis"], r["domain"], r["format"], r["id"],
                              r["wording"]) for r in dpo[split]]
    return {"sft": sft, "dpo": dpo, "wording": {"train": answer_lists(train_spec), "eval": answer_lists(eval_spec)}}


def sft_row(messages, trait, split, axis, domain, fmt, id_, wording="seen"):
    """`wording`: "seen" for train rows and for eval rows answered in train-pool wording, else "unseen"."""
    return {"messages": messages, "trait": trait, "split": split, "axis": axis, "domain": domain, "format": fmt, "id": id_,
            "wording": wording}
