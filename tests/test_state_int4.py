"""state_precision="int4": packed 4-bit codes, unbiased rounding, paths, checkpoints, fallbacks."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from adabelief import AdaBelief
from adabelief import compressed_state as cs
from adabelief.kernels import cpu, dispatch, tensor_math
from tiny_training import resume_through_checkpoint, tiny_data, tiny_model, train_tiny


def _stored(m: torch.Tensor, s: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
    param = torch.zeros(m.shape)
    state = {
        **cs.new_moment(param, "exp_avg", "int4"),
        **cs.new_moment(param, "exp_avg_var", "int4"),
    }
    cs.encode_moments_(state, {"exp_avg": m, "exp_avg_var": s}, step)
    return state


def test_layout_and_packing():
    block = cs.INT4.block_size
    m = torch.zeros(2, block)
    m[0, 0], m[0, 1], m[1, 0] = 1.0, -1.0, -2.0  # block maxima: the top codes, exactly
    s = torch.zeros(2, block)
    s[0, 1], s[1, 0] = 3.0, 5.0
    state = _stored(m, s, step=1)
    assert cs.format_of(state) == "int4"
    assert state["exp_avg"].dtype == state["exp_avg_var"].dtype == torch.uint8
    assert state["exp_avg"].shape == (1, block)  # the first dimension halved
    assert state["exp_avg_scale"].tolist() == [1.0, 2.0]
    assert state["exp_avg_var_scale"].tolist() == [3.0, 5.0]
    # Element 2i in the low nibble of byte i, 2i + 1 in the high one; -7 is 0b1001.
    assert int(state["exp_avg"][0, 0]) == 0x97
    assert int(state["exp_avg"][0, block // 2]) == 0x09
    assert int(state["exp_avg_var"][0, 0]) == 0xF0
    assert int(state["exp_avg_var"][0, block // 2]) == 0x0F
    decoded = cs.decode_moments(state)
    assert torch.equal(decoded["exp_avg"], m)
    assert torch.equal(decoded["exp_avg_var"], s)


def test_round_trip_error_is_one_level_and_beliefs_stay_positive():
    torch.manual_seed(0)
    m = torch.randn(64, 256) * 1e-2
    s = torch.rand(64, 256).pow(6) * 1e-6 + 1e-16  # small and heavy-tailed, like a belief
    decoded = cs.decode_moments(_stored(m, s, step=3))
    block = cs.INT4.block_size
    for key, values, top, power in (
        ("exp_avg", m, 7, cs.INT4.signed_power),
        ("exp_avg_var", s, 15, cs.INT4.belief_power),
    ):
        scale = values.reshape(-1, block).abs().amax(1, keepdim=True)
        levels = (torch.arange(top + 1, dtype=torch.float64) / top).pow(power).float()
        gap = float((levels[1:] - levels[:-1]).max())
        error = (decoded[key] - values).reshape(-1, block).abs()
        assert (error <= gap * scale * 1.0001).all(), key
    assert (decoded["exp_avg_var"] > 0).all()


def test_rounding_is_unbiased_in_value_and_deterministic():
    torch.manual_seed(1)
    m = torch.randn(32, 128) * 1e-3
    s = torch.rand(32, 128).pow(4) * 1e-6 + 1e-12
    first = _stored(m, s, step=5)
    again = _stored(m, s, step=5)
    assert all(torch.equal(first[k], again[k]) for k in first)
    total = {"exp_avg": torch.zeros_like(m), "exp_avg_var": torch.zeros_like(s)}
    steps = 400
    for step in range(steps):
        for key, value in cs.decode_moments(_stored(m, s, step)).items():
            total[key] += value
    for key, truth in (("exp_avg", m), ("exp_avg_var", s)):
        bias = (total[key] / steps - truth).abs().mean() / truth.abs().mean()
        assert bias < 0.03, key


def test_non_finite_values_cost_their_own_element():
    m = torch.full((64, 128), 1e-3)
    m[0, 3], m[0, 4], m[1, 0] = float("inf"), float("-inf"), float("nan")
    decoded = cs.decode_moments(_stored(m, m.abs().nan_to_num(0.0), step=1))
    assert float(decoded["exp_avg"][0, 3]) == pytest.approx(1e-3)
    assert float(decoded["exp_avg"][0, 4]) == pytest.approx(-1e-3)
    assert float(decoded["exp_avg"][1, 0]) == 0.0
    assert torch.allclose(decoded["exp_avg"][0, :3], m[0, :3])


def test_which_parameters_take_int4():
    assert cs.storage_format(torch.zeros(64, 96), "int4") == "int4"
    assert cs.storage_format(torch.zeros(96), "int4") == "fp32"  # too small for scales
    assert cs.storage_format(torch.zeros(64, 32, 3, 3), "int4") == "int4"
    assert cs.storage_format(torch.zeros(63, 96), "int4") == "int8"  # odd first dimension
    assert cs.storage_format(torch.zeros(64, 96, dtype=torch.float64), "int4") == "fp32"
    model = tiny_model()
    opt = AdaBelief(model.parameters(), state_precision="int4")
    train_tiny(model, opt, 1)
    assert cs.format_of(opt.state[model[0].weight]) == "int4"
    assert cs.format_of(opt.state[model[0].bias]) == "fp32"


def test_bytes_per_parameter():
    assert cs.bytes_per_parameter("int4") == pytest.approx(2 * (0.5 + 4 / cs.INT4.block_size))
    assert cs.bytes_per_parameter("int4", amsgrad=True) == pytest.approx(
        1.5 * cs.bytes_per_parameter("int4")
    )
    model = tiny_model()
    opt = AdaBelief([model[0].weight], state_precision="int4")
    train_tiny(model, opt, 1)
    state = opt.state[model[0].weight]
    nbytes = sum(t.numel() * t.element_size() for k, t in state.items() if k != "step")
    assert nbytes / model[0].weight.numel() == pytest.approx(cs.bytes_per_parameter("int4"))


def test_validation_lists_int4():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"'int4'"):
        AdaBelief([p], state_precision="int2")


PATHS = [dict(foreach=False), dict(foreach=True), dict(capturable=True), dict(fused=True), {}]


def _run_paths(steps: int) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """A 64x96 weight (int4 state) stepped on each of :data:`PATHS`, with warnings as errors."""
    x, _ = tiny_data()
    y = torch.randn(128, 96, generator=torch.Generator().manual_seed(2))
    results = []
    for path in PATHS:
        torch.manual_seed(0)
        model = torch.nn.Linear(64, 96, bias=False)
        opt = AdaBelief(model.parameters(), lr=1e-2, amsgrad=True, state_precision="int4", **path)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(steps):
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(x), y).backward()
                opt.step()
        assert cs.format_of(opt.state[model.weight]) == "int4"
        results.append((model.weight.detach().clone(), opt.state[model.weight]))
    return results


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_path_stores_the_same_codes():
    """The format is one function on every path: from the same work moments (the first step
    from zero state) the single-tensor, foreach, tensor and fused-CPU paths store the same
    codes and scales bit for bit. (Their update arithmetic differs within float32 rounding:
    torch's float32 sqrt and division on each path, as for int8.)"""
    first = _run_paths(1)
    for _, state in first[1:]:
        assert _same_state(first[0][1], state)


def test_paths_are_bit_identical_over_a_run():
    """single-tensor and foreach agree bit for bit over several steps; so do the default path
    and fused=True, both the fused CPU kernel (no FusedFallbackWarning: warnings are errors in
    :func:`_run_paths`), which is bit-identical to decoding, the fp32 kernel and encoding
    (tests/test_compressed_kernels.py)."""
    single, foreach, _, fused, default = _run_paths(6)
    for a, b in ((single, foreach), (fused, default)):
        assert torch.equal(a[0], b[0])
        assert _same_state(a[1], b[1])


@pytest.fixture
def kernel_only(monkeypatch):
    """The fused CPU kernel, and no eager tensor step: int4 parameters stay on the fast path."""
    if cpu.kernel() is None:
        pytest.skip(f"the fused CPU kernel cannot be built here: {cpu.kernel_error()}")

    def refuse(*args, **kwargs):
        raise AssertionError("the eager tensor step ran")

    monkeypatch.setattr(tensor_math, "tensor_step", refuse)


@pytest.mark.parametrize("path", [{}, dict(fused=True)], ids=["default", "fused"])
def test_the_fused_kernel_steps_int4_parameters(kernel_only, path):
    model = tiny_model()
    opt = AdaBelief(model.parameters(), lr=1e-2, amsgrad=True, state_precision="int4", **path)
    train_tiny(model, opt, 3)
    assert cs.format_of(opt.state[model[0].weight]) == "int4"


def test_the_kernel_refuses_int4_codes_of_another_size(kernel_only):
    """The kernel writes every byte and scale of an int4 moment: the functional step checks
    their sizes first (an odd first dimension's codes cover one row too few)."""
    param = torch.zeros(3, 4096)
    moments = [cs.INT4.zeros(param, belief) for belief in (False, True)]
    step = torch.zeros(())
    with pytest.raises(ValueError, match="its int4 codes hold 8192 elements, its parameter 12288"):
        dispatch.adabelief(
            [param], [torch.ones_like(param)], moments[:1], moments[1:], [], [step], fused=True
        )
    assert float(step) == 0.0 and not param.any()  # checked before anything changed


@pytest.mark.parametrize(
    ("name", "short"),
    [(name, "codes") for name in ("fp32", "bf16", "int8", "int4")]
    + [("int8", "scale"), ("int4", "scale")],
)
def test_the_kernel_refuses_moments_of_another_size_in_every_format(kernel_only, name, short):
    """Every format's codes (and block scales) are checked against the parameter before the
    kernel, which reads and writes all of them, runs."""
    fmt = cs.FORMATS[name]
    param = torch.zeros(64, 128)
    other = torch.zeros(32, 128) if short == "codes" else param
    moments = [fmt.zeros(other, belief) for belief in (False, True)]
    if short == "scale":
        moments = [m._replace(scale=m.scale[:-1]) for m in moments]
    step = torch.zeros(())
    with pytest.raises(ValueError, match=f"its {name} {short if short == 'codes' else 'scales'}"):
        dispatch.adabelief(
            [param], [torch.ones_like(param)], moments[:1], moments[1:], [], [step], fused=True
        )
    assert float(step) == 0.0 and not param.any()  # checked before anything changed


@pytest.mark.parametrize(
    ("dtype", "master"),
    [(torch.float32, "round"), (torch.bfloat16, "residual"), (torch.float16, "fp32")],
    ids=str,
)
def test_a_kernel_run_resumed_mid_training_is_bit_exact(kernel_only, dtype, master):
    """Saved after 5 kernel steps, loaded into a fresh optimizer (through torch.save and
    torch.load(weights_only=True)), both runs go on for 4 more steps bit for bit. 64 x 201
    elements: 100 blocks and a half."""

    def make(params):
        return AdaBelief(
            params, lr=1e-2, amsgrad=True, weight_decay=0.1, state_precision="int4",
            master_weights=master,
        )  # fmt: skip

    gen = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter((torch.randn(64, 201, generator=gen) * 0.1).to(dtype))
    grads = [(torch.randn(64, 201, generator=gen) * 0.01).to(dtype) for _ in range(9)]
    opt = make([weight])
    for g in grads[:5]:
        weight.grad = g
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    twin = torch.nn.Parameter(weight.detach().clone())
    resumed = make([twin])
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for g in grads[5:]:
        weight.grad, twin.grad = g, g.clone()
        opt.step()
        resumed.step()
    assert cs.format_of(opt.state[weight]) == "int4"
    assert torch.equal(weight, twin)
    assert _same_state(opt.state[weight], resumed.state[twin])


@pytest.mark.parametrize("path", [dict(foreach=False), dict(fused=True)], ids=str)
def test_checkpoint_resume_is_bit_exact(path):
    kwargs = dict(lr=1e-2, amsgrad=True, state_precision="int4", **path)
    model = tiny_model()
    opt = AdaBelief(model.parameters(), **kwargs)
    train_tiny(model, opt, 8)
    resumed, resumed_opt = resume_through_checkpoint(
        model, opt, lambda params: AdaBelief(params, **kwargs)
    )
    train_tiny(model, opt, 4)
    train_tiny(resumed, resumed_opt, 4)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
        for key, value in opt.state[a].items():
            assert torch.equal(value, resumed_opt.state[b][key]), key


@pytest.mark.parametrize(
    ("saved", "chosen"),
    [("fp32", "int4"), ("bf16", "int4"), ("int8", "int4"), ("int4", "int8"), ("int4", "fp32")],
    ids=str,
)
def test_loading_another_format_converts(saved, chosen):
    model = tiny_model()
    opt = AdaBelief(model.parameters(), lr=1e-2, amsgrad=True, state_precision=saved)
    train_tiny(model, opt, 6)
    loaded = AdaBelief(model.parameters(), lr=1e-2, amsgrad=True, state_precision=chosen)
    loaded.load_state_dict(opt.state_dict())
    weight = model[0].weight
    state = loaded.state[weight]
    assert cs.format_of(state) == chosen
    want, got = cs.decode_moments(opt.state[weight]), cs.decode_moments(state)
    for key, value in want.items():
        # Within the int4 levels' widest gap of the largest magnitude, and unbiased.
        error = got[key] - value
        assert error.abs().max() <= 0.5 * value.abs().max(), key
        assert error.abs().mean() <= 0.3 * value.abs().mean(), key
        assert abs(float(error.mean())) <= 0.05 * float(value.abs().mean()), key
    train_tiny(model, loaded, 2)
    assert cs.format_of(loaded.state[weight]) == chosen


def test_training_quality_close_to_fp32():
    reference = tiny_model()
    loss_fp32 = train_tiny(reference, AdaBelief(reference.parameters(), lr=1e-2), 150)
    model = tiny_model()
    loss = train_tiny(model, AdaBelief(model.parameters(), lr=1e-2, state_precision="int4"), 150)
    initial = train_tiny(tiny_model(), torch.optim.SGD(tiny_model().parameters(), lr=0.0), 1)
    assert loss < 0.05 * initial
    assert loss == pytest.approx(loss_fp32, rel=0.5, abs=1e-3)


@contextlib.contextmanager
def _one_rank_mesh() -> Iterator[Any]:
    """A one-process gloo group and its one-rank CPU mesh, destroyed afterwards."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_a_dtensor_parameter_keeps_int4_where_its_shards_are_whole_pairs_of_rows():
    """On a DTensor whose shards hold whole pairs of rows the codes are those of the unsharded
    tensor, placed as the parameter (tests/test_distributed.py shards them over 2 ranks); a
    DTensor sharded along another dimension falls back to int8, which needs contiguous shards
    too, and so keeps float32."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    with _one_rank_mesh() as mesh:
        initial, grad = torch.randn(64, 97), torch.randn(64, 97)  # odd rows: pairs cross them
        plain = torch.nn.Parameter(initial.clone())
        weight = torch.nn.Parameter(distribute_tensor(initial.clone(), mesh, [Shard(0)]))
        assert cs.storage_format(weight, "int4") == "int4"
        optimizers = [
            AdaBelief([p], state_precision="int4", foreach=False) for p in (plain, weight)
        ]
        for p, opt in zip((plain, weight), optimizers, strict=True):
            p.grad = (
                grad.clone() if p is plain else distribute_tensor(grad.clone(), mesh, [Shard(0)])
            )
            opt.step()
        state, expected = optimizers[1].state[weight], optimizers[0].state[plain]
        assert cs.format_of(state) == "int4"
        assert isinstance(state["exp_avg"], DTensor) and state["exp_avg"].placements == (Shard(0),)
        for key, value in expected.items():
            stored = state[key]
            assert torch.equal(
                stored.full_tensor() if isinstance(stored, DTensor) else stored, value
            )
        across = distribute_tensor(torch.randn(64, 96), mesh, [Shard(1)])
        assert cs.storage_format(across, "int4") == "fp32"
        small = distribute_tensor(torch.randn(96), mesh, [Shard(0)])
        assert cs.storage_format(small, "int4") == "fp32"


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_a_fallback_of_the_layout_warns_once_and_one_of_the_tensor_passes_silently(monkeypatch):
    """A parameter whose placements refuse int4 and int8 keeps float32 state, and says so once
    per process and reason (its checkpoints load only where it takes float32 too); small
    tensors fall back silently, on every mesh alike (the two-rank case of unpaired rows is in
    tests/test_distributed.py)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    monkeypatch.setattr(cs, "_layout_warnings", set())
    with _one_rank_mesh() as mesh:
        across = [
            torch.nn.Parameter(distribute_tensor(torch.randn(64, 96), mesh, [Shard(1)]))
            for _ in range(2)
        ]
        small = torch.nn.Parameter(distribute_tensor(torch.randn(96), mesh, [Shard(0)]))
        assert cs.FORMATS["int4"].layout_refusal(small) is None
        opt = AdaBelief([*across, small], state_precision="int4", foreach=False)
        for p in opt.param_groups[0]["params"]:
            p.grad = distribute_tensor(torch.ones(p.shape), mesh, p.placements)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
            opt.step()
        said = [w for w in caught if issubclass(w.category, cs.StateFormatFallbackWarning)]
        assert len(said) == 1, [str(w.message) for w in caught]
        message = str(said[0].message)
        assert "state_precision='int4'" in message and "as 'fp32'" in message
        assert "Shard(dim=1)" in message and "(64, 96)" in message
        assert all(cs.format_of(opt.state[p]) == "fp32" for p in opt.state)
