"""Frechet distances between real and generated images: FID, and download-free stand-ins.

* :func:`frechet_distance` / :func:`gaussian_stats` - the Frechet distance between Gaussians
  fitted to two feature sets, ``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2)``.
* :class:`FeatureNetwork` / :func:`feature_network` - for 8x8 digits: a
  :class:`~adabelief.experiments.models.DigitsCNN` trained from a fixed seed on the digits training
  split (a few seconds on a CPU, kept in memory, never written to disk), whose penultimate-layer
  features take Inception's place.
* :class:`InceptionFID` - FID for CIFAR-10 computed the standard way: ``torchmetrics``'
  ``FrechetInceptionDistance`` on the 2048-d pool features of the Inception network of the
  original FID code (graph ``2015-12-05``), in NVIDIA's TorchScript port ``inception-2015-12-05.pt``
  (the file StyleGAN2-ADA and StyleGAN3 use), against the statistics of the CIFAR-10 training set.
  Nothing is downloaded: the user puts the file in the ``--data`` folder or torch's hub cache
  (:func:`find_inception_weights`).  Needs the ``adabelief[fid]`` extra.
* :class:`ClassifierFrechetDistance` - the fallback without that file: the Frechet distance on the
  512-d penultimate features of a VGG11 trained here on CIFAR-10 from a fixed seed.  It is
  labelled as such and never called FID.

:func:`cifar10_scorer` picks between the last two; both score images with
:meth:`~ImageFrechetScorer.score`, which returns a :class:`FrechetScore` (value, kind, label).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from adabelief.experiments.data import load_digits
from adabelief.experiments.models import VGG, DigitsCNN, vgg11
from adabelief.experiments.training import (
    evaluate_classifier,
    seed_everything,
    train_classifier_epoch,
)

__all__ = [
    "CLASSIFIER_FD_KIND",
    "FEATURE_DIM",
    "FID_KIND",
    "INCEPTION_FEATURE_DIM",
    "INCEPTION_WEIGHTS_FILE",
    "ClassifierFrechetDistance",
    "FIDError",
    "FeatureNetwork",
    "FrechetScore",
    "ImageFrechetScorer",
    "InceptionFID",
    "InceptionFeatureExtractor",
    "check_fid_dependencies",
    "cifar10_scorer",
    "feature_network",
    "find_inception_weights",
    "frechet_distance",
    "from_uint8_images",
    "gaussian_stats",
    "to_uint8_images",
]

FEATURE_DIM = 32
_FEATURE_SEED = 12345
_FEATURE_EPOCHS = 10


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64, ``1/(n-1)`` normalised) of row-wise ``features``."""
    data = np.asarray(features, dtype=np.float64)
    if data.ndim != 2 or len(data) < 2:
        raise ValueError(f"need at least 2 feature rows of shape (n, d), got {data.shape}")
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
    if np.shape(mu_a) != np.shape(mu_b) or np.shape(cov_a) != np.shape(cov_b):
        raise ValueError(
            f"feature statistics differ in size: {np.shape(mu_a)} and {np.shape(mu_b)}"
        )
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


# --- CIFAR-10: FID on Inception features, or a Frechet distance on a classifier's features -------

#: File name of NVIDIA's TorchScript port of the FID Inception network (TensorFlow graph
#: ``2015-12-05``), as published with StyleGAN2-ADA (``stylegan2-ada-pytorch`` metrics).
INCEPTION_WEIGHTS_FILE = "inception-2015-12-05.pt"
INCEPTION_FEATURE_DIM = 2048
FID_KIND = "fid"
CLASSIFIER_FD_KIND = "classifier_fd"
_CLASSIFIER_SEED = 20201020
_HASH_CHUNK = 1 << 20


class FIDError(ValueError):
    """FID cannot be computed as asked: the library is missing or the weights file is unusable."""


@dataclass(frozen=True)
class FrechetScore:
    """One score: ``value`` (lower is better), ``kind`` (:data:`FID_KIND` or
    :data:`CLASSIFIER_FD_KIND`) and a plain-words ``label`` saying what was measured."""

    value: float
    kind: str
    label: str


class ImageFrechetScorer(Protocol):
    """Scores generated CIFAR-10-sized images against fixed real-image statistics."""

    kind: str
    label: str

    def score(self, images: torch.Tensor | Iterable[torch.Tensor]) -> FrechetScore:
        """Frechet distance of ``images`` (``(N, 3, 32, 32)`` in ``[-1, 1]``) to the reference."""
        ...


def to_uint8_images(images: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` floats to ``uint8`` pixels: ``floor(clamp(127.5 x + 128, 0, 255))``.

    The quantisation applied before FID (as when samples are saved as PNG); exact inverse of
    :func:`from_uint8_images` on its outputs.
    """
    if not images.is_floating_point():
        raise ValueError(f"expected float images in [-1, 1], got dtype {images.dtype}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images contain non-finite values (a diverged generator?)")
    return (images.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def from_uint8_images(pixels: torch.Tensor) -> torch.Tensor:
    """``uint8`` pixels to floats in ``[-1, 1]``: ``p / 127.5 - 1``."""
    if pixels.dtype != torch.uint8:
        raise ValueError(f"expected uint8 pixels, got dtype {pixels.dtype}")
    return pixels.float() / 127.5 - 1


def _check_images(images: torch.Tensor) -> None:
    if images.dim() != 4 or tuple(images.shape[1:]) != (3, 32, 32):
        raise ValueError(f"expected images of shape (N, 3, 32, 32), got {tuple(images.shape)}")


def _batches(
    images: torch.Tensor | Iterable[torch.Tensor], batch_size: int
) -> Iterator[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        for start in range(0, len(images), batch_size):
            yield images[start : start + batch_size]
    else:
        yield from images


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def find_inception_weights(data_dir: Path | None = None) -> Path | None:
    """``DIR/inception-2015-12-05.pt`` for ``data_dir``, else the same name in torch's hub cache
    (``torch.hub.get_dir()/checkpoints/``, usually ``~/.cache/torch/hub/checkpoints``), else ``None``.
    """
    candidates = [] if data_dir is None else [Path(data_dir) / INCEPTION_WEIGHTS_FILE]
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE)
    return next((path for path in candidates if path.is_file()), None)


class InceptionFeatureExtractor(nn.Module):
    """The TorchScript Inception network as a feature extractor: ``uint8`` ``(N, 3, H, W)`` pixels
    to ``(N, num_features)`` float32 pool features (the network resizes to 299x299 itself).

    Loading a TorchScript file runs the code inside it: use the published file only.  The file is
    checked on load: it must produce ``(N, feature_dim)`` finite features for a 32x32 batch.
    """

    def __init__(self, path: Path, feature_dim: int = INCEPTION_FEATURE_DIM) -> None:
        super().__init__()
        self.path = Path(path)
        try:
            with warnings.catch_warnings():  # the published file is TorchScript; nothing to act on
                warnings.simplefilter("ignore", DeprecationWarning)
                self.network = torch.jit.load(str(self.path), map_location="cpu").eval()
        except Exception as exc:  # torch raises several types for a file that is not TorchScript
            raise FIDError(
                f"{self.path} is not a TorchScript Inception network ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'})"
            ) from exc
        self.num_features = feature_dim
        with torch.no_grad():
            try:
                probe = self(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
            except Exception as exc:
                raise FIDError(
                    f"{self.path} does not run as the FID Inception network "
                    f"(network(images, return_features=True) failed: {type(exc).__name__})"
                ) from exc
        if tuple(probe.shape) != (2, feature_dim) or not bool(torch.isfinite(probe).all()):
            raise FIDError(
                f"{self.path} gives features of shape {tuple(probe.shape)}, not (N, {feature_dim}): "
                "not the FID Inception network"
            )

    def train(self, mode: bool = True) -> InceptionFeatureExtractor:
        """Always in eval mode (a fixed feature network)."""
        return super().train(False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.network(pixels, return_features=True).float()


def _import_fid_metric() -> Any:
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as exc:
        raise FIDError(
            "FID needs the torchmetrics package: pip install 'adabelief[fid]' "
            f"(import failed: {exc})"
        ) from exc
    except RuntimeError as exc:  # torchmetrics imports torchvision whenever it is installed
        raise FIDError(
            "torchmetrics cannot be imported because the installed torchvision does not load "
            f"beside torch {torch.__version__} ({str(exc).splitlines()[0]}); install the "
            "torchvision build that matches this torch, or uninstall torchvision"
        ) from exc
    return FrechetInceptionDistance


def check_fid_dependencies() -> None:
    """Raise :class:`FIDError` saying what to install unless FID's library (torchmetrics) imports."""
    _import_fid_metric()


class InceptionFID:
    """FID against the Inception statistics of ``reference`` (the CIFAR-10 training set).

    ``torchmetrics``' ``FrechetInceptionDistance`` accumulates feature sums and outer products in
    float64 and returns ``|mu_r - mu_g|^2 + tr(C_r + C_g - 2 (C_r C_g)^1/2)`` with unbiased
    covariances.  The reference features are computed once; with ``cache`` they are kept in an
    ``.npz`` file keyed by the weights file's and the reference pixels' SHA-256, and reused when
    the key matches.  Images are quantised with :func:`to_uint8_images` before scoring.
    """

    kind = FID_KIND

    def __init__(
        self,
        weights: Path,
        reference: torch.Tensor,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 200,
        cache: Path | None = None,
        feature_dim: int = INCEPTION_FEATURE_DIM,
        reference_name: str = "CIFAR-10 training images",
    ) -> None:
        _check_images(reference)
        fid_metric = _import_fid_metric()
        self.weights = Path(weights)
        self.weights_sha256 = _sha256(self.weights)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.reference_count = len(reference)
        extractor = InceptionFeatureExtractor(self.weights, feature_dim)
        self.metric = fid_metric(feature=extractor, reset_real_features=False).to(self.device)
        pixels = to_uint8_images(reference).cpu()
        key = f"{self.weights_sha256}:{hashlib.sha256(pixels.numpy().tobytes()).hexdigest()}"
        if cache is None or not self._load_reference(Path(cache), key):
            with torch.no_grad():
                for batch in _batches(pixels, batch_size):
                    self.metric.update(batch.to(self.device), real=True)
            if cache is not None:
                self._save_reference(Path(cache), key)
        self.label = (
            f"FID (Inception 2015-12-05 pool features, {INCEPTION_WEIGHTS_FILE}; reference: "
            f"{self.reference_count} {reference_name})"
        )

    _STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")

    def _load_reference(self, path: Path, key: str) -> bool:
        if not path.is_file():
            return False
        try:
            with np.load(path, allow_pickle=False) as stored:
                if str(stored["key"]) != key:
                    return False
                for name in self._STATES:
                    setattr(self.metric, name, torch.from_numpy(stored[name]).to(self.device))
        except (OSError, KeyError, ValueError):
            return False  # unreadable or foreign cache: recompute and overwrite it
        return True

    def _save_reference(self, path: Path, key: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        arrays = {name: getattr(self.metric, name).cpu().numpy() for name in self._STATES}
        with temporary.open("wb") as handle:
            np.savez(handle, key=np.array(key), **arrays)
        os.replace(temporary, path)

    @torch.no_grad()
    def score(self, images: torch.Tensor | Iterable[torch.Tensor]) -> FrechetScore:
        """FID of ``images`` (a tensor or an iterable of batches, ``[-1, 1]``) to the reference."""
        self.metric.reset()  # forgets the generated images only (reset_real_features=False)
        count = 0
        for batch in _batches(images, self.batch_size):
            _check_images(batch)
            self.metric.update(to_uint8_images(batch).to(self.device), real=False)
            count += len(batch)
        if count < 2:
            raise ValueError(f"FID needs at least 2 generated images, got {count}")
        value = float(self.metric.compute())
        self.metric.reset()
        return FrechetScore(value, self.kind, f"{self.label}, {count} generated images")


class ClassifierFrechetDistance:
    """Frechet distance on the 512-d penultimate features of a VGG11 trained here on CIFAR-10.

    The stand-in for FID when the Inception file is absent.  The VGG11 (batch norm, CIFAR variant)
    is trained from a fixed seed with Adam (lr 1e-3, batch ``batch_size``) for ``epochs`` epochs
    on ``train_images`` (``[-1, 1]``, as the GAN sees them), independent of the optimizer under
    test and without touching the global RNG; the reference statistics are those of the training
    images.  Its values are not comparable with published FIDs, and its label says so.
    """

    kind = CLASSIFIER_FD_KIND

    def __init__(
        self,
        train_images: torch.Tensor,
        train_labels: torch.Tensor,
        *,
        test_images: torch.Tensor | None = None,
        test_labels: torch.Tensor | None = None,
        epochs: int = 10,
        batch_size: int = 128,
        num_classes: int = 10,
        device: str | torch.device = "cpu",
    ) -> None:
        _check_images(train_images)
        if len(train_labels) != len(train_images):
            raise ValueError(f"{len(train_images)} training images but {len(train_labels)} labels")
        if epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {epochs}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_CLASSIFIER_SEED)
            model = vgg11(num_classes)
            assert isinstance(model, VGG)
            self.model = model.to(self.device)
            optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
            generator = torch.Generator().manual_seed(_CLASSIFIER_SEED)
            for _ in range(epochs):
                train_classifier_epoch(
                    self.model,
                    optimizer,
                    train_images,
                    train_labels,
                    batch_size=batch_size,
                    generator=generator,
                    device=str(self.device),
                )
        self.model.eval()
        self.test_accuracy = math.nan
        if test_images is not None and test_labels is not None and len(test_labels):
            _check_images(test_images)
            self.test_accuracy = evaluate_classifier(
                self.model, test_images, test_labels, device=str(self.device)
            )[1]
        self.reference_stats = gaussian_stats(self.features(train_images))
        accuracy = (
            f"{self.test_accuracy:.1f}% test accuracy"
            if math.isfinite(self.test_accuracy)
            else "test accuracy not measured"
        )
        self.label = (
            f"Frechet distance on the features of a VGG11 trained here on CIFAR-10 ({epochs} "
            f"epoch{'s' if epochs != 1 else ''}, {accuracy}); not FID and not comparable with published FID values"
        )

    @torch.no_grad()
    def features(self, images: torch.Tensor | Iterable[torch.Tensor]) -> np.ndarray:
        """Penultimate (512-d) features of ``[-1, 1]`` images, float64, one row per image."""
        rows = []
        for batch in _batches(images, 500):
            _check_images(batch)
            if not bool(torch.isfinite(batch).all()):
                raise ValueError("images contain non-finite values (a diverged generator?)")
            rows.append(self.model.features(batch.float().to(self.device)).double().cpu().numpy())
        return np.concatenate(rows)

    def score(self, images: torch.Tensor | Iterable[torch.Tensor]) -> FrechetScore:
        """Frechet distance of ``images`` to the training images, on this VGG11's features."""
        features = self.features(images)
        value = frechet_distance(gaussian_stats(features), self.reference_stats)
        return FrechetScore(value, self.kind, f"{self.label}, {len(features)} generated images")


def cifar10_scorer(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    *,
    data_dir: Path | None = None,
    weights: Path | None = None,
    device: str | torch.device = "cpu",
    reference_cache: Path | None = None,
    test_images: torch.Tensor | None = None,
    test_labels: torch.Tensor | None = None,
    classifier_epochs: int = 10,
) -> ImageFrechetScorer:
    """FID when the Inception file is found (``weights``, else :func:`find_inception_weights`),
    otherwise the :class:`ClassifierFrechetDistance` fallback trained on the same images.

    ``train_images`` (``[-1, 1]``) are the reference for both; labels and test images are used by
    the fallback only.
    """
    if weights is not None and not Path(weights).is_file():
        raise FIDError(f"Inception weights file {weights} does not exist")
    path = Path(weights) if weights is not None else find_inception_weights(data_dir)
    if path is not None:
        return InceptionFID(path, train_images, device=device, cache=reference_cache)
    return ClassifierFrechetDistance(
        train_images,
        train_labels,
        test_images=test_images,
        test_labels=test_labels,
        epochs=classifier_epochs,
        device=device,
    )
