"""W&B for every stage, without prompts: online when the user is logged in, offline otherwise.

The data, SFT, DPO and eval runs of one experiment share a W&B group (the experiment name, by default
the folder that holds the stage's output_dir) and are named `<experiment>/<stage>`. Each run puts its
headline numbers in `run.summary` and logs what it made as an artifact: the dataset, the adapter, the
report. A run that consumes another stage's output names it as an input: online through `use_artifact`
(W&B's lineage graph; the input is rebuilt from the same files, so it is the producer's version), and
in every mode in the run's config (`inputs`: artifact name -> content digest), because W&B cannot
record artifact use offline. A training run resumed from a checkpoint continues its W&B run (the id is
kept in `<output_dir>/wandb_run_id`). Offline runs land in `<run dir>/wandb/`; `wandb sync` uploads them.
"""

import dataclasses
import json
import netrc
import os
import re
import sys
import uuid
from pathlib import Path

import yaml
from transformers import TrainerCallback


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def experiment_name(output_dir: str, experiment: str | None) -> str:
    return experiment or Path(output_dir).resolve().parent.name


RUN_ID_FILE = "wandb_run_id"
# What a training stage's artifact holds: what train.publish would publish, plus the provenance files.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "special_tokens_map.json", "recipe.yaml", "training_manifest.json")


def choose_mode() -> str:
    """Never a login prompt: a user's WANDB_MODE wins; else online when logged in, offline otherwise."""
    os.environ.setdefault("WANDB_MODE", "online" if wandb_logged_in() else "offline")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    return os.environ["WANDB_MODE"]


def start_run(stage: str, *, experiment: str, project: str, wandb_dir, config: dict | None = None,
              run_id: str | None = None):
    """Open this stage's W&B run (WANDB_PROJECT and WANDB_DIR, when set, win over the arguments)."""
    choose_mode()
    import wandb

    wandb_dir = Path(os.environ.get("WANDB_DIR") or wandb_dir).resolve()
    wandb_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(project=os.environ.get("WANDB_PROJECT") or project, group=experiment, job_type=stage,
                      name=f"{experiment}/{stage}", dir=str(wandb_dir), config=config or {}, id=run_id,
                      resume="allow" if run_id else None, reinit="finish_previous")


def training_run_id(output_dir, resuming: bool) -> str:
    """The W&B run id of this output_dir: the stored one when resuming a checkpoint, else a new one (stored)."""
    path = Path(output_dir) / RUN_ID_FILE
    if resuming and path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]  # W&B ids: lower-case letters and digits
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


def setup_wandb(training_args, script_args, stage: str, resuming: bool = False) -> None:
    """Open the W&B run of a training stage on the main process (no-op unless wandb is in report_to).

    Runs before the Trainer exists in both stages, so it is also where credentials are taken out of what
    the Trainer pickles (training_args.bin) and of the command line W&B records. The Trainer's W&B
    callback logs into the run opened here.
    """
    from accelerate import PartialState

    from train.recipe import strip_secret_argv, strip_secrets

    strip_secrets(training_args)
    strip_secret_argv(sys.argv)
    if "wandb" not in (training_args.report_to or []):
        return
    group = experiment_name(training_args.output_dir, script_args.experiment)
    if training_args.run_name in (None, training_args.output_dir):
        training_args.run_name = f"{group}/{stage}"
    if not PartialState().is_main_process:  # the Trainer logs from the main process only
        return
    start_run(stage, experiment=group, project=script_args.wandb_project,
              wandb_dir=Path(training_args.output_dir).resolve().parent,
              run_id=training_run_id(training_args.output_dir, resuming))


def artifact_name(experiment: str, what: str) -> str:
    return re.sub(r"[^\w.-]", "-", f"{experiment}-{what}")  # W&B allows letters, digits, '-', '_', '.'


def folder_artifact(name: str, kind: str, folder, files, metadata: dict | None = None):
    """A W&B artifact of the given files of `folder` (those that exist), named and typed for lineage."""
    import wandb

    folder = Path(folder)
    artifact = wandb.Artifact(name, type=kind, metadata=metadata or {})
    for rel in files:
        if (folder / rel).is_file():
            artifact.add_file(str(folder / rel), name=str(rel))
    return artifact


def dataset_artifact(data_path, experiment: str):
    """The data_gen folder as W&B will hold it: the files its card's configs name (None for a Hub id)."""
    from train.assets import RECORD, pushed_dataset_id

    folder = Path(data_path)
    if not folder.is_dir():
        return None
    files = ["README.md", RECORD, *sorted(p.relative_to(folder).as_posix() for p in folder.glob("jsonl/*.jsonl"))]
    hub_id = pushed_dataset_id(folder)
    return folder_artifact(artifact_name(experiment, "data"), "dataset", folder, files,
                           {"hub_dataset_id": hub_id} if hub_id else {})


def adapter_artifact(adapter_dir, experiment: str, stage: str):
    return folder_artifact(artifact_name(experiment, stage), "model", adapter_dir, ADAPTER_FILES)


def input_artifact(path):
    """What an earlier stage logged from `path` (a training output_dir or a data_gen folder), rebuilt from its
    files under the producer's experiment name, so that online it resolves to the producer's version."""
    path = Path(path)
    manifest = path / "training_manifest.json"
    if manifest.is_file():
        recipe = yaml.safe_load((path / "recipe.yaml").read_text()) if (path / "recipe.yaml").is_file() else {}
        experiment = experiment_name(str(path), (recipe or {}).get("experiment"))
        return adapter_artifact(path, experiment, json.loads(manifest.read_text()).get("stage", "adapter"))
    return dataset_artifact(path, experiment_name(str(path), None))


def use_inputs(run, artifacts) -> dict:
    """Name `artifacts` as this run's inputs (see the module docstring); returns name -> digest."""
    refs = {}
    for artifact in artifacts:
        if artifact is None:
            continue
        refs[artifact.name] = artifact.digest
        if not run.offline:
            run.use_artifact(artifact)
    run.config.update({"inputs": refs}, allow_val_change=True)
    return refs


def log_output(run, artifact) -> str:
    """Log what this stage made; returns the artifact's content digest (what consumers' inputs name)."""
    digest = artifact.digest
    run.log_artifact(artifact)
    run.summary[f"artifact/{artifact.name}"] = digest
    return digest


class RecipeToWandb(TrainerCallback):
    """Adds our script and model arguments to the W&B run config (the Trainer logs only its own args)."""

    def __init__(self, *configs):
        self.configs = configs

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or "wandb" not in (args.report_to or []):
            return
        import wandb

        from train.recipe import is_secret

        if wandb.run is not None:
            for cfg in self.configs:
                values = {k: v for k, v in dataclasses.asdict(cfg).items() if not is_secret(k)}
                wandb.config.update({type(cfg).__name__: values}, allow_val_change=True)


def headline_metrics(metrics: dict) -> dict:
    """A training stage's numbers for run.summary: losses, steps, speed and the last held-out evaluation."""
    out = {f"final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out.update({f"final/{k}": v for k, v in (metrics.get("last_eval") or {}).items() if isinstance(v, (int, float))})
    return out


def finish_training_run(stage: str, training_args, script_args, manifest: dict, inputs=()) -> None:
    """Summary, input lineage and the adapter artifact, then close the run (flushes offline files).

    `inputs`: the folders this stage read (the data_gen folder, and for DPO the SFT adapter).
    """
    if "wandb" not in sys.modules:
        return
    import wandb

    run = wandb.run
    if run is None:
        return
    group = experiment_name(training_args.output_dir, script_args.experiment)
    run.summary.update({"adapter_check": manifest.get("adapter_check"), "data_sha256": manifest["data"]["sha256"],
                        **headline_metrics(manifest.get("metrics", {}))})
    built = [input_artifact(path) for path in inputs]
    use_inputs(run, built)
    log_output(run, adapter_artifact(training_args.output_dir, group, stage))
    wandb.finish()

