"""Results that can be trusted: each bug a new user found has a test that fails without its fix.

Stale runs after a data change, thread count outside the run key, two processes sharing one
``--out``, orphaned workers, missed divergence, one-seed verdicts, corrupt data, an empty
validation file, a failing command replacing a good report, bad output paths, file
permissions, corrupt run files, plots, and the thread default.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from adabelief.experiments.analysis import analyze
from adabelief.experiments.cli import main
from adabelief.experiments.report import build_report
from adabelief.experiments.runner import run_experiments
from adabelief.experiments.store import RunStore, atomic_write_text
from cli_output import one_error_line
from test_experiments_data import write_fake_cifar, write_fake_ptb
from test_experiments_runner import SYNTHETIC, options_for, synthetic_record

pytestmark = pytest.mark.usefixtures("restore_torch_globals")


# --- stale runs after a data change -------------------------------------------------------


@pytest.mark.parametrize("task", ["lm", "classify"])
def test_changed_data_files_are_not_served_stale_runs(tmp_path: Path, task: str) -> None:
    data = tmp_path / "data"
    if task == "lm":
        write_fake_ptb(data)
        changed = data / "ptb.test.txt"
    else:
        write_fake_cifar(data, per_batch=8)
        changed = data / "test_batch"
    options = options_for(
        tmp_path / "out", tasks=(task,), data_dir=data, seeds=1, optimizers=("adam",)
    )
    first, _ = run_experiments(options)
    assert len(first.ran) == 1 and not first.failed
    again, _ = run_experiments(options)
    assert again.ran == [] and again.reused == 1
    if task == "lm":
        changed.write_text(changed.read_text() + " the dog sat on a cat \n" * 3)
    else:
        write_fake_cifar(data, per_batch=10)
    after, report = run_experiments(options)
    assert len(after.ran) == 1 and after.reused == 0  # the new data is trained on
    assert report is not None
    results = analyze(RunStore(tmp_path / "out")).results
    assert len(results) == 2  # old and new data are separate experiments, never mixed
    assert {r.label for r in results} == {
        f"data {r.experiment.settings['data_fingerprint']}" for r in results
    }


# --- thread count ----------------------------------------------------------------------------


def test_thread_count_is_part_of_a_run(tmp_path: Path) -> None:
    one, _ = run_experiments(options_for(tmp_path, seeds=1, optimizers=("adam",), threads=1))
    two, _ = run_experiments(options_for(tmp_path, seeds=1, optimizers=("adam",), threads=2))
    assert len(one.ran) == len(two.ran) == 6 and two.reused == 0
    results = analyze(RunStore(tmp_path)).results
    assert len(results) == 12
    assert {r.label for r in results} == {"1 threads", "2 threads"}
    assert all(len(r.get("adam").chosen.records) == 1 for r in results)  # type: ignore[union-attr]


def test_default_is_one_thread_per_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[Any] = []

    def fake_run(options: Any, command: str) -> Any:
        seen.append(options)
        raise KeyboardInterrupt

    monkeypatch.setattr("adabelief.experiments.runner.run_experiments", fake_run)
    assert main(["run", "toy", "--jobs", "1", "--out", str(tmp_path)]) == 130
    assert main(["run", "toy", "--out", str(tmp_path)]) == 130
    assert [o.threads for o in seen] == [1, 1]
    assert seen[0].jobs == 1 and seen[1].jobs >= 1


# --- two processes, one --out ----------------------------------------------------------------


def _update_many(root: str, prefix: str, count: int, start: Any) -> None:
    store = RunStore(Path(root))
    start.wait()
    for i in range(count):
        store.update_manifest({f"{prefix}{i}": {"mode": "paper", "experiments": []}})


def test_two_processes_updating_the_manifest_lose_nothing(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    workers = [
        context.Process(target=_update_many, args=(str(tmp_path), prefix, 40, start))
        for prefix in ("a", "b")
    ]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    tasks = RunStore(tmp_path).read_manifest()["tasks"]
    assert set(tasks) == {f"{p}{i}" for p in "ab" for i in range(40)}


# --- orphaned workers ------------------------------------------------------------------------

_SLOW_TASK = """
import time
from pathlib import Path
from adabelief.experiments import user_task

@user_task(score="score")
def slow(make_optimizer, seed, quick):
    Path(__file__).with_name(f"started-{seed}").write_text("")
    time.sleep(120)
    return {"score": 1.0}
"""


def _children(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == parent and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
@pytest.mark.slow  # driver and workers in subprocesses
def test_workers_exit_when_the_parent_dies(tmp_path: Path, how: signal.Signals) -> None:
    task = tmp_path / "slow.py"
    task.write_text(_SLOW_TASK)
    command = [sys.executable, "-m", "adabelief.experiments.cli", "run", f"{task}:slow"]
    command += ["--seeds", "2", "--optimizers", "adam", "--jobs", "2", "--no-progress"]
    command += ["--out", str(tmp_path / "out")]
    parent = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and len(list(tmp_path.glob("started-*"))) < 2:
            assert parent.poll() is None, parent.communicate()
            time.sleep(0.2)
        workers = _children(parent.pid)
        assert len(workers) == 2, "both workers should be training"
        parent.send_signal(how)
        parent.wait(30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in workers), "workers outlived their parent"
        if how == signal.SIGTERM:  # handled like Ctrl-C: one message, the interrupted status
            _, err = parent.communicate()
            assert parent.returncode == 130 and "interrupted" in err and "Traceback" not in err
    finally:
        for pid in [parent.pid, *workers]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        parent.wait(10)


# --- divergence and verdicts ---------------------------------------------------------------


def test_diverged_runs_are_left_out_of_means(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    for seed in range(3):
        store.save(synthetic_record("adam", seed, {"score": 1.0, "val": 1.0, "speed": 5.0}))
        diverged = seed == 2
        metrics = {"score": 1e98 if diverged else 2.0, "val": 1.0, "speed": 5.0}
        store.save(synthetic_record("adabelief", seed, metrics, diverged=diverged))
    (result,) = analyze(store).results
    summary = result.summary("adabelief", "score")
    assert summary.n == 2 and summary.mean == 2.0
    assert result.get("adabelief").chosen.diverged == 1  # type: ignore[union-attr]


def test_one_seed_is_not_tested(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["run", "toy", "--quick", "--tiny", "--seeds", "1", "--optimizers", "adabelief,adam"]
    argv += ["--out", str(tmp_path), "--jobs", "1", "--no-progress", "--no-plots"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "fast, like adaptive methods (Adam): not tested" in out
    assert "consistent" not in out


# --- corrupt and empty data ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "damage", "named"),
    [
        ("classify", lambda d: (d / "data_batch_2").write_bytes(b"\x80\x04junk"), "data_batch_2"),
        ("classify", lambda d: (d / "test_batch").write_bytes(b""), "test_batch"),
        (
            "lm",
            lambda d: (d / "ptb.train.txt").write_bytes(bytes(range(256)) * 40),
            "ptb.train.txt",
        ),
        ("lm", lambda d: (d / "ptb.test.txt").write_text("tiny\n"), "ptb.test.txt"),
        ("lm", lambda d: (d / "ptb.valid.txt").write_text(""), "ptb.valid.txt"),
    ],
)
def test_corrupt_data_is_a_one_line_error_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], task: str, damage: Any, named: str
) -> None:
    data = tmp_path / "data"
    write_fake_cifar(data)
    write_fake_ptb(data)
    damage(data)
    out = tmp_path / "out"
    assert main(["run", task, "--quick", "--tiny", "--data", str(data), "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert named in line
    assert not (out / "runs").exists() and not (out / "report.md").exists()


def test_plots_survive_runs_that_all_diverged(tmp_path: Path) -> None:
    from adabelief.experiments.plots import plot_curves

    store = RunStore(tmp_path)
    experiment = dataclasses.replace(SYNTHETIC, curves=(("val_ppl", "ppl"),))
    for optimizer in ("adabelief", "adam"):
        for seed in range(2):
            curves = {"x": [1.0, 2.0], "val_ppl": [None, None]}
            store.save(
                synthetic_record(
                    optimizer,
                    seed,
                    {"score": None},
                    experiment=experiment,
                    diverged=True,
                    curves=curves,
                )
            )
    (result,) = analyze(store).results
    assert plot_curves(result, tmp_path / "p.png") is not None
    report = build_report(tmp_path)  # plots included
    assert report.path.is_file()


# --- the report ----------------------------------------------------------------------------

_FAILING_TASK = """
from adabelief.experiments import user_task

@user_task(score="score")
def broken(make_optimizer, seed, quick):
    raise RuntimeError("this task always fails")
"""


def test_report_covers_every_run_and_a_failing_command_keeps_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    common = ["--quick", "--tiny", "--seeds", "2", "--out", str(out), "--jobs", "1"]
    common += ["--no-progress", "--no-plots"]
    assert main(["run", "toy", "--optimizers", "adabelief,adam", *common]) == 0
    assert main(["run", "toy", "--optimizers", "sgd", *common]) == 0
    capsys.readouterr()
    text = (out / "report.md").read_text()
    assert "covers every valid run file" in text and ": 36 runs in 6 experiments" in text
    section = text.split("### toy/abs:")[1].split("###")[0]
    assert all(f"| {name} |" in section for name in ("adabelief", "adam", "sgd"))
    task = tmp_path / "broken.py"
    task.write_text(_FAILING_TASK)
    good = (out / "report.md").read_bytes()
    assert main(["run", f"{task}:broken", *common]) == 1
    err = capsys.readouterr().err
    assert "this task always fails" in err and "left as it was" in err
    assert (out / "report.md").read_bytes() == good
    assert main(["report", str(out), "--no-plots"]) == 0
    assert "36 runs read" in capsys.readouterr().out


def test_corrupt_run_files_are_named_not_counted_as_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["run", "toy", "--quick", "--tiny", "--seeds", "2", "--optimizers", "adam"]
    argv += ["--out", str(tmp_path), "--jobs", "1", "--no-progress", "--no-plots"]
    assert main(argv) == 0
    runs = sorted((tmp_path / "runs").glob("*.json"))
    truncated, oops = runs[0], runs[1]
    truncated.write_text(truncated.read_text()[:50])
    data = json.loads(oops.read_text())
    data["metrics"] = "oops"
    oops.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["report", str(tmp_path), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "10 runs read" in out and "2 run files are not valid" in out
    text = (tmp_path / "report.md").read_text()
    assert truncated.name in text and "truncated" in text
    assert oops.name in text and '"metrics" must map names to numbers' in text
    assert main(argv) == 0  # the next run redoes them, and says so
    captured = capsys.readouterr()
    assert "2 runs done, 10 reused" in captured.out
    assert truncated.name in captured.err and oops.name in captured.err


# --- output paths and permissions -----------------------------------------------------------


def test_bad_output_folders_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    targets = [a_file, a_file / "below"]
    if os.geteuid() == 0:  # root writes anywhere: use a folder no one may create files in
        targets.append(Path("/sys/adabelief-test-out"))
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        targets.append(locked)
    for target in targets:
        argv = ["run", "toy", "--quick", "--tiny", "--seeds", "2", "--out", str(target)]
        assert main(argv) == 2, target
        line = one_error_line(capsys)
        assert f"--out {target}" in line


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_respect_the_umask(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        store = RunStore(tmp_path)
        record = synthetic_record("adam", 0, {"score": 1.0})
        path = store.save(record)
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == expected
    assert path.stat().st_mode & 0o777 == expected


# --- plots ---------------------------------------------------------------------------------


def test_plots_label_axes_and_keep_other_lines_visible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib.figure import Figure

    from adabelief.experiments import plots
    from adabelief.experiments.tasks import TASKS

    figures: dict[str, Figure] = {}

    def keep(figure: Figure, path: Path) -> Path:
        figures[path.name] = figure
        return path

    monkeypatch.setattr(plots, "save_figure", keep)
    summary, _ = run_experiments(options_for(tmp_path, tasks=("toy", "gan"), seeds=1))
    assert not summary.failed
    store = RunStore(tmp_path)
    results = {r.name: r for r in analyze(store).results}
    # A diverged run with an enormous curve must not stretch the axes.
    rosenbrock = results["toy/rosenbrock"]
    sgd = rosenbrock.get("sgd")
    assert sgd is not None
    record = dict(sgd.chosen.records[0], diverged=True)
    record["curves"] = dict(record["curves"], distance=[1.0, 1e112])
    sgd.chosen.records[0] = record
    plots.plot_curves(rosenbrock, tmp_path / "curves.png")
    curve_axes = figures["curves.png"].axes[0]
    assert curve_axes.get_ylim()[1] < 1e3 and curve_axes.get_xlabel() == "step"
    TASKS["toy"].plots(rosenbrock, tmp_path)
    axes = figures["toy-rosenbrock-trajectories.png"].axes[0]
    assert (axes.get_xlabel(), axes.get_ylabel()) == ("x", "y")
    lines = {line.get_label(): line for line in axes.get_lines()}
    mine = next(line for label, line in lines.items() if label.startswith("adabelief"))
    others = [line for label, line in lines.items() if label.startswith(("adam", "sgd"))]
    assert others and all(line.get_zorder() > mine.get_zorder() for line in others)
    assert "first seed" in axes.get_title()
    TASKS["gan"].plots(results["gan/gan-mog"], tmp_path)
    points = figures["gan-gan-mog-points.png"]
    assert all("hq" not in a.get_title() for a in points.axes)
    assert any("high-quality" in a.get_title() for a in points.axes)
    assert "first seed" in points.get_suptitle()


def test_a_report_without_adabelief_runs_claims_nothing(tmp_path: Path) -> None:
    """All of AdaBelief's runs failed: the report must not call it 'at least as good'."""
    store = RunStore(tmp_path)
    store.update_manifest({"synthetic": {"optimizers": ["adabelief", "adam"], "experiments": []}})
    for seed in range(2):
        store.save(synthetic_record("adam", seed, {"score": 1.0, "val": 1.0, "speed": 1.0}))
    text = build_report(tmp_path, make_plots=False).path.read_text()
    assert "AdaBelief was requested but none of its runs finished" in text
    assert "at least as good" not in text and "nothing was compared" in text


_DYING_TASK = """
import os
import signal
from adabelief.experiments import user_task

@user_task(score="score")
def dies(make_optimizer, seed, quick):
    if seed == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's out-of-memory killer would
    return {"score": 1.0}
"""


def test_a_worker_that_dies_fails_its_run_not_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = tmp_path / "dies.py"
    task.write_text(_DYING_TASK)
    argv = ["run", f"{task}:dies", "--seeds", "2", "--optimizers", "adam", "--jobs", "2"]
    argv += ["--out", str(tmp_path / "out"), "--no-progress", "--no-plots"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "a worker process died" in captured.err and "interrupted" not in captured.err
