"""An OpenAI-compatible `/chat/completions` endpoint (vLLM, llama.cpp server, hosted APIs) with retries.

Shared by the LLM judge and the HTTP generation backend. Rate limits (429), server errors (5xx), timeouts,
dropped connections and garbled bodies are retried with exponential backoff; anything else fails at once.
A request that still fails returns None and its reason is counted in `failures`, so callers report it as
failed instead of mistaking it for an answer.
"""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable


class EndpointError(Exception):
    """A response that cannot be used. `reason` is the short key counted in `failures`; `retry` says whether
    asking again may help (a garbled body may; a well-formed answer of the wrong kind will not)."""

    def __init__(self, reason: str, detail: str = "", retry: bool = False):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.retry = reason, retry


class ChatEndpoint:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 30.0, max_retries: int = 3,
                 backoff: float = 1.0, workers: int = 4):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.api_key, self.timeout = api_key, timeout
        self.max_retries, self.backoff, self.workers = max_retries, backoff, workers
        self.failures: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def post(self, body: dict) -> dict:
        """One POST; the parsed first choice of the response."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            raw = resp.read()
        try:
            choice = json.loads(raw)["choices"][0]
            if not isinstance(choice, dict):
                raise TypeError
        except (ValueError, KeyError, IndexError, TypeError):
            raise EndpointError("malformed response", repr(raw[:120]), retry=True) from None
        return choice

    def request(self, body: dict, parse: Callable[[dict], object]):
        """`parse(choice)` of the response, retrying transient failures; None once retries are spent."""
        for attempt in range(self.max_retries + 1):
            try:
                return parse(self.post(body))
            except urllib.error.HTTPError as e:
                reason, retry = f"http {e.code}", e.code == 429 or e.code >= 500
            except EndpointError as e:
                reason, retry = e.reason, e.retry
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                reason, retry = f"connection: {type(e).__name__}", True
            if not retry or attempt == self.max_retries:
                with self._lock:
                    self.failures[reason] += 1
                return None
            time.sleep(self.backoff * 2 ** attempt * (1 + random.random() * 0.1))
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
