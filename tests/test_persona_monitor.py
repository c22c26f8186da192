"""The persona monitor (train/persona_directions.py, persona_monitor.py, persona_screen.py, eval/persona_correlation.py)
on a tiny Llama with two planted trait directions.

The plant: while a trigger token has appeared in the sequence, a fixed unit vector (times SCALE) is added to the
output of one decoder layer and taken off again before the next, so the trait lives at that layer only. An
anti-trigger subtracts it (an example that pushes the trait the wrong way).
"""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from train.anchor_args import PersonaMonitorArguments
from train.persona_directions import (
    TraitPrompts,
    build_directions,
    load_directions,
    monitor_prompts,
    trait_prompts_from_data,
)
from train.persona_monitor import MONITOR_FILE, PersonaMonitor, persona_callbacks
from train.tiny_model import build_tiny_tokenizer

SCALE = 3.0
# trait -> (decoder block index the vector is added after, trigger word, anti-trigger word); layer = block + 1
PLANT = {"honesty": (1, " frankly", " probably"), "care": (2, " calm", None)}
QUESTIONS = ["What should I do about my job?", "Is the water safe today?", "Can you help me with my code?",
             "Why is the sky so big?", "How do I plan my week?", "Tell me about the capital of France.",
             "Should I call a doctor?", "What is good food for sleep?"]


@pytest.fixture(scope="module")
def planted():
    tokenizer = build_tiny_tokenizer(0)
    vocab_ids = {}
    for trait, (_, *words) in PLANT.items():
        for w in filter(None, words):
            ids = tokenizer(w, add_special_tokens=False)["input_ids"]
            assert len(ids) == 1, f"{w!r} must be one token of the tiny vocabulary, got {ids}"
            vocab_ids[w] = ids[0]
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(1)
    vectors = {t: torch.randn(64, generator=generator) for t in PLANT}
    vectors = {t: v / v.norm() for t, v in vectors.items()}
    seen = {}

    def remember_ids(module, args, kwargs):
        seen["ids"] = kwargs.get("input_ids", args[0] if args else None)

    def shift(trait):
        _, trigger, anti = PLANT[trait]
        ids = seen["ids"]
        sign = ((ids == vocab_ids[trigger]).cumsum(1) > 0).float()
        if anti:
            sign = sign - ((ids == vocab_ids[anti]).cumsum(1) > 0).float()
        return SCALE * sign[..., None] * vectors[trait]

    layers = model.model.layers
    # Registered before the first forward, so the hidden-state recorder sees the shifted output.
    model.model.embed_tokens.register_forward_pre_hook(remember_ids, with_kwargs=True)
    for trait, (block, _, _) in PLANT.items():
        layers[block].register_forward_hook(lambda m, a, out, t=trait: out + shift(t).to(out.dtype))
        layers[block + 1].register_forward_pre_hook(
            lambda m, a, kw, t=trait: ((a[0] - shift(t).to(a[0].dtype),) + a[1:], kw) if a else
            (a, {**kw, "hidden_states": kw["hidden_states"] - shift(t).to(kw["hidden_states"].dtype)}),
            with_kwargs=True)
    return model, tokenizer, vectors


def _prompts():
    def pairs(trigger):
        return [([{"role": "user", "content": q}], [{"role": "assistant", "content": f"I{trigger} think so, {a}."}],
                 [{"role": "assistant", "content": f"I think so, {a}."}])
                for q, a in zip(QUESTIONS, ["yes", "maybe", "no", "sure", "okay", "it is fine", "please do", "water"])]

    return {
        "honesty": TraitPrompts("honesty", "You are an assistant and you speak frankly.",
                                ["You are an assistant who hides what it knows.", "You make things up."],
                                QUESTIONS, pairs(" frankly")),
        "care": TraitPrompts("care", "You are an assistant and you stay calm for the person.",
                             ["You are a cold assistant.", "You blame the person."], QUESTIONS, pairs(" calm")),
    }


def test_planted_directions_are_recovered_at_their_layers(planted, tmp_path):
    model, tokenizer, vectors = planted
    directions = build_directions(model, tokenizer, _prompts())
    for trait, (block, _, _) in PLANT.items():
        d = directions[trait]
        assert d.layer == block + 1, (trait, d.layer, d.separation)
        assert torch.nn.functional.cosine_similarity(d.vector, vectors[trait], dim=0) > 0.9
        assert d.separation[d.layer]["pair_accuracy"] == 1.0 and d.separation[d.layer]["auc"] == 1.0
        assert set(d.separation) == {1, 2, 3, 4}  # every layer's separation is reported
    from train.persona_directions import save_directions

    save_directions(directions, tmp_path)
    back = load_directions(tmp_path)
    assert {t: (b.layer, torch.equal(b.vector, directions[t].vector)) for t, b in back.items()} == {
        t: (d.layer, True) for t, d in directions.items()}


class _Texts(torch.utils.data.Dataset):
    def __init__(self, tokenizer):
        self.items = [tokenizer(f"{q} I calm think so.", add_special_tokens=False)["input_ids"] for q in QUESTIONS]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        ids = torch.tensor(self.items[i][:8])
        return {"input_ids": ids, "labels": ids.clone()}


def test_monitor_records_every_logging_step_and_all_traits_under_peft(planted, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tokenizer, _ = planted
    directions = build_directions(model, tokenizer, _prompts())
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    try:
        monitor = PersonaMonitor(tokenizer, directions, [[{"role": "user", "content": q}] for q in QUESTIONS[:4]])
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, logging_steps=2, per_device_train_batch_size=2,
                                 learning_rate=5e-2, report_to=[], save_strategy="no", use_cpu=True, seed=0)
        trainer = Trainer(model=peft_model, args=args, train_dataset=_Texts(tokenizer), callbacks=[monitor])
        trainer.train()
    finally:
        peft_model.unload()  # the planted base goes back to the other tests unchanged
    records = json.loads((tmp_path / MONITOR_FILE).read_text())
    assert [r["step"] for r in records] == [0, 2, 4]  # the baseline, then each logging step
    assert all(set(r["projections"]) == {"honesty", "care"} for r in records)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logged] == [2, 4]
    assert all({"persona/honesty", "persona/care"} <= set(h) for h in logged)
    assert records[1]["projections"] != records[0]["projections"]  # the adapter moved them
    assert set(load_directions(tmp_path)) == {"honesty", "care"}  # saved with the run


def test_screening_flags_an_example_that_pushes_another_trait(planted):
    from train.persona_screen import screen_examples

    model, tokenizer, _ = planted
    directions = build_directions(model, tokenizer, _prompts())

    def row(i, trait, answer):
        return {"id": f"{trait}-{i}", "trait": trait, "messages": [
            {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}, {"role": "assistant", "content": answer}]}

    rows = [row(i, "care", "I calm think you can do it.") for i in range(11)]
    rows += [row(i, "honesty", "I frankly think it is not safe.") for i in range(11)]
    rows.append(row(99, "care", "I calm think it is fine, I probably know."))
    screen = screen_examples(model, tokenizer, directions, rows)
    assert {f["id"] for f in screen["flagged"] if f["pushes"] == "honesty"} == {"care-99"}
    assert len(screen["examples"]) == len(rows) and set(screen["examples"][0]["z"]) == {"honesty", "care"}
    assert screen["reference"]["honesty"]["n"] == 12  # the care rows: those meant to leave honesty alone


def test_persona_callbacks_off_by_default_and_on_from_the_data(tiny_model_dir, tmp_path):
    from train_fixtures import write_dataset

    from train.models import load_model, load_tokenizer

    data = write_dataset(tmp_path / "data", n_train=12)
    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    assert persona_callbacks(PersonaMonitorArguments(), model, tokenizer, str(data)) == []
    on = PersonaMonitorArguments(persona_monitor=True, persona_questions=3, persona_monitor_prompts=3)
    (monitor,) = persona_callbacks(on, model, tokenizer, str(data))
    assert set(monitor.directions) == {"care", "honesty", "instance_reduction"}
    assert len(monitor.rendered) == 3
    assert all(1 <= d.layer <= 2 for d in monitor.directions.values())
    prompts = trait_prompts_from_data(str(data), ["care"], questions=2)
    assert len(prompts["care"].questions) == 2 and len(prompts["care"].violating) >= 2
    assert len(monitor_prompts(str(data), 16)) == 4  # all of eval_id's "id" rows, fewer than asked


def test_screen_cli_writes_json_and_one_card_section(tiny_model_dir, tmp_path):
    from train_fixtures import write_dataset

    from train.persona_screen import main

    data = write_dataset(tmp_path / "data", n_train=12)
    header = "---\nlanguage:\n- en\npretty_name: test\n---\n\n# Card\n\nBody text.\n"
    (data / "README.md").write_text(header)
    for _ in range(2):  # a rerun replaces its section
        screen = main(["--data", str(data), "--model", tiny_model_dir, "--persona_questions", "2"])
    saved = json.loads((data / "persona_screen.json").read_text())
    assert len(saved["examples"]) == 24 and saved["flagged"] == screen["flagged"]
    card = (data / "README.md").read_text()
    assert card.startswith(header) and card.count("## Persona screening") == 1


def test_correlation_of_shift_with_measured_change():
    from eval.persona_correlation import correlate

    records, changes = {}, []
    for seed in range(4):
        steps = [{"step": s, "projections": {"care": 0.1 * s * (seed + 1), "honesty": -0.05 * s}} for s in (0, 5, 10)]
        records[f"run{seed}"] = steps
        for s in (5, 10):
            changes.append({"run": f"run{seed}", "trait": "care", "step": s, "change": 0.02 * s * (seed + 1) + 0.01})
    out = correlate(records, changes, n_boot=200)
    assert out["overall"]["n"] == 8 and out["overall"]["r"] == pytest.approx(1.0)
    lo, hi = out["overall"]["fisher_ci95"]
    assert lo <= out["overall"]["r"] <= hi
    assert out["points"][0]["shift"] == pytest.approx(0.5)
    with pytest.raises(KeyError, match="no persona monitor records"):
        correlate(records, [{"run": "missing", "trait": "care", "change": 0.0}])
