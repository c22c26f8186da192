"""The start and finish both training scripts share: the checks and records every run must carry.

`train/sft.py` and `train/dpo.py` stay one readable script per method (as TRL's are); what they must do alike lives
here, so a check added for one is made for both:

    parser = stage_parser("sft", (ScriptArguments, SFTConfig, ModelConfig), description)   # hardware defaults noted
    run = TrainingRun("sft", script_args, training_args, model_args, held)  # LoRA, strategy, speed-ups resolved
    run.check_template(tokenizer, dataset, ...)                             # pad token, every row renders
    if run.claim(dataset): ...                                              # run folder, resume, W&B
    run.check_prepared(trainer, dataset)                                    # the trainer kept every row
    output = run.train(trainer)                                             # speed-ups installed, adapter moved
    manifest = run.manifest(trainer, output, data={...}, ...)               # the run's record, both stages alike
    run.finish(trainer, manifest, inputs=[...])                             # adapter, recipe, manifest, W&B
"""

import os
import sys


def stage_parser(stage: str, dataclass_types, description: str):
    """The stage's recipe parser, with the hardware's defaults (`train.hardware`) under the recipe and the flags.

    The parsed ScriptArguments carry `hardware_chosen`: the fields the hardware set because the user did not, kept
    out of the saved recipe (a CPU run's recipe must not carry `use_cpu: true` to a GPU) and recorded in the manifest.
    """
    from train.hardware import hardware_defaults
    from train.recipe import recipe_parser

    return recipe_parser(dataclass_types, description, chosen_defaults=hardware_defaults(stage))


def hardware_chosen(stage: str, script_args, training_args) -> dict[str, tuple]:
    """Field -> (value, why) for the fields the hardware chose in this run."""
    chosen = getattr(script_args, "hardware_chosen", None)
    if chosen is None:  # parsed without stage_parser: a field still at the hardware's value counts as its choice
        from train.hardware import hardware_defaults

        chosen = {k: c for k, c in hardware_defaults(stage).items() if getattr(training_args, k, None) == c[0]}
    return chosen


class TrainingRun:
    """One training run of `stage` ("sft" or "dpo"), from its first checks to its manifest."""

    def __init__(self, stage, script_args, training_args, model_args, held):
        from accelerate import PartialState

        from train import speedups
        from train.outputs import checked_strategy
        from train.recipe import RecipeError

        if not model_args.use_peft:
            raise RecipeError("use_peft: this pipeline trains LoRA adapters: set `use_peft: true` in the recipe.")
        if not model_args.model_name_or_path:
            example = "the base model the SFT adapter was trained on" if stage == "dpo" else "e.g. smollm2-135m-instruct"
            raise RecipeError(f"model_name_or_path: set it in the recipe ({example}).")
        self.stage, self.script_args, self.training_args, self.model_args, self.held = (
            stage, script_args, training_args, model_args, held)
        self.state = PartialState()  # binds each process to its device before the model loads (no device_map in DDP)
        self.strategy = checked_strategy(self.state)  # before any work: FSDP/DeepSpeed asked for but not set up
        self.hardware = hardware_chosen(stage, script_args, training_args)
        self.speedups = speedups.resolve(stage, script_args, training_args, model_args)  # `on` that cannot apply fails here
        self.heads = []
        self.attention = None
        self.resume = self.resumed_at_step = self.recipe = self.data_sha256 = None

    def check_template(self, tokenizer, dataset, *column_sets) -> None:
        """The tokenizer pads with its own token and renders every row (each set of columns as one conversation)."""
        from train.loss_mask import check_pad_token, check_renderable

        check_pad_token(tokenizer)
        for columns in column_sets or (("messages",),):
            check_renderable(dataset, tokenizer, columns)

    def claim(self, dataset) -> bool:
        """Own output_dir and decide: False when it already holds this finished run, else True (fresh or resume)."""
        from train.outputs import checkpoint_step, claim_run_folder, dataset_sha256
        from train.recipe import resolved_recipe
        from train.tracking import setup_wandb

        resolved = resolved_recipe(self.script_args, self.training_args, self.model_args)
        # What the user asked for; the hardware's choices go to the manifest. The resume fingerprint keeps both:
        # a checkpoint continues only on the device and precision it was trained with.
        self.recipe = {k: v for k, v in resolved.items() if k not in self.hardware}
        self.data_sha256 = dataset_sha256(dataset)
        todo, self.resume = claim_run_folder(self.held, self.stage, self.training_args, resolved, self.data_sha256,
                                             self.state)
        if todo == "finished":
            return False
        self.resumed_at_step = checkpoint_step(self.resume)  # read now: checkpoint rotation may delete the folder
        setup_wandb(self.training_args, self.script_args, self.stage, resuming=self.resume is not None)
        return True

    def check_prepared(self, trainer, dataset, what="examples") -> None:
        """The trainer kept every row it was given (TRL drops rows it cannot use without failing)."""
        if getattr(trainer.args, "packing", False):
            return
        kept = len(trainer.train_dataset)
        if kept != len(dataset):
            raise RuntimeError(f"{type(trainer).__name__} kept {kept} of {len(dataset)} {what}; expected all of them")

    def forward_summary(self) -> str:
        from train import speedups

        why = self.hardware["bf16"][1] if "bf16" in self.hardware else "the recipe's or TRL's choice"
        return (f"device {self.training_args.device}, {self.precision()} ({why}); forward: "
                + speedups.summary(self.speedups))

    def precision(self) -> str:
        args = self.training_args
        return "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"

    def train(self, trainer):
        """Install the chosen speed-ups, train (resuming where the folder says), and check that the adapter moved."""
        from train import speedups
        from train.outputs import assert_adapter_changed, lora_snapshot

        self.attention = getattr(trainer.model.config, "_attn_implementation", None)  # before fused_attention
        self.heads = speedups.install(trainer, self.speedups)
        self.state.print(self.forward_summary())
        before = lora_snapshot(trainer.model)
        output = trainer.train(resume_from_checkpoint=self.resume)
        self.adapter_check = assert_adapter_changed(before, trainer.model)
        # One line per process, so a multi-process run shows that every rank trained.
        print(f"[rank {self.state.process_index} of {self.state.num_processes}] trained {trainer.state.global_step} "
              f"steps ({self.strategy}, model wrapped as {type(trainer.model_wrapped).__name__})", flush=True)
        return output

    def manifest(self, trainer, train_output, data: dict, **extra) -> dict:
        """The manifest both stages write: the same keys, plus the stage's own (`extra`, `data`'s extra keys)."""
        from train import hardware, speedups
        from train.outputs import final_metrics

        script_args, model_args = self.script_args, self.model_args
        dataset_name = data.pop("path")
        process = hardware.process_settings or {
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "omp_wait_policy_why": "not started as a script (configure_process() not called)",
        }
        return {
            "stage": self.stage,
            "base_model": model_args.model_name_or_path,
            "base_model_path": data.pop("base_model_path"),
            **extra,
            "data": {
                "path": dataset_name,
                "config": data.pop("config"),
                "split": script_args.dataset_train_split,
                "examples": data.pop("examples"),
                "sha256": self.data_sha256,
                **data,
            },
            "hardware": {
                "device": str(self.training_args.device),
                "precision": self.precision(),
                # What the model loaded with (a recipe's attn_implementation, else transformers' choice)
                "attention": self.attention,
                "chosen_by_hardware": {k: {"value": v, "why": why} for k, (v, why) in self.hardware.items()},
                **process,
            },
            "forward": speedups.record(self.speedups, self.heads),
            "parallelism": {"strategy": self.strategy, "model_wrapper": type(trainer.model_wrapped).__name__},
            "resumed_from": self.resume,
            "resumed_at_step": self.resumed_at_step,
            "adapter_check": self.adapter_check,
            "metrics": final_metrics(trainer, train_output, resumed=self.resume is not None),
        }

    def finish(self, trainer, manifest: dict, inputs: list[str]) -> str:
        """Save adapter, recipe and manifest, close tracking, and leave with every rank; returns output_dir."""
        from train.outputs import save_run
        from train.tracking import finish_training_run

        save_run(trainer, self.recipe, manifest)
        peak = manifest.get("metrics", {}).get("peak_rss_gib")
        self.state.print(f"Saved adapter to {self.training_args.output_dir}"
                         + (f" (peak resident memory of rank 0: {peak} GiB)" if peak is not None else ""))
        finish_training_run(self.stage, self.training_args, self.script_args, manifest, inputs=inputs)
        # Ranks leave together: rank 0 still writes the run's files, and a rank that tears the process group down
        # meanwhile was seen to leave the launch hanging (gloo, 2 CPU processes).
        self.state.wait_for_everyone()
        trainer.end()
        return self.training_args.output_dir


def run_main(train_fn, script_args, training_args, model_args):
    """Call `train_fn(..., held)`: output_dir is this run's from its checks until it returns (a second is refused)."""
    import contextlib

    with contextlib.ExitStack() as held:
        return train_fn(script_args, training_args, model_args, held)


def script_main(make_parser, main) -> None:
    """The scripts' `__main__`: configure the process (before torch loads), parse the recipe, train."""
    from train.hardware import configure_process

    configure_process()
    from train.recipe import RecipeError, parse_recipe

    try:
        args = parse_recipe(make_parser())
        main(*args)  # the checks that need the parsed recipe as a whole raise RecipeError too
    except RecipeError as err:
        sys.exit(f"error: {err}")
