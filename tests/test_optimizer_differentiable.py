"""``differentiable=True``: the same numbers as the default step, and a step autograd can
differentiate through (checked with ``torch.autograd.gradcheck`` as PyTorch does for its own
differentiable optimizers)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.autograd import gradcheck

from adabelief import AdaBelief

F64 = torch.float64

COMBOS = [
    dict(rectify=r, amsgrad=a, weight_decouple=w, maximize=m)
    for r, a, w, m in itertools.product((True, False), repeat=4)
]


def combo_id(combo):
    return "+".join(k for k, v in combo.items() if v) or "plain"


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_differentiable_matches_default(combo):
    """Non-leaf parameters (as in meta-learning) stepped with grad mode on, against the plain
    optimizer on detached copies. Default betas: the rectified update turns adaptive at step 6."""
    options = dict(combo, lr=0.02, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    leaf = torch.randn(6, dtype=F64, generator=gen, requires_grad=True)
    grads = [torch.randn(6, dtype=F64, generator=gen) for _ in range(10)]

    p = leaf.clone()  # differentiable steps update a non-leaf tensor in place
    opt = AdaBelief([p], differentiable=True, **options)
    plain_p = leaf.detach().clone().requires_grad_()
    plain = AdaBelief([plain_p], **options)
    for g in grads:
        p.grad, plain_p.grad = g.clone(), g.clone()
        opt.step()
        plain.step()
    assert p.requires_grad, "the step was recorded by autograd"
    torch.testing.assert_close(p.detach(), plain_p.detach(), rtol=1e-12, atol=1e-14)
    for key, value in plain.state[plain_p].items():
        torch.testing.assert_close(opt.state[p][key].detach(), value, rtol=1e-12, atol=1e-14)


def _several_steps(leaf, grads, options):
    p = leaf.clone()
    opt = AdaBelief([p], differentiable=True, **options)
    for g in grads:
        p.grad = g
        opt.step()
    return p


# PyTorch's own Adam(differentiable=True) cannot backpropagate through several AMSGrad steps
# with L2 decay either (its maximum saves a state that the next step updates in place).
NO_AMSGRAD = [c for c in COMBOS if not c["amsgrad"]]


@pytest.mark.parametrize("combo", NO_AMSGRAD, ids=combo_id)
def test_gradcheck_through_several_steps(combo):
    """d(parameter after 7 steps)/d(initial parameter), through the warm-up into the adaptive
    rectified update (beta2=0.9: adaptive from step 6)."""
    options = dict(combo, lr=0.05, betas=(0.9, 0.9), eps=1e-8, weight_decay=0.3)
    gen = torch.Generator().manual_seed(1)
    leaf = torch.randn(4, dtype=F64, generator=gen, requires_grad=True)
    grads = [torch.randn(4, dtype=F64, generator=gen) for _ in range(7)]
    assert gradcheck(lambda x: _several_steps(x, grads, options), (leaf,))


def _step_fn(p, grad, state, options, *state_tensors):
    """One step as a function of the parameter, its gradient and its state; ``state_tensors``
    repeats the state's tensors so that gradcheck sees them as inputs."""
    p = p.clone()
    p.grad = grad
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    opt = AdaBelief([p], differentiable=True, **options)
    opt.state[p].update(state)
    opt.step()
    moments = [v for k, v in opt.state[p].items() if k != "step"]
    return (p, *moments)


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
@pytest.mark.parametrize("step", [2, 10], ids=["warmup", "adaptive"])
def test_gradcheck_through_one_step(combo, step):
    options = dict(combo, lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)

    def rand(low=0.0):
        return (torch.rand(5, dtype=F64, generator=gen) + low).requires_grad_()

    p, grad = rand(), rand()
    state = {
        "step": torch.tensor(float(step - 1), dtype=F64),
        "exp_avg": rand(),
        "exp_avg_var": rand(0.1),
    }
    if combo["amsgrad"]:
        # Some elements above the new belief, some below: both branches of the maximum.
        state["max_exp_avg_var"] = torch.tensor(
            [0.05, 5.0, 0.05, 5.0, 0.05], dtype=F64, requires_grad=True
        )
    tensors = [v for k, v in state.items() if k != "step"]
    assert gradcheck(_step_fn, (p, grad, state, options, *tensors))
