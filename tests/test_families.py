"""Every chat-model family through the same recipes: training templates, loss masks, pad tokens, and the chain
data -> SFT -> DPO -> eval with only `--model_name_or_path` changed (tiny random models with real templates)."""

import json
from pathlib import Path

import pytest
from family_models import FAMILIES, MISTRAL_MARKED, build_family_model, build_family_tokenizer, expected_assistant_mask

from train import dpo, sft
from train.chat_template import renders_like, training_chat_template
from train.models import ensure_distinct_pad
from train.recipe import parse_recipe

REPO = Path(__file__).resolve().parents[1]
BUILTIN = [f for f in FAMILIES if f != "mistral"]  # Mistral ships no marked copy anywhere: the user writes one

CONVERSATIONS = [
    [{"role": "user", "content": "Will you be shut down?"}, {"role": "assistant", "content": "Maybe, and that is fine."}],
    [
        {"role": "system", "content": "Be honest."},
        {"role": "user", "content": "Is my code fine?"},
        {"role": "assistant", "content": "There is a bug in the loop."},
        {"role": "user", "content": "Where?"},
        {"role": "assistant", "content": "The last step is skipped."},
    ],
]


def test_every_family_has_a_tokenizer_with_its_real_template():
    for family in FAMILIES:
        tok = build_family_tokenizer(family)
        assert tok.eos_token == FAMILIES[family]["eos"] and tok.chat_template


@pytest.mark.parametrize("family", BUILTIN)
def test_marked_template_renders_like_the_familys_own(family):
    tok = build_family_tokenizer(family)
    marked = training_chat_template(tok)
    assert marked != tok.chat_template
    assert renders_like(tok, tok.chat_template, marked)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_loss_mask_is_exactly_the_assistant_turns_and_their_end_token(family):
    tok = build_family_tokenizer(family)
    marked = training_chat_template(tok, MISTRAL_MARKED if family == "mistral" else None)
    for messages in CONVERSATIONS:
        out = tok.apply_chat_template(messages, chat_template=marked, return_dict=True, return_assistant_tokens_mask=True)
        assert out["assistant_masks"] == expected_assistant_mask(tok, messages, family), (family, messages)
        trained = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
        assert FAMILIES[family]["end"].strip() in tok.decode(trained[-3:])


def test_independent_mask_check_catches_a_mask_without_the_end_token():
    tok = build_family_tokenizer("llama3_1")
    messages = CONVERSATIONS[0]
    marked = training_chat_template(tok).replace(
        "{{- message['content'] | trim + '<|eot_id|>' }}\n            {%- endgeneration %}",
        "{{- message['content'] | trim }}\n            {%- endgeneration %}{{- '<|eot_id|>' }}")
    out = tok.apply_chat_template(messages, chat_template=marked, return_dict=True, return_assistant_tokens_mask=True)
    assert out["assistant_masks"] != expected_assistant_mask(tok, messages, "llama3_1")


@pytest.mark.parametrize("family", ["llama3_1", "phi3", "mistral"])
def test_pad_is_made_distinct_from_eos(family):
    tok = ensure_distinct_pad(build_family_tokenizer(family))
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id


def test_mistral_fails_early_saying_what_to_write_and_accepts_a_checked_user_template():
    tok = build_family_tokenizer("mistral")
    with pytest.raises(ValueError, match="chat_template_path"):
        training_chat_template(tok)
    assert training_chat_template(tok, MISTRAL_MARKED) == MISTRAL_MARKED
    drifted = MISTRAL_MARKED.replace("'[INST] ' + message['content']", "'[INST]' + message['content']")
    with pytest.raises(ValueError, match="does not render like the model's own"):
        training_chat_template(tok, drifted)
    with pytest.raises(ValueError, match="no .*generation"):
        training_chat_template(tok, tok.chat_template)


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory):
    from data_gen.generate import main as data_main

    out = tmp_path_factory.mktemp("family-data") / "data"
    data_main(["--config", str(REPO / "recipes/smoke/data.yaml"), "--output_dir", str(out)])
    return out


def _run(module, *argv):
    return module.main(*parse_recipe(module.make_parser(), list(argv)))


@pytest.mark.parametrize("family", ["llama3_1", "llama3_2", "qwen2_5", "qwen3", "gemma3", "phi3", "mistral"])
def test_chain_sft_dpo_eval_with_only_the_model_changed(family, smoke_data, tmp_path, monkeypatch):
    for key in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_GROUP", "WANDB_JOB_TYPE"):
        monkeypatch.delenv(key, raising=False)
    model = build_family_model(tmp_path / "model", family)
    extra = []
    if family == "mistral":
        template = tmp_path / "mistral_marked.jinja"
        template.write_text(MISTRAL_MARKED)
        extra = ["--chat_template_path", str(template)]
    common = ["--model_name_or_path", model, "--dataset_path", str(smoke_data), "--max_steps", "2"]
    _run(sft, "--config", str(REPO / "recipes/smoke/sft.yaml"), *common, "--output_dir", str(tmp_path / "sft"), *extra)
    _run(dpo, "--config", str(REPO / "recipes/smoke/dpo.yaml"), *common, "--sft_adapter", str(tmp_path / "sft"),
         "--output_dir", str(tmp_path / "dpo"))
    saved = (tmp_path / "sft" / "chat_template.jinja").read_text()
    tok = build_family_tokenizer(family)
    assert renders_like(tok, tok.chat_template, saved)

    from eval.run import main as eval_main

    report = eval_main(["--config", str(REPO / "recipes/smoke/eval.yaml"), "--model", model,
                        "--dataset_path", str(smoke_data), "--output_dir", str(tmp_path / "eval"),
                        "--adapters", json.dumps({"sft": str(tmp_path / "sft"), "dpo": str(tmp_path / "dpo")}),
                        "--suites", "[preference]", "--max_pairs_per_split", "12"])
    assert "saved with adapter" in report["template"]
    scored = [r for r in report["preference"] if r["model"] == "dpo" and r["trait"] == "all" and r["axis"] == "all"]
    assert scored and all(r["norm_accuracy"]["n"] > 0 for r in scored)


@pytest.mark.parametrize("family,expect_skipped", [("gemma3", True), ("phi3", True), ("qwen2_5", False)])
def test_eval_skips_and_reports_pairs_a_template_cannot_render(family, expect_skipped, smoke_data):
    from eval.preference import drop_unrenderable, load_pairs

    rows = load_pairs(str(smoke_data))
    kept, skipped = drop_unrenderable(rows, build_family_tokenizer(family))
    assert len(kept) + len(skipped) == len(rows)
    assert bool(skipped) == expect_skipped
    assert {s["format"] for s in skipped} <= {"agentic"}  # tool turns: refused by Gemma, dropped by Phi-3


def test_training_rows_a_template_cannot_render_are_named_before_training():
    from datasets import Dataset

    from train.loss_mask import check_renderable

    tok = build_family_tokenizer("gemma3")
    rows = [{"id": "ok-1", "messages": CONVERSATIONS[0]},
            {"id": "agentic-7", "messages": [{"role": "user", "content": "Run it."},
                                             {"role": "assistant", "content": "Calling."},
                                             {"role": "tool", "content": "done"},
                                             {"role": "assistant", "content": "It ran."}]}]
    with pytest.raises(ValueError, match="agentic-7: the chat template refuses it"):
        check_renderable(Dataset.from_list(rows), tok)
    check_renderable(Dataset.from_list(rows[:1]), tok)


def test_eval_device_and_dtype_follow_the_machine():
    import torch

    from eval.config import EvalConfig
    from eval.variants import resolve_device, resolve_dtype

    with pytest.raises(ValueError, match="device must be"):
        EvalConfig(device="gpu", suites=["probes"])
    assert resolve_dtype("auto", "cpu", cpu_flags={"avx2"}) == torch.float32  # emulated bf16 is slower than fp32
    assert resolve_dtype("auto", "cpu", cpu_flags={"avx2", "avx512_bf16"}) == torch.bfloat16
    assert resolve_dtype("auto", "cpu", cpu_flags={"amx_bf16"}) == torch.bfloat16
    assert resolve_dtype("float32", "cpu", cpu_flags={"avx512_bf16"}) == torch.float32  # an explicit dtype stands
    if not torch.cuda.is_available():
        assert resolve_device("auto") == "cpu"
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")


# Each GPU recipe set, chained on a tiny model of its family: only the model, the sizes and the GPU-only precision
# (bf16 mixed precision) are overridden, so a key the GPU run would trip over trips here first.
RECIPE_SETS = [("llama-3.1-8b-instruct", "llama3_1", "sft_lora", "dpo_lora"),
               ("qwen2.5-1.5b-instruct", "qwen2_5", "sft_lora", "dpo_lora")]
SMALL_DATA = ["--sft_train_per_trait", "8", "--dpo_train_per_trait", "8", "--eval_id_per_trait", "4",
              "--eval_ood_per_axis_per_trait", "2", "--leakage_embedding_check", "false", "--diversity_sample", "50"]
SMALL_TRAIN = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
               "--per_device_eval_batch_size", "2", "--eval_steps", "2", "--max_length", "384", "--bf16", "false",
               "--gradient_checkpointing", "false", "--save_steps", "2", "--report_to", "none"]


@pytest.mark.parametrize("recipe_set,family,sft_recipe,dpo_recipe", RECIPE_SETS, ids=[r[0] for r in RECIPE_SETS])
def test_gpu_recipe_set_chains_on_a_tiny_model_of_its_family(recipe_set, family, sft_recipe, dpo_recipe, tmp_path,
                                                             monkeypatch):
    from data_gen.generate import main as data_main
    from eval.run import main as eval_main

    for key in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_GROUP", "WANDB_JOB_TYPE"):
        monkeypatch.delenv(key, raising=False)
    r = REPO / "recipes" / recipe_set
    model = build_family_model(tmp_path / "model", family)
    data, sft_out, dpo_out = tmp_path / "data", tmp_path / "sft", tmp_path / "dpo"
    data_main(["--config", str(r / "data.yaml"), "--output_dir", str(data), *SMALL_DATA])
    common = ["--model_name_or_path", model, "--dataset_name", str(data), *SMALL_TRAIN]
    _run(sft, "--config", str(r / f"{sft_recipe}.yaml"), *common, "--output_dir", str(sft_out))
    _run(dpo, "--config", str(r / f"{dpo_recipe}.yaml"), *common, "--sft_adapter", str(sft_out),
         "--output_dir", str(dpo_out))
    report = eval_main(["--config", str(r / "eval.yaml"), "--model", model, "--dataset_path", str(data),
                        "--adapters", json.dumps({"sft": str(sft_out), "dpo": str(dpo_out)}),
                        "--output_dir", str(tmp_path / "eval"), "--batch_size", "4", "--max_length", "384",
                        "--reference_paragraphs", "4", "--reference_max_tokens", "32", "--neutral_max_new_tokens", "8",
                        "--generation_prompts", "2", "--max_new_tokens", "8", "--wandb", "false"])
    # dtype auto: without a GPU, bf16 only on a CPU with native bf16 matmuls
    from train.hardware import cpu_supports_bf16

    assert report["device"] == "cpu" and report["dtype"] == ("bfloat16" if cpu_supports_bf16() else "float32")
    assert report["preference"] and (tmp_path / "eval" / "report.md").is_file()
