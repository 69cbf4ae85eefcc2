"""``adabelief.AdaBelief`` against the independent float64 reference (``tests/reference.py``)
for every option combination, against closed-form first steps, and against the official
``adabelief-pytorch`` 0.2.1 wherever the two are meant to agree."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adabelief import AdaBelief
from reference import PATHS, first_adaptive_step, path_options, reference_from_options

F64 = torch.float64
OPTION_NAMES = (
    "rectify",
    "amsgrad",
    "weight_decouple",
    "fixed_decay",
    "degenerated_to_sgd",
    "maximize",
)
ALL_COMBOS = [
    dict(zip(OPTION_NAMES, values, strict=True))
    for values in itertools.product((False, True), repeat=6)
]
#: Shapes of the parameters of every run: a matrix, a vector, a 0-dim scalar.
SHAPES = ((5, 3), (7,), ())
#: Gradient magnitudes cycle through these, so the belief both grows and shrinks (the AMSGrad
#: maximum then differs from the belief, and eps=1e-8 matters at the small scale).
GRAD_SCALES = (1.0, 1e-3, 10.0, 0.1)


def combo_id(combo: dict[str, bool]) -> str:
    return "+".join(name for name, on in combo.items() if on) or "plain"


def make_problem(seed: int, steps: int, shapes=SHAPES, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, dtype=dtype, generator=gen) for shape in shapes]
    grads = [
        [
            torch.randn(shape, dtype=dtype, generator=gen) * GRAD_SCALES[k % len(GRAD_SCALES)]
            for shape in shapes
        ]
        for k in range(steps)
    ]
    return params, grads


def run_ours(params0, grads, path="single", **options):
    params = [p.clone().requires_grad_() for p in params0]
    opt = AdaBelief(params, **path_options(path), **options)
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = None if g is None else g.clone()
        opt.step()
    return params, opt


def run_reference(params0, grads, **options):
    ref = reference_from_options([p.numpy() for p in params0], **options)
    for step_grads in grads:
        ref.step([None if g is None else g.numpy() for g in step_grads])
    return ref


def assert_matches_reference(params, opt, ref, *, rtol=1e-12, atol=1e-14):
    for i, p in enumerate(params):
        expected = ref.state[i]
        state = opt.state[p]
        if expected.step == 0:
            assert len(state) == 0
            continue
        msg = f"parameter {i}"
        assert state["step"].item() == expected.step, msg
        torch.testing.assert_close(
            p.detach(), torch.from_numpy(ref.params[i]), rtol=rtol, atol=atol, msg=msg
        )
        for key in ("exp_avg", "exp_avg_var", "max_exp_avg_var"):
            value = getattr(expected, key)
            if value is None:
                assert key not in state, f"{msg}: unexpected {key}"
                continue
            torch.testing.assert_close(
                state[key], torch.from_numpy(value), rtol=rtol, atol=atol, msg=f"{msg}: {key}"
            )


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("combo", ALL_COMBOS, ids=combo_id)
def test_matches_reference_for_every_option_combination(combo, weight_decay, path):
    # beta2=0.9: rho_inf=19, the rectified update leaves the warm-up at step 6 of 30.
    options = dict(combo, lr=0.02, betas=(0.9, 0.9), eps=1e-8, weight_decay=weight_decay)
    params0, grads = make_problem(seed=11, steps=30)
    params, opt = run_ours(params0, grads, path, **options)
    ref = run_reference(params0, grads, **options)
    if combo["rectify"]:
        warmup = "sgd" if combo["degenerated_to_sgd"] else "none"
        assert set(ref.branches[0]) == {warmup, "adaptive"}, "both rectified branches are run"
    assert_matches_reference(params, opt, ref)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.9, 0.99), (0.1, 0.9), (0.5, 0.0), (0.99, 0.5)])
@pytest.mark.parametrize("eps", [1e-16, 1e-8, 1e-3])
@pytest.mark.parametrize(("rectify", "amsgrad"), [(True, False), (False, True), (True, True)])
def test_matches_reference_across_betas_and_eps(betas, eps, rectify, amsgrad, path):
    options = dict(lr=0.05, betas=betas, eps=eps, rectify=rectify, amsgrad=amsgrad)
    params0, grads = make_problem(seed=5, steps=20, shapes=((4, 4),))
    params, opt = run_ours(params0, grads, path, **options)
    assert_matches_reference(params, opt, run_reference(params0, grads, **options))


@pytest.mark.parametrize("path", PATHS)
def test_defaults_are_the_documented_ones(path):
    # No option passed: lr 1e-3, betas (0.9, 0.999), eps 1e-16, rectified, decoupled decay.
    params0, grads = make_problem(seed=2, steps=15)
    params, opt = run_ours(params0, grads, path)
    assert_matches_reference(params, opt, run_reference(params0, grads))


@pytest.mark.parametrize("path", PATHS)
def test_parameters_without_gradient_keep_their_own_step_count(path):
    """A layer frozen mid-run (grad None for some steps) resumes at its own step count, so two
    parameters of one group sit on different sides of the rectification threshold."""
    options = dict(lr=0.05, betas=(0.9, 0.9), weight_decay=0.1)
    params0, grads = make_problem(seed=3, steps=16, shapes=((3, 2), (4,)))
    for k in range(2, 9):
        grads[k][1] = None
    params, opt = run_ours(params0, grads, path, **options)
    ref = run_reference(params0, grads, **options)
    assert [opt.state[p]["step"].item() for p in params] == [16, 9]
    # At step 9 the first parameter is adaptive while the second is still in its warm-up.
    assert ref.branches[0][8] == "adaptive" and ref.branches[1][2] == "sgd"
    assert_matches_reference(params, opt, ref)


# --- Closed-form first steps (independent of the reference module) ---------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("beta1", [0.1, 0.9])
def test_first_rectified_step_is_sgd_with_learning_rate(path, beta1):
    # m_1/bc1 = g, so the degenerated (SGD) step is exactly lr * g.
    lr = 0.3
    p0 = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)
    g = torch.tensor([0.25, -4.0, 1e-6, 100.0], dtype=F64)
    (p,), _ = run_ours([p0], [[g]], path, lr=lr, betas=(beta1, 0.999))
    torch.testing.assert_close(p.detach(), p0 - lr * g, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("path", PATHS)
def test_first_unrectified_step_has_size_lr_over_beta1(path):
    # s_1 = (1-b2) b1^2 g^2 + eps and the bias-corrected update is lr*g/(sqrt(b1^2 g^2 +
    # eps/(1-b2)) + eps): AdaBelief's first step has size lr/b1 (Adam's would be lr).
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-16
    p0 = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    g = torch.tensor([0.5, -3.0, 20.0], dtype=F64)
    (p,), opt = run_ours([p0], [[g]], path, lr=lr, betas=(b1, b2), eps=eps, rectify=False)
    expected_step = lr * g / (torch.sqrt(b1**2 * g**2 + eps / (1 - b2)) + eps)
    torch.testing.assert_close(p0 - p.detach(), expected_step, rtol=1e-13, atol=0)
    torch.testing.assert_close(p0 - p.detach(), lr / b1 * g.sign(), rtol=1e-12, atol=0)
    state = opt.state[p]
    torch.testing.assert_close(state["exp_avg"], (1 - b1) * g, rtol=1e-15, atol=0)
    torch.testing.assert_close(
        state["exp_avg_var"], (1 - b2) * (b1 * g) ** 2 + eps, rtol=1e-13, atol=0
    )


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("beta2", [0.999, 0.99, 0.9])
def test_no_update_during_warmup_without_degenerated_sgd(path, beta2):
    first = first_adaptive_step(beta2)
    # rho_t = rho_inf - 2 t b2^t/(1-b2^t) first reaches 5 at step 6 for these beta2.
    assert first == 6
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(6, dtype=F64, generator=gen).requires_grad_()
    p0 = p.detach().clone()
    opt = AdaBelief([p], lr=0.1, betas=(0.9, beta2), degenerated_to_sgd=False, **path_options(path))
    for t in range(1, first + 1):
        p.grad = torch.randn(6, dtype=F64, generator=gen)
        opt.step()
        if t < first:
            assert torch.equal(p.detach(), p0), f"parameter moved during warm-up step {t}"
            assert opt.state[p]["exp_avg"].abs().sum() > 0, "moments are updated in warm-up"
    assert not torch.equal(p.detach(), p0), "the first adaptive step moves the parameter"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("fixed_decay", "factor"), [(False, 1 - 0.1 * 0.5), (True, 1 - 0.5)])
def test_decoupled_decay_with_zero_gradient(path, fixed_decay, factor):
    # With g = 0 every moment stays 0 (s = eps only), so only the decay moves the parameter.
    p0 = torch.tensor([1.0, -3.0, 0.25], dtype=F64)
    zero = torch.zeros(3, dtype=F64)
    (p,), _ = run_ours([p0], [[zero]] * 3, path, lr=0.1, weight_decay=0.5, fixed_decay=fixed_decay)
    torch.testing.assert_close(p.detach(), p0 * factor**3, rtol=1e-15, atol=0)


# --- Against the official adabelief-pytorch 0.2.1 --------------------------------------------

#: (rectify, amsgrad) pairs on which the official package and this one agree by design.
MEETING = [(False, False), (True, False), (False, True)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("degenerated_to_sgd", [True, False])
@pytest.mark.parametrize("fixed_decay", [False, True])
@pytest.mark.parametrize("weight_decouple", [True, False])
@pytest.mark.parametrize(("rectify", "amsgrad"), MEETING)
def test_matches_official_package(
    official_adabelief,
    rectify,
    amsgrad,
    weight_decouple,
    fixed_decay,
    degenerated_to_sgd,
    maximize,
    weight_decay,
    path,
):
    shared = dict(
        lr=0.02,
        betas=(0.9, 0.9),
        eps=1e-8,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        weight_decouple=weight_decouple,
        fixed_decay=fixed_decay,
        rectify=rectify,
        degenerated_to_sgd=degenerated_to_sgd,
    )
    params0, grads = make_problem(seed=7, steps=25, shapes=((4, 3), (5,)))
    ours = [p.clone().requires_grad_() for p in params0]
    theirs = [p.clone().requires_grad_() for p in params0]
    opt = AdaBelief(ours, maximize=maximize, **path_options(path), **shared)
    official = official_adabelief(theirs, **shared)
    l2 = weight_decay != 0 and not weight_decouple
    for step_grads in grads:
        for p, q, g in zip(ours, theirs, step_grads, strict=True):
            p.grad = g.clone()
            # The official package has no maximize: it minimizes -g instead.
            q.grad = -g if maximize else g.clone()
        opt.step()
        official.step()
        for p, q, g in zip(ours, theirs, step_grads, strict=True):
            assert torch.equal(p.grad, g), "AdaBelief must never write into p.grad"
            if l2:  # the official package adds the L2 term into p.grad in place
                assert not torch.equal(q.grad, -g if maximize else g)
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14)
        assert opt.state[p]["step"].item() == official.state[q]["step"]
        keys = ("exp_avg", "exp_avg_var") + (("max_exp_avg_var",) if amsgrad else ())
        for key in keys:
            torch.testing.assert_close(
                opt.state[p][key], official.state[q][key], rtol=1e-12, atol=1e-14, msg=key
            )


@pytest.mark.parametrize("path", PATHS)
def test_rectified_amsgrad_uses_the_maximum_unlike_official(official_adabelief, path):
    """With rectify and amsgrad the official package divides by the current belief instead of
    its running maximum (a defect). We use the maximum; the official matches the reference only
    with that defect emulated."""
    options = dict(lr=0.05, betas=(0.9, 0.9), eps=1e-8, rectify=True, amsgrad=True)
    gen = torch.Generator().manual_seed(4)
    p0 = torch.randn(8, dtype=F64, generator=gen)
    # Large gradients first, then small ones: the belief shrinks below its running maximum
    # while the rectified update is adaptive.
    grads = [
        [torch.randn(8, dtype=F64, generator=gen) * (10.0 if k < 8 else 0.01)] for k in range(20)
    ]
    (p,), opt = run_ours([p0], grads, path, **options)
    official_param = p0.clone().requires_grad_()
    official = official_adabelief([official_param], **options)
    for (g,) in grads:
        official_param.grad = g.clone()
        official.step()

    ref = run_reference([p0], grads, **options)
    defect = run_reference([p0], grads, official_rectified_amsgrad=True, **options)
    assert_matches_reference([p], opt, ref)
    torch.testing.assert_close(
        official_param.detach(), torch.from_numpy(defect.params[0]), rtol=1e-12, atol=1e-14
    )
    state = opt.state[p]
    assert (state["max_exp_avg_var"] > state["exp_avg_var"] * 1.5).all(), "the maximum matters"
    difference = (p.detach() - official_param.detach()).abs()
    assert difference.min() > 1e-6, "ours and the official differ where the maximum is used"


def test_reference_rectification_threshold():
    """The reference's warm-up length against rho_t computed by hand: beta2=0.999 gives
    rho_5 = 1999 - 10 * 0.999^5 / (1 - 0.999^5) < 5 <= rho_6."""
    rho_inf = 2 / (1 - 0.999) - 1
    rho_5, rho_6 = (rho_inf - 2 * t * 0.999**t / (1 - 0.999**t) for t in (5, 6))
    assert rho_5 < 5 <= rho_6
    assert first_adaptive_step(0.999) == 6
    assert first_adaptive_step(0.9) == 6
    with pytest.raises(ValueError):  # rho_inf = 3 < 5: the warm-up never ends
        first_adaptive_step(0.5)


@pytest.mark.parametrize("path", PATHS)
def test_small_beta2_never_leaves_the_warmup(path):
    """beta2 < 0.6 gives rho_inf < 5: without degenerated_to_sgd the parameter never moves."""
    params0, grads = make_problem(seed=8, steps=40, shapes=((5,),))
    (p,), opt = run_ours(params0, grads, path, lr=0.1, betas=(0.9, 0.55), degenerated_to_sgd=False)
    assert torch.equal(p.detach(), params0[0])
    assert opt.state[p]["step"].item() == 40


# --- Random hyperparameters (hypothesis) -------------------------------------------------------


# beta1 from 0.5: as beta1 -> 0, m_t -> g_t and the belief (g_t - m_t)^2 = beta1^2 (g_t -
# m_{t-1})^2 comes from a catastrophic cancellation, so any two float64 implementations (NumPy's
# and torch's rounding) disagree in the leading digits of m / sqrt(s): ill-conditioned, not wrong.
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lr=st.floats(1e-4, 1.0),
    beta1=st.floats(0.5, 0.99),
    beta2=st.floats(0.0, 0.999),
    eps=st.sampled_from([1e-16, 1e-12, 1e-8, 1e-3]),
    weight_decay=st.sampled_from([0.0, 1e-4, 0.1, 0.5]),
    flags=st.tuples(*[st.booleans()] * len(OPTION_NAMES)),
    steps=st.integers(1, 15),
    seed=st.integers(0, 2**16),
    path=st.sampled_from(PATHS),
)
def test_matches_reference_for_random_hyperparameters(
    lr, beta1, beta2, eps, weight_decay, flags, steps, seed, path
):
    options = dict(
        zip(OPTION_NAMES, flags, strict=True),
        lr=lr,
        betas=(beta1, beta2),
        eps=eps,
        weight_decay=weight_decay,
    )
    params0, grads = make_problem(seed=seed, steps=steps, shapes=((3, 2), ()))
    params, opt = run_ours(params0, grads, path, **options)
    assert_matches_reference(
        params, opt, run_reference(params0, grads, **options), rtol=1e-10, atol=1e-12
    )
