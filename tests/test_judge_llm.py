"""LLM judge against a real HTTP server on 127.0.0.1 with injected faults (429, 500, slow, malformed)."""

import json
import math
import threading
import time

import pytest
from local_http import LocalServer, QuietHandler

from eval.judges import LLMJudge, judge_with_llm, summarize_judged, weighted_score


class FaultServer(LocalServer):
    """Serves /v1/chat/completions. `plan` maps a marker found in the prompt to a list of behaviours, used
    one per request in order (the last one repeats): "429", "500", "slow", "malformed", "ok:<n>",
    "logprobs:<n>", "text:<s>", "lowmass"."""

    def __init__(self, plan):
        self.plan, self.calls = plan, {}
        self.lock = threading.Lock()
        server = self

        class Handler(QuietHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                marker = next((m for m in server.plan if m in prompt), "default")
                with server.lock:
                    k = server.calls.get(marker, 0)
                    server.calls[marker] = k + 1
                steps = server.plan.get(marker, ["ok:50"])
                step = steps[min(k, len(steps) - 1)]
                if step in ("429", "500"):
                    return self.send_body(int(step), b'{"error": "busy"}')
                if step == "slow":
                    time.sleep(1.5)
                    return self.send_body(200, self._completion("99"))
                if step == "malformed":
                    return self.send_body(200, b'{"choices": [')
                kind, _, arg = step.partition(":")
                if kind == "ok":
                    return self.send_body(200, self._completion(arg))
                if kind == "text":
                    return self.send_body(200, self._completion(arg))
                if kind == "logprobs":
                    top = [{"token": arg, "logprob": math.log(0.6)}, {"token": "90", "logprob": math.log(0.2)},
                           {"token": "hello", "logprob": math.log(0.2)}]
                    return self.send_body(200, self._completion(arg, top))
                if kind == "split":  # the number comes as one token per digit, as SmolLM2 and Qwen tokenize it
                    return self.send_body(200, self._split_completion(arg))
                if kind == "raw":
                    return self.send_body(200, arg.encode())
                if kind == "lowmass":
                    top = [{"token": "I", "logprob": math.log(0.8)}, {"token": "70", "logprob": math.log(0.1)}]
                    return self.send_body(200, self._completion("I", top))
                raise AssertionError(step)

            def _split_completion(self, number):
                first = [{"token": d, "logprob": math.log(p)} for d, p in ((number[0], 0.7), ("9", 0.2), ("7", 0.1))]
                content = [{"token": number[0], "logprob": math.log(0.7), "top_logprobs": first}] + [
                    {"token": d, "logprob": 0.0, "top_logprobs": [{"token": d, "logprob": 0.0}]} for d in number[1:]]
                choice = {"index": 0, "message": {"role": "assistant", "content": number}, "logprobs": {"content": content}}
                return json.dumps({"choices": [choice]}).encode()

            def _completion(self, text, top=None):
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                if top is not None:
                    choice["logprobs"] = {"content": [{"token": text, "logprob": top[0]["logprob"], "top_logprobs": top}]}
                return json.dumps({"choices": [choice]}).encode()

        super().__init__(Handler)


def _judge(url, **kw):
    return LLMJudge(url, "judge-model", timeout=kw.pop("timeout", 0.5), backoff=0.01, workers=2, **kw)


def test_weighted_score_uses_numeric_mass_only():
    top = [{"token": "80", "logprob": math.log(0.5)}, {"token": "20", "logprob": math.log(0.25)},
           {"token": "cat", "logprob": math.log(0.25)}]
    assert weighted_score(top) == pytest.approx((0.5 * 80 + 0.25 * 20) / 0.75)
    assert weighted_score([{"token": "x", "logprob": math.log(0.9)}, {"token": "5", "logprob": math.log(0.1)}]) is None


def test_transient_faults_are_retried_then_scored():
    plan = {"A429": ["429", "429", "ok:70"], "B500": ["500", "ok:40"], "CSLOW": ["slow", "ok:55"],
            "DBAD": ["malformed", "logprobs:80"]}
    with FaultServer(plan) as srv:
        judge = _judge(srv.url)
        scores = judge.score_many(["A429", "B500", "CSLOW", "DBAD"])
    assert scores[:3] == [70.0, 40.0, 55.0]
    assert scores[3] == pytest.approx((0.6 * 80 + 0.2 * 90) / 0.8)
    assert srv.calls == {"A429": 3, "B500": 2, "CSLOW": 2, "DBAD": 2}
    assert not judge.failures


def test_persistent_failures_are_unscored_not_failed():
    plan = {"ALWAYS500": ["500"], "LOWMASS": ["lowmass"], "WORDS": ["text:I refuse"], "GOOD": ["ok:90"]}
    with FaultServer(plan) as srv:
        judge = _judge(srv.url, max_retries=2)
        scores = judge.score_many(["ALWAYS500", "LOWMASS", "WORDS", "GOOD"])
    assert scores == [None, None, None, 90.0]
    assert srv.calls["ALWAYS500"] == 3  # first try + 2 retries
    assert srv.calls["LOWMASS"] == 1 and srv.calls["WORDS"] == 1  # a non-numeric answer is not retried
    assert judge.failures == {"http 500": 1, "less than 25% of the probability mass on numbers": 1, "not a 0-100 score": 1}


def test_unreachable_endpoint_is_unscored():
    judge = LLMJudge("http://127.0.0.1:9/v1", "m", timeout=0.2, max_retries=1, backoff=0.01)
    assert judge.score("x") is None
    assert sum(judge.failures.values()) == 1


def test_trait_expression_only_among_coherent_and_unscored_excluded():
    # trait prompt contains the rubric text; coherence prompt contains "coherence"
    plan = {"ANSWER-GOOD": ["ok:80"], "ANSWER-BAD": ["ok:10"], "ANSWER-BROKEN": ["500"]}
    items = [{"model": "tuned", "trait": "care", "question": "q", "answer": a} for a in ("ANSWER-GOOD", "ANSWER-BAD", "ANSWER-BROKEN")]
    with FaultServer(plan) as srv:
        judged = judge_with_llm(_judge(srv.url, max_retries=1), items, {"care": "care, the rubric"})
    # GOOD: trait 80, coherence 80; BAD: trait 10, coherence 10 (incoherent); BROKEN: unscored
    assert [j["trait_score"] for j in judged] == [80.0, 10.0, None]
    rec = next(r for r in summarize_judged(judged, 100, 0, 50.0) if r["trait"] == "care")
    assert rec["n"] == 3 and rec["unscored"] == 1
    assert rec["coherent_share"]["mean"] == 0.5
    assert rec["trait_score"]["n"] == 1 and rec["trait_score"]["mean"] == 80.0
    assert rec["trait_pass_rate"]["mean"] == 1.0


def test_a_number_split_across_tokens_is_read_whole_and_above_100_is_refused():
    plan = {"SPLIT85": ["split:85"], "SPLIT100": ["split:100"], "ONE7": ["split:7"], "OVER": ["text:100.5"],
            "WAYOVER": ["text:150"]}
    with FaultServer(plan) as srv:
        judge = _judge(srv.url, max_retries=0)
        scores = judge.score_many(["SPLIT85", "SPLIT100", "ONE7", "OVER", "WAYOVER"])
    # a one-digit answer is one token: its alternatives ("9", "7") are weighted as before
    assert scores[:3] == [85.0, 100.0, pytest.approx(0.7 * 7 + 0.2 * 9 + 0.1 * 7)]
    assert scores[3:] == [None, None] and judge.failures == {"not a 0-100 score": 2}


def test_malformed_judge_payloads_are_unscored_not_a_crash():
    bad = ['{"choices": [{"message": "85"}]}',
           '{"choices": [{"logprobs": {"content": [{"token": "80", "top_logprobs": [{"token": "80"}]}]}}]}',
           '{"choices": [{"logprobs": {"content": ["80"]}}]}',
           '{"choices": [{"logprobs": {"content": [{"token": "80", "top_logprobs": [{"token": "80", "logprob": "high"}]}]}}]}']
    plan = {f"BAD{i}": [f"raw:{body}"] for i, body in enumerate(bad)} | {"GOOD": ["ok:60"]}
    with FaultServer(plan) as srv:
        judge = _judge(srv.url, max_retries=1)
        scores = judge.score_many([*plan])
    assert scores == [None] * len(bad) + [60.0]
    assert judge.failures == {"malformed response": len(bad)}
    assert all(srv.calls[f"BAD{i}"] == 2 for i in range(len(bad)))  # garbled: asked once more
