"""Batched greedy generation with left padding and the KV cache."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


@torch.inference_mode()
def generate(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 64, batch_size: int = 8,
             desc: str = "generating") -> list[str]:
    """Greedy answers to each conversation (a list of messages ending with a user turn), in input order."""
    prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers = [""] * len(prompts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
            idx = order[start:start + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for r, i in enumerate(idx):
                answers[i] = tokenizer.decode(out[r, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = side
    return answers
