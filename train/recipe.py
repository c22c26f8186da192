"""Recipes of every stage: dataclass configs read from YAML plus `--key value` overrides, checked before anything
heavy runs.

A recipe is a flat YAML mapping whose keys are fields of the stage's dataclasses (data_gen's and eval's configs;
for training our script arguments, TRL's `SFTConfig`/`DPOConfig` and `ModelConfig`), read by `TrlParser` with
command-line overrides on top; `--help` lists every field with its help. `TrlParser` turns YAML values into
argparse defaults without checking them and its errors do not name the file, so `validate_recipe` and
`check_command_line` check every key (unknown ones with a close match), type and range first, naming file and key.
A field declares its range in its metadata: `field(default=8, metadata={"help": ..., "min": 1})` ("min"/"max"
inclusive, "gt"/"lt" exclusive), a string field the pattern it must match ("pattern", a regex); its choices are
its type (`typing.Literal[...]`).
"""

import argparse
import copy
import dataclasses
import difflib
import enum
import re
import sys
import types
import typing
import warnings
from pathlib import Path

import yaml

from train.anchor_args import AnchorArguments, PersonaMonitorArguments


class RecipeError(ValueError):
    """A recipe that cannot be run: the message names the file and the key."""


@dataclasses.dataclass
class ScriptArguments(AnchorArguments, PersonaMonitorArguments):
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
    # Speed-ups of the training forward (train/speedups.py), chosen like TRL's loss_type. auto: used where they apply,
    # with a logged reason where not; on: the run stops before training where one cannot apply; off: never used.
    label_only_head: typing.Literal["auto", "on", "off"] = dataclasses.field(
        default="auto", metadata={"help": "Score only labelled positions in the LM head (auto: on CPU)."}
    )
    shared_prompt: typing.Literal["auto", "on", "off"] = dataclasses.field(
        default="auto",
        metadata={"help": "DPO: run each pair's prompt once for both completions (auto: with the label-only head)."},
    )
    unpadded_mlp: typing.Literal["auto", "on", "off"] = dataclasses.field(
        default="auto", metadata={"help": "Run the MLPs on real tokens only (auto: with the label-only head)."}
    )
    keep_freed_memory: typing.Literal["auto", "on", "off"] = dataclasses.field(
        default="auto", metadata={"help": "glibc keeps freed memory for reuse instead of returning it (auto: on CPU)."}
    )
    fused_lora: typing.Literal["auto", "on", "off"] = dataclasses.field(
        default="auto",
        metadata={"help": "Each LoRA linear layer as one autograd node: no input casts, scaling folded into B (auto: on "
                          "CPU; layers with dropout, DoRA or a quantized base keep PEFT's forward)."},
    )
    fused_rms_norm: typing.Literal["auto", "on", "off"] = dataclasses.field(
        default="auto",
        metadata={"help": "Each RMSNorm as one autograd node with a hand-written backward, keeping no fp32 "
                          "intermediates (auto: on CPU; a norm whose output it does not reproduce bit for bit keeps "
                          "its own forward)."},
    )
    fused_attention: typing.Literal["auto", "on", "off"] = dataclasses.field(
        default="auto",
        metadata={"help": "A model running eager attention switches to the same attention as one autograd node: no "
                          "key/value head repeats, probabilities kept in the compute dtype (auto: on CPU; checked "
                          "against the model's own eager attention on the first call)."},
    )
    # auto: faster, less memory, losses as bf16 autocast's with fp32 weights (measured: README "Performance")
    bf16_base: typing.Literal["auto", "on", "off"] = dataclasses.field(
        default="auto",
        metadata={"help": "Load the frozen base weights in bf16 when training runs under bf16 autocast, so they are not "
                          "re-cast in every op (LoRA weights and optimizer state stay fp32, as PEFT keeps them). auto: "
                          "on a CPU, with a float32 recipe dtype (the default)."},
    )


def _without_none(tp):
    """`X | None` -> (X, True); any other annotation -> (tp, False)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = tuple(a for a in args if a is not type(None))
        return (rest[0] if len(rest) == 1 else typing.Union[rest]), True
    return tp, False


def _is_mapping(tp) -> bool:
    return tp is dict or typing.get_origin(tp) is dict


def _reads_yaml(tp) -> bool:
    """A mapping or a list of mappings: HfArgumentParser cannot read these from the command line, so the flag takes
    one YAML flow value (`--adapters "{sft: a, dpo: b}"`)."""
    tp, _ = _without_none(tp)
    args = typing.get_args(tp)
    return _is_mapping(tp) or (typing.get_origin(tp) is list and bool(args) and _is_mapping(args[0]))


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
    if _is_mapping(tp):
        args = typing.get_args(tp)
        return isinstance(value, dict) and (
            not args or all(_type_ok(k, args[0]) and _type_ok(v, args[1]) for k, v in value.items())
        )
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return isinstance(value, str) and value in {m.value for m in tp}
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `2e-4` as a string; the parser converts it, so accept it
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
    base, optional = _without_none(tp)
    if optional:
        return f"{_type_name(base)} or null"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if _is_mapping(tp):
        return f"a mapping of {_type_name(args[0])} to {_type_name(args[1])}" if args else "a mapping"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


BOUNDS = {"min": ">=", "gt": ">", "max": "<=", "lt": "<"}  # metadata key -> the comparison a value must pass
CHECKS = (*BOUNDS, "pattern")  # the metadata keys the parser checks (argparse is not given them)


def _range_text(metadata) -> str:
    """The bounds of a field's metadata, as words ("" when it has none)."""
    bounds = {k: metadata[k] for k in BOUNDS if metadata.get(k) is not None}
    low, high = [k for k in ("min", "gt") if k in bounds], [k for k in ("max", "lt") if k in bounds]
    if len(low) == 1 and len(high) == 1:
        return f"in {'[' if low[0] == 'min' else '('}{bounds[low[0]]}, {bounds[high[0]]}{']' if high[0] == 'max' else ')'}"
    return " and ".join(f"{BOUNDS[k]} {v}" for k, v in bounds.items())


def _out_of_range(value, metadata) -> bool:
    number = float(value) if isinstance(value, str) else value  # a YAML `2e-4`, read as a string
    passes = {"min": number.__ge__, "gt": number.__gt__, "max": number.__le__, "lt": number.__lt__}
    return any(metadata.get(k) is not None and not passes[k](metadata[k]) for k in BOUNDS)


def _fields(dataclass_types) -> dict:
    """Field name -> (owning dataclass, annotation, metadata) over all of a stage's dataclasses."""
    fields = {}
    for cls in dataclass_types:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init:
                fields.setdefault(f.name, (cls.__name__, _TYPE_OVERRIDES.get(f.name, hints[f.name]), f.metadata))
    return fields


def _unknown_key(source: str, key, fields: dict, dataclass_types) -> RecipeError:
    close = difflib.get_close_matches(str(key), list(fields), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    owners = ", ".join(c.__name__ for c in dataclass_types)
    return RecipeError(f"{source}: unknown key '{key}' (not a field of {owners}){hint}")


def _check_value(source: str, key: str, value, field: tuple) -> None:
    """Type, then the range a field declares in its metadata (`"min"`/`"max"` inclusive, `"gt"`/`"lt"` exclusive)
    and, for a string, the regex it must match in full (`"pattern"`)."""
    owner, tp, metadata = field
    if not _type_ok(value, tp):
        raise RecipeError(
            f"{source}: key '{key}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__}) [{owner}.{key}]"
        )
    if value is None or not any(metadata.get(k) is not None for k in CHECKS):
        return
    pattern = metadata.get("pattern")
    if pattern is not None and not (isinstance(value, str) and re.fullmatch(pattern, value)):
        raise RecipeError(f"{source}: key '{key}' must match {pattern}, got {value!r}")
    if pattern is None and _out_of_range(value, metadata):
        null = " (or null)" if _without_none(tp)[1] else ""
        raise RecipeError(f"{source}: key '{key}' must be {_range_text(metadata)}{null}, got {value!r}")


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
    fields = _fields(dataclass_types)
    for key, value in config.items():
        if key == "env":
            if not isinstance(value, dict):
                raise RecipeError(f"{path}: key 'env' must be a mapping of environment variables")
            continue
        if key not in fields:
            raise _unknown_key(str(path), key, fields, dataclass_types)
        _check_value(str(path), key, value, fields[key])
    return config


# The command line: `--key value`; a list field takes space-separated values (`--traits care honesty`) or one YAML
# flow list (`--traits "[care, honesty]"`); a mapping field one YAML flow mapping; `null` clears an optional number.

_TRUE, _FALSE = {"yes", "true", "t", "y", "1"}, {"no", "false", "f", "n", "0"}  # HfArgumentParser's string_to_bool
_UNCHECKED = object()


def _flags(argv: list[str]) -> list[tuple[str | None, list[str], bool]]:
    """argv as (flag, values, given as --flag=value) groups; a value that is no flag's gets flag None."""
    groups = []
    for arg in argv:
        if arg.startswith("--") or arg == "-h":
            flag, eq, value = arg.partition("=")
            groups.append((flag, [value] if eq else [], bool(eq)))
        elif groups and not groups[-1][2]:
            groups[-1][1].append(arg)
        else:
            groups.append((None, [arg], False))
    return groups


def _flow_list(values: list[str]) -> list:
    if len(values) == 1 and values[0].lstrip().startswith("["):
        try:
            items = yaml.load(values[0], Loader=yaml.BaseLoader)  # items stay strings: the flag's type converts them
        except yaml.YAMLError:
            return values
        if isinstance(items, list):
            return items
    return values


def _scalar(text: str, tp):
    if tp is bool:
        return True if text.lower() in _TRUE else False if text.lower() in _FALSE else text
    for number in (int, float):
        if tp is number:
            try:
                return number(text)
            except ValueError:
                return text
    return text


def _command_line_value(values: list[str], tp):
    """The value `--key values...` gives a field annotated `tp`, as YAML would hold it, so it gets the same checks;
    _UNCHECKED where only the parser's own conversion can tell (several values for a union, say)."""
    base, optional = _without_none(tp)
    if optional and base is not str and values in (["null"], ["None"]):
        return None
    if typing.get_origin(base) is list and not _reads_yaml(base):
        item = (typing.get_args(base) or (str,))[0]
        return [_scalar(v, item) if isinstance(v, str) else v for v in _flow_list(values)]
    if len(values) != 1:
        return True if base is bool and not values else _UNCHECKED
    if _reads_yaml(base):
        try:
            return yaml.safe_load(values[0])
        except yaml.YAMLError:
            return values[0]  # refused as the string it is
    return _scalar(values[0], base)


def check_command_line(parser, argv: list[str]) -> None:
    """The recipe's checks for `--key value` overrides: unknown key (with a close match), type, range."""
    fields = _fields(parser.dataclass_types)
    options = parser._option_string_actions  # every spelling: --a_b, --a-b, --no_a_b
    for flag, values, _ in _flags(argv):
        if flag in ("--config", "--help", "-h"):
            continue
        if flag is None:
            raise RecipeError(f"command line: expected --key value, got {values[0]!r}")
        action = options.get(flag)
        if action is None or action.dest not in fields:
            raise _unknown_key("command line", flag[2:].replace("-", "_"), fields, parser.dataclass_types)
        if action.nargs == 0:  # --no_<flag>
            continue
        value = _command_line_value(values, fields[action.dest][1])
        if value is not _UNCHECKED:
            _check_value("command line", action.dest, value, fields[action.dest])


def _or_null(tp):
    def convert(text):
        return None if text in ("null", "None") else tp(text)

    convert.__name__ = tp.__name__  # argparse names the type in its errors
    return convert


# Recipe keys under another name that set a field the hardware may choose
_ALIASES = {"activation_checkpointing": "gradient_checkpointing"}


def asked_keys(argv: list[str]) -> set[str]:
    """The fields a command line and its `--config` recipe set (`--no_x` sets x)."""
    keys = set()
    path = config_path_from_argv(argv)
    if path:
        config = yaml.safe_load(open(path).read()) or {}
        keys |= set(config) if isinstance(config, dict) else set()
    for arg in argv:
        if arg.startswith("--"):
            name = arg[2:].split("=", 1)[0].replace("-", "_")
            keys |= {name, name[3:]} if name.startswith("no_") else {name}
    return keys | {_ALIASES[k] for k in keys if k in _ALIASES}


def recipe_parser(dataclass_types, description: str, prog: str | None = None, epilog: str | None = None,
                  chosen_defaults: dict[str, tuple] | None = None):
    """The parser of every stage: TRL's (`--config recipe.yaml`, then `--key value` overrides, per-field `--help`),
    reading the command line as described above. `--dataset_path` is read as `--dataset_name` where both exist:
    the alias given on the command line must beat the recipe's dataset_name, as any flag beats the recipe.

    `chosen_defaults` (field -> (value, why)) sit under the recipe and the flags; a parsed ScriptArguments gets
    `hardware_chosen`, those of them neither set."""
    from trl import TrlParser

    chosen_defaults = dict(chosen_defaults or {})

    class RecipeParser(TrlParser):
        @staticmethod
        def _parse_dataclass_field(parser, field):
            field = copy.copy(field)  # HfArgumentParser rewrites field.type; the dataclass keeps its own
            metadata = {k: v for k, v in field.metadata.items() if k not in CHECKS}  # not argparse's
            bounds = _range_text(field.metadata)
            if bounds:
                metadata["help"] = f"{metadata.get('help', '')} Must be {bounds}.".strip()
            if field.metadata.get("pattern") is not None:
                metadata["help"] = f"{metadata.get('help', '')} Must match {field.metadata['pattern']}.".strip()
            if "help" in metadata:  # argparse %-formats help: a literal "60%" in our text would crash --help
                metadata["help"] = re.sub(r"(?<!%)%(?![%(])", "%%", metadata["help"])
            field.metadata = types.MappingProxyType(metadata)
            names = [f"--{field.name}", *([f"--{field.name.replace('_', '-')}"] if "_" in field.name else [])]
            if _reads_yaml(field.type):
                default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
                parser.add_argument(*names, type=yaml.safe_load, default=default, metavar="YAML",
                                    help=metadata.get("help"))
                return
            base, optional = _without_none(field.type)
            TrlParser._parse_dataclass_field(parser, field)
            if optional and base in (int, float):
                parser._actions[-1].type = _or_null(base)
            item = typing.get_args(base)[0] if typing.get_origin(base) is list and typing.get_args(base) else None
            if typing.get_origin(item) is typing.Literal:  # a list of choices: HfArgumentParser would call the Literal
                parser._actions[-1].type, parser._actions[-1].choices = str, typing.get_args(item)

        def parse_args_and_config(self, args=None, *rest, **kwargs):
            args = list(sys.argv[1:] if args is None else args)
            options = self._option_string_actions
            out = []
            for flag, values, inline in _flags(args):
                if flag == "--dataset_path" and "--dataset_name" in options:
                    flag = "--dataset_name"
                action = options.get(flag)
                if action is not None and action.nargs == "+" and not inline:
                    values = [str(v) for v in _flow_list(values)]
                out += [f"{flag}={values[0]}"] if inline else [*([flag] if flag else []), *values]
            parsed = super().parse_args_and_config(out, *rest, **kwargs)
            asked = asked_keys(args)
            for cfg in parsed:
                if isinstance(cfg, ScriptArguments):
                    cfg.hardware_chosen = {key: c for key, c in chosen_defaults.items() if key not in asked}
            return parsed

    parser = RecipeParser(dataclass_types, description=description, prog=prog, epilog=epilog)
    parser.set_defaults(**{key: value for key, (value, _) in chosen_defaults.items()})
    # TrlParser takes --config out of argv before argparse sees it: listed for --help only, never parsed.
    parser.add_argument("--config", default=argparse.SUPPRESS, help="YAML recipe; --key value flags override its values.")
    return parser


def config_path_from_argv(argv: list[str]) -> str | None:
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise RecipeError("--config needs a path to a YAML recipe")
        return argv[i + 1]
    return None


def parse_recipe(parser, argv: list[str] | None = None):
    """Check the `--config` recipe and the command line, then parse both with `parser` (from `recipe_parser`).

    The dataclasses' own `__post_init__` checks (between fields) become RecipeErrors naming the recipe.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = config_path_from_argv(argv)
    if config_path is not None:
        config = validate_recipe(config_path, parser.dataclass_types)
        if "dataset_name" in config and "dataset_path" in config:
            raise RecipeError(f"{config_path}: set dataset_name or its alias dataset_path, not both")
    check_command_line(parser, argv)
    try:
        parsed = parser.parse_args_and_config(argv)
    except ValueError as err:
        raise RecipeError(f"{config_path or 'command line'}: {err}") from None
    # TrainingArguments' push_to_hub is a bool (data_gen's is the repo id it publishes to itself).
    if any(getattr(args, "push_to_hub", None) is True for args in parsed):
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
