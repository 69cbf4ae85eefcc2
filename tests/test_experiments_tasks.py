"""Each task in a tiny configuration: runs, measures sensibly, and is deterministic by seed."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from adabelief.experiments.presets import get_preset
from adabelief.experiments.spec import Experiment, RunContext, RunOutput, RunSpec
from adabelief.experiments.tasks import TASKS, PlanOptions
from adabelief.experiments.tasks.classify import random_crop_flip
from adabelief.experiments.tasks.gan import MOG_CENTERS, mog_quality
from adabelief.experiments.tasks.toy import FUNCTIONS
from adabelief.experiments.tasks.transformer import evaluate_language_model
from adabelief.experiments.training import configure_torch, inverse_sqrt_schedule
from test_experiments_data import write_fake_cifar, write_fake_ptb, write_fake_wikitext

TINY = PlanOptions(quick=True, tiny=True)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Runs as the runner's workers do (1 thread, deterministic); restore afterwards."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    configure_torch(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _spec(experiment: Experiment, optimizer: str = "adabelief", seed: int = 0) -> RunSpec:
    hparams = get_preset(experiment.preset).hparams(optimizer)
    return RunSpec(experiment.task, experiment.name, experiment.settings, optimizer, hparams, seed)


def _experiment(task: str, name: str, options: PlanOptions = TINY) -> Experiment:
    return next(e for e in TASKS[task].experiments(options) if e.name == name)


def _run(
    experiment: Experiment, optimizer: str = "adabelief", seed: int = 0, data: Path | None = None
) -> RunOutput:
    return TASKS[experiment.task].run(_spec(experiment, optimizer, seed), RunContext(data_dir=data))


def _timeless(curves: dict[str, list[float | None]]) -> dict[str, list[float | None]]:
    """Curves without the wall-clock seconds (the only part of a run that is not deterministic)."""
    return {k: v for k, v in curves.items() if k != "time_s"}


def test_toy_functions_have_their_minimum_at_the_optimum() -> None:
    for name, function in FUNCTIONS.items():
        x, y = (torch.tensor(v, dtype=torch.float64) for v in function.optimum)
        value = float(function.function(x, y))
        for dx, dy in ((1e-3, 0), (0, 1e-3), (-1e-3, 0), (0, -1e-3)):
            nearby = float(function.function(x + dx, y + dy))
            assert nearby >= value - 1e-9, name


def test_toy_run_reaches_the_optimum_of_the_quadratic() -> None:
    experiment = _experiment("toy", "quadratic", PlanOptions(quick=True))
    out = _run(experiment, "adam")
    assert out.metrics["reached"] == 1.0
    assert out.metrics["steps"] is not None and out.metrics["steps"] < experiment.settings["steps"]
    assert out.curves["distance"][-1] < experiment.settings["tolerance"]
    assert len(out.artifacts["path"]) == len(out.curves["x"])


def test_toy_seeds_shift_the_start_point() -> None:
    experiment = _experiment("toy", "rosenbrock")
    a, b = _run(experiment, seed=0), _run(experiment, seed=1)
    assert a.artifacts["path"][0] != b.artifacts["path"][0]
    assert _run(experiment, seed=0).artifacts["path"] == a.artifacts["path"]


@pytest.mark.parametrize(
    ("task", "name"),
    [
        ("classify", "digits-digits-cnn"),
        ("lm", "stdlib-source-lstm1"),
        ("gan", "wgan-gp-mog"),
        ("gan", "gan-mog"),
        ("gan", "dcgan-digits"),
        ("transformer", "python-docs-1layer"),
    ],
)
def test_tiny_runs_are_deterministic_given_the_seed(task: str, name: str) -> None:
    experiment = _experiment(task, name)
    first, again = _run(experiment, "adabelief", 0), _run(experiment, "adabelief", 0)
    assert first.metrics == again.metrics
    assert _timeless(first.curves) == _timeless(again.curves)
    assert not first.diverged
    assert (
        experiment.score.name in first.metrics and first.metrics[experiment.score.name] is not None
    )
    assert first.artifacts == again.artifacts
    other_seed = _run(experiment, "adabelief", 1)
    assert (_timeless(other_seed.curves), other_seed.artifacts) != (
        _timeless(first.curves),
        first.artifacts,
    )
    if experiment.target is not None:  # time to target needs the curve, steps and seconds
        assert experiment.target.name in first.curves
        assert len(first.curves["step"]) == len(first.curves["time_s"]) == len(first.curves["x"])


@pytest.mark.parametrize(
    ("task", "name"),
    [
        ("classify", "digits-digits-cnn"),
        ("lm", "stdlib-source-lstm1"),
        ("transformer", "python-docs-1layer"),
        ("gan", "wgan-gp-mog"),
        ("gan", "dcgan-digits"),
    ],
)
def test_tiny_runs_of_a_bfloat16_variant_train_a_bfloat16_model(
    task: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = sys.modules[type(TASKS[task]).__module__]
    build = module.create_optimizer
    dtypes: list[set[torch.dtype]] = []

    def recording(optimizer: str, params: Any, **hparams: Any) -> torch.optim.Optimizer:
        params = list(params)
        dtypes.append({p.dtype for p in params})
        return build(optimizer, params, **hparams)

    monkeypatch.setattr(module, "create_optimizer", recording)
    experiment = _experiment(task, name)
    if task == "classify":  # one epoch: bfloat16 convolutions are slow on CPUs without bf16 units
        settings = {**experiment.settings, "epochs": 1, "milestones": []}
        experiment = dataclasses.replace(experiment, settings=settings)
    output = _run(experiment, "adabelief_bf16w_residual_int8")
    assert dtypes and all(seen == {torch.bfloat16} for seen in dtypes)
    assert not output.diverged
    assert output.metrics[experiment.score.name] is not None
    if experiment.target is not None:
        assert output.curves[experiment.target.name]


def test_toy_run_far_from_the_optimum_is_diverged() -> None:
    """A run that ends 1e9 or more away from the optimum diverged: no censored step count."""
    experiment = _experiment("toy", "quadratic", PlanOptions(quick=True))
    # SGD just past its stability limit grows geometrically but stays finite: after the 1000
    # steps it would end about 1e69 away from the optimum, a finite number.
    hparams = {"lr": 0.96, "momentum": 0.9}
    blown = RunSpec(experiment.task, experiment.name, experiment.settings, "sgd", hparams, 0)
    out = TASKS["toy"].run(blown, RunContext())
    assert out.diverged
    assert all(value is None for value in out.metrics.values())
    assert max(out.curves["distance"]) <= FUNCTIONS["quadratic"].divergence_distance


def test_transformer_learns_and_uses_the_warmup_schedule() -> None:
    experiment = _experiment("transformer", "python-docs-1layer")
    assert experiment.rivals("generalization") == ("adam", "adamw")
    assert experiment.settings["corpus_fingerprint"]
    out = _run(experiment, "adabelief")
    vocab = out.artifacts["vocab_size"]
    assert out.metrics["test_ppl"] is not None and 1.0 < out.metrics["test_ppl"] < vocab
    assert 0 <= out.metrics["test_accuracy"] <= 100
    assert out.curves["step"][-1] == experiment.settings["steps"]
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    schedule = inverse_sqrt_schedule(optimizer, warmup=4)
    lrs = []
    for _ in range(16):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]  # linear warm-up to the preset lr
    assert lrs[15] == pytest.approx((4 / 16) ** 0.5)  # then 1/sqrt(step)


def test_transformer_on_fake_wikitext(tmp_path: Path) -> None:
    write_fake_wikitext(tmp_path)
    (experiment,) = TASKS["transformer"].experiments(
        PlanOptions(quick=True, tiny=True, data_dir=tmp_path)
    )
    assert experiment.name.startswith("wikitext")
    out = _run(experiment, "adam", data=tmp_path)
    assert out.metrics["test_ppl"] is not None and not out.diverged


def test_language_model_evaluation_counts_every_window() -> None:
    class Uniform(torch.nn.Module):
        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return torch.zeros(*tokens.shape, 5)

    ppl, accuracy = evaluate_language_model(Uniform(), torch.arange(41) % 5, 8, "cpu")  # type: ignore[arg-type]
    assert ppl == pytest.approx(5.0)  # uniform over 5 tokens
    assert accuracy == pytest.approx(100 * 8 / 40)  # argmax is token 0: right 8 times in 40


def test_classify_fair_mode_selects_on_validation() -> None:
    experiment = _experiment(
        "classify", "digits-digits-cnn", PlanOptions(quick=True, tiny=True, mode="fair")
    )
    assert experiment.settings["validation_fraction"] > 0
    assert experiment.selection.name == "best_val_acc"
    out = _run(experiment, "adam")
    assert (
        out.metrics["best_val_acc"] is not None and out.metrics["test_acc_at_best_val"] is not None
    )
    assert 0 <= out.metrics["test_acc_at_best_val"] <= 100


def test_classify_on_fake_cifar(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path, per_batch=8)
    experiments = TASKS["classify"].experiments(
        PlanOptions(quick=True, tiny=True, data_dir=tmp_path)
    )
    assert [e.name for e in experiments] == ["cifar10-vgg11"]
    assert experiments[0].paper["adabelief"] == 91.41
    out = _run(experiments[0], "sgd", data=tmp_path)
    assert len(out.curves["test_acc"]) == experiments[0].settings["epochs"]
    assert 0 <= out.metrics["best_test_acc"] <= 100


def test_full_scale_cifar_plans_the_three_paper_models(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path)
    names = [
        e.name for e in TASKS["classify"].experiments(PlanOptions(quick=False, data_dir=tmp_path))
    ]
    assert names == ["cifar10-vgg11", "cifar10-resnet34", "cifar10-densenet121"]


def test_lm_on_fake_ptb(tmp_path: Path) -> None:
    write_fake_ptb(tmp_path)
    experiments = TASKS["lm"].experiments(PlanOptions(quick=True, tiny=True, data_dir=tmp_path))
    assert [e.name for e in experiments] == ["ptb-lstm1"]
    assert experiments[0].paper["adabelief"] == 84.21
    out = _run(experiments[0], "adam", data=tmp_path)
    vocab_size = out.artifacts["vocab_size"]
    # An untrained-ish model: perplexity well above 1 and not far above the uniform guess.
    assert out.metrics["test_ppl"] is not None and 1.5 < out.metrics["test_ppl"] < 3 * vocab_size
    full = TASKS["lm"].experiments(PlanOptions(quick=False, data_dir=tmp_path))
    assert [e.settings["layers"] for e in full] == [1, 2, 3]


def test_random_crop_flip_keeps_shape_and_is_seeded() -> None:
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    a = random_crop_flip(images, torch.Generator().manual_seed(0))
    b = random_crop_flip(images, torch.Generator().manual_seed(0))
    assert a.shape == images.shape and torch.equal(a, b)


def test_mog_quality_metric() -> None:
    assert mog_quality(MOG_CENTERS.repeat(10, 1)) == (1.0, 8.0)
    collapsed = MOG_CENTERS[:1].repeat(80, 1)
    assert mog_quality(collapsed) == (1.0, 1.0)
    assert mog_quality(torch.zeros(80, 2)) == (0.0, 0.0)
