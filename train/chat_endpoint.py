"""The one client for OpenAI-compatible `/chat/completions` endpoints (vLLM, llama.cpp server, hosted APIs).

Used by the LLM judge, the HTTP generation backend and the data_gen teacher, so all three fail the same way:
- Redirects are refused, never followed: the Authorization header must not reach another server.
- `timeout` is a total deadline per attempt, checked while the body arrives: a server trickling bytes, each in
  time for a per-read timeout, is cut off (at most one read late). Waiting for the response headers is bounded
  by the same `timeout` per read.
- 429, 5xx, timeouts, dropped connections, truncated bodies, garbage status lines and unparseable bodies are
  retried with exponential backoff, or after the server's Retry-After (seconds, decimal seconds or an HTTP
  date), capped at `max_retry_after`. Anything else fails at once.
- Every unusable response is one exception type, `EndpointError`; `request` turns it into None and counts its
  `reason` in `failures`, so callers report it as failed (unscored) instead of mistaking it for an answer;
  `request_or_raise` raises it once retries are spent (the teacher stops the run: a dropped row would bias it).
- At most `workers` requests are in flight at once per endpoint, however many threads call it.
"""

from __future__ import annotations

import email.utils
import json
import math
import random
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Callable

import httpx

MAX_BODY_BYTES = 32 * 2**20  # a chat completion is kilobytes; more is a misbehaving server


class EndpointError(Exception):
    """A response that cannot be used. `reason` is the short key counted in `failures`; `retry` says whether
    asking again may help (a garbled body may; a well-formed answer of the wrong kind will not); `malformed`
    marks a server that answered but with an unusable payload (the teacher drops such rows)."""

    def __init__(self, reason: str, detail: str = "", retry: bool = False, malformed: bool = False,
                 retry_after: float | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.retry, self.malformed, self.retry_after = reason, retry, malformed, retry_after


def retry_after_s(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: delay-seconds (decimals accepted) or an HTTP date."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


class ChatEndpoint:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 30.0, max_retries: int = 3,
                 backoff: float = 1.0, workers: int = 4, *, max_retry_after: float = 60.0):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.timeout, self.max_retries, self.backoff, self.workers = timeout, max_retries, backoff, workers
        self.max_retry_after = max_retry_after
        self.failures: dict[str, int] = defaultdict(int)
        self.attempts = self.retries = 0
        self._lock, self._slots = threading.Lock(), threading.BoundedSemaphore(workers)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(headers=headers, timeout=timeout, follow_redirects=False)

    def count(self, what: str) -> None:
        """Called with "attempts" before each attempt and "retries" before each retry (a hook for callers' stats)."""
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)

    def post(self, body: dict) -> dict:
        """One attempt; the first choice of the response, or EndpointError."""
        self.count("attempts")
        with self._slots:
            deadline = time.monotonic() + self.timeout
            try:
                with self.http.stream("POST", self.url, json=body) as resp:
                    raw = bytearray()
                    for chunk in resp.iter_bytes():
                        raw += chunk
                        if time.monotonic() > deadline:
                            raise EndpointError("timeout", f"body incomplete after {self.timeout}s", retry=True)
                        if len(raw) > MAX_BODY_BYTES:
                            raise EndpointError("malformed response", f"body over {MAX_BODY_BYTES} bytes",
                                                retry=True, malformed=True)
            except httpx.TimeoutException as e:
                raise EndpointError("timeout", type(e).__name__, retry=True) from None
            except httpx.HTTPError as e:  # refused or dropped connection, truncated body, garbage status line
                raise EndpointError(f"connection: {type(e).__name__}", str(e)[:120], retry=True) from None
        status = resp.status_code
        if 300 <= status < 400:
            raise EndpointError(f"http {status} redirect refused",
                                f"to {resp.headers.get('location')!r}: credentials are never sent elsewhere")
        if status == 429 or status >= 500:
            raise EndpointError(f"http {status}", bytes(raw[:120]).decode(errors="replace"), retry=True,
                                retry_after=retry_after_s(resp.headers.get("retry-after")))
        if status != 200:
            raise EndpointError(f"http {status}", bytes(raw[:200]).decode(errors="replace"))
        try:
            choice = json.loads(raw)["choices"][0]
            if not isinstance(choice, dict):
                raise TypeError
        except (ValueError, KeyError, IndexError, TypeError):
            raise EndpointError("malformed response", repr(bytes(raw[:120])), retry=True, malformed=True) from None
        return choice

    def request_or_raise(self, body: dict, parse: Callable[[dict], object]):
        """`parse(choice)` of the response, retrying transient failures; EndpointError once retries are spent.
        `parse` raises EndpointError for an answer of the wrong kind; any other error it raises on a payload of
        the wrong shape counts as a malformed response."""
        for attempt in range(self.max_retries + 1):
            try:
                choice = self.post(body)
                try:
                    return parse(choice)
                except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
                    raise EndpointError("malformed response", f"{type(e).__name__}: {repr(choice)[:120]}",
                                        retry=True, malformed=True) from None
            except EndpointError as e:
                if not e.retry or attempt == self.max_retries:
                    raise
                wait = e.retry_after if e.retry_after is not None else self.backoff * 2 ** attempt * (
                    1 + random.random() * 0.1)
                self.count("retries")
                time.sleep(min(wait, self.max_retry_after))
        raise AssertionError("unreachable")

    def request(self, body: dict, parse: Callable[[dict], object]):
        """Like `request_or_raise`, but None once retries are spent, with the reason counted in `failures`."""
        try:
            return self.request_or_raise(body, parse)
        except EndpointError as e:
            with self._lock:
                self.failures[e.reason] += 1
            return None

    def map(self, fn: Callable, items: list, progress=None) -> list:
        """`fn` over `items` with at most `workers` requests in flight, results in input order."""
        def run(item):
            out = fn(item)
            if progress is not None:
                progress.update(1)
            return out

        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(run, items))
