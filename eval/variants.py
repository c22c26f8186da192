"""One base model with every adapter attached; `use(name)` switches between base and tuned without reloading."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch


class Variants:
    """`names` starts with "base"; the others are the adapter names."""

    def __init__(self, model, tokenizer, names: list[str], adapter_dirs: dict[str, str] | None = None,
                 template_note: str = ""):
        self.model, self.tokenizer, self.names = model, tokenizer, names
        self.adapter_dirs = adapter_dirs or {}
        self.template_note = template_note

    @property
    def tuned(self) -> list[str]:
        return self.names[1:]

    @contextmanager
    def use(self, name: str):
        if name == "base":
            if self.tuned:
                with self.model.disable_adapter():
                    yield self.model
            else:
                yield self.model
        else:
            self.model.set_adapter(name)
            yield self.model


def _adapter_template(adapter_dir: Path) -> str | None:
    from transformers import AutoTokenizer

    if not (adapter_dir / "tokenizer_config.json").is_file():
        return None
    return AutoTokenizer.from_pretrained(str(adapter_dir)).chat_template


def check_adapter_dir(name: str, adapter_dir: str, base: str) -> Path:
    d = Path(adapter_dir)
    if not (d / "adapter_config.json").is_file():
        raise FileNotFoundError(f"adapter '{name}': {d}/adapter_config.json not found (expected a PEFT adapter folder)")
    from train.models import resolve_model_path
    from train.outputs import MANIFEST, RUN_START, file_sha256

    def same_model(a: str, b: str) -> bool:
        return a == b or os.path.realpath(resolve_model_path(a)) == os.path.realpath(resolve_model_path(b))

    manifest = d / MANIFEST
    if manifest.is_file():
        recorded = json.loads(manifest.read_text())
        if recorded.get("base_model") and not same_model(recorded["base_model"], base):
            raise ValueError(
                f"adapter '{name}' ({d}) was trained on base {recorded['base_model']!r}, but the eval base is {base!r}"
            )
        # Written with the manifest, last: a differing file was written after it (or torn) and is not what trained.
        weights = d / "adapter_model.safetensors"
        if recorded.get("adapter_sha256") and weights.is_file() and file_sha256(weights) != recorded["adapter_sha256"]:
            raise ValueError(
                f"adapter '{name}': {weights} does not match the sha256 in {manifest} (changed or torn after the run "
                "finished); retrain it, or restore the adapter that run saved"
            )
        return d
    if (d / RUN_START).is_file() or any(d.glob("checkpoint-*")):
        raise ValueError(
            f"adapter '{name}': {d} is an unfinished training run (no {MANIFEST}); start the same training command "
            "again to finish it"
        )
    # An adapter made elsewhere has no manifest: its own config must name this base (a model of the same shape
    # would load it without complaint and score nonsense).
    config_base = json.loads((d / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not config_base or not same_model(config_base, base):
        raise ValueError(
            f"adapter '{name}' ({d}) has no {MANIFEST} and its adapter_config.json base_model_name_or_path is "
            f"{config_base!r}, not the eval base {base!r}"
        )
    return d


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU")
    return device


def resolve_dtype(dtype: str, device: str, cpu_flags: set[str] | None = None) -> torch.dtype:
    """`auto`: bf16 where the hardware runs it natively (a CUDA GPU that supports it, a CPU with AVX512-BF16 or AMX),
    fp32 elsewhere (emulated bf16 is slower than fp32). `cpu_flags`: this machine's by default (a parameter for tests).

    bf16 scores agree with fp32 within the eval's own noise (README "Performance"); set `dtype: float32` for exact
    log-probs."""
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        from train.hardware import cpu_supports_bf16

        return torch.bfloat16 if device == "cpu" and cpu_supports_bf16(cpu_flags) else torch.float32
    return getattr(torch, dtype)


def load_variants(model_name: str, adapters: dict[str, str], dtype: str = "float32", device: str = "auto") -> Variants:
    """Load the base once, attach every adapter, and pick the one chat template all of them are scored with.

    The template saved with the adapters is used for base and tuned alike, so a difference between the two
    models is never a difference in prompt formatting. Adapters carrying different templates are an error.
    """
    from train.models import ensure_distinct_pad, load_model, load_tokenizer

    if "base" in adapters:
        raise ValueError("adapter name 'base' is reserved for the model without adapters")
    dirs = {name: check_adapter_dir(name, d, model_name) for name, d in adapters.items()}
    tokenizer = load_tokenizer(model_name)
    base_template = tokenizer.chat_template
    templates = {name: _adapter_template(d) for name, d in dirs.items()}
    from train.chat_template import renders_like

    given = [(n, t) for n, t in templates.items() if t is not None]
    if any(not renders_like(tokenizer, given[0][1], t) for _, t in given[1:]):
        raise ValueError(
            "adapters carry different chat templates, so base and tuned cannot be scored with one template: "
            + ", ".join(f"{n} ({dirs[n]})" for n in templates)
        )
    differs = False
    if given:
        from transformers import AutoTokenizer

        differs = base_template is None or not renders_like(tokenizer, given[0][1], base_template)
        tokenizer = ensure_distinct_pad(AutoTokenizer.from_pretrained(str(dirs[given[0][0]])))
    template_note = (f"chat template saved with adapter '{given[0][0]}'" if given else "the base model's chat template")
    if differs:
        template_note += " (it renders differently from the base model's own template)"
    if tokenizer.pad_token_id is None:
        raise ValueError(f"tokenizer of {model_name} has no pad token; batched scoring needs one")

    device = resolve_device(device)
    model = load_model(model_name, dtype=resolve_dtype(dtype, device)).to(device)
    names = ["base"]
    if dirs:
        from peft import PeftModel

        items = list(dirs.items())
        model = PeftModel.from_pretrained(model, str(items[0][1]), adapter_name=items[0][0])
        for name, d in items[1:]:
            model.load_adapter(str(d), adapter_name=name)
        names += [n for n, _ in items]
    model.eval()
    # Scoring (`logits_to_keep=n`) and generation's prefill (`logits_to_keep=1`) hand the LM head a strided slice of
    # the hidden states. With a frozen head (PEFT freezes it) PyTorch's CPU matmul then broadcasts the weight to one
    # copy per row instead of running one product: 1.7 GB and 1 s for a batch of 30 prompts on the embedded model.
    # A contiguous input takes the plain product, with the same result.
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(_contiguous_input)
    return Variants(model, tokenizer, names, {n: str(d) for n, d in dirs.items()}, template_note)


def _contiguous_input(module, args):
    return tuple(a.contiguous() if torch.is_tensor(a) else a for a in args)
