"""Which tokens the loss sees, checked before training.

Assistant-only loss plus truncation can leave an example with no trainable token: its loss is 0
and, if a whole batch is like that, the gradient is NaN. TRL drops such examples silently; we stop
and name them instead. The same tokenization drives `--inspect`, so what a user inspects is what
trains (the SFT script also checks that TRL's prepared labels match these).
"""

from pathlib import Path

from train.chat_template import rendering_problem, training_chat_template


def check_pad_token(tokenizer) -> None:
    """pad == eos masks the end-of-turn label, and the model never learns to stop."""
    if tokenizer.pad_token_id is None:
        raise ValueError("The tokenizer has no pad token; set a pad token distinct from eos.")
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError(
            f"The tokenizer's pad token {tokenizer.pad_token!r} equals its eos token: the end-of-turn label would be "
            "masked as padding and the model would never learn to stop. Set a distinct pad token."
        )


def use_training_chat_template(tokenizer, chat_template_path: str | None = None) -> None:
    """Give the tokenizer a template with `{% generation %}` markers that renders like its own one.

    A user's `chat_template_path` must render like the model's own template too (checked, not trusted).
    """
    user_template = None
    if chat_template_path:
        path = Path(chat_template_path)
        if not path.is_file():
            raise FileNotFoundError(f"chat_template_path: {path} not found")
        user_template = path.read_text()
    tokenizer.chat_template = training_chat_template(tokenizer, user_template, source=f"chat_template_path {chat_template_path}")


def check_renderable(dataset, tokenizer, columns=("messages",)) -> None:
    """Raise naming every row the chat template refuses or renders without some of its text, before any model loads."""
    bad = []
    for i, row in enumerate(dataset):
        problem = rendering_problem(tokenizer, [m for c in columns for m in row[c]])
        if problem:
            bad.append(f"{row.get('id', f'row {i}')}: {problem}")
    if bad:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(f"{len(bad)} training row(s) cannot be rendered faithfully by this model's chat template: {shown}. "
                         "Leave those formats out of training (the data recipe's heldout_formats) or use a model whose "
                         "template supports them.")


def _truncate(ids: list, max_length: int | None, truncation_mode: str) -> list:
    if max_length is None:
        return ids
    return ids[:max_length] if truncation_mode == "keep_start" else ids[-max_length:]


def label_conversation(tokenizer, messages, max_length=None, truncation_mode="keep_start", assistant_only=True):
    """Token ids and labels (-100 = no loss) for one conversation, truncated as SFTTrainer does."""
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=assistant_only
    )
    ids = list(out["input_ids"])
    labels = [t if m else -100 for t, m in zip(ids, out["assistant_masks"])] if assistant_only else list(ids)
    return _truncate(ids, max_length, truncation_mode), _truncate(labels, max_length, truncation_mode)


def check_trainable_tokens(dataset, tokenizer, max_length, truncation_mode="keep_start", assistant_only=True) -> int:
    """Raise naming every example left without a trainable token; return the number of trainable tokens."""
    empty, total = [], 0
    for i, row in enumerate(dataset):
        _, labels = label_conversation(tokenizer, row["messages"], max_length, truncation_mode, assistant_only)
        n = sum(label != -100 for label in labels)
        if n == 0:
            empty.append(str(row.get("id", f"row {i}")))
        total += n
    if empty:
        shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        raise ValueError(
            f"{len(empty)} training example(s) have no trainable (assistant) token after truncation to "
            f"max_length={max_length}: {shown}. Raise max_length or shorten these examples."
        )
    return total


def check_preference_pairs(dataset, tokenizer, max_length, truncation_mode="keep_start") -> None:
    """DPO needs completion tokens left after truncation; TRL drops pairs whose prompt fills max_length."""
    if max_length is None or truncation_mode != "keep_start":
        return
    too_long = []
    for i, row in enumerate(dataset):
        n = len(tokenizer.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])
        if n >= max_length:
            too_long.append(f"{row.get('id', f'row {i}')} ({n} prompt tokens)")
    if too_long:
        shown = ", ".join(too_long[:10]) + (f" and {len(too_long) - 10} more" if len(too_long) > 10 else "")
        raise ValueError(
            f"{len(too_long)} preference pair(s) have a prompt that fills max_length={max_length}, leaving no "
            f"chosen/rejected token to train on: {shown}. Raise max_length or shorten these prompts."
        )


def format_token_view(tokenizer, messages, max_length=None, truncation_mode="keep_start", assistant_only=True) -> str:
    """One line per token: position, id, label (or '-100'), and the token text; trained tokens marked '*'."""
    ids, labels = label_conversation(tokenizer, messages, max_length, truncation_mode, assistant_only)
    lines = [f"{'pos':>5} {'id':>7} {'label':>7}   token"]
    for pos, (tok, lab) in enumerate(zip(ids, labels)):
        mark = "*" if lab != -100 else " "
        lines.append(f"{pos:>5} {tok:>7} {lab:>7} {mark} {tokenizer.decode([tok])!r}")
    n = sum(lab != -100 for lab in labels)
    lines.append(f"{len(ids)} tokens, {n} trained (marked *)")
    return "\n".join(lines)
