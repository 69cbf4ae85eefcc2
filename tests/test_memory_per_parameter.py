"""``benchmarks/memory_per_parameter.py``: its byte accounting in-process, and the whole script
on a tiny model in its subprocesses (slow)."""

from __future__ import annotations

import argparse

import pytest


@pytest.fixture
def bench(load_benchmark):
    return load_benchmark("memory_per_parameter")


_TINY = argparse.Namespace(width=300, depth=2, batch=4)


@pytest.mark.parametrize(
    ("name", "weights", "grads", "state"),
    [
        ("adam", 4, 4, (8.0, 8.01)),
        ("fp32", 4, 4, (8.0, 8.01)),
        ("int8-sib", 4, 0, (2.0, 2.1)),  # codes, one float32 scale per 256-element block
        ("bf16-round-int8-sib", 2, 0, (2.0, 2.1)),
        ("bf16-residual-int8-sib", 2, 0, (3.0, 3.1)),  # + the int8 residual
        ("bf16-fp32master-int8-sib", 2, 0, (6.0, 6.1)),  # + the float32 master
        ("bf16-stochastic-int8-sib", 2, 0, (2.0, 2.1)),
        ("int4-sib", 4, 0, (1.0, 1.1)),  # two codes a byte, one scale per 128-element block
        ("bf16-residual-int4-sib", 2, 0, (2.0, 2.1)),  # + the int8 residual
    ],
)
def test_persistent_bytes_per_parameter(bench, name, weights, grads, state):
    loop = bench.Loop(bench.CONFIGS[name], _TINY)
    for _ in range(2):
        loop.iteration()
    held = {key: value / loop.numel for key, value in loop.persistent_bytes().items()}
    assert held["weights"] == weights and held["grads"] == grads
    assert state[0] <= held["state"] <= state[1], held


def test_the_table_names_every_configuration_and_its_total(bench):
    memory = {"numel": 10, "bytes": {"weights": 40, "grads": 0, "state": 21}}
    memory["peak_above_start_mib"] = 1.0
    rows = bench.table({"int8-sib": {"memory": memory, "time": {"ratio": 0.5}}})
    assert rows[2].startswith("| int8-sib: AdaBelief, fp32 model, int8 state")
    assert "| **6.10** |" in rows[2] and rows[2].endswith("| 0.50x |")


@pytest.mark.slow
def test_the_script_measures_each_configuration_in_its_own_process(bench, capsys, tmp_path):
    argv = ["--width", "64", "--depth", "2", "--time-pairs", "2", "--memory-iters", "1"]
    results = bench.main([*argv, "--configs", "adam", "int8-sib", "--json", str(tmp_path / "r")])
    assert set(results) == {"adam", "int8-sib"} and "time" not in results["adam"]
    assert results["int8-sib"]["time"]["ratio"] > 0
    out = capsys.readouterr().out
    assert "| **16.00** |" in out and "| adam: torch Adam (fused)" in out
