"""Frechet distances: the formula, FID through torchmetrics on a TorchScript weights file the tests
write, the reference-statistics cache, and the labelled classifier fallback."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from adabelief.experiments import fid
from adabelief.experiments.fid import (
    CLASSIFIER_FD_KIND,
    FID_KIND,
    INCEPTION_WEIGHTS_FILE,
    ClassifierFrechetDistance,
    FIDError,
    InceptionFeatureExtractor,
    InceptionFID,
    cifar10_scorer,
    find_inception_weights,
    frechet_distance,
    from_uint8_images,
    gaussian_stats,
    to_uint8_images,
)

try:  # PyPI's torchvision (pulled in by timm) does not load beside the CPU build of torch
    from _torchvision_compat import import_torchvision
except ImportError:
    pass
else:
    import_torchvision()
pytest.importorskip("torchmetrics")
# The tests write their weights file with torch.jit.script, which torch 2.13 marks deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


class _ScriptedInception(nn.Module):
    """Stands in for NVIDIA's TorchScript Inception: same call, uint8 pixels in, random weights."""

    def __init__(self, feature_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.features = nn.Linear(8 * 4, feature_dim)
        self.logits = nn.Linear(feature_dim, 10)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = (img.to(torch.float32) - 128) / 128
        x = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 2).flatten(1)
        features = self.features(x)
        if return_features:
            return features
        return self.logits(features)


def _write_weights(path: Path, feature_dim: int, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(_ScriptedInception(feature_dim)).save(str(path))
    return path


def _images(n: int, seed: int, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(n, 3, 32, 32, generator=generator)


@pytest.fixture
def no_hub_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache, so that nothing the user has installed is picked up."""
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    return hub


def _random_gaussian(dim: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    root = rng.normal(size=(dim, dim))
    return rng.normal(size=dim), root @ root.T + 0.1 * np.eye(dim)


def test_frechet_distance_matches_scipy_sqrtm_on_known_gaussians() -> None:
    rng = np.random.default_rng(0)
    for dim in (1, 3, 8):
        (mu_a, cov_a), (mu_b, cov_b) = _random_gaussian(dim, rng), _random_gaussian(dim, rng)
        root = scipy.linalg.sqrtm(cov_a @ cov_b)
        direct = float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * np.real(root)))
        assert frechet_distance((mu_a, cov_a), (mu_b, cov_b)) == pytest.approx(direct, rel=1e-9)
        assert frechet_distance((mu_a, cov_a), (mu_a, cov_a)) == pytest.approx(0.0, abs=1e-9)
    # Diagonal covariances: sum (mu_a - mu_b)^2 + sum (sigma_a - sigma_b)^2.
    sigma_a, sigma_b = np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 0.5])
    expected = 1.0 + (1.0 + 0.0 + 2.5**2)
    value = frechet_distance(
        (np.zeros(3), np.diag(sigma_a**2)), (np.array([1.0, 0, 0]), np.diag(sigma_b**2))
    )
    assert value == pytest.approx(expected, rel=1e-12)


def test_frechet_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        gaussian_stats(np.ones((1, 4)))
    with pytest.raises(ValueError, match="differ in size"):
        frechet_distance((np.zeros(2), np.eye(2)), (np.zeros(3), np.eye(3)))


def test_uint8_conversion_round_trips_every_pixel_value() -> None:
    pixels = torch.arange(256, dtype=torch.uint8).repeat(3 * 32 * 32 // 256 + 1)[: 3 * 32 * 32]
    pixels = pixels.view(1, 3, 32, 32)
    assert torch.equal(to_uint8_images(from_uint8_images(pixels)), pixels)
    assert to_uint8_images(torch.tensor([-5.0, -1.0, 1.0, 5.0])).tolist() == [0, 0, 255, 255]
    with pytest.raises(ValueError, match="non-finite"):
        to_uint8_images(torch.tensor([0.0, float("nan")]))


def test_weights_are_found_in_the_data_folder_then_the_hub_cache(
    tmp_path: Path, no_hub_weights: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    assert find_inception_weights(data) is None
    hub_file = _write_weights(no_hub_weights / "checkpoints" / INCEPTION_WEIGHTS_FILE, 4)
    assert find_inception_weights(data) == hub_file
    assert find_inception_weights(None) == hub_file
    data_file = _write_weights(data / INCEPTION_WEIGHTS_FILE, 4)
    assert find_inception_weights(data) == data_file


def test_fid_from_the_weights_file_matches_the_direct_computation(tmp_path: Path) -> None:
    weights = _write_weights(tmp_path / INCEPTION_WEIGHTS_FILE, 16)
    reference, fake = _images(64, seed=1), _images(40, seed=2, low=-0.5, high=1.0)
    scorer = InceptionFID(weights, reference, feature_dim=16, batch_size=24)
    result = scorer.score(fake)
    extractor = InceptionFeatureExtractor(weights, 16)
    with torch.no_grad():
        real_features = extractor(to_uint8_images(reference)).numpy()
        fake_features = extractor(to_uint8_images(fake)).numpy()
    direct = frechet_distance(gaussian_stats(fake_features), gaussian_stats(real_features))
    assert result.kind == FID_KIND
    assert result.label.startswith("FID") and "40 generated images" in result.label
    assert result.value == pytest.approx(direct, rel=1e-4)
    assert result.value > 0.01
    # The real statistics survive scoring; batches given one by one give the same value.
    assert scorer.score([fake[:15], fake[15:]]).value == pytest.approx(result.value, rel=1e-6)
    assert scorer.score(reference).value == pytest.approx(0.0, abs=1e-3)


def test_reference_statistics_are_cached_and_keyed(tmp_path: Path) -> None:
    weights = _write_weights(tmp_path / INCEPTION_WEIGHTS_FILE, 8)
    reference, fake = _images(48, seed=3), _images(32, seed=4)
    cache = tmp_path / "cache" / "cifar10-train.npz"
    first = InceptionFID(weights, reference, feature_dim=8, cache=cache).score(fake).value
    assert cache.is_file()
    # Store the statistics of features three times as large: a scorer reading the cache sees it.
    with np.load(cache) as stored:
        arrays = {name: stored[name] for name in stored.files}
    arrays["real_features_sum"] = 3 * arrays["real_features_sum"]
    arrays["real_features_cov_sum"] = 9 * arrays["real_features_cov_sum"]
    np.savez(cache, **arrays)
    shifted = InceptionFID(weights, reference, feature_dim=8, cache=cache).score(fake).value
    assert shifted > first + 0.1
    # Other reference images do not match the key: recomputed, and the cache rewritten.
    other = InceptionFID(weights, reference[:40], feature_dim=8, cache=cache).score(fake).value
    again = InceptionFID(weights, reference[:40], feature_dim=8, cache=cache).score(fake).value
    assert other == pytest.approx(again, rel=1e-9)
    assert other != pytest.approx(shifted)


def test_unusable_weights_files_give_errors_naming_them(tmp_path: Path) -> None:
    junk = tmp_path / "junk" / INCEPTION_WEIGHTS_FILE
    junk.parent.mkdir()
    junk.write_bytes(b"not a torchscript archive")
    with pytest.raises(FIDError, match=str(junk)):
        InceptionFeatureExtractor(junk)
    wrong_width = _write_weights(tmp_path / "narrow" / INCEPTION_WEIGHTS_FILE, 12)
    with pytest.raises(FIDError, match="not the FID Inception network"):
        InceptionFeatureExtractor(wrong_width)  # 12 features, not 2048
    with pytest.raises(FIDError, match="does not exist"):
        cifar10_scorer(
            _images(4, 0), torch.zeros(4, dtype=torch.long), weights=tmp_path / "missing.pt"
        )


def test_missing_torchmetrics_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = _write_weights(tmp_path / INCEPTION_WEIGHTS_FILE, 4)
    monkeypatch.setitem(sys.modules, "torchmetrics.image.fid", None)
    with pytest.raises(FIDError, match=r"adabelief\[fid\]"):
        InceptionFID(weights, _images(8, 0), feature_dim=4)


def test_scorer_uses_fid_when_the_file_is_in_the_data_folder(
    tmp_path: Path, no_hub_weights: Path
) -> None:
    _write_weights(tmp_path / INCEPTION_WEIGHTS_FILE, fid.INCEPTION_FEATURE_DIM)
    scorer = cifar10_scorer(_images(16, 5), torch.zeros(16, dtype=torch.long), data_dir=tmp_path)
    assert isinstance(scorer, InceptionFID)
    assert scorer.kind == FID_KIND and scorer.label.startswith("FID (Inception")
    assert scorer.reference_count == 16


def test_fallback_without_weights_is_labelled_and_never_called_fid(
    tmp_path: Path, no_hub_weights: Path
) -> None:
    images = _images(64, seed=6)
    labels = torch.arange(64) % 10
    state = torch.get_rng_state()
    scorer = cifar10_scorer(
        images,
        labels,
        data_dir=tmp_path,
        test_images=images[:20],
        test_labels=labels[:20],
        classifier_epochs=1,
    )
    assert torch.equal(torch.get_rng_state(), state)  # the run's random stream is untouched
    assert isinstance(scorer, ClassifierFrechetDistance)
    assert scorer.kind == CLASSIFIER_FD_KIND
    assert scorer.label.startswith("Frechet distance on the features of a VGG11")
    assert "not FID" in scorer.label and not scorer.label.startswith("FID")
    own = scorer.score(images)
    noise = scorer.score(_images(64, seed=7, low=0.5, high=1.0))
    assert own.kind == CLASSIFIER_FD_KIND and own.label.startswith("Frechet distance")
    assert noise.value > 0 and own.value < 1e-3 * noise.value
    with pytest.raises(ValueError, match="non-finite"):
        scorer.score(torch.full((4, 3, 32, 32), float("nan")))
