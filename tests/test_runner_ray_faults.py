"""Ray faults of issue 20: no head at RAY_ADDRESS, the head dying mid-run, a worker dying.

Each test starts and stops its own Ray head on 127.0.0.1 (in its own process session, ended by
process id) and runs the driver, ``adabelief run --executor ray``, in a child process bounded in
time, as ``test_runner_ray.py`` does.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from adabelief.experiments.cli import EXIT_CLUSTER_LOST, EXIT_FAILED_RUNS, EXIT_USAGE
from test_runner_ray import _RAY_ENV, _SLOW_TASK, _end_session, _free_port

pytest.importorskip("ray")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds processes in /proc"),
]

_START_TIMEOUT_S = 60
_DRIVER_TIMEOUT_S = 150


@pytest.fixture(autouse=True)
def _ray_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in _RAY_ENV.items():
        monkeypatch.setenv(name, value)


@contextmanager
def _head() -> Iterator[tuple[str, int]]:
    """A 2-CPU Ray head on the loopback: ``(address, session id)``; always stopped."""
    ray_cli = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    if ray_cli is None:
        pytest.skip("the ray command is not installed")
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths are limited
    command = [ray_cli, "start", "--head", "--block", "--node-ip-address", "127.0.0.1"]
    command += ["--port", str(port), "--num-cpus", "2", "--num-gpus", "0"]
    command += ["--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp]
    head = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=dict(os.environ),
    )
    try:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            assert head.poll() is None, "the Ray head did not start"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the Ray head did not start in time"
                time.sleep(0.5)
        time.sleep(2)  # the raylet registers after the GCS port opens
        yield f"127.0.0.1:{port}", head.pid
    finally:
        _end_session(head.pid)
        head.wait(10)
        shutil.rmtree(temp, ignore_errors=True)


def _driver(task: Path, out: Path, address: str, seeds: int) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "adabelief.experiments.cli", "run", f"{task}:{task.stem}"]
    command += ["--seeds", str(seeds), "--optimizers", "adam", "--executor", "ray"]
    command += ["--no-progress", "--no-plots", "--out", str(out)]
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "RAY_ADDRESS": address},
        start_new_session=True,  # ended with its session if it outlives the test
    )


def _finish(driver: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    try:
        return driver.communicate(timeout=timeout)
    finally:
        if driver.poll() is None:
            _end_session(driver.pid)
            driver.wait(10)


#: A line of Ray's C++ log ("[2026-12-04 05:00:34,502 E 19887 19947] task_manager.cc:1545: ...").
#: The driver's core worker prints its errors to stderr from its own threads, at times when the
#: head dies ("Failed to push error to driver"); the runner cannot hold them back (setting
#: RAY_BACKEND_LOG_LEVEL makes Ray print a line that says so). The runner's own lines are what
#: these tests count.
_RAY_NATIVE_LOG = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+ [DIWEF] \d+ \d+\] \S+:\d+: ")


def _lines(text: str) -> list[str]:
    """The runner's lines of ``text``: not blank, not Ray's C++ log."""
    return [line for line in text.splitlines() if line.strip() and not _RAY_NATIVE_LOG.match(line)]


# --- 2: RAY_ADDRESS with no head --------------------------------------------------------------


def test_ray_address_without_a_head_is_one_line_within_30_seconds(tmp_path: Path) -> None:
    address = f"127.0.0.1:{_free_port()}"  # nothing listens there
    task = tmp_path / "slow.py"
    task.write_text(_SLOW_TASK)
    started = time.monotonic()
    driver = _driver(task, tmp_path / "out", address, seeds=2)
    _, err = _finish(driver, 60)
    elapsed = time.monotonic() - started
    assert driver.returncode == EXIT_USAGE, err[-2000:]
    (line,) = _lines(err)
    assert f"RAY_ADDRESS={address}" in line and "Traceback" not in err
    assert elapsed < 35, f"took {elapsed:.0f} s"
    assert not (tmp_path / "out").exists()


# --- 3: the head dies mid-run -----------------------------------------------------------------


def test_a_lost_cluster_is_one_line_with_the_runs_kept_and_the_resume_command(
    tmp_path: Path,
) -> None:
    task = tmp_path / "slow.py"
    task.write_text(_SLOW_TASK)
    out = tmp_path / "out"
    with _head() as (address, session):
        driver = _driver(task, out, address, seeds=3)
        try:
            deadline = time.monotonic() + 90
            while not list((out / "runs").glob("*.json")):
                assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()
                time.sleep(0.3)
            time.sleep(1)
            _end_session(session)  # the head dies; seeds 1 and 2 are still running
            lost_at = time.monotonic()
            _, err = _finish(driver, 90)
        finally:
            if driver.poll() is None:
                _end_session(driver.pid)
    assert driver.returncode == EXIT_CLUSTER_LOST, err[-3000:]
    assert time.monotonic() - lost_at < 45
    lines = _lines(err)
    assert len(lines) == 1, err
    (line,) = lines
    assert line.startswith(f"cluster lost: the Ray cluster at {address} stopped answering")
    assert f"1 runs finished before that, kept in {out / 'runs'}" in line
    assert f"; resume with: adabelief run {task}:slow --seeds 3 " in line
    assert line.endswith(f"--out {out}")
    assert len(list((out / "runs").glob("*.json"))) == 1


# --- 9: a Ray worker dies ---------------------------------------------------------------------

_DYING_TASK = """
import os
import signal
import time
from adabelief.experiments import user_task

@user_task(score="score")
def dying(make_optimizer, seed, quick):
    if seed == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would
    time.sleep(10)  # the driver is still running when the raylet reports the death
    return {"score": float(seed)}
"""


def test_a_dead_ray_worker_is_one_line_from_the_runner(tmp_path: Path) -> None:
    task = tmp_path / "dying.py"
    task.write_text(_DYING_TASK)
    out = tmp_path / "out"
    with _head() as (address, _):
        driver = _driver(task, out, address, seeds=3)
        stdout, err = _finish(driver, _DRIVER_TIMEOUT_S)
    assert driver.returncode == EXIT_FAILED_RUNS, err[-3000:]
    assert "2 runs done, 0 reused" in stdout and "1 failed" in stdout
    lines = _lines(err)
    assert len(lines) == 1, err
    (line,) = lines  # just the runner's line for the failed run
    assert "(raylet)" not in stdout + err and "unexpected system error" not in stdout + err
    assert line.startswith("failed: dying-dying-adam-s1-") and "worker died" in line, err
