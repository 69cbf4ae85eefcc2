"""timm's optimizer factory: ``create_optimizer_v2(model, "adabelief.AdaBelief", ...)``.

Importing this module registers ``adabelief.AdaBelief`` in timm's default optimizer
registry under ``NAME``::

    import timm.optim
    import adabelief.integrations.timm  # noqa: F401  (registers "adabelief.AdaBelief")

    optimizer = timm.optim.create_optimizer_v2(model, "adabelief.AdaBelief", lr=1e-3, weight_decay=0.05)

timm builds the parameter groups as it does for every optimizer. With ``weight_decay > 0``,
biases, 1-d parameters (norms) and the names in ``model.no_weight_decay()`` go into a group with
``weight_decay=0``, unless ``filter_bias_and_bn=False``. ``layer_decay`` adds timm's ``lr_scale``
to each group. The decay itself is AdaBelief's: decoupled (``theta *= 1 - lr*wd``) by default,
L2 with ``weight_decouple=False``. Every other keyword (``eps``, ``betas``, ``rectify``,
``state_precision``, ...) goes to ``adabelief.AdaBelief`` unchanged. A ``lookahead_``
prefix wraps the optimizer in timm's Lookahead.

Why the name. timm already registers its own port of the official code as ``adabelief``
(``rectify=False``) and ``radabelief`` (``rectify=True``). Taking either name would silently
change what existing timm configs train with. timm splits names on ``_`` (for the ``lookahead_``
prefix), and its own names never contain a dot. So the class path ``adabelief.AdaBelief`` cannot
collide with a timm optimizer, and it is the same string that Lightning's CLI takes
(``--optimizer adabelief.AdaBelief``). timm lower-cases names, so any capitalisation works.
"""

from __future__ import annotations

from timm.optim import OptimInfo, OptimizerRegistry
from timm.optim._optim_factory import default_registry

from adabelief.optimizer import AdaBelief

__all__ = ["NAME", "register"]

#: The name under which this module registers ``adabelief.AdaBelief`` (case-insensitive).
NAME = "adabelief.AdaBelief"


def register(
    registry: OptimizerRegistry | None = None, name: str = NAME, *, replace: bool = False
) -> OptimInfo:
    """Register ``adabelief.AdaBelief`` in ``registry`` (timm's default one if ``None``)
    under ``name``, and return its entry. Registering it again under the same name changes nothing.

    Raises:
        ValueError: ``name`` contains ``_`` (timm reads everything before the last ``_`` as a
            prefix such as ``lookahead_``), or another optimizer is already registered under it
            and ``replace`` is False. With ``replace=True`` the other entry is overwritten, for
            example ``name="adabelief"`` to make configs that name timm's own port train with
            this package's AdaBelief (timm logs a warning then).
    """
    if not name or "_" in name:
        raise ValueError(
            f"Invalid timm optimizer name {name!r}: it must be non-empty and contain no '_' "
            "(timm splits names on '_' to find prefixes such as 'lookahead_')"
        )
    target = default_registry if registry is None else registry
    existing = _lookup(target, name)
    if existing is not None and existing.opt_class is AdaBelief:
        return existing
    if existing is not None and not replace:
        raise ValueError(
            f"timm already registers {name.lower()!r} as {existing.opt_class!r}; pass another "
            f"name, or replace=True to overwrite it"
        )
    info = OptimInfo(
        name=name.lower(),
        opt_class=AdaBelief,
        description="adabelief.AdaBelief: AdaBelief with this package's kernels, defaults and state",
        has_eps=True,
        has_momentum=False,
        has_betas=True,
        num_betas=2,
    )
    target.register(info)
    return info


def _lookup(registry: OptimizerRegistry, name: str) -> OptimInfo | None:
    try:
        return registry.get_optimizer_info(name)
    except ValueError:  # timm's "not found in registry"
        return None


register()
