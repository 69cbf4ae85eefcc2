"""Planning, resumable execution, the run folder and the report built from it."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest

from adabelief.experiments.analysis import analyze
from adabelief.experiments.data import DataNotFoundError
from adabelief.experiments.report import build_report
from adabelief.experiments.runner import (
    OptimizerRefusedError,
    RunOptions,
    plan,
    resolve_data,
    resolve_tasks,
    run_experiments,
)
from adabelief.experiments.search import TUNING_SEED
from adabelief.experiments.spec import Experiment, Metric, RunSpec
from adabelief.experiments.stats import paired_comparison
from adabelief.experiments.store import RunStore, atomic_write_text, json_safe
from adabelief.experiments.tasks import TASKS, PlanOptions
from adabelief.experiments.verdicts import Evidence, claim_verdict
from test_experiments_data import write_fake_cifar

SYNTHETIC = Experiment(
    task="synthetic",
    name="synthetic",
    title="synthetic",
    preset="toy/abs",
    settings={"steps": 1},
    score=Metric("score", "score", True),
    selection=Metric("val", "validation", True),
    claims=("convergence",),
    speed=Metric("speed", "speed", False),
)


pytestmark = pytest.mark.usefixtures("restore_torch_globals")


def options_for(out: Path, tasks: tuple[str, ...] = ("toy",), **changes: object) -> RunOptions:
    """Tiny, single-process options for tests."""
    defaults: dict[str, object] = {
        "tasks": tasks,
        "out": out,
        "quick": True,
        "seeds": 2,
        "optimizers": ("adabelief", "adam", "sgd"),
        "jobs": 1,
        "threads": 1,
        "progress": False,
        "tiny": True,
        "make_plots": False,
    }
    defaults.update(changes)
    return RunOptions(**defaults)  # type: ignore[arg-type]


def synthetic_record(
    optimizer: str,
    seed: int,
    metrics: dict[str, float | None],
    *,
    trial: int | None = None,
    hparams: dict[str, Any] | None = None,
    experiment: Experiment = SYNTHETIC,
    diverged: bool = False,
    curves: dict[str, list[float | None]] | None = None,
    threads: int = 1,
) -> dict[str, Any]:
    """A valid run record, as the runner writes them, with made-up metrics."""
    spec = RunSpec(
        experiment.task,
        experiment.name,
        experiment.settings,
        optimizer,
        hparams or {"lr": 0.1},
        seed,
        trial,
        threads,
    )
    return {
        "key": spec.key(),
        **spec.to_json(),
        "definition": experiment.to_json(),
        "metrics": metrics,
        "curves": curves or {},
        "artifacts": {},
        "diverged": diverged,
        "finished_at": "2026-01-01T00:00:00",
    }


def _timeless(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record["curves"].items() if k != "time_s"}


def test_plan_counts_paper_and_fair(tmp_path: Path) -> None:
    tasks = resolve_tasks(["toy"])
    paper = plan(options_for(tmp_path), tasks, {"toy": None})
    assert len(paper) == 6
    assert all(len(item.specs) == 3 * 2 for item in paper)
    fair = plan(options_for(tmp_path, mode="fair", trials=4), tasks, {"toy": None})
    specs = fair[0].specs
    assert len(specs) == 3 * 4  # phase 1: every trial once, at the tuning seed
    assert {s.seed for s in specs} == {TUNING_SEED}
    assert sorted({s.trial for s in specs if s.optimizer == "adam"}) == [0, 1, 2, 3]
    adam_lrs = {s.hparams["lr"] for s in specs if s.optimizer == "adam"}
    assert len(adam_lrs) == 4 and all(0.01 / 3.17 < lr < 0.01 * 3.17 for lr in adam_lrs)
    assert len({s.key() for s in specs}) == len(specs)
    assert fair[0].spaces["sgd"].family == "sgd" and fair[0].spaces["adam"].family == "adaptive"


def test_settings_and_lr_scale_change_every_planned_run(tmp_path: Path) -> None:
    tasks = resolve_tasks(["classify"])
    options = options_for(tmp_path, ("classify",), settings={"epochs": 3}, lr_scale=0.1)
    (item,) = plan(options, tasks, {"classify": None})
    assert {spec.settings["epochs"] for spec in item.specs} == {3}
    preset = TASKS["classify"].preset_hparams(item.experiment, "adam")
    assert {s.hparams["lr"] for s in item.specs if s.optimizer == "adam"} == {preset["lr"] * 0.1}
    (default,) = plan(options_for(tmp_path, ("classify",)), tasks, {"classify": None})
    assert {s.key() for s in item.specs}.isdisjoint(s.key() for s in default.specs)
    with pytest.raises(ValueError, match="has no setting stepz"):
        plan(options_for(tmp_path, ("classify",), settings={"stepz": 3}), tasks, {"classify": None})


@pytest.mark.parametrize("optimizer", ["adabelief_bf16w_round", "adabelief_bf16w_residual_int4"])
def test_a_bfloat16_model_variant_is_refused_where_no_model_can_be_cast(
    tmp_path: Path, optimizer: str
) -> None:
    out = tmp_path / "out"
    with pytest.raises(OptimizerRefusedError) as refused:
        run_experiments(options_for(out, ("classify", "toy"), optimizers=("adam", optimizer)))
    message = str(refused.value)
    assert "\n" not in message
    assert f"{optimizer!r} trains a bfloat16 model, which toy" in message and "float64" in message
    assert not out.exists()  # refused before anything trains or is written
    assert (
        TASKS["gan"].model_dtype_refusal(TASKS["gan"].experiments(PlanOptions(tiny=True))[0]) == ""
    )


def test_run_key_depends_on_everything_that_matters() -> None:
    base = RunSpec("toy", "abs", {"steps": 5}, "adam", {"lr": 0.1}, 0)
    assert base.key() == RunSpec("toy", "abs", {"steps": 5}, "adam", {"lr": 0.1}, 0).key()
    changed = [
        RunSpec("toy", "abs", {"steps": 6}, "adam", {"lr": 0.1}, 0),
        RunSpec("toy", "abs", {"steps": 5, "data_fingerprint": "ab"}, "adam", {"lr": 0.1}, 0),
        RunSpec("toy", "abs", {"steps": 5}, "sgd", {"lr": 0.1}, 0),
        RunSpec("toy", "abs", {"steps": 5}, "adam", {"lr": 0.2}, 0),
        RunSpec("toy", "abs", {"steps": 5}, "adam", {"lr": 0.1}, 1),
        RunSpec("toy", "abs", {"steps": 5}, "adam", {"lr": 0.1}, 0, trial=0),
        RunSpec("toy", "abs", {"steps": 5}, "adam", {"lr": 0.1}, 0, threads=2),
        RunSpec("toy", "abs", {"steps": 5}, "adam", {"lr": 0.1}, 0, device="cuda"),
    ]
    assert len({base.key(), *(s.key() for s in changed)}) == len(changed) + 1
    odd = RunSpec("my task/v2", "f", {}, "adam", {}, 0)
    assert "/" not in odd.key() and " " not in odd.key()


def test_interrupted_run_resumes_only_missing_runs(tmp_path: Path) -> None:
    options = options_for(tmp_path)
    first, _ = run_experiments(options)
    assert len(first.ran) == 36 and first.reused == 0 and not first.failed
    run_files = sorted((tmp_path / "runs").glob("*.json"))
    assert len(run_files) == 36
    deleted = {p.stem for p in run_files[::5]}
    for key in deleted:
        (tmp_path / "runs" / f"{key}.json").unlink()
    untouched = {p: p.stat().st_mtime_ns for p in run_files if p.stem not in deleted}
    second, report = run_experiments(options)
    assert set(second.ran) == deleted
    assert second.reused == 36 - len(deleted)
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in untouched.items())
    third, _ = run_experiments(options)
    assert third.ran == [] and third.reused == 36
    assert report is not None and report.runs == 36 and report.missing == 0


def test_outputs_report_and_rebuild(tmp_path: Path) -> None:
    options = options_for(tmp_path, tasks=("toy", "gan"), make_plots=True)
    summary, report = run_experiments(options)
    assert not summary.failed and report is not None
    records = json.loads((tmp_path / "results.json").read_text())
    assert len(records) == len(summary.ran) == (6 + 3) * 3 * 2
    record = records[0]
    for name in (
        "task",
        "experiment",
        "optimizer",
        "hparams",
        "seed",
        "threads",
        "device",
        "curves",
        "metrics",
        "wall_time_s",
        "definition",
        "executor",
        "host",
    ):
        assert name in record
    assert record["executor"] == "local" and record["host"]
    with (tmp_path / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["optimizer"] for r in rows} == {"adabelief", "adam", "sgd"}
    assert all(r["mode"] == "paper" and r["selected"] == "1" for r in rows)
    text = (tmp_path / "report.md").read_text()
    for heading in (
        "## Claim 1",
        "## Claim 2",
        "## Claim 3",
        "## Where AdaBelief loses",
        "## Time to target and performance profile",
        "paper mode",
    ):
        assert heading in text
    assert "not tested" in text  # no classify/lm runs: claim 2 has no evidence
    plots = tmp_path / "plots"
    for name in (
        "toy-rosenbrock-trajectories.png",
        "gan-gan-mog-points.png",
        "gan-dcgan-digits-images.png",
        "profile-paper.png",
    ):
        assert (plots / name).stat().st_size > 0, name
    (tmp_path / "report.md").unlink()
    (tmp_path / "results.json").unlink()
    rebuilt = build_report(tmp_path, make_plots=False)
    assert rebuilt.path.read_text().count("## Claim") == 3
    assert len(json.loads((tmp_path / "results.json").read_text())) == len(records)


def test_parallel_workers_match_in_process_results(tmp_path: Path) -> None:
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    run_experiments(options_for(serial, optimizers=("adabelief", "sgd"), seeds=1))
    summary, _ = run_experiments(
        options_for(parallel, optimizers=("adabelief", "sgd"), seeds=1, jobs=2)
    )
    assert len(summary.ran) == 12 and not summary.failed
    for path in (serial / "runs").glob("*.json"):
        a = json.loads(path.read_text())
        b = json.loads((parallel / "runs" / path.name).read_text())
        assert a["metrics"] == b["metrics"] and _timeless(a) == _timeless(b)


def test_fair_mode_reruns_the_validation_winner_at_every_seed(tmp_path: Path) -> None:
    options = options_for(tmp_path, mode="fair", trials=3, seeds=3, optimizers=("adam", "sgd"))
    summary, report = run_experiments(options)
    assert not summary.failed and report is not None
    (result, *_) = analyze(RunStore(tmp_path)).results
    assert result.mode == "fair" and result.trials == 3
    for row in result.optimizers:
        assert len(row.trials) == 3 and row.search_space is not None
        assert sorted(row.chosen.records) == [0, 1, 2]  # the winner at every seed
        losers = [c for c in row.trials if c is not row.chosen]
        assert all(sorted(c.records) == [TUNING_SEED] for c in losers)
        selection = result.experiment.selection
        best = min(row.trials, key=lambda c: c.selection_rank(selection, [TUNING_SEED]))
        assert best.selection_rank(selection, [0]) == row.chosen.selection_rank(selection, [0])
    text = report.path.read_text()
    assert "search space: lr in" in text and "(winner)" in text and "momentum in" in text
    # 6 experiments x 2 optimizers x (3 trials + 2 reruns)
    assert len(summary.ran) == 6 * 2 * 5


def test_report_selects_the_trial_on_validation_in_fair_mode(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    # Trial 1 has the best validation score but the worst test score: it must still be chosen.
    for optimizer, trials in (
        ("adabelief", {0: (0.5, 0.9), 1: (0.9, 0.1)}),
        ("adam", {0: (0.6, 0.5), 1: (0.2, 0.6)}),
    ):
        for trial, (val, score) in trials.items():
            seeds = range(3) if (optimizer, trial) in (("adabelief", 1), ("adam", 0)) else [0]
            for seed in seeds:
                spread = seed / (100 if optimizer == "adabelief" else 50)
                metrics = {"val": val + seed / 100, "score": score + spread, "speed": 1.0}
                hparams = {"lr": 0.1 * (trial + 1)}
                store.save(synthetic_record(optimizer, seed, metrics, trial=trial, hparams=hparams))
    (result,) = analyze(store).results
    chosen = result.get("adabelief")
    assert chosen is not None and chosen.chosen.trial == 1
    comparison = result.compare(SYNTHETIC.score, "adam")
    assert comparison is not None and comparison.verdict == "worse"
    text = build_report(tmp_path, make_plots=False).path.read_text()
    assert "fair mode" in text and "trial 1: lr 0.2 → 0.9 (winner)" in text
    assert "synthetic/synthetic, score: adam" in text  # listed under "Where AdaBelief loses"


def test_claim_verdict_rules() -> None:
    metric = Metric("m", "m", True)

    def evidence(a: list[float], b: list[float]) -> Evidence:
        return Evidence(None, metric, "x", paired_comparison(a, b, True))  # type: ignore[arg-type]

    better = evidence([2.0, 3.0, 4.1], [1.0, 2.0, 3.0])
    worse = evidence([1.0, 2.0, 3.0], [2.0, 3.0, 4.1])
    same = evidence([1.0, 2.0, 3.0], [1.1, 1.9, 3.0])
    one_seed = evidence([5.0], [1.0])
    assert claim_verdict([]) == "not tested"
    assert claim_verdict([better, same]) == "supported"
    assert claim_verdict([same]).startswith("consistent")
    assert claim_verdict([better, worse]) == "mixed"
    assert claim_verdict([worse, worse]) == "not supported"
    # One seed: nothing was tested, so nothing is "consistent".
    assert claim_verdict([one_seed]).startswith("not tested")
    assert claim_verdict([one_seed, better]) == "supported"


def test_resolve_data_rules(tmp_path: Path) -> None:
    toy, classify = TASKS["toy"], TASKS["classify"]
    assert resolve_data([toy, classify], None) == {"toy": None, "classify": None}
    with pytest.raises(DataNotFoundError, match="CIFAR-10"):
        resolve_data([classify], tmp_path)
    with pytest.raises(DataNotFoundError, match="none of the tasks"):
        resolve_data([toy], tmp_path)
    write_fake_cifar(tmp_path)
    everything = resolve_data(list(TASKS.values()), tmp_path)
    check = everything["classify"]
    assert check is not None and len(check.fingerprint) == 16
    assert everything["lm"] is None and everything["transformer"] is None
    with pytest.raises(DataNotFoundError, match="Penn Treebank"):
        resolve_data([TASKS["lm"]], tmp_path)
    # With 'all', a missing dataset falls back to bundled data, a broken one is an error.
    (tmp_path / "test_batch").write_bytes(b"junk")
    with pytest.raises(DataNotFoundError, match="test_batch"):
        resolve_data(list(TASKS.values()), tmp_path)


def test_store_writes_standard_json_atomically(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    record = synthetic_record("adam", 0, {"a": math.nan, "b": 1.0}, curves={"c": [math.inf, 1.0]})
    store.save(record)
    saved = json.loads(store.run_path(record["key"]).read_text())
    assert saved["metrics"] == {"a": None, "b": 1.0} and saved["curves"] == {"c": [None, 1.0]}
    assert store.has(record["key"]) and not store.has("missing")
    assert json_safe({"x": (1.0, math.nan)}) == {"x": [1.0, None]}
    atomic_write_text(tmp_path / "sub" / "f.txt", "hello")
    assert (tmp_path / "sub" / "f.txt").read_text() == "hello"
    assert not list((tmp_path / "sub").glob("*.tmp"))
