"""``summary.csv``: one row per optimizer, candidate (preset or trial) and metric."""

from __future__ import annotations

import csv
import io
import math

from adabelief.experiments.analysis import ExperimentResult
from adabelief.experiments.stats import summarize

__all__ = ["summary_csv"]


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
