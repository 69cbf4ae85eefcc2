"""The fused path (``fused=True``, and the CPU default): agreement with the single-tensor path
for every option and dtype, GradScaler, learning-rate schedules without recompilation, resume,
the fallback when the kernel cannot be built, and CUDA where a device is present.

The CPU kernel is compiled (or loaded from its disk cache) once per process and serves every
option combination: the options are runtime arguments of one library. The torch.compile path
(the CUDA path) is also run on CPU tensors (``fused=True, capturable=True`` selects it), with
few variants, since each compiles for seconds.
"""

from __future__ import annotations

import copy
import itertools
import os
import subprocess
import sys
import warnings

import pytest
import torch

from adabelief import AdaBelief
from adabelief._hyper import Hyperparameters
from adabelief.compressed_state import as_moment
from adabelief.kernels import GroupTensors, cpu, dispatch, tensor_math

KERNEL = cpu.kernel()
BUILDS_AT_IMPORT = cpu.builds
needs_kernel = pytest.mark.skipif(
    KERNEL is None, reason=f"the fused CPU kernel cannot be built here: {cpu.kernel_error()}"
)
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device: the CUDA fused path (torch.compile/Triton) runs only where one is",
)

# --- helpers ----------------------------------------------------------------------------------

#: Tolerance, relative to the largest magnitude of the tensor compared: one rounding of the
#: dtype. The fused kernel takes a correctly rounded sqrt where torch's CPU sqrt (MKL) may be
#: one ulp off, so float32 results differ in the last bit now and then.
TOL = {
    torch.float32: 1e-6,
    torch.complex64: 1e-6,
    torch.float64: 1e-12,
    torch.complex128: 1e-12,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-10,
}
STATE_KEYS = ("step", "exp_avg", "exp_avg_var", "max_exp_avg_var")


def assert_agree(actual: torch.Tensor, expected: torch.Tensor, tol: float, msg: str) -> None:
    expected = expected.detach()
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual.detach(), expected, rtol=tol, atol=tol * scale, msg=msg)


def assert_same_run(params_a, opt_a, params_b, opt_b, tol: float) -> None:
    """Parameters and every state tensor (step counts exactly) agree within ``tol``."""
    for i, (a, b) in enumerate(zip(params_a, params_b, strict=True)):
        assert_agree(a, b, tol, f"param {i}")
        state_a, state_b = opt_a.state.get(a, {}), opt_b.state.get(b, {})
        assert sorted(state_a) == sorted(state_b), f"param {i}: state keys"
        for key in state_a:
            if key == "step":
                assert float(state_a[key]) == float(state_b[key]), f"param {i}: step"
            else:
                assert_agree(state_a[key], state_b[key], tol, f"param {i}: {key}")


SHAPES = [(37,), (5, 7), (3,), (2, 3, 4)]


def make_params(dtype: torch.dtype, shapes=SHAPES, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        if dtype.is_complex:
            t = torch.randn(shape, dtype=dtype, generator=gen)
        else:
            t = torch.randn(shape, dtype=torch.float64, generator=gen).to(dtype)
        out.append(torch.nn.Parameter(t))
    return out


def set_grads(params, step: int, seed: int = 1) -> None:
    """Random gradients; parameter 1 has none every third step, so step counts differ."""
    gen = torch.Generator().manual_seed(seed * 100_000 + step)
    for i, p in enumerate(params):
        if i == 1 and step % 3 == 2:
            p.grad = None
            continue
        if p.dtype.is_complex:
            p.grad = torch.randn(p.shape, dtype=p.dtype, generator=gen)
        else:
            p.grad = torch.randn(p.shape, dtype=torch.float64, generator=gen).to(p.dtype)


def run(dtype, path_options, steps=100, shapes=SHAPES, lr_schedule=None, **options):
    params = make_params(dtype, shapes)
    opt = AdaBelief(params, **path_options, **options)
    for k in range(steps):
        set_grads(params, k)
        if lr_schedule is not None:
            lr = opt.param_groups[0]["lr"]
            if isinstance(lr, torch.Tensor):
                lr.fill_(lr_schedule(k))
            else:
                opt.param_groups[0]["lr"] = lr_schedule(k)
        opt.step()
    return params, opt


SINGLE = {"foreach": False, "fused": False}
FUSED = {"fused": True}
#: The tensor-math path compiled per group (the CUDA path), here on CPU tensors.
COMPILED = {"fused": True, "capturable": True}

DECAYS = {
    "no-decay": dict(weight_decay=0.0),
    "decoupled": dict(weight_decay=0.1),
    "fixed": dict(weight_decay=0.1, fixed_decay=True),
    "l2": dict(weight_decay=0.1, weight_decouple=False),
}
RECTIFY = {
    "plain": dict(rectify=False),
    "rectified": dict(rectify=True),
    "rectified-no-sgd": dict(rectify=True, degenerated_to_sgd=False),
}
COMBOS = {
    f"{d}-{r}{'-amsgrad' if a else ''}{'-maximize' if m else ''}": dict(
        DECAYS[d], **RECTIFY[r], amsgrad=a, maximize=m
    )
    for d, r, a, m in itertools.product(DECAYS, RECTIFY, (False, True), (False, True))
}
#: Every seventh combination: each option value appears for the other dtypes.
SOME_COMBOS = dict(list(COMBOS.items())[::7])
OTHER_DTYPES = [torch.float64, torch.bfloat16, torch.float16, torch.complex64, torch.complex128]
CASES = [pytest.param(torch.float32, name, id=f"float32-{name}") for name in COMBOS] + [
    pytest.param(dtype, name, id=f"{str(dtype).split('.')[1]}-{name}")
    for dtype in OTHER_DTYPES
    for name in SOME_COMBOS
]


# --- the CPU kernel against the single-tensor path ----------------------------------------------


@needs_kernel
@pytest.mark.parametrize(("dtype", "combo"), CASES)
def test_fused_matches_single_tensor(dtype, combo):
    """100 steps, lr a float or a tensor (alternately), one parameter skipping steps."""
    options = dict(COMBOS[combo], lr=0.01, betas=(0.9, 0.999), eps=1e-16)
    if sorted(COMBOS).index(combo) % 2:
        options["lr"] = torch.tensor(0.01)
    single = run(dtype, SINGLE, **copy.deepcopy(options))
    fused = run(dtype, FUSED, **options)
    assert_same_run(*fused, *single, tol=TOL[dtype])
    assert fused[1].state[fused[0][1]]["step"].item() < 100, "parameter 1 skipped steps"
    if dtype in (torch.bfloat16, torch.float16):
        assert fused[1].state[fused[0][0]]["exp_avg"].dtype == torch.float32


@needs_kernel
def test_one_kernel_library_serves_every_option():
    """No compilation after import, whatever the options and dtypes (they are runtime
    arguments), and the kernel object is the one loaded at import."""
    for dtype, name in itertools.product((torch.float32, torch.bfloat16), list(COMBOS)[:12]):
        run(dtype, FUSED, steps=3, **COMBOS[name])
    assert cpu.builds == BUILDS_AT_IMPORT <= 1
    assert cpu.kernel() is KERNEL


@needs_kernel
def test_a_new_process_loads_the_cached_kernel():
    code = (
        "from adabelief.kernels import cpu; k = cpu.kernel(); "
        "print(k is not None, cpu.builds, k.path if k else cpu.kernel_error())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=os.environ
    )
    assert done.returncode == 0, done.stderr
    available, builds, path = done.stdout.split(maxsplit=2)
    assert (available, builds) == ("True", "0"), done.stdout
    assert path.strip() == str(KERNEL.path)


@needs_kernel
def test_parallel_kernel_matches_single_tensor():
    """Enough elements for two threads and many 32768-element chunks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        shapes = [(300_001,), (70_000,), (5,)]
        for options in (dict(), dict(amsgrad=True, weight_decay=0.1, weight_decouple=False)):
            single = run(torch.float32, SINGLE, steps=8, shapes=shapes, **options)
            fused = run(torch.float32, FUSED, steps=8, shapes=shapes, **options)
            assert_same_run(*fused, *single, tol=TOL[torch.float32])
    finally:
        torch.set_num_threads(threads)


def awkward_params(dtype=torch.float32):
    gen = torch.Generator().manual_seed(3)

    def randn(*shape):
        return torch.randn(shape, generator=gen).to(dtype)

    return [
        torch.nn.Parameter(randn(4, 6).t()),  # transposed: non-contiguous
        torch.nn.Parameter(randn(3, 8)[:, ::2]),  # strided view
        torch.nn.Parameter(randn()),  # 0-dim
        torch.nn.Parameter(torch.empty(0, 4, dtype=dtype)),  # zero-size
        torch.nn.Parameter(randn(2, 3, 4, 5).to(memory_format=torch.channels_last)),
        torch.nn.Parameter(randn(6).double()),  # another dtype in the group
        torch.nn.Parameter(randn(5).to(torch.bfloat16)),
    ]


@needs_kernel
@pytest.mark.parametrize("amsgrad", [False, True])
def test_awkward_layouts_and_mixed_dtypes(amsgrad):
    def go(path):
        params = awkward_params()
        opt = AdaBelief(params, lr=0.05, weight_decay=0.1, amsgrad=amsgrad, **path)
        for k in range(12):
            gen = torch.Generator().manual_seed(k)
            for p in params:
                g = torch.randn(p.shape, generator=gen).to(p.dtype)
                p.grad = g.t().contiguous().t() if p.dim() == 2 else g  # odd grad strides too
            opt.step()
        return params, opt

    fused, single = go(FUSED), go(SINGLE)
    for i, (a, b) in enumerate(zip(fused[0], single[0], strict=True)):
        assert a.stride() == b.stride(), "parameters are updated in place, layout kept"
        assert_agree(a, b, TOL[a.dtype], f"param {i}")
        for key in fused[1].state[a]:
            if key != "step":
                assert_agree(fused[1].state[a][key], single[1].state[b][key], TOL[a.dtype], key)


@needs_kernel
def test_step_counts_in_float64_state_are_handled():
    """A fused group whose step counts are float64 (e.g. loaded from an unfused checkpoint
    under float64 default dtype)."""
    params = make_params(torch.float32)
    opt = AdaBelief(params, fused=True)
    set_grads(params, 0)
    opt.step()
    for p in params:
        opt.state[p]["step"] = opt.state[p]["step"].double()
    set_grads(params, 1)
    opt.step()
    assert [opt.state[p]["step"].item() for p in params] == [2.0] * len(params)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("decay", [0.0, 0.3, 1e-3, -1e-4])
def test_16_bit_rounding_of_every_value(dtype, decay):
    """Every 16-bit pattern (NaNs aside) through the kernel's widening and rounding: with zero
    gradients and fixed decay the new parameter is ``round(float(p) * (1 - wd))``, as torch
    rounds it."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    values = bits.view(dtype)
    values = values[~values.isnan()]
    p = torch.nn.Parameter(values.clone())
    p.grad = torch.zeros_like(p)
    # decay < 0 (a factor above 1) pushes the largest values to infinity.
    opt = AdaBelief([p], lr=1e-3, weight_decay=max(decay, 0.0), fixed_decay=True, fused=True)
    if decay < 0:
        opt.param_groups[0]["weight_decay"] = decay  # past the constructor's check
    opt.step()
    factor = torch.tensor(1.0 - decay, dtype=torch.float64).float()
    expected = (values.float() * factor).to(dtype)
    assert torch.equal(p.detach().view(torch.int16), expected.view(torch.int16))


# --- default path -----------------------------------------------------------------------------


@needs_kernel
def test_default_path_uses_the_kernel_on_cpu(monkeypatch):
    calls = []
    original = cpu.cpu_step

    def spy(*args, **kwargs):
        calls.append(len(args[1].params))
        return original(*args, **kwargs)

    monkeypatch.setattr(cpu, "cpu_step", spy)
    params = make_params(torch.float32)
    opt = AdaBelief(params)
    set_grads(params, 0)
    opt.step()
    assert calls == [len(params)]
    assert dispatch.fused_is_default(params, opt.param_groups[0])
    assert not dispatch.fused_is_default(params, dict(opt.param_groups[0], differentiable=True))


def test_default_path_without_kernel_warns_once_why(monkeypatch):
    """The default (fused=None) loses its fast path too when the kernel cannot be built: one
    FusedFallbackWarning per process with the reason, as for fused=True, then the slower path."""
    monkeypatch.setattr(cpu, "_kernel", None)
    monkeypatch.setattr(cpu, "_kernel_error", "test: no kernel")
    monkeypatch.setattr(dispatch, "_warned", False)
    params = make_params(torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = AdaBelief(params)
        assert not dispatch.fused_is_default(params, opt.param_groups[0])
        for step in range(2):
            set_grads(params, step)
            opt.step()
        AdaBelief(make_params(torch.float32)).step()  # another optimizer: no second warning
    fallback = [w for w in caught if issubclass(w.category, dispatch.FusedFallbackWarning)]
    assert len(fallback) == 1, [str(w.message) for w in caught]
    message = str(fallback[0].message)
    assert "fused kernel is unavailable (test: no kernel)" in message and "slower" in message
    assert dispatch.choose_path(params, opt.param_groups[0]) == "single"


# --- fallback ---------------------------------------------------------------------------------


@pytest.fixture
def no_kernel(monkeypatch, tmp_path):
    """A process state in which the kernel has not been loaded and cannot be built."""
    monkeypatch.setattr(cpu, "_kernel", None)
    monkeypatch.setattr(cpu, "_kernel_error", None)
    monkeypatch.setattr(dispatch, "_warned", False)
    monkeypatch.setenv("ADABELIEF_CACHE_DIR", str(tmp_path / "empty-cache"))

    def failing_build(compiler, flags, target):
        raise OSError("test: the compiler failed")

    monkeypatch.setattr(cpu, "_build", failing_build)


def test_fallback_warns_once_and_runs_foreach(no_kernel):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = run(torch.float32, FUSED, steps=5, amsgrad=True, weight_decay=0.1)
        run(torch.float32, FUSED, steps=5)  # a second optimizer: no second warning
    fallback = [w for w in caught if issubclass(w.category, dispatch.FusedFallbackWarning)]
    assert len(fallback) == 1, [str(w.message) for w in caught]
    assert "test: the compiler failed" in str(fallback[0].message)
    assert cpu.kernel() is None
    foreach = run(torch.float32, {"foreach": True}, steps=5, amsgrad=True, weight_decay=0.1)
    assert_same_run(*fused, *foreach, tol=0.0)


def test_fallback_when_no_compiler_warns_at_construction(no_kernel, monkeypatch):
    monkeypatch.setattr(cpu, "compiler", lambda: None)
    with pytest.warns(dispatch.FusedFallbackWarning, match="no C.. compiler"):
        AdaBelief(make_params(torch.float32), fused=True)


def test_kernel_can_be_disabled_by_environment(no_kernel, monkeypatch):
    monkeypatch.setenv("ADABELIEF_DISABLE_FUSED", "1")
    assert cpu.kernel() is None
    assert "ADABELIEF_DISABLE_FUSED" in str(cpu.kernel_error())


@needs_kernel
def test_rejected_flags_are_remembered_and_the_next_set_is_cached(monkeypatch, tmp_path):
    """A flag set the compiler rejects is noted on disk; a later process goes straight to the
    library built with the next set, without running the compiler."""
    monkeypatch.setattr(cpu, "_FLAG_SETS", (("-fadabelief-no-such-flag",), ()))
    monkeypatch.setenv("ADABELIEF_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu, "_kernel", None)
    monkeypatch.setattr(cpu, "_kernel_error", None)
    kernel = cpu.kernel()
    assert kernel is not None, cpu.kernel_error()
    assert len(list(tmp_path.glob("*.failed"))) == 1
    assert len(list(tmp_path.glob("*.so"))) == 1

    def no_compiler(*args, **kwargs):
        raise AssertionError("the compiler ran again")

    monkeypatch.setattr(cpu.subprocess, "run", no_compiler)
    monkeypatch.setattr(cpu, "_kernel", None)
    assert cpu._load_kernel().path == kernel.path


# --- GradScaler -------------------------------------------------------------------------------

BACKENDS = [
    pytest.param("kernel", marks=needs_kernel),
    "fallback",
    pytest.param("compiled", marks=needs_kernel),  # inductor needs the same compiler
]


@pytest.fixture
def backend(request, monkeypatch):
    """The constructor options of the fused path named by the parameter."""
    name = request.param
    if name == "fallback":
        monkeypatch.setattr(cpu, "_kernel", None)
        monkeypatch.setattr(cpu, "_kernel_error", "test: fallback")
        monkeypatch.setattr(dispatch, "_warned", True)
    return COMPILED if name == "compiled" else FUSED


def snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def assert_unchanged(model, opt, before):
    params, state = before
    for p, q in zip(model.parameters(), params, strict=True):
        assert torch.equal(p.detach(), q)
    now = opt.state_dict()["state"]
    for index, entry in state["state"].items():
        for key, value in entry.items():
            assert torch.equal(now[index][key], value), key


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaled", "unscale_-first"])
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_grad_scaler_unscales_and_skips_inf_steps(backend, unscale_first):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    twin = copy.deepcopy(model)
    opt = AdaBelief(model.parameters(), lr=0.01, **backend)
    reference = AdaBelief(twin.parameters(), lr=0.01, **SINGLE)
    assert opt._step_supports_amp_scaling
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(8, 4)

    def scaled_step(poison: bool) -> None:
        opt.zero_grad()
        scaler.scale(model(x).square().sum()).backward()
        if poison:
            model.weight.grad[0, 0] = float("inf")
        if unscale_first:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()

    def reference_step() -> None:
        reference.zero_grad()
        twin(x).square().sum().backward()
        reference.step()

    scaled_step(poison=False)
    reference_step()
    before = snapshot(model, opt)
    scaled_step(poison=True)  # skipped: nothing changes, step counts included
    assert_unchanged(model, opt, before)
    assert scaler.get_scale() == 2.0**9
    scaled_step(poison=False)
    reference_step()
    assert [float(s["step"]) for s in opt.state.values()] == [2.0, 2.0]
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert_agree(p, q, 1e-6, "scaled vs unscaled training")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_found_inf_and_grad_scale_arguments(backend):
    """The functional contract GradScaler relies on: grads divided by ``grad_scale`` in the
    step; any nonzero ``found_inf`` skips it (torch's fused Adam skips only on exactly 1.0 and
    subtracts found_inf from its step counts; GradScaler's flag is 0 or 1 per device)."""
    params = make_params(torch.float32)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = AdaBelief(params, amsgrad=True, **backend)
    reference = AdaBelief(twins, amsgrad=True, **SINGLE)
    set_grads(params, 0)
    set_grads(twins, 0)
    for p in params:
        if p.grad is not None:
            p.grad *= 8.0
    opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(0.0)
    opt.step()
    reference.step()
    assert_same_run(params, opt, twins, reference, tol=TOL[torch.float32])
    before = [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())
    for flag in (1.0, 2.0):
        opt.found_inf = torch.tensor(flag)
        opt.step()
        assert all(torch.equal(p.detach(), q) for p, q in zip(params, before[0], strict=True))
        now = opt.state_dict()["state"]
        for index, entry in before[1]["state"].items():
            for key, value in entry.items():
                assert torch.equal(now[index][key], value), (flag, key)


def test_torch_fused_adam_gradscaler_step_counts_for_comparison():
    """What we match: torch's fused Adam leaves the step count unchanged on found_inf=1."""
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    adam = torch.optim.Adam([p], fused=True)
    adam.grad_scale, adam.found_inf = torch.tensor(2.0), torch.tensor(1.0)
    adam.step()
    assert float(adam.state[p]["step"]) == 0.0 and torch.equal(p.detach(), torch.ones(3))


# --- learning-rate schedules, state_dict --------------------------------------------------------


@needs_kernel
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_scheduled_lr_matches_single_tensor_without_builds(tensor_lr):
    def schedule(k: int) -> float:
        return 0.02 * 0.95**k

    lr = torch.tensor(0.02) if tensor_lr else 0.02
    single = run(torch.float32, SINGLE, steps=30, lr=copy.deepcopy(lr), lr_schedule=schedule)
    builds = cpu.builds
    fused = run(torch.float32, FUSED, steps=30, lr=lr, lr_schedule=schedule)
    assert_same_run(*fused, *single, tol=TOL[torch.float32])
    assert cpu.builds == builds


@needs_kernel
@pytest.mark.parametrize("options", [dict(fused=True), dict()], ids=["fused", "default"])
def test_state_dict_round_trip_resumes_bit_exactly(options):
    params = make_params(torch.float32)
    opt = AdaBelief(params, amsgrad=True, weight_decay=0.1, **options)
    for k in range(4):
        set_grads(params, k)
        opt.step()
    saved_params = [p.detach().clone() for p in params]
    saved_state = copy.deepcopy(opt.state_dict())
    for k in range(4, 9):
        set_grads(params, k)
        opt.step()

    resumed = [torch.nn.Parameter(p.clone()) for p in saved_params]
    opt2 = AdaBelief(resumed, amsgrad=True, weight_decay=0.1, **options)
    opt2.load_state_dict(saved_state)
    for k in range(4, 9):
        set_grads(resumed, k)
        opt2.step()
    for a, b in zip(params, resumed, strict=True):
        assert torch.equal(a.detach(), b.detach())
        for key in opt.state[a]:
            assert torch.equal(opt.state[a][key], opt2.state[b][key]), key
            assert opt.state[a][key].dtype == opt2.state[b][key].dtype


class _Subclass(torch.Tensor):
    """A tensor subclass with its own storage (not a DTensor)."""


@needs_kernel
def test_tensor_subclass_parameters_take_the_tensor_update():
    def go(path):
        params = [
            torch.nn.Parameter(p.detach().as_subclass(_Subclass))
            for p in make_params(torch.float32)
        ]
        opt = AdaBelief(params, **path)
        for k in range(6):
            set_grads(params, k)
            opt.step()
        return params, opt

    fused, single = go(FUSED), go(SINGLE)
    assert_same_run(*fused, *single, tol=TOL[torch.float32])


# --- the torch.compile path (CUDA's), on CPU -------------------------------------------------


@pytest.fixture
def compiled_backend(monkeypatch):
    if KERNEL is None:  # inductor's CPU backend needs the same C++ compiler
        pytest.skip(f"no working C++ compiler: {cpu.kernel_error()}")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_compiled_path_schedule_does_not_recompile(compiled_backend, tensor_lr):
    from torch._dynamo.utils import counters

    def schedule(k: int) -> float:
        return 0.02 * 0.9**k

    lr = torch.tensor(0.02) if tensor_lr else 0.02
    single = run(torch.float32, SINGLE, steps=12, lr=copy.deepcopy(lr), lr_schedule=schedule)
    counters.clear()
    fused = run(torch.float32, COMPILED, steps=12, lr=lr, lr_schedule=schedule)
    # Parameter 1 skips every third step: two lists (with and without it), one graph each.
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert_same_run(*fused, *single, tol=TOL[torch.float32])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compiled_path_matches_single_tensor_on_16_bit_and_complex(compiled_backend):
    shapes = [(6, 5), (7,)]

    def go(path, dtype):
        params = make_params(dtype, shapes)
        opt = AdaBelief(
            params,
            lr=0.01,
            amsgrad=True,
            weight_decay=0.1,
            weight_decouple=False,
            maximize=True,
            rectify=False,
            **path,
        )
        for k in range(15):
            for p in params:
                gen = torch.Generator().manual_seed(k)
                p.grad = torch.randn(p.shape, dtype=torch.float64, generator=gen).to(p.dtype)
            opt.step()
        return params, opt

    for dtype in (torch.bfloat16, torch.complex64):
        assert_same_run(*go(COMPILED, dtype), *go(SINGLE, dtype), tol=TOL[dtype])


def test_tensor_step_eagerly_matches_single_tensor():
    """The code the CUDA path compiles, run eagerly, with found_inf masking."""
    params = make_params(torch.float32)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = AdaBelief(twins, lr=0.01, **SINGLE)
    state = {"m": [], "s": [], "step": []}
    for p in params:
        state["m"].append(torch.zeros_like(p))
        state["s"].append(torch.zeros_like(p))
        state["step"].append(torch.zeros(()))
    hp = Hyperparameters.from_group(dict(opt.param_groups[0]), torch.tensor(0.01))
    for k in range(10):
        for p, q in zip(params, twins, strict=True):
            gen = torch.Generator().manual_seed(k)
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        with torch.no_grad():
            tensor_math.tensor_step(
                GroupTensors(
                    params,
                    [p.grad for p in params],
                    [as_moment(m, belief=False) for m in state["m"]],
                    [as_moment(s, belief=True) for s in state["s"]],
                    [],
                    state["step"],
                ),
                hp,
                found_inf=torch.tensor(float(k == 4)),
            )
        if k != 4:
            opt.step()
    for i, (p, q) in enumerate(zip(params, twins, strict=True)):
        assert_agree(p, q, TOL[torch.float32], f"param {i}")
        assert_agree(state["s"][i], opt.state[q]["exp_avg_var"], TOL[torch.float32], "s")
        assert float(state["step"][i]) == 9.0


@needs_kernel
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fused_step_inside_torch_compile():
    """Under torch.compile the fused step is traced as tensor operations."""
    torch._dynamo.reset()
    params = make_params(torch.float32)
    opt = AdaBelief(params, lr=0.01, fused=True)
    twins = make_params(torch.float32)
    reference = AdaBelief(twins, lr=0.01, **SINGLE)
    step = torch.compile(opt.step, backend="eager")
    for k in range(5):
        set_grads(params, k)
        set_grads(twins, k)
        step()
        reference.step()
    assert_same_run(params, opt, twins, reference, tol=TOL[torch.float32])
    torch._dynamo.reset()


# --- CUDA -------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize(
    "options",
    [dict(), dict(amsgrad=True, weight_decay=0.1, weight_decouple=False, maximize=True)],
    ids=["default", "amsgrad-l2-maximize"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_fused_matches_single_tensor(options, dtype):
    def go(path):
        params = [torch.nn.Parameter(p.detach().cuda()) for p in make_params(dtype)]
        opt = AdaBelief(params, lr=0.01, **path, **options)
        for k in range(30):
            set_grads(params, k)  # generated on CPU, moved below
            for p in params:
                if p.grad is not None:
                    p.grad = p.grad.cuda()
            opt.step()
        return params, opt

    fused, single = go(FUSED), go(SINGLE)
    assert all(s["step"].is_cuda for s in fused[1].state.values())
    assert_same_run(*fused, *single, tol=TOL[dtype] * 10)


@needs_cuda
def test_cuda_fused_step_does_not_synchronize():
    params = [torch.nn.Parameter(torch.randn(1000, device="cuda")) for _ in range(3)]
    opt = AdaBelief(params, lr=torch.tensor(0.01, device="cuda"), fused=True)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [float(s["step"]) for s in opt.state.values()] == [2.0] * 3


@needs_cuda
def test_cuda_grad_scaler_skips_inf_step():
    model = torch.nn.Linear(4, 3).cuda()
    opt = AdaBelief(model.parameters(), fused=True)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(8, 4, device="cuda")
    for poison in (False, True):
        opt.zero_grad()
        scaler.scale(model(x).sum()).backward()
        if poison:
            model.weight.grad[0, 0] = float("inf")
            before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), q)
    assert [float(s["step"]) for s in opt.state.values()] == [1.0, 1.0]
