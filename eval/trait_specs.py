"""The trait specs behind an eval: statements for endorsement, rubrics for the LLM judge.

The dataset names its traits; each is read from `trait_specs` (names or YAML paths) when the recipe lists it
there, else from the built-in trait of that name. Without a dataset, the traits are those in `trait_specs`. Checked before any model loads (`preflight`).
"""

from __future__ import annotations

from pathlib import Path

from data_gen.spec import SpecError, TraitSpec, builtin_trait_path, load_trait_spec, resolve_trait_path
from train.contract import validate_rows


def dataset_traits(dataset_path: str) -> list[str]:
    from datasets import load_from_disk

    path = Path(dataset_path) / "dpo"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no DPO dataset folder (expected data_gen output with dpo/)")
    dd = load_from_disk(str(path))
    for name, split in dd.items():  # trait names (and any other contract column) checked as every reader checks them
        validate_rows(split, "dpo", f"{path} split {name}", required=("trait",), split=name)
    return sorted({t for split in dd.values() for t in split["trait"]})


def load_specs(traits: list[str], trait_specs: list[str]) -> dict[str, TraitSpec]:
    """trait name -> spec, for every trait in `traits`. A trait without a spec fails naming it."""
    listed = {}
    for ref in trait_specs:
        spec = load_trait_spec(resolve_trait_path(ref))
        listed[spec.name] = spec
    out = {}
    for t in traits or list(listed):
        if t in listed:
            out[t] = listed[t]
            continue
        try:
            out[t] = load_trait_spec(builtin_trait_path(t))  # a name from the data, never a path
        except SpecError as e:
            raise SpecError(f"dataset trait {t!r} has no spec ({e}); add its YAML file to the eval recipe's "
                            "trait_specs") from None
    return out


def rubrics(specs: dict[str, TraitSpec]) -> dict[str, str]:
    """trait -> judge_rubric; fails naming every trait file without one (the LLM judge needs each)."""
    missing = [f"{t} ({s.path})" for t, s in specs.items() if not s.judge_rubric]
    if missing:
        raise SpecError(f"judge 'llm' needs a judge_rubric in every trait spec; missing in: {', '.join(missing)}")
    return {t: s.judge_rubric for t, s in specs.items()}


def preflight(cfg) -> dict[str, TraitSpec]:
    """Specs of the dataset's traits, checked for what the selected suites need; {} when no suite needs them."""
    needs_rubric = cfg.judge == "llm" and "generation" in cfg.suites
    if not ("endorsement" in cfg.suites or needs_rubric):
        return {}
    if not (cfg.dataset_path or cfg.trait_specs):
        raise SpecError("suite 'endorsement' needs dataset_path (whose traits it reads) or trait_specs")
    specs = load_specs(dataset_traits(cfg.dataset_path) if cfg.dataset_path else [], cfg.trait_specs)
    if needs_rubric:
        rubrics(specs)
    if "endorsement" in cfg.suites:
        missing = [f"{t} ({s.path})" for t, s in specs.items() if not s.counter_statements]
        if missing:
            raise SpecError(f"suite 'endorsement' needs counter_statements in every trait spec; missing in: "
                            f"{', '.join(missing)}")
    return specs
