"""``benchmarks/step_per_parameter.py``: every row steps its format on its path, on a tiny
tensor."""

from __future__ import annotations

import pytest

from adabelief.kernels import cpu, tensor_math


@pytest.mark.skipif(cpu.kernel() is None, reason="the fused CPU kernel cannot be built here")
def test_each_row_steps_its_format_on_its_path(load_benchmark, capsys, monkeypatch):
    bench = load_benchmark("step_per_parameter")
    eager_steps = []
    step = tensor_math.tensor_step

    def counted(*args, **kwargs):
        eager_steps.append(1)
        return step(*args, **kwargs)

    monkeypatch.setattr(tensor_math, "tensor_step", counted)
    argv = ["--numel", "8192", "--rows", "64", "--rounds", "2", "--steps", "1", "--eager-int4"]
    rows = bench.main(argv)
    assert len(rows) == 2 * 4 + 2 and all(len(row.seconds) == 2 for row in rows)
    # Only the two eager int4 rows take the tensor step: 2 warm-up and 2 timed steps each.
    assert len(eager_steps) == 2 * 4
    out = capsys.readouterr().out
    assert "| float32, int4 (fused kernel) |" in out
    assert "| bf16-residual, int4 (eager tensor step) |" in out
