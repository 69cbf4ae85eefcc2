"""Where runs execute: this process, a pool of local worker processes, or a Ray cluster.

Every executor runs :func:`execute_job` on a :class:`Job` (plain data: the run's spec, its
experiment, what it needs to find its task) and hands each :class:`JobResult` back to the driver
the moment it is ready; the driver writes the run's file.  So no shared filesystem is needed,
and a run is computed the same way wherever it executes: same code, same seed, same torch
thread count (``RunSpec.threads``), hence the same metrics.

* :class:`InProcessExecutor` (``--executor local --jobs 1``) runs jobs one after the other.
* :class:`LocalExecutor` (``--executor local``, the default) runs ``jobs`` spawned worker
  processes, one job at a time each.  Workers ignore Ctrl-C (the driver stops them) and exit on
  their own within half a second when the driver dies, also from SIGKILL.  A worker that dies
  fails only the run it held; a fresh worker takes over.
* :class:`RayExecutor` (``--executor ray``) connects to the cluster named by ``RAY_ADDRESS``, or
  starts a local Ray instance when it is unset.  Each run is one Ray task asking for
  ``num_cpus`` = its thread count and one GPU with ``--device cuda``.  An unreachable
  ``RAY_ADDRESS`` is an :class:`ExecutorError` within seconds; a head lost mid-run raises
  :class:`ClusterLostError`.

A task that raises or calls ``sys.exit()`` fails its own run, never the command.  Ctrl-C (or
SIGTERM) cancels what is pending; what finished is kept.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import signal
import socket
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as connection_wait
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "EXECUTORS",
    "ClusterLostError",
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
    except SystemExit as exc:  # sys.exit() in the task (argparse does it): this run fails
        if executor == "ray":  # Ray stops its workers with SystemExit: let Ray see it
            raise
        where = traceback.format_exc(limit=8).rstrip().rsplit("\n", 1)[0]
        return JobResult(
            key,
            None,
            f"{where}\nthe task called sys.exit({exc.code!r}) instead of returning its results",
        )


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


def _worker_main(connection: Connection, parent: int) -> None:
    """A local worker: run each job the driver sends until it sends ``None`` or goes away."""
    _worker_init(parent)
    while True:
        try:
            job = connection.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        result = execute_job(job, "local")
        try:
            connection.send(result)
        except (EOFError, OSError):
            return
        except Exception as exc:  # a result that cannot be pickled
            connection.send(JobResult(result.key, None, f"worker failed: {exc!r}"))


def _death_message(exitcode: int | None) -> str:
    """Why a worker process ended, as the failed run's reason."""
    if exitcode is not None and exitcode < 0:
        try:
            how = f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"killed by signal {-exitcode}"
        return f"a worker process died while running it ({how}; out of memory?)"
    return f"a worker process died while running it (exit status {exitcode})"


@dataclass(eq=False)
class _Worker:
    """One spawned worker process, its end of the pipe, and the job it is running."""

    process: Any
    connection: Connection
    job: Job | None = None
    finished: int = 0


class LocalExecutor(Executor):
    """``jobs`` spawned worker processes on this machine, one job at a time each.

    A worker that dies (killed, out of memory, ``os._exit`` in a task) fails only the run it was
    running; a fresh worker takes its place for the runs still to do.
    """

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self._workers: list[_Worker] = []

    def _spawn(self) -> _Worker:
        context = get_context("spawn")
        mine, theirs = context.Pipe()
        process = context.Process(
            target=_worker_main, args=(theirs, os.getpid()), name="adabelief-worker"
        )
        process.start()
        theirs.close()
        worker = _Worker(process, mine)
        self._workers.append(worker)
        return worker

    def _discard(self, worker: _Worker) -> None:
        if worker in self._workers:
            self._workers.remove(worker)
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(5)
        worker.connection.close()

    def _assign(self, worker: _Worker, queue: deque[Job]) -> JobResult | None:
        """Hand the next job to ``worker``; a result when that fails for good."""
        job = queue.popleft()
        try:
            if not worker.process.is_alive():
                raise BrokenPipeError
            worker.connection.send(job)
        except (OSError, ValueError):
            self._discard(worker)
            if worker.finished:  # it died idle: the job never started, give it to another
                queue.appendleft(job)
                return None
            return JobResult(job.key, None, _death_message(worker.process.exitcode))
        worker.job = job
        return None

    def _collect(self, worker: _Worker) -> JobResult | None:
        """The result of a worker that woke up: its run's result, or the run failed by its death."""
        job = worker.job
        assert job is not None
        try:
            if worker.connection.poll():
                result = worker.connection.recv()
                worker.job = None
                worker.finished += 1
                return result if isinstance(result, JobResult) else JobResult(job.key, None, "?")
        except (EOFError, OSError):
            pass
        except Exception as exc:  # a result that cannot be unpickled
            self._discard(worker)
            return JobResult(job.key, None, f"worker failed: {exc!r}")
        if worker.process.is_alive():
            return None
        worker.process.join(5)
        self._discard(worker)
        return JobResult(job.key, None, _death_message(worker.process.exitcode))

    def run(self, jobs: list[Job], on_result: OnResult) -> bool:
        """Execute ``jobs`` on the workers; on Ctrl-C the workers are stopped."""
        queue = deque(jobs)
        try:
            while True:
                for worker in [w for w in self._workers if w.job is None]:
                    if queue and (failed := self._assign(worker, queue)) is not None:
                        on_result(failed)
                while queue and len(self._workers) < self.jobs:
                    if (failed := self._assign(self._spawn(), queue)) is not None:
                        on_result(failed)
                busy = [w for w in self._workers if w.job is not None]
                if not busy:
                    if queue:
                        continue
                    return False
                ready = set(
                    connection_wait(
                        [w.connection for w in busy] + [w.process.sentinel for w in busy]
                    )
                )
                for worker in busy:
                    if worker.connection in ready or worker.process.sentinel in ready:
                        result = self._collect(worker)
                        if result is not None:
                            on_result(result)
        except KeyboardInterrupt:
            self._terminate()
            return True

    def _terminate(self) -> None:
        for worker in list(self._workers):
            if worker.process.is_alive():
                worker.process.terminate()
        for worker in list(self._workers):
            self._discard(worker)

    def close(self) -> None:
        """Stop the workers (idle ones exit on their own; a busy one is terminated)."""
        for worker in self._workers:
            if worker.job is None:
                try:
                    worker.connection.send(None)
                except (OSError, ValueError):
                    pass
            elif worker.process.is_alive():
                worker.process.terminate()
        for worker in list(self._workers):
            worker.process.join(10)
            self._discard(worker)


def _ray_job(job: Job) -> JobResult:
    return execute_job(job, "ray")


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a Ray address (``host:port`` or ``ray://host:port``), else ``None``."""
    text = address.strip()
    if "://" in text:
        scheme, _, text = text.partition("://")
        if scheme != "ray":
            return None
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _answers(host: str, port: int, timeout: float) -> str | None:
    """``None`` when a TCP connection to ``host:port`` opens, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def _probe(address: str, seconds: float) -> None:
    """Raise :class:`ExecutorError` unless something answers at ``address`` within ``seconds``.

    Ray itself retries an unreachable head for many minutes, printing warnings.
    """
    where = _host_port(address)
    if where is None:
        return
    deadline = time.monotonic() + seconds
    while (why := _answers(*where, timeout=2.0)) is not None:
        if time.monotonic() > deadline:
            raise ExecutorError(
                f"cannot reach the Ray cluster at RAY_ADDRESS={address}: nothing answers on "
                f"{where[0]}:{where[1]} ({why}) after {seconds:g} s; start its head "
                "('ray start --head') or correct RAY_ADDRESS"
            )
        time.sleep(0.5)


def _quiet_raylet_errors() -> None:
    """Keep the raylet's multi-line error reports (a worker died, ...) off the driver's stderr.

    Ray prints them from a thread even with ``log_to_driver=False``; the runner reports each
    failed run in one line instead.
    """
    try:
        import ray._private.worker as ray_worker
    except ImportError:
        return
    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or getattr(original, "_adabelief_quiet", False):
        return

    def print_to_stdstream(data: dict[str, Any], ignore_prefix: bool) -> None:
        if data.get("pid") != "raylet":
            original(data, ignore_prefix)

    print_to_stdstream._adabelief_quiet = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = print_to_stdstream


class ClusterLostError(RuntimeError):
    """The Ray cluster stopped answering while runs were executing (what finished is kept)."""


class RayExecutor(Executor):
    """One Ray task per run, on the cluster named by ``RAY_ADDRESS`` (or a local instance).

    ``RAY_ADDRESS`` is probed first (an unreachable head is a one-line error within
    :attr:`connect_timeout_s`), and the head is watched while runs execute: when it stops
    answering for :attr:`lost_after_s`, :meth:`run` raises :class:`ClusterLostError`.
    """

    name = "ray"
    connect_timeout_s = 20.0
    lost_after_s = 10.0
    failure_confirm_s = 5.0

    def __init__(self, threads: int, device: str) -> None:
        self.threads = threads
        self.device = device
        self._started_ray = False
        self._remote: Any = None
        self._head: tuple[str, int] | None = None
        self._address = ""
        self._lost = False

    def __enter__(self) -> RayExecutor:
        try:
            import ray
        except ImportError:
            raise ExecutorError(
                "--executor ray needs Ray, which is not installed here: "
                "pip install 'adabelief[ray]'"
            ) from None
        address = os.environ.get("RAY_ADDRESS")
        _quiet_raylet_errors()
        if not ray.is_initialized():
            if address:
                _probe(address, self.connect_timeout_s)
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
        try:
            gcs = str(ray.get_runtime_context().gcs_address)
        except Exception:  # an older Ray, or Ray Client: not watched
            gcs = ""
        self._head = _host_port(gcs)
        self._address = address or gcs or "local"
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

    def _check_head(self, silent_since: float | None) -> float | None:
        """When the head stopped answering (``None``: it answers); raises once it is lost."""
        if self._head is None or _answers(*self._head, timeout=1.0) is None:
            return None
        now = time.monotonic()
        if silent_since is None:
            return now
        if now - silent_since >= self.lost_after_s:
            self._lost = True
            raise ClusterLostError(
                f"the Ray cluster at {self._address} stopped answering "
                f"(no head at {self._head[0]}:{self._head[1]} for {self.lost_after_s:g} s)"
            )
        return silent_since

    def run(self, jobs: list[Job], on_result: OnResult) -> bool:
        """Submit every job, collect results as they finish; Ctrl-C cancels the rest.

        A failed run is held back until the head has kept answering for
        :attr:`failure_confirm_s` after it: when the head dies, its workers die a moment before
        it stops answering, and those runs are lost with the cluster (rerun on resume), not
        failed. Raises :class:`ClusterLostError` when the head stops answering.
        """
        import ray

        pending: dict[Any, Job] = {}
        held: list[tuple[float, JobResult]] = []  # failed results awaiting confirmation
        silent_since: float | None = None
        checked = time.monotonic()
        with _ctrl_c_noted() as ctrl_c:
            try:
                for job in jobs:  # one at a time: a Ctrl-C while submitting cancels those submitted
                    pending[self._remote.remote(job)] = job
                while pending or held:
                    if ctrl_c.is_set():
                        raise KeyboardInterrupt
                    if pending:
                        done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                    else:
                        done = []
                        time.sleep(0.5)
                    if time.monotonic() - checked >= 1.0 or silent_since is not None or held:
                        silent_since = self._check_head(silent_since)
                        checked = time.monotonic()
                    if silent_since is not None:
                        time.sleep(0.5)  # the head is silent: no busy loop over held-back results
                    else:
                        confirmed = [
                            result
                            for since, result in held
                            if checked - since >= self.failure_confirm_s
                        ]
                        held = [
                            (since, result)
                            for since, result in held
                            if checked - since < self.failure_confirm_s
                        ]
                        for result in confirmed:
                            on_result(result)
                    for ref in done:
                        job = pending.pop(ref)
                        try:
                            result = ray.get(ref)
                        except Exception as exc:  # the task's worker died, or Ray failed
                            text = [line for line in str(exc).strip().splitlines() if line.strip()]
                            result = JobResult(
                                job.key, None, f"Ray task failed: {_ray_reason(text)}"
                            )
                        if result.error is not None:
                            held.append((time.monotonic(), result))
                        else:
                            on_result(result)
            except KeyboardInterrupt:
                for ref in pending:
                    ray.cancel(ref, force=True)
                for _, result in held:
                    on_result(result)
                return True
            return False

    def close(self) -> None:
        """Disconnect (and stop the local instance this executor started).

        After a lost cluster nothing is left to disconnect from: Ray's own shutdown would wait
        for the head.
        """
        if self._started_ray and not self._lost:
            import ray

            ray.shutdown()
        self._started_ray = False


@contextlib.contextmanager
def _ctrl_c_noted() -> Iterator[threading.Event]:
    """In the main thread, Ctrl-C (SIGINT) sets the event that this yields instead of raising
    ``KeyboardInterrupt`` wherever it lands; a second Ctrl-C raises at once.

    The Ray loop checks the event each second: a ``KeyboardInterrupt`` raised while the main
    thread is inside ``ray.wait`` did not always come out of it (seen in the test suite: a driver
    still waiting 60 s after Ctrl-C), and the run then went on until its last task finished.
    """
    pressed = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield pressed  # signal handlers belong to the main thread: KeyboardInterrupt as before
        return

    def note(signum: int, frame: object) -> None:
        if pressed.is_set():
            raise KeyboardInterrupt
        pressed.set()

    previous = signal.signal(signal.SIGINT, note)
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)


def _ray_reason(lines: list[str]) -> str:
    """One line from a Ray error: the task's own exception, or why its worker died."""
    for line in reversed(lines):
        if "Error" in line.split(":", 1)[0] or "died" in line or "killed" in line:
            return line.strip()
    return lines[-1].strip() if lines else "unknown error"


def make_executor(kind: str, jobs: int, threads: int, device: str) -> Executor:
    """The executor for ``--executor kind`` (``jobs`` workers locally)."""
    if kind == "ray":
        return RayExecutor(threads, device)
    if kind != "local":
        raise ExecutorError(f"unknown executor {kind!r}; choose from {', '.join(EXECUTORS)}")
    return InProcessExecutor() if jobs == 1 else LocalExecutor(jobs)
