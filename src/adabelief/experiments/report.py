"""Turn a run folder into ``results.json``, ``summary.csv``, ``comparisons.csv``, plots and
``report.md``.

The report covers every valid run file on disk (see :mod:`adabelief.experiments.analysis` for
how runs are grouped and selected) and says which runs it shows and which files it could not
read.  Each output has its own module: the verdicts come from
:mod:`adabelief.experiments.verdicts`, the Markdown from :mod:`~.report_markdown`, the CSV from
:mod:`~.report_csv` and the figures from :mod:`~.plots`; this module only ties them together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adabelief.experiments.analysis import REFERENCE, analyze, performance_profiles
from adabelief.experiments.plots import write_plots
from adabelief.experiments.report_csv import comparisons_csv, summary_csv
from adabelief.experiments.report_markdown import render_markdown
from adabelief.experiments.store import RunStore
from adabelief.experiments.verdicts import assess_claims

__all__ = ["ClaimVerdict", "Report", "ReportError", "build_report", "failed_runs_markdown"]


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


def build_report(root: Path, make_plots: bool = True) -> Report:
    """Rebuild ``results.json``, ``summary.csv``, ``comparisons.csv``, the plots and
    ``report.md`` in ``root``.

    Raises :class:`ReportError` when ``root`` holds no runs and no manifest.
    """
    store = RunStore(root)
    analysis = analyze(store)
    if not analysis.records and not analysis.manifest["tasks"] and not analysis.bad_files:
        raise ReportError(f"{root} is not an adabelief run folder (no runs/ and no manifest.json)")
    results = analysis.results
    with store.lock("report"):
        store.write_json("results.json", analysis.records)
        store.write_text("summary.csv", summary_csv(results))
        profiles = performance_profiles(results)
        plots, profile_plots = write_plots(results, profiles, root) if make_plots else ({}, {})
        assessments = assess_claims(results)
        store.write_text("comparisons.csv", comparisons_csv(assessments))
        others = [
            o
            for o in dict.fromkeys(r.optimizer for res in results for r in res.optimizers)
            if o != REFERENCE
        ]
        text = render_markdown(analysis, assessments, others, profiles, plots, profile_plots, root)
        text += failed_runs_markdown(store)
        path = store.write_text("report.md", text)
    verdicts = tuple(ClaimVerdict(a.statement, a.verdict, a.summary) for a in assessments)
    return Report(path, verdicts, len(analysis.records), analysis.missing, len(analysis.bad_files))


def failed_runs_markdown(store: RunStore) -> str:
    """A "Failed runs" section: every run whose latest attempt failed, with its reason.

    Empty when none failed.  The reasons come from ``failed/<key>.json``, which the runner
    writes when a run fails and removes when it finishes.
    """
    failures = store.failures()
    if not failures:
        return ""
    lines = [
        "",
        "## Failed runs",
        "",
        f"{len(failures)} runs failed and have no result (the same command tries them again; "
        f"details in `{store.failed_dir}`):",
        "",
    ]
    for failure in failures:
        seed = failure.get("seed", "?")
        trial = "" if failure.get("trial") is None else f", trial {failure['trial']}"
        lines.append(
            f"- {failure.get('experiment', '?')}, {failure.get('optimizer', '?')}, seed {seed}"
            f"{trial} (`{failure.get('key', '?')}`): {failure.get('error', 'unknown error')}"
        )
    return "\n".join(lines) + "\n"
