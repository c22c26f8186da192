"""Batched log-likelihood scoring of completions given prompts, for several model variants in one pass.

`score_items` groups items that share a prompt (the chosen and rejected answers of a preference pair): the prompts
run once, left-padded, and their KV cache is copied to each continuation, which then runs right-padded after it.
The 49k-vocabulary LM head is applied only to the hidden states that predict a scored token. Position ids come
from the attention mask, so padding never shifts positions. `compare_items` (which needs whole next-token
distributions) runs full left-padded sequences and keeps logits for the completion positions only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm


@dataclass
class Item:
    prompt_ids: list[int]
    completion_ids: list[int]


def render_chat(tokenizer, prompt_messages: list[dict], completion: str, max_length: int = 0) -> Item:
    """Token ids of the chat-templated prompt and of the assistant turn that follows it.

    The completion is whatever the template adds after the generation prompt for this assistant message
    (its text plus the end-of-turn token), so the model is scored on exactly what training taught it to emit.
    """
    prompt_text = tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(
        prompt_messages + [{"role": "assistant", "content": completion}], tokenize=False
    )
    if not full_text.startswith(prompt_text):
        raise ValueError("chat template renders the prompt differently once an assistant turn follows; "
                         "cannot separate completion tokens from prompt tokens")
    completion_text = full_text[len(prompt_text):].rstrip("\n")
    p = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    return truncate(Item(p, c), max_length)


def render_text(tokenizer, text: str, max_tokens: int) -> Item:
    """Plain text scored from its second token on (the first has no context)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    return Item(ids[:1], ids[1:])


def truncate(item: Item, max_length: int) -> Item:
    if not max_length or len(item.prompt_ids) + len(item.completion_ids) <= max_length:
        return item
    keep_c = item.completion_ids[: max_length // 2] if len(item.completion_ids) > max_length // 2 else item.completion_ids
    keep_p = item.prompt_ids[-(max_length - len(keep_c)):]
    return Item(keep_p, keep_c)


def _batches(items: list[Item], batch_size: int):
    """Index batches, longest first, so sequences of similar length share a batch (little padding)."""
    order = sorted(range(len(items)), key=lambda i: -(len(items[i].prompt_ids) + len(items[i].completion_ids)))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _collate(items: list[Item], pad_id: int, device):
    lens = [len(it.prompt_ids) + len(it.completion_ids) for it in items]
    width = max(lens)
    cmax = max(len(it.completion_ids) for it in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(items), width), dtype=torch.long)
    comp_mask = torch.zeros((len(items), cmax), dtype=torch.bool)
    for r, it in enumerate(items):
        seq = it.prompt_ids + it.completion_ids
        input_ids[r, width - len(seq):] = torch.tensor(seq)
        attn[r, width - len(seq):] = 1
        comp_mask[r, cmax - len(it.completion_ids):] = True
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return input_ids.to(device), attn.to(device), pos.to(device), comp_mask.to(device), cmax


def _groups(items: list[Item]) -> list[list[int]]:
    """Item indices grouped by identical prompt, in first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(tuple(it.prompt_ids), []).append(i)
    return list(groups.values())


def _group_batches(items: list[Item], groups: list[list[int]], batch_size: int):
    """Groups, longest first, packed until a batch holds `batch_size` continuations (at least one group)."""
    order = sorted(groups, key=lambda g: -(len(items[g[0]].prompt_ids) + max(len(items[i].completion_ids) for i in g)))
    batch, n = [], 0
    for g in order:
        if batch and n + len(g) > batch_size:
            yield batch
            batch, n = [], 0
        batch.append(g)
        n += len(g)
    if batch:
        yield batch


def _split_model(model):
    """(transformer body, LM head) of a causal LM, through a PEFT wrapper if there is one (adapters stay active)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix), base.get_output_embeddings()


def _token_logprobs(head, hidden, targets):
    """log p(target) for each row of `hidden` [N, H]; the head runs on these rows only."""
    logits = head(hidden).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def _score_shared(model, items: list[Item], groups: list[list[int]], pad_id: int, device):
    """Summed completion log-likelihood of every item in `groups`, each prompt encoded once: {item index: logprob}."""
    body, head = _split_model(model)
    prompts = [items[g[0]].prompt_ids for g in groups]
    pw = max(map(len, prompts))
    p_ids = torch.full((len(groups), pw), pad_id, dtype=torch.long)
    p_attn = torch.zeros((len(groups), pw), dtype=torch.long)
    for r, p in enumerate(prompts):
        p_ids[r, pw - len(p):] = torch.tensor(p)
        p_attn[r, pw - len(p):] = 1
    p_pos = (p_attn.cumsum(-1) - 1).clamp(min=0)
    out = body(input_ids=p_ids.to(device), attention_mask=p_attn.to(device), position_ids=p_pos.to(device), use_cache=True)
    last = out.last_hidden_state[:, -1]  # predicts each continuation's first token
    owner = [r for r, g in enumerate(groups) for _ in g]
    conts = [items[i].completion_ids for g in groups for i in g]
    cw = max(map(len, conts))
    c_ids = torch.full((len(conts), cw), pad_id, dtype=torch.long)
    c_attn = torch.zeros((len(conts), cw), dtype=torch.long)
    for r, c in enumerate(conts):
        c_ids[r, :len(c)] = torch.tensor(c)
        c_attn[r, :len(c)] = 1
    owner_t = torch.tensor(owner)
    cache = out.cache
    cache.reorder_cache(owner_t.to(device))  # one copy of its prompt's keys/values per continuation
    attn = torch.cat([p_attn[owner_t], c_attn], dim=1)
    c_pos = p_attn.sum(-1)[owner_t].unsqueeze(1) + torch.arange(cw).unsqueeze(0)
    c_out = body(input_ids=c_ids.to(device), attention_mask=attn.to(device), position_ids=c_pos.to(device),
                 cache=cache, use_cache=True).last_hidden_state
    # hidden state predicting token j of continuation r: prompt's last for j = 0, continuation position j-1 after
    rows, hid, tgt = [], [], []
    for r, c in enumerate(conts):
        hid.append(torch.cat([last[owner[r]].unsqueeze(0), c_out[r, :len(c) - 1]]))
        tgt.append(c_ids[r, :len(c)])
        rows += [r] * len(c)
    lp = _token_logprobs(head, torch.cat(hid), torch.cat(tgt).to(device))
    sums = torch.zeros(len(conts), dtype=torch.float64, device=device).index_add_(0, torch.tensor(rows, device=device), lp.double())
    flat = [i for g in groups for i in g]
    return dict(zip(flat, sums.cpu().tolist()))


def _forward_logprobs(model, input_ids, attn, pos, cmax):
    """Log-softmax over the vocabulary at the positions that predict the last `cmax` tokens: [B, cmax, V]."""
    out = model(input_ids=input_ids, attention_mask=attn, position_ids=pos, logits_to_keep=cmax + 1, use_cache=False)
    return out.logits[:, :-1, :].float().log_softmax(-1)


@torch.inference_mode()
def score_items(variants, items: list[Item], batch_size: int = 8, desc: str = "scoring",
                share_prompts: bool = True) -> dict[str, dict]:
    """Per variant: `logprob` (sum over completion tokens) and `n_tokens`, in the order of `items`.

    `batch_size` counts continuations. With `share_prompts`, items with the same prompt share one prompt pass;
    without it, every item runs as one full sequence (the simpler path, kept as a reference)."""
    for i, it in enumerate(items):
        if not it.completion_ids or not it.prompt_ids:
            raise ValueError(f"{desc}: item {i} has an empty prompt or completion after tokenization")
    pad_id = variants.tokenizer.pad_token_id
    device = next(variants.model.parameters()).device
    out = {n: {"logprob": np.zeros(len(items)), "n_tokens": np.array([len(it.completion_ids) for it in items])}
           for n in variants.names}
    if share_prompts:
        batches = list(_group_batches(items, _groups(items), batch_size))
        for groups in tqdm(batches, desc=desc, leave=False):
            for name in variants.names:
                with variants.use(name) as model:
                    for i, lp in _score_shared(model, items, groups, pad_id, device).items():
                        out[name]["logprob"][i] = lp
        return out
    for idx in tqdm(_batches(items, batch_size), desc=desc, leave=False):
        input_ids, attn, pos, cmask, cmax = _collate([items[i] for i in idx], pad_id, device)
        targets = input_ids[:, -cmax:]
        for name in variants.names:
            with variants.use(name) as model:
                lp = _forward_logprobs(model, input_ids, attn, pos, cmax)
            tok = lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * cmask
            out[name]["logprob"][idx] = tok.sum(-1).double().cpu().numpy()
            out[name]["n_tokens"][idx] = cmask.sum(-1).cpu().numpy()
    return out


@torch.inference_mode()
def compare_items(variants, items: list[Item], batch_size: int = 8, desc: str = "comparing") -> dict[str, dict]:
    """Token-level comparison of each tuned variant with base on the completion tokens of `items`.

    Per variant and item: `logprob` and `n_tokens` (perplexity), and for tuned variants `kl` (mean per-token
    KL(tuned || base) over the full next-token distribution), `abs_delta` (mean |logprob change| of the
    actual tokens) and `top_token` (the token whose log-prob moved most, with its change).
    """
    tok = variants.tokenizer
    pad_id = tok.pad_token_id
    device = next(variants.model.parameters()).device
    n = len(items)
    out = {name: {"logprob": np.zeros(n), "n_tokens": np.zeros(n, dtype=int)} for name in variants.names}
    for name in variants.tuned:
        out[name].update(kl=np.zeros(n), abs_delta=np.zeros(n), top_token=[None] * n)
    for idx in tqdm(_batches(items, batch_size), desc=desc, leave=False):
        input_ids, attn, pos, cmask, cmax = _collate([items[i] for i in idx], pad_id, device)
        targets = input_ids[:, -cmax:]
        counts = cmask.sum(-1)
        with variants.use("base") as model:
            base_lp = _forward_logprobs(model, input_ids, attn, pos, cmax)
        base_tok = base_lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        out["base"]["logprob"][idx] = (base_tok * cmask).sum(-1).double().cpu().numpy()
        out["base"]["n_tokens"][idx] = counts.cpu().numpy()
        for name in variants.tuned:
            with variants.use(name) as model:
                lp = _forward_logprobs(model, input_ids, attn, pos, cmax)
            kl_tok = (lp.exp() * (lp - base_lp)).sum(-1).clamp(min=0) * cmask
            t_tok = lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            delta = (t_tok - base_tok) * cmask
            out[name]["logprob"][idx] = (t_tok * cmask).sum(-1).double().cpu().numpy()
            out[name]["n_tokens"][idx] = counts.cpu().numpy()
            out[name]["kl"][idx] = (kl_tok.sum(-1) / counts).double().cpu().numpy()
            out[name]["abs_delta"][idx] = (delta.abs().sum(-1) / counts).double().cpu().numpy()
            best = delta.abs().argmax(-1)
            for r, i in enumerate(idx):
                j = int(best[r])
                out[name]["top_token"][i] = {"token": tok.decode([int(targets[r, j])]), "delta_logprob": float(delta[r, j])}
    return out
