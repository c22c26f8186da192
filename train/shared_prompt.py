"""DPO's forward with each pair's prompt computed once.

DPOTrainer scores a batch as `[prompt + chosen; prompt + rejected]`, every row padded to the longest, so each
prompt runs through the model twice (policy and reference: four times a step) and short completions carry the
longest row's padding. Here the prompts run once, right-padded to the longest prompt, with the key/value cache
kept; the cache is repeated for the two completions of each pair, and the completions run on it, padded to the
longest completion. Attention sees exactly the same keys (padding is masked), positions continue each row's own
prompt, so every completion token gets the same log-probability as in the concatenated forward (to float
rounding: tests compare them), and gradients flow back through the cache into the prompt's computation.

On SmolLM2-135M with the benchmark's pairs (prompt ~60 tokens, completions ~50) a batch of 8 pairs is 1,528
tokens instead of 2,032; see `scripts/bench_train.py`.

Only batches laid out exactly as DPOTrainer's collator makes them are handled (`pair_layout` checks); anything
else (truncated prompts, prompt tokens that differ between chosen and rejected, packed rows) returns None and the
caller uses the ordinary forward.
"""

from __future__ import annotations

import contextlib
import inspect

import torch


def pair_layout(input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`(prompt_lengths [pairs], completion_lengths [rows])` of a DPO batch `[chosen; rejected]`, or None.

    Requires: attention on a prefix of each row; labels (not -100) exactly on the rest of that prefix after the
    prompt; at least one label per row; and rows i and i + pairs sharing their prompt tokens and length.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] % 2 or attention_mask is None or labels is None:
        return None
    if labels.shape != input_ids.shape or attention_mask.shape != input_ids.shape:
        return None
    pairs = input_ids.shape[0] // 2
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    lengths = attention_mask.sum(1)
    labelled = labels != -100
    prompt_len = labelled.int().argmax(1)  # the first labelled position
    if not torch.equal(attention_mask.bool(), positions < lengths[:, None]):
        return None
    completion = (positions >= prompt_len[:, None]) & (positions < lengths[:, None])
    if not labelled.any(1).all() or not torch.equal(labelled, completion) or (prompt_len == 0).any():
        return None
    prompt_len = prompt_len[:pairs]
    if not torch.equal(prompt_len, labelled.int().argmax(1)[pairs:]):
        return None
    same_prompt = (input_ids[:pairs] == input_ids[pairs:]) | (positions >= prompt_len[:, None])
    if not same_prompt.all():
        return None
    return prompt_len, lengths - torch.cat([prompt_len, prompt_len])


def completion_hidden(body, input_ids, prompt_len, completion_len, unpad=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states that predict each completion token, and those tokens: `([tokens, hidden], [tokens])`.

    `body` is the decoder without its LM head (`model.get_decoder()` / `model.base_model`). Rows come out in the
    batch's order and each row's tokens in sequence order: the order of `labels[:, 1:][labels[:, 1:] != -100]`.
    `unpad` (a `train.unpadded_mlp.UnpaddedMLP`) runs the MLPs on real tokens only.
    """
    from transformers import DynamicCache

    def real_tokens(mask):
        return unpad.tokens(mask) if unpad is not None else contextlib.nullcontext()

    pairs = prompt_len.shape[0]
    device = input_ids.device
    longest_prompt, longest_completion = int(prompt_len.max()), int(completion_len.max())
    positions = torch.arange(max(longest_prompt, longest_completion), device=device)
    prompt_mask = (positions[:longest_prompt] < prompt_len[:, None]).long()

    cache_kw = "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"
    cache = DynamicCache(config=body.config)
    with real_tokens(prompt_mask):
        prompt_hidden = body(
            input_ids=input_ids[:pairs, :longest_prompt], attention_mask=prompt_mask, use_cache=True, **{cache_kw: cache}
        ).last_hidden_state

    # Rows interleaved (chosen 0, rejected 0, chosen 1, ...) so that repeating the cache row-wise lines up
    order = torch.stack([torch.arange(pairs, device=device), torch.arange(pairs, device=device) + pairs], 1).flatten()
    cache.batch_repeat_interleave(2)
    start = prompt_len.repeat_interleave(2)
    completion_pos = start[:, None] + positions[None, :longest_completion]
    completion_mask = positions[None, :longest_completion] < completion_len[order][:, None]
    completion_ids = input_ids[order].gather(1, completion_pos.clamp(max=input_ids.shape[1] - 1))
    completion_ids = completion_ids.masked_fill(~completion_mask, 0)
    with real_tokens(completion_mask):
        completion_states = body(
            input_ids=completion_ids,
            attention_mask=torch.cat([prompt_mask.repeat_interleave(2, 0), completion_mask.long()], 1),
            position_ids=completion_pos,
            use_cache=True,
            **{cache_kw: cache},
        ).last_hidden_state

    # Completion token t is predicted by the hidden state before it: the prompt's last one for t = 0
    last_prompt = prompt_hidden[torch.arange(pairs, device=device), prompt_len - 1].repeat_interleave(2, 0)
    predictors = torch.cat([last_prompt[:, None], completion_states[:, :-1]], 1)
    back = torch.empty_like(order)
    back[order] = torch.arange(order.shape[0], device=device)
    predictors, completion_ids, completion_mask = predictors[back], completion_ids[back], completion_mask[back]
    return predictors[completion_mask], completion_ids[completion_mask]
