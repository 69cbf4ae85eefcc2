"""``--executor ray`` against a Ray head this test starts on 127.0.0.1 (bounded, always stopped).

The head runs in its own process session; the finalizer ends that session's processes by their
ids, so nothing else on the machine is touched.  The runs are compared with the local executor's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from adabelief.experiments.runner import run_experiments
from test_experiments_runner import options_for

ray = pytest.importorskip("ray")

_START_TIMEOUT_S = 60
#: Ray can retry a failed connection for many minutes: every Ray driver here runs in a child
#: process that is stopped after this.
_TEST_TIMEOUT_S = 240
_TASK = """
from adabelief.experiments import user_task

@user_task(score="final", higher_is_better=False)
def quadratic(make_optimizer, seed, quick):
    import torch
    w = torch.nn.Parameter(torch.full((3,), float(seed + 1)))
    optimizer = make_optimizer([w])
    losses = []
    for _ in range(25):
        loss = (w ** 2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {"final": losses[-1], "loss": losses}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _session_processes(session: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def _end_session(session: int) -> None:
    for how in (signal.SIGTERM, signal.SIGKILL):
        for pid in _session_processes(session):
            try:
                os.kill(pid, how)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _session_processes(session):
            time.sleep(0.2)


#: Ray's settings for these tests, for the head, the drivers and this process: no token
#: authentication (a local ray.init() otherwise writes ~/.ray/auth_token, after which every later
#: head on the machine demands it), and "127.0.0.1" kept on the loopback (Ray otherwise replaces
#: a localhost address by the machine's outward-facing one).
_RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


@pytest.fixture(scope="module", autouse=True)
def _ray_environment() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in _RAY_ENV.items():
            patch.setenv(name, value)
        yield


@pytest.fixture(scope="module")
def ray_address(_ray_environment: None) -> Iterator[str]:
    """A 2-CPU Ray head on the loopback, in its own session; stopped afterwards."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the fixture finds the head's processes in /proc")
    ray_cli = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    if ray_cli is None:
        pytest.skip("the ray command is not installed")
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths are limited
    head = subprocess.Popen(
        [
            ray_cli,
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--num-cpus",
            "2",
            "--num-gpus",
            "0",
            "--include-dashboard",
            "false",
            "--disable-usage-stats",
            "--temp-dir",
            temp,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=dict(os.environ),
    )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            assert head.poll() is None, head.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the Ray head did not start in time"
                time.sleep(0.5)
        time.sleep(2)  # the raylet registers after the GCS port opens
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        _end_session(head.pid)
        head.wait(10)
        shutil.rmtree(temp, ignore_errors=True)


# A Ray head and driver subprocesses: the slow tier.
pytestmark = [pytest.mark.usefixtures("restore_torch_globals"), pytest.mark.slow]


def _ray_cli(args: list[str]) -> subprocess.CompletedProcess[str]:
    """``adabelief run ... --executor ray`` in a fresh driver process (bounded in time).

    A fresh process reads the Ray settings of :data:`_RAY_ENV` when it imports Ray; this test
    process imported Ray before the module fixture set them.
    """
    command = [sys.executable, "-m", "adabelief.experiments.cli", "run", *args]
    return subprocess.run(
        [*command, "--executor", "ray", "--no-progress", "--no-plots"],
        capture_output=True,
        text=True,
        timeout=_TEST_TIMEOUT_S,
        env=dict(os.environ),
        check=False,
    )


def test_ray_runs_match_local_runs(
    ray_address: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = tmp_path / "quadratic.py"
    task.write_text(_TASK)
    tasks = ("toy", f"{task}:quadratic")
    local, _ = run_experiments(
        options_for(tmp_path / "local", tasks=tasks, seeds=1, optimizers=("adabelief", "sgd"))
    )
    assert len(local.ran) == 14 and not local.failed
    monkeypatch.setenv("RAY_ADDRESS", ray_address)
    out = tmp_path / "ray"
    args = [*tasks, "--quick", "--tiny", "--seeds", "1", "--optimizers", "adabelief,sgd"]
    args += ["--threads", "1", "--out", str(out)]
    first = _ray_cli(args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "14 runs done, 0 reused" in first.stdout
    for path in (tmp_path / "local" / "runs").glob("*.json"):
        mine = json.loads(path.read_text())
        theirs = json.loads((out / "runs" / path.name).read_text())  # the same run keys
        assert theirs["executor"] == "ray" and mine["executor"] == "local"
        assert theirs["host"] == socket.gethostname()
        assert theirs["metrics"] == mine["metrics"]
        assert theirs["curves"].get("distance") == mine["curves"].get("distance")
    assert "ray on" in (out / "report.md").read_text()
    again = _ray_cli(args)  # resume works the same
    assert again.returncode == 0 and "0 runs done, 14 reused" in again.stdout


_SLOW_TASK = """
import time
from adabelief.experiments import user_task

@user_task(score="score")
def slow(make_optimizer, seed, quick):
    if seed > 0:
        time.sleep(120)
    return {"score": float(seed)}
"""


def _stacks_and_stderr(driver: subprocess.Popen[str]) -> str:
    """End a driver that overran its time with SIGABRT and return its stderr, which ends with
    every thread's Python stack (the driver runs with ``PYTHONFAULTHANDLER=1``), after its
    signal masks (blocked, ignored, caught: a Ctrl-C that the driver never saw shows there)."""
    try:
        status = Path(f"/proc/{driver.pid}/status").read_text().splitlines()
        masks = "\n".join(
            line for line in status if line.startswith(("SigBlk", "SigIgn", "SigCgt"))
        )
    except OSError:
        masks = "(no /proc status)"
    driver.send_signal(signal.SIGABRT)
    try:
        _, err = driver.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        driver.kill()
        _, err = driver.communicate()
    return masks + "\n" + str(err)[-6000:]


def test_ctrl_c_cancels_pending_ray_tasks_and_keeps_finished_runs(
    ray_address: str, tmp_path: Path
) -> None:
    task = tmp_path / "slow.py"
    task.write_text(_SLOW_TASK)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "adabelief.experiments.cli", "run", f"{task}:slow"]
    command += ["--seeds", "3", "--optimizers", "adam", "--executor", "ray", "--no-progress"]
    command += ["--out", str(out)]
    driver = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "RAY_ADDRESS": ray_address, "PYTHONFAULTHANDLER": "1"},
    )
    try:
        # Ctrl-C once seed 0 is saved (seeds 1 and 2 sleep for 120 s in their tasks).
        deadline = time.monotonic() + 90
        while not list((out / "runs").glob("*.json")):
            assert driver.poll() is None, driver.communicate()
            if time.monotonic() > deadline:
                pytest.fail(f"no run finished within 90 s:\n{_stacks_and_stderr(driver)}")
            time.sleep(0.3)
        time.sleep(0.5)
        driver.send_signal(signal.SIGINT)
        try:
            _, err = driver.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the driver ran on 60 s after Ctrl-C:\n{_stacks_and_stderr(driver)}")
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.communicate()
    assert driver.returncode == 130, err
    assert "interrupted: finished runs are saved" in err and "Traceback" not in err
    assert len(list((out / "runs").glob("*.json"))) == 1
