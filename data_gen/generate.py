"""`python -m data_gen --config recipes/quickstart/data.yaml`: make the trait datasets.

Phases: recipe -> trait specs -> user rows -> generate -> leakage check -> write (DatasetDict
folders, JSONL, dataset card) -> optional Hub push. Everything that can be validated is
validated before any data is generated.
"""

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from train import contract
from train.assets import PUSHED, RECORD

from .leakage import check_split_leakage, check_wording, prompt_text
from .offline import OOD_AXES, generate_trait
from .spec import SpecError, load_trait_spec, resolve_trait_path
from .user_jsonl import BadRowError, read_user_jsonl

SPLITS = contract.SPLITS
# What a run writes into output_dir; anything else found there (a teacher cache) is carried into the new dataset.
OUTPUTS = {"sft", "dpo", "jsonl", "README.md", RECORD, PUSHED}
# Files data_gen may leave in output_dir before the dataset exists (the teacher's default cache).
PRE_OUTPUTS = {"teacher_cache.jsonl"}
SPLIT_KEYS = {"train": "sft_train_per_trait / dpo_train_per_trait, the user rows or the teacher's kept rows",
              "eval_id": "eval_id_per_trait", "eval_ood": "eval_ood_per_axis_per_trait"}


class OutputDirError(ValueError):
    pass


class EmptySplitError(ValueError):
    pass


@dataclass
class DataGenConfig:
    """Dataset generation (offline, seeded). Counts are per trait."""

    output_dir: str = field(default="runs/quickstart/data", metadata={"help": "Where the dataset is written."})
    seed: int = field(default=0, metadata={"help": "Same seed, byte-identical JSONL."})
    traits: list[str] = field(default_factory=lambda: ["care", "honesty", "instance_reduction"],
                              metadata={"help": "Built-in trait names or paths to trait YAML files."})
    extra_trait_specs: list[str] = field(default_factory=list, metadata={"help": "More trait YAML files to add."})
    sft_train_per_trait: int = field(default=260, metadata={"min": 0, "help": "SFT train conversations per trait."})
    dpo_train_per_trait: int = field(default=260, metadata={"min": 0, "help": "DPO train pairs per trait."})
    eval_id_per_trait: int = field(default=40, metadata={"min": 1, "help": "eval_id pairs per trait."})
    eval_ood_per_axis_per_trait: int = field(default=24, metadata={"min": 0, "help": "eval_ood pairs per axis per trait."})
    heldout_formats: list[Literal[contract.FORMATS]] = field(default_factory=lambda: ["multi_turn", "agentic"],
                                                             metadata={"help": "Formats kept out of train."})
    eval_item_fraction: float = field(default=0.25, metadata={"gt": 0, "max": 1,
        "help": "Share of each training domain's scenarios reserved for eval splits."})
    eval_wording_fraction: float = field(default=0.33, metadata={"gt": 0, "lt": 1,
        "help": "Share of each answer-wording list (templates, phrase variants, prefixes, actions) reserved for eval "
                "answers (both the train and the eval wording pool need entries)."})
    seen_wording_fraction: float = field(default=0.5, metadata={"min": 0, "max": 1,
        "help": "Share of eval_id rows also answered in train wording (axis seen_wording) to measure recognition."})
    leakage_embedding_check: bool = field(default=True, metadata={
        "help": "Also check eval prompts against train by MiniLM cosine (exact and n-gram checks always run)."})
    near_duplicate_threshold: float = field(default=0.88, metadata={"gt": 0, "max": 1,
        "help": "Cosine at or above this is a near-duplicate."})
    ngram_containment_threshold: float = field(default=0.8, metadata={"gt": 0, "max": 1,
        "help": "Share of an eval prompt's word 5-grams found in one train prompt that counts as a leak."})
    diversity_sample: int = field(default=400, metadata={"min": 0, "help": "Rows sampled for the near-duplicate rate."})
    extra_sft_jsonl: Optional[str] = field(default=None, metadata={"help": "User SFT rows ({messages}) added to train."})
    extra_dpo_jsonl: Optional[str] = field(default=None, metadata={
        "help": "User DPO rows ({prompt, chosen, rejected}) added to train."})
    skip_bad_rows: bool = field(default=False, metadata={"help": "Skip and count malformed user rows instead of failing."})
    license: str = field(default="apache-2.0", metadata={"help": "Licence written in the dataset card."})
    push_to_hub: Optional[str] = field(default=None, metadata={"pattern": r"[\w.-]+/[\w.-]+",
        "help": "Hub repo id (user/name) to push the dataset to."})
    hub_private: bool = field(default=True, metadata={"help": "Create the Hub repo as private."})
    wandb: bool = field(default=False, metadata={
        "help": "Log the data stage to W&B (online when logged in, else offline): sizes, checks, dataset artifact."})
    wandb_project: str = field(default="persona-pipeline", metadata={"help": "W&B project."})
    experiment: Optional[str] = field(default=None, metadata={
        "help": "W&B group shared with the training and eval runs (default: the name of output_dir's parent)."})

    def __post_init__(self):
        # Ranges, choices and patterns are field types and metadata (checked by the recipe parser); what stays here
        # is what relates fields to each other.
        if set(contract.FORMATS) <= set(self.heldout_formats):
            raise ValueError("'heldout_formats' holds out every format; train needs at least one")
        if not self.traits and not self.extra_trait_specs:
            raise ValueError("no traits: set 'traits' or 'extra_trait_specs'")


def log(msg):
    print(f"[data_gen] {msg}", file=sys.stderr, flush=True)


def load_specs(cfg):
    specs = [load_trait_spec(resolve_trait_path(t)) for t in cfg.traits + cfg.extra_trait_specs]
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SpecError(f"trait name(s) {dupes} defined more than once ({[s.path for s in specs if s.name in dupes]})")
    return specs


def build(cfg: DataGenConfig):
    """Generate, add user rows, check leakage. Returns (specs, data[kind][split] -> rows, skipped, leak_checks)."""
    check_output_dir(Path(cfg.output_dir))
    specs = load_specs(cfg)
    extra, skipped = {"sft": [], "dpo": []}, {}
    for kind, path in (("sft", cfg.extra_sft_jsonl), ("dpo", cfg.extra_dpo_jsonl)):
        if path:
            rows, bad = read_user_jsonl(path, kind, cfg.skip_bad_rows)
            for r in rows:
                if r["format"] in cfg.heldout_formats:
                    raise BadRowError(f"{path}: row {r['id']} has format {r['format']!r}, which is held out of train "
                                     f"(heldout_formats: {cfg.heldout_formats})")
            extra[kind], skipped[path] = rows, bad
            if bad:
                log(f"skipped {len(bad)} bad row(s) in {path}: {bad[:3]}{' ...' if len(bad) > 3 else ''}")

    data = {kind: {s: [] for s in SPLITS} for kind in ("sft", "dpo")}
    pools = {}
    for spec in specs:
        out = generate_trait(spec, seed=cfg.seed, n_sft_train=cfg.sft_train_per_trait,
                             n_dpo_train=cfg.dpo_train_per_trait, n_eval_id=cfg.eval_id_per_trait,
                             n_eval_ood=cfg.eval_ood_per_axis_per_trait, heldout_formats=cfg.heldout_formats,
                             eval_item_fraction=cfg.eval_item_fraction, eval_wording_fraction=cfg.eval_wording_fraction,
                             seen_wording_fraction=cfg.seen_wording_fraction)
        pools[spec.name] = out["wording"]
        for kind in data:
            for split in SPLITS:
                data[kind][split] += out[kind][split]
    wording = check_wording(pools, data)  # before user rows join train: their wording is theirs
    for kind in data:
        data[kind]["train"] += extra[kind]

    check_heldout(specs, data, cfg.heldout_formats)
    check_splits(data)
    t0 = time.time()
    leak_checks = {**check_split_leakage(data, containment=cfg.ngram_containment_threshold,
                                         embedding=cfg.leakage_embedding_check, threshold=cfg.near_duplicate_threshold),
                   "answer_wording": wording}
    log(f"leakage check passed: {leak_checks['eval_prompts']} eval prompts vs {leak_checks['train_prompts']} train "
        f"prompts ({time.time() - t0:.1f}s)")
    return specs, data, skipped, leak_checks


def check_heldout(specs, data, heldout_formats):
    """Held-out domains and formats must never reach train; a violation here is a generator bug."""
    heldout_domains = {(s.name, d) for s in specs for d in s.heldout_domains}
    for kind in data:
        for r in data[kind]["train"]:
            if (r["trait"], r["domain"]) in heldout_domains or r["format"] in heldout_formats:
                raise AssertionError(f"train row {r['id']} uses held-out domain/format {r['domain']}/{r['format']}")


def check_output_dir(out_dir: Path):
    """Only a folder data_gen wrote (or an empty or missing one) may be replaced by a new dataset."""
    recover_previous(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputDirError(f"output_dir {out_dir} is a file, not a folder")
    if not out_dir.is_dir() or (out_dir / RECORD).is_file():
        return
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in PRE_OUTPUTS)
    if foreign:
        raise OutputDirError(f"output_dir {out_dir} is not empty and was not written by data_gen (no {RECORD}; "
                             f"holds {foreign[:5]}); refusing to overwrite it: choose another output_dir")


def check_splits(data):
    """An empty split makes `datasets` fail with an unreadable "Keys mismatch"; say which split and which key."""
    empty = [f"{kind} {split}" for kind, splits in data.items() for split, rows in splits.items() if not rows]
    if empty:
        keys = sorted({SPLIT_KEYS[e.split()[1]] for e in empty})
        raise EmptySplitError(f"split(s) {empty} would have no rows; every split needs at least one (check {keys})")


def previous_dir(out_dir: Path) -> Path:
    """Where the old dataset waits while the new one is renamed in (a fixed name, so a later run finds it)."""
    return out_dir.with_name(f".{out_dir.name}.previous")


def recover_previous(out_dir: Path):
    """Undo a run that died between swap_in's two renames: the old dataset goes back (or, if the new one made it
    in, the old one's leftover is removed)."""
    previous = previous_dir(out_dir)
    if not previous.is_dir():
        return
    if out_dir.exists():
        shutil.rmtree(previous)
    else:
        os.replace(previous, out_dir)
        log(f"restored {out_dir} from {previous.name} (an earlier run stopped while swapping datasets)")


def swap_in(stage: Path, out_dir: Path):
    """Replace out_dir by the finished stage folder; the old dataset is deleted only once the new one is in place."""
    if out_dir.is_dir():
        for p in out_dir.iterdir():
            if p.name not in OUTPUTS:  # a teacher cache: the new dataset's folder keeps it
                (shutil.copytree if p.is_dir() else shutil.copy2)(p, stage / p.name)
        old = previous_dir(out_dir)
        os.replace(out_dir, old)
        os.replace(stage, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(stage, out_dir)


def write_dataset(data, out_dir: Path):
    """JSONL per kind/split (byte-stable) plus DatasetDict.save_to_disk folders."""
    from datasets import DatasetDict, disable_progress_bars

    disable_progress_bars()  # one bar per split and kind is noise; the log line below says what was written
    (out_dir / "jsonl").mkdir(parents=True, exist_ok=True)
    dicts = {}
    for kind, splits in data.items():
        # Checked as train and eval check it on read: data_gen never writes what they would refuse.
        dicts[kind] = DatasetDict({s: contract.to_dataset(rows, kind, f"generated {kind} split {s!r}", split=s)
                                   for s, rows in splits.items()})
        for split, rows in splits.items():
            with open(out_dir / "jsonl" / f"{kind}_{split}.jsonl", "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        if (out_dir / kind).exists():
            shutil.rmtree(out_dir / kind)
        dicts[kind].save_to_disk(str(out_dir / kind))
    return dicts


def finish(cfg, specs, data, skipped, leak_checks, generator, generator_stats=None):
    """Write dataset and card, optionally push. Shared by the offline and teacher generators."""
    out_dir = Path(cfg.output_dir)
    check_output_dir(out_dir)
    check_splits(data)
    for kind in data:
        for r in data[kind]["train"]:  # user and teacher rows: whatever their wording, it is what training sees
            r.setdefault("wording", "seen")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Written whole in a sibling folder and renamed in: a crash never leaves splits of two runs under one card.
    stage = out_dir.with_name(f".{out_dir.name}.staging-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        sizes, div = _write_all(cfg, specs, data, skipped, leak_checks, generator, stage, generator_stats)
        swap_in(stage, out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    log(f"wrote {out_dir}: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    if cfg.push_to_hub:
        push(out_dir, cfg)
    if cfg.wandb:
        log_data_run(out_dir, cfg, sizes, div, leak_checks)
    return sizes, div


def _write_all(cfg, specs, data, skipped, leak_checks, generator, out_dir: Path, generator_stats=None):
    from .card import diversity, length_balance, write_card

    write_dataset(data, out_dir)
    sizes = {kind: {s: len(rows) for s, rows in splits.items()} for kind, splits in data.items()}
    axes = {a: sum(r["axis"] == a for r in data["dpo"]["eval_ood"]) for a in OOD_AXES}
    train = data["dpo"]["train"]
    div = diversity([prompt_text(r["prompt"]) for r in train], [r["chosen"][0]["content"] for r in train],
                    [r["rejected"][0]["content"] for r in train], embedding=cfg.leakage_embedding_check, threshold=cfg.near_duplicate_threshold,
                    sample=cfg.diversity_sample, seed=cfg.seed)
    # An earlier push's record (hub_push.json) is not carried over: it describes other data.
    write_card(out_dir, cfg=cfg, specs=specs, sizes=sizes, axes=axes, div=div, skipped=skipped,
               leak_checks=leak_checks, generator=generator, lengths=length_balance(data["dpo"]),
               generator_stats=generator_stats)
    return sizes, div


def hub_folder(out_dir: Path, dest: Path) -> Path:
    """The folder a push uploads: the card, the generation record and exactly the files the card's configs name."""
    from huggingface_hub import DatasetCard

    files = ["README.md", RECORD]
    files += [f["path"] for c in DatasetCard.load(out_dir / "README.md").data.configs for f in c["data_files"]]
    for rel in files:
        if not (out_dir / rel).is_file():
            raise FileNotFoundError(f"{out_dir / rel}: named by the dataset card but missing")
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out_dir / rel, dest / rel)
    return dest


def push(out_dir: Path, cfg):
    """Upload `hub_folder` as one commit. Local files are already written, so a failed push loses nothing.

    Remote `jsonl/` files this push does not carry are deleted in the same commit: the repo then holds what
    the card's configs name and nothing stale. The token comes from HF_TOKEN or the saved login.
    """
    import tempfile

    from huggingface_hub import HfApi

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT"))
    try:
        with tempfile.TemporaryDirectory(prefix="data_gen-push-") as tmp:
            folder = hub_folder(out_dir, Path(tmp))
            api.create_repo(cfg.push_to_hub, repo_type="dataset", private=cfg.hub_private, exist_ok=True)
            info = api.upload_folder(folder_path=str(folder), repo_id=cfg.push_to_hub, repo_type="dataset",
                                     delete_patterns=["jsonl/*"], commit_message="Upload from persona-pipeline data_gen")
    except Exception as err:
        raise RuntimeError(f"push of {out_dir} to the Hub dataset {cfg.push_to_hub} failed ({type(err).__name__}: "
                           f"{err}); the local dataset is complete, re-run to retry") from err
    (out_dir / PUSHED).write_text(json.dumps({"repo_id": cfg.push_to_hub, "commit": info.oid,
                                              "url": info.commit_url}, indent=2) + "\n")
    log(f"pushed to {info.repo_url}")


def log_data_run(out_dir: Path, cfg, sizes: dict, div: dict, leak_checks: dict) -> None:
    """The data stage's W&B run: sizes and diversity in the summary, the dataset (card + JSONL) as an artifact."""
    from train.tracking import dataset_artifact, experiment_name, log_output, start_run

    experiment = experiment_name(cfg.output_dir, cfg.experiment)
    run = start_run("data", experiment=experiment, project=cfg.wandb_project, wandb_dir=out_dir.resolve().parent,
                    config={"DataGenConfig": {k: v for k, v in vars(cfg).items()}})
    run.summary.update({f"rows/{kind}/{split}": n for kind, splits in sizes.items() for split, n in splits.items()})
    run.summary.update({f"diversity/{k}": v for k, v in div.items() if isinstance(v, (int, float))})
    run.summary.update({f"leakage/{k}": v for k, v in leak_checks.items() if isinstance(v, str)})
    log_output(run, dataset_artifact(out_dir, experiment))
    run.finish()
def main(argv=None):
    from .config import TeacherConfig
    from .recipe import parse_recipe

    # The teacher's keys may share the recipe file; the offline generator ignores them.
    cfg, _ = parse_recipe((DataGenConfig, TeacherConfig), argv, description=__doc__, prog="python -m data_gen")
    t0 = time.time()
    specs, data, skipped, leak_checks = build(cfg)
    finish(cfg, specs, data, skipped, leak_checks, generator="offline")
    log(f"done in {time.time() - t0:.1f}s")
