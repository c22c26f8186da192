"""YAML recipe + CLI overrides for config dataclasses, validated before any work starts.

Same convention as TRL's `--config recipe.yaml --key value`, but strict: an unknown key or
a value of the wrong type in the YAML is an error naming the file and the key (TRL silently
accepts a string where an int belongs until something breaks much later).
"""

import argparse
import dataclasses
import types
import typing
from pathlib import Path

import yaml


class RecipeError(ValueError):
    pass


def _unwrap_optional(tp):
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _type_name(tp):
    return getattr(tp, "__name__", str(tp))


def check_value(value, tp, where):
    """Raise RecipeError unless `value` fits the annotation `tp`."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return
        raise RecipeError(f"{where} must be {_type_name(tp)}, got null")
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (object,)
        if not isinstance(value, list):
            raise RecipeError(f"{where} must be a list, got {type(value).__name__}")
        for i, v in enumerate(value):
            check_value(v, item_tp, f"{where}[{i}]")
        return
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp) or (object, object)
        if not isinstance(value, dict):
            raise RecipeError(f"{where} must be a mapping, got {type(value).__name__}")
        for k, v in value.items():
            check_value(k, key_tp, f"{where} key")
            check_value(v, val_tp, f"{where}.{k}")
        return
    if tp is object:
        return
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return
    if tp is int and isinstance(value, bool):
        raise RecipeError(f"{where} must be int, got bool")
    if not isinstance(value, tp):
        raise RecipeError(f"{where} must be {_type_name(tp)}, got {type(value).__name__} ({value!r})")


def _cli_type(tp):
    tp, _ = _unwrap_optional(tp)
    if tp is bool:
        return lambda s: {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[s.lower()]
    if tp in (int, float, str):
        return tp
    return None


def make_recipe_parser(config_types, description, prog=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="YAML recipe; CLI flags override its values")
    for cls in config_types:
        group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().split("\n")[0])
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            base, _ = _unwrap_optional(tp)
            kw = {"dest": f.name, "default": argparse.SUPPRESS, "help": f.metadata.get("help", "")}
            if typing.get_origin(base) is list:
                (item_tp,) = typing.get_args(base)
                kw.update(nargs="*", type=_cli_type(item_tp))
            elif typing.get_origin(base) is dict:
                kw.update(type=yaml.safe_load)  # e.g. --counts '{care: 10}'
            else:
                kw.update(type=_cli_type(tp))
            group.add_argument(f"--{f.name}", **kw)
    return parser


def parse_recipe(config_types, argv=None, description="", prog=None):
    """Returns one instance per dataclass in `config_types`, from --config YAML plus CLI overrides."""
    parser = make_recipe_parser(config_types, description, prog)
    args = vars(parser.parse_args(argv))
    config_path = args.pop("config", None)
    values = {}
    if config_path:
        path = Path(config_path)
        if not path.exists():
            raise RecipeError(f"{path}: recipe file not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise RecipeError(f"{path}: a recipe must be a mapping of key: value")
        known = {f.name for cls in config_types for f in dataclasses.fields(cls)}
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise RecipeError(f"{path}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        values.update(loaded)
    values.update(args)
    out = []
    for cls in config_types:
        hints = typing.get_type_hints(cls)
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name in values:
                where = f"{config_path or 'command line'}: key '{f.name}'" if f.name not in args else f"--{f.name}"
                check_value(values[f.name], hints[f.name], where)
                kw[f.name] = values[f.name]
        try:
            out.append(cls(**kw))
        except ValueError as e:  # __post_init__ checks
            raise RecipeError(f"{config_path or 'command line'}: {e}") from None
    return out
