"""The paper's numbers and the plain-words comparison with measured results."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from adabelief.experiments.paper_results import (
    PAPER_RESULTS,
    Measured,
    PaperComparison,
    compare_with_paper,
    paper_experiment,
)
from adabelief.experiments.registry import known_optimizers


def test_every_experiment_names_registered_optimizers_and_a_source() -> None:
    optimizers = set(known_optimizers())
    for key, experiment in PAPER_RESULTS.items():
        assert experiment.key == key
        assert experiment.source.startswith("paper")
        assert set(experiment.values) <= optimizers, key
        assert experiment.values or experiment.note, key


def test_transcribed_values() -> None:
    assert paper_experiment("cifar10/resnet34").values["adabelief"].value == 95.44
    assert paper_experiment("cifar10/densenet121").values["yogi"].value == 94.76
    assert paper_experiment("ptb/lstm-3").values["adamw"].value == 104.49
    assert paper_experiment("imagenet/resnet18").values["sgd"].value == 70.23
    sngan = paper_experiment("cifar10-gan/sngan").values
    assert (sngan["adabelief"].value, sngan["adabelief"].std) == (12.52, 0.16)
    assert paper_experiment("iwslt14/transformer").values["adamw"].value == 35.60
    wgan = paper_experiment("cifar10-gan/wgan").values
    assert wgan["adabelief"].approximate and wgan["adabelief"].value == 81.0
    assert wgan["sgd"].bound == "above" and wgan["sgd"].value == 250.0
    assert paper_experiment("cifar100/vgg11").values == {}
    with pytest.raises(KeyError, match="known: cifar10/vgg11"):
        paper_experiment("cifar10/vgg16")


def _row(
    key: str, measured: Mapping[str, Measured | tuple[float, float]], optimizer: str
) -> PaperComparison:
    return next(row for row in compare_with_paper(key, measured) if row.optimizer == optimizer)


def test_differences_are_stated_with_direction_size_and_spread() -> None:
    worse = _row("cifar10/vgg11", {"adabelief": Measured(90.41, 0.25, 5)}, "adabelief")
    assert worse.paper == 91.41 and worse.difference == pytest.approx(-1.0)
    assert "1.00 lower" in worse.statement and "worse than the paper" in worse.statement
    assert "4.0 standard deviations" in worse.statement
    # Lower perplexity is better.
    better = _row("ptb/lstm-1", {"adabelief": (82.21, 0.5)}, "adabelief")
    assert better.difference == pytest.approx(-2.0) and "better than the paper" in better.statement
    close = _row("ptb/lstm-1", {"adam": Measured(84.5, 1.0, 3)}, "adam")
    assert "within one standard deviation" in close.statement
    single = _row("iwslt14/transformer", {"adabelief": Measured(35.0, 0.0, 1)}, "adabelief")
    assert "no spread" in single.statement
    figure = _row("cifar10-gan/wgan-gp", {"adabelief": Measured(65.0, 2.0, 5)}, "adabelief")
    assert "about 60" in figure.statement and "read off a figure" in figure.statement
    assert figure.approximate


def test_bounds_missing_runs_divergence_and_unreported_optimizers() -> None:
    rows = compare_with_paper(
        "cifar10-gan/wgan",
        {
            "sgd": Measured(310.0, 20.0, 5),
            "adabound": Measured(120.0, 5.0, 5),
            "adam": Measured(None, None, 5),
            "adabelief_int8": Measured(85.0, 3.0, 5),
        },
    )
    by_name = {row.optimizer: row for row in rows}
    assert [row.optimizer for row in rows] == [
        "adabelief",
        "adam",
        "sgd",
        "adabound",
        "adabelief_int8",
    ]
    assert "not run here" in by_name["adabelief"].statement
    assert "every run diverged" in by_name["adam"].statement
    assert by_name["adam"].measured_mean is None
    assert "failed here as in the paper" in by_name["sgd"].statement
    assert by_name["sgd"].difference is None  # a bound has no difference
    assert "130.00 below that bound" in by_name["adabound"].statement
    assert by_name["adabelief_int8"].paper is None
    assert "paper reports no FID for adabelief_int8" in by_name["adabelief_int8"].statement
    nan = _row("cifar10/vgg11", {"adam": Measured(float("nan"), 1.0, 5)}, "adam")
    assert nan.measured_mean is None and "every run diverged" in nan.statement


def test_settings_without_transcribed_numbers_say_so() -> None:
    (row,) = compare_with_paper("cifar100/resnet34", {"adabelief": Measured(77.0, 0.3, 5)})
    assert row.paper is None and row.difference is None
    assert row.measured_mean == 77.0
    assert "not transcribed" in row.statement


def test_statements_are_plain_text() -> None:
    measured = {name: Measured(50.0, 1.0, 5) for name in known_optimizers()}
    for key in PAPER_RESULTS:
        for row in compare_with_paper(key, measured):
            assert not any(mark in row.statement for mark in ("|", "*", "`", "#", "\n"))
