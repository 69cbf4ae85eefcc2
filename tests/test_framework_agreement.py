"""PyTorch ``adabelief.AdaBelief``, ``adabelief.optax.adabelief`` and ``adabelief.keras.AdaBelief``
take the same 50 steps on the same problem, for every option combination; and the array math
that Keras and optax share (``adabelief._array_scalars``, ``adabelief._array_update``), run on
NumPy in float64, is PyTorch's scalars and the float64 reference rule.

PyTorch and optax run in this process; Keras runs in one child process per installed backend
(this file run as a script: ``python tests/test_framework_agreement.py JOB.json``), started
before the in-process work so that they overlap with it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from adabelief import _array_update
from adabelief._array_scalars import array_step_scalars

# The jax backend is compared with the same float64 reference (and tolerance) in test_keras.py;
# one Keras child keeps this module quick.
KERAS_BACKENDS = ("torch",)
# Each framework is within float32 rounding of float64 arithmetic; so are their differences.
RTOL, ATOL = 1e-5, 1e-6

from framework_problem import (  # noqa: E402
    RECTIFY_MODES,
    STEPS,
    all_cases,
    assert_step_scalars_match_torch,
    initial_params,
    keras_child_env,
    problem_grad,
    reference_run,
)

CASES = all_cases()
FLAGS = ("amsgrad", "weight_decouple", "fixed_decay", "rectify", "degenerated_to_sgd", "maximize")


# --------------------------------------------------------------------------------------------
# Runners: each returns {name: final float32 values as float64 arrays}.
# --------------------------------------------------------------------------------------------
def run_torch(opts: dict[str, Any], **impl: Any) -> dict[str, np.ndarray]:
    import torch

    from adabelief import AdaBelief

    params = {
        n: torch.nn.Parameter(torch.tensor(p, dtype=torch.float32))
        for n, p in initial_params().items()
    }
    opt = AdaBelief(
        list(params.values()),
        lr=opts["lr"],
        betas=(opts["b1"], opts["b2"]),
        eps=opts["eps"],
        weight_decay=opts["weight_decay"],
        **{f: opts[f] for f in FLAGS},
        **impl,
    )
    for t in range(1, STEPS + 1):
        for n, p in params.items():
            g = problem_grad(n, p.detach().double().numpy(), t)
            p.grad = torch.tensor(g, dtype=torch.float32)
        opt.step()
    return {n: p.detach().double().numpy() for n, p in params.items()}


def run_optax(opts: dict[str, Any]) -> dict[str, np.ndarray]:
    import jax
    import jax.numpy as jnp
    import optax

    from adabelief.optax import adabelief

    tx = adabelief(
        opts["lr"],
        opts["b1"],
        opts["b2"],
        opts["eps"],
        opts["weight_decay"],
        **{f: opts[f] for f in FLAGS},
    )

    @jax.jit
    def step(grads: Any, state: Any, params: Any) -> Any:
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = {n: jnp.asarray(p, jnp.float32) for n, p in initial_params().items()}
    state = tx.init(params)
    for t in range(1, STEPS + 1):
        grads = {
            n: problem_grad(n, np.asarray(p, np.float64), t).astype(np.float32)
            for n, p in params.items()
        }
        params, state = step(grads, state, params)
    return {n: np.asarray(p, np.float64) for n, p in params.items()}


def run_keras(opts: dict[str, Any]) -> dict[str, np.ndarray]:
    import keras

    from adabelief.keras import AdaBelief

    opt = AdaBelief(
        learning_rate=opts["lr"],
        beta_1=opts["b1"],
        beta_2=opts["b2"],
        epsilon=opts["eps"],
        weight_decay=opts["weight_decay"],
        **{f: opts[f] for f in FLAGS},
    )
    variables = [keras.Variable(p.astype(np.float32), name=n) for n, p in initial_params().items()]
    for t in range(1, STEPS + 1):
        grads = [
            problem_grad(v.name, keras.ops.convert_to_numpy(v.value).astype(np.float64), t).astype(
                np.float32
            )
            for v in variables
        ]
        opt.apply(grads, variables)
    return {v.name: keras.ops.convert_to_numpy(v.value).astype(np.float64) for v in variables}


def child_main(job_path: str) -> None:
    with open(job_path) as f:
        cases = json.load(f)["cases"]
    out = {cid: {n: p.tolist() for n, p in run_keras(opts).items()} for cid, opts in cases.items()}
    print("@@RESULT@@" + json.dumps(out))


# --------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------
def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _torch_optimizer_missing() -> str | None:
    if not _has("torch"):
        return "torch is not installed"
    try:
        from adabelief import AdaBelief  # noqa: F401
    except ImportError as exc:
        return f"adabelief.AdaBelief (PyTorch) is not importable: {exc}"
    return None


@pytest.fixture(scope="module")
def results() -> Iterator[dict[str, Any]]:
    """framework name -> {case id -> params} (or an error/skip message string)."""
    if (reason := _torch_optimizer_missing()) is not None:
        pytest.skip(reason)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        job = os.path.join(tmpdir, "job.json")
        with open(job, "w") as f:
            json.dump({"cases": CASES}, f)
        procs = {}
        for backend in KERAS_BACKENDS:
            name = f"keras-{backend}"
            if not (_has("keras") and _has(backend)):
                out[name] = f"skip: keras or {backend} is not installed"
                continue
            procs[name] = subprocess.Popen(
                [sys.executable, __file__, job],
                env=keras_child_env(backend),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        try:
            out["torch"] = {cid: run_torch(opts) for cid, opts in CASES.items()}
            if _has("jax") and _has("optax"):
                out["optax"] = {cid: run_optax(opts) for cid, opts in CASES.items()}
            else:
                out["optax"] = "skip: jax/optax are not installed"
        finally:
            for name, proc in procs.items():
                stdout, stderr = proc.communicate(timeout=900)
                lines = [ln for ln in stdout.splitlines() if ln.startswith("@@RESULT@@")]
                if proc.returncode or not lines:
                    out[name] = f"child {name} failed (rc={proc.returncode}):\n{stderr[-4000:]}"
                else:
                    raw = json.loads(lines[-1][len("@@RESULT@@") :])
                    out[name] = {
                        c: {n: np.asarray(v) for n, v in p.items()} for c, p in raw.items()
                    }
        yield out


def _get(results: dict[str, Any], framework: str) -> dict[str, Any]:
    res = results[framework]
    if isinstance(res, str):
        if res.startswith("skip: "):
            pytest.skip(res[len("skip: ") :])
        pytest.fail(res)
    return res


def assert_agree(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("case_id", list(CASES))
@pytest.mark.parametrize("framework", ["optax", "keras-torch"])
def test_agrees_with_torch(results: dict[str, Any], framework: str, case_id: str) -> None:
    torch_params = _get(results, "torch")[case_id]
    assert_agree(_get(results, framework)[case_id], torch_params)
    # The run is not trivial: parameters moved far beyond the tolerance.
    start = initial_params()
    assert max(np.max(np.abs(torch_params[n] - start[n])) for n in start) > 0.05


TORCH_PATHS = {
    "foreach": dict(foreach=True),
    "single-tensor": dict(foreach=False),
    "capturable": dict(capturable=True),
    "fused": dict(fused=True),
}


@pytest.mark.parametrize(
    "case_id", [c for c in CASES if c.startswith("B-") or c.endswith("ams1-max1")]
)
@pytest.mark.slow
@pytest.mark.parametrize("path", list(TORCH_PATHS))
def test_torch_paths_agree_with_optax(results: dict[str, Any], path: str, case_id: str) -> None:
    """Every PyTorch implementation path against the optax transform (a framework-independent
    implementation of the same scalars)."""
    want = _get(results, "optax")[case_id]
    try:
        got = run_torch(CASES[case_id], **TORCH_PATHS[path])
    except (RuntimeError, ValueError) as exc:
        if path == "fused" and "fused" in str(exc).lower():
            pytest.skip(f"fused AdaBelief unavailable here: {exc}")
        raise
    assert_agree(got, want)


# --------------------------------------------------------------------------------------------
# The shared array math on NumPy (float64): the namespace Keras and optax pass, as NumPy.
# --------------------------------------------------------------------------------------------
NP_OPS = SimpleNamespace(
    cast=lambda x, dtype: np.asarray(x, dtype),
    log=np.log,
    exp=np.exp,
    expm1=np.expm1,
    sqrt=np.sqrt,
    square=np.square,
    minimum=np.minimum,
    maximum=np.maximum,
    clip=np.clip,
    where=np.where,
    zeros_like=np.zeros_like,
)


@pytest.mark.parametrize("betas_as_arrays", [False, True])
@pytest.mark.parametrize("mode", list(RECTIFY_MODES))
def test_array_step_scalars_are_torchs_in_float64(mode: str, betas_as_arrays: bool) -> None:
    """Python-number betas (float64 constants) and array betas (``inject_hyperparams``)."""
    rectify, sgd = RECTIFY_MODES[mode]
    for b1, b2 in [(0.9, 0.999), (0.8, 0.99), (0.5, 0.9), (0.99, 0.9999), (0.9, 0.5)]:
        betas = (np.asarray(b1), np.asarray(b2)) if betas_as_arrays else (b1, b2)
        sc = array_step_scalars(
            NP_OPS,
            np.arange(1, 20001),
            0.01,
            *betas,
            rectify=rectify,
            degenerated_to_sgd=sgd,
            dtype=np.float64,
        )
        assert_step_scalars_match_torch(
            sc, 20000, 0.01, b1, b2, rectify=rectify, degenerated_to_sgd=sgd, rtol=1e-9
        )


@pytest.mark.parametrize("case_id", [c for c in CASES if "-nodecay-" in c])
def test_array_update_is_the_reference_rule(case_id: str) -> None:
    """``first_moment``, ``belief`` and ``parameter_step`` with the array scalars take the 50
    steps of the float64 reference (weight decay is each front end's own)."""
    opts = CASES[case_id]
    b1, b2, eps, lr = opts["b1"], opts["b2"], opts["eps"], opts["lr"]
    params = initial_params()
    m = {n: np.zeros_like(p) for n, p in params.items()}
    s = {n: np.zeros_like(p) for n, p in params.items()}
    s_max = {n: np.zeros_like(p) for n, p in params.items()}
    for t in range(1, STEPS + 1):
        sc = array_step_scalars(
            NP_OPS,
            t,
            lr,
            b1,
            b2,
            rectify=opts["rectify"],
            degenerated_to_sgd=opts["degenerated_to_sgd"],
            dtype=np.float64,
        )
        for n in params:
            g = problem_grad(n, params[n], t) * (-1.0 if opts["maximize"] else 1.0)
            m[n] = _array_update.first_moment(m[n], g, b1)
            s[n] = _array_update.belief(NP_OPS, s[n], g, m[n], b2, eps)
            s_max[n] = np.maximum(s_max[n], s[n])
            v = s_max[n] if opts["amsgrad"] else s[n]
            params[n] = params[n] - _array_update.parameter_step(NP_OPS, m[n], v, sc, eps)
    want, state = reference_run(STEPS, **opts)
    for n in params:
        np.testing.assert_allclose(params[n], want[n], rtol=1e-8, atol=1e-10, err_msg=n)
        np.testing.assert_allclose(s[n], state[n]["s"], rtol=1e-8, atol=1e-20, err_msg=n)
    assert max(np.max(np.abs(params[n] - initial_params()[n])) for n in params) > 0.05


if __name__ == "__main__":
    child_main(sys.argv[1])
