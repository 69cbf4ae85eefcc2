"""Tests of ``adabelief.optax`` against an independent float64 NumPy reference of the rule."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="jax is not installed (pip install adabelief[jax])")
optax = pytest.importorskip("optax", reason="optax is not installed (pip install adabelief[jax])")
jnp = jax.numpy

from adabelief.optax import (  # noqa: E402
    ScaleByAdaBeliefState,
    adabelief,
    check_hyperparams,
    scale_by_adabelief,
    step_scalars,
)
from framework_problem import (  # noqa: E402
    RECTIFY_MODES,
    STEPS,
    assert_step_scalars_match_torch,
    case_id,
    case_keys,
    case_options,
    initial_params,
    problem_grad,
    reference_run,
)


def option_cases() -> list[Any]:
    return [pytest.param(*key, id=case_id(*key)) for key in case_keys()]


# --------------------------------------------------------------------------------------------
# optax runner
# --------------------------------------------------------------------------------------------


def make_tx(opts: dict[str, Any], **extra: Any) -> Any:
    o = dict(opts, **extra)
    return adabelief(
        o.pop("lr"), o.pop("b1"), o.pop("b2"), o.pop("eps"), o.pop("weight_decay"), **o
    )


def run_optax(
    tx: Any, steps: int = STEPS, dtype: Any = jnp.float32, jit: bool = True
) -> tuple[dict[str, np.ndarray], Any]:
    params = {n: jnp.asarray(p, dtype) for n, p in initial_params().items()}
    state = tx.init(params)

    def step(grads: Any, state: Any, params: Any) -> Any:
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step_fn = jax.jit(step) if jit else step
    for t in range(1, steps + 1):
        grads = {
            n: jnp.asarray(problem_grad(n, np.asarray(p, np.float64), t), dtype)
            for n, p in params.items()
        }
        params, state = step_fn(grads, state, params)
    return {n: np.asarray(p, np.float64) for n, p in params.items()}, state


def assert_params_close(
    got: dict[str, np.ndarray], want: dict[str, np.ndarray], rtol: float = 1e-5, atol: float = 1e-6
) -> None:
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=atol, err_msg=name)


def find_core_state(state: Any) -> ScaleByAdaBeliefState:
    found = [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, ScaleByAdaBeliefState))
        if isinstance(s, ScaleByAdaBeliefState)
    ]
    assert len(found) == 1
    return found[0]


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", list(RECTIFY_MODES))
@pytest.mark.parametrize(
    ("b1", "b2"), [(0.9, 0.999), (0.9, 0.99), (0.5, 0.9), (0.99, 0.9999), (0.9, 0.5), (0.0, 0.0)]
)
def test_step_scalars_match_torch(b1: float, b2: float, mode: str) -> None:
    """float32 under jit, within float32 rounding of PyTorch's float64 scalars to step 20000."""
    rectify, sgd = RECTIFY_MODES[mode]
    steps, lr = 20000, 0.01
    sc = jax.jit(lambda s: step_scalars(s, lr, b1, b2, rectify=rectify, degenerated_to_sgd=sgd))(
        jnp.arange(1, steps + 1)
    )
    assert np.asarray(sc.step_size).dtype == np.float32
    assert_step_scalars_match_torch(sc, steps, lr, b1, b2, rectify=rectify, degenerated_to_sgd=sgd)


@pytest.mark.parametrize(("h", "rect", "dec", "ams", "maxi"), option_cases())
def test_matches_numpy_reference(h: str, rect: str, dec: str, ams: bool, maxi: bool) -> None:
    opts = case_options(h, rect, dec, ams, maxi)
    got, state = run_optax(make_tx(opts))
    want, want_state = reference_run(STEPS, **opts)
    assert_params_close(got, want)
    core = find_core_state(state)
    assert int(core.count) == STEPS
    for name in want:
        np.testing.assert_allclose(
            np.asarray(core.mu[name]), want_state[name]["m"], rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            np.asarray(core.nu[name]), want_state[name]["s"], rtol=1e-5, atol=1e-9
        )
        if ams:
            np.testing.assert_allclose(
                np.asarray(core.nu_max[name]), want_state[name]["s_max"], rtol=1e-5, atol=1e-9
            )


def test_defaults_match_reference() -> None:
    defaults = dict(
        b1=0.9,
        b2=0.999,
        eps=1e-16,
        weight_decay=0.0,
        amsgrad=False,
        weight_decouple=True,
        fixed_decay=False,
        rectify=True,
        degenerated_to_sgd=True,
        maximize=False,
    )
    got, _ = run_optax(adabelief(0.01))
    want, _ = reference_run(STEPS, lr=0.01, **defaults)
    assert_params_close(got, want)


def test_jit_and_eager_agree() -> None:
    opts = case_options("A", "rect-sgd", "decoupled", True, False)
    jitted, _ = run_optax(make_tx(opts), steps=12, jit=True)
    eager, _ = run_optax(make_tx(opts), steps=12, jit=False)
    assert_params_close(eager, jitted, rtol=1e-6, atol=1e-7)


def test_learning_rate_schedule() -> None:
    schedule = optax.exponential_decay(0.05, transition_steps=1, decay_rate=0.95)
    opts = case_options("A", "rect-sgd", "decoupled", False, False)
    got, _ = run_optax(make_tx(opts, lr=schedule))
    want, _ = reference_run(STEPS, **dict(opts, lr=lambda i: 0.05 * 0.95**i))
    assert_params_close(got, want)
    # A constant-lr run differs: the schedule is really used.
    const, _ = reference_run(STEPS, **dict(opts, lr=0.05))
    assert not np.allclose(got["w"], const["w"], rtol=1e-3)


@pytest.mark.parametrize("dec", ["l2", "decoupled", "fixed"])
@pytest.mark.parametrize("callable_mask", [False, True])
def test_weight_decay_mask(dec: str, callable_mask: bool) -> None:
    opts = case_options("A", "rect-sgd", dec, False, False)
    opts["weight_decay"] = 0.2
    tree = {"w": True, "b": False, "k": True}
    mask = (lambda params: {n: n != "b" for n in params}) if callable_mask else tree
    got, _ = run_optax(make_tx(opts, mask=mask))
    want, _ = reference_run(STEPS, **opts, decayed=lambda n: tree[n])
    assert_params_close(got, want)
    unmasked, _ = reference_run(STEPS, **opts)
    assert not np.allclose(got["b"], unmasked["b"], rtol=1e-4)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_state_pytree(amsgrad: bool) -> None:
    tx = adabelief(0.01, amsgrad=amsgrad, weight_decay=0.1)
    params = {n: jnp.asarray(p, jnp.float32) for n, p in initial_params().items()}
    state = tx.init(params)
    core = find_core_state(state)
    assert core._fields == ("count", "mu", "nu", "nu_max")
    assert core.count.dtype == jnp.int32 and int(core.count) == 0
    assert jax.tree.structure(core.mu) == jax.tree.structure(params)
    if amsgrad:
        assert jax.tree.structure(core.nu_max) == jax.tree.structure(params)
    else:
        assert core.nu_max is None
    # The state is a pytree: it goes through jit and tree utilities.
    _, new_state = jax.jit(tx.update)(params, state, params)
    core = find_core_state(new_state)
    assert int(core.count) == 1
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert all(leaf.dtype in (jnp.float32, jnp.int32) for leaf in jax.tree.leaves(new_state))
    doubled = jax.tree.map(lambda x: x * 2, new_state)
    assert jax.tree.structure(doubled) == jax.tree.structure(state)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_params(dtype: str) -> None:
    """16-bit params: fp32 state and math, one rounding to the param dtype per step."""
    opts = case_options("A", "rect-sgd", "decoupled", True, False)
    steps = 20
    got, state = run_optax(make_tx(opts), steps=steps, dtype=jnp.dtype(dtype))
    core = find_core_state(state)
    assert all(
        leaf.dtype == jnp.float32 for leaf in jax.tree.leaves((core.mu, core.nu, core.nu_max))
    )
    params = {n: jnp.asarray(p, dtype) for n, p in initial_params().items()}
    updates, _ = make_tx(opts).update(params, make_tx(opts).init(params), params)
    assert all(u.dtype == jnp.float32 for u in jax.tree.leaves(updates))

    def round_half(p: np.ndarray) -> np.ndarray:
        return np.asarray(jnp.asarray(p, jnp.float32).astype(dtype), np.float64)

    want, _ = reference_run(steps, **opts, round_params=round_half)
    # The reference rounds to the same 16-bit grid; allow a couple of 16-bit ulps of slack.
    ulp = 2.0**-7 if dtype == "bfloat16" else 2.0**-10
    assert_params_close(got, want, rtol=2 * ulp, atol=1e-3)
    # ... and the result is really 16-bit (not the float32 trajectory).
    f32, _ = run_optax(make_tx(opts), steps=steps)
    assert any(not np.array_equal(got[n], f32[n]) for n in got)


def test_inject_hyperparams() -> None:
    opts = case_options("A", "rect-sgd", "decoupled", True, False)
    base = dict(b1=opts["b1"], b2=opts["b2"], eps=opts["eps"], weight_decay=opts["weight_decay"])
    flags = {
        k: opts[k]
        for k in (
            "amsgrad",
            "weight_decouple",
            "fixed_decay",
            "rectify",
            "degenerated_to_sgd",
            "maximize",
        )
    }
    tx = optax.inject_hyperparams(adabelief)(learning_rate=opts["lr"], **base, **flags)
    got, state = run_optax(tx)
    want, _ = reference_run(STEPS, **opts)
    # b1/b2 arrive as float32 arrays here, so the scalars carry float32 rounding of the betas.
    assert_params_close(got, want, rtol=1e-4, atol=1e-5)
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(opts["lr"])


def test_weight_decay_needs_params() -> None:
    params = {"x": jnp.ones(3)}
    tx = adabelief(0.1, weight_decay=0.1)
    with pytest.raises(ValueError, match="params"):
        tx.update(params, tx.init(params))
    tx = adabelief(0.1)  # no decay: params are optional
    updates, _ = tx.update(params, tx.init(params))
    assert updates["x"].shape == (3,)


def test_scale_by_adabelief_is_the_direction() -> None:
    """The core transform gives m_hat/(sqrt(v_hat)+eps) (rectify off) at step 1."""
    g = {"x": jnp.asarray([0.5, -2.0, 3.0])}
    tx = scale_by_adabelief(0.9, 0.99, 1e-8, rectify=False)
    d, _ = tx.update(g, tx.init(g))
    gx = np.asarray(g["x"], np.float64)
    m = 0.1 * gx
    s = 0.01 * (gx - m) ** 2 + 1e-8
    want = (m / 0.1) / (np.sqrt(s) / math.sqrt(0.01) + 1e-8)
    np.testing.assert_allclose(np.asarray(d["x"]), want, rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(learning_rate=-1e-3), "learning_rate"),
        (dict(learning_rate=float("nan")), "learning_rate"),
        (dict(learning_rate=float("inf")), "learning_rate"),
        (dict(learning_rate=1e-3, eps=-1e-8), "eps"),
        (dict(learning_rate=1e-3, eps=float("nan")), "eps"),
        (dict(learning_rate=1e-3, weight_decay=-0.1), "weight_decay"),
        (dict(learning_rate=1e-3, weight_decay=float("inf")), "weight_decay"),
        (dict(learning_rate=1e-3, b1=1.0), "b1"),
        (dict(learning_rate=1e-3, b1=-0.1), "b1"),
        (dict(learning_rate=1e-3, b2=1.0), "b2"),
        (dict(learning_rate=1e-3, b2=float("nan")), "b2"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, float], name: str) -> None:
    value = kwargs[name]
    with pytest.raises(ValueError, match=rf"{name}.*{re_value(value)}"):
        adabelief(**kwargs)


@pytest.mark.parametrize("factory", ["adabelief", "scale_by_adabelief", "inject_hyperparams"])
def test_b1_zero_is_refused_with_the_reason(factory: str) -> None:
    """b1 = 0 makes the belief identically 0 and the step diverge: refused, with a way out."""
    params = {"x": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"Invalid b1: 0\.0 .*\(g - m\)\^2 .*NaN.*0\.5 in GANs"):
        if factory == "adabelief":
            adabelief(1e-3, b1=0.0)
        elif factory == "scale_by_adabelief":
            scale_by_adabelief(b1=0)
        else:  # the betas arrive as (concrete) arrays at init
            optax.inject_hyperparams(adabelief)(learning_rate=1e-3, b1=0.0).init(params)
    adabelief(1e-3, b1=0.5)  # the suggested value is accepted


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the gradients of inf params
def test_b1_zero_would_diverge(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the refusal prevents: with the check bypassed, b1 = 0 at the defaults (eps = 1e-16)
    takes the parameters of the test problem to inf/NaN within 50 steps."""
    import adabelief.optax as module

    monkeypatch.setattr(module, "check_beta1", lambda name, value: value)
    got, _ = run_optax(adabelief(1e-3, b1=0.0))
    assert not all(np.isfinite(p).all() for p in got.values())
    healthy, _ = run_optax(adabelief(1e-3, b1=0.5))
    assert all(np.isfinite(p).all() for p in healthy.values())


def test_array_hyperparameters_are_checked_when_concrete() -> None:
    with pytest.raises(ValueError, match=r"^Tensor b2 must be 1-element$"):
        adabelief(1e-3, b2=jnp.array([0.99, 0.999]))
    with pytest.raises(ValueError, match=r"Invalid eps: .* \(must be finite and >= 0\)"):
        adabelief(1e-3, eps=jnp.array(-1.0))
    with pytest.raises(ValueError, match=r"Invalid learning_rate: '0\.1' \(expected a real"):
        adabelief("0.1")  # type: ignore[arg-type]


@pytest.mark.parametrize("factory", ["adabelief", "scale_by_adabelief", "inject_hyperparams"])
def test_eps_zero_is_refused_with_the_reason(factory: str) -> None:
    """The belief can be exactly 0 (a zero gradient), so eps = 0 would give 0/0 = NaN."""
    params = {"x": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"^Invalid eps: 0(\.0)? \(must be > 0: .*0/0 = NaN"):
        if factory == "adabelief":
            adabelief(1e-3, eps=0.0)
        elif factory == "scale_by_adabelief":
            scale_by_adabelief(eps=0)
        else:  # eps arrives as a (concrete) array at init
            optax.inject_hyperparams(adabelief)(learning_rate=1e-3, eps=0.0).init(params)


def test_injected_hyperparameters_are_validated_where_concrete() -> None:
    """Under jax.jit an injected value is a tracer and cannot be checked (documented in
    docs/optax.md); eagerly the factories check it, and between jitted steps, where the state's
    values are concrete, check_hyperparams does, also inside a chain."""
    params = {"x": jnp.ones(3)}
    tx = optax.inject_hyperparams(adabelief)(learning_rate=1e-3, b1=0.9, eps=1e-16)
    state = tx.init(params)
    check_hyperparams(state)  # valid: nothing to say
    bad = state._replace(hyperparams={**state.hyperparams, "b1": jnp.asarray(0.0)})
    jax.jit(tx.update)(params, bad, params)  # traced: not checked (the limitation)
    with pytest.raises(ValueError, match=r"^Invalid b1: 0\.0 \(b1 = 0 makes"):
        tx.update(params, bad, params)  # eager: the factory checks the concrete value
    with pytest.raises(ValueError, match=r"^Invalid b1: 0\.0 \(b1 = 0 makes"):
        check_hyperparams(bad)
    for name, value in [("eps", 0.0), ("learning_rate", -1.0), ("b2", 1.0)]:
        chained = optax.chain(optax.clip(1.0), tx)
        chain_state = chained.init(params)
        inner = chain_state[1]
        inner = inner._replace(hyperparams={**inner.hyperparams, name: jnp.asarray(value)})
        with pytest.raises(ValueError, match=rf"^Invalid {name}: "):
            check_hyperparams((chain_state[0], inner))
    jax.jit(check_hyperparams)(bad)  # inside jit: traced values are skipped


def test_adabelief_optax_imports_no_other_framework() -> None:
    """Beyond JAX and optax, ``adabelief.optax`` imports neither Keras nor TensorFlow."""
    import subprocess
    import sys

    code = (
        "import sys, jax, optax; before = set(sys.modules); import adabelief.optax; "
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before} "
        "& {'keras', 'tensorflow'}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def re_value(value: float) -> str:
    import re

    return re.escape(repr(value))


def test_rectify_off_matches_optax_adabelief() -> None:
    """Without rectification, decay and amsgrad the rule is optax.adabelief with eps_root = eps
    (up to optax's float32 bias corrections)."""
    opts = case_options("A", "plain", "nodecay", False, False)
    ours, _ = run_optax(make_tx(opts))
    theirs, _ = run_optax(
        optax.adabelief(opts["lr"], opts["b1"], opts["b2"], eps=opts["eps"], eps_root=opts["eps"])
    )
    assert_params_close(ours, theirs, rtol=2e-5, atol=2e-6)
    # ... and the rectified default really is a different rule.
    rectified, _ = run_optax(make_tx(dict(opts, rectify=True)))
    assert not np.allclose(rectified["w"], theirs["w"], rtol=1e-3)


@pytest.mark.parametrize("schedule", [False, True])
def test_fixed_decay_is_a_no_op_at_zero_learning_rate(schedule: bool) -> None:
    """As in PyTorch, a step at lr == 0 leaves the params alone, even with fixed decay; at any
    other lr, fixed decay removes wd*theta whatever the lr."""
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    grads = {"w": jnp.array([0.1, 0.2, -0.3])}
    lr: Any = (lambda count: jnp.where(count == 0, 0.0, 1e-9)) if schedule else 0.0
    tx = adabelief(lr, weight_decay=0.1, fixed_decay=True)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    np.testing.assert_array_equal(np.asarray(updates["w"]), np.zeros(3))
    if schedule:
        updates, _ = tx.update(grads, state, params)
        np.testing.assert_allclose(
            np.asarray(updates["w"]), -0.1 * np.asarray(params["w"]), rtol=1e-6
        )
