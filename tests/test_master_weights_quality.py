"""``benchmarks/master_weights_quality.py``: its verdicts on synthetic seeds, and (slow) the whole
study through the runner on test-sized tasks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from adabelief.experiments.tasks import TASKS, PlanOptions

REFERENCE_VALUES = [90.0, 91.0, 92.5, 89.0, 93.0]


def _values(module: ModuleType, offsets: dict[str, list[float]]) -> dict[str, object]:
    return {
        name: module.Values(
            final_val=[
                v + d for v, d in zip(REFERENCE_VALUES, offsets.get(name, [0.0] * 5), strict=True)
            ],
            test_at_best=list(REFERENCE_VALUES),
            diverged=[False] * 5,
        )
        for name in module.CONFIGURATIONS
    }


def test_the_table_says_which_configuration_is_within_seed_noise(
    load_benchmark: Callable[[str], ModuleType],
) -> None:
    quality = load_benchmark("master_weights_quality")
    experiment = TASKS["classify"].experiments(PlanOptions(tiny=True))[0]
    values = _values(
        quality,
        {
            quality.ROUND: [-3.0, -2.5, -3.2, -2.8, -3.1],
            "adabelief_bf16w_residual_int8": [0.2, -0.3, 0.1, -0.1, 0.0],
            "adabelief_bf16w_residual_int4": [1.0, 1.1, 0.9, 1.2, 1.0],
        },
    )
    round_comparison = quality.compare(experiment, values, quality.ROUND)
    assert round_comparison.verdict == "worse" and quality._stalls(round_comparison)
    result = quality.TaskResult(
        "classify", experiment, 0.1, [(1.0, round_comparison)], values, True
    )
    rows = {line.split(" | ")[0][2:]: line for line in quality.table(result).splitlines()}
    assert rows[quality.ROUND].endswith("| worse |")
    assert rows["adabelief_bf16w_residual_int8"].endswith("| within seed noise |")
    assert rows["adabelief_bf16w_residual_int4"].endswith("| better |")
    assert "| reference |" in rows[quality.REFERENCE]
    assert "x1: round -2.92" in quality.table(result)


def test_command_line_overrides(load_benchmark: Callable[[str], ModuleType]) -> None:
    quality = load_benchmark("master_weights_quality")
    args = quality.parse_args(
        ["--set", "lm:max_chars=5000", "--set", "classify:milestones=[8]", "--lr-scale", "lm=0.1"]
    )
    assert args.settings == {"lm": {"max_chars": 5000}, "classify": {"milestones": [8]}}
    assert args.lr_scale == {"lm": 0.1} and args.lr_scales == [1.0, 0.1, 0.01]
    with pytest.raises(SystemExit, match="TASK:KEY=VALUE"):
        quality.parse_args(["--set", "epochs=3"])


@pytest.mark.slow
def test_the_study_runs_through_the_runner(
    tmp_path: Path,
    load_benchmark: Callable[[str], ModuleType],
    capsys: pytest.CaptureFixture[str],
) -> None:
    quality = load_benchmark("master_weights_quality")
    argv = [
        "--tiny",
        "--tasks",
        "classify",
        "--seeds",
        "2",
        "--search-seeds",
        "2",
        "--lr-scales",
        "1,0.1",
        "--set",
        "classify:epochs=1",
        "--set",
        "classify:milestones=[]",
        "--out",
        str(tmp_path / "study"),
    ]
    assert quality.main(argv) == 0
    out = capsys.readouterr().out
    assert "### classify: digits-cnn on digits" in out and "(2 seeds)" in out
    for name in quality.CONFIGURATIONS:
        assert f"| {name} |" in out
    assert "Learning-rate scales tried (round against fp32 master): x1: round" in out
    assert '"epochs": 1' in out
    runs = sorted((tmp_path / "study" / "runs").glob("*.json"))
    # two seeds of each configuration at the last scale, and the search's at the first
    assert len(runs) in (5 * 2, 5 * 2 + 2 * 2)
    assert quality.main(argv) == 0  # everything reused: the same table
    assert capsys.readouterr().out.split("\nclassify: ")[0] == out.split("\nclassify: ")[0]
