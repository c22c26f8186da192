"""A data_gen run killed between its two renames (old dataset out, new one in) loses nothing: the next run puts
the old dataset back before it looks at the folder."""

import os
from pathlib import Path

import pytest

from data_gen import generate
from data_gen.card import read_record
from data_gen.generate import main

SMALL = ["--sft_train_per_trait", "12", "--dpo_train_per_trait", "12", "--eval_id_per_trait", "8",
         "--eval_ood_per_axis_per_trait", "6", "--leakage_embedding_check", "false", "--diversity_sample", "20",
         "--traits", "care"]


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


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
