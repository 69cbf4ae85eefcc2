"""GAN training stability (claim 3).

* ``wgan-gp-mog`` / ``gan-mog``: WGAN-GP and a standard (non-saturating) GAN on a mixture of 8
  Gaussians on a ring of radius 2 (std 0.1).  A sample is high quality when it lies within 3 std of
  a mode; a mode is covered when it gets at least 1% of the samples as high-quality samples.
* ``dcgan-digits``: a small DCGAN on the 8x8 digits, scored by a Frechet distance on the features
  of a digits classifier the task trains itself (see :mod:`adabelief.experiments.fid`).

With ``--data`` holding CIFAR-10, the paper's GANs instead (:mod:`adabelief.experiments.gan_models`):
``cifar10-wgan``, ``cifar10-wgan-gp`` (DCGAN networks) and ``cifar10-sngan``, scored by FID when
``inception-2015-12-05.pt`` is in the data folder or torch's hub cache, else by the labelled
Frechet distance on a CIFAR-10 VGG11's features (:func:`adabelief.experiments.fid.cifar10_scorer`).
Which of the two scored a run is part of its settings (``score_kind``) and stored with it.

Both generator and discriminator use the optimizer under test.  Evaluation noise is fixed (the
same for every run), validation and test use different noise (and, for digits, different real
images); the spread of the scores across seeds is the stability measure.

Every run that did not diverge stores the convergence rule's figures (``late_improvement``,
``late_noise``: :func:`adabelief.experiments.stats.late_improvement`) on its validation-noise
curve.  GAN curves swing by up to tens of percent between evaluations, so the rule's noise term
decides there: the bundled presets evaluate 40 times (the quick DCGAN 20 times) so that the last
quarter holds enough evaluations to measure that noise.  The CIFAR-10 GANs evaluate 10 times (2
with ``--quick``, where no noise can be measured and the 1% tolerance alone decides).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from adabelief.experiments import gan_models
from adabelief.experiments.data import (
    DataCheck,
    DataInvalidError,
    check_cifar10,
    fingerprint_files,
    load_cifar10_pixels,
    load_digits,
)
from adabelief.experiments.fid import (
    CLASSIFIER_FD_KIND,
    FID_KIND,
    INCEPTION_WEIGHTS_FILE,
    FIDError,
    ImageFrechetScorer,
    InceptionFeatureExtractor,
    check_fid_dependencies,
    cifar10_scorer,
    feature_network,
    find_inception_weights,
    from_uint8_images,
    to_uint8_images,
)
from adabelief.experiments.models import (
    DCGANDiscriminator,
    DCGANGenerator,
    MLPCritic,
    MLPGenerator,
)
from adabelief.experiments.paper_results import reported_values
from adabelief.experiments.presets import presets_for_task
from adabelief.experiments.registry import create_optimizer
from adabelief.experiments.spec import Experiment, Metric, RunContext, RunOutput, RunSpec
from adabelief.experiments.tasks.base import PlanOptions, Task
from adabelief.experiments.training import (
    convergence_metrics,
    model_for_optimizer,
    optimizer_step,
    seed_everything,
)

if TYPE_CHECKING:
    from adabelief.experiments.analysis import ExperimentResult, OptimizerResult

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
#: Generated CIFAR-10 images (test noise) kept with each run for the report's figure.
CIFAR_SAMPLES_SHOWN = 8
_TINY = {"iterations": 6, "evaluations": 2}
#: Test-sized CIFAR-10 GANs (hidden ``--tiny``): two generator steps of narrow networks, two
#: critic steps each.
_TINY_CIFAR = {
    "iterations": 2,
    "critic_steps": 2,
    "batch_size": 8,
    "width": 8,
    "train_subset": 16,
    "fid_samples": 16,
    "eval_samples": 8,
    "evaluations": 1,
    "classifier_epochs": 1,
    "reference_subset": 16,
}
#: The metric each CIFAR-10 scorer's values are stored under, and its label.
SCORE_METRICS: dict[str, tuple[str, str]] = {
    FID_KIND: ("fid", "FID"),
    CLASSIFIER_FD_KIND: (
        "classifier_fd",
        "Frechet distance on a CIFAR-10 VGG11's features (not FID)",
    ),
}


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
        return gan_models.critic_loss("wgan-gp", critic, real, fake, generator, gp_weight)
    return F.softplus(-critic(real)).mean() + F.softplus(critic(fake)).mean()


def _generator_loss(loss: str, critic: nn.Module, fake: torch.Tensor) -> torch.Tensor:
    if loss == "wgan-gp":
        return gan_models.generator_loss(critic, fake)
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

    Returns the evaluation curves (``evaluations`` points, plus ``x`` and ``step``, the
    generator iterations, and ``time_s``, the seconds so far) and whether a loss became
    non-finite (training stops then).
    """
    settings = spec.settings
    # In place: the caller's evaluation sees the same (cast) networks.
    model_for_optimizer(gen, spec.optimizer)
    model_for_optimizer(critic, spec.optimizer)
    opt_g = create_optimizer(spec.optimizer, gen.parameters(), **spec.hparams)
    opt_d = create_optimizer(spec.optimizer, critic.parameters(), **spec.hparams)
    iterations, batch = int(settings["iterations"]), int(settings["batch_size"])
    noise_dim, loss_kind = int(settings["noise_dim"]), str(settings["loss"])
    every = max(1, iterations // int(settings["evaluations"]))
    curves: dict[str, list[float | None]] = {"x": [], "step": [], "time_s": []}
    started = time.perf_counter()
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
            curves["step"].append(float(iteration))
            curves["time_s"].append(round(time.perf_counter() - started, 3))
            for name, value in evaluate().items():
                curves.setdefault(name, []).append(value if math.isfinite(value) else None)
    return curves, False


def _score_kind(data_dir: Path) -> str:
    """FID when the Inception file is found for ``data_dir``, else the classifier fallback."""
    return FID_KIND if find_inception_weights(data_dir) is not None else CLASSIFIER_FD_KIND


class GanTask(Task):
    """WGAN-GP and standard GAN on 2-D Gaussians, DCGAN on digits; with ``--data``, the paper's
    CIFAR-10 WGAN, WGAN-GP and SN-GAN."""

    name = "gan"
    summary = (
        "GAN stability: WGAN-GP and GAN on 8 Gaussians, DCGAN on digits (Frechet distance); "
        "with --data the paper's CIFAR-10 WGAN, WGAN-GP, SN-GAN (FID)"
    )
    uses_data = True
    data_help = (
        "CIFAR-10 python pickles (data_batch_1..5, test_batch), maybe in cifar-10-batches-py/; "
        f"for FID also {INCEPTION_WEIGHTS_FILE} there or in torch's hub cache checkpoints/"
    )

    def check_data(self, data_dir: Path) -> DataCheck:
        """Validate the CIFAR-10 pickles; the Inception file, when found, must load and run as
        the FID network (and FID's library must import), else :class:`DataInvalidError` names
        the problem; it joins the fingerprint."""
        check = check_cifar10(data_dir)
        weights = find_inception_weights(data_dir)
        if weights is None:
            return DataCheck(
                f"{check.description}; no {INCEPTION_WEIGHTS_FILE}, so GANs are scored by the "
                "classifier Frechet distance, not FID",
                check.files,
                check.fingerprint,
            )
        try:
            check_fid_dependencies()
        except FIDError as exc:
            raise DataInvalidError(f"found {weights}, but {exc}") from None
        try:
            InceptionFeatureExtractor(weights)
        except FIDError as exc:
            raise DataInvalidError(str(exc)) from None
        files = (*check.files, weights)
        return DataCheck(
            f"{check.description}; FID with {weights}", files, fingerprint_files(files)
        )

    def experiments(self, options: PlanOptions) -> list[Experiment]:
        """One experiment per GAN preset: the CIFAR-10 ones with ``--data``, else the others."""
        experiments = []
        for preset in presets_for_task(self.name):
            settings = preset.settings_for(options.quick)
            if (settings["data"] == "cifar10") != (options.data_dir is not None):
                continue
            if options.tiny:
                settings.update(_TINY_CIFAR if options.data_dir is not None else _TINY)
            name = preset.name.split("/", 1)[1]
            if options.data_dir is not None:
                experiments.append(self._cifar_experiment(name, preset, settings, options.data_dir))
                continue
            if settings["data"] == "mog":
                score = Metric("hq_fraction", "high-quality sample fraction", True)
                selection = Metric("val_hq_fraction", "validation high-quality fraction", True)
                extra: tuple[Metric, ...] = (Metric("modes", "modes covered (of 8)", True),)
                curves: tuple[tuple[str, str], ...] = (
                    ("hq_fraction", "high-quality fraction"),
                    ("modes", "modes covered"),
                )
                plot = "points"
                target = Metric("hq_fraction", "high-quality fraction (validation noise)", True)
            else:
                score = Metric("fid", "Frechet distance to test digits", False)
                selection = Metric("val_fid", "Frechet distance to training digits", False)
                extra = ()
                curves = (("fid", "Frechet distance (validation)"),)
                plot = "images"
                target = Metric("fid", "Frechet distance (validation)", False)
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
                    target=target,
                )
            )
        return experiments

    def _cifar_experiment(
        self, name: str, preset: Any, settings: dict[str, Any], data_dir: Path
    ) -> Experiment:
        kind = _score_kind(data_dir)
        settings["score_kind"] = kind
        metric, label = SCORE_METRICS[kind]
        paper_key = f"cifar10-gan/{settings['kind']}"
        comparable = kind == FID_KIND
        return Experiment(
            task=self.name,
            name=name,
            title=preset.description.removesuffix(" (needs --data)"),
            preset=preset.name,
            settings=settings,
            score=Metric(metric, f"{label}, test noise", False),
            selection=Metric(f"val_{metric}", f"{label}, validation noise", False),
            claims=("gan",),
            curves=((metric, f"{label} (validation noise)"),),
            plot="rgb-images",
            x_label="generator iteration",
            target=Metric(metric, f"{label} (validation noise)", False),
            paper=reported_values(paper_key) if comparable else {},
            paper_key=paper_key,
            paper_comparable=comparable,
        )

    def report_lines(self, result: ExperimentResult) -> list[str]:
        """For the CIFAR-10 GANs: what scored the runs (FID, or the classifier fallback)."""
        if result.experiment.settings.get("data") != "cifar10":
            return []
        labels = {
            str(record.get("artifacts", {}).get("score_label"))
            for row in result.optimizers
            for record in row.chosen.records.values()
            if record.get("artifacts", {}).get("score_label")
        }
        if result.experiment.settings.get("score_kind") == FID_KIND:
            lines = ["Scores are FID: " + "; ".join(sorted(labels)) + "."]
        else:
            lines = [
                f"**Scores are the classifier fallback, not FID** ({INCEPTION_WEIGHTS_FILE} was "
                "not found): " + ("; ".join(sorted(labels)) or "no run recorded its scorer") + "."
            ]
        return [*lines, ""]

    def plots(self, result: ExperimentResult, directory: Path) -> list[Path]:
        """The first seed's samples: 2-D points against the modes, or a grid of digits."""
        from adabelief.experiments.plots import plot_stem

        stem = directory / f"{plot_stem(result)}-{result.experiment.plot}.png"
        draw = {"points": plot_points, "images": plot_images, "rgb-images": plot_rgb_images}.get(
            result.experiment.plot
        )
        path = draw(result, stem) if draw is not None else None
        return [path] if path is not None else []

    def model_dtype_refusal(self, experiment: Experiment) -> str:
        """The CIFAR-10 GANs build their networks inside ``gan_models.train_gan``, which only
        takes an optimizer factory: they cannot train in a variant's model dtype."""
        if experiment.settings["data"] == "cifar10":
            return "the CIFAR-10 GANs build their networks where the model dtype is not applied"
        return ""

    def run(self, spec: RunSpec, context: RunContext) -> RunOutput:
        """Train the GAN and score its samples."""
        if spec.settings["data"] == "mog":
            return self._run_mog(spec)
        if spec.settings["data"] == "cifar10":
            return self._run_cifar(spec, context)
        return self._run_digits(spec)

    def _run_cifar(self, spec: RunSpec, context: RunContext) -> RunOutput:
        settings = spec.settings
        if context.data_dir is None:
            raise ValueError("the CIFAR-10 GAN experiments need --data")
        names = {field.name for field in dataclasses.fields(gan_models.GanSettings)}
        gan_settings = gan_models.GanSettings(**{k: v for k, v in settings.items() if k in names})
        images, scorer = _cifar_gan_inputs(
            context.data_dir,
            spec.device,
            settings["reference_subset"],
            int(settings["classifier_epochs"]),
            context.cache_dir,
        )
        kind = str(settings["score_kind"])
        if scorer.kind != kind:
            raise FIDError(
                f"this experiment was planned with scorer {kind!r}, but {scorer.kind!r} is what "
                f"is available now ({INCEPTION_WEIGHTS_FILE} appeared or went away); run again"
            )
        metric = SCORE_METRICS[kind][0]
        noise_dim = gan_settings.noise_dim
        val_noise = _fixed_noise(int(settings["eval_samples"]), noise_dim, VAL_NOISE_SEED)
        test_noise = _fixed_noise(int(settings["fid_samples"]), noise_dim, TEST_NOISE_SEED)
        started = time.perf_counter()
        times: list[float] = []

        def score_samples(samples: torch.Tensor) -> float:
            if not bool(torch.isfinite(samples).all()):
                return math.nan
            return scorer.score(samples).value

        def score(gen: nn.Module, noise: torch.Tensor) -> float:
            return score_samples(gan_models.sample_images(gen, noise))

        def evaluate(gen: nn.Module) -> dict[str, float]:
            times.append(round(time.perf_counter() - started, 3))
            return {metric: score(gen, val_noise)}

        result = gan_models.train_gan(
            gan_settings,
            images,
            lambda params: _make_optimizer(spec, params),
            seed=spec.seed,
            device=spec.device,
            evaluate=evaluate,
            eval_every=max(1, gan_settings.iterations // int(settings["evaluations"])),
        )
        steps = list(result.curves.get("eval_step", []))
        values = [v if math.isfinite(v) else None for v in result.curves.get(metric, [])]
        curves: dict[str, list[float | None]] = {
            "x": list(steps),
            "step": list(steps),
            "time_s": list(times[: len(steps)]),
            metric: list(values),
        }
        metrics: dict[str, float | None] = {metric: None, f"val_{metric}": None}
        artifacts: dict[str, Any] = {"score_kind": scorer.kind, "score_label": scorer.label}
        if not result.diverged:
            samples = gan_models.sample_images(result.generator, test_noise)
            test_value = score_samples(samples)
            metrics[metric] = test_value if math.isfinite(test_value) else None
            metrics[f"val_{metric}"] = values[-1] if values else None
            metrics.update(convergence_metrics(values, steps, False))
            if math.isfinite(test_value):
                artifacts["samples"] = to_uint8_images(samples[:CIFAR_SAMPLES_SHOWN]).tolist()
        artifacts["generator_steps"] = result.steps_done
        return RunOutput(
            metrics=metrics, curves=curves, artifacts=artifacts, diverged=result.diverged
        )

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
            metrics.update(convergence_metrics(curves["hq_fraction"], curves["step"], True))
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
            metrics.update(convergence_metrics(curves["fid"], curves["step"], False))
            samples = generate(test_noise[:16]).squeeze(1)
            artifacts["samples"] = [
                [[round(float(v), 3) for v in row] for row in image] for image in samples
            ]
        return RunOutput(metrics=metrics, curves=curves, artifacts=artifacts, diverged=diverged)


def _make_optimizer(spec: RunSpec, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return create_optimizer(spec.optimizer, params, **spec.hparams)


@functools.lru_cache(maxsize=1)
def _cifar_gan_inputs(
    data_dir: Path,
    device: str,
    reference_subset: int | None,
    classifier_epochs: int,
    cache_dir: Path | None,
) -> tuple[torch.Tensor, ImageFrechetScorer]:
    """CIFAR-10 training images in ``[-1, 1]`` and the scorer (cached per process: every run of
    a worker reuses them).  The first ``reference_subset`` training images (all with ``None``)
    are the reference; the fallback classifier trains on them and is tested on as many test
    images.  FID's reference statistics are cached in ``cache_dir``."""
    train, train_labels, test, test_labels = load_cifar10_pixels(data_dir)
    images = from_uint8_images(torch.from_numpy(train))
    count = len(images) if reference_subset is None else int(reference_subset)
    cache = None
    if cache_dir is not None:
        cache = cache_dir / f"fid-reference-cifar10-{count}.npz"
    scorer = cifar10_scorer(
        images[:count],
        torch.from_numpy(train_labels[:count]),
        data_dir=data_dir,
        device=device,
        reference_cache=cache,
        test_images=from_uint8_images(torch.from_numpy(test[:count])),
        test_labels=torch.from_numpy(test_labels[:count]),
        classifier_epochs=classifier_epochs,
    )
    return images, scorer


def _with_samples(result: ExperimentResult) -> list[tuple[OptimizerResult, dict[str, Any]]]:
    """Each optimizer's first-seed record (not diverged) that holds generated samples."""
    from adabelief.experiments.plots import first_record

    rows = []
    for row in result.optimizers:
        record = first_record(row)
        if record is not None and record.get("artifacts", {}).get("samples"):
            rows.append((row, record))
    return rows


def plot_points(result: ExperimentResult, path: Path) -> Path | None:
    """Generated 2-D samples (first seed, test noise) of each optimizer against the 8 modes."""
    import numpy as np

    from adabelief.experiments.plots import new_figure, optimizer_color, save_figure

    rows = _with_samples(result)
    if not rows:
        return None
    figure = new_figure(2.6 * len(rows), 3.0)
    centers = MOG_CENTERS.numpy()
    for index, (row, record) in enumerate(rows):
        axes = figure.add_subplot(1, len(rows), index + 1)
        samples = np.asarray(record["artifacts"]["samples"], dtype=np.float64)
        axes.scatter(
            samples[:, 0], samples[:, 1], s=2, color=optimizer_color(row.optimizer), alpha=0.5
        )
        axes.scatter(centers[:, 0], centers[:, 1], s=25, marker="x", color="black")
        hq = record["metrics"].get("hq_fraction")
        title = row.optimizer if hq is None else f"{row.optimizer}\nhigh-quality {hq:.0%}"
        axes.set_title(title, fontsize=8)
        axes.set_xlim(-3, 3)
        axes.set_ylim(-3, 3)
        axes.set_xticks([])
        axes.set_yticks([])
        axes.set_aspect("equal")
    figure.suptitle(
        f"{result.experiment.title}: samples of the first seed (x: the 8 modes; high-quality = "
        f"within {3 * MOG_STD:g} of a mode)",
        fontsize=8,
    )
    return save_figure(figure, path)


def plot_images(result: ExperimentResult, path: Path) -> Path | None:
    """Generated digits (first seed, 4x4 grid) of each optimizer."""
    import numpy as np

    from adabelief.experiments.plots import new_figure, save_figure

    rows = _with_samples(result)
    if not rows:
        return None
    figure = new_figure(2.4 * len(rows), 2.9)
    for index, (row, record) in enumerate(rows):
        images = np.asarray(record["artifacts"]["samples"], dtype=np.float64)[:16]
        side = math.ceil(math.sqrt(len(images)))
        grid = np.zeros((side * 9 - 1, side * 9 - 1))  # white separators
        for k, image in enumerate(images):
            r, c = divmod(k, side)
            grid[r * 9 : r * 9 + 8, c * 9 : c * 9 + 8] = image
        axes = figure.add_subplot(1, len(rows), index + 1)
        axes.imshow(grid, cmap="gray_r", vmin=0, vmax=1)
        fid = record["metrics"].get("fid")
        title = row.optimizer if fid is None else f"{row.optimizer}\nFrechet distance {fid:.1f}"
        axes.set_title(title, fontsize=8)
        axes.axis("off")
    figure.suptitle(f"{result.experiment.title}: samples of the first seed", fontsize=8)
    return save_figure(figure, path)


def plot_rgb_images(result: ExperimentResult, path: Path) -> Path | None:
    """Generated CIFAR-10 images (first seed, test noise, a 2x4 grid) of each optimizer."""
    import numpy as np

    from adabelief.experiments.plots import new_figure, save_figure

    rows = _with_samples(result)
    if not rows:
        return None
    figure = new_figure(2.6 * len(rows), 1.9)
    metric = result.experiment.score
    for index, (row, record) in enumerate(rows):
        images = np.asarray(record["artifacts"]["samples"], dtype=np.uint8)[:CIFAR_SAMPLES_SHOWN]
        columns = 4
        lines = math.ceil(len(images) / columns)
        grid = np.full((lines * 33 - 1, columns * 33 - 1, 3), 255, dtype=np.uint8)
        for k, image in enumerate(images):
            r, c = divmod(k, columns)
            grid[r * 33 : r * 33 + 32, c * 33 : c * 33 + 32] = image.transpose(1, 2, 0)
        axes = figure.add_subplot(1, len(rows), index + 1)
        axes.imshow(grid)
        value = record["metrics"].get(metric.name)
        name = "FID" if metric.name == "fid" else "classifier FD (not FID)"
        axes.set_title(
            row.optimizer if value is None else f"{row.optimizer}\n{name} {value:.3g}", fontsize=8
        )
        axes.axis("off")
    figure.suptitle(f"{result.experiment.title}: samples of the first seed", fontsize=8)
    return save_figure(figure, path)
