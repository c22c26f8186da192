"""What a training stage leaves in its output_dir, and the checks made before writing it.

`<output_dir>/`: the PEFT adapter, the tokenizer with the exact chat template used in training,
`recipe.yaml` (the resolved recipe: re-run it with `--config`), and `training_manifest.json` (base
model, data hash, versions, final metrics). Intermediate `checkpoint-*` folders allow a killed run
to resume where it stopped.
"""

import hashlib
import json
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


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest checkpoint-N folder whose save finished (trainer_state.json is written last).

    A run killed while saving leaves a partial folder; resuming from it would fail, so it is skipped.
    """
    folders = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    for folder in sorted(folders, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        if (folder / "trainer_state.json").is_file():
            return str(folder)
    return None


def checkpoint_step(checkpoint: str | None) -> int | None:
    if checkpoint is None:
        return None
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]


def resume_checkpoint(output_dir: str, resume_from_checkpoint) -> str | None:
    """The checkpoint to resume from: an explicit path, else the last one in output_dir.

    A run killed mid-training picks up where it stopped when started again with the same output_dir.
    A finished run (manifest present) is trained again from scratch and its stale checkpoints removed,
    so that they cannot be mistaken for this run's.
    """
    if isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.lower() not in ("true", "false"):
        if not Path(resume_from_checkpoint).is_dir():
            raise FileNotFoundError(f"resume_from_checkpoint: {resume_from_checkpoint} is not a directory")
        return resume_from_checkpoint
    explicit = resume_from_checkpoint is True or str(resume_from_checkpoint).lower() == "true"
    out = Path(output_dir)
    last = last_complete_checkpoint(out) if out.is_dir() else None
    if explicit and last is None:
        raise FileNotFoundError(f"resume_from_checkpoint is true but {output_dir} holds no complete checkpoint-* folder")
    if last is not None and (out / MANIFEST).exists() and not explicit:
        for stale in out.glob("checkpoint-*"):
            shutil.rmtree(stale, ignore_errors=True)
        return None
    return last


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
    import resource

    metrics = dict(train_output.metrics)
    logs = trainer.state.log_history
    losses = [e["loss"] for e in logs if "loss" in e]
    if losses:
        metrics["final_logged_loss"] = losses[-1]
        metrics["first_logged_loss"] = losses[0]
    tokens = [e["num_tokens"] for e in logs if "num_tokens" in e]  # TRL counts attention-mask tokens, all ranks
    if tokens and metrics.get("train_runtime") and not resumed:  # a resumed run's count includes earlier sessions
        metrics["train_tokens_per_second"] = round(tokens[-1] / metrics["train_runtime"], 2)
    evals = [e for e in logs if "eval_loss" in e]
    if evals:  # the last held-out evaluation (eval_strategy): loss, and for DPO reward accuracies and margins
        metrics["last_eval"] = {k: v for k, v in evals[-1].items() if k.startswith("eval_") or k == "step"}
    metrics["global_step"] = trainer.state.global_step
    metrics["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    if torch.cuda.is_available():
        metrics["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return metrics


def save_run(trainer, recipe: dict, manifest: dict) -> None:
    """Save adapter, tokenizer (with its chat template), recipe.yaml and the manifest; rank 0 writes."""
    out = Path(trainer.args.output_dir)
    trainer.save_model(str(out))  # every rank must call it (gathers sharded weights); only rank 0 writes
    if not trainer.is_world_process_zero():
        return
    # DPO's frozen reference copy ("ref") is saved in a subfolder; the published adapter is "default" only.
    shutil.rmtree(out / "ref", ignore_errors=True)
    trainer.processing_class.save_pretrained(str(out))
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    manifest = {
        **manifest,
        "chat_template_sha256": hashlib.sha256((trainer.processing_class.chat_template or "").encode()).hexdigest(),
        "versions": library_versions(),
        "world_size": trainer.args.world_size,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
