"""The data contract (train/contract.py): data_gen writes through it, train and eval refuse on read what it does
not allow (naming folder, split, row and field), and docs/CONTRACT.md lists the same columns and values."""

import ast
import json
import re
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict, load_from_disk
from train_fixtures import dpo_rows, sft_rows, write_dataset

from train import contract

ROOT = Path(__file__).resolve().parents[1]


def _write_with_bad_row(data_dir: Path, part: str, split: str, index: int, bad: dict) -> Path:
    """A valid fixture dataset whose row `index` of `part`/`split` is changed, saved without the contract's check."""
    write_dataset(data_dir)
    rows = (sft_rows if part == "sft" else dpo_rows)(16 if split == "train" else 4, split)
    rows[index].update(bad)
    splits = dict(load_from_disk(str(data_dir / part)))
    splits[split] = Dataset.from_list(rows, features=contract.features(part))
    DatasetDict(splits).save_to_disk(str(data_dir / f"{part}.new"))
    (data_dir / part).rename(data_dir / f"{part}.old")
    (data_dir / f"{part}.new").rename(data_dir / part)
    return data_dir


@pytest.mark.parametrize("field, value", [("trait", "Acceptance!"), ("format", "chat"), ("axis", "framing"),
                                          ("wording", "maybe")])
def test_train_refuses_a_bad_value_naming_folder_row_and_field(tmp_path, field, value):
    from train.data import load_split

    data = _write_with_bad_row(tmp_path / "data", "sft", "train", 3, {field: value})
    with pytest.raises(contract.ContractError, match=rf"sft split 'train' row 3 \(id 'train-0003'\): '{field}' is "
                                                     rf"'{re.escape(value)}'; allowed: "):
        load_split(str(data), "sft", "train", ("messages",))


@pytest.mark.parametrize("field, value", [("trait", "acceptance "), ("format", "chat"), ("axis", "id"),
                                          ("framing", "exam")])
def test_eval_refuses_a_bad_value_naming_folder_row_and_field(tmp_path, field, value):
    from eval.preference import load_pairs

    data = _write_with_bad_row(tmp_path / "data", "dpo", "eval_ood", 2, {field: value})
    with pytest.raises(contract.ContractError, match=rf"dpo split eval_ood row 2 \(id 'eval_ood-0002'\): '{field}'"):
        load_pairs(str(data))


def test_errors_list_the_allowed_values(tmp_path):
    from train.data import load_split

    data = _write_with_bad_row(tmp_path / "data", "dpo", "eval_ood", 1, {"axis": "id"})
    with pytest.raises(contract.ContractError, match=re.escape(f"{list(contract.OOD_AXES)} (split 'eval_ood')")):
        load_split(str(data), "dpo", "eval_ood", ("prompt",))


def test_a_row_filed_under_another_split_is_refused(tmp_path):
    from train.data import load_split

    data = _write_with_bad_row(tmp_path / "data", "sft", "train", 0, {"split": "eval_id", "axis": "id"})
    with pytest.raises(contract.ContractError, match=r"row 0 .*'split' is 'eval_id'; allowed: \['train'\]"):
        load_split(str(data), "sft", "train", ("messages",))


def test_a_bad_message_role_is_refused(tmp_path):
    from train.data import load_split

    bad = [{"role": "narrator", "content": "Once."}, {"role": "assistant", "content": "Yes."}]
    data = _write_with_bad_row(tmp_path / "data", "sft", "train", 5, {"messages": bad})
    with pytest.raises(contract.ContractError, match=r"row 5 .*'messages\[0\].role' is 'narrator'"):
        load_split(str(data), "sft", "train", ("messages",))


def test_eval_needs_every_dpo_column_and_train_only_what_it_reads(tmp_path):
    from eval.preference import load_pairs
    from train.data import load_split

    write_dataset(tmp_path / "data")
    dd = load_from_disk(str(tmp_path / "data" / "dpo"))
    DatasetDict({s: d.remove_columns(["wording"]) for s, d in dd.items()}).save_to_disk(str(tmp_path / "less" / "dpo"))
    with pytest.raises(contract.ContractError, match=r"split eval_id: missing column\(s\) \['wording'\]"):
        load_pairs(str(tmp_path / "less"))
    # TRL's conversational format, without the metadata columns: still a training set
    assert len(load_split(str(tmp_path / "less"), "dpo", "train", ("prompt", "chosen", "rejected"))) == 16


def test_data_gen_writes_the_contract_features_and_refuses_a_bad_row(tmp_path):
    from data_gen.generate import write_dataset as data_gen_write

    data = {"sft": {s: sft_rows(2, s) for s in contract.SPLITS}, "dpo": {s: dpo_rows(2, s) for s in contract.SPLITS}}
    data_gen_write(data, tmp_path / "ok")
    for part in contract.PARTS:
        for split, dataset in load_from_disk(str(tmp_path / "ok" / part)).items():
            assert dataset.features == contract.features(part), (part, split)
            assert sorted(dataset.column_names) == sorted(contract.COLUMNS[part])
    data["dpo"]["eval_id"][1]["format"] = "chat"
    with pytest.raises(contract.ContractError, match=r"generated dpo split 'eval_id' row 1 .*'format' is 'chat'"):
        data_gen_write(data, tmp_path / "bad")


def test_user_rows_take_the_contract_values():
    from data_gen.user_jsonl import BadRowError, parse_row

    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    assert contract.row_problem(parse_row(row, "sft", 1)) is None
    with pytest.raises(BadRowError, match="'trait' must be a name"):
        parse_row({**row, "trait": "Kind ness"}, "sft", 1)


def test_builtin_traits_are_the_trait_specs_and_data_gen_uses_the_contract_values():
    from data_gen.generate import contract as data_gen_contract
    from data_gen.offline import OOD_AXES
    from data_gen.spec import BUILTIN_DIR, load_trait_spec

    assert contract.BUILTIN_TRAITS == tuple(sorted(load_trait_spec(p).name for p in BUILTIN_DIR.glob("*.yaml")))
    assert data_gen_contract is contract and OOD_AXES is contract.OOD_AXES  # one definition, not a copy
    assert all(contract.TRAIT_NAME.fullmatch(t) for t in contract.BUILTIN_TRAITS)


def test_contract_module_imports_no_other_stage():
    tree = ast.parse((ROOT / "train" / "contract.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in imported if m.split(".")[0] in ("data_gen", "eval")}


def _doc_section() -> str:
    text = (ROOT / "docs" / "CONTRACT.md").read_text()
    return text[text.index("## Dataset on disk"):text.index("## Adapter folder")]


def test_contract_doc_lists_the_module_columns_and_values():
    doc = _doc_section()
    for part in contract.PARTS:
        line = re.search(rf"^- {part} columns: (.*?)\.$", doc, re.M | re.S).group(1)
        assert tuple(re.findall(r"`(\w+)`", line)) == contract.COLUMNS[part], part
    table = {m.group(1): m.group(2) for m in re.finditer(r"^\| (?:message )?`(\w+)` \| (.*) \|$", doc, re.M)}
    quoted = lambda s: tuple(re.findall(r'"([^"]*)"', s))  # noqa: E731
    assert quoted(table["split"]) == contract.SPLITS
    assert quoted(table["format"]) == contract.FORMATS
    assert quoted(table["framing"]) == contract.FRAMINGS
    assert quoted(table["wording"]) == contract.WORDINGS
    assert quoted(table["role"]) == contract.ROLES
    axes = dict(part.strip().split(": ", 1) for part in table["axis"].split(";"))
    assert {split: quoted(v) for split, v in axes.items()} == contract.AXES
    builtin = re.search(r"Built-in traits: (.*?)\.$", doc, re.M).group(1)
    assert quoted(builtin) == contract.BUILTIN_TRAITS
    assert contract.TRAIT_NAME.pattern == r"[a-z][a-z0-9_]*" and "lower-case letters, digits and underscores" in doc


def test_fixture_rows_keep_to_the_contract():
    for split in contract.SPLITS:
        for row in sft_rows(6, split) + dpo_rows(6, split):
            assert contract.row_problem(row) is None, json.dumps(row)
