"""From stored runs to per-experiment results: learning-rate selection and comparisons.

In paper mode each optimizer is represented by its preset (learning-rate factor 1).  In fair
mode every learning-rate factor of the grid was run; the factor with the best mean validation
metric (``Experiment.selection``) over seeds is kept, and the test metric (``Experiment.score``)
of those runs is what is reported and compared.  Factors where some seed diverged rank below
factors where none did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from adabelief.experiments.spec import Experiment, Metric
from adabelief.experiments.stats import PairedComparison, Summary, paired_comparison, summarize
from adabelief.experiments.store import RunStore

__all__ = ["REFERENCE", "Candidate", "ExperimentResult", "OptimizerResult", "analyze"]

#: The optimizer the comparisons are about.
REFERENCE = "adabelief"


@dataclass
class Candidate:
    """All seeds of one optimizer at one learning-rate factor."""

    optimizer: str
    lr_factor: float
    hparams: dict[str, Any]
    records: dict[int, dict[str, Any]] = field(default_factory=dict)

    def value(self, metric: str, seed: int) -> float | None:
        """The metric of one seed (``None`` if missing, diverged or undefined)."""
        record = self.records.get(seed)
        if record is None:
            return None
        value = record.get("metrics", {}).get(metric)
        return float(value) if isinstance(value, int | float) and math.isfinite(value) else None

    @property
    def diverged(self) -> int:
        """Number of seeds whose run diverged."""
        return sum(1 for record in self.records.values() if record.get("diverged"))

    def selection_rank(self, metric: Metric, seeds: list[int]) -> tuple[int, float]:
        """Sort key: fewer missing values first, then the better mean (smaller key is better)."""
        values = [self.value(metric.name, s) for s in seeds]
        finite = [v for v in values if v is not None]
        if not finite:
            return (len(values), math.inf)
        mean = sum(finite) / len(finite)
        return (len(values) - len(finite), -mean if metric.higher_is_better else mean)


@dataclass
class OptimizerResult:
    """One optimizer in one experiment: the chosen candidate and the others tried."""

    optimizer: str
    chosen: Candidate
    candidates: list[Candidate]

    def values(self, metric: str, seeds: list[int]) -> list[float | None]:
        """Per-seed values of the chosen candidate."""
        return [self.chosen.value(metric, s) for s in seeds]


@dataclass
class ExperimentResult:
    """An experiment's outcome in one mode."""

    experiment: Experiment
    mode: str
    quick: bool
    seeds: list[int]
    optimizers: list[OptimizerResult]
    planned: int
    missing: int

    def get(self, optimizer: str) -> OptimizerResult | None:
        """The result of ``optimizer`` if it ran."""
        return next((o for o in self.optimizers if o.optimizer == optimizer), None)

    def summary(self, optimizer: str, metric: str) -> Summary:
        """Mean/std over seeds of ``metric`` for ``optimizer``'s chosen candidate."""
        result = self.get(optimizer)
        return summarize(result.values(metric, self.seeds) if result else [])

    def compare(
        self, metric: Metric, other: str, reference: str = REFERENCE
    ) -> PairedComparison | None:
        """Paired comparison of ``reference`` against ``other`` on ``metric`` (None if absent)."""
        ref, oth = self.get(reference), self.get(other)
        if ref is None or oth is None or reference == other:
            return None
        return paired_comparison(
            ref.values(metric.name, self.seeds),
            oth.values(metric.name, self.seeds),
            metric.higher_is_better,
        )


def analyze(store: RunStore) -> list[ExperimentResult]:
    """Results of every experiment listed in the folder's manifest, in manifest order."""
    results: list[ExperimentResult] = []
    for entry in store.read_manifest()["tasks"].values():
        mode = str(entry.get("mode", "paper"))
        for item in entry.get("experiments", []):
            experiment = Experiment.from_json(item["experiment"])
            candidates: dict[tuple[str, float], Candidate] = {}
            missing = 0
            for run in item["runs"]:
                key = (run["optimizer"], float(run["lr_factor"]))
                candidate = candidates.setdefault(
                    key, Candidate(run["optimizer"], float(run["lr_factor"]), run["hparams"])
                )
                record = store.load(run["key"])
                if record is None:
                    missing += 1
                else:
                    candidate.records[int(run["seed"])] = record
            seeds = sorted({int(run["seed"]) for run in item["runs"]})
            rows = []
            for optimizer in dict.fromkeys(name for name, _ in candidates):
                tried = [c for (name, _), c in candidates.items() if name == optimizer]
                if mode == "fair":
                    chosen = min(tried, key=lambda c: c.selection_rank(experiment.selection, seeds))
                else:
                    chosen = min(tried, key=lambda c: abs(math.log(c.lr_factor)))
                if chosen.records:
                    rows.append(OptimizerResult(optimizer, chosen, tried))
            results.append(
                ExperimentResult(
                    experiment=experiment,
                    mode=mode,
                    quick=bool(entry.get("quick", False)),
                    seeds=seeds,
                    optimizers=rows,
                    planned=len(item["runs"]),
                    missing=missing,
                )
            )
    return results
