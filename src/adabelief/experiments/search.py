"""Fair mode's search spaces and quasi-random trials (after AlgoPerf's external tuning and DeepOBS).

Every optimizer gets the same number of trials, drawn from its own documented search space:

* adaptive methods (AdaBelief and its variants, Adam, AdamW, RAdam, AdaBound, Yogi): learning
  rate, eps, weight decay and beta1;
* SGD: learning rate, momentum and weight decay.

Trial ``i`` is the ``i``-th point ``u`` of a scrambled Halton sequence in ``[0, 1)^4``
(``scipy.stats.qmc``, fixed seed :data:`TRIAL_SEED`), the same point for every optimizer, mapped
into that optimizer's space.  The sequence's prefixes are stable, so ``--trials 8`` reuses the
runs of ``--trials 4``.  Spaces are centred on the optimizer's preset for the experiment, so
they suit each problem's scale:

* ``lr = preset_lr * 10**(w * (2 u0 - 1))``, log-uniform over a factor ``10**w`` either side
  (``w = 0.5`` with ``--quick``, 1 otherwise).  For SGD the same is drawn for the effective step
  ``lr / (1 - momentum)``, then divided by ``1 / (1 - momentum)``;
* ``eps`` log-uniform in ``[1e-16, 1e-8]`` for AdaBelief (its eps is about Adam's squared) and
  in ``[1e-10, 1e-6]`` for the others (``u1``);
* ``momentum = 1 - 10**(-2 u1)``: ``1 - momentum`` log-uniform in ``[0.01, 1]`` (SGD);
* ``weight_decay = preset_wd * 10**(w * (2 u2 - 1))`` when the preset decays, else 0 (not
  searched: on the 2-D functions decay would move the optimum);
* ``beta1 = 1 - 10**(log10(0.5) + u3 * (log10(0.05) - log10(0.5)))``: ``1 - beta1``
  log-uniform in ``[0.05, 0.5]``, i.e. ``beta1`` in ``[0.5, 0.95]``; ``beta2`` keeps its preset.

Each trial runs once, at seed :data:`TUNING_SEED`, and is judged on validation data; the best
trial is then rerun at every seed and scored on test data.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from typing import Any

__all__ = [
    "TRIAL_SEED",
    "TUNING_SEED",
    "Dimension",
    "SearchSpace",
    "default_trials",
    "search_space",
    "trial_hparams",
    "unit_point",
]

#: Seed of the scrambled Halton sequence (fixed: trial i is the same everywhere).
TRIAL_SEED = 20201020
#: The seed every trial runs at before the winner is rerun at every seed.
TUNING_SEED = 0
_DIMENSIONS = 4


def default_trials(quick: bool) -> int:
    """Trials per optimizer when ``--trials`` is not given."""
    return 4 if quick else 20


@functools.lru_cache(maxsize=8)
def _halton(n: int) -> tuple[tuple[float, ...], ...]:
    from scipy.stats import qmc

    points = qmc.Halton(_DIMENSIONS, scramble=True, seed=TRIAL_SEED).random(n)
    return tuple(tuple(float(v) for v in row) for row in points)


def unit_point(trial: int) -> tuple[float, ...]:
    """The ``trial``-th point of the scrambled Halton sequence in ``[0, 1)^4``."""
    if trial < 0:
        raise ValueError(f"trial must be >= 0, got {trial}")
    size = 1 << max(4, trial.bit_length())  # cache a power-of-two prefix covering the index
    return _halton(size)[trial]


@dataclass(frozen=True)
class Dimension:
    """One searched hyperparameter: ``low``..``high`` on a ``"log"`` scale, or fixed."""

    name: str
    low: float
    high: float
    description: str

    @property
    def fixed(self) -> bool:
        """Whether the dimension has a single value (not searched)."""
        return self.low == self.high

    def to_json(self) -> dict[str, Any]:
        """Plain-dict form stored with fair-mode runs."""
        return {"name": self.name, "low": self.low, "high": self.high, "rule": self.description}


@dataclass(frozen=True)
class SearchSpace:
    """An optimizer's fair-mode search space for one experiment."""

    optimizer: str
    family: str
    dimensions: tuple[Dimension, ...]
    base: dict[str, Any]
    width: float

    def hparams(self, u: tuple[float, ...]) -> dict[str, Any]:
        """The hyperparameters of unit point ``u`` (preset values for everything not searched)."""
        hparams = copy.deepcopy(self.base)
        w = self.width
        lr = float(self.base["lr"])
        if self.family == "sgd":
            one_minus_momentum = 10 ** (-2 * u[1])
            base_effective = lr / max(1e-12, 1 - float(self.base.get("momentum", 0.0)))
            effective = base_effective * 10 ** (w * (2 * u[0] - 1))
            hparams["momentum"] = _round(1 - one_minus_momentum)
            hparams["lr"] = _round(effective * one_minus_momentum)
        else:
            hparams["lr"] = _round(lr * 10 ** (w * (2 * u[0] - 1)))
            low, high = self._bounds("eps")
            hparams["eps"] = _round(10 ** (math.log10(low) + u[1] * (math.log10(high / low))))
            beta2 = float(self.base.get("betas", (0.9, 0.999))[1])
            one_minus_beta1 = 10 ** (math.log10(0.5) + u[3] * (math.log10(0.05) - math.log10(0.5)))
            hparams["betas"] = [_round(1 - one_minus_beta1), beta2]
        decay = float(self.base.get("weight_decay", 0.0))
        hparams["weight_decay"] = _round(decay * 10 ** (w * (2 * u[2] - 1))) if decay > 0 else 0.0
        return hparams

    def _bounds(self, name: str) -> tuple[float, float]:
        dimension = next(d for d in self.dimensions if d.name == name)
        return dimension.low, dimension.high

    def to_json(self) -> dict[str, Any]:
        """Plain-dict form stored with fair-mode runs and shown in the report."""
        return {
            "optimizer": self.optimizer,
            "family": self.family,
            "dimensions": [d.to_json() for d in self.dimensions],
        }

    def describe(self) -> str:
        """One line: each dimension's range (or fixed value)."""
        parts = []
        for d in self.dimensions:
            if d.fixed:
                parts.append(f"{d.name} = {d.low:g} (fixed)")
            else:
                parts.append(f"{d.name} in [{d.low:.3g}, {d.high:.3g}] ({d.description})")
        return "; ".join(parts)


def _round(value: float) -> float:
    return float(f"{value:.6g}")


def search_space(optimizer: str, preset: dict[str, Any], quick: bool) -> SearchSpace:
    """``optimizer``'s search space around its ``preset`` hyperparameters for one experiment."""
    if "lr" not in preset:
        raise ValueError(f"the preset of {optimizer!r} has no learning rate to search around")
    w = 0.5 if quick else 1.0
    factor = 10**w
    lr = float(preset["lr"])
    decay = float(preset.get("weight_decay", 0.0))
    decay_dim = (
        Dimension("weight_decay", decay / factor, decay * factor, "log-uniform around the preset")
        if decay > 0
        else Dimension("weight_decay", 0.0, 0.0, "the preset does not decay")
    )
    if optimizer == "sgd":
        momentum = float(preset.get("momentum", 0.0))
        effective = lr / max(1e-12, 1 - momentum)
        dims: tuple[Dimension, ...] = (
            Dimension(
                "lr / (1 - momentum)",
                effective / factor,
                effective * factor,
                "log-uniform around the preset's effective step",
            ),
            Dimension("momentum", 0.0, 0.99, "1 - momentum log-uniform in [0.01, 1]"),
            decay_dim,
        )
        return SearchSpace(optimizer, "sgd", dims, copy.deepcopy(preset), w)
    eps = (1e-16, 1e-8) if optimizer.startswith("adabelief") else (1e-10, 1e-6)
    dims = (
        Dimension("lr", lr / factor, lr * factor, "log-uniform around the preset"),
        Dimension("eps", eps[0], eps[1], "log-uniform"),
        decay_dim,
        Dimension("beta1", 0.5, 0.95, "1 - beta1 log-uniform in [0.05, 0.5]"),
    )
    return SearchSpace(optimizer, "adaptive", dims, copy.deepcopy(preset), w)


def trial_hparams(
    optimizer: str, preset: dict[str, Any], quick: bool, trial: int
) -> dict[str, Any]:
    """Hyperparameters of fair-mode trial ``trial`` for ``optimizer`` around its ``preset``."""
    return search_space(optimizer, preset, quick).hparams(unit_point(trial))
