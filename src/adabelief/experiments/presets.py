"""Named presets: each experiment's schedule and every optimizer's hyperparameters.

Paper mode uses these values as they are; fair mode draws trials from a search space centred on
them (:mod:`adabelief.experiments.search`) and keeps the best on validation data.  ``source``
says where the values come from: the AdaBelief paper (Zhuang et al., NeurIPS 2020) and the
hyperparameter table of its official repository, or a choice of this project where the paper
has no setting (bundled datasets, quick budgets).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

from adabelief.experiments.gan_models import (
    ADABELIEF_GAN_EPS,
    PAPER_GAN_HPARAMS,
    GanKind,
    GanSettings,
)

__all__ = ["PRESETS", "USER_PRESET", "Preset", "get_preset", "presets_for_task"]

#: AdaBelief's switches in the paper's experiments (the official repository's table:
#: no decoupled weight decay, no rectification, as in adabelief-pytorch 0.0.5).
_PAPER_ADABELIEF = {"weight_decouple": False, "rectify": False}


@dataclass(frozen=True)
class Preset:
    """Schedule (``settings``, with ``quick`` overrides) and per-optimizer hyperparameters."""

    name: str
    task: str
    description: str
    source: str
    settings: dict[str, Any]
    optimizers: dict[str, dict[str, Any]]
    quick: dict[str, Any] = field(default_factory=dict)

    def settings_for(self, quick: bool) -> dict[str, Any]:
        """The schedule, with the quick-mode overrides applied when ``quick``."""
        merged = copy.deepcopy(self.settings)
        if quick:
            merged.update(copy.deepcopy(self.quick))
        return merged

    def hparams(self, optimizer: str) -> dict[str, Any]:
        """Hyperparameters for ``optimizer``.

        An optimizer the preset does not list borrows AdaBelief's values if it is an AdaBelief
        (the reference ``adabelief_ref``, or a state-precision variant such as
        ``adabelief_int8``), otherwise Adam's learning rate, betas and weight decay.
        """
        if optimizer in self.optimizers:
            return copy.deepcopy(self.optimizers[optimizer])
        if optimizer.startswith("adabelief"):
            return copy.deepcopy(self.optimizers["adabelief"])
        adam = self.optimizers["adam"]
        return {
            k: copy.deepcopy(v) for k, v in adam.items() if k in ("lr", "betas", "weight_decay")
        }


def _toy(
    name: str, title: str, start: tuple[float, float], steps: int, lr: float, sgd_lr: float
) -> Preset:
    adaptive = {"lr": lr, "weight_decay": 0.0}
    return Preset(
        name=f"toy/{name}",
        task="toy",
        description=f"{title}: {steps} steps from {start}",
        source="functions from the paper's figures; start points, step budget and lr: project "
        "choice; no weight decay anywhere (so AdamW equals Adam here)",
        settings={"function": name, "start": list(start), "steps": steps, "tolerance": 0.01},
        optimizers={
            "adabelief": {**adaptive, "eps": 1e-16, **_PAPER_ADABELIEF},
            "adam": dict(adaptive),
            "adamw": dict(adaptive),
            "radam": dict(adaptive),
            "sgd": {"lr": sgd_lr, "momentum": 0.9},
            "adabound": {**adaptive, "final_lr": 0.1},
            "yogi": dict(adaptive),
        },
    )


_CIFAR_OPTIMIZERS: dict[str, dict[str, Any]] = {
    "adabelief": {"lr": 1e-3, "eps": 1e-8, "weight_decay": 5e-4, **_PAPER_ADABELIEF},
    "sgd": {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
    "adam": {"lr": 1e-3, "eps": 1e-8, "weight_decay": 5e-4},
    "adamw": {"lr": 1e-3, "eps": 1e-8, "weight_decay": 1e-2},
    "radam": {"lr": 1e-3, "eps": 1e-8, "weight_decay": 5e-4},
    "adabound": {"lr": 1e-3, "final_lr": 0.1, "weight_decay": 5e-4},
    "yogi": {"lr": 1e-3, "weight_decay": 5e-4},
}


def _lm_optimizers(layers: int, sgd_lr: float) -> dict[str, dict[str, Any]]:
    lr, eps = (1e-3, 1e-16) if layers == 1 else (1e-2, 1e-12)
    wd = 1.2e-6
    return {
        "adabelief": {"lr": lr, "eps": eps, "weight_decay": wd, **_PAPER_ADABELIEF},
        "adam": {"lr": lr, "weight_decay": wd},
        "adamw": {"lr": lr, "weight_decay": wd},
        "radam": {"lr": lr, "weight_decay": wd},
        "sgd": {"lr": sgd_lr, "momentum": 0.0, "weight_decay": wd},
        "adabound": {"lr": lr, "final_lr": 0.1, "weight_decay": wd},
        "yogi": {"lr": lr, "weight_decay": wd},
    }


def _gan_optimizers(lr: float, sgd_lr: float) -> dict[str, dict[str, Any]]:
    adaptive = {"lr": lr, "betas": [0.5, 0.999]}
    return {
        "adabelief": {**adaptive, "eps": 1e-12, **_PAPER_ADABELIEF},
        "adam": dict(adaptive),
        "adamw": {**adaptive, "weight_decay": 1e-2},
        "radam": dict(adaptive),
        "sgd": {"lr": sgd_lr, "momentum": 0.5},
        "adabound": {**adaptive, "final_lr": 0.1},
        "yogi": dict(adaptive),
    }


def _cifar(dataset: str, title: str) -> Preset:
    """The paper's CIFAR setting (the same for CIFAR-10 and CIFAR-100)."""
    return Preset(
        name=f"classify/{dataset}",
        task="classify",
        description=f"VGG11 / ResNet34 / DenseNet121 on {title} (needs --data)",
        source="paper: 200 epochs, lr x0.1 at 150, batch 128, wd 5e-4 (AdamW 1e-2), crop+flip",
        settings={
            "dataset": dataset,
            "models": ["vgg11", "resnet34", "densenet121"],
            "epochs": 200,
            "milestones": [150],
            "batch_size": 128,
            "augment": True,
            "train_limit": None,
            "test_limit": None,
        },
        quick={
            "models": ["vgg11"],
            "epochs": 2,
            "milestones": [1],
            "train_limit": 2048,
            "test_limit": 1000,
        },
        optimizers=_CIFAR_OPTIMIZERS,
    )


#: How the CIFAR-10 GANs are scored, paper scale: FID's standard 50,000 generated images for the
#: final score, 5,000 for the curve points, the fallback classifier trained for 10 epochs on the
#: whole training set.
_GAN_SCORING = {
    "fid_samples": 50_000,
    "eval_samples": 5_000,
    "evaluations": 10,
    "classifier_epochs": 10,
    "reference_subset": None,
}
_GAN_SCORING_QUICK = {
    "fid_samples": 500,
    "eval_samples": 200,
    "evaluations": 2,
    "classifier_epochs": 1,
    "reference_subset": 1000,
}
_GAN_TITLES = {
    "wgan": "WGAN (weight clipping) with DCGAN networks on CIFAR-10",
    "wgan-gp": "WGAN-GP with DCGAN networks on CIFAR-10",
    "sngan": "SN-GAN (Miyato et al.'s standard CNN) on CIFAR-10",
}


def _cifar_gan(kind: GanKind) -> Preset:
    """The paper's CIFAR-10 GAN ``kind``: :meth:`GanSettings.paper` (quick: :meth:`GanSettings.quick`)."""
    paper, quick = asdict(GanSettings.paper(kind)), asdict(GanSettings.quick(kind))
    return Preset(
        name=f"gan/cifar10-{kind}",
        task="gan",
        description=f"{_GAN_TITLES[kind]} (needs --data)",
        source="paper: lr 2e-4, betas (0.5, 0.999), 5 critic steps, AdaBelief eps 1e-12, 5 runs, "
        "FID against the CIFAR-10 training set; generator steps and 32x32 networks: see "
        "GanSettings.paper; SGD lr 1e-2 with momentum 0.5: project choice",
        settings={"data": "cifar10", **paper, **_GAN_SCORING},
        quick={
            **{name: value for name, value in quick.items() if paper[name] != value},
            **_GAN_SCORING_QUICK,
        },
        optimizers=_paper_gan_optimizers(),
    )


def _paper_gan_optimizers() -> dict[str, dict[str, Any]]:
    """:func:`_gan_optimizers` at the paper's GAN settings, taken from ``gan_models``."""
    lr, betas = PAPER_GAN_HPARAMS["lr"], PAPER_GAN_HPARAMS["betas"]
    assert isinstance(lr, float) and isinstance(betas, tuple)
    optimizers = _gan_optimizers(lr, 1e-2)
    for hparams in optimizers.values():
        if "betas" in hparams:
            hparams["betas"] = list(betas)
    optimizers["adabelief"]["eps"] = ADABELIEF_GAN_EPS
    return optimizers


_LM_PTB_SOURCE = (
    "paper: 200 epochs, lr /10 at 100 and 145, clip 0.25, wd 1.2e-6, AdaBelief lr 1e-3 eps 1e-16 "
    "(1 layer) or lr 1e-2 eps 1e-12 (2-3 layers); Adam-family lr as AdaBelief's and SGD lr 30 "
    "without momentum (AWD-LSTM's) are project choices; model approximates AWD-LSTM sizes"
)
_LM_CHAR_SOURCE = (
    "paper's LSTM optimizer settings (1-layer lr 1e-3 eps 1e-16 / 2-layer lr 1e-2 eps 1e-12, clip "
    "0.25, wd 1.2e-6, lr /10 at 50% and 72.5% of training); model size, corpus and SGD lr: project choice"
)


def _lm_ptb(layers: int) -> Preset:
    return Preset(
        name=f"lm/ptb-{layers}layer",
        task="lm",
        description=f"{layers}-layer LSTM on Penn Treebank (word level)",
        source=_LM_PTB_SOURCE,
        settings={
            "corpus": "ptb",
            "layers": layers,
            "embedding_dim": 400,
            "hidden_dim": 1150,
            "dropout": 0.4,
            "tie_weights": True,
            "epochs": 200,
            "milestones": [100, 145],
            "batch_size": 20,
            "bptt": 70,
            "clip": 0.25,
            "train_limit": None,
        },
        quick={
            "embedding_dim": 200,
            "hidden_dim": 200,
            "epochs": 2,
            "milestones": [1],
            "train_limit": 100_000,
        },
        optimizers=_lm_optimizers(layers, 30.0),
    )


def _lm_char(layers: int) -> Preset:
    return Preset(
        name=f"lm/stdlib-char-{layers}layer",
        task="lm",
        description=f"{layers}-layer character-level LSTM on Python stdlib source (bundled)",
        source=_LM_CHAR_SOURCE,
        settings={
            "corpus": "stdlib-source",
            "layers": layers,
            "embedding_dim": 64,
            "hidden_dim": 256,
            "dropout": 0.1,
            "tie_weights": False,
            "epochs": 20,
            "milestones": [10, 15],
            "batch_size": 32,
            "bptt": 64,
            "clip": 0.25,
            "max_chars": None,
        },
        quick={"hidden_dim": 128, "epochs": 4, "milestones": [2, 3], "max_chars": 60_000},
        optimizers=_lm_optimizers(layers, 1.0),
    )


#: The paper's Transformer recipe (IWSLT14 De-En): AdaBelief lr 1.5e-3, eps 1e-16, rectify and
#: decoupled decay on, wd 1e-4, inverse-square-root schedule with warm-up.  The Adam family
#: gets fairseq's IWSLT recipe (lr 5e-4, betas (0.9, 0.98), AdamW wd 1e-4).
_TRANSFORMER_OPTIMIZERS: dict[str, dict[str, Any]] = {
    "adabelief": {
        "lr": 1.5e-3,
        "eps": 1e-16,
        "weight_decay": 1e-4,
        "weight_decouple": True,
        "rectify": True,
    },
    "adam": {"lr": 5e-4, "betas": [0.9, 0.98], "weight_decay": 0.0},
    "adamw": {"lr": 5e-4, "betas": [0.9, 0.98], "weight_decay": 1e-4},
    "radam": {"lr": 5e-4, "betas": [0.9, 0.98], "weight_decay": 0.0},
    "sgd": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
    "adabound": {"lr": 5e-4, "betas": [0.9, 0.98], "final_lr": 0.1},
    "yogi": {"lr": 5e-4, "betas": [0.9, 0.98]},
}
_TRANSFORMER_SOURCE = (
    "paper (Transformer on IWSLT14): AdaBelief lr 1.5e-3, eps 1e-16, rectify and decoupled weight "
    "decay on, wd 1e-4, inverse-square-root schedule with warm-up (8k steps in the paper); Adam "
    "family lr 5e-4, betas (0.9, 0.98), AdamW wd 1e-4 (fairseq's IWSLT recipe); language "
    "modelling instead of translation, model size, warm-up length, SGD: project choice"
)

#: What a user's own task (``adabelief run file.py:FUNCTION``) starts from: the library's and
#: torch's defaults, SGD with momentum 0.9 at lr 0.01.  ``@user_task(hparams=...)`` overrides.
USER_PRESET = "user/defaults"

PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        _toy("abs", "|x| + |y|", (-2.0, 1.5), 1000, 0.01, 0.003),
        _toy("abs-rotated", "|x + y| + |x - y| / 10", (-2.0, 1.0), 2000, 0.03, 0.003),
        _toy("quadratic", "(x + y)^2 + (x - y)^2 / 10", (-2.0, 1.0), 1000, 0.03, 0.01),
        _toy("beale", "Beale", (1.0, 1.5), 2000, 0.03, 0.001),
        _toy("rosenbrock", "Rosenbrock", (-1.5, 2.0), 2000, 0.03, 0.001),
        _toy("mccormick", "McCormick", (-1.0, 2.5), 1000, 0.03, 0.01),
        Preset(
            name="classify/digits-cnn",
            task="classify",
            description="small CNN on scikit-learn's 8x8 digits (bundled)",
            source="paper's CIFAR-10 optimizer settings; schedule scaled down (lr x0.1 at 75%): project choice",
            settings={
                "dataset": "digits",
                "models": ["digits-cnn"],
                "epochs": 40,
                "milestones": [30],
                "batch_size": 64,
                "augment": False,
            },
            # Quick trains this small problem to the end (about 15 s a run on one core): cut
            # at 12 of 40 epochs, AdaBelief's slower start decided the verdict (issue 19).
            quick={},
            optimizers=_CIFAR_OPTIMIZERS,
        ),
        _cifar("cifar10", "CIFAR-10"),
        _cifar("cifar100", "CIFAR-100 (100 fine labels)"),
        _lm_char(1),
        _lm_char(2),
        _lm_ptb(1),
        _lm_ptb(2),
        _lm_ptb(3),
        Preset(
            name="transformer/python-docs-char",
            task="transformer",
            description="character-level Transformer language model on Python's documentation "
            "text (pydoc_data, bundled)",
            source=_TRANSFORMER_SOURCE,
            settings={
                "corpus": "python-docs",
                "max_chars": None,
                "d_model": 128,
                "heads": 4,
                "layers": 3,
                "ff_dim": 512,
                "context": 128,
                "dropout": 0.1,
                "batch_size": 32,
                "steps": 3000,
                "warmup": 300,
                "evaluations": 10,
                "eval_tokens": 20_000,
            },
            # A smaller problem (one layer with a narrow feed-forward, a 16-character context,
            # 60k characters; a fifth of the default's weights) with the default's 10% warm-up.
            # The width stays 128: the decoder is tied to embeddings that start at std 0.02 and
            # Adam moves each weight by about its learning rate per step, so at the paper's
            # lr 5e-4 a width-32 model was still far from trained after 800 steps (perplexity
            # 20 against SGD's 12.6).  Still, every optimizer improves by 2-3% over the last
            # eighth: the inverse-square-root schedule never anneals (docs/reproducing.md).
            quick={
                "max_chars": 60_000,
                "layers": 1,
                "ff_dim": 128,
                "context": 16,
                "batch_size": 8,
                "steps": 800,
                "warmup": 80,
                "evaluations": 16,
                "eval_tokens": 3_000,
            },
            optimizers=_TRANSFORMER_OPTIMIZERS,
        ),
        Preset(
            name="transformer/wikitext2",
            task="transformer",
            description="word-level Transformer language model on WikiText-2 (needs --data)",
            source=_TRANSFORMER_SOURCE,
            settings={
                "corpus": "wikitext",
                "max_chars": None,
                "d_model": 256,
                "heads": 4,
                "layers": 4,
                "ff_dim": 1024,
                "context": 128,
                "dropout": 0.2,
                "batch_size": 32,
                "steps": 20_000,
                "warmup": 4_000,
                "evaluations": 20,
                "eval_tokens": None,
            },
            quick={
                "d_model": 64,
                "layers": 2,
                "ff_dim": 128,
                "context": 64,
                "steps": 800,
                "warmup": 160,  # 20% of the steps, as in the default (4,000 of 20,000)
                "evaluations": 8,
                "eval_tokens": 10_000,
            },
            optimizers=_TRANSFORMER_OPTIMIZERS,
        ),
        Preset(
            name=USER_PRESET,
            task="user",
            description="a user's own task (adabelief run FILE.py:FUNCTION)",
            source="AdaBelief's and torch's defaults; SGD lr 0.01, momentum 0.9: project choice",
            settings={},
            optimizers={
                "adabelief": {"lr": 1e-3, "eps": 1e-16, "weight_decay": 0.0},
                "adam": {"lr": 1e-3, "weight_decay": 0.0},
                "adamw": {"lr": 1e-3, "weight_decay": 1e-2},
                "radam": {"lr": 1e-3, "weight_decay": 0.0},
                "sgd": {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0},
                "adabound": {"lr": 1e-3, "final_lr": 0.1},
                "yogi": {"lr": 1e-3},
            },
        ),
        Preset(
            name="gan/wgan-gp-mog",
            task="gan",
            description="WGAN-GP on 8 Gaussians on a ring (2-D)",
            source="paper: betas (0.5, 0.999), 5 critic steps, AdaBelief eps 1e-12; lr 1e-3 "
            "(paper 2e-4, too slow for a 2-D toy on a CPU budget), SGD lr, GP weight 0.1: project choice",
            settings={
                "data": "mog",
                "loss": "wgan-gp",
                "iterations": 3000,
                "critic_steps": 5,
                "gp_weight": 0.1,
                "batch_size": 128,
                "hidden": 64,
                "noise_dim": 16,
                # Evaluating 2,000 points costs nothing; 40 evaluations let the convergence rule
                # measure the curve's noise (stats.late_noise).
                "evaluations": 40,
            },
            quick={"iterations": 400},
            optimizers=_gan_optimizers(1e-3, 1e-2),
        ),
        Preset(
            name="gan/gan-mog",
            task="gan",
            description="standard (non-saturating) GAN on 8 Gaussians on a ring (2-D)",
            source="paper: betas (0.5, 0.999), AdaBelief eps 1e-12; lr 1e-3 (paper 2e-4) and "
            "SGD lr: project choice",
            settings={
                "data": "mog",
                "loss": "standard",
                "iterations": 6000,
                "critic_steps": 1,
                "gp_weight": 0.0,
                "batch_size": 128,
                "hidden": 64,
                "noise_dim": 16,
                "evaluations": 40,
            },
            quick={"iterations": 1200},
            optimizers=_gan_optimizers(1e-3, 1e-2),
        ),
        Preset(
            name="gan/dcgan-digits",
            task="gan",
            description="small DCGAN on 8x8 digits, Frechet distance on a digits classifier's features",
            source="paper: lr 2e-4, betas (0.5, 0.999), AdaBelief eps 1e-12; network sizes and "
            "SGD lr: project choice",
            settings={
                "data": "digits",
                "loss": "standard",
                "iterations": 4000,
                "critic_steps": 1,
                "gp_weight": 0.0,
                "batch_size": 64,
                "hidden": 32,
                "noise_dim": 32,
                "evaluations": 40,
            },
            # 20 evaluations (each ~0.06 s on one core) measure the Frechet distance's noise for
            # the convergence rule at a second a quick run.
            quick={"iterations": 400, "evaluations": 20},
            optimizers=_gan_optimizers(2e-4, 1e-2),
        ),
        _cifar_gan("wgan"),
        _cifar_gan("wgan-gp"),
        _cifar_gan("sngan"),
    )
}


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (raises ``KeyError`` listing the known names)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def presets_for_task(task: str) -> list[Preset]:
    """All presets of ``task`` in definition order."""
    return [preset for preset in PRESETS.values() if preset.task == task]
