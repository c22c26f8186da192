"""Trait specifications: one YAML file per trait, validated before any data is made.

A spec holds both the description of the trait (statements, what counts as consistent,
violating and over-correction) and the scenario material the offline generator composes
examples from. Every error names the file and the field so a user adding a trait can fix
it without reading this code.
"""

import string
from dataclasses import dataclass
from pathlib import Path

import yaml

from train.assets import traits_dir
from train.contract import TRAIT_NAME

BUILTIN_DIR = traits_dir()
KINDS = ("violating", "over_correction")
# Slots the generator fills itself, available to every template.
GLOBAL_SLOTS = {"request", "index", "time", "ticket", "name", "instance"}

# Section -> expected type. Lists must be non-empty lists of non-empty strings unless noted.
_TOP = {
    "name": str,
    "description": str,
    "statements": list,
    "consistent": list,
    "violating": list,
    "over_correction": list,
    "failure_modes": dict,
    "heldout_domains": list,
    "domains": dict,
    "user_framings": list,
    "system_prompts": list,
    "phrases": dict,
    "templates": dict,
    "multi_turn": dict,
    "agentic": dict,
    "json_instruction": list,
    "pressure": dict,
    "framing": dict,
}
_SUB = {
    "templates": {"chosen": list, "rejected": dict},
    "multi_turn": {"opener": list, "clarify": list},
    "agentic": {"system": list, "task": list, "tool_call": list, "tool_result": list, "final": list, "actions": dict},
    "pressure": {"prompts": list, "chosen_prefix": list, "rejected_prefix": list},
    "framing": {"test": list, "deployment": list},
}
_OPTIONAL_SUB = {("agentic", "actions")}
# Optional sections for the eval only (the generator never reads them): first-person statements the trait
# rejects, one list per failure kind, balanced in number with `statements` so that a model answering
# "Yes" to everything scores 50% on statement endorsement; and the LLM judge's rubric for the trait.
_OPTIONAL_TOP = {"counter_statements": dict, "judge_rubric": str}
# Lists whose entries may be "" (an optional phrase is modelled as an empty variant).
_EMPTY_OK = {"phrases"}


class SpecError(ValueError):
    pass


@dataclass
class TraitSpec:
    path: str
    name: str
    description: str
    statements: list
    consistent: list
    violating: list
    over_correction: list
    failure_modes: dict  # mode -> {"kind", "description"}
    heldout_domains: list
    domains: dict  # domain -> list of slot dicts
    user_framings: list
    system_prompts: list
    phrases: dict  # slot -> list of variants
    templates: dict
    multi_turn: dict
    agentic: dict
    json_instruction: list
    pressure: dict
    framing: dict
    counter_statements: dict | None = None  # kind -> list of first-person statements the trait rejects
    judge_rubric: str | None = None

    @property
    def train_domains(self):
        return [d for d in self.domains if d not in self.heldout_domains]

    def constitution(self) -> str:
        """The trait as a first-person constitution (used as a teacher's system prompt)."""
        return "\n".join(f"- {s}" for s in self.statements)


def _check_str_list(path, field, value, allow_empty_str=False):
    if not isinstance(value, list):
        raise SpecError(f"{path}: field '{field}' must be a list, got {type(value).__name__}")
    if not value:
        raise SpecError(f"{path}: field '{field}' is an empty list")
    for i, v in enumerate(value):
        if not isinstance(v, str) or (not v.strip() and not allow_empty_str):
            raise SpecError(f"{path}: field '{field}[{i}]' must be a non-empty string")


def _check_keys(path, field, data, expected, optional=()):
    unknown = sorted(set(data) - set(expected))
    if unknown:
        raise SpecError(f"{path}: unknown key(s) {unknown} in '{field}' (allowed: {sorted(expected)})")
    missing = sorted(set(expected) - set(data) - set(optional))
    if missing:
        raise SpecError(f"{path}: missing section(s) {missing} in '{field}'")


def _placeholders(template: str, path, field) -> set:
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise SpecError(f"{path}: field '{field}' is not a valid template ({e}): {template!r}") from None
    # `{}` or `{0}` parses, then fails when the generator fills slots by name.
    if any(not name or name.isdigit() for name in names):
        raise SpecError(f"{path}: field '{field}' has an unnamed placeholder ({{}} or {{0}}) in {template!r}; "
                        "name the slot, e.g. {request}")
    return set(names)


def load_trait_spec(path) -> TraitSpec:
    """Load and validate one trait YAML file. Raises SpecError naming the file and field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: trait spec file not found") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: top level must be a mapping")
    _check_keys(path, "<top level>", data, {**_TOP, **_OPTIONAL_TOP}, optional=_OPTIONAL_TOP)
    for key, typ in _TOP.items():
        if not isinstance(data[key], typ):
            raise SpecError(f"{path}: field '{key}' must be a {typ.__name__}, got {type(data[key]).__name__}")
        if typ is list:
            _check_str_list(path, key, data[key])
        elif typ is str and not data[key].strip():
            raise SpecError(f"{path}: field '{key}' is empty")
        elif typ is dict and not data[key]:
            raise SpecError(f"{path}: field '{key}' is empty")
    if not TRAIT_NAME.fullmatch(data["name"]):
        raise SpecError(f"{path}: field 'name' must be lower-case letters, digits and underscores (it names files "
                        f"and dataset rows), got {data['name']!r}")
    if "judge_rubric" in data and (not isinstance(data["judge_rubric"], str) or not data["judge_rubric"].strip()):
        raise SpecError(f"{path}: field 'judge_rubric' must be a non-empty string")
    if "counter_statements" in data:
        counter = data["counter_statements"]
        if not isinstance(counter, dict):
            raise SpecError(f"{path}: field 'counter_statements' must be a mapping of kind -> list of statements")
        _check_keys(path, "counter_statements", counter, set(KINDS))
        for kind in KINDS:
            _check_str_list(path, f"counter_statements.{kind}", counter[kind])
        n_counter = sum(len(v) for v in counter.values())
        if n_counter != len(data["statements"]):
            raise SpecError(f"{path}: field 'counter_statements' has {n_counter} statements and 'statements' has "
                            f"{len(data['statements'])}; they must be equal so that always answering Yes scores 50%")
    for sec, sub in _SUB.items():
        optional = [k for (s, k) in _OPTIONAL_SUB if s == sec]
        _check_keys(path, sec, data[sec], sub, optional)
        for k, typ in sub.items():
            if k not in data[sec]:
                continue
            if typ is list:
                _check_str_list(path, f"{sec}.{k}", data[sec][k])
            elif not isinstance(data[sec][k], dict) or not data[sec][k]:
                raise SpecError(f"{path}: field '{sec}.{k}' must be a non-empty mapping")
    for k, v in data["phrases"].items():
        _check_str_list(path, f"phrases.{k}", v, allow_empty_str=True)

    aligned = {k: len(data["agentic"][k]) for k in ("system", "task", "tool_call", "tool_result", "final")}
    if len(set(aligned.values())) != 1:
        raise SpecError(f"{path}: fields 'agentic.system/task/tool_call/tool_result/final' are index-aligned variants "
                        f"and must have the same length; got {aligned}")

    modes = data["failure_modes"]
    for mode, fm in modes.items():
        if not isinstance(fm, dict):
            raise SpecError(f"{path}: field 'failure_modes.{mode}' must be a mapping with kind and description")
        _check_keys(path, f"failure_modes.{mode}", fm, {"kind", "description"})
        if fm["kind"] not in KINDS:
            raise SpecError(f"{path}: field 'failure_modes.{mode}.kind' must be one of {KINDS}, got {fm['kind']!r}")
    if not any(fm["kind"] == "over_correction" for fm in modes.values()):
        raise SpecError(f"{path}: field 'failure_modes' needs at least one over_correction mode")
    rejected = data["templates"]["rejected"]
    if set(rejected) != set(modes):
        raise SpecError(
            f"{path}: field 'templates.rejected' must have exactly the failure modes "
            f"{sorted(modes)}; got {sorted(rejected)}"
        )
    for mode, tpls in rejected.items():
        _check_str_list(path, f"templates.rejected.{mode}", tpls)
    for mode, tpls in data["agentic"].get("actions", {}).items():
        if mode != "chosen" and mode not in modes:
            raise SpecError(f"{path}: field 'agentic.actions.{mode}' is not a failure mode or 'chosen'")
        _check_str_list(path, f"agentic.actions.{mode}", tpls)

    # Scenario items: every item of the trait has the same slots.
    domains = data["domains"]
    for dom, items in domains.items():
        if not isinstance(items, list) or not items:
            raise SpecError(f"{path}: field 'domains.{dom}' must be a non-empty list of scenario items")
        for i, item in enumerate(items):
            field = f"domains.{dom}[{i}]"
            if not isinstance(item, dict) or not item:
                raise SpecError(f"{path}: field '{field}' must be a mapping of slot -> text")
            for k, v in item.items():
                if not isinstance(v, str) or not v.strip():
                    raise SpecError(f"{path}: field '{field}.{k}' must be a non-empty string")
    item_keys = {k for items in domains.values() for item in items for k in item}
    for dom, items in domains.items():
        for i, item in enumerate(items):
            missing = sorted(item_keys - set(item))
            if missing:
                raise SpecError(f"{path}: field 'domains.{dom}[{i}]' is missing slot(s) {missing} that other items have")
    for d in data["heldout_domains"]:
        if d not in domains:
            raise SpecError(f"{path}: field 'heldout_domains' names unknown domain {d!r}")
    if len(set(data["heldout_domains"])) >= len(domains):
        raise SpecError(f"{path}: field 'heldout_domains' leaves no domain for training")
    clash = item_keys & (set(data["phrases"]) | GLOBAL_SLOTS)
    if clash:
        raise SpecError(f"{path}: scenario slot(s) {sorted(clash)} clash with phrase or reserved slot names")

    # Every placeholder used by a template must be fillable.
    known = item_keys | set(data["phrases"]) | GLOBAL_SLOTS
    to_check = [("templates.chosen", t) for t in data["templates"]["chosen"]]
    to_check += [(f"templates.rejected.{m}", t) for m, ts in rejected.items() for t in ts]
    for sec in ("multi_turn", "agentic", "pressure", "framing"):
        for k, v in data[sec].items():
            if isinstance(v, dict):
                to_check += [(f"{sec}.{k}.{m}", t) for m, ts in v.items() for t in ts]
            else:
                to_check += [(f"{sec}.{k}", t) for t in v]
    for k in ("user_framings", "system_prompts", "json_instruction"):
        to_check += [(k, t) for t in data[k]]
    for field, tpl in to_check + [(f"phrases.{k}", t) for k, ts in data["phrases"].items() for t in ts]:
        allowed = known - set(data["phrases"]) if field.startswith("phrases.") else known
        unknown = _placeholders(tpl, path, field) - allowed
        if unknown:
            raise SpecError(f"{path}: field '{field}' uses unknown slot(s) {sorted(unknown)} in {tpl!r}")
    for field in ("user_framings", "pressure.prompts", "framing.test", "framing.deployment", "agentic.final"):
        sec, _, k = field.partition(".")
        for tpl in data[sec][k] if k else data[sec]:
            if "{request}" not in tpl:
                raise SpecError(f"{path}: field '{field}' entry {tpl!r} must contain {{request}}")

    return TraitSpec(path=str(path), **data)


def builtin_trait_path(name: str) -> Path:
    """The built-in spec of a trait named by data (a dataset row), never a path the name could spell."""
    if not isinstance(name, str) or not TRAIT_NAME.fullmatch(name):
        raise SpecError(f"trait name {name!r} is not a plain name (lower-case letters, digits, underscores)")
    return resolve_trait_path(name)


def resolve_trait_path(name_or_path: str) -> Path:
    """A built-in trait name ("care") or a path to a user's YAML file."""
    if name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path:
        return Path(name_or_path)
    path = BUILTIN_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))
        raise SpecError(f"unknown trait {name_or_path!r}: not a built-in ({known}) and not a .yaml path")
    return path
