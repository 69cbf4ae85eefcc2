"""Validation of the hyperparameters, shared by the three front ends (PyTorch, Keras, optax).

Framework-free: importing it imports no framework. A hyperparameter is a real number (not a
bool) or a 1-element tensor or array, recognised by duck typing: ``numel()`` (torch) or an
integer ``size`` (NumPy, JAX), and ``item()``. Each check raises ``ValueError`` naming the
option and the value, and returns the value as a float. Messages follow ``torch.optim.Adam``
where it has one (``"Tensor lr must be 1-element"``).

``eps <= 0`` is refused (:func:`check_eps`), unlike ``torch.optim.Adam``, whose second moment
``EMA(g^2)`` stays near ``g^2``: AdaBelief's belief ``s = EMA((g - m)^2) + eps`` tends to 0
wherever the gradient is predictable (``m`` catches up with a constant gradient), and ``eps``,
added to it at every step and to the denominator, is all that bounds the step ``m / (sqrt(s) +
eps)``. With ``eps = 0`` a constant gradient's step grows without bound, and a gradient that is
exactly 0 (an unused embedding row) gives ``0 / 0 = NaN``.

``beta1 = 0`` is refused: the first moment is then the gradient itself, ``m = g``, so the belief
``s = EMA((g - m)^2) + eps`` holds nothing but the accumulated ``eps``, and the bias-corrected
step is ``lr * g * sqrt((1 - beta2) / eps)``, of the order of ``g / sqrt(eps)`` (``3e6 * lr * g``
at the defaults ``beta2 = 0.999``, ``eps = 1e-16``): the parameters diverge to NaN within tens of
steps, silently. GAN recipes written with ``beta1 = 0`` (SAGAN, BigGAN, StyleGAN) train with
``beta1 = 0.5``.
"""

from __future__ import annotations

import math
from typing import Any, cast

from adabelief._array_scalars import is_number

__all__ = [
    "as_real",
    "check_beta1",
    "check_beta2",
    "check_betas",
    "check_bool",
    "check_eps",
    "check_nonnegative",
]


def _element_count(value: Any) -> int | None:
    """The number of elements of a tensor or array, None for anything else."""
    if not callable(getattr(value, "item", None)):
        return None
    numel = getattr(value, "numel", None)
    if callable(numel):  # torch.Tensor
        return int(numel())
    size = getattr(value, "size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def as_real(name: str, value: object) -> float:
    """``value`` as a float: a real number (not a bool) or a 1-element tensor or array of one.

    Raises:
        ValueError: ``"Tensor {name} must be 1-element"`` for a tensor of another size,
            ``"Invalid {name}: ..."`` for a complex, boolean or non-numeric value.
    """
    if is_number(value):
        return float(value)
    count = _element_count(value)
    if count is None:
        raise ValueError(f"Invalid {name}: {value!r} (expected a real number)")
    if count != 1:
        raise ValueError(f"Tensor {name} must be 1-element")
    item = cast(Any, value).item()
    if isinstance(item, complex):
        raise ValueError(f"Invalid {name}: {value} (complex)")
    if not is_number(item):
        raise ValueError(f"Invalid {name}: {value} (expected a real number)")
    return float(item)


def check_nonnegative(name: str, value: object) -> float:
    """``value`` (see :func:`as_real`) as a float; ``ValueError`` unless it is finite and >= 0.

    For ``lr``, ``eps``, ``weight_decay`` (and the Keras/optax spellings of them).
    """
    number = as_real(name, value)
    if not (math.isfinite(number) and number >= 0.0):
        raise ValueError(f"Invalid {name}: {value} (must be finite and >= 0)")
    return number


def check_eps(name: str, value: object) -> float:
    """``value`` (see :func:`as_real`) as a float; ``ValueError`` unless it is finite and > 0,
    with the reason 0 is refused (see the module docstring)."""
    number = check_nonnegative(name, value)
    if number == 0.0:
        raise ValueError(
            f"Invalid {name}: {value} (must be > 0: unlike Adam's EMA(g^2), AdaBelief's belief "
            f"s = EMA((g - m)^2) + {name} tends to 0 wherever the gradient is predictable, and "
            f"{name} is all that keeps the step m / (sqrt(s) + {name}) bounded: with {name} = 0 "
            f"a constant gradient's step grows without bound and a gradient that is exactly 0 "
            f"gives 0/0 = NaN; use a small positive value such as the default 1e-16)"
        )
    return number


def check_bool(name: str, value: object, *, allow_none: bool = False) -> bool | None:
    """``value`` if it is a bool (or None, with ``allow_none``), else ``ValueError``: a string
    such as ``'no'`` or a number would otherwise be taken for its truth value."""
    if isinstance(value, bool) or (allow_none and value is None):
        return value
    expected = "True, False or None" if allow_none else "True or False"
    raise ValueError(f"Invalid {name}: {value!r} (expected {expected})")


def _check_beta_range(name: str, value: object) -> float:
    number = as_real(name, value)
    if not 0.0 <= number < 1.0:  # NaN fails too
        raise ValueError(f"Invalid {name}: {number} (must be in [0, 1))")
    return number


def check_beta1(name: str, value: object) -> float:
    """The decay rate of the first moment as a float; ``ValueError`` unless in ``(0, 1)``.

    ``0`` is refused with the reason (see the module docstring) and a suggestion.
    """
    number = _check_beta_range(name, value)
    if number == 0.0:
        raise ValueError(
            f"Invalid {name}: {number} ({name} = 0 makes the first moment m equal to the "
            f"gradient g, so the belief (g - m)^2 is identically 0, the step grows to the order "
            f"of g/sqrt(eps) and the parameters diverge to NaN; use {name} > 0, for example "
            f"0.5 in GANs)"
        )
    return number


def check_beta2(name: str, value: object) -> float:
    """The decay rate of the belief as a float; ``ValueError`` unless in ``[0, 1)``."""
    return _check_beta_range(name, value)


def check_betas(betas: object) -> tuple[float, float]:
    """PyTorch's ``betas=(beta1, beta2)`` as a pair of floats, checked as ``betas[0]`` by
    :func:`check_beta1` and ``betas[1]`` by :func:`check_beta2`; ``ValueError`` unless a tuple
    or list of two."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (expected a pair (beta1, beta2))")
    return check_beta1("betas[0]", betas[0]), check_beta2("betas[1]", betas[1])
