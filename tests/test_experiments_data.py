"""Dataset loaders and validation: CIFAR-10, Penn Treebank and WikiText-2 on small fake files
written in the real formats, the bundled datasets, and the data fingerprint."""

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
    WIKITEXT_FILES,
    DataInvalidError,
    DataNotFoundError,
    check_cifar10,
    check_ptb,
    check_wikitext,
    find_cifar_dir,
    find_ptb_dir,
    fixed_split,
    load_cifar10,
    load_digits,
    load_ptb,
    load_python_docs,
    load_stdlib_text,
    load_wikitext,
)

PER_BATCH = 6
#: Repetitions of the fake PTB lines: enough words to pass the size check (1000 / 100 words).
PTB_TRAIN_REPEATS, PTB_EVAL_REPEATS = 120, 20


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
    """Penn Treebank's format: one sentence per line, words separated by spaces."""
    folder.mkdir(parents=True, exist_ok=True)
    train = " the cat sat \n the dog sat on the mat \n" * PTB_TRAIN_REPEATS
    (folder / "ptb.train.txt").write_text(train)
    (folder / "ptb.valid.txt").write_text(" the cat sat on the mat \n" * PTB_EVAL_REPEATS)
    test = " a dog sat \n" + " the cat sat on the mat \n" * PTB_EVAL_REPEATS
    (folder / "ptb.test.txt").write_text(test)


def write_fake_wikitext(folder: Path) -> None:
    """WikiText's ``.tokens`` format: headings, blank lines, tokenised sentences."""
    folder.mkdir(parents=True, exist_ok=True)
    article = " = Cats = \n \n The cat sat on the mat . It was a good cat @-@ like cat . \n \n"
    for name, repeats in zip(WIKITEXT_FILES, (80, 12, 12), strict=True):
        (folder / name).write_text(article * repeats)


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
    with pytest.raises(DataInvalidError, match=r"incomplete CIFAR-10 in .*: test_batch missing"):
        load_cifar10(tmp_path)
    with (tmp_path / "test_batch").open("wb") as handle:
        pickle.dump({b"nothing": 1}, handle)
    with pytest.raises(DataNotFoundError, match="not a CIFAR-10"):
        load_cifar10(tmp_path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(b"this is not a pickle at all"), "does not unpickle"),
        (lambda p: p.write_bytes(p.read_bytes()[:100]), "does not unpickle"),
        (lambda p: p.write_bytes(b""), "does not unpickle"),
        (
            lambda p: pickle.dump(
                {b"data": np.zeros((4, 10), np.uint8), b"labels": [0] * 4}, p.open("wb")
            ),
            "shape",
        ),
        (
            lambda p: pickle.dump(
                {b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 12]}, p.open("wb")
            ),
            "labels outside 0..9",
        ),
        (lambda p: pickle.dump([1, 2, 3], p.open("wb")), "no b'data'"),
    ],
)
def test_corrupt_cifar_files_are_named_before_training(
    tmp_path: Path, damage: object, message: str
) -> None:
    write_fake_cifar(tmp_path)
    damage(tmp_path / "data_batch_3")  # type: ignore[operator]
    with pytest.raises(DataNotFoundError, match=message) as info:
        check_cifar10(tmp_path)
    assert "data_batch_3" in str(info.value)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("ptb.train.txt", b"\x00\x01\x02binary\xff" * 500, "binary"),
        ("ptb.test.txt", b"caf\xe9 " * 500, "not UTF-8"),
        ("ptb.train.txt", b"too few words here\n", "holds 4 words"),
        ("ptb.valid.txt", b"", "holds 0 words"),
    ],
)
def test_bad_ptb_files_are_named(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    write_fake_ptb(tmp_path)
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataNotFoundError, match=message) as info:
        check_ptb(tmp_path)
    assert name in str(info.value)


def test_fingerprint_follows_the_file_contents(tmp_path: Path) -> None:
    write_fake_ptb(tmp_path)
    first = check_ptb(tmp_path)
    assert first.fingerprint == check_ptb(tmp_path).fingerprint
    assert first.files[0].name == "ptb.train.txt" and "Penn Treebank" in first.description
    path = tmp_path / "ptb.test.txt"
    path.write_text(path.read_text() + " one more line \n")
    assert check_ptb(tmp_path).fingerprint != first.fingerprint
    write_fake_cifar(tmp_path / "c")
    cifar = check_cifar10(tmp_path / "c")
    with (tmp_path / "c" / "data_batch_1").open("wb") as handle:
        labels = [1] * PER_BATCH
        pickle.dump({b"data": np.ones((PER_BATCH, 3072), np.uint8), b"labels": labels}, handle)
    assert check_cifar10(tmp_path / "c").fingerprint != cifar.fingerprint


def test_wikitext_loader(tmp_path: Path) -> None:
    write_fake_wikitext(tmp_path / "wikitext-2")
    check = check_wikitext(tmp_path)
    assert check.files[0].parent == tmp_path / "wikitext-2"
    corpus = load_wikitext(tmp_path)
    vocab = list(corpus.vocab)
    assert "<eos>" in vocab and "@-@" in vocab and "cat" in vocab
    assert "" not in vocab  # blank lines add no tokens
    assert len(corpus.valid) > 100 and corpus.name == "wikitext"
    with pytest.raises(DataNotFoundError, match=r"wiki\.train\.tokens"):
        check_wikitext(tmp_path / "nothing")


def test_python_docs_corpus_ships_with_python() -> None:
    corpus = load_python_docs(50_000)
    assert len(corpus.train) + len(corpus.valid) + len(corpus.test) == 50_000
    text = "".join(corpus.vocab[i] for i in corpus.train[:2000].tolist())
    assert " the " in text  # English prose, not code
    assert load_python_docs(50_000).fingerprint == corpus.fingerprint


def test_ptb_loader(tmp_path: Path) -> None:
    write_fake_ptb(tmp_path / "penn")
    assert find_ptb_dir(tmp_path) == tmp_path / "penn"
    corpus = load_ptb(tmp_path)
    vocab = list(corpus.vocab)
    assert "<eos>" in vocab and "<unk>" in vocab
    assert len(corpus.train) == PTB_TRAIN_REPEATS * (4 + 7)
    assert [vocab[i] for i in corpus.valid.tolist()[:7]] == [
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
    assert len(corpus.valid) == PTB_EVAL_REPEATS * 7


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
