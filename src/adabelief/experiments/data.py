"""Datasets for the experiments: bundled ones (no download) and real ones read from ``--data``.

* digits: scikit-learn's bundled 8x8 handwritten digits (1,797 images).
* stdlib text: the source code of a fixed list of Python standard-library modules, as a
  character-level corpus (it ships with every Python installation).
* CIFAR-10: the "python version" pickles (``data_batch_1`` .. ``data_batch_5``, ``test_batch``),
  in ``DIR`` or ``DIR/cifar-10-batches-py``.
* Penn Treebank: ``ptb.train.txt``, ``ptb.valid.txt``, ``ptb.test.txt`` in ``DIR`` (or
  ``DIR/ptb``, ``DIR/penn``), one sentence per line as in Mikolov's release.

Data splits are fixed (they do not depend on the run's seed) so that runs with different seeds
and optimizers are paired on the same data.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CIFAR_FILES",
    "PTB_FILES",
    "STDLIB_MODULES",
    "ArrayDataset",
    "DataNotFoundError",
    "TextCorpus",
    "find_cifar_dir",
    "find_ptb_dir",
    "fixed_split",
    "load_cifar10",
    "load_digits",
    "load_ptb",
    "load_stdlib_text",
]

CIFAR_FILES: tuple[str, ...] = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
PTB_FILES: tuple[str, ...] = ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt")
#: Standard-library modules whose source forms the bundled character-level corpus.  They are
#: pure Python, exist in every supported version and change rarely; the corpus hash is recorded
#: with each run so that results from different Python versions are not mixed up silently.
STDLIB_MODULES: tuple[str, ...] = (
    "textwrap",
    "string",
    "heapq",
    "bisect",
    "fnmatch",
    "shlex",
    "calendar",
    "colorsys",
    "difflib",
    "queue",
    "sched",
    "fractions",
    "statistics",
    "ipaddress",
)
#: Seed of the fixed data splits (independent of the run seeds).
SPLIT_SEED = 20201020


class DataNotFoundError(ValueError):
    """A ``--data`` folder does not hold the files a task needs."""


@dataclass(frozen=True)
class ArrayDataset:
    """Images and labels as tensors, split into train / validation / test.

    ``validation`` is empty when no validation split was requested.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    name: str


@dataclass(frozen=True)
class TextCorpus:
    """A tokenised corpus: integer token streams and the vocabulary."""

    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    vocab: tuple[str, ...]
    name: str
    fingerprint: str


def fixed_split(n: int, fractions: tuple[float, ...], seed: int = SPLIT_SEED) -> list[np.ndarray]:
    """Shuffle ``range(n)`` with a fixed seed and cut it into consecutive parts of the given sizes.

    The last part takes whatever is left, so ``fractions`` need not sum to one.
    """
    order = np.random.default_rng(seed).permutation(n)
    parts: list[np.ndarray] = []
    start = 0
    for fraction in fractions[:-1]:
        stop = start + round(fraction * n)
        parts.append(order[start:stop])
        start = stop
    parts.append(order[start:])
    return parts


@functools.lru_cache(maxsize=2)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    return images, bunch.target.astype(np.int64)


def load_digits(validation_fraction: float = 0.0, test_fraction: float = 0.2) -> ArrayDataset:
    """scikit-learn's 8x8 digits as ``(N, 1, 8, 8)`` tensors in ``[0, 1]`` with fixed splits."""
    images, labels = _digits_arrays()
    test_idx, val_idx, train_idx = fixed_split(
        len(labels), (test_fraction, validation_fraction, 1.0)
    )

    def pick(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(images[idx].copy()), torch.from_numpy(labels[idx].copy())

    (trx, tr_y), (vx, vy), (tx, ty) = pick(train_idx), pick(val_idx), pick(test_idx)
    return ArrayDataset(trx, tr_y, vx, vy, tx, ty, 10, "digits")


def find_cifar_dir(data_dir: Path) -> Path:
    """The folder under ``data_dir`` holding the CIFAR-10 python pickles (raises if none)."""
    for candidate in (data_dir, data_dir / "cifar-10-batches-py"):
        if all((candidate / name).is_file() for name in CIFAR_FILES):
            return candidate
    raise DataNotFoundError(
        f"no CIFAR-10 python pickles in {data_dir} (expected {', '.join(CIFAR_FILES)} "
        "there or in its cifar-10-batches-py/ folder)"
    )


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with path.open("rb") as handle:
        # The official CIFAR-10 files are pickles; only point --data at files you trust.
        batch = pickle.load(handle, encoding="bytes")
    try:
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (KeyError, TypeError) as exc:
        raise DataNotFoundError(f"{path} is not a CIFAR-10 python batch ({exc})") from exc
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DataNotFoundError(f"{path} is not a CIFAR-10 python batch (shape {data.shape})")
    return data.reshape(-1, 3, 32, 32), labels


CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


def load_cifar10(
    data_dir: Path,
    validation_fraction: float = 0.0,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> ArrayDataset:
    """CIFAR-10 as normalised float tensors ``(N, 3, 32, 32)``.

    ``validation_fraction`` carves a validation split out of the training batches (fixed seed);
    ``train_limit`` / ``test_limit`` keep only the first examples (for quick runs).
    """
    folder = find_cifar_dir(data_dir)
    parts = [_read_cifar_batch(folder / name) for name in CIFAR_FILES[:5]]
    train_data = np.concatenate([p[0] for p in parts])
    train_labels = np.concatenate([p[1] for p in parts])
    test_data, test_labels = _read_cifar_batch(folder / "test_batch")
    if train_limit is not None:
        train_data, train_labels = train_data[:train_limit], train_labels[:train_limit]
    if test_limit is not None:
        test_data, test_labels = test_data[:test_limit], test_labels[:test_limit]
    val_idx, train_idx = fixed_split(len(train_labels), (validation_fraction, 1.0))
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)

    def to_tensor(data: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(data.astype(np.float32) / 255.0) - mean) / std

    return ArrayDataset(
        to_tensor(train_data[train_idx]),
        torch.from_numpy(train_labels[train_idx]),
        to_tensor(train_data[val_idx]),
        torch.from_numpy(train_labels[val_idx]),
        to_tensor(test_data),
        torch.from_numpy(test_labels),
        10,
        "cifar10",
    )


def find_ptb_dir(data_dir: Path) -> Path:
    """The folder under ``data_dir`` holding the Penn Treebank text files (raises if none)."""
    for candidate in (data_dir, data_dir / "ptb", data_dir / "penn"):
        if all((candidate / name).is_file() for name in PTB_FILES):
            return candidate
    raise DataNotFoundError(
        f"no Penn Treebank text files in {data_dir} (expected {', '.join(PTB_FILES)} "
        "there or in its ptb/ or penn/ folder)"
    )


def _fingerprint(*texts: str) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
    return digest.hexdigest()[:16]


def load_ptb(data_dir: Path, train_limit: int | None = None) -> TextCorpus:
    """Word-level Penn Treebank: each line's words followed by ``<eos>``.

    The vocabulary comes from the training file; a word seen only in valid/test maps to
    ``<unk>``.  ``train_limit`` keeps only the first tokens of the training stream.
    """
    folder = find_ptb_dir(data_dir)
    texts = [(folder / name).read_text(encoding="utf-8") for name in PTB_FILES]
    streams = [
        [w for line in text.splitlines() for w in [*line.split(), "<eos>"]] for text in texts
    ]
    vocab = sorted(set(streams[0]) | {"<unk>", "<eos>"})
    if len(streams[0]) < 2:
        raise DataNotFoundError(f"{folder / PTB_FILES[0]} holds too little text")
    index = {word: i for i, word in enumerate(vocab)}
    unk = index["<unk>"]

    def encode(words: list[str]) -> torch.Tensor:
        return torch.tensor([index.get(w, unk) for w in words], dtype=torch.long)

    train = encode(streams[0])
    if train_limit is not None:
        train = train[:train_limit]
    return TextCorpus(
        train, encode(streams[1]), encode(streams[2]), tuple(vocab), "ptb", _fingerprint(*texts)
    )


@functools.lru_cache(maxsize=1)
def _stdlib_source() -> str:
    pieces = []
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        try:
            pieces.append(inspect.getsource(module))
        except (OSError, TypeError) as exc:  # e.g. an installation without .py sources
            raise DataNotFoundError(
                f"cannot read the source of the standard-library module {name!r} ({exc}); "
                "the bundled text corpus needs the stdlib .py files"
            ) from exc
    return "\n".join(pieces)


def load_stdlib_text(max_chars: int | None = None) -> TextCorpus:
    """Character-level corpus from the source of :data:`STDLIB_MODULES` (split 90/5/5).

    ``max_chars`` keeps only the first characters (for quick runs); the split is contiguous so
    that held-out text is unseen text.
    """
    text = _stdlib_source()
    if max_chars is not None:
        text = text[:max_chars]
    vocab = tuple(sorted(set(text)))
    index = {ch: i for i, ch in enumerate(vocab)}
    ids = torch.tensor([index[ch] for ch in text], dtype=torch.long)
    n_train, n_valid = int(0.9 * len(ids)), int(0.05 * len(ids))
    return TextCorpus(
        ids[:n_train],
        ids[n_train : n_train + n_valid],
        ids[n_train + n_valid :],
        vocab,
        "stdlib-source",
        _fingerprint(text),
    )
