"""The CPU speed settings: chosen by the hardware or the recipe, and training the same as TRL's defaults."""

import logging
import os
import sys
import types

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from train_fixtures import dpo_rows, sft_rows
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from train import speedups
from train.chat_template import training_chat_template
from train.hardware import (
    choose_wait_policy,
    configure_process,
    cpu_busy_fraction,
    cpu_flags,
    cpu_supports_bf16,
    fast_cpu_overrides,
    keep_freed_memory,
)
from train.models import load_model, load_tokenizer
from train.shared_prompt import completion_hidden, pair_layout
from train.unpadded_mlp import UnpaddedMLP

LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(info) == {"fpu", "avx512f", "avx512_bf16", "amx_tile"}
    assert cpu_flags(tmp_path / "missing") == set()


def test_bf16_only_where_the_cpu_has_native_bf16():
    assert cpu_supports_bf16({"avx512f", "avx512_bf16"})
    assert cpu_supports_bf16({"amx_bf16"})
    assert not cpu_supports_bf16({"avx512f", "avx512_vnni", "avx2"})  # emulated bf16: slower than fp32
    assert fast_cpu_overrides("sft", flags={"avx512_bf16"}, accelerator=False)["bf16"] is True
    assert fast_cpu_overrides("dpo", flags={"avx2"}, accelerator=False)["bf16"] is False


def test_overrides_per_stage_and_none_on_gpu():
    sft = fast_cpu_overrides("sft", flags=set(), accelerator=False)
    assert sft["gradient_checkpointing"] is False and sft["use_cpu"] is True
    assert "padding_free" not in sft  # packing one row makes SDPA on CPU attend across examples: slower
    assert fast_cpu_overrides("sft", accelerator=True) == {}
    with pytest.raises(ValueError, match="stage"):
        fast_cpu_overrides("ppo", accelerator=False)
    # Every key is a real field of the config it is meant for
    SFTConfig(output_dir="x", **sft)
    DPOConfig(output_dir="x", **fast_cpu_overrides("dpo", flags=set(), accelerator=False))


def test_thread_wait_policy_chosen_by_load(monkeypatch, tmp_path):
    import train.hardware

    monkeypatch.setattr(train.hardware, "process_settings", {})
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert configure_process()["omp_wait_policy"] == "ACTIVE" and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"  # the user's
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setattr(train.hardware, "cpu_busy_fraction", lambda: 0.05)
    assert choose_wait_policy()[0] is None  # idle CPU: libgomp's spinning
    settings = configure_process()
    assert settings["omp_wait_policy"] == "default" and "OMP_WAIT_POLICY" not in os.environ
    assert "5% busy" in settings["omp_wait_policy_why"]
    monkeypatch.setattr(train.hardware, "cpu_busy_fraction", lambda: 0.8)
    assert configure_process()["omp_wait_policy"] == "PASSIVE" and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"  # busy


def test_onednn_primitive_cache_bounded_unless_the_user_set_it(monkeypatch):
    import train.hardware

    monkeypatch.setattr(train.hardware, "process_settings", {})
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    assert configure_process()["onednn_primitive_cache"] == "64" == os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"]
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "512")
    assert configure_process()["onednn_primitive_cache"] == "512"


@pytest.mark.subprocess
def test_importing_the_training_scripts_leaves_the_process_alone():
    code = ("import os, sys; before = dict(os.environ); import train.sft, train.dpo, train.run, data_gen.__main__, "
            "eval.__main__; "
            "assert dict(os.environ) == before, set(os.environ) ^ set(before); assert 'torch' not in sys.modules")
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "HF_HUB_DISABLE_TELEMETRY")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_cpu_busy_fraction_from_proc_stat(tmp_path, monkeypatch):
    import train.hardware

    stat = tmp_path / "stat"
    samples = iter(["cpu  100 0 100 800 0 0 0 0 0 0\n", "cpu  160 0 140 900 0 0 0 0 0 0\n"])
    monkeypatch.setattr(train.hardware.time, "sleep", lambda s: stat.write_text(next(samples)))
    stat.write_text(next(samples))
    assert cpu_busy_fraction(0.0, stat) == pytest.approx(0.5)  # 100 busy of 200 jiffies
    assert cpu_busy_fraction(0.0, tmp_path / "missing") is None


def _sft_trainer(model_dir, tmp_path, n=8, **overrides):
    tokenizer = load_tokenizer(model_dir)
    tokenizer.chat_template = training_chat_template(tokenizer)
    torch.manual_seed(0)
    args = dict(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=5e-3, bf16=False,
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, assistant_only_loss=True,
    )
    args.update(overrides)
    rows = [{"messages": r["messages"]} for r in sft_rows(n)]
    return SFTTrainer(
        model=load_model(model_dir), args=SFTConfig(**args), train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer, peft_config=LoraConfig(**LORA),
    )


def _loss_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch, fused_lm_head=True)
    out.loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return out, grads


def test_label_only_head_matches_trl_head(tiny_model_dir, tmp_path):
    trainer = _sft_trainer(tiny_model_dir, tmp_path, gradient_checkpointing=False)
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"] == -100).any()  # prompt and padding positions are skipped by the new head
    ref, ref_grads = _loss_and_grads(trainer.model, batch)
    assert speedups.apply(trainer)[0]["label_only_head"].used
    out, grads = _loss_and_grads(trainer.model, batch)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    for field in ("log_probs", "entropy"):
        torch.testing.assert_close(getattr(out, field), getattr(ref, field), rtol=1e-4, atol=1e-4)
    assert torch.equal(out.is_top1, ref.is_top1) and torch.equal(out.label_mask, ref.label_mask)
    torch.testing.assert_close(grads, ref_grads, rtol=1e-4, atol=1e-6)
    # Generation (unfused forward) still goes through the model's own head
    assert trainer.model(input_ids=batch["input_ids"][:1]).logits.shape[-1] == trainer.model.config.vocab_size


def test_fast_settings_train_like_plain_ones(tiny_model_dir, tmp_path):
    plain = _sft_trainer(tiny_model_dir, tmp_path / "plain")
    plain.train()
    overrides = fast_cpu_overrides("sft", flags=set(), accelerator=False)  # fp32, as plain: losses comparable
    fast = _sft_trainer(tiny_model_dir, tmp_path / "fast", **overrides)
    choices, heads = speedups.apply(fast)
    assert choices["label_only_head"].used and choices["unpadded_mlp"].used and not choices["shared_prompt"].used
    batch = next(iter(fast.get_train_dataloader()))
    assert batch["input_ids"].shape[0] > 1  # one row per example, padded
    fast.train()
    assert heads[0].checks["label_only_head"].startswith("checked")  # the first batch was compared with TRL's head
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (plain, fast)]
    assert len(losses[0]) == len(losses[1]) == 4
    assert losses[0][-1] < losses[0][0]  # it trains at all
    assert losses[1] == pytest.approx(losses[0], rel=2e-3)  # same batches, same steps, same losses


def _dpo_trainer(model_dir, tmp_path, n=4):
    tokenizer = load_tokenizer(model_dir)
    tokenizer.chat_template = training_chat_template(tokenizer)
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in dpo_rows(n)]
    args = DPOConfig(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=n, report_to="none",
        save_strategy="no", disable_tqdm=True, seed=0, **fast_cpu_overrides("dpo", flags=set(), accelerator=False),
    )
    trainer = DPOTrainer(
        model=load_model(model_dir), args=args, train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer, peft_config=LoraConfig(**LORA),
    )
    # Move the adapter off zero so that policy and reference differ
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    return trainer, batch


def _dpo_loss_metrics_grads(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    return loss.detach(), {k: v[-1] for k, v in trainer._metrics["train"].items()}, grads


def test_dpo_loss_unchanged_by_label_only_head_and_shared_prompt(tiny_model_dir, tmp_path, caplog):
    trainer, batch = _dpo_trainer(tiny_model_dir, tmp_path)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    assert pair_layout(batch["input_ids"], batch["attention_mask"], labels) is not None  # the shared path applies
    ref_loss, ref_metrics, ref_grads = _dpo_loss_metrics_grads(trainer, batch)
    assert speedups.apply(trainer)[0]["shared_prompt"].used
    with caplog.at_level(logging.INFO, logger="train.label_only_head"):
        loss, metrics, grads = _dpo_loss_metrics_grads(trainer, batch)
    assert "shared-prompt forward checked" in caplog.text and "disagrees" not in caplog.text
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads, ref_grads, rtol=1e-4, atol=1e-6)  # gradients flow through the prompt's cache
    for key in ("rewards/chosen", "rewards/margins", "logits/chosen", "entropy", "mean_token_accuracy"):
        assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-3, abs=1e-5), key


def test_shared_prompt_hidden_states_match_the_concatenated_forward(tiny_model_dir, tmp_path):
    trainer, batch = _dpo_trainer(tiny_model_dir, tmp_path, n=3)
    model = trainer.model.get_base_model()
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    layout = pair_layout(batch["input_ids"], batch["attention_mask"], labels)
    prompt_len, completion_len = layout
    assert completion_len.tolist() == batch["completion_mask"].sum(1).tolist()
    with torch.no_grad():
        hidden, target = completion_hidden(model.base_model, batch["input_ids"], *layout)
        full = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = labels[:, 1:] != -100
    assert torch.equal(target, labels[:, 1:][mask])
    torch.testing.assert_close(hidden, full[:, :-1][mask], rtol=1e-4, atol=1e-5)


def test_pair_layout_refuses_batches_it_cannot_share(tiny_model_dir, tmp_path):
    _, batch = _dpo_trainer(tiny_model_dir, tmp_path)
    ids, attention = batch["input_ids"], batch["attention_mask"]
    labels = ids.masked_fill(batch["completion_mask"] == 0, -100)
    other_prompt = ids.clone()
    other_prompt[-1, 0] += 1  # the last rejected row's prompt differs from its chosen row's
    assert pair_layout(other_prompt, attention, labels) is None
    hole = labels.clone()
    hole[0, int((labels[0] != -100).int().argmax()) + 1] = -100  # a masked token inside a completion
    assert pair_layout(ids, attention, hole) is None
    assert pair_layout(ids[:-1], attention[:-1], labels[:-1]) is None  # odd number of rows: not [chosen; rejected]


def test_shared_prompt_falls_back_when_it_disagrees(tiny_model_dir, tmp_path, caplog, monkeypatch):
    import train.shared_prompt

    trainer, batch = _dpo_trainer(tiny_model_dir, tmp_path)
    ref_loss, _, _ = _dpo_loss_metrics_grads(trainer, batch)
    real = train.shared_prompt.completion_hidden
    def off_by_one(*args, **kwargs):
        hidden, target = real(*args, **kwargs)
        return hidden + 1.0, target

    monkeypatch.setattr(train.shared_prompt, "completion_hidden", off_by_one)
    assert speedups.apply(trainer)[0]["shared_prompt"].used
    with caplog.at_level(logging.WARNING, logger="train.label_only_head"):
        loss, _, _ = _dpo_loss_metrics_grads(trainer, batch)
    assert "disagrees with the plain forward" in caplog.text
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)  # the plain forward was used instead


def test_keep_freed_memory_only_on_cpu():
    assert keep_freed_memory(torch.device("cpu")) is sys.platform.startswith("linux")
    assert keep_freed_memory("cuda:0") is False


def test_unpadded_mlp_skips_padding_and_keeps_real_tokens(tiny_model_dir):
    model = load_model(tiny_model_dir)
    ids = torch.randint(3, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    attention = torch.ones_like(ids)
    attention[0, 5:] = 0
    attention[2, 7:] = 0
    body = model.get_decoder()
    with torch.no_grad():
        plain = body(input_ids=ids, attention_mask=attention).last_hidden_state
    unpad = UnpaddedMLP(model)
    assert unpad.wrapped == len(body.layers)
    rows_seen = []
    hook = body.layers[0].mlp.gate_proj.register_forward_hook(lambda m, i, o: rows_seen.append(i[0].shape[0]))
    with torch.no_grad(), unpad.tokens(attention):
        fast = body(input_ids=ids, attention_mask=attention).last_hidden_state
    hook.remove()
    assert rows_seen == [int(attention.sum())]  # the MLP ran on the 23 real tokens, not 27 positions
    real = attention.bool()
    torch.testing.assert_close(fast[real], plain[real], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # outside the block: the model's own forward
        torch.testing.assert_close(body(input_ids=ids, attention_mask=attention).last_hidden_state, plain)


def _resolve(stage="dpo", device="cpu", checkpointing=False, bf16=False, dtype="float32", **asked):
    import types

    args = types.SimpleNamespace(device=torch.device(device), gradient_checkpointing=checkpointing, bf16=bf16)
    model = types.SimpleNamespace(dtype=dtype, load_in_4bit=False, load_in_8bit=False)
    return speedups.resolve(stage, types.SimpleNamespace(**asked), args, model)


def test_bf16_base_only_under_bf16_autocast_on_a_float32_recipe():
    model = types.SimpleNamespace(dtype="float32")
    assert not _resolve()["bf16_base"].used  # fp32 training keeps fp32 weights
    assert "not under bf16 autocast" in _resolve()["bf16_base"].why
    chosen = _resolve(bf16=True)
    assert chosen["bf16_base"].used and speedups.base_dtype(chosen, model) == "bfloat16"
    assert speedups.base_dtype(_resolve(), model) == "float32"
    assert not _resolve(bf16=True, dtype="bfloat16")["bf16_base"].used  # the recipe's own dtype stands
    assert not _resolve(bf16=True, device="cuda")["bf16_base"].used
    assert not _resolve(bf16=True, bf16_base="off")["bf16_base"].used
    with pytest.raises(speedups.SpeedupError, match="bf16_base: on.*not under bf16 autocast"):
        _resolve(bf16_base="on")


def test_speedups_auto_on_off():
    used = lambda choices: {name for name, c in choices.items() if c.used}  # noqa: E731
    everything = {"label_only_head", "shared_prompt", "unpadded_mlp", "fused_lora", "fused_rms_norm", "fused_attention"} | (
        {"keep_freed_memory"} if sys.platform.startswith("linux") else set())
    assert used(_resolve("dpo")) == everything  # auto on CPU: what the scripts did before these were choices
    sft = _resolve("sft")
    assert used(sft) == everything - {"shared_prompt"} and "sft has no pairs" in sft["shared_prompt"].why
    assert used(_resolve("dpo", label_only_head="off")) == everything - {"label_only_head", "shared_prompt",
                                                                         "unpadded_mlp"}
    assert used(_resolve("dpo", unpadded_mlp="off", keep_freed_memory="off", fused_lora="off", fused_rms_norm="off",
                         fused_attention="off")) == {"label_only_head", "shared_prompt"}
    checkpointing = _resolve("dpo", checkpointing=True)
    assert not checkpointing["shared_prompt"].used and "gradient_checkpointing" in checkpointing["unpadded_mlp"].why
    assert "gradient_checkpointing" in checkpointing["fused_attention"].why
    gpu = _resolve("dpo", device="cuda")
    assert used(gpu) == set() and "cuda" in gpu["label_only_head"].why and "cuda" in gpu["keep_freed_memory"].why
    assert all("cuda" in gpu[name].why for name in ("fused_lora", "fused_rms_norm", "fused_attention"))
    with pytest.raises(speedups.SpeedupError, match="fused_lora: on.*cuda"):
        _resolve("dpo", device="cuda", fused_lora="on")
    with pytest.raises(speedups.SpeedupError, match="fused_attention: on.*cuda"):
        _resolve("dpo", device="cuda", fused_attention="on")
    assert _resolve("dpo", device="cuda", label_only_head="on")["label_only_head"].used  # asked for: used anywhere
    # `on` where it cannot apply stops the run, naming the key
    with pytest.raises(speedups.SpeedupError, match="shared_prompt: on.*sft has no pairs"):
        _resolve("sft", shared_prompt="on")
    with pytest.raises(speedups.SpeedupError, match="unpadded_mlp: on.*label-only head"):
        _resolve("sft", label_only_head="off", unpadded_mlp="on")
    with pytest.raises(speedups.SpeedupError, match="shared_prompt: on.*gradient_checkpointing"):
        _resolve("dpo", checkpointing=True, shared_prompt="on")
    with pytest.raises(speedups.SpeedupError, match="'maybe' is not one of"):
        _resolve("sft", label_only_head="maybe")


def test_trl_private_hooks_are_guarded_by_version_and_presence(monkeypatch, caplog):
    import trl
    import trl.trainer.utils

    monkeypatch.setattr(trl, "__version__", "9.0.0")
    auto = _resolve("sft")
    assert not auto["label_only_head"].used and "TRL 1.16, installed 9.0.0" in auto["label_only_head"].why
    assert not auto["unpadded_mlp"].used  # it runs inside the head
    with caplog.at_level(logging.WARNING, logger="train.speedups"):
        assert _resolve("sft", label_only_head="on")["label_only_head"].used  # asked for: used, with a warning
    assert "installed 9.0.0" in caplog.text
    monkeypatch.delattr(trl.trainer.utils, "FusedCausalLMOutput")
    assert "no fused LM head" in _resolve("sft")["label_only_head"].why
    with pytest.raises(speedups.SpeedupError, match="label_only_head: on.*no fused LM head"):
        _resolve("sft", label_only_head="on")


def _broken_head(monkeypatch):
    """A label-only head whose log-probs are off by one: the first-batch check must catch it."""
    from train.label_only_head import LabelOnlyHead

    real = LabelOnlyHead.token_log_probs

    def off_by_one(self, hidden, target, metrics=()):
        token_log_p, values, max_abs_logit = real(self, hidden, target, metrics)
        return token_log_p + 1.0, values, max_abs_logit

    monkeypatch.setattr(LabelOnlyHead, "token_log_probs", off_by_one)


def test_check_bound_is_the_rounding_of_the_compute_dtype():
    from train.label_only_head import _tolerance

    assert _tolerance(torch.float32, 40.0) == pytest.approx(1e-3, rel=1e-2)  # fp32: the old fixed tolerance
    assert _tolerance(torch.bfloat16, 25.0) == pytest.approx(1e-3 + 2 * 2**-7 * 25.0)  # 0.39: two bf16 roundings
    assert _tolerance(torch.float16, 25.0) < 0.05
    assert _tolerance(torch.bfloat16, 60.0) < 1.0  # an error of a whole nat is caught even at large logits


def test_self_check_under_bf16_autocast_passes_and_still_catches_a_broken_head(tiny_model_dir, tmp_path, monkeypatch):
    trainer = _sft_trainer(tiny_model_dir, tmp_path, gradient_checkpointing=False)
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    _, heads = speedups.apply(trainer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _loss_and_grads(trainer.model, batch)
    assert heads[0].active and heads[0].checks["label_only_head"].startswith("checked"), heads[0].checks

    trainer = _sft_trainer(tiny_model_dir, tmp_path, gradient_checkpointing=False)
    trainer.model.train()
    _broken_head(monkeypatch)
    _, heads = speedups.apply(trainer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _loss_and_grads(trainer.model, batch)
    assert not heads[0].active and heads[0].checks["label_only_head"].startswith("fell back")


def test_sft_self_check_falls_back_to_trls_head(tiny_model_dir, tmp_path, caplog, monkeypatch):
    trainer = _sft_trainer(tiny_model_dir, tmp_path, gradient_checkpointing=False)
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    ref, ref_grads = _loss_and_grads(trainer.model, batch)
    _broken_head(monkeypatch)
    choices, heads = speedups.apply(trainer)
    with caplog.at_level(logging.WARNING, logger="train.label_only_head"):
        out, grads = _loss_and_grads(trainer.model, batch)
    assert "disagrees with TRL's head" in caplog.text
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)  # TRL's head computed this batch
    torch.testing.assert_close(grads, ref_grads, rtol=1e-4, atol=1e-6)
    assert not heads[0].active  # and every later one
    record = speedups.record(choices, heads)["label_only_head"]
    assert record["used"] is False and record["check"].startswith("fell back")


def test_sft_self_check_stops_the_run_when_the_head_was_asked_for(tiny_model_dir, tmp_path, monkeypatch):
    trainer = _sft_trainer(tiny_model_dir, tmp_path, gradient_checkpointing=False)
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    _broken_head(monkeypatch)
    speedups.apply(trainer, label_only_head="on")
    with pytest.raises(RuntimeError, match="label_only_head: on, but the label-only LM head disagrees"):
        _loss_and_grads(trainer.model, batch)


def test_off_keeps_trls_forward(tiny_model_dir, tmp_path):
    trainer = _sft_trainer(tiny_model_dir, tmp_path, gradient_checkpointing=False)
    forward = trainer.model.get_base_model().forward
    choices, heads = speedups.apply(trainer, label_only_head="off", keep_freed_memory="off", fused_lora="off",
                                    fused_rms_norm="off", fused_attention="off")
    assert heads == [] and not any(c.used for c in choices.values())
    assert trainer.model.get_base_model().forward == forward
    assert not any(hasattr(m, "_peft_forward") for m in trainer.model.modules())  # PEFT's LoRA forward
    assert not any(hasattr(m, "_own_forward") for m in trainer.model.modules())  # the models' own RMSNorm


def test_fused_attention_on_stops_a_model_without_eager_attention(tiny_model_dir, tmp_path):
    trainer = _sft_trainer(tiny_model_dir, tmp_path, gradient_checkpointing=False)  # the tiny model runs SDPA
    with pytest.raises(speedups.SpeedupError, match="fused_attention: on, but the model runs sdpa attention"):
        speedups.apply(trainer, keep_freed_memory="off", fused_attention="on")
    choices, _ = speedups.apply(trainer, keep_freed_memory="off")
    assert not choices["fused_attention"].used and "sdpa" in choices["fused_attention"].why


def _lora_model(tiny_model_dir, **lora):
    from peft import get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(load_model(tiny_model_dir), LoraConfig(**{**LORA, **lora}))
    for p in model.parameters():
        if p.requires_grad:  # B starts at zero: give the update a value, so its gradients and output count
            p.data.normal_(0, 0.05)
    return model


def _lm_loss_and_grads(model, ids, mask, autocast=False):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fused_lora_trains_like_peft(tiny_model_dir):
    from train.fused_lora import FusedLora

    model = _lora_model(tiny_model_dir)
    ids = torch.randint(0, 100, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    for autocast, tol in ((False, 1e-5), (True, 2e-2)):  # bf16: the same ops, rounded in another order
        loss, grads = _lm_loss_and_grads(model, ids, mask, autocast)
        fused = FusedLora(model)
        assert fused.wrapped == 14  # 7 linear layers x 2 decoder layers
        fused_loss, fused_grads = _lm_loss_and_grads(model, ids, mask, autocast)
        torch.testing.assert_close(fused_loss, loss, rtol=tol, atol=tol)
        assert grads.keys() == fused_grads.keys() and all(g.abs().sum() > 0 for g in grads.values())
        for name, grad in grads.items():  # relative to each tensor's largest gradient
            assert (fused_grads[name] - grad).abs().max() <= tol * grad.abs().max(), name
        with torch.no_grad(), model.disable_adapter():  # DPO's reference pass: PEFT's forward, adapters off
            reference = model(input_ids=ids, attention_mask=mask).logits
        fused.remove()
        with torch.no_grad(), model.disable_adapter():
            torch.testing.assert_close(reference, model(input_ids=ids, attention_mask=mask).logits)


def test_fused_lora_leaves_layers_it_cannot_compute(tiny_model_dir):
    from train.fused_lora import FusedLora

    assert FusedLora(_lora_model(tiny_model_dir, lora_dropout=0.1)).wrapped == 0
    assert FusedLora(_lora_model(tiny_model_dir, use_dora=True)).wrapped == 0


def test_mimalloc_ships_on_linux_x86_64_and_turns_glibc_tuning_off(monkeypatch):
    import platform
    from pathlib import Path

    from train.hardware import malloc_problem, mimalloc_library, preloaded_allocator

    if sys.platform.startswith("linux") and platform.machine() == "x86_64":  # pyproject installs it there
        assert Path(mimalloc_library()).is_file()
    monkeypatch.setenv("LD_PRELOAD", "/somewhere/libmimalloc.so")
    assert preloaded_allocator() == "mimalloc" and "mimalloc is preloaded" in malloc_problem()
    assert not keep_freed_memory()
    monkeypatch.setenv("LD_PRELOAD", "")
    assert preloaded_allocator() is None


def _head_case(vocab=97, hidden_size=24, tokens=23):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(vocab, hidden_size, generator=generator) * 0.5
    hidden = torch.randn(tokens, hidden_size, generator=generator)
    target = torch.randint(0, vocab, (tokens,), generator=generator)
    target[::2] = (hidden @ weight.t()).argmax(-1)[::2]  # some targets the model's top choice
    upstream = torch.randn(tokens, generator=generator)  # DPO: a different gradient for each token
    return weight, hidden, target, upstream


def _head_outputs(weight, hidden, target, upstream, autocast):
    from train.token_log_probs import METRICS, token_log_probs

    hidden = hidden.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        log_p, values, max_abs = token_log_probs(hidden, weight, target, METRICS)
    (log_p * upstream).sum().backward()
    return log_p.detach(), values, max_abs, hidden.grad


def test_chunked_log_probs_equal_the_whole_logits_computation(monkeypatch):
    from train import token_log_probs

    weight, hidden, target, upstream = _head_case()
    for autocast, tol in ((False, 1e-5), (True, 2e-2)):
        monkeypatch.setattr(token_log_probs, "CHUNK_ELEMENTS", 10**9)
        trainable = weight.clone().requires_grad_()  # a trainable head: plain ops and autograd
        expected = _head_outputs(trainable, hidden, target, upstream, autocast)
        assert trainable.grad is not None
        for elements in (5 * 97, 16 * 97, 10**9):  # chunks of 16 tokens (the floor) and one chunk for all 23
            monkeypatch.setattr(token_log_probs, "CHUNK_ELEMENTS", elements)
            got = _head_outputs(weight, hidden, target, upstream, autocast)
            torch.testing.assert_close(got[0], expected[0], rtol=tol, atol=tol)
            assert got[1].keys() == expected[1].keys() == set(token_log_probs.METRICS) - {"max_abs_logit"}
            for name, value in expected[1].items():
                if name == "is_top1":  # bf16 logits can tie at the top; fp32 ones do not here
                    assert value.any() and (autocast or torch.equal(got[1][name], value))
                else:
                    torch.testing.assert_close(got[1][name], value, rtol=tol, atol=tol)
            assert got[2] == pytest.approx(expected[2], rel=tol)
            assert expected[3].abs().sum() > 0
            assert (got[3] - expected[3]).abs().max() <= tol * expected[3].abs().max()


def test_chunked_log_probs_gradient_is_checked_by_the_comparison(monkeypatch):
    """The comparison above catches a wrong gradient: one that forgets the target's own term."""
    from train import token_log_probs

    weight, hidden, target, upstream = _head_case()
    right = _head_outputs(weight.clone().requires_grad_(), hidden, target, upstream, False)[3]
    real_scatter = torch.Tensor.scatter_add_
    monkeypatch.setattr(torch.Tensor, "scatter_add_", lambda self, *a: self)  # drops W[target]
    wrong = _head_outputs(weight, hidden, target, upstream, False)[3]
    monkeypatch.setattr(torch.Tensor, "scatter_add_", real_scatter)
    assert (wrong - right).abs().max() > 0.1 * right.abs().max()
    with torch.no_grad():  # no gradient wanted: none computed or kept
        log_p, _, _ = token_log_probs.token_log_probs(hidden, weight, target)
    assert log_p.grad_fn is None
    with pytest.raises(ValueError, match="unknown metrics"):
        token_log_probs.token_log_probs(hidden, weight, target, ("perplexity",))
