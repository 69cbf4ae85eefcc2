"""master_weights="round" | "residual" | "fp32" | "stochastic" for 16-bit parameters.

The reference for the fused CPU kernel (:func:`reference_run`) is a float32 optimizer stepping
the float32 masters with the same kernel, the masters split after every step by
:mod:`adabelief.master_weights`: the kernel decodes, updates and splits with the same operations,
so its weights, residuals and moments are **bit-identical** to it. The single-tensor and foreach
paths are bit-identical to each other; the tensor-math and compiled paths agree within float32
rounding (a master that differs in its last float32 bit takes another dither, so a weight may
differ by an ulp and a decoded master by a few residual steps).
"""

from __future__ import annotations

import copy
import io
import itertools

import pytest
import torch

from adabelief import AdaBelief
from adabelief import compressed_state as cs
from adabelief import master_weights as mw
from adabelief.kernels import cpu

KERNEL = cpu.kernel()
needs_kernel = pytest.mark.skipif(
    KERNEL is None, reason=f"the fused CPU kernel cannot be built here: {cpu.kernel_error()}"
)
MODES = ["residual", "fp32", "stochastic"]
DTYPES = [torch.bfloat16, torch.float16]
SHAPES = [(4096,), (70, 90), (3, 5)]  # int8/int4 moments need >= 4096 elements; a partial block


def make_params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter((1.0 + torch.randn(s, generator=gen) * 0.1).to(dtype)) for s in SHAPES
    ]


def grads_for(params, step):
    gen = torch.Generator().manual_seed(1000 + step)
    scale = (1.0, 0.01, 30.0)[step % 3]
    return [(torch.randn(p.shape, generator=gen) * scale).to(p.dtype) for p in params]


def optimizer_run(dtype, mode, steps, path, precision="fp32", **options):
    params = make_params(dtype)
    opt = AdaBelief(params, master_weights=mode, state_precision=precision, **path, **options)
    for k in range(steps):
        for p, g in zip(params, grads_for(params, k), strict=True):
            p.grad = g
        opt.step()
    return params, [opt.state[p] for p in params]


def reference_run(dtype, mode, steps, precision="fp32", **options):
    """A float32 optimizer (fused kernel) on the float32 masters, split by the Python codec."""
    weights = make_params(dtype)
    masters = [torch.nn.Parameter(w.detach().float()) for w in weights]
    codes = [torch.zeros_like(w, dtype=torch.int8) for w in weights]
    opt = AdaBelief(masters, state_precision=precision, fused=True, **options)
    for k in range(steps):
        for m, g in zip(masters, grads_for(weights, k), strict=True):
            m.grad = g.float()
        opt.step()
        with torch.no_grad():
            for m, w, c in zip(masters, weights, codes, strict=True):
                if mode == "residual":
                    new_w, new_c = mw.split(m, dtype, k + 1)
                    c.copy_(new_c)
                    m.copy_(mw.decode(new_w, new_c))
                elif mode == "stochastic":
                    new_w = mw.round_weight(m, dtype, k + 1)
                    m.copy_(new_w.float())
                else:
                    new_w = m.to(dtype)
                w.copy_(new_w)
    states = []
    for m, c in zip(masters, codes, strict=True):
        state = dict(opt.state[m])
        if mode == "residual":
            state[mw.RESIDUAL_KEY] = c
        elif mode == "fp32":
            state[mw.FP32_KEY] = m.detach().clone()
        states.append(state)
    return weights, states


def assert_same(a, b, what):
    assert a.dtype == b.dtype, what
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=what)


def assert_bit_identical(run_a, run_b):
    for i, (p, q) in enumerate(zip(run_a[0], run_b[0], strict=True)):
        assert_same(p.detach(), q.detach(), f"param {i}")
        state_a, state_b = run_a[1][i], run_b[1][i]
        assert sorted(state_a) == sorted(state_b), f"param {i}: keys"
        for key in state_a:
            assert_same(state_a[key], state_b[key], f"param {i}: {key}")


def masters_of(run):
    """The float32 masters of a run's parameters."""
    out = []
    for p, state in zip(*run, strict=True):
        out.append(mw.load(p.detach(), state.get(mw.RESIDUAL_KEY, state.get(mw.FP32_KEY))))
    return out


COMBOS = [
    dict(),
    dict(weight_decay=0.1, amsgrad=True),
    dict(weight_decay=0.01, weight_decouple=False, maximize=True, rectify=False),
]


# ---- validation and state --------------------------------------------------------------------


def test_invalid_master_weights_are_rejected():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"master_weights.*'bf16'"):
        AdaBelief([p], master_weights="bf16")
    opt = AdaBelief([p])
    assert opt.param_groups[0]["master_weights"] == "round"  # the default
    with pytest.raises(ValueError, match=r"master_weights.*True"):
        opt.add_param_group(
            {"params": [torch.nn.Parameter(torch.zeros(2))], "master_weights": True}
        )


@pytest.mark.parametrize("mode", MODES)
def test_state_entries_and_bytes(mode):
    params = make_params(torch.bfloat16)
    fp32_param = torch.nn.Parameter(torch.ones(10))
    opt = AdaBelief([*params, fp32_param], master_weights=mode)
    for p in [*params, fp32_param]:
        p.grad = torch.ones_like(p)
    opt.step()
    state = opt.state[params[0]]
    extra = set(state) - {"step", "exp_avg", "exp_avg_var"}
    if mode == "residual":
        assert extra == {mw.RESIDUAL_KEY}
        assert state[mw.RESIDUAL_KEY].dtype == torch.int8
        assert state[mw.RESIDUAL_KEY].shape == params[0].shape
    elif mode == "fp32":
        assert extra == {mw.FP32_KEY}
        assert state[mw.FP32_KEY].dtype == torch.float32
    else:
        assert extra == set()
    nbytes = sum(t.numel() * t.element_size() for k, t in state.items() if k in extra)
    assert nbytes == mw.bytes_per_parameter(mode) * params[0].numel()
    assert set(opt.state[fp32_param]) == {"step", "exp_avg", "exp_avg_var"}  # no master


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", [dict(foreach=False), dict(foreach=True), dict(fused=True)])
def test_float32_parameters_are_unaffected(mode, path):
    expected = optimizer_run(torch.float32, "round", 4, path)
    actual = optimizer_run(torch.float32, mode, 4, path)
    assert_bit_identical(actual, expected)


# ---- the codec -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_decodes_to_the_master_within_one_code_step(dtype):
    gen = torch.Generator().manual_seed(0)
    master = torch.randn(200_000, generator=gen) * torch.logspace(-4, 4, 200_000)
    weight, code = mw.split(master, dtype, step=7)
    decoded = mw.decode(weight, code)
    unit, _ = mw._units(weight.float(), dtype)
    assert (decoded - master).abs().le(unit).all()  # one code step, ulp / 256
    # The weight is the nearest 16-bit value, but at a carry (then it is the other neighbour).
    nearest = master.to(dtype)
    moved = weight != nearest
    assert moved.float().mean() < 0.01
    assert ((weight.float() - master).abs() <= 0.5 * unit * 256 + unit)[moved].all()
    # Decoding is exact, so a split of a decoded master returns it at any step.
    again = mw.split(decoded, dtype, step=8)
    assert torch.equal(again[0], weight) and torch.equal(again[1], code)


@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_rounding_is_unbiased(dtype):
    """A master a third of a code step above the weight's grid keeps that third in expectation;
    nearest rounding of the code would lose it."""
    weight = torch.full((1,), 1.0, dtype=dtype)
    unit, _ = mw._units(weight.float(), dtype)
    master = weight.float() + 5.33 * unit
    decoded = torch.cat([mw.decode(*mw.split(master, dtype, step)) for step in range(4000)])
    assert decoded.mean().item() == pytest.approx(master.item(), abs=0.05 * unit.item())


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_midpoint_carries_into_the_weight(dtype):
    """A master at the midpoint above a weight stores the upper weight with code -128 (-64 where
    the ulp doubles), never code 128."""
    for w in (1.5, -1.5, 2.0 - 2.0 ** (-7 if dtype == torch.bfloat16 else -10)):
        weight = torch.tensor([w], dtype=dtype)
        unit, _ = mw._units(weight.float(), dtype)
        master = weight.float() + 128 * unit  # exactly the midpoint above
        for step in range(20):
            new_weight, code = mw.split(master, dtype, step)
            assert code.item() in (-128, -64), (w, step)
            assert new_weight.float().item() > w
            assert torch.equal(mw.decode(new_weight, code), master)


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_weights(dtype):
    big = torch.finfo(dtype).max
    master = torch.tensor([0.0, -0.0, 1e-40, float("inf"), -float("inf"), float("nan"), big])
    weight, code = mw.split(master, dtype, step=3)
    assert torch.equal(weight[:6].float().nan_to_num(), master[:6].to(dtype).float().nan_to_num())
    assert code[3:6].eq(0).all()  # non-finite: no residual
    decoded = mw.decode(weight, code)
    assert decoded[3].item() == float("inf") and decoded[4].item() == -float("inf")
    assert decoded[5].isnan()
    assert decoded[6].item() == big  # the largest finite weight clamps rather than overflow
    if dtype == torch.bfloat16:  # no residual below 2**-111
        assert code[:3].eq(0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_stochastic_rounding_is_unbiased_and_shares_the_bf16_helper(dtype):
    ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
    master = torch.full((1,), 1.0 + 0.3 * ulp)
    rounded = torch.cat([mw.round_weight(master, dtype, step).float() for step in range(4000)])
    assert set(rounded.tolist()) == {1.0, 1.0 + ulp}
    assert rounded.mean().item() == pytest.approx(master.item(), abs=0.05 * ulp)
    if dtype == torch.bfloat16:  # the moments' stochastic rounding, with the master's dither
        values = torch.randn(1000)
        expected = cs._round_to_bf16(values, mw.dither(values, 5))
        assert torch.equal(mw.round_weight(values, dtype, 5), expected)


# ---- the paths ------------------------------------------------------------------------------


@needs_kernel
@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8", "int4"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("combo", COMBOS, ids=["plain", "decay+amsgrad", "l2+maximize"])
def test_fused_kernel_is_bit_identical_to_the_reference(precision, mode, dtype, combo):
    options = dict(combo, lr=1e-3)
    expected = reference_run(dtype, mode, 7, precision, **options)
    actual = optimizer_run(dtype, mode, 7, dict(fused=True), precision, **options)
    assert_bit_identical(actual, expected)


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_single_and_foreach_are_bit_identical(precision, mode, dtype):
    options = dict(lr=1e-3, weight_decay=0.1, amsgrad=True)
    single = optimizer_run(dtype, mode, 7, dict(foreach=False), precision, **options)
    many = optimizer_run(dtype, mode, 7, dict(foreach=True), precision, **options)
    assert_bit_identical(many, single)


def assert_masters_close(run_a, run_b, dtype, steps_of_code):
    for a, b, p in zip(masters_of(run_a), masters_of(run_b), run_a[0], strict=True):
        unit, _ = mw._units(p.detach().float(), dtype)
        assert (a - b).abs().le(steps_of_code * unit + 1e-6 * a.abs()).all()


@needs_kernel
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_single_and_tensor_paths_agree_with_the_kernel_within_rounding(mode, dtype):
    # The tensor path's int8 moments may take other codes (its float32 rounding differs), so the
    # moments are float32 here: what differs is the rounding of the update alone.
    fused = optimizer_run(dtype, mode, 7, dict(fused=True), "fp32", lr=1e-3)
    # Stochastic rounding moves a weight by an ulp (256 code steps, 512 of the lower ulp at a
    # power of two) where the float32 rounding differs, and the runs then walk apart: up to an
    # ulp per step.
    steps = 7 * 512 if mode == "stochastic" else 4
    for path in (dict(foreach=False), dict(capturable=True)):
        other = optimizer_run(dtype, mode, 7, path, "fp32", lr=1e-3)
        assert_masters_close(other, fused, dtype, steps)


@pytest.mark.slow
@needs_kernel
@pytest.mark.parametrize("mode", ["residual", "fp32"])
def test_compiled_path_agrees_within_rounding(mode):
    fused = optimizer_run(torch.bfloat16, mode, 5, dict(fused=True), "fp32", lr=1e-3)
    compiled = optimizer_run(
        torch.bfloat16, mode, 5, dict(fused=True, capturable=True), "fp32", lr=1e-3
    )
    assert_masters_close(compiled, fused, torch.bfloat16, 4)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["residual", "stochastic"])
def test_torch_compile_of_step_agrees_with_eager(mode):
    """opt.step compiled by the caller (the tensor step traced into its graph, inductor) splits
    the masters as the eager step does, within float32 rounding of the update."""
    runs = []
    for compiled in (False, True):
        params = make_params(torch.bfloat16)
        opt = AdaBelief(params, lr=torch.tensor(1e-3), master_weights=mode)
        step = torch.compile(opt.step) if compiled else opt.step
        for k in range(4):
            for p, g in zip(params, grads_for(params, k), strict=True):
                p.grad = g
            step()
        runs.append((params, [opt.state[p] for p in params]))
    assert_masters_close(runs[1], runs[0], torch.bfloat16, 4 * 512 if mode == "stochastic" else 4)


# ---- training ----------------------------------------------------------------------------


def train(mode, steps=300, path=None, seed=0):
    """A bf16 linear model with weights near 1 at lr 1e-5: most updates are under half an
    ulp (2**-9 near 1)."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(64, 64)
    with torch.no_grad():
        model.weight.add_(1.0)
    model = model.to(torch.bfloat16)
    opt = AdaBelief(model.parameters(), lr=1e-5, master_weights=mode, **(path or {}))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 64, generator=gen).bfloat16()
    y = torch.randn(256, 64, generator=gen)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x).float(), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model, opt


def test_residual_trains_as_fp32_masters_and_round_stalls():
    runs = {mode: train(mode) for mode in ["round", "residual", "fp32", "stochastic"]}

    def master(mode):
        _, model, opt = runs[mode]
        state = opt.state[model.weight]
        return mw.load(model.weight.detach(), state.get(mw.RESIDUAL_KEY, state.get(mw.FP32_KEY)))

    torch.manual_seed(0)
    initial = (torch.nn.Linear(64, 64).weight.detach() + 1.0).bfloat16().float()
    target = master("fp32")
    moved = (target - initial).abs().mean()
    off = {mode: ((master(mode) - target).abs().mean() / moved).item() for mode in runs}
    # The residual's masters follow float32 masters to a few residual steps (measured: 2.5% of
    # the distance they moved); plain rounding never moved (most updates are under half an ulp),
    # stochastic rounding wanders by its noise (measured 91%).
    assert off["residual"] < 0.05
    assert off["round"] > 0.99
    assert off["stochastic"] > 10 * off["residual"]
    losses = {mode: run[0][-1] for mode, run in runs.items()}
    gain = runs["fp32"][0][0] - losses["fp32"]
    assert gain > 0.5
    assert abs(losses["residual"] - losses["fp32"]) < 0.01 * gain
    assert losses["round"] - losses["fp32"] > 0.9 * gain  # stalled
    assert abs(losses["stochastic"] - losses["fp32"]) < 0.2 * gain


# ---- checkpoints, GradScaler, step in backward, tensor lr --------------------------------


def save_and_load(opt_state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(opt_state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", [dict(foreach=False), dict(fused=True)], ids=["single", "fused"])
def test_state_dict_round_trip_is_bit_exact(mode, path):
    params = make_params(torch.bfloat16)
    opt = AdaBelief(params, lr=1e-3, master_weights=mode, state_precision="int8", **path)

    def steps(opt, params, ks):
        for k in ks:
            for p, g in zip(params, grads_for(params, k), strict=True):
                p.grad = g
            opt.step()

    steps(opt, params, range(3))
    saved = save_and_load(opt.state_dict())
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = AdaBelief(resumed_params, lr=1e-3, master_weights=mode, state_precision="int8")
    resumed.load_state_dict(saved)
    for key in (mw.RESIDUAL_KEY, mw.FP32_KEY):
        if key in opt.state[params[0]]:
            assert_same(resumed.state[resumed_params[0]][key], opt.state[params[0]][key], key)
    steps(opt, params, range(3, 6))
    steps(resumed, resumed_params, range(3, 6))
    assert_bit_identical(
        (resumed_params, [resumed.state[p] for p in resumed_params]),
        (params, [opt.state[p] for p in params]),
    )


def test_a_checkpoint_without_residual_loads_with_residual_zero():
    params = make_params(torch.bfloat16)
    opt = AdaBelief(params, lr=1e-3)  # "round": no residual saved
    for p, g in zip(params, grads_for(params, 0), strict=True):
        p.grad = g
    opt.step()
    saved = save_and_load(opt.state_dict())
    before = [p.detach().clone() for p in params]
    resumed = AdaBelief(params, lr=0.0, master_weights="residual")
    resumed.load_state_dict(saved)
    resumed.param_groups[0]["lr"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    resumed.step()  # lr 0: the master is the weight, split again exactly
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p.detach(), b)
        assert resumed.state[p][mw.RESIDUAL_KEY].eq(0).all()


def test_switching_modes_keeps_the_master():
    params = make_params(torch.bfloat16)
    opt = AdaBelief(params, lr=1e-3, master_weights="fp32")
    for p, g in zip(params, grads_for(params, 0), strict=True):
        p.grad = g
    opt.step()
    master = opt.state[params[0]][mw.FP32_KEY].clone()
    opt.param_groups[0]["lr"] = 0.0
    opt.param_groups[0]["master_weights"] = "residual"
    opt.step()
    state = opt.state[params[0]]
    assert mw.FP32_KEY not in state
    unit, _ = mw._units(params[0].detach().float(), torch.bfloat16)
    decoded = mw.decode(params[0].detach(), state[mw.RESIDUAL_KEY])
    assert (decoded - master).abs().le(unit).all()
    opt.param_groups[0]["master_weights"] = "round"
    opt.step()
    assert mw.RESIDUAL_KEY not in opt.state[params[0]]


@pytest.mark.parametrize("mode", ["residual", "fp32"])
@pytest.mark.parametrize(
    "path", [dict(fused=True), dict(capturable=True)], ids=["fused", "capturable"]
)
def test_found_inf_leaves_weight_and_master_untouched(mode, path):
    params = make_params(torch.bfloat16)
    opt = AdaBelief(params, lr=1e-3, master_weights=mode, **path)
    for p, g in zip(params, grads_for(params, 0), strict=True):
        p.grad = g
    opt.step()
    before = copy.deepcopy([(p.detach().clone(), dict(opt.state[p])) for p in params])
    for p, g in zip(params, grads_for(params, 1), strict=True):
        p.grad = g
    opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(1.0)
    opt.step()
    for p, (weight, state) in zip(params, before, strict=True):
        assert torch.equal(p.detach(), weight)
        for key, value in state.items():
            assert torch.equal(opt.state[p][key], value), key


@needs_kernel
@pytest.mark.parametrize("mode", MODES)
def test_step_in_backward_and_tensor_lr_match_the_ordinary_step(mode):
    def run(**options):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
        )
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        model = model.to(torch.bfloat16)
        opt = AdaBelief(model.parameters(), master_weights=mode, **options)
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1)).bfloat16()
        for _ in range(4):
            opt.zero_grad()
            model(x).float().pow(2).mean().backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()], opt

    expected, opt = run(lr=1e-4)
    for options in (dict(lr=1e-4, step_in_backward=True), dict(lr=torch.tensor(1e-4))):
        actual, other = run(**options)
        for a, b in zip(actual, expected, strict=True):
            assert torch.equal(a, b)
        for p, q in zip(opt.state, other.state, strict=True):
            for key in (mw.RESIDUAL_KEY, mw.FP32_KEY):
                if key in opt.state[p]:
                    assert torch.equal(other.state[q][key], opt.state[p][key])


def test_every_option_with_residual():
    """Every option combination steps (no NaN, state as declared)."""
    for amsgrad, decouple, rectify, maximize, precision in itertools.product(
        (False, True), (False, True), (False, True), (False, True), ("fp32", "bf16", "int8")
    ):
        params, states = optimizer_run(
            torch.bfloat16,
            "residual",
            3,
            {},
            precision,
            amsgrad=amsgrad,
            weight_decay=0.01,
            weight_decouple=decouple,
            rectify=rectify,
            maximize=maximize,
        )
        for p, state in zip(params, states, strict=True):
            assert torch.isfinite(p).all()
            assert state[mw.RESIDUAL_KEY].dtype == torch.int8


@needs_kernel
def test_functional_step_takes_the_masters():
    from adabelief.kernels.dispatch import adabelief

    expected = optimizer_run(torch.bfloat16, "residual", 3, dict(fused=True), lr=1e-3)
    params = make_params(torch.bfloat16)
    moments = [[torch.zeros_like(p, dtype=torch.float32) for p in params] for _ in range(2)]
    steps = [torch.zeros(()) for _ in params]
    codes = [torch.zeros_like(p, dtype=torch.int8) for p in params]
    for k in range(3):
        grads = grads_for(params, k)
        adabelief(
            params, grads, *moments, [], steps, lr=1e-3, master_weights="residual", masters=codes
        )
    for p, c, q, state in zip(params, codes, *expected, strict=True):
        assert torch.equal(p, q.detach()) and torch.equal(c, state[mw.RESIDUAL_KEY])


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_kernel_special_values_are_bit_identical(dtype, monkeypatch):
    """Zero, subnormal, tiny, huge weights and inf/NaN gradients: the kernel's split (vector
    lanes and scalar tail alike) is the Python codec's."""
    big = torch.finfo(dtype).max / 2
    specials = torch.tensor([0.0, -0.0, 1e-38, 6e-8, -1e-6, big, -big, 1.0, 2.0, -2.0])

    plain_params, plain_grads = make_params, grads_for

    def special_params(dtype, seed=0):
        params = plain_params(dtype, seed)
        with torch.no_grad():
            for p in params:
                flat = p.view(-1)
                flat[: specials.numel()] = specials[: flat.numel()].to(dtype)
        return params

    def special_grads(params, step):
        grads = plain_grads(params, step)
        for g in grads:
            flat = g.view(-1)
            if step == 3 and flat.numel() > 20:
                flat[11], flat[12], flat[13] = float("inf"), -float("inf"), float("nan")
        return grads

    monkeypatch.setitem(globals(), "make_params", special_params)
    monkeypatch.setitem(globals(), "grads_for", special_grads)
    for mode in MODES:
        expected = reference_run(dtype, mode, 5, "fp32", lr=1e-2)
        actual = optimizer_run(dtype, mode, 5, dict(fused=True), "fp32", lr=1e-2)
        assert_bit_identical(actual, expected)
