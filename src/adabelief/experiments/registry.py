"""Optimizer registry: build any compared optimizer by name (``create_optimizer("adam", params)``).

The built-in entries are AdaBelief (this library), the torch optimizers the paper compares
against (SGD with momentum, Adam, AdamW, RAdam) and, when the packages are installed,
AdaBound and Yogi from ``pytorch_optimizer`` or ``torch_optimizer`` plus the official
``adabelief_pytorch`` package as a reference implementation.  More entries can be added with
:func:`register_optimizer`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "DEFAULT_OPTIMIZERS",
    "OptimizerEntry",
    "UnknownOptimizerError",
    "available_optimizers",
    "create_optimizer",
    "get_entry",
    "known_optimizers",
    "register_optimizer",
]

#: The optimizers compared when ``--optimizers`` is not given (the paper's main baselines).
DEFAULT_OPTIMIZERS: tuple[str, ...] = ("adabelief", "sgd", "adam", "adamw", "radam")

Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


class UnknownOptimizerError(ValueError):
    """Raised for an optimizer name that is not registered or whose package is missing."""


@dataclass(frozen=True)
class OptimizerEntry:
    """One registered optimizer.

    ``candidates`` lists ``(module, attribute)`` pairs tried in order; the first importable one is
    the optimizer class.  ``defaults`` are keyword arguments applied before the caller's.
    ``model_dtype``, when set, is the dtype of the parameters this optimizer is meant to train:
    a task puts its model in it before building the optimizer
    (:func:`adabelief.experiments.training.model_for_optimizer`), and the runner refuses the
    optimizer for a task that cannot.
    """

    name: str
    candidates: tuple[tuple[str, str], ...]
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)
    model_dtype: torch.dtype | None = None

    def resolve(self) -> type[torch.optim.Optimizer] | None:
        """Return the optimizer class, or ``None`` when no candidate package is installed."""
        for module_name, attribute in self.candidates:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            cls = getattr(module, attribute, None)
            if cls is not None:
                return cls
        return None

    @property
    def source(self) -> str:
        """The module that provides the class (the first importable candidate), or ``"missing"``."""
        for module_name, _ in self.candidates:
            try:
                importlib.import_module(module_name)
            except ImportError:
                continue
            return module_name
        return "missing"


_REGISTRY: dict[str, OptimizerEntry] = {}


def register_optimizer(entry: OptimizerEntry) -> OptimizerEntry:
    """Add (or replace) an optimizer in the registry and return it."""
    _REGISTRY[entry.name] = entry
    return entry


for _entry in (
    OptimizerEntry("adabelief", (("adabelief", "AdaBelief"),), "AdaBelief (this library)"),
    OptimizerEntry(
        "adabelief_bf16",
        (("adabelief", "AdaBelief"),),
        "AdaBelief with its moments stored in bfloat16 (state_precision='bf16')",
        {"state_precision": "bf16"},
    ),
    OptimizerEntry(
        "adabelief_int8",
        (("adabelief", "AdaBelief"),),
        "AdaBelief with block-wise int8 moments (state_precision='int8')",
        {"state_precision": "int8"},
    ),
    OptimizerEntry(
        "adabelief_bf16w_fp32master",
        (("adabelief", "AdaBelief"),),
        "bfloat16 model; AdaBelief keeps a float32 master copy of each weight "
        "(master_weights='fp32'; weight, master and moments: 14 bytes per parameter)",
        {"master_weights": "fp32"},
        torch.bfloat16,
    ),
    OptimizerEntry(
        "adabelief_bf16w_round",
        (("adabelief", "AdaBelief"),),
        "bfloat16 model; each update rounded into the bfloat16 weight, no master "
        "(master_weights='round'; weight and moments: 10 bytes per parameter; an update under half "
        "a bfloat16 step is lost)",
        {"master_weights": "round"},
        torch.bfloat16,
    ),
    OptimizerEntry(
        "adabelief_bf16w_residual_int8",
        (("adabelief", "AdaBelief"),),
        "bfloat16 model; int8 residual with the weight as the master, int8 moments "
        "(master_weights='residual', state_precision='int8'; weight, residual and moments: "
        "about 5 bytes per parameter)",
        {"master_weights": "residual", "state_precision": "int8"},
        torch.bfloat16,
    ),
    OptimizerEntry(
        "adabelief_bf16w_residual_int4",
        (("adabelief", "AdaBelief"),),
        "bfloat16 model; int8 residual with the weight as the master, 4-bit moments "
        "(master_weights='residual', state_precision='int4'; weight, residual and moments: "
        "about 4 bytes per parameter)",
        {"master_weights": "residual", "state_precision": "int4"},
        torch.bfloat16,
    ),
    OptimizerEntry(
        "sgd", (("torch.optim", "SGD"),), "SGD with momentum 0.9 (torch)", {"momentum": 0.9}
    ),
    OptimizerEntry("adam", (("torch.optim", "Adam"),), "Adam (torch)"),
    OptimizerEntry("adamw", (("torch.optim", "AdamW"),), "AdamW, decoupled weight decay (torch)"),
    OptimizerEntry("radam", (("torch.optim", "RAdam"),), "RAdam (torch)"),
    OptimizerEntry(
        "adabound",
        (("pytorch_optimizer", "AdaBound"), ("torch_optimizer", "AdaBound")),
        "AdaBound (optional: pytorch_optimizer or torch_optimizer)",
        {"final_lr": 0.1},
    ),
    OptimizerEntry(
        "yogi",
        (("pytorch_optimizer", "Yogi"), ("torch_optimizer", "Yogi")),
        "Yogi (optional: pytorch_optimizer or torch_optimizer)",
    ),
    OptimizerEntry(
        "adabelief_ref",
        (("adabelief_pytorch", "AdaBelief"),),
        "official adabelief-pytorch package, as a cross-check (optional)",
        {"print_change_log": False},
    ),
):
    register_optimizer(_entry)


def known_optimizers() -> list[str]:
    """All registered names, installed or not."""
    return list(_REGISTRY)


def available_optimizers() -> list[str]:
    """Registered names whose class can be imported here."""
    return [name for name, entry in _REGISTRY.items() if entry.resolve() is not None]


def get_entry(name: str) -> OptimizerEntry:
    """Look up a registered optimizer; raise :class:`UnknownOptimizerError` with the known names."""
    key = name.strip().lower()
    if key not in _REGISTRY:
        raise UnknownOptimizerError(
            f"unknown optimizer {name!r}; known optimizers: {', '.join(known_optimizers())}"
        )
    return _REGISTRY[key]


def create_optimizer(name: str, params: Params, **hparams: Any) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name`` over ``params``.

    ``hparams`` override the entry's defaults; ``betas`` may be given as a list (as read from
    JSON) and is converted to a tuple.
    """
    entry = get_entry(name)
    cls = entry.resolve()
    if cls is None:
        packages = " or ".join(module for module, _ in entry.candidates)
        raise UnknownOptimizerError(
            f"optimizer {name!r} needs a package that is not installed: {packages}"
        )
    kwargs = {**entry.defaults, **hparams}
    if isinstance(kwargs.get("betas"), list):
        kwargs["betas"] = tuple(kwargs["betas"])
    return cls(params, **kwargs)


def check_optimizer_names(names: Iterable[str]) -> list[str]:
    """Normalise names and make sure each is registered and importable (raises otherwise)."""
    result: list[str] = []
    for raw in names:
        entry = get_entry(raw)
        if entry.resolve() is None:
            packages = " or ".join(module for module, _ in entry.candidates)
            raise UnknownOptimizerError(
                f"optimizer {entry.name!r} is not installed here (needs {packages}); "
                f"available: {', '.join(available_optimizers())}"
            )
        if entry.name not in result:
            result.append(entry.name)
    return result


def optimizer_factory(name: str) -> Callable[..., torch.optim.Optimizer]:
    """A ``(params, **hparams) -> Optimizer`` callable bound to ``name``."""

    def build(params: Params, **hparams: Any) -> torch.optim.Optimizer:
        return create_optimizer(name, params, **hparams)

    return build
