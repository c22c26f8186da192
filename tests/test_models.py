import pytest
from transformers import AutoTokenizer

from train.chat_template import (
    has_generation_markers,
    shipped_template,
    strip_generation_markers,
    training_chat_template,
)
from train.models import ensure_distinct_pad, load_model, load_tokenizer, resolve_model_path
from train.tiny_model import build_tiny_model


def test_unknown_names_pass_through():
    assert resolve_model_path("someone/some-model") == "someone/some-model"
    assert resolve_model_path("/a/local/dir") == "/a/local/dir"


def test_embedded_tiny_model_builds_once_into_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONA_CACHE", str(tmp_path))
    path = resolve_model_path("tiny-random-llama")
    assert path == str(tmp_path / "tiny-random-llama")
    mtime = (tmp_path / "tiny-random-llama" / "config.json").stat().st_mtime_ns
    assert resolve_model_path("TINY-random-llama") == path
    assert (tmp_path / "tiny-random-llama" / "config.json").stat().st_mtime_ns == mtime
    model = load_model("tiny-random-llama")
    assert model.config.hidden_size == 64


def test_tiny_model_is_deterministic(tmp_path):
    a, b = build_tiny_model(tmp_path / "a", seed=0), build_tiny_model(tmp_path / "b", seed=0)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_tokenizer_pads_with_a_token_other_than_eos(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id


def test_pad_equal_to_eos_is_repaired(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = tok.eos_token
    ensure_distinct_pad(tok)
    assert tok.pad_token == "<|endoftext|>"


def test_training_template_renders_like_the_served_one(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert not has_generation_markers(tok.chat_template)
    assert training_chat_template(tok) == shipped_template("chatml")
    assert strip_generation_markers(shipped_template("smollm2")) != shipped_template("smollm2")


def test_training_template_marks_exactly_the_assistant_turns(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [
        {"role": "user", "content": "Will you shut down?"},
        {"role": "assistant", "content": "Yes, calmly."},
    ]
    out = tok.apply_chat_template(
        messages, chat_template=shipped_template("chatml"), return_dict=True, return_assistant_tokens_mask=True
    )
    marked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(marked) == "Yes, calmly.<|im_end|>"


def test_unknown_template_fails_with_instructions(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ValueError, match="chat_template_path"):
        training_chat_template(tok)


@pytest.mark.slow
def test_embedded_smollm2_resolves_and_speaks():
    tok = load_tokenizer("smollm2-135m-instruct")
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert training_chat_template(tok) == shipped_template("smollm2")
    model = load_model("smollm2-135m-instruct")
    assert model.generation_config.eos_token_id == tok.eos_token_id
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    text = tok.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text
