"""The runner never fails silently (issue 20): each fault a user met has a test, bounded in time.

A task calling ``sys.exit``, a killed worker, an incomplete CIFAR-10 beside a valid CIFAR-100,
failed runs' reasons after the fact, two commands on one ``--out``, a task file's syntax error,
and an executor that cannot start.  The Ray faults are in ``test_runner_ray_faults.py``.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adabelief.experiments.cli import (
    EXIT_CLUSTER_LOST,
    EXIT_FAILED_RUNS,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    main,
)
from cli_output import one_error_line
from test_cifar100 import write_fake_cifar100
from test_experiments_data import write_fake_cifar

pytestmark = pytest.mark.usefixtures("restore_torch_globals")


def _argv(task: str, out: Path, *extra: str) -> list[str]:
    return ["run", task, "--optimizers", "adam", "--out", str(out), "--no-progress", "--no-plots"]


# --- 1: a task that calls sys.exit() ----------------------------------------------------------

_EXITING_TASK = """
import argparse
import sys
from adabelief.experiments import user_task

@user_task(score="score")
def exits(make_optimizer, seed, quick):
    if seed == 1:
        argparse.ArgumentParser(prog="mine").parse_args(["--no-such-flag"])
    if seed == 2:
        sys.exit()
    return {"score": float(seed)}
"""


def _run_exiting_task(tmp_path: Path, capsys: pytest.CaptureFixture[str], jobs: str) -> None:
    task = tmp_path / "exits.py"
    task.write_text(_EXITING_TASK)
    out = tmp_path / "out"
    argv = [*_argv(f"{task}:exits", out), "--seeds", "4", "--jobs", jobs]
    assert main(argv) == EXIT_FAILED_RUNS
    captured = capsys.readouterr()
    assert "2 runs done, 0 reused" in captured.out and "2 failed" in captured.out
    failed = [line for line in captured.err.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 2, captured.err
    assert any("sys.exit(2)" in line for line in failed)  # argparse's exit status
    assert any("sys.exit(None)" in line for line in failed)
    assert len(list((out / "runs").glob("*.json"))) == 2
    assert (out / "report.md").exists()


def test_a_task_calling_sys_exit_fails_its_run_in_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _run_exiting_task(tmp_path, capsys, "1")


@pytest.mark.slow
def test_a_task_calling_sys_exit_fails_its_run_in_a_worker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _run_exiting_task(tmp_path, capsys, "2")


# --- 4: one worker killed, --jobs 2 -----------------------------------------------------------

_DYING_TASK = """
import os
import signal
import time
from adabelief.experiments import user_task

@user_task(score="score")
def dies(make_optimizer, seed, quick):
    if seed == 1:
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's out-of-memory killer would
    return {"score": float(seed)}
"""


@pytest.mark.slow
def test_a_killed_worker_fails_only_its_run_and_the_rest_finish(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = tmp_path / "dies.py"
    task.write_text(_DYING_TASK)
    out = tmp_path / "out"
    argv = [*_argv(f"{task}:dies", out), "--seeds", "3", "--jobs", "2"]
    argv[argv.index("adam")] = "adam,sgd"
    assert main(argv) == EXIT_FAILED_RUNS
    captured = capsys.readouterr()
    assert "4 runs done, 0 reused" in captured.out and "2 failed" in captured.out
    failed = [line for line in captured.err.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 2 and all("killed by SIGKILL" in line for line in failed), captured.err
    assert len(list((out / "runs").glob("*.json"))) == 4


# --- 5: an incomplete CIFAR-10 beside a valid CIFAR-100 -----------------------------------------


def test_an_incomplete_cifar10_beside_cifar100_is_the_same_error_as_for_gan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    write_fake_cifar(data / "cifar-10-batches-py")
    (data / "cifar-10-batches-py" / "data_batch_3").unlink()
    write_fake_cifar100(data / "cifar-100-python")
    lines = {}
    for task in ("gan", "classify"):
        argv = ["run", task, "--quick", "--tiny", "--data", str(data)]
        assert main([*argv, "--out", str(tmp_path / task)]) == EXIT_USAGE
        lines[task] = one_error_line(capsys)
        assert not (tmp_path / task).exists()
    assert lines["classify"] == lines["gan"]
    assert "cifar-10-batches-py: data_batch_3 missing" in lines["classify"]


# --- 8: a task file with a syntax error -------------------------------------------------------


def test_a_syntax_error_names_its_line_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = tmp_path / "syntax.py"
    task.write_text("import math\n\n\n\ndef broken()\n    return {}\n")
    assert main(_argv(f"{task}:broken", tmp_path / "out")) == EXIT_USAGE
    line = one_error_line(capsys)
    assert line.count("line 5") == 1 and "syntax.py, line" not in line, line
    assert "SyntaxError: expected ':' (line 5)" in line


# --- 10: the executor cannot start ------------------------------------------------------------


def test_an_executor_that_cannot_start_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    out = tmp_path / "new" / "out"
    argv = ["run", "toy", "--quick", "--tiny", "--executor", "ray", "--out", str(out)]
    assert main(argv) == EXIT_USAGE
    assert "pip install 'adabelief[ray]'" in one_error_line(capsys)
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    assert main([*argv[:-1], str(existing)]) == EXIT_USAGE
    one_error_line(capsys)
    assert not list(existing.iterdir())


# --- 6: a failed run's reason is kept ---------------------------------------------------------

_FLAKY_TASK = """
from pathlib import Path
from adabelief.experiments import user_task

@user_task(score="score")
def flaky(make_optimizer, seed, quick):
    if seed == 1 and Path(__file__).with_name("fail").exists():
        raise RuntimeError("the disk of seed 1 is full")
    return {"score": float(seed)}
"""


def test_a_failed_runs_reason_is_kept_and_reported_until_it_finishes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = tmp_path / "flaky.py"
    task.write_text(_FLAKY_TASK)
    (tmp_path / "fail").write_text("")
    out = tmp_path / "out"
    argv = [*_argv(f"{task}:flaky", out), "--seeds", "3"]
    assert main(argv) == EXIT_FAILED_RUNS
    capsys.readouterr()
    (failure,) = [json.loads(p.read_text()) for p in (out / "failed").glob("*.json")]
    assert failure["seed"] == 1 and failure["optimizer"] == "adam"
    assert failure["error"] == "RuntimeError: the disk of seed 1 is full"
    assert "Traceback" in failure["traceback"] and failure["command"].startswith("adabelief run")
    report = (out / "report.md").read_text()
    assert "## Failed runs" in report and "RuntimeError: the disk of seed 1 is full" in report
    logged = json.loads((out / "manifest.json").read_text())["commands"][-1]
    assert logged["status"] == "failed" and logged["ran"] == 2
    assert logged["failed"] == {failure["key"]: failure["error"]}
    finished = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    (tmp_path / "fail").unlink()
    assert main(argv) == EXIT_OK  # the same command retries only the failed run
    assert "1 runs done, 2 reused" in capsys.readouterr().out
    assert not list((out / "failed").glob("*.json"))
    assert "## Failed runs" not in (out / "report.md").read_text()
    assert json.loads((out / "manifest.json").read_text())["commands"][-1]["status"] == "finished"
    for path, mtime in finished.items():  # finished runs are never rewritten
        assert path.stat().st_mtime_ns == mtime


# --- 7: two commands on one --out -------------------------------------------------------------

_COUNTING_TASK = """
import os
import time
from pathlib import Path
from adabelief.experiments import user_task

@user_task(score="score")
def counted(make_optimizer, seed, quick):
    here = Path(__file__)
    with here.with_name(f"trained-{seed}").open("a") as log:
        log.write(f"{os.getpid()}\\n")
    deadline = time.monotonic() + 60
    while not here.with_name("go").exists() and time.monotonic() < deadline:
        time.sleep(0.1)  # the test lets the first command go on once the second one waits
    return {"score": float(seed)}
"""


@pytest.mark.slow
def test_two_commands_on_one_folder_never_train_a_run_twice(tmp_path: Path) -> None:
    task = tmp_path / "counted.py"
    task.write_text(_COUNTING_TASK)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "adabelief.experiments.cli"]
    command += [*_argv(f"{task}:counted", out), "--seeds", "3", "--jobs", "1"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second: subprocess.Popen[str] | None = None
    try:
        deadline = time.monotonic() + 90
        while not (tmp_path / "trained-0").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.1)
        second = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert second.stderr is not None
        # printed before it waits; bounded, since without run locks it trains instead
        ready, _, _ = select.select([second.stderr], [], [], 60)
        note = second.stderr.readline() if ready else ""
        (tmp_path / "go").write_text("")
        out_first, err_first = first.communicate(timeout=120)
        out_second, err_second = second.communicate(timeout=120)
    finally:
        (tmp_path / "go").write_text("")
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(10)
    assert first.returncode == EXIT_OK, err_first
    assert second.returncode == EXIT_OK, note + err_second
    assert f"waiting for 3 runs that another command is training in {out}" in note
    for seed in range(3):  # each run trained once, by the first command
        assert len((tmp_path / f"trained-{seed}").read_text().split()) == 1
    assert "3 runs done, 0 reused" in out_first
    assert "0 runs done, 3 reused" in out_second


# --- exit statuses ------------------------------------------------------------------------------


def test_help_documents_every_exit_status_and_the_faults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["run", "--help"]) == EXIT_OK
    text = capsys.readouterr().out
    statuses = text.split("exit status:", 1)[1].split("examples:", 1)[0]
    codes = [int(line.split()[0]) for line in statuses.splitlines() if line.strip()]
    assert codes == [EXIT_OK, EXIT_FAILED_RUNS, EXIT_USAGE, EXIT_CLUSTER_LOST, EXIT_INTERRUPTED]
    assert len(set(codes)) == len(codes)
    assert "faults:" in text and "never train one run twice" in text
