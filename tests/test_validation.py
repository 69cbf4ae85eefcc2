"""Tests of ``adabelief._validation``, the hyperparameter checks of the three front ends, and of
the framework-free modules (validation, per-step scalars, per-element update) staying free of
any framework."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from adabelief._validation import (
    as_real,
    check_beta1,
    check_beta2,
    check_betas,
    check_bool,
    check_eps,
    check_nonnegative,
)

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0.0),
        (1e-3, 1e-3),
        (np.float32(0.25), 0.25),
        (torch.tensor(0.5), 0.5),
        (torch.tensor([[0.5]]), 0.5),  # 1-element, whatever the shape
        (torch.tensor(0.5, requires_grad=True), 0.5),
        (torch.tensor(3), 3.0),
        (np.array(0.125), 0.125),
    ],
)
def test_check_nonnegative_accepts_numbers_and_1_element_tensors(
    value: Any, expected: float
) -> None:
    got = check_nonnegative("lr", value)
    assert type(got) is float and got == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1e-3, "Invalid lr: -0.001 (must be finite and >= 0)"),
        (math.nan, "Invalid lr: nan (must be finite and >= 0)"),
        (math.inf, "Invalid lr: inf (must be finite and >= 0)"),
        (torch.tensor(-1.0), "Invalid lr: -1.0 (must be finite and >= 0)"),
        (True, "Invalid lr: True (expected a real number)"),
        ("1e-3", "Invalid lr: '1e-3' (expected a real number)"),
        (None, "Invalid lr: None (expected a real number)"),
        (1j, "Invalid lr: 1j (expected a real number)"),
        (torch.tensor(1 + 0j), "Invalid lr: (1+0j) (complex)"),
        (torch.tensor(True), "Invalid lr: True (expected a real number)"),
        (torch.tensor([1e-3, 1e-3]), "Tensor lr must be 1-element"),
        (torch.tensor([]), "Tensor lr must be 1-element"),
        (np.array([1e-3, 1e-3]), "Tensor lr must be 1-element"),
    ],
)
def test_check_nonnegative_refuses(value: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        check_nonnegative("lr", value)
    assert str(info.value) == message


def test_tensor_lr_message_is_torchs() -> None:
    """A tensor lr of 2 elements gets torch.optim.Adam's own words."""
    lr = torch.tensor([1e-3, 1e-3])
    with pytest.raises(ValueError) as torch_error:
        torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=lr)
    with pytest.raises(ValueError) as ours:
        check_nonnegative("lr", lr)
    assert str(ours.value) == str(torch_error.value) == "Tensor lr must be 1-element"


def test_as_real_is_the_conversion_of_every_check() -> None:
    assert as_real("eps", torch.tensor(1e-8, dtype=torch.float64)) == 1e-8
    assert as_real("x", -2) == -2.0  # no range check of its own
    with pytest.raises(ValueError, match=r"^Tensor eps must be 1-element$"):
        as_real("eps", torch.zeros(2, 2))


@pytest.mark.parametrize("name", ["betas[0]", "beta_1", "b1"])
@pytest.mark.parametrize("zero", [0, 0.0, -0.0, torch.tensor(0.0), np.float64(0.0)])
def test_beta1_zero_is_refused_with_the_reason(name: str, zero: Any) -> None:
    with pytest.raises(ValueError) as info:
        check_beta1(name, zero)
    message = str(info.value)
    assert message.startswith(f"Invalid {name}: ")
    # why (m = g, so the belief is 0 and the step ~ g/sqrt(eps) blows up) and what to do instead
    for part in ("first moment m equal to the gradient g", "(g - m)^2 is identically 0"):
        assert part in message
    assert "g/sqrt(eps)" in message and "NaN" in message
    assert f"use {name} > 0, for example 0.5 in GANs" in message


@pytest.mark.parametrize("check", [check_beta1, check_beta2])
@pytest.mark.parametrize("value", [1.0, 1.5, -0.1, math.nan, math.inf])
def test_betas_outside_their_range_are_refused(check: Any, value: float) -> None:
    with pytest.raises(ValueError, match=r"^Invalid b: .* \(must be in \[0, 1\)\)$"):
        check("b", value)


def test_beta2_zero_and_small_beta1_are_accepted() -> None:
    assert check_beta2("b2", 0) == 0.0
    assert check_beta1("b1", 1e-3) == 1e-3
    assert check_beta1("b1", torch.tensor(0.5)) == 0.5


def test_check_betas_is_the_pytorch_pair() -> None:
    assert check_betas((0.9, 0.999)) == (0.9, 0.999)
    got = check_betas([torch.tensor(0.5), np.float32(0.75)])
    assert got == (0.5, 0.75) and all(type(b) is float for b in got)
    for bad in [(0.9,), (0.9, 0.99, 0.999), 0.9, "ab", None]:
        with pytest.raises(ValueError, match=r"^Invalid betas: .* \(expected a pair"):
            check_betas(bad)
    with pytest.raises(ValueError, match=r"^Invalid betas\[0\]: 0\.0 \(betas\[0\] = 0 makes"):
        check_betas((0.0, 0.999))
    with pytest.raises(ValueError, match=r"^Invalid betas\[1\]: 1\.0 \(must be in \[0, 1\)\)$"):
        check_betas((0.9, 1.0))
    with pytest.raises(ValueError, match=r"^Tensor betas\[1\] must be 1-element$"):
        check_betas((0.9, torch.tensor([0.99, 0.999])))
    with pytest.raises(ValueError, match=r"^Invalid betas\[0\]: None \(expected a real number"):
        check_betas((None, 0.999))


@pytest.mark.parametrize("name", ["eps", "epsilon"])
@pytest.mark.parametrize("zero", [0, 0.0, -0.0, torch.tensor(0.0), np.float64(0.0)])
def test_eps_zero_is_refused_with_the_reason(name: str, zero: Any) -> None:
    with pytest.raises(ValueError) as info:
        check_eps(name, zero)
    message = str(info.value)
    assert message.startswith(f"Invalid {name}: ") and "(must be > 0: " in message
    # why (the belief can be exactly 0, so 0/0) and how AdaBelief differs from Adam here
    assert f"s = EMA((g - m)^2) + {name}" in message and "0/0 = NaN" in message
    assert "unlike Adam's" in message and "1e-16" in message


def test_check_eps_accepts_positive_and_refuses_negative() -> None:
    assert check_eps("eps", 1e-16) == 1e-16
    assert check_eps("eps", torch.tensor(1e-8, dtype=torch.float64)) == 1e-8
    for bad in (-1e-8, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"^Invalid eps: .* \(must be finite and >= 0\)$"):
            check_eps("eps", bad)


def test_check_bool() -> None:
    assert check_bool("amsgrad", True) is True and check_bool("amsgrad", False) is False
    assert check_bool("fused", None, allow_none=True) is None
    for bad in ("no", 0, 1, None, np.bool_(True), torch.tensor(True)):
        with pytest.raises(ValueError) as info:
            check_bool("amsgrad", bad)
        assert str(info.value) == f"Invalid amsgrad: {bad!r} (expected True or False)"
    with pytest.raises(
        ValueError, match=r"^Invalid fused: 'yes' \(expected True, False or None\)$"
    ):
        check_bool("fused", "yes", allow_none=True)


def test_framework_free_modules_import_no_framework() -> None:
    """The shared modules import neither torch, Keras, JAX nor NumPy (loaded without the
    package's ``__init__``, which imports the PyTorch optimizer)."""
    code = f"""
import sys, types
package = types.ModuleType("adabelief")
package.__path__ = [{str(SRC / "adabelief")!r}]
sys.modules["adabelief"] = package
import adabelief._validation, adabelief._array_scalars, adabelief._array_update
print(sorted({{m.split(".")[0] for m in sys.modules}}
             & {{"torch", "keras", "jax", "jaxlib", "optax", "tensorflow", "numpy"}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
