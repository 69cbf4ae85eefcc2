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
"""

from __future__ import annotations

import inspect
from typing import Any

from transformers import TrainingArguments

from adabelief.optimizer import AdaBelief

__all__ = ["optimizer_cls_and_kwargs"]

#: Options that come from ``TrainingArguments``, with the field to set instead.
_FROM_TRAINING_ARGUMENTS = {
    "lr": "learning_rate",
    "betas": "adam_beta1 / adam_beta2",
    "weight_decay": "weight_decay (the Trainer puts it into the parameter groups)",
}


def optimizer_cls_and_kwargs(
    args: TrainingArguments, **options: Any
) -> tuple[type[AdaBelief], dict[str, Any]]:
    """``(AdaBelief, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``.

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
            Trainer's scheduler and parameter groups read them.
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
    return AdaBelief, kwargs
