"""The CSV outputs.

* ``summary.csv``: one row per optimizer, candidate (preset or trial) and metric;
* ``comparisons.csv``: one row per claim comparison, with the verdict words of
  :mod:`adabelief.experiments.verdicts` (the same as in ``report.md``).
"""

from __future__ import annotations

import csv
import io
import math

from adabelief.experiments.analysis import ExperimentResult
from adabelief.experiments.stats import summarize
from adabelief.experiments.verdicts import ClaimAssessment

__all__ = ["comparisons_csv", "summary_csv"]


def _number(value: float | None) -> str:
    return f"{value:.6g}" if value is not None and math.isfinite(value) else ""


def comparisons_csv(assessments: list[ClaimAssessment]) -> str:
    """The text of ``comparisons.csv``: every comparison behind every claim's verdict."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
            "claim",
            "experiment",
            "study",
            "metric",
            "other",
            "pairs",
            "advantage",
            "ci_low",
            "ci_high",
            "t_p",
            "sign_wins",
            "sign_losses",
            "sign_p",
            "adabelief_diverged",
            "other_diverged",
            "budget_limited",
            "verdict",
        ]
    )
    for assessment in assessments:
        for e in assessment.evidence:
            c = e.comparison
            low, high = c.interval if c.interval is not None else (None, None)
            writer.writerow(
                [
                    assessment.claim,
                    e.result.name,
                    e.result.study,
                    e.metric.name,
                    e.other,
                    c.n,
                    _number(c.advantage),
                    _number(low),
                    _number(high),
                    _number(c.t_p_value),
                    c.wins,
                    c.losses,
                    _number(c.sign_p_value),
                    c.a_diverged + c.both_diverged,
                    c.b_diverged + c.both_diverged,
                    int(e.budget_limited),
                    e.word,
                ]
            )
    return buffer.getvalue()


def summary_csv(results: list[ExperimentResult]) -> str:
    """The text of ``summary.csv`` (every candidate, the selected one marked)."""
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
