"""LSTM language modelling: perplexity on held-out text (claims 1 and 2).

Without ``--data``: a character-level LSTM on the source of Python standard-library modules that
ship with the interpreter.  With ``--data`` holding Penn Treebank text files: the paper's 1/2/3
layer word-level setting.  The weights at the best validation perplexity are scored on test text,
and the gradient norm is always clipped.
"""

from __future__ import annotations

import copy
import functools
import math
import statistics
from pathlib import Path

import torch
from torch.nn import functional as F

from adabelief.experiments.data import DataCheck, TextCorpus, check_ptb, load_ptb, load_stdlib_text
from adabelief.experiments.models import LSTMLanguageModel, LSTMState
from adabelief.experiments.paper_results import reported_values
from adabelief.experiments.presets import get_preset
from adabelief.experiments.registry import create_optimizer
from adabelief.experiments.spec import Experiment, Metric, RunContext, RunOutput, RunSpec
from adabelief.experiments.tasks.base import PlanOptions, Task
from adabelief.experiments.training import (
    convergence_metrics,
    fit,
    model_for_optimizer,
    optimizer_step,
    seed_everything,
)

__all__ = ["LanguageModelTask", "batchify"]

EVAL_BATCH_SIZE = 10
_TINY = {
    "max_chars": 6000,
    "train_limit": 3000,
    "embedding_dim": 8,
    "hidden_dim": 16,
    "epochs": 1,
    "milestones": [],
    "bptt": 16,
    "batch_size": 8,
}


def batchify(stream: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cut a token stream into ``batch_size`` parallel rows ``(batch_size, length)``."""
    length = len(stream) // batch_size
    return stream[: length * batch_size].view(batch_size, length)


@functools.lru_cache(maxsize=2)
def _corpus(
    corpus: str, data_dir: Path | None, max_chars: int | None, train_limit: int | None
) -> TextCorpus:
    """The corpus of a run (cached per process)."""
    if corpus == "ptb":
        if data_dir is None:
            raise ValueError("the Penn Treebank experiments need --data")
        return load_ptb(data_dir, train_limit)
    return load_stdlib_text(max_chars)


def _detach(state: LSTMState) -> LSTMState:
    return [(h.detach(), c.detach()) for h, c in state]


@torch.no_grad()
def perplexity(model: LSTMLanguageModel, data: torch.Tensor, bptt: int, device: str) -> float:
    """Perplexity of ``model`` on batchified ``data`` (eval mode, state carried across windows)."""
    model.eval()
    state: LSTMState | None = None
    total, count = 0.0, 0
    for start in range(0, data.size(1) - 1, bptt):
        end = min(start + bptt, data.size(1) - 1)
        inputs = data[:, start:end].to(device)
        targets = data[:, start + 1 : end + 1].to(device)
        logits, state = model(inputs, state)
        total += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
        count += targets.numel()
    if count == 0:
        return math.nan
    mean = total / count
    return math.exp(mean) if mean < 700 else math.inf


class LanguageModelTask(Task):
    """LSTM language models: held-out perplexity."""

    name = "lm"
    summary = "LSTM language model: stdlib source, character level (bundled) or Penn Treebank"
    uses_data = True
    data_help = "Penn Treebank ptb.train.txt, ptb.valid.txt, ptb.test.txt, maybe in ptb/ or penn/"

    def check_data(self, data_dir: Path) -> DataCheck:
        """Find and validate the PTB text files in ``data_dir``."""
        return check_ptb(data_dir)

    def experiments(self, options: PlanOptions) -> list[Experiment]:
        """Quick: one 1-layer model; full: 1 and 2 layers (stdlib) or 1, 2, 3 layers (PTB)."""
        if options.data_dir is not None:
            layers = [1] if options.quick else [1, 2, 3]
            names = [f"lm/ptb-{n}layer" for n in layers]
        else:
            names = (
                ["lm/stdlib-char-1layer"]
                if options.quick
                else [
                    "lm/stdlib-char-1layer",
                    "lm/stdlib-char-2layer",
                ]
            )
        experiments = []
        for name in names:
            preset = get_preset(name)
            settings = preset.settings_for(options.quick)
            if options.tiny:
                settings.update(_TINY)
            corpus, layers_n = settings["corpus"], int(settings["layers"])
            if corpus != "ptb":
                # Part of the run identity: the stdlib source differs between Python versions.
                settings["corpus_fingerprint"] = load_stdlib_text(settings["max_chars"]).fingerprint
            paper_key = f"ptb/lstm-{layers_n}" if corpus == "ptb" else ""
            experiments.append(
                Experiment(
                    task=self.name,
                    name=f"{corpus}-lstm{layers_n}",
                    title=f"{layers_n}-layer LSTM on {corpus}",
                    preset=preset.name,
                    settings=settings,
                    score=Metric("test_ppl", "test perplexity at the best validation epoch", False),
                    selection=Metric("best_val_ppl", "best validation perplexity", False),
                    speed=Metric("train_loss_auc", "mean training loss over training", False),
                    extra=(Metric("final_train_ppl", "final training perplexity", False),),
                    claims=("convergence", "generalization"),
                    curves=(("train_loss", "training loss"), ("val_ppl", "validation perplexity")),
                    target=Metric("val_ppl", "validation perplexity", False),
                    paper=reported_values(paper_key) if paper_key else {},
                    paper_key=paper_key,
                )
            )
        return experiments

    def run(self, spec: RunSpec, context: RunContext) -> RunOutput:
        """Truncated-BPTT training with clipping; test perplexity of the best-validation weights."""
        settings = spec.settings
        corpus = _corpus(
            settings["corpus"],
            context.data_dir,
            settings.get("max_chars"),
            settings.get("train_limit"),
        )
        generator = seed_everything(spec.seed)
        device = spec.device
        model = LSTMLanguageModel(
            len(corpus.vocab),
            int(settings["embedding_dim"]),
            int(settings["hidden_dim"]),
            int(settings["layers"]),
            float(settings["dropout"]),
            bool(settings["tie_weights"]),
        ).to(device)
        model = model_for_optimizer(model, spec.optimizer)
        optimizer = create_optimizer(spec.optimizer, model.parameters(), **spec.hparams)
        bptt, clip = int(settings["bptt"]), float(settings["clip"])
        train = batchify(corpus.train, int(settings["batch_size"]))
        valid = batchify(corpus.valid, max(1, min(EVAL_BATCH_SIZE, len(corpus.valid) // 2)))
        test = batchify(corpus.test, max(1, min(EVAL_BATCH_SIZE, len(corpus.test) // 2)))
        del generator  # data order is the corpus order; dropout draws from the seeded global RNG

        def train_epoch(epoch: int) -> dict[str, float]:
            model.train()
            state: LSTMState | None = None
            losses = []
            for start in range(0, train.size(1) - 1, bptt):
                end = min(start + bptt, train.size(1) - 1)
                inputs = train[:, start:end].to(device)
                targets = train[:, start + 1 : end + 1].to(device)
                logits, new_state = model(inputs, state)
                loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
                if not torch.isfinite(loss):
                    return {"train_loss": math.nan}
                optimizer_step(optimizer, loss, model.parameters(), clip)
                state = _detach(new_state)
                losses.append(loss.item())
            return {"train_loss": statistics.fmean(losses)}

        best_weights: dict[str, torch.Tensor] = {}

        def remember_best() -> None:
            best_weights.clear()
            best_weights.update(copy.deepcopy(model.state_dict()))

        result = fit(
            epochs=int(settings["epochs"]),
            optimizer=optimizer,
            milestones=settings["milestones"],
            gamma=0.1,
            train_epoch=train_epoch,
            evaluate=lambda: {"val_ppl": perplexity(model, valid, bptt, device)},
            select=Metric("val_ppl", "", False),
            on_best=remember_best,
            progress=context.progress,
            description=f"{spec.experiment} {spec.optimizer} s{spec.seed}",
        )
        curves = result.curves
        train_losses = [v for v in curves.get("train_loss", []) if v is not None]
        finished = not result.diverged and bool(best_weights)
        test_ppl = None
        if finished:
            model.load_state_dict(best_weights)
            test_ppl = perplexity(model, test, bptt, device)
        final_loss = train_losses[-1] if train_losses else math.inf
        metrics: dict[str, float | None] = {
            "test_ppl": test_ppl if test_ppl is not None and math.isfinite(test_ppl) else None,
            "best_val_ppl": result.best.get("val_ppl") if finished else None,
            "train_loss_auc": statistics.fmean(train_losses) if finished else None,
            "final_train_ppl": math.exp(final_loss) if finished and final_loss < 700 else None,
            "best_val_epoch": float(result.best_epoch) if result.best_epoch else None,
        }
        metrics.update(
            convergence_metrics(
                curves.get("val_ppl", []) if finished else [],
                curves.get("step", []),
                higher_is_better=False,
            )
        )
        curves["x"] = curves.pop("epoch", [])
        return RunOutput(
            metrics=metrics,
            curves=curves,
            artifacts={"corpus_fingerprint": corpus.fingerprint, "vocab_size": len(corpus.vocab)},
            diverged=result.diverged or not finished,
        )
