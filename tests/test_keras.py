"""Tests of ``adabelief.keras.AdaBelief`` against an independent float64 NumPy reference.

Keras fixes its backend at import. API-level tests run in this process on its backend
(``KERAS_BACKEND``; if unset and TensorFlow is missing, jax or torch is chosen here). The
numerics, training and save/load checks run in one child process per backend (this file run as
a script, ``python tests/test_keras.py JOB.json``), started concurrently, printing JSON.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

BACKENDS = ("jax", "torch", "tensorflow")
BACKEND_PACKAGE = {"jax": "jax", "torch": "torch", "tensorflow": "tensorflow"}


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


if "KERAS_BACKEND" not in os.environ and "keras" not in sys.modules and not _has("tensorflow"):
    # Keras' default backend is TensorFlow; without it, `import keras` fails.
    for _backend in ("jax", "torch"):
        if _has(_backend):
            os.environ["KERAS_BACKEND"] = _backend
            break

keras = pytest.importorskip("keras", reason="keras is not installed (pip install adabelief[keras])")

from adabelief.keras import AdaBelief, step_scalars  # noqa: E402

# Keras' NumPy conversions (np.array(tensor)) warn under NumPy 2 with torch tensors; not ours.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

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
JIT_CASES = [
    "A-rect-sgd-decoupled-ams1-max0",
    "A-plain-l2-ams0-max1",
    "B-rect-skip-fixed-ams1-max0",
]


def make_optimizer(opts: dict[str, Any], **extra: Any) -> Any:
    o = dict(opts, **extra)
    return AdaBelief(
        learning_rate=o.pop("lr"), beta_1=o.pop("b1"), beta_2=o.pop("b2"), epsilon=o.pop("eps"), **o
    )


# --------------------------------------------------------------------------------------------
# Child-process side: runs on the backend given by KERAS_BACKEND and returns plain lists.
# --------------------------------------------------------------------------------------------
_NP_DTYPES: dict[str, Any] = {"float32": np.float32, "float16": np.float16}
if importlib.util.find_spec("ml_dtypes") is not None:
    import ml_dtypes

    _NP_DTYPES["bfloat16"] = ml_dtypes.bfloat16


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, keras.Variable):
        x = x.value  # converting the Variable itself warns under NumPy 2
    return np.asarray(keras.ops.convert_to_numpy(x), np.float64)


def _run_problem(
    opt: Any, steps: int = STEPS, dtype: str = "float32", exclude: dict[str, Any] | None = None
) -> dict[str, Any]:
    variables = [
        keras.Variable(p.astype(np.float32), dtype=dtype, name=n)
        for n, p in initial_params().items()
    ]
    if exclude is not None:
        if exclude.get("var_list"):
            exclude = dict(
                exclude, var_list=[v for v in variables if v.name in exclude["var_list"]]
            )
        opt.exclude_from_weight_decay(**exclude)
    for t in range(1, steps + 1):
        grads = [
            problem_grad(v.name, _numpy(v), t).astype(np.float32).astype(_NP_DTYPES[dtype])
            for v in variables
        ]
        opt.apply(grads, variables)
    return _collect(opt, variables)


def _collect(opt: Any, variables: list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"params": {}, "m": {}, "s": {}, "s_max": {}, "dtypes": {}}
    for i, v in enumerate(variables):
        out["params"][v.name] = _numpy(v).tolist()
        out["m"][v.name] = _numpy(opt._exp_avgs[i]).tolist()
        out["s"][v.name] = _numpy(opt._exp_avg_vars[i]).tolist()
        states = [opt._exp_avgs[i], opt._exp_avg_vars[i]]
        if opt.amsgrad:
            out["s_max"][v.name] = _numpy(opt._max_exp_avg_vars[i]).tolist()
            states.append(opt._max_exp_avg_vars[i])
        out["dtypes"][v.name] = [keras.backend.standardize_dtype(s.dtype) for s in states]
    out["iterations"] = int(_numpy(opt.iterations))
    return out


def _run_problem_jax_jit(opt: Any) -> dict[str, Any]:
    """The same 50 steps through a jitted `stateless_apply` (the path `fit` uses on jax)."""
    import jax

    variables = [keras.Variable(p.astype(np.float32), name=n) for n, p in initial_params().items()]
    opt.build(variables)
    step = jax.jit(opt.stateless_apply)
    values = [v.value for v in variables]
    opt_values = [v.value for v in opt.variables]
    for t in range(1, STEPS + 1):
        grads = [
            problem_grad(v.name, np.asarray(x, np.float64), t).astype(np.float32)
            for v, x in zip(variables, values, strict=True)
        ]
        values, opt_values = step(opt_values, grads, values)
    for var, x in zip(variables, values, strict=True):
        var.assign(x)
    for var, x in zip(opt.variables, opt_values, strict=True):
        var.assign(x)
    return _collect(opt, variables)


def _model_data() -> tuple[np.ndarray, np.ndarray]:
    x = np.sin(np.arange(64 * 8, dtype=np.float64).reshape(64, 8) * 0.7).astype(np.float32)
    y = np.tanh(x @ np.linspace(-1.0, 1.0, 8))[:, None] + 0.1 * np.cos(3.0 * x[:, :1])
    return x, y.astype(np.float32)


def _make_model(opt: Any, model: Any = None) -> Any:
    if model is None:
        model = keras.Sequential(
            [keras.Input((8,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)]
        )
    model.set_weights(
        [
            (0.3 * np.sin(np.arange(w.size) * 1.3 + i)).reshape(w.shape).astype(np.float32)
            for i, w in enumerate(model.get_weights())
        ]
    )
    model.compile(optimizer=opt, loss="mse")
    return model


def _fit_and_resume(tmpdir: str) -> dict[str, Any]:
    """fit reduces the loss; save/load mid-training continues exactly like no interruption."""
    x, y = _model_data()
    kw = dict(batch_size=16, shuffle=False, verbose=0)

    def fresh_opt() -> Any:
        schedule = keras.optimizers.schedules.ExponentialDecay(0.02, decay_steps=4, decay_rate=0.9)
        return AdaBelief(learning_rate=schedule, weight_decay=0.01, amsgrad=True, epsilon=1e-8)

    full = _make_model(fresh_opt())
    history = full.fit(x, y, epochs=6, **kw)
    out: dict[str, Any] = {"losses": [float(v) for v in history.history["loss"]]}

    part = _make_model(fresh_opt())
    part.fit(x, y, epochs=3, **kw)
    path = os.path.join(tmpdir, f"model-{keras.backend.backend()}.keras")
    part.save(path)
    loaded = keras.saving.load_model(path)  # no custom_objects: registered by the import
    out["loaded_class"] = type(loaded.optimizer).__module__ + "." + type(loaded.optimizer).__name__
    out["config_equal"] = loaded.optimizer.get_config() == part.optimizer.get_config()
    out["iterations_loaded"] = int(_numpy(loaded.optimizer.iterations))
    loaded.fit(x, y, epochs=3, **kw)
    out["full"] = [w.tolist() for w in full.get_weights()]
    out["resumed"] = [w.tolist() for w in loaded.get_weights()]

    # Control: same weights, but a fresh optimizer state, must give different weights.
    reset = keras.saving.load_model(path)
    reset.compile(optimizer=fresh_opt(), loss="mse")
    reset.fit(x, y, epochs=3, **kw)
    out["reset"] = [w.tolist() for w in reset.get_weights()]
    return out


def child_main(job_path: str) -> None:
    with open(job_path) as f:
        job = json.load(f)
    backend = keras.backend.backend()
    result: dict[str, Any] = {"backend": backend, "numerics": {}, "jit": {}}
    for case_id, opts in job["cases"].items():
        result["numerics"][case_id] = _run_problem(make_optimizer(opts))
    if backend == "jax":
        for case_id in JIT_CASES:
            result["jit"][case_id] = _run_problem_jax_jit(make_optimizer(CASES[case_id]))
    base = CASES["A-rect-sgd-decoupled-ams0-max0"]
    schedule = keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=1, decay_rate=0.95)
    result["schedule"] = _run_problem(make_optimizer(base, lr=schedule))
    result["exclude"] = {}
    for dec in ("l2", "decoupled", "fixed"):
        opts = dict(CASES[f"A-rect-sgd-{dec}-ams0-max0"], weight_decay=0.2)
        result["exclude"][f"{dec}-names"] = _run_problem(
            make_optimizer(opts), exclude={"var_names": ["b"]}
        )
        result["exclude"][f"{dec}-list"] = _run_problem(
            make_optimizer(opts), exclude={"var_list": ["b"]}
        )
    result["half"] = {
        dtype: _run_problem(make_optimizer(CASES["A-rect-sgd-decoupled-ams1-max0"]), 20, dtype)
        for dtype in ("bfloat16", "float16")
    }
    result["fit"] = _fit_and_resume(job["tmpdir"])
    print("@@RESULT@@" + json.dumps(result))


# --------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def children() -> Iterator[dict[str, Any]]:
    """Start one child per installed backend, concurrently; map backend -> result or error."""
    with tempfile.TemporaryDirectory() as tmpdir:
        job = os.path.join(tmpdir, "job.json")
        with open(job, "w") as f:
            json.dump({"cases": CASES, "tmpdir": tmpdir}, f)
        procs = {
            b: subprocess.Popen(
                [sys.executable, __file__, job],
                env=keras_child_env(b),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for b in BACKENDS
            if _has(BACKEND_PACKAGE[b])
        }
        results: dict[str, Any] = {}
        for b, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=900)
            lines = [ln for ln in stdout.splitlines() if ln.startswith("@@RESULT@@")]
            if proc.returncode or not lines:
                results[b] = (
                    f"child for backend {b} failed (rc={proc.returncode}):\n{stderr[-4000:]}"
                )
            else:
                results[b] = json.loads(lines[-1][len("@@RESULT@@") :])
        yield results


INSTALLED_BACKENDS = [b for b in BACKENDS if _has(BACKEND_PACKAGE[b])]
MISSING_BACKENDS = [b for b in BACKENDS if b not in INSTALLED_BACKENDS]


def _result(children: dict[str, Any], backend: str) -> dict[str, Any]:
    res = children[backend]
    if isinstance(res, str):
        pytest.fail(res)
    assert res["backend"] == backend
    return res


@pytest.fixture(params=INSTALLED_BACKENDS)
def result(request: pytest.FixtureRequest, children: dict[str, Any]) -> dict[str, Any]:
    return _result(children, request.param)


@pytest.mark.parametrize("backend", MISSING_BACKENDS)
def test_backend_not_installed(backend: str) -> None:
    pytest.skip(
        f"Keras backend {backend!r} not tested: {BACKEND_PACKAGE[backend]} is not installed"
    )


def assert_close(
    got: dict[str, Any], want: dict[str, np.ndarray], rtol: float = 1e-5, atol: float = 1e-6
) -> None:
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(
            np.asarray(got[name]), want[name], rtol=rtol, atol=atol, err_msg=name
        )


def check_against_reference(run: dict[str, Any], opts: dict[str, Any], **ref_kwargs: Any) -> None:
    want, state = reference_run(STEPS, **opts, **ref_kwargs)
    assert run["iterations"] == STEPS
    assert_close(run["params"], want)
    assert_close(run["m"], {n: s["m"] for n, s in state.items()})
    assert_close(run["s"], {n: s["s"] for n, s in state.items()}, atol=1e-9)
    if opts["amsgrad"]:
        assert_close(run["s_max"], {n: s["s_max"] for n, s in state.items()}, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("case_id", list(CASES))
def test_matches_numpy_reference(result: dict[str, Any], case_id: str) -> None:
    check_against_reference(result["numerics"][case_id], CASES[case_id])


@pytest.mark.slow
@pytest.mark.parametrize("case_id", JIT_CASES)
def test_jax_jit_matches_numpy_reference(children: dict[str, Any], case_id: str) -> None:
    if "jax" not in INSTALLED_BACKENDS:
        pytest.skip("jax is not installed")
    check_against_reference(_result(children, "jax")["jit"][case_id], CASES[case_id])


@pytest.mark.slow
def test_learning_rate_schedule(result: dict[str, Any]) -> None:
    opts = CASES["A-rect-sgd-decoupled-ams0-max0"]
    check_against_reference(result["schedule"], dict(opts, lr=lambda i: 0.05 * 0.95**i))
    constant, _ = reference_run(STEPS, **dict(opts, lr=0.05))
    assert not np.allclose(result["schedule"]["params"]["w"], constant["w"], rtol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("dec", ["l2", "decoupled", "fixed"])
@pytest.mark.parametrize("how", ["names", "list"])
def test_exclude_from_weight_decay(result: dict[str, Any], dec: str, how: str) -> None:
    opts = dict(CASES[f"A-rect-sgd-{dec}-ams0-max0"], weight_decay=0.2)
    run = result["exclude"][f"{dec}-{how}"]
    check_against_reference(run, opts, decayed=lambda name: name != "b")
    decayed_everywhere, _ = reference_run(STEPS, **opts)
    assert not np.allclose(run["params"]["b"], decayed_everywhere["b"], rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_variables(result: dict[str, Any], dtype: str) -> None:
    """16-bit variables: float32 state and math, one rounding to the variable dtype per step."""
    run = result["half"][dtype]
    assert all(d == ["float32"] * 3 for d in run["dtypes"].values())
    if dtype == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes needed to round to bfloat16")
        np_dtype: Any = ml_dtypes.bfloat16
    else:
        np_dtype = np.float16

    def round_half(p: np.ndarray) -> np.ndarray:
        return np.asarray(np.asarray(p, np.float32).astype(np_dtype), np.float64)

    opts = CASES["A-rect-sgd-decoupled-ams1-max0"]
    want, _ = reference_run(20, **opts, round_params=round_half)
    ulp = 2.0**-7 if dtype == "bfloat16" else 2.0**-10
    assert_close(run["params"], want, rtol=2 * ulp, atol=1e-3)
    for values in run["params"].values():  # really on the 16-bit grid
        np.testing.assert_array_equal(round_half(np.asarray(values)), np.asarray(values))


@pytest.mark.slow
def test_fit_reduces_loss(result: dict[str, Any]) -> None:
    losses = result["fit"]["losses"]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.slow
def test_save_load_continues_training(result: dict[str, Any]) -> None:
    fit = result["fit"]
    assert fit["loaded_class"] == "adabelief.keras.AdaBelief"
    assert fit["config_equal"]
    assert fit["iterations_loaded"] == 3 * 4  # 3 epochs of 64/16 batches
    for full, resumed in zip(fit["full"], fit["resumed"], strict=True):
        np.testing.assert_allclose(resumed, full, rtol=1e-6, atol=1e-7)
    # Sanity of the check itself: without the restored optimizer state the weights differ.
    assert any(
        not np.allclose(reset, full, rtol=1e-4, atol=1e-6)
        for full, reset in zip(fit["full"], fit["reset"], strict=True)
    )


# --------------------------------------------------------------------------------------------
# In-process API tests (this process's backend)
# --------------------------------------------------------------------------------------------
def test_defaults() -> None:
    opt = AdaBelief()
    cfg = opt.get_config()
    expected = dict(
        learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-16, weight_decay=0.0,
        amsgrad=False, weight_decouple=True, fixed_decay=False, rectify=True,
        degenerated_to_sgd=True, maximize=False,
    )  # fmt: skip
    for key, value in expected.items():
        assert cfg[key] == (
            pytest.approx(value, rel=1e-7, abs=0) if key == "learning_rate" else value
        )


def test_config_round_trip() -> None:
    schedule = keras.optimizers.schedules.CosineDecay(0.01, decay_steps=100)
    opt = AdaBelief(
        learning_rate=schedule, beta_1=0.8, beta_2=0.99, epsilon=1e-8, weight_decay=0.1,
        amsgrad=True, weight_decouple=False, fixed_decay=True, rectify=False,
        degenerated_to_sgd=False, maximize=True, clipnorm=1.0, use_ema=True,
        gradient_accumulation_steps=2, name="ab",
    )  # fmt: skip
    cfg = opt.get_config()
    clone = AdaBelief.from_config(json.loads(json.dumps(cfg)))
    assert clone.get_config() == cfg
    # Generic Keras (de)serialization finds the class without custom_objects.
    again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert type(again) is AdaBelief and again.get_config() == cfg
    assert keras.saving.get_registered_name(AdaBelief) == "adabelief>AdaBelief"


def test_exclude_from_weight_decay_survives_keras_save_and_load(tmp_path: Any) -> None:
    """Keras' own AdamW loses exclude_from_weight_decay in a .keras file, so a resumed run decays
    what it should not; here it is in the config (variables by path), and resuming continues
    exactly like no interruption."""
    x, y = _model_data()
    kw = dict(batch_size=16, shuffle=False, verbose=0)

    def model_excluding() -> Any:
        model = keras.Sequential(
            [
                keras.Input((8,)),
                keras.layers.Dense(16, activation="tanh", name="hidden"),
                keras.layers.Dense(1, name="out"),
            ]
        )
        opt = AdaBelief(learning_rate=0.02, weight_decay=0.5)
        opt.exclude_from_weight_decay(var_list=[model.get_layer("out").kernel], var_names=["bias"])
        return _make_model(opt, model)

    full = model_excluding()
    full.fit(x, y, epochs=4, **kw)
    part = model_excluding()
    part.fit(x, y, epochs=2, **kw)
    path = tmp_path / "excluded.keras"
    part.save(path)
    loaded = keras.saving.load_model(path)
    out_kernel = loaded.get_layer("out").kernel
    assert loaded.optimizer.get_config()["exclude_from_weight_decay"] == {
        "var_names": ["bias"],
        "var_paths": [part.get_layer("out").kernel.path],
    }
    assert not loaded.optimizer._use_weight_decay(out_kernel)
    assert not loaded.optimizer._use_weight_decay(loaded.get_layer("hidden").bias)
    assert loaded.optimizer._use_weight_decay(loaded.get_layer("hidden").kernel)
    loaded.fit(x, y, epochs=2, **kw)
    for resumed, uninterrupted in zip(loaded.get_weights(), full.get_weights(), strict=True):
        np.testing.assert_allclose(resumed, uninterrupted, rtol=1e-6, atol=1e-7)
    # A config without exclusions stays as before.
    assert "exclude_from_weight_decay" not in AdaBelief().get_config()


def test_weight_decay_none_disables_decay() -> None:
    opts = CASES["A-plain-nodecay-ams0-max0"]
    variables = [keras.Variable(np.ones(3, np.float32), name="x")]
    opt_none = make_optimizer(opts, weight_decay=None)
    opt_zero = make_optimizer(opts)
    other = [keras.Variable(np.ones(3, np.float32), name="x")]
    for _ in range(3):
        opt_none.apply([np.full(3, 0.5, np.float32)], variables)
        opt_zero.apply([np.full(3, 0.5, np.float32)], other)
    np.testing.assert_array_equal(_numpy(variables[0]), _numpy(other[0]))


def test_gradient_accumulation_steps() -> None:
    """With accumulation over 2 micro-batches, each update equals one step on the mean gradient
    (and t counts updates, not micro-batches)."""
    opts = CASES["A-rect-sgd-decoupled-ams1-max0"]
    accumulating = make_optimizer(opts, gradient_accumulation_steps=2)
    plain = make_optimizer(opts)
    var_acc = [keras.Variable(p.astype(np.float32), name=n) for n, p in initial_params().items()]
    var_plain = [keras.Variable(p.astype(np.float32), name=n) for n, p in initial_params().items()]
    for t in range(1, 13):
        micro = [
            [problem_grad(v.name, _numpy(v), 2 * t - i).astype(np.float32) for v in var_acc]
            for i in (1, 0)
        ]
        for grads in micro:
            accumulating.apply(grads, var_acc)
        plain.apply([(a + b) / 2 for a, b in zip(*micro, strict=True)], var_plain)
        for a, p in zip(var_acc, var_plain, strict=True):
            np.testing.assert_allclose(_numpy(a), _numpy(p), rtol=1e-6, atol=1e-7)
    assert int(_numpy(accumulating.iterations)) == int(_numpy(plain.iterations)) == 12
    assert not np.allclose(_numpy(var_plain[0]), initial_params()["w"], atol=0.05)


def test_builds_state_per_variable() -> None:
    opt = AdaBelief(amsgrad=True)
    variables = [
        keras.Variable(np.zeros((2, 3), np.float32), name="a"),
        keras.Variable(np.zeros(4, "float16"), dtype="float16", name="b"),
    ]
    opt.build(variables)
    assert [tuple(s.shape) for s in opt._exp_avgs] == [(2, 3), (4,)]
    assert all(
        keras.backend.standardize_dtype(s.dtype) == "float32"
        for s in opt._exp_avg_vars + opt._max_exp_avg_vars
    )
    # iterations, learning rate, then (m, s, s_max) per variable
    assert len(opt.variables) == 2 + 3 * 2


@pytest.mark.parametrize("mode", list(RECTIFY_MODES))
def test_step_scalars_match_torch(mode: str) -> None:
    rectify, sgd = RECTIFY_MODES[mode]
    for b1, b2 in [(0.9, 0.999), (0.8, 0.99), (0.0, 0.0)]:
        sc = step_scalars(
            keras.ops.arange(1, 3001), 0.01, b1, b2, rectify=rectify, degenerated_to_sgd=sgd
        )
        assert_step_scalars_match_torch(
            sc, 3000, 0.01, b1, b2, rectify=rectify, degenerated_to_sgd=sgd, to_numpy=_numpy
        )


def test_step_scalars_type_is_the_torch_one() -> None:
    import adabelief

    assert adabelief.keras.StepScalars is adabelief.StepScalars


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(learning_rate=-1e-3), "learning_rate"),
        (dict(learning_rate=float("nan")), "learning_rate"),
        (dict(learning_rate=float("inf")), "learning_rate"),
        (dict(epsilon=-1e-8), "epsilon"),
        (dict(epsilon=float("nan")), "epsilon"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(weight_decay=float("inf")), "weight_decay"),
        (dict(beta_1=1.0), "beta_1"),
        (dict(beta_1=-0.5), "beta_1"),
        (dict(beta_1=0.0), "beta_1"),
        (dict(beta_2=1.5), "beta_2"),
        (dict(beta_2=float("nan")), "beta_2"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, float], name: str) -> None:
    import re

    with pytest.raises(ValueError, match=rf"{name}.*{re.escape(repr(kwargs[name]))}"):
        AdaBelief(**kwargs)


def test_beta_1_zero_is_refused_with_the_reason() -> None:
    """beta_1 = 0 makes the belief identically 0 and the step diverge: refused, with a way out."""
    with pytest.raises(
        ValueError, match=r"Invalid beta_1: 0\.0 .*\(g - m\)\^2 .*g/sqrt\(eps\).*NaN.*0\.5 in GANs"
    ):
        AdaBelief(beta_1=0)
    assert AdaBelief(beta_1=0.5).beta_1 == 0.5  # the suggested value is accepted
    with pytest.raises(ValueError, match=r"^Tensor epsilon must be 1-element$"):
        AdaBelief(epsilon=np.array([1e-16, 1e-8]))


@pytest.mark.parametrize("epsilon", [0, 0.0, np.float32(0.0)])
def test_epsilon_zero_is_refused_with_the_reason(epsilon: Any) -> None:
    """The belief can be exactly 0 (a zero gradient), so epsilon = 0 would give 0/0 = NaN."""
    with pytest.raises(ValueError, match=r"^Invalid epsilon: 0(\.0)? \(must be > 0: .*0/0 = NaN"):
        AdaBelief(epsilon=epsilon)


@pytest.mark.slow
def test_core_import_does_not_import_frameworks() -> None:
    code = (
        "import sys, adabelief; "
        "print(sorted(m for m in ('keras', 'jax', 'optax', 'tensorflow') if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=keras_child_env("jax"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.slow
def test_adabelief_keras_imports_no_other_framework() -> None:
    """Beyond what Keras itself loads, ``adabelief.keras`` imports neither JAX/optax nor TF."""
    code = (
        "import sys, keras; before = set(sys.modules); import adabelief.keras; "
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before} "
        "& {'jax', 'jaxlib', 'optax', 'tensorflow'}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=keras_child_env("torch"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


if __name__ == "__main__":
    child_main(sys.argv[1])


def test_fixed_decay_is_a_no_op_at_zero_learning_rate() -> None:
    """As in PyTorch, a step at learning_rate == 0 leaves the variables alone, even with fixed
    decay; at any other rate fixed decay removes wd*theta."""
    start = np.array([1.0, -2.0, 3.0], np.float32)
    grad = np.array([0.1, 0.2, -0.3], np.float32)
    frozen = keras.Variable(start.copy(), name="frozen")
    AdaBelief(learning_rate=0.0, weight_decay=0.1, fixed_decay=True).apply([grad], [frozen])
    np.testing.assert_array_equal(_numpy(frozen), start)
    moving = keras.Variable(start.copy(), name="moving")
    AdaBelief(learning_rate=1e-12, weight_decay=0.1, fixed_decay=True).apply([grad], [moving])
    np.testing.assert_allclose(_numpy(moving), 0.9 * start, rtol=1e-6)
