"""LoRA DPO on the trait preference pairs, continuing the SFT adapter.

    accelerate launch --config_file recipes/accelerate_configs/cpu.yaml -m train.dpo \\
        --config recipes/quickstart/dpo.yaml [--beta 0.2 ...]

Why DPO continues the SFT adapter (rather than merging SFT into the base and adding a second LoRA):
the SFT adapter is loaded trainable (`PeftModel.from_pretrained(base, sft_adapter, is_trainable=True)`)
and handed to DPOTrainer with no `peft_config` and no `ref_model`. TRL then adds a frozen copy of
the adapter ("ref"), so the DPO reference is exactly the SFT policy, the standard SFT -> DPO setup,
without a second copy of the base weights in memory and without merging (which is lossy for a
4-bit base). The result is one adapter on the original base model: eval and publishing need
nothing but the base id and this folder.
"""

import dataclasses
import os

from train.recipe import ScriptArguments


@dataclasses.dataclass
class DPOScriptArguments(ScriptArguments):
    sft_adapter: str | None = dataclasses.field(
        default=None,
        metadata={"help": "Adapter folder written by train.sft; DPO continues it (None: a fresh LoRA on the base)."},
    )


def make_parser():
    from trl import DPOConfig, ModelConfig

    from train.run import stage_parser

    return stage_parser("dpo", (DPOScriptArguments, DPOConfig, ModelConfig), __doc__.split("\n\n")[0])


def _base_of(adapter_dir: str) -> str:
    import json
    from pathlib import Path

    config = Path(adapter_dir) / "adapter_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"sft_adapter: {config} not found (run train.sft first, or set sft_adapter: null)")
    return json.loads(config.read_text())["base_model_name_or_path"]


# ModelConfig's LoRA fields and the adapter_config.json keys they become.
_LORA_SHAPE = {"lora_r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
               "lora_target_modules": "target_modules", "lora_modules_to_save": "modules_to_save",
               "use_rslora": "use_rslora", "use_dora": "use_dora"}


def _check_lora_shape(model_args, adapter_dir: str) -> None:
    """Refuse LoRA settings that would be silently ignored: DPO continues the SFT adapter, whose shape is fixed.

    Only settings changed from ModelConfig's defaults are compared (the DPO recipes leave them unset).
    """
    import json
    from pathlib import Path

    saved = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    defaults = {f.name: f.default for f in dataclasses.fields(model_args) if f.name in _LORA_SHAPE}
    for flag, key in _LORA_SHAPE.items():
        value = getattr(model_args, flag)
        if value == defaults[flag] or value == "all-linear":  # PEFT saves all-linear as the module names it found
            continue
        have = saved.get(key)
        same = sorted(value) == sorted(have or []) if isinstance(value, list) else value == have
        if not same:
            raise ValueError(
                f"{flag} {value} has no effect: DPO continues sft_adapter {adapter_dir}, whose adapter_config.json "
                f"has {key} = {have}. Drop the setting, or train an SFT adapter with it."
            )


def main(script_args, training_args, model_args):
    """Train in output_dir, which this run owns from its checks until it returns (a second run is refused)."""
    from train.run import run_main

    return run_main(_train, script_args, training_args, model_args)


def _train(script_args, training_args, model_args, held):
    from peft import PeftModel
    from trl import DPOTrainer, get_peft_config, get_quantization_config

    from train import speedups
    from train.data import dataset_source, load_split
    from train.loss_mask import check_preference_pairs
    from train.models import load_model, load_tokenizer, pretrained_kwargs, resolve_model_path
    from train.run import TrainingRun
    from train.tracking import RecipeToWandb

    run = TrainingRun("dpo", script_args, training_args, model_args, held)
    state = run.state

    columns = ("prompt", "chosen", "rejected")
    dataset_name, dataset_config = dataset_source(script_args, "dpo")
    dataset = load_split(
        dataset_name, dataset_config, script_args.dataset_train_split, columns, script_args.max_train_examples,
        traits=script_args.traits,
    )
    eval_dataset = None
    if training_args.eval_strategy != "no":  # held-out loss and reward accuracies while training
        eval_dataset = load_split(dataset_name, dataset_config, script_args.dataset_test_split, columns,
                                  traits=script_args.traits).select_columns(list(columns))
    base_path = resolve_model_path(model_args.model_name_or_path)
    if script_args.sft_adapter:
        sft_base = _base_of(script_args.sft_adapter)
        if os.path.realpath(sft_base) != os.path.realpath(base_path) and sft_base != model_args.model_name_or_path:
            raise ValueError(
                f"sft_adapter {script_args.sft_adapter} was trained on {sft_base}, "
                f"but model_name_or_path resolves to {base_path}"
            )
        _check_lora_shape(model_args, script_args.sft_adapter)
        # The tokenizer saved with the adapter carries the exact chat template SFT trained with.
        tokenizer = load_tokenizer(script_args.sft_adapter)
    else:
        # DPO scores whole completions and needs no generation markers: train with the template as served.
        tokenizer = load_tokenizer(model_args.model_name_or_path, revision=model_args.model_revision)
        if not tokenizer.chat_template:
            raise ValueError(f"{model_args.model_name_or_path} has no chat template; DPO on conversations needs one")
    run.check_template(tokenizer, dataset, ("prompt", "chosen"), ("prompt", "rejected"))
    check_preference_pairs(dataset, tokenizer, training_args.max_length, training_args.truncation_mode)
    if script_args.inspect:
        for row in dataset.select(range(min(script_args.inspect, len(dataset)))):
            print(f"=== pair {row.get('id', '')} ===")
            for side in ("chosen", "rejected"):
                text = tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=False)
                print(f"--- {side} ---\n{text}")
        return None

    if not run.claim(dataset):
        return training_args.output_dir
    model = load_model(base_path, dtype=speedups.base_dtype(run.speedups, model_args),
                       quantization_config=get_quantization_config(model_args), **pretrained_kwargs(model_args))
    peft_config = None
    if script_args.sft_adapter:
        model = PeftModel.from_pretrained(model, script_args.sft_adapter, is_trainable=True)
    else:
        peft_config = get_peft_config(model_args)

    from train.anchor import anchor_record, anchored_trainer_class
    from train.forgetting_budget import budget_callbacks
    from train.persona_monitor import persona_callbacks

    extra_callbacks = [*budget_callbacks(script_args, tokenizer), *persona_callbacks(script_args, model, tokenizer,
                                                                                     dataset_name)]
    trainer = anchored_trainer_class(DPOTrainer, script_args)(
        model=model,
        args=training_args,
        train_dataset=dataset.select_columns(list(columns)),
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[RecipeToWandb(script_args, model_args), *extra_callbacks],
    )
    run.check_prepared(trainer, dataset, "pairs")
    state.print(
        f"DPO: {len(dataset)} pairs, reference = {'the SFT adapter' if script_args.sft_adapter else 'the base model'}, "
        f"{state.num_processes} process(es){f', resuming from {run.resume}' if run.resume else ''}"
    )

    train_output = run.train(trainer)
    manifest = run.manifest(
        trainer, train_output, **anchor_record(trainer),
        data={"path": dataset_name, "config": dataset_config, "base_model_path": base_path, "examples": len(dataset)},
        sft_adapter=script_args.sft_adapter,
        reference_model="sft adapter (frozen copy)" if script_args.sft_adapter else "base model",
    )
    inputs = [dataset_name] + ([script_args.sft_adapter] if script_args.sft_adapter else [])
    return run.finish(trainer, manifest, inputs=inputs)


if __name__ == "__main__":
    from train.run import script_main

    script_main(make_parser, main)
