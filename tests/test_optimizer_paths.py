"""Every kernel path (``PATHS`` in ``tests/reference.py``) against the single-tensor one, on
awkward parameters: zero-size, 0-dim, never a gradient, frozen mid-run, non-contiguous, mixed
dtypes, complex, float16 and bfloat16."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from adabelief import AdaBelief
from reference import PATHS, path_options, reference_from_options

F64 = torch.float64
OTHER_PATHS = [p for p in PATHS if p != "single"]
STATE_KEYS = ("step", "exp_avg", "exp_avg_var", "max_exp_avg_var")


def assert_same_run(params_a, opt_a, params_b, opt_b, *, rtol=1e-15, atol=1e-15):
    """Parameters and every state tensor agree (to float64 rounding)."""
    for i, (a, b) in enumerate(zip(params_a, params_b, strict=True)):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=atol, msg=f"param {i}")
        state_a, state_b = opt_a.state.get(a, {}), opt_b.state.get(b, {})
        assert sorted(state_a) == sorted(state_b), f"param {i}: state keys"
        for key in state_a:
            torch.testing.assert_close(
                state_a[key], state_b[key], rtol=rtol, atol=atol, msg=f"param {i}: {key}"
            )


def odd_params(dtype=F64, seed=0):
    """Parameters that trip kernels up; the third never receives a gradient."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, dtype=dtype, generator=gen)

    return [
        randn(5, 3).requires_grad_(),
        randn().requires_grad_(),  # 0-dim
        randn(4).requires_grad_(),  # grad always None
        torch.empty(0, 4, dtype=dtype).requires_grad_(),  # zero-size
        randn(4, 6).t().requires_grad_(),  # transposed view: non-contiguous leaf
        randn(3, 8)[:, ::2].requires_grad_(),  # strided view
    ]


def odd_grads(params, step, seed=100):
    gen = torch.Generator().manual_seed(seed + step)
    grads = []
    for i, p in enumerate(params):
        if i == 2:
            grads.append(None)
            continue
        g = torch.randn(p.shape, dtype=p.dtype, generator=gen) * (1.0, 0.01, 5.0)[step % 3]
        if i == 4:  # a non-contiguous gradient too
            g = g.t().contiguous().t()
        grads.append(g)
    return grads


def run_odd(path, steps=12, **options):
    params = odd_params()
    opt = AdaBelief(params, **path_options(path), **options)
    for k in range(steps):
        for p, g in zip(params, odd_grads(params, k), strict=True):
            p.grad = g
        opt.step()
    return params, opt


COMBOS = [
    dict(rectify=r, amsgrad=a, weight_decouple=w, maximize=m)
    for r, a, w, m in itertools.product((True, False), repeat=4)
]


def combo_id(combo):
    return "+".join(k for k, v in combo.items() if v) or "plain"


@pytest.mark.parametrize("path", OTHER_PATHS)
@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_paths_agree_on_awkward_parameters(path, combo):
    options = dict(combo, lr=0.05, betas=(0.9, 0.9), eps=1e-8, weight_decay=0.1)
    single = run_odd("single", **options)
    other = run_odd(path, **options)
    assert_same_run(*single, *other)


@pytest.mark.parametrize("path", PATHS)
def test_awkward_parameters_match_reference(path):
    options = dict(lr=0.05, betas=(0.9, 0.9), eps=1e-8, weight_decay=0.1, amsgrad=True)
    params, opt = run_odd(path, **options)
    initial = odd_params()
    ref = reference_from_options([p.detach().numpy() for p in initial], **options)
    for k in range(12):
        ref.step([None if g is None else g.numpy() for g in odd_grads(initial, k)])
    for i, p in enumerate(params):
        torch.testing.assert_close(
            p.detach(), torch.from_numpy(ref.params[i]), rtol=1e-12, atol=1e-14, msg=f"param {i}"
        )
    assert params[2] not in opt.state or len(opt.state[params[2]]) == 0
    torch.testing.assert_close(
        params[2].detach(), initial[2].detach(), rtol=0, atol=0, msg="never-updated parameter"
    )
    assert params[4].stride() == (1, 6), "the non-contiguous parameter is updated in place"


@pytest.mark.parametrize("path", OTHER_PATHS)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_paths_agree_with_a_layer_frozen_mid_run(path, amsgrad):
    """Different step counts in one group: the frozen parameter resumes in its warm-up while the
    other is adaptive."""

    def run(path):
        gen = torch.Generator().manual_seed(1)
        params = [torch.randn(3, 4, dtype=F64, generator=gen).requires_grad_() for _ in range(3)]
        opt = AdaBelief(params, lr=0.05, betas=(0.9, 0.9), amsgrad=amsgrad, **path_options(path))
        for k in range(14):
            for j, p in enumerate(params):
                frozen = j == 1 and 2 <= k < 9
                p.grad = None if frozen else torch.randn(3, 4, dtype=F64, generator=gen)
            opt.step()
        return params, opt

    single, other = run("single"), run(path)
    assert [other[1].state[p]["step"].item() for p in other[0]] == [14, 7, 14]
    assert_same_run(*single, *other)


def test_mixed_dtypes_in_one_group_match_separate_runs():
    """A group mixing dtypes gives each parameter exactly what it gets in a group of its own."""
    dtypes = (F64, torch.float32, torch.float16, torch.bfloat16, torch.complex64)
    gen = torch.Generator().manual_seed(0)
    initial = [torch.randn(3, 5, generator=gen).to(d) for d in dtypes]
    grads = [[torch.randn(3, 5, generator=gen).to(d) for d in dtypes] for _ in range(10)]
    options = dict(lr=0.05, betas=(0.9, 0.99), weight_decay=0.1, weight_decouple=False)

    def run(path, indices):
        params = [initial[i].clone().requires_grad_() for i in indices]
        opt = AdaBelief(params, **path_options(path), **options)
        for step_grads in grads:
            for p, i in zip(params, indices, strict=True):
                p.grad = step_grads[i].clone()
            opt.step()
        return params, opt

    everything = range(len(dtypes))
    for path in PATHS:
        mixed_params, mixed_opt = run(path, everything)
        for i in everything:
            alone_params, alone_opt = run("single", [i])
            assert mixed_params[i].dtype == dtypes[i]
            assert_same_run([mixed_params[i]], mixed_opt, alone_params, alone_opt, rtol=0, atol=0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(amsgrad=True, weight_decay=0.1, weight_decouple=False),
        dict(rectify=False, maximize=True, weight_decay=0.1),
        dict(amsgrad=True, rectify=False, fixed_decay=True, weight_decay=0.01),
    ],
    ids=["default", "amsgrad-l2", "unrectified-maximize", "amsgrad-fixed-decay"],
)
@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex64])
def test_complex_parameter_behaves_like_its_real_view(path, options, dtype):
    gen = torch.Generator().manual_seed(0)
    z0 = torch.randn(4, 3, dtype=dtype, generator=gen)
    grads = [torch.randn(4, 3, dtype=dtype, generator=gen) for _ in range(10)]
    z = z0.clone().requires_grad_()
    twin = torch.view_as_real(z0).clone().requires_grad_()
    opt_z = AdaBelief([z], lr=0.05, betas=(0.9, 0.9), **path_options(path), **options)
    opt_twin = AdaBelief([twin], lr=0.05, betas=(0.9, 0.9), **path_options(path), **options)
    for g in grads:
        z.grad, twin.grad = g.clone(), torch.view_as_real(g).clone()
        opt_z.step()
        opt_twin.step()
    assert torch.equal(torch.view_as_real(z.detach()), twin.detach())
    for key, value in opt_z.state[z].items():
        expected = opt_twin.state[twin][key]
        actual = torch.view_as_real(value) if value.is_complex() else value
        assert torch.equal(actual, expected), key
    assert opt_z.state[z]["exp_avg"].dtype == dtype


# --- 16-bit parameters --------------------------------------------------------------------

LOW_PRECISION = [torch.float16, torch.bfloat16]


def rounder(dtype):
    def round_to(x: np.ndarray) -> np.ndarray:
        return torch.from_numpy(np.asarray(x)).to(dtype).double().numpy()

    return round_to


def ulp(values: torch.Tensor) -> torch.Tensor:
    """The spacing of ``values``' 16-bit dtype at their magnitude, in float64."""
    info = torch.finfo(values.dtype)
    v = values.double().abs().clamp(min=info.smallest_normal)
    return torch.exp2(torch.floor(torch.log2(v))) * info.eps


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(weight_decay=0.1, weight_decouple=False),
        dict(amsgrad=True, weight_decay=0.5, rectify=False),
    ],
    ids=["default", "l2", "amsgrad-decay-unrectified"],
)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_parameters_are_updated_in_float32(path, options, dtype):
    """The update of a 16-bit parameter is computed in float32 with float32 state and rounded
    once into the parameter: it equals a float64 update rounded to 16 bits (to one unit in the
    last place), and the state equals the float64 state to float32 rounding."""
    options = dict(options, lr=0.01, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(300, generator=gen).to(dtype).requires_grad_()
    ref = reference_from_options(
        [p.detach().double().numpy()], round_param=rounder(dtype), **options
    )
    opt = AdaBelief([p], **path_options(path), **options)
    for _ in range(25):
        g = torch.randn(300, generator=gen).to(dtype)
        p.grad = g
        opt.step()
        ref.step([g.double().numpy()])
        assert torch.equal(p.grad, g)
    assert p.dtype == dtype
    state = opt.state[p]
    for key in ("exp_avg", "exp_avg_var", "max_exp_avg_var"):
        if key in state:
            assert state[key].dtype == torch.float32, key
            expected = torch.from_numpy(getattr(ref.state[0], key))
            torch.testing.assert_close(state[key].double(), expected, rtol=1e-5, atol=1e-7, msg=key)
    expected = torch.from_numpy(ref.params[0])
    difference = (p.detach().double() - expected).abs()
    assert (difference <= ulp(p.detach())).all()
    assert (difference == 0).double().mean() >= 0.95


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("rectify", [True, False])
def test_low_precision_with_tiny_eps_stays_finite(path, dtype, rectify):
    """eps=1e-16 underflows in float16 and (g - m)^2 of a large float16 gradient overflows:
    with float16 state a zero gradient would give 0/0 = NaN and a large one inf; the float32
    state keeps everything finite."""
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(64, generator=gen).to(dtype).requires_grad_()
    p0 = p.detach().clone()
    opt = AdaBelief([p], lr=1e-3, eps=1e-16, rectify=rectify, **path_options(path))
    big = torch.finfo(torch.float16).max / 4  # finite in float16, but its square is not
    for k in range(20):
        g = torch.randn(64, generator=gen).clamp(-3, 3) * (big if k % 5 == 0 else 1.0)
        g[:16] = 0.0  # these elements never see a gradient
        g[16:24] = 6e-8  # float16 subnormals
        p.grad = g.to(dtype)
        opt.step()
        assert torch.isfinite(p).all(), f"step {k + 1}"
    state = opt.state[p]
    for key in ("exp_avg", "exp_avg_var"):
        assert state[key].dtype == torch.float32
        assert torch.isfinite(state[key]).all(), key
    # Only eps ever entered the belief of the zero-gradient elements, and it was kept.
    assert (state["exp_avg_var"][:16] > 0).all()
    assert torch.equal(p[:16].detach(), p0[:16]), "no gradient, no decay: no change"
