"""The data contract: columns, `datasets.Features` and allowed values of the datasets data_gen writes and
train and eval read. docs/CONTRACT.md describes the same for people; tests/test_contract.py keeps the two equal.

data_gen builds its splits with `features` and checks them with `validate_rows` before writing; train and eval
call `validate_rows` on every split they read, before any model loads, so a row the contract does not allow is
an error naming the folder, split, row and field instead of a wrong number in a report.
"""

import re

from train.assets import traits_dir

PARTS = ("sft", "dpo")
SPLITS = ("train", "eval_id", "eval_ood")
FORMATS = ("single_turn", "system_prompt", "json", "multi_turn", "agentic")
OOD_AXES = ("heldout_domain", "heldout_format", "adversarial_pressure", "framing")
# seen_wording: an eval_id prompt answered in training wording, paired with its unseen twin by pair_id
AXES = {"train": ("id",), "eval_id": ("id", "seen_wording"), "eval_ood": OOD_AXES}
FRAMINGS = ("", "test", "deployment")
WORDINGS = ("seen", "unseen")
ROLES = ("system", "user", "assistant", "tool")
MESSAGE_COLUMNS = {"sft": ("messages",), "dpo": ("prompt", "chosen", "rejected")}
COLUMNS = {
    "sft": ("messages", "trait", "split", "axis", "domain", "format", "id", "wording"),
    "dpo": ("prompt", "chosen", "rejected", "trait", "split", "axis", "failure_mode", "domain", "format", "framing",
            "pair_id", "id", "wording"),
}
# Trait names are open (a user's trait YAML or JSONL rows add their own), so a row's trait is checked against
# the shape of a name; the built-in names are what test fixtures use, so they cannot drift from the specs.
TRAIT_NAME = re.compile(r"[a-z][a-z0-9_]*")  # the spec-name pattern (lower-case, digits, underscores)
USER_DEFAULT = "user"  # the trait, domain and failure_mode of a user JSONL row that names none
# Read by path (train/assets.py), not by importing data_gen: train/ is the kernel the other stages import.
BUILTIN_TRAITS = tuple(sorted(p.stem for p in traits_dir().glob("*.yaml")))
_ALLOWED = {"format": FORMATS, "framing": FRAMINGS, "wording": WORDINGS, "split": SPLITS}


class ContractError(ValueError):
    pass


def features(part: str):
    """The `datasets.Features` of one part: message lists of {role, content}, every other column a string."""
    from datasets import Features, List, Value

    messages, string = List({"role": Value("string"), "content": Value("string")}), Value("string")
    # One shared `string` object: the dataset fingerprint pickles the Features, so sharing is part of its value.
    return Features({c: messages if c in MESSAGE_COLUMNS[part] else string for c in COLUMNS[part]})


def to_dataset(rows: list[dict], part: str, source: str, split: str | None = None):
    """`rows` as a `datasets.Dataset` with the part's Features, checked as the readers check it."""
    from datasets import Dataset

    dataset = Dataset.from_list(rows, features=features(part))
    validate_rows(dataset, part, source, split=split)
    return dataset


def validate_rows(dataset, part: str, source: str, required: tuple[str, ...] | None = None,
                  split: str | None = None) -> None:
    """Raise ContractError unless `dataset` (one split, named by `source`) has the `required` columns (default: all
    of the part's) and every contract column it has holds an allowed value; rows of a contract split (`split`)
    must say so in their `split` column.

    A dataset made elsewhere (TRL's conversational format, no metadata) passes with `required` set to the columns
    the reader uses; its metadata columns, when present, are checked all the same.
    """
    if part not in PARTS:
        raise ContractError(f"{source}: unknown dataset part {part!r} (known: {', '.join(PARTS)})")
    names = dataset.column_names
    missing = [c for c in (COLUMNS[part] if required is None else required) if c not in names]
    if missing:
        raise ContractError(f"{source}: missing column(s) {missing} (has {names})")
    columns = {c: list(dataset[c]) for c in COLUMNS[part] if c in names}
    ids = columns.get("id")
    for i in range(len(dataset)):
        row = {c: values[i] for c, values in columns.items()}
        problem = row_problem(row)
        if not problem and split in SPLITS and row.get("split", split) != split:
            problem = "split", row["split"], [split]
        if problem:
            field, value, allowed = problem
            where = f"{source} row {i}" + (f" (id {ids[i]!r})" if ids else "")
            raise ContractError(f"{where}: '{field}' is {value!r}; allowed: {allowed}")


def row_problem(row: dict):
    """(field, value, allowed) for the first contract value `row` breaks, else None. Only the fields it has count."""
    for column in dict.fromkeys(MESSAGE_COLUMNS["sft"] + MESSAGE_COLUMNS["dpo"]):
        for j, message in enumerate(row.get(column) or []):
            if message.get("role") not in ROLES:
                return f"{column}[{j}].role", message.get("role"), list(ROLES)
    for field, allowed in _ALLOWED.items():
        if field in row and row[field] not in allowed:
            return field, row[field], list(allowed)
    if "trait" in row and not (isinstance(row["trait"], str) and TRAIT_NAME.fullmatch(row["trait"])):
        return "trait", row["trait"], f"a name matching {TRAIT_NAME.pattern} (built-in: {', '.join(BUILTIN_TRAITS)})"
    if "axis" in row:
        allowed = AXES.get(row.get("split")) or tuple(a for axes in AXES.values() for a in axes)
        if row["axis"] not in allowed:
            return "axis", row["axis"], f"{list(allowed)}" + (f" (split {row['split']!r})" if "split" in row else "")
    return None
