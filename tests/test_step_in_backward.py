"""``AdaBelief(step_in_backward=True)``: each parameter steps inside backward, on the same kernel.

Every comparison is with an ordinary ``AdaBelief`` on the same kernel path (the same options), and
is bit-exact: the in-backward step hands one parameter to the kernel the ordinary step hands the
whole group to, and every kernel is element-wise per parameter. The distributed checks (FSDP2
works, DDP is refused) run this file as a two-rank gloo worker.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import io
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import adabelief
from adabelief import AdaBelief
from adabelief.backward_step import StepInBackwardError

PRECISIONS = ["fp32", "bf16", "int8"]
#: Options that choose each kernel path (see adabelief.kernels.dispatch.choose_path).
PATHS = {
    "default": {},
    "single": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
    "tensor": {"capturable": True},
}
OPTIONS = {
    "amsgrad": {"amsgrad": True},
    "l2": {"weight_decouple": False, "weight_decay": 0.1},
    "decoupled": {"weight_decay": 0.1},
    "fixed_decay": {"fixed_decay": True, "weight_decay": 0.01},
    "no_rectify": {"rectify": False},
    "no_sgd_warmup": {"degenerated_to_sgd": False},
    "maximize": {"maximize": True},
    "tensor_lr": {"lr": torch.tensor(3e-2)},
}
STEPS = 6


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """A small MLP whose first weight (6144 elements) is large enough for int8 moments."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 4))
    return model.to(dtype)


def batches(count: int = STEPS, size: int = 32) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(size, 64, generator=g), torch.randn(size, 4, generator=g))
        for _ in range(count)
    ]


def loss_of(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    dtype = next(model.parameters()).dtype
    return nn.functional.mse_loss(model(x.to(dtype)).float(), y)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, data: list, scheduler: Any = None):
    """The torch.optim loop, unchanged for either optimizer."""
    for batch in data:
        optimizer.zero_grad()
        loss_of(model, batch).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), f"{name} differs by {(p - q).abs().max()}"


def assert_same_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    params_a = [p for g in a.param_groups for p in g["params"]]
    params_b = [p for g in b.param_groups for p in g["params"]]
    for p, q in zip(params_a, params_b, strict=True):
        sa, sb = a.state.get(p, {}), b.state.get(q, {})
        assert sorted(sa) == sorted(sb)
        for key in sa:
            assert sa[key].dtype == sb[key].dtype, key
            assert torch.equal(sa[key], sb[key]), key


def pair(options: dict[str, Any], dtype: torch.dtype = torch.float32, lr: float = 3e-2):
    """(ordinary model, its AdaBelief, in-backward model, its AdaBelief) on the same weights."""
    options = {"lr": lr, **options}
    lr_value = options.pop("lr")
    a, b = make_model(dtype=dtype), make_model(dtype=dtype)
    lr_b = lr_value.clone() if isinstance(lr_value, Tensor) else lr_value
    oa = AdaBelief(a.parameters(), lr=lr_value, **options)
    ob = AdaBelief(b.parameters(), lr=lr_b, step_in_backward=True, **options)
    return a, oa, b, ob


# ---- results match ordinary training step for step ------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("path", list(PATHS))
def test_matches_ordinary_step_on_each_path(path, precision):
    a, oa, b, ob = pair({**PATHS[path], "state_precision": precision})
    for batch in batches():
        train(a, oa, [batch])
        train(b, ob, [batch])
        assert_same_params(a, b)
        assert all(p.grad is None for p in b.parameters())
    assert_same_state(oa, ob)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_matches_ordinary_step_with_each_option(option, precision):
    a, oa, b, ob = pair({**OPTIONS[option], "state_precision": precision})
    train(a, oa, batches())
    train(b, ob, batches())
    assert_same_params(a, b)
    assert_same_state(oa, ob)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_matches_ordinary_step_with_16_bit_parameters(precision):
    a, oa, b, ob = pair({"state_precision": precision}, dtype=torch.bfloat16)
    train(a, oa, batches())
    train(b, ob, batches())
    assert_same_params(a, b)
    assert_same_state(oa, ob)


def test_gradients_are_never_all_held_together():
    """At each parameter's turn in backward, the ordinary step holds every gradient computed so
    far; the in-backward step holds only that parameter's (the earlier ones are released)."""

    def held_counts(step_in_backward: bool) -> list[int]:
        model = make_model()
        params = list(model.parameters())
        counts: list[int] = []
        for p in params:  # registered first, so they run before the optimizer's hooks
            p.register_post_accumulate_grad_hook(
                lambda _: counts.append(sum(q.grad is not None for q in params))
            )
        optimizer = AdaBelief(params, step_in_backward=step_in_backward)
        train(model, optimizer, batches(2))
        return counts

    assert held_counts(True) == [1] * 8
    assert max(held_counts(False)) == 4


@pytest.mark.parametrize("precision", PRECISIONS)
def test_state_is_created_with_the_optimizer_before_any_backward(precision):
    """Created in the first backward, the state would sit between freed gradients, which glibc's
    malloc keeps resident; so an in-backward group's state exists from construction, as the
    ordinary step would create it (step 0, zero moments in the group's format)."""
    model = make_model()
    model[2].bias.requires_grad_(False)  # no hook, so no state until it has a gradient
    optimizer = AdaBelief(
        model.parameters(), state_precision=precision, amsgrad=True, step_in_backward=True
    )
    hooked = [model[0].weight, model[0].bias, model[2].weight]
    assert {id(p) for p in optimizer.state} == {id(p) for p in hooked}
    reference = AdaBelief(model.parameters(), state_precision=precision, amsgrad=True)
    for p in hooked:
        reference._param_state(reference.param_groups[0], p)
        state, expected = optimizer.state[p], reference.state[p]
        assert int(state["step"]) == 0 and sorted(state) == sorted(expected)
        for key in state:
            assert state[key].dtype == expected[key].dtype and torch.equal(
                state[key], expected[key]
            )


# ---- parameter groups, schedulers, closures --------------------------------------------------


def _groups(model: nn.Module, step_in_backward: list[bool]) -> list[dict[str, Any]]:
    return [
        {"params": [model[0].weight, model[0].bias], "lr": 1e-2, "weight_decay": 0.1,
         "step_in_backward": step_in_backward[0], "state_precision": "int8"},
        {"params": [model[2].weight, model[2].bias], "betas": (0.5, 0.9), "amsgrad": True,
         "step_in_backward": step_in_backward[1]},
    ]  # fmt: skip


@pytest.mark.parametrize("wiring", [[True, True], [True, False], [False, True]])
def test_parameter_groups_each_with_their_options(wiring):
    """Groups keep their own options; a group with the ordinary step is stepped by step()."""
    a, b = make_model(), make_model()
    oa = AdaBelief(_groups(a, [False, False]), lr=3e-2)
    ob = AdaBelief(_groups(b, wiring), lr=3e-2)
    for batch in batches():
        train(a, oa, [batch])
        train(b, ob, [batch])
        assert_same_params(a, b)


def test_an_added_group_may_step_in_backward():
    a, b = make_model(), make_model()
    oa = AdaBelief(a[0].parameters(), lr=3e-2)
    oa.add_param_group({"params": list(a[2].parameters())})
    ob = AdaBelief(b[0].parameters(), lr=3e-2)
    ob.add_param_group({"params": list(b[2].parameters()), "step_in_backward": True})
    train(a, oa, batches())
    train(b, ob, batches())
    assert_same_params(a, b)
    assert b[0].weight.grad is not None and b[2].weight.grad is None


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.3),
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=STEPS),
    ],
    ids=["step", "one_cycle"],
)
def test_lr_schedulers_drive_the_in_backward_step(make_scheduler):
    a, oa, b, ob = pair({})
    train(a, oa, batches(), make_scheduler(oa))
    train(b, ob, batches(), make_scheduler(ob))
    assert_same_params(a, b)
    unscheduled, optimizer = make_model(), None
    optimizer = AdaBelief(unscheduled.parameters(), lr=3e-2, step_in_backward=True)
    train(unscheduled, optimizer, batches())
    assert not torch.equal(unscheduled[0].weight, b[0].weight)  # the schedule took effect


def test_step_with_closure_runs_it_and_returns_its_loss():
    """step(closure) runs the closure, whose backward steps: as an ordinary step(closure)."""
    a, oa, b, ob = pair({})
    for batch in batches():
        losses = []
        for model, optimizer in ((a, oa), (b, ob)):

            def closure(
                model: nn.Module = model, optimizer: Any = optimizer, batch=batch
            ) -> Tensor:
                optimizer.zero_grad()
                loss = loss_of(model, batch)
                loss.backward()
                return loss

            losses.append(optimizer.step(closure))
        assert losses[0] is not None and torch.equal(losses[0], losses[1])
        assert_same_params(a, b)


# ---- state_dict ------------------------------------------------------------------------------


def _round_trip(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("direction", ["in_backward_to_ordinary", "ordinary_to_in_backward"])
def test_state_dict_loads_across_the_two_ways_of_stepping(direction, precision):
    """Train 3 steps one way, save, load into a fresh optimizer of the other way, train 3 more:
    bit-identical to 6 uninterrupted ordinary steps, and the state_dicts have one layout."""
    first_in_backward = direction == "in_backward_to_ordinary"
    data = batches()
    reference = make_model()
    reference_opt = AdaBelief(reference.parameters(), lr=3e-2, state_precision=precision)
    train(reference, reference_opt, data)

    model = make_model()
    first = AdaBelief(
        model.parameters(), lr=3e-2, state_precision=precision, step_in_backward=first_in_backward
    )
    train(model, first, data[:3])
    saved = _round_trip(first)
    assert [g["step_in_backward"] for g in saved["param_groups"]] == [first_in_backward]
    first.remove_backward_hooks()
    second = AdaBelief(
        model.parameters(),
        lr=1.0,  # taken from the checkpoint
        state_precision=precision,
        step_in_backward=not first_in_backward,
    )
    second.load_state_dict(saved)
    assert second.param_groups[0]["step_in_backward"] is (not first_in_backward)
    train(model, second, data[3:])
    assert_same_params(reference, model)
    assert_same_state(reference_opt, second)

    ordinary, in_backward = reference_opt.state_dict(), second.state_dict()
    if first_in_backward:
        ordinary, in_backward = in_backward, ordinary
    assert sorted(ordinary["param_groups"][0]) == sorted(in_backward["param_groups"][0])
    assert {k: sorted(v) for k, v in ordinary["state"].items()} == {
        k: sorted(v) for k, v in in_backward["state"].items()
    }


def test_deep_copy_of_model_and_optimizer_steps_its_own_parameters():
    model = make_model()
    optimizer = AdaBelief(model.parameters(), lr=3e-2, step_in_backward=True)
    train(model, optimizer, batches(2))
    copied = copy.deepcopy({"model": model, "optimizer": optimizer})
    train(model, optimizer, batches()[2:])
    train(copied["model"], copied["optimizer"], batches()[2:])
    assert_same_params(model, copied["model"])
    assert_same_state(optimizer, copied["optimizer"])


# ---- gradient accumulation -------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_accumulating_marks_the_backward_passes_that_only_accumulate(precision):
    micro = 3
    a, oa, b, ob = pair({"state_precision": precision})
    data = batches(STEPS * micro, size=8)
    for step in range(STEPS):
        chunk = data[step * micro : (step + 1) * micro]
        oa.zero_grad()
        for batch in chunk:
            (loss_of(a, batch) / micro).backward()
        oa.step()
        ob.zero_grad()
        for index, batch in enumerate(chunk):
            with ob.accumulating(index < micro - 1):
                (loss_of(b, batch) / micro).backward()
            if index < micro - 1:  # held until the last micro-batch's backward steps
                assert all(p.grad is not None for p in b.parameters())
        assert all(p.grad is None for p in b.parameters())
        ob.step()
        assert_same_params(a, b)


def test_zero_grad_drops_an_accumulated_gradient_and_nothing_else():
    model = make_model()
    optimizer = AdaBelief(model.parameters(), lr=3e-2, step_in_backward=True)
    before = [p.detach().clone() for p in model.parameters()]
    with optimizer.accumulating():
        loss_of(model, batches(1)[0]).backward()
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    optimizer.step()  # nothing held, nothing to do
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_step_refuses_an_accumulated_gradient_it_would_not_apply():
    model = make_model()
    optimizer = AdaBelief(model.parameters(), step_in_backward=True)
    with optimizer.accumulating():
        loss_of(model, batches(1)[0]).backward()
    with pytest.raises(StepInBackwardError, match=r"accumulated under optimizer\.accumulating"):
        optimizer.step()


def test_step_with_closure_inside_accumulating_is_refused():
    model = make_model()
    optimizer = AdaBelief(model.parameters(), step_in_backward=True)
    called = []
    with optimizer.accumulating(), pytest.raises(StepInBackwardError, match="step\\(closure\\)"):
        optimizer.step(lambda: called.append(1))  # type: ignore[arg-type, func-returns-value]
    assert not called


# ---- parameters without a hook, hooks removed -------------------------------------------------


def test_a_parameter_unfrozen_later_is_stepped_then_hooked():
    """A parameter that did not require grad at construction has no hook; once it does, step()
    steps its gradient the ordinary way and hooks it, and later backwards step it."""
    a, b = make_model(), make_model()
    for model in (a, b):
        model[0].weight.requires_grad_(False)
    oa = AdaBelief(a.parameters(), lr=3e-2)
    ob = AdaBelief(b.parameters(), lr=3e-2, step_in_backward=True)
    data = batches()
    train(a, oa, data[:2])
    train(b, ob, data[:2])
    for model in (a, b):
        model[0].weight.requires_grad_(True)
    train(a, oa, data[2:3])
    train(b, ob, data[2:3])  # backward: no hook yet; step(): ordinary step, then hooked
    assert b[0].weight.grad is None
    train(a, oa, data[3:])
    train(b, ob, data[3:])
    assert_same_params(a, b)
    assert b[0].weight.grad is None


def test_remove_backward_hooks_makes_it_an_ordinary_optimizer():
    a, oa, b, ob = pair({})
    data = batches()
    train(a, oa, data[:3])
    train(b, ob, data[:3])
    ob.remove_backward_hooks()
    assert not any(p._post_accumulate_grad_hooks for p in b.parameters())
    assert ob.param_groups[0]["step_in_backward"] is False
    loss_of(b, data[3]).backward()
    assert all(p.grad is not None for p in b.parameters())  # backward only accumulates now
    b.zero_grad()
    train(a, oa, data[3:])
    train(b, ob, data[3:])
    assert_same_params(a, b)


def test_switching_a_group_on_later_hooks_it_at_the_next_step():
    a, b = make_model(), make_model()
    oa = AdaBelief(a.parameters(), lr=3e-2)
    ob = AdaBelief(b.parameters(), lr=3e-2)
    data = batches()
    train(a, oa, data[:2])
    train(b, ob, data[:2])
    ob.param_groups[0]["step_in_backward"] = True
    train(a, oa, data[2:])
    train(b, ob, data[2:])
    assert_same_params(a, b)
    assert all(p.grad is None for p in b.parameters())


def test_hooks_do_not_keep_the_optimizer_alive_and_leave_with_it():
    model = make_model()
    optimizer = AdaBelief(model.parameters(), step_in_backward=True)
    assert all(len(p._post_accumulate_grad_hooks) == 1 for p in model.parameters())
    ref = weakref.ref(optimizer)
    del optimizer
    gc.collect()
    assert ref() is None
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())
    loss_of(model, batches(1)[0]).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_load_state_dict_keeps_the_hooks_and_their_order():
    """A user hook registered after the optimizer's stays after it across load_state_dict."""
    model = make_model()
    optimizer = AdaBelief(model.parameters(), step_in_backward=True)
    seen: list[bool] = []
    model[0].weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad is None))
    train(model, optimizer, batches(1))
    optimizer.load_state_dict(optimizer.state_dict())
    train(model, optimizer, batches(2)[1:])
    assert seen == [True, True]  # it ran after the step had released the gradient


# ---- per-parameter clipping, the alternative to global clipping -------------------------------


def test_per_parameter_clipping_in_a_hook_registered_before_the_optimizer():
    """Hooks run in registration order: one registered before the optimizer clips the gradient
    it steps with. The same as clipping each parameter's gradient before an ordinary step."""
    max_norm = 0.05
    a, b = make_model(), make_model()

    def clip(p: Tensor) -> None:  # a post-accumulate-grad hook returns None
        torch.nn.utils.clip_grad_norm_([p], max_norm)

    for p in b.parameters():
        p.register_post_accumulate_grad_hook(clip)
    oa = AdaBelief(a.parameters(), lr=3e-2)
    ob = AdaBelief(b.parameters(), lr=3e-2, step_in_backward=True)
    for batch in batches():
        oa.zero_grad()
        loss_of(a, batch).backward()
        for p in a.parameters():
            torch.nn.utils.clip_grad_norm_([p], max_norm)
        oa.step()
        train(b, ob, [batch])
    assert_same_params(a, b)


# ---- refused: options, GradScaler, gradients written after the step ---------------------------


def test_step_in_backward_is_validated():
    p = [nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match=r"Invalid step_in_backward: 'yes'"):
        AdaBelief(p, step_in_backward="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="differentiable=True"):
        AdaBelief(p, step_in_backward=True, differentiable=True)
    optimizer = AdaBelief(p, differentiable=True)
    with pytest.raises(ValueError, match="differentiable=True"):
        optimizer.add_param_group(
            {"params": [nn.Parameter(torch.zeros(2))], "step_in_backward": True}
        )


@pytest.mark.parametrize("unscale_first", [False, True], ids=["step", "unscale_then_step"])
def test_grad_scaler_is_refused(unscale_first):
    model = make_model()
    optimizer = AdaBelief(model.parameters(), step_in_backward=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(loss_of(model, batches(1)[0])).backward()
    if unscale_first:
        scaler.unscale_(optimizer)
    with pytest.raises(StepInBackwardError, match="cannot be used with GradScaler"):
        scaler.step(optimizer)


def test_a_gradient_written_after_the_step_is_refused_at_the_end_of_backward():
    """As DDP's reducer does: a later hook writes the gradient back after the step."""
    model = make_model()
    optimizer = AdaBelief(model.parameters(), step_in_backward=True)
    weight = model[0].weight

    def write_back(p: Tensor) -> None:
        p.grad = torch.zeros_like(p)

    weight.register_post_accumulate_grad_hook(write_back)
    with pytest.raises(StepInBackwardError, match="DistributedDataParallel"):
        loss_of(model, batches(1)[0]).backward()
    with pytest.raises(StepInBackwardError, match="after backward had stepped it"):
        optimizer.step()


def test_a_gradient_assigned_by_hand_is_refused_by_step():
    model = make_model()
    optimizer = AdaBelief(model.parameters(), step_in_backward=True)
    train(model, optimizer, batches(1))
    model[2].bias.grad = torch.ones_like(model[2].bias)
    with pytest.raises(StepInBackwardError, match="shape \\(4,\\)"):
        optimizer.step()


def test_gradients_read_after_backward_are_none():
    """Documented: global gradient-norm clipping sees no gradient (there is none to clip)."""
    model = make_model()
    optimizer = AdaBelief(model.parameters(), step_in_backward=True)
    loss_of(model, batches(1)[0]).backward()
    assert all(p.grad is None for p in model.parameters())
    assert optimizer.state[model[0].weight]["step"] == 1
    assert float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)) == 0.0


# ---- one step per optimizer step: several backward passes, nested backward passes -------------


def steps_of(optimizer: torch.optim.Optimizer) -> list[int]:
    return [int(state["step"]) for state in optimizer.state.values()]


def test_a_second_backward_before_step_is_refused_before_it_steps():
    """loss.backward(retain_graph=True); loss.backward(); step(): an ordinary optimizer steps
    once on the sum; the in-backward one refuses the second pass before stepping again."""
    a, oa, b, ob = pair({})
    batch = batches(1)[0]
    oa.zero_grad()
    loss_of(a, batch).backward()
    oa.step()  # the first backward's step, which the in-backward optimizer has taken too
    ob.zero_grad()
    loss = loss_of(b, batch)
    loss.backward(retain_graph=True)
    with pytest.raises(
        StepInBackwardError,
        match=r'second backward pass reached a parameter .*\]\["params"\]\[3\] of',
    ):
        loss.backward()
    assert steps_of(ob) == [1, 1, 1, 1]
    assert_same_params(a, b)


def test_accumulation_without_accumulating_is_refused_at_the_second_micro_batch():
    """Two micro-batches per step() (a Trainer's gradient accumulation): refused at the second
    backward, whose message names accumulating() and step()."""
    model = make_model()
    optimizer = AdaBelief(model.parameters(), step_in_backward=True)
    for round_ in range(2):
        optimizer.zero_grad()
        loss_of(model, batches(1)[0]).backward()
        with pytest.raises(StepInBackwardError, match=r"accumulating\(\).*optimizer\.step\(\)"):
            loss_of(model, batches(1)[0]).backward()
        assert steps_of(optimizer) == [round_ + 1] * 4
        optimizer.zero_grad()  # drops what the refused backward accumulated
        optimizer.step()


def test_a_loop_without_step_is_refused_at_its_second_backward():
    model = make_model()
    optimizer = AdaBelief(model.parameters(), step_in_backward=True)
    loss_of(model, batches(1)[0]).backward()
    with pytest.raises(StepInBackwardError, match="once per training step"):
        loss_of(model, batches(1)[0]).backward()
    assert steps_of(optimizer) == [1] * 4


@pytest.mark.parametrize("boundary", ["step", "zero_grad"])
def test_step_or_zero_grad_ends_the_optimizer_step(boundary):
    """Either call lets every parameter step once more: the torch.optim loop, and a loop that
    only calls zero_grad(), train as the ordinary loop with step()."""
    a, oa, b, ob = pair({})
    for batch in batches():
        train(a, oa, [batch])
        loss_of(b, batch).backward()
        getattr(ob, boundary)()
    assert_same_params(a, b)
    assert steps_of(ob) == [STEPS] * 4


def test_a_closure_backward_after_a_backward_outside_step_is_refused():
    """Lightning's accumulation: the first micro-batch's backward runs outside step(), the
    last one's inside step(closure); the window ends only when step() returns."""
    model = make_model()
    optimizer = AdaBelief(model.parameters(), step_in_backward=True)
    optimizer.zero_grad()
    loss_of(model, batches(1)[0]).backward()

    def closure() -> Tensor:
        loss = loss_of(model, batches(1)[0])
        loss.backward()
        return loss

    with pytest.raises(StepInBackwardError, match="second backward pass"):
        optimizer.step(closure)
    assert steps_of(optimizer) == [1] * 4


def _shared_layer_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 2))


def _checkpointed_loss(
    model: nn.Sequential, x: Tensor, reentrant: bool | None, outside: bool = True
) -> Tensor:
    """The middle layer applied three times (each in its own checkpoint if ``reentrant`` is
    not None), and once more outside any checkpoint if ``outside``."""
    h = torch.tanh(model[0](x))
    for _ in range(3):
        if reentrant is None:
            h = torch.tanh(model[1](h))
        else:
            h = torch.utils.checkpoint.checkpoint(
                lambda t: torch.tanh(model[1](t)), h, use_reentrant=reentrant
            )
    return model[2](model[1](h) if outside else h).square().mean()


def test_non_reentrant_checkpointing_matches_ordinary_training():
    """A layer applied in three checkpoints and once outside them: one step per iteration,
    bit-identical to ordinary training without checkpointing."""
    a, b = _shared_layer_model(), _shared_layer_model()
    oa = AdaBelief(a.parameters(), lr=3e-2)
    ob = AdaBelief(b.parameters(), lr=3e-2, step_in_backward=True)
    g = torch.Generator().manual_seed(2)
    for _ in range(4):
        x = torch.randn(4, 8, generator=g)
        oa.zero_grad()
        _checkpointed_loss(a, x, None).backward()
        oa.step()
        ob.zero_grad()
        _checkpointed_loss(b, x, False).backward()
        ob.step()
    assert_same_params(a, b)
    assert_same_state(oa, ob)
    assert steps_of(ob) == [4] * 6


@pytest.mark.parametrize("outside", [False, True], ids=["inside_only", "inside_and_outside"])
def test_reentrant_checkpointing_is_refused_before_a_second_step(outside):
    """Each reentrant checkpoint runs its own backward, holding a part of the gradient: the
    shared layer would step once per checkpoint (and once more for its use outside them).
    Refused at the first such backward: a layer used only inside checkpoints has not stepped;
    one used outside them too may have stepped once, on the outer part of its gradient."""
    model = _shared_layer_model()
    shared = list(model[1].parameters())
    optimizer = AdaBelief(model.parameters(), step_in_backward=True)
    with pytest.raises(StepInBackwardError, match=r"reentrant .*use_reentrant=False"):
        _checkpointed_loss(model, torch.randn(4, 8), True, outside).backward()
    steps = {int(optimizer.state[p]["step"]) for p in shared}
    assert steps == ({0, 1} & steps if outside else {0}) and steps


def test_step_after_a_refused_backward_names_the_refusal_not_ddp():
    """The refused backward left a gradient on the shared layer (its checkpointed part): step()
    names that refusal, not a gradient written after the step as DDP writes one; after
    zero_grad() ordinary training goes on."""
    model = _shared_layer_model()
    optimizer = AdaBelief(model.parameters(), step_in_backward=True)
    with pytest.raises(StepInBackwardError, match=r"reentrant"):
        _checkpointed_loss(model, torch.randn(4, 8), True).backward()
    assert any(p.grad is not None for p in model[1].parameters())
    with pytest.raises(StepInBackwardError, match=r"left by the backward that was refused") as info:
        optimizer.step()
    assert "DistributedDataParallel" not in str(info.value)
    assert "use_reentrant=False" in str(info.value)
    optimizer.zero_grad()
    before = steps_of(optimizer)
    _checkpointed_loss(model, torch.randn(4, 8), None).backward()
    optimizer.step()
    assert steps_of(optimizer) == [n + 1 for n in before]


def test_a_backward_run_inside_a_custom_backward_is_refused():
    layer = nn.Linear(3, 3)
    optimizer = AdaBelief(layer.parameters(), step_in_backward=True)

    class Reentrant(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Tensor) -> Tensor:
            return x.clone()

        @staticmethod
        def backward(ctx: Any, grad: Tensor) -> Tensor:
            with torch.enable_grad():
                layer(grad.detach()).sum().backward()
            return grad

    x = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(StepInBackwardError, match=r"autograd Function .*Reentrant"):
        Reentrant.apply(x).sum().backward()
    assert steps_of(optimizer) == [0, 0]


# ---- one in-backward optimizer per parameter --------------------------------------------------


def test_a_second_in_backward_optimizer_on_a_parameter_is_refused_before_any_step():
    model = make_model()
    first = AdaBelief(model.parameters(), step_in_backward=True)
    second = AdaBelief(model[2].parameters(), step_in_backward=True)
    named = r'shape \(4,\) \(param_groups\[0\]\["params"\]\[3\] of this optimizer\)'
    with pytest.raises(StepInBackwardError, match=named + " is stepped in backward by two"):
        loss_of(model, batches(1)[0]).backward()
    assert all(int(s["step"]) == 0 for s in second.state.values())
    assert int(first.state[model[2].bias]["step"]) == 0
    first.remove_backward_hooks()  # the way out the message names
    train(model, second, batches(2))
    assert steps_of(second) == [2, 2]


def test_deleting_the_first_in_backward_optimizer_lets_the_second_step():
    model = make_model()
    first = AdaBelief(model.parameters(), step_in_backward=True)
    second = AdaBelief(model.parameters(), step_in_backward=True)
    first.cycle = first  # held by a reference cycle only: freed by the collection
    del first
    train(model, second, batches(2))
    assert steps_of(second) == [2] * 4


def test_rebinding_the_variable_to_a_new_in_backward_optimizer_keeps_working():
    """optimizer = AdaBelief(...) again frees the old optimizer and its hooks: the new one
    trains as a fresh ordinary AdaBelief would from there."""
    a, oa, b, ob = pair({})
    data = batches()
    train(a, oa, data[:3])
    train(b, ob, data[:3])
    oa = AdaBelief(a.parameters(), lr=3e-2)
    ob = AdaBelief(b.parameters(), lr=3e-2, step_in_backward=True)
    train(a, oa, data[3:])
    train(b, ob, data[3:])
    assert_same_params(a, b)
    assert_same_state(oa, ob)


def test_an_ordinary_adabelief_sharing_an_in_backward_parameter_is_refused():
    """The in-backward optimizer releases the gradient in backward: the ordinary one's step()
    would silently do nothing for that parameter."""
    model = make_model()
    in_backward = AdaBelief(model[0].parameters(), step_in_backward=True)
    ordinary = AdaBelief(model.parameters())
    loss_of(model, batches(1)[0]).backward()
    with pytest.raises(StepInBackwardError, match=r"shape \(96, 64\) .*also stepped in backward"):
        ordinary.step()
    in_backward.remove_backward_hooks()
    ordinary.zero_grad()
    train(model, ordinary, batches(1))
    assert steps_of(ordinary) == [1] * 4


# ---- FSDP2 works, DDP is refused: two gloo ranks running this file ----------------------------

WORLD_SIZE = 2
WORKER_TIMEOUT_S = 180


def _distributed_unavailable() -> str | None:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        return "torch.distributed with gloo is not available in this build of torch"
    return None


def _fsdp_model() -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for layer in (model[0], model[2]):
        fully_shard(layer)
    return fully_shard(model)


def _full(t: Tensor) -> Tensor:
    full = getattr(t, "full_tensor", None)
    return (full() if callable(full) else t).detach().clone()


def _worker(rank: int, store: Path, out: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=60),
    )
    results: dict[str, Any] = {}
    # Each rank trains on its half of the same global batches.
    data = [(x.chunk(WORLD_SIZE)[rank], y.chunk(WORLD_SIZE)[rank]) for x, y in batches()]
    for step_in_backward in (False, True):
        model = _fsdp_model()
        optimizer = AdaBelief(model.parameters(), lr=3e-2, step_in_backward=step_in_backward)
        train(model, optimizer, data)
        results[f"fsdp/{step_in_backward}"] = [_full(p) for p in model.parameters()]
        results[f"fsdp_grads/{step_in_backward}"] = [p.grad is None for p in model.parameters()]
    ddp = nn.parallel.DistributedDataParallel(make_model())
    optimizer = AdaBelief(ddp.parameters(), lr=3e-2, step_in_backward=True)
    try:
        loss_of(ddp, data[0]).backward()
        results["ddp"] = "backward raised no error"
    except StepInBackwardError as error:
        results["ddp"] = str(error)
    try:
        optimizer.step()  # DDP's reducer left its gradients in .grad
        results["ddp_step"] = "step raised no error"
    except StepInBackwardError as error:
        results["ddp_step"] = str(error)
    dist.barrier()
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    reason = _distributed_unavailable()
    if reason is not None:
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("step_in_backward_dist")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    package_root = str(Path(adabelief.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    if sys.platform.startswith("linux") and Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    logs = [workdir / f"rank{rank}.log" for rank in range(WORLD_SIZE)]
    processes = []
    for rank in range(WORLD_SIZE):
        command = [sys.executable, __file__, f"--rank={rank}", f"--store={workdir / 'store'}",
                   f"--out={workdir}"]  # fmt: skip
        with open(logs[rank], "wb") as log:
            processes.append(
                subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            )
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    for process in processes:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            pass
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()
    if any(process.returncode != 0 for process in processes):
        tails = "\n".join(log.read_text(errors="replace")[-3000:] for log in logs)
        pytest.fail(f"a rank failed or ran past {WORKER_TIMEOUT_S} s:\n{tails}")
    return [torch.load(workdir / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]


def test_fsdp2_steps_in_backward_on_the_reduced_gradients(distributed_results):
    """FSDP2 runs the hooks of its sharded parameters after the reduce-scatter: the in-backward
    step sees the same reduced gradient as the ordinary one, so the results are bit-identical."""
    for results in distributed_results:
        for ordinary, in_backward in zip(results["fsdp/False"], results["fsdp/True"], strict=True):
            assert torch.equal(ordinary, in_backward)
        assert all(results["fsdp_grads/True"])
        assert not any(results["fsdp_grads/False"])  # the ordinary loop's grads, kept
    assert not torch.equal(distributed_results[0]["fsdp/True"][0], make_model()[0].weight)


def test_ddp_is_refused_at_the_end_of_the_first_backward(distributed_results):
    for results in distributed_results:
        assert "DistributedDataParallel" in results["ddp"]
        assert "FSDP2" in results["ddp"]
        assert "DistributedDataParallel" in results["ddp_step"]  # and if one catches that error


def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    _worker(args.rank, args.store, args.out)


if __name__ == "__main__":
    _main(sys.argv[1:])
