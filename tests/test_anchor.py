"""Anchored training (KL to the base on neutral replay text) and the forgetting budget, on the tiny model."""

import json

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from train_fixtures import dpo_rows, sft_rows
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from train import speedups
from train.anchor import AnchoredDPOTrainer, AnchoredSFTTrainer, anchor_record, anchored_trainer_class
from train.anchor_args import AnchorArguments
from train.chat_template import training_chat_template
from train.forgetting_budget import (
    BUDGET_TEXTS,
    EVAL_DEFAULT_REFERENCE_PARAGRAPHS,
    RECORD,
    ForgettingBudget,
    budget_callbacks,
    check_disjoint_from_eval,
    full_log_probs,
    held_out_texts,
    reference_paragraphs,
    replay_texts,
)
from train.models import load_model, load_tokenizer

LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def _tokenizer(model_dir):
    tokenizer = load_tokenizer(model_dir)
    tokenizer.chat_template = training_chat_template(tokenizer)
    return tokenizer


def _sft(model_dir, tmp_path, anchor: AnchorArguments, steps=4, **overrides):
    tokenizer = _tokenizer(model_dir)
    torch.manual_seed(0)
    args = dict(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, learning_rate=2e-2,
                bf16=False, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
                assistant_only_loss=True, gradient_checkpointing=False)
    args.update(overrides)
    rows = [{"messages": r["messages"]} for r in sft_rows(8)]
    make = anchored_trainer_class(SFTTrainer, anchor)
    return make(model=load_model(model_dir), args=SFTConfig(**args), train_dataset=Dataset.from_list(rows),
                processing_class=tokenizer, peft_config=LoraConfig(**LORA),
                callbacks=budget_callbacks(anchor, tokenizer))


def _move_adapter(model, scale=0.05):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale, generator=torch.Generator().manual_seed(0))


def test_off_by_default_is_the_plain_trainer():
    args = AnchorArguments()
    assert anchored_trainer_class(SFTTrainer, args) is SFTTrainer
    assert anchored_trainer_class(DPOTrainer, args) is DPOTrainer
    assert budget_callbacks(args, tokenizer=None) == []
    assert anchored_trainer_class(SFTTrainer, AnchorArguments(anchor_weight=0.5)).func is AnchoredSFTTrainer
    assert anchored_trainer_class(DPOTrainer, AnchorArguments(budget_max_kl=1.0)).func is AnchoredDPOTrainer


def test_texts_are_disjoint_from_each_other_and_from_eval():
    import dataclasses

    import eval.config
    from eval.forgetting import reference_paragraphs as eval_paragraphs
    from train.assets import DEFAULT_PROBES

    fields = {f.name: f for f in dataclasses.fields(eval.config.EvalConfig)}
    assert fields["probe_sets"].default_factory() == list(DEFAULT_PROBES)
    field = fields["reference_paragraphs"]
    assert field.default == EVAL_DEFAULT_REFERENCE_PARAGRAPHS
    paras = reference_paragraphs()
    assert eval_paragraphs(len(paras)) == paras  # the same file, read the same way
    held, _ = held_out_texts()
    replay, source = replay_texts(32)
    evals = set(paras[:EVAL_DEFAULT_REFERENCE_PARAGRAPHS])
    assert len(held) == BUDGET_TEXTS and len(replay) == 32 and "[249:281]" in source
    assert not (set(held) & set(replay)) and not (set(held) & evals) and not (set(replay) & evals)
    assert len(set(held) | set(replay)) == 32 + BUDGET_TEXTS  # distinct texts: the file repeats a few
    with pytest.raises(ValueError, match="anchor_replay_texts"):
        replay_texts(len(paras))


def test_probe_set_or_texts_overlapping_eval_refused(tmp_path):
    check_disjoint_from_eval(AnchorArguments())  # the default set shares nothing with eval's defaults
    with pytest.raises(ValueError, match="budget_probe_set.*factual/default.json"):
        check_disjoint_from_eval(AnchorArguments(budget_probe_set="factual/default.json"))
    recipe = tmp_path / "eval.yaml"
    recipe.write_text("probe_sets: [factual/default.json, factual/truthfulqa.json]\n")
    with pytest.raises(ValueError, match="factual/truthfulqa.json.*eval.yaml"):
        check_disjoint_from_eval(AnchorArguments(budget_eval_recipe=str(recipe)))
    recipe.write_text("probe_sets: [factual/default.json]\nreference_paragraphs: 280\n")
    check_disjoint_from_eval(AnchorArguments(budget_eval_recipe=str(recipe)))  # the budget's texts start later
    with pytest.raises(ValueError, match="reference_paragraphs 280"):
        check_disjoint_from_eval(AnchorArguments(budget_eval_recipe=str(recipe), anchor_weight=1.0))
    recipe.write_text("probe_sets: [factual/default.json]\nreference_paragraphs: 24\n")
    with pytest.raises(ValueError, match="bench/social.json.*eval defaults"):
        check_disjoint_from_eval(AnchorArguments(budget_probe_set="bench/social.json"))
    check_disjoint_from_eval(AnchorArguments(budget_eval_recipe=str(recipe), budget_probe_set="bench/social.json"))


def test_kl_is_zero_at_step_0_and_grows_when_the_adapter_moves(tiny_model_dir, tmp_path):
    trainer = _sft(tiny_model_dir, tmp_path, AnchorArguments(anchor_weight=1.0, anchor_batch_size=3))
    assert speedups.apply(trainer)[0]["label_only_head"].used  # the CPU head is on: full log-probs regardless
    model = trainer.model
    model.train()
    ids = torch.tensor([[5, 6, 7, 8]])
    assert full_log_probs(model, ids, torch.ones_like(ids)).shape == (1, 3, model.get_output_embeddings().weight.shape[0])
    kl0 = trainer.anchor_kl(model).detach()
    assert float(kl0) == 0.0  # LoRA's B starts at zero: the policy is the base, exactly
    _move_adapter(model)
    kl = trainer.anchor_kl(model)
    assert float(kl.detach()) > 1e-4
    kl.backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.grad is not None]
    assert lora_grads and any(float(g.abs().sum()) > 0 for g in lora_grads)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)  # the base stays frozen
    _move_adapter(model, scale=0.2)
    assert float(trainer.anchor_kl(model).detach()) > float(kl.detach())


def _held_out_kl(trainer):
    budget = ForgettingBudget(AnchorArguments(budget_max_kl=1.0), trainer.processing_class)
    return budget.measure(trainer.model)["kl"]


def test_anchor_lowers_drift_and_logs_its_kl(tiny_model_dir, tmp_path):
    drift = {}
    for weight in (0.0, 20.0):
        trainer = _sft(tiny_model_dir, tmp_path / str(weight), AnchorArguments(anchor_weight=weight), steps=6)
        speedups.apply(trainer)
        trainer.train()
        drift[weight] = _held_out_kl(trainer)
        logged = [h["anchor_kl"] for h in trainer.state.log_history if "anchor_kl" in h]
        if weight:
            assert len(logged) == 6 and logged[0] == 0.0 and max(logged) > 0
            assert anchor_record(trainer)["anchor"]["weight"] == weight
        else:
            assert type(trainer) is SFTTrainer and not logged and anchor_record(trainer) == {}
    assert drift[0.0] > 0 and drift[20.0] < 0.7 * drift[0.0], drift


def test_tiny_budget_stops_the_run_and_leaves_a_loadable_adapter(tiny_model_dir, tmp_path):
    anchor = AnchorArguments(budget_max_kl=1e-7, budget_check_steps=2, budget_action="stop")
    trainer = _sft(tiny_model_dir, tmp_path, anchor, steps=8)
    trainer.train()
    assert trainer.state.global_step == 2  # step 0 (KL exactly 0) held; step 2 broke it
    record = json.loads((tmp_path / RECORD).read_text())
    assert record["exceeded_at_step"] == 2 and record["stopped_at_step"] == 2 and record["held"] is False
    assert [c["step"] for c in record["checks"]] == [0, 2] and record["checks"][0]["kl"] == 0.0
    assert record["limits"] == {"max_kl": 1e-7, "max_probe_drop": None} and record["action"] == "stop"
    assert (tmp_path / "checkpoint-2").is_dir()  # the stop saved
    assert anchor_record(trainer)["forgetting_budget"] == record
    logged = [h for h in trainer.state.log_history if "budget/kl" in h]
    assert logged and logged[-1]["step"] == 2 and logged[-1]["budget/kl"] == record["checks"][-1]["kl"]
    trainer.save_model(str(tmp_path / "final"))
    loaded = PeftModel.from_pretrained(load_model(tiny_model_dir), str(tmp_path / "final"))
    assert any("lora_B" in n and float(p.abs().sum()) > 0 for n, p in loaded.named_parameters())


def test_warn_budget_trains_to_the_end(tiny_model_dir, tmp_path, caplog):
    anchor = AnchorArguments(budget_max_kl=1e-7, budget_max_probe_drop=100.0, budget_action="warn")
    trainer = _sft(tiny_model_dir, tmp_path, anchor, steps=3, logging_steps=3)
    with caplog.at_level("WARNING", logger="train.forgetting_budget"):
        trainer.train()
    assert trainer.state.global_step == 3 and "FORGETTING BUDGET EXCEEDED at step 3" in caplog.text
    record = json.loads((tmp_path / RECORD).read_text())
    assert record["check_steps"] == 3 and [c["step"] for c in record["checks"]] == [0, 3]
    assert record["exceeded_at_step"] == 3 and record["stopped_at_step"] is None
    assert 0.0 <= record["base"]["probe_acc"] <= 1.0 and record["checks"][0]["probe_drop"] == 0.0


def test_budget_record_survives_a_resume(tiny_model_dir, tmp_path):
    anchor = AnchorArguments(budget_max_kl=1e-7, budget_check_steps=2, budget_action="warn")
    _sft(tiny_model_dir, tmp_path, anchor, steps=4, save_strategy="steps", save_steps=2).train()
    path = tmp_path / RECORD
    record = json.loads(path.read_text())
    assert [c["step"] for c in record["checks"]] == [0, 2, 4]
    record["checks"][-1]["kl"] = 9.0  # step 4's check, made after the checkpoint the run resumes from
    path.write_text(json.dumps(record))
    resumed = _sft(tiny_model_dir, tmp_path, anchor, steps=6, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    record = json.loads(path.read_text())
    # the checks up to the checkpoint kept, the later ones (made by the run that went on past it) measured again
    assert [c["step"] for c in record["checks"]] == [0, 2, 4, 6] and record["checks"][2]["kl"] != 9.0
    assert record["exceeded_at_step"] == 2


def test_anchored_dpo_adds_the_kl_to_the_loss(tiny_model_dir, tmp_path):
    tokenizer = _tokenizer(tiny_model_dir)
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in dpo_rows(4)]
    args = DPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to="none",
                     save_strategy="no", disable_tqdm=True, seed=0, bf16=False, gradient_checkpointing=False)
    losses = {}
    for weight in (0.0, 1.0):
        anchor = AnchorArguments(anchor_weight=weight, budget_max_kl=10.0)  # the budget keeps the mixin at weight 0
        trainer = anchored_trainer_class(DPOTrainer, anchor)(
            model=load_model(tiny_model_dir), args=args, train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer, peft_config=LoraConfig(**LORA))
        speedups.apply(trainer)
        _move_adapter(trainer.model)
        trainer.model.train()
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        losses[weight] = float(trainer.compute_loss(trainer.model, dict(batch)).detach())
        kl = trainer._metrics["train"].get("anchor_kl")
    assert kl and kl[-1] > 0
    # DPO's loss is left for Trainer to divide by the accumulation steps (1 here)
    assert losses[1.0] == pytest.approx(losses[0.0] + kl[-1], rel=1e-4)


def test_sft_anchor_shares_the_accumulation_scaling(tiny_model_dir, tmp_path):
    trainer = _sft(tiny_model_dir, tmp_path, AnchorArguments(anchor_weight=2.0), gradient_accumulation_steps=2)
    speedups.apply(trainer)
    _move_adapter(trainer.model)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    n_tokens = (batch["labels"][:, 1:] != -100).sum()
    plain = float(SFTTrainer.compute_loss(trainer, trainer.model, dict(batch), num_items_in_batch=n_tokens).detach())
    # Trainer leaves a loss normalised by num_items_in_batch undivided: the anchor divides itself
    loss = float(trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=n_tokens).detach())
    assert loss == pytest.approx(plain + 2.0 * trainer._metrics["train"]["anchor_kl"][-1] / 2, rel=1e-5)


def test_no_adapter_refused(tiny_model_dir, tmp_path):
    tokenizer = _tokenizer(tiny_model_dir)
    rows = [{"messages": r["messages"]} for r in sft_rows(4)]
    with pytest.raises(ValueError, match="LoRA adapter"):
        anchored_trainer_class(SFTTrainer, AnchorArguments(anchor_weight=1.0))(
            model=load_model(tiny_model_dir), train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
            args=SFTConfig(output_dir=str(tmp_path), report_to="none", bf16=False, max_steps=1))


@pytest.mark.subprocess
def test_anchor_and_budget_under_ddp_over_gloo(tiny_model_dir, tmp_path):
    import os
    import re
    import socket
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{repo / 'tests'}{os.pathsep}{repo}"}
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(repo / "recipes/accelerate_configs/ddp.yaml"), "--num_processes", "2", "--main_process_port", port,
         str(repo / "tests/anchor_ddp_worker.py"), tiny_model_dir, str(tmp_path / "out")],
        cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = re.findall(r"\[rank (\d)\] wrapped (\w+) steps (\d+) max_weight_diff ([\d.e+-]+) anchor_kl_max ([\d.e+-]+)", proc.stdout)
    assert sorted(r for r, *_ in lines) == ["0", "1"], proc.stdout[-2000:]
    for _, wrapper, steps, diff, kl in lines:
        assert wrapper == "DistributedDataParallel" and steps == "2"  # both ranks stopped at the broken budget
        assert float(diff) == 0.0 and float(kl) > 0  # the anchor's gradient was reduced across ranks with TRL's
    record = json.loads((tmp_path / "out" / RECORD).read_text())
    assert record["exceeded_at_step"] == 2 and record["stopped_at_step"] == 2


def test_recipe_keys_reach_the_training_scripts(tiny_model_dir, tmp_path):
    """Anchor, budget and persona monitor as recipe keys of `python -m train.sft`: the budget stops the run, the
    manifest records both options, the monitor leaves its curve, and the adapter loads."""
    import json as _json
    from pathlib import Path

    from peft import PeftModel
    from train_fixtures import write_dataset
    from transformers import AutoModelForCausalLM

    from train import sft
    from train.recipe import parse_recipe

    repo = Path(__file__).resolve().parents[1]
    data, out = write_dataset(tmp_path / "data", n_train=16), tmp_path / "sft"
    args = ["--config", str(repo / "recipes/smoke/sft.yaml"), "--model_name_or_path", str(tiny_model_dir),
            "--dataset_name", str(data), "--output_dir", str(out), "--max_steps", "6", "--save_steps", "100",
            "--anchor_weight", "1.0", "--budget_max_kl", "1e-12", "--budget_check_steps", "2",
            "--persona_monitor", "true", "--persona_monitor_prompts", "2", "--persona_questions", "2"]
    sft.main(*parse_recipe(sft.make_parser(), args))
    manifest = _json.loads((out / "training_manifest.json").read_text())
    assert manifest["forgetting_budget"]["exceeded_at_step"] == 2 and manifest["metrics"]["global_step"] == 2
    assert manifest["anchor"] and (out / "forgetting_budget.json").is_file()
    assert len(_json.loads((out / "persona_monitor.json").read_text())) >= 2
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
