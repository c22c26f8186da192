"""SFT and DPO stages on the tiny model: outputs, loss masks, adapter checks, W&B offline, resume, DDP."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import sft_rows, wait_for, write_dataset
from wandb_records import records

from train import dpo, sft
from train.recipe import RecipeError, parse_recipe, validate_recipe

REPO = Path(__file__).resolve().parents[1]
SMOKE_SFT = str(REPO / "recipes/smoke/sft.yaml")
SMOKE_DPO = str(REPO / "recipes/smoke/dpo.yaml")
PY = sys.executable


def run_stage(module, *argv):
    return module.main(*parse_recipe(module.make_parser(), list(argv)))


@pytest.fixture
def data_dir(tmp_path):
    return write_dataset(tmp_path / "data", n_train=16)


@pytest.fixture
def no_wandb_env(monkeypatch):
    """Undo the W&B variables a stage sets, so tests do not leak them into each other."""
    for key in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_GROUP", "WANDB_JOB_TYPE", "WANDB_CONSOLE"):
        monkeypatch.delenv(key, raising=False)


def sft_args(tiny_model_dir, data_dir, out, *extra):
    return (
        "--config", SMOKE_SFT, "--model_name_or_path", tiny_model_dir,
        "--dataset_path", str(data_dir), "--output_dir", str(out), *extra,
    )


def test_sft_then_dpo_saves_complete_adapters(tiny_model_dir, data_dir, tmp_path, no_wandb_env):
    from train.chat_template import has_generation_markers

    sft_dir = tmp_path / "sft"
    run_stage(sft, *sft_args(tiny_model_dir, data_dir, sft_dir, "--attn_implementation", "eager"))
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "recipe.yaml"):
        assert (sft_dir / name).is_file(), name
    manifest = json.loads((sft_dir / "training_manifest.json").read_text())
    assert manifest["stage"] == "sft" and manifest["base_model"] == tiny_model_dir
    assert manifest["data"]["examples"] == 16 and len(manifest["data"]["sha256"]) == 64
    assert manifest["adapter_check"]["checked_tensors"] > 0 and manifest["metrics"]["global_step"] == 4
    curve = manifest["metrics"]["loss_curve"]  # the smoke recipe logs every step
    assert [step for step, _ in curve] == [1, 2, 3, 4] and curve[-1][1] == manifest["metrics"]["final_logged_loss"]
    # The saved template is the marked training template, and it renders like the base model's own one.
    template = (sft_dir / "chat_template.jinja").read_text()
    assert has_generation_markers(template)
    # The resolved recipe is itself a valid recipe that names this run.
    recipe = validate_recipe(sft_dir / "recipe.yaml", sft.make_parser().dataclass_types)
    assert recipe["output_dir"] == str(sft_dir) and recipe["model_name_or_path"] == tiny_model_dir
    # What the hardware chose is the manifest's, not the recipe's: reused on a GPU, the recipe trains on the GPU.
    cpu_run = not torch.accelerator.is_available()
    assert not {"use_cpu", "bf16", "gradient_checkpointing", "dataloader_pin_memory"} & set(recipe)
    chosen = manifest["hardware"]["chosen_by_hardware"]
    assert manifest["hardware"]["device"] == "cpu" and manifest["hardware"]["precision"] in ("fp32", "bf16")
    assert manifest["hardware"]["attention"] == "eager"  # the recipe's ModelConfig keys reach from_pretrained
    assert (chosen["use_cpu"]["value"] is True and "bf16" in chosen["bf16"]["why"]) if cpu_run else chosen == {}
    forward = manifest["forward"]  # which forward trained the adapter, and what its first-batch check found
    assert set(forward) == {"label_only_head", "shared_prompt", "unpadded_mlp", "keep_freed_memory", "fused_lora",
                            "fused_rms_norm", "fused_attention", "bf16_base"}
    assert forward["label_only_head"]["asked"] == "auto" and forward["label_only_head"]["used"] is cpu_run
    if cpu_run:
        assert forward["label_only_head"]["check"].startswith("checked") and not forward["shared_prompt"]["used"]
        # eager attention as one node, compared with the model's own on its first call
        assert forward["fused_attention"]["used"] and forward["fused_attention"]["check"].startswith("LlamaAttention passed")

    dpo_dir = tmp_path / "dpo"
    run_stage(
        dpo, "--config", SMOKE_DPO, "--model_name_or_path", tiny_model_dir, "--dataset_path", str(data_dir),
        "--sft_adapter", str(sft_dir), "--output_dir", str(dpo_dir),
    )
    manifest = json.loads((dpo_dir / "training_manifest.json").read_text())
    assert manifest["stage"] == "dpo" and manifest["sft_adapter"] == str(sft_dir)
    assert manifest["data"]["examples"] == 16  # the same keys as SFT's manifest, plus the stage's own
    sft_manifest = json.loads((sft_dir / "training_manifest.json").read_text())
    assert set(sft_manifest) | {"sft_adapter", "reference_model"} == set(manifest)
    assert manifest["hardware"]["attention"] == "sdpa"  # transformers' default: the smoke recipe names none
    assert not manifest["forward"]["fused_attention"]["used"] and "sdpa" in manifest["forward"]["fused_attention"]["why"]
    if not torch.accelerator.is_available():
        assert manifest["forward"]["shared_prompt"]["used"] and "checked" in manifest["forward"]["shared_prompt"]["check"]
    assert not (dpo_dir / "ref").exists(), "only the trained adapter is saved, not TRL's frozen reference copy"
    sft_weights = load_file(sft_dir / "adapter_model.safetensors")
    dpo_weights = load_file(dpo_dir / "adapter_model.safetensors")
    assert sft_weights.keys() == dpo_weights.keys()
    assert all(not torch.equal(sft_weights[k], dpo_weights[k]) for k in sft_weights), "DPO moved every LoRA tensor"
    assert (dpo_dir / "chat_template.jinja").read_text() == template


def test_saved_recipe_keeps_hardware_values_the_user_set(tmp_path):
    from train.recipe import asked_keys

    recipe = tmp_path / "r.yaml"
    recipe.write_text("use_cpu: true\nlearning_rate: 0.1\n")
    argv = ["--config", str(recipe), "--bf16=false", "--no_gradient_checkpointing", "--output_dir", "x"]
    assert {"use_cpu", "bf16", "gradient_checkpointing", "learning_rate", "output_dir"} <= asked_keys(argv)
    script_args, training_args, _ = parse_recipe(sft.make_parser(), ["--config", SMOKE_SFT, "--use_cpu", "true"])
    if torch.accelerator.is_available():
        assert script_args.hardware_chosen == {}
        return
    assert training_args.use_cpu and training_args.gradient_checkpointing is False
    assert "use_cpu" not in script_args.hardware_chosen  # the user's: saved in the recipe
    assert {"bf16", "gradient_checkpointing"} <= set(script_args.hardware_chosen)  # the hardware's: manifest only


def test_speedup_on_that_cannot_apply_fails_before_training(tiny_model_dir, data_dir, tmp_path):
    from train.speedups import SpeedupError

    with pytest.raises(SpeedupError, match="shared_prompt: on"):
        run_stage(sft, *sft_args(tiny_model_dir, data_dir, tmp_path / "out", "--shared_prompt", "on"))
    assert not (tmp_path / "out").exists()


def test_same_data_gives_same_hash_and_other_data_another(tiny_model_dir, tmp_path):
    from datasets import Dataset

    from train.outputs import dataset_sha256

    rows = sft_rows(6)
    assert dataset_sha256(Dataset.from_list(rows)) == dataset_sha256(Dataset.from_list(rows))
    rows[3]["messages"][1]["content"] += " Changed."
    assert dataset_sha256(Dataset.from_list(rows)) != dataset_sha256(Dataset.from_list(sft_rows(6)))


def test_example_without_trainable_token_is_named_before_the_model_loads(tiny_model_dir, tmp_path):
    rows = sft_rows(4)
    rows[2]["messages"][0]["content"] = "please tell me about the weather " * 40  # fills max_length alone
    data = write_dataset(tmp_path / "data", sft=rows)
    with pytest.raises(ValueError, match=r"1 training example\(s\).*train-0002"):
        # A missing base model would fail differently, so reaching the model load would show.
        run_stage(sft, *sft_args(tiny_model_dir, data, tmp_path / "out", "--max_length", "64", "--padding_free", "false"))
    assert not (tmp_path / "out").exists()


def test_inspect_marks_only_assistant_tokens(tiny_model_dir, data_dir, tmp_path, capsys):
    run_stage(sft, *sft_args(tiny_model_dir, data_dir, tmp_path / "out", "--inspect", "1"))
    out = capsys.readouterr().out
    assert not (tmp_path / "out").exists(), "--inspect must not train"
    lines = [line for line in out.splitlines() if line[:5].strip().isdigit()]
    trained = "".join(eval(line.split(None, 4)[-1]) for line in lines if " * " in line)
    untrained = "".join(eval(line.split(None, 3)[-1]) for line in lines if " * " not in line)
    assert trained == sft_rows(1)[0]["messages"][1]["content"] + "<|im_end|>"
    assert sft_rows(1)[0]["messages"][0]["content"] in untrained and "<|im_start|>assistant" in untrained


def test_adapter_that_did_not_train_fails_loudly(tiny_model_dir, data_dir, tmp_path, no_wandb_env):
    with pytest.raises(RuntimeError, match=r"\d+ of \d+ LoRA modules did not change"):
        run_stage(sft, *sft_args(tiny_model_dir, data_dir, tmp_path / "out", "--learning_rate", "0"))
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ("lerning_rate: 0.001\n", r"unknown key 'lerning_rate'.*did you mean 'learning_rate'"),
        ("learning_rate: fast\n", r"key 'learning_rate' must be float, got 'fast'"),
        ("lora_r: 8.5\n", r"key 'lora_r' must be int, got 8.5"),
        ("save_strategy: sometimes\n", r"key 'save_strategy'.*one of 'no', 'steps', 'epoch'"),
        ("assistant_only_loss: 'yes'\n", r"key 'assistant_only_loss'"),
    ],
)
def test_bad_recipe_names_file_and_key(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(Path(SMOKE_SFT).read_text() + content)
    with pytest.raises(RecipeError, match=message) as err:
        validate_recipe(path, sft.make_parser().dataclass_types)
    assert str(path) in str(err.value)


@pytest.mark.subprocess
def test_bad_recipe_fails_from_the_command_line_before_any_model_loads(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model_name_or_path: /nonexistent/model\nuse_peft: true\nlearning_rte: 0.1\n")
    proc = subprocess.run(
        [PY, "-m", "train.sft", "--config", str(path)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert f"{path}: unknown key 'learning_rte'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.subprocess
def test_wandb_is_offline_by_default_and_the_run_holds_metrics(tiny_model_dir, data_dir, tmp_path):
    from wandb.proto import wandb_internal_pb2

    run_dir = tmp_path / "exp1"
    # No W&B login and no WANDB_MODE: the stage must pick offline by itself and never prompt.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["HOME"] = str(tmp_path)
    proc = subprocess.run(
        [PY, "-m", "train.sft", *sft_args(tiny_model_dir, data_dir, run_dir / "sft", "--report_to", "wandb")],
        cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "one offline run under the experiment folder, no login needed"
    losses, config, group = [], {}, None
    for raw in records(next(runs[0].glob("run-*.wandb"))):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
            if "train/loss" in items:
                losses.append(float(items["train/loss"]))
        elif kind == "run":
            group = record.run.run_group
            config.update({i.key: i.value_json for i in record.run.config.update})
        elif kind == "config":
            config.update({i.key: i.value_json for i in record.config.update})
    assert len(losses) == 4, "one logged loss per step (logging_steps: 1, max_steps: 4)"
    assert group == "exp1"
    assert "ScriptArguments" in config and json.loads(config["learning_rate"]) == 0.001


@pytest.mark.subprocess
def test_killed_run_resumes_from_last_checkpoint(tiny_model_dir, data_dir, tmp_path, no_wandb_env):
    out = tmp_path / "killed"
    args = sft_args(tiny_model_dir, data_dir, out, "--max_steps", "30", "--save_steps", "5", "--logging_steps", "5")
    proc = subprocess.Popen([PY, "-m", "train.sft", *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_for(lambda: (out / "checkpoint-5" / "trainer_state.json").exists(), 120), "no checkpoint"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "training_manifest.json").exists(), "the run was killed before it finished"
    from train.outputs import last_complete_checkpoint

    checkpoint = last_complete_checkpoint(out)
    step = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]
    assert 5 <= step < 30 and (Path(checkpoint) / "optimizer.pt").is_file()
    assert (Path(checkpoint) / "scheduler.pt").is_file() and (Path(checkpoint) / "rng_state.pth").is_file()

    run_stage(sft, *args)  # same command again: picks up the checkpoint by itself
    manifest = json.loads((out / "training_manifest.json").read_text())
    assert manifest["resumed_from"] == checkpoint and manifest["resumed_at_step"] == step
    assert manifest["metrics"]["global_step"] == 30

    # Optimizer, scheduler and data order were restored: same adapter as a run never interrupted.
    straight = tmp_path / "straight"
    run_stage(sft, *sft_args(tiny_model_dir, data_dir, straight, "--max_steps", "30", "--save_steps", "1000"))
    resumed_w, straight_w = load_file(out / "adapter_model.safetensors"), load_file(straight / "adapter_model.safetensors")
    for key in straight_w:
        torch.testing.assert_close(resumed_w[key], straight_w[key], rtol=1e-4, atol=1e-5)


@pytest.mark.subprocess
def test_two_process_ddp_trains_on_both_ranks_and_saves_one_adapter(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "ddp"
    port = str(29500 + os.getpid() % 400)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [PY, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "recipes/accelerate_configs/ddp.yaml"),
         "--main_process_port", port, "-m", "train.sft", *sft_args(tiny_model_dir, data_dir, out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[rank 0 of 2] trained 4 steps" in proc.stdout and "[rank 1 of 2] trained 4 steps" in proc.stdout
    assert proc.stdout.count("Saved adapter to") == 1
    adapters = [p for p in out.rglob("adapter_model.safetensors") if not p.parent.name.startswith("checkpoint-")]
    assert adapters == [out / "adapter_model.safetensors"]
    assert json.loads((out / "training_manifest.json").read_text())["world_size"] == 2


def test_adapter_check_reads_the_lora_update_not_single_tensors():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from train.outputs import assert_adapter_changed, lora_snapshot

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    params = dict(model.named_parameters())
    b_names = [n for n in params if "lora_B" in n]
    before = lora_snapshot(model)
    with torch.no_grad():  # one step from a fresh adapter: every B moves, A gets no gradient yet
        for n in b_names:
            params[n].add_(0.01)
    assert assert_adapter_changed(before, model)["unchanged_tensors"] == len(b_names)

    before = lora_snapshot(model)
    with torch.no_grad():  # B frozen at zero while A moves: the update B @ A is still zero
        for n in b_names[1:]:
            params[n].add_(0.01)
        params[b_names[0]].zero_()
        params[b_names[0].replace("lora_B", "lora_A")].add_(0.01)
    before[b_names[0]] = params[b_names[0]].detach().clone()
    with pytest.raises(RuntimeError, match=r"1 of 2 LoRA modules did not change"):
        assert_adapter_changed(before, model)


def test_trl_dataset_keys_and_an_eval_split_during_training(tiny_model_dir, data_dir, tmp_path, no_wandb_env):
    # TRL's `dataset_name` names the data_gen folder; with eval_strategy set, DPO logs held-out reward accuracies.
    common = ("--model_name_or_path", tiny_model_dir, "--dataset_name", str(data_dir),
              "--eval_strategy", "steps", "--eval_steps", "2")
    run_stage(sft, "--config", SMOKE_SFT, *common, "--output_dir", str(tmp_path / "sft"))
    run_stage(dpo, "--config", SMOKE_DPO, *common, "--sft_adapter", str(tmp_path / "sft"),
              "--output_dir", str(tmp_path / "dpo"))
    sft_eval = json.loads((tmp_path / "sft" / "training_manifest.json").read_text())["metrics"]["last_eval"]
    dpo_manifest = json.loads((tmp_path / "dpo" / "training_manifest.json").read_text())
    assert sft_eval["eval_loss"] > 0
    assert 0 <= dpo_manifest["metrics"]["last_eval"]["eval_rewards/accuracies"] <= 1
    assert dpo_manifest["data"]["path"] == str(data_dir) and dpo_manifest["data"]["config"] == "dpo"
