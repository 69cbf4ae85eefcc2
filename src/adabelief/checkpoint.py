"""Loading optimizer checkpoints written by other AdaBelief code, and keeping state in float32.

:func:`migrate_state_dict` turns a ``state_dict`` of the official ``adabelief-pytorch`` package
(integer ``step``, a ``buffer`` list per group, options kept on the optimizer instead of the
groups) into this package's layout, and refuses, with a message that says what is missing, a
``state_dict`` of another optimizer such as ``torch.optim.Adam``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from adabelief import compressed_state

#: Keys of the official package's groups that this package does not keep.
LEGACY_GROUP_KEYS = ("buffer",)


def _step_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def migrate_state_dict(
    state_dict: Mapping[str, Any], current_groups: list[dict[str, Any]]
) -> dict[str, Any]:
    """A copy of ``state_dict`` in this package's layout.

    Options missing from a saved group (the official package keeps ``weight_decouple``,
    ``rectify``, ... on the optimizer object) are taken from the corresponding group of the
    optimizer being loaded into, so construct it with the options the checkpoint was trained with.

    Raises:
        ValueError: the state_dict is not an AdaBelief one (for example ``torch.optim.Adam``'s,
            whose ``exp_avg_sq`` is not the belief ``exp_avg_var``), or its groups do not match.
    """
    if "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError(
            f"not an optimizer state_dict: expected keys 'state' and 'param_groups', "
            f"got {sorted(state_dict)}"
        )
    version = state_dict.get(compressed_state.FORMAT_VERSION_KEY, 1)
    if version not in (1, compressed_state.FORMAT_VERSION):
        raise ValueError(
            f"the state_dict's storage format version is {version!r}; this adabelief reads "
            f"versions 1 to {compressed_state.FORMAT_VERSION}: upgrade adabelief to load it"
        )
    # Version 1 (saved without the key) stored the same codes with the same decoding as version
    # 2: only the stochastic rounding of later steps differs. Its moments are kept as saved.
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(current_groups):
        raise ValueError(
            f"the state_dict has {len(saved_groups)} parameter groups, "
            f"this optimizer has {len(current_groups)}"
        )
    state: dict[Any, Any] = {}
    for param_id, param_state in state_dict["state"].items():
        if not param_state:
            state[param_id] = param_state
            continue
        missing = [k for k in ("step", "exp_avg", "exp_avg_var") if k not in param_state]
        if missing:
            hint = (
                " It looks like the state of torch.optim.Adam/AdamW ('exp_avg_sq' is Adam's "
                "second moment of the gradient, not AdaBelief's belief 'exp_avg_var'); load the "
                "model weights only and start AdaBelief from fresh state."
                if "exp_avg_sq" in param_state
                else ""
            )
            raise ValueError(
                f"not an AdaBelief state_dict: state of parameter {param_id!r} lacks "
                f"{missing} (it has {sorted(param_state)}).{hint}"
            )
        migrated = dict(param_state)
        step = migrated["step"]
        if not isinstance(step, Tensor):
            migrated["step"] = torch.tensor(float(step), dtype=_step_dtype())
        state[param_id] = migrated

    groups = []
    for saved, current in zip(saved_groups, current_groups, strict=True):
        group = {k: v for k, v in saved.items() if k not in LEGACY_GROUP_KEYS}
        for key, value in current.items():
            if key != "params":
                group.setdefault(key, value)
        groups.append(group)
    return {
        **state_dict,
        "state": state,
        "param_groups": groups,
        compressed_state.FORMAT_VERSION_KEY: compressed_state.FORMAT_VERSION,
    }


def saved_moments(
    saved_state: Mapping[Any, Mapping[str, Any]],
    saved_groups: Iterable[Mapping[str, Any]],
    current_groups: Iterable[Mapping[str, Any]],
) -> dict[Tensor, dict[str, Tensor]]:
    """Each parameter's moments as saved, in the storage format of the group being loaded into
    (converted if it differs; :func:`compressed_state.restore_moments`), by parameter.

    Raises ValueError, naming the parameter, when a saved moment does not fit its parameter (a
    state_dict of another model, or the parameters in another order), so that a load can check
    every parameter before it changes anything.
    """
    groups = list(current_groups)
    id_map = zip(
        chain.from_iterable(g["params"] for g in saved_groups),
        ((p, g) for g in groups for p in g["params"]),
        strict=True,
    )
    moments: dict[Tensor, dict[str, Tensor]] = {}
    for position, (param_id, (param, group)) in enumerate(id_map):
        saved = saved_state.get(param_id)
        if not saved:
            continue
        fmt = compressed_state.storage_format(param, group.get("state_precision", "fp32"))
        try:
            moments[param] = compressed_state.restore_moments(saved, param, fmt)
        except ValueError as error:
            raise ValueError(
                f"load_state_dict: parameter {position} (id {param_id!r} in the state_dict): "
                f"{error}"
            ) from None
    return moments


def restore_moment_dtypes(
    state: MutableMapping[Tensor, dict[str, Any]], moments: Mapping[Tensor, Mapping[str, Tensor]]
) -> None:
    """Put back the moments as they were saved (:func:`saved_moments`).

    ``torch.optim.Optimizer.load_state_dict`` casts every floating-point state tensor to its
    parameter's dtype, which would round the float32 moments of 16-bit parameters and the
    bfloat16/int8 storage of ``state_precision``. The moments are taken from the saved tensors
    instead.
    """
    for param, restored in moments.items():
        if param in state:
            compressed_state.put_moments_(state[param], restored)
