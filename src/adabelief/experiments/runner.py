"""Plan the runs of ``adabelief run``, execute the missing ones (in parallel) and report.

Planning turns tasks, optimizers, seeds and mode into :class:`RunSpec` objects; every spec whose
file is already in the run folder is skipped, so rerunning an interrupted command only does what
is left.  Runs execute in a process pool (``jobs`` workers, each with ``threads`` torch threads,
by default ``cpus // jobs``) or in this process when ``jobs == 1``; each worker writes its run's
file atomically the moment the run ends.
"""

from __future__ import annotations

import os
import platform
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from adabelief.experiments.data import DataNotFoundError
from adabelief.experiments.presets import get_preset, lr_grid
from adabelief.experiments.report import Report, build_report
from adabelief.experiments.spec import Experiment, RunContext, RunSpec
from adabelief.experiments.store import RunStore
from adabelief.experiments.tasks import TASKS, PlanOptions, get_task
from adabelief.experiments.training import configure_torch

__all__ = ["RunOptions", "RunSummary", "available_cpus", "execute", "plan", "run_experiments"]


def available_cpus() -> int:
    """CPUs this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class RunOptions:
    """Everything ``adabelief run`` was asked to do."""

    tasks: tuple[str, ...]
    out: Path
    quick: bool = True
    seeds: int = 3
    optimizers: tuple[str, ...] = ("adabelief", "sgd", "adam", "adamw", "radam")
    mode: str = "paper"
    data_dir: Path | None = None
    device: str = "cpu"
    jobs: int = 1
    threads: int | None = None
    progress: bool = True
    tiny: bool = False
    make_plots: bool = True


@dataclass
class RunSummary:
    """What :func:`execute` did."""

    planned: int = 0
    reused: int = 0
    ran: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    interrupted: bool = False


def resolve_data(tasks: Sequence[str], data_dir: Path | None) -> dict[str, Path | None]:
    """Per task, the ``--data`` folder it will read (``None``: bundled data).

    A task named explicitly must find its files in ``data_dir``.  With ``all`` (every
    data-reading task requested), at least one must; the others fall back to bundled data.
    Raises :class:`DataNotFoundError` otherwise.
    """
    result: dict[str, Path | None] = dict.fromkeys(tasks)
    if data_dir is None:
        return result
    if not data_dir.is_dir():
        raise DataNotFoundError(f"--data {data_dir} is not a folder")
    readers = [t for t in tasks if get_task(t).uses_data]
    if not readers:
        raise DataNotFoundError(
            f"--data was given but none of the tasks {', '.join(tasks)} reads data "
            "(classify reads CIFAR-10, lm reads Penn Treebank)"
        )
    lenient = set(tasks) == set(TASKS)  # 'all': a task without its files uses bundled data
    errors = []
    for name in readers:
        try:
            get_task(name).check_data(data_dir)
            result[name] = data_dir
        except DataNotFoundError as exc:
            errors.append(str(exc))
    if errors and (not lenient or len(errors) == len(readers)):
        raise DataNotFoundError("; ".join(errors))
    return result


def plan(
    options: RunOptions, data: dict[str, Path | None]
) -> list[tuple[Experiment, list[RunSpec]]]:
    """Experiments of the requested tasks and the runs each needs."""
    factors = lr_grid(options.quick) if options.mode == "fair" else (1.0,)
    planned = []
    for task_name in options.tasks:
        task = get_task(task_name)
        plan_options = PlanOptions(options.quick, options.mode, data.get(task_name), options.tiny)
        for experiment in task.experiments(plan_options):
            preset = get_preset(experiment.preset)
            specs = []
            for optimizer in options.optimizers:
                base = preset.hparams(optimizer)
                for factor in factors:
                    hparams = dict(base)
                    if "lr" in hparams:
                        hparams["lr"] = float(f"{hparams['lr'] * factor:.6g}")
                    for seed in range(options.seeds):
                        specs.append(
                            RunSpec(
                                task_name,
                                experiment.name,
                                experiment.settings,
                                optimizer,
                                hparams,
                                factor,
                                seed,
                            )
                        )
            planned.append((experiment, specs))
    return planned


def _environment(device: str) -> dict[str, Any]:
    import adabelief

    return {
        "torch": torch.__version__,
        "adabelief": getattr(adabelief, "__version__", "unknown"),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": device,
    }


def run_one(spec: RunSpec, context: RunContext, store_root: Path) -> dict[str, Any]:
    """Execute one run and store its record (also the body of a pool worker's job)."""
    task = get_task(spec.task)
    started = time.perf_counter()
    output = task.run(spec, context)
    record = {
        "key": spec.key(),
        **spec.to_json(),
        "metrics": output.metrics,
        "curves": output.curves,
        "artifacts": output.artifacts,
        "diverged": output.diverged,
        "wall_time_s": round(time.perf_counter() - started, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": _environment(context.device),
    }
    RunStore(store_root).save(record)
    return record


def _worker_init(threads: int) -> None:
    # Ctrl-C reaches the whole process group: workers ignore it and the parent stops them (an
    # unfinished run is simply not stored) and reports the interruption once.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_torch(threads)


def _worker_job(
    spec_json: dict[str, Any], context: RunContext, root: str
) -> tuple[str, str | None]:
    spec = RunSpec.from_json(spec_json)
    try:
        run_one(spec, context, Path(root))
    except Exception:  # reported by the parent; the run stays missing and is retried next time
        return spec.key(), traceback.format_exc(limit=4)
    return spec.key(), None


def execute(
    specs: list[RunSpec],
    options: RunOptions,
    store: RunStore,
    data: dict[str, Path | None] | None = None,
) -> RunSummary:
    """Run every spec whose result is not on disk yet (``data``: ``--data`` folder per task)."""
    summary = RunSummary(planned=len(specs))
    unique = {spec.key(): spec for spec in specs}
    pending = [spec for key, spec in unique.items() if not store.has(key)]
    summary.reused = len(unique) - len(pending)
    if not pending:
        return summary
    threads = options.threads or max(1, available_cpus() // options.jobs)
    bar = tqdm(
        total=len(pending), desc="runs", unit="run", disable=not options.progress, file=sys.stderr
    )
    epoch_bars = options.progress and options.jobs == 1 and not options.quick
    folders = data or {}

    def context_for(spec: RunSpec) -> RunContext:
        return RunContext(options.device, folders.get(spec.task), epoch_bars)

    try:
        if options.jobs == 1:
            configure_torch(threads)
            for spec in pending:
                bar.set_postfix_str(f"{spec.task}/{spec.experiment} {spec.optimizer}")
                try:
                    run_one(spec, context_for(spec), store.root)
                    summary.ran.append(spec.key())
                except Exception:
                    summary.failed[spec.key()] = traceback.format_exc(limit=4)
                bar.update()
        else:
            pool = ProcessPoolExecutor(
                options.jobs,
                mp_context=get_context("spawn"),
                initializer=_worker_init,
                initargs=(threads,),
            )
            try:
                futures: set[Future[tuple[str, str | None]]] = {
                    pool.submit(_worker_job, spec.to_json(), context_for(spec), str(store.root))
                    for spec in pending
                }
                while futures:
                    done, futures = wait(futures, return_when=FIRST_COMPLETED)
                    for future in done:
                        key, error = future.result()
                        if error is None:
                            summary.ran.append(key)
                        else:
                            summary.failed[key] = error
                        bar.update()
            except (BrokenProcessPool, KeyboardInterrupt):  # Ctrl-C reaches the workers too
                summary.interrupted = True
            finally:
                if summary.interrupted:
                    # Stop the runs still going; they are redone on the next invocation.
                    for process in list(getattr(pool, "_processes", {}).values()):
                        process.terminate()
                pool.shutdown(wait=True, cancel_futures=True)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        bar.close()
    return summary


def manifest_entries(
    planned: list[tuple[Experiment, list[RunSpec]]],
    options: RunOptions,
    data: dict[str, Path | None],
    command: str,
) -> dict[str, dict[str, Any]]:
    """Manifest entries (one per task) describing the planned experiments and their run keys."""
    entries: dict[str, dict[str, Any]] = {}
    for experiment, specs in planned:
        entry = entries.setdefault(
            experiment.task,
            {
                "mode": options.mode,
                "quick": options.quick,
                "seeds": list(range(options.seeds)),
                "optimizers": list(options.optimizers),
                "data": str(data.get(experiment.task)) if data.get(experiment.task) else None,
                "device": options.device,
                "command": command,
                "planned_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "experiments": [],
            },
        )
        entry["experiments"].append(
            {
                "experiment": experiment.to_json(),
                "runs": [
                    {
                        "key": s.key(),
                        "optimizer": s.optimizer,
                        "lr_factor": s.lr_factor,
                        "seed": s.seed,
                        "hparams": s.hparams,
                    }
                    for s in specs
                ],
            }
        )
    return entries


def run_experiments(options: RunOptions, command: str = "") -> tuple[RunSummary, Report | None]:
    """Plan, execute what is missing, and rebuild the report; returns the summary and report path.

    Raises :class:`DataNotFoundError` for an unusable ``--data`` folder.
    """
    data = resolve_data(options.tasks, options.data_dir)
    planned = plan(options, data)
    store = RunStore(options.out)
    store.update_manifest(manifest_entries(planned, options, data, command))
    specs = [spec for _, group in planned for spec in group]
    summary = execute(specs, options, store, data)
    report = None
    if not summary.interrupted:
        report = build_report(options.out, make_plots=options.make_plots)
    return summary, report
