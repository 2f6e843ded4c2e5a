"""Miniature copies of the paper's data sets in their official formats, written independently of the readers.

Used by the reader tests and by the training tests that run on each data set.
"""

import gzip
import itertools
import pickle
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from fwdtrans.app._datasets import ImageDataset

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = tuple(f"fine_{i}" for i in range(100))
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET32_TRAIN_SIZES = [i % 3 + 1 for i in range(10)]  # images in train_data_batch_1..10.npz


class Split(NamedTuple):
    """The images (uint8, N x C x H x W) and 0-indexed labels that a fixture holds."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def random_split(channels: int, size: int, num_classes: int, n_train: int = 6, n_test: int = 4,
                 seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n_train + n_test, channels, size, size), dtype=np.uint8)
    labels = rng.integers(0, num_classes, n_train + n_test)
    labels[:2] = 0, num_classes - 1  # the extreme labels occur
    return Split(images[:n_train], labels[:n_train], images[n_train:], labels[n_train:])


def assert_holds(data: ImageDataset, expected: Split) -> None:
    assert data.train_x.dtype == data.test_x.dtype == torch.uint8
    assert data.train_y.dtype == data.test_y.dtype == torch.int64
    for got, want in zip((data.train_x, data.train_y, data.test_x, data.test_y), expected, strict=True):
        assert tuple(got.shape) == want.shape
        np.testing.assert_array_equal(got.numpy(), want)


def rows(images: np.ndarray) -> np.ndarray:
    """CIFAR and ImageNet32 rows: each image's red plane, then green, then blue, each row by row."""
    return images.reshape(len(images), -1)


def dump(path: Path, entry: dict) -> None:
    path.write_bytes(pickle.dumps(entry, protocol=2))


def write_cifar10(folder: Path, split: Split, bytes_keys: bool = True) -> None:
    folder.mkdir(parents=True)
    key = (lambda k: k.encode()) if bytes_keys else str
    batches = np.array_split(np.arange(len(split.train_x)), 5)
    parts = [(f"data_batch_{i}", split.train_x[idx], split.train_y[idx]) for i, idx in enumerate(batches, 1)]
    for name, x, y in [*parts, ("test_batch", split.test_x, split.test_y)]:
        dump(folder / name, {key("batch_label"): b"batch", key("labels"): y.tolist(), key("data"): rows(x),
                             key("filenames"): [b"img.png"] * len(x)})
    names = [c.encode() for c in CIFAR10_CLASSES] if bytes_keys else list(CIFAR10_CLASSES)
    dump(folder / "batches.meta", {key("num_cases_per_batch"): 10000, key("label_names"): names, key("num_vis"): 3072})


def write_cifar100(folder: Path, split: Split) -> None:
    folder.mkdir(parents=True)
    for name, x, y in (("train", split.train_x, split.train_y), ("test", split.test_x, split.test_y)):
        dump(folder / name, {b"filenames": [b"img.png"] * len(x), b"batch_label": name.encode(),
                             b"fine_labels": y.tolist(), b"coarse_labels": (y // 5).tolist(), b"data": rows(x)})
    dump(folder / "meta", {b"fine_label_names": [c.encode() for c in CIFAR100_CLASSES],
                           b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)]})


def idx_bytes(array: np.ndarray) -> bytes:
    """An idx file: magic 0x0000080N (uint8, N dimensions), N big-endian uint32 sizes, the values row-major."""
    return struct.pack(f">I{array.ndim}I", 0x800 + array.ndim, *array.shape) + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    data = idx_bytes(array)
    if gz:
        path, data = path.with_name(path.name + ".gz"), gzip.compress(data)
    path.write_bytes(data)
    return path


def write_fashion(folder: Path, split: Split, gz: bool | str = True) -> None:
    """Write the four idx files, all gzipped, all plain, or with ``gz="mixed"`` only the images gzipped."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, x, y in (("train", split.train_x, split.train_y), ("t10k", split.test_x, split.test_y)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", x[:, 0], gz is True or gz == "mixed")
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", y, gz is True)


def imagenet32_split(seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    n_train, n_test = sum(IMAGENET32_TRAIN_SIZES), 4
    images = rng.integers(0, 256, (n_train + n_test, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 1000, n_train + n_test)
    labels[:2] = 0, 999
    return Split(images[:n_train], labels[:n_train], images[n_train:], labels[n_train:])


def write_imagenet32(data_dir: Path, split: Split, subfolders: bool = True) -> None:
    """Write the official npz batches, with 1-indexed labels as in the official files."""
    train_dir = data_dir / "Imagenet32_train_npz" if subfolders else data_dir
    val_dir = data_dir / "Imagenet32_val_npz" if subfolders else data_dir
    for folder in (train_dir, val_dir):
        folder.mkdir(parents=True, exist_ok=True)
    ends = np.cumsum([0, *IMAGENET32_TRAIN_SIZES])
    parts = [(train_dir / f"train_data_batch_{i}.npz", split.train_x[a:b], split.train_y[a:b])
             for i, (a, b) in enumerate(itertools.pairwise(ends), 1)]
    for path, x, y in [*parts, (val_dir / "val_data.npz", split.test_x, split.test_y)]:
        np.savez(path, data=rows(x), labels=(y + 1).tolist(), mean=rows(x).mean(0))


def write_map_clsloc(data_dir: Path) -> tuple[str, ...]:
    """Write map_clsloc.txt, its lines shuffled; return the class names by 0-indexed label."""
    names = tuple(f"name_{i}" for i in range(1000))
    lines = [f"n{10**7 + i:08d} {i + 1} {names[i]}" for i in np.random.default_rng(0).permutation(1000)]
    (data_dir / "map_clsloc.txt").write_text("\n".join(lines) + "\n")
    return names
