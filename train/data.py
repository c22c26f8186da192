"""Reading the datasets written by data_gen (layout in docs/CONTRACT.md)."""

import logging
import re
from pathlib import Path

from datasets import load_from_disk

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
    """`<dataset_path>/<kind>` split `split`, checked for the columns the stage needs; only the rows of `traits`
    when given (one adapter per trait lets the cross-trait matrix show interference)."""
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
    missing = [c for c in required if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{folder} split {split!r}: missing column(s) {missing} (has {dataset.column_names})")
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
