"""Reading the datasets written by data_gen (layout in docs/CONTRACT.md)."""

from pathlib import Path

from datasets import load_from_disk


def load_split(dataset_path: str, kind: str, split: str, required: tuple[str, ...], limit: int | None = None):
    """`<dataset_path>/<kind>` split `split`, checked for the columns the stage needs."""
    folder = Path(dataset_path) / kind
    if not folder.is_dir():
        raise FileNotFoundError(
            f"dataset_path: {folder} not found. Point dataset_path at the output folder of "
            "`python -m data_gen` (it holds sft/ and dpo/)."
        )
    splits = load_from_disk(str(folder))
    if split not in splits:
        raise KeyError(f"{folder}: no split {split!r} (found: {', '.join(splits)})")
    dataset = splits[split]
    missing = [c for c in required if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{folder} split {split!r}: missing column(s) {missing} (has {dataset.column_names})")
    if len(dataset) == 0:
        raise ValueError(f"{folder} split {split!r} is empty")
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset
