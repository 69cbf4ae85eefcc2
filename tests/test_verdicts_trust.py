"""Verdicts you can trust (issue 19): divergence is a loss, statistics without invented
precision, selection on validation data, user-task versions, convergence and budget limits.

Every test builds run records in code (no training) unless it says otherwise.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest

from adabelief.experiments.analysis import analyze, choose_trial
from adabelief.experiments.report import build_report
from adabelief.experiments.spec import Metric
from adabelief.experiments.stats import (
    convergence_metrics,
    is_still_improving,
    late_improvement,
    late_noise,
    paired_comparison,
)
from adabelief.experiments.store import RunStore
from adabelief.experiments.verdicts import assess_claims, claim_verdict, collect, losses
from test_experiments_runner import SYNTHETIC, synthetic_record

#: A claim-2 experiment judged on a test score, selected on validation data.
GENERAL = dataclasses.replace(
    SYNTHETIC, name="general", claims=("generalization",), versus={"generalization": ("sgd",)}
)


def _save(store: RunStore, optimizer: str, seed: int, score: float | None, **kw: Any) -> None:
    metrics: dict[str, float | None] = {"score": score, "val": kw.pop("val", score), "speed": 1.0}
    metrics.update(kw.pop("metrics", {}))
    store.save(synthetic_record(optimizer, seed, metrics, **kw))


def _verdict(store: RunStore, claim: str = "generalization") -> Any:
    results = analyze(store).results
    return next(a for a in assess_claims(results) if a.claim == claim)


# --- 2. a divergence is a loss ------------------------------------------------------------


def test_a_diverged_seed_loses_its_pair() -> None:
    c = paired_comparison([2.0, 2.0, None], [1.0, 1.5, 1.0], True, a_diverged=[False, False, True])
    assert (c.n, c.wins, c.losses, c.a_diverged) == (3, 2, 1, 1)
    assert c.t_p_value is None  # a divergence has no difference: the sign test decides
    assert c.verdict == "worse (diverged)"
    both = paired_comparison([None, 2.0], [None, 1.0], True, [True, False], [True, False])
    assert (both.n, both.ties, both.both_diverged, both.verdict) == (
        2,
        1,
        1,
        "no significant difference",
    )


def test_adabelief_diverging_on_every_seed_is_not_supported(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    for seed in range(3):
        _save(store, "adabelief", seed, None, experiment=GENERAL, diverged=True)
        _save(store, "sgd", seed, 0.9, experiment=GENERAL)
    assessment = _verdict(store)
    assert assessment.verdict == "not supported"
    assert "diverged runs: AdaBelief 3 of 3, sgd 0" in assessment.summary
    (loss,) = [x for x in losses(analyze(store).results) if x.metric.name == "score"]
    assert loss.diverged and loss.significant
    text = build_report(tmp_path, make_plots=False).path.read_text()
    loses = text.split("## Where AdaBelief loses")[1].split("##")[0]
    assert "AdaBelief diverged on 3 of 3 seeds" in loses


def test_survivors_alone_never_make_a_diverging_adabelief_supported(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    for seed in range(6):
        diverged = seed == 5
        score = None if diverged else 0.9 + seed / 1000
        _save(store, "adabelief", seed, score, experiment=GENERAL, diverged=diverged)
        _save(store, "sgd", seed, 0.5 + seed / 700, experiment=GENERAL)
    assessment = _verdict(store)
    # 5 wins and 1 loss (the divergence): sign test p = 0.22; and the loss decides the word.
    assert assessment.verdict not in ("supported", "consistent (no significant difference)")
    assert not assessment.verdict.startswith("not tested")
    assert "AdaBelief 1 of 6" in assessment.summary


def test_a_diverged_run_ranks_last(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    for seed in range(3):
        diverged = seed == 0
        _save(store, "adabelief", seed, None if diverged else 0.99, diverged=diverged)
        _save(store, "adam", seed, 0.5)
    (result,) = analyze(store).results
    assert result.ranking() == ["adam", "adabelief"]
    assert result.best_optimizer() == "adam"


# --- 3. statistics that do not invent precision -------------------------------------------


def test_differences_equal_up_to_rounding_use_the_sign_test() -> None:
    # One more test image right on every seed: 100 * correct / 360.
    a = [100 * (c + 1) / 360 for c in (290, 291, 292)]
    b = [100 * c / 360 for c in (290, 291, 292)]
    assert len({x - y for x, y in zip(a, b, strict=True)}) > 1  # not bit-identical
    c = paired_comparison(a, b, higher_is_better=True)
    assert c.constant and c.t_p_value is None
    assert c.p_value == pytest.approx(0.25)
    assert c.verdict == "no significant difference"
    assert c.interval is None


def test_effect_size_has_a_student_t_interval() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    a, b = [0.91, 0.93, 0.92, 0.95], [0.89, 0.92, 0.88, 0.93]
    c = paired_comparison(a, b, higher_is_better=False)  # lower is better: advantage < 0
    diffs = [y - x for x, y in zip(a, b, strict=True)]
    low, high = scipy_stats.t.interval(
        0.95, len(diffs) - 1, loc=sum(diffs) / 4, scale=scipy_stats.sem(diffs)
    )
    assert c.interval == pytest.approx((low, high))
    assert c.advantage < 0 and c.interval[0] < c.advantage < c.interval[1]


def test_report_says_three_seeds_cannot_reach_significance(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    for seed in range(3):
        _save(store, "adabelief", seed, 100 * (300 + seed + 1) / 360, experiment=GENERAL)
        _save(store, "sgd", seed, 100 * (300 + seed) / 360, experiment=GENERAL)
    assessment = _verdict(store)
    assert assessment.verdict.startswith("consistent")
    text = build_report(tmp_path, make_plots=False).path.read_text()
    assert "cannot go below p = 0.25" in text and "needs 6 seeds" in text
    assert "AdaBelief's advantage [95% CI]" in text
    assert "on every seed (no spread: no interval" in text


# --- 4. selection on validation data ------------------------------------------------------


def test_a_failed_trial_never_cuts_the_other_optimizers_trials(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    vals = {"adabelief": [0.1, 0.2, 0.3, 0.9], "sgd": [0.5, 0.4, 0.3]}  # sgd's trial 3 crashed
    for optimizer, values in vals.items():
        for trial, val in enumerate(values):
            hparams = {"lr": 0.01 * (trial + 1)}
            _save(store, optimizer, 0, val, trial=trial, hparams=hparams, val=val)
    (result,) = analyze(store).results
    chosen = result.get("adabelief")
    assert chosen is not None and chosen.chosen.trial == 3 and len(chosen.trials) == 4
    # The runner's choice over the planned trials (one missing) is the same function's.
    assert choose_trial(chosen.trials, SYNTHETIC.selection).trial == 3
    sgd = result.get("sgd")
    assert sgd is not None and [c.trial for c in sgd.trials] == [0, 1, 2, 3]
    assert sgd.chosen.trial == 0
    text = build_report(tmp_path, make_plots=False).path.read_text()
    assert "trial 3: - → failed or missing (no run on disk: ranks last)" in text


def test_planned_trial_count_comes_from_the_manifest(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    for trial, val in enumerate([0.1, 0.2, 0.9]):
        for optimizer in ("adabelief", "sgd"):
            _save(store, optimizer, 0, val, trial=trial, hparams={"lr": trial + 1.0}, val=val)
    (study,) = {r.study for r in analyze(store).results}
    manifest = {"version": 1, "tasks": {"synthetic": {"trials": 2, "experiments": [{"study": study, "runs": []}]}}, "commands": []}  # fmt: skip
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (result,) = analyze(store).results
    assert result.trials == 2 and result.get("adabelief").chosen.trial == 1  # type: ignore[union-attr]


def test_digits_is_judged_on_test_at_the_best_validation_epoch() -> None:
    from adabelief.experiments.tasks import TASKS
    from adabelief.experiments.tasks.base import PlanOptions

    for mode in ("paper", "fair"):
        (experiment,) = TASKS["classify"].experiments(PlanOptions(quick=True, mode=mode))
        assert experiment.settings["validation_fraction"] > 0
        assert experiment.score.name == "test_acc_at_best_val"
        assert experiment.selection.name == "best_val_acc"
        assert experiment.target is not None and experiment.target.name == "val_acc"
        best_test = next(m for m in experiment.metrics if m.name == "best_test_acc")
        assert "chosen on test data" in best_test.label


def test_time_to_target_best_is_chosen_on_validation(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    experiment = dataclasses.replace(SYNTHETIC, target=Metric("acc", "accuracy", True))
    curves = {"x": [1.0, 2.0], "step": [10.0, 20.0], "acc": [0.5, 0.8]}
    for seed in range(2):
        # adabelief has the better test score, adam the better validation score.
        _save(store, "adabelief", seed, 0.9, val=0.1, experiment=experiment, curves=curves)
        _save(store, "adam", seed, 0.1, val=0.9, experiment=experiment, curves=curves)
    (result,) = analyze(store).results
    assert result.time_to_target is not None and result.time_to_target.best == "adam"


def test_headline_says_test_data_when_trials_were_chosen_on_it(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    no_validation = dataclasses.replace(SYNTHETIC, selection=SYNTHETIC.score)
    for optimizer in ("adabelief", "adam"):
        _save(store, optimizer, 0, 0.5, trial=0, experiment=no_validation)
    text = build_report(tmp_path, make_plots=False).path.read_text()
    headline = text.split("| claim | verdict |")[0]
    assert "judged on validation data" not in headline
    assert "selected on: `synthetic/synthetic`: the reported metric itself (score)" in headline
    assert "not held-out validation data" in headline


# --- 5. a user task's edits replace its old runs ------------------------------------------


def test_runs_of_an_older_task_source_leave_the_report(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    for version, finished, score in (("old", "2026-01-01", 0.1), ("new", "2026-02-01", 0.9)):
        experiment = dataclasses.replace(
            SYNTHETIC, settings={"source_fingerprint": version, "quick": True}
        )
        for optimizer in ("adabelief", "adam"):
            record = synthetic_record(optimizer, 0, {"score": score}, experiment=experiment)
            record["finished_at"] = f"{finished}T00:00:00"
            store.save(record)
    analysis = analyze(store)
    (result,) = analysis.results
    assert result.experiment.settings["source_fingerprint"] == "new"
    assert analysis.superseded == {"synthetic/synthetic": 2}
    text = build_report(tmp_path, make_plots=False).path.read_text()
    assert "2 runs of older versions" in text


_TASK = """
import helper

from adabelief.experiments import user_task


@user_task(score="score")
def task(make_optimizer, seed, quick):
    return {"score": helper.VALUE}
"""


def test_local_modules_a_task_imports_are_fingerprinted(tmp_path: Path) -> None:
    from adabelief.experiments.usertask import load_user_task

    (tmp_path / "mytask.py").write_text(_TASK)
    (tmp_path / "helper.py").write_text("from util import X\nVALUE = 1.0\n")
    (tmp_path / "util.py").write_text("X = 1\n")
    reference = f"{tmp_path / 'mytask.py'}:task"
    first = load_user_task(reference).fingerprint
    (tmp_path / "util.py").write_text("X = 2\n")  # a module the helper imports
    second = load_user_task(reference).fingerprint
    (tmp_path / "helper.py").write_text("from util import X\nVALUE = 2.0\n")
    third = load_user_task(reference).fingerprint
    assert len({first, second, third}) == 3


# --- 1. convergence and budget-limited comparisons ----------------------------------------


def test_late_improvement_rule() -> None:
    steps = [float(s) for s in range(1, 9)]
    # 8 evaluations: no smoothing; from step 7 (7/8 of 8) to the end.
    assert late_improvement([1, 2, 3, 4, 5, 6, 7, 8], steps, True) == pytest.approx((8 - 7) / 7)
    # 16 evaluations: trailing mean over 2; from step 14 to 16.
    steps16 = [float(s) for s in range(1, 17)]
    rising = late_improvement(list(range(1, 17)), steps16, True)
    assert rising == pytest.approx((15.5 - 13.5) / 13.5)
    flat = late_improvement([5, 9, 10, 10, 10, 10, 10, 10], steps, True)
    assert flat == pytest.approx(0.0)
    falling = late_improvement([9, 8, 7, 6, 5, 4, 3, 2], steps, False)  # perplexity still drops
    assert falling is not None and falling > 0.1
    assert late_improvement([1.0], [1.0], True) is None


def _noisy(trend: float, seed: int, std: float) -> tuple[list[float], list[float]]:
    """A GAN-like curve of 40 evaluations: 0.8 plus ``trend`` per evaluation plus noise."""
    import random

    rng = random.Random(seed)
    return [0.8 + trend * i + rng.gauss(0, std) for i in range(40)], [
        float(25 * (i + 1)) for i in range(40)
    ]


def test_a_noisy_but_flat_curve_is_not_still_improving() -> None:
    flagged = above_tolerance = 0
    for seed in range(20):
        values, steps = _noisy(0.0, seed, std=0.04)
        late, noise = late_improvement(values, steps, True), late_noise(values, steps, True)
        assert late is not None and noise is not None and noise > 0.005
        flagged += is_still_improving(late, noise)
        above_tolerance += late > 0.01
    assert above_tolerance >= 5  # the 1% tolerance alone would flag these flat curves
    assert flagged <= 1  # about 2.5% false alarms at 2 standard errors


def test_a_noisy_rising_curve_is_still_improving() -> None:
    for seed in range(20):
        # About +1.2% of the level per evaluation, +6% over the last eighth, in 2.5% noise.
        values, steps = _noisy(0.016, seed, std=0.02)
        figures = convergence_metrics(values, steps, higher_is_better=True)
        assert is_still_improving(figures["late_improvement"], figures["late_noise"]), seed
    # Lower is better (a Frechet distance falling): the same rule.
    values, steps = _noisy(0.016, 0, std=0.02)
    falling = [3.0 - v for v in values]
    assert is_still_improving(
        late_improvement(falling, steps, False), late_noise(falling, steps, False)
    )


def test_the_rule_on_smooth_curves_is_the_tolerance() -> None:
    steps = [float(s) for s in range(1, 41)]
    # A smooth curve still rising 2% over the last eighth: no noise, flagged; one at 0.5%: not.
    for per_step, expected in ((0.004, True), (0.001, False)):
        values = [0.9 + per_step * s for s in steps]
        figures = convergence_metrics(values, steps, True)
        assert figures["late_noise"] == pytest.approx(0.0, abs=1e-9)
        assert is_still_improving(figures["late_improvement"], figures["late_noise"]) is expected
    # A step schedule's jump at 75% is not noise: a flat curve after it has no noise.
    stepped = [0.90 if s <= 30 else 0.95 for s in steps]
    assert late_noise(stepped, steps, True) == pytest.approx(0.0)
    # Too few evaluations to measure noise: the tolerance alone decides.
    assert late_noise([1.0, 2.0], [1.0, 2.0], True) is None
    assert is_still_improving(0.02, None) and not is_still_improving(0.005, None)
    assert not is_still_improving(None, None)
    # Over seeds, the medians are judged against the noise of a mean of n runs.
    assert not is_still_improving(0.03, 0.02) and is_still_improving(0.03, 0.02, runs=3)


def test_gan_runs_record_the_convergence_figures() -> None:
    from adabelief.experiments.presets import get_preset
    from adabelief.experiments.spec import RunContext, RunSpec
    from adabelief.experiments.tasks import TASKS

    preset = get_preset("gan/gan-mog")
    settings = {**preset.settings_for(True), "iterations": 160, "evaluations": 16}
    spec = RunSpec("gan", "gan-mog", settings, "adam", preset.optimizers["adam"], 0)
    output = TASKS["gan"].run(spec, RunContext())
    assert output.metrics["late_improvement"] is not None
    noise = output.metrics["late_noise"]
    assert noise is not None and math.isfinite(noise)
    for name in ("gan/wgan-gp-mog", "gan/gan-mog", "gan/dcgan-digits"):
        for quick in (True, False):  # enough evaluations in the last quarter to measure noise
            assert get_preset(name).settings_for(quick)["evaluations"] >= 16


def test_a_gan_comparison_with_a_still_improving_run_is_budget_limited(tmp_path: Path) -> None:
    from adabelief.experiments.tasks import TASKS
    from adabelief.experiments.tasks.base import PlanOptions

    experiment = next(
        e for e in TASKS["gan"].experiments(PlanOptions(quick=True)) if e.name == "gan-mog"
    )
    store = RunStore(tmp_path)
    for seed in range(3):
        rising = convergence_metrics(*_noisy(0.016, seed, 0.02), higher_is_better=True)
        flat = convergence_metrics(*_noisy(0.0, seed + 10, 0.04), higher_is_better=True)
        for optimizer, hq, figures in (("adabelief", 0.9, flat), ("adam", 0.5, rising)):
            metrics = {"hq_fraction": hq + seed * hq / 50, "val_hq_fraction": hq, "modes": 8.0}
            store.save(
                synthetic_record(optimizer, seed, {**metrics, **figures}, experiment=experiment)
            )
    (result,) = analyze(store).results
    rows = {row.optimizer: row for row in result.optimizers}
    assert not rows["adabelief"].still_improving and rows["adam"].still_improving
    (evidence,) = collect([result], "gan", "hq_fraction")
    assert evidence.comparison.verdict == "better" and evidence.word == "better (budget-limited)"
    # AdaBelief's spread over seeds exceeds Adam's: the stability check still applies.
    assert _verdict(store, "gan").verdict == "mixed (1 budget-limited comparison not counted)"
    text = build_report(tmp_path, make_plots=False).path.read_text()
    assert "**better (budget-limited)**" in text and "(still improving)" in text
    adabelief_row = next(line for line in text.splitlines() if line.startswith("| adabelief |"))
    assert "±" in adabelief_row and "still improving" not in adabelief_row


def test_classification_runs_record_the_convergence_figure() -> None:
    from adabelief.experiments.spec import RunContext, RunSpec
    from adabelief.experiments.tasks import TASKS
    from adabelief.experiments.tasks.base import PlanOptions

    task = TASKS["classify"]
    (experiment,) = task.experiments(PlanOptions(quick=True, tiny=True))
    spec = RunSpec("classify", experiment.name, experiment.settings, "adam", {"lr": 1e-3}, 0)
    output = task.run(spec, RunContext())
    late = output.metrics["late_improvement"]
    assert late is not None and math.isfinite(late)


def test_a_comparison_still_improving_is_budget_limited(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    for seed in range(3):
        _save(store, "adabelief", seed, 0.9 + seed / 100, experiment=GENERAL,
              metrics={"late_improvement": 0.2})  # fmt: skip
        _save(store, "sgd", seed, 0.5 + seed / 90, experiment=GENERAL,
              metrics={"late_improvement": 0.0, "speed": 0.5 + seed / 50})  # fmt: skip
    (result,) = analyze(store).results
    assert result.budget_limited("sgd")
    (evidence,) = collect([result], "generalization", "score")
    assert evidence.comparison.verdict == "better" and evidence.budget_limited
    assert evidence.word == "better (budget-limited)"
    verdict = claim_verdict([evidence])
    assert verdict.startswith("consistent") and "1 budget-limited comparison not counted" in verdict
    text = build_report(tmp_path, make_plots=False).path.read_text()
    assert "**better (budget-limited)**" in text and "+20.0% (still improving)" in text
    loses = text.split("## Where AdaBelief loses")[1].split("##")[0]
    assert "budget-limited)" in loses  # sgd trains faster: listed with the label
    with (tmp_path / "comparisons.csv").open() as handle:
        (row,) = [r for r in csv.DictReader(handle) if r["claim"] == "generalization"]
    assert row["verdict"] == "better (budget-limited)" and row["budget_limited"] == "1"
    assert float(row["ci_low"]) < float(row["advantage"]) < float(row["ci_high"])


def test_quick_presets_keep_the_schedule_shape() -> None:
    from adabelief.experiments.presets import get_preset

    digits = get_preset("classify/digits-cnn")
    for settings in (digits.settings_for(False), digits.settings_for(True)):
        assert settings["milestones"] == [round(settings["epochs"] * 0.75)]
    quick = digits.settings_for(True)
    assert quick["epochs"] == digits.settings_for(False)["epochs"]  # trained to the end
    for name in ("transformer/python-docs-char", "transformer/wikitext2"):
        preset = get_preset(name)
        full, small = preset.settings_for(False), preset.settings_for(True)
        # The same schedule shape: warm-up the same fraction of the steps, so the inverse-square-
        # root decay ends at the same fraction of the peak learning rate.
        assert small["warmup"] / small["steps"] == pytest.approx(full["warmup"] / full["steps"])
        assert small["context"] < full["context"]
        # A smaller problem: fewer weights, and fewer tokens seen over the whole budget.
        assert _transformer_weights(small) < _transformer_weights(full) / 4
        seen = small["steps"] * small["batch_size"] * small["context"]
        assert seen < full["steps"] * full["batch_size"] * full["context"] / 4


def _transformer_weights(settings: dict[str, Any]) -> int:
    from adabelief.experiments.models import TransformerLanguageModel

    model = TransformerLanguageModel(
        100, settings["d_model"], settings["heads"], settings["layers"], settings["ff_dim"],
        settings["context"],
    )  # fmt: skip
    return sum(p.numel() for p in model.parameters())


def test_report_sets_quick_verdicts_beside_default_ones(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    for quick in (True, False):
        experiment = dataclasses.replace(GENERAL, settings={"steps": 1 if quick else 9})
        for seed in range(3):
            for optimizer, score in (("adabelief", 0.9), ("sgd", 0.5 if quick else 0.95)):
                spread = seed / (97 if optimizer == "sgd" else 61)
                record = synthetic_record(
                    optimizer, seed, {"score": score + spread}, experiment=experiment
                )
                record["quick"] = quick
                store.save(record)
    text = build_report(tmp_path, make_plots=False).path.read_text()
    section = text.split("## Quick budget against the default budget")[1].split("##")[0]
    assert (
        "| synthetic/general | paper | generalization | score | sgd | better | worse | **no** |"
        in section
    )


def test_a_module_task_fingerprints_its_own_package_only(tmp_path: Path) -> None:
    from adabelief.experiments.usertask import local_sources

    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helpers.py").write_text("VALUE = 1\n")
    (tmp_path / "other.py").write_text("X = 1\n")  # beside the package, not in it
    source = "import other\nfrom . import helpers\nfrom mypkg.helpers import VALUE\n"
    found = local_sources(package / "task.py", source, "mypkg.task")
    assert sorted(found) == ["mypkg/__init__.py", "mypkg/helpers.py"]


def test_runner_and_report_pick_the_same_trial_when_one_crashed(tmp_path: Path) -> None:
    from adabelief.experiments.runner import plan, plan_reruns
    from adabelief.experiments.tasks import TASKS
    from test_experiments_runner import options_for

    options = options_for(tmp_path, mode="fair", trials=4, seeds=2, optimizers=("adabelief", "sgd"))
    item = plan(options, [TASKS["toy"]], {"toy": None})[0]
    store = RunStore(tmp_path)
    selection = item.experiment.selection.name
    for spec in item.specs:
        if spec.optimizer == "sgd" and spec.trial == 3:
            continue  # this trial crashed: no run on disk
        good = {"adabelief": 3, "sgd": 1}[spec.optimizer] == spec.trial
        metrics = {name.name: 1.0 for name in item.experiment.metrics}
        metrics[selection] = 1.0 if good else 50.0  # toy metrics: lower is better
        store.save({"key": spec.key(), **spec.to_json(), "definition": item.experiment.to_json(),
                    "metrics": metrics, "curves": {}, "artifacts": {}, "diverged": False,
                    "finished_at": "2026-01-01T00:00:00"})  # fmt: skip
    reruns = {spec.optimizer: spec.trial for spec in plan_reruns(item, store, options)}
    assert reruns == {"adabelief": 3, "sgd": 1}
    (result,) = [r for r in analyze(store).results if r.experiment.name == item.experiment.name]
    assert {row.optimizer: row.chosen.trial for row in result.optimizers} == reruns
