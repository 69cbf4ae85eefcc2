"""``torch.compile`` of steps that call ``AdaBelief.step``: same numbers as eager, and no
recompilation when a tensor learning rate is changed by a scheduler."""

from __future__ import annotations

import pytest
import torch

from adabelief import AdaBelief
from reference import PATHS, path_options

# Compilation on CPU is slow: the "eager"/"aot_eager" backends cover the tracing, one test
# (marked slow) covers inductor. Dynamo's UserWarnings (e.g. about the profiler) are noise here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class CountingBackend:
    """A dynamo backend that counts compilations and runs the captured graph eagerly."""

    def __init__(self):
        self.compiles = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        return gm.forward


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def batch(step):
    gen = torch.Generator().manual_seed(step)
    return torch.randn(32, 5, generator=gen), torch.randn(32, 1, generator=gen)


def assert_close_runs(model_a, opt_a, model_b, opt_b, atol=1e-6, rtol=1e-5):
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
        for key, value in opt_a.state[a].items():
            torch.testing.assert_close(value, opt_b.state[b][key], atol=atol, rtol=rtol, msg=key)


def run(options, steps, compile_backend=None, scheduler=None):
    model = make_model()
    opt = AdaBelief(model.parameters(), **options)
    sched = scheduler(opt) if scheduler else None

    def train_step(x, y):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    step_fn = torch.compile(train_step, backend=compile_backend) if compile_backend else train_step
    for k in range(steps):
        step_fn(*batch(k))
        if sched is not None:
            sched.step()
    return model, opt


CASES = [
    ("aot_eager", "single", dict(lr=torch.tensor(0.01))),
    ("aot_eager", "foreach", dict(lr=torch.tensor(0.01), amsgrad=True, weight_decay=0.1)),
    ("eager", "single", dict(lr=0.01, weight_decay=0.1, weight_decouple=False, amsgrad=True)),
    (
        "eager",
        "foreach",
        dict(lr=0.01, rectify=False, maximize=True, fixed_decay=True, weight_decay=0.1),
    ),
    ("eager", "single", dict(lr=0.01, betas=(0.9, 0.9999), degenerated_to_sgd=False)),
]


@pytest.mark.parametrize(("backend", "path", "options"), CASES)
def test_compiled_training_step_matches_eager(backend, path, options):
    # Default betas: the rectified update turns adaptive at step 6 of 12, where the rectifier
    # is most sensitive to rounding in 1 - beta2**t.
    options = dict(options, **path_options(path))
    eager = run(options, steps=12)
    compiled = run(options, steps=12, compile_backend=backend)
    assert_close_runs(*eager, *compiled)


@pytest.mark.parametrize("path", PATHS)
def test_tensor_lr_schedule_does_not_recompile(path):
    def scheduler(opt):
        return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)

    options = dict(lr=torch.tensor(0.02), betas=(0.9, 0.99), **path_options(path))
    backend = CountingBackend()
    model = make_model()
    opt = AdaBelief(model.parameters(), **options)
    sched = scheduler(opt)
    compiled_step = torch.compile(opt.step, backend=backend)
    lrs = []
    for k in range(8):
        x, y = batch(k)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        compiled_step()
        lrs.append(opt.param_groups[0]["lr"].item())
        sched.step()
    assert len(set(lrs)) == 8, "the learning rate changed at every step"
    assert backend.compiles == 1, f"{backend.compiles} compilations for 8 steps"
    eager = run(dict(options, lr=torch.tensor(0.02)), steps=8, scheduler=scheduler)
    assert_close_runs(*eager, model, opt)


def test_float_lr_change_is_seen_by_the_compile_counter():
    """Control for the test above: the counter does see recompilations (a float lr is a guarded
    constant), so a count of 1 there is meaningful."""
    backend = CountingBackend()
    p = torch.randn(4, requires_grad=True)
    opt = AdaBelief([p], lr=0.1)
    compiled_step = torch.compile(opt.step, backend=backend)
    for lr in (0.1, 0.05):
        opt.param_groups[0]["lr"] = lr
        p.grad = torch.ones(4)
        compiled_step()
    assert backend.compiles >= 2


@pytest.mark.slow
def test_inductor_matches_eager():
    options = dict(lr=torch.tensor(0.01), amsgrad=True, weight_decay=0.1)
    model = make_model()
    opt = AdaBelief(model.parameters(), **options)
    compiled_step = torch.compile(opt.step)
    for k in range(10):
        x, y = batch(k)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        compiled_step()
    eager = run(dict(options, lr=torch.tensor(0.01)), steps=10)
    assert_close_runs(*eager, model, opt)
