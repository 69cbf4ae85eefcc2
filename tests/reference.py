"""An independent float64 reference of the AdaBelief update, for the tests.

Written from the published update rule (adabelief-pytorch 0.2.1 with this project's fixes) in
NumPy, element-wise, without importing ``adabelief``. Per element, at step ``t`` (from 1)::

    g      = -g                                   (maximize)
    theta *= 1 - lr*wd  (1 - wd with fixed_decay)  (weight_decouple)
    g      = g + wd*theta                          (otherwise: L2 in the gradient)
    m      = b1*m + (1 - b1)*g
    s      = b2*s + (1 - b2)*(g - m)**2 + eps
    v      = max(s_max, s) with amsgrad (s_max = v), else s
    bc1 = 1 - b1**t, bc2 = 1 - b2**t
    rectify=False:  theta -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)
    rectify=True:   rho_inf = 2/(1 - b2) - 1, rho_t = rho_inf - 2 t b2**t / bc2
        rho_t >= 5:              theta -= lr * r_t * sqrt(bc2)/bc1 * m / (sqrt(v) + eps)
                                 r_t = sqrt((rho_t-4)(rho_t-2) rho_inf / ((rho_inf-4)(rho_inf-2) rho_t))
        else, degenerated_to_sgd: theta -= lr/bc1 * m
        else:                     theta unchanged

Every parameter keeps its own step count (a parameter without a gradient is skipped).
``official_rectified_amsgrad=True`` reproduces the official package's defect of using ``s``
instead of the AMSGrad maximum in the rectified update (used to pin down that difference).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

RHO_THRESHOLD = 5.0

#: The documented defaults of ``adabelief.AdaBelief``.
DEFAULTS: dict[str, object] = {
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "eps": 1e-16,
    "weight_decay": 0.0,
    "amsgrad": False,
    "weight_decouple": True,
    "fixed_decay": False,
    "rectify": True,
    "degenerated_to_sgd": True,
    "maximize": False,
}


def rho(t: int, beta2: float) -> tuple[float, float]:
    """(rho_inf, rho_t) of step ``t``."""
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    beta2_t = beta2**t
    return rho_inf, rho_inf - 2.0 * t * beta2_t / (1.0 - beta2_t)


def is_adaptive(t: int, beta2: float, rectify: bool) -> bool:
    """Whether step ``t`` divides by the belief (always without rectification)."""
    return not rectify or rho(t, beta2)[1] >= RHO_THRESHOLD


def first_adaptive_step(beta2: float, limit: int = 10_000) -> int:
    """The first step at which the rectified update becomes adaptive."""
    for t in range(1, limit):
        if is_adaptive(t, beta2, rectify=True):
            return t
    raise ValueError(f"beta2={beta2} never becomes adaptive within {limit} steps")


@dataclass
class _ParamState:
    step: int = 0
    exp_avg: np.ndarray | None = None
    exp_avg_var: np.ndarray | None = None
    max_exp_avg_var: np.ndarray | None = None


@dataclass
class ReferenceAdaBelief:
    """Float64 AdaBelief over a list of real NumPy arrays; options are plain attributes and may
    be changed between steps (as a scheduler would).

    ``round_param`` is applied to every parameter after its update (e.g. rounding to bfloat16 to
    emulate a 16-bit parameter whose update is computed in higher precision).
    """

    params: list[np.ndarray]
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-16
    weight_decay: float = 0.0
    amsgrad: bool = False
    weight_decouple: bool = True
    fixed_decay: bool = False
    rectify: bool = True
    degenerated_to_sgd: bool = True
    maximize: bool = False
    official_rectified_amsgrad: bool = False
    round_param: Callable[[np.ndarray], np.ndarray] | None = None
    state: list[_ParamState] = field(default_factory=list)
    #: For every parameter, the kind of each update taken: "adaptive", "sgd" or "none".
    branches: list[list[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.params = [np.array(p, dtype=np.float64, copy=True) for p in self.params]
        self.state = [_ParamState() for _ in self.params]
        self.branches = [[] for _ in self.params]

    def step(self, grads: Sequence[np.ndarray | None]) -> None:
        if len(grads) != len(self.params):
            raise ValueError("one gradient (or None) per parameter")
        for i, grad in enumerate(grads):
            if grad is not None:
                self._update(i, np.asarray(grad, dtype=np.float64))

    def _update(self, i: int, grad: np.ndarray) -> None:
        beta1, beta2 = float(self.betas[0]), float(self.betas[1])
        lr, eps, wd = float(self.lr), float(self.eps), float(self.weight_decay)
        theta = self.params[i].copy()
        st = self.state[i]
        if st.exp_avg is None:
            st.exp_avg = np.zeros_like(theta)
            st.exp_avg_var = np.zeros_like(theta)
        if self.amsgrad and st.max_exp_avg_var is None:
            st.max_exp_avg_var = np.zeros_like(theta)
        assert st.exp_avg_var is not None
        st.step += 1
        t = st.step

        g = -grad if self.maximize else grad.copy()
        if self.weight_decouple:
            theta = theta * (1.0 - wd if self.fixed_decay else 1.0 - lr * wd)
        else:
            g = g + wd * theta

        m = beta1 * st.exp_avg + (1.0 - beta1) * g
        s = beta2 * st.exp_avg_var + (1.0 - beta2) * (g - m) ** 2 + eps
        m, s = np.asarray(m), np.asarray(s)  # 0-dim stays an array
        st.exp_avg, st.exp_avg_var = m, s
        v = s
        if self.amsgrad:
            assert st.max_exp_avg_var is not None
            st.max_exp_avg_var = np.asarray(np.maximum(st.max_exp_avg_var, s))
            v = st.max_exp_avg_var

        bc1 = 1.0 - beta1**t
        bc2 = 1.0 - beta2**t
        if not self.rectify:
            theta = theta - lr / bc1 * m / (np.sqrt(v) / math.sqrt(bc2) + eps)
            branch = "adaptive"
        else:
            rho_inf, rho_t = rho(t, beta2)
            if rho_t >= RHO_THRESHOLD:
                r = math.sqrt(
                    (rho_t - 4.0)
                    * (rho_t - 2.0)
                    * rho_inf
                    / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)
                )
                v_rect = s if self.official_rectified_amsgrad else v
                theta = theta - lr * r * math.sqrt(bc2) / bc1 * m / (np.sqrt(v_rect) + eps)
                branch = "adaptive"
            elif self.degenerated_to_sgd:
                theta = theta - lr / bc1 * m
                branch = "sgd"
            else:
                branch = "none"
        if self.round_param is not None:
            theta = self.round_param(theta)
        self.params[i] = np.asarray(theta, dtype=np.float64)
        self.branches[i].append(branch)


def reference_from_options(params: Sequence[np.ndarray], **options: object) -> ReferenceAdaBelief:
    """A reference with the documented defaults, overridden by ``options`` (constructor names)."""
    unknown = set(options) - set(DEFAULTS) - {"official_rectified_amsgrad", "round_param"}
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}")
    merged = {**DEFAULTS, **options}
    return ReferenceAdaBelief(list(params), **merged)  # type: ignore[arg-type]


# --- The kernel paths under test (data only; the tests build the optimizers). ---------------

#: Kernel paths that every cross-path test runs over. Add "fused" here once it is implemented.
PATHS: tuple[str, ...] = ("single", "foreach")

_PATH_OPTIONS: dict[str, dict[str, bool]] = {
    "single": {"foreach": False, "fused": False},
    "foreach": {"foreach": True, "fused": False},
    "fused": {"foreach": False, "fused": True},
}


def path_options(path: str) -> dict[str, bool]:
    """The constructor keywords that select ``path``."""
    return dict(_PATH_OPTIONS[path])
