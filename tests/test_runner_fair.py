"""The fair protocol's parts: search spaces, quasi-random trials, time to target, profiles."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest

from adabelief.experiments.analysis import TAU_MAX, Profile, analyze, performance_profiles
from adabelief.experiments.report import build_report
from adabelief.experiments.search import (
    default_trials,
    search_space,
    trial_hparams,
    unit_point,
)
from adabelief.experiments.spec import Metric
from adabelief.experiments.store import RunStore
from test_experiments_runner import SYNTHETIC, synthetic_record

ADAM = {"lr": 1e-3, "eps": 1e-8, "weight_decay": 5e-4, "betas": [0.9, 0.999]}
SGD = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}


def test_trials_are_a_stable_quasi_random_prefix() -> None:
    from scipy.stats import qmc

    points = [unit_point(i) for i in range(40)]
    assert all(len(p) == 4 and all(0 <= v < 1 for v in p) for p in points)
    assert len(set(points)) == 40
    assert unit_point(3) == points[3]  # trial i does not depend on how many are drawn
    # Low discrepancy: far more even than the worst case, on par with scipy's own Halton.
    assert qmc.discrepancy(points) < 0.05


def test_every_optimizer_searches_its_documented_space() -> None:
    adaptive = search_space("adam", ADAM, quick=False)
    assert [d.name for d in adaptive.dimensions] == ["lr", "eps", "weight_decay", "beta1"]
    sgd = search_space("sgd", SGD, quick=False)
    assert [d.name for d in sgd.dimensions] == ["lr / (1 - momentum)", "momentum", "weight_decay"]
    adabelief = search_space("adabelief", {**ADAM, "rectify": False}, quick=True)
    assert (adabelief.dimensions[1].low, adabelief.dimensions[1].high) == (1e-16, 1e-8)
    for trial in range(30):
        a = trial_hparams("adam", ADAM, quick=False, trial=trial)
        assert 1e-4 <= a["lr"] <= 1e-2 and 1e-10 <= a["eps"] <= 1e-6
        assert 5e-5 <= a["weight_decay"] <= 5e-3 and 0.5 <= a["betas"][0] <= 0.95
        assert a["betas"][1] == 0.999
        b = trial_hparams("adabelief", {**ADAM, "rectify": False}, quick=True, trial=trial)
        assert 1e-3 / 10**0.5 <= b["lr"] <= 1e-3 * 10**0.5 and b["rectify"] is False
        s = trial_hparams("sgd", SGD, quick=False, trial=trial)
        assert 0 <= s["momentum"] <= 0.99 and "eps" not in s
        effective = s["lr"] / (1 - s["momentum"])
        assert 0.1 <= effective <= 10.0 + 1e-6  # around the preset's lr / (1 - 0.9) = 1
    # The same unit point for every optimizer: trial 5's lr factor is the same for Adam and SGD.
    u = unit_point(5)
    assert trial_hparams("adam", ADAM, False, 5)["lr"] == pytest.approx(
        1e-3 * 10 ** (2 * u[0] - 1), rel=1e-5
    )
    assert (
        search_space("adam", {"lr": 0.01, "weight_decay": 0.0}, True).hparams(u)["weight_decay"]
        == 0.0
    )
    assert default_trials(True) == 4 and default_trials(False) == 20


def _curve_record(
    optimizer: str, seed: int, values: list[float], diverged: bool = False
) -> dict[str, Any]:
    experiment = dataclasses.replace(SYNTHETIC, target=Metric("acc", "accuracy", True))
    steps = [float(10 * (i + 1)) for i in range(len(values))]
    curves = {"x": steps, "step": steps, "time_s": [s / 10 for s in steps], "acc": list(values)}
    score = max(values)
    return synthetic_record(
        optimizer,
        seed,
        {"score": score, "val": score, "speed": 1.0},
        experiment=experiment,
        curves=curves,
        diverged=diverged,
    )


def test_time_to_target_uses_the_best_optimizers_level(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    # adabelief is best (score 0.9 / 0.8); every seed of it reached 0.8: that is the target.
    store.save(_curve_record("adabelief", 0, [0.5, 0.8, 0.9]))
    store.save(_curve_record("adabelief", 1, [0.6, 0.8, 0.8]))
    store.save(_curve_record("adam", 0, [0.4, 0.6, 0.8]))  # reaches it at step 30
    store.save(_curve_record("adam", 1, [0.4, 0.5, 0.7]))  # never
    store.save(_curve_record("sgd", 0, [0.9, 0.9, 0.9], diverged=True))  # diverged: not counted
    store.save(_curve_record("sgd", 1, [0.1, 0.2, 0.3]))
    (result,) = analyze(store).results
    ttt = result.time_to_target
    assert ttt is not None and ttt.best == "adabelief" and ttt.target == 0.8
    assert ttt.runs["adabelief"].steps == (20.0, 20.0) and ttt.runs["adabelief"].median_steps == 20
    assert ttt.runs["adabelief"].median_seconds == 2.0
    assert ttt.runs["adam"].steps == (30.0, None) and ttt.runs["adam"].reached == 1
    assert math.isinf(ttt.runs["adam"].median_steps)  # one of two seeds missed: median is inf
    assert ttt.runs["sgd"].steps == (None, None)
    (profile,) = performance_profiles([result])
    assert profile.rho("adabelief", 1.0) == 1.0 and profile.area("adabelief") == 1.0
    assert profile.area("sgd") == 0.0
    text = build_report(tmp_path).path.read_text()
    assert "## Time to target and performance profile" in text
    assert (
        "accuracy ≥ 0.8 | adabelief | 20 (2 s), 2/2 | not reached, 0/2 | not reached, 1/2" in text
    )
    assert "every seed of the best optimizer" in text
    assert (tmp_path / "plots" / "profile-paper.png").stat().st_size > 0


def test_performance_profile_area_is_the_normalised_integral() -> None:
    profile = Profile("paper", ("a", "b", "c"), {"x": (1.0, 2.0, math.inf), "y": (1.0, 1.0, 1.0)})
    assert profile.rho("x", 1.0) == pytest.approx(1 / 3)
    assert profile.rho("x", 2.0) == pytest.approx(2 / 3)
    assert profile.rho("x", 100.0) == pytest.approx(2 / 3)
    # Integral of rho over [1, 4], divided by 3: (3 + 2 + 0) / 3 / 3.
    assert profile.area("x") == pytest.approx((TAU_MAX - 1 + TAU_MAX - 2) / (TAU_MAX - 1) / 3)
    taus = [1 + 3 * (i + 0.5) / 30000 for i in range(30000)]
    numeric = sum(profile.rho("x", t) for t in taus) / len(taus)
    assert profile.area("x") == pytest.approx(numeric, abs=1e-3)
    assert profile.area("y") == 1.0
