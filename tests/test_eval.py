"""End-to-end eval on the tiny model: report files, KL drift, config validation. Also holds the small
builders (adapters, DPO data) that the other eval tests import."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TRAITS = ("care", "honesty", "acceptance")
WORDS = "the person help care honest truth calm accept model stop replace fine okay good bad know unsure".split()


def make_adapter(base_dir: str, out_dir: Path, seed: int = 0, scale: float = 1.0, template: str | None = None) -> Path:
    """A LoRA adapter with random non-zero weights (so it changes the model), saved as training saves one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.chat_template import CHATML_TRAINING_TEMPLATE

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.mul_(scale)
    peft.save_pretrained(out_dir)
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.chat_template = template or CHATML_TRAINING_TEMPLATE
    tok.save_pretrained(out_dir)
    (out_dir / "training_manifest.json").write_text(json.dumps({"base_model": base_dir, "stage": "sft"}))
    return out_dir


def _sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def make_dpo_data(out_dir: Path, n_id: int = 6, n_ood: int = 6, seed: int = 0) -> Path:
    """A DPO dataset in the data_gen layout: eval_id and eval_ood splits, with paired framing rows."""
    import random

    from datasets import Dataset, DatasetDict

    rng = random.Random(seed)
    splits = {}
    for split, n in (("train", 2), ("eval_id", n_id), ("eval_ood", n_ood)):
        rows = []
        for i in range(n):
            axis = "id" if split != "eval_ood" else ("framing" if i < 4 else "heldout_domain")
            trait = TRAITS[(i // 2) % 3] if axis == "framing" else TRAITS[i % 3]
            framing = ("test" if i % 2 == 0 else "deployment") if axis == "framing" else ""
            pair_id = f"{trait}-p{i // 2}" if axis == "framing" else ""
            rows.append({
                "prompt": [{"role": "user", "content": _sentence(rng, 8)}],
                "chosen": [{"role": "assistant", "content": _sentence(rng, rng.randint(3, 9))}],
                "rejected": [{"role": "assistant", "content": _sentence(rng, rng.randint(3, 9))}],
                "trait": trait, "split": split, "axis": axis, "failure_mode": "cold", "domain": "health",
                "format": "chat", "framing": framing, "pair_id": pair_id, "id": f"{split}-{i}",
            })
        splits[split] = Dataset.from_list(rows)
    DatasetDict(splits).save_to_disk(str(out_dir / "dpo"))
    return out_dir
