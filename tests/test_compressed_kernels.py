"""Compressed moments inside the single-pass paths, against the decode -> update -> encode path.

The reference (:func:`reference_run`) is the path compressed state took before the kernels read
it directly: decode the stored moments into float32, run the fp32 fused CPU kernel on the work
copies, encode them back with :mod:`adabelief.compressed_state`. The fused CPU kernel decodes,
updates and encodes in registers with the same operations (the same dither hash, the same
``1/x * top`` scale, correctly rounded square roots), so its results are **bit-identical** to
the reference for every option, parameter dtype and format (bf16, int8 and int4). The compiled path (``torch.compile``,
CUDA's) is generated code whose float32 arithmetic may round differently, so it **agrees within
float32 rounding** on the parameters and within one quantization step on the moments.
"""

from __future__ import annotations

import copy
import itertools
import platform
import subprocess

import pytest
import torch

from adabelief import AdaBelief
from adabelief import compressed_state as cs
from adabelief import master_weights as mw
from adabelief.kernels import cpu, dispatch

KERNEL = cpu.kernel()
needs_kernel = pytest.mark.skipif(
    KERNEL is None, reason=f"the fused CPU kernel cannot be built here: {cpu.kernel_error()}"
)
# int8 and int4 need >= 4096 elements (int4 an even first dimension); partial last blocks
SHAPES = [(4096,), (70, 90), (3, 5)]
#: The compressed formats of the fused kernel, and what each leaves the small tensor in.
PRECISIONS = ["bf16", "int8", "int4"]
FORMATS_OF_SHAPES = {"bf16": {"bf16"}, "int8": {"int8", "fp32"}, "int4": {"int4", "fp32"}}


def make_params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(dtype)) for s in SHAPES]


def grads_for(params, step):
    gen = torch.Generator().manual_seed(1000 + step)
    scale = (1.0, 0.01, 30.0)[step % 3]
    return [(torch.randn(p.shape, generator=gen) * scale).to(p.dtype) for p in params]


def reference_run(dtype, precision, steps, grad_scale=None, grads=grads_for, **options):
    """decode -> fp32 fused kernel -> encode, one parameter at a time (with ``master_weights``,
    the fp32 kernel splits the 16-bit parameters' masters, kept in the state as the optimizer
    keeps them)."""
    params = make_params(dtype)
    opt = AdaBelief(params, fused=True, **options)  # only for its validated param group
    group = opt.param_groups[0]
    states = []
    for p in params:
        fmt = cs.storage_format(p, precision)
        state = {"step": torch.zeros((), dtype=torch.float32)}
        for key in ("exp_avg", "exp_avg_var") + (("max_exp_avg_var",) if group["amsgrad"] else ()):
            state.update(cs.new_moment(p, key, fmt))
        mw.sync_state_(state, p, group["master_weights"])
        states.append(state)
    for k in range(steps):
        for p, g, state in zip(params, grads(params, k), states, strict=True):
            if grad_scale is not None:
                g = g * grad_scale
            work = cs.decode_moments(state)
            dispatch.adabelief(
                [p],
                [g],
                [work["exp_avg"]],
                [work["exp_avg_var"]],
                [work["max_exp_avg_var"]] if group["amsgrad"] else [],
                [state["step"]],
                **functional_options(group),
                masters=[state.get(mw.RESIDUAL_KEY, state.get(mw.FP32_KEY))],
                grad_scale=None if grad_scale is None else torch.tensor(grad_scale),
            )
            cs.encode_moments_(state, work, int(state["step"].item()))
    return params, states


def functional_options(group):
    """The keyword options of the functional ``adabelief`` for a param group's."""
    beta1, beta2 = group["betas"]
    names = ("lr", "eps", "weight_decay", "amsgrad", "weight_decouple", "fixed_decay", "rectify")
    names += ("degenerated_to_sgd", "maximize", "foreach", "fused", "capturable", "differentiable")
    names += ("master_weights",)
    return dict({name: group[name] for name in names}, beta1=beta1, beta2=beta2)


def optimizer_run(dtype, precision, steps, path, grad_scale=None, grads=grads_for, **options):
    params = make_params(dtype)
    opt = AdaBelief(params, state_precision=precision, **path, **options)
    for k in range(steps):
        for p, g in zip(params, grads(params, k), strict=True):
            p.grad = g if grad_scale is None else g * grad_scale
        if grad_scale is not None:
            opt.grad_scale, opt.found_inf = torch.tensor(grad_scale), torch.tensor(0.0)
        opt.step()
    return params, [opt.state[p] for p in params]


COMBOS = [
    dict(weight_decay=wd, weight_decouple=dec, rectify=r, amsgrad=a, maximize=m)
    for wd, dec, r, a, m in itertools.product((0.0, 0.1), (True, False), *[(False, True)] * 3)
    if not (wd == 0.0 and not dec)
]


def combo_id(combo):
    parts = [k for k in ("rectify", "amsgrad", "maximize") if combo[k]]
    if combo["weight_decay"]:
        parts.append("decoupled" if combo["weight_decouple"] else "l2")
    return "+".join(parts) or "plain"


def assert_same(a, b, what):
    """Equal bit for bit; NaN equals NaN (torch's scalar and vector bfloat16 conversions write
    different NaN payloads)."""
    assert a.dtype == b.dtype, what
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=what)


def assert_bit_identical(run_a, run_b):
    for i, (p, q) in enumerate(zip(run_a[0], run_b[0], strict=True)):
        assert_same(p.detach(), q.detach(), f"param {i}")
        state_a, state_b = run_a[1][i], run_b[1][i]
        assert sorted(state_a) == sorted(state_b), f"param {i}: keys"
        for key in state_a:
            assert_same(state_a[key], state_b[key], f"param {i}: {key}")


@needs_kernel
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_fused_cpu_kernel_is_bit_identical_to_decode_update_encode(precision, combo):
    options = dict(combo, lr=0.01, eps=1e-12)
    expected = reference_run(torch.float32, precision, 12, **options)
    actual = optimizer_run(torch.float32, precision, 12, {}, **options)  # the default: fused
    assert_bit_identical(actual, expected)
    formats = {cs.format_of(state) for state in actual[1]}
    # int8 and int4 leave tensors under 4096 elements in fp32; bf16 compresses them all.
    assert formats == FORMATS_OF_SHAPES[precision]


@needs_kernel
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("combo", COMBOS[::5], ids=combo_id)
def test_16_bit_parameters_are_bit_identical(precision, dtype, combo):
    options = dict(combo, lr=0.01)
    expected = reference_run(dtype, precision, 10, **options)
    actual = optimizer_run(dtype, precision, 10, {"fused": True}, **options)
    assert_bit_identical(actual, expected)


@needs_kernel
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("mode", ["residual", "fp32", "stochastic"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["", "amsgrad"])
def test_16_bit_parameters_with_master_weights_are_bit_identical(precision, mode, dtype, amsgrad):
    """The kernel's masters (on its portable loops) around compressed moments: decode, the fp32
    kernel's update and split, encode."""
    options = dict(lr=0.01, weight_decay=0.1, amsgrad=amsgrad, master_weights=mode)
    expected = reference_run(dtype, precision, 8, **options)
    actual = optimizer_run(dtype, precision, 8, {"fused": True}, **options)
    assert_bit_identical(actual, expected)
    assert {cs.format_of(state) for state in actual[1]} == FORMATS_OF_SHAPES[precision]


def grads_with_special_values(params, step):
    """Ordinary gradients with NaN, infinities, values near float32's largest (their moments
    round past bfloat16's largest), subnormals, tiny and all-zero int8 blocks."""
    grads = grads_for(params, step)
    flat = grads[0].view(-1)  # 4096 elements: 16 int8 blocks
    flat[0:256] = 0.0  # a block of zeros
    flat[256:512] = 1e-41  # a block whose largest magnitude is subnormal
    # a block whose scale's inverse times 2^16 overflows (the AVX2 codes fold 2^16 into it)
    flat[1024:1280] = torch.linspace(1e-33, 3e-33, 256)
    flat[512:544] = 3.3e38
    flat[544:576] = -3.3e38
    # beta1 0.01: the second exp_avg lies where the dither can carry it to inf, and nearest
    # rounding gives bfloat16's largest
    flat[576:608] = torch.linspace(3.3906e38, 3.3938e38, 32)
    if step == 0:  # betas (0.9, 0.5): the first exp_avg_var, 0.5 * (0.9 g)^2, lies there too
        flat[608:640] = torch.linspace(2.8929e19, 2.8986e19, 32)
    if step == 2:
        flat[700], flat[1000], flat[1001] = float("nan"), float("inf"), float("-inf")
    grads[1].view(-1)[6290:] = 2.5e38  # in the partial last block
    return grads


@needs_kernel
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.01, 0.999), (0.9, 0.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_special_values_are_bit_identical(precision, amsgrad, betas, dtype):
    options = dict(lr=0.01, eps=1e-12, amsgrad=amsgrad, betas=betas)
    expected = reference_run(dtype, precision, 4, grads=grads_with_special_values, **options)
    actual = optimizer_run(dtype, precision, 4, {}, grads=grads_with_special_values, **options)
    assert_bit_identical(actual, expected)
    assert actual[0][0].isnan().any() and not actual[0][2].isnan().any()


@pytest.fixture(scope="module")
def portable_kernel(tmp_path_factory):
    """The kernel built without a -march flag: on x86-64, without its AVX2 loops."""
    folder = tmp_path_factory.mktemp("portable")
    source = cpu.write_sources(folder)
    command = cpu.build_command(str(cpu.compiler()), ("-fopenmp",), source, folder / "k.so")
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    portable = cpu._Kernel(folder / "k.so")
    if platform.machine() in ("x86_64", "AMD64"):
        assert not portable.avx2  # the x86-64 baseline has no AVX2
    return portable


@needs_kernel
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.01, 0.999), (0.9, 0.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_build_without_avx2_is_bit_identical(
    precision, betas, dtype, portable_kernel, monkeypatch
):
    """The rounding loops and bfloat16's in-register step have AVX2 forms and portable ones;
    the special values through the portable build, against the reference."""
    options = dict(lr=0.01, eps=1e-12, amsgrad=True, weight_decay=0.1, betas=betas)
    expected = reference_run(dtype, precision, 4, grads=grads_with_special_values, **options)
    monkeypatch.setattr(cpu, "_kernel", portable_kernel)
    actual = optimizer_run(dtype, precision, 4, {}, grads=grads_with_special_values, **options)
    assert_bit_identical(actual, expected)


@needs_kernel
@pytest.mark.parametrize("precision", PRECISIONS)
def test_grad_scale_and_tensor_lr_are_bit_identical(precision):
    options = dict(lr=torch.tensor(0.02), amsgrad=True)
    expected = reference_run(torch.float32, precision, 8, grad_scale=1024.0, **options)
    actual = optimizer_run(
        torch.float32, precision, 8, {"fused": True}, grad_scale=1024.0, **copy.deepcopy(options)
    )
    assert_bit_identical(actual, expected)


@needs_kernel
@pytest.mark.parametrize("precision", PRECISIONS)
def test_found_inf_leaves_compressed_state_untouched(precision):
    params = make_params(torch.float32)
    opt = AdaBelief(params, state_precision=precision, fused=True)
    for p, g in zip(params, grads_for(params, 0), strict=True):
        p.grad = g
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)
    opt.step()
    after = opt.state_dict()
    for index, entry in before["state"].items():
        for key, value in entry.items():
            assert torch.equal(after["state"][index][key], value), key


@needs_kernel
@pytest.mark.parametrize("precision", PRECISIONS)
def test_multithreaded_kernel_is_bit_identical(precision):
    """Many 32768-element chunks over two threads: int8 and int4 blocks (and int4's bytes) never
    straddle chunks. The tensor ends in a partial block."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        params = [torch.nn.Parameter(torch.randn(300_002) * 0.1)]  # even: int4 applies
        single = [torch.nn.Parameter(params[0].detach().clone())]
        fused = AdaBelief(params, state_precision=precision, fused=True, amsgrad=True)
        reference = AdaBelief(single, state_precision=precision, fused=True, amsgrad=True)
        for k in range(4):
            g = torch.randn(300_002, generator=torch.Generator().manual_seed(k))
            params[0].grad, single[0].grad = g, g.clone()
            fused.step()
            torch.set_num_threads(1)
            reference.step()
            torch.set_num_threads(2)
        assert_bit_identical(
            (params, [fused.state[params[0]]]), (single, [reference.state[single[0]]])
        )
        assert cs.format_of(fused.state[params[0]]) == precision
    finally:
        torch.set_num_threads(threads)


@needs_kernel
@pytest.mark.parametrize("precision", PRECISIONS)
def test_single_and_foreach_paths_match_the_kernel_within_rounding(precision):
    """The unfused paths decode around torch's kernels, whose float32 sqrt is not always
    correctly rounded: the parameters agree to float32 rounding, not bit for bit."""
    options = dict(lr=0.01, amsgrad=True, weight_decay=0.1)
    fused = optimizer_run(torch.float32, precision, 8, {"fused": True}, **options)
    for path in ({"foreach": False, "fused": False}, {"foreach": True, "fused": False}):
        other = optimizer_run(torch.float32, precision, 8, path, **options)
        for p, q in zip(fused[0], other[0], strict=True):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@needs_kernel
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_compiled_path_agrees_within_float32_rounding(precision):
    """fused=True, capturable=True: the compiled tensor-math path (CUDA's) on CPU, one generated
    kernel per group that decodes, updates and encodes. Its float32 arithmetic is not the fma
    form of the kernel, so one step from the same state agrees within float32 rounding; a code
    differs (by one level) only where that rounding moved the value across a dither threshold.
    Its first step from zero state gives bit-identical moments (the parameters within an ulp)."""
    from torch._dynamo.utils import counters

    options = dict(lr=0.01, amsgrad=True, weight_decay=0.1)
    params = make_params(torch.float32)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    kernel = AdaBelief(params, state_precision=precision, fused=True, **options)
    compiled = AdaBelief(twins, state_precision=precision, fused=True, capturable=True, **options)
    torch._dynamo.reset()
    counters.clear()
    for k in range(5):
        for p, q, g in zip(params, twins, grads_for(params, k), strict=True):
            p.grad, q.grad = g, g.clone()
        kernel.step()
        if k == 0:
            compiled.step()
            for p, q in zip(params, twins, strict=True):
                torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-6, atol=1e-8)
                for key, value in kernel.state[p].items():
                    assert torch.equal(compiled.state[q][key], value), key
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    # One more step of each from the kernel's state.
    compiled.load_state_dict(copy.deepcopy(kernel.state_dict()))
    with torch.no_grad():
        for p, q in zip(params, twins, strict=True):
            q.copy_(p)
    for p, q, g in zip(params, twins, grads_for(params, 5), strict=True):
        p.grad, q.grad = g, g.clone()
    kernel.step()
    compiled.step()
    for i, (p, q) in enumerate(zip(params, twins, strict=True)):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-5, atol=1e-7, msg=f"param {i}")
        for key, stored in kernel.state[p].items():
            other = compiled.state[q][key]
            if key.endswith("_scale") or stored.dtype == torch.float32:
                torch.testing.assert_close(other, stored, rtol=1e-5, atol=1e-30, msg=key)
                continue
            if stored.dtype == torch.bfloat16:  # one bfloat16 ulp at most
                gap = (other.float() - stored.float()).abs() / stored.float().abs().clamp_min(1e-30)
                assert float(gap.max()) <= 2.0**-7, key
            else:  # int8 / uint8 codes: one level at most
                assert int((other.int() - stored.int()).abs().max()) <= 1, key
            assert float((other != stored).float().mean()) < 0.05, key
    torch._dynamo.reset()


@needs_kernel
@pytest.mark.parametrize("scale", [1024.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_scale_power_of_two_or_not(scale, dtype):
    """The kernel multiplies by 1/grad_scale, exact for GradScaler's powers of two; another
    scale takes the tensor path, which divides: both match dividing the gradients first."""
    params = make_params(dtype)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = AdaBelief(params, fused=True, amsgrad=True)
    reference = AdaBelief(twins, fused=True, amsgrad=True)
    for k in range(4):
        for p, q, g in zip(params, twins, grads_for(params, k), strict=True):
            p.grad = (g.float() * scale).to(dtype)
            q.grad = (p.grad.float() / scale).to(dtype)
        opt.grad_scale, opt.found_inf = torch.tensor(scale), torch.tensor(0.0)
        opt.step()
        reference.step()
    for p, q in zip(params, twins, strict=True):
        if scale == 1024.0 or dtype == torch.float32:
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-7)
        else:  # the reference rounded g/3 to bfloat16 first; the step divided in float32
            torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-2, atol=1e-3)


def grads_with_one_non_finite_element(params, step):
    """Ordinary gradients, except at step 2: one inf element in the 4096-element tensor and one
    NaN element in the 6300-element one, as without GradScaler."""
    grads = grads_for(params, step)
    if step == 2:
        grads[0].view(-1)[5] = float("inf")
        grads[1].view(-1)[1000] = float("nan")
    return grads


PATHS = {
    "fused": {},
    "tensor": {"capturable": True},
    "foreach": {"foreach": True},
    "single": {"foreach": False},
}


@pytest.mark.parametrize(
    "path", [pytest.param("fused", marks=needs_kernel), "tensor", "foreach", "single"]
)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["", "amsgrad"])
def test_a_non_finite_gradient_element_costs_only_what_fp32_state_loses(path, precision, amsgrad):
    """One inf (or NaN) gradient element loses that element, with float32 state as with
    compressed state; int8 used to lose its whole 256-element block (the block's scale became
    inf or NaN). Against a run without the bad element: the other blocks (bf16: all the other
    elements) are bit-identical, and the bad element's block-mates, whose shared scale no longer
    sees it, stay finite and within the format's rounding noise."""
    options = dict(lr=0.01, amsgrad=amsgrad)
    bad, good = grads_with_one_non_finite_element, grads_for
    fp32 = optimizer_run(torch.float32, "fp32", 6, PATHS[path], grads=bad, **options)
    run = optimizer_run(torch.float32, precision, 6, PATHS[path], grads=bad, **options)
    clean = optimizer_run(torch.float32, precision, 6, PATHS[path], grads=good, **options)
    for i, (p, state) in enumerate(zip(*run, strict=True)):
        p, want = p.detach().view(-1), clean[0][i].detach().view(-1)
        lost = ~fp32[0][i].detach().view(-1).isfinite()
        assert int(lost.sum()) == (1 if i < 2 else 0), "the test's premise"
        block = lost.clone()
        size = {"int8": cs.BLOCK_SIZE, "int4": cs.INT4.block_size}.get(cs.format_of(state))
        if size is not None:  # the lost element's whole block
            index = torch.arange(p.numel()) // size
            block = torch.isin(index, index[lost])
        assert torch.equal(p[~block], want[~block]), f"param {i}: another block changed"
        mates = block & ~lost
        assert p[mates].isfinite().all(), f"param {i}: the loss spread in its block"
        # int4 (15 levels, not 255) changes the size of the 6 steps (lr 0.01) more
        noise = 0.1 if cs.format_of(state) == "int4" else 5e-3
        torch.testing.assert_close(p[mates], want[mates], rtol=0, atol=noise)
        for key, moment in cs.decode_moments(state).items():
            assert moment.view(-1)[~lost].isfinite().all(), f"param {i}: {key}"
        for key in [k for k in state if k.endswith("_scale")]:
            assert state[key].isfinite().all(), f"param {i}: {key}"


@needs_kernel
@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["", "amsgrad"])
def test_a_non_finite_gradient_element_is_bit_identical_in_the_kernel(precision, amsgrad):
    """The kernel's finite block scales and clamped codes are compressed_state.encode's."""
    options = dict(lr=0.01, amsgrad=amsgrad)
    bad = grads_with_one_non_finite_element
    expected = reference_run(torch.float32, precision, 6, grads=bad, **options)
    actual = optimizer_run(torch.float32, precision, 6, {}, grads=bad, **options)
    assert_bit_identical(actual, expected)


def test_int8_encoding_of_non_finite_values():
    """A block's scale is its largest finite magnitude; inf is stored as the clamp, NaN as 0;
    the other elements are coded exactly as without them."""
    work = torch.linspace(-1.0, 2.0, 512)
    belief = torch.linspace(0.0, 3.0, 512)
    dirty = work.clone()
    dirty[3], dirty[4], dirty[300] = float("inf"), float("-inf"), float("nan")
    dirty_belief = belief.clone()
    dirty_belief[3], dirty_belief[300] = float("inf"), float("nan")
    (clean_codes, clean_scale), (clean_roots, _) = cs.encode([work, belief], "int8", 7)
    # Each moment's codes depend on its own values and the other's (they share a hash): change
    # them one at a time.
    (codes, scale), _ = cs.encode([dirty, belief], "int8", 7)
    assert torch.equal(scale, clean_scale)
    assert codes[3] == 127 and codes[4] == -127 and codes[300] == 0
    others = torch.ones(512, dtype=torch.bool)
    others[[3, 4, 300]] = False
    assert torch.equal(codes[others], clean_codes[others])
    _, (roots, root_scale) = cs.encode([work, dirty_belief], "int8", 7)
    assert root_scale.isfinite().all() and roots[3] == 255 and roots[300] == 0
    others[4] = True
    assert torch.equal(roots[others], clean_roots[others])
