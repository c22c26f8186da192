"""LoRA SFT on the trait conversations, with loss on assistant tokens only.

    accelerate launch --config_file recipes/accelerate_configs/cpu.yaml -m train.sft \\
        --config recipes/quickstart/sft.yaml [--learning_rate 1e-4 ...]
    python -m train.sft --config recipes/quickstart/sft.yaml --inspect 2   # show tokens and labels, no training

The recipe's keys are fields of ScriptArguments (train/recipe.py), TRL's SFTConfig and TRL's
ModelConfig; CLI flags override them. A run killed mid-way resumes from the last checkpoint in
output_dir when started again.
"""

import os
import sys

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # TRL pings telemetry when a trainer is created

from train.cpu_speed import set_cpu_thread_env  # noqa: E402

set_cpu_thread_env()  # before torch loads: OpenMP threads must sleep, not spin, on a shared CPU


def make_parser():
    from trl import ModelConfig, SFTConfig

    from train.recipe import ScriptArguments, recipe_parser

    from train.cpu_speed import fast_cpu_overrides

    parser = recipe_parser((ScriptArguments, SFTConfig, ModelConfig), __doc__.split("\n\n")[0])
    # Hardware-chosen defaults ({} with a GPU); the recipe and the command line still override them.
    parser.set_defaults(**fast_cpu_overrides("sft"))
    return parser


def main(script_args, training_args, model_args):
    """Train in output_dir, which this run owns from its checks until it returns (a second run is refused)."""
    import contextlib

    with contextlib.ExitStack() as held:
        return _train(script_args, training_args, model_args, held)


def _train(script_args, training_args, model_args, held):
    from accelerate import PartialState
    from trl import SFTTrainer, get_peft_config, get_quantization_config

    from train.cpu_speed import keep_freed_memory, use_label_only_lm_head
    from train.data import dataset_source, load_split
    from train.loss_mask import (
        check_pad_token,
        check_renderable,
        check_trainable_tokens,
        format_token_view,
        use_training_chat_template,
    )
    from train.models import load_model, load_tokenizer, resolve_model_path
    from train.outputs import (
        assert_adapter_changed,
        checked_strategy,
        checkpoint_step,
        claim_run_folder,
        dataset_sha256,
        final_metrics,
        lora_snapshot,
        save_run,
    )
    from train.recipe import resolved_recipe
    from train.tracking import RecipeToWandb, finish_training_run, setup_wandb

    if not model_args.use_peft:
        raise ValueError("This pipeline trains LoRA adapters: set `use_peft: true` in the recipe.")
    if not model_args.model_name_or_path:
        raise ValueError("Set `model_name_or_path` in the recipe (e.g. smollm2-135m-instruct).")
    state = PartialState()  # binds each process to its device before the model loads (no device_map under DDP)
    strategy = checked_strategy(state)  # before any work: FSDP/DeepSpeed asked for but not set up is refused

    dataset_name, dataset_config = dataset_source(script_args, "sft")
    dataset = load_split(
        dataset_name, dataset_config, script_args.dataset_train_split, ("messages",), script_args.max_train_examples,
        traits=script_args.traits,
    )
    eval_dataset = None
    if training_args.eval_strategy != "no":  # held-out loss (and DPO's reward accuracies) while training
        eval_dataset = load_split(dataset_name, dataset_config, script_args.dataset_test_split, ("messages",),
                                  traits=script_args.traits).select_columns(list(("messages",)))
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    check_pad_token(tokenizer)
    assistant_only = training_args.assistant_only_loss
    if assistant_only:
        use_training_chat_template(tokenizer, training_args.chat_template_path)
        training_args.chat_template_path = None  # already applied; TRL would otherwise reload it
    mask_args = (tokenizer, training_args.max_length, training_args.truncation_mode, assistant_only)
    if script_args.inspect:
        for row in dataset.select(range(min(script_args.inspect, len(dataset)))):
            print(f"=== example {row.get('id', '')} ===")
            print(format_token_view(mask_args[0], row["messages"], *mask_args[1:]))
        return None
    check_renderable(dataset, tokenizer)
    trainable_tokens = check_trainable_tokens(dataset, *mask_args)

    recipe = resolved_recipe(script_args, training_args, model_args)
    data_sha256 = dataset_sha256(dataset)
    todo, resume = claim_run_folder(held, "sft", training_args, recipe, data_sha256, state)
    if todo == "finished":
        return training_args.output_dir
    resumed_at_step = checkpoint_step(resume)  # read now: checkpoint rotation may delete the folder
    setup_wandb(training_args, script_args, "sft", resuming=resume is not None)
    base_path = resolve_model_path(model_args.model_name_or_path)
    model = load_model(base_path, dtype=model_args.dtype, quantization_config=get_quantization_config(model_args))

    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset.select_columns(["messages"]),
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=[RecipeToWandb(script_args, model_args)],
    )
    _check_prepared_labels(trainer, dataset, mask_args)
    state.print(
        f"SFT: {len(dataset)} examples, {trainable_tokens} trainable tokens, "
        f"{state.num_processes} process(es){f', resuming from {resume}' if resume else ''}"
    )

    use_label_only_lm_head(trainer)  # CPU only: score labelled positions, not the whole padded batch
    keep_freed_memory(trainer.args.device)  # CPU only: reuse freed memory instead of page-faulting it in every step
    before = lora_snapshot(trainer.model)
    train_output = trainer.train(resume_from_checkpoint=resume)
    adapter_check = assert_adapter_changed(before, trainer.model)
    # One line per process, so a multi-process run shows that every rank trained.
    print(f"[rank {state.process_index} of {state.num_processes}] trained {trainer.state.global_step} steps "
          f"({strategy}, model wrapped as {type(trainer.model_wrapped).__name__})", flush=True)

    manifest = {
        "stage": "sft",
        "base_model": model_args.model_name_or_path,
        "base_model_path": base_path,
        "data": {
            "path": dataset_name,
            "config": dataset_config,
            "split": script_args.dataset_train_split,
            "examples": len(dataset),
            "trainable_tokens": trainable_tokens,
            "sha256": data_sha256,
        },
        "parallelism": {"strategy": strategy, "model_wrapper": type(trainer.model_wrapped).__name__},
        "resumed_from": resume,
        "resumed_at_step": resumed_at_step,
        "adapter_check": adapter_check,
        "metrics": final_metrics(trainer, train_output, resumed=resume is not None),
    }
    save_run(trainer, recipe, manifest)
    state.print(f"Saved adapter to {training_args.output_dir}")
    finish_training_run("sft", training_args, script_args, manifest, inputs=[dataset_name])
    # Ranks leave together: rank 0 still writes the run's files, and a rank that tears the process group down
    # meanwhile was seen to leave the launch hanging (gloo, 2 CPU processes).
    state.wait_for_everyone()
    trainer.end()
    return training_args.output_dir


def _check_prepared_labels(trainer, dataset, mask_args) -> None:
    """TRL prepares labels itself; make sure it kept every example and masked them as we checked."""
    args = trainer.args
    if args.packing or "labels" not in trainer.train_dataset.column_names:
        return
    from train.loss_mask import label_conversation

    prepared = trainer.train_dataset
    if len(prepared) != len(dataset):
        raise RuntimeError(f"SFTTrainer kept {len(prepared)} of {len(dataset)} examples; expected all of them")
    if not args.shuffle_dataset:
        for i in range(min(8, len(dataset))):
            _, labels = label_conversation(mask_args[0], dataset[i]["messages"], *mask_args[1:])
            if list(prepared[i]["labels"]) != labels:
                raise RuntimeError(
                    f"SFTTrainer's labels for example {dataset[i].get('id', i)} differ from the checked loss mask"
                )


if __name__ == "__main__":
    from train.recipe import RecipeError, parse_recipe

    try:
        args = parse_recipe(make_parser())
    except RecipeError as err:
        sys.exit(f"error: {err}")
    main(*args)
