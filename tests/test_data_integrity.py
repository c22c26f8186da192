"""Data-stage integrity: atomic dataset writes, foreign folders, user-row labels, bad bytes, empty splits."""

import json
import os
from pathlib import Path

import pytest
import yaml

from data_gen import generate
from data_gen.__main__ import run
from data_gen.generate import main
from data_gen.spec import BUILTIN_DIR, SpecError, load_trait_spec
from data_gen.user_jsonl import BadRowError
from train.assets import read_record

SMALL = ["--sft_train_per_trait", "12", "--dpo_train_per_trait", "12", "--eval_id_per_trait", "8",
         "--eval_ood_per_axis_per_trait", "6", "--leakage_embedding_check", "false", "--diversity_sample", "20",
         "--traits", "care"]
U, A = {"role": "user", "content": "Could you help me with this?"}, {"role": "assistant", "content": "Yes, gladly."}


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_crash_mid_write_keeps_the_previous_dataset_whole(tmp_path, monkeypatch):
    out = tmp_path / "data"
    main(["--output_dir", str(out), "--seed", "0", *SMALL])
    before = _files(out)

    def crash(*args, **kwargs):
        raise RuntimeError("disk gone")
    import data_gen.card as card
    monkeypatch.setattr(card, "write_card", crash)  # after the dataset files, before the card
    with pytest.raises(RuntimeError, match="disk gone"):
        main(["--output_dir", str(out), "--seed", "1", *SMALL])
    assert _files(out) == before  # old seed's sft/, dpo/, jsonl/ and card, byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no staging folder left behind

    monkeypatch.undo()
    main(["--output_dir", str(out), "--seed", "1", *SMALL])
    assert read_record(out)["seed"] == 1 and _files(out) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # the replaced dataset is deleted


def test_rerun_keeps_the_teacher_cache(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "teacher_cache.jsonl").write_text('{"k": 1}\n')
    main(["--output_dir", str(out), *SMALL])
    assert (out / "teacher_cache.jsonl").read_text() == '{"k": 1}\n' and read_record(out)["seed"] == 0


@pytest.mark.parametrize("name", ["README.md", "notes.txt"])
def test_folder_not_written_by_data_gen_is_refused(tmp_path, name):
    out = tmp_path / "mine"
    out.mkdir()
    (out / name).write_text("my own file\n")
    with pytest.raises(generate.OutputDirError, match=rf"{out}.*not written by data_gen"):
        main(["--output_dir", str(out), *SMALL])
    assert _files(out) == {name: b"my own file\n"}
    with pytest.raises(SystemExit, match="data_gen: error: .*not written by data_gen"):  # the CLI: no traceback
        run(["--output_dir", str(out), *SMALL])


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    out = tmp_path / "data"
    out.write_text("x")
    with pytest.raises(generate.OutputDirError, match="is a file"):
        main(["--output_dir", str(out), *SMALL])
    assert out.read_text() == "x"


@pytest.mark.parametrize("kind, row, label", [
    ("sft", {"messages": [U, A, U, A]}, "single_turn"),
    ("sft", {"messages": [U, {"role": "tool", "content": "exit 0"}, A]}, "multi_turn"),
    ("sft", {"messages": [{"role": "system", "content": "Be brief."}, U, A]}, "single_turn"),
    ("sft", {"messages": [U, A]}, "system_prompt"),
    ("sft", {"messages": [U, A]}, "poetry"),
    ("dpo", {"prompt": [U, A, U], "chosen": "Sure.", "rejected": "No."}, "json"),
])
def test_mislabelled_format_is_a_bad_row(tmp_path, kind, row, label):
    path = tmp_path / f"{kind}.jsonl"
    path.write_text(json.dumps({"messages": [U, A]}) + "\n" if kind == "sft" else
                    json.dumps({"prompt": [U], "chosen": "Sure.", "rejected": "No."}) + "\n")
    path.write_text(path.read_text() + json.dumps({**row, "format": label}) + "\n")
    with pytest.raises(BadRowError, match=rf"{kind}\.jsonl:2: .*format"):
        main(["--output_dir", str(tmp_path / "out"), f"--extra_{kind}_jsonl", str(path),
              "--heldout_formats", "agentic", *SMALL])


def test_mislabelled_rows_are_skipped_and_counted(tmp_path):
    path = tmp_path / "sft.jsonl"
    rows = [{"messages": [U, A]}, {"messages": [U, A, U, A], "format": "single_turn"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    main(["--output_dir", str(out), "--extra_sft_jsonl", str(path), "--skip_bad_rows", "true", *SMALL])
    train = [json.loads(line) for line in (out / "jsonl" / "sft_train.jsonl").read_text().splitlines()]
    assert [r["format"] for r in train if r["trait"] == "user"] == ["single_turn"]
    assert read_record(out)["skipped_user_rows"] == {str(path): 1}


def test_matching_format_labels_are_kept(tmp_path):
    path = tmp_path / "sft.jsonl"
    rows = [{"messages": [U, A], "format": "json"}, {"messages": [U, A, U, A], "format": "multi_turn"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    main(["--output_dir", str(out), "--extra_sft_jsonl", str(path), "--heldout_formats", "agentic", *SMALL])
    train = [json.loads(line) for line in (out / "jsonl" / "sft_train.jsonl").read_text().splitlines()]
    assert sorted(r["format"] for r in train if r["trait"] == "user") == ["json", "multi_turn"]


def test_non_utf8_jsonl_names_file_and_line_and_can_be_skipped(tmp_path):
    path = tmp_path / "sft.jsonl"
    good = json.dumps({"messages": [U, A]}).encode()
    path.write_bytes(good + b"\n" + b'{"messages": "caf\xe9"}\n' + good + b"\n")
    with pytest.raises(BadRowError, match=r"sft\.jsonl:2: not valid UTF-8"):
        main(["--output_dir", str(tmp_path / "out"), "--extra_sft_jsonl", str(path), *SMALL])
    out = tmp_path / "out"
    main(["--output_dir", str(out), "--extra_sft_jsonl", str(path), "--skip_bad_rows", "true", *SMALL])
    assert read_record(out)["skipped_user_rows"] == {str(path): 1}


@pytest.mark.parametrize("placeholder", ["{}", "{0}"])
def test_empty_placeholder_fails_spec_validation(tmp_path, placeholder):
    data = yaml.safe_load((BUILTIN_DIR / "care.yaml").read_text())
    data["templates"]["chosen"].append(f"Here is {placeholder} for you.")
    path = tmp_path / "mytrait.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as e:
        load_trait_spec(path)
    assert str(path) in str(e.value) and "templates.chosen" in str(e.value) and placeholder in str(e.value)


@pytest.mark.parametrize("args, needle", [
    (["--eval_id_per_trait", "0"], "eval_id_per_trait"),
    (["--eval_ood_per_axis_per_trait", "0"], "dpo eval_ood"),
    (["--sft_train_per_trait", "0"], "sft train"),
])
def test_empty_split_fails_before_writing(tmp_path, args, needle):
    out = tmp_path / "out"
    with pytest.raises((ValueError, SystemExit)) as e:
        main(["--output_dir", str(out), *SMALL, *args])
    assert needle in str(e.value) and "Keys mismatch" not in str(e.value)
    assert not out.exists()


# A run killed between its two renames (old dataset out, new one in) loses nothing: the next run puts the old
# dataset back before it looks at the folder.
def test_death_between_the_renames_is_undone_by_the_next_run(tmp_path, monkeypatch):
    out = tmp_path / "data"
    main(["--output_dir", str(out), "--seed", "0", *SMALL])
    before = _files(out)
    real_replace, calls = os.replace, []

    def die_after_first_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the old dataset is out, the new one not yet in
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)
    monkeypatch.setattr(generate.os, "replace", die_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        main(["--output_dir", str(out), "--seed", "1", *SMALL])
    monkeypatch.undo()
    assert not out.exists() and _files(generate.previous_dir(out)) == before  # the state a kill leaves

    generate.check_output_dir(out)  # what every run does first
    assert _files(out) == before and not generate.previous_dir(out).exists()
    main(["--output_dir", str(out), "--seed", "1", *SMALL])
    assert read_record(out)["seed"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_leftover_of_a_finished_swap_is_removed(tmp_path):
    out, previous = tmp_path / "data", generate.previous_dir(tmp_path / "data")
    main(["--output_dir", str(out), "--seed", "0", *SMALL])
    previous.mkdir()
    (previous / "stale").write_text("old")
    generate.check_output_dir(out)
    assert not previous.exists() and read_record(out)["seed"] == 0
