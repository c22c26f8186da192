"""User-supplied JSONL rows (extra SFT conversations or DPO pairs), validated line by line.

A bad row is an error naming the file and line number; with `skip_bad_rows` it is skipped
and counted instead (the count goes into the dataset card and the log).
"""

import json
from pathlib import Path

from train.contract import FORMATS, MESSAGE_COLUMNS, ROLES, TRAIT_NAME, USER_DEFAULT

_OPTIONAL = {"trait", "domain", "format", "failure_mode", "id"}
REQUIRED = {kind: set(columns) for kind, columns in MESSAGE_COLUMNS.items()}


class BadRowError(ValueError):
    pass


def _messages(value, field):
    if not isinstance(value, list) or not value:
        raise BadRowError(f"'{field}' must be a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise BadRowError(f"'{field}[{i}]' must be an object with exactly 'role' and 'content'")
        if m["role"] not in ROLES:
            raise BadRowError(f"'{field}[{i}].role' must be one of {sorted(ROLES)}, got {m['role']!r}")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise BadRowError(f"'{field}[{i}].content' must be a non-empty string")
    return value


def _completion(value, field):
    """A chosen/rejected side: one assistant message (a bare string is accepted as its content)."""
    if isinstance(value, str):
        value = [{"role": "assistant", "content": value}]
    value = _messages(value, field)
    if len(value) != 1 or value[0]["role"] != "assistant":
        raise BadRowError(f"'{field}' must be exactly one assistant message")
    return value


def infer_format(prompt) -> str:
    roles = [m["role"] for m in prompt]
    if "tool" in roles:
        return "agentic"
    if roles.count("user") > 1:
        return "multi_turn"
    return "system_prompt" if "system" in roles else "single_turn"


def checked_format(obj, prompt) -> str:
    """The row's format label, which must agree with its messages: held-out formats are kept out of train by label."""
    found = infer_format(prompt)
    label = obj.get("format", found)
    if label not in FORMATS:
        raise BadRowError(f"'format' must be one of {list(FORMATS)}, got {label!r}")
    # "json" is a request for JSON in the text: the messages look single-turn or system-prompted.
    if label != found and not (label == "json" and found in ("single_turn", "system_prompt")):
        raise BadRowError(f"'format' is {label!r} but the messages are {found!r} (roles: "
                          f"{[m['role'] for m in prompt]}); fix the label or leave it out to have it inferred")
    return label


def parse_row(obj, kind: str, line: int) -> dict:
    if not isinstance(obj, dict):
        raise BadRowError("a row must be a JSON object")
    unknown = sorted(set(obj) - REQUIRED[kind] - _OPTIONAL)
    if unknown:
        raise BadRowError(f"unknown key(s) {unknown}; allowed: {sorted(REQUIRED[kind] | _OPTIONAL)}")
    missing = sorted(REQUIRED[kind] - set(obj))
    if missing:
        raise BadRowError(f"missing key(s) {missing}")
    for k in _OPTIONAL & set(obj):
        if not isinstance(obj[k], str):
            raise BadRowError(f"'{k}' must be a string")
    if "trait" in obj and not TRAIT_NAME.fullmatch(obj["trait"]):
        raise BadRowError(f"'trait' must be a name matching {TRAIT_NAME.pattern}, got {obj['trait']!r}")
    meta = {"trait": obj.get("trait", USER_DEFAULT), "split": "train", "axis": "id",
            "domain": obj.get("domain", USER_DEFAULT)}
    rid = obj.get("id", f"user-{kind}-{line:06d}")
    if kind == "sft":
        msgs = _messages(obj["messages"], "messages")
        if msgs[-1]["role"] != "assistant" or not any(m["role"] == "user" for m in msgs):
            raise BadRowError("'messages' must contain a user turn and end with an assistant turn")
        return {"messages": msgs, **meta, "format": checked_format(obj, msgs[:-1]), "id": rid}
    prompt = _messages(obj["prompt"], "prompt")
    if prompt[-1]["role"] != "user":
        raise BadRowError("'prompt' must end with a user turn")
    chosen, rejected = _completion(obj["chosen"], "chosen"), _completion(obj["rejected"], "rejected")
    if chosen[0]["content"] == rejected[0]["content"]:
        raise BadRowError("'chosen' and 'rejected' are identical")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **{k: meta[k] for k in ("trait", "split", "axis")},
            "failure_mode": obj.get("failure_mode", USER_DEFAULT), "domain": meta["domain"],
            "format": checked_format(obj, prompt), "framing": "", "pair_id": "", "id": rid}


def read_user_jsonl(path, kind: str, skip_bad_rows: bool = False):
    """Returns (rows, skipped) where skipped is a list of 'line N: reason' strings."""
    path = Path(path)
    if not path.exists():
        raise BadRowError(f"{path}: file not found")
    rows, skipped = [], []
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise BadRowError(f"not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BadRowError(f"not valid JSON ({e.msg})") from None
                rows.append(parse_row(obj, kind, line_no))
            except BadRowError as e:
                if not skip_bad_rows:
                    raise BadRowError(f"{path}:{line_no}: {e} (set skip_bad_rows: true to skip bad rows)") from None
                skipped.append(f"line {line_no}: {e}")
    if not rows:
        raise BadRowError(f"{path}: no usable rows")
    return rows, skipped
