"""The Markdown report: ``report.md``, rendered from the analysis and the claims' verdicts.

Nothing here decides a verdict: every verdict word, tally and loss comes from
:mod:`adabelief.experiments.verdicts`, so a verdict rule changes in one place and shows in the
Markdown, the CSV and the CLI alike.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from adabelief.experiments.analysis import (
    REFERENCE,
    TAU_MAX,
    Analysis,
    ExperimentResult,
    Profile,
)
from adabelief.experiments.paper_results import PaperComparison
from adabelief.experiments.report_format import fmt, fmt_p, hparams_text, mean_std
from adabelief.experiments.search import TUNING_SEED
from adabelief.experiments.stats import (
    ALPHA,
    CONVERGENCE_TOLERANCE,
    CONVERGENCE_Z,
    PairedComparison,
)
from adabelief.experiments.verdicts import (
    ClaimAssessment,
    Evidence,
    PaperTable,
    comparison_word,
    comparisons_available,
    losses,
    metric_named,
    paper_table,
    quick_vs_full,
    seed_note,
    selection_words,
    verdict_legend,
)

__all__ = ["render_markdown"]


def _task_for(name: str) -> Any:
    from adabelief.experiments.tasks import TASKS

    return TASKS.get(name)


def effect_text(comparison: PairedComparison) -> str:
    """AdaBelief's advantage (positive = better) with its 95% confidence interval, or why
    there is none."""
    c = comparison
    if not math.isfinite(c.advantage):
        return "- (no finite pair)"
    text = f"{c.advantage:+.3g}"
    if c.constant:
        text += f" on every seed (no spread: no interval over {c.n - c.a_diverged - c.b_diverged})"
    elif c.interval is not None:
        text += f" [{c.interval[0]:+.3g}, {c.interval[1]:+.3g}]"
    else:
        text += " (one finite pair: no interval)"
    if c.a_diverged or c.b_diverged:
        text += ", finite pairs only"
    return text


def _t_text(c: PairedComparison) -> str:
    if c.t_p_value is not None:
        return fmt_p(c.t_p_value)
    if c.constant:
        return "not used (differences equal)"
    if c.a_diverged or c.b_diverged:
        return "not used (divergences)"
    return "undefined"


def _evidence_table(evidence: Iterable[Evidence]) -> list[str]:
    lines = [
        "| experiment | metric | AdaBelief | other | AdaBelief's advantage [95% CI] "
        "| paired t p | sign test (wins-losses) | diverged (AdaBelief / other) | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in evidence:
        c = e.comparison
        reference, other = e.result.get(REFERENCE), e.result.get(e.other)
        div_a = sum(reference.diverged_at(e.result.seeds)) if reference else 0
        div_b = sum(other.diverged_at(e.result.seeds)) if other else 0
        lines.append(
            f"| {e.result.name} | {e.metric.label} "
            f"| {mean_std(e.result, REFERENCE, e.metric.name)} "
            f"| {e.other}: {mean_std(e.result, e.other, e.metric.name)} "
            f"| {effect_text(c)} | {_t_text(c)} "
            f"| {c.wins}-{c.losses} (p {fmt_p(c.sign_p_value)}) | {div_a} / {div_b} "
            f"| **{e.word}** |"
        )
    lines.append("")
    note = seed_note(evidence)
    if note:
        lines += [note, ""]
    if any(e.budget_limited for e in evidence):
        lines += [
            "_Budget-limited: AdaBelief or its rival was still improving at the end of its "
            "budget (median late improvement above the convergence rule's tolerance and its "
            "noise, see 'How to read this'); such a comparison is shown but its better / worse "
            "does not count in the verdict._",
            "",
        ]
    return lines


def _short(comparison: PairedComparison, budget_limited: bool = False) -> str:
    word = comparison_word(comparison, budget_limited)
    word = {"no significant difference": "n.s.", "too few seeds": "n<2"}.get(word, word)
    return f"{word} (p {fmt_p(comparison.p_value)})" if comparison.n > 1 else word


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
                cells.append(
                    "-"
                    if comparison is None or comparison.n == 0
                    else _short(comparison, result.budget_limited(other))
                )
            rows.append(f"| {result.name} | {metric.label} | " + " | ".join(cells) + " |")
    if not rows or not others:
        return []
    return [
        "AdaBelief against every optimizer (better / worse: paired t-test p < "
        f"{ALPHA}, or the sign test where the differences are equal up to rounding or a run "
        "diverged; worse (diverged): AdaBelief diverged more often; n.s.: not significant):",
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
                + " | ".join(fmt(row.stds.get(name)) for name in names)
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
        "Every comparison where AdaBelief diverged and the other did not, or where another "
        "optimizer's mean beat AdaBelief's (divergences first, then significant ones):",
        "",
    ]
    for loss in found:
        c = loss.comparison
        if loss.diverged:
            seeds = c.a_diverged + c.both_diverged
            lines.append(
                f"- **{loss.result.name}, {loss.metric.label}: AdaBelief diverged on {seeds} "
                f"of {c.n} seeds** ({loss.other} diverged on {c.b_diverged + c.both_diverged}); "
                f"{loss.other} {mean_std(loss.result, loss.other, loss.metric.name)} vs "
                f"AdaBelief {mean_std(loss.result, REFERENCE, loss.metric.name)} on the runs "
                f"that finished (sign test {c.wins}-{c.losses}, p {fmt_p(c.sign_p_value)}, "
                f"{c.verdict})"
            )
            continue
        tag = "significant" if loss.significant else "not significant"
        if loss.result.budget_limited(loss.other):
            tag += ", budget-limited"
        lines.append(
            f"- {loss.result.name}, {loss.metric.label}: {loss.other} "
            f"{mean_std(loss.result, loss.other, loss.metric.name)} vs AdaBelief "
            f"{mean_std(loss.result, REFERENCE, loss.metric.name)} "
            f"(paired p {fmt_p(c.p_value)}, {tag})"
        )
    return [*lines, ""]


_TARGET_RULE = (
    "Rule: an experiment's target is the level of its target curve (validation accuracy or "
    "perplexity, distance to the optimum, sample quality) that every seed of the best "
    "optimizer reached at some evaluation; the best optimizer is chosen on the experiment's "
    "selection metric (validation data where it has any), its diverged runs ranking last. A run's time to target is the "
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
            text = "not reached" if math.isinf(steps) else fmt(steps)
            if math.isfinite(steps) and math.isfinite(seconds):
                text += f" ({fmt(seconds, 3)} s)"
            cells.append(f"{text}, {runs.reached}/{len(runs.steps)}")
        lines.append(
            f"| {result.name} | {ttt.curve.label} "
            f"{'≥' if ttt.curve.higher_is_better else '≤'} {fmt(ttt.target)} | {ttt.best} | "
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
        f"{TUNING_SEED} and judged on {selection_words(experiment)}; a trial that failed or "
        "diverged ranks last. The winner (bold) was rerun at every seed and is what the table "
        "and the comparisons use.",
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
                "failed or missing (no run on disk: ranks last)"
                if record is None
                else ("diverged" if record.get("diverged") else fmt(value))
            )
            text = f"trial {candidate.trial}: {hparams_text(candidate.hparams)} → {outcome}"
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
    text = f"about {value.value:g}" if value.approximate else fmt(value.value)
    return text if value.std is None else f"{text} ± {fmt(value.std, 2)}"


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
            measured = fmt(row.measured_mean)
        else:
            measured = f"{fmt(row.measured_mean)} ± {fmt(row.measured_std, 2)}"
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
    header.append("late improvement ± noise (median)")
    paper_column = bool(experiment.paper) and not experiment.paper_key  # runs of older versions
    if paper_column:
        header.append(f"paper: {experiment.score.label}")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result.optimizers:
        chosen = row.chosen
        label = hparams_text(chosen.hparams) + (
            "" if chosen.trial is None else f" ({chosen.label})"
        )
        cells = [row.optimizer, label] + [mean_std(result, row.optimizer, m.name) for m in metrics]
        cells.append(f"{chosen.diverged}/{len(chosen.records)}")
        late, noise = row.late_improvement(), row.late_noise()
        cells.append(
            "-"
            if late is None
            else f"{late:+.1%}"
            + ("" if noise is None else f" ± {noise:.1%}")
            + (" (still improving)" if row.still_improving else "")
        )
        if paper_column:
            cells.append(fmt(experiment.paper.get(row.optimizer)))
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
                "the data named below; the best trial was rerun at every seed and scored on test "
                "data"
            )
        else:
            how = (
                "every optimizer used its preset unchanged, untuned for these problems; a preset "
                "that happens to suit one optimizer better can decide a comparison, so check "
                "conclusions with `--mode fair`, which tunes every optimizer the same way"
            )
        lines.append(f"- **{mode} mode**, {scale} scale: {listed}. In this mode {how}.")
        chosen_on = "; ".join(
            dict.fromkeys(
                f"`{r.name}`: {selection_words(r.experiment)}"
                for items in tasks.values()
                for r in items
            )
        )
        what = "Trials and epochs" if mode == "fair" else "Epochs (where a run keeps its best)"
        lines.append(f"  {what} were selected on: {chosen_on}.")
    return lines


def _quick_full_section(results: list[ExperimentResult]) -> list[str]:
    """Quick-budget verdicts beside default-budget ones, where the folder has both."""
    rows = quick_vs_full(results)
    if not rows:
        return []
    lines = [
        "## Quick budget against the default budget",
        "",
        "Every claim comparison of an experiment run at both budgets (same mode):",
        "",
        "| experiment | mode | claim | metric | vs | quick | default budget | agree |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.experiment} | {row.mode} | {row.claim} | {row.metric} | {row.other} "
            f"| {row.quick} | {row.full} | {'yes' if row.agree else '**no**'} |"
        )
    return [*lines, ""]


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


def render_markdown(
    analysis: Analysis,
    assessments: list[ClaimAssessment],
    others: list[str],
    profiles: list[Profile],
    plots: dict[int, list[Path]],
    profile_plots: dict[str, Path],
    root: Path,
) -> str:
    """The text of ``report.md``."""
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
    for task, count in sorted(analysis.superseded.items()):
        covers += (
            f" {count} runs of older versions of `{task}` (its source or a local module it "
            "imports changed since) are on disk and left out."
        )
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
        verdict_legend(),
        "",
    ]
    for number, assessment in enumerate(assessments, 1):
        lines += _claim_section(number, assessment, results, others)
    lines += _losses_section(results)
    lines += _quick_full_section(results)
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
        "- Quick mode uses small models and bundled datasets, each trained through its whole "
        "schedule (warm-up and decay scaled with the budget); the convergence rule below says "
        "where that budget still cut a run short. It checks the direction of the claims on this "
        "machine, not the paper's numbers. The paper's numbers "
        "appear beside experiments that match a paper setting (CIFAR-10, CIFAR-100, Penn "
        "Treebank, the CIFAR-10 GANs, the Transformer).",
        "- A diverged run counts in the 'diverged' column and is left out of means; in a paired "
        "comparison it loses its pair (both diverged: a tie), so the sign test decides, and "
        "AdaBelief diverging where its rival did not is a loss (*worse (diverged)*) that no "
        "verdict calls supported or consistent. It never reaches a target.",
        "- Paired differences equal up to rounding (relative spread below 1e-9) are constant: "
        "the t-test is not used and the sign test decides, which with n decided pairs cannot go "
        "below p = 2/2^n (0.25 with 3 seeds; 6 seeds are needed to reach p < 0.05). The "
        "effect size is AdaBelief's mean advantage (positive = better) with its 95% Student-t "
        "confidence interval over the finite pairs.",
        "- Convergence rule: a run's *late improvement* is the relative improvement of its "
        "validation curve (smoothed by a trailing mean over K/8 evaluations) from the last "
        "evaluation at or before 7/8 of its steps to the end (after the last learning-rate "
        "drop of the step schedules); its *noise* is that figure's standard error from the "
        "curve's own evaluation-to-evaluation noise over the last quarter. An optimizer whose "
        f"median late improvement over its n seeds exceeds both {CONVERGENCE_TOLERANCE:.0%} and "
        f"{CONVERGENCE_Z:g} x median noise / sqrt(n) was still improving; its comparisons are "
        "*budget-limited*: shown, but not counted as better or worse in a claim's verdict.",
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
