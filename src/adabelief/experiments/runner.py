"""Plan the runs of ``adabelief run``, execute the missing ones, and rebuild the report.

Planning turns tasks (built-in names or users' ``FILE.py:FUNCTION``), optimizers, seeds and mode
into :class:`RunSpec` objects.  Every spec whose file is already valid in the run folder is
skipped, so rerunning an interrupted command only does what is left.

* **paper mode**: every optimizer's preset at every seed.
* **fair mode** (:mod:`adabelief.experiments.search`): phase 1 runs every optimizer's ``trials``
  quasi-random trials at the tuning seed; phase 2 reruns each optimizer's best trial (on
  validation data) at the other seeds.

Runs execute on an :mod:`executor <adabelief.experiments.executors>`: this process, local worker
processes, or Ray.  The driver writes each finished run's file atomically as its result
arrives, and each failed run's reason under ``failed/``.  Ctrl-C or SIGTERM cancels what is
pending and keeps what finished; so does losing the Ray cluster.  Every run being trained is
locked, so a second command on the same folder waits for the runs the first is training
instead of training them again.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from tqdm import tqdm

from adabelief.experiments.analysis import Candidate, choose_trial, study_id
from adabelief.experiments.data import DataCheck, DataInvalidError, DataNotFoundError
from adabelief.experiments.executors import (
    ClusterLostError,
    Executor,
    Job,
    JobResult,
    make_executor,
)
from adabelief.experiments.registry import DEFAULT_OPTIMIZERS, get_entry
from adabelief.experiments.report import Report, build_report
from adabelief.experiments.search import TUNING_SEED, SearchSpace, search_space, unit_point
from adabelief.experiments.spec import Experiment, RunSpec
from adabelief.experiments.store import BadRunFile, RunLocks, RunStore
from adabelief.experiments.tasks import TASKS, PlanOptions, Task
from adabelief.experiments.usertask import TaskLoadError, is_task_reference, load_user_task

__all__ = [
    "OptimizerRefusedError",
    "PlannedExperiment",
    "RunOptions",
    "RunSummary",
    "one_line",
    "plan",
    "plan_reruns",
    "resolve_data",
    "resolve_tasks",
    "run_experiments",
]


@dataclass(frozen=True)
class RunOptions:
    """Everything ``adabelief run`` was asked to do.

    ``tasks`` holds built-in task names, ``"all"`` and user task references.  ``trials`` is the
    number of fair-mode trials per optimizer (``None``: the default for the scale).
    ``settings`` replaces values of every experiment's settings (each key must be one of them)
    and ``lr_scale`` multiplies every preset learning rate: both become part of each run's
    identity (used by studies such as benchmarks/master_weights_quality.py).
    """

    tasks: tuple[str, ...]
    out: Path
    quick: bool = True
    seeds: int = 3
    optimizers: tuple[str, ...] = DEFAULT_OPTIMIZERS
    mode: str = "paper"
    trials: int | None = None
    data_dir: Path | None = None
    device: str = "cpu"
    executor: str = "local"
    jobs: int = 1
    threads: int = 1
    progress: bool = True
    tiny: bool = False
    make_plots: bool = True
    settings: dict[str, Any] = field(default_factory=dict)
    lr_scale: float = 1.0


@dataclass
class RunSummary:
    """What :func:`run_experiments` did."""

    planned: int = 0
    reused: int = 0
    ran: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    interrupted: bool = False
    bad_files: list[BadRunFile] = field(default_factory=list)
    report_kept: bool = False
    #: Runs another command in the same folder was training, waited for.
    waited: int = 0
    #: Set (one line) when the Ray cluster was lost mid-run; what finished is kept.
    cluster_lost: str | None = None

    @property
    def status(self) -> str:
        """``finished`` (every planned run has its result), ``failed``, ``interrupted`` or
        ``cluster lost``."""
        if self.cluster_lost:
            return "cluster lost"
        if self.interrupted:
            return "interrupted"
        return "failed" if self.failed else "finished"


@dataclass
class PlannedExperiment:
    """One experiment of the plan: its task, its runs and, in fair mode, the search spaces."""

    task: Task
    experiment: Experiment
    specs: list[RunSpec]
    data: DataCheck | None = None
    spaces: dict[str, SearchSpace] = field(default_factory=dict)


class OptimizerRefusedError(ValueError):
    """Raised before anything trains for an optimizer that a requested task cannot run (a
    bfloat16-model variant on a task that cannot put its model in bfloat16)."""


def _check_model_dtype(task: Task, experiment: Experiment, optimizer: str) -> None:
    dtype = get_entry(optimizer).model_dtype
    if dtype is None:
        return
    reason = task.model_dtype_refusal(experiment)
    if reason:
        dtype_name = str(dtype).removeprefix("torch.")
        raise OptimizerRefusedError(
            f"optimizer {optimizer!r} trains a {dtype_name} model, which {task.name} "
            f"({experiment.name}) cannot: {reason}"
        )


def _with_settings(experiment: Experiment, overrides: dict[str, Any]) -> Experiment:
    unknown = sorted(set(overrides) - set(experiment.settings))
    if unknown:
        raise ValueError(
            f"{experiment.task}/{experiment.name} has no setting {', '.join(unknown)}; its "
            f"settings: {', '.join(experiment.settings)}"
        )
    return dataclasses.replace(experiment, settings={**experiment.settings, **overrides})


def _scaled_lr(hparams: dict[str, Any], scale: float) -> dict[str, Any]:
    if scale == 1.0 or "lr" not in hparams:
        return hparams
    return {**hparams, "lr": hparams["lr"] * scale}


def resolve_tasks(names: Sequence[str]) -> list[Task]:
    """Built-in tasks by name (``all``: every one) and users' tasks by reference, in order.

    Raises :class:`~adabelief.experiments.usertask.TaskLoadError` with a one-line message.
    """
    tasks: dict[str, Task] = {}
    for raw in names:
        name = raw.strip()
        if name.lower() == "all":
            for task in TASKS.values():
                tasks.setdefault(task.name, task)
        elif name.lower() in TASKS:
            tasks.setdefault(name.lower(), TASKS[name.lower()])
        elif is_task_reference(name):
            task = load_user_task(name)
            base, suffix = task.name, 1
            while task.name in tasks or task.name in TASKS:
                suffix += 1
                task.name = f"{base}_{suffix}"  # type: ignore[misc]
            tasks[task.name] = task
        else:
            raise TaskLoadError(
                f"unknown task {raw!r}; choose from {', '.join(TASKS)}, all, "
                "or a task of your own as FILE.py:FUNCTION or module:FUNCTION"
            )
    return list(tasks.values())


def resolve_data(tasks: Sequence[Task], data_dir: Path | None) -> dict[str, DataCheck | None]:
    """Per task, the validated ``--data`` it will read (``None``: bundled data).

    A task named explicitly must find valid files in ``data_dir``.  With ``all`` (every built-in
    task requested), at least one must; the others fall back to bundled data.  Every file is
    checked here, before anything trains.  Raises :class:`DataNotFoundError` naming the problem.
    """
    result: dict[str, DataCheck | None] = {task.name: None for task in tasks}
    if data_dir is None:
        return result
    if not data_dir.is_dir():
        raise DataNotFoundError(f"--data {data_dir} is not a folder")
    readers = [task for task in tasks if task.uses_data]
    if not readers:
        raise DataNotFoundError(
            f"--data was given but none of the tasks {', '.join(t.name for t in tasks)} reads "
            "data (classify reads CIFAR-10 and CIFAR-100, gan CIFAR-10, lm Penn Treebank, "
            "transformer WikiText-2)"
        )
    lenient = set(TASKS) <= {task.name for task in tasks}
    missing: list[str] = []
    broken: list[str] = []
    for task in readers:
        try:
            result[task.name] = task.check_data(data_dir)
        except DataInvalidError as exc:
            broken.append(str(exc))
        except DataNotFoundError as exc:
            missing.append(str(exc))
    if broken:  # a file that is there but unusable is always an error
        raise DataNotFoundError("; ".join(broken))
    if missing and (not lenient or len(missing) == len(readers)):
        raise DataNotFoundError("; ".join(missing))
    return result


def _spec(
    experiment: Experiment,
    optimizer: str,
    hparams: dict[str, Any],
    seed: int,
    trial: int | None,
    options: RunOptions,
) -> RunSpec:
    return RunSpec(
        task=experiment.task,
        experiment=experiment.name,
        settings=experiment.settings,
        optimizer=optimizer,
        hparams=hparams,
        seed=seed,
        trial=trial,
        threads=options.threads,
        device=options.device,
    )


def _trials(options: RunOptions) -> int:
    from adabelief.experiments.search import default_trials

    return options.trials or default_trials(options.quick)


def plan(
    options: RunOptions, tasks: Sequence[Task], data: dict[str, DataCheck | None]
) -> list[PlannedExperiment]:
    """The experiments of the requested tasks and the runs each needs first.

    Paper mode: every seed of every optimizer's preset.  Fair mode: every trial at the tuning
    seed (the reruns of the winners follow from :func:`plan_reruns`).  An experiment on real
    data carries the data's fingerprint in its settings.  Raises
    :class:`OptimizerRefusedError` for an optimizer that a task cannot train.
    """
    planned = []
    for task in tasks:
        check = data.get(task.name)
        data_dir = options.data_dir if check is not None else None
        plan_options = PlanOptions(options.quick, options.mode, data_dir, options.tiny)
        for experiment in task.experiments(plan_options):
            if options.settings:
                experiment = _with_settings(experiment, options.settings)
            if check is not None:
                settings = {**experiment.settings, "data_fingerprint": check.fingerprint}
                experiment = dataclasses.replace(experiment, settings=settings)
            item = PlannedExperiment(task, experiment, [], check)
            for optimizer in options.optimizers:
                _check_model_dtype(task, experiment, optimizer)
                preset = _scaled_lr(task.preset_hparams(experiment, optimizer), options.lr_scale)
                if options.mode == "fair":
                    space = search_space(optimizer, preset, options.quick)
                    item.spaces[optimizer] = space
                    for trial in range(_trials(options)):
                        hparams = space.hparams(unit_point(trial))
                        item.specs.append(
                            _spec(experiment, optimizer, hparams, TUNING_SEED, trial, options)
                        )
                else:
                    for seed in range(options.seeds):
                        item.specs.append(_spec(experiment, optimizer, preset, seed, None, options))
            planned.append(item)
    return planned


def plan_reruns(item: PlannedExperiment, store: RunStore, options: RunOptions) -> list[RunSpec]:
    """Fair mode, phase 2: each optimizer's best trial (validation) at every other seed."""
    reruns = []
    for optimizer in options.optimizers:
        trials = []
        for spec in item.specs:
            if spec.optimizer != optimizer or spec.seed != TUNING_SEED:
                continue
            candidate = Candidate(optimizer, spec.trial, spec.hparams)
            record = store.load(spec.key())
            if record is not None:
                candidate.records[TUNING_SEED] = record
            trials.append(candidate)
        if not trials:
            continue
        winner = choose_trial(trials, item.experiment.selection)
        if not winner.records:
            continue  # every trial failed: nothing to rerun
        for seed in range(options.seeds):
            if seed != TUNING_SEED:
                reruns.append(
                    _spec(item.experiment, optimizer, winner.hparams, seed, winner.trial, options)
                )
    return reruns


def _job(item: PlannedExperiment, spec: RunSpec, options: RunOptions) -> Job:
    space = item.spaces.get(spec.optimizer)
    return Job(
        spec=spec.to_json(),
        definition=item.experiment.to_json(),
        task=item.task.payload(),
        data_dir=str(options.data_dir) if item.data is not None else None,
        quick=options.quick,
        search_space=space.to_json() if space is not None and spec.trial is not None else None,
        progress=options.progress
        and options.executor == "local"
        and options.jobs == 1
        and not options.quick,
        cache_dir=str(options.out / "cache"),
    )


def _manifest_entries(
    planned: list[PlannedExperiment], options: RunOptions, command: str
) -> dict[str, dict[str, Any]]:
    """One manifest entry per task: how it was planned and the keys of its runs."""
    entries: dict[str, dict[str, Any]] = {}
    for item in planned:
        entry = entries.setdefault(
            item.task.name,
            {
                "mode": options.mode,
                "quick": options.quick,
                "seeds": list(range(options.seeds)),
                "trials": _trials(options) if options.mode == "fair" else None,
                "optimizers": list(options.optimizers),
                "data": None
                if item.data is None
                else {"description": item.data.description, "fingerprint": item.data.fingerprint},
                "device": options.device,
                "threads": options.threads,
                "executor": options.executor,
                "command": command,
                "planned_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "experiments": [],
            },
        )
        entry["experiments"].append(
            {
                "name": item.experiment.name,
                "study": study_id(item.specs[0]) if item.specs else None,
                "runs": [spec.key() for spec in item.specs],
            }
        )
    return entries


class _Progress:
    """One progress bar over every phase, shown once there is something to run."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: tqdm[Any] | None = None

    def add(self, n: int) -> None:
        if self.bar is None:
            self.bar = tqdm(
                total=n, desc="runs", unit="run", disable=not self.enabled, file=sys.stderr
            )
        else:
            self.bar.total += n
            self.bar.refresh()

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def one_line(error: str) -> str:
    """The last non-blank line of a failed run's error (its traceback ends with the reason)."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"


def _execute(
    items: list[tuple[PlannedExperiment, RunSpec]],
    options: RunOptions,
    store: RunStore,
    locks: RunLocks,
    executor: Executor,
    summary: RunSummary,
    progress: _Progress,
    command: str = "",
) -> bool:
    """Run the specs whose valid record is not on disk; returns whether it was interrupted.

    Each run is locked while it trains; a run locked by another command in the same folder is
    waited for after this command's own runs, then taken from disk (or run, if it failed there).
    """
    unique: dict[str, tuple[PlannedExperiment, RunSpec]] = {}
    for item, spec in items:
        unique.setdefault(spec.key(), (item, spec))
    summary.planned += len(unique)
    jobs: dict[str, Job] = {}
    deferred: list[Job] = []
    for key, (item, spec) in unique.items():
        state = store.read(key)
        if isinstance(state, dict):
            summary.reused += 1
            continue
        job = _job(item, spec, options)
        if not locks.try_acquire(key):
            deferred.append(job)
            continue
        if isinstance(state := store.read(key), dict):  # finished by another command just now
            locks.release(key)
            summary.reused += 1
            continue
        if isinstance(state, BadRunFile):
            summary.bad_files.append(state)
        jobs[key] = job
    if not jobs and not deferred:
        return False
    progress.add(len(jobs) + len(deferred))
    everything = {**jobs, **{job.key: job for job in deferred}}

    def on_result(result: JobResult) -> None:
        try:
            if result.record is not None:
                try:
                    if not store.has(result.key):  # a finished run is never rewritten
                        store.save(result.record)
                    store.clear_failure(result.key)
                    summary.ran.append(result.key)
                except OSError as exc:
                    path = store.run_path(result.key)
                    summary.failed[result.key] = f"cannot write {path}: {exc}"
            else:
                summary.failed[result.key] = result.error or "unknown error"
            if result.key in summary.failed:
                _store_failure(store, everything[result.key], summary.failed[result.key], command)
        finally:
            locks.release(result.key)
            progress.update()

    if jobs and executor.run(list(jobs.values()), on_result):
        return True
    if not deferred:
        return False
    summary.waited += len(deferred)
    print(
        f"waiting for {len(deferred)} runs that another command is training in {store.root}",
        file=sys.stderr,
    )
    again = []
    for job in deferred:
        locks.acquire(job.key)
        if store.has(job.key):
            locks.release(job.key)
            summary.reused += 1
            progress.update()
        else:  # the other command failed or stopped: run it here
            again.append(job)
    return bool(again) and executor.run(again, on_result)


def _log_outcome(store: RunStore, command_id: str, summary: RunSummary) -> None:
    """Record how the command ended in its manifest entry (best effort: never raises)."""
    outcome = {
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "status": summary.status,
        "ran": len(summary.ran),
        "reused": summary.reused,
        "failed": {key: one_line(error) for key, error in summary.failed.items()},
    }
    if summary.cluster_lost:
        outcome["cluster_lost"] = summary.cluster_lost
    try:
        store.finish_command(command_id, outcome)
    except OSError:
        pass


def _store_failure(store: RunStore, job: Job, error: str, command: str) -> None:
    """Keep a failed run's reason in ``failed/<key>.json`` (best effort: never raises)."""
    failure = {
        "key": job.key,
        **job.spec,
        "experiment_title": job.definition.get("title"),
        "error": one_line(error),
        "traceback": error,
        "failed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command,
    }
    try:
        store.save_failure(failure)
    except OSError:
        pass


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C while runs execute (so workers are stopped, results kept)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_experiments(options: RunOptions, command: str = "") -> tuple[RunSummary, Report | None]:
    """Plan, execute what is missing, and rebuild the report; returns the summary and report.

    Raises :class:`~adabelief.experiments.usertask.TaskLoadError` for a task that cannot be
    loaded, :class:`OptimizerRefusedError` for an optimizer a task cannot train,
    :class:`DataNotFoundError` for unusable ``--data``,
    :class:`~adabelief.experiments.store.OutputError` for an unusable ``--out`` and
    :class:`~adabelief.experiments.executors.ExecutorError` when the executor cannot start,
    all before anything trains (and before anything is created in ``--out``).  The report is
    rebuilt from every run on disk, unless the command was interrupted or lost its cluster, or
    every run of this command failed and a report exists already: a failing command never
    replaces a good report.  The manifest logs the command with its outcome and failed runs.
    """
    tasks = resolve_tasks(options.tasks)
    data = resolve_data(tasks, options.data_dir)
    planned = plan(options, tasks, data)
    store = RunStore(options.out)
    store.check()  # created only once the executor is up: a command that cannot start leaves
    summary = RunSummary()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    command_id = uuid.uuid4().hex[:12]
    progress = _Progress(options.progress)
    locks = RunLocks(store.runs_dir)
    logged = False
    try:
        with (
            make_executor(
                options.executor, options.jobs, options.threads, options.device
            ) as executor,
            _sigterm_interrupts(),
        ):
            # no trace, not even an empty folder.
            store.prepare()
            store.update_manifest(
                _manifest_entries(planned, options, command),
                {
                    "id": command_id,
                    "command": command,
                    "started_at": started,
                    "tasks": [t.name for t in tasks],
                },
            )
            logged = True
            first = [(item, spec) for item in planned for spec in item.specs]
            summary.interrupted = _execute(
                first, options, store, locks, executor, summary, progress, command
            )
            if options.mode == "fair" and not summary.interrupted:
                second: list[tuple[PlannedExperiment, RunSpec]] = []
                for item in planned:
                    reruns = plan_reruns(item, store, options)
                    item.specs.extend(reruns)
                    second.extend((item, spec) for spec in reruns)
                store.update_manifest(_manifest_entries(planned, options, command))
                summary.interrupted = _execute(
                    second, options, store, locks, executor, summary, progress, command
                )
    except KeyboardInterrupt:
        summary.interrupted = True
    except ClusterLostError as exc:
        summary.cluster_lost = str(exc)
    finally:
        locks.close()
        progress.close()
    if logged:
        _log_outcome(store, command_id, summary)
    if summary.interrupted or summary.cluster_lost:
        return summary, None
    report_path = store.root / "report.md"
    if summary.failed and not summary.ran and report_path.exists():
        summary.report_kept = True
        return summary, None
    return summary, build_report(options.out, make_plots=options.make_plots)
