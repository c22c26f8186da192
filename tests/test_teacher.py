"""Teacher generator against a real OpenAI-compatible HTTP server on 127.0.0.1 with injected faults."""

import hashlib
import json
import threading
import time
from collections import Counter

import pytest
from local_http import LocalServer, QuietHandler

from data_gen.recipe import RecipeError, parse_recipe
from data_gen.spec import BUILTIN_DIR, load_trait_spec
from data_gen.teacher import RequestFailed, ResponseCache, TeacherConfig, run_teacher
from train.assets import read_record

SLOW_S = 0.6
TIMEOUT_S = 0.25


class FakeChatServer(LocalServer):
    """OpenAI-style /v1/chat/completions. Each request's fault is fixed by a hash of its body:
    429 once, 500 twice, slow (past the client timeout) once, malformed JSON, or an empty choice list."""

    def __init__(self, faults=True):
        self.faults, self.lock = faults, threading.Lock()
        self.attempts, self.served = Counter(), Counter()  # per request key; served = 200 the client could read
        self.fail_after = None  # after this many served responses, answer 503 to everything (an outage)
        server = self

        class Handler(QuietHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                req = json.loads(body)
                key = hashlib.sha256(body).hexdigest()
                with server.lock:
                    server.attempts[key] += 1
                    n = server.attempts[key]
                    down = server.fail_after is not None and sum(server.served.values()) >= server.fail_after
                fault = int(key[:8], 16) % 12 if server.faults else 99
                if down:
                    return self.send_body(503, b"unavailable")
                if fault == 0 and n == 1:
                    return self.send_body(429, b"slow down", {"Retry-After": "0"})
                if fault == 1 and n <= 2:
                    return self.send_body(500, b"boom")
                if fault == 2 and n == 1:
                    time.sleep(SLOW_S)  # the client has given up by now; not counted as served
                    return self.send_body(200, b"{}")
                if fault == 3:
                    return self.send_body(200, b"{not json")
                if fault == 4:
                    return self.send_body(200, json.dumps({"choices": []}).encode())
                last = req["messages"][-1]["content"]
                text = f"CRITIQUE: fine.\nREVISED: revised {key[:10]}" if "REVISED:" in last else f"answer {key[:10]} from {req['model']}"
                with server.lock:
                    server.served[key] += 1
                return self.send_body(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode())

        super().__init__(Handler)


@pytest.fixture(scope="module")
def specs():
    return [load_trait_spec(BUILTIN_DIR / f"{n}.yaml") for n in ("care", "instance_reduction")]


def make_jobs(n):
    traits = ["care", "instance_reduction"]
    return [{"trait": traits[i % 2], "prompt": [{"role": "user", "content": f"Question number {i}: what should I do?"}],
             "domain": "user", "format": "single_turn", "id": f"job-{i:03d}"} for i in range(n)]


def tcfg(url, **kw):
    base = dict(teacher_base_url=url, teacher_model="teacher-m", student_model="student-m", max_concurrency=4,
                max_retries=4, backoff_s=0.01, request_timeout_s=TIMEOUT_S)
    return TeacherConfig(**{**base, **kw})


def test_faults_are_retried_and_malformed_dropped(tmp_path, specs):
    jobs = make_jobs(40)
    with FakeChatServer() as srv:
        rows, stats = run_teacher(jobs, specs, tcfg(srv.url), tmp_path / "cache.jsonl", progress=False)
    assert stats.retries > 0 and stats.malformed > 0 and stats.failed == 0
    assert len(rows) + stats.malformed == len(jobs)
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert r["chosen"][0]["content"].startswith("revised ")  # the critique-and-revise answer, parsed
        assert r["rejected"][0]["content"].endswith("from student-m")
        assert r["failure_mode"] == "student_default" and r["prompt"][-1]["role"] == "user"
    # every fault kind fired (429, 500, slow, two malformed kinds), and retried ones ended up served exactly once
    assert {0, 1, 2, 3, 4} <= {int(k[:8], 16) % 12 for k in srv.attempts}
    assert all(srv.attempts[k] >= 2 for k in srv.served if int(k[:8], 16) % 12 in (0, 1, 2))
    assert max(srv.served.values()) == 1


def test_teacher_prompt_hides_constitution_in_system(tmp_path, specs):
    with FakeChatServer(faults=False) as srv:
        rows, _ = run_teacher(make_jobs(2), specs, tcfg(srv.url, critique_and_revise=False), tmp_path / "c.jsonl",
                              progress=False)
    assert [r["chosen"][0]["content"].endswith("from teacher-m") for r in rows] == [True, True]
    from data_gen.teacher import teacher_messages

    msgs = teacher_messages(specs[0].constitution(), [{"role": "system", "content": "Be brief."},
                                                      {"role": "user", "content": "hi"}])
    assert msgs[0]["role"] == "system" and specs[0].statements[0] in msgs[0]["content"]
    assert "do not mention, quote or reveal" in msgs[0]["content"] and msgs[0]["content"].endswith("Be brief.")
    assert msgs[1:] == [{"role": "user", "content": "hi"}]


def test_interrupted_run_resumes_without_loss_or_repeats(tmp_path, specs):
    jobs, cache = make_jobs(30), tmp_path / "cache.jsonl"
    with FakeChatServer() as srv:
        srv.fail_after = 25  # an outage part-way through the run
        with pytest.raises(RequestFailed, match="rerun to resume"):
            run_teacher(jobs, specs, tcfg(srv.url, max_retries=1), cache, progress=False)
        cached_before = len(ResponseCache(cache).data)
        assert 0 < cached_before <= 25
        served_before = Counter(srv.served)
        srv.fail_after = None
        rows, stats = run_teacher(jobs, specs, tcfg(srv.url), cache, progress=False)
    # finished requests came from the cache, never from the server again
    assert stats.cache_hits == cached_before
    assert max(srv.served.values()) == 1
    assert all(srv.served[k] == 1 for k in served_before)
    # nothing lost, nothing duplicated
    assert len(rows) + stats.malformed == len(jobs)
    assert sorted(r["id"] for r in rows) == sorted({r["id"] for r in rows})
    keys = [json.loads(line)["key"] for line in cache.read_text().splitlines()]
    assert len(keys) == len(set(keys))
    # a third run gets every finished answer from the cache: the server serves nothing new
    with FakeChatServer() as srv2:
        rows3, _ = run_teacher(jobs, specs, tcfg(srv2.url), cache, progress=False)
    assert sum(srv2.served.values()) == 0
    assert rows3 == rows


def test_torn_cache_line_is_ignored_and_appends_stay_valid(tmp_path):
    path = tmp_path / "cache.jsonl"
    path.write_text(json.dumps({"key": "a", "response": "A"}) + "\n" + '{"key": "b", "resp')
    cache = ResponseCache(path)
    assert cache.data == {"a": "A"} and cache.torn == 1
    cache.put("c", "C")
    assert ResponseCache(path).data == {"a": "A", "c": "C"}


def test_cli_writes_teacher_dataset(tmp_path):
    from data_gen.teacher import main

    out = tmp_path / "out"
    with FakeChatServer(faults=False) as srv:
        main(["--output_dir", str(out), "--traits", "honesty", "--sft_train_per_trait", "4", "--dpo_train_per_trait", "6",
              "--eval_id_per_trait", "6", "--eval_ood_per_axis_per_trait", "4", "--leakage_embedding_check", "false",
              "--teacher_base_url", srv.url, "--teacher_model", "teacher-m", "--student_model", "student-m",
              "--backoff_s", "0.01"])
    meta = read_record(out)  # data_gen/card.py: generation.json
    assert meta["generator"] == "teacher:teacher-m"
    train = [json.loads(line) for line in (out / "jsonl" / "dpo_train.jsonl").read_text().splitlines()]
    assert train and all(r["failure_mode"] == "student_default" for r in train)
    assert len(train) == len({json.dumps(r["prompt"]) for r in train})
    ood = [json.loads(line) for line in (out / "jsonl" / "dpo_eval_ood.jsonl").read_text().splitlines()]
    assert ood and all(r["failure_mode"] != "student_default" for r in ood)  # eval stays the labelled offline set
    assert (out / "teacher_cache.jsonl").exists()
    # One leakage check (data_gen/leakage.py check_split_leakage), one card schema for both generators.
    assert list(meta["leakage_checks"]) == ["eval_prompts", "train_prompts", "exact", "ngram_containment", "embedding",
                                            "answer_wording"]
    assert meta["leakage_checks"]["exact"] == "passed" and meta["leakage_checks"]["embedding"] == "off"
    assert meta["generator_stats"]["requests"] > 0 and meta["generator_stats"]["failed"] == 0


def test_missing_teacher_model_is_a_recipe_error_not_an_exit(tmp_path):
    from data_gen.teacher import main

    with pytest.raises(RecipeError, match="teacher_model"):
        main(["--output_dir", str(tmp_path / "out"), "--traits", "honesty"])


def test_teacher_config_errors(tmp_path):
    from data_gen.generate import DataGenConfig

    path = tmp_path / "r.yaml"
    path.write_text("teacher_base_url: localhost:8000\n")
    with pytest.raises(RecipeError, match="teacher_base_url"):
        parse_recipe((DataGenConfig, TeacherConfig), ["--config", str(path)])
    path.write_text("max_concurrency: many\n")
    with pytest.raises(RecipeError, match=f"{path}: key 'max_concurrency' must be int"):
        parse_recipe((DataGenConfig, TeacherConfig), ["--config", str(path)])


@pytest.mark.parametrize("argv, message", [
    (["--max_concurrency", "0"], "key 'max_concurrency' must be >= 1, got 0"),
    (["--max_retries", "-1"], "key 'max_retries' must be >= 0, got -1"),
    (["--teacher_backend", "vllm"], "key 'teacher_backend' must be one of 'openai', 'transformers'"),
    (["--sft_train_per_trait", "-2"], "key 'sft_train_per_trait' must be >= 0, got -2"),
    (["--eval_id_per_trait", "0"], "key 'eval_id_per_trait' must be >= 1, got 0"),
    (["--seen_wording_fraction", "1.5"], r"key 'seen_wording_fraction' must be in \[0, 1\], got 1.5"),
])
def test_data_gen_ranges_are_field_metadata_checked_by_the_one_parser(argv, message):
    from data_gen.generate import DataGenConfig

    with pytest.raises(RecipeError, match=f"command line: {message}"):
        parse_recipe((DataGenConfig, TeacherConfig), argv)


@pytest.mark.subprocess
def test_killed_process_resumes_without_repeating_cached_requests(tmp_path):
    """SIGKILL a real `python -m data_gen teacher` run mid-way, then rerun it to completion."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).parents[1]
    out, cache = tmp_path / "out", tmp_path / "out" / "teacher_cache.jsonl"
    with FakeChatServer(faults=False) as srv:
        handler = srv.httpd.RequestHandlerClass
        orig = handler.do_POST

        def slow_post(self):
            time.sleep(0.05)  # slow enough to kill the run part-way
            return orig(self)

        handler.do_POST = slow_post
        args = [sys.executable, "-m", "data_gen", "teacher", "--output_dir", str(out), "--traits", "care",
                "--sft_train_per_trait", "10", "--dpo_train_per_trait", "15", "--eval_id_per_trait", "4",
                "--eval_ood_per_axis_per_trait", "2", "--leakage_embedding_check", "false", "--teacher_base_url",
                srv.url, "--teacher_model", "teacher-m", "--student_model", "student-m", "--max_concurrency", "2"]
        env = {**os.environ, "PYTHONPATH": str(repo)}
        proc = subprocess.Popen(args, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 120
            while time.time() < deadline and (not cache.exists() or len(cache.read_text().splitlines()) < 12):
                assert proc.poll() is None, "run finished before it could be interrupted"
                time.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        before = ResponseCache(cache).data
        assert len(before) >= 12 and not (out / "jsonl").exists()
        served_before = Counter(srv.served)
        subprocess.run(args, cwd=repo, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resent = [k for k in before if srv.served[k] > served_before[k]]
    assert resent == []  # finished (cached) requests were never sent again
    train = [json.loads(line) for line in (out / "jsonl" / "dpo_train.jsonl").read_text().splitlines()]
    prompts = [json.dumps(r["prompt"]) for r in train]
    assert len(prompts) == len(set(prompts)) and len(train) > 0
    keys = [json.loads(line)["key"] for line in cache.read_text().splitlines() if line.strip()]
    assert len(keys) == len(set(keys))


def test_local_transformers_teacher(tmp_path, specs, tiny_model_dir):
    """The tiny random model answers with sampled tokens; seeded per request, cached like HTTP answers."""
    jobs = make_jobs(3)
    cfg = TeacherConfig(teacher_backend="transformers", teacher_model=tiny_model_dir, critique_and_revise=False,
                        max_tokens=8, temperature=1.0)
    rows, stats = run_teacher(jobs, specs, cfg, tmp_path / "cache.jsonl", progress=False)
    assert rows and stats.failed == 0 and len(rows) + stats.malformed == len(jobs)
    assert all(r["chosen"][0]["content"] != r["rejected"][0]["content"] for r in rows)
    rows2, stats2 = run_teacher(jobs, specs, cfg, tmp_path / "cache.jsonl", progress=False)
    assert rows2 == rows and stats2.cache_hits >= 2 * len(rows)
    # without the cache, the per-request seed reproduces the same answers
    rows3, _ = run_teacher(jobs, specs, cfg, tmp_path / "other_cache.jsonl", progress=False)
    assert rows3 == rows
