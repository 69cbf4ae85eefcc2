"""What an experiment and a single run are, independent of any task.

An :class:`Experiment` is one comparison (e.g. "ResNet34 on CIFAR-10"): its settings, the metric
reported on test data, the metric that picks a fair-mode trial on validation data, the curve
whose time-to-target is measured, and which of the paper's claims it informs.  A
:class:`RunSpec` is one training run: an experiment, an optimizer with its hyperparameters, a
seed, the fair-mode trial it belongs to (``None`` for the preset), and the torch thread count
and device, which change results too.  Its :meth:`RunSpec.key` (a hash of all of that) names
the file the finished run is stored in, which is what makes runs resumable.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CLAIMS",
    "CLAIM_RIVALS",
    "RUN_FORMAT_VERSION",
    "Experiment",
    "Metric",
    "RunContext",
    "RunOutput",
    "RunSpec",
    "canonical_json",
    "digest",
]

#: Bump when a change to the training code makes stored runs incomparable with new ones.
#: 2: thread count, device and fair-mode trial are part of a run's identity.
RUN_FORMAT_VERSION = 2

#: The paper's three claims, keyed as experiments refer to them.
CLAIMS: dict[str, str] = {
    "convergence": "AdaBelief converges fast, like adaptive methods (Adam)",
    "generalization": "AdaBelief generalizes well, like SGD",
    "gan": "AdaBelief trains GANs stably",
}

#: Per claim, the optimizers AdaBelief is compared with unless an experiment names others
#: (the paper's baselines: Adam for speed and GANs, SGD for generalization).
CLAIM_RIVALS: dict[str, tuple[str, ...]] = {
    "convergence": ("adam",),
    "generalization": ("sgd",),
    "gan": ("adam",),
}


def canonical_json(value: Any) -> str:
    """Deterministic JSON text (sorted keys, no spaces) used for hashing."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def digest(value: Any, length: int = 16) -> str:
    """First ``length`` hex digits of the SHA-256 of :func:`canonical_json` of ``value``."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:length]


@dataclass(frozen=True)
class Metric:
    """A named scalar in a run's ``metrics`` (or a curve in its ``curves``) and its direction."""

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


def _metric_or_none(data: Any) -> Metric | None:
    return None if data is None else Metric.from_json(data)


@dataclass(frozen=True)
class Experiment:
    """One comparison of optimizers.

    ``score`` is reported (test data); ``selection`` picks the trial in fair mode (validation
    data); ``speed`` measures convergence speed (claim 1) when the experiment has such a
    measure; ``extra`` are further metrics shown in tables.  ``target`` names the curve whose
    time-to-target is measured (``curves[target.name]``, higher or lower is better).
    ``claims`` names the keys of :data:`CLAIMS` the experiment is evidence for, and ``versus``
    overrides :data:`CLAIM_RIVALS` per claim.  ``paper`` holds the paper's reported ``score``
    per optimizer, when the experiment matches one in the paper, and ``paper_key`` names that
    setting in :data:`~adabelief.experiments.paper_results.PAPER_RESULTS` (the report's
    side-by-side table; empty when no paper setting matches); ``paper_comparable`` is false when
    the measured score is another quantity than the paper's (e.g. perplexity beside BLEU), so
    the table shows both without a difference.  ``curves`` lists
    ``(curve name, label)`` pairs to plot against ``x_label`` (the run's ``curves["x"]``);
    ``plot`` names a figure the task draws itself (see ``Task.plots``) or is empty.
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
    target: Metric | None = None
    versus: dict[str, tuple[str, ...]] = field(default_factory=dict)
    paper: dict[str, float] = field(default_factory=dict)
    paper_key: str = ""
    paper_comparable: bool = True

    def rivals(self, claim: str) -> tuple[str, ...]:
        """The optimizers AdaBelief is compared with for ``claim`` in this experiment."""
        return self.versus.get(claim, CLAIM_RIVALS.get(claim, ()))

    def to_json(self) -> dict[str, Any]:
        """Plain-dict form stored with every run."""
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
            "target": None if self.target is None else self.target.to_json(),
            "versus": {k: list(v) for k, v in self.versus.items()},
            "paper": self.paper,
            "paper_key": self.paper_key,
            "paper_comparable": self.paper_comparable,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Experiment:
        """Inverse of :meth:`to_json` (raises ``KeyError``/``TypeError``/``ValueError`` if bad)."""
        return cls(
            task=str(data["task"]),
            name=str(data["name"]),
            title=str(data["title"]),
            preset=str(data["preset"]),
            settings=dict(data["settings"]),
            score=Metric.from_json(data["score"]),
            selection=Metric.from_json(data["selection"]),
            claims=tuple(str(c) for c in data["claims"]),
            speed=_metric_or_none(data.get("speed")),
            extra=tuple(Metric.from_json(m) for m in data.get("extra", [])),
            curves=tuple((str(a), str(b)) for a, b in data.get("curves", [])),
            plot=str(data.get("plot", "")),
            x_label=str(data.get("x_label", "epoch")),
            target=_metric_or_none(data.get("target")),
            versus={str(k): tuple(map(str, v)) for k, v in data.get("versus", {}).items()},
            paper={str(k): float(v) for k, v in data.get("paper", {}).items()},
            paper_key=str(data.get("paper_key", "")),
            paper_comparable=bool(data.get("paper_comparable", True)),
        )

    @property
    def metrics(self) -> list[Metric]:
        """Score, selection, speed and extra metrics without duplicates, in that order."""
        result: list[Metric] = []
        for metric in (self.score, self.selection, self.speed, *self.extra):
            if metric is not None and metric.name not in {m.name for m in result}:
                result.append(metric)
        return result


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class RunSpec:
    """One training run: experiment settings, optimizer, hyperparameters, seed, threads, device.

    ``trial`` is ``None`` for an optimizer's preset (paper mode) and the index of the
    quasi-random trial in fair mode.  Every field is part of the run's identity: torch's
    results depend on the intra-op thread count and on the device.
    """

    task: str
    experiment: str
    settings: dict[str, Any]
    optimizer: str
    hparams: dict[str, Any]
    seed: int
    trial: int | None = None
    threads: int = 1
    device: str = "cpu"

    @property
    def mode(self) -> str:
        """``"paper"`` for a preset run, ``"fair"`` for a trial of the fair protocol."""
        return "paper" if self.trial is None else "fair"

    def identity(self) -> dict[str, Any]:
        """Everything that determines the run's result (and nothing else)."""
        return {"format": RUN_FORMAT_VERSION, **asdict(self)}

    def key(self) -> str:
        """Stable, file-name-safe name: readable prefix plus a hash of :meth:`identity`."""
        trial = "" if self.trial is None else f"t{self.trial}-"
        prefix = f"{self.task}-{self.experiment}-{self.optimizer}-{trial}s{self.seed}"
        return f"{_UNSAFE.sub('_', prefix)}-{digest(self.identity())}"

    def to_json(self) -> dict[str, Any]:
        """Plain-dict form."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunSpec:
        """Inverse of :meth:`to_json` (raises ``KeyError``/``TypeError``/``ValueError`` if bad)."""
        trial = data.get("trial")
        return cls(
            task=str(data["task"]),
            experiment=str(data["experiment"]),
            settings=dict(data["settings"]),
            optimizer=str(data["optimizer"]),
            hparams=dict(data["hparams"]),
            seed=int(data["seed"]),
            trial=None if trial is None else int(trial),
            threads=int(data.get("threads", 1)),
            device=str(data.get("device", "cpu")),
        )


@dataclass(frozen=True)
class RunContext:
    """Where a run reads its data, whether it shows epoch bars, and a folder for caches that
    outlive one run (e.g. FID's reference statistics; ``None``: no cache).  Not part of its
    identity."""

    data_dir: Path | None = None
    progress: bool = False
    cache_dir: Path | None = None


@dataclass
class RunOutput:
    """What a task returns for one run.

    ``metrics`` maps metric names to values (``None`` when undefined, e.g. after divergence);
    ``curves`` maps curve names to per-evaluation values with ``curves["x"]`` the positions
    (epochs, steps, iterations), ``curves["step"]`` the optimizer steps taken and
    ``curves["time_s"]`` the seconds of training so far at each evaluation, where the task
    records them; ``artifacts`` holds small things to plot (trajectories, samples).
    """

    metrics: dict[str, float | None]
    curves: dict[str, list[float | None]] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)
    diverged: bool = False
