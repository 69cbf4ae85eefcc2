"""The one-call GPU check (``benchmarks/gpu_check.py``): its no-CUDA answer, and its measurement
code run on the CPU so that it works the first time a GPU is lent."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture
def gpu_check(load_benchmark):
    return load_benchmark("gpu_check")


def test_without_cuda_one_line_and_status_0(gpu_check, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr()
    assert out.out.strip().splitlines() == [out.out.strip()]
    assert "no CUDA device" in out.out
    assert not (tmp_path / "out").exists()


def test_layout_sums_to_the_size(gpu_check):
    for numel in (100_000, 10_000_000, 1_000_000_000):
        shapes = gpu_check.layout(numel)
        assert sum(torch.Size(s).numel() for s in shapes) == numel


@pytest.mark.slow
def test_cpu_dry_run_writes_json_and_table(gpu_check, tmp_path, capsys):
    out = tmp_path / "check"
    argv = ["--device", "cpu", "--sizes", "100K", "--no-tests", "--steps", "2", "--warmup", "0"]
    assert gpu_check.main([*argv, "--out", str(out)]) == 0
    result = json.loads((out / "gpu_check.json").read_text())
    assert len(result["agreement"]) == 9 and all(a["ok"] for a in result["agreement"])
    keys = {row["key"] for row in result["speed"]}
    assert {"adam-fused", "copy", "ours-fused-int8", "ours-single-bf16"} <= keys
    assert all("median_ms" in row for row in result["speed"])
    fused_adam = next(r for r in result["speed"] if r["key"] == "adam-fused")
    assert fused_adam["vs_adam_fused"] == 1.0
    table = (out / "gpu_check.md").read_text()
    assert "| ours: fused, int8 state |" in table
    assert "9 of 9 path/format pairs" in table

    # A path that disagrees with the reference fails the check (status 1) and is named.
    gpu_check.TOLERANCE["fp32"] = 0.0
    capsys.readouterr()
    assert gpu_check.main([*argv, "--sizes", "100K", "--out", str(tmp_path / "bad")]) == 1
    assert "**fused/fp32:" in (tmp_path / "bad" / "gpu_check.md").read_text()
    assert "gpu_check: FAILED" in capsys.readouterr().out


def test_budget_spent_lists_what_was_skipped(gpu_check, tmp_path):
    argv = ["--device", "cpu", "--sizes", "100K", "--no-tests", "--budget-s", "0"]
    assert gpu_check.main([*argv, "--out", str(tmp_path)]) == 1  # nothing was checked
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["speed"] == [] and result["agreement"] == []
    assert any("agreement single/fp32: out of time budget" in s for s in result["skipped"])
    assert any("100K adam-fused: out of time budget" in s for s in result["skipped"])
