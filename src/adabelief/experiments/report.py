"""Turn a run folder into ``results.json``, ``summary.csv``, plots and ``report.md``.

The report covers every valid run file on disk (see :mod:`adabelief.experiments.analysis` for
how runs are grouped and selected) and says which runs it shows and which files it could not
read.  Verdicts come from :mod:`adabelief.experiments.verdicts`; this module only renders them.
Every sentence about a claim is computed from paired comparisons over seeds; nothing is
hard-coded, and the comparisons AdaBelief loses are listed as prominently as the ones it wins.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import math
import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adabelief.experiments.analysis import (
    REFERENCE,
    TAU_MAX,
    Analysis,
    ExperimentResult,
    Profile,
    analyze,
    performance_profiles,
)
from adabelief.experiments.paper_results import PaperComparison
from adabelief.experiments.plots import plot_curves, plot_profile, plot_stem
from adabelief.experiments.search import TUNING_SEED
from adabelief.experiments.stats import ALPHA, PairedComparison, summarize
from adabelief.experiments.store import RunStore
from adabelief.experiments.verdicts import (
    ClaimAssessment,
    Evidence,
    PaperTable,
    assess_claims,
    comparisons_available,
    losses,
    metric_named,
    paper_table,
)

__all__ = ["ClaimVerdict", "Report", "ReportError", "build_report"]

_HPARAM_NAMES = ("lr", "eps", "weight_decay", "betas", "momentum")


class ReportError(RuntimeError):
    """The folder cannot be reported on (it is not a run folder)."""


@dataclass(frozen=True)
class ClaimVerdict:
    """One row of the report's verdict table."""

    claim: str
    verdict: str
    evidence: str


@dataclass(frozen=True)
class Report:
    """The written report and its verdicts."""

    path: Path
    verdicts: tuple[ClaimVerdict, ...]
    runs: int
    missing: int
    bad_files: int = 0


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.2e}"
    return f"{value:.{digits}g}"


def _fmt_p(p: float) -> str:
    return "-" if not math.isfinite(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")


def _mean_std(result: ExperimentResult, optimizer: str, metric: str) -> str:
    summary = result.summary(optimizer, metric)
    if summary.n == 0:
        return "-"
    if summary.n == 1 or not math.isfinite(summary.std):
        return _fmt(summary.mean)
    return f"{_fmt(summary.mean)} ± {_fmt(summary.std, 2)}"


def _hparams(hparams: dict[str, Any]) -> str:
    parts = []
    for name in _HPARAM_NAMES:
        value = hparams.get(name)
        if isinstance(value, list | tuple):
            parts.append(f"{name} ({', '.join(_fmt(float(v)) for v in value)})")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            parts.append(f"{name} {_fmt(float(value))}")
    return ", ".join(parts) or "-"


def _task_for(name: str) -> Any:
    from adabelief.experiments.tasks import TASKS

    return TASKS.get(name)


def _evidence_table(evidence: Iterable[Evidence]) -> list[str]:
    lines = [
        "| experiment | metric | AdaBelief | other | mean diff (AdaBelief - other) "
        "| paired t p | sign test (wins-losses) | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in evidence:
        c = e.comparison
        se = f" ± {_fmt(c.standard_error, 2)}" if math.isfinite(c.standard_error) else ""
        t_p = _fmt_p(c.t_p_value) if c.t_p_value is not None else "undefined"
        lines.append(
            f"| {e.result.name} | {e.metric.label} "
            f"| {_mean_std(e.result, REFERENCE, e.metric.name)} "
            f"| {e.other}: {_mean_std(e.result, e.other, e.metric.name)} "
            f"| {_fmt(c.mean_difference)}{se} | {t_p} "
            f"| {c.wins}-{c.losses} (p {_fmt_p(c.sign_p_value)}) | **{c.verdict}** |"
        )
    return [*lines, ""]


def _short(comparison: PairedComparison) -> str:
    word = {"no significant difference": "n.s.", "too few seeds": "n<2"}.get(
        comparison.verdict, comparison.verdict
    )
    return f"{word} (p {_fmt_p(comparison.p_value)})" if comparison.n > 1 else word


def _matrix(
    results: list[ExperimentResult], claim: str, metric_names: Iterable[str], others: list[str]
) -> list[str]:
    """AdaBelief against every other optimizer, one row per experiment and metric."""
    rows = []
    for result in results:
        if claim not in result.experiment.claims or result.get(REFERENCE) is None:
            continue
        for name in metric_names:
            metric = metric_named(result.experiment, name)
            if metric is None:
                continue
            cells = []
            for other in others:
                comparison = result.compare(metric, other)
                cells.append("-" if comparison is None or comparison.n == 0 else _short(comparison))
            rows.append(f"| {result.name} | {metric.label} | " + " | ".join(cells) + " |")
    if not rows or not others:
        return []
    return [
        "AdaBelief against every optimizer (better / worse: paired t-test p < "
        f"{ALPHA}, or the sign test where the differences do not vary; n.s.: not significant):",
        "",
        "| experiment | metric | " + " | ".join(f"vs {o}" for o in others) + " |",
        "|---|---|" + "---|" * len(others),
        *rows,
        "",
    ]


def _claim_section(
    number: int, assessment: ClaimAssessment, results: list[ExperimentResult], others: list[str]
) -> list[str]:
    lines = [
        f"## Claim {number}: {assessment.statement}",
        "",
        f"Measured by {assessment.rule.measured_by}.",
        "",
    ]
    if not assessment.evidence:
        return [
            *lines,
            "**Verdict: not tested** - no experiment paired AdaBelief with its rivals here.",
            "",
        ]
    lines += [f"**Verdict: {assessment.verdict}** - AdaBelief {assessment.summary}.", ""]
    if assessment.verdict.startswith("not tested"):
        lines += [
            "Every comparison below has a single seed, so no test was possible; run with "
            "`--seeds 3` or more.",
            "",
        ]
    lines += _evidence_table(assessment.evidence)
    lines += _matrix(results, assessment.claim, assessment.rule.metrics, others)
    stability = assessment.stability
    if stability is not None and stability.rows:
        names = [o.optimizer for o in stability.rows[0].result.optimizers]
        lines += [
            "Spread of the score across seeds:",
            "",
            "| experiment | metric | "
            + " | ".join(f"{name} std" for name in names)
            + " | AdaBelief spread rank |",
            "|---|---|" + "---|" * (len(names) + 1),
        ]
        for row in stability.rows:
            rank = f"{row.rank} of {row.ranked}" if row.rank else f"- of {row.ranked}"
            lines.append(
                f"| {row.result.name} | {row.result.experiment.score.label} | "
                + " | ".join(_fmt(row.stds.get(name)) for name in names)
                + f" | {rank} |"
            )
        lines.append("")
    return lines


def _losses_section(results: list[ExperimentResult]) -> list[str]:
    lines = ["## Where AdaBelief loses", ""]
    if not comparisons_available(results):
        return [
            *lines,
            "No experiment has finished runs of AdaBelief and another optimizer on a common "
            "seed, so nothing was compared.",
            "",
        ]
    found = losses(results)
    if not found:
        return [
            *lines,
            "AdaBelief's mean was at least as good as every other optimizer's on every score "
            "and speed metric.",
            "",
        ]
    lines += [
        "Every comparison where another optimizer's mean beat AdaBelief's (significant ones "
        "first):",
        "",
    ]
    for loss in found:
        tag = "significant" if loss.significant else "not significant"
        lines.append(
            f"- {loss.result.name}, {loss.metric.label}: {loss.other} "
            f"{_mean_std(loss.result, loss.other, loss.metric.name)} vs AdaBelief "
            f"{_mean_std(loss.result, REFERENCE, loss.metric.name)} "
            f"(paired p {_fmt_p(loss.comparison.p_value)}, {tag})"
        )
    return [*lines, ""]


_TARGET_RULE = (
    "Rule: an experiment's target is the level of its target curve (validation accuracy or "
    "perplexity, distance to the optimum, sample quality) that every seed of the best "
    "optimizer (best mean score) reached at some evaluation. A run's time to target is the "
    "optimizer steps, and the seconds of training, at its first evaluation that reached the "
    "target; a run that diverged or never reached it counts as infinitely slow. Medians are "
    "over seeds. The performance profile (Dolan & Moré, as in AlgoPerf) of an optimizer is "
    "rho(tau), the fraction of experiments where its median steps are within a factor tau of "
    f"the fastest optimizer's; its area is normalised over tau from 1 to {TAU_MAX:g} (1: the "
    "fastest everywhere, 0: never within 4x). Steps rather than seconds rank the optimizers, "
    "since seconds depend on the machine's load."
)


def _target_section(
    results: list[ExperimentResult], profiles: list[Profile], plots: dict[str, Path], root: Path
) -> list[str]:
    with_target = [r for r in results if r.time_to_target is not None]
    lines = ["## Time to target and performance profile", "", _TARGET_RULE, ""]
    if not with_target:
        return [*lines, "No experiment has a target curve with finished runs.", ""]
    names = list(dict.fromkeys(o for r in with_target for o in r.time_to_target.runs))  # type: ignore[union-attr]
    lines += [
        "| experiment | target | best | "
        + " | ".join(f"{name}: median steps (s), reached" for name in names)
        + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for result in with_target:
        ttt = result.time_to_target
        assert ttt is not None
        cells = []
        for name in names:
            runs = ttt.runs.get(name)
            if runs is None:
                cells.append("-")
                continue
            steps, seconds = runs.median_steps, runs.median_seconds
            text = "not reached" if math.isinf(steps) else _fmt(steps)
            if math.isfinite(steps) and math.isfinite(seconds):
                text += f" ({_fmt(seconds, 3)} s)"
            cells.append(f"{text}, {runs.reached}/{len(runs.steps)}")
        lines.append(
            f"| {result.name} | {ttt.curve.label} "
            f"{'≥' if ttt.curve.higher_is_better else '≤'} {_fmt(ttt.target)} | {ttt.best} | "
            + " | ".join(cells)
            + " |"
        )
    lines.append("")
    for profile in profiles:
        lines += [
            f"Performance profile, {profile.mode} mode, over {len(profile.experiments)} "
            "experiments (area under rho(tau), higher is better):",
            "",
            "| optimizer | area | within 1x (fastest) | within 2x | within 4x |",
            "|---|---|---|---|---|",
        ]
        ranked = sorted(profile.ratios, key=lambda name: -profile.area(name))
        for name in ranked:
            lines.append(
                f"| {name} | {profile.area(name):.3f} | {profile.rho(name, 1.0):.2f} "
                f"| {profile.rho(name, 2.0):.2f} | {profile.rho(name, TAU_MAX):.2f} |"
            )
        lines.append("")
        if profile.mode in plots:
            path = plots[profile.mode]
            lines += [f"![{path.stem}]({path.relative_to(root).as_posix()})", ""]
    return lines


def _trials_lines(result: ExperimentResult) -> list[str]:
    experiment = result.experiment
    lines = [
        f"Fair-mode search: every optimizer got the same {result.trials} trials (points of a "
        "scrambled Halton sequence mapped into its own search space), each run at seed "
        f"{TUNING_SEED} and judged on {experiment.selection.label}; the winner (bold) was "
        "rerun at every seed and is what the table and the comparisons use.",
        "",
    ]
    if experiment.selection.name == experiment.score.name:
        lines += [
            "_This experiment has no held-out data: trials are judged on the reported metric "
            "itself, so here fair mode means best-of-trials for every optimizer._",
            "",
        ]
    for row in result.optimizers:
        space = row.search_space or {}
        dims = space.get("dimensions", [])
        described = "; ".join(
            f"{d['name']} = {d['low']:g} (fixed)"
            if d["low"] == d["high"]
            else f"{d['name']} in [{d['low']:.3g}, {d['high']:.3g}] ({d['rule']})"
            for d in dims
        )
        lines.append(f"- **{row.optimizer}** search space: {described or 'not recorded'}")
        for candidate in sorted(row.trials, key=lambda c: c.trial or 0):
            value = candidate.value(experiment.selection.name, TUNING_SEED)
            record = candidate.records.get(TUNING_SEED)
            outcome = (
                "missing"
                if record is None
                else ("diverged" if record.get("diverged") else _fmt(value))
            )
            text = f"trial {candidate.trial}: {_hparams(candidate.hparams)} → {outcome}"
            lines.append(f"  - **{text} (winner)**" if candidate is row.chosen else f"  - {text}")
        if row.unused:
            lines.append(
                f"  - {row.unused} further configurations on disk are not used (trials beyond "
                "the number every optimizer has, or older versions)"
            )
    return [*lines, ""]


def _paper_value(row: PaperComparison, table: PaperTable) -> str:
    value = table.paper.values.get(row.optimizer)
    if value is None:
        return "-"
    if value.bound == "above":
        return f"above {value.value:g}"
    text = f"about {value.value:g}" if value.approximate else _fmt(value.value)
    return text if value.std is None else f"{text} ± {_fmt(value.std, 2)}"


def _paper_lines(result: ExperimentResult) -> list[str]:
    """The paper's value beside the measured mean ± std per optimizer (see ``paper_table``)."""
    table = paper_table(result)
    if table is None:
        return []
    lines = [
        f"**Beside the paper** ({table.paper.title}):",
        "",
        f"| optimizer | paper: {table.paper.metric} | measured: {table.measured_label} "
        "(mean ± std) | measured - paper | where they differ |",
        "|---|---|---|---|---|",
    ]
    for row in table.rows:
        if row.measured_mean is None:
            measured = "-"
        elif row.measured_std is None:
            measured = _fmt(row.measured_mean)
        else:
            measured = f"{_fmt(row.measured_mean)} ± {_fmt(row.measured_std, 2)}"
        if row.runs:
            measured += f" ({row.runs} run{'s' if row.runs != 1 else ''})"
        difference = "-" if row.difference is None else f"{row.difference:+.2f}"
        lines.append(
            f"| {row.optimizer} | {_paper_value(row, table)} | {measured} | {difference} "
            f"| {row.statement} |"
        )
    return [*lines, "", *(f"- {note}" for note in table.notes), ""]


def _experiment_section(result: ExperimentResult, plots: list[Path], root: Path) -> list[str]:
    experiment = result.experiment
    where = ", ".join(f"{where} ({n})" for where, n in sorted(result.executors.items()))
    missing = f", {result.missing} planned runs missing" if result.missing else ""
    lines = [
        f"### {result.name}: {experiment.title}",
        "",
        f"Preset `{experiment.preset}`, {result.mode} mode, {result.threads} torch "
        f"thread{'s' if result.threads > 1 else ''} on "
        f"{result.device}, seeds {result.seeds}, {result.runs} runs on disk{missing}; ran on: "
        f"{where}.",
        "",
    ]
    fingerprint = experiment.settings.get("data_fingerprint")
    if fingerprint:
        lines += [f"Data fingerprint `{fingerprint}` (SHA-256 of the `--data` files).", ""]
    metrics = experiment.metrics
    header = ["optimizer", "hyperparameters"] + [
        m.label + (" ↑" if m.higher_is_better else " ↓") for m in metrics
    ]
    header.append("diverged")
    paper_column = bool(experiment.paper) and not experiment.paper_key  # runs of older versions
    if paper_column:
        header.append(f"paper: {experiment.score.label}")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result.optimizers:
        chosen = row.chosen
        label = _hparams(chosen.hparams) + ("" if chosen.trial is None else f" ({chosen.label})")
        cells = [row.optimizer, label] + [_mean_std(result, row.optimizer, m.name) for m in metrics]
        cells.append(f"{chosen.diverged}/{len(chosen.records)}")
        if paper_column:
            cells.append(_fmt(experiment.paper.get(row.optimizer)))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    unused = sum(row.unused for row in result.optimizers)
    if result.mode == "paper" and unused:
        lines += [
            f"{unused} further hyperparameter sets of these optimizers are on disk (an older "
            "preset); the table uses the set with the most seeds.",
            "",
        ]
    if result.mode == "fair":
        lines += _trials_lines(result)
    lines += _paper_lines(result)
    if paper_column and result.quick:
        lines += [
            "_Quick mode: far smaller than the paper's setting; the paper column is context, "
            "not a target._",
            "",
        ]
    task = _task_for(experiment.task)
    if task is not None:
        lines += task.report_lines(result)
    for path in plots:
        lines += [f"![{path.stem}]({path.relative_to(root).as_posix()})", ""]
    return lines


def _mode_lines(results: list[ExperimentResult]) -> list[str]:
    """One line per (mode, scale) shown, naming its tasks."""
    groups: dict[tuple[str, bool], dict[str, list[ExperimentResult]]] = {}
    for result in results:
        groups.setdefault((result.mode, result.quick), {}).setdefault(
            result.experiment.task, []
        ).append(result)
    lines = []
    for (mode, quick), tasks in groups.items():
        scale = "quick" if quick else "full"
        listed = ", ".join(
            f"`{task}` ({len(items)} experiment{'s' if len(items) > 1 else ''}, "
            f"{max(len(r.seeds) for r in items)} seeds, "
            f"{'real data' if any(r.experiment.settings.get('data_fingerprint') for r in items) else 'bundled data'})"
            for task, items in tasks.items()
        )
        if mode == "fair":
            trials = sorted({r.trials for r in results if r.mode == "fair"})
            how = (
                f"every optimizer got the same number of quasi-random trials ({', '.join(map(str, trials))}) "
                "from its own search space (learning rate, eps, weight decay and beta1; for SGD "
                "learning rate, momentum and weight decay), each run once and judged on "
                "validation data; the best trial was rerun at every seed and scored on test data"
            )
        else:
            how = (
                "every optimizer used its preset unchanged, untuned for these problems; a preset "
                "that happens to suit one optimizer better can decide a comparison, so check "
                "conclusions with `--mode fair`, which tunes every optimizer the same way"
            )
        lines.append(f"- **{mode} mode**, {scale} scale: {listed}. In this mode {how}.")
    return lines


def _environment(records: list[dict[str, Any]]) -> list[str]:
    if not records:
        return []
    envs = {
        (r.get("environment", {}).get("torch"), r.get("environment", {}).get("device"))
        for r in records
    }
    where: dict[str, int] = {}
    for r in records:
        key = f"{r.get('executor', 'local')} on {r.get('host', 'unknown')}"
        where[key] = where.get(key, 0) + 1
    wall = sum(float(r.get("wall_time_s") or 0) for r in records)
    host = records[0].get("environment", {})
    return [
        f"- runs: {len(records)}, total training time {wall / 60:.1f} min (summed over runs)",
        f"- executors and hosts: {', '.join(f'{k} ({n})' for k, n in sorted(where.items()))}",
        f"- torch / device: {', '.join(f'{t} on {d}' for t, d in sorted(envs, key=str))}",
        f"- python {host.get('python')}, {host.get('platform')}, {host.get('cpus')} CPUs",
    ]


def _write_summary_csv(results: list[ExperimentResult]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
            "task",
            "experiment",
            "study",
            "mode",
            "threads",
            "device",
            "optimizer",
            "trial",
            "lr",
            "selected",
            "metric",
            "higher_is_better",
            "n",
            "mean",
            "std",
            "min",
            "max",
            "diverged",
            "seeds",
        ]
    )
    for result in results:
        for row in result.optimizers:
            for candidate in sorted(row.trials, key=lambda c: c.trial or 0):
                seeds = sorted(candidate.records)
                for metric in result.experiment.metrics:
                    s = summarize([candidate.value(metric.name, seed) for seed in seeds])
                    writer.writerow(
                        [
                            result.experiment.task,
                            result.experiment.name,
                            result.study,
                            result.mode,
                            result.threads,
                            result.device,
                            row.optimizer,
                            "" if candidate.trial is None else candidate.trial,
                            candidate.hparams.get("lr"),
                            int(candidate is row.chosen),
                            metric.name,
                            int(metric.higher_is_better),
                            s.n,
                            *(
                                f"{v:.6g}" if math.isfinite(v) else ""
                                for v in (s.mean, s.std, s.min, s.max)
                            ),
                            candidate.diverged,
                            len(candidate.records),
                        ]
                    )
    return buffer.getvalue()


def _plots(results: list[ExperimentResult], root: Path) -> dict[int, list[Path]]:
    directory = root / "plots"
    plots: dict[int, list[Path]] = {}
    for index, result in enumerate(results):
        written = [plot_curves(result, directory / f"{plot_stem(result)}-curves.png")]
        task = _task_for(result.experiment.task)
        extra = task.plots(result, directory) if task is not None else []
        plots[index] = [p for p in (*written, *extra) if p is not None]
    return plots


def _reference_note(analysis: Analysis) -> list[str]:
    if any(r.get(REFERENCE) for r in analysis.results):
        return []
    requested = any(
        REFERENCE in entry.get("optimizers", [])
        for entry in analysis.manifest.get("tasks", {}).values()
        if isinstance(entry, dict)
    )
    if requested:
        return [
            "**AdaBelief was requested but none of its runs finished (see the failed runs the "
            "`run` command printed), so no claim is assessed.**",
            "",
        ]
    return ["**AdaBelief was not among the optimizers run, so no claim is assessed.**", ""]


def build_report(root: Path, make_plots: bool = True) -> Report:
    """Rebuild ``results.json``, ``summary.csv``, the plots and ``report.md`` in ``root``.

    Raises :class:`ReportError` when ``root`` holds no runs and no manifest.
    """
    store = RunStore(root)
    analysis = analyze(store)
    if not analysis.records and not analysis.manifest["tasks"] and not analysis.bad_files:
        raise ReportError(f"{root} is not an adabelief run folder (no runs/ and no manifest.json)")
    results = analysis.results
    with store.lock("report"):
        store.write_json("results.json", analysis.records)
        store.write_text("summary.csv", _write_summary_csv(results))
        profiles = performance_profiles(results)
        plots = _plots(results, root) if make_plots else {}
        profile_plots: dict[str, Path] = {}
        if make_plots:
            for profile in profiles:
                path = plot_profile(profile, root / "plots" / f"profile-{profile.mode}.png")
                if path is not None:
                    profile_plots[profile.mode] = path
        assessments = assess_claims(results)
        others = [
            o
            for o in dict.fromkeys(r.optimizer for res in results for r in res.optimizers)
            if o != REFERENCE
        ]
        text = _render(analysis, assessments, others, profiles, plots, profile_plots, root)
        path = store.write_text("report.md", text)
    verdicts = tuple(ClaimVerdict(a.statement, a.verdict, a.summary) for a in assessments)
    return Report(path, verdicts, len(analysis.records), analysis.missing, len(analysis.bad_files))


def _render(
    analysis: Analysis,
    assessments: list[ClaimAssessment],
    others: list[str],
    profiles: list[Profile],
    plots: dict[int, list[Path]],
    profile_plots: dict[str, Path],
    root: Path,
) -> str:
    results = analysis.results
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    bad = analysis.bad_files
    covers = (
        f"This report covers every valid run file in `{root}/runs`: {len(analysis.records)} "
        f"runs in {len(results)} experiments"
        + (f"; {analysis.missing} runs of the latest plans are missing" if analysis.missing else "")
        + "."
    )
    if bad:
        covers += f" **{len(bad)} run files are not valid runs and are left out** (listed below)."
    lines = [
        "# AdaBelief paper claims: evidence from this machine",
        "",
        f"Generated {now}. {covers}",
        "",
        *_mode_lines(results),
        "",
        *_reference_note(analysis),
        "| claim | verdict | evidence |",
        "|---|---|---|",
    ]
    for number, assessment in enumerate(assessments, 1):
        lines.append(
            f"| {number}. {assessment.statement} | **{assessment.verdict}** | "
            f"{assessment.summary} |"
        )
    lines += [
        "",
        f"Verdicts: *better*/*worse* = paired two-sided t-test over seeds at p < {ALPHA} (the "
        "sign test where every paired difference is the same); *supported* = better somewhere "
        "and worse nowhere; *consistent* = no significant difference anywhere (which is what "
        "'like Adam' / 'like SGD' predicts, but also what too few seeds produce); *mixed* = "
        "worse somewhere; *not supported* = worse everywhere; *not tested* = no comparison "
        "with two seeds or more.",
        "",
    ]
    for number, assessment in enumerate(assessments, 1):
        lines += _claim_section(number, assessment, results, others)
    lines += _losses_section(results)
    lines += _target_section(results, profiles, profile_plots, root)
    lines += ["## Results per experiment", ""]
    for index, result in enumerate(results):
        lines += _experiment_section(result, plots.get(index, []), root)
    if bad:
        lines += ["## Run files left out", ""]
        lines += [f"- `{b.path}`: {b.reason}" for b in bad]
        lines.append("")
    seeds = sorted({len(r.seeds) for r in results})
    lines += [
        "## How to read this",
        "",
        f"- Seeds per comparison: {', '.join(map(str, seeds)) or '-'}. With so few seeds only "
        "large, consistent differences reach significance; *no significant difference* is not "
        "proof of equality. Comparisons are not corrected for multiple testing.",
        "- Each seed fixes initialisation, data order and noise; all optimizers see the same "
        "data splits, so comparisons are paired by seed.",
        "- Runs are comparable only with the same settings, data, torch thread count and "
        "device: each such group is a separate experiment here (labelled when one experiment "
        "appears several times).",
        "- Quick mode uses small models, bundled datasets and short schedules; it checks the "
        "direction of the claims on this machine, not the paper's numbers. The paper's numbers "
        "appear beside experiments that match a paper setting (CIFAR-10, CIFAR-100, Penn "
        "Treebank, the CIFAR-10 GANs, the Transformer).",
        "- Diverged runs count in the 'diverged' column and are left out of means, tests and "
        "times to target.",
        "",
        "## Environment",
        "",
        *_environment(analysis.records),
        f"- report host: {platform.node() or 'unknown'}, {os.cpu_count()} CPUs",
        "",
    ]
    commands = [c for c in analysis.manifest.get("commands", []) if isinstance(c, dict)]
    if commands:
        lines += ["## Commands run in this folder", ""]
        lines += [
            f"- {c.get('started_at', '?')}: `{c.get('command', '?')}`" for c in commands[-20:]
        ]
        if len(commands) > 20:
            lines.append(f"- ... and {len(commands) - 20} earlier commands")
        lines.append("")
    return "\n".join(lines)
