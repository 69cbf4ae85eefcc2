"""The paper's CIFAR-10 GANs: networks, losses and one training loop, independent of data loading.

Networks (inputs and outputs are ``(N, 3, 32, 32)`` images in ``[-1, 1]``):

* :class:`DCGANGenerator32` / :class:`DCGANCritic32` - DCGAN (Radford et al., 2016) at 32x32, the
  networks of the paper's WGAN and WGAN-GP runs.
* :class:`SNGANGenerator` / :class:`SNGANDiscriminator` - the "standard CNN" of Miyato et al.
  (2018, Table 3), every discriminator layer spectrally normalised with
  ``torch.nn.utils.parametrizations.spectral_norm``.

Losses (``D`` = critic, ``G`` = generator, ``x`` real, ``x~`` = ``G(z)``):

* WGAN (Arjovsky et al., 2017): critic ``E[D(x~)] - E[D(x)]``, generator ``-E[D(x~)]``, critic
  weights clipped to ``[-c, c]`` (``c = 0.01``) after every critic step.
* WGAN-GP (Gulrajani et al., 2017): the WGAN critic loss plus
  ``lambda * E[(||grad D(x^)||_2 - 1)^2]`` with ``x^ = a x + (1 - a) x~``, ``a ~ U[0, 1]`` per
  sample, ``lambda = 10``; no clipping.
* SN-GAN hinge loss: critic ``E[relu(1 - D(x))] + E[relu(1 + D(x~))]``, generator ``-E[D(x~)]``.

:func:`train_gan` alternates ``critic_steps`` critic updates (each on a fresh real batch, drawn
epoch by epoch without replacement) with one generator update; both networks use optimizers from
the caller's ``make_optimizer`` (the paper: lr 2e-4, betas (0.5, 0.999), AdaBelief eps 1e-12, see
:data:`PAPER_GAN_HPARAMS`).  :meth:`GanSettings.paper` holds the paper's settings and
:meth:`GanSettings.quick` a CPU-sized version of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import spectral_norm

from adabelief.experiments.training import minibatches, optimizer_step, seed_everything

__all__ = [
    "ADABELIEF_GAN_EPS",
    "GAN_KINDS",
    "PAPER_GAN_HPARAMS",
    "DCGANCritic32",
    "DCGANGenerator32",
    "GanKind",
    "GanResult",
    "GanSettings",
    "MakeOptimizer",
    "SNGANDiscriminator",
    "SNGANGenerator",
    "build_gan",
    "check_images",
    "clip_weights_",
    "critic_loss",
    "generator_loss",
    "gradient_penalty",
    "hinge_critic_loss",
    "sample_images",
    "train_gan",
    "wasserstein_critic_loss",
]

GanKind = Literal["wgan", "wgan-gp", "sngan"]
GAN_KINDS: tuple[GanKind, ...] = ("wgan", "wgan-gp", "sngan")
#: Optimizer settings of the paper's GAN experiments, for every optimizer with these arguments.
PAPER_GAN_HPARAMS: dict[str, object] = {"lr": 2e-4, "betas": (0.5, 0.999)}
#: AdaBelief's eps in the paper's GAN experiments.
ADABELIEF_GAN_EPS = 1e-12

#: ``params -> optimizer``: builds the optimizer under test for one network.
MakeOptimizer = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

IMAGE_SHAPE = (3, 32, 32)


def _dcgan_init_(module: nn.Module) -> None:
    """DCGAN initialisation: conv weights ``N(0, 0.02)``, batch-norm scale ``N(1, 0.02)``, shift 0."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(layer.weight, 0.0, 0.02)
        elif isinstance(layer, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.normal_(layer.weight, 1.0, 0.02)
            nn.init.zeros_(layer.bias)


class DCGANGenerator32(nn.Module):
    """``z (N, noise_dim)`` to ``(N, 3, 32, 32)``: transposed convs 1 -> 4 -> 8 -> 16 -> 32, tanh.

    Channels ``4w, 2w, w, 3`` with batch norm and ReLU between (``w = width``, 64 in DCGAN).
    """

    def __init__(self, noise_dim: int = 100, width: int = 64) -> None:
        super().__init__()
        self.noise_dim = noise_dim
        self.net = nn.Sequential(
            nn.ConvTranspose2d(noise_dim, 4 * width, 4, 1, 0, bias=False),
            nn.BatchNorm2d(4 * width),
            nn.ReLU(),
            nn.ConvTranspose2d(4 * width, 2 * width, 4, 2, 1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.ConvTranspose2d(width, 3, 4, 2, 1, bias=False),
            nn.Tanh(),
        )
        _dcgan_init_(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(len(z), self.noise_dim, 1, 1))


class DCGANCritic32(nn.Module):
    """``(N, 3, 32, 32)`` to one unbounded score per image: convs 32 -> 16 -> 8 -> 4, then 4x4 -> 1.

    Channels ``w, 2w, 4w`` with leaky ReLU (slope 0.2) and, with ``batch_norm`` (as in the paper's
    WGAN and WGAN-GP code), batch norm after the second and third conv.  The output is linear, as a
    Wasserstein critic's must be (DCGAN's sigmoid is left out).
    """

    def __init__(self, width: int = 64, batch_norm: bool = True) -> None:
        super().__init__()

        def norm(channels: int) -> nn.Module:
            return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()

        self.net = nn.Sequential(
            nn.Conv2d(3, width, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1, bias=False),
            norm(2 * width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 4 * width, 4, 2, 1, bias=False),
            norm(4 * width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(4 * width, 1, 4, 1, 0, bias=False),
        )
        _dcgan_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()


class SNGANGenerator(nn.Module):
    """Miyato et al.'s standard CNN generator: a linear layer from ``z`` to 4x4x8w (batch norm,
    ReLU), three 4x4 stride-2 transposed convs (8w -> 4w -> 2w -> w channels, batch norm, ReLU),
    a 3x3 conv to RGB and tanh (``w = 64``)."""

    def __init__(self, noise_dim: int = 128, width: int = 64) -> None:
        super().__init__()
        self.noise_dim = noise_dim
        self.top = 8 * width
        self.project = nn.Sequential(
            nn.Linear(noise_dim, 4 * 4 * self.top), nn.BatchNorm1d(4 * 4 * self.top), nn.ReLU()
        )
        layers: list[nn.Module] = []
        channels = self.top
        for _ in range(3):
            layers += [
                nn.ConvTranspose2d(channels, channels // 2, 4, 2, 1),
                nn.BatchNorm2d(channels // 2),
                nn.ReLU(),
            ]
            channels //= 2
        layers += [nn.Conv2d(channels, 3, 3, 1, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.project(z).view(len(z), self.top, 4, 4))


class SNGANDiscriminator(nn.Module):
    """Miyato et al.'s standard CNN discriminator, every conv and the linear layer spectrally
    normalised: pairs of (3x3 stride 1, 4x4 stride 2) convs at w, 2w, 4w channels, a 3x3 conv to
    8w, leaky ReLU (slope 0.1) after each, and a linear layer from 4x4x8w to one score."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for out in (width, 2 * width, 4 * width):
            layers += [
                spectral_norm(nn.Conv2d(channels, out, 3, 1, 1)),
                nn.LeakyReLU(0.1),
                spectral_norm(nn.Conv2d(out, out, 4, 2, 1)),
                nn.LeakyReLU(0.1),
            ]
            channels = out
        layers += [spectral_norm(nn.Conv2d(channels, 8 * width, 3, 1, 1)), nn.LeakyReLU(0.1)]
        self.net = nn.Sequential(*layers, nn.Flatten())
        self.head = spectral_norm(nn.Linear(4 * 4 * 8 * width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x)).flatten()


def build_gan(
    kind: GanKind, noise_dim: int, width: int, critic_batch_norm: bool = True
) -> tuple[nn.Module, nn.Module]:
    """``(generator, critic)`` of ``kind``: DCGAN for ``wgan``/``wgan-gp``, SN-GAN for ``sngan``."""
    if kind == "sngan":
        return SNGANGenerator(noise_dim, width), SNGANDiscriminator(width)
    if kind in ("wgan", "wgan-gp"):
        return DCGANGenerator32(noise_dim, width), DCGANCritic32(width, critic_batch_norm)
    raise ValueError(f"unknown GAN kind {kind!r}; known: {', '.join(GAN_KINDS)}")


def wasserstein_critic_loss(
    critic: nn.Module, real: torch.Tensor, fake: torch.Tensor
) -> torch.Tensor:
    """``E[D(fake)] - E[D(real)]`` (the negated Wasserstein estimate the critic minimises)."""
    return critic(fake).mean() - critic(real).mean()


def hinge_critic_loss(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """``E[relu(1 - D(real))] + E[relu(1 + D(fake))]``."""
    return F.relu(1 - critic(real)).mean() + F.relu(1 + critic(fake)).mean()


def gradient_penalty(
    critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """``E[(||grad_x D(x^)||_2 - 1)^2]`` at ``x^ = a real + (1 - a) fake``, ``a ~ U[0, 1]`` per sample.

    Works for any sample shape (images, 2-D points).  ``a`` is drawn from the CPU ``generator``
    (reproducible on any device); the graph is kept so the penalty can be back-propagated into
    the critic's weights.
    """
    shape = (len(real),) + (1,) * (real.dim() - 1)
    mix = torch.rand(shape, generator=generator).to(real.device, real.dtype)
    between = (mix * real + (1 - mix) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(between).sum(), between, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


def critic_loss(
    kind: GanKind,
    critic: nn.Module,
    real: torch.Tensor,
    fake: torch.Tensor,
    generator: torch.Generator,
    gp_weight: float = 10.0,
) -> torch.Tensor:
    """The critic's loss for ``kind`` (WGAN-GP adds ``gp_weight`` times :func:`gradient_penalty`)."""
    if kind == "sngan":
        return hinge_critic_loss(critic, real, fake)
    loss = wasserstein_critic_loss(critic, real, fake)
    if kind == "wgan-gp":
        loss = loss + gp_weight * gradient_penalty(critic, real, fake, generator)
    return loss


def generator_loss(critic: nn.Module, fake: torch.Tensor) -> torch.Tensor:
    """``-E[D(fake)]`` (the same for WGAN, WGAN-GP and the SN-GAN hinge loss)."""
    return -critic(fake).mean()


@torch.no_grad()
def clip_weights_(module: nn.Module, clip_value: float) -> None:
    """Clamp every parameter of ``module`` to ``[-clip_value, clip_value]`` in place (WGAN)."""
    for param in module.parameters():
        param.clamp_(-clip_value, clip_value)


@dataclass(frozen=True)
class GanSettings:
    """How one GAN run trains.

    ``iterations`` counts generator updates; each follows ``critic_steps`` critic updates on
    batches of ``batch_size`` real and as many generated images.  ``train_subset`` keeps only the
    first images of the training tensor (quick runs).  ``clip_value`` applies to ``wgan``,
    ``gp_weight`` to ``wgan-gp``.  ``critic_batch_norm`` puts batch norm in the DCGAN critic.
    """

    kind: GanKind
    iterations: int
    batch_size: int = 64
    critic_steps: int = 5
    noise_dim: int = 100
    width: int = 64
    clip_value: float = 0.01
    gp_weight: float = 10.0
    critic_batch_norm: bool = True
    train_subset: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in GAN_KINDS:
            raise ValueError(f"unknown GAN kind {self.kind!r}; known: {', '.join(GAN_KINDS)}")
        for name in ("iterations", "batch_size", "critic_steps", "noise_dim", "width"):
            if int(getattr(self, name)) < 1:
                raise ValueError(
                    f"GanSettings.{name} must be at least 1, got {getattr(self, name)}"
                )
        if self.train_subset is not None and self.train_subset < self.batch_size:
            raise ValueError(
                f"GanSettings.train_subset ({self.train_subset}) is smaller than one batch "
                f"({self.batch_size})"
            )
        if not (self.clip_value > 0 and math.isfinite(self.clip_value)):
            raise ValueError(f"GanSettings.clip_value must be positive, got {self.clip_value}")
        if not (self.gp_weight >= 0 and math.isfinite(self.gp_weight)):
            raise ValueError(f"GanSettings.gp_weight must be >= 0, got {self.gp_weight}")

    @classmethod
    def paper(cls, kind: GanKind) -> GanSettings:
        """The paper's settings for ``kind``.

        WGAN / WGAN-GP follow the paper's code: batch 64, z of 100, DCGAN width 64, 5 critic steps
        per generator step, 100 epochs of CIFAR-10 critic batches (50,000 / 64 per epoch, so 15,625
        generator steps), clip 0.01, lambda 10, batch norm in the critic.  The paper's code
        upsampled CIFAR-10 to 64x64 (a 64x64 DCGAN); here the networks run at the native 32x32.
        SN-GAN: Miyato et al.'s standard CNN with z of 128, batch 64 and 5 critic steps; its
        50,000 generator steps are a project choice (the paper does not state them).
        """
        if kind == "sngan":
            return cls(kind, iterations=50_000, noise_dim=128)
        return cls(kind, iterations=100 * 50_000 // 64 // 5)

    @classmethod
    def quick(cls, kind: GanKind) -> GanSettings:
        """The paper's settings shrunk to run on a CPU in seconds: 10 generator steps of batch 16
        on the first 256 images, networks a quarter as wide.  Only exercises the path."""
        return replace(cls.paper(kind), iterations=10, batch_size=16, width=16, train_subset=256)


@dataclass
class GanResult:
    """The trained networks, per-step losses, evaluation curves and whether training blew up.

    ``curves`` holds ``critic_loss`` / ``generator_loss`` per generator step (``step`` is the
    x axis) and, under ``eval_step``, the steps at which ``evaluate`` ran with its values.
    """

    generator: nn.Module
    critic: nn.Module
    curves: dict[str, list[float]] = field(default_factory=dict)
    steps_done: int = 0
    diverged: bool = False


def check_images(images: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``images`` is a float ``(N, 3, 32, 32)`` tensor in ``[-1, 1]``."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise ValueError("GAN training images must be a floating-point torch.Tensor")
    if images.dim() != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(
            f"GAN training images must have shape (N, 3, 32, 32), got {tuple(images.shape)}"
        )
    if len(images) == 0:
        raise ValueError("GAN training images are empty")
    low, high = float(images.min()), float(images.max())
    if not (math.isfinite(low) and math.isfinite(high)) or low < -1.0 - 1e-6 or high > 1.0 + 1e-6:
        raise ValueError(f"GAN training images must lie in [-1, 1], found [{low:.3g}, {high:.3g}]")


def _real_batches(
    images: torch.Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Endless full batches of ``images``, reshuffled every epoch by ``generator``."""
    while True:
        for index in minibatches(len(images), batch_size, generator, drop_last=True):
            yield images[index]


def _noise(n: int, dim: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randn(n, dim, generator=generator).to(device)


def train_gan(
    settings: GanSettings,
    images: torch.Tensor,
    make_optimizer: MakeOptimizer,
    *,
    seed: int,
    device: str | torch.device = "cpu",
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    eval_every: int = 0,
) -> GanResult:
    """Train ``settings.kind`` on ``images`` (``(N, 3, 32, 32)`` in ``[-1, 1]``, on any device).

    ``make_optimizer`` is called once for the generator and once for the critic.  Every
    ``eval_every`` generator steps (and after the last), ``evaluate(generator)`` is called with
    the generator in eval mode under ``torch.no_grad()`` and its values are appended to the
    curves.  Training stops and the result is marked diverged when a loss becomes non-finite.
    Initialisation, data order, noise and penalty mixing all derive from ``seed``.
    """
    check_images(images)
    if settings.train_subset is not None:
        images = images[: settings.train_subset]
    if len(images) < settings.batch_size:
        raise ValueError(
            f"{len(images)} training images are fewer than one batch ({settings.batch_size})"
        )
    target = torch.device(device)
    rng = seed_everything(seed)
    gen, critic = build_gan(
        settings.kind, settings.noise_dim, settings.width, settings.critic_batch_norm
    )
    gen.to(target)
    critic.to(target)
    opt_g = make_optimizer(gen.parameters())
    opt_d = make_optimizer(critic.parameters())
    real_batches = _real_batches(images, settings.batch_size, rng)
    curves: dict[str, list[float]] = {"step": [], "critic_loss": [], "generator_loss": []}
    result = GanResult(gen, critic, curves)

    def run_evaluation(step: int) -> None:
        if evaluate is None:
            return
        gen.eval()
        with torch.no_grad():
            values = evaluate(gen)
        gen.train()
        curves.setdefault("eval_step", []).append(float(step))
        for name, value in values.items():
            curves.setdefault(name, []).append(float(value))

    for step in range(1, settings.iterations + 1):
        for _ in range(settings.critic_steps):
            real = next(real_batches).to(target)
            with torch.no_grad():
                fake = gen(_noise(settings.batch_size, settings.noise_dim, rng, target))
            d_loss = critic_loss(settings.kind, critic, real, fake, rng, settings.gp_weight)
            if not torch.isfinite(d_loss):
                result.diverged = True
                return result
            optimizer_step(opt_d, d_loss)
            if settings.kind == "wgan":
                clip_weights_(critic, settings.clip_value)
        g_loss = generator_loss(
            critic, gen(_noise(settings.batch_size, settings.noise_dim, rng, target))
        )
        if not torch.isfinite(g_loss):
            result.diverged = True
            return result
        optimizer_step(opt_g, g_loss)
        curves["step"].append(float(step))
        curves["critic_loss"].append(float(d_loss.detach()))
        curves["generator_loss"].append(float(g_loss.detach()))
        result.steps_done = step
        if (eval_every and step % eval_every == 0) or step == settings.iterations:
            run_evaluation(step)
    return result


@torch.no_grad()
def sample_images(generator: nn.Module, noise: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """``generator(noise)`` in eval mode, batch by batch, on the CPU (``(N, 3, 32, 32)``)."""
    was_training = generator.training
    generator.eval()
    device = next(generator.parameters()).device
    out = torch.cat(
        [
            generator(noise[i : i + batch_size].to(device)).cpu()
            for i in range(0, len(noise), batch_size)
        ]
    )
    generator.train(was_training)
    return out
