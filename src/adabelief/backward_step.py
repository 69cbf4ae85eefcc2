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
  unapplied, and ``step(closure)`` while accumulating;
* a second in-backward step of a parameter in one optimizer step, before it is taken: each
  parameter steps at most once between two ``step()``/``zero_grad()`` calls (several backward
  passes per step: gradient accumulation without ``accumulating()``, ``retain_graph=True``);
* a gradient that reaches a parameter in a backward run inside another backward (reentrant
  activation checkpointing), before it is stepped on that part of its gradient;
* two live in-backward optimizers on one parameter (at its first backward, so that rebinding a
  variable to a new optimizer, which frees the old one, works), and an ordinary ``AdaBelief``
  whose ``step()`` would never see the gradients an in-backward one releases;
* gradient clipping asked of a training framework (``transformers.Trainer``'s
  ``max_grad_norm``, Lightning's ``gradient_clip_val``), which would find no gradient to clip.
"""

from __future__ import annotations

import functools
import gc
import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.autograd import Variable
from torch.autograd.function import BackwardCFunction
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


def _describe(param: Tensor, owner: _Owner | None = None) -> str:
    """``parameter of shape (4, 3)``, and where ``owner`` holds it: ``(param_groups[0]
    ["params"][2])``, which names it to a user who built the groups."""
    where = ""
    if owner is not None:
        for g, group in enumerate(owner.param_groups):
            for i, p in enumerate(group["params"]):
                if p is param:
                    where = f' (param_groups[{g}]["params"][{i}] of this optimizer)'
    return f"parameter of shape {tuple(param.shape)}{where}"


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


def left_by_refused_backward_message(param: Tensor, refusal: str) -> str:
    """Why ``step()`` refuses a gradient that a backward refused part-way through left behind."""
    return (
        f"AdaBelief(step_in_backward=True): a {_describe(param)} holds a gradient left by the "
        "backward that was refused part-way through; that backward stepped some parameters and "
        "not others, so this gradient is not stepped. Call zero_grad() and fix what the refusal "
        f"named: {refusal}"
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


def stepped_twice_message(param: Tensor, owner: _Owner | None = None) -> str:
    """Why a second in-backward step of a parameter in one optimizer step is refused."""
    return (
        f"AdaBelief(step_in_backward=True): a second backward pass reached a {_describe(param, owner)} "
        "since the last optimizer.step() or zero_grad(), and would step it a second time (an "
        "ordinary optimizer steps once, on the sum of the gradients). For gradient "
        "accumulation, run every backward but the last inside optimizer.accumulating() (the "
        "Hugging Face and Lightning recipes are in docs/frameworks.md); otherwise call "
        "optimizer.step() or zero_grad() once per training step, as a torch.optim loop does."
    )


def nested_backward_message(param: Tensor, cause: str, owner: _Owner | None = None) -> str:
    """Why a gradient that reaches a parameter in a backward run inside a backward is refused."""
    return (
        f"AdaBelief(step_in_backward=True): a {_describe(param, owner)} received a gradient in a "
        f"backward pass run inside another backward pass ({cause}); that pass holds only part "
        "of its gradient, and each such pass would step it. Use non-reentrant activation "
        "checkpointing, torch.utils.checkpoint.checkpoint(..., use_reentrant=False), which "
        "steps in backward exactly as ordinary training steps, or the ordinary step "
        "(step_in_backward=False)."
    )


def two_optimizers_message(param: Tensor, owner: _Owner | None = None) -> str:
    """Why a parameter hooked by two live in-backward optimizers is refused."""
    return (
        f"AdaBelief(step_in_backward=True): a {_describe(param, owner)} is stepped in backward by two "
        "live optimizers; the first steps it and releases its gradient, so the second would "
        "never step it. Keep one: call remove_backward_hooks() on the other, or delete every "
        "reference to it (rebinding the variable, optimizer = AdaBelief(...), frees the old one)."
    )


def shared_with_ordinary_message(param: Tensor, owner: _Owner | None = None) -> str:
    """Why an ordinary step of a parameter that an in-backward optimizer steps is refused."""
    return (
        f"AdaBelief: a {_describe(param, owner)} is also stepped in backward by a "
        "live AdaBelief(step_in_backward=True), which releases its gradient there, so this "
        "step() would never see it. Step each parameter with one optimizer: leave it out of one "
        "of them, or call remove_backward_hooks() on the in-backward one (or delete it)."
    )


def framework_clipping_message(what: str, fix: str) -> str:
    """Why a training framework's gradient clipping is refused with the step in backward."""
    return (
        f"AdaBelief(step_in_backward=True) cannot be used with {what}: global gradient-norm "
        "clipping needs every gradient before any parameter steps, and backward has already "
        "stepped each parameter and released its gradient, so the clipping would find nothing "
        f"to clip. Set {fix}, and clip per parameter in a post-accumulate-grad hook registered "
        "before the optimizer (docs/step-in-backward.md), or use the ordinary step "
        "(step_in_backward=False)."
    )


def _nested_backward() -> str | None:
    """What runs the current backward inside another one (None if nothing does): a call of the
    autograd engine made by a custom autograd Function's backward, as reentrant activation
    checkpointing (``torch.utils.checkpoint(..., use_reentrant=True)``) makes one per
    checkpointed segment. On the Python stack of the hook: the engine's entry point
    (``_engine_run_backward``) below that Function's backward. A Function's backward that calls
    the hooks itself, with no engine call between (FSDP2's post-backward, after its
    reduce-scatter), is not a nested backward."""
    if _ENGINE_RUN_BACKWARD is None:  # another torch: no way to tell, so nothing is refused
        return None
    frame: FrameType | None = sys._getframe(1)
    engine_below = False
    while frame is not None:
        code = frame.f_code
        if code is _ENGINE_RUN_BACKWARD:
            engine_below = True
        elif code is _BACKWARD_APPLY and engine_below:
            ctx = frame.f_locals.get("self")
            cls = getattr(ctx, "_forward_cls", None)
            if cls is not None and cls.__module__ == "torch.utils.checkpoint":
                return "reentrant activation checkpointing, use_reentrant=True"
            name = getattr(cls, "__qualname__", "an autograd Function")
            return f"the backward of the autograd Function {name}"
        frame = frame.f_back
    return None


_BACKWARD_APPLY = BackwardCFunction.apply.__code__
_engine_entry = getattr(torch.autograd.graph, "_engine_run_backward", None)
_ENGINE_RUN_BACKWARD = getattr(_engine_entry, "__code__", None)

#: How far up the stack ``step()`` looks for a training framework's loop, and in which files.
_FRAMEWORK_FRAMES = 24
_FRAMEWORK_PATHS = ("/transformers/", "/lightning/", "/pytorch_lightning/")


def framework_clipping() -> str | None:
    """The message for gradient clipping asked of a training framework whose loop calls this
    ``step()`` (None when there is none): ``transformers.Trainer`` with ``max_grad_norm > 0``
    (its default is 1.0), or a Lightning ``Trainer`` with ``gradient_clip_val``. Both clip
    between backward and ``step()``, where the in-backward step has left no gradient.

    Only frames of those packages' files are looked at (their ``self``/``model`` locals)."""
    frame: FrameType | None = sys._getframe(1)
    for _ in range(_FRAMEWORK_FRAMES):
        if frame is None:
            return None
        if _is_framework_file(frame.f_code.co_filename):
            for name in ("self", "model"):
                found = _clipping_of(frame.f_locals.get(name))
                if found is not None:
                    return found
        frame = frame.f_back
    return None


@functools.lru_cache(maxsize=4096)
def _is_framework_file(path: str) -> bool:
    path = path.replace("\\", "/")
    return any(part in path for part in _FRAMEWORK_PATHS)


def _clipping_of(obj: object) -> str | None:
    try:
        args = getattr(obj, "args", None)
        max_grad_norm = getattr(args, "max_grad_norm", None)
        if isinstance(max_grad_norm, int | float) and max_grad_norm > 0:  # transformers.Trainer
            return framework_clipping_message(
                f"transformers.Trainer's gradient clipping (max_grad_norm={max_grad_norm})",
                "max_grad_norm=0 in TrainingArguments",
            )
        trainer = getattr(obj, "_trainer", None)  # a LightningModule (without raising if bare)
        clip = getattr(trainer, "gradient_clip_val", None)
        if isinstance(clip, int | float) and clip > 0:
            return framework_clipping_message(
                f"Lightning's gradient clipping (Trainer(gradient_clip_val={clip}))",
                "gradient_clip_val=None in the Trainer",
            )
    except Exception:  # a property of someone else's object failed: not ours to report
        return None
    return None


def _live_owners(param: Tensor, exclude: BackwardStep | None) -> list[BackwardStep]:
    """The in-backward optimizers (their :class:`BackwardStep`) other than ``exclude`` whose
    live hook on ``param`` steps it: read from the hooks actually registered on ``param``."""
    hooks = getattr(param, "_post_accumulate_grad_hooks", None) or {}
    owners = []
    for hook in list(hooks.values()):
        if isinstance(hook, functools.partial) and hook.func is _on_grad:
            other = hook.args[0]()
            if other is not None and other is not exclude and other.steps(hook.args[1]):
                owners.append(other)
    return owners


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
        #: Asked at each hook call, when set (by the framework integrations): True means this
        #: backward only accumulates, as inside :meth:`accumulating` (a micro-batch that does
        #: not end the framework's optimizer step).
        self.accumulate_when: Callable[[], bool] | None = None
        #: ids of the parameters whose gradient was left by an accumulating backward.
        self._accumulated: set[int] = set()
        #: The parameters stepped in the backward (autograd graph task) ``_task``, checked at its
        #: end. A backward that raised never runs the check; the next one starts afresh.
        self._stepped: list[Tensor] = []
        self._task = -1
        #: What runs ``_task`` inside another backward (see :func:`_nested_backward`), or None.
        self._nested: str | None = None
        #: A training framework's gradient clipping found on the stack of ``_task``'s first
        #: hook (see :func:`framework_clipping`), or None: refused before the first step.
        self._clipping: str | None = None
        #: ids of the parameters stepped in backward since the last ``step()``/``zero_grad()``
        #: (the optimizer step's window): each steps at most once in it.
        self._window: set[int] = set()
        #: Why a backward was refused part-way through (its leftover gradients are not
        #: "written after the step"); cleared by ``step()`` or ``zero_grad()``.
        self._refused: str | None = None
        #: ids of the parameters that another live in-backward optimizer had hooked when this
        #: one hooked them (or the reverse); settled at their next hook call.
        self._contested: set[int] = set()

    @property
    def active(self) -> bool:
        """Whether any parameter has a hook."""
        return bool(self._hooks)

    def is_hooked(self, param: Tensor) -> bool:
        return id(param) in self._hooks

    def steps(self, group_index: int) -> bool:
        """Whether this optimizer is alive, has hooks, and its group ``group_index`` steps in
        backward (a hook of a group switched off since the last sync does nothing)."""
        owner = self._owner()
        if owner is None or not self._hooks or group_index >= len(owner.param_groups):
            return False
        return bool(owner.param_groups[group_index]["step_in_backward"])

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
                for other in _live_owners(p, exclude=self):
                    self._contested.add(key)  # refused at p's next backward if both still live
                    other._contested.add(key)
                hook = functools.partial(_on_grad, self._self_ref, index)
                self._hooks[key] = (p.register_post_accumulate_grad_hook(hook), index)
                owner._param_state(owner.param_groups[index], p)
                added.append(p)
        if self._hooks:
            _LIVE.add(self)
        return added

    def remove(self) -> None:
        """Remove every hook: backward then only accumulates gradients, as without this."""
        for handle, _ in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self._accumulated.clear()
        self._window.clear()
        self._contested.clear()
        _LIVE.discard(self)

    def end_window(self) -> None:
        """End the optimizer step (``step()`` or ``zero_grad()`` was called): every parameter
        may step in backward once more."""
        self._window.clear()
        self._refused = None

    def _refuse(self, message: str) -> StepInBackwardError:
        """The error to raise from a hook; ``step()`` names it for the gradients it leaves."""
        self._refused = message
        return StepInBackwardError(message)

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
        key = id(param)
        if self._contested and key in self._contested:
            self._settle_contest(param)  # (before holding the optimizer: it may be collected)
        owner = self._owner()
        if owner is None:
            return
        group = owner.param_groups[group_index]
        if not group["step_in_backward"]:
            return  # step() syncs the hooks and steps this gradient the ordinary way
        if self._accumulating or (self.accumulate_when is not None and self.accumulate_when()):
            self._accumulated.add(key)
            return
        task = torch._C._current_graph_task_id()
        if task != self._task:
            self._begin_task(task)
        if self._nested is not None:
            raise self._refuse(nested_backward_message(param, self._nested, owner))
        if self._clipping is not None:
            raise self._refuse(self._clipping)
        if key in self._window:
            raise self._refuse(stepped_twice_message(param, owner))
        self._accumulated.discard(key)
        with torch.no_grad():
            owner._step_params(group, [param])
        param.grad = None
        self._window.add(key)
        if task != -1:  # (-1: called outside a backward, by hand: nothing to check at its end)
            self._stepped.append(param)

    def _begin_task(self, task: int) -> None:
        """The first in-backward step of the backward (graph task) ``task``: is it run inside
        another backward, or by a training framework that will clip the gradients after it;
        queue the check at its end.

        The stack shows the framework's loop where autograd runs the hooks on the thread that
        called backward (CPU); elsewhere ``step()`` refuses the clipping, after this step."""
        self._task, self._stepped, self._nested, self._clipping = task, [], None, None
        if task != -1:
            self._nested = _nested_backward()
            if self._nested is None:
                self._clipping = framework_clipping()
            Variable._execution_engine.queue_callback(self._queue_final_check)

    def _settle_contest(self, param: Tensor) -> None:
        """``param`` had another in-backward optimizer when one of the two hooked it: refuse it
        if both are still alive after a collection (which frees an optimizer held only by a
        reference cycle, and its hooks with it)."""
        if _live_owners(param, exclude=self):
            gc.collect()
            if self._owner() is not None and _live_owners(param, exclude=self):
                raise self._refuse(two_optimizers_message(param, self._owner()))
        self._contested.discard(id(param))

    def _queue_final_check(self) -> None:
        # Queued from the first hook of a backward; it queues the check behind every callback
        # queued since (DistributedDataParallel's reducer writes the gradients in one of them).
        Variable._execution_engine.queue_callback(self._final_check)

    def _final_check(self) -> None:
        stepped, self._stepped, self._task = self._stepped, [], -1
        for p in stepped:
            if p.grad is not None:
                raise StepInBackwardError(written_after_step_message(p))

    def check_shared(self) -> None:
        """``step()`` of the ordinary groups refuses a parameter that another live optimizer
        steps in backward (its gradient is released there). Free unless one exists."""
        if not _LIVE:
            return
        hooked: set[int] = set()
        for other in list(_LIVE):
            if other is not self and other._owner() is not None:
                hooked.update(other._hooks)
        owner = self._owner()
        if owner is None or not hooked:
            return
        for group in owner.param_groups:
            if group["step_in_backward"]:
                continue
            for p in group["params"]:
                if id(p) in hooked and _live_owners(p, exclude=self):
                    gc.collect()
                    if _live_owners(p, exclude=self):
                        raise StepInBackwardError(shared_with_ordinary_message(p, owner))

    def check_step(
        self, grad_scale: Tensor | None, found_inf: Tensor | None, newly_hooked: list[Tensor]
    ) -> None:
        """What ``step()`` refuses: GradScaler, a training framework's gradient clipping, and
        gradients held by hooked parameters that were hooked during the backward (accumulated
        and not applied, or written after the step)."""
        if grad_scale is not None or found_inf is not None:
            raise StepInBackwardError(GRAD_SCALER_MESSAGE)
        if self._hooks:
            clipping = framework_clipping()
            if clipping is not None:
                raise StepInBackwardError(clipping)
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
                if self._refused is not None:
                    raise StepInBackwardError(left_by_refused_backward_message(p, self._refused))
                raise StepInBackwardError(written_after_step_message(p))

    def check_closure(self) -> None:
        """``step(closure)`` cannot step while the closure's backward only accumulates, nor
        under a framework that clips the gradients after the closure's backward (Lightning):
        refused before the closure runs, so before any in-backward step."""
        if not self._hooks:
            return
        if self._accumulating:
            raise StepInBackwardError(CLOSURE_WHILE_ACCUMULATING_MESSAGE)
        clipping = framework_clipping()
        if clipping is not None:
            raise StepInBackwardError(clipping)


#: The :class:`BackwardStep` objects that have hooks (to find the in-backward optimizers that
#: an ordinary one shares parameters with).
_LIVE: weakref.WeakSet[BackwardStep] = weakref.WeakSet()
