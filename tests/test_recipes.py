"""Every recipe and accelerate config in the repo loads and validates (pinned versions drift silently)."""

from pathlib import Path

import pytest
import yaml

from train import dpo, sft
from train.recipe import parse_recipe, recipe_parser, validate_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ACCELERATE_CONFIGS = sorted((RECIPES / "accelerate_configs").glob("*.yaml"))
STAGE_RECIPES = sorted(p for p in RECIPES.rglob("*.yaml") if p.parent.name != "accelerate_configs")
TRAIN_MODULES = {"sft": sft, "dpo": dpo}


def _stage(path: Path) -> str:
    return path.stem.split("_")[0]  # sft.yaml, sft_lora.yaml, dpo_qlora.yaml, data.yaml, eval.yaml


def test_every_recipe_belongs_to_a_known_stage():
    assert STAGE_RECIPES, "no recipes found"
    unknown = [str(p) for p in STAGE_RECIPES if _stage(p) not in ("sft", "dpo", "data", "eval")]
    assert not unknown, f"recipes whose stage cannot be told from the file name: {unknown}"


def _parser(stage: str):
    """Every stage's parser is the kernel's `recipe_parser` over the stage's dataclasses."""
    if stage in TRAIN_MODULES:
        return TRAIN_MODULES[stage].make_parser()
    if stage == "data":
        from data_gen.generate import DataGenConfig
        from data_gen.teacher import TeacherConfig

        return recipe_parser((DataGenConfig, TeacherConfig), "data")
    from eval.config import make_parser

    return make_parser()


@pytest.mark.parametrize("path", STAGE_RECIPES, ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe_is_valid(path):
    stage = _stage(path)
    parser = _parser(stage)
    config = validate_recipe(path, parser.dataclass_types)
    if stage not in TRAIN_MODULES:
        parse_recipe(parser, ["--config", str(path)])
        return
    assert config.get("use_peft") is True, "the pipeline trains LoRA adapters"
    assert config.get("output_dir"), "a recipe names its output_dir"
    if config.get("bf16") is not True and not config.get("load_in_4bit"):
        # Recipes that run on a CPU are built here in full (GPU ones fail TrainingArguments' bf16 check).
        script_args, training_args, model_args = parse_recipe(parser, ["--config", str(path)])
        assert training_args.output_dir == config["output_dir"]
    if config.get("load_in_4bit"):
        assert config.get("dtype") in ("bfloat16", "float16"), "4-bit layers need a half-precision compute dtype"


@pytest.mark.parametrize("folder", sorted({p.parent for p in STAGE_RECIPES if _stage(p) == "dpo"}), ids=str)
def test_dpo_recipes_continue_an_sft_adapter_of_the_same_base(folder):
    for dpo_path in folder.glob("dpo*.yaml"):
        dpo_cfg = yaml.safe_load(dpo_path.read_text())
        sft_cfg = yaml.safe_load((folder / dpo_path.name.replace("dpo", "sft")).read_text())
        assert dpo_cfg["sft_adapter"] == sft_cfg["output_dir"], dpo_path
        assert dpo_cfg["model_name_or_path"] == sft_cfg["model_name_or_path"], dpo_path
        assert dpo_cfg.get("load_in_4bit", False) == sft_cfg.get("load_in_4bit", False), dpo_path


ACCELERATE_KEYS = {"compute_environment", "distributed_type", "mixed_precision", "num_machines", "num_processes"}


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_is_valid(path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    raw = yaml.safe_load(path.read_text())
    assert ACCELERATE_KEYS <= raw.keys(), f"{path.name}: missing {ACCELERATE_KEYS - raw.keys()}"
    config = ClusterConfig.from_yaml_file(str(path))  # accelerate's own loader: rejects unknown keys
    assert config.distributed_type in set(DistributedType), path.name
    if config.num_machines > 1:
        assert config.main_process_ip and config.main_process_port, "multi-node needs the main process address"
    if config.distributed_type == DistributedType.NO:
        assert config.num_processes == 1
    else:
        assert config.num_processes >= 2


def test_the_configs_the_docs_promise_exist():
    names = {p.stem for p in ACCELERATE_CONFIGS}
    assert {"cpu", "single_gpu", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3", "multi_node"} <= names


def test_unknown_accelerate_key_is_rejected(tmp_path):
    from accelerate.commands.config.config_args import ClusterConfig

    bad = tmp_path / "bad.yaml"
    bad.write_text((RECIPES / "accelerate_configs/ddp.yaml").read_text() + "num_proceses: 4\n")
    with pytest.raises(Exception, match="num_proceses"):
        ClusterConfig.from_yaml_file(str(bad))
