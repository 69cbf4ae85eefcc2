"""From the runs on disk to per-experiment results: trial selection, comparisons, time to target.

Every valid run file in ``runs/`` is used.  Runs are grouped into *studies*: the runs of one
experiment with the same settings (data fingerprint included), thread count, device and mode,
which are the runs that can be compared with each other.

* **paper mode** (runs without a trial): each optimizer is represented by its preset; if the
  folder holds runs of several hyperparameter sets for one optimizer (the preset changed), the
  set with the most seeds is used and the others are counted as not shown.
* **fair mode** (runs of trials): every optimizer is judged on the first ``N`` trials, with
  ``N`` the trial count of the latest plan of the task (from the manifest; without one, the
  most trials any optimizer has on disk).  :func:`choose_trial`, which the runner also uses to
  pick the trials it reruns, takes the trial with the best ``Experiment.selection`` value at
  the tuning seed; a missing, failed or diverged trial ranks last, so it never cuts the trial
  count of the other optimizers.  The winner's runs at every seed are reported and compared.

A diverged run counts in the "diverged" column and is left out of every mean; in a paired
comparison it is a lost pair (:func:`~adabelief.experiments.stats.paired_comparison`), and in a
ranking it comes last.

A user task's runs carry the fingerprint of its source (and of the local modules it imports):
only the runs of its most recent fingerprint are analysed; runs of older versions stay on disk
and are counted in :attr:`Analysis.superseded`.

Convergence: a run's ``late_improvement`` and ``late_noise`` (see
:func:`adabelief.experiments.stats.late_improvement`, which states the rule) are the relative
improvement of its smoothed validation curve over the last eighth of its budget and that
figure's standard error from the curve's own noise.  An optimizer whose medians over seeds
meet the rule (2 standard errors of the median, and 1%) was still improving, and every comparison it enters is *budget-limited*
(:meth:`ExperimentResult.budget_limited`).

Time to target (after AlgoPerf): the *target* of an experiment is the level of its target
curve that every seed of the best optimizer reached, the best being chosen on the experiment's
selection metric (validation data where the experiment has any; diverged runs rank last).  A run's time to target
is the optimizer steps (and seconds) at the first evaluation where its curve reached the target.
The performance profile (Dolan and More) of an optimizer is ``rho(tau)``, the fraction of
experiments where its median steps to target are within a factor ``tau`` of the fastest
optimizer's; its area is ``mean over experiments of max(0, tau_max - r) / (tau_max - 1)`` with
``r`` that ratio (infinite when the target was not reached), ``tau_max =`` :data:`TAU_MAX`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from adabelief.experiments.registry import known_optimizers
from adabelief.experiments.search import TUNING_SEED
from adabelief.experiments.spec import Experiment, Metric, RunSpec, canonical_json, digest
from adabelief.experiments.stats import (
    PairedComparison,
    Summary,
    is_still_improving,
    paired_comparison,
    summarize,
)
from adabelief.experiments.store import BadRunFile, RunStore

__all__ = [
    "REFERENCE",
    "TAU_MAX",
    "Analysis",
    "Candidate",
    "ExperimentResult",
    "OptimizerResult",
    "Profile",
    "TimeToTarget",
    "analyze",
    "choose_trial",
    "performance_profiles",
    "study_id",
]

#: The optimizer the comparisons are about.
REFERENCE = "adabelief"
#: Upper end of the performance profile's ratio axis (AlgoPerf's).
TAU_MAX = 4.0


def study_id(spec: RunSpec) -> str:
    """Which runs are comparable: same experiment, settings, threads, device and mode."""
    return digest(
        [spec.task, spec.experiment, spec.settings, spec.threads, spec.device, spec.mode], 12
    )


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass
class Candidate:
    """One hyperparameter configuration of one optimizer (a preset or a trial), all its seeds."""

    optimizer: str
    trial: int | None
    hparams: dict[str, Any]
    records: dict[int, dict[str, Any]] = field(default_factory=dict)

    def value(self, metric: str, seed: int) -> float | None:
        """The metric of one seed (``None`` if missing, diverged or undefined)."""
        record = self.records.get(seed)
        if record is None or record.get("diverged"):
            return None
        return _finite(record.get("metrics", {}).get(metric))

    @property
    def diverged(self) -> int:
        """Number of seeds whose run diverged."""
        return sum(1 for record in self.records.values() if record.get("diverged"))

    @property
    def label(self) -> str:
        """``"preset"`` or ``"trial i"``."""
        return "preset" if self.trial is None else f"trial {self.trial}"

    def selection_rank(self, metric: Metric, seeds: Iterable[int]) -> tuple[int, float]:
        """Sort key: fewer missing values first, then the better mean (smaller key is better)."""
        values = [self.value(metric.name, s) for s in seeds]
        finite = [v for v in values if v is not None]
        if not finite:
            return (len(values), math.inf)
        mean = statistics.fmean(finite)
        return (len(values) - len(finite), -mean if metric.higher_is_better else mean)


def choose_trial(trials: list[Candidate], metric: Metric) -> Candidate:
    """The fair-mode winner: best ``metric`` at the tuning seed.

    Ties (e.g. every trial diverged) go to a trial that has a run on disk, then to the lower
    trial index.
    """
    return min(
        trials,
        key=lambda c: (
            *c.selection_rank(metric, [TUNING_SEED]),
            0 if TUNING_SEED in c.records else 1,
            c.trial or 0,
        ),
    )


@dataclass
class OptimizerResult:
    """One optimizer in one study: the chosen candidate, the trials it was chosen from, and
    configurations on disk that were not used."""

    optimizer: str
    chosen: Candidate
    trials: list[Candidate]
    search_space: dict[str, Any] | None = None
    unused: int = 0

    def values(self, metric: str, seeds: list[int]) -> list[float | None]:
        """Per-seed values of the chosen candidate."""
        return [self.chosen.value(metric, s) for s in seeds]

    def diverged_at(self, seeds: list[int]) -> list[bool]:
        """Per seed, whether the chosen candidate's run diverged."""
        return [bool(self.chosen.records.get(s, {}).get("diverged")) for s in seeds]

    def late_improvement(self) -> float | None:
        """Median over seeds of the runs' ``late_improvement`` (None when not recorded)."""
        values = self._finished_metric("late_improvement")
        return statistics.median(values) if values else None

    def late_noise(self) -> float | None:
        """Median over seeds of the runs' ``late_noise`` (None when not recorded)."""
        values = self._finished_metric("late_noise")
        return statistics.median(values) if values else None

    def _finished_metric(self, name: str) -> list[float]:
        return [
            v
            for record in self.chosen.records.values()
            if not record.get("diverged")
            and (v := _finite(record.get("metrics", {}).get(name))) is not None
        ]

    @property
    def still_improving(self) -> bool:
        """Whether the runs were still improving at the end of their budget (the rule of
        :func:`adabelief.experiments.stats.is_still_improving` on the medians over seeds)."""
        runs = len(self._finished_metric("late_improvement"))
        return is_still_improving(self.late_improvement(), self.late_noise(), runs)


@dataclass(frozen=True)
class RunsToTarget:
    """One optimizer's runs against the target: steps and seconds per seed (None: not reached)."""

    steps: tuple[float | None, ...]
    seconds: tuple[float | None, ...]

    @property
    def reached(self) -> int:
        """Seeds that reached the target."""
        return sum(1 for s in self.steps if s is not None)

    @property
    def median_steps(self) -> float:
        """Median steps over seeds, a seed that missed the target counting as infinite."""
        return _median_with_inf(self.steps)

    @property
    def median_seconds(self) -> float:
        """Median seconds over seeds (infinite for a missed target; NaN if not recorded)."""
        if any(s is not None and t is None for s, t in zip(self.steps, self.seconds, strict=True)):
            return math.nan
        return _median_with_inf(self.seconds)


def _median_with_inf(values: Iterable[float | None]) -> float:
    data = [math.inf if v is None else float(v) for v in values]
    return statistics.median(data) if data else math.nan


@dataclass(frozen=True)
class TimeToTarget:
    """An experiment's target and every optimizer's steps/seconds to reach it."""

    curve: Metric
    target: float
    best: str
    runs: dict[str, RunsToTarget]


@dataclass
class ExperimentResult:
    """One study's outcome: an experiment in one mode, thread count and device."""

    experiment: Experiment
    study: str
    mode: str
    quick: bool
    threads: int
    device: str
    seeds: list[int]
    optimizers: list[OptimizerResult]
    trials: int = 0
    runs: int = 0
    planned: int = 0
    missing: int = 0
    executors: dict[str, int] = field(default_factory=dict)
    label: str = ""
    time_to_target: TimeToTarget | None = None

    @property
    def name(self) -> str:
        """``task/experiment`` plus the label that tells apart studies of one experiment."""
        base = f"{self.experiment.task}/{self.experiment.name}"
        return f"{base} [{self.label}]" if self.label else base

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
            ref.diverged_at(self.seeds),
            oth.diverged_at(self.seeds),
        )

    def budget_limited(self, other: str, reference: str = REFERENCE) -> bool:
        """Whether ``reference`` or ``other`` was still improving when its budget ended."""
        return any(
            row is not None and row.still_improving
            for row in (self.get(reference), self.get(other))
        )

    def ranking(self, metric: Metric | None = None) -> list[str]:
        """Optimizers from best to worst on ``metric`` (default: the selection metric).

        Runs that diverged or are missing rank last: fewer of them first, then the mean.
        """
        metric = metric or self.experiment.selection
        return [
            row.optimizer
            for row in sorted(
                self.optimizers, key=lambda r: r.chosen.selection_rank(metric, self.seeds)
            )
        ]

    def best_optimizer(self, metric: Metric | None = None) -> str | None:
        """The best optimizer on ``metric`` (default: the selection metric, i.e. validation
        data where the experiment has any); None if no optimizer has a value."""
        metric = metric or self.experiment.selection
        ranked = [name for name in self.ranking(metric) if self.summary(name, metric.name).n > 0]
        return ranked[0] if ranked else None


@dataclass(frozen=True)
class Profile:
    """Performance profiles of one mode: per optimizer, the ratios and the area."""

    mode: str
    experiments: tuple[str, ...]
    ratios: dict[str, tuple[float, ...]]

    def rho(self, optimizer: str, tau: float) -> float:
        """Fraction of experiments where ``optimizer`` is within a factor ``tau`` of the best."""
        ratios = self.ratios[optimizer]
        return sum(1 for r in ratios if r <= tau) / len(ratios) if ratios else math.nan

    def area(self, optimizer: str) -> float:
        """Normalised area under ``rho`` from 1 to :data:`TAU_MAX` (1 = always the fastest)."""
        ratios = self.ratios[optimizer]
        if not ratios:
            return math.nan
        return statistics.fmean(max(0.0, TAU_MAX - r) / (TAU_MAX - 1) for r in ratios)


@dataclass
class Analysis:
    """Everything computed from one run folder."""

    results: list[ExperimentResult]
    records: list[dict[str, Any]]
    bad_files: list[BadRunFile]
    manifest: dict[str, Any]
    #: Planned runs (latest plans) of studies that have no finished run at all.
    unplanned_missing: int = 0
    #: Per user task (``task/experiment``), runs of older versions of its source left out.
    superseded: dict[str, int] = field(default_factory=dict)

    @property
    def missing(self) -> int:
        """Runs of the latest plans that are not on disk."""
        return sum(r.missing for r in self.results) + self.unplanned_missing


def _steps_at(curves: dict[str, list[Any]], index: int) -> float:
    for name in ("step", "x"):
        values = curves.get(name)
        if values and index < len(values) and _finite(values[index]) is not None:
            return float(values[index])
    return float(index + 1)


def _first_reach(
    curves: dict[str, list[Any]], curve: Metric, target: float
) -> tuple[float | None, float | None]:
    values = curves.get(curve.name, [])
    for index, value in enumerate(values):
        v = _finite(value)
        if v is None or _steps_at(curves, index) <= 0:  # the starting point is no progress
            continue
        if (v >= target) if curve.higher_is_better else (v <= target):
            times = curves.get("time_s") or []
            seconds = _finite(times[index]) if index < len(times) else None
            return _steps_at(curves, index), seconds
    return None, None


def _time_to_target(result: ExperimentResult) -> TimeToTarget | None:
    curve = result.experiment.target
    best = result.best_optimizer()  # chosen on the selection (validation) metric
    if curve is None or best is None:
        return None
    best_row = result.get(best)
    assert best_row is not None
    levels = []
    for seed in result.seeds:
        record = best_row.chosen.records.get(seed)
        if record is None or record.get("diverged"):
            continue
        curves = record.get("curves", {})
        values = [
            _finite(v) if _steps_at(curves, i) > 0 else None
            for i, v in enumerate(curves.get(curve.name, []))
        ]
        finite = [v for v in values if v is not None]
        if finite:
            levels.append(max(finite) if curve.higher_is_better else min(finite))
    if not levels:
        return None
    target = min(levels) if curve.higher_is_better else max(levels)
    runs = {}
    for row in result.optimizers:
        steps: list[float | None] = []
        seconds: list[float | None] = []
        for seed in result.seeds:
            record = row.chosen.records.get(seed)
            if record is None or record.get("diverged"):
                steps.append(None)
                seconds.append(None)
                continue
            s, t = _first_reach(record.get("curves", {}), curve, target)
            steps.append(s)
            seconds.append(t)
        runs[row.optimizer] = RunsToTarget(tuple(steps), tuple(seconds))
    return TimeToTarget(curve, target, best, runs)


def performance_profiles(results: list[ExperimentResult]) -> list[Profile]:
    """One profile per mode over every experiment with a time to target."""
    profiles = []
    for mode in dict.fromkeys(r.mode for r in results):
        ratios: dict[str, list[float]] = {}
        names = []
        for result in results:
            ttt = result.time_to_target
            if result.mode != mode or ttt is None:
                continue
            costs = {name: runs.median_steps for name, runs in ttt.runs.items()}
            fastest = min(costs.values(), default=math.inf)
            if not math.isfinite(fastest) or fastest <= 0:
                continue
            names.append(result.name)
            for name, cost in costs.items():
                ratios.setdefault(name, []).append(cost / fastest)
        if names:
            profiles.append(Profile(mode, tuple(names), {k: tuple(v) for k, v in ratios.items()}))
    return profiles


def _planned_trials(manifest: dict[str, Any]) -> dict[str, int]:
    """Per study, the fair-mode trial count of the latest plan that names it."""
    trials: dict[str, int] = {}
    for entry in manifest.get("tasks", {}).values():
        if not isinstance(entry, dict) or not isinstance(entry.get("trials"), int):
            continue
        for item in entry.get("experiments", []):
            if isinstance(item, dict) and isinstance(item.get("study"), str):
                trials[item["study"]] = int(entry["trials"])
    return trials


def _plan_counts(manifest: dict[str, Any], on_disk: set[str]) -> tuple[dict[str, list[str]], int]:
    """Planned keys per study in the latest plan of each task, and planned keys of no study."""
    per_study: dict[str, list[str]] = {}
    loose = 0
    for entry in manifest.get("tasks", {}).values():
        if not isinstance(entry, dict):
            continue
        for item in entry.get("experiments", []):
            if not isinstance(item, dict):
                continue
            raw = [run.get("key") if isinstance(run, dict) else run for run in item.get("runs", [])]
            keys = [k for k in raw if isinstance(k, str)]
            study = item.get("study")
            if isinstance(study, str):
                per_study.setdefault(study, []).extend(keys)
            else:
                loose += sum(1 for k in keys if k not in on_disk)
    return per_study, loose


def _pick_paper(optimizer: str, group: list[Candidate]) -> OptimizerResult:
    def latest(c: Candidate) -> str:
        return max(str(r.get("finished_at", "")) for r in c.records.values())

    chosen = max(group, key=lambda c: (len(c.records), latest(c)))
    return OptimizerResult(optimizer, chosen, [chosen], unused=len(group) - 1)


def _study_result(
    experiment: Experiment,
    study: str,
    records: list[dict[str, Any]],
    planned_trials: int | None = None,
) -> ExperimentResult:
    first = RunSpec.from_json(records[0])
    candidates: dict[tuple[str, int | None, str], Candidate] = {}
    spaces: dict[str, dict[str, Any]] = {}
    executors: dict[str, int] = {}
    for record in records:
        spec = RunSpec.from_json(record)
        key = (spec.optimizer, spec.trial, canonical_json(spec.hparams))
        candidate = candidates.setdefault(key, Candidate(spec.optimizer, spec.trial, spec.hparams))
        candidate.records[spec.seed] = record
        if isinstance(record.get("search_space"), dict):
            spaces.setdefault(spec.optimizer, record["search_space"])
        where = f"{record.get('executor', 'local')} on {record.get('host', 'unknown')}"
        executors[where] = executors.get(where, 0) + 1
    known = known_optimizers()
    optimizers = sorted(
        {c.optimizer for c in candidates.values()},
        key=lambda name: (known.index(name) if name in known else len(known), name),
    )
    rows: list[OptimizerResult] = []
    trials = 0
    if first.mode == "fair":
        per_optimizer: dict[str, dict[int, list[Candidate]]] = {}
        for candidate in candidates.values():
            assert candidate.trial is not None
            per_optimizer.setdefault(candidate.optimizer, {}).setdefault(
                candidate.trial, []
            ).append(candidate)
        # The plan's trial count: a trial that failed (no run on disk) ranks last in its
        # optimizer's choice and cuts nobody's trials.
        trials = planned_trials or max(max(by_trial) + 1 for by_trial in per_optimizer.values())
        for optimizer in optimizers:
            by_trial = per_optimizer[optimizer]
            considered = [
                max(versions, key=lambda c: len(c.records))
                for index, versions in sorted(by_trial.items())
                if index < trials
            ]
            used = {id(c) for c in considered}
            unused = sum(1 for v in by_trial.values() for c in v if id(c) not in used)
            if not considered:
                continue
            # A planned trial with no run on disk (it failed) is shown, and ranks last.
            considered += [
                Candidate(optimizer, index, {}) for index in range(trials) if index not in by_trial
            ]
            considered.sort(key=lambda c: c.trial or 0)
            chosen = choose_trial(considered, experiment.selection)
            rows.append(
                OptimizerResult(optimizer, chosen, considered, spaces.get(optimizer), unused)
            )
    else:
        for optimizer in optimizers:
            group = [c for c in candidates.values() if c.optimizer == optimizer]
            rows.append(_pick_paper(optimizer, group))
    seeds = sorted({seed for row in rows for seed in row.chosen.records})
    result = ExperimentResult(
        experiment=experiment,
        study=study,
        mode=first.mode,
        quick=bool(records[0].get("quick", False)),
        threads=first.threads,
        device=first.device,
        seeds=seeds,
        optimizers=rows,
        trials=trials,
        runs=len(records),
        executors=executors,
    )
    result.time_to_target = _time_to_target(result)
    return result


def _task_rank(task: str) -> tuple[int, str]:
    order = ("toy", "classify", "lm", "transformer", "gan")
    return (order.index(task), task) if task in order else (len(order), task)


def _label_studies(results: list[ExperimentResult]) -> None:
    """Tell apart studies of the same experiment and mode by what differs between them."""
    groups: dict[tuple[str, str, str], list[ExperimentResult]] = {}
    for result in results:
        groups.setdefault((result.experiment.task, result.experiment.name, result.mode), []).append(
            result
        )
    for group in groups.values():
        if len(group) < 2:
            continue
        for result in group:
            parts = []
            if len({r.threads for r in group}) > 1:
                parts.append(f"{result.threads} threads")
            if len({r.device for r in group}) > 1:
                parts.append(result.device)
            if len({r.quick for r in group}) > 1:
                parts.append("quick" if result.quick else "full")
            data = result.experiment.settings.get("data_fingerprint")
            if len({r.experiment.settings.get("data_fingerprint") for r in group}) > 1:
                parts.append(f"data {data}" if data else "bundled data")
            if not parts:
                parts.append(f"settings {result.study}")
            result.label = ", ".join(parts)
        if len({r.label for r in group}) < len(group):
            for result in group:
                result.label = f"{result.label}, settings {result.study}"


def _current_sources(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Drop the runs of a user task made with an older version of its source.

    A user task's experiment settings carry ``source_fingerprint``; the version of the most
    recently finished run of each ``task/experiment`` is the current one.
    """
    latest: dict[str, tuple[str, str]] = {}
    for record in records:
        fingerprint = record.get("settings", {}).get("source_fingerprint")
        if not isinstance(fingerprint, str):
            continue
        name = f"{record.get('task')}/{record.get('experiment')}"
        finished = str(record.get("finished_at", ""))
        if name not in latest or finished > latest[name][0]:
            latest[name] = (finished, fingerprint)
    kept: list[dict[str, Any]] = []
    superseded: dict[str, int] = {}
    for record in records:
        fingerprint = record.get("settings", {}).get("source_fingerprint")
        name = f"{record.get('task')}/{record.get('experiment')}"
        if isinstance(fingerprint, str) and fingerprint != latest[name][1]:
            superseded[name] = superseded.get(name, 0) + 1
        else:
            kept.append(record)
    return kept, superseded


def analyze(store: RunStore) -> Analysis:
    """Results of every study formed by the valid runs in ``store`` (see the module notes)."""
    records, bad = store.scan()
    manifest = store.read_manifest()
    records, superseded = _current_sources(records)
    by_study: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_study.setdefault(study_id(RunSpec.from_json(record)), []).append(record)
    trials = _planned_trials(manifest)
    on_disk = {str(r["key"]) for r in records}
    planned, loose = _plan_counts(manifest, on_disk)
    results = []
    for study, group in by_study.items():
        group.sort(key=lambda r: str(r.get("finished_at", "")), reverse=True)
        experiment = Experiment.from_json(group[0]["definition"])
        result = _study_result(experiment, study, group, trials.get(study))
        keys = set(planned.get(study, []))
        result.planned = len(keys | {str(r["key"]) for r in group})
        result.missing = len(keys - on_disk)
        results.append(result)
    for study, planned_keys in planned.items():  # planned studies without a finished run
        if study not in by_study:
            loose += len(set(planned_keys) - on_disk)
    results.sort(key=lambda r: (_task_rank(r.experiment.task), r.experiment.name, r.mode, r.study))
    _label_studies(results)
    return Analysis(results, records, bad, manifest, loose, superseded)
