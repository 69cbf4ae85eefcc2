"""Lightning: the step in backward (``AdaBelief(step_in_backward=True)``) with Lightning's
gradient accumulation.

Lightning needs no adapter for ``adabelief.AdaBelief``. Only an in-backward one needs this
callback, and only with ``accumulate_grad_batches > 1``::

    import lightning.pytorch as L
    from adabelief.integrations.lightning import StepInBackward

    trainer = L.Trainer(accumulate_grad_batches=4, callbacks=[StepInBackward()])

With it, the backward passes of the micro-batches that do not end an optimizer step only
accumulate (as inside :meth:`adabelief.AdaBelief.accumulating`), and the last one steps each
parameter with the accumulated sum: the result of the ordinary step with
``accumulate_grad_batches``. Without it, the second micro-batch's backward raises
``StepInBackwardError``, before any parameter steps twice.

``Trainer(gradient_clip_val=...)`` cannot work with the step in backward: Lightning clips the
global gradient norm after backward, where the in-backward step has left no gradient. The
callback refuses it when training starts; without the callback, the first backward (on CPU)
or ``optimizer.step`` refuses it. Clip per parameter in a post-accumulate-grad hook instead
(docs/step-in-backward.md).
"""

from __future__ import annotations

import weakref
from typing import Any

import lightning.pytorch as L

from adabelief.backward_step import StepInBackwardError, framework_clipping_message
from adabelief.optimizer import AdaBelief

__all__ = ["StepInBackward"]


def _in_backward_optimizers(trainer: L.Trainer) -> list[AdaBelief]:
    return [
        optimizer
        for optimizer in trainer.optimizers
        if isinstance(optimizer, AdaBelief)
        and any(group["step_in_backward"] for group in optimizer.param_groups)
    ]


class StepInBackward(L.Callback):
    """Make every in-backward ``AdaBelief`` of the Trainer follow ``accumulate_grad_batches``,
    and refuse ``gradient_clip_val`` with it (``StepInBackwardError``, when training starts).

    The optimizers' hooks ask Lightning, at each backward, whether this micro-batch only
    accumulates (the loop's own decision, ``fit_loop._should_accumulate()``)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        optimizers = _in_backward_optimizers(trainer)
        if not optimizers:
            return
        clip = trainer.gradient_clip_val
        if clip is not None and clip > 0:
            raise StepInBackwardError(
                framework_clipping_message(
                    f"Lightning's gradient clipping (Trainer(gradient_clip_val={clip}))",
                    "gradient_clip_val=None in the Trainer",
                )
            )
        trainer_ref = weakref.ref(trainer)  # the optimizers must not keep the Trainer alive

        def accumulate_when() -> bool:
            current = trainer_ref()
            return current is not None and bool(current.fit_loop._should_accumulate())

        for optimizer in optimizers:
            optimizer._backward.accumulate_when = accumulate_when

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for optimizer in _in_backward_optimizers(trainer):
            optimizer._backward.accumulate_when = None

    def state_dict(self) -> dict[str, Any]:
        return {}
