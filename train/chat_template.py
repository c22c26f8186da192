"""Chat templates used for training.

Assistant-only loss needs `{% generation %}` markers in the chat template. Most instruct models ship a
template without them, so we keep a marked copy of the templates we support and only accept one if it
renders exactly the same text as the model's own template: the adapter must be trained on the very
prompt format it will be served with (the marked template is saved with the adapter).
"""

import re

# Plain ChatML turns with the assistant turn marked (no default system prompt): the tiny test model, and
# ChatML models without one.
_MARKED_CHATML_TURN = (
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}"
)
_GENERATION_PROMPT = "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"

CHATML_TRAINING_TEMPLATE = "{% for message in messages %}" + _MARKED_CHATML_TURN + "{% endfor %}" + _GENERATION_PROMPT

# SmolLM2-Instruct's own template: the same turns after its default system prompt.
SMOLLM2_TRAINING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    + _MARKED_CHATML_TURN
    + "{% endfor %}"
    + _GENERATION_PROMPT
)

TRAINING_CHAT_TEMPLATE = SMOLLM2_TRAINING_TEMPLATE
KNOWN_TRAINING_TEMPLATES = (SMOLLM2_TRAINING_TEMPLATE, CHATML_TRAINING_TEMPLATE)

_PROBE_CONVERSATIONS = [
    [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6."},
    ],
]


def strip_generation_markers(template: str) -> str:
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template)


def has_generation_markers(template: str | None) -> bool:
    return bool(template) and re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def _render(tokenizer, template, messages, add_generation_prompt):
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def renders_like(tokenizer, template_a: str, template_b: str) -> bool:
    """True when both templates produce identical text for the probe conversations."""
    a, b = strip_generation_markers(template_a), strip_generation_markers(template_b)
    for messages in _PROBE_CONVERSATIONS:
        for agp, msgs in ((False, messages), (True, messages[:-1])):
            if _render(tokenizer, a, msgs, agp) != _render(tokenizer, b, msgs, agp):
                return False
    return True


def training_chat_template(tokenizer) -> str:
    """The marked template that renders exactly like the tokenizer's own one.

    Raises a ValueError saying what to do when no such template is known, rather than training on a
    prompt format that differs from the one the model is served with.
    """
    own = tokenizer.chat_template
    if not own:
        raise ValueError(
            "The tokenizer has no chat template. Set `chat_template_path` in the recipe to a Jinja file "
            "whose assistant turns are wrapped in {% generation %}...{% endgeneration %}."
        )
    if has_generation_markers(own):
        return own
    for candidate in KNOWN_TRAINING_TEMPLATES:
        if renders_like(tokenizer, own, candidate):
            return candidate
    raise ValueError(
        "The model's chat template has no {% generation %} markers, so assistant-only loss cannot find the "
        "assistant tokens, and no marked template shipped with this project renders identically to it. "
        "Copy the model's template, wrap each assistant message's content and end-of-turn token in "
        "{% generation %}...{% endgeneration %}, and point `chat_template_path` in the recipe at that file."
    )
