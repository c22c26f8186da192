"""Scale-out configs launched for real on this CPU machine: two "machines" on 127.0.0.1, and FSDP asked for
where accelerate cannot set it up."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from train_fixtures import write_dataset

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes/accelerate_configs"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
pytestmark = pytest.mark.subprocess


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _sft(model, data, out):
    return ["-m", "train.sft", "--config", str(REPO / "recipes/smoke/sft.yaml"), "--model_name_or_path", model,
            "--dataset_path", str(data), "--output_dir", str(out)]


def test_multi_node_config_trains_as_two_machines_over_gloo(tiny_model_dir, tmp_path):
    data, out, port = write_dataset(tmp_path / "data", n_train=16), tmp_path / "sft", _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    machines = [
        subprocess.Popen(
            [*LAUNCH, "--config_file", str(CONFIGS / "multi_node.yaml"), "--num_machines", "2",
             "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
             "--main_process_port", port, *_sft(tiny_model_dir, data, out)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    results = [m.communicate(timeout=300) for m in machines]
    for m, (_, err) in zip(machines, results):
        assert m.returncode == 0, err[-3000:]
    stdout = results[0][0] + results[1][0]
    assert "[rank 0 of 2] trained 4 steps (MULTI_CPU" in stdout and "[rank 1 of 2] trained 4 steps (MULTI_CPU" in stdout
    manifest = json.loads((out / "training_manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["parallelism"] == {
        "strategy": "MULTI_CPU", "model_wrapper": "DistributedDataParallel"}


def test_fsdp_config_without_gpus_is_refused_not_run_as_ddp(tiny_model_dir, tmp_path):
    data, out = write_dataset(tmp_path / "data", n_train=16), tmp_path / "sft"
    proc = subprocess.run(
        [*LAUNCH, "--config_file", str(CONFIGS / "fsdp.yaml"), "--num_processes", "2",
         "--main_process_port", _free_port(), *_sft(tiny_model_dir, data, out)],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert "asks for FSDP, but accelerate set up MULTI_CPU" in proc.stderr
    assert not (out / "adapter_model.safetensors").exists()
