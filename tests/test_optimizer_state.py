"""Optimizer state: its layout, checkpoints (``torch.save`` / ``torch.load(weights_only=True)``)
on and across paths, 16-bit state, loading the official package's and Adam's state_dicts, and
``GradScaler`` skipping inf/NaN steps."""

from __future__ import annotations

import io

import pytest
import torch

from adabelief import AdaBelief
from reference import PATHS, path_options

F64 = torch.float64
SAVE_LOAD = [(a, b) for a in PATHS for b in PATHS]


def round_trip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def set_path(opt, path):
    for group in opt.param_groups:
        group.update(path_options(path))


def make_model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(
        dtype
    )


def data(step, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 4, generator=gen).to(dtype), torch.randn(16, 2, generator=gen).to(dtype)


def train_steps(model, opt, steps):
    for k in steps:
        x, y = data(k, next(model.parameters()).dtype)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x).float(), y.float()).backward()
        opt.step()


def assert_state_equal(opt_a, params_a, opt_b, params_b):
    for a, b in zip(params_a, params_b, strict=True):
        assert torch.equal(a, b)
        state_a, state_b = opt_a.state[a], opt_b.state[b]
        assert sorted(state_a) == sorted(state_b)
        for key in state_a:
            assert state_a[key].dtype == state_b[key].dtype, key
            assert torch.equal(state_a[key], state_b[key]), key


# --- Layout ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_state_layout(path, amsgrad, dtype):
    used = torch.randn(3, 2, dtype=dtype, requires_grad=True)
    unused = torch.randn(4, dtype=dtype, requires_grad=True)
    opt = AdaBelief([used, unused], amsgrad=amsgrad, **path_options(path))
    for _ in range(3):
        used.grad = torch.randn(3, 2, dtype=dtype)
        opt.step()
    state = opt.state[used]
    expected = {"step", "exp_avg", "exp_avg_var"} | ({"max_exp_avg_var"} if amsgrad else set())
    assert set(state) == expected
    step = state["step"]
    assert isinstance(step, torch.Tensor) and step.dim() == 0 and step.is_floating_point()
    assert step.item() == 3 and step.device.type == "cpu"
    for key in expected - {"step"}:
        assert state[key].shape == used.shape and state[key].dtype == dtype, key
    assert (state["exp_avg_var"] > 0).all()
    assert len(opt.state.get(unused, {})) == 0, "no state for a parameter never given a grad"
    saved = opt.state_dict()
    assert list(saved["state"]) == [0]
    assert saved["param_groups"][0]["params"] == [0, 1]


def test_amsgrad_switched_on_later_creates_its_maximum():
    p = torch.randn(5, dtype=F64, requires_grad=True)
    opt = AdaBelief([p], betas=(0.9, 0.9))
    p.grad = torch.randn(5, dtype=F64)
    opt.step()
    assert "max_exp_avg_var" not in opt.state[p]
    opt.param_groups[0]["amsgrad"] = True
    p.grad = torch.randn(5, dtype=F64)
    opt.step()
    state = opt.state[p]
    assert torch.equal(state["max_exp_avg_var"], state["exp_avg_var"])


# --- Checkpoints --------------------------------------------------------------------------------


@pytest.mark.parametrize(("save_path", "load_path"), SAVE_LOAD)
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(amsgrad=True, weight_decay=0.1, weight_decouple=False),
        dict(lr=torch.tensor(0.01)),
    ],
    ids=["default", "amsgrad-l2", "tensor-lr"],
)
def test_resume_from_checkpoint_is_bit_identical(save_path, load_path, options):
    """Save after 3 steps (still in the rectified warm-up with beta2=0.9), load into a fresh
    model and optimizer, continue: identical to a run that never stopped (and that switched to
    the load path at the same step)."""
    options = dict(dict(lr=0.01, betas=(0.9, 0.9)), **options)

    def fresh_options():  # a tensor lr must not be shared between the two optimizers
        return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in options.items()}

    model = make_model()
    opt = AdaBelief(model.parameters(), **path_options(save_path), **fresh_options())
    train_steps(model, opt, range(3))
    checkpoint = round_trip({"model": model.state_dict(), "optimizer": opt.state_dict()})

    set_path(opt, load_path)
    train_steps(model, opt, range(3, 10))

    resumed_model = make_model()
    with torch.no_grad():  # make sure the weights really come from the checkpoint
        for p in resumed_model.parameters():
            p.add_(1.0)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = AdaBelief(resumed_model.parameters(), **path_options(load_path), **fresh_options())
    resumed.load_state_dict(checkpoint["optimizer"])
    assert resumed.state[next(resumed_model.parameters())]["step"].item() == 3
    train_steps(resumed_model, resumed, range(3, 10))
    assert_state_equal(opt, list(model.parameters()), resumed, list(resumed_model.parameters()))


def test_state_dict_keeps_per_group_options():
    """Options saved with a group win over the options of the optimizer loaded into."""

    def grouped(model, with_options=False):
        weights = {"params": [model[0].weight, model[2].weight]}
        biases = {"params": [model[0].bias, model[2].bias]}
        if with_options:
            weights.update(weight_decay=0.2, rectify=False)
            biases.update(amsgrad=True, lr=0.05, betas=(0.5, 0.9), maximize=True)
        return [weights, biases]

    model = make_model(F64)
    opt = AdaBelief(grouped(model, with_options=True), lr=0.01)
    train_steps(model, opt, range(4))
    checkpoint = round_trip({"model": model.state_dict(), "optimizer": opt.state_dict()})
    train_steps(model, opt, range(4, 9))

    other = make_model(F64)
    other.load_state_dict(checkpoint["model"])
    other_opt = AdaBelief(grouped(other))  # constructed with the defaults only
    other_opt.load_state_dict(checkpoint["optimizer"])
    for group, expected in zip(other_opt.param_groups, opt.param_groups, strict=True):
        for key, value in expected.items():
            if key != "params":
                assert group[key] == value, key
    train_steps(other, other_opt, range(4, 9))
    assert_state_equal(opt, list(model.parameters()), other_opt, list(other.parameters()))


@pytest.mark.parametrize("path", PATHS)
def test_state_dict_with_python_number_step_loads(path):
    """Older checkpoints keep ``step`` as a Python number (as the official package does)."""
    p = torch.randn(4, dtype=F64, requires_grad=True)
    opt = AdaBelief([p], betas=(0.9, 0.9), **path_options(path))
    grads = [torch.randn(4, dtype=F64) for _ in range(8)]
    for g in grads[:3]:
        p.grad = g.clone()
        opt.step()
    saved = opt.state_dict()
    saved["state"][0] = dict(saved["state"][0], step=3)
    q = p.detach().clone().requires_grad_()
    loaded = AdaBelief([q], betas=(0.9, 0.9), **path_options(path))
    loaded.load_state_dict(round_trip(saved))
    assert isinstance(loaded.state[q]["step"], torch.Tensor)
    for g in grads[3:]:
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        loaded.step()
    assert torch.equal(p, q)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_state_survives_round_trip_in_float32(path, dtype):
    model = make_model(dtype)
    opt = AdaBelief(model.parameters(), lr=0.01, amsgrad=True, **path_options(path))
    train_steps(model, opt, range(4))
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_var", "max_exp_avg_var"):
            assert opt.state[p][key].dtype == torch.float32
    checkpoint = round_trip({"model": model.state_dict(), "optimizer": opt.state_dict()})
    train_steps(model, opt, range(4, 9))

    resumed_model = make_model(dtype)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = AdaBelief(resumed_model.parameters(), lr=0.01, amsgrad=True, **path_options(path))
    resumed.load_state_dict(checkpoint["optimizer"])
    for i, p in enumerate(resumed_model.parameters()):
        for key in ("exp_avg", "exp_avg_var", "max_exp_avg_var"):
            state = resumed.state[p][key]
            assert state.dtype == torch.float32, key
            assert torch.equal(state, checkpoint["optimizer"]["state"][i][key]), key
            # A copy, not a view into the loaded dict.
            assert state.data_ptr() != checkpoint["optimizer"]["state"][i][key].data_ptr()
    train_steps(resumed_model, resumed, range(4, 9))
    assert_state_equal(opt, list(model.parameters()), resumed, list(resumed_model.parameters()))


# --- Other optimizers' state_dicts -------------------------------------------------------------

#: Settings on which the official package and this one agree (not rectify with amsgrad).
OFFICIAL_SETTINGS = [
    dict(),
    dict(rectify=False),
    dict(rectify=False, amsgrad=True, weight_decay=0.1),
    dict(weight_decay=0.1, weight_decouple=False),
    dict(weight_decay=0.3, fixed_decay=True, degenerated_to_sgd=False),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("settings", OFFICIAL_SETTINGS, ids=lambda s: "-".join(s) or "default")
def test_official_state_dict_continues_like_official(official_adabelief, settings, path):
    options = dict(dict(lr=0.05, betas=(0.9, 0.9), eps=1e-8), **settings)
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (4,)]
    theirs = [torch.randn(s, dtype=F64, generator=gen).requires_grad_() for s in shapes]
    grads = [[torch.randn(s, dtype=F64, generator=gen) for s in shapes] for _ in range(12)]
    official = official_adabelief(theirs, **options)

    def official_step(step_grads):
        for q, g in zip(theirs, step_grads, strict=True):
            q.grad = g.clone()
        official.step()

    for step_grads in grads[:3]:  # stop in the warm-up; the loaded run crosses it
        official_step(step_grads)
    saved = round_trip(official.state_dict())
    assert "buffer" in saved["param_groups"][0] and saved["state"][0]["step"] == 3

    ours = [q.detach().clone().requires_grad_() for q in theirs]
    opt = AdaBelief(ours, **path_options(path), **options)
    opt.load_state_dict(saved)
    group = opt.param_groups[0]
    assert "buffer" not in group
    for key in opt.defaults:
        assert key in group, key
    for p in ours:
        assert isinstance(opt.state[p]["step"], torch.Tensor)
        assert opt.state[p]["step"].dim() == 0 and opt.state[p]["step"].item() == 3

    for step_grads in grads[3:]:
        official_step(step_grads)
        for p, g in zip(ours, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14)
        assert opt.state[p]["step"].item() == official.state[q]["step"] == 12
        for key, value in official.state[q].items():
            if key != "step":
                torch.testing.assert_close(opt.state[p][key], value, rtol=1e-12, atol=1e-14)


def test_official_float16_state_dict_keeps_float32_state(official_adabelief):
    p = torch.randn(6).half().requires_grad_()
    official = official_adabelief([p], lr=0.01)
    p.grad = torch.randn(6).half()
    official.step()
    saved = round_trip(official.state_dict())
    assert saved["state"][0]["exp_avg"].dtype == torch.float32
    q = p.detach().clone().requires_grad_()
    opt = AdaBelief([q], lr=0.01)
    opt.load_state_dict(saved)
    for key in ("exp_avg", "exp_avg_var"):
        assert opt.state[q][key].dtype == torch.float32
        assert torch.equal(opt.state[q][key], saved["state"][0][key])


@pytest.mark.parametrize("adam", [torch.optim.Adam, torch.optim.AdamW])
def test_adam_state_dict_is_refused(adam):
    p = torch.randn(3, requires_grad=True)
    other = adam([p])
    p.grad = torch.randn(3)
    other.step()
    q = p.detach().clone().requires_grad_()
    opt = AdaBelief([q])
    with pytest.raises(ValueError) as info:
        opt.load_state_dict(round_trip(other.state_dict()))
    message = str(info.value)
    assert "exp_avg_var" in message and "Adam" in message, message
    assert len(opt.state) == 0, "a refused state_dict leaves the optimizer untouched"
    assert "exp_avg_sq" not in opt.param_groups[0]
    q.grad = torch.ones(3)
    opt.step()


def test_state_dict_with_wrong_number_of_groups_is_refused():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    two = AdaBelief([{"params": [a]}, {"params": [b]}])
    one = AdaBelief([a, b])
    with pytest.raises(ValueError, match="group"):
        one.load_state_dict(two.state_dict())


@pytest.mark.parametrize(
    ("saved_precision", "precision"),
    [("fp32", "fp32"), ("int8", "int8"), ("int4", "int4"), ("fp32", "int8"), ("bf16", "fp32")],
)
def test_state_dict_of_another_model_is_refused_before_anything_changes(saved_precision, precision):
    """Moments saved for a (64, 64) weight loaded into a (128, 64) one: a ValueError naming the
    parameter and both shapes, and the optimizer keeps its own state. Before, it loaded, and the
    fused kernel then read and wrote past the saved tensors (heap corruption, a glibc abort)."""
    small, large = torch.randn(64, 64), torch.randn(128, 64)
    saved_opt = AdaBelief([torch.nn.Parameter(small)], state_precision=saved_precision)
    saved_opt.param_groups[0]["params"][0].grad = torch.randn(64, 64)
    saved_opt.step()
    param = torch.nn.Parameter(large.clone())
    opt = AdaBelief([param], state_precision=precision)
    param.grad = torch.randn(128, 64)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[param].items()}
    with pytest.raises(ValueError, match=r"parameter 0 .*\(128, 64\)") as info:
        opt.load_state_dict(round_trip(saved_opt.state_dict()))
    assert "another model" in str(info.value)
    assert opt.state[param].keys() == before.keys()
    assert all(torch.equal(opt.state[param][k], v) for k, v in before.items())
    opt.step()  # still usable


# --- GradScaler -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_grad_scaler_skips_non_finite_steps(path, bad):
    """With ``torch.amp.GradScaler("cpu")`` a step whose gradients hold inf/NaN changes neither
    the parameters nor the state; finite steps equal unscaled ones exactly (power-of-2 scale)."""
    model, plain_model = make_model(), make_model()
    opt = AdaBelief(model.parameters(), lr=0.01, amsgrad=True, **path_options(path))
    plain = AdaBelief(plain_model.parameters(), lr=0.01, amsgrad=True, **path_options(path))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    assert scaler.is_enabled()
    for k in range(6):
        x, y = data(k)
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        poisoned = k in (0, 3)
        if poisoned:
            model[0].weight.grad[0, 0] = bad
        params_before = [p.detach().clone() for p in model.parameters()]
        state_before = {
            i: {key: v.clone() for key, v in opt.state[p].items()}
            for i, p in enumerate(model.parameters())
        }
        scale_before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if poisoned:
            assert scaler.get_scale() == scale_before / 2
            for p, before in zip(model.parameters(), params_before, strict=True):
                assert torch.equal(p, before)
            for i, p in enumerate(model.parameters()):
                assert sorted(opt.state.get(p, {})) == sorted(state_before[i])
                for key, value in state_before[i].items():
                    assert torch.equal(opt.state[p][key], value), key
            continue
        plain.zero_grad()
        torch.nn.functional.mse_loss(plain_model(x), y).backward()
        plain.step()
        assert_state_equal(opt, list(model.parameters()), plain, list(plain_model.parameters()))
    assert opt.state[model[0].weight]["step"].item() == 4
