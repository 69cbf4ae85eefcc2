"""Hugging Face ``transformers.Trainer``: AdaBelief through ``optimizer_cls_and_kwargs``.

``TrainingArguments.optim`` accepts only the Trainer's own optimizer names. A third-party
optimizer comes in as a class with keyword arguments, or as a ready optimizer and scheduler::

    from transformers import Trainer, TrainingArguments
    from adabelief.integrations.huggingface import optimizer_cls_and_kwargs

    args = TrainingArguments("out", learning_rate=1e-3, weight_decay=0.01)
    trainer = Trainer(model, args, train_dataset=data,
                      optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args, eps=1e-16))

With ``optimizer_cls_and_kwargs`` the Trainer builds the parameter groups itself:
``args.weight_decay`` for the weights, 0 for biases and normalisation layers. It then calls
``cls(groups, **kwargs)``, and its learning-rate scheduler scales the learning rate the optimizer
was built with. It does not pass ``args.learning_rate`` or the betas to a custom class. With a bare
``(AdaBelief, {})``, training would silently run at AdaBelief's default ``lr=1e-3``, whatever
``args.learning_rate`` says. ``optimizer_cls_and_kwargs`` closes that gap.

Checkpoints need nothing more. The Trainer saves ``optimizer.state_dict()`` in each checkpoint,
and ``trainer.train(resume_from_checkpoint=...)`` loads it back into the AdaBelief it builds.

The step in backward (``step_in_backward=True``) with the Trainer: ``optimizer_cls_and_kwargs``
refuses ``max_grad_norm > 0`` (the Trainer's default is 1.0; its global clipping would find no
gradient), and builds an optimizer that follows the Trainer's gradient accumulation
(:func:`follow_gradient_accumulation`): the backward passes of the micro-batches that do not end
an optimizer step only accumulate, and the last one steps with the sum. For an optimizer passed
as ``optimizers=(optimizer, scheduler)``, call :func:`follow_gradient_accumulation` on it.
"""

from __future__ import annotations

import inspect
from typing import Any

from transformers import TrainingArguments

from adabelief.optimizer import AdaBelief

__all__ = ["TrainerAdaBelief", "follow_gradient_accumulation", "optimizer_cls_and_kwargs"]

#: Options that come from ``TrainingArguments``, with the field to set instead.
_FROM_TRAINING_ARGUMENTS = {
    "lr": "learning_rate",
    "betas": "adam_beta1 / adam_beta2",
    "weight_decay": "weight_decay (the Trainer puts it into the parameter groups)",
}


def optimizer_cls_and_kwargs(
    args: TrainingArguments, **options: Any
) -> tuple[type[AdaBelief], dict[str, Any]]:
    """``(AdaBelief, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``; with
    ``step_in_backward=True``, ``(TrainerAdaBelief, kwargs)``, which follows the Trainer's
    gradient accumulation.

    The keyword arguments are ``lr=args.learning_rate`` and
    ``betas=(args.adam_beta1, args.adam_beta2)``, plus ``options`` (any other argument of
    ``adabelief.AdaBelief``: ``eps``, ``rectify``, ``state_precision``, ...).

    ``args.adam_epsilon`` is not used. AdaBelief's ``eps`` is added to the belief ``s`` inside
    the square root, so it is about the square of Adam's. Adam's ``1e-8`` is the value the
    authors recommend only where SGD beats Adam (CNNs on images); for transformers they recommend
    AdaBelief's default ``1e-16``. Pass ``eps=`` to choose.

    Raises:
        TypeError: ``args`` is not a ``transformers.TrainingArguments``.
        ValueError: ``options`` names an argument that ``AdaBelief`` does not take, or one of
            ``lr``, ``betas``, ``weight_decay``. Those are set in ``TrainingArguments``, where the
            Trainer's scheduler and parameter groups read them. Also ``step_in_backward=True``
            with ``args.max_grad_norm > 0``: the Trainer's clipping would find no gradient.
    """
    if not isinstance(args, TrainingArguments):
        raise TypeError(
            f"optimizer_cls_and_kwargs needs the Trainer's TrainingArguments, got {type(args).__name__}"
        )
    for name, field in _FROM_TRAINING_ARGUMENTS.items():
        if name in options:
            raise ValueError(f"{name}= is set in TrainingArguments: use {field}")
    accepted = set(inspect.signature(AdaBelief).parameters) - {"params"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"AdaBelief has no argument {', '.join(unknown)} (it takes {', '.join(sorted(accepted))})"
        )
    kwargs: dict[str, Any] = {
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        **options,
    }
    if options.get("step_in_backward"):
        if args.max_grad_norm is not None and args.max_grad_norm > 0:
            raise ValueError(
                f"step_in_backward=True with max_grad_norm={args.max_grad_norm}: the Trainer "
                "clips the global gradient norm after backward, where the in-backward step has "
                "left no gradient to clip. Set max_grad_norm=0 in TrainingArguments (clip per "
                "parameter in a post-accumulate-grad hook instead: docs/step-in-backward.md), "
                "or leave step_in_backward off"
            )
        return TrainerAdaBelief, kwargs
    return AdaBelief, kwargs


def follow_gradient_accumulation(optimizer: AdaBelief) -> AdaBelief:
    """Make the in-backward groups of ``optimizer`` follow the Trainer's gradient accumulation,
    and return it.

    The Trainer marks each micro-batch in accelerate's ``GradientState.sync_gradients``: False
    for those that do not end an optimizer step. Their backward passes then only accumulate
    (as inside :meth:`~adabelief.AdaBelief.accumulating`), and the last micro-batch's backward
    steps each parameter with the accumulated sum, as ``optimizer.step()`` would: the same
    result as the ordinary step with ``gradient_accumulation_steps``. Without it, the second
    micro-batch's backward raises ``StepInBackwardError``.

    Outside a Trainer (and outside ``accelerator.accumulate``) ``sync_gradients`` is True, so
    nothing changes there."""
    from accelerate.state import GradientState

    state = GradientState()
    optimizer._backward.accumulate_when = lambda: not state.sync_gradients
    return optimizer


class TrainerAdaBelief(AdaBelief):
    """``adabelief.AdaBelief`` that follows the Trainer's gradient accumulation
    (:func:`follow_gradient_accumulation`): what ``optimizer_cls_and_kwargs`` returns with
    ``step_in_backward=True``. Its state_dict is an AdaBelief's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        follow_gradient_accumulation(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        follow_gradient_accumulation(self)
