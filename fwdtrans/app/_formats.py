"""The official distribution formats of the paper's data sets, read into plain ``Splits`` that
``fwdtrans.app._datasets`` wraps into an ``ImageDataset``.

``DATA_DIR`` below is the ``data_dir`` given to ``load_dataset``; the formats read are:

- ``cifar10``: the official python version, ``DATA_DIR/cifar-10-batches-py/{data_batch_1..5, test_batch,
  batches.meta}`` or those files directly in ``DATA_DIR``: pickled dicts whose ``data`` is an (N, 3072) uint8
  array, each row an image's 1024 red values, then its green, then its blue ones, each plane row by row;
  ``labels`` run from 0 to 9 and ``batches.meta`` holds the ``label_names``.
- ``cifar100``: the official python version, ``DATA_DIR/cifar-100-python/{train, test, meta}`` or those files
  directly in ``DATA_DIR``: rows as for CIFAR-10, the 100 ``fine_labels``, and ``fine_label_names`` in ``meta``.
- ``fashion-mnist``: the four official idx files, ``{train, t10k}-images-idx3-ubyte`` and
  ``{train, t10k}-labels-idx1-ubyte``, each plain or gzipped (``.gz``; the plain file is read when both exist), in
  ``DATA_DIR/fashion-mnist/``, else in ``DATA_DIR/FashionMNIST/raw/`` (where torchvision, used by the paper's
  code, downloads them), else directly in ``DATA_DIR``. An idx file is a big-endian uint32 magic number (2051 for
  images, with 3 dimensions; 2049 for labels, with 1), one big-endian uint32 size per dimension, then the uint8
  values in row-major order.
- ``imagenet32``: the npz batches of the downsampled ImageNet (Chrabaszcz et al., 2017),
  ``DATA_DIR/Imagenet32_train_npz/train_data_batch_{1..10}.npz`` and ``DATA_DIR/Imagenet32_val_npz/val_data.npz``,
  or those files directly in ``DATA_DIR``: ``data`` holds rows laid out as in CIFAR and ``labels`` run from 1 to
  1000. The official validation set is the test split. Class names come from ``DATA_DIR/map_clsloc.txt`` (lines
  such as ``n02119789 1 kit_fox``) when it exists, else they are ``class_0`` to ``class_999``.

The CIFAR files are unpickled, which can run code: use only trusted copies.
"""

import gzip
import math
import pickle
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from .._errors import FwdTransError

_FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                    "Ankle boot")
_FASHION_SIZE = (28, 28)
_FASHION_SUBFOLDERS = ("fashion-mnist", "FashionMNIST/raw")
_FASHION_SPLITS = (("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                   ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))
FASHION_LAYOUT = ("DATA_DIR/{train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                  "t10k-labels-idx1-ubyte}, each plain or gzipped (.gz), in DATA_DIR/fashion-mnist/, "
                  "DATA_DIR/FashionMNIST/raw/ or DATA_DIR itself, as distributed at "
                  "https://github.com/zalandoresearch/fashion-mnist")

_IMAGENET32_CLASSES = 1000
_IMAGENET32_TRAIN_DIR = "Imagenet32_train_npz"
_IMAGENET32_TRAIN = tuple(f"train_data_batch_{i}.npz" for i in range(1, 11))
_IMAGENET32_VAL_DIR = "Imagenet32_val_npz"
_IMAGENET32_VAL = "val_data.npz"
_IMAGENET32_NAMES = "map_clsloc.txt"
IMAGENET32_LAYOUT = ("DATA_DIR/Imagenet32_train_npz/train_data_batch_{1..10}.npz and "
                     "DATA_DIR/Imagenet32_val_npz/val_data.npz (or those files directly in DATA_DIR), as unzipped "
                     "from Imagenet32_train_npz.zip and Imagenet32_val_npz.zip (https://image-net.org/download-images,"
                     " downsampled 32x32), with optional class names in DATA_DIR/map_clsloc.txt")
_NPZ_KEYS = ("data", "labels")

_ROW = 3 * 32 * 32  # bytes per CIFAR or ImageNet32 image


class Splits(NamedTuple):
    """A data set's two splits and class names, as read from its files: the first fields of an ``ImageDataset``.

    Attributes:
        train_x: Training images, uint8, shape (N, C, H, W).
        train_y: Training labels, int64, shape (N,), each in ``range(len(classes))``.
        test_x: Test images, uint8, shape (M, C, H, W).
        test_y: Test labels, int64, shape (M,).
        classes: Class names, indexed by label.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]


# --- CIFAR-10 and CIFAR-100 -----------------------------------------------------------------------


@dataclass(frozen=True)
class _CifarVersion:
    """Where an official CIFAR python version keeps its data, and under which keys."""

    title: str
    folder: str
    train: tuple[str, ...]
    test: str
    meta: str
    label_key: str
    names_key: str
    num_classes: int
    layout: str


CIFAR10 = _CifarVersion(
    "CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
    "batches.meta", "labels", "label_names", 10,
    "DATA_DIR/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} (or DATA_DIR being "
    "cifar-10-batches-py itself), as unpacked from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz")
CIFAR100 = _CifarVersion(
    "CIFAR-100", "cifar-100-python", ("train",), "test", "meta", "fine_labels", "fine_label_names", 100,
    "DATA_DIR/cifar-100-python/{train, test, meta} (or DATA_DIR being cifar-100-python itself), as unpacked from "
    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz")


def read_cifar(version: _CifarVersion, data_dir: Path) -> Splits:
    """Read an official CIFAR python version from ``data_dir`` or its subfolder ``version.folder``."""
    folder = _subfolder(data_dir, (version.folder,))
    missing = [name for name in (*version.train, version.test, version.meta) if not (folder / name).is_file()]
    if missing:
        raise _missing(version.title, folder, missing, version.layout)
    meta_path = folder / version.meta
    names = _field(_unpickle(meta_path, version.layout), version.names_key, meta_path, version.layout)
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    if len(classes) != version.num_classes:
        raise FwdTransError(f"{meta_path} names {len(classes)} classes; expected {version.num_classes}: "
                            f"{version.layout}")
    train = [_read_cifar_batch(folder / name, version) for name in version.train]
    test = _read_cifar_batch(folder / version.test, version)
    return Splits(
        train_x=_images([rows for rows, _ in train]),
        train_y=torch.from_numpy(np.concatenate([labels for _, labels in train])),
        test_x=_images([test[0]]),
        test_y=torch.from_numpy(test[1]),
        classes=classes,
    )


def _read_cifar_batch(path: Path, version: _CifarVersion) -> tuple[np.ndarray, np.ndarray]:
    """Read one pickled batch into its (N, 3072) uint8 rows and int64 labels."""
    entry = _unpickle(path, version.layout)
    labels = _labels(_field(entry, version.label_key, path, version.layout), version.num_classes, 0, path,
                     version.layout)
    return _rows(_field(entry, "data", path, version.layout), len(labels), path, version.layout), labels


def _unpickle(path: Path, layout: str) -> dict[Any, Any]:
    """Load a pickled dict, keeping Python 2 strings as bytes."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
    except Exception as e:  # corrupt pickles can raise nearly any exception, as the pickle docs warn
        raise FwdTransError(f"cannot unpickle {path} ({type(e).__name__}: {e}); it is truncated or corrupt: "
                            f"expected {layout}") from e
    if not isinstance(entry, dict):
        raise FwdTransError(f"{path} holds a pickled {type(entry).__name__}, not a dict; expected {layout}")
    return entry


def _field(entry: dict[Any, Any], key: str, path: Path, layout: str) -> Any:
    """Return ``entry[key]``, accepting a str or a bytes key."""
    for k in (key, key.encode()):
        if k in entry:
            return entry[k]
    raise FwdTransError(f"{path} has no '{key}' entry; expected {layout}")


# --- Fashion-MNIST --------------------------------------------------------------------------------


def read_fashion(data_dir: Path) -> Splits:
    """Read the official Fashion-MNIST idx files from ``data_dir`` or one of its known subfolders."""
    folder = _subfolder(data_dir, _FASHION_SUBFOLDERS)
    paths = {name: _plain_or_gz(folder / name) for split in _FASHION_SPLITS for name in split}
    missing = [f"{name}[.gz]" for name, path in paths.items() if path is None]
    if missing:
        raise _missing("Fashion-MNIST", folder, missing, FASHION_LAYOUT)
    (train_x, train_y), (test_x, test_y) = (_read_idx_split(paths[images], paths[labels])
                                            for images, labels in _FASHION_SPLITS)
    return Splits(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, classes=_FASHION_CLASSES)


def _plain_or_gz(path: Path) -> Path | None:
    """Return ``path`` if it is a file, else ``path`` + ``.gz`` if that is, else ``None``."""
    return next((p for p in (path, path.with_name(path.name + ".gz")) if p.is_file()), None)


def _read_idx_split(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one split's images and labels idx files into (N, 1, 28, 28) uint8 images and int64 labels."""
    images = _read_idx(images_path, 3)
    if images.shape[1:] != _FASHION_SIZE:
        raise FwdTransError(f"{images_path} holds images of {images.shape[1]}x{images.shape[2]} pixels; expected "
                            f"the 28x28 images of {FASHION_LAYOUT}")
    labels = _labels(_read_idx(labels_path, 1), len(_FASHION_CLASSES), 0, labels_path, FASHION_LAYOUT)
    if len(labels) != len(images):
        raise FwdTransError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} "
                            f"labels; expected the two files of one split: {FASHION_LAYOUT}")
    return torch.from_numpy(images.reshape(-1, 1, *_FASHION_SIZE)), torch.from_numpy(labels)


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an idx file of ``ndim``-dimensional uint8 data, gunzipping it if its name ends in ``.gz``."""
    magic = 0x800 + ndim  # 0x08 marks uint8 values: 2051 for images (3 dimensions), 2049 for labels (1)
    with _decoding(path, FASHION_LAYOUT):
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    if len(raw) >= 4 and int.from_bytes(raw[:4], "big") != magic:
        raise FwdTransError(f"{path} has idx magic number {int.from_bytes(raw[:4], 'big')}, not {magic} (uint8 data "
                            f"with {ndim} dimension(s)); is it the right file? Expected {FASHION_LAYOUT}")
    header = 4 * (1 + ndim)
    if len(raw) < header:
        raise FwdTransError(f"{path} holds {len(raw)} bytes, fewer than the {header} of an idx header with {ndim} "
                            f"dimension(s); it is truncated: expected {FASHION_LAYOUT}")
    shape = tuple(int(size) for size in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    if len(raw) - header != math.prod(shape):
        raise FwdTransError(f"{path} holds {len(raw) - header} bytes of data but its header announces shape "
                            f"{shape}, i.e. {math.prod(shape)} bytes; it is truncated or corrupt: "
                            f"expected {FASHION_LAYOUT}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape).copy()


# --- ImageNet32 -----------------------------------------------------------------------------------


def read_imagenet32(data_dir: Path) -> Splits:
    """Read the official ImageNet32 npz batches from ``data_dir`` or its two official subfolders."""
    train_dir = _subfolder(data_dir, (_IMAGENET32_TRAIN_DIR,))
    train_paths = [train_dir / name for name in _IMAGENET32_TRAIN]
    val_path = _subfolder(data_dir, (_IMAGENET32_VAL_DIR,)) / _IMAGENET32_VAL
    missing = [str(path.relative_to(data_dir)) for path in (*train_paths, val_path) if not path.is_file()]
    if missing:
        raise _missing("ImageNet32", data_dir, missing, IMAGENET32_LAYOUT)
    classes = _imagenet32_classes(data_dir / _IMAGENET32_NAMES)
    train_x, train_y = _read_npz_split(train_paths)
    test_x, test_y = _read_npz_split([val_path])
    return Splits(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, classes=classes)


def _imagenet32_classes(path: Path) -> tuple[str, ...]:
    """Class names from ``map_clsloc.txt`` if it exists, else ``class_0`` to ``class_999``."""
    if not path.is_file():
        return tuple(f"class_{i}" for i in range(_IMAGENET32_CLASSES))
    with _decoding(path, f"lines 'WNID INDEX NAME' such as 'n02119789 1 kit_fox' in {path.name}"):
        lines = path.read_text(encoding="utf-8").splitlines()
    names: dict[int, str] = {}
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        index = int(fields[1]) if len(fields) == 3 and fields[1].isdigit() else 0
        if not 1 <= index <= _IMAGENET32_CLASSES or index in names:
            raise FwdTransError(f"{path} line {number} reads {line!r}; expected 'WNID INDEX NAME' such as "
                                f"'n02119789 1 kit_fox', each INDEX from 1 to {_IMAGENET32_CLASSES} once")
        names[index] = fields[2]
    if len(names) != _IMAGENET32_CLASSES:
        raise FwdTransError(f"{path} names {len(names)} classes; expected one line per class index from 1 to "
                            f"{_IMAGENET32_CLASSES}, or no {path.name} at all")
    return tuple(names[i] for i in range(1, _IMAGENET32_CLASSES + 1))


def _read_npz_split(paths: Sequence[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Read npz batches into (N, 3, 32, 32) uint8 images and 0-indexed int64 labels.

    The labels are read first, to size one image array that each batch's rows are then copied into: the
    peak memory is the split plus one batch, not twice the split.
    """
    labels = [_labels(_npz_array(path, "labels"), _IMAGENET32_CLASSES, 1, path, IMAGENET32_LAYOUT)
              for path in paths]
    images = np.empty((sum(map(len, labels)), 3, 32, 32), dtype=np.uint8)
    start = 0
    for path, batch_labels in zip(paths, labels, strict=True):
        rows = _rows(_npz_array(path, "data"), len(batch_labels), path, IMAGENET32_LAYOUT)
        images[start:start + len(rows)] = rows.reshape(-1, 3, 32, 32)
        start += len(rows)
    return torch.from_numpy(images), torch.from_numpy(np.concatenate(labels))


def _npz_array(path: Path, key: str) -> np.ndarray:
    """Read the array ``key`` of the ImageNet32 npz batch ``path``, checking it has all the official arrays."""
    # Opened here rather than by np.load, which leaks the file when it is not a valid zip archive.
    with _decoding(path, IMAGENET32_LAYOUT), open(path, "rb") as f:
        archive = np.load(f, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise FwdTransError(f"{path} holds a single array, not an npz archive; expected {IMAGENET32_LAYOUT}")
        with archive:
            missing = [k for k in _NPZ_KEYS if k not in archive.files]
            if missing:
                raise FwdTransError(f"{path} has no {' or '.join(missing)} array (it has {', '.join(archive.files)})"
                                    f"; expected an npz batch with {' and '.join(_NPZ_KEYS)}: {IMAGENET32_LAYOUT}")
            return archive[key]


# --- shared checks --------------------------------------------------------------------------------


def _subfolder(data_dir: Path, names: Sequence[str]) -> Path:
    """Return the first of the subfolders ``names`` of ``data_dir`` that exists, else ``data_dir`` itself."""
    return next((data_dir / name for name in names if (data_dir / name).is_dir()), data_dir)


def _missing(title: str, folder: Path, names: Sequence[str], layout: str) -> FwdTransError:
    """The error for files ``names`` missing from ``folder``."""
    return FwdTransError(f"{title} file(s) missing from {folder}: {', '.join(names)}; expected {layout}")


@contextmanager
def _decoding(path: Path, expected: str) -> Iterator[None]:
    """Turn a failure to read or decode ``path`` into a ``FwdTransError`` naming it."""
    try:
        yield
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as e:
        raise FwdTransError(f"cannot read {path} ({type(e).__name__}: {e}); it is truncated or corrupt: "
                            f"expected {expected}") from e


def _rows(values: Any, count: int, path: Path, layout: str) -> np.ndarray:
    """Check that ``values`` are ``count`` (3072,) uint8 rows of 32x32 RGB images, and return them as an array."""
    rows = np.asarray(values)
    if rows.dtype != np.uint8 or rows.shape != (count, _ROW):
        raise FwdTransError(f"{path} holds {rows.dtype} data of shape {rows.shape} for {count} labels; expected "
                            f"({count}, {_ROW}) uint8 rows of 32x32 RGB images: {layout}")
    return rows


def _labels(values: Any, num_classes: int, first: int, path: Path, layout: str) -> np.ndarray:
    """Check that ``values`` are a 1-D sequence of labels from ``first`` on, and return them 0-indexed as int64."""
    try:
        labels = np.asarray(values, dtype=np.int64) - first
    except (TypeError, ValueError) as e:
        raise FwdTransError(f"{path} holds labels that are not integers ({e}); expected {layout}") from e
    if labels.ndim != 1:
        raise FwdTransError(f"{path} holds labels of shape {labels.shape}; expected one label per image: {layout}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise FwdTransError(f"{path} holds labels from {labels.min() + first} to {labels.max() + first}; expected "
                            f"labels from {first} to {num_classes - 1 + first}: {layout}")
    return labels


def _images(rows: Sequence[np.ndarray]) -> torch.Tensor:
    """Join CIFAR-layout rows into one (N, 3, 32, 32) uint8 tensor."""
    return torch.from_numpy(np.concatenate(rows).reshape(-1, 3, 32, 32))
