"""YAML recipes: TRL-style configs checked against their dataclasses before anything heavy runs.

A recipe is a flat YAML mapping whose keys are fields of the stage's dataclasses (our script
arguments, TRL's `SFTConfig`/`DPOConfig`, TRL's `ModelConfig`), read by `TrlParser` with CLI overrides
on top. `TrlParser` turns YAML values into argparse defaults without checking them and its errors do
not name the file, so `validate_recipe` checks every key and value first and names file and key.
"""

import dataclasses
import difflib
import enum
import sys
import types
import typing
import warnings
from pathlib import Path

import yaml


class RecipeError(ValueError):
    """A recipe that cannot be run: the message names the file and the key."""


@dataclasses.dataclass
class ScriptArguments:
    """Arguments of our training scripts that are not TRL's (TRL's live in SFTConfig/DPOConfig/ModelConfig).

    `dataset_name`, `dataset_config`, `dataset_train_split` and `dataset_test_split` mean what they mean in TRL's
    ScriptArguments (`trl sft`); `dataset_path` is the older name of `dataset_name` and still accepted.
    """

    dataset_name: str | None = dataclasses.field(
        default=None,
        metadata={"help": "Folder written by `python -m data_gen` (holds sft/ and dpo/), or the Hub id it was pushed "
                          "to. Default: dataset_path."},
    )
    dataset_config: str | None = dataclasses.field(
        default=None, metadata={"help": "Which part of the dataset: 'sft' or 'dpo' (default: the stage's own)."}
    )
    dataset_path: str = dataclasses.field(
        default="runs/quickstart/data",
        metadata={"help": "Alias of dataset_name (the data_gen output folder)."},
    )
    dataset_train_split: str = dataclasses.field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = dataclasses.field(
        default="eval_id",
        metadata={"help": "Held-out split evaluated during training when eval_strategy is not 'no' (eval loss; DPO "
                          "also logs eval rewards and reward accuracies)."},
    )
    max_train_examples: int | None = dataclasses.field(
        default=None, metadata={"help": "Use only the first N training examples (quick experiments)."}
    )
    traits: list[str] | None = dataclasses.field(
        default=None,
        metadata={"help": "Train on these traits' rows only (default: all). One adapter per trait is what lets the "
                          "cross-trait matrix show interference."},
    )
    experiment: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Experiment name: groups the W&B runs of all stages (default: the name of output_dir's parent)."
        },
    )
    wandb_project: str = dataclasses.field(default="persona-pipeline", metadata={"help": "W&B project."})
    inspect: int = dataclasses.field(
        default=0,
        metadata={"help": "Print the first N examples token by token with their labels, then exit without training."},
    )


def _type_ok(value, tp) -> bool:
    """Whether a YAML value can fill a field annotated `tp` (unknown annotations are accepted)."""
    if tp is typing.Any:
        return True
    if tp is type(None):
        return value is None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums and isinstance(value, str):  # `SaveStrategy | str`: the str is the enum's value from the CLI
            return any(_type_ok(value, e) for e in enums)
        return any(_type_ok(value, arg) for arg in args)
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value) if args else isinstance(value, list)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return isinstance(value, str) and value in {m.value for m in tp}
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `2e-4` as a string; TrlParser converts it, so accept it
            try:
                float(value)
                return True
            except ValueError:
                return False
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return True


# Fields accepted more loosely than their annotation says: `resume_from_checkpoint: true` resumes from
# the last checkpoint in output_dir (annotated as a path), and TRL's own recipes write
# `lora_target_modules: all-linear` (annotated as a list; PEFT takes the string).
_TYPE_OVERRIDES = {"resume_from_checkpoint": str | bool | None, "lora_target_modules": list[str] | str | None}


def _type_name(tp) -> str:
    enums = [a for a in typing.get_args(tp) if isinstance(a, type) and issubclass(a, enum.Enum)]
    if enums:
        return _type_name(enums[0])
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def validate_recipe(path: str | Path, dataclass_types) -> dict:
    """Load a recipe and check every key and value against `dataclass_types`; return the mapping.

    Raises RecipeError naming the file and the offending key (with a close match for typos).
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(config, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping of field: value")
    fields = {}
    for cls in dataclass_types:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init:
                fields.setdefault(f.name, (cls.__name__, _TYPE_OVERRIDES.get(f.name, hints[f.name])))
    for key, value in config.items():
        if key == "env":
            if not isinstance(value, dict):
                raise RecipeError(f"{path}: key 'env' must be a mapping of environment variables")
            continue
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            owners = ", ".join(c.__name__ for c in dataclass_types)
            raise RecipeError(f"{path}: unknown key '{key}' (not a field of {owners}){hint}")
        owner, tp = fields[key]
        if not _type_ok(value, tp):
            raise RecipeError(
                f"{path}: key '{key}' has value {value!r} ({type(value).__name__}), "
                f"expected {_type_name(tp)} ({owner}.{key})"
            )
    return config


def recipe_parser(dataclass_types, description: str):
    """TRL's parser, with `--dataset_path` read as `--dataset_name`: the alias given on the command line must beat
    the recipe's dataset_name, as any flag beats the recipe."""
    from trl import TrlParser

    class RecipeParser(TrlParser):
        def parse_args_and_config(self, args=None, *rest, **kwargs):
            args = list(sys.argv[1:] if args is None else args)
            args = ["--dataset_name" if a == "--dataset_path" else a for a in args]
            return super().parse_args_and_config(args, *rest, **kwargs)

    return RecipeParser(dataclass_types, description=description)


def config_path_from_argv(argv: list[str]) -> str | None:
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise RecipeError("--config needs a path to a YAML recipe")
        return argv[i + 1]
    return None


def parse_recipe(parser, argv: list[str] | None = None):
    """Validate the `--config` recipe, then parse it plus CLI overrides with `parser` (a TrlParser)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = config_path_from_argv(argv)
    if config_path is not None:
        config = validate_recipe(config_path, parser.dataclass_types)
        if "dataset_name" in config and "dataset_path" in config:
            raise RecipeError(f"{config_path}: set dataset_name or its alias dataset_path, not both")
    parsed = parser.parse_args_and_config(argv)
    if any(getattr(args, "push_to_hub", False) for args in parsed):
        # The Trainer would upload the raw output_dir (checkpoints, TRL's ref/ copy) before the recipe and manifest
        # exist, with a card that knows nothing of the eval: publishing has one path, train.publish.
        raise RecipeError(
            f"{config_path or 'command line'}: push_to_hub: true is not supported here; train with push_to_hub: "
            "false, then publish the adapter with `python -m train.publish --adapter <output_dir> --repo_id "
            "<you/name> --report <report.json>` (a checked folder, model card with the eval results)"
        )
    return parsed


def _as_plain(value):
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _as_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_as_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _default(f):
    if f.default is not dataclasses.MISSING:
        return _as_plain(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return _as_plain(f.default_factory())
    return dataclasses.MISSING


# Tokenizer settings that end in `_token` but are vocabulary entries, not credentials.
_TOKENIZER_TOKENS = {"pad_token", "eos_token", "bos_token", "unk_token", "sep_token", "cls_token", "mask_token"}


def is_secret(name: str) -> bool:
    """A credential by its argument name (hub_token, *_token, *_key): never saved, logged or put in W&B."""
    name = name.lstrip("-").replace("-", "_")
    return name.endswith(("_token", "_key")) and name not in _TOKENIZER_TOKENS


def strip_secrets(training_args) -> None:
    """Clear credential fields before a Trainer pickles these args into training_args.bin and every checkpoint.

    hub_token moves to HF_TOKEN (read by huggingface_hub), so a Trainer push still authenticates.
    """
    import os

    for f in dataclasses.fields(training_args):
        if is_secret(f.name) and getattr(training_args, f.name, None):
            if f.name == "hub_token":
                os.environ.setdefault("HF_TOKEN", training_args.hub_token)
            setattr(training_args, f.name, None)


def strip_secret_argv(argv: list[str]) -> None:
    """Remove `--x_token V` / `--x_token=V` from argv in place: W&B records the command line."""
    i = 0
    while i < len(argv):
        flag = argv[i]
        if flag.startswith("--") and is_secret(flag.split("=", 1)[0]):
            del argv[i:i + (1 if "=" in flag else 2)]
        else:
            i += 1


def resolved_recipe(*configs) -> dict:
    """Every field whose value differs from its dataclass default, as one flat recipe mapping.

    Feeding the result back with `--config` reproduces the run. Secrets (`is_secret`) are never written.
    """
    out = {}
    for cfg in configs:
        for f in dataclasses.fields(cfg):
            if not f.init or is_secret(f.name):
                continue
            with warnings.catch_warnings():  # deprecated aliases warn on access
                warnings.simplefilter("ignore")
                value = getattr(cfg, f.name)
            value = _as_plain(value.to_dict() if hasattr(value, "to_dict") else value)
            if f.name == "output_dir" or value != _default(f):
                out[f.name] = value
    return out
