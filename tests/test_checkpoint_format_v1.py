"""State dicts of storage format version 1 (tests/data/state_v1.pt, saved by the code before
format version 2, see tests/data/make_state_v1.py) load into today's optimizer: the codes are
kept (version 2 decodes them alike; only the rounding of later steps changed), and training
goes on."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from adabelief import AdaBelief
from adabelief import compressed_state as cs

SAVED = Path(__file__).parent / "data" / "state_v1.pt"
NAMES = ["bf16", "bf16_amsgrad", "int8", "int8_amsgrad"]


@pytest.fixture(scope="module")
def saved():
    return torch.load(SAVED, weights_only=True)


def v1_decoded(state):
    """The moments as format version 1 decoded them (its code maps, written out here)."""
    out = {}
    for key in cs.MOMENT_KEYS:
        if key not in state:
            continue
        stored, scale = state[key], state.get(key + "_scale")
        if scale is None:
            out[key] = stored.float()
            continue
        levels = torch.nn.functional.pad(stored.reshape(-1).float(), (0, -stored.numel() % 256))
        steps = scale.unsqueeze(1) / (127.0 if key == "exp_avg" else 255.0)
        values = (levels.view(-1, 256) * steps).reshape(-1)[: stored.numel()]
        out[key] = (values if key == "exp_avg" else values.square()).view(stored.shape)
    return out


def load(entry, precision, amsgrad):
    entry = copy.deepcopy(entry)  # loading shares tensors with the state_dict; steps change them
    params = [torch.nn.Parameter(p.clone()) for p in entry["params"]]
    opt = AdaBelief(params, lr=1e-2, state_precision=precision, amsgrad=amsgrad)
    opt.load_state_dict(entry["optimizer"])
    return params, opt


def test_the_file_is_version_1_and_small(saved):
    assert SAVED.stat().st_size < 200_000
    assert sorted(saved) == sorted(NAMES)
    for entry in saved.values():
        assert cs.FORMAT_VERSION_KEY not in entry["optimizer"]  # absent: version 1


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("path", [{}, {"foreach": True}, {"fused": False, "foreach": False}])
def test_a_version_1_state_loads_as_saved_and_trains_on(saved, name, path):
    entry = saved[name]
    precision, amsgrad = name.split("_")[0], name.endswith("amsgrad")
    params, opt = load(entry, precision, amsgrad)
    for i, p in enumerate(params):
        old = entry["optimizer"]["state"][i]
        new = opt.state[p]
        assert (
            cs.format_of(new)
            == cs.format_of(old)
            == (precision if i == 0 else "fp32" if precision == "int8" else precision)
        )
        for key, value in old.items():  # the codes and scales as saved, bit for bit
            assert torch.equal(new[key], value), key
        decoded, expected = cs.decode_moments(new), v1_decoded(old)
        assert sorted(decoded) == sorted(expected)
        for key in expected:
            assert torch.equal(decoded[key], expected[key]), key
    assert opt.state_dict()[cs.FORMAT_VERSION_KEY] == cs.FORMAT_VERSION
    for group in opt.param_groups:
        group.update(path)
    before = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    for p, b in zip(params, before, strict=True):
        assert p.isfinite().all() and not torch.equal(p, b)
    for p in params:
        for key, moment in cs.decode_moments(opt.state[p]).items():
            assert moment.isfinite().all(), key
        assert float(opt.state[p]["step"]) == 8.0


def test_a_version_1_int8_state_loads_into_bf16(saved):
    """Another format converts through the version 1 values: within bfloat16's rounding."""
    entry = saved["int8_amsgrad"]
    params, opt = load(entry, "bf16", True)
    old = v1_decoded(entry["optimizer"]["state"][0])
    new = cs.decode_moments(opt.state[params[0]])
    for key, value in old.items():
        torch.testing.assert_close(new[key], value, rtol=2**-7, atol=0)


def test_a_newer_format_version_is_refused(saved):
    entry = saved["bf16"]
    newer = {**entry["optimizer"], cs.FORMAT_VERSION_KEY: cs.FORMAT_VERSION + 1}
    opt = AdaBelief(
        [torch.nn.Parameter(p.clone()) for p in entry["params"]], state_precision="bf16"
    )
    with pytest.raises(ValueError, match="upgrade adabelief"):
        opt.load_state_dict(newer)
