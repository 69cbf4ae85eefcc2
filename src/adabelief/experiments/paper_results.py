"""The paper's reported numbers, and their comparison with measured results.

Zhuang et al., "AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed Gradients",
NeurIPS 2020 (arXiv:2010.07468).  :data:`PAPER_RESULTS` holds, per experiment, the value the
paper reports for each optimizer (registry names: ``adabelief``, ``sgd``, ``adam``, ...).  Values
the paper shows only in a figure are marked ``approximate``; where it gives only a bound ("FID
above 250") the value is that bound with ``bound="above"``.  Settings for which no number is
transcribed (CIFAR-100) are present with no values, so that a comparison says so instead of
silently showing nothing.

:func:`compare_with_paper` turns measured mean and standard deviation per optimizer into
:class:`PaperComparison` rows with a plain-words statement of where they differ and by how much.
Rendering (tables, Markdown) belongs to the report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

__all__ = [
    "PAPER_RESULTS",
    "Measured",
    "PaperComparison",
    "PaperExperiment",
    "PaperValue",
    "compare_with_paper",
    "paper_experiment",
    "reported_values",
]


@dataclass(frozen=True)
class PaperValue:
    """One reported number: ``value`` (and ``std`` when the paper gives one).

    ``approximate``: read off a figure.  ``bound="above"``: the paper only says the result was
    worse than ``value`` (e.g. "FID > 250").
    """

    value: float
    std: float | None = None
    approximate: bool = False
    bound: Literal["exact", "above"] = "exact"


@dataclass(frozen=True)
class PaperExperiment:
    """One setting of the paper: what it measured, where it is reported and the numbers."""

    key: str
    title: str
    metric: str
    higher_is_better: bool
    statistic: str
    source: str
    values: Mapping[str, PaperValue] = field(default_factory=dict)
    note: str = ""


def _exact(**values: float) -> dict[str, PaperValue]:
    return {name: PaperValue(value) for name, value in values.items()}


def _cifar10(model: str, title: str, column: int) -> PaperExperiment:
    # Paper, Sec. 4 "Image classification", Fig. 4 (CIFAR-10 test accuracy curves of VGG11,
    # ResNet34, DenseNet121) and the best test accuracy reported for each optimizer.
    best = {
        "adabelief": (91.41, 95.44, 95.51),
        "sgd": (90.11, 94.64, 94.50),
        "adam": (88.40, 93.02, 93.35),
        "adamw": (89.39, 94.59, 94.55),
        "radam": (89.30, 94.33, 94.81),
        "adabound": (90.62, 94.85, 94.58),
        "yogi": (90.67, 94.71, 94.76),
    }
    return PaperExperiment(
        key=f"cifar10/{model}",
        title=f"{title} on CIFAR-10",
        metric="test accuracy (%)",
        higher_is_better=True,
        statistic="best test accuracy over 200 epochs",
        source="paper, Sec. 4, Fig. 4 (CIFAR-10)",
        values={name: PaperValue(row[column]) for name, row in best.items()},
    )


def _cifar100(model: str, title: str) -> PaperExperiment:
    return PaperExperiment(
        key=f"cifar100/{model}",
        title=f"{title} on CIFAR-100",
        metric="test accuracy (%)",
        higher_is_better=True,
        statistic="best test accuracy over 200 epochs",
        source="paper, Sec. 4, Fig. 4 (CIFAR-100)",
        note="the paper's CIFAR-100 numbers are not transcribed here; compare with its figure",
    )


def _ptb(layers: int) -> PaperExperiment:
    # Paper, Sec. 4 "LSTM on Penn Treebank", Fig. 5 (test perplexity of 1-, 2-, 3-layer LSTMs).
    perplexity = {
        "adabelief": (84.21, 66.29, 61.23),
        "adam": (84.28, 67.27, 64.28),
        "sgd": (85.07, 67.42, 63.77),
        "adabound": (84.78, 67.53, 63.58),
        "radam": (88.57, 90.00, 93.11),
        "adamw": (87.80, 94.86, 104.49),
    }
    return PaperExperiment(
        key=f"ptb/lstm-{layers}",
        title=f"{layers}-layer LSTM on Penn Treebank",
        metric="test perplexity",
        higher_is_better=False,
        statistic="test perplexity after 200 epochs",
        source="paper, Sec. 4, Fig. 5 (Penn Treebank)",
        values={name: PaperValue(row[layers - 1]) for name, row in perplexity.items()},
    )


def _wgan(kind: str, title: str, adabelief: float, adam: float) -> PaperExperiment:
    # Paper, Sec. 4 "Generative adversarial networks", Fig. 6: box plots of the FID of 5 runs of
    # WGAN and WGAN-GP (DCGAN networks) on CIFAR-10; medians read off the plot.  SGD and AdaBound
    # fail there (FID above 250).
    failed = PaperValue(250.0, approximate=True, bound="above")
    return PaperExperiment(
        key=f"cifar10-gan/{kind}",
        title=f"{title} on CIFAR-10",
        metric="FID",
        higher_is_better=False,
        statistic="median FID of 5 runs",
        source="paper, Sec. 4, Fig. 6 (WGAN and WGAN-GP on CIFAR-10)",
        values={
            "adabelief": PaperValue(adabelief, approximate=True),
            "adam": PaperValue(adam, approximate=True),
            "sgd": failed,
            "adabound": failed,
        },
    )


PAPER_RESULTS: dict[str, PaperExperiment] = {
    experiment.key: experiment
    for experiment in (
        _cifar10("vgg11", "VGG11", 0),
        _cifar10("resnet34", "ResNet34", 1),
        _cifar10("densenet121", "DenseNet121", 2),
        _cifar100("vgg11", "VGG11"),
        _cifar100("resnet34", "ResNet34"),
        _cifar100("densenet121", "DenseNet121"),
        # Paper, Sec. 4, Table 2: top-1 accuracy of ResNet18 on ImageNet (90 epochs).
        PaperExperiment(
            key="imagenet/resnet18",
            title="ResNet18 on ImageNet",
            metric="top-1 test accuracy (%)",
            higher_is_better=True,
            statistic="top-1 accuracy after 90 epochs",
            source="paper, Sec. 4, Table 2 (ImageNet)",
            values=_exact(adabelief=70.08, sgd=70.23, adamw=67.93, radam=67.62, adam=63.79),
        ),
        _ptb(1),
        _ptb(2),
        _ptb(3),
        _wgan("wgan", "WGAN (weight clipping, DCGAN)", 81.0, 98.0),
        _wgan("wgan-gp", "WGAN-GP (DCGAN)", 60.0, 72.0),
        # Paper, Sec. 4, the SN-GAN FID table on CIFAR-10 (AdaBelief's standard deviation given).
        PaperExperiment(
            key="cifar10-gan/sngan",
            title="SN-GAN on CIFAR-10",
            metric="FID",
            higher_is_better=False,
            statistic="mean FID",
            source="paper, Sec. 4, SN-GAN FID table (CIFAR-10)",
            values={
                "adabelief": PaperValue(12.52, std=0.16),
                **_exact(adam=13.05, radam=12.70, sgd=49.70),
            },
        ),
        # Paper, the Transformer BLEU table: IWSLT14 German-English.
        PaperExperiment(
            key="iwslt14/transformer",
            title="Transformer on IWSLT14 De-En",
            metric="BLEU",
            higher_is_better=True,
            statistic="test BLEU",
            source="paper, Transformer BLEU table (IWSLT14 De-En)",
            values=_exact(adabelief=35.85, adamw=35.60, radam=35.51),
        ),
    )
}


def paper_experiment(key: str) -> PaperExperiment:
    """The experiment called ``key`` (raises ``KeyError`` naming the known keys)."""
    if key not in PAPER_RESULTS:
        raise KeyError(f"no paper results for {key!r}; known: {', '.join(PAPER_RESULTS)}")
    return PAPER_RESULTS[key]


def reported_values(key: str) -> dict[str, float]:
    """``{optimizer: value}`` of the numbers the paper reports for ``key`` (bounds left out)."""
    return {
        name: value.value
        for name, value in paper_experiment(key).values.items()
        if value.bound == "exact"
    }


class Measured(NamedTuple):
    """Measured mean and standard deviation over ``runs`` runs (``mean`` ``None``: all diverged)."""

    mean: float | None
    std: float | None = None
    runs: int | None = None


@dataclass(frozen=True)
class PaperComparison:
    """One optimizer's row: paper value, measured mean ± std, difference (measured - paper) and
    a plain-words statement.  ``None`` where there is nothing to show."""

    optimizer: str
    paper: float | None
    paper_std: float | None
    approximate: bool
    measured_mean: float | None
    measured_std: float | None
    runs: int | None
    difference: float | None
    statement: str


def _number(value: float) -> str:
    return f"{value:.2f}"


def _measured_text(measured: Measured) -> str:
    assert measured.mean is not None
    text = _number(measured.mean)
    if measured.std is not None and math.isfinite(measured.std):
        text += f" ± {_number(measured.std)}"
    if measured.runs is not None:
        text += f" over {measured.runs} run{'s' if measured.runs != 1 else ''}"
    return text


def _paper_text(value: PaperValue) -> str:
    if value.bound == "above":
        return f"above {value.value:g}"
    text = f"about {value.value:g}" if value.approximate else _number(value.value)
    if value.std is not None:
        text += f" ± {_number(value.std)}"
    return text


def _statement(experiment: PaperExperiment, paper: PaperValue, measured: Measured) -> str:
    mean = measured.mean
    assert mean is not None
    metric = experiment.metric
    said = f"measured {metric} {_measured_text(measured)}, paper {_paper_text(paper)}"
    if paper.bound == "above":
        if mean > paper.value:
            return f"{said}: failed here as in the paper"
        return (
            f"{said}: the paper reports failure, here it is {_number(paper.value - mean)} "
            "below that bound"
        )
    difference = mean - paper.value
    better = (difference > 0) == experiment.higher_is_better
    direction = "better" if better else "worse"
    relative = abs(difference) / abs(paper.value) if paper.value else math.inf
    size = f"{_number(abs(difference))} {'higher' if difference > 0 else 'lower'} ({relative:.1%})"
    caveat = "; the paper's value is read off a figure" if paper.approximate else ""
    spread = measured.std
    if difference == 0:
        return f"{said}: the same as the paper{caveat}"
    if spread is None or not math.isfinite(spread) or spread == 0 or (measured.runs or 2) < 2:
        return f"{said}: {size}, {direction} than the paper; no spread to judge it by{caveat}"
    ratio = abs(difference) / spread
    if ratio <= 1:
        return (
            f"{said}: {size}, within one standard deviation of the measured runs, so no "
            f"clear difference{caveat}"
        )
    return (
        f"{said}: {size}, {direction} than the paper by {ratio:.1f} standard deviations of "
        f"the measured runs{caveat}"
    )


def compare_with_paper(
    key: str,
    measured: Mapping[str, Measured | tuple[float | None, float | None]],
    *,
    measured_metric: str | None = None,
) -> list[PaperComparison]:
    """Rows for the experiment ``key``: the paper's optimizers in its order, then the others.

    ``measured`` maps optimizer names to :class:`Measured` (or ``(mean, std)``).  An optimizer
    the paper reports but that was not run gets a row saying so; one run here that the paper
    does not report gets a row with ``paper`` ``None``.  ``measured_metric`` names the measured
    quantity when it is not the paper's (e.g. perplexity beside BLEU, or a classifier's Frechet
    distance beside FID): the rows then show both values and no difference.
    """
    experiment = paper_experiment(key)
    results = {
        name: value if isinstance(value, Measured) else Measured(*value)
        for name, value in measured.items()
    }
    names = list(experiment.values) + [name for name in results if name not in experiment.values]
    rows = []
    for name in names:
        paper = experiment.values.get(name)
        result = results.get(name)
        mean = result.mean if result is not None else None
        if mean is not None and not math.isfinite(mean):
            mean = None
        difference = None
        if paper is None:
            reason = experiment.note or f"the paper reports no {experiment.metric} for {name}"
            statement = reason
            if result is not None and mean is not None:
                statement = f"measured {_measured_text(result)}; {reason}"
        elif result is None:
            statement = f"not run here; the paper reports {_paper_text(paper)}"
        elif mean is None:
            statement = f"every run diverged here; the paper reports {_paper_text(paper)}"
        elif measured_metric is not None:
            statement = (
                f"measured {measured_metric} {_measured_text(result._replace(mean=mean))}, "
                f"the paper's {experiment.metric} {_paper_text(paper)}: different quantities, "
                "so they are not compared"
            )
        else:
            statement = _statement(experiment, paper, result._replace(mean=mean))
            if paper.bound == "exact":
                difference = mean - paper.value
        rows.append(
            PaperComparison(
                optimizer=name,
                paper=paper.value if paper is not None else None,
                paper_std=paper.std if paper is not None else None,
                approximate=paper.approximate if paper is not None else False,
                measured_mean=mean,
                measured_std=result.std if result is not None and mean is not None else None,
                runs=result.runs if result is not None else None,
                difference=difference,
                statement=statement,
            )
        )
    return rows
