"""The one OpenAI-compatible HTTP client (train/chat_endpoint.py), used by the LLM judge, the HTTP generation
backend and the data_gen teacher, against real servers on 127.0.0.1 that misbehave the ways servers and proxies do."""

import email.utils
import json
import threading
import time

import pytest
from local_http import LocalServer, QuietHandler

import train.chat_endpoint
from data_gen.teacher import ChatClient, MalformedResponse, RequestFailed, ResponseCache, Stats
from train.chat_endpoint import ChatEndpoint, retry_after_s

ANSWER = json.dumps({"choices": [{"message": {"role": "assistant", "content": "an answer"}}]}).encode()
KEY = "sk-test-SECRET-key-0123456789"


class ScriptedServer(LocalServer):
    """Answers requests with `steps` in order (the last repeats); records each request's headers."""

    def __init__(self, steps, redirect_to=None):
        self.steps, self.headers, self.lock = list(steps), [], threading.Lock()
        self.in_flight = self.max_in_flight = 0
        server = self

        class Handler(QuietHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with server.lock:
                    step = server.steps[min(len(server.headers), len(server.steps) - 1)]
                    server.headers.append(dict(self.headers))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                counted = [True]

                def answered():  # before the answer goes out: a client that has it may send its next request at once
                    with server.lock:
                        if counted.pop() if counted else False:
                            server.in_flight -= 1

                try:
                    kind, _, arg = step.partition(":")
                    if kind == "ok":
                        return self.send_body(200, ANSWER)
                    if kind == "wait":  # a slow but well-behaved answer
                        time.sleep(float(arg))
                        answered()
                        return self.send_body(200, ANSWER)
                    if kind == "redirect":
                        return self.send_redirect(redirect_to, int(arg))
                    if kind == "truncated":
                        return self.send_truncated(ANSWER)
                    if kind == "garbage":
                        return self.send_raw(b"HTTP/1.1 banana\r\n\r\n{}")
                    if kind == "trickle":
                        return self.send_trickle(ANSWER, 0.1)
                    if kind == "notjson":
                        return self.send_body(200, b"<html>proxy error</html>")
                    if kind in ("429", "503"):
                        return self.send_body(int(kind), b"busy", {"Retry-After": arg} if arg else None)
                    raise AssertionError(step)
                finally:
                    answered()

            do_GET = do_POST  # a followed 302/303 arrives as a GET

        super().__init__(Handler)


def _text(choice):
    return choice["message"]["content"]


def _eval_client(url, **kw):
    return ChatEndpoint(url, api_key=KEY, **{"timeout": 0.5, "max_retries": 2, "backoff": 0.01, **kw})


def _teacher_client(url, tmp_path, **kw):
    stats = Stats()
    opts = {"timeout": 0.5, "max_retries": 2, "backoff_s": 0.01, **kw}
    return ChatClient(url, ResponseCache(tmp_path / "cache.jsonl"), stats, api_key=KEY, **opts), stats


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirects_are_refused_and_the_key_never_reaches_the_other_server(code, tmp_path):
    with ScriptedServer(["ok"]) as other, \
            ScriptedServer([f"redirect:{code}"], redirect_to=other.url + "/chat/completions") as srv:
        endpoint = _eval_client(srv.url)
        assert endpoint.request({"model": "m"}, _text) is None
        assert dict(endpoint.failures) == {f"http {code} redirect refused": 1}
        teacher, _ = _teacher_client(srv.url, tmp_path)
        with pytest.raises(RequestFailed, match=f"{code} redirect refused"):
            teacher.chat("m", [{"role": "user", "content": "q"}])
    assert other.headers == []
    assert srv.headers[0]["Authorization"] == f"Bearer {KEY}"
    assert len(srv.headers) == 2  # refused at once, not retried


@pytest.mark.parametrize("fault", ["truncated", "garbage", "notjson"])
def test_a_broken_response_is_retried_then_answered(fault, tmp_path):
    with ScriptedServer([fault, "ok"]) as srv:
        assert _eval_client(srv.url).request({"model": "m"}, _text) == "an answer"
    with ScriptedServer([fault, "ok"]) as srv:
        teacher, stats = _teacher_client(srv.url, tmp_path)
        assert teacher.chat("m", [{"role": "user", "content": "q"}]) == "an answer"
    assert stats.retries == 1 and stats.requests == 2


@pytest.mark.parametrize("fault", ["truncated", "garbage", "notjson"])
def test_a_server_that_keeps_breaking_is_counted_not_a_crash(fault, tmp_path):
    with ScriptedServer([fault]) as srv:
        endpoint = _eval_client(srv.url)
        answers = endpoint.map(lambda body: endpoint.request(body, _text), [{"model": "m"}] * 3)
        assert answers == [None, None, None] and sum(endpoint.failures.values()) == 3
        assert len(srv.headers) == 9  # each: first try + 2 retries
        teacher, _ = _teacher_client(srv.url, tmp_path)
        # the teacher drops a row whose answer is unusable and stops for a server it cannot reach
        with pytest.raises(MalformedResponse if fault == "notjson" else RequestFailed):
            teacher.chat("m", [{"role": "user", "content": "q"}])


def test_the_timeout_is_a_total_deadline_not_per_read(tmp_path):
    # 0.1 s per byte: every read arrives in time, the whole body would take several seconds
    with ScriptedServer(["trickle"]) as srv:
        start = time.monotonic()
        endpoint = _eval_client(srv.url, max_retries=0)
        assert endpoint.request({"model": "m"}, _text) is None
        assert time.monotonic() - start < 1.2 and dict(endpoint.failures) == {"timeout": 1}
        teacher, _ = _teacher_client(srv.url, tmp_path, max_retries=0)
        start = time.monotonic()
        with pytest.raises(RequestFailed, match="timeout"):
            teacher.chat("m", [{"role": "user", "content": "q"}])
        assert time.monotonic() - start < 1.2


def test_retry_after_forms():
    soon = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert retry_after_s("3") == 3.0 and retry_after_s("0.25") == 0.25
    assert 28 <= retry_after_s(soon) <= 30
    assert retry_after_s(email.utils.formatdate(time.time() - 30, usegmt=True)) == 0.0
    assert retry_after_s(None) is None and retry_after_s("soon") is None and retry_after_s("-5") is None
    assert retry_after_s("nan") is None and retry_after_s("inf") is None


@pytest.fixture
def sleeps(monkeypatch):
    slept = []
    monkeypatch.setattr(train.chat_endpoint.time, "sleep", slept.append)
    return slept


@pytest.mark.parametrize("client", ["eval", "teacher"])
def test_retry_after_is_honoured_in_every_form_and_capped(client, sleeps, tmp_path):
    soon = email.utils.formatdate(time.time() + 30, usegmt=True)
    with ScriptedServer(["429:0.25", f"503:{soon}", "429:7200", "ok"]) as srv:
        if client == "eval":
            assert _eval_client(srv.url, max_retries=3).request({"model": "m"}, _text) == "an answer"
        else:
            teacher, _ = _teacher_client(srv.url, tmp_path, max_retries=3)
            assert teacher.chat("m", [{"role": "user", "content": "q"}]) == "an answer"
    assert sleeps[0] == 0.25 and 28 <= sleeps[1] <= 30 and sleeps[2] == 60.0  # an hour is capped at a minute


def test_requests_in_flight_are_bounded_by_workers_however_many_threads_call():
    from concurrent.futures import ThreadPoolExecutor

    with ScriptedServer(["wait:0.05"]) as srv:
        endpoint = _eval_client(srv.url, workers=3)
        with ThreadPoolExecutor(12) as pool:  # e.g. the teacher's job threads sharing one endpoint
            answers = list(pool.map(lambda body: endpoint.request(body, _text), [{"model": "m"}] * 12))
    assert answers == ["an answer"] * 12 and srv.max_in_flight == 3
