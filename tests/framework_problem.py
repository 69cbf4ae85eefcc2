"""The deterministic problem and float64 reference shared by the Keras, optax and cross-framework
tests: every framework computes its gradients from its own current parameters with
:func:`problem_grad`, so no random-number state is shared between frameworks."""

from __future__ import annotations

import importlib.util
import itertools
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

STEPS = 50
SHAPES = {"w": (4, 3), "b": (3,), "k": (2, 1, 2)}


def initial_params() -> dict[str, np.ndarray]:
    return {
        name: (0.5 * np.sin(0.37 * np.arange(math.prod(shape)) + i) + 0.1).reshape(shape)
        for i, (name, shape) in enumerate(SHAPES.items())
    }


def problem_grad(name: str, theta: np.ndarray, t: int) -> np.ndarray:
    """Gradient of tensor `name` at step t (1-based), from its current value, in float64."""
    i = list(SHAPES).index(name)
    x = np.asarray(theta, np.float64).reshape(-1)
    n = x.size
    j, k = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    a = np.eye(n) + 0.3 * np.cos(0.5 * j + 0.9 * k + i)
    b = np.cos(0.61 * np.arange(n) + i)
    noise = 0.5 * np.sin(1.7 * t + 0.3 * np.arange(n) + i)
    return (a @ x - b + noise).reshape(theta.shape)


def reference_run(
    steps: int,
    *,
    lr: float | Callable[[int], float],
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    weight_decouple: bool,
    fixed_decay: bool,
    rectify: bool,
    degenerated_to_sgd: bool,
    maximize: bool,
    decayed: Callable[[str], bool] = lambda name: True,
    round_params: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """Float64 transcription of the AdaBelief rule; returns final params and state."""
    theta = initial_params()
    if round_params is not None:
        theta = {n: round_params(p) for n, p in theta.items()}
    state = {
        n: {"m": np.zeros_like(p), "s": np.zeros_like(p), "s_max": np.zeros_like(p)}
        for n, p in theta.items()
    }
    for t in range(1, steps + 1):
        lr_t = lr(t - 1) if callable(lr) else lr
        for name in theta:
            p = theta[name].copy()
            g = problem_grad(name, p, t)
            if round_params is not None:  # the gradient arrives in the 16-bit dtype too
                g = round_params(g)
            st = state[name]
            if maximize:
                g = -g
            if weight_decay and decayed(name):
                if weight_decouple and fixed_decay:
                    p *= 1.0 - (weight_decay if lr_t != 0 else 0.0)  # lr == 0: no step at all
                elif weight_decouple:
                    p *= 1.0 - lr_t * weight_decay
                else:
                    g = g + weight_decay * p
            st["m"] = b1 * st["m"] + (1 - b1) * g
            st["s"] = b2 * st["s"] + (1 - b2) * (g - st["m"]) ** 2 + eps
            v = st["s"]
            if amsgrad:
                st["s_max"] = np.maximum(st["s_max"], st["s"])
                v = st["s_max"]
            bc1, bc2 = 1 - b1**t, 1 - b2**t
            if not rectify:
                p -= lr_t / bc1 * st["m"] / (np.sqrt(v) / math.sqrt(bc2) + eps)
            else:
                rho_inf = 2 / (1 - b2) - 1
                rho_t = rho_inf - 2 * t * b2**t / bc2
                if rho_t >= 5:
                    r = math.sqrt(
                        (rho_t - 4)
                        * (rho_t - 2)
                        * rho_inf
                        / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
                    )
                    p -= lr_t * r * math.sqrt(bc2) / bc1 * st["m"] / (np.sqrt(v) + eps)
                elif degenerated_to_sgd:
                    p -= lr_t / bc1 * st["m"]
            theta[name] = round_params(p) if round_params is not None else p
    return theta, state


# (rectify, degenerated_to_sgd), decay mode, amsgrad, maximize
RECTIFY_MODES = {"plain": (False, True), "rect-sgd": (True, True), "rect-skip": (True, False)}
DECAY_MODES = {
    "nodecay": dict(weight_decouple=True, fixed_decay=False, zero=True),
    "l2": dict(weight_decouple=False, fixed_decay=False, zero=False),
    "decoupled": dict(weight_decouple=True, fixed_decay=False, zero=False),
    "fixed": dict(weight_decouple=True, fixed_decay=True, zero=False),
}
# Large eps and b2 = 0.99 make every term of the rule visible in 50 steps; set B is closer to
# the defaults (tiny eps, b2 = 0.999: SGD steps 1-5, rectified steps from 6 on).
HYPERS = {
    "A": dict(lr=0.02, b1=0.9, b2=0.99, eps=1e-4, weight_decay=0.05),
    "B": dict(lr=0.01, b1=0.8, b2=0.999, eps=1e-16, weight_decay=0.01),
}


def torch_step_scalars(
    steps: int, lr: float, b1: float, b2: float, *, rectify: bool, degenerated_to_sgd: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch's :func:`adabelief.step_scalars` for the steps ``1..steps`` at once (its tensor
    branch, in float64): ``step_size``, ``sqrt_bias_correction2``, ``adaptive``."""
    import torch

    from adabelief import step_scalars

    t = torch.arange(1, steps + 1, dtype=torch.float64)
    got = step_scalars(t, lr, b1, b2, rectify=rectify, degenerated_to_sgd=degenerated_to_sgd)
    step_size, sqrt_bc2, adaptive = (torch.as_tensor(x).expand(steps).numpy() for x in got)
    return step_size.astype(np.float64), sqrt_bc2.astype(np.float64), adaptive.astype(bool)


def assert_step_scalars_match_torch(
    got: Any,
    steps: int,
    lr: float,
    b1: float,
    b2: float,
    *,
    rectify: bool,
    degenerated_to_sgd: bool,
    to_numpy: Callable[[Any], np.ndarray] = np.asarray,
    rtol: float = 2e-6,
) -> None:
    """``got``, the StepScalars of the steps ``1..steps`` (arrays), equals PyTorch's float64
    :func:`adabelief.step_scalars` to ``rtol``, with ``adaptive`` exactly equal."""
    want = torch_step_scalars(
        steps, lr, b1, b2, rectify=rectify, degenerated_to_sgd=degenerated_to_sgd
    )
    names = ("step_size", "sqrt_bias_correction2", "adaptive")
    for name, value, expected in zip(names, got, want, strict=True):
        actual = np.broadcast_to(to_numpy(value), expected.shape)
        if name == "adaptive":
            np.testing.assert_array_equal(actual, expected, err_msg=name)
        else:
            np.testing.assert_allclose(
                actual.astype(np.float64), expected, rtol=rtol, atol=0, err_msg=name
            )


def case_options(h: str, rect: str, dec: str, ams: bool, maxi: bool) -> dict[str, Any]:
    """The options of one case: hyperparameter set ``h``, rectify mode, decay mode, flags."""
    hyp = dict(HYPERS[h])
    mode = DECAY_MODES[dec]
    if mode["zero"]:
        hyp["weight_decay"] = 0.0
    rectify, sgd = RECTIFY_MODES[rect]
    return dict(
        hyp,
        amsgrad=ams,
        weight_decouple=mode["weight_decouple"],
        fixed_decay=mode["fixed_decay"],
        rectify=rectify,
        degenerated_to_sgd=sgd,
        maximize=maxi,
    )


def case_keys() -> list[tuple[str, str, str, bool, bool]]:
    """Every option combination (maximize only with set A: it does not interact with them)."""
    return [
        (h, rect, dec, ams, maxi)
        for h, rect, dec, ams, maxi in itertools.product(
            HYPERS, RECTIFY_MODES, DECAY_MODES, (False, True), (False, True)
        )
        if not (h == "B" and maxi)
    ]


def case_id(h: str, rect: str, dec: str, ams: bool, maxi: bool) -> str:
    return f"{h}-{rect}-{dec}-ams{int(ams)}-max{int(maxi)}"


def all_cases() -> dict[str, dict[str, Any]]:
    """Case id -> options, for every option combination."""
    return {case_id(*key): case_options(*key) for key in case_keys()}


def keras_child_env(backend: str) -> dict[str, str]:
    """Environment of a child process running Keras on ``backend`` with this checkout's
    ``adabelief`` importable."""
    env = dict(os.environ, KERAS_BACKEND=backend, OMP_NUM_THREADS="1")
    spec = importlib.util.find_spec("adabelief")
    assert spec is not None and spec.submodule_search_locations
    src = str(Path(next(iter(spec.submodule_search_locations))).parent)
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    return env
