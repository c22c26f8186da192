"""scripts/bench_gpu.py, the GPU MFU benchmark, rehearsed on the CPU (tiny random model, fp32) so the script a GPU
session runs in one call keeps working: every setting trains through TRL, packing fills rows, missing kernels are
skipped by name, and the MFU arithmetic follows its definition."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_gpu


def test_rehearsal_trains_each_setting_and_reports_mfu(capsys, monkeypatch):
    installed = bench_gpu.importlib.util.find_spec
    monkeypatch.setattr(bench_gpu.importlib.util, "find_spec",
                        lambda name: None if name in ("liger_kernel", "flash_attn") else installed(name))
    bench_gpu.main(["--rehearsal", "--settings", "plain TRL,+ packing,+ packing + flash-attn + Liger", "--steps", "4",
                    "--batch-size", "8", "--max-length", "1024"])
    out = capsys.readouterr().out
    assert "+ packing + flash-attn + Liger: skipped (flash_attn, liger_kernel not installed)" in out
    runs = {r["setting"]: r for r in (json.loads(line.split(": ", 1)[1]) for line in out.splitlines()
                                      if line.startswith("  ") and ": {" in line)}
    assert set(runs) == {"plain TRL", "+ packing"}
    plain, packed = runs["plain TRL"], runs["+ packing"]
    assert plain["gradient_checkpointing"] and not packed["gradient_checkpointing"]
    # packed rows hold the conversations of a padded batch: fewer rows, about the same tokens a step
    assert plain["rows"] == 8 and packed["rows"] < 8
    assert 0.7 < packed["tokens_per_step"] / plain["tokens_per_step"] < 1.4
    # N: the tiny shape's linear layers (2 x 36,864) and its tied 49,152 x 64 LM head
    assert all(r["linear_params"] == 2 * 36_864 + 49_152 * 64 for r in runs.values())
    table = [line for line in out.splitlines() if line.startswith("| plain TRL") or line.startswith("| + packing")]
    assert len(table) == 2 and "1.00x" in table[0] and all(" ... " in row for row in table)  # the losses logged


def test_bench_needs_a_gpu_or_rehearsal(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--rehearsal"):
        bench_gpu.main([])
