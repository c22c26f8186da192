"""One adapter per trait: the `traits` recipe key keeps only that trait's rows (what the cross-trait matrix needs
to show interference), fails naming a trait the data lacks, and the report reads which traits an adapter saw."""

from pathlib import Path

import pytest
import yaml
from train_fixtures import write_dataset

from train import dpo, sft
from train.data import load_split

REPO = Path(__file__).resolve().parents[1]


def test_load_split_keeps_only_the_named_traits(tmp_path):
    data = write_dataset(tmp_path / "data", n_train=12)  # three traits, four rows each
    everything = load_split(str(data), "sft", "train", ("messages",))
    only = load_split(str(data), "dpo", "train", ("prompt",), traits=["honesty"])
    assert len(set(everything["trait"])) == 3
    assert set(only["trait"]) == {"honesty"} and len(only) == everything["trait"].count("honesty") == 4
    assert len(load_split(str(data), "sft", "train", ("messages",), limit=3, traits=["care"])) == 3
    listed = ", ".join(sorted(set(everything["trait"])))
    with pytest.raises(ValueError, match=rf"\['kindness'\] not in .*sft.*its traits: {listed}"):
        load_split(str(data), "sft", "train", ("messages",), traits=["care", "kindness"])


def test_sft_trains_on_the_recipe_traits_only(tiny_model_dir, tmp_path, capsys):
    data = write_dataset(tmp_path / "data", n_train=12)
    argv = ["--config", str(REPO / "recipes/smoke/sft.yaml"), "--model_name_or_path", tiny_model_dir,
            "--dataset_name", str(data), "--output_dir", str(tmp_path / "out"), "--traits", "honesty", "--inspect", "12"]
    sft.main(*sft.make_parser().parse_args_and_config(argv))
    shown = [line.split()[2] for line in capsys.readouterr().out.splitlines() if line.startswith("=== example")]
    # train_fixtures gives rows 2, 3, 8, 9 the trait honesty
    assert shown == ["train-0002", "train-0003", "train-0008", "train-0009"]


@pytest.mark.parametrize("trait", ["care", "honesty", "instance_reduction"])
def test_cross_trait_recipes_train_one_trait_each(trait):
    script_args, training_args, _ = sft.make_parser().parse_args_and_config(
        ["--config", str(REPO / f"recipes/cross_trait/sft_{trait}.yaml")])
    assert script_args.traits == [trait]
    evaluated = yaml.safe_load((REPO / "recipes/cross_trait/eval.yaml").read_text())["adapters"]
    assert evaluated[trait] == training_args.output_dir


def test_report_reads_the_traits_an_adapter_saw(tmp_path):
    from eval.report import trained_traits

    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "recipe.yaml").write_text(yaml.safe_dump({"traits": ["care"], "seed": 0}))
    (tmp_path / "dpo").mkdir()
    (tmp_path / "dpo" / "recipe.yaml").write_text(yaml.safe_dump({"traits": ["honesty"], "sft_adapter": str(tmp_path / "sft")}))
    (tmp_path / "all").mkdir()
    (tmp_path / "all" / "recipe.yaml").write_text(yaml.safe_dump({"seed": 0}))
    assert trained_traits(str(tmp_path / "sft")) == ["care"]
    assert trained_traits(str(tmp_path / "dpo")) == ["care", "honesty"]  # DPO continued a care-only SFT
    assert trained_traits(str(tmp_path / "all")) is None
    assert trained_traits(str(tmp_path / "missing")) is None
    assert dpo.make_parser().parse_args_and_config(["--config", str(REPO / "recipes/smoke/dpo.yaml")])[0].traits is None
