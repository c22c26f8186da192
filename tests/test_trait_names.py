"""Trait names come from dataset rows and spec files and pick files by name: only plain names are accepted."""

from pathlib import Path

import pytest
import yaml

from data_gen.spec import BUILTIN_DIR, SpecError, load_trait_spec
from eval.trait_specs import load_specs


def _spec_copy(tmp_path, **changes) -> Path:
    data = {**yaml.safe_load((BUILTIN_DIR / "care.yaml").read_text()), **changes}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_spec_name_must_be_a_plain_name(tmp_path):
    with pytest.raises(SpecError, match="field 'name' must be lower-case"):
        load_trait_spec(_spec_copy(tmp_path, name="../care"))
    assert load_trait_spec(_spec_copy(tmp_path, name="care_v2")).name == "care_v2"


def test_a_dataset_trait_name_cannot_point_eval_at_a_file(tmp_path):
    planted = _spec_copy(tmp_path)  # a valid spec outside the built-in folder
    with pytest.raises(SpecError, match="not a plain name"):  # a row's trait naming a file would load it
        load_specs([str(planted)], [])
    assert load_specs(["care"], [])["care"].name == "care"
    assert load_specs([], [str(planted)])["care"].path == str(planted)  # a path the recipe lists is still honoured
