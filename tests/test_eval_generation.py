"""Generation backends. The HTTP one runs against a real OpenAI-compatible server on 127.0.0.1 (how vLLM serves
a base model and its LoRA adapters) that checks the requested model name and injects faults. The in-process
vLLM backend needs CUDA and runs only in scripts/gpu_check.sh; here only its setup is checked."""

import json
import threading

import pytest
from local_http import LocalServer, QuietHandler

import train.chat_endpoint
from eval.config import load_config
from eval.generation import generate_http, generate_vllm, vllm_lora_rank
from train.chat_endpoint import ChatEndpoint

SERVED = {"served-base": "BASE", "persona-sft": "SFT"}  # served model name -> tag put in its answers


class OpenAIServer(LocalServer):
    """Serves /v1/chat/completions for the models in SERVED (404 for any other name, as vLLM does). `plan` maps
    (model, last user message) to behaviours used one per request, the last repeating: "500", "429", "ok",
    "nocontent"."""

    def __init__(self, plan=None):
        self.plan, self.requests = plan or {}, []
        self.lock = threading.Lock()
        server = self

        class Handler(QuietHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                model, question = body["model"], body["messages"][-1]["content"]
                with server.lock:
                    server.requests.append(body)
                    k = sum(1 for b in server.requests if b["model"] == model and b["messages"][-1]["content"] == question) - 1
                if model not in SERVED:
                    return self.send_body(404, json.dumps({"error": {"message": f"The model `{model}` does not exist."}}).encode())
                steps = server.plan.get((model, question), ["ok"])
                step = steps[min(k, len(steps) - 1)]
                if step in ("500", "429"):
                    return self.send_body(int(step), b'{"error": "busy"}')
                content = None if step == "nocontent" else f"{SERVED[model]} answers: {question}"
                choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                return self.send_body(200, json.dumps({"choices": [choice]}).encode())

        super().__init__(Handler)


@pytest.fixture
def sleeps(monkeypatch):
    """Backoff waits are recorded instead of slept, so retries cost no test time."""
    slept = []
    monkeypatch.setattr(train.chat_endpoint.time, "sleep", slept.append)
    return slept


def test_request_is_greedy_chat_with_the_whole_conversation(sleeps):
    convs = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"}],
             [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Q2"}],
             [{"role": "user", "content": "Q3"}]]
    plan = {("served-base", "Q2"): ["500", "429", "ok"], ("served-base", "Q3"): ["nocontent"]}
    with OpenAIServer(plan) as srv:
        endpoint = ChatEndpoint(srv.url, timeout=5, workers=2)
        answers = generate_http(endpoint, "served-base", convs, max_new_tokens=17)
    assert answers == ["BASE answers: Q1", "BASE answers: Q2", None]
    assert all(b["temperature"] == 0 and b["max_tokens"] == 17 and b["model"] == "served-base" for b in srv.requests)
    # the messages go verbatim: the server applies the chat template
    assert {json.dumps(b["messages"]) for b in srv.requests} == {json.dumps(c) for c in convs}
    assert len(srv.requests) == 5  # Q1 once, Q2 three times (500, 429, ok), Q3 once (no text: not retried)
    assert dict(endpoint.failures) == {"no answer text": 1}
    assert len(sleeps) == 2 and sleeps[1] > sleeps[0] > 0  # exponential backoff between the Q2 retries


def test_unknown_served_name_fails_every_item_without_retries(sleeps):
    with OpenAIServer() as srv:
        endpoint = ChatEndpoint(srv.url, timeout=5, workers=2)
        answers = generate_http(endpoint, "sft", [[{"role": "user", "content": "Q"}]] * 3, max_new_tokens=5)
    assert answers == [None, None, None] and dict(endpoint.failures) == {"http 404": 3} and len(srv.requests) == 3


def test_eval_run_sends_base_and_lora_names_and_reports_failed_items(tiny_model_dir, tmp_path, sleeps):
    from train_fixtures import make_adapter, make_dpo_data

    from eval.judges import pick_prompts
    from eval.run import main

    make_adapter(tiny_model_dir, tmp_path / "sft", seed=1)
    make_dpo_data(tmp_path / "data")
    questions = [r["prompt"][-1]["content"] for r in pick_prompts(str(tmp_path / "data"), 3, 0)]
    flaky, broken = questions[0], questions[1]
    plan = {("persona-sft", flaky): ["500", "ok"], ("persona-sft", broken): ["500"]}
    with OpenAIServer(plan) as srv:
        report = main(["--model", tiny_model_dir, "--adapters", json.dumps({"sft": str(tmp_path / "sft")}),
                       "--dataset_path", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"),
                       "--suites", "[generation]", "--generation_prompts", "3", "--max_new_tokens", "9",
                       "--bootstrap_samples", "50", "--generation_backend", "openai", "--generation_base_url", srv.url,
                       "--generation_models", json.dumps({"base": "served-base", "sft": "persona-sft"}),
                       "--generation_concurrency", "2", "--judge", "similarity"])  # the fixture has too few train pairs for the classifier
    gen = report["generation"]
    assert gen["backend"] == "openai"
    assert {b["model"] for b in srv.requests} == {"served-base", "persona-sft"}
    assert all(b["max_tokens"] == 9 and b["temperature"] == 0 for b in srv.requests)
    by_key = {(s["model"], s["question"]): s for s in gen["samples"]}
    for q in questions:  # each answer came from the model its variant names, for its own prompt
        assert by_key[("base", q)]["answer"] == f"BASE answers: {q}"
    assert by_key[("sft", flaky)]["answer"] == f"SFT answers: {flaky}"
    assert by_key[("sft", broken)]["answer"] is None  # failed: never an empty answer passed to the judge
    assert by_key[("sft", broken)]["trait_score"] is None and by_key[("sft", broken)]["coherence"] is None
    assert sum(b["model"] == "persona-sft" and b["messages"][-1]["content"] == broken for b in srv.requests) == 4
    assert gen["generation_failures"] == {"sft": {"http 500": 1}}
    summary = {(r["model"], r["trait"]): r for r in gen["summary"]}
    assert summary[("sft", "all")]["generation_failed"] == 1 and summary[("sft", "all")]["unscored"] == 1
    assert summary[("base", "all")]["generation_failed"] == 0 and summary[("base", "all")]["unscored"] == 0
    assert summary[("sft", "all")]["coherent_share"]["n"] == 8  # 3 prompts per trait, one failed
    assert "Failed generation requests" in (tmp_path / "out" / "report.md").read_text()


def test_openai_backend_config_names_missing_fields():
    base = ["--suites", "[generation]", "--generation_backend", "openai", "--adapters", "{sft: a, dpo: b}"]
    with pytest.raises(ValueError, match="generation_base_url"):
        load_config(None, base)
    url = ["--generation_base_url", "http://localhost:8000/v1"]
    with pytest.raises(ValueError, match=r"generation_models has no served model name for \['base', 'dpo'\]"):
        load_config(None, base + url + ["--generation_models", "{sft: persona-sft}"])
    with pytest.raises(ValueError, match=r"generation_models names \['sfft'\]"):
        load_config(None, base + url + ["--generation_models", "{base: b, sft: s, dpo: d, sfft: x}"])
    with pytest.raises(ValueError, match="key 'generation_backend' must be one of"):
        load_config(None, ["--generation_backend", "vllm-server"])
    cfg = load_config(None, base + url + ["--generation_models", "{base: b, sft: s, dpo: d}"])
    assert cfg.generation_models == {"base": "b", "sft": "s", "dpo": "d"}


def test_vllm_lora_rank_rounds_up_to_a_rank_vllm_accepts(tmp_path):
    def adapter(name, r, pattern=None):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"r": r, "rank_pattern": pattern or {}}))
        return str(tmp_path / name)

    assert vllm_lora_rank({"a": adapter("a", 16)}) == 16
    assert vllm_lora_rank({"a": adapter("b", 4), "c": adapter("c", 24)}) == 32
    assert vllm_lora_rank({"a": adapter("d", 8, {"q_proj": 100})}) == 128
    with pytest.raises(ValueError, match="above vLLM's largest"):
        vllm_lora_rank({"a": adapter("e", 1024)})


def test_vllm_backend_without_vllm_says_how_to_install():
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed: scripts/gpu_check.sh exercises the backend")
    with pytest.raises(ImportError, match=r"pip install vllm"):
        generate_vllm("unused", {}, [[{"role": "user", "content": "hi"}]], 4)
