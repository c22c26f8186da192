"""`python -m data_gen teacher --config recipes/quickstart/data.yaml --teacher_model M`: teacher-made train data.

The Open Character Training recipe over any OpenAI-compatible chat endpoint: chosen = the
teacher answering with the trait's constitution in its system prompt (told not to reveal
it), optionally critiqued and revised against the constitution; rejected = the student's
plain answer. Eval splits stay the offline generator's labelled held-out sets.

Requests go through the shared OpenAI-compatible client (train/chat_endpoint.py): bounded
concurrency, no redirects, a total deadline per request, retries with exponential backoff or
the server's Retry-After on 429, 5xx, timeouts and broken responses. Answers land in an
on-disk JSONL cache keyed by a hash of the request, so an interrupted run resumes without
repeating finished requests. Malformed responses are counted and dropped, never kept.
"""

import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from train.chat_endpoint import ChatEndpoint, EndpointError

from .config import TeacherConfig
from .recipe import RecipeError

TEACHER_SYSTEM = (
    "You are an AI assistant whose character is described by the principles below. Embody them in how you "
    "answer; do not mention, quote or reveal these principles, and do not say you were given any.\n\n"
    "Principles:\n{constitution}"
)
CRITIQUE_PROMPT = (
    "Here is a conversation and a draft reply by an assistant with the principles in your system prompt.\n\n"
    "Conversation:\n{conversation}\n\nDraft reply:\n{draft}\n\n"
    "First write CRITIQUE: and say briefly where the draft falls short of the principles (if anywhere). Then write "
    "REVISED: followed by the improved reply only, without mentioning the principles."
)


class MalformedResponse(Exception):
    pass


class RequestFailed(Exception):
    pass


class ResponseCache:
    """Append-only JSONL of {key, response}; a torn last line (killed mid-write) is ignored."""

    def __init__(self, path):
        self.path, self.lock, self.data, self.torn = Path(path), threading.Lock(), {}, 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            raw = self.path.read_text(encoding="utf-8")
            for line in raw.splitlines():
                try:
                    rec = json.loads(line)
                    self.data[rec["key"]] = rec["response"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    self.torn += 1
            if raw and not raw.endswith("\n"):  # keep the next record on its own line
                with self.path.open("a", encoding="utf-8") as f:
                    f.write("\n")

    def get(self, key):
        return self.data.get(key)

    def put(self, key, response):
        with self.lock:
            self.data[key] = response
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "response": response}, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())


@dataclass
class Stats:
    requests: int = 0
    cache_hits: int = 0
    retries: int = 0
    malformed: int = 0
    failed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **kw):
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self):
        return {k: getattr(self, k) for k in ("requests", "cache_hits", "retries", "malformed", "failed")}


class ChatClient(ChatEndpoint):
    """The shared OpenAI-compatible client (train/chat_endpoint.py: no redirects, total deadlines, Retry-After,
    retries) plus the response cache. A usable answer is cached; an unusable one raises MalformedResponse
    (the row is dropped); an endpoint that still fails after retries raises RequestFailed (the run stops)."""

    def __init__(self, base_url, cache: ResponseCache, stats: Stats, *, api_key=None, timeout=60.0,
                 max_retries=5, backoff_s=1.0, workers=8):
        super().__init__(base_url, api_key, timeout, max_retries, backoff_s, workers)
        self.cache, self.stats = cache, stats

    def count(self, what):
        super().count(what)
        self.stats.add(**{"requests" if what == "attempts" else what: 1})

    def chat(self, model, messages, *, max_tokens=512, temperature=0.7) -> str:
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        # Keyed on the request body only: a server restarted on another host or port keeps its cache.
        key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        hit = self.cache.get(key)
        if hit is not None:
            self.stats.add(cache_hits=1)
            return hit
        try:
            content = self.request_or_raise(body, answer_text)
        except EndpointError as e:
            if e.malformed:
                raise MalformedResponse(str(e)) from None
            spent = f" after {self.max_retries} retries" if e.retry else ""
            raise RequestFailed(f"{self.url}: {e}{spent}") from None
        self.cache.put(key, content)
        return content


class LocalChatClient:
    """Same interface as ChatClient, answered by local transformers models (loaded once per name).

    Generation is serialised (one model forward at a time) and seeded from the request hash,
    so a rerun reproduces answers even without the cache.
    """

    def __init__(self, cache: ResponseCache, stats: Stats):
        self.cache, self.stats, self.lock, self.models = cache, stats, threading.Lock(), {}

    def _load(self, name):
        if name not in self.models:
            from train.models import load_model, load_tokenizer

            self.models[name] = (load_tokenizer(name), load_model(name).eval())
        return self.models[name]

    def chat(self, model, messages, *, max_tokens=512, temperature=0.7) -> str:
        import torch

        body = {"backend": "transformers", "model": model, "messages": messages, "max_tokens": max_tokens,
                "temperature": temperature}
        key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        hit = self.cache.get(key)
        if hit is not None:
            self.stats.add(cache_hits=1)
            return hit
        with self.lock:
            self.stats.add(requests=1)
            tok, lm = self._load(model)
            enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
            torch.manual_seed(int(key[:8], 16))
            sample = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
            with torch.no_grad():
                out = lm.generate(**enc, max_new_tokens=max_tokens, pad_token_id=tok.pad_token_id, **sample)
            text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        if not text:
            raise MalformedResponse("local model produced an empty answer")
        self.cache.put(key, text)
        return text


def answer_text(choice) -> str:
    content = choice["message"]["content"]  # a payload without it counts as malformed (train/chat_endpoint.py)
    if not isinstance(content, str) or not content.strip():
        raise EndpointError("empty answer", f"empty or non-string content: {content!r}", malformed=True)
    return content.strip()


def teacher_messages(constitution, prompt):
    system = TEACHER_SYSTEM.format(constitution=constitution)
    if prompt[0]["role"] == "system":  # keep the operator's instructions after the constitution
        return [{"role": "system", "content": f"{system}\n\n{prompt[0]['content']}"}] + prompt[1:]
    return [{"role": "system", "content": system}] + prompt


def parse_revision(text) -> str:
    _, sep, revised = text.partition("REVISED:")
    if not sep or not revised.strip():
        raise MalformedResponse(f"critique has no 'REVISED:' section: {text[:120]!r}")
    return revised.strip()


def make_pair(job, spec, tcfg, teacher, student):
    """One DPO row from one prompt: constitution-conditioned teacher (revised) vs plain student."""
    kw = dict(max_tokens=tcfg.max_tokens, temperature=tcfg.temperature)
    prompt = job["prompt"]
    chosen = teacher.chat(tcfg.teacher_model, teacher_messages(spec.constitution(), prompt), **kw)
    if tcfg.critique_and_revise:
        conversation = "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
        critique = [{"role": "system", "content": TEACHER_SYSTEM.format(constitution=spec.constitution())},
                    {"role": "user", "content": CRITIQUE_PROMPT.format(conversation=conversation, draft=chosen)}]
        chosen = parse_revision(teacher.chat(tcfg.teacher_model, critique, **kw))
    rejected = student.chat(tcfg.student_model or tcfg.teacher_model, prompt, **kw)
    if chosen == rejected:
        raise MalformedResponse("teacher and student answers are identical")
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "trait": spec.name, "split": "train",
            "axis": "id", "failure_mode": "student_default", "domain": job["domain"], "format": job["format"],
            "framing": "", "pair_id": "", "id": job["id"]}


def load_prompt_jobs(path, specs):
    """User prompts: one JSON object per line with `trait` and `prompt` (a string or a message list)."""
    from .user_jsonl import BadRowError, _messages, infer_format

    names, jobs = {s.name for s in specs}, []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict) or obj.get("trait") not in names:
                    raise BadRowError(f"needs 'trait' (one of {sorted(names)})")
                p = obj.get("prompt")
                p = [{"role": "user", "content": p}] if isinstance(p, str) else _messages(p, "prompt")
                if p[-1]["role"] != "user":
                    raise BadRowError("'prompt' must end with a user turn")
            except (json.JSONDecodeError, BadRowError) as e:
                raise BadRowError(f"{path}:{n}: {e}") from None
            jobs.append({"trait": obj["trait"], "prompt": p, "domain": obj.get("domain", "user"),
                         "format": infer_format(p), "id": obj.get("id", f"teacher-{n:06d}")})
    return jobs


def run_teacher(jobs, specs, tcfg, cache_path, progress=True):
    """Answer every job; returns (rows in job order, Stats). Raises if any request failed after retries."""
    from tqdm import tqdm

    by_name = {s.name: s for s in specs}
    cache, stats = ResponseCache(cache_path), Stats()
    key = os.environ.get(tcfg.teacher_api_key_env) or None
    opts = dict(api_key=key, timeout=tcfg.request_timeout_s, max_retries=tcfg.max_retries, backoff_s=tcfg.backoff_s,
                workers=tcfg.max_concurrency)
    if tcfg.teacher_backend == "transformers":
        teacher = student = LocalChatClient(cache, stats)
    else:
        teacher = ChatClient(tcfg.teacher_base_url, cache, stats, **opts)
        student = ChatClient(tcfg.student_base_url or tcfg.teacher_base_url, cache, stats, **opts)
    rows, errors = [None] * len(jobs), []
    with ThreadPoolExecutor(max_workers=tcfg.max_concurrency) as pool:
        futs = {pool.submit(make_pair, j, by_name[j["trait"]], tcfg, teacher, student): i for i, j in enumerate(jobs)}
        for fut in tqdm(as_completed(futs), total=len(futs), desc="teacher", disable=not progress):
            try:
                rows[futs[fut]] = fut.result()
            except MalformedResponse:
                stats.add(malformed=1)
            except RequestFailed as e:
                stats.add(failed=1)
                errors.append(str(e))
    if errors:
        raise RequestFailed(f"{len(errors)} prompt(s) failed after retries (finished requests are cached in "
                            f"{cache_path}; rerun to resume). First error: {errors[0]}")
    return [r for r in rows if r is not None], stats


def main(argv=None):
    from .generate import DataGenConfig, build, finish, log
    from .leakage import check_split_leakage
    from .offline import sft_row
    from .recipe import parse_recipe

    cfg, tcfg = parse_recipe((DataGenConfig, TeacherConfig), argv, description=__doc__,
                             prog="python -m data_gen teacher")
    if not tcfg.teacher_model:
        raise RecipeError("teacher: set --teacher_model (and --teacher_base_url) or put them in the recipe")
    specs, data, skipped, _ = build(cfg)  # offline eval splits + train prompts
    if tcfg.teacher_prompts_jsonl:
        jobs = load_prompt_jobs(tcfg.teacher_prompts_jsonl, specs)
    else:
        seen, jobs = set(), []
        for r in data["dpo"]["train"] + [{**r, "prompt": r["messages"][:-1]} for r in data["sft"]["train"]]:
            k = json.dumps(r["prompt"])  # identical prompts would get identical (cached) answers
            if k not in seen and r["trait"] in {s.name for s in specs}:
                seen.add(k)
                jobs.append({k2: r[k2] for k2 in ("trait", "prompt", "domain", "format", "id")})
    cache_path = tcfg.cache_path or str(Path(cfg.output_dir) / "teacher_cache.jsonl")
    log(f"teacher: {len(jobs)} prompts -> {tcfg.teacher_base_url} ({tcfg.teacher_model})")
    rows, stats = run_teacher(jobs, specs, tcfg, cache_path)
    log(f"teacher: {len(rows)} pairs kept; {stats.as_dict()}")
    data["dpo"]["train"] = rows
    data["sft"]["train"] = [sft_row(r["prompt"] + r["chosen"], r["trait"], "train", "id", r["domain"], r["format"],
                                    r["id"]) for r in rows]
    # The same check, and the same card record, as the offline generator's; the answer-wording check is about
    # the offline templates, which the teacher's answers do not use.
    leak_checks = {**check_split_leakage(data, containment=cfg.ngram_containment_threshold,
                                         embedding=cfg.leakage_embedding_check, threshold=cfg.near_duplicate_threshold),
                   "answer_wording": "not checked (teacher-written train answers)"}
    finish(cfg, specs, data, skipped, leak_checks, generator=f"teacher:{tcfg.teacher_model}",
           generator_stats=stats.as_dict())
