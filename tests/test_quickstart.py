"""The README's main command, end to end, on the tiny random model (`scripts/quickstart.sh --smoke`)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.subprocess


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    # Run a copy of the scripts and recipes so outputs land in a temporary runs/ folder.
    work = tmp_path_factory.mktemp("quickstart")
    for name in ("scripts", "recipes"):
        shutil.copytree(REPO / name, work / name)
    shutil.copy(REPO / "pyproject.toml", work / "pyproject.toml")
    env = dict(os.environ, PERSONA_VENV=sys.prefix, PERSONA_SKIP_INSTALL="1", WANDB_MODE="offline",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(["bash", "scripts/quickstart.sh", "--smoke"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=900)
    return work, proc


def test_smoke_pipeline_runs_every_stage(smoke_run):
    work, proc = smoke_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for stage in ("1/4 data", "2/4 SFT", "3/4 DPO", "4/4 eval"):
        assert f"{stage} done" in proc.stdout
    assert "runs/smoke/report.md" in proc.stdout


def test_smoke_pipeline_writes_data_adapters_and_report(smoke_run):
    work, proc = smoke_run
    run = work / "runs" / "smoke"
    assert (run / "data" / "dpo" / "dataset_dict.json").exists()
    for stage in ("sft", "dpo"):
        assert (run / stage / "adapter_model.safetensors").exists()
        assert (run / stage / "adapter_config.json").exists()
    report = json.loads((run / "report.json").read_text())
    assert report["tiny_model"] is True  # the report must flag that its numbers mean nothing about traits
    assert set(report["adapters"]) == {"sft", "dpo"}
    for key in ("preference", "framing_gap", "cross_trait", "forgetting", "model_index_results"):
        assert report[key], key
    assert (run / "report.md").read_text().strip()
    assert list((run / "plots").glob("*.png"))


def test_smoke_pipeline_trains_with_mimalloc_where_installed(smoke_run):
    from train.hardware import mimalloc_library

    work, proc = smoke_run
    expected = "mimalloc" if mimalloc_library() else "the C library's malloc"
    for stage in ("sft", "dpo"):
        manifest = json.loads((work / "runs" / "smoke" / stage / "training_manifest.json").read_text())
        assert manifest["hardware"]["allocator"] == expected, stage
        if mimalloc_library():  # glibc's settings would do nothing under it, and the manifest says so
            assert not manifest["forward"]["keep_freed_memory"]["used"]
            assert "mimalloc is preloaded" in manifest["forward"]["keep_freed_memory"]["why"]
