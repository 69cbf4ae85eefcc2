"""A deterministic, download-free Frechet distance for 8x8 digit images.

The feature network is a :class:`~adabelief.experiments.models.DigitsCNN` trained from a fixed
seed on the digits training split (a few seconds on a CPU, kept in memory, never written to disk).
The Frechet distance between Gaussians fitted to real and generated penultimate-layer features
is the FID formula with this network in place of Inception.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from adabelief.experiments.data import load_digits
from adabelief.experiments.models import DigitsCNN
from adabelief.experiments.training import (
    evaluate_classifier,
    seed_everything,
    train_classifier_epoch,
)

__all__ = ["FEATURE_DIM", "FeatureNetwork", "frechet_distance", "gaussian_stats"]

FEATURE_DIM = 32
_FEATURE_SEED = 12345
_FEATURE_EPOCHS = 10


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of row-wise ``features``."""
    data = np.asarray(features, dtype=np.float64)
    return data.mean(axis=0), np.cov(data, rowvar=False)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(
    stats_a: tuple[np.ndarray, np.ndarray], stats_b: tuple[np.ndarray, np.ndarray]
) -> float:
    """``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2)`` (symmetric eigh form)."""
    mu_a, cov_a = stats_a
    mu_b, cov_b = stats_b
    root_a = _sqrt_psd(cov_a)
    cross = _sqrt_psd(root_a @ cov_b @ root_a)
    value = float(
        np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(cross)
    )
    return max(value, 0.0)


class FeatureNetwork:
    """The trained digits classifier and the real-image feature statistics of each split."""

    def __init__(self, epochs: int = _FEATURE_EPOCHS) -> None:
        data = load_digits()
        seed_everything(_FEATURE_SEED)
        generator = torch.Generator().manual_seed(_FEATURE_SEED)
        self.model = DigitsCNN(feature_dim=FEATURE_DIM)
        optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        for _ in range(epochs):
            train_classifier_epoch(
                self.model,
                optimizer,
                data.train_x,
                data.train_y,
                batch_size=64,
                generator=generator,
            )
        self.test_accuracy = evaluate_classifier(self.model, data.test_x, data.test_y)[1]
        self.model.eval()
        self.train_stats = gaussian_stats(self.features(data.train_x))
        self.test_stats = gaussian_stats(self.features(data.test_x))

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> np.ndarray:
        """Penultimate features of images in ``[0, 1]``."""
        return self.model.features(images.float().cpu()).numpy()

    def distance(self, images: torch.Tensor, split: str) -> float:
        """Frechet distance of ``images`` (in ``[0, 1]``) to the real ``"train"``/``"test"`` split."""
        reference = self.train_stats if split == "train" else self.test_stats
        return frechet_distance(gaussian_stats(self.features(images)), reference)


@functools.lru_cache(maxsize=1)
def feature_network(epochs: int = _FEATURE_EPOCHS) -> FeatureNetwork:
    """The process-wide feature network (trained on first use; deterministic)."""
    return FeatureNetwork(epochs)
