"""Where runs execute: this process, a pool of local worker processes, or a Ray cluster.

Every executor runs :func:`execute_job` on a :class:`Job` (plain data: the run's spec, its
experiment, what it needs to find its task) and hands each :class:`JobResult` back to the driver
the moment it is ready; the driver writes the run's file.  So no shared filesystem is needed,
and a run is computed the same way wherever it executes: same code, same seed, same torch
thread count (``RunSpec.threads``), hence the same metrics.

* :class:`InProcessExecutor` (``--executor local --jobs 1``) runs jobs one after the other.
* :class:`LocalExecutor` (``--executor local``, the default) runs ``jobs`` spawned worker
  processes.  Workers ignore Ctrl-C (the driver stops them) and exit on their own within half a
  second when the driver dies, also from SIGKILL.
* :class:`RayExecutor` (``--executor ray``) connects to the cluster named by ``RAY_ADDRESS``, or
  starts a local Ray instance when it is unset.  Each run is one Ray task asking for
  ``num_cpus`` = its thread count and one GPU with ``--device cuda``.

Ctrl-C (or SIGTERM) cancels what is pending; what finished is kept.
"""

from __future__ import annotations

import logging
import os
import platform
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "EXECUTORS",
    "Executor",
    "ExecutorError",
    "InProcessExecutor",
    "Job",
    "JobResult",
    "LocalExecutor",
    "RayExecutor",
    "available_cpus",
    "execute_job",
    "make_executor",
    "resolve_task",
]

EXECUTORS = ("local", "ray")
_PARENT_POLL_S = 0.5


class ExecutorError(RuntimeError):
    """The executor cannot start (e.g. Ray is not installed or the cluster is unreachable)."""


def available_cpus() -> int:
    """CPUs this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Job:
    """One run to execute, as plain data (pickled to workers and Ray tasks)."""

    spec: dict[str, Any]
    definition: dict[str, Any]
    task: dict[str, Any]
    data_dir: str | None = None
    quick: bool = True
    search_space: dict[str, Any] | None = None
    progress: bool = False
    cache_dir: str | None = None

    @property
    def key(self) -> str:
        """The run's key."""
        from adabelief.experiments.spec import RunSpec

        return RunSpec.from_json(self.spec).key()


@dataclass(frozen=True)
class JobResult:
    """A finished job: its record, or the error (a traceback) that stopped it."""

    key: str
    record: dict[str, Any] | None
    error: str | None


def resolve_task(payload: dict[str, Any]) -> Any:
    """The :class:`~adabelief.experiments.tasks.Task` a job payload names."""
    if "builtin" in payload:
        from adabelief.experiments.tasks import get_task

        return get_task(str(payload["builtin"]))
    from adabelief.experiments.usertask import task_from_payload

    return task_from_payload(payload)


def _environment(threads: int, device: str) -> dict[str, Any]:
    import torch

    import adabelief

    return {
        "torch": torch.__version__,
        "adabelief": getattr(adabelief, "__version__", "unknown"),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "cpus": os.cpu_count(),
        "threads": threads,
        "device": device,
    }


def execute_job(job: Job, executor: str) -> JobResult:
    """Run one job here and build its record (never raises: errors come back as text)."""
    from adabelief.experiments.spec import RunContext, RunSpec
    from adabelief.experiments.store import json_safe
    from adabelief.experiments.training import configure_torch

    key = job.key
    try:
        spec = RunSpec.from_json(job.spec)
        configure_torch(spec.threads)
        task = resolve_task(job.task)
        started = time.perf_counter()
        context = RunContext(
            Path(job.data_dir) if job.data_dir else None,
            job.progress,
            Path(job.cache_dir) if job.cache_dir else None,
        )
        output = task.run(spec, context)
        record = {
            "key": key,
            **spec.to_json(),
            "definition": job.definition,
            "quick": job.quick,
            "search_space": job.search_space,
            "metrics": output.metrics,
            "curves": output.curves,
            "artifacts": output.artifacts,
            "diverged": bool(output.diverged),
            "wall_time_s": round(time.perf_counter() - started, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "executor": executor,
            "host": socket.gethostname(),
            "environment": _environment(spec.threads, spec.device),
        }
        return JobResult(key, json_safe(record), None)
    except Exception:  # reported by the driver; the run stays missing and is retried next time
        return JobResult(key, None, traceback.format_exc(limit=8))


OnResult = Callable[[JobResult], None]


class Executor:
    """Runs jobs and reports each result as it arrives; a context manager around its resources."""

    name = "local"

    def __enter__(self) -> Executor:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release workers or the cluster connection."""

    def run(self, jobs: list[Job], on_result: OnResult) -> bool:
        """Execute ``jobs``; returns ``True`` when interrupted (Ctrl-C / SIGTERM)."""
        raise NotImplementedError


class InProcessExecutor(Executor):
    """One job after the other in this process."""

    def run(self, jobs: list[Job], on_result: OnResult) -> bool:
        """Execute ``jobs`` here; Ctrl-C stops after the current one is abandoned."""
        try:
            for job in jobs:
                on_result(execute_job(job, self.name))
        except KeyboardInterrupt:
            return True
        return False


def _exit_with_parent(parent: int) -> None:
    """Exit this worker as soon as its parent is gone (a SIGKILLed driver included)."""

    def watch() -> None:
        while True:
            time.sleep(_PARENT_POLL_S)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="adabelief-parent-watch", daemon=True).start()


def _worker_init(parent: int) -> None:
    # Ctrl-C reaches the whole process group: workers ignore it and the parent stops them (an
    # unfinished run is simply not stored) and reports the interruption once.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent(parent)


def _pool_job(job: Job) -> JobResult:
    return execute_job(job, "local")


class LocalExecutor(Executor):
    """``jobs`` spawned worker processes on this machine."""

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self._pool: ProcessPoolExecutor | None = None

    def _start(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self.jobs,
                mp_context=get_context("spawn"),
                initializer=_worker_init,
                initargs=(os.getpid(),),
            )
        return self._pool

    def run(self, jobs: list[Job], on_result: OnResult) -> bool:
        """Execute ``jobs`` in the pool; on Ctrl-C the workers are stopped.

        A worker that dies (killed, out of memory) fails the runs that were still pending in
        the pool; the next call starts a fresh pool.
        """
        pool = self._start()
        broken = False
        try:
            futures = {pool.submit(_pool_job, job): job for job in jobs}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        broken = True
                        message = "a worker process died (killed, or out of memory?)"
                        result = JobResult(futures[future].key, None, message)
                    except Exception as exc:  # e.g. a result that cannot be unpickled
                        result = JobResult(futures[future].key, None, f"worker failed: {exc!r}")
                    on_result(result)
        except KeyboardInterrupt:
            self._terminate()
            return True
        if broken:
            self._terminate()
        return False

    def _terminate(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        for process in list(getattr(pool, "_processes", {}).values()):
            process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        """Shut the pool down (its workers finish nothing more)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _ray_job(job: Job) -> JobResult:
    return execute_job(job, "ray")


class RayExecutor(Executor):
    """One Ray task per run, on the cluster named by ``RAY_ADDRESS`` (or a local instance)."""

    name = "ray"

    def __init__(self, threads: int, device: str) -> None:
        self.threads = threads
        self.device = device
        self._started_ray = False
        self._remote: Any = None

    def __enter__(self) -> RayExecutor:
        try:
            import ray
        except ImportError:
            raise ExecutorError(
                "--executor ray needs Ray, which is not installed here: "
                "pip install 'adabelief[ray]'"
            ) from None
        address = os.environ.get("RAY_ADDRESS")
        if not ray.is_initialized():
            try:
                if address:
                    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
                else:
                    ray.init(
                        num_cpus=available_cpus(),
                        include_dashboard=False,
                        logging_level=logging.WARNING,
                        log_to_driver=False,
                    )
            except Exception as exc:
                where = f"the Ray cluster at RAY_ADDRESS={address}" if address else "a local Ray"
                message = (
                    str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                )
                raise ExecutorError(f"cannot start or reach {where}: {message}") from None
            self._started_ray = True
        resources = ray.cluster_resources()
        gpus = 1 if self.device == "cuda" else 0
        if gpus and resources.get("GPU", 0) < 1:
            self.close()
            raise ExecutorError("--device cuda, but the Ray cluster has no GPU")
        if resources.get("CPU", 0) < self.threads:
            self.close()
            raise ExecutorError(
                f"each run asks for {self.threads} CPUs (--threads), but the Ray cluster has "
                f"{resources.get('CPU', 0):g}"
            )
        self._remote = ray.remote(_ray_job).options(
            num_cpus=self.threads, num_gpus=gpus, max_retries=1
        )
        return self

    def run(self, jobs: list[Job], on_result: OnResult) -> bool:
        """Submit every job, collect results as they finish; Ctrl-C cancels the rest."""
        import ray

        pending: dict[Any, Job] = {}
        try:
            pending = {self._remote.remote(job): job for job in jobs}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for ref in done:
                    job = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as exc:  # the task's worker died, or Ray failed
                        text = str(exc).strip().splitlines()
                        result = JobResult(
                            job.key, None, f"Ray task failed: {text[-1] if text else exc!r}"
                        )
                    on_result(result)
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref, force=True)
            return True
        return False

    def close(self) -> None:
        """Disconnect (and stop the local instance this executor started)."""
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False


def make_executor(kind: str, jobs: int, threads: int, device: str) -> Executor:
    """The executor for ``--executor kind`` (``jobs`` workers locally)."""
    if kind == "ray":
        return RayExecutor(threads, device)
    if kind != "local":
        raise ExecutorError(f"unknown executor {kind!r}; choose from {', '.join(EXECUTORS)}")
    return InProcessExecutor() if jobs == 1 else LocalExecutor(jobs)
