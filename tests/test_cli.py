"""The ``adabelief`` command line: help, errors without tracebacks, run/report/presets/bench."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from adabelief.experiments.cli import main
from cli_output import one_error_line

pytestmark = pytest.mark.usefixtures("restore_torch_globals")


@pytest.mark.parametrize("command", [[], ["run"], ["report"], ["presets"]])
def test_help_for_every_subcommand(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: adabelief" in out
    if command == ["run"]:
        for option in (
            "--quick",
            "--seeds",
            "--optimizers",
            "--mode",
            "--data",
            "--out",
            "--device",
            "--jobs",
            "--threads",
            "--trials",
            "--executor",
        ):
            assert option in out
        for word in (
            "toy",
            "classify",
            "lm",
            "transformer",
            "gan",
            "all",
            "FILE.py:FUNCTION",
            "data_batch_1",
            "ptb.train.txt",
            "wiki.train.tokens",
            "RAY_ADDRESS",
            "report.md",
        ):
            assert word in out
    if not command:
        for sub in ("run", "report", "presets", "bench"):
            assert sub in out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run", "toys"], "unknown task 'toys'"),
        (["run", "toy", "--optimizers", "adam,nope"], "unknown optimizer 'nope'"),
        (["run", "toy", "--seeds", "0"], "positive integer"),
        (["run", "toy", "--seeds", "three"], "positive integer"),
        (["run", "toy", "--jobs", "-1"], "positive integer"),
        (["run", "toy", "--mode", "tuned"], "invalid choice"),
        (["run", "toy", "--data", "/no/such/folder"], "is not a folder"),
        (["run", "toy", "--trials", "3"], "--trials only applies to --mode fair"),
        (["run", "toy", "--executor", "ray", "--jobs", "2"], "--jobs applies to --executor local"),
        (["run", "toy", "--executor", "dask"], "invalid choice"),
        (["run", "toy", "--threads", "0"], "positive integer"),
        (["run"], "required"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_give_one_clear_line(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert expected in one_error_line(capsys)


def test_unknown_optimizer_lists_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "toy", "--optimizers", "adamx"]) == 2
    line = one_error_line(capsys)
    for name in ("adabelief", "sgd", "adam", "adamw", "radam"):
        assert name in line


def test_data_folder_without_expected_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "readme.txt").write_text("nothing useful")
    assert main(["run", "classify", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no CIFAR-10 python pickles" in one_error_line(capsys)
    assert main(["run", "lm", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no Penn Treebank text files" in one_error_line(capsys)
    assert main(["run", "all", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "CIFAR-10" in one_error_line(capsys)
    assert not (tmp_path / "o" / "runs").exists()


def test_report_on_a_folder_that_is_not_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "not an adabelief run folder" in one_error_line(capsys)
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in one_error_line(capsys)


def test_presets_lists_every_task(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in (
        "toy/rosenbrock",
        "classify/cifar10",
        "lm/ptb-3layer",
        "transformer/python-docs-char",
        "gan/wgan-gp-mog",
        "user/defaults",
    ):
        assert name in out
    assert "fair mode: 4 trials per optimizer with --quick" in out
    assert "beta1 in [0.5, 0.95]" in out and "momentum in [0, 0.99]" in out
    assert main(["presets", "lm"]) == 0
    only_lm = capsys.readouterr().out
    assert "lm/ptb-1layer" in only_lm and "classify/" not in only_lm


def test_presets_lists_the_bfloat16_model_variants(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["presets", "user"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # undo the wrapping
    for name in (
        "adabelief_bf16w_fp32master",
        "adabelief_bf16w_round",
        "adabelief_bf16w_residual_int8",
        "adabelief_bf16w_residual_int4",
    ):
        assert f"{name}: bfloat16 model;" in out
    assert "about 5 bytes per parameter) (trains the model in bfloat16)" in out


def test_bench_forwards_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[list[str]] = []
    fake = types.ModuleType("adabelief.experiments.bench")
    fake.main = lambda argv: received.append(argv) or 7  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "adabelief.experiments.bench", fake)
    assert main(["bench", "--steps", "3", "--help"]) == 7
    assert received == [["--steps", "3", "--help"]]


def test_bench_without_the_module(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "adabelief.experiments.bench", None)
    assert main(["bench"]) == 2
    assert "adabelief.experiments.bench" in one_error_line(capsys)


def test_run_and_report_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = ["run", "toy", "--quick", "--tiny", "--seeds", "2", "--optimizers", "adabelief,adam"]
    argv += ["--out", str(out), "--jobs", "1", "--threads", "1", "--no-progress", "--no-plots"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "24 runs done, 0 reused" in printed and "report:" in printed
    assert main(argv) == 0
    assert "0 runs done, 24 reused" in capsys.readouterr().out
    assert main(["report", str(out), "--no-plots"]) == 0
    assert "24 runs read, 0 planned runs missing" in capsys.readouterr().out
    assert (out / "report.md").is_file() and (out / "summary.csv").is_file()


def test_console_script_errors_have_no_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "adabelief.experiments.cli", "run", "nosuchtask"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "unknown task 'nosuchtask'" in result.stderr


def test_the_console_script_is_the_runner_cli() -> None:
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="adabelief")
    assert script.value == "adabelief.experiments.cli:main"


def test_ray_executor_without_ray_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    argv = ["run", "toy", "--quick", "--tiny", "--executor", "ray", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "pip install 'adabelief[ray]'" in one_error_line(capsys)
    assert not list((tmp_path / "runs").glob("*.json"))
    assert not (tmp_path / "manifest.json").exists()
