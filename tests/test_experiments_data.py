"""Dataset loaders: CIFAR-10 and Penn Treebank on tiny fake files, bundled datasets."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from adabelief.experiments.data import (
    CIFAR_FILES,
    CIFAR_MEAN,
    CIFAR_STD,
    DataNotFoundError,
    find_cifar_dir,
    find_ptb_dir,
    fixed_split,
    load_cifar10,
    load_digits,
    load_ptb,
    load_stdlib_text,
)

PER_BATCH = 6


def write_fake_cifar(folder: Path, per_batch: int = PER_BATCH) -> None:
    """Six pickles in CIFAR-10's python format; pixel value = batch index * 10 + label."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(CIFAR_FILES):
        labels = [(index + i) % 10 for i in range(per_batch)]
        data = np.zeros((per_batch, 3072), dtype=np.uint8)
        for row, label in enumerate(labels):
            data[row] = index * 10 + label
        with (folder / name).open("wb") as handle:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, handle)


def write_fake_ptb(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ptb.train.txt").write_text(" the cat sat \n the dog sat on the mat \n" * 20)
    (folder / "ptb.valid.txt").write_text(" the cat sat on the mat \n")
    (folder / "ptb.test.txt").write_text(" a dog sat \n" + " the cat sat on the mat \n" * 5)


def test_cifar_loader_reads_batches_in_order_and_normalises(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path / "cifar-10-batches-py")
    assert find_cifar_dir(tmp_path) == tmp_path / "cifar-10-batches-py"
    data = load_cifar10(tmp_path)
    assert data.train_x.shape == (5 * PER_BATCH, 3, 32, 32)
    assert data.test_x.shape == (PER_BATCH, 3, 32, 32)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert len(data.val_y) == 0
    # First test image: pixel value 50 + label, normalised per channel.
    expected = (
        torch.full((3,), (50 + int(data.test_y[0])) / 255.0) - torch.tensor(CIFAR_MEAN)
    ) / torch.tensor(CIFAR_STD)
    assert torch.allclose(data.test_x[0, :, 0, 0], expected, atol=1e-6)
    assert sorted(data.test_y.tolist()) == sorted((5 + i) % 10 for i in range(PER_BATCH))


def test_cifar_validation_split_and_limits(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path)
    data = load_cifar10(tmp_path, validation_fraction=0.2, train_limit=20, test_limit=4)
    assert len(data.val_y) == 4 and len(data.train_y) == 16 and len(data.test_y) == 4
    again = load_cifar10(tmp_path, validation_fraction=0.2, train_limit=20, test_limit=4)
    assert torch.equal(data.val_y, again.val_y)


def test_cifar_missing_or_broken_files(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="data_batch_1"):
        find_cifar_dir(tmp_path)
    write_fake_cifar(tmp_path)
    (tmp_path / "test_batch").unlink()
    with pytest.raises(DataNotFoundError, match="no CIFAR-10"):
        load_cifar10(tmp_path)
    with (tmp_path / "test_batch").open("wb") as handle:
        pickle.dump({b"nothing": 1}, handle)
    with pytest.raises(DataNotFoundError, match="not a CIFAR-10"):
        load_cifar10(tmp_path)


def test_ptb_loader(tmp_path: Path) -> None:
    write_fake_ptb(tmp_path / "penn")
    assert find_ptb_dir(tmp_path) == tmp_path / "penn"
    corpus = load_ptb(tmp_path)
    vocab = list(corpus.vocab)
    assert "<eos>" in vocab and "<unk>" in vocab
    assert len(corpus.train) == 20 * (4 + 7)
    assert [vocab[i] for i in corpus.valid.tolist()] == [
        "the",
        "cat",
        "sat",
        "on",
        "the",
        "mat",
        "<eos>",
    ]
    # "a" never occurs in training text: it maps to <unk>.
    assert [vocab[i] for i in corpus.test.tolist()[:4]] == ["<unk>", "dog", "sat", "<eos>"]
    assert len(load_ptb(tmp_path, train_limit=10).train) == 10


def test_ptb_missing_files(tmp_path: Path) -> None:
    write_fake_ptb(tmp_path)
    (tmp_path / "ptb.valid.txt").unlink()
    with pytest.raises(DataNotFoundError, match=r"ptb\.valid\.txt"):
        find_ptb_dir(tmp_path)


def test_stdlib_corpus_is_deterministic_and_split() -> None:
    a, b = load_stdlib_text(20_000), load_stdlib_text(20_000)
    assert a.fingerprint == b.fingerprint and torch.equal(a.train, b.train)
    total = len(a.train) + len(a.valid) + len(a.test)
    assert total == 20_000
    assert len(a.train) == 18_000 and len(a.valid) == 1_000
    assert int(a.train.max()) < len(a.vocab)
    assert load_stdlib_text(10_000).fingerprint != a.fingerprint


def test_digits_splits_are_fixed_and_disjoint() -> None:
    data = load_digits(validation_fraction=0.1)
    assert data.train_x.shape[1:] == (1, 8, 8)
    assert float(data.train_x.max()) <= 1.0
    total = len(data.train_y) + len(data.val_y) + len(data.test_y)
    assert total == 1797
    parts = fixed_split(1797, (0.2, 0.1, 1.0))
    assert len(set(np.concatenate(parts).tolist())) == 1797
    assert torch.equal(load_digits(0.1).test_y, data.test_y)
