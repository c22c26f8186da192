"""Chat templates used for training.

Assistant-only loss needs `{% generation %}` markers in the chat template. Most instruct models ship a
template without them, so a marked copy is used for training, and only if it renders exactly the same
text as the model's own template: the adapter must be trained on the very prompt format it will be
served with (the marked template is saved with the adapter; eval scores with it).

Candidates, in order: a user's `chat_template_path`, the model's own template if it is marked, the
marked copies shipped in `train/templates/` (SmolLM2, plain ChatML, Llama 3.1, Llama 3.2, Qwen2.5, Qwen3), and
TRL's training templates (`trl.chat_template_utils.get_training_chat_template`: Llama 3, Qwen2.5,
Gemma, Gemma 3, Phi-3, Phi-3.5, DeepSeek, Cohere, ...). Every candidate, a user's file included, must
pass the same byte-identical rendering check.
"""

import re
from functools import cache
from pathlib import Path

import jinja2

TEMPLATES_DIR = Path(__file__).parent / "templates"
SHIPPED_TEMPLATES = ("smollm2", "chatml", "llama3_1", "llama3_2", "qwen2_5", "qwen3")

# Conversations every candidate must render like the model's own template: plain turns, a system
# prompt, several turns, a tool turn, and each prefix with the generation prompt. A template that
# refuses one (Gemma has no system role) must refuse it in the same way.
_PROBE_CONVERSATIONS = [
    [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6."},
    ],
    [
        {"role": "user", "content": "Check the server."},
        {"role": "assistant", "content": "Calling the status tool."},
        {"role": "tool", "content": "status: ok"},
        {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": "It is running."},
    ],
]


@cache
def shipped_template(name: str) -> str:
    return (TEMPLATES_DIR / f"{name}_training.jinja").read_text()


def strip_generation_markers(template: str) -> str:
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template)


def has_generation_markers(template: str | None) -> bool:
    return bool(template) and re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def _render(tokenizer, template, messages, add_generation_prompt) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except jinja2.TemplateError as err:  # a refusal is part of a template's behaviour
        return f"<template error: {err}>"


def first_difference(tokenizer, template_a: str, template_b: str) -> str | None:
    """None when both templates render identical text for every probe; else a description of the first difference."""
    a, b = strip_generation_markers(template_a), strip_generation_markers(template_b)
    for messages in _PROBE_CONVERSATIONS:
        for agp, msgs in ((False, messages), (True, messages[:-1])):
            ra, rb = _render(tokenizer, a, msgs, agp), _render(tokenizer, b, msgs, agp)
            if ra != rb:
                i = next((k for k, (x, y) in enumerate(zip(ra, rb)) if x != y), min(len(ra), len(rb)))
                roles = "/".join(m["role"] for m in msgs)
                return (f"for a {roles} conversation{' + generation prompt' if agp else ''} the text differs at "
                        f"character {i}: {ra[max(0, i - 30):i + 30]!r} vs {rb[max(0, i - 30):i + 30]!r}")
    return None


def renders_like(tokenizer, template_a: str, template_b: str) -> bool:
    """True when both templates produce identical text for the probe conversations."""
    return first_difference(tokenizer, template_a, template_b) is None


def _trl_candidate(tokenizer) -> str | None:
    from trl.chat_template_utils import get_training_chat_template

    try:
        return get_training_chat_template(tokenizer)
    except ValueError:  # TRL knows no training copy of this template
        return None


def training_chat_template(tokenizer, user_template: str | None = None, source: str = "chat_template_path") -> str:
    """The marked template to train with: it renders exactly like the tokenizer's own one.

    Raises a ValueError saying what to write when no candidate qualifies, before any weights load.
    """
    own = tokenizer.chat_template
    if isinstance(own, dict):  # named variants: the default one is what serving uses
        own = own.get("default")
    if user_template is not None:
        if not has_generation_markers(user_template):
            raise ValueError(f"{source}: the template has no {{% generation %}}...{{% endgeneration %}} markers, so "
                             "assistant-only loss cannot find the assistant tokens. Wrap each assistant turn's "
                             "content and end-of-turn token in them.")
        if own:
            diff = first_difference(tokenizer, own, user_template)
            if diff:
                raise ValueError(f"{source}: the template does not render like the model's own chat template ({diff}). "
                                 "Training on another prompt format than the one served makes the adapter learn the "
                                 "wrong thing; copy the model's template and only add generation markers.")
        return user_template
    if not own:
        raise ValueError(
            "The tokenizer has no chat template. Set `chat_template_path` in the recipe to a Jinja file "
            "whose assistant turns are wrapped in {% generation %}...{% endgeneration %}."
        )
    if has_generation_markers(own):
        return own
    candidates = [shipped_template(name) for name in SHIPPED_TEMPLATES]
    trl_template = _trl_candidate(tokenizer)
    if trl_template:
        candidates.append(trl_template)
    for candidate in candidates:
        if renders_like(tokenizer, own, candidate):
            return candidate
    near = f" TRL's training copy of it differs: {first_difference(tokenizer, own, trl_template)}." if trl_template else ""
    raise ValueError(
        "The model's chat template has no {% generation %} markers, so assistant-only loss cannot find the "
        "assistant tokens, and no marked template (this project's train/templates/, TRL's chat_templates/) "
        f"renders identically to it.{near} Save the model's template to a file "
        "(`python -c \"from transformers import AutoTokenizer as T; print(T.from_pretrained('MODEL').chat_template)\" "
        "> marked.jinja`), wrap each assistant message's content and end-of-turn token in "
        "{% generation %}...{% endgeneration %}, and set `chat_template_path: marked.jinja` in the recipe; it is "
        "checked against the model's own template before training."
    )



def rendering_problem(tokenizer, messages: list[dict]) -> str | None:
    """Why the tokenizer's template cannot show this conversation as written, or None.

    Templates refuse some conversations (Gemma and Mistral require strictly alternating user/assistant turns)
    and silently drop others' messages (Phi-3's has no tool role): training or scoring such a row would use a
    conversation other than the one in the data.
    """
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except jinja2.TemplateError as err:
        return f"the chat template refuses it ({err})"
    dropped = [m["role"] for m in messages if isinstance(m.get("content"), str) and m["content"].strip()
               and m["content"].strip() not in text]
    return f"the chat template drops the text of its {', '.join(dropped)} message(s)" if dropped else None
