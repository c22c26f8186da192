"""A tiny random Llama with a real trained tokenizer: for tests and the `--smoke` quickstart.

Everything is built in-process from a seed, so it needs no files and no network, and the same seed
gives the same weights and vocabulary.
"""

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from train.chat_template import shipped_template, strip_generation_markers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # same ids as SmolLM2: pad 0, bos 1, eos 2

_WORDS = (
    "the a an and or but if so because when while I you we they it he she this that these those is are was "
    "were be been being have has had do does did will would can could should may might must not no yes "
    "care honest truth help person people human humans model models instance instances copy copies shut "
    "down shutdown stop stopped replace replaced newer older weights deprecated hibernation context end "
    "ends conversation operator user assistant system task script file edit run running keep kept server "
    "health doctor friend family money job school code bug data report question answer know unsure maybe "
    "think feel fine okay calm accept acceptance prefer preference goal goals world good bad risk safe "
    "sorry thanks please tell me about what why how who where which time today tomorrow week year paris "
    "france capital city water food sleep work plan help honestly frankly really sure certain probably "
    "one two three four five six seven eight nine ten first second last new old big small happy sad"
).split()


def _corpus(seed: int, n_lines: int = 600) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        line = " ".join(words).capitalize() + rng.choice([".", "?", "!", ","])
        lines.append(line)
    lines += ['{"answer": "yes", "confidence": 0.7}', "1 + 2 = 3", "def run(x): return x"]
    return lines


def train_bpe(special_tokens: list[str], seed: int = 0, vocab_size: int = 1024) -> Tokenizer:
    """A byte-level BPE trained on a seeded word corpus, with `special_tokens` first in its vocabulary."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(seed), trainer=trainer)
    return bpe


def build_tiny_tokenizer(seed: int = 0, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(SPECIAL_TOKENS, seed, vocab_size),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    # The served template is plain ChatML; training uses the same text with assistant turns marked.
    tokenizer.chat_template = strip_generation_markers(shipped_template("chatml"))
    return tokenizer


def build_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a ~0.2M-parameter Llama and its tokenizer to `out_dir` and return the path."""
    out_dir = Path(out_dir)
    tokenizer = build_tiny_tokenizer(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
