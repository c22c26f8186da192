"""What a training stage leaves in its output_dir, and the checks made before writing it.

`<output_dir>/`: the PEFT adapter, the tokenizer with the exact chat template used in training,
`recipe.yaml` (the resolved recipe as the user set it: re-run it with `--config`), and `training_manifest.json`
(base model, data hash, adapter hash, versions, final metrics, the device and precision the hardware chose and the
forward that trained the adapter (`train.run`); written last). Intermediate `checkpoint-*`
folders let a killed run resume where it stopped, with the recipe and data recorded in `run_start.json`
when it started (anything else is refused). `.run.lock` makes the folder one run's at a time.
"""

import contextlib
import hashlib
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch
import yaml

MANIFEST = "training_manifest.json"


def dataset_sha256(dataset) -> str:
    """Hash of the rows (in order, all columns) that the stage trains on."""
    h = hashlib.sha256()
    for row in dataset:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


RUN_START = "run_start.json"  # what a run was started with (recipe, data hash): a resume must match it
LOCK = ".run.lock"  # held by the run that owns the folder; the OS drops it when that process dies

# Recipe keys a resumed run may change: they alter what is logged or kept on disk, not what is trained.
RESUME_MAY_DIFFER = frozenset({
    "output_dir", "logging_dir", "resume_from_checkpoint", "logging_steps", "logging_first_step", "save_steps", "save_total_limit",
    "report_to", "run_name", "experiment", "wandb_project", "inspect",
})


class RunFolderError(RuntimeError):
    """An output_dir this run must not write into; the message says how to go on."""


@contextlib.contextmanager
def own_run_folder(output_dir: str, is_main_process: bool = True):
    """Hold output_dir's lock for the whole run: a second run into the same folder fails at once.

    Only the main process locks (all ranks of one launch are one run).
    """
    if not is_main_process:
        yield
        return
    from filelock import FileLock, Timeout

    Path(output_dir).mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(Path(output_dir) / LOCK), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunFolderError(
            f"{output_dir} is in use by another run (it holds {Path(output_dir) / LOCK}); wait for it to end, "
            "or give this run a new --output_dir"
        ) from None
    try:
        yield
    finally:
        lock.release()


def claim_run_folder(held, stage: str, training_args, recipe: dict, data_sha256: str, state):
    """Own output_dir for this launch (the lock lives as long as `held`) and decide what the run does there:
    `claim_run`'s ("finished" | "resume" | "fresh", checkpoint). Both training scripts start this way."""
    held.enter_context(own_run_folder(training_args.output_dir, state.is_main_process))
    todo, resume = claim_run(training_args.output_dir, run_fingerprint(stage, recipe, data_sha256, state.num_processes),
                             training_args.resume_from_checkpoint, state.is_main_process)
    if todo == "finished":
        state.print(f"{training_args.output_dir} already finished this run (same recipe and data): nothing to train")
    return todo, resume


def run_fingerprint(stage: str, recipe: dict, data_sha256: str, world_size: int) -> dict:
    """What must be equal for a resumed run to continue the same training."""
    return {
        "stage": stage,
        "recipe": {k: v for k, v in recipe.items() if k not in RESUME_MAY_DIFFER},
        "data_sha256": data_sha256,
        "world_size": world_size,
    }


def fingerprint_changes(old: dict, new: dict) -> list[str]:
    changes = []
    old_recipe, new_recipe = old.get("recipe", {}), new.get("recipe", {})
    for key in list(new_recipe) + [k for k in old_recipe if k not in new_recipe]:
        if old_recipe.get(key, "<default>") != new_recipe.get(key, "<default>"):
            changes.append(f"{key}: {old_recipe.get(key, '<default>')} -> {new_recipe.get(key, '<default>')}")
    if old.get("data_sha256") != new.get("data_sha256"):
        changes.append(f"training data sha256: {old.get('data_sha256')} -> {new.get('data_sha256')}")
    for key in ("stage", "world_size"):
        if old.get(key) != new.get(key):
            changes.append(f"{key}: {old.get(key)} -> {new.get(key)}")
    return changes


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (a file torn by a kill or a full disk), or None.

    Reads every file's framing, not its values: JSON parses, torch files are whole zip archives (their
    index sits at the end, so a cut file has none), safetensors headers fit the file.
    """
    import zipfile

    folder = Path(folder)
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json (the save did not finish)"
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if path.stat().st_size == 0:
            return f"{name} is empty"
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(path) as archive:
                    archive.namelist()
            elif path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), "pt") as f:
                    f.keys()
        except Exception as err:  # any failure to read the framing means the file is torn
            return f"{name} is unreadable ({type(err).__name__}: {err})"
    if "global_step" not in json.loads(state.read_text()):
        return "trainer_state.json has no global_step"
    return None


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest checkpoint-N folder that is whole; newer torn ones are skipped with a warning."""
    import warnings

    folders = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    for folder in sorted(folders, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            return str(folder)
        warnings.warn(f"skipping checkpoint {folder}: {problem}; falling back to an earlier one", stacklevel=2)
    return None


def checkpoint_step(checkpoint: str | None) -> int | None:
    if checkpoint is None:
        return None
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]


def _fresh_start_hint(output_dir) -> str:
    return f"To train with this command from scratch give it a new --output_dir (or delete {output_dir})."


def claim_run(output_dir: str, fingerprint: dict, resume_from_checkpoint, is_main_process: bool = True):
    """Decide what this run does in output_dir: ("finished", None), ("resume", checkpoint) or ("fresh", None).

    A finished run (manifest present) made with this recipe and data is left as it is; made with other ones it is
    refused, never replaced. A killed run resumes from its last whole checkpoint only with the recipe and data it
    started with (RUN_START), since a resume keeps the checkpoint's optimizer, schedule and data position.
    """
    out = Path(output_dir)
    started = json.loads((out / RUN_START).read_text()) if (out / RUN_START).is_file() else None
    if (out / MANIFEST).is_file():
        changes = fingerprint_changes(started, fingerprint) if started else ["(no run_start.json: recorded by an "
                                                                             "older version, cannot compare)"]
        if not changes:
            return "finished", None
        raise RunFolderError(
            f"{output_dir} holds a finished {fingerprint['stage']} run (training_manifest.json) made with another "
            f"recipe or data: {'; '.join(changes)}. Rerunning would replace its adapter. " + _fresh_start_hint(output_dir)
        )
    explicit_path = isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.lower() not in ("true", "false")
    if explicit_path:
        checkpoint = Path(resume_from_checkpoint)
        if not checkpoint.is_dir():
            raise FileNotFoundError(f"resume_from_checkpoint: {resume_from_checkpoint} is not a directory")
        problem = checkpoint_problem(checkpoint)
        if problem:
            raise RunFolderError(f"resume_from_checkpoint: {checkpoint} cannot be resumed from: {problem}")
        origin = checkpoint.parent / RUN_START
        started = json.loads(origin.read_text()) if origin.is_file() else None
    else:
        explicit = resume_from_checkpoint is True or str(resume_from_checkpoint).lower() == "true"
        checkpoint = last_complete_checkpoint(out) if out.is_dir() else None
        if explicit and checkpoint is None:
            raise FileNotFoundError(f"resume_from_checkpoint is true but {output_dir} holds no complete checkpoint")
    if checkpoint is None:
        if is_main_process:
            write_atomic(out / RUN_START, json.dumps(fingerprint, indent=2, default=str) + "\n")
        return "fresh", None
    checkpoint = Path(checkpoint)
    if started is None:
        raise RunFolderError(
            f"cannot resume from {checkpoint}: there is no {RUN_START} beside it saying what recipe and data it was "
            f"trained with. " + _fresh_start_hint(output_dir)
        )
    changes = fingerprint_changes(started, fingerprint)
    if changes:
        raise RunFolderError(
            f"cannot resume from {checkpoint}: this command differs from the run that wrote it: {'; '.join(changes)}. "
            "A resume keeps the checkpoint's optimizer, learning-rate schedule and data position, so the result would "
            f"mix both runs. To resume, rerun the original command (its settings are in {checkpoint.parent / RUN_START}). "
            + _fresh_start_hint(output_dir)
        )
    if is_main_process and not (out / RUN_START).is_file():
        write_atomic(out / RUN_START, json.dumps(fingerprint, indent=2, default=str) + "\n")
    return "resume", str(checkpoint)


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: readers see the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checked_strategy(state) -> str:
    """The parallel strategy accelerate really set up; refused when the launch config asked for another.

    On a machine without GPUs accelerate quietly turns an FSDP or DeepSpeed config into plain data parallel
    (full model copies, no sharding) while the run still looks like the one asked for.
    """
    used = state.distributed_type.value
    asked = next((name for env, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED"))
                  if os.environ.get(env, "false").lower() == "true"), None)
    if asked and used != asked:
        raise RuntimeError(
            f"the accelerate config asks for {asked}, but accelerate set up {used} on device {state.device}: "
            f"training would run unsharded, as plain data parallel. {asked} needs GPUs here; on a CPU use "
            "recipes/accelerate_configs/cpu.yaml or ddp.yaml."
        )
    return used


def lora_snapshot(model) -> dict[str, torch.Tensor]:
    """Copies of the trainable adapter tensors ("default" adapter; TRL's frozen "ref" copy excluded)."""
    return {
        name: p.detach().float().cpu().clone()
        for name, p in model.named_parameters()
        if "lora_" in name and ".ref." not in name and p.numel() > 0
    }


def assert_adapter_changed(before: dict[str, torch.Tensor], model) -> dict:
    """Fail loudly when LoRA modules did not train (e.g. gradients never reached the adapter).

    A module's update is B @ A. It moved when B changed, or when A changed while B is non-zero.
    (A fresh adapter starts with B = 0, so A only gets gradients once B has moved: comparing A alone
    would flag short runs that trained correctly.)
    """
    after = lora_snapshot(model)
    if not before:
        return {"checked": 0, "note": "adapter parameters are sharded on this rank; check skipped"}
    unchanged = {n for n, t in before.items() if n in after and torch.equal(t, after[n])}
    stuck = []
    for name_b in (n for n in before if "lora_B" in n):
        name_a = name_b.replace("lora_B", "lora_A")
        b_moved = name_b not in unchanged
        a_moved = name_a in before and name_a not in unchanged and bool(after[name_b].abs().sum() > 0)
        if not (b_moved or a_moved):
            stuck.append(name_b.replace(".lora_B", ""))
    if stuck:
        n_modules = sum("lora_B" in n for n in before)
        raise RuntimeError(
            f"{len(stuck)} of {n_modules} LoRA modules did not change during training, e.g. {stuck[0]}. "
            "The adapter did not train: check that gradients reach it (gradient checkpointing needs input "
            "grads) and that the learning rate is > 0."
        )
    return {"checked_tensors": len(before), "unchanged_tensors": len(unchanged)}


def library_versions() -> dict:
    import accelerate
    import datasets
    import peft
    import transformers
    import trl

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
    }


def final_metrics(trainer, train_output, resumed: bool = False) -> dict:
    """Trainer metrics plus throughput on real (non-padding) tokens and peak memory."""
    from train.hardware import peak_rss_gib

    metrics = dict(train_output.metrics)
    logs = trainer.state.log_history
    losses = [e["loss"] for e in logs if "loss" in e]
    if losses:
        metrics["final_logged_loss"] = losses[-1]
        metrics["first_logged_loss"] = losses[0]
        # The logged training loss by step: the curve, without W&B (`logging_steps` sets how many points)
        metrics["loss_curve"] = [[e["step"], e["loss"]] for e in logs if "loss" in e and "step" in e]
    tokens = [e["num_tokens"] for e in logs if "num_tokens" in e]  # TRL counts attention-mask tokens, all ranks
    if tokens and metrics.get("train_runtime") and not resumed:  # a resumed run's count includes earlier sessions
        metrics["train_tokens_per_second"] = round(tokens[-1] / metrics["train_runtime"], 2)
    evals = [e for e in logs if "eval_loss" in e]
    if evals:  # the last held-out evaluation (eval_strategy): loss, and for DPO reward accuracies and margins
        metrics["last_eval"] = {k: v for k, v in evals[-1].items() if k.startswith("eval_") or k == "step"}
    metrics["global_step"] = trainer.state.global_step
    metrics["peak_rss_gib"] = peak_rss_gib()
    if torch.cuda.is_available():
        metrics["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return metrics


def save_run(trainer, recipe: dict, manifest: dict) -> None:
    """Save adapter, tokenizer (with its chat template), recipe.yaml and the manifest; rank 0 writes.

    The manifest goes last, written atomically with the adapter's sha256: a run killed while saving has no
    manifest (it resumes when started again), and eval refuses an adapter file the manifest does not match.
    """
    out = Path(trainer.args.output_dir)
    trainer.save_model(str(out))  # every rank must call it (gathers sharded weights); only rank 0 writes
    if not trainer.is_world_process_zero():
        return
    # DPO's frozen reference copy ("ref") is saved in a subfolder; the published adapter is "default" only.
    shutil.rmtree(out / "ref", ignore_errors=True)
    trainer.processing_class.save_pretrained(str(out))
    write_atomic(out / "recipe.yaml", yaml.safe_dump(recipe, sort_keys=False))
    adapter = out / "adapter_model.safetensors"
    with open(adapter, "rb+") as f:  # on disk before the manifest that vouches for it
        os.fsync(f.fileno())
    manifest = {
        **manifest,
        "adapter_sha256": file_sha256(adapter),
        "chat_template_sha256": hashlib.sha256((trainer.processing_class.chat_template or "").encode()).hexdigest(),
        "versions": library_versions(),
        "world_size": trainer.args.world_size,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")
