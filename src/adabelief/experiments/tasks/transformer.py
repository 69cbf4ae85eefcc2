"""The paper's fourth setting, a Transformer, as language modelling (claims 1 and 2).

The paper trains a Transformer on IWSLT14 German-English with AdaBelief's Transformer recipe:
rectification and decoupled weight decay on, eps 1e-16, an inverse-square-root learning-rate
schedule with warm-up, and compares BLEU with AdamW and RAdam.  Here the same recipe trains a
small causal Transformer language model:

* without ``--data``: characters of Python's documentation text (``pydoc_data``, ships with
  Python);
* with ``--data`` holding WikiText-2 (``wiki.train.tokens``, ``wiki.valid.tokens``,
  ``wiki.test.tokens``, maybe in ``wikitext-2/``): words.

Training samples random windows of ``context + 1`` tokens (order drawn from the seed); every
optimizer follows the inverse-square-root schedule with the same warm-up.  The held-out metrics
are perplexity and next-token accuracy on validation text during training, and on test text
with the weights of the best validation perplexity at the end.  The claims are judged against
Adam and AdamW, the paper's baselines for this setting.
"""

from __future__ import annotations

import copy
import functools
import math
import statistics
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from adabelief.experiments.data import (
    DataCheck,
    TextCorpus,
    check_wikitext,
    load_python_docs,
    load_wikitext,
)
from adabelief.experiments.models import TransformerLanguageModel
from adabelief.experiments.presets import get_preset
from adabelief.experiments.registry import create_optimizer
from adabelief.experiments.spec import Experiment, Metric, RunContext, RunOutput, RunSpec
from adabelief.experiments.tasks.base import PlanOptions, Task
from adabelief.experiments.training import (
    StepClock,
    convergence_metrics,
    inverse_sqrt_schedule,
    model_for_optimizer,
    optimizer_step,
    seed_everything,
)

__all__ = ["TransformerTask", "evaluate_language_model", "sample_windows"]

_TINY = {
    "max_chars": 20_000,
    "d_model": 16,
    "heads": 2,
    "layers": 1,
    "ff_dim": 32,
    "context": 16,
    "batch_size": 8,
    "steps": 30,
    "warmup": 5,
    "evaluations": 2,
    "eval_tokens": 400,
}
_RIVALS = ("adam", "adamw")


@functools.lru_cache(maxsize=2)
def _corpus(corpus: str, data_dir: Path | None, max_chars: int | None) -> TextCorpus:
    """The corpus of a run (cached per process)."""
    if corpus == "wikitext":
        if data_dir is None:
            raise ValueError("the WikiText-2 experiment needs --data")
        return load_wikitext(data_dir)
    return load_python_docs(max_chars)


def sample_windows(
    stream: torch.Tensor, batch: int, length: int, generator: torch.Generator
) -> torch.Tensor:
    """``batch`` random windows of ``length`` consecutive tokens, shape ``(batch, length)``."""
    starts = torch.randint(0, len(stream) - length + 1, (batch,), generator=generator)
    return torch.stack([stream[s : s + length] for s in starts.tolist()])


@torch.no_grad()
def evaluate_language_model(
    model: TransformerLanguageModel,
    stream: torch.Tensor,
    context: int,
    device: str,
    limit: int | None = None,
) -> tuple[float, float]:
    """Perplexity ``exp(mean cross-entropy)`` and next-token accuracy (%) on ``stream``.

    The stream (its first ``limit`` tokens) is cut into consecutive windows of ``context``
    predicted tokens; each window predicts its tokens from the ones before it in the window.
    """
    model.eval()
    data = stream if limit is None else stream[: limit + 1]
    windows = (len(data) - 1) // context
    if windows == 0:
        return math.nan, math.nan
    inputs = data[: windows * context].view(windows, context)
    targets = data[1 : windows * context + 1].view(windows, context)
    total, correct = 0.0, 0
    for start in range(0, windows, 64):
        logits = model(inputs[start : start + 64].to(device))
        batch_targets = targets[start : start + 64].to(device)
        total += float(
            F.cross_entropy(logits.flatten(0, 1), batch_targets.flatten(), reduction="sum")
        )
        correct += int((logits.argmax(-1) == batch_targets).sum())
    model.train()
    count = windows * context
    mean = total / count
    return (math.exp(mean) if mean < 700 else math.inf), 100.0 * correct / count


class TransformerTask(Task):
    """A small Transformer language model trained with the paper's Transformer recipe."""

    name = "transformer"
    summary = (
        "Transformer language model with the paper's recipe: Python docs, characters (bundled) "
        "or WikiText-2"
    )
    uses_data = True
    data_help = (
        "WikiText-2 wiki.train.tokens, wiki.valid.tokens, wiki.test.tokens, maybe in wikitext-2/"
    )

    def check_data(self, data_dir: Path) -> DataCheck:
        """Find and validate the WikiText-2 token files in ``data_dir``."""
        return check_wikitext(data_dir)

    def experiments(self, options: PlanOptions) -> list[Experiment]:
        """One experiment: bundled characters, or WikiText-2 words with ``--data``."""
        preset = get_preset(
            "transformer/wikitext2" if options.data_dir else "transformer/python-docs-char"
        )
        settings = preset.settings_for(options.quick)
        if options.tiny:
            settings.update(_TINY)
        if settings["corpus"] != "wikitext":
            # Part of the run identity: the documentation text differs between Python versions.
            settings["corpus_fingerprint"] = load_python_docs(settings["max_chars"]).fingerprint
        unit = "word" if settings["corpus"] == "wikitext" else "character"
        return [
            Experiment(
                task=self.name,
                name=f"{settings['corpus']}-{settings['layers']}layer",
                title=f"{settings['layers']}-layer Transformer on {settings['corpus']} ({unit}s)",
                preset=preset.name,
                settings=settings,
                score=Metric("test_ppl", "test perplexity at the best validation point", False),
                selection=Metric("best_val_ppl", "best validation perplexity", False),
                speed=Metric("train_loss_auc", "mean training loss over training", False),
                extra=(
                    Metric("test_accuracy", f"test next-{unit} accuracy (%)", True),
                    Metric("final_train_loss", "final training loss", False),
                ),
                claims=("convergence", "generalization"),
                curves=(
                    ("train_loss", "training loss"),
                    ("val_ppl", "validation perplexity"),
                    ("val_accuracy", f"validation next-{unit} accuracy (%)"),
                ),
                x_label="step",
                target=Metric("val_ppl", "validation perplexity", False),
                versus=dict.fromkeys(("convergence", "generalization"), _RIVALS),
                # The paper's Transformer is translation (BLEU); shown beside, not compared.
                paper_key="iwslt14/transformer",
                paper_comparable=False,
            )
        ]

    def run(self, spec: RunSpec, context: RunContext) -> RunOutput:
        """Train with random windows and the inverse-square-root schedule; test the best weights."""
        settings = spec.settings
        corpus = _corpus(settings["corpus"], context.data_dir, settings.get("max_chars"))
        window = int(settings["context"])
        if len(corpus.train) <= window + 1:
            raise ValueError(
                f"the training text has {len(corpus.train)} tokens, fewer than a window"
            )
        generator = seed_everything(spec.seed)
        device = spec.device
        model = TransformerLanguageModel(
            len(corpus.vocab),
            int(settings["d_model"]),
            int(settings["heads"]),
            int(settings["layers"]),
            int(settings["ff_dim"]),
            window,
            float(settings["dropout"]),
        ).to(device)
        model = model_for_optimizer(model, spec.optimizer)
        optimizer = create_optimizer(spec.optimizer, model.parameters(), **spec.hparams)
        schedule = inverse_sqrt_schedule(optimizer, int(settings["warmup"]))
        steps, batch = int(settings["steps"]), int(settings["batch_size"])
        every = max(1, steps // int(settings["evaluations"]))
        eval_tokens = settings.get("eval_tokens")
        curves: dict[str, list[float | None]] = {
            k: [] for k in ("x", "step", "time_s", "train_loss", "val_ppl", "val_accuracy")
        }
        best_ppl, best_weights = math.inf, None
        losses: list[float] = []
        interval: list[float] = []
        diverged = False
        clock = StepClock(optimizer)
        started = time.perf_counter()
        model.train()
        for step in range(1, steps + 1):
            tokens = sample_windows(corpus.train, batch, window + 1, generator).to(device)
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            if not torch.isfinite(loss):
                diverged = True
                break
            optimizer_step(optimizer, loss)
            schedule.step()
            losses.append(loss.item())
            interval.append(losses[-1])
            if step % every == 0 or step == steps:
                ppl, accuracy = evaluate_language_model(
                    model, corpus.valid, window, device, eval_tokens
                )
                curves["x"].append(float(step))
                curves["step"].append(float(clock.steps))
                curves["time_s"].append(round(time.perf_counter() - started, 3))
                curves["train_loss"].append(statistics.fmean(interval))
                curves["val_ppl"].append(ppl if math.isfinite(ppl) else None)
                curves["val_accuracy"].append(accuracy if math.isfinite(accuracy) else None)
                interval = []
                if math.isfinite(ppl) and ppl < best_ppl:
                    best_ppl = ppl
                    best_weights = copy.deepcopy(model.state_dict())
        clock.close()
        finished = not diverged and best_weights is not None
        metrics: dict[str, float | None] = dict.fromkeys(
            ("test_ppl", "best_val_ppl", "train_loss_auc", "test_accuracy", "final_train_loss")
        )
        if finished:
            assert best_weights is not None
            model.load_state_dict(best_weights)
            test_ppl, test_accuracy = evaluate_language_model(
                model, corpus.test, window, device, eval_tokens
            )
            metrics.update(
                test_ppl=test_ppl if math.isfinite(test_ppl) else None,
                best_val_ppl=best_ppl,
                train_loss_auc=statistics.fmean(losses),
                test_accuracy=test_accuracy if math.isfinite(test_accuracy) else None,
                final_train_loss=losses[-1],
                **convergence_metrics(curves["val_ppl"], curves["step"], higher_is_better=False),
            )
        return RunOutput(
            metrics=metrics,
            curves=curves,
            artifacts={"corpus_fingerprint": corpus.fingerprint, "vocab_size": len(corpus.vocab)},
            diverged=not finished,
        )
