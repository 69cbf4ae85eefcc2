"""Datasets for the experiments: bundled ones (no download) and real ones read from ``--data``.

* digits: scikit-learn's bundled 8x8 handwritten digits (1,797 images).
* stdlib text: the source code of a fixed list of Python standard-library modules, as a
  character-level corpus (it ships with every Python installation).
* CIFAR-10: the "python version" pickles (``data_batch_1`` .. ``data_batch_5``, ``test_batch``),
  in ``DIR`` or ``DIR/cifar-10-batches-py``.
* CIFAR-100: the "python version" pickles ``train``, ``test`` and ``meta`` in ``DIR`` or
  ``DIR/cifar-100-python``; the 100 fine labels.
* Penn Treebank: ``ptb.train.txt``, ``ptb.valid.txt``, ``ptb.test.txt`` in ``DIR`` (or
  ``DIR/ptb``, ``DIR/penn``), one sentence per line as in Mikolov's release.
* Python documentation text: the help topics of ``pydoc_data.topics`` (the text of Python's
  language reference that ``help()`` shows; it ships with Python), as a character-level corpus.
* WikiText-2: ``wiki.train.tokens``, ``wiki.valid.tokens``, ``wiki.test.tokens`` (the tokenised
  release) in ``DIR`` or ``DIR/wikitext-2``, word level.

Data splits are fixed (they do not depend on the run's seed) so that runs with different seeds
and optimizers are paired on the same data.

Real datasets are validated before any training (:func:`check_cifar10`,
:func:`check_cifar100`, :func:`check_ptb`, :func:`check_wikitext`): every file is read completely, and a corrupt, truncated, binary or
too small file raises :class:`DataInvalidError` naming it.  The check returns a
:class:`DataCheck` whose ``fingerprint`` (SHA-256 of the files' names and bytes) becomes part of
every run's identity, so changed files are never served stale runs.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CIFAR100_FILES",
    "CIFAR_FILES",
    "MIN_EVAL_TOKENS",
    "MIN_TRAIN_TOKENS",
    "PTB_FILES",
    "STDLIB_MODULES",
    "WIKITEXT_FILES",
    "ArrayDataset",
    "DataCheck",
    "DataInvalidError",
    "DataNotFoundError",
    "TextCorpus",
    "check_cifar",
    "check_cifar10",
    "check_cifar100",
    "check_ptb",
    "check_wikitext",
    "cifar_datasets_in",
    "find_cifar100_dir",
    "find_cifar_dir",
    "find_ptb_dir",
    "find_wikitext_dir",
    "fingerprint_files",
    "fixed_split",
    "load_cifar",
    "load_cifar10",
    "load_cifar10_pixels",
    "load_cifar100",
    "load_digits",
    "load_ptb",
    "load_python_docs",
    "load_stdlib_text",
    "load_wikitext",
    "read_cifar100_meta",
    "read_cifar_batch",
    "read_text_file",
]

CIFAR_FILES: tuple[str, ...] = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
CIFAR100_FILES: tuple[str, ...] = ("train", "test", "meta")
CIFAR100_CLASSES = 100
PTB_FILES: tuple[str, ...] = ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt")
WIKITEXT_FILES: tuple[str, ...] = ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens")
#: Smallest word-level text files accepted: a training file with fewer tokens cannot fill the
#: batches, and held-out files with fewer give no meaningful perplexity.
MIN_TRAIN_TOKENS, MIN_EVAL_TOKENS = 1000, 100
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
    """A ``--data`` folder does not hold the files a task needs, or one of them is unusable."""


class DataInvalidError(DataNotFoundError):
    """A data file is there but unusable (corrupt, truncated, binary, too small)."""


@dataclass(frozen=True)
class DataCheck:
    """A validated dataset: what it is, its files, and a fingerprint of their contents."""

    description: str
    files: tuple[Path, ...]
    fingerprint: str


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint_files(files: Sequence[Path]) -> str:
    """SHA-256 (16 hex digits) over the files' names and contents, in the given order.

    A file's digest is cached per process by path, size and modification time.
    """
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(path.name.encode() + b"\0")
        digest.update(_file_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns).encode())
    return digest.hexdigest()[:16]


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
    """The folder under ``data_dir`` holding the CIFAR-10 python pickles (raises if none).

    A ``cifar-10-batches-py/`` folder, or a folder with some of the batches, that lacks others
    is an incomplete copy: :class:`DataInvalidError` naming what is missing (never skipped
    silently, also when CIFAR-100 is beside it).
    """
    subfolder = data_dir / "cifar-10-batches-py"
    for candidate in (data_dir, subfolder):
        if all((candidate / name).is_file() for name in CIFAR_FILES):
            return candidate
    for candidate in (subfolder, data_dir):
        present = [name for name in CIFAR_FILES if (candidate / name).is_file()]
        if candidate.is_dir() and (candidate == subfolder or present):
            absent = [name for name in CIFAR_FILES if name not in present]
            raise DataInvalidError(
                f"incomplete CIFAR-10 in {candidate}: {', '.join(absent)} missing"
            )
    raise DataNotFoundError(
        f"no CIFAR-10 python pickles in {data_dir} (expected {', '.join(CIFAR_FILES)} "
        "there or in its cifar-10-batches-py/ folder)"
    )


def read_cifar_batch(
    path: Path, label_key: bytes = b"labels", classes: int = 10, dataset: str = "CIFAR-10"
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels of one CIFAR python batch, validated.

    ``label_key`` / ``classes`` select the labels (CIFAR-10: ``b"labels"``, 10 classes).  A file
    that does not unpickle (corrupt, truncated), lacks the keys, has another shape, or has labels
    outside ``[0, classes)`` raises :class:`DataInvalidError` naming it.
    """
    what = f"{path} is not a {dataset} python batch"
    try:
        with path.open("rb") as handle:
            # The official CIFAR files are pickles; only point --data at files you trust.
            batch = pickle.load(handle, encoding="bytes")
    except OSError as exc:
        raise DataInvalidError(f"cannot read {path} ({exc.strerror or exc})") from None
    except Exception as exc:
        raise DataInvalidError(f"{what} (it does not unpickle: {type(exc).__name__})") from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise DataInvalidError(f"{what} (no {b'data'!r} and {label_key!r} entries)")
    try:
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[label_key])
    except (TypeError, ValueError) as exc:
        raise DataInvalidError(f"{what} ({exc})") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataInvalidError(f"{what} (data of shape {data.shape} and type {data.dtype})")
    if labels.ndim != 1 or len(labels) != len(data) or len(data) == 0:
        raise DataInvalidError(f"{what} ({len(data)} images, labels of shape {labels.shape})")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= classes:
        raise DataInvalidError(f"{what} (labels outside 0..{classes - 1})")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def check_cifar10(data_dir: Path) -> DataCheck:
    """Find and validate the CIFAR-10 batches in ``data_dir`` (every file is read)."""
    folder = find_cifar_dir(data_dir)
    files = tuple(folder / name for name in CIFAR_FILES)
    for path in files:
        read_cifar_batch(path)
    return DataCheck(f"CIFAR-10 in {folder}", files, fingerprint_files(files))


def find_cifar100_dir(data_dir: Path) -> Path:
    """The folder under ``data_dir`` holding the CIFAR-100 python pickles (raises if none).

    A ``cifar-100-python/`` folder, or a ``meta`` file, with some of ``train``, ``test``,
    ``meta`` missing is an incomplete copy: :class:`DataInvalidError` naming what is missing.
    """
    subfolder = data_dir / "cifar-100-python"
    for candidate in (data_dir, subfolder):
        if all((candidate / name).is_file() for name in CIFAR100_FILES):
            return candidate
    for candidate in (subfolder, data_dir):
        if candidate.is_dir() and (candidate == subfolder or (candidate / "meta").is_file()):
            absent = [name for name in CIFAR100_FILES if not (candidate / name).is_file()]
            raise DataInvalidError(
                f"incomplete CIFAR-100 in {candidate}: {', '.join(absent)} missing"
            )
    raise DataNotFoundError(
        f"no CIFAR-100 python pickles in {data_dir} (expected {', '.join(CIFAR100_FILES)} "
        "there or in its cifar-100-python/ folder)"
    )


def read_cifar100_meta(path: Path) -> tuple[str, ...]:
    """The 100 fine label names of CIFAR-100's ``meta`` pickle, validated.

    A file that does not unpickle or lacks 100 ``fine_label_names`` raises
    :class:`DataInvalidError` naming it.
    """
    what = f"{path} is not CIFAR-100's meta file"
    try:
        with path.open("rb") as handle:
            meta = pickle.load(handle, encoding="bytes")
    except OSError as exc:
        raise DataInvalidError(f"cannot read {path} ({exc.strerror or exc})") from None
    except Exception as exc:
        raise DataInvalidError(f"{what} (it does not unpickle: {type(exc).__name__})") from None
    names = meta.get(b"fine_label_names") if isinstance(meta, dict) else None
    if not isinstance(names, (list, tuple)) or len(names) != CIFAR100_CLASSES:
        found = "none" if names is None else f"{len(names) if hasattr(names, '__len__') else '?'}"
        raise DataInvalidError(f"{what} ({found} fine_label_names, expected {CIFAR100_CLASSES})")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def _read_cifar100(path: Path) -> tuple[np.ndarray, np.ndarray]:
    return read_cifar_batch(path, b"fine_labels", CIFAR100_CLASSES, "CIFAR-100")


def check_cifar100(data_dir: Path) -> DataCheck:
    """Find and validate the CIFAR-100 pickles in ``data_dir`` (every file is read)."""
    folder = find_cifar100_dir(data_dir)
    files = tuple(folder / name for name in CIFAR100_FILES)
    _read_cifar100(files[0])
    _read_cifar100(files[1])
    read_cifar100_meta(files[2])
    return DataCheck(f"CIFAR-100 in {folder}", files, fingerprint_files(files))


_CIFAR_CHECKS = {"cifar10": check_cifar10, "cifar100": check_cifar100}


def cifar_datasets_in(data_dir: Path) -> list[str]:
    """Which of ``"cifar10"``, ``"cifar100"`` have all their files in ``data_dir`` (no reading)."""
    found = []
    for name, find in (("cifar10", find_cifar_dir), ("cifar100", find_cifar100_dir)):
        try:
            find(data_dir)
        except DataNotFoundError:
            continue
        found.append(name)
    return found


def check_cifar(data_dir: Path) -> DataCheck:
    """Validate every CIFAR dataset (CIFAR-10, CIFAR-100) in ``data_dir``; one must be there.

    The fingerprint covers the files of all datasets found.  A dataset whose files are there but
    unusable raises :class:`DataInvalidError` even when the other one is fine.
    """
    checks: list[DataCheck] = []
    missing: list[str] = []
    for check in _CIFAR_CHECKS.values():
        try:
            checks.append(check(data_dir))
        except DataInvalidError:
            raise
        except DataNotFoundError as exc:
            missing.append(str(exc))
    if not checks:
        raise DataNotFoundError("; ".join(missing))
    files = tuple(path for check in checks for path in check.files)
    return DataCheck(
        " and ".join(check.description for check in checks), files, fingerprint_files(files)
    )


CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
#: Per-channel mean and standard deviation of the CIFAR-100 training images.
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def _cifar_dataset(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    normalisation: tuple[tuple[float, ...], tuple[float, ...]],
    num_classes: int,
    name: str,
    validation_fraction: float,
    train_limit: int | None,
    test_limit: int | None,
) -> ArrayDataset:
    """``(pixels / 255 - mean) / std`` tensors with a fixed validation split and limits."""
    train_data, train_labels = train
    test_data, test_labels = test
    if train_limit is not None:
        train_data, train_labels = train_data[:train_limit], train_labels[:train_limit]
    if test_limit is not None:
        test_data, test_labels = test_data[:test_limit], test_labels[:test_limit]
    val_idx, train_idx = fixed_split(len(train_labels), (validation_fraction, 1.0))
    mean = torch.tensor(normalisation[0]).view(1, 3, 1, 1)
    std = torch.tensor(normalisation[1]).view(1, 3, 1, 1)

    def to_tensor(data: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(data.astype(np.float32) / 255.0) - mean) / std

    return ArrayDataset(
        to_tensor(train_data[train_idx]),
        torch.from_numpy(train_labels[train_idx]),
        to_tensor(train_data[val_idx]),
        torch.from_numpy(train_labels[val_idx]),
        to_tensor(test_data),
        torch.from_numpy(test_labels),
        num_classes,
        name,
    )


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
    train_pixels, train_labels, test_pixels, test_labels = load_cifar10_pixels(data_dir)
    return _cifar_dataset(
        (train_pixels, train_labels),
        (test_pixels, test_labels),
        (CIFAR_MEAN, CIFAR_STD),
        10,
        "cifar10",
        validation_fraction,
        train_limit,
        test_limit,
    )


def load_cifar10_pixels(data_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CIFAR-10's raw ``uint8`` pixels ``(N, 3, 32, 32)`` and labels: ``(train, train labels,
    test, test labels)``, training batches in order (what GANs and FID read)."""
    folder = find_cifar_dir(data_dir)
    parts = [read_cifar_batch(folder / name) for name in CIFAR_FILES[:5]]
    test, test_labels = read_cifar_batch(folder / "test_batch")
    return (
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
        test,
        test_labels,
    )


def load_cifar100(
    data_dir: Path,
    validation_fraction: float = 0.0,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> ArrayDataset:
    """CIFAR-100 (fine labels, 100 classes) as normalised float tensors ``(N, 3, 32, 32)``.

    Arguments as for :func:`load_cifar10`.
    """
    folder = find_cifar100_dir(data_dir)
    return _cifar_dataset(
        _read_cifar100(folder / "train"),
        _read_cifar100(folder / "test"),
        (CIFAR100_MEAN, CIFAR100_STD),
        CIFAR100_CLASSES,
        "cifar100",
        validation_fraction,
        train_limit,
        test_limit,
    )


def load_cifar(
    dataset: str,
    data_dir: Path,
    validation_fraction: float = 0.0,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> ArrayDataset:
    """``load_cifar10`` or ``load_cifar100`` by name (``"cifar10"`` / ``"cifar100"``)."""
    loaders = {"cifar10": load_cifar10, "cifar100": load_cifar100}
    if dataset not in loaders:
        raise ValueError(f"unknown CIFAR dataset {dataset!r}; known: {', '.join(loaders)}")
    return loaders[dataset](data_dir, validation_fraction, train_limit, test_limit)


def _find_text_dir(
    data_dir: Path, names: tuple[str, ...], subfolders: tuple[str, ...], dataset: str
) -> Path:
    for candidate in (data_dir, *(data_dir / sub for sub in subfolders)):
        if all((candidate / name).is_file() for name in names):
            return candidate
    where = " or ".join(f"{sub}/" for sub in subfolders)
    raise DataNotFoundError(
        f"no {dataset} text files in {data_dir} (expected {', '.join(names)} "
        f"there or in its {where} folder)"
    )


def find_ptb_dir(data_dir: Path) -> Path:
    """The folder under ``data_dir`` holding the Penn Treebank text files (raises if none)."""
    return _find_text_dir(data_dir, PTB_FILES, ("ptb", "penn"), "Penn Treebank")


def find_wikitext_dir(data_dir: Path) -> Path:
    """The folder under ``data_dir`` holding the WikiText-2 token files (raises if none)."""
    return _find_text_dir(data_dir, WIKITEXT_FILES, ("wikitext-2",), "WikiText-2")


def read_text_file(path: Path, min_tokens: int) -> str:
    """A UTF-8 text file with at least ``min_tokens`` whitespace-separated words, or raise.

    Binary files (NUL bytes), invalid UTF-8 and files with too few words raise
    :class:`DataInvalidError` naming the file.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataInvalidError(f"cannot read {path} ({exc.strerror or exc})") from None
    if b"\0" in raw:
        raise DataInvalidError(f"{path} is a binary file, not text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataInvalidError(
            f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason})"
        ) from None
    words = len(text.split())
    if words < min_tokens:
        raise DataInvalidError(f"{path} holds {words} words; at least {min_tokens} are needed")
    return text


def _check_text_files(folder: Path, names: tuple[str, ...], dataset: str) -> DataCheck:
    files = tuple(folder / name for name in names)
    for index, path in enumerate(files):
        read_text_file(path, MIN_TRAIN_TOKENS if index == 0 else MIN_EVAL_TOKENS)
    return DataCheck(f"{dataset} in {folder}", files, fingerprint_files(files))


def check_ptb(data_dir: Path) -> DataCheck:
    """Find and validate the Penn Treebank files in ``data_dir``."""
    return _check_text_files(find_ptb_dir(data_dir), PTB_FILES, "Penn Treebank")


def check_wikitext(data_dir: Path) -> DataCheck:
    """Find and validate the WikiText-2 files in ``data_dir``."""
    return _check_text_files(find_wikitext_dir(data_dir), WIKITEXT_FILES, "WikiText-2")


def _fingerprint(*texts: str) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
    return digest.hexdigest()[:16]


def _word_corpus(
    folder: Path, names: tuple[str, ...], name: str, train_limit: int | None
) -> TextCorpus:
    """Word-level corpus: each non-empty line's words followed by ``<eos>``.

    The vocabulary comes from the training file; a word seen only in valid/test maps to
    ``<unk>``.  ``train_limit`` keeps only the first tokens of the training stream.
    """
    texts = [
        read_text_file(folder / file, MIN_TRAIN_TOKENS if i == 0 else MIN_EVAL_TOKENS)
        for i, file in enumerate(names)
    ]
    streams = [
        [w for line in text.splitlines() if line.split() for w in [*line.split(), "<eos>"]]
        for text in texts
    ]
    vocab = sorted(set(streams[0]) | {"<unk>", "<eos>"})
    index = {word: i for i, word in enumerate(vocab)}
    unk = index["<unk>"]

    def encode(words: list[str]) -> torch.Tensor:
        return torch.tensor([index.get(w, unk) for w in words], dtype=torch.long)

    train = encode(streams[0])
    if train_limit is not None:
        train = train[:train_limit]
    return TextCorpus(
        train, encode(streams[1]), encode(streams[2]), tuple(vocab), name, _fingerprint(*texts)
    )


def load_ptb(data_dir: Path, train_limit: int | None = None) -> TextCorpus:
    """Word-level Penn Treebank (see :func:`_word_corpus`)."""
    return _word_corpus(find_ptb_dir(data_dir), PTB_FILES, "ptb", train_limit)


def load_wikitext(data_dir: Path, train_limit: int | None = None) -> TextCorpus:
    """Word-level WikiText-2 from its ``.tokens`` files (already tokenised, ``<unk>`` included)."""
    return _word_corpus(find_wikitext_dir(data_dir), WIKITEXT_FILES, "wikitext", train_limit)


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


@functools.lru_cache(maxsize=1)
def _python_docs() -> str:
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions split pydoc_data into another package
        raise DataNotFoundError(
            f"this Python has no pydoc_data module ({exc}); the bundled Transformer corpus "
            "needs it (it is part of the standard library)"
        ) from None
    return "\n\n".join(topics[name].strip() for name in sorted(topics))


def load_python_docs(max_chars: int | None = None) -> TextCorpus:
    """Character-level corpus from Python's help topics (``pydoc_data.topics``), split 90/5/5."""
    return _char_corpus(_python_docs(), max_chars, "python-docs")


def load_stdlib_text(max_chars: int | None = None) -> TextCorpus:
    """Character-level corpus from the source of :data:`STDLIB_MODULES` (split 90/5/5)."""
    return _char_corpus(_stdlib_source(), max_chars, "stdlib-source")


def _char_corpus(text: str, max_chars: int | None, name: str) -> TextCorpus:
    """Characters as tokens, split 90/5/5 contiguously so that held-out text is unseen text.

    ``max_chars`` keeps only the first characters (for quick runs).
    """
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
        name,
        _fingerprint(text),
    )
