"""RayExecutor.run against a scripted Ray and head, in-process: the race of issue 20, row 3.

When the head's session dies, the driver can see a run's worker die a moment before the head
stops answering. That run is lost with the cluster (rerun on resume), not a failed run; a worker
that dies while the head keeps answering is a failed run. ``tests/test_runner_ray_faults.py``
shows both against a real head, where the order of the two events is up to the kernel; here it
is fixed.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import types
from typing import Any

import pytest

from adabelief.experiments import executors
from adabelief.experiments.executors import ClusterLostError, Job, JobResult, RayExecutor


class _Job(Job):
    """A job whose key is given, not hashed from a full run spec."""

    @property
    def key(self) -> str:
        return str(self.spec["key"])


class _Ref:
    def __init__(self, job: Job) -> None:
        self.job = job


class _ScriptedRay(types.ModuleType):
    """``wait`` returns each ref at once; ``get`` raises for the refs of ``dying`` keys."""

    def __init__(self, dying: set[str]) -> None:
        super().__init__("ray")
        self.dying = dying
        self.died_at: float | None = None
        self.cancelled: list[_Ref] = []

    def wait(
        self, refs: list[_Ref], num_returns: int, timeout: float
    ) -> tuple[list[_Ref], list[_Ref]]:
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref: _Ref) -> JobResult:
        if ref.job.spec["key"] in self.dying:
            self.died_at = time.monotonic()
            raise RuntimeError("The worker died unexpectedly while executing this task.")
        return JobResult(ref.job.spec["key"], {"seed": 0}, None)

    def cancel(self, ref: _Ref, force: bool) -> None:
        self.cancelled.append(ref)


def _executor(
    monkeypatch: pytest.MonkeyPatch, dying: set[str], head_dies_after: float | None
) -> RayExecutor:
    """``head_dies_after``: seconds from the first worker's death to the head's (None: never)."""
    ray = _ScriptedRay(dying)
    monkeypatch.setitem(sys.modules, "ray", ray)

    def answers(host: str, port: int, timeout: float) -> str | None:
        died = ray.died_at
        gone = head_dies_after is not None and died is not None
        gone = gone and time.monotonic() - died > head_dies_after
        return "Connection refused" if gone else None

    monkeypatch.setattr(executors, "_answers", answers)
    executor = RayExecutor(threads=1, device="cpu")
    executor._remote = types.SimpleNamespace(remote=_Ref)
    executor._head = ("127.0.0.1", 6379)
    executor._address = "127.0.0.1:6379"
    executor.lost_after_s = 1.0
    executor.failure_confirm_s = 2.0
    return executor


def _jobs(*keys: str) -> list[Job]:
    return [_Job(spec={"key": key}, definition={}, task={}) for key in keys]


def test_a_worker_that_dies_with_its_head_is_lost_with_the_cluster_not_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    executor = _executor(monkeypatch, dying={"b"}, head_dies_after=0.7)
    results: list[JobResult] = []
    with pytest.raises(ClusterLostError, match="stopped answering"):
        executor.run(_jobs("a", "b", "c"), results.append)
    assert [(result.key, result.error) for result in results] == [("a", None), ("c", None)]


def test_a_worker_that_dies_while_the_head_answers_is_a_failed_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    executor = _executor(monkeypatch, dying={"b"}, head_dies_after=None)
    results: list[Any] = []
    started = time.monotonic()
    assert executor.run(_jobs("a", "b", "c"), results.append) is False
    assert time.monotonic() - started >= executor.failure_confirm_s
    assert sorted(result.key for result in results) == ["a", "b", "c"]
    (failed,) = [result for result in results if result.error is not None]
    assert failed.key == "b" and failed.error == (
        "Ray task failed: The worker died unexpectedly while executing this task."
    )


def test_ctrl_c_while_submitting_cancels_the_tasks_already_submitted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    executor = _executor(monkeypatch, dying=set(), head_dies_after=None)
    submitted: list[_Ref] = []

    def remote(job: Job) -> _Ref:
        if len(submitted) == 2:
            raise KeyboardInterrupt  # Ctrl-C lands while the third task is submitted
        submitted.append(_Ref(job))
        return submitted[-1]

    executor._remote = types.SimpleNamespace(remote=remote)
    results: list[JobResult] = []
    assert executor.run(_jobs("a", "b", "c"), results.append) is True
    ray = sys.modules["ray"]
    assert isinstance(ray, _ScriptedRay) and ray.cancelled == submitted
    assert not results


class _SwallowingRay(_ScriptedRay):
    """``wait`` takes a Ctrl-C and swallows any ``KeyboardInterrupt`` it raises inside, as a
    driver blocked in Ray's C++ wait was seen to do; no task ever finishes."""

    def __init__(self) -> None:
        super().__init__(dying=set())
        self.waits = 0

    def wait(
        self, refs: list[_Ref], num_returns: int, timeout: float
    ) -> tuple[list[_Ref], list[_Ref]]:
        self.waits += 1
        assert self.waits < 20, "the Ctrl-C was lost: the run went on waiting"
        try:
            if self.waits == 2:
                os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
        except KeyboardInterrupt:
            pass
        return [], refs


def test_ctrl_c_that_ray_wait_swallows_still_cancels_the_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    executor = _executor(monkeypatch, dying=set(), head_dies_after=None)
    ray = _SwallowingRay()
    monkeypatch.setitem(sys.modules, "ray", ray)
    before = signal.getsignal(signal.SIGINT)
    results: list[JobResult] = []
    assert executor.run(_jobs("a", "b"), results.append) is True
    assert [ref.job.spec["key"] for ref in ray.cancelled] == ["a", "b"] and not results
    assert ray.waits == 2, "the loop stops at its next turn after the Ctrl-C"
    assert signal.getsignal(signal.SIGINT) is before, "the Ctrl-C handler is put back"


def test_a_second_ctrl_c_interrupts_at_once_and_other_threads_keep_keyboard_interrupt() -> None:
    with executors._ctrl_c_noted() as pressed:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert pressed.is_set()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)
    seen: list[bool] = []

    def in_a_thread() -> None:
        with executors._ctrl_c_noted() as event:
            seen.append(event.is_set())

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join(5)
    assert seen == [False]  # no handler can be set there; nothing raised either
