"""LoRA SFT on the trait conversations, with loss on assistant tokens only.

    accelerate launch --config_file recipes/accelerate_configs/cpu.yaml -m train.sft \\
        --config recipes/quickstart/sft.yaml [--learning_rate 1e-4 ...]
    python -m train.sft --config recipes/quickstart/sft.yaml --inspect 2   # show tokens and labels, no training

The recipe's keys are fields of ScriptArguments (train/recipe.py), TRL's SFTConfig and TRL's
ModelConfig; CLI flags override them. A run killed mid-way resumes from the last checkpoint in
output_dir when started again.
"""

def make_parser():
    from trl import ModelConfig, SFTConfig

    from train.recipe import ScriptArguments
    from train.run import stage_parser

    return stage_parser("sft", (ScriptArguments, SFTConfig, ModelConfig), __doc__.split("\n\n")[0])


def main(script_args, training_args, model_args):
    """Train in output_dir, which this run owns from its checks until it returns (a second run is refused)."""
    from train.run import run_main

    return run_main(_train, script_args, training_args, model_args)


def _train(script_args, training_args, model_args, held):
    from trl import SFTTrainer, get_peft_config, get_quantization_config

    from train import speedups
    from train.data import dataset_source, load_split
    from train.loss_mask import check_trainable_tokens, format_token_view, use_training_chat_template
    from train.models import load_model, load_tokenizer, pretrained_kwargs, resolve_model_path
    from train.run import TrainingRun
    from train.tracking import RecipeToWandb

    run = TrainingRun("sft", script_args, training_args, model_args, held)
    state = run.state

    dataset_name, dataset_config = dataset_source(script_args, "sft")
    dataset = load_split(
        dataset_name, dataset_config, script_args.dataset_train_split, ("messages",), script_args.max_train_examples,
        traits=script_args.traits,
    )
    eval_dataset = None
    if training_args.eval_strategy != "no":  # held-out loss while training
        eval_dataset = load_split(dataset_name, dataset_config, script_args.dataset_test_split, ("messages",),
                                  traits=script_args.traits).select_columns(["messages"])
    tokenizer = load_tokenizer(model_args.model_name_or_path, revision=model_args.model_revision)
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
    run.check_template(tokenizer, dataset, ("messages",))
    trainable_tokens = check_trainable_tokens(dataset, *mask_args)

    if not run.claim(dataset):
        return training_args.output_dir
    base_path = resolve_model_path(model_args.model_name_or_path)
    model = load_model(base_path, dtype=speedups.base_dtype(run.speedups, model_args),
                       quantization_config=get_quantization_config(model_args), **pretrained_kwargs(model_args))

    from train.anchor import anchor_record, anchored_trainer_class
    from train.forgetting_budget import budget_callbacks
    from train.persona_monitor import persona_callbacks

    extra_callbacks = [*budget_callbacks(script_args, tokenizer), *persona_callbacks(script_args, model, tokenizer,
                                                                                     dataset_name)]
    trainer = anchored_trainer_class(SFTTrainer, script_args)(
        model=model,
        args=training_args,
        train_dataset=dataset.select_columns(["messages"]),
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=[RecipeToWandb(script_args, model_args), *extra_callbacks],
    )
    run.check_prepared(trainer, dataset)
    _check_prepared_labels(trainer, dataset, mask_args)
    state.print(
        f"SFT: {len(dataset)} examples, {trainable_tokens} trainable tokens, "
        f"{state.num_processes} process(es){f', resuming from {run.resume}' if run.resume else ''}"
    )

    train_output = run.train(trainer)
    manifest = run.manifest(
        trainer, train_output, **anchor_record(trainer),
        data={"path": dataset_name, "config": dataset_config, "base_model_path": base_path, "examples": len(dataset),
              "trainable_tokens": trainable_tokens},
    )
    return run.finish(trainer, manifest, inputs=[dataset_name])


def _check_prepared_labels(trainer, dataset, mask_args) -> None:
    """TRL prepares labels itself; make sure it masked them as we checked (`run.check_prepared`: it kept them all)."""
    args = trainer.args
    if args.packing or "labels" not in trainer.train_dataset.column_names:
        return
    from train.loss_mask import label_conversation

    prepared = trainer.train_dataset
    if not args.shuffle_dataset:
        for i in range(min(8, len(dataset))):
            _, labels = label_conversation(mask_args[0], dataset[i]["messages"], *mask_args[1:])
            if list(prepared[i]["labels"]) != labels:
                raise RuntimeError(
                    f"SFTTrainer's labels for example {dataset[i].get('id', i)} differ from the checked loss mask"
                )


if __name__ == "__main__":
    from train.run import script_main

    script_main(make_parser, main)
