"""W&B without prompts: offline unless the user has logged in or asked for online.

Runs of one experiment (data, SFT, DPO, eval) share a W&B group named after the experiment, one
run per stage. Offline runs land in `<run dir>/wandb/` and can be uploaded later with `wandb sync`.
"""

import dataclasses
import netrc
import os
import sys
from pathlib import Path

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


def setup_wandb(training_args, script_args, stage: str) -> None:
    """Set the W&B environment for this stage (no-op unless wandb is in report_to).

    Runs before the Trainer exists in both stages, so it is also where credentials are taken out of what
    the Trainer pickles (training_args.bin) and of the command line W&B records.
    """
    from train.recipe import strip_secret_argv, strip_secrets

    strip_secrets(training_args)
    strip_secret_argv(sys.argv)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if "wandb" not in (training_args.report_to or []):
        return
    group = experiment_name(training_args.output_dir, script_args.experiment)
    # Never a login prompt: offline unless the user logged in or chose a mode.
    os.environ.setdefault("WANDB_MODE", "online" if wandb_logged_in() else "offline")
    os.environ.setdefault("WANDB_PROJECT", script_args.wandb_project)
    os.environ.setdefault("WANDB_RUN_GROUP", group)
    os.environ.setdefault("WANDB_JOB_TYPE", stage)
    os.environ.setdefault("WANDB_CONSOLE", "off")
    wandb_dir = Path(os.environ.get("WANDB_DIR") or Path(training_args.output_dir).resolve().parent)
    wandb_dir.mkdir(parents=True, exist_ok=True)
    os.environ["WANDB_DIR"] = str(wandb_dir)
    if training_args.run_name in (None, training_args.output_dir):
        training_args.run_name = f"{group}-{stage}"


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


def finish_wandb(summary: dict) -> None:
    """Record the stage's outcome in the run summary and close the run (flushes offline files)."""
    if "wandb" not in sys.modules:
        return
    import wandb

    if wandb.run is not None:
        wandb.run.summary.update(summary)
        wandb.finish()
