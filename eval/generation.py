"""Greedy generation for the base model and each adapter, by one of three backends.

- `transformers` (default): batched, left padding, KV cache, in this process.
- `openai`: any OpenAI-compatible `/chat/completions` server, which is how vLLM is usually run:
  `vllm serve <base> --enable-lora --lora-modules sft=<adapter dir> ...`; the base model is requested by its
  served name and each adapter by its `--lora-modules` name (`generation_models` maps variant -> name). The
  server applies the chat template. Failed requests (after retries) give None, never an empty answer.
- `vllm`: vLLM in this process (`vllm.LLM` with `enable_lora`, one `LoRARequest` per adapter), rendering
  with the same chat template as the transformers backend. Needs `pip install vllm` and a CUDA GPU; only
  scripts/gpu_check.sh exercises it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from train.chat_endpoint import ChatEndpoint, EndpointError

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the only max_lora_rank values vLLM accepts


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
    # generate() asks for the last position's logits only when the model's own forward names `logits_to_keep`; a
    # PeftModel's forward does not, so the prefill would compute batch x prompt x vocabulary logits (GBs at batch 32)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    keep = {"logits_to_keep": 1} if getattr(inner, "_supports_logits_to_keep", lambda: False)() else {}
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
            idx = order[start:start + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **keep)
            for r, i in enumerate(idx):
                answers[i] = tokenizer.decode(out[r, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = side
    return answers


def _answer_text(choice: dict) -> str:
    text = (choice.get("message") or {}).get("content")
    if not isinstance(text, str):
        raise EndpointError("no answer text", repr(choice)[:120])
    return text.strip()


def generate_http(endpoint: ChatEndpoint, model: str, conversations: list[list[dict]], max_new_tokens: int,
                  desc: str = "generating") -> list[str | None]:
    """Greedy answers from an OpenAI-compatible server; None where the request failed after retries."""
    def one(conv):
        body = {"model": model, "messages": conv, "temperature": 0, "max_tokens": max_new_tokens}
        return endpoint.request(body, _answer_text)

    with tqdm(total=len(conversations), desc=desc, leave=False) as bar:
        return endpoint.map(one, conversations, progress=bar)


def vllm_lora_rank(adapter_dirs: dict[str, str]) -> int:
    """The smallest rank vLLM accepts that holds every adapter's rank (incl. per-module `rank_pattern`)."""
    ranks = []
    for d in adapter_dirs.values():
        cfg = json.loads((Path(d) / "adapter_config.json").read_text())
        ranks += [int(cfg["r"]), *map(int, (cfg.get("rank_pattern") or {}).values())]
    need = max(ranks)
    fits = [r for r in VLLM_LORA_RANKS if r >= need]
    if not fits:
        raise ValueError(f"LoRA rank {need} is above vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")
    return fits[0]


def generate_vllm(base_path: str, adapter_dirs: dict[str, str], conversations: list[list[dict]], max_new_tokens: int,
                  chat_template: str | None = None, dtype: str = "auto", seed: int = 0) -> dict[str, list[str]]:
    """Greedy answers of the base model and of each adapter (served as a vLLM LoRA), keyed like Variants.names."""
    try:
        import vllm
        from vllm.lora.request import LoRARequest
    except ImportError as e:
        raise ImportError("generation_backend 'vllm' needs vLLM (pip install vllm) on a CUDA machine; without it use "
                          "generation_backend 'transformers', or 'openai' against a `vllm serve` endpoint") from e
    lora = {"enable_lora": True, "max_lora_rank": vllm_lora_rank(adapter_dirs), "max_loras": 1} if adapter_dirs else {}
    llm = vllm.LLM(model=base_path, dtype=dtype, seed=seed, **lora)
    params = vllm.SamplingParams(temperature=0, max_tokens=max_new_tokens)
    answers = {}
    for i, (name, d) in enumerate([("base", None), *adapter_dirs.items()]):
        request = LoRARequest(name, i, str(d)) if d else None  # LoRA ids must be > 0; base (i = 0) has none
        outs = llm.chat(conversations, params, use_tqdm=True, lora_request=request, chat_template=chat_template)
        answers[name] = [o.outputs[0].text.strip() for o in outs]
    return answers


def generate_variants(variants, cfg, conversations: list[list[dict]]) -> tuple[dict[str, list], dict[str, dict]]:
    """Answers per variant name (None = failed request) and, for the HTTP backend, failure reasons per variant."""
    answers, failures = {}, {}
    if cfg.generation_backend == "transformers":
        for name in variants.names:
            with variants.use(name) as model:
                answers[name] = generate(model, variants.tokenizer, conversations, cfg.max_new_tokens, cfg.generation_batch_size,
                                         desc=f"generate {name}")
    elif cfg.generation_backend == "openai":
        for name in variants.names:
            endpoint = ChatEndpoint(cfg.generation_base_url, os.environ.get(cfg.generation_api_key_env),
                                    timeout=cfg.generation_timeout, workers=cfg.generation_concurrency)
            answers[name] = generate_http(endpoint, cfg.generation_models[name], conversations, cfg.max_new_tokens,
                                          desc=f"generate {name}")
            if endpoint.failures:
                failures[name] = dict(endpoint.failures)
                print(f"[eval] generation: {sum(endpoint.failures.values())}/{len(conversations)} requests for "
                      f"'{name}' (model {cfg.generation_models[name]!r}) failed: {dict(endpoint.failures)}", flush=True)
    elif cfg.generation_backend == "vllm":
        from train.models import resolve_model_path

        answers = generate_vllm(resolve_model_path(cfg.model), variants.adapter_dirs, conversations, cfg.max_new_tokens,
                                variants.tokenizer.chat_template, cfg.dtype, cfg.seed)
    else:
        raise ValueError(f"unknown generation_backend {cfg.generation_backend!r}")
    return answers, failures
