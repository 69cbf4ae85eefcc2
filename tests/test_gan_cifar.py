"""``gan --data``: the paper's CIFAR-10 GANs through the runner on fake CIFAR-10 pickles."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from adabelief.experiments import fid, gan_models
from adabelief.experiments.cli import main
from adabelief.experiments.data import check_cifar10
from adabelief.experiments.fid import INCEPTION_WEIGHTS_FILE, FIDError
from adabelief.experiments.models import MLPCritic
from adabelief.experiments.tasks import TASKS, PlanOptions
from adabelief.experiments.tasks.gan import _discriminator_loss
from test_experiments_data import write_fake_cifar

pytestmark = pytest.mark.usefixtures("restore_torch_globals")


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Fake CIFAR-10 (8 images per batch) and an empty torch hub cache."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    folder = tmp_path / "data"
    write_fake_cifar(folder, per_batch=8)
    return folder


def test_without_data_the_bundled_gans_stay() -> None:
    names = [e.name for e in TASKS["gan"].experiments(PlanOptions(quick=True))]
    assert names == ["wgan-gp-mog", "gan-mog", "dcgan-digits"]


def test_paper_settings_and_the_metric_named_by_the_scorer(data: Path) -> None:
    task = TASKS["gan"]
    full = {e.name: e for e in task.experiments(PlanOptions(quick=False, data_dir=data))}
    assert list(full) == ["cifar10-wgan", "cifar10-wgan-gp", "cifar10-sngan"]
    for name, experiment in full.items():
        settings = experiment.settings
        assert settings["critic_steps"] == 5 and settings["batch_size"] == 64
        assert settings["score_kind"] == "classifier_fd" and settings["fid_samples"] == 50_000
        assert experiment.score.name == "classifier_fd" and "not FID" in experiment.score.label
        assert not experiment.paper_comparable and experiment.paper == {}
        hparams = task.preset_hparams(experiment, "adabelief")
        assert hparams["lr"] == 2e-4 and list(hparams["betas"]) == [0.5, 0.999]
        assert hparams["eps"] == 1e-12
        assert task.preset_hparams(experiment, "adam")["lr"] == 2e-4
        assert experiment.paper_key == f"cifar10-gan/{name.removeprefix('cifar10-')}"
    assert full["cifar10-wgan"].settings["clip_value"] == 0.01
    assert full["cifar10-wgan-gp"].settings["gp_weight"] == 10.0
    (data / INCEPTION_WEIGHTS_FILE).write_bytes(b"a weights file")
    with_weights = task.experiments(PlanOptions(quick=True, data_dir=data))
    wgan = with_weights[0]
    assert wgan.settings["score_kind"] == "fid" and wgan.score.name == "fid"
    assert wgan.score.label.startswith("FID") and wgan.paper_comparable
    assert wgan.paper["adabelief"] == 81.0 and wgan.paper["adam"] == 98.0
    assert wgan.settings["iterations"] < full["cifar10-wgan"].settings["iterations"]


def test_weights_without_the_fid_library_is_one_clear_error(
    data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = data / INCEPTION_WEIGHTS_FILE
    weights.write_bytes(b"a weights file")

    def missing() -> None:
        raise FIDError("FID needs the torchmetrics package: pip install 'adabelief[fid]'")

    monkeypatch.setattr(fid, "_import_fid_metric", missing)
    assert main(["run", "gan", "--data", str(data), "--out", str(data.parent / "o")]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert "Traceback" not in captured.err and len(lines) == 1
    assert str(weights) in lines[0] and "adabelief[fid]" in lines[0]


def test_without_weights_the_fingerprint_is_cifar10s_and_says_not_fid(data: Path) -> None:
    before = TASKS["gan"].check_data(data)
    assert before.fingerprint == check_cifar10(data).fingerprint
    assert "not FID" in before.description


def test_gradient_penalty_is_the_one_loss_for_points_and_images() -> None:
    critic = MLPCritic(8, depth=2)
    real, fake = torch.randn(16, 2), torch.randn(16, 2)
    mix = torch.rand((16, 1), generator=torch.Generator().manual_seed(3))
    between = (mix * real + (1 - mix) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(between).sum(), between)
    expected = (
        critic(fake).mean() - critic(real).mean() + 0.1 * ((grad.norm(dim=1) - 1) ** 2).mean()
    )
    loss = _discriminator_loss("wgan-gp", critic, real, fake, 0.1, torch.Generator().manual_seed(3))
    torch.testing.assert_close(loss, expected)
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    penalty = gan_models.gradient_penalty(
        gan_models.DCGANCritic32(8, batch_norm=False), images, -images, torch.Generator()
    )
    assert penalty.shape == () and torch.isfinite(penalty)


@pytest.mark.slow
def test_gan_data_runs_the_three_paper_gans_end_to_end(data: Path) -> None:
    out = data.parent / "run"
    argv = ["run", "gan", "--data", str(data), "--quick", "--tiny", "--seeds", "1"]
    argv += ["--optimizers", "adabelief", "--out", str(out)]
    argv += ["--jobs", "1", "--threads", "1", "--no-progress", "--no-plots"]
    assert main(argv) == 0
    records = {r["experiment"]: r for r in json.loads((out / "results.json").read_text())}
    assert sorted(records) == ["cifar10-sngan", "cifar10-wgan", "cifar10-wgan-gp"]
    fingerprint = check_cifar10(data).fingerprint
    for record in records.values():
        assert record["settings"]["data_fingerprint"] == fingerprint
        assert record["settings"]["score_kind"] == "classifier_fd"
        assert record["artifacts"]["score_kind"] == "classifier_fd"
        assert "not FID" in record["artifacts"]["score_label"]
        assert "fid" not in record["metrics"]
        assert record["metrics"]["classifier_fd"] >= 0
        assert record["artifacts"]["generator_steps"] == record["settings"]["iterations"]
        samples = torch.tensor(record["artifacts"]["samples"])
        assert samples.shape == (8, 3, 32, 32) and samples.dtype == torch.int64
        assert 0 <= int(samples.min()) and int(samples.max()) <= 255
    report = (out / "report.md").read_text()
    assert "Scores are the classifier fallback, not FID" in report
    section = report.split("### gan/cifar10-wgan:", 1)[1].split("### ", 1)[0]
    assert "**Beside the paper** (WGAN (weight clipping, DCGAN) on CIFAR-10)" in section
    assert "| adabelief | about 81 |" in section and "| adam | about 98 |" in section
    assert "different quantities, so they are not compared" in section
    assert "medians marked 'about' are read off a figure" in section
    assert "not the paper's FID" in section
    assert main(["report", str(out)]) == 0
    figures = sorted(path.name for path in (out / "plots").glob("*rgb-images.png"))
    assert len(figures) == 3
    assert f"({figures[0]}" in (out / "report.md").read_text().replace("plots/", "")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_gan_data_with_inception_weights_scores_fid(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The FID path through the runner: torchmetrics on a TorchScript file the test writes (8-d
    features instead of Inception's 2048, so the runner's scorer is built with that size)."""
    fid_tests = pytest.importorskip("test_fid")  # skips where torchmetrics does not import
    from adabelief.experiments.tasks import gan

    weights = fid_tests._write_weights(data / INCEPTION_WEIGHTS_FILE, 8)
    built: list[Path | None] = []

    def scorer(images: torch.Tensor, labels: torch.Tensor, **options: object) -> fid.InceptionFID:
        assert fid.find_inception_weights(options["data_dir"]) == weights  # type: ignore[arg-type]
        built.append(options["reference_cache"])  # type: ignore[arg-type]
        return fid.InceptionFID(weights, images, feature_dim=8, cache=built[-1])

    monkeypatch.setattr(gan, "cifar10_scorer", scorer)
    monkeypatch.setattr(
        gan,
        "InceptionFeatureExtractor",
        functools.partial(fid.InceptionFeatureExtractor, feature_dim=8),
    )
    gan._cifar_gan_inputs.cache_clear()
    out = data.parent / "run"
    argv = ["run", "gan", "--data", str(data), "--quick", "--tiny", "--seeds", "2"]
    argv += ["--optimizers", "adabelief", "--out", str(out)]
    argv += ["--jobs", "1", "--threads", "1", "--no-progress", "--no-plots"]
    try:
        assert main(argv) == 0
    finally:
        gan._cifar_gan_inputs.cache_clear()
    records = json.loads((out / "results.json").read_text())
    assert len(records) == 6
    for record in records:
        assert record["settings"]["score_kind"] == "fid"
        assert record["artifacts"]["score_label"].startswith("FID")
        assert record["metrics"]["fid"] >= 0 and "classifier_fd" not in record["metrics"]
    assert built[0] is not None and built[0].parent == out / "cache" and built[0].is_file()
    fingerprint = TASKS["gan"].check_data(data).fingerprint
    assert (
        records[0]["settings"]["data_fingerprint"] == fingerprint != check_cifar10(data).fingerprint
    )
    report = (out / "report.md").read_text()
    section = report.split("### gan/cifar10-sngan:", 1)[1].split("### ", 1)[0]
    assert "Scores are FID" in section and "| adabelief | 12.52 ± 0.16 |" in section
    assert "standard deviations of the measured runs" in section or "no clear difference" in section


def test_a_weights_file_that_is_not_the_network_is_one_clear_error(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("test_fid")  # skips where torchmetrics does not import
    weights = data / INCEPTION_WEIGHTS_FILE
    weights.write_bytes(b"not TorchScript")
    assert main(["run", "gan", "--data", str(data), "--out", str(data.parent / "o")]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert "Traceback" not in captured.err and len(lines) == 1
    assert str(weights) in lines[0] and "not a TorchScript Inception network" in lines[0]
