"""GAN training stability (claim 3).

* ``wgan-gp-mog`` / ``gan-mog``: WGAN-GP and a standard (non-saturating) GAN on a mixture of 8
  Gaussians on a ring of radius 2 (std 0.1).  A sample is high quality when it lies within 3 std of
  a mode; a mode is covered when it gets at least 1% of the samples as high-quality samples.
* ``dcgan-digits``: a small DCGAN on the 8x8 digits, scored by a Frechet distance on the features
  of a digits classifier the task trains itself (see :mod:`adabelief.experiments.fid`).

Both generator and discriminator use the optimizer under test.  Evaluation noise is fixed (the
same for every run), validation and test use different noise (and, for digits, different real
images); the spread of the scores across seeds is the stability measure.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from adabelief.experiments.data import load_digits
from adabelief.experiments.fid import feature_network
from adabelief.experiments.models import (
    DCGANDiscriminator,
    DCGANGenerator,
    MLPCritic,
    MLPGenerator,
)
from adabelief.experiments.presets import presets_for_task
from adabelief.experiments.registry import create_optimizer
from adabelief.experiments.spec import Experiment, Metric, RunContext, RunOutput, RunSpec
from adabelief.experiments.tasks.base import PlanOptions, Task
from adabelief.experiments.training import optimizer_step, seed_everything

__all__ = ["MOG_CENTERS", "GanTask", "mog_quality", "sample_mog"]

MOG_MODES, MOG_RADIUS, MOG_STD = 8, 2.0, 0.1
MOG_CENTERS = torch.stack(
    [
        MOG_RADIUS * torch.cos(torch.arange(MOG_MODES) * 2 * math.pi / MOG_MODES),
        MOG_RADIUS * torch.sin(torch.arange(MOG_MODES) * 2 * math.pi / MOG_MODES),
    ],
    dim=1,
)
VAL_NOISE_SEED, TEST_NOISE_SEED = 1, 2
MOG_EVAL_SAMPLES, DIGITS_EVAL_SAMPLES = 2000, 1000
_TINY = {"iterations": 6, "evaluations": 2}


def sample_mog(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` points from the ring of Gaussians."""
    modes = torch.randint(0, MOG_MODES, (n,), generator=generator)
    return MOG_CENTERS[modes] + MOG_STD * torch.randn(n, 2, generator=generator)


def mog_quality(points: torch.Tensor) -> tuple[float, float]:
    """``(high-quality fraction, modes covered)`` of generated 2-D points."""
    distance, nearest = torch.cdist(points.double(), MOG_CENTERS.double()).min(dim=1)
    good = torch.isfinite(distance) & (distance < 3 * MOG_STD)
    counts = torch.bincount(nearest[good], minlength=MOG_MODES)
    covered = int((counts >= 0.01 * len(points)).sum())
    return float(good.double().mean()), float(covered)


def _fixed_noise(n: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


@functools.lru_cache(maxsize=1)
def _digits_train_images() -> torch.Tensor:
    """Digits training split scaled to ``[-1, 1]``."""
    return load_digits().train_x * 2 - 1


def _discriminator_loss(
    loss: str,
    critic: nn.Module,
    real: torch.Tensor,
    fake: torch.Tensor,
    gp_weight: float,
    generator: torch.Generator,
) -> torch.Tensor:
    if loss == "wgan-gp":
        shape = (len(real),) + (1,) * (real.dim() - 1)
        mix = torch.rand(shape, generator=generator)
        between = (mix * real + (1 - mix) * fake).requires_grad_(True)
        (grad,) = torch.autograd.grad(critic(between).sum(), between, create_graph=True)
        penalty = ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
        return critic(fake).mean() - critic(real).mean() + gp_weight * penalty
    return F.softplus(-critic(real)).mean() + F.softplus(critic(fake)).mean()


def _generator_loss(loss: str, critic: nn.Module, fake: torch.Tensor) -> torch.Tensor:
    if loss == "wgan-gp":
        return -critic(fake).mean()
    return F.softplus(-critic(fake)).mean()


def train_gan(
    spec: RunSpec,
    gen: nn.Module,
    critic: nn.Module,
    sample_real: Callable[[int, torch.Generator], torch.Tensor],
    evaluate: Callable[[], dict[str, float]],
    generator: torch.Generator,
) -> tuple[dict[str, list[float | None]], bool]:
    """Alternate ``critic_steps`` discriminator steps and one generator step.

    Returns the evaluation curves (``evaluations`` points, plus ``x``) and whether a loss became
    non-finite (training stops then).
    """
    settings = spec.settings
    opt_g = create_optimizer(spec.optimizer, gen.parameters(), **spec.hparams)
    opt_d = create_optimizer(spec.optimizer, critic.parameters(), **spec.hparams)
    iterations, batch = int(settings["iterations"]), int(settings["batch_size"])
    noise_dim, loss_kind = int(settings["noise_dim"]), str(settings["loss"])
    every = max(1, iterations // int(settings["evaluations"]))
    curves: dict[str, list[float | None]] = {"x": []}
    for iteration in range(1, iterations + 1):
        for _ in range(int(settings["critic_steps"])):
            real = sample_real(batch, generator)
            with torch.no_grad():
                fake = gen(torch.randn(batch, noise_dim, generator=generator))
            d_loss = _discriminator_loss(
                loss_kind, critic, real, fake, float(settings["gp_weight"]), generator
            )
            if not torch.isfinite(d_loss):
                return curves, True
            optimizer_step(opt_d, d_loss)
        g_loss = _generator_loss(
            loss_kind, critic, gen(torch.randn(batch, noise_dim, generator=generator))
        )
        if not torch.isfinite(g_loss):
            return curves, True
        optimizer_step(opt_g, g_loss)
        if iteration % every == 0 or iteration == iterations:
            if curves["x"] and curves["x"][-1] == float(iteration):
                continue
            curves["x"].append(float(iteration))
            for name, value in evaluate().items():
                curves.setdefault(name, []).append(value if math.isfinite(value) else None)
    return curves, False


class GanTask(Task):
    """WGAN-GP and standard GAN on 2-D Gaussians, DCGAN on digits."""

    name = "gan"
    summary = "GAN stability: WGAN-GP and GAN on 8 Gaussians, DCGAN on digits (Frechet distance)"

    def experiments(self, options: PlanOptions) -> list[Experiment]:
        """One experiment per GAN preset."""
        experiments = []
        for preset in presets_for_task(self.name):
            settings = preset.settings_for(options.quick)
            if options.tiny:
                settings.update(_TINY)
            name = preset.name.split("/", 1)[1]
            if settings["data"] == "mog":
                score = Metric("hq_fraction", "high-quality sample fraction", True)
                selection = Metric("val_hq_fraction", "validation high-quality fraction", True)
                extra: tuple[Metric, ...] = (Metric("modes", "modes covered (of 8)", True),)
                curves: tuple[tuple[str, str], ...] = (
                    ("hq_fraction", "high-quality fraction"),
                    ("modes", "modes covered"),
                )
                plot = "points"
            else:
                score = Metric("fid", "Frechet distance to test digits", False)
                selection = Metric("val_fid", "Frechet distance to training digits", False)
                extra = ()
                curves = (("fid", "Frechet distance (validation)"),)
                plot = "images"
            experiments.append(
                Experiment(
                    task=self.name,
                    name=name,
                    title=preset.description,
                    preset=preset.name,
                    settings=settings,
                    score=score,
                    selection=selection,
                    extra=extra,
                    claims=("gan",),
                    curves=curves,
                    plot=plot,
                    x_label="generator iteration",
                )
            )
        return experiments

    def run(self, spec: RunSpec, context: RunContext) -> RunOutput:
        """Train the GAN and score its samples."""
        if spec.settings["data"] == "mog":
            return self._run_mog(spec)
        return self._run_digits(spec)

    def _run_mog(self, spec: RunSpec) -> RunOutput:
        settings = spec.settings
        noise_dim, hidden = int(settings["noise_dim"]), int(settings["hidden"])
        val_noise = _fixed_noise(MOG_EVAL_SAMPLES, noise_dim, VAL_NOISE_SEED)
        test_noise = _fixed_noise(MOG_EVAL_SAMPLES, noise_dim, TEST_NOISE_SEED)
        generator = seed_everything(spec.seed)
        gen = MLPGenerator(noise_dim, hidden, depth=2)
        critic = MLPCritic(hidden, depth=2)

        @torch.no_grad()
        def evaluate() -> dict[str, float]:
            hq, modes = mog_quality(gen(val_noise))
            return {"hq_fraction": hq, "modes": modes}

        curves, diverged = train_gan(spec, gen, critic, sample_mog, evaluate, generator)
        metrics: dict[str, float | None] = dict.fromkeys(
            ("hq_fraction", "modes", "val_hq_fraction", "val_modes")
        )
        artifacts = {}
        if not diverged:
            with torch.no_grad():
                samples = gen(test_noise)
                metrics["hq_fraction"], metrics["modes"] = mog_quality(samples)
                metrics["val_hq_fraction"], metrics["val_modes"] = mog_quality(gen(val_noise))
            finite = samples[torch.isfinite(samples).all(dim=1)][:500]
            artifacts["samples"] = [[round(float(v), 3) for v in row] for row in finite]
        return RunOutput(metrics=metrics, curves=curves, artifacts=artifacts, diverged=diverged)

    def _run_digits(self, spec: RunSpec) -> RunOutput:
        settings = spec.settings
        features = feature_network()  # trained before seeding: the run's RNG stream is unaffected
        images = _digits_train_images()
        noise_dim, width = int(settings["noise_dim"]), int(settings["hidden"])
        val_noise = _fixed_noise(DIGITS_EVAL_SAMPLES, noise_dim, VAL_NOISE_SEED)
        test_noise = _fixed_noise(DIGITS_EVAL_SAMPLES, noise_dim, TEST_NOISE_SEED)
        generator = seed_everything(spec.seed)
        gen = DCGANGenerator(noise_dim, width)
        critic = DCGANDiscriminator(width)

        def sample_real(n: int, rng: torch.Generator) -> torch.Tensor:
            return images[torch.randint(0, len(images), (n,), generator=rng)]

        @torch.no_grad()
        def generate(noise: torch.Tensor) -> torch.Tensor:
            gen.eval()
            out = (gen(noise) + 1) / 2
            gen.train()
            return out

        def fid(noise: torch.Tensor, split: str) -> float:
            out = generate(noise)
            if not torch.isfinite(out).all():
                return math.nan
            return features.distance(out, split)

        curves, diverged = train_gan(
            spec, gen, critic, sample_real, lambda: {"fid": fid(val_noise, "train")}, generator
        )
        metrics: dict[str, float | None] = {"fid": None, "val_fid": None}
        artifacts: dict[str, object] = {"feature_net_test_acc": features.test_accuracy}
        if not diverged:
            test_fid, val_fid = fid(test_noise, "test"), fid(val_noise, "train")
            metrics["fid"] = test_fid if math.isfinite(test_fid) else None
            metrics["val_fid"] = val_fid if math.isfinite(val_fid) else None
            samples = generate(test_noise[:16]).squeeze(1)
            artifacts["samples"] = [
                [[round(float(v), 3) for v in row] for row in image] for image in samples
            ]
        return RunOutput(metrics=metrics, curves=curves, artifacts=artifacts, diverged=diverged)
