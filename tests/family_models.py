"""Tiny random models that carry the real chat templates and special tokens of popular chat-model families.

The weights and vocabulary are tiny and random, but the tokenizer renders and masks exactly as the family's
does: the original chat template (TRL ships them in `trl/chat_templates/`), the family's special tokens, and
its real eos/pad choices (Llama 3.1 ships no pad token, Phi-3 pads with its eos). Mistral's template is written
here from Mistral's documented instruct format (`<s>[INST] user[/INST] answer</s>`), with the system prompt
before the first user message as mistral-common does for its v1 tokenizer; TRL ships no copy of it.
"""

from pathlib import Path

import torch
import trl
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from train.tiny_model import train_bpe

TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"

MISTRAL_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- endif %}{%- endfor %}"
)
# The same text with the assistant's answer and its eos marked: what a user writes as `chat_template_path`.
MISTRAL_MARKED = MISTRAL_TEMPLATE.replace(
    "{{- ' ' + message['content'] + eos_token }}",
    "{{- ' ' }}{%- generation %}{{- message['content'] + eos_token }}{%- endgeneration %}",
)

# family -> template, special tokens, and what the independent mask check expects: the text that opens an
# assistant turn and the text that ends it (the end token the model must learn to emit).
FAMILIES = {
    "llama3_1": dict(template="llama3_1", bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None,
                     extra=["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>",
                            "<|finetune_right_pad_id|>", "<|end_of_text|>"],
                     header="<|start_header_id|>assistant<|end_header_id|>\n\n", end="<|eot_id|>"),
    "llama3_2": dict(template="llama3_2", bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None,
                     extra=["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>",
                            "<|finetune_right_pad_id|>", "<|end_of_text|>"],
                     header="<|start_header_id|>assistant<|end_header_id|>\n\n", end="<|eot_id|>"),
    "qwen2_5": dict(template="qwen2_5", bos=None, eos="<|im_end|>", pad="<|endoftext|>", extra=["<|im_start|>"],
                    header="<|im_start|>assistant\n", end="<|im_end|>"),
    "qwen3": dict(template="qwen3", bos=None, eos="<|im_end|>", pad="<|endoftext|>",
                  extra=["<|im_start|>", "<think>", "</think>"], header="<|im_start|>assistant\n", end="<|im_end|>"),
    "gemma3": dict(template="gemma3", bos="<bos>", eos="<eos>", pad="<pad>",
                   extra=["<start_of_turn>", "<end_of_turn>", "<unk>"], turn_eos="<end_of_turn>",
                   header="<start_of_turn>model\n", end="<end_of_turn>\n"),
    "phi3": dict(template="phi3", bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>",
                 extra=["<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<unk>"], turn_eos="<|end|>",
                 header="<|assistant|>\n", end="<|end|>\n", final_eos=True),
    "mistral": dict(template=None, bos="<s>", eos="</s>", pad=None, extra=["[INST]", "[/INST]", "<unk>"],
                    header="[/INST] ", end="</s>"),
}


def family_template(family: str) -> str:
    name = FAMILIES[family]["template"]
    return MISTRAL_TEMPLATE if name is None else (TRL_TEMPLATES / f"{name}.jinja").read_text()


def build_family_tokenizer(family: str, seed: int = 0) -> PreTrainedTokenizerFast:
    spec = FAMILIES[family]
    specials = [t for t in (spec["bos"], spec["eos"], spec["pad"]) if t] + spec["extra"]
    specials = list(dict.fromkeys(specials))
    tok = PreTrainedTokenizerFast(tokenizer_object=train_bpe(specials, seed), bos_token=spec["bos"], eos_token=spec["eos"],
                                  pad_token=spec["pad"], unk_token="<unk>" if "<unk>" in specials else None,
                                  additional_special_tokens=spec["extra"])
    tok.chat_template = family_template(family)
    return tok


def build_family_model(out_dir, family: str, seed: int = 0) -> str:
    """Save a ~0.2M-parameter random Llama with the family's tokenizer to `out_dir`; return the path."""
    out_dir = Path(out_dir)
    tok = build_family_tokenizer(family, seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # As the families' generation configs do: stop at the end of the assistant's turn.
    stop = [tok.eos_token_id] + ([tok.convert_tokens_to_ids(FAMILIES[family]["turn_eos"])]
                                 if "turn_eos" in FAMILIES[family] else [])
    model.generation_config.eos_token_id = stop if len(stop) > 1 else stop[0]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return str(out_dir)


def expected_assistant_mask(tokenizer, messages, family: str) -> list[int]:
    """Assistant mask from the served text alone: each assistant turn from the end of its header to the end of its
    end-of-turn text (and Phi-3's closing eos after a final assistant turn), mapped to tokens by character offsets.
    """
    spec = FAMILIES[family]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans, pos = [], 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        content = m["content"].strip()
        start_content = text.index(content, pos)
        start = text.rindex(spec["header"], 0, start_content) + len(spec["header"])
        end = text.index(spec["end"], start_content + len(content)) + len(spec["end"])
        spans.append((start, end))
        pos = end
    if spec.get("final_eos") and messages[-1]["role"] == "assistant" and text[pos:] == tokenizer.eos_token:
        spans.append((pos, len(text)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [int(any(s <= a and b <= e for s, e in spans)) for a, b in enc["offset_mapping"]]
