"""state_precision="bf16" | "int8": storage, rounding, training quality, checkpoints."""

from __future__ import annotations

import io

import pytest
import torch

from adabelief import AdaBelief
from adabelief import compressed_state as cs
from tiny_training import resume_through_checkpoint, tiny_data, tiny_model, train_tiny

PRECISIONS = ["fp32", "bf16", "int8"]


def test_invalid_state_precision_is_rejected():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"state_precision.*'fp8'"):
        AdaBelief([p], state_precision="fp8")
    opt = AdaBelief([p])
    with pytest.raises(ValueError, match="state_precision"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "state_precision": 8})


@pytest.mark.parametrize(
    ("precision", "dtypes"),
    [
        ("fp32", {"exp_avg": torch.float32, "exp_avg_var": torch.float32}),
        ("bf16", {"exp_avg": torch.bfloat16, "exp_avg_var": torch.bfloat16}),
        ("int8", {"exp_avg": torch.int8, "exp_avg_var": torch.uint8}),
    ],
)
def test_storage_dtypes_and_small_tensors_stay_fp32(precision, dtypes):
    model = tiny_model()
    opt = AdaBelief(model.parameters(), state_precision=precision)
    train_tiny(model, opt, 1)
    big = opt.state[model[0].weight]  # 6144 elements
    for key, dtype in dtypes.items():
        assert big[key].dtype == dtype
        assert big[key].shape == model[0].weight.shape
    bias = opt.state[model[0].bias]  # 96 elements
    expected_bias = torch.bfloat16 if precision == "bf16" else torch.float32
    assert bias["exp_avg"].dtype == expected_bias
    if precision == "int8":
        assert big["exp_avg_scale"].numel() == -(-model[0].weight.numel() // cs.BLOCK_SIZE)
        assert "exp_avg_scale" not in bias


def test_bytes_per_parameter():
    assert cs.bytes_per_parameter("fp32") == 8.0
    assert cs.bytes_per_parameter("bf16") == 4.0
    assert cs.bytes_per_parameter("int8") == pytest.approx(2.03125)
    model = tiny_model()
    for precision, budget in (("bf16", 4.0), ("int8", 2.05)):
        opt = AdaBelief([model[0].weight], state_precision=precision)
        train_tiny(model, opt, 1)
        state = opt.state[model[0].weight]
        nbytes = sum(t.numel() * t.element_size() for k, t in state.items() if k != "step")
        assert nbytes / model[0].weight.numel() <= budget


def bf16_round(values, step, partner=None):
    """``values`` stored as bfloat16 exp_avg (its dither: the low half of the hash it shares
    with exp_avg_var, here ``partner``)."""
    partner = torch.zeros_like(values) if partner is None else partner
    return cs.encode([values, partner], "bf16", step)[0][0]


def test_stochastic_bf16_rounding_is_unbiased_and_deterministic():
    values = torch.rand(200_000) * 1e-3 + 1e-3
    first = bf16_round(values, step=7)
    assert torch.equal(first, bf16_round(values, step=7))
    assert not torch.equal(first, bf16_round(values, step=8))
    error = first.float() - values
    nearest = values.to(torch.bfloat16).float() - values
    # Each value lands on one of its two bfloat16 neighbours ...
    assert (error.abs() <= values * 2**-7).all()
    # ... and on average on the value itself, unlike round-to-nearest's per-value bias.
    assert abs(float(error.mean())) < 0.02 * float(nearest.abs().mean())
    # So does exp_avg_var, which takes the other half of the shared hash.
    second = cs.encode([values.flip(0), values], "bf16", 7)[1][0].float() - values
    assert abs(float(second.mean())) < 0.02 * float(nearest.abs().mean())
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.0e38])
    assert torch.equal(bf16_round(special, 1)[:4].float(), special[:4])


def test_the_dither_halves_are_uniform_and_independent():
    """One hash serves exp_avg (low 16 bits) and exp_avg_var (high 16 bits): over the steps, each
    half of one element's dither is uniform, and the two are uncorrelated."""
    a, b = torch.tensor([1.5e-3]), torch.tensor([2.5e-2])
    halves = torch.tensor([[int(d) for d in cs.dithers([a, b], t)] for t in range(4000)])
    low_t, high_t = halves.double().unbind(1)
    for half in (low_t, high_t):
        assert half.min() >= 0 and half.max() < 2**16
        assert abs(float(half.mean()) / 2**16 - 0.5) < 0.02
    assert abs(float(torch.corrcoef(torch.stack([low_t, high_t]))[0, 1])) < 0.05


def int8_store(values, key, step):
    """``values`` stored as int8 moment ``key`` (the other moment of the pair: zeros of the same
    shape); returns the state."""
    param = torch.zeros(values.shape)
    state = {
        **cs.new_moment(param, "exp_avg", "int8"),
        **cs.new_moment(param, "exp_avg_var", "int8"),
    }
    work = {"exp_avg": torch.zeros_like(values), "exp_avg_var": torch.zeros_like(values)}
    work[key] = values
    cs.encode_moments_(state, work, step)
    return state


@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_var"])
def test_int8_round_trip_error_is_bounded(key):
    torch.manual_seed(0)
    if key == "exp_avg":
        values = torch.randn(10_000) * 1e-2
    else:
        values = torch.rand(10_000).pow(4) * 1e-4 + 1e-16
    state = int8_store(values, key, step=3)
    decoded = cs.decode_moments(state)[key]
    blocks = cs._padded_blocks(values)
    if key == "exp_avg":
        level = (blocks.abs().amax(1) / 127).repeat_interleave(cs.BLOCK_SIZE)[: values.numel()]
        assert ((decoded - values).abs() <= level * 1.0001).all()
    else:
        # Beliefs are never rounded to zero: the step they divide stays bounded.
        assert (decoded > 0).all()
        roots = blocks.sqrt()
        level = (roots.amax(1) / 255).repeat_interleave(cs.BLOCK_SIZE)[: values.numel()]
        assert ((decoded.sqrt() - values.sqrt()).abs() <= level * 1.0001).all()


@pytest.mark.slow
def test_int8_moving_average_does_not_freeze():
    """A belief decaying by 0.1% a step moves less than half a level per step: deterministic
    rounding would keep it where it started; stochastic rounding follows it (the 16-bit dither
    resolves 1/65536 of a level)."""
    truth = torch.ones(4096)
    target = torch.linspace(0.0, 0.5, 4096)
    state = int8_store(truth, "exp_avg_var", 0)
    for step in range(1, 1501):
        work = cs.decode_moments(state)
        work["exp_avg_var"].mul_(0.999).add_(target, alpha=0.001)
        cs.encode_moments_(state, work, step)
        truth.mul_(0.999).add_(target, alpha=0.001)
    final = cs.decode_moments(state)["exp_avg_var"]
    assert float(truth.mean()) < 0.7  # the truth moved well away from 1
    assert abs(float(((final - truth) / truth).mean())) < 0.01


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_training_quality_close_to_fp32(precision):
    reference = tiny_model()
    loss_fp32 = train_tiny(reference, AdaBelief(reference.parameters(), lr=1e-2), 150)
    model = tiny_model()
    loss = train_tiny(model, AdaBelief(model.parameters(), lr=1e-2, state_precision=precision), 150)
    initial = train_tiny(tiny_model(), torch.optim.SGD(tiny_model().parameters(), lr=0.0), 1)
    assert loss < 0.05 * initial
    assert loss == pytest.approx(loss_fp32, rel=0.5, abs=1e-3)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("foreach", [False, True])
def test_checkpoint_resume_is_bit_exact(precision, foreach):
    kwargs = dict(lr=1e-2, amsgrad=True, state_precision=precision, foreach=foreach)
    model = tiny_model()
    opt = AdaBelief(model.parameters(), **kwargs)
    train_tiny(model, opt, 8)
    resumed, resumed_opt = resume_through_checkpoint(
        model, opt, lambda params: AdaBelief(params, **kwargs)
    )
    for original, loaded in zip(model.parameters(), resumed.parameters(), strict=True):
        for key, value in opt.state[original].items():
            assert resumed_opt.state[loaded][key].dtype == value.dtype, key
    train_tiny(model, opt, 4)
    train_tiny(resumed, resumed_opt, 4)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        for key, value in opt.state[a].items():
            assert torch.equal(value, resumed_opt.state[b][key]), key


def test_bf16_parameters_with_bf16_state_keep_bf16_after_load():
    model = tiny_model().to(torch.bfloat16)
    opt = AdaBelief(model.parameters(), state_precision="bf16")
    x, y = tiny_data()
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x.bfloat16()), y.bfloat16()).backward()
        opt.step()
    fresh = AdaBelief(model.parameters(), state_precision="bf16")
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state[model[0].weight]["exp_avg"].dtype == torch.bfloat16
    fp32_state = AdaBelief(model.parameters())
    fp32_state.load_state_dict({**opt.state_dict()})
    # The checkpoint's group says bf16; the optimizer's fp32 is kept and the state converted.
    assert fp32_state.param_groups[0]["state_precision"] == "fp32"
    opt_state_before = opt.state[model[0].weight]["exp_avg"].float()
    fp32_state.zero_grad()
    torch.nn.functional.mse_loss(model(x.bfloat16()), y.bfloat16()).backward()
    fp32_state.step()
    state = fp32_state.state[model[0].weight]
    assert state["exp_avg"].dtype == torch.float32
    assert not torch.equal(state["exp_avg"], opt_state_before)


def test_switching_precision_mid_run_converts_state():
    model = tiny_model()
    opt = AdaBelief(model.parameters(), lr=1e-2)
    train_tiny(model, opt, 10)
    before = opt.state[model[0].weight]["exp_avg"].clone()
    opt.param_groups[0]["state_precision"] = "int8"
    work_before = cs.decode_moments(opt.state[model[0].weight])["exp_avg"]
    assert torch.equal(work_before, before)
    train_tiny(model, opt, 1)
    state = opt.state[model[0].weight]
    assert state["exp_avg"].dtype == torch.int8
    assert "exp_avg_scale" in state
    opt.param_groups[0]["state_precision"] = "fp32"
    train_tiny(model, opt, 1)
    assert opt.state[model[0].weight]["exp_avg"].dtype == torch.float32
    assert "exp_avg_scale" not in opt.state[model[0].weight]


@pytest.mark.parametrize(
    ("saved", "chosen"),
    [(a, b) for a in PRECISIONS for b in PRECISIONS if a != b],
    ids=lambda value: value,
)
def test_loading_another_format_keeps_the_optimizers_own(saved, chosen):
    """An optimizer built with "int8" for memory stays int8 when it loads a bf16 (or fp32)
    checkpoint: the moments are decoded to float32 and encoded in its format, not the
    checkpoint's, and training goes on from them."""
    model = tiny_model()
    opt = AdaBelief(model.parameters(), lr=1e-2, amsgrad=True, state_precision=saved)
    train_tiny(model, opt, 6)
    checkpoint = opt.state_dict()
    loaded = AdaBelief(model.parameters(), lr=1e-2, amsgrad=True, state_precision=chosen)
    loaded.load_state_dict(checkpoint)
    assert [g["state_precision"] for g in loaded.param_groups] == [chosen]
    weight = model[0].weight  # 6144 elements: quantized under int8
    state = loaded.state[weight]
    assert cs.format_of(state) == chosen
    for key in ("exp_avg", "exp_avg_var", "max_exp_avg_var"):
        assert state[key].dtype == cs.new_moment(weight, key, chosen)[key].dtype, key
        assert (key + "_scale" in state) == (chosen == "int8"), key
    # The values are the checkpoint's, within the coarser format's rounding.
    want, got = cs.decode_moments(opt.state[weight]), cs.decode_moments(state)
    coarse = "int8" if "int8" in (saved, chosen) else "bf16"
    for key, value in want.items():
        scale = value.abs().max()
        tolerance = 2 / 127 if coarse == "int8" else 2**-7
        assert (got[key] - value).abs().max() <= tolerance * scale, key
    before = state["exp_avg"].clone()
    train_tiny(model, loaded, 2)
    assert cs.format_of(loaded.state[weight]) == chosen
    assert not torch.equal(loaded.state[weight]["exp_avg"], before)


class _Fp16Format(cs.StorageFormat):
    """A toy format for the test below: float16, rounded to nearest."""

    name = "fp16"
    bytes_per_element = 2.0

    def zeros(self, param: torch.Tensor, belief: bool) -> cs.Moment:
        return cs.Moment(torch.zeros_like(param, dtype=torch.float16), None, self, belief)

    def decode(self, moment: cs.Moment) -> torch.Tensor:
        return moment.codes.float()

    def encode(self, work, step):
        return [(w.half(), None) for w in work]

    def holds(self, dtype: torch.dtype, scaled: bool) -> bool:
        return dtype == torch.float16 and not scaled


@pytest.mark.parametrize(
    "path", [dict(foreach=False), dict(foreach=True), dict(capturable=True)], ids=str
)
def test_a_new_format_is_one_storage_format_object(monkeypatch, path):
    """The measure of the design: a format defined only by a StorageFormat in FORMATS trains on
    the single-tensor, foreach and tensor paths (the fused kernel would also need its code),
    and its state_dict round-trips through torch.load(weights_only=True) bit for bit."""
    monkeypatch.setitem(cs.FORMATS, "fp16", _Fp16Format())
    monkeypatch.setattr(cs, "STATE_PRECISIONS", (*cs.STATE_PRECISIONS, "fp16"))
    model = tiny_model()
    reference = tiny_model()
    fp32_loss = train_tiny(reference, AdaBelief(reference.parameters(), lr=1e-2, **path), 10)
    opt = AdaBelief(model.parameters(), lr=1e-2, state_precision="fp16", **path)
    loss = train_tiny(model, opt, 5)
    for state in opt.state.values():
        assert state["exp_avg"].dtype == state["exp_avg_var"].dtype == torch.float16
        assert cs.format_of(state) == "fp16"
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    loss = train_tiny(model, opt, 5)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = tiny_model()
    resumed.load_state_dict(saved["model"])
    resumed_opt = AdaBelief(resumed.parameters(), lr=1e-2, state_precision="fp16", **path)
    resumed_opt.load_state_dict(saved["opt"])
    assert train_tiny(resumed, resumed_opt, 5) == loss
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    assert loss == pytest.approx(fp32_loss, rel=0.05)
