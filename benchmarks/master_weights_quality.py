"""Training quality of bfloat16 weights with AdaBelief's master-weight modes (issue 23).

For each task (classify on digits, lm, transformer at their ``--quick`` presets) the script first
finds a learning rate where plain bfloat16 rounding measurably stalls: it lowers the preset
learning rate by the factors of ``--lr-scales`` in turn, running ``adabelief_bf16w_fp32master``
and ``adabelief_bf16w_round`` over the seeds, until round's final validation metric is worse
than the float32 master's in a paired t-test (p < 0.05).  At that scale it runs every
configuration of :data:`CONFIGURATIONS` and prints, per configuration, the final validation
metric and the test metric at the best validation evaluation over the seeds, and the paired
difference against ``adabelief_bf16w_fp32master``: mean, 95% confidence interval, and whether
the configuration is within seed noise of it (the interval holds 0).

Everything trains through the runner (:func:`adabelief.experiments.runner.run_experiments`):
the runs are stored under ``--out`` and a second invocation reuses them, so the search's runs
count for the study.  ``--set TASK:KEY=VALUE`` shortens a task's budget (any setting of its
preset); the table names every override.

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/master_weights_quality.py \\
        --set transformer:steps=400
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adabelief.experiments.runner import (
    RunOptions,
    plan,
    resolve_data,
    resolve_tasks,
    run_experiments,
)
from adabelief.experiments.spec import Experiment
from adabelief.experiments.stats import PairedComparison, paired_comparison, summarize
from adabelief.experiments.store import RunStore

#: The reference every configuration is compared with: a bfloat16 model with float32 masters.
REFERENCE = "adabelief_bf16w_fp32master"
#: Plain rounding into the bfloat16 weight: the configuration that stalls at small updates.
ROUND = "adabelief_bf16w_round"
#: What the study compares, in table order: the float32 model, then the bfloat16 ones.
CONFIGURATIONS: tuple[str, ...] = (
    "adabelief",
    REFERENCE,
    ROUND,
    "adabelief_bf16w_residual_int8",
    "adabelief_bf16w_residual_int4",
)
DEFAULT_TASKS = ("classify", "lm", "transformer")
DEFAULT_LR_SCALES = (1.0, 0.1, 0.01)


@dataclass
class Values:
    """One configuration's per-seed figures (``None`` where the run diverged)."""

    final_val: list[float | None] = field(default_factory=list)
    test_at_best: list[float | None] = field(default_factory=list)
    diverged: list[bool] = field(default_factory=list)


@dataclass
class TaskResult:
    """The study of one task: the scale used, what the search tried, each configuration's
    values."""

    task: str
    experiment: Experiment
    lr_scale: float
    tried: list[tuple[float, PairedComparison]]
    values: dict[str, Values]
    stalled: bool


def _final(curve: Sequence[float | None]) -> float | None:
    finite = [v for v in curve if v is not None and math.isfinite(v)]
    return finite[-1] if finite else None


def _options(
    args: argparse.Namespace, task: str, optimizers: Sequence[str], scale: float, seeds: int
) -> RunOptions:
    return RunOptions(
        tasks=(task,),
        out=args.out,
        quick=True,
        seeds=seeds,
        optimizers=tuple(optimizers),
        jobs=args.jobs,
        threads=1,
        progress=False,
        tiny=args.tiny,
        make_plots=False,
        settings=args.settings.get(task, {}),
        lr_scale=scale,
    )


def run_configurations(
    args: argparse.Namespace, task: str, optimizers: Sequence[str], scale: float, seeds: int
) -> tuple[Experiment, dict[str, Values]]:
    """Train (or reuse) ``optimizers`` on ``task``'s one experiment at ``scale`` times the preset
    learning rate over seeds ``0 .. seeds - 1``; return the experiment and each optimizer's
    values per seed."""
    options = _options(args, task, optimizers, scale, seeds)
    summary, _ = run_experiments(options, command=" ".join(sys.argv))
    if summary.failed or summary.status != "finished":
        reasons = "; ".join(summary.failed.values()) or summary.status
        raise RuntimeError(f"{task} at lr x{scale:g}: {reasons}")
    tasks = resolve_tasks(options.tasks)
    (item,) = plan(options, tasks, resolve_data(tasks, None))
    store = RunStore(options.out)
    target, score = item.experiment.target, item.experiment.score
    assert target is not None
    values = {name: Values() for name in optimizers}
    for spec in item.specs:
        record = store.load(spec.key())
        assert record is not None, spec.key()
        row = values[spec.optimizer]
        diverged = bool(record["diverged"])
        row.diverged.append(diverged)
        row.final_val.append(None if diverged else _final(record["curves"].get(target.name, [])))
        row.test_at_best.append(None if diverged else record["metrics"].get(score.name))
    return item.experiment, values


def compare(experiment: Experiment, values: dict[str, Values], name: str) -> PairedComparison:
    """``name`` against :data:`REFERENCE` on the final validation metric."""
    target = experiment.target
    assert target is not None
    a, b = values[name], values[REFERENCE]
    return paired_comparison(
        a.final_val, b.final_val, target.higher_is_better, a.diverged, b.diverged
    )


def _stalls(comparison: PairedComparison) -> bool:
    return comparison.verdict.startswith("worse")


def study(args: argparse.Namespace, task: str) -> TaskResult:
    """Search the learning-rate scale for ``task``, then run every configuration there."""
    tried: list[tuple[float, PairedComparison]] = []
    scales = [args.lr_scale[task]] if task in args.lr_scale else list(args.lr_scales)
    for scale in scales:
        experiment, values = run_configurations(
            args, task, (REFERENCE, ROUND), scale, args.search_seeds
        )
        comparison = compare(experiment, values, ROUND)
        tried.append((scale, comparison))
        print(f"{task}: lr x{scale:g}: round against fp32 master: {_describe(comparison)}")
        if _stalls(comparison):
            break
    scale = tried[-1][0]
    experiment, values = run_configurations(args, task, CONFIGURATIONS, scale, args.seeds)
    stalled = _stalls(compare(experiment, values, ROUND))
    return TaskResult(task, experiment, scale, tried, values, stalled)


def _describe(comparison: PairedComparison) -> str:
    interval = (
        f"[{comparison.interval[0]:+.3g}, {comparison.interval[1]:+.3g}]"
        if comparison.interval
        else "n/a"
    )
    return (
        f"advantage {comparison.advantage:+.3g}, 95% CI {interval}, p={comparison.p_value:.3g} "
        f"({comparison.verdict})"
    )


def _mean_std(values: Sequence[float | None]) -> str:
    summary = summarize(values)
    if summary.n == 0:
        return "diverged"
    std = "" if math.isnan(summary.std) else f" ± {summary.std:.3g}"
    return f"{summary.mean:.4g}{std}"


def _noise_word(comparison: PairedComparison) -> str:
    if comparison.n < 2 or comparison.interval is None:
        return "too few seeds" if comparison.n < 2 else comparison.verdict
    low, high = comparison.interval
    if low <= 0.0 <= high:
        return "within seed noise"
    return "better" if low > 0 else "worse"


def table(result: TaskResult) -> str:
    """Markdown table of one task's study."""
    experiment = result.experiment
    target, score = experiment.target, experiment.score
    assert target is not None
    reference = summarize(result.values[REFERENCE].final_val)
    lines = [
        f"### {result.task}: {experiment.title}, lr x{result.lr_scale:g} of the preset "
        f"({len(result.values[REFERENCE].final_val)} seeds)",
        "",
        f"Final {target.label} and {score.label} (mean ± std over seeds); "
        f"difference in the final validation metric against {REFERENCE}, paired by seed "
        f"(positive: better); seed-to-seed spread of {REFERENCE}: std {reference.std:.3g}.",
        "",
        "| configuration | final validation | test at best validation | paired difference "
        "(95% CI) | verdict |",
        "|---|---|---|---|---|",
    ]
    for name in CONFIGURATIONS:
        row = result.values[name]
        if name == REFERENCE:
            difference, verdict = "reference", ""
        else:
            comparison = compare(experiment, result.values, name)
            interval = (
                f" ({comparison.interval[0]:+.3g}, {comparison.interval[1]:+.3g})"
                if comparison.interval
                else ""
            )
            difference = f"{comparison.advantage:+.3g}{interval}"
            verdict = _noise_word(comparison)
        lines.append(
            f"| {name} | {_mean_std(row.final_val)} | {_mean_std(row.test_at_best)} | "
            f"{difference} | {verdict} |"
        )
    tried = ", ".join(
        f"x{scale:g}: round {comparison.advantage:+.3g} (p={comparison.p_value:.2g})"
        for scale, comparison in result.tried
    )
    lines += ["", f"Learning-rate scales tried (round against fp32 master): {tried}."]
    if not result.stalled:
        lines.append("Round did not fall measurably behind at any scale tried.")
    overrides = experiment.settings
    lines.append(f"Settings: {json.dumps(overrides, sort_keys=True)}.")
    return "\n".join(lines)


def _parse_set(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    settings: dict[str, dict[str, Any]] = {}
    for item in items:
        task, _, assignment = item.partition(":")
        key, equals, value = assignment.partition("=")
        if not (task and key and equals):
            raise SystemExit(f"--set {item!r}: expected TASK:KEY=VALUE")
        settings.setdefault(task, {})[key] = json.loads(value)
    return settings


def _parse_scale(items: Sequence[str]) -> dict[str, float]:
    scales = {}
    for item in items:
        task, equals, value = item.partition("=")
        if not (task and equals):
            raise SystemExit(f"--lr-scale {item!r}: expected TASK=FACTOR")
        scales[task] = float(value)
    return scales


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated tasks")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--search-seeds",
        type=int,
        default=3,
        help="seeds of the learning-rate search (the first of --seeds: the study reuses them)",
    )
    parser.add_argument(
        "--lr-scales",
        default=",".join(f"{s:g}" for s in DEFAULT_LR_SCALES),
        help="factors of the preset learning rate tried in order until round stalls",
    )
    parser.add_argument(
        "--lr-scale",
        action="append",
        default=[],
        metavar="TASK=FACTOR",
        help="use this factor for TASK, no search",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="TASK:KEY=VALUE",
        help="override a setting of TASK's quick preset (VALUE in JSON), e.g. to shorten it",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/master-weights-quality"))
    parser.add_argument("--jobs", type=int, default=1, help="parallel runs (default 1)")
    parser.add_argument("--tiny", action="store_true", help="test-sized tasks (plumbing checks)")
    args = parser.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.lr_scales = [float(s) for s in args.lr_scales.split(",") if s]
    args.lr_scale = _parse_scale(args.lr_scale)
    args.settings = _parse_set(args.set)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the study and print one table per task."""
    args = parse_args(argv)
    started = time.perf_counter()
    for task in args.tasks:
        task_started = time.perf_counter()
        result = study(args, task)
        print(f"\n{table(result)}\n\n{task}: {time.perf_counter() - task_started:.0f} s\n")
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
