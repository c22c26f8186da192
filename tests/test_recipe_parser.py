"""One recipe system for every stage: the same YAML and `--key value` grammar, the same checks and errors, per-field
`--help` (train/recipe.py is the kernel; data_gen and eval parse through it)."""

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from data_gen.generate import DataGenConfig
from data_gen.recipe import parse_recipe as data_gen_recipe
from data_gen.teacher import TeacherConfig
from eval.config import load_config
from train.recipe import RecipeError, parse_recipe, recipe_parser

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Toy:
    """A config of every kind of field the stages use."""

    count: int = field(default=2, metadata={"help": "How many.", "min": 1})
    share: float = field(default=0.5, metadata={"help": "A share.", "min": 0, "max": 1})
    limit: int | None = field(default=None, metadata={"help": "A cap (null: none).", "min": 1})
    names: list[str] = field(default_factory=list, metadata={"help": "Some names."})
    paths: dict[str, str] = field(default_factory=dict, metadata={"help": "Name -> path."})
    sets: list[dict[str, str]] = field(default_factory=list, metadata={"help": "Mappings."})
    switch: bool = field(default=False, metadata={"help": "A switch."})
    wait: float = field(default=1.0, metadata={"help": "Seconds.", "gt": 0})
    part: float = field(default=0.5, metadata={"help": "An open share.", "gt": 0, "lt": 1})
    mode: Literal["fast", "slow"] = field(default="fast", metadata={"help": "A choice."})
    modes: list[Literal["fast", "slow"]] = field(default_factory=list, metadata={"help": "Choices."})
    url: str = field(default="http://x", metadata={"help": "An address.", "pattern": r"https?://.+"})

    def __post_init__(self):
        if self.switch and not self.names:
            raise RecipeError("switch needs names")


def toy(argv, tmp_path=None, recipe=None):
    if recipe is not None:
        path = tmp_path / "toy.yaml"
        path.write_text(recipe)
        argv = ["--config", str(path), *argv]
    (cfg,) = parse_recipe(recipe_parser((Toy,), "toy"), argv)
    return cfg


# Stage -> parse(argv, recipe_path) -> the config holding the stage's fields
STAGES = {
    "data_gen": lambda argv: data_gen_recipe((DataGenConfig, TeacherConfig), argv)[0],
    "eval": lambda argv: load_config(None, ["--dataset_path", "x", *argv]),
}


def test_the_command_line_grammar():
    cfg = toy(["--count", "3", "--names", "a", "b", "--paths", "{sft: a/sft, dpo: a/dpo}", "--sets", "[{x: y}]", "--switch"])
    assert (cfg.count, cfg.names, cfg.paths, cfg.sets, cfg.switch) == (3, ["a", "b"], {"sft": "a/sft", "dpo": "a/dpo"},
                                                                  [{"x": "y"}], True)
    assert toy(["--names", "[a, b c]"]).names == ["a", "b c"]  # one YAML flow list is the same list
    assert toy(["--share", "2e-1", "--limit", "4"]).share == pytest.approx(0.2)
    assert toy(["--limit", "null"]).limit is None
    assert toy(["--switch=true", "--names", "a"]).switch is True


def test_the_command_line_beats_the_recipe_and_yaml_floats_without_a_dot_are_floats(tmp_path):
    cfg = toy(["--count", "5"], tmp_path, "count: 4\nshare: 2e-1\nnames: [a]\n")
    assert (cfg.count, cfg.share, cfg.names) == (5, pytest.approx(0.2), ["a"])
    assert isinstance(cfg.share, float)


@pytest.mark.parametrize("recipe, argv, message", [
    ("cuont: 3\n", [], r"toy.yaml: unknown key 'cuont' \(not a field of Toy\); did you mean 'count'\?"),
    (None, ["--cuont", "3"], r"command line: unknown key 'cuont' \(not a field of Toy\); did you mean 'count'\?"),
    ("count: three\n", [], r"toy.yaml: key 'count' must be int, got 'three' \(str\)"),
    (None, ["--count", "three"], r"command line: key 'count' must be int, got 'three' \(str\)"),
    ("count: 0\n", [], r"toy.yaml: key 'count' must be >= 1, got 0"),
    (None, ["--count", "0"], r"command line: key 'count' must be >= 1, got 0"),
    ("share: 1.5\n", [], r"toy.yaml: key 'share' must be in \[0, 1\], got 1.5"),
    ("limit: 0\n", [], r"toy.yaml: key 'limit' must be >= 1 \(or null\), got 0"),
    ("names: a\n", [], r"toy.yaml: key 'names' must be a list of str"),
    ("paths: [a, b]\n", [], r"toy.yaml: key 'paths' must be a mapping of str to str"),
    (None, ["--paths", "[a, b]"], r"command line: key 'paths' must be a mapping of str to str"),
    ("switch: true\n", [], r"toy.yaml: switch needs names"),  # __post_init__, named by the recipe
    (None, ["stray"], r"command line: expected --key value, got 'stray'"),
    ("wait: 0\n", [], r"toy.yaml: key 'wait' must be > 0, got 0"),
    (None, ["--wait", "-1"], r"command line: key 'wait' must be > 0, got -1"),
    ("part: 1\n", [], r"toy.yaml: key 'part' must be in \(0, 1\), got 1"),
    ("mode: medium\n", [], r"toy.yaml: key 'mode' must be one of 'fast', 'slow', got 'medium'"),
    (None, ["--modes", "fast", "medium"], r"command line: key 'modes' must be a list of one of 'fast', 'slow'"),
    ("url: ftp://x\n", [], r"toy.yaml: key 'url' must match https\?://\.\+, got 'ftp://x'"),
])
def test_one_error_names_file_or_command_line_and_key(tmp_path, recipe, argv, message):
    with pytest.raises(RecipeError, match=message):
        toy(argv, tmp_path, recipe)


def test_exclusive_bounds_choices_and_patterns_accept_what_they_allow():
    cfg = toy(["--wait", "1e-3", "--part", "0.99", "--mode", "slow", "--modes", "slow", "fast", "--url", "https://y"])
    assert (cfg.wait, cfg.part, cfg.mode, cfg.modes, cfg.url) == (pytest.approx(1e-3), 0.99, "slow", ["slow", "fast"],
                                                                  "https://y")


def test_a_range_declared_in_metadata_is_in_the_help():
    text = " ".join(recipe_parser((Toy,), "toy").format_help().split())
    assert "How many. Must be >= 1." in text and "A share. Must be in [0, 1]." in text
    assert "Seconds. Must be > 0." in text and "An open share. Must be in (0, 1)." in text
    assert "An address. Must match https?://.+." in text
    assert "--config" in text


def test_recipe_error_is_a_value_error():
    assert issubclass(RecipeError, ValueError)


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_reads_the_same_grammar(stage, tmp_path):
    parse = STAGES[stage]
    if stage == "data_gen":
        cfg = parse(["--traits", "care", "honesty", "--seed", "3", "--eval_item_fraction", "2e-1"])
        assert (cfg.traits, cfg.seed, cfg.eval_item_fraction) == (["care", "honesty"], 3, pytest.approx(0.2))
        assert parse(["--traits", "[care, honesty]"]).traits == ["care", "honesty"]
    else:
        cfg = parse(["--suites", "preference", "probes", "--batch_size", "4", "--generation_timeout", "2e-4",
                     "--adapters", "{sft: S/sft, dpo: S/dpo}"])
        assert (cfg.suites, cfg.batch_size, cfg.adapters) == (["preference", "probes"], 4, {"sft": "S/sft", "dpo": "S/dpo"})
        assert cfg.generation_timeout == pytest.approx(2e-4)
        assert parse(["--suites", "[preference, probes]"]).suites == ["preference", "probes"]
        assert parse(["--max_pairs_per_split", "null"]).max_pairs_per_split is None


@pytest.mark.parametrize("stage, recipe, typo", [
    ("data_gen", "sede: 1\n", r"unknown key 'sede' .*did you mean 'seed'\?"),
    ("eval", "batch_sise: 4\n", r"unknown key 'batch_sise' .*did you mean 'batch_size'\?"),
    ("sft", "lerning_rate: 0.1\n", r"unknown key 'lerning_rate' .*did you mean 'learning_rate'\?"),
])
def test_every_stage_names_a_typo_and_its_close_match(stage, recipe, typo, tmp_path):
    from train import sft

    path = tmp_path / "r.yaml"
    path.write_text(recipe)
    parse = {**STAGES, "sft": lambda argv: parse_recipe(sft.make_parser(), argv)}[stage]
    with pytest.raises(RecipeError, match=rf"{path}: {typo}"):
        parse(["--config", str(path)])
    flag = "--" + recipe.split(":")[0]
    with pytest.raises(RecipeError, match=rf"command line: {typo}"):
        parse([flag, "1"])


@pytest.mark.parametrize("stage, recipe", [
    ("data_gen", "temperature: 2e-1\neval_item_fraction: 2e-1\n"),  # TeacherConfig's and DataGenConfig's floats
    ("eval", "generation_timeout: 2e-1\ndataset_path: x\n"),
])
def test_yaml_floats_like_2e_minus_4_are_read_by_data_gen_and_eval(stage, recipe, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(recipe)
    if stage == "data_gen":
        cfg, teacher = data_gen_recipe((DataGenConfig, TeacherConfig), ["--config", str(path)])
        assert cfg.eval_item_fraction == teacher.temperature == pytest.approx(0.2)
    else:
        assert load_config(str(path)).generation_timeout == pytest.approx(0.2)


def test_dataset_path_is_an_alias_in_train_and_a_field_of_its_own_in_eval():
    from train import sft

    script_args, _, _ = parse_recipe(sft.make_parser(), ["--config", str(REPO / "recipes/smoke/sft.yaml"),
                                                         "--dataset_path", "elsewhere"])
    assert script_args.dataset_name == "elsewhere"
    assert load_config(None, ["--dataset_path", "elsewhere"]).dataset_path == "elsewhere"


@pytest.mark.subprocess
def test_every_stage_prints_per_field_help():
    commands = {
        "data_gen": ("seed", "Same seed, byte-identical JSONL."),
        "eval": ("batch_size", "Sequences per forward pass. Must be >= 1."),
        "train.sft": ("dataset_path", "Alias of dataset_name"),
    }
    for module, (key, help_text) in commands.items():
        proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert proc.returncode == 0, proc.stderr
        assert f"--{key}" in proc.stdout and help_text in " ".join(proc.stdout.split()), module


def test_help_text_may_hold_a_percent_sign():
    import dataclasses

    from train.recipe import recipe_parser

    @dataclasses.dataclass
    class Args:
        share: float = dataclasses.field(default=0.5, metadata={"help": "scores 60% on the default set", "min": 0})

    assert "scores 60% on the default set" in recipe_parser((Args,), "d").format_help()
