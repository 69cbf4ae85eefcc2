"""Planning, resumable execution, the run folder and the report built from it."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from adabelief.experiments.analysis import analyze
from adabelief.experiments.data import DataNotFoundError
from adabelief.experiments.report import Evidence, build_report, claim_verdict
from adabelief.experiments.runner import RunOptions, plan, resolve_data, run_experiments
from adabelief.experiments.spec import Experiment, Metric, RunSpec
from adabelief.experiments.stats import paired_comparison
from adabelief.experiments.store import RunStore, atomic_write_text, json_safe
from test_experiments_data import write_fake_cifar


@pytest.fixture(autouse=True)
def _restore_torch_globals() -> Iterator[None]:
    """The runner sets torch's thread count and deterministic mode; undo it for other tests."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _options(out: Path, tasks: tuple[str, ...] = ("toy",), **changes: object) -> RunOptions:
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


def test_plan_counts_and_fair_grid(tmp_path: Path) -> None:
    paper = plan(_options(tmp_path), {"toy": None})
    assert len(paper) == 6
    assert all(len(specs) == 3 * 2 for _, specs in paper)
    fair = plan(_options(tmp_path, mode="fair"), {"toy": None})
    specs = fair[0][1]
    assert len(specs) == 3 * 3 * 2
    adam_lrs = sorted({s.hparams["lr"] for s in specs if s.optimizer == "adam"})
    assert len(adam_lrs) == 3 and 0.01 in adam_lrs
    assert len({s.key() for s in specs}) == len(specs)


def test_run_key_depends_on_everything_that_matters() -> None:
    base = RunSpec("toy", "abs", {"steps": 5}, "adam", {"lr": 0.1}, 1.0, 0)
    assert base.key() == RunSpec("toy", "abs", {"steps": 5}, "adam", {"lr": 0.1}, 1.0, 0).key()
    changed = [
        RunSpec("toy", "abs", {"steps": 6}, "adam", {"lr": 0.1}, 1.0, 0),
        RunSpec("toy", "abs", {"steps": 5}, "sgd", {"lr": 0.1}, 1.0, 0),
        RunSpec("toy", "abs", {"steps": 5}, "adam", {"lr": 0.2}, 1.0, 0),
        RunSpec("toy", "abs", {"steps": 5}, "adam", {"lr": 0.1}, 1.0, 1),
    ]
    assert len({base.key(), *(s.key() for s in changed)}) == 5


def test_interrupted_run_resumes_only_missing_runs(tmp_path: Path) -> None:
    options = _options(tmp_path)
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
    options = _options(tmp_path, tasks=("toy", "gan"), make_plots=True)
    summary, report = run_experiments(options)
    assert not summary.failed and report is not None
    records = json.loads((tmp_path / "results.json").read_text())
    assert len(records) == len(summary.ran) == (6 + 3) * 3 * 2
    record = records[0]
    for field in (
        "task",
        "experiment",
        "optimizer",
        "hparams",
        "seed",
        "curves",
        "metrics",
        "wall_time_s",
    ):
        assert field in record
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
        "paper mode",
    ):
        assert heading in text
    assert "not tested" in text  # no classify/lm runs: claim 2 has no evidence
    assert (tmp_path / "plots" / "toy-rosenbrock-trajectories.png").stat().st_size > 0
    assert (tmp_path / "plots" / "gan-gan-mog-points.png").stat().st_size > 0
    assert (tmp_path / "plots" / "gan-dcgan-digits-images.png").stat().st_size > 0
    (tmp_path / "report.md").unlink()
    (tmp_path / "results.json").unlink()
    rebuilt = build_report(tmp_path, make_plots=False)
    assert rebuilt.path.read_text().count("## Claim") == 3
    assert len(json.loads((tmp_path / "results.json").read_text())) == len(records)


def test_parallel_workers_match_in_process_results(tmp_path: Path) -> None:
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    run_experiments(_options(serial, optimizers=("adabelief", "sgd"), seeds=1))
    summary, _ = run_experiments(
        _options(parallel, optimizers=("adabelief", "sgd"), seeds=1, jobs=2)
    )
    assert len(summary.ran) == 12 and not summary.failed
    for path in (serial / "runs").glob("*.json"):
        a = json.loads(path.read_text())
        b = json.loads((parallel / "runs" / path.name).read_text())
        assert a["metrics"] == b["metrics"] and a["curves"] == b["curves"]


def test_report_selects_learning_rate_on_validation_in_fair_mode(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    metric = Metric("score", "score", True)
    experiment = Experiment(
        task="toy",
        name="synthetic",
        title="synthetic",
        preset="toy/abs",
        settings={},
        score=metric,
        selection=Metric("val", "validation", True),
        claims=("convergence",),
        speed=Metric("speed", "speed", False),
    )
    runs = []
    # Factor 3 has the best validation score but the worst test score: it must still be chosen.
    for optimizer, factors in (
        ("adabelief", {1.0: (0.5, 0.9), 3.0: (0.9, 0.1)}),
        ("adam", {1.0: (0.6, 0.5)}),
    ):
        for factor, (val, score) in factors.items():
            for seed in range(3):
                key = f"{optimizer}-{factor}-{seed}"
                store.save(
                    {
                        "key": key,
                        "metrics": {
                            "val": val + seed / 100,
                            "score": score + seed / 100,
                            "speed": 1.0,
                        },
                        "diverged": False,
                    }
                )
                runs.append(
                    {
                        "key": key,
                        "optimizer": optimizer,
                        "lr_factor": factor,
                        "seed": seed,
                        "hparams": {"lr": factor},
                    }
                )
    store.update_manifest(
        {
            "toy": {
                "mode": "fair",
                "quick": True,
                "seeds": [0, 1, 2],
                "experiments": [{"experiment": experiment.to_json(), "runs": runs}],
            }
        }
    )
    (result,) = analyze(store)
    chosen = result.get("adabelief")
    assert chosen is not None and chosen.chosen.lr_factor == 3.0
    comparison = result.compare(metric, "adam")
    assert comparison is not None and comparison.verdict == "worse"
    report = build_report(tmp_path, make_plots=False)
    text = report.path.read_text()
    assert "fair mode" in text and "**x3:" in text
    assert "x3) †" in text  # chosen at the edge of the grid, flagged
    assert "toy/synthetic, score: adam" in text  # listed under "Where AdaBelief loses"


def test_claim_verdict_rules() -> None:
    metric = Metric("m", "m", True)

    def evidence(a: list[float], b: list[float]) -> Evidence:
        return Evidence(None, metric, "x", paired_comparison(a, b, True))  # type: ignore[arg-type]

    better = evidence([2.0, 3.0, 4.1], [1.0, 2.0, 3.0])
    worse = evidence([1.0, 2.0, 3.0], [2.0, 3.0, 4.1])
    same = evidence([1.0, 2.0, 3.0], [1.1, 1.9, 3.0])
    assert claim_verdict([]) == "not tested"
    assert claim_verdict([better, same]) == "supported"
    assert claim_verdict([same]).startswith("consistent")
    assert claim_verdict([better, worse]) == "mixed"
    assert claim_verdict([worse, worse]) == "not supported"


def test_resolve_data_rules(tmp_path: Path) -> None:
    assert resolve_data(("toy", "classify"), None) == {"toy": None, "classify": None}
    with pytest.raises(DataNotFoundError, match="CIFAR-10"):
        resolve_data(("classify",), tmp_path)
    with pytest.raises(DataNotFoundError, match="none of the tasks"):
        resolve_data(("toy",), tmp_path)
    write_fake_cifar(tmp_path)
    everything = resolve_data(("toy", "classify", "lm", "gan"), tmp_path)
    assert everything["classify"] == tmp_path and everything["lm"] is None
    with pytest.raises(DataNotFoundError, match="Penn Treebank"):
        resolve_data(("lm",), tmp_path)


def test_store_writes_standard_json_atomically(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.save({"key": "k", "metrics": {"a": math.nan, "b": [math.inf, 1.0]}})
    assert json.loads(store.run_path("k").read_text())["metrics"] == {"a": None, "b": [None, 1.0]}
    assert store.has("k") and not store.has("missing")
    store.run_path("broken").write_text("{not json")
    assert not store.has("broken")
    assert json_safe({"x": (1.0, math.nan)}) == {"x": [1.0, None]}
    atomic_write_text(tmp_path / "sub" / "f.txt", "hello")
    assert (tmp_path / "sub" / "f.txt").read_text() == "hello"
    assert not list((tmp_path / "sub").glob("*.tmp"))
