"""Reading the datasets written by data_gen (layout in docs/CONTRACT.md)."""

import logging
import re
from pathlib import Path

from datasets import load_from_disk

from train.contract import PARTS, validate_rows

logger = logging.getLogger(__name__)
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
DEFAULT_DATASET_PATH = "runs/quickstart/data"


def dataset_source(script_args, stage: str) -> tuple[str, str]:
    """(dataset, config) a stage reads: TRL's `dataset_name`/`dataset_config`, or the older `dataset_path`."""
    name, path = script_args.dataset_name, script_args.dataset_path
    if name and path not in (DEFAULT_DATASET_PATH, name):
        logger.warning("dataset_name %s and dataset_path %s both set: reading dataset_name", name, path)
    return name or path, script_args.dataset_config or stage


def load_split(dataset_path: str, kind: str, split: str, required: tuple[str, ...], limit: int | None = None,
               traits: list[str] | None = None):
    """`<dataset_path>/<kind>` split `split`, checked for the columns the stage needs and the contract's values
    (train/contract.py); only the rows of `traits` when given (one adapter per trait lets the cross-trait matrix
    show interference)."""
    folder = Path(dataset_path) / kind
    if folder.is_dir():
        splits = load_from_disk(str(folder))
    elif not Path(dataset_path).exists() and _HUB_ID.fullmatch(str(dataset_path)):
        from datasets import load_dataset

        # The layout `python -m data_gen` pushes: one config per kind (sft, dpo), one split per data split.
        splits = load_dataset(str(dataset_path), kind)
        folder = f"{dataset_path} (Hub, config {kind!r})"
    else:
        raise FileNotFoundError(
            f"dataset_name: {folder} not found. Point dataset_name (or dataset_path) at the output folder of "
            "`python -m data_gen` (it holds sft/ and dpo/), or at the Hub id it was pushed to."
        )
    if split not in splits:
        raise KeyError(f"{folder}: no split {split!r} (found: {', '.join(splits)})")
    dataset = splits[split]
    # A Hub config named otherwise (a user's own dataset) is read as the part its columns say it is.
    part = kind if kind in PARTS else ("sft" if "messages" in required else "dpo")
    validate_rows(dataset, part, f"{folder} split {split!r}", required=required, split=split)
    if len(dataset) == 0:
        raise ValueError(f"{folder} split {split!r} is empty")
    if traits is not None:
        dataset = _only_traits(dataset, traits, f"{folder} split {split!r}")
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset


def _only_traits(dataset, traits: list[str], where: str):
    if "trait" not in dataset.column_names:
        raise ValueError(f"{where}: `traits` filter set but the data has no 'trait' column")
    present = set(dataset["trait"])
    unknown = [t for t in traits if t not in present]
    if not traits or unknown:
        raise ValueError(f"traits: {unknown or traits} not in {where} (its traits: {', '.join(sorted(present))})")
    wanted = set(traits)
    return dataset.filter(lambda t: t in wanted, input_columns="trait")
