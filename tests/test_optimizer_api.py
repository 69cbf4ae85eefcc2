"""The ``torch.optim.Optimizer`` contract of ``adabelief.AdaBelief``: parameter groups,
maximize, tensor learning rates, schedulers, input validation, sparse gradients, silence,
closures, ``zero_grad``, ``add_param_group``, hooks and ``defaults``."""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch

from adabelief import AdaBelief
from reference import PATHS, path_options, reference_from_options

F64 = torch.float64
NAN, INF = math.nan, math.inf


def quadratic_problem(seed=0, steps=12, shapes=((4, 3), (3,))):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, dtype=F64, generator=gen) for s in shapes]
    grads = [[torch.randn(s, dtype=F64, generator=gen) for s in shapes] for _ in range(steps)]
    return params, grads


def train(params0, grads, groups=None, **options):
    """Run on clones of ``params0``; ``groups`` (lists of indices plus options) makes groups."""
    params = [p.clone().requires_grad_() for p in params0]
    if groups is None:
        opt = AdaBelief(params, **options)
    else:
        opt = AdaBelief(
            [{"params": [params[i] for i in idx], **extra} for idx, extra in groups], **options
        )
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()
    return params, opt


# --- Parameter groups --------------------------------------------------------------------

GROUP_OPTIONS = [
    ("lr", 1e-2, 1e-1),
    ("betas", (0.9, 0.999), (0.5, 0.9)),
    ("eps", 1e-16, 1e-3),
    ("weight_decay", 0.0, 0.3),
    ("amsgrad", False, True),
    ("weight_decouple", True, False),
    ("fixed_decay", False, True),
    ("rectify", True, False),
    ("degenerated_to_sgd", True, False),
    ("maximize", False, True),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("name", "first", "second"), GROUP_OPTIONS, ids=[o[0] for o in GROUP_OPTIONS]
)
def test_each_group_follows_its_own_options(name, first, second, path):
    """Two groups that differ in one option each give exactly what a one-group optimizer with
    that option gives."""
    base = dict(lr=0.05, betas=(0.9, 0.9), weight_decay=0.1, **path_options(path))
    params0, grads = quadratic_problem()
    grouped, _opt = train(
        params0, grads, groups=[([0], {name: first}), ([1], {name: second})], **base
    )
    alone_first, _ = train(params0[:1], [g[:1] for g in grads], **{**base, name: first})
    alone_second, _ = train(params0[1:], [g[1:] for g in grads], **{**base, name: second})
    assert torch.equal(grouped[0], alone_first[0])
    assert torch.equal(grouped[1], alone_second[0])
    # ...and the option makes a difference on this problem, so the test can fail.
    other, _ = train(params0[1:], [g[1:] for g in grads], **{**base, name: first})
    assert not torch.equal(other[0], alone_second[0])


@pytest.mark.parametrize("path", PATHS)
def test_biases_without_weight_decay(path):
    """The usual "no decay for biases" grouping: the bias group moves exactly as without any
    decay, the weight group is decayed."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    plain = copy.deepcopy(model)
    opt = AdaBelief(
        [
            {"params": [model.weight], "weight_decay": 0.5},
            {"params": [model.bias], "weight_decay": 0.0},
        ],
        lr=0.05,
        **path_options(path),
    )
    opt_plain = AdaBelief(plain.parameters(), lr=0.05, **path_options(path))
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        for p, q in zip(model.parameters(), plain.parameters(), strict=True):
            p.grad = torch.randn(p.shape, dtype=F64, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        opt_plain.step()
    assert torch.equal(model.bias, plain.bias)
    assert not torch.equal(model.weight, plain.weight)


# --- maximize ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(weight_decay=0.1),
        dict(weight_decay=0.1, weight_decouple=False, amsgrad=True),
        dict(rectify=False, fixed_decay=True, weight_decay=0.1),
    ],
    ids=["plain", "decoupled", "l2-amsgrad", "unrectified-fixed"],
)
def test_maximize_g_equals_minimize_minus_g(path, options):
    params0, grads = quadratic_problem(steps=15)
    base = dict(lr=0.05, betas=(0.9, 0.9), **path_options(path), **options)
    up, up_opt = train(params0, grads, maximize=True, **base)
    down, down_opt = train(params0, [[-g for g in gs] for gs in grads], **base)
    for a, b in zip(up, down, strict=True):
        assert torch.equal(a, b)
        for key in up_opt.state[a]:
            assert torch.equal(up_opt.state[a][key], down_opt.state[b][key])
    plain, _ = train(params0, grads, **base)
    assert not torch.equal(plain[0], up[0])


@pytest.mark.parametrize("path", PATHS)
def test_maximize_climbs_to_the_maximum(path):
    x = torch.zeros(3, dtype=F64, requires_grad=True)
    target = torch.tensor([3.0, -1.0, 0.5], dtype=F64)
    opt = AdaBelief([x], lr=0.1, maximize=True, **path_options(path))
    for _ in range(300):
        opt.zero_grad()
        (-((x - target) ** 2).sum()).backward()
        opt.step()
    torch.testing.assert_close(x.detach(), target, atol=0.02, rtol=0)


# --- Tensor learning rates and schedulers ---------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(), (1,)])
@pytest.mark.parametrize("rectify", [True, False])
def test_tensor_lr_equals_float_lr(path, shape, rectify):
    params0, grads = quadratic_problem()
    options = dict(betas=(0.9, 0.9), weight_decay=0.1, rectify=rectify, **path_options(path))
    as_float, float_opt = train(params0, grads, lr=0.03, **options)
    as_tensor, tensor_opt = train(params0, grads, lr=torch.full(shape, 0.03, dtype=F64), **options)
    for a, b in zip(as_float, as_tensor, strict=True):
        assert torch.equal(a, b)
        for key in float_opt.state[a]:
            assert torch.equal(float_opt.state[a][key], tensor_opt.state[b][key])
    assert isinstance(tensor_opt.param_groups[0]["lr"], torch.Tensor)


SCHEDULERS = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
    "CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=0.1, total_steps=20, cycle_momentum=True, base_momentum=0.8, max_momentum=0.95
    ),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("tensor_lr", [False, True])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_values_are_used_at_each_step(name, tensor_lr, path):
    """The optimizer reads lr (and, for OneCycleLR's momentum cycling, betas[0]) from its group
    at every step: the run equals the reference fed the same per-step values."""
    params0, grads = quadratic_problem(steps=20)
    params = [p.clone().requires_grad_() for p in params0]
    lr = torch.tensor(0.05) if tensor_lr else 0.05
    opt = AdaBelief(params, lr=lr, betas=(0.9, 0.9), weight_decay=0.1, **path_options(path))
    scheduler = SCHEDULERS[name](opt)
    ref = reference_from_options([p.numpy() for p in params0], betas=(0.9, 0.9), weight_decay=0.1)
    lrs, beta1s = [], []
    for step_grads in grads:
        group = opt.param_groups[0]
        ref.lr, ref.betas = float(group["lr"]), tuple(float(b) for b in group["betas"])
        lrs.append(ref.lr)
        beta1s.append(ref.betas[0])
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()
        ref.step([g.numpy() for g in step_grads])
        scheduler.step()
    assert len(set(lrs)) > 3, "the scheduler changed the learning rate"
    if name == "OneCycleLR":
        assert len(set(beta1s)) > 3, "momentum cycling changed beta1"
        assert min(beta1s) == pytest.approx(0.8) and max(beta1s) == pytest.approx(0.95)
        assert opt.param_groups[0]["betas"][1] == 0.9
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) == tensor_lr
    for p, expected in zip(params, ref.params, strict=True):
        torch.testing.assert_close(p.detach(), torch.from_numpy(expected), rtol=1e-12, atol=1e-14)


# --- Validation -----------------------------------------------------------------------------

BAD_SCALARS = [
    ("lr", -1e-3),
    ("lr", NAN),
    ("lr", INF),
    ("lr", torch.tensor(-0.5)),
    ("lr", torch.tensor(NAN)),
    ("lr", "0.1"),
    ("eps", -1e-8),
    ("eps", NAN),
    ("eps", INF),
    ("weight_decay", -0.1),
    ("weight_decay", NAN),
    ("weight_decay", INF),
]


@pytest.mark.parametrize(("name", "value"), BAD_SCALARS, ids=[f"{n}={v}" for n, v in BAD_SCALARS])
def test_bad_scalar_raises_naming_argument_and_value(name, value):
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError) as info:
        AdaBelief([p], **{name: value})
    message = str(info.value)
    shown = [str(value)] + ([str(value.item())] if isinstance(value, torch.Tensor) else [])
    assert name in message and any(s in message for s in shown), message
    # The same check applies to groups added later.
    opt = AdaBelief([p])
    with pytest.raises(ValueError, match=name):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], name: value})
    assert len(opt.param_groups) == 1


BAD_BETAS = [
    ((1.0, 0.999), 1.0),
    ((-0.1, 0.999), -0.1),
    ((0.9, 1.0), 1.0),
    ((0.9, -0.5), -0.5),
    ((0.9, NAN), NAN),
    ((NAN, 0.9), NAN),
    ((0.9, INF), INF),
    ((0.9, 1.5), 1.5),
]


@pytest.mark.parametrize(("betas", "bad"), BAD_BETAS, ids=[str(b) for b, _ in BAD_BETAS])
def test_betas_outside_unit_interval_raise(betas, bad):
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError) as info:
        AdaBelief([p], betas=betas)
    assert "betas" in str(info.value) and str(bad) in str(info.value)
    opt = AdaBelief([p])
    with pytest.raises(ValueError, match="betas"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "betas": betas})


@pytest.mark.parametrize(
    "betas", [(1e-3, 0.0), (0.999999, 0.999999), (torch.tensor(0.9), torch.tensor(0.99))]
)
def test_betas_on_the_edge_are_accepted(betas):
    p = torch.ones(2, requires_grad=True)
    opt = AdaBelief([p], betas=betas)
    p.grad = torch.ones(2)
    opt.step()
    assert torch.isfinite(p).all()


@pytest.mark.parametrize("path", PATHS)
def test_sparse_gradient_raises(path):
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    opt = AdaBelief(embedding.parameters(), **path_options(path))
    embedding(torch.tensor([1, 2, 2])).sum().backward()
    assert embedding.weight.grad.is_sparse
    before = embedding.weight.detach().clone()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    assert torch.equal(embedding.weight.detach(), before)


# --- Silence, closure, zero_grad, add_param_group, hooks, defaults ------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(amsgrad=True, weight_decouple=False, weight_decay=0.1),
        dict(rectify=False, fixed_decay=True),
    ],
)
def test_nothing_printed(capsys, path, options):
    p = torch.randn(3, requires_grad=True)
    opt = AdaBelief([p], **path_options(path), **options)
    for _ in range(7):
        p.grad = torch.randn(3)
        opt.step()
    opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})
    opt.load_state_dict(opt.state_dict())
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


@pytest.mark.parametrize("path", PATHS)
def test_closure_is_called_once_with_grad_enabled(path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    twin = copy.deepcopy(model)
    x, y = torch.randn(8, 3, dtype=F64), torch.randn(8, 1, dtype=F64)
    opt = AdaBelief(model.parameters(), lr=0.1, **path_options(path))
    twin_opt = AdaBelief(twin.parameters(), lr=0.1, **path_options(path))
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(5):
        with torch.no_grad():  # step must still let the closure build a graph
            loss = opt.step(closure)
        twin_opt.zero_grad()
        expected = torch.nn.functional.mse_loss(twin(x), y)
        expected.backward()
        twin_opt.step()
        assert torch.equal(loss, expected)
    assert calls == [True] * 5
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt.step() is None


@pytest.mark.parametrize("path", PATHS)
def test_zero_grad(path):
    p = torch.randn(4, requires_grad=True)
    opt = AdaBelief([p], weight_decay=0.5, **path_options(path))
    p.grad = torch.randn(4)
    opt.step()
    after_one = p.detach().clone()
    state = {k: v.clone() for k, v in opt.state[p].items()}
    opt.zero_grad()
    assert p.grad is None
    opt.step()  # no gradient: no decay, no state change
    assert torch.equal(p.detach(), after_one)
    assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())
    p.grad = torch.randn(4)
    opt.zero_grad(set_to_none=False)
    assert torch.equal(p.grad, torch.zeros(4))
    opt.step()  # a zero gradient is still a step
    assert opt.state[p]["step"].item() == 2
    assert not torch.equal(p.detach(), after_one)


def test_add_param_group_fills_every_option_and_trains():
    a = torch.randn(3, dtype=F64, requires_grad=True)
    b = torch.randn(3, dtype=F64, requires_grad=True)
    b0 = b.detach().clone()
    opt = AdaBelief([a], lr=0.02, amsgrad=True, rectify=False, weight_decay=0.1)
    opt.add_param_group({"params": [b], "lr": 0.5, "weight_decouple": False})
    group = opt.param_groups[1]
    for key, value in opt.defaults.items():
        assert key in group, key
        if key not in ("lr", "weight_decouple"):
            assert group[key] == value, key
    assert group["lr"] == 0.5 and group["weight_decouple"] is False
    grads = [torch.randn(3, dtype=F64) for _ in range(6)]
    for g in grads:
        a.grad, b.grad = g.clone(), g.clone()
        opt.step()
    ref = reference_from_options(
        [b0.numpy()], lr=0.5, amsgrad=True, rectify=False, weight_decay=0.1, weight_decouple=False
    )
    for g in grads:
        ref.step([g.numpy()])
    torch.testing.assert_close(b.detach(), torch.from_numpy(ref.params[0]), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [b]})  # a parameter may appear in one group only


def test_defaults_hold_every_constructor_option():
    signature = inspect.signature(AdaBelief.__init__)
    names = [n for n in signature.parameters if n not in ("self", "params")]
    non_default = dict(
        lr=0.5,
        betas=(0.8, 0.95),
        eps=1e-4,
        weight_decay=0.3,
        amsgrad=True,
        weight_decouple=False,
        fixed_decay=True,
        rectify=False,
        degenerated_to_sgd=False,
        maximize=True,
        foreach=True,
        fused=False,
        capturable=True,
        differentiable=True,
        state_precision="bf16",
        step_in_backward=True,
        master_weights="residual",
    )
    assert sorted(names) == sorted(non_default), "a new option needs a test value here"
    # differentiable=True and step_in_backward=True exclude each other: one optimizer each.
    for excluded in ("step_in_backward", "differentiable"):
        options = {k: v for k, v in non_default.items() if k != excluded}
        opt = AdaBelief([torch.zeros(1, requires_grad=True)], **options)
        for name in options:
            assert opt.defaults[name] == options[name], name
            assert opt.param_groups[0][name] == options[name], name
    defaults = AdaBelief([torch.zeros(1, requires_grad=True)]).defaults
    for name in names:
        assert defaults[name] == signature.parameters[name].default, name


@pytest.mark.parametrize("path", PATHS)
def test_step_hooks_run(path):
    p = torch.randn(2, requires_grad=True)
    opt = AdaBelief([p], **path_options(path))
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(("pre", o is opt)))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append(("post", o is opt)))
    p.grad = torch.ones(2)
    opt.step()
    assert seen == [("pre", True), ("post", True)]


def test_repr_and_deepcopy():
    p = torch.randn(3, dtype=F64, requires_grad=True)
    opt = AdaBelief([p], lr=0.05, amsgrad=True)
    assert "AdaBelief" in repr(opt) and "amsgrad: True" in repr(opt)
    p.grad = torch.randn(3, dtype=F64)
    opt.step()
    clone = copy.deepcopy(opt)
    q = clone.param_groups[0]["params"][0]
    assert q is not p and torch.equal(q, p)
    g = torch.randn(3, dtype=F64)
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    clone.step()
    assert torch.equal(p, q)
    assert clone.state[q]["step"].item() == 2 and opt.state[p]["step"].item() == 2


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_capturable_matches_default(path, weight_decay):
    params0, grads = quadratic_problem(steps=12)
    options = dict(lr=0.03, weight_decay=weight_decay, amsgrad=True, **path_options(path))
    eager, _eager_opt = train(params0, grads, **options)
    capt, capt_opt = train(params0, grads, capturable=True, **options)
    for a, b in zip(eager, capt, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        assert capt_opt.state[b]["step"].item() == 12


@pytest.mark.parametrize("lr_type", ["float", "tensor"])
def test_fixed_decay_is_a_no_op_at_zero_lr(lr_type):
    """torch.distributed.checkpoint initializes state with an lr=0 step that must change
    nothing; at any other lr, fixed decay removes wd*theta whatever the lr."""
    for lr, factor in ((0.0, 1.0), (1e-12, 0.9)):
        p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
        start = p.detach().clone()
        value = torch.tensor(lr) if lr_type == "tensor" else lr
        opt = AdaBelief([p], lr=value, weight_decay=0.1, fixed_decay=True)
        p.grad = torch.tensor([0.1, 0.2, -0.3], dtype=torch.float64)
        opt.step()
        torch.testing.assert_close(p.detach(), factor * start, rtol=1e-9, atol=1e-12)
