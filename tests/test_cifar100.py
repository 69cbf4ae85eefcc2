"""CIFAR-100 through ``classify --data``: fake pickles in the real format, validation, the runner."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from adabelief.experiments.cli import main
from adabelief.experiments.data import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    DataInvalidError,
    check_cifar,
    check_cifar100,
    load_cifar100,
)
from adabelief.experiments.tasks import TASKS, PlanOptions

TRAIN, TEST = 40, 12


pytestmark = pytest.mark.usefixtures("restore_torch_globals")


def write_fake_cifar100(folder: Path, train: int = TRAIN, test: int = TEST) -> Path:
    """``train``, ``test``, ``meta`` as in the python release: fine label ``(3 i + 7) % 100``,
    coarse label ``fine // 5``, every pixel of image ``i`` equal to its fine label."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, count in (("train", train), ("test", test)):
        fine = [(3 * i + 7) % 100 for i in range(count)]
        data = np.repeat(np.array(fine, dtype=np.uint8)[:, None], 3072, axis=1)
        batch = {
            b"filenames": [f"img{i}.png".encode() for i in range(count)],
            b"batch_label": f"{name} batch".encode(),
            b"fine_labels": fine,
            b"coarse_labels": [label // 5 for label in fine],
            b"data": data,
        }
        with (folder / name).open("wb") as handle:
            pickle.dump(batch, handle)
    meta = {
        b"fine_label_names": [f"class{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"super{i}".encode() for i in range(20)],
    }
    with (folder / "meta").open("wb") as handle:
        pickle.dump(meta, handle)
    return folder


def test_loader_reads_fine_labels_and_normalises(tmp_path: Path) -> None:
    write_fake_cifar100(tmp_path / "cifar-100-python")
    data = load_cifar100(tmp_path)
    assert data.num_classes == 100 and data.name == "cifar100"
    assert data.train_x.shape == (TRAIN, 3, 32, 32) and len(data.test_y) == TEST
    assert data.test_y.tolist() == [(3 * i + 7) % 100 for i in range(TEST)]
    label = int(data.train_y[0])
    expected = (torch.full((3,), label / 255.0) - torch.tensor(CIFAR100_MEAN)) / torch.tensor(
        CIFAR100_STD
    )
    torch.testing.assert_close(data.train_x[0, :, 0, 0], expected)


def test_fingerprint_follows_the_cifar100_files(tmp_path: Path) -> None:
    folder = write_fake_cifar100(tmp_path)
    before = check_cifar(tmp_path)
    assert before.fingerprint == check_cifar100(tmp_path).fingerprint
    assert "CIFAR-100" in before.description
    write_fake_cifar100(folder, train=TRAIN + 1)
    assert check_cifar(tmp_path).fingerprint != before.fingerprint


@pytest.mark.parametrize(
    ("name", "damage", "expected"),
    [
        ("test", lambda raw: raw[: len(raw) // 2], "does not unpickle"),
        ("meta", lambda raw: pickle.dumps({b"fine_label_names": [b"a"] * 20}), "fine_label_names"),
        ("train", lambda raw: b"", "does not unpickle"),
    ],
)
def test_damaged_cifar100_file_is_named(
    tmp_path: Path, name: str, damage: object, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = write_fake_cifar100(tmp_path / "cifar-100-python")
    path = folder / name
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]
    with pytest.raises(DataInvalidError, match=expected):
        check_cifar100(tmp_path)
    argv = ["run", "classify", "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and str(path) in lines[0] and expected in lines[0]


def test_incomplete_cifar100_folder_says_what_is_missing(tmp_path: Path) -> None:
    folder = write_fake_cifar100(tmp_path / "cifar-100-python")
    (folder / "test").unlink()
    with pytest.raises(DataInvalidError, match="test missing"):
        check_cifar(tmp_path)


def test_plans_the_paper_setting_with_100_classes(tmp_path: Path) -> None:
    write_fake_cifar100(tmp_path)
    task = TASKS["classify"]
    full = task.experiments(PlanOptions(quick=False, data_dir=tmp_path))
    assert [e.name for e in full] == ["cifar100-vgg11", "cifar100-resnet34", "cifar100-densenet121"]
    assert full[0].settings["epochs"] == 200 and full[0].settings["milestones"] == [150]
    assert full[0].settings["batch_size"] == 128 and full[0].paper_key == "cifar100/vgg11"
    assert task.preset_hparams(full[0], "adabelief")["eps"] == 1e-8
    quick = task.experiments(PlanOptions(quick=True, data_dir=tmp_path))
    assert [e.name for e in quick] == ["cifar100-vgg11"] and quick[0].settings["epochs"] == 2


def test_classify_data_runs_cifar100_end_to_end(tmp_path: Path) -> None:
    write_fake_cifar100(tmp_path / "data")
    out = tmp_path / "run"
    argv = ["run", "classify", "--data", str(tmp_path / "data"), "--quick", "--tiny"]
    argv += ["--seeds", "1", "--optimizers", "adabelief", "--out", str(out)]
    argv += ["--jobs", "1", "--threads", "1", "--no-progress", "--no-plots"]
    assert main(argv) == 0
    (record,) = json.loads((out / "results.json").read_text())
    assert record["experiment"] == "cifar100-vgg11"
    assert record["settings"]["dataset"] == "cifar100"
    assert record["settings"]["data_fingerprint"] == check_cifar(tmp_path / "data").fingerprint
    assert record["metrics"]["best_test_acc"] is not None
    report = (out / "report.md").read_text()
    assert "**Beside the paper** (VGG11 on CIFAR-100)" in report
    assert "the paper's CIFAR-100 numbers are not transcribed here" in report
