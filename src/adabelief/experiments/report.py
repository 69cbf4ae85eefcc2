"""Turn a run folder into ``results.json``, ``summary.csv``, plots and ``report.md``.

The report states, for each of the paper's three claims, what the runs on disk show.  Every
sentence about a claim is computed from paired comparisons over seeds (see
:mod:`adabelief.experiments.stats`); nothing is hard-coded, and the comparisons AdaBelief loses
are listed as prominently as the ones it wins.
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

from adabelief.experiments.analysis import REFERENCE, ExperimentResult, analyze
from adabelief.experiments.plots import plot_experiment
from adabelief.experiments.presets import lr_grid
from adabelief.experiments.spec import CLAIMS, Experiment, Metric
from adabelief.experiments.stats import ALPHA, PairedComparison
from adabelief.experiments.store import RunStore

__all__ = ["ClaimVerdict", "Evidence", "Report", "ReportError", "build_report", "claim_verdict"]


class ReportError(RuntimeError):
    """The folder cannot be reported on (e.g. it holds no manifest)."""


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


@dataclass(frozen=True)
class Evidence:
    """AdaBelief against one other optimizer on one metric of one experiment."""

    result: ExperimentResult
    metric: Metric
    other: str
    comparison: PairedComparison


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


def claim_verdict(evidence: Iterable[Evidence]) -> str:
    """Summarise paired comparisons into a verdict word.

    ``supported``: AdaBelief significantly better somewhere and significantly worse nowhere;
    ``consistent``: no significant difference anywhere (what "like X" predicts);
    ``mixed``: significantly worse somewhere but not everywhere; ``not supported``: significantly
    worse in every comparison; ``not tested``: no comparison available.
    """
    verdicts = [e.comparison.verdict for e in evidence if e.comparison.n > 0]
    if not verdicts:
        return "not tested"
    worse, better = verdicts.count("worse"), verdicts.count("better")
    if worse == 0:
        return "supported" if better else "consistent (no significant difference)"
    if worse == len(verdicts):
        return "not supported"
    return "mixed"


def _tally(evidence: list[Evidence]) -> str:
    verdicts = [e.comparison.verdict for e in evidence]
    parts = [
        f"{verdicts.count(word)} {word}"
        for word in ("better", "no significant difference", "worse", "too few seeds")
        if verdicts.count(word)
    ]
    return ", ".join(parts) if parts else "no comparisons"


def _metric_named(experiment: Experiment, attribute_or_name: str) -> Metric | None:
    """``experiment.score`` / ``.speed`` by attribute, or any of its metrics by name."""
    if attribute_or_name in ("score", "selection", "speed"):
        value = getattr(experiment, attribute_or_name)
        return value if isinstance(value, Metric) else None
    return next((m for m in experiment.metrics if m.name == attribute_or_name), None)


def _collect(
    results: list[ExperimentResult], claim: str, metric_of: str, other: str
) -> list[Evidence]:
    evidence = []
    for result in results:
        if claim not in result.experiment.claims:
            continue
        metric = _metric_named(result.experiment, metric_of)
        if metric is None:
            continue
        comparison = result.compare(metric, other)
        if comparison is not None and comparison.n > 0:
            evidence.append(Evidence(result, metric, other, comparison))
    return evidence


def _evidence_table(evidence: list[Evidence]) -> list[str]:
    lines = [
        "| experiment | metric | AdaBelief | other | mean diff (AdaBelief - other) "
        "| paired t p | sign test (wins-losses) | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in evidence:
        c = e.comparison
        se = f" ± {_fmt(c.standard_error, 2)}" if math.isfinite(c.standard_error) else ""
        t_p = _fmt_p(c.t_p_value if c.t_p_value is not None else math.nan)
        lines.append(
            f"| {e.result.experiment.task}/{e.result.experiment.name} | {e.metric.label} "
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
    results: list[ExperimentResult], claim: str, metric_names: list[str], others: list[str]
) -> list[str]:
    """AdaBelief against every other optimizer, one row per experiment and metric."""
    rows = []
    for result in results:
        if claim not in result.experiment.claims or result.get(REFERENCE) is None:
            continue
        for name in metric_names:
            metric = _metric_named(result.experiment, name)
            if metric is None:
                continue
            cells = []
            for other in others:
                comparison = result.compare(metric, other)
                cells.append("-" if comparison is None or comparison.n == 0 else _short(comparison))
            rows.append(
                f"| {result.experiment.task}/{result.experiment.name} | {metric.label} | "
                + " | ".join(cells)
                + " |"
            )
    if not rows or not others:
        return []
    return [
        "AdaBelief against every optimizer (better / worse: paired t-test p < "
        f"{ALPHA}; n.s.: not significant):",
        "",
        "| experiment | metric | " + " | ".join(f"vs {o}" for o in others) + " |",
        "|---|---|" + "---|" * len(others),
        *rows,
        "",
    ]


def _claim_section(
    number: int,
    claim: str,
    results: list[ExperimentResult],
    metric_names: list[str],
    primary: str,
    others: list[str],
    measured_by: str,
) -> tuple[list[str], str, str]:
    main = _collect(results, claim, metric_names[0], primary)
    verdict = claim_verdict(main)
    lines = [f"## Claim {number}: {CLAIMS[claim]}", "", f"Measured by {measured_by}.", ""]
    if not main:
        lines += [
            f"**Verdict: not tested** - no experiment paired AdaBelief with {primary} here.",
            "",
        ]
        return lines, verdict, "no paired runs"
    summary = f"vs {primary}: {_tally(main)} (of {len(main)})"
    lines += [f"**Verdict: {verdict}** - AdaBelief {summary}.", ""]
    lines += _evidence_table(main)
    lines += _matrix(results, claim, metric_names, others)
    return lines, verdict, summary


def _gan_section(results: list[ExperimentResult], others: list[str]) -> tuple[list[str], str, str]:
    quality = _collect(results, "gan", "score", "adam")
    verdict = claim_verdict(quality)
    lines = [
        f"## Claim 3: {CLAIMS['gan']}",
        "",
        "Measured by the final sample quality (test noise) of each GAN and by its spread across "
        "seeds (sample standard deviation; smaller = more stable), plus divergences. The verdict "
        "compares with Adam, the paper's GAN baseline; it is downgraded to *mixed* when "
        "AdaBelief's spread exceeds Adam's in most experiments or it diverges more often.",
        "",
    ]
    gan_results = [r for r in results if "gan" in r.experiment.claims and r.get(REFERENCE)]
    if not gan_results or not quality:
        lines += ["**Verdict: not tested** - no GAN runs of AdaBelief and Adam.", ""]
        return lines, "not tested", "no paired runs"
    names = [o.optimizer for o in gan_results[0].optimizers]
    spread_lines = [
        "| experiment | metric | "
        + " | ".join(f"{name} std" for name in names)
        + " | AdaBelief spread rank |",
        "|---|---|" + "---|" * (len(names) + 1),
    ]
    smaller_than_adam, lowest, ab_div, adam_div = 0, 0, 0, 0
    for result in gan_results:
        metric = result.experiment.score
        stds = {
            o.optimizer: result.summary(o.optimizer, metric.name).std for o in result.optimizers
        }
        finite = sorted(v for v in stds.values() if math.isfinite(v))
        ab_std = stds.get(REFERENCE, math.nan)
        rank = finite.index(ab_std) + 1 if math.isfinite(ab_std) else None
        lowest += rank == 1
        if math.isfinite(ab_std) and math.isfinite(stds.get("adam", math.nan)):
            smaller_than_adam += ab_std <= stds["adam"]
        reference = result.get(REFERENCE)
        ab_div += reference.chosen.diverged if reference else 0
        adam = result.get("adam")
        adam_div += adam.chosen.diverged if adam else 0
        spread_lines.append(
            f"| gan/{result.experiment.name} | {metric.label} | "
            + " | ".join(_fmt(stds.get(name)) for name in names)
            + f" | {rank if rank else '-'} of {len(finite)} |"
        )
    stable = smaller_than_adam * 2 >= len(gan_results) and ab_div <= adam_div
    if verdict in ("supported", "consistent (no significant difference)") and not stable:
        verdict = "mixed"
    summary = (
        f"quality vs adam: {_tally(quality)}; spread <= Adam's in {smaller_than_adam} of "
        f"{len(gan_results)}; smallest spread in {lowest} of {len(gan_results)}; "
        f"divergences AdaBelief {ab_div}, Adam {adam_div}"
    )
    lines += [f"**Verdict: {verdict}** - {summary}.", ""]
    lines += _evidence_table(quality)
    lines += _matrix(results, "gan", ["score"], others)
    lines += ["Spread of the score across seeds:", "", *spread_lines, ""]
    return lines, verdict, summary


def _losses_section(results: list[ExperimentResult]) -> list[str]:
    lines = ["## Where AdaBelief loses", ""]
    rows = []
    for result in results:
        if result.get(REFERENCE) is None:
            continue
        metrics = [m for m in (result.experiment.score, result.experiment.speed) if m is not None]
        for metric in dict.fromkeys(metrics):
            for row in result.optimizers:
                comparison = result.compare(metric, row.optimizer)
                if comparison is None or comparison.n == 0 or not comparison.advantage < 0:
                    continue
                rows.append(
                    (
                        comparison.verdict != "worse",
                        comparison.p_value,
                        result,
                        metric,
                        row.optimizer,
                        comparison,
                    )
                )
    if not rows:
        return [
            *lines,
            "AdaBelief's mean was at least as good as every other optimizer's on every score and speed metric.",
            "",
        ]
    lines += [
        "Every comparison where another optimizer's mean beat AdaBelief's (significant ones first):",
        "",
    ]
    for not_significant, _, result, metric, other, c in sorted(rows, key=lambda r: (r[0], r[1])):
        tag = "significant" if not not_significant else "not significant"
        lines.append(
            f"- {result.experiment.task}/{result.experiment.name}, {metric.label}: {other} "
            f"{_mean_std(result, other, metric.name)} vs AdaBelief "
            f"{_mean_std(result, REFERENCE, metric.name)} (paired p {_fmt_p(c.p_value)}, {tag})"
        )
    return [*lines, ""]


def _experiment_section(result: ExperimentResult, plots: list[Path], root: Path) -> list[str]:
    experiment = result.experiment
    lines = [
        f"### {experiment.task}/{experiment.name}: {experiment.title}",
        "",
        f"Preset `{experiment.preset}`, {result.mode} mode, seeds {result.seeds}, "
        f"{result.planned - result.missing}/{result.planned} runs on disk.",
        "",
    ]
    metrics = experiment.metrics
    header = ["optimizer", "lr"] + [
        m.label + (" ↑" if m.higher_is_better else " ↓") for m in metrics
    ]
    header.append("diverged")
    if experiment.paper:
        header.append(f"paper: {experiment.score.label}")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    at_edge = False
    for row in result.optimizers:
        lr = row.chosen.hparams.get("lr")
        lr_text = _fmt(lr) if isinstance(lr, int | float) else "-"
        if result.mode == "fair":
            lr_text += f" (x{row.chosen.lr_factor:.2g})"
            factors = sorted(c.lr_factor for c in row.candidates)
            if len(factors) > 1 and row.chosen.lr_factor in (factors[0], factors[-1]):
                lr_text += " †"
                at_edge = True
        cells = [row.optimizer, lr_text] + [
            _mean_std(result, row.optimizer, m.name) for m in metrics
        ]
        cells.append(f"{row.chosen.diverged}/{len(row.chosen.records)}")
        if experiment.paper:
            cells.append(_fmt(experiment.paper.get(row.optimizer)))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if at_edge:
        lines += [
            "† chosen at the edge of the learning-rate grid: that optimizer's best learning rate "
            "may lie outside the grid, so its score may be an underestimate.",
            "",
        ]
    if result.mode == "fair":
        lines.append("Learning-rate grid (mean validation metric per factor; chosen in bold):")
        lines.append("")
        if experiment.selection.name == experiment.score.name:
            lines += [
                "_This experiment has no held-out data: the grid is judged on the reported "
                "metric itself, so here fair mode means best-of-grid for every optimizer._",
                "",
            ]
        for row in result.optimizers:
            entries = []
            for candidate in sorted(row.candidates, key=lambda c: c.lr_factor):
                values = [candidate.value(experiment.selection.name, s) for s in result.seeds]
                finite = [v for v in values if v is not None]
                text = f"x{candidate.lr_factor:.2g}: {_fmt(sum(finite) / len(finite)) if finite else 'diverged'}"
                entries.append(f"**{text}**" if candidate is row.chosen else text)
            lines.append(f"- {row.optimizer}: " + ", ".join(entries))
        lines.append("")
    if experiment.paper and result.quick:
        lines += [
            "_Quick mode: far smaller than the paper's setting; the paper column is context, not a target._",
            "",
        ]
    for path in plots:
        lines += [f"![{path.stem}]({path.relative_to(root).as_posix()})", ""]
    return lines


def _mode_lines(manifest: dict[str, Any]) -> list[str]:
    """One line per (mode, scale) used, naming its tasks."""
    groups: dict[tuple[str, bool], list[str]] = {}
    details: dict[str, str] = {}
    for task, entry in manifest["tasks"].items():
        key = (str(entry.get("mode", "paper")), bool(entry.get("quick")))
        groups.setdefault(key, []).append(task)
        seeds = len(entry.get("seeds", []))
        details[task] = f"`{task}` ({seeds} seeds, {entry.get('data') or 'bundled data'})"
    lines = []
    for (mode, quick), tasks in groups.items():
        scale = "quick" if quick else "full"
        if mode == "fair":
            factors = ", ".join(f"x{f:.2g}" for f in lr_grid(quick))
            how = (
                f"every optimizer's learning rate was tried at {factors} its preset; the best "
                "mean validation metric picked it, and the test metrics of that choice are reported"
            )
        else:
            how = (
                "every optimizer used its preset unchanged, untuned for these problems; a preset "
                "that happens to suit one optimizer better can decide a comparison, so check "
                "conclusions with `--mode fair`, which tunes every optimizer's learning rate"
            )
        listed = ", ".join(details[t] for t in tasks)
        lines.append(f"- **{mode} mode**, {scale} scale: {listed}. In this mode {how}.")
    return lines


def _environment(records: list[dict[str, Any]]) -> list[str]:
    if not records:
        return []
    envs = {
        (r.get("environment", {}).get("torch"), r.get("environment", {}).get("device"))
        for r in records
    }
    wall = sum(float(r.get("wall_time_s") or 0) for r in records)
    host = records[0].get("environment", {})
    return [
        f"- runs: {len(records)}, total training time {wall / 60:.1f} min (summed over runs)",
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
            "mode",
            "optimizer",
            "lr",
            "lr_factor",
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
    from adabelief.experiments.stats import summarize

    for result in results:
        for row in result.optimizers:
            for candidate in sorted(row.candidates, key=lambda c: c.lr_factor):
                for metric in result.experiment.metrics:
                    s = summarize([candidate.value(metric.name, seed) for seed in result.seeds])
                    writer.writerow(
                        [
                            result.experiment.task,
                            result.experiment.name,
                            result.mode,
                            row.optimizer,
                            candidate.hparams.get("lr"),
                            f"{candidate.lr_factor:.4g}",
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


def build_report(root: Path, make_plots: bool = True) -> Report:
    """Rebuild ``results.json``, ``summary.csv``, the plots and ``report.md`` in ``root``.

    Raises :class:`ReportError` when ``root`` is not a run folder.
    """
    store = RunStore(root)
    manifest = store.read_manifest()
    if not manifest["tasks"]:
        raise ReportError(f"{root} is not an adabelief run folder (no manifest.json with runs)")
    results = analyze(store)
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    for entry in manifest["tasks"].values():
        for item in entry.get("experiments", []):
            for run in item["runs"]:
                record = store.load(run["key"])
                if record is not None and record["key"] not in seen:
                    seen.add(record["key"])
                    records.append(record)
    store.write_json("results.json", records)
    store.write_text("summary.csv", _write_summary_csv(results))

    plots: dict[int, list[Path]] = {}
    if make_plots:
        for index, result in enumerate(results):
            plots[index] = plot_experiment(result, root / "plots")

    others = [
        o
        for o in dict.fromkeys(r.optimizer for res in results for r in res.optimizers)
        if o != REFERENCE
    ]
    c1, v1, s1 = _claim_section(
        1,
        "convergence",
        results,
        ["speed"],
        "adam",
        others,
        "each experiment's speed metric: steps to reach the optimum (toy) or the mean training "
        "loss over the whole run, i.e. the area under the training-loss curve (classify, lm); "
        "lower is faster",
    )
    c2, v2, s2 = _claim_section(
        2,
        "generalization",
        results,
        ["score", "generalization_gap"],
        "sgd",
        others,
        "each experiment's held-out score: test accuracy (classify) or test perplexity (lm), "
        "compared with SGD; the final train - test accuracy gap is shown in the matrix but does "
        "not enter the verdict",
    )
    c3, v3, s3 = _gan_section(results, others)
    missing = sum(r.missing for r in results)
    seeds = sorted({len(r.seeds) for r in results})
    ran_reference = any(r.get(REFERENCE) for r in results)
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# AdaBelief paper claims: evidence from this machine",
        "",
        f"Generated {now} from `{root}` ({len(records)} runs; {missing} planned runs missing).",
        "",
        *_mode_lines(manifest),
        "",
    ]
    if not ran_reference:
        lines += ["**AdaBelief was not among the optimizers run, so no claim is assessed.**", ""]
    lines += [
        "| claim | verdict | evidence |",
        "|---|---|---|",
        f"| 1. {CLAIMS['convergence']} | **{v1}** | {s1} |",
        f"| 2. {CLAIMS['generalization']} | **{v2}** | {s2} |",
        f"| 3. {CLAIMS['gan']} | **{v3}** | {s3} |",
        "",
        f"Verdicts: *better*/*worse* = paired two-sided t-test over seeds at p < {ALPHA}; "
        "*supported* = better somewhere and worse nowhere; *consistent* = no significant "
        "difference anywhere (which is what 'like Adam' / 'like SGD' predicts, but also what too "
        "few seeds produce); *mixed* = worse somewhere; *not supported* = worse everywhere.",
        "",
        *c1,
        *c2,
        *c3,
        *_losses_section(results),
        "## Results per experiment",
        "",
    ]
    for index, result in enumerate(results):
        lines += _experiment_section(result, plots.get(index, []), root)
    lines += [
        "## How to read this",
        "",
        f"- Seeds per comparison: {', '.join(map(str, seeds))}. With so few seeds only large, "
        "consistent differences reach significance; *no significant difference* is not proof of "
        "equality. Comparisons are not corrected for multiple testing.",
        "- Each seed fixes initialisation, data order and noise; all optimizers see the same "
        "data splits, so comparisons are paired by seed.",
        "- Quick mode uses small models, bundled datasets and short schedules; it checks the "
        "direction of the claims on this machine, not the paper's numbers. The paper's numbers "
        "appear beside experiments that match the paper's setting (CIFAR-10, Penn Treebank).",
        "- Diverged runs count in the 'diverged' column and are left out of means and tests.",
        "",
        "## Environment",
        "",
        *_environment(records),
        f"- report host: {platform.node() or 'unknown'}, {os.cpu_count()} CPUs",
        "",
    ]
    path = store.write_text("report.md", "\n".join(lines))
    verdicts = (
        ClaimVerdict(CLAIMS["convergence"], v1, s1),
        ClaimVerdict(CLAIMS["generalization"], v2, s2),
        ClaimVerdict(CLAIMS["gan"], v3, s3),
    )
    return Report(path, verdicts, len(records), missing)
