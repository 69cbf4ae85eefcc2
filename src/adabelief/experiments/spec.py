"""What an experiment and a single run are, independent of any task.

An :class:`Experiment` is one comparison (e.g. "ResNet34 on CIFAR-10"): its settings, the metric
reported on test data, the metric used to pick a learning rate on validation data in fair mode,
and which of the paper's claims it informs.  A :class:`RunSpec` is one training run: an
experiment, an optimizer with its hyperparameters, and a seed.  Its :meth:`RunSpec.key` (a hash of
all of that) names the file the finished run is stored in, which is what makes runs resumable.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CLAIMS",
    "RUN_FORMAT_VERSION",
    "Experiment",
    "Metric",
    "RunContext",
    "RunOutput",
    "RunSpec",
    "canonical_json",
]

#: Bump when a change to the training code makes stored runs incomparable with new ones.
RUN_FORMAT_VERSION = 1

#: The paper's three claims, keyed as experiments refer to them.
CLAIMS: dict[str, str] = {
    "convergence": "AdaBelief converges fast, like adaptive methods (Adam)",
    "generalization": "AdaBelief generalizes well, like SGD",
    "gan": "AdaBelief trains GANs stably",
}


def canonical_json(value: Any) -> str:
    """Deterministic JSON text (sorted keys, no spaces) used for hashing."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class Metric:
    """A named scalar in a run's ``metrics`` and whether larger values are better."""

    name: str
    label: str
    higher_is_better: bool

    def to_json(self) -> dict[str, Any]:
        """Plain-dict form for JSON files."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Metric:
        """Inverse of :meth:`to_json`."""
        return cls(str(data["name"]), str(data["label"]), bool(data["higher_is_better"]))


@dataclass(frozen=True)
class Experiment:
    """One comparison of optimizers.

    ``score`` is reported (test data); ``selection`` picks the learning rate in fair mode
    (validation data); ``speed`` measures convergence speed (claim 1), when the experiment has
    such a measure; ``extra`` are further metrics shown in tables.  ``claims`` names the keys
    of :data:`CLAIMS` the experiment is evidence for.  ``paper`` holds the paper's reported
    ``score`` per optimizer, when the experiment matches one in the paper.
    ``curves`` lists ``(curve name, label)`` pairs to plot against ``x_label`` (the run's
    ``curves["x"]``); ``plot`` names a task-specific figure (``"trajectories"``, ``"points"``,
    ``"images"``) or is empty.
    """

    task: str
    name: str
    title: str
    preset: str
    settings: dict[str, Any]
    score: Metric
    selection: Metric
    claims: tuple[str, ...]
    speed: Metric | None = None
    extra: tuple[Metric, ...] = ()
    curves: tuple[tuple[str, str], ...] = ()
    plot: str = ""
    x_label: str = "epoch"
    paper: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Plain-dict form stored in the run folder's manifest."""
        return {
            "task": self.task,
            "name": self.name,
            "title": self.title,
            "preset": self.preset,
            "settings": self.settings,
            "score": self.score.to_json(),
            "selection": self.selection.to_json(),
            "claims": list(self.claims),
            "speed": None if self.speed is None else self.speed.to_json(),
            "extra": [m.to_json() for m in self.extra],
            "curves": [list(c) for c in self.curves],
            "plot": self.plot,
            "x_label": self.x_label,
            "paper": self.paper,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Experiment:
        """Inverse of :meth:`to_json`."""
        return cls(
            task=data["task"],
            name=data["name"],
            title=data["title"],
            preset=data["preset"],
            settings=dict(data["settings"]),
            score=Metric.from_json(data["score"]),
            selection=Metric.from_json(data["selection"]),
            claims=tuple(data["claims"]),
            speed=None if data.get("speed") is None else Metric.from_json(data["speed"]),
            extra=tuple(Metric.from_json(m) for m in data.get("extra", [])),
            curves=tuple((str(a), str(b)) for a, b in data.get("curves", [])),
            plot=str(data.get("plot", "")),
            x_label=str(data.get("x_label", "epoch")),
            paper={str(k): float(v) for k, v in data.get("paper", {}).items()},
        )

    @property
    def metrics(self) -> list[Metric]:
        """Score, selection, speed and extra metrics without duplicates, in that order."""
        result: list[Metric] = []
        for metric in (self.score, self.selection, self.speed, *self.extra):
            if metric is not None and metric.name not in {m.name for m in result}:
                result.append(metric)
        return result


@dataclass(frozen=True)
class RunSpec:
    """One training run: experiment settings, optimizer, hyperparameters and seed."""

    task: str
    experiment: str
    settings: dict[str, Any]
    optimizer: str
    hparams: dict[str, Any]
    lr_factor: float
    seed: int

    def identity(self) -> dict[str, Any]:
        """Everything that determines the run's result (and nothing else)."""
        return {
            "format": RUN_FORMAT_VERSION,
            "task": self.task,
            "experiment": self.experiment,
            "settings": self.settings,
            "optimizer": self.optimizer,
            "hparams": self.hparams,
            "seed": self.seed,
        }

    def key(self) -> str:
        """Stable name of the run: readable prefix plus a hash of :meth:`identity`."""
        digest = hashlib.sha256(canonical_json(self.identity()).encode()).hexdigest()[:16]
        return f"{self.task}-{self.experiment}-{self.optimizer}-s{self.seed}-{digest}"

    def to_json(self) -> dict[str, Any]:
        """Plain-dict form."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunSpec:
        """Inverse of :meth:`to_json`."""
        return cls(
            task=data["task"],
            experiment=data["experiment"],
            settings=dict(data["settings"]),
            optimizer=data["optimizer"],
            hparams=dict(data["hparams"]),
            lr_factor=float(data["lr_factor"]),
            seed=int(data["seed"]),
        )


@dataclass(frozen=True)
class RunContext:
    """Where and how a run executes (not part of its identity)."""

    device: str = "cpu"
    data_dir: Path | None = None
    progress: bool = False


@dataclass
class RunOutput:
    """What a task returns for one run.

    ``metrics`` maps metric names to values (``None`` when undefined, e.g. after divergence);
    ``curves`` maps curve names to per-epoch/per-checkpoint values with ``curves["x"]`` the
    positions; ``artifacts`` holds small things to plot (trajectories, samples).
    """

    metrics: dict[str, float | None]
    curves: dict[str, list[float | None]] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)
    diverged: bool = False
