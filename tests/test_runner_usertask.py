"""The user's own task: ``adabelief run FILE.py:FUNCTION``, through the same protocol."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from adabelief.experiments import user_task
from adabelief.experiments.analysis import analyze
from adabelief.experiments.cli import main
from adabelief.experiments.store import RunStore
from adabelief.experiments.usertask import TaskLoadError, load_user_task
from cli_output import one_error_line

README = Path(__file__).resolve().parents[1] / "README.md"

_TASK = '''
import torch
from adabelief.experiments import user_task

SCALE = 1.0


@user_task(score="loss", higher_is_better=False, claim="convergence", target_curve="losses")
def fit_line(make_optimizer, seed, quick):
    """Least squares on a line."""
    x = torch.linspace(-1, 1, 64)
    y = SCALE * 3 * x + 1
    w = torch.nn.Parameter(torch.randn(2))
    optimizer = make_optimizer([w])
    losses = []
    for _ in range(20 if quick else 100):
        loss = ((w[0] * x + w[1] - y) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    group = optimizer.param_groups[0]
    return {"loss": losses[-1], "losses": losses, "lr_used": group["lr"]}
'''


pytestmark = pytest.mark.usefixtures("restore_torch_globals")


def _common(out: Path) -> list[str]:
    return ["--quick", "--tiny", "--out", str(out), "--jobs", "1", "--no-progress", "--no-plots"]


@pytest.mark.parametrize(
    ("source", "function", "expected"),
    [
        (None, "fit_line", "no such file"),
        (_TASK, "missing", "has no function 'missing'"),
        ("def plain(make_optimizer, seed, quick):\n    return {}\n", "plain", "not decorated"),
        (
            "import torch\n\nx = undefined_name\n",
            "f",
            "NameError: name 'undefined_name' is not defined (line 3)",
        ),
        ("def broken(:\n", "broken", "SyntaxError"),
        ("import no_such_package_xyz\n", "f", "ModuleNotFoundError"),
    ],
)
def test_a_task_that_cannot_be_loaded_is_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    source: str | None,
    function: str,
    expected: str,
) -> None:
    path = tmp_path / "task.py"
    if source is not None:
        path.write_text(source)
    reference = f"{path}:{function}"
    assert main(["run", reference, *_common(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert expected in line and reference in line
    assert not (tmp_path / "out").exists()


def test_module_references_and_bad_references(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(TaskLoadError, match="cannot import module 'no_such_module_xyz'"):
        load_user_task("no_such_module_xyz:f")
    with pytest.raises(TaskLoadError, match="is not decorated"):
        load_user_task("math:sqrt")
    assert main(["run", "toy", "nonsense"]) == 2
    assert "FILE.py:FUNCTION" in one_error_line(capsys)


def test_decorator_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="claim='speed'"):
        user_task(score="x", claim="speed")
    with pytest.raises(TypeError, match="score"):
        user_task(score="")

    @user_task(score="x")
    def unchanged(make_optimizer: object, seed: int, quick: bool) -> dict[str, float]:
        return {"x": float(seed)}

    assert unchanged(None, 3, True) == {"x": 3.0}  # the function itself still works


def test_user_task_runs_through_the_protocol_with_builtin_tasks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "line.py"
    path.write_text(_TASK)
    out = tmp_path / "out"
    argv = ["run", "toy", f"{path}:fit_line", "--seeds", "2", "--optimizers", "adabelief,adam"]
    assert main([*argv, *_common(out)]) == 0
    assert "28 runs done" in capsys.readouterr().out  # 6 toy experiments + the task, 2 x 2
    results = {r.name: r for r in analyze(RunStore(out)).results}
    line = results["fit_line/fit_line"]
    assert line.experiment.claims == ("convergence",)
    assert line.experiment.speed == line.experiment.score  # the score enters claim 1
    assert line.summary("adam", "loss").n == 2
    assert line.time_to_target is not None and line.time_to_target.curve.name == "losses"
    text = (out / "report.md").read_text()
    assert "### fit_line/fit_line: Least squares on a line." in text
    assert "| fit_line/fit_line | loss |" in text  # in claim 1's evidence
    # Resume: nothing to do.  Editing the task's source: its runs are redone, toy's are not.
    assert main([*argv, *_common(out)]) == 0
    assert "0 runs done, 28 reused" in capsys.readouterr().out
    path.write_text(_TASK.replace("SCALE = 1.0", "SCALE = 2.0"))
    assert main([*argv, *_common(out)]) == 0
    assert "4 runs done, 24 reused" in capsys.readouterr().out


def test_a_bfloat16_model_variant_is_refused_for_a_user_task(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "line_task.py"
    path.write_text(_TASK)
    argv = ["run", f"{path}:fit_line", "--optimizers", "adabelief_bf16w_residual_int8"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert "trains a bfloat16 model" in line and "give it a prepare_model parameter" in line


_MODEL_TASK = '''
import torch
from adabelief.experiments import user_task


@user_task(score="loss", higher_is_better=False, claim="convergence")
def fit_model(make_optimizer, seed, quick, prepare_model):
    """A small regression whose model the runner may put in a variant's dtype."""
    torch.manual_seed(seed)
    x = torch.randn(256, 8)
    y = x @ torch.randn(8, 1)
    model = prepare_model(torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Linear(64, 1)))
    optimizer = make_optimizer(model.parameters())
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(x), y)  # float32 out, whatever the model's dtype
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {"loss": losses[-1], "losses": losses, "bf16": float(dtypes == ["torch.bfloat16"])}
'''


def test_a_user_task_with_prepare_model_runs_the_bfloat16_variants(tmp_path: Path) -> None:
    path = tmp_path / "model_task.py"
    path.write_text(_MODEL_TASK)
    out = tmp_path / "out"
    optimizers = "adabelief,adabelief_bf16w_residual_int8"
    argv = ["run", f"{path}:fit_model", "--optimizers", optimizers, "--seeds", "1"]
    assert main([*argv, *_common(out)]) == 0
    records, _ = RunStore(out).scan()
    runs = {r["optimizer"]: r for r in records}
    assert runs["adabelief"]["metrics"]["bf16"] == 0.0
    assert runs["adabelief_bf16w_residual_int8"]["metrics"]["bf16"] == 1.0
    first, last = (runs["adabelief_bf16w_residual_int8"]["curves"]["losses"][i] for i in (0, -1))
    assert last < first


def test_fair_mode_gives_the_user_task_its_trials(tmp_path: Path) -> None:
    path = tmp_path / "line.py"
    path.write_text(_TASK)
    out = tmp_path / "out"
    argv = ["run", f"{path}:fit_line", "--seeds", "2", "--optimizers", "adam,sgd"]
    assert main([*argv, "--mode", "fair", "--trials", "3", *_common(out)]) == 0
    (result,) = analyze(RunStore(out)).results
    assert result.mode == "fair" and result.trials == 3
    for row in result.optimizers:
        used = {c.records[0]["metrics"]["lr_used"] for c in row.trials}
        assert used == {c.hparams["lr"] for c in row.trials}  # make_optimizer = this trial's
        assert len(used) == 3 and sorted(row.chosen.records) == [0, 1]


def test_bad_return_values_fail_the_run_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.py"
    path.write_text(
        textwrap.dedent(
            """
            from adabelief.experiments import user_task

            @user_task(score="accuracy")
            def no_score(make_optimizer, seed, quick):
                return {"acc": 1.0}

            @user_task(score="accuracy")
            def text(make_optimizer, seed, quick):
                return {"accuracy": "high"}
            """
        )
    )
    for function, message in (
        ("no_score", "returned no 'accuracy'"),
        ("text", "'accuracy' of type str"),
    ):
        out = tmp_path / function
        argv = ["run", f"{path}:{function}", "--seeds", "1", "--optimizers", "adam"]
        assert main([*argv, *_common(out)]) == 1
        assert message in capsys.readouterr().err


def _readme_example() -> tuple[str, list[str]]:
    text = README.read_text()
    section = text.split("### Your own task", 1)[1]
    source = re.search(r"```python\n(# my_task\.py\n.*?)```", section, re.S)
    command = re.search(r"```bash\n(adabelief run my_task\.py:my_task[^\n]*)\n", section)
    assert source and command, "the README's user-task example is missing"
    return source.group(1), command.group(1).split()


@pytest.mark.slow
def test_the_readme_example_runs_as_written(tmp_path: Path) -> None:
    source, command = _readme_example()
    (tmp_path / "my_task.py").write_text(source)
    result = subprocess.run(
        [sys.executable, "-m", "adabelief.experiments.cli", *command[1:]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = tmp_path / command[command.index("--out") + 1]
    records = json.loads((out / "results.json").read_text())
    assert {r["optimizer"] for r in records} == {"adabelief", "adam", "sgd"}
    assert all(r["metrics"]["test_accuracy"] is not None for r in records)
    assert "### my_task/my_task" in (out / "report.md").read_text()
    assert (out / "plots" / "my_task-my_task-curves.png").stat().st_size > 0
