"""Where ``adabelief.AdaBelief`` follows ``torch.optim.Adam``'s errors and defaults to the letter,
and where it deliberately does not (each difference is asserted here, with its reason)."""

from __future__ import annotations

import math

import pytest
import torch

from adabelief import AdaBelief


def params():
    return [torch.nn.Parameter(torch.randn(3, 2))]


@pytest.mark.parametrize("cls", [torch.optim.Adam, AdaBelief])
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(fused=True, foreach=True), "`fused` and `foreach` cannot be `True` together."),
        (dict(fused=True, differentiable=True), "`fused` does not support `differentiable`"),
    ],
    ids=["fused+foreach", "fused+differentiable"],
)
def test_incompatible_fused_options_raise_runtime_error_as_torch(cls, options, message):
    with pytest.raises(RuntimeError) as info:
        cls(params(), **options)
    assert str(info.value) == message


def test_incompatible_fused_options_in_an_added_group_raise_too():
    opt = AdaBelief(params())
    with pytest.raises(RuntimeError, match="`fused` and `foreach`"):
        opt.add_param_group({"params": params(), "fused": True, "foreach": True})


@pytest.mark.parametrize("cls", [torch.optim.Adam, AdaBelief])
def test_tensor_lr_with_several_elements_is_refused_in_torch_words(cls):
    with pytest.raises(ValueError, match=r"^Tensor lr must be 1-element$"):
        cls(params(), lr=torch.tensor([1e-3, 1e-3]))


@pytest.mark.parametrize("cls", [torch.optim.Adam, AdaBelief])
def test_fused_on_meta_parameters_constructs_and_raises_at_step(cls):
    """As torch's test_fused_error_on_params_on_meta: models are built on meta and materialised
    later, so construction succeeds and the first step refuses a parameter still on meta."""
    meta = torch.nn.Parameter(torch.empty(4, device="meta"))
    opt = cls([meta], fused=True)
    meta.grad = torch.empty(4, device="meta")
    with pytest.raises(RuntimeError) as info:
        opt.step()
    message = str(info.value)
    assert message.startswith(
        "`fused=True` requires all the params to be floating point Tensors of supported devices"
    )
    assert message.endswith("but torch.float32 and meta")
    if cls is AdaBelief:
        assert not opt.state[meta], "no state was created for the refused parameter"


def test_fused_on_integer_parameters_raises_at_construction():
    with pytest.raises(RuntimeError, match="floating point"):
        AdaBelief([torch.zeros(3, dtype=torch.int64)], fused=True)


def test_fused_on_complex_parameters_is_accepted():
    """A deliberate difference: torch's fused Adam refuses complex parameters (at its first
    step); our fused paths update their real views."""
    z = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    z.grad = torch.randn(3, dtype=torch.complex64)
    AdaBelief([z], fused=True).step()
    twin = torch.nn.Parameter(z.detach().clone())
    twin.grad = z.grad.clone()
    with pytest.raises(RuntimeError, match="floating point"):
        torch.optim.Adam([twin], fused=True).step()


@pytest.mark.parametrize("where", ["constructor", "add_param_group"])
def test_beta1_zero_is_refused_with_the_reason(where):
    """beta1 = 0 makes m = g, so the belief (g - m)^2 is 0 and the step g/sqrt(eps) diverges."""
    opt = None
    with pytest.raises(ValueError) as info:
        if where == "constructor":
            AdaBelief(params(), betas=(0.0, 0.999))
        else:
            opt = AdaBelief(params())
            opt.add_param_group({"params": params(), "betas": (0.0, 0.99)})
    message = str(info.value)
    assert "betas[0]" in message and "(g - m)^2" in message and "0.5" in message
    if opt is not None:
        assert len(opt.param_groups) == 1, "the refused group was not added"


def test_beta1_zero_would_diverge_silently():
    """Why it is refused: the same update with beta1 = 0 (set past the check) reaches NaN."""
    p = torch.nn.Parameter(torch.ones(4))
    opt = AdaBelief([p], lr=1e-3)
    opt.param_groups[0]["betas"] = (0.0, 0.999)
    for step in range(50):
        p.grad = torch.full((4,), 1.0 + 0.1 * step)
        opt.step()
    assert not torch.isfinite(p).all() or p.abs().max() > 1e3


@pytest.mark.parametrize(
    ("name", "value"),
    [("lr", -1.0), ("lr", math.nan), ("eps", -1e-8), ("weight_decay", -0.1)],
)
def test_negative_or_nan_hyperparameters_raise_value_error_as_torch(name, value):
    with pytest.raises(ValueError):
        torch.optim.Adam(params(), **{name: value})
    with pytest.raises(ValueError, match=name):
        AdaBelief(params(), **{name: value})


def test_defaults_that_differ_from_adam_on_purpose():
    """eps 1e-16 (the belief is added eps at every step, so the official package's 1e-16 is
    Adam's 1e-8 in effect), decoupled decay and rectification on: the official 0.2.x defaults,
    so migrating from it changes only the import."""
    defaults = AdaBelief(params()).defaults
    adam = torch.optim.Adam(params()).defaults
    assert defaults["eps"] == 1e-16 and adam["eps"] == 1e-8
    assert defaults["weight_decouple"] and defaults["rectify"]
    for key in ("lr", "betas", "weight_decay", "amsgrad", "maximize", "foreach", "fused"):
        assert defaults[key] == adam[key], key
    assert defaults["capturable"] == adam["capturable"]
    assert defaults["differentiable"] == adam["differentiable"]


BOOL_OPTIONS = [
    "amsgrad",
    "weight_decouple",
    "fixed_decay",
    "rectify",
    "degenerated_to_sgd",
    "maximize",
    "foreach",
    "fused",
    "capturable",
    "differentiable",
]


@pytest.mark.parametrize("value", ["no", 0, 1, "False", 0.0])
@pytest.mark.parametrize("name", BOOL_OPTIONS)
@pytest.mark.parametrize("where", ["constructor", "group dict", "add_param_group"])
def test_boolean_options_refuse_what_is_not_a_bool(name, value, where):
    """weight_decouple='no' would silently mean True: refused, naming the option and value."""
    expected = "True, False or None" if name in ("foreach", "fused") else "True or False"
    opt = None
    with pytest.raises(ValueError) as info:
        if where == "constructor":
            AdaBelief(params(), **{name: value})
        elif where == "group dict":
            AdaBelief([{"params": params(), name: value}])
        else:
            opt = AdaBelief(params())
            opt.add_param_group({"params": params(), name: value})
    assert str(info.value) == f"Invalid {name}: {value!r} (expected {expected})"
    if opt is not None:
        assert len(opt.param_groups) == 1, "the refused group was not added"


@pytest.mark.parametrize("name", BOOL_OPTIONS)
def test_boolean_options_accept_bools_and_none_where_torch_does(name):
    for value in (False, True):
        if name in ("fused", "differentiable", "capturable") and value:
            continue  # combinations checked elsewhere; here only the type
        AdaBelief(params(), **{name: value})
    if name in ("foreach", "fused"):
        AdaBelief(params(), **{name: None})
    else:
        with pytest.raises(ValueError, match=rf"Invalid {name}: None"):
            AdaBelief(params(), **{name: None})


@pytest.mark.parametrize("eps", [0, 0.0, -0.0, -1e-16, torch.tensor(0.0)])
@pytest.mark.parametrize("where", ["constructor", "add_param_group"])
def test_eps_zero_or_negative_is_refused_with_the_reason(eps, where):
    """A deliberate difference: torch.optim.Adam accepts eps=0. AdaBelief's belief can be
    exactly 0 (a gradient that is always 0), and eps=0 then gives 0/0 = NaN."""
    with pytest.raises(ValueError, match=r"^Invalid eps: ") as info:
        if where == "constructor":
            AdaBelief(params(), eps=eps)
        else:
            AdaBelief(params()).add_param_group({"params": params(), "eps": eps})
    if float(eps) == 0.0:
        message = str(info.value)
        assert "must be > 0" in message and "(g - m)^2" in message and "0/0 = NaN" in message


def test_eps_zero_would_give_nan_or_unbounded_steps():
    """Why it is refused: with eps=0 (set past the check) a zero gradient makes NaN, and a
    constant gradient, whose belief tends to 0, takes ever larger steps (Adam's would not)."""
    torch.optim.Adam(params(), eps=0.0)  # torch accepts it
    p = torch.nn.Parameter(torch.ones(3))
    opt = AdaBelief([p], rectify=False)
    opt.param_groups[0]["eps"] = 0.0
    p.grad = torch.zeros(3)
    opt.step()
    assert torch.isnan(p).all()
    q = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = AdaBelief([q], lr=1e-3, betas=(0.9, 0.9), rectify=False)
    opt.param_groups[0]["eps"] = 0.0
    moves = []
    for _ in range(200):
        before = q.detach().clone()
        q.grad = torch.ones(1, dtype=torch.float64)
        opt.step()
        moves.append(float((before - q.detach()).abs()))
    assert moves[-1] > 1e3 * moves[10]  # Adam's step at a constant gradient stays ~lr
