"""Run by tests/test_anchor.py under `accelerate launch --num_processes 2`: anchored SFT with a budget under DDP.

Ranks take different replay paragraphs, so LoRA weights that agree across ranks after training mean the anchor's
gradient was reduced with TRL's; a budget broken at step 2 must stop both ranks there.
"""

import sys

import torch
from datasets import Dataset
from peft import LoraConfig
from train_fixtures import sft_rows
from trl import SFTConfig, SFTTrainer

from train import speedups
from train.anchor import anchored_trainer_class
from train.anchor_args import AnchorArguments
from train.chat_template import training_chat_template
from train.forgetting_budget import budget_callbacks
from train.models import load_model, load_tokenizer


def main(model_dir: str, output_dir: str) -> None:
    tokenizer = load_tokenizer(model_dir)
    tokenizer.chat_template = training_chat_template(tokenizer)
    anchor = AnchorArguments(anchor_weight=5.0, anchor_batch_size=2, budget_max_kl=1e-7, budget_check_steps=2)
    args = SFTConfig(output_dir=output_dir, max_steps=6, per_device_train_batch_size=2, learning_rate=2e-2,
                     bf16=False, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
                     assistant_only_loss=True, gradient_checkpointing=False, use_cpu=True)
    trainer = anchored_trainer_class(SFTTrainer, anchor)(
        model=load_model(model_dir), args=args, train_dataset=Dataset.from_list([{"messages": r["messages"]}
                                                                                 for r in sft_rows(8)]),
        processing_class=tokenizer, peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                           lora_dropout=0.0, task_type="CAUSAL_LM"),
        callbacks=budget_callbacks(anchor, tokenizer))
    assert speedups.apply(trainer)[0]["label_only_head"].used  # the CPU head, as the training scripts install it
    trainer.train()
    lora = torch.cat([p.detach().flatten() for n, p in trainer.model.named_parameters() if "lora_" in n])
    gathered = trainer.accelerator.gather(lora[None])
    kl = [h["anchor_kl"] for h in trainer.state.log_history if "anchor_kl" in h]
    rank = trainer.accelerator.process_index
    print(f"\n[rank {rank}] wrapped {type(trainer.model_wrapped).__name__} steps {trainer.state.global_step} "
          f"max_weight_diff {float((gathered[0] - gathered[1]).abs().max()):.3g} anchor_kl_max {max(kl):.3g}",
          flush=True)
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:3])
