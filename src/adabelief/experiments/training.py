"""Training machinery shared by the tasks.

* :func:`seed_everything` / :func:`configure_torch` - determinism and thread count.
* :func:`model_for_optimizer` - the model in the dtype its optimizer variant trains (e.g. the
  bfloat16 variants), taking and returning float32 tensors.
* :func:`optimizer_step` - zero grads, backward, optional clipping, step (every task uses it).
* :func:`minibatches` - generator-driven shuffled index batches.
* :func:`fit` - the epoch loop of the supervised tasks (classification and language modelling):
  step learning-rate schedule, per-epoch evaluation, best-validation tracking, divergence stop;
  every evaluation also records the optimizer steps and seconds so far (time-to-target).
* :func:`inverse_sqrt_schedule` - linear warm-up then ``1/sqrt(step)`` decay (Transformers).
* :class:`StepClock` - counts optimizer steps and training seconds.
* :func:`convergence_metrics` - the convergence rule's figures: how much a run's smoothed
  validation curve still improved over the last eighth of its budget, and the standard error of
  that figure from the curve's own noise (stored in every run's metrics; the rule is
  :func:`adabelief.experiments.stats.late_improvement`'s).
* :func:`train_classifier_epoch` / :func:`evaluate_classifier` - classification epoch and eval,
  used by the classification task and by the GAN task's feature network.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from adabelief.experiments.registry import get_entry
from adabelief.experiments.spec import Metric
from adabelief.experiments.stats import convergence_metrics

__all__ = [
    "FitResult",
    "StepClock",
    "configure_torch",
    "convergence_metrics",
    "evaluate_classifier",
    "fit",
    "inverse_sqrt_schedule",
    "is_finite",
    "minibatches",
    "model_for_optimizer",
    "optimizer_step",
    "seed_everything",
    "train_classifier_epoch",
]


def configure_torch(threads: int, deterministic: bool = True) -> None:
    """Set torch's intra-op thread count and ask for deterministic kernels where they exist."""
    torch.set_num_threads(max(1, threads))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a fresh CPU generator for data order and noise."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - seeds legacy global users (none of ours)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def is_finite(value: float) -> bool:
    """True for a finite float."""
    return math.isfinite(value)


def _cast_floats(value: object, dtype: torch.dtype) -> object:
    """``value`` (a tensor, or tensors nested in tuples, lists and dicts) with every floating
    tensor cast to ``dtype``; other values unchanged."""

    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, tuple | list):
        return type(value)(_cast_floats(item, dtype) for item in value)
    if isinstance(value, dict):
        return {key: _cast_floats(item, dtype) for key, item in value.items()}
    return value


ModelT = TypeVar("ModelT", bound=nn.Module)


def model_for_optimizer(model: ModelT, optimizer: str) -> ModelT:
    """Put ``model`` in the dtype that the registered ``optimizer`` trains (its entry's
    ``model_dtype``) and return it; unchanged when the entry names none.

    Every task calls this before building the optimizer.  The cast model takes and returns
    float32: hooks on ``model`` cast its floating inputs to the model's dtype and its floating
    outputs back to float32, so losses, metrics and evaluation stay the task's float32 code.
    Integer inputs (token ids, labels) pass as they are.  Only calls of ``model`` itself are
    wrapped, not of its submodules.
    """
    dtype = get_entry(optimizer).model_dtype
    if dtype is None:
        return model
    model.to(dtype)

    def cast_inputs(
        _: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]
    ) -> tuple[object, dict[str, object]]:
        return _cast_floats(args, dtype), _cast_floats(kwargs, dtype)  # type: ignore[return-value]

    def cast_outputs(_: nn.Module, __: tuple[object, ...], output: object) -> object:
        return _cast_floats(output, torch.float32)

    model.register_forward_pre_hook(cast_inputs, with_kwargs=True)
    model.register_forward_hook(cast_outputs)
    return model


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    parameters: Iterable[nn.Parameter] | None = None,
    clip: float | None = None,
) -> None:
    """Zero the gradients, back-propagate ``loss``, clip the gradient norm if asked, and step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None and parameters is not None:
        nn.utils.clip_grad_norm_(list(parameters), clip)
    optimizer.step()


def minibatches(
    n: int, batch_size: int, generator: torch.Generator, drop_last: bool = False
) -> Iterator[torch.Tensor]:
    """Shuffled index batches over ``range(n)``, ordered by ``generator``."""
    order = torch.randperm(n, generator=generator)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]


class StepClock:
    """Counts ``optimizer.step()`` calls (a step post-hook) and the seconds since creation."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.steps = 0
        self.started = time.perf_counter()
        self._handles = [o.register_step_post_hook(self._count) for o in optimizers[:1]]

    def _count(self, *_: object) -> None:
        self.steps += 1

    @property
    def seconds(self) -> float:
        """Seconds since the clock was created."""
        return time.perf_counter() - self.started

    def close(self) -> None:
        """Remove the hook."""
        for handle in self._handles:
            handle.remove()


def inverse_sqrt_schedule(
    optimizer: torch.optim.Optimizer, warmup: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning rate ``lr * min(t / warmup, sqrt(warmup / t))`` at step ``t = 1, 2, ...``.

    Linear warm-up to the preset ``lr`` over ``warmup`` steps, then decay as ``1 / sqrt(t)``
    (Vaswani et al.; the paper's Transformer schedule).  Call ``step()`` after every
    optimizer step.
    """
    w = max(1, int(warmup))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda index: min((index + 1) / w, math.sqrt(w / (index + 1)))
    )


@dataclass
class FitResult:
    """Per-epoch curves, the epoch with the best selection metric, and whether training blew up."""

    curves: dict[str, list[float | None]] = field(default_factory=dict)
    best_epoch: int | None = None
    best: dict[str, float] = field(default_factory=dict)
    diverged: bool = False


def fit(
    *,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    milestones: Iterable[int],
    gamma: float,
    train_epoch: Callable[[int], dict[str, float]],
    evaluate: Callable[[], dict[str, float]],
    select: Metric | None = None,
    on_best: Callable[[], None] | None = None,
    progress: bool = False,
    description: str = "",
) -> FitResult:
    """Run ``epochs`` epochs with a step schedule (lr times ``gamma`` at each milestone).

    ``train_epoch(epoch)`` trains one epoch and returns training metrics (must include
    ``train_loss``); ``evaluate()`` returns held-out metrics.  Every metric becomes a per-epoch
    curve.  When ``select`` is given, the epoch with its best value is remembered (and
    ``on_best`` is called then, e.g. to keep a copy of the weights).  A non-finite training loss
    stops training and marks the result as diverged.  The curves ``step`` and ``time_s`` hold
    the optimizer steps and the seconds of training (evaluations included) at each epoch's end.
    """
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(milestones), gamma)
    result = FitResult()
    best_value: float | None = None
    clock = StepClock(optimizer)
    bar = tqdm(range(epochs), desc=description, leave=False, disable=not progress, unit="epoch")
    for epoch in bar:
        trained = train_epoch(epoch)
        if not is_finite(trained["train_loss"]):
            result.diverged = True
            break
        scheduler.step()
        measured = {**trained, **evaluate()}
        result.curves.setdefault("epoch", []).append(float(epoch + 1))
        result.curves.setdefault("step", []).append(float(clock.steps))
        result.curves.setdefault("time_s", []).append(round(clock.seconds, 3))
        for name, value in measured.items():
            result.curves.setdefault(name, []).append(value if is_finite(value) else None)
        if select is not None and is_finite(measured[select.name]):
            value = measured[select.name]
            improved = best_value is None or (
                value > best_value if select.higher_is_better else value < best_value
            )
            if improved:
                best_value = value
                result.best_epoch = epoch + 1
                result.best = dict(measured)
                if on_best is not None:
                    on_best()
        bar.set_postfix(loss=f"{trained['train_loss']:.3f}")
    clock.close()
    return result


def train_classifier_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    generator: torch.Generator,
    device: str = "cpu",
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    clip: float | None = None,
) -> dict[str, float]:
    """One epoch of cross-entropy training; returns mean ``train_loss`` and running ``train_acc``.

    ``train_acc`` is measured on the fly in training mode (as the paper's code does), so it is
    the accuracy on the (augmented) batches as they were seen.
    """
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for index in minibatches(len(y), batch_size, generator):
        inputs = x[index]
        if augment is not None:
            inputs = augment(inputs, generator)
        inputs, targets = inputs.to(device), y[index].to(device)
        logits = model(inputs)
        loss = F.cross_entropy(logits, targets)
        if not torch.isfinite(loss):
            return {"train_loss": math.nan, "train_acc": math.nan}
        optimizer_step(optimizer, loss, model.parameters(), clip)
        total_loss += loss.item() * len(index)
        correct += int((logits.argmax(1) == targets).sum())
        seen += len(index)
    return {"train_loss": total_loss / seen, "train_acc": 100.0 * correct / seen}


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000, device: str = "cpu"
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (percent) of ``model`` in eval mode."""
    if len(y) == 0:
        return math.nan, math.nan
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        inputs = x[start : start + batch_size].to(device)
        targets = y[start : start + batch_size].to(device)
        logits = model(inputs)
        total_loss += float(F.cross_entropy(logits, targets, reduction="sum"))
        correct += int((logits.argmax(1) == targets).sum())
    return total_loss / len(y), 100.0 * correct / len(y)
