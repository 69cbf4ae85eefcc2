"""The CIFAR-10 GAN networks, losses and training loop, on tiny random images."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from adabelief import AdaBelief
from adabelief.experiments.gan_models import (
    ADABELIEF_GAN_EPS,
    GAN_KINDS,
    PAPER_GAN_HPARAMS,
    DCGANCritic32,
    DCGANGenerator32,
    GanKind,
    GanSettings,
    SNGANDiscriminator,
    SNGANGenerator,
    build_gan,
    critic_loss,
    generator_loss,
    gradient_penalty,
    hinge_critic_loss,
    sample_images,
    train_gan,
    wasserstein_critic_loss,
)


def _images(n: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _adabelief(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return AdaBelief(params, lr=2e-4, betas=(0.5, 0.999), eps=ADABELIEF_GAN_EPS)


def _tiny(kind: GanKind, **changes: Any) -> GanSettings:
    settings = {"iterations": 3, "batch_size": 8, "width": 8, "train_subset": None, **changes}
    return replace(GanSettings.quick(kind), **settings)


def _value(tensor: torch.Tensor) -> float:
    return float(tensor.detach())


class _Scores(nn.Module):
    """A critic scoring the ``real`` tensor ``real_score`` and anything else ``fake_score``."""

    def __init__(self, real: torch.Tensor, real_score: float, fake_score: float) -> None:
        super().__init__()
        self.real, self.real_score, self.fake_score = real, real_score, fake_score

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((len(x),), self.real_score if x is self.real else self.fake_score)


class _Linear(nn.Module):
    """``D(x) = <w, x>``: its input gradient is ``w`` everywhere."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1) * self.weight.flatten()).sum(1)


@pytest.mark.parametrize(
    ("generator", "critic", "noise_dim"),
    [
        (DCGANGenerator32(100, 8), DCGANCritic32(8), 100),
        (DCGANGenerator32(100, 8), DCGANCritic32(8, batch_norm=False), 100),
        (SNGANGenerator(128, 8), SNGANDiscriminator(8), 128),
    ],
)
def test_shapes(generator: nn.Module, critic: nn.Module, noise_dim: int) -> None:
    with torch.no_grad():
        images = generator(torch.randn(5, noise_dim))
    assert images.shape == (5, 3, 32, 32)
    assert float(images.abs().max()) <= 1.0
    with torch.no_grad():
        assert critic(images).shape == (5,)


def test_paper_sized_networks() -> None:
    generator, critic = DCGANGenerator32(), DCGANCritic32()
    assert generator.net[0].weight.shape == (100, 256, 4, 4)  # z to 4x4x(4*64)
    assert critic.net[0].weight.shape == (64, 3, 4, 4)
    sn_g, sn_d = SNGANGenerator(), SNGANDiscriminator()
    assert sn_g.project[0].out_features == 4 * 4 * 512
    assert sn_d.head.in_features == 4 * 4 * 512
    assert GanSettings.paper("wgan").critic_steps == 5
    assert GanSettings.paper("wgan-gp").gp_weight == 10.0
    assert PAPER_GAN_HPARAMS == {"lr": 2e-4, "betas": (0.5, 0.999)}


def test_spectral_norm_on_every_discriminator_weight() -> None:
    critic = SNGANDiscriminator(8)
    layers = [m for m in critic.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 8
    assert all(parametrize.is_parametrized(layer, "weight") for layer in layers)
    x = _images(4)
    for _ in range(30):  # power iterations run in training-mode forwards
        critic(x)
    for layer in layers:
        sigma = torch.linalg.matrix_norm(layer.weight.detach().flatten(1), ord=2)
        assert float(sigma) == pytest.approx(1.0, abs=0.05)
    assert not any(parametrize.is_parametrized(m, "weight") for m in DCGANCritic32(8).modules())


def test_gradient_penalty_and_losses_by_hand() -> None:
    real, fake = _images(6, 1), _images(6, 2)
    weight = torch.full((3, 32, 32), 0.01)
    critic = _Linear(weight)
    expected_gp = (weight.norm() - 1) ** 2
    generator = torch.Generator().manual_seed(0)
    assert _value(gradient_penalty(critic, real, fake, generator)) == pytest.approx(
        _value(expected_gp), rel=1e-5
    )
    wasserstein = critic(fake).mean() - critic(real).mean()
    assert _value(wasserstein_critic_loss(critic, real, fake)) == pytest.approx(_value(wasserstein))
    with_gp = critic_loss("wgan-gp", critic, real, fake, generator, gp_weight=10.0)
    assert _value(with_gp) == pytest.approx(_value(wasserstein + 10 * expected_gp), rel=1e-5)
    assert _value(critic_loss("wgan", critic, real, fake, generator)) == pytest.approx(
        _value(wasserstein)
    )
    # The penalty reaches the critic's weights.
    gradient_penalty(critic, real, fake, generator).backward()
    assert critic.weight.grad is not None and _value(critic.weight.grad.abs().sum()) > 0
    # Hinge: relu(1 - D(real)) + relu(1 + D(fake)); the generator's loss is -D(fake).
    assert _value(hinge_critic_loss(_Scores(real, 2.0, -0.5), real, fake)) == pytest.approx(0.5)
    assert _value(hinge_critic_loss(_Scores(real, 0.5, 0.5), real, fake)) == pytest.approx(2.0)
    assert _value(generator_loss(_Scores(real, 2.0, -0.5), fake)) == pytest.approx(0.5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", GAN_KINDS)
def test_training_steps_change_both_networks(kind: GanKind) -> None:
    settings = _tiny(kind)
    calls: list[int] = []

    def evaluate(generator: nn.Module) -> dict[str, float]:
        assert not generator.training
        calls.append(1)
        return {"sample_mean": float(generator(torch.zeros(2, settings.noise_dim)).mean())}

    images = _images(32)
    result = train_gan(settings, images, _adabelief, seed=3, evaluate=evaluate, eval_every=2)
    assert not result.diverged and result.steps_done == 3
    assert result.curves["step"] == [1.0, 2.0, 3.0]
    assert all(
        torch.isfinite(torch.tensor(result.curves[name])).all()
        for name in ("critic_loss", "generator_loss")
    )
    assert result.curves["eval_step"] == [2.0, 3.0] and len(calls) == 2
    assert result.generator.training  # back in training mode after evaluating
    torch.manual_seed(3)  # the seed train_gan starts from: the initial networks again
    fresh_g, fresh_d = build_gan(
        kind, settings.noise_dim, settings.width, settings.critic_batch_norm
    )
    for fresh, trained in ((fresh_g, result.generator), (fresh_d, result.critic)):
        changed = [
            not torch.equal(a, b)
            for a, b in zip(fresh.state_dict().values(), trained.state_dict().values(), strict=True)
            if a.is_floating_point()
        ]
        assert any(changed)
    again = train_gan(settings, images, _adabelief, seed=3)
    for a, b in zip(
        result.generator.state_dict().values(), again.generator.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)  # same seed, same run


@pytest.mark.slow
def test_wgan_clips_the_critic_and_wgan_gp_does_not() -> None:
    images = _images(32)
    clipped = train_gan(_tiny("wgan", clip_value=0.005), images, _adabelief, seed=0).critic
    assert max(_value(p.abs().max()) for p in clipped.parameters()) <= 0.005
    free = train_gan(_tiny("wgan-gp"), images, _adabelief, seed=0).critic
    assert max(_value(p.abs().max()) for p in free.parameters()) > 0.5  # batch-norm scales ~1


def test_divergence_stops_training() -> None:
    def exploding(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=1e30)

    result = train_gan(_tiny("wgan-gp", iterations=20), _images(32), exploding, seed=0)
    assert result.diverged and result.steps_done < 20


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match=r"shape \(N, 3, 32, 32\)"):
        train_gan(_tiny("wgan"), torch.zeros(16, 1, 28, 28), _adabelief, seed=0)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        train_gan(_tiny("wgan"), _images(16) * 255, _adabelief, seed=0)
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_gan(_tiny("wgan"), _images(4), _adabelief, seed=0)
    with pytest.raises(ValueError, match="unknown GAN kind"):
        GanSettings("dcgan", iterations=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="iterations must be at least 1"):
        _tiny("sngan", iterations=0)


def test_sample_images_in_eval_mode_and_batches() -> None:
    generator = DCGANGenerator32(100, 8)
    noise = torch.randn(7, 100)
    out = sample_images(generator, noise, batch_size=3)
    generator.eval()
    with torch.no_grad():
        assert torch.allclose(out, generator(noise), atol=1e-6)
