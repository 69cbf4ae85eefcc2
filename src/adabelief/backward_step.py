"""The step fused into backward: ``AdaBelief(step_in_backward=True)``.

Each parameter of a group with ``step_in_backward=True`` carries a post-accumulate-grad hook
(:meth:`torch.Tensor.register_post_accumulate_grad_hook`). Autograd calls it inside
``loss.backward()`` once the parameter's gradient of this backward has been summed into
``.grad``; the hook steps that one parameter with the group's current options (the same kernel
as an ordinary :meth:`~adabelief.AdaBelief.step`) and sets ``.grad`` to None. At most the
gradients that are in flight are held at once, instead of all of them: the saving is up to the
size of the gradients (4 bytes per float32 parameter).

:class:`BackwardStep` owns the hooks of one optimizer: it registers and removes them
(:meth:`~BackwardStep.sync`), marks the backward passes that only accumulate
(:meth:`~BackwardStep.accumulating`), and refuses what cannot work this way, with a
:class:`StepInBackwardError`:

* a gradient written into a parameter after its in-backward step (DistributedDataParallel's
  reducer does this at the end of backward, with the all-reduced gradient the step never saw);
  checked at the end of every backward that stepped, and by ``step()``;
* GradScaler (``grad_scale``/``found_inf`` set on the optimizer by ``scaler.step``): backward
  already stepped on the scaled gradients;
* a gradient accumulated under :meth:`~BackwardStep.accumulating` that ``step()`` finds
  unapplied, and ``step(closure)`` while accumulating.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.autograd import Variable
from torch.utils.hooks import RemovableHandle

__all__ = ["BackwardStep", "StepInBackwardError", "check_group"]


class StepInBackwardError(RuntimeError):
    """A use of ``step_in_backward=True`` that would step on the wrong gradients."""


class _Owner(Protocol):
    """What :class:`BackwardStep` needs of its optimizer."""

    param_groups: list[dict[str, Any]]

    def _step_params(self, group: dict[str, Any], params: list[Tensor]) -> None: ...

    def _param_state(self, group: dict[str, Any], p: Tensor) -> dict[str, Any]: ...


def check_group(group: dict[str, Any]) -> None:
    """``ValueError`` unless ``group["step_in_backward"]`` is a bool, and not combined with
    ``differentiable=True`` (autograd cannot record a step taken inside its own backward)."""
    value = group["step_in_backward"]
    if not isinstance(value, bool):
        raise ValueError(f"Invalid step_in_backward: {value!r} (expected True or False)")
    if value and group["differentiable"]:
        raise ValueError(
            "step_in_backward=True cannot be combined with differentiable=True: the step runs "
            "inside backward, where autograd does not record it; use the ordinary step"
        )


def _describe(param: Tensor) -> str:
    return f"parameter of shape {tuple(param.shape)}"


def written_after_step_message(param: Tensor) -> str:
    """Why a gradient found on a parameter that backward had stepped and released is refused."""
    return (
        f"AdaBelief(step_in_backward=True): a {_describe(param)} holds a gradient after backward "
        "had stepped it with its gradient and released it: something wrote the gradient after "
        "the step. DistributedDataParallel does this: its reducer writes the all-reduced "
        "gradient at the end of backward, after the in-backward step used this rank's unreduced "
        "one (the replicas now differ). Under DDP use the ordinary step (step_in_backward=False) "
        "or FSDP2 (fully_shard), whose per-parameter reduce-scatter runs the hooks on the reduced "
        "gradient. Gradients assigned by hand are not stepped in backward either."
    )


def accumulated_message(param: Tensor) -> str:
    """Why ``step()`` refuses a gradient accumulated under ``accumulating()`` and not applied."""
    return (
        f"AdaBelief(step_in_backward=True): step() found the gradient of a {_describe(param)} "
        "accumulated under optimizer.accumulating() and not applied; step() does not step "
        "in-backward parameters. Run the last micro-batch's backward outside accumulating() "
        "(that backward steps with the accumulated gradient), or call zero_grad() to drop it."
    )


GRAD_SCALER_MESSAGE = (
    "AdaBelief(step_in_backward=True) cannot be used with GradScaler: backward already stepped "
    "the parameters with the scaled gradients, before GradScaler could unscale them or check "
    "them for inf/NaN. Use bf16 autocast, which needs no scaler "
    "(torch.autocast(device_type, dtype=torch.bfloat16)), or the ordinary step "
    "(step_in_backward=False; fused=True takes GradScaler's scale inside its kernel)."
)

CLOSURE_WHILE_ACCUMULATING_MESSAGE = (
    "AdaBelief(step_in_backward=True): step(closure) inside optimizer.accumulating() cannot "
    "step: the closure's backward only accumulates there. Call step(closure) outside it."
)


def _on_grad(registry: weakref.ref[BackwardStep], group_index: int, param: Tensor) -> None:
    """The hook autograd calls once ``param.grad`` holds this backward's gradient."""
    owner = registry()
    if owner is not None:
        owner.on_grad(group_index, param)


class BackwardStep:
    """The post-accumulate-grad hooks of one optimizer, and the checks around them.

    It holds its optimizer weakly; the hooks hold it weakly too, so neither keeps the other
    alive. :meth:`remove` (also run when the optimizer is garbage collected) removes every hook.
    """

    def __init__(self, owner: _Owner) -> None:
        self._owner = weakref.ref(owner)
        self._self_ref = weakref.ref(self)
        #: id(param) -> (param's hook handle, index of its group).
        self._hooks: dict[int, tuple[RemovableHandle, int]] = {}
        self._accumulating = 0
        #: ids of the parameters whose gradient was left by an accumulating backward.
        self._accumulated: set[int] = set()
        #: The parameters stepped in the backward (autograd graph task) ``_task``, checked at its
        #: end. A backward that raised never runs the check; the next one starts afresh.
        self._stepped: list[Tensor] = []
        self._task = -1

    @property
    def active(self) -> bool:
        """Whether any parameter has a hook."""
        return bool(self._hooks)

    def is_hooked(self, param: Tensor) -> bool:
        return id(param) in self._hooks

    def sync(self) -> list[Tensor]:
        """Hook every parameter that requires grad in a group with ``step_in_backward=True``
        and has no hook yet; remove the hooks of parameters no longer in such a group. Hooks
        already registered stay (their order among the parameter's other hooks is kept).

        A newly hooked parameter's optimizer state is created here, before any backward: created
        in the first backward instead, it would be allocated between gradients that are freed at
        once, and glibc's malloc keeps such holes resident, which hides the saving in resident
        memory (see benchmarks/step_in_backward.py). Returns the parameters hooked by this call."""
        owner = self._owner()
        if owner is None:
            return []
        wanted: dict[int, tuple[Tensor, int]] = {}  # id(param) -> (param, group index)
        for index, group in enumerate(owner.param_groups):
            if group.get("step_in_backward"):
                for p in group["params"]:
                    if p.requires_grad:
                        wanted[id(p)] = (p, index)
        for key, (handle, index) in list(self._hooks.items()):
            if key not in wanted or wanted[key][1] != index:
                handle.remove()
                del self._hooks[key]
        added = []
        for key, (p, index) in wanted.items():
            if key not in self._hooks:
                hook = functools.partial(_on_grad, self._self_ref, index)
                self._hooks[key] = (p.register_post_accumulate_grad_hook(hook), index)
                owner._param_state(owner.param_groups[index], p)
                added.append(p)
        return added

    def remove(self) -> None:
        """Remove every hook: backward then only accumulates gradients, as without this."""
        for handle, _ in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self._accumulated.clear()

    @contextmanager
    def accumulating(self, enabled: bool = True) -> Iterator[None]:
        """While active, the hooks leave the gradients in ``.grad`` (they accumulate there)."""
        if not enabled:
            yield
            return
        self._accumulating += 1
        try:
            yield
        finally:
            self._accumulating -= 1

    @property
    def is_accumulating(self) -> bool:
        return self._accumulating > 0

    def on_grad(self, group_index: int, param: Tensor) -> None:
        """Step ``param`` with its group's current options and release its gradient, unless
        accumulating (or the group was switched to the ordinary step since the last sync)."""
        owner = self._owner()
        if owner is None:
            return
        group = owner.param_groups[group_index]
        if not group["step_in_backward"]:
            return  # step() syncs the hooks and steps this gradient the ordinary way
        if self._accumulating:
            self._accumulated.add(id(param))
            return
        self._accumulated.discard(id(param))
        with torch.no_grad():
            owner._step_params(group, [param])
        param.grad = None
        task = torch._C._current_graph_task_id()
        if task == -1:  # called outside a backward (by hand): nothing to check at its end
            return
        if task != self._task:
            self._task, self._stepped = task, []
            Variable._execution_engine.queue_callback(self._queue_final_check)
        self._stepped.append(param)

    def _queue_final_check(self) -> None:
        # Queued from the first hook of a backward; it queues the check behind every callback
        # queued since (DistributedDataParallel's reducer writes the gradients in one of them).
        Variable._execution_engine.queue_callback(self._final_check)

    def _final_check(self) -> None:
        stepped, self._stepped, self._task = self._stepped, [], -1
        for p in stepped:
            if p.grad is not None:
                raise StepInBackwardError(written_after_step_message(p))

    def check_step(
        self, grad_scale: Tensor | None, found_inf: Tensor | None, newly_hooked: list[Tensor]
    ) -> None:
        """What ``step()`` refuses: GradScaler, and gradients held by hooked parameters that were
        hooked during the backward (accumulated and not applied, or written after the step)."""
        if grad_scale is not None or found_inf is not None:
            raise StepInBackwardError(GRAD_SCALER_MESSAGE)
        owner = self._owner()
        if owner is None:
            return
        new = {id(p) for p in newly_hooked}
        for group in owner.param_groups:
            if not group["step_in_backward"]:
                continue
            for p in group["params"]:
                if p.grad is None or id(p) not in self._hooks or id(p) in new:
                    continue
                if id(p) in self._accumulated:
                    raise StepInBackwardError(accumulated_message(p))
                raise StepInBackwardError(written_after_step_message(p))

    def check_closure(self) -> None:
        """``step(closure)`` cannot step while the closure's backward only accumulates."""
        if self._accumulating and self._hooks:
            raise StepInBackwardError(CLOSURE_WHILE_ACCUMULATING_MESSAGE)
