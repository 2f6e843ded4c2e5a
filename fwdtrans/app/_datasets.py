"""The paper's image data sets, held in memory.

``load_dataset(name, data_dir)`` returns an ``ImageDataset``: uint8 (N, C, H, W) images and int64 labels for the
train and test splits, the class names, the per-channel normalisation of the paper's code and whether its training
augmentation applies. Without ``data_dir``, ``cifar10`` is the class-balanced subset shipped in
``fwdtrans/data/cifar10_subset.npz`` (500 train and 100 test images per class, stored as concatenated JPEGs and
their offsets). Otherwise ``data_dir`` holds the data set's official distribution files, read by
``fwdtrans.app._formats``, whose docstring gives each layout and format.
"""

import importlib.resources
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from .._errors import FwdTransError
from . import _formats

__all__ = ["DATASETS", "ImageDataset", "load_dataset"]

DATASETS = ("cifar10", "cifar100", "fashion-mnist", "imagenet32")

# Per-channel (mean, std) of images scaled to [0, 1], as in the paper's official code:
# https://github.com/streethagore/ForwardLocalGradient, commit e262989, dataset/utils.py.
_CIFAR_NORM = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))  # lines 20-30; lines 47-57 reuse it for CIFAR-100
_FASHION_NORM = ((0.0,), (1.0,))  # lines 82-88: ToTensor() without Normalize, i.e. the identity
_IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # lines 164-187: ImageNet's statistics

_SUBSET_FILE = "cifar10_subset.npz"


@dataclass(frozen=True)
class ImageDataset:
    """An image classification data set held in memory.

    Attributes:
        train_x: Training images, uint8, shape (N, C, H, W).
        train_y: Training labels, int64, shape (N,), each in ``range(num_classes)``.
        test_x: Test images, uint8, shape (M, C, H, W).
        test_y: Test labels, int64, shape (M,).
        classes: Class names, indexed by label.
        name: ``"cifar10_subset"`` for the shipped subset, else the data set's name in ``DATASETS``.
        mean: Per-channel mean that normalises images scaled to [0, 1].
        std: Per-channel standard deviation that normalises images scaled to [0, 1].
        augment: Whether the paper's training augmentation applies: a random crop from a copy padded with 4
            pixels, then a horizontal flip.

    Example:
        >>> data = load_dataset("cifar10")
        >>> data.classes[:3], data.channels, data.num_classes, data.image_shape, data.augment
        (('airplane', 'automobile', 'bird'), 3, 10, (3, 32, 32), True)
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]
    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool

    @property
    def channels(self) -> int:
        """Number of image channels, C."""
        return self.train_x.shape[1]

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape (C, H, W) of one image."""
        c, h, w = self.train_x.shape[1:]
        return c, h, w


def load_dataset(name: str, data_dir: str | os.PathLike[str] | None = None) -> ImageDataset:
    """Read one of the paper's data sets into memory.

    Args:
        name: One of ``DATASETS``.
        data_dir: Folder holding the data set's official files (the docstring of ``fwdtrans.app._formats`` gives
            each layout), or ``None`` for the CIFAR-10 subset shipped with the library.

    Returns:
        The data set, named ``"cifar10_subset"`` for the shipped subset, else ``name``.

    Raises:
        FwdTransError: ``name`` is unknown, ``data_dir`` is ``None`` for a data set other than CIFAR-10, or a
            folder or file is missing, truncated or not in the official format.

    Example:
        >>> data = load_dataset("cifar10")
        >>> data.name, tuple(data.train_x.shape), tuple(data.test_x.shape), data.mean
        ('cifar10_subset', (5000, 3, 32, 32), (1000, 3, 32, 32), (0.4914, 0.4822, 0.4465))
    """
    if name not in _SOURCES:
        raise FwdTransError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    source = _SOURCES[name]
    if data_dir is None:
        if name == "cifar10":
            return _load_shipped()
        raise FwdTransError(f"{source.title} has no subset shipped with fwdtrans (only cifar10 has one); pass "
                            f"data_dir (--data-dir on the command line): expected {source.layout}")
    folder = Path(data_dir)
    if not folder.is_dir():
        raise FwdTransError(f"{source.title} folder {folder} does not exist or is not a folder; "
                            f"expected {source.layout}")
    # Splits' fields are the first five of ImageDataset
    return ImageDataset(*source.read(folder), name=name, mean=source.norm[0], std=source.norm[1],
                        augment=source.augment)


def _load_shipped() -> ImageDataset:
    """Decode the CIFAR-10 subset shipped in ``fwdtrans/data/``."""
    resource = importlib.resources.files("fwdtrans") / "data" / _SUBSET_FILE
    if not resource.is_file():
        raise FwdTransError(f"the shipped data file fwdtrans/data/{_SUBSET_FILE} is missing; reinstall fwdtrans, "
                            f"or pass the folder of the official CIFAR-10 python version: {_formats.CIFAR10.layout}")
    with resource.open("rb") as f, np.load(f) as z:
        arrays = {key: z[key] for key in z.files}
    return ImageDataset(
        train_x=_decode_jpegs(arrays["train_jpeg"], arrays["train_offsets"]),
        train_y=torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        test_x=_decode_jpegs(arrays["test_jpeg"], arrays["test_offsets"]),
        test_y=torch.from_numpy(arrays["test_labels"].astype(np.int64)),
        classes=tuple(str(name) for name in arrays["classes"]),
        name="cifar10_subset",
        mean=_CIFAR_NORM[0],
        std=_CIFAR_NORM[1],
        augment=True,
    )


def _decode_jpegs(blob: np.ndarray, offsets: np.ndarray) -> torch.Tensor:
    """Decode concatenated 32x32 JPEGs, image i being ``blob[offsets[i]:offsets[i + 1]]``, to uint8 NCHW."""
    data = blob.tobytes()
    images = np.empty((len(offsets) - 1, 32, 32, 3), dtype=np.uint8)
    for i in range(len(images)):
        with Image.open(io.BytesIO(data[offsets[i]:offsets[i + 1]])) as img:
            images[i] = np.asarray(img.convert("RGB"))
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


class _Source(NamedTuple):
    """How ``load_dataset`` names a data set in messages, where its files go, how it reads them, and how the
    paper's code normalises (per-channel mean, std) and augments its images."""

    title: str
    layout: str
    read: Callable[[Path], _formats.Splits]
    norm: tuple[tuple[float, ...], tuple[float, ...]]
    augment: bool


_SOURCES = {
    "cifar10": _Source(_formats.CIFAR10.title, _formats.CIFAR10.layout,
                       partial(_formats.read_cifar, _formats.CIFAR10), _CIFAR_NORM, True),
    "cifar100": _Source(_formats.CIFAR100.title, _formats.CIFAR100.layout,
                        partial(_formats.read_cifar, _formats.CIFAR100), _CIFAR_NORM, True),
    "fashion-mnist": _Source("Fashion-MNIST", _formats.FASHION_LAYOUT, _formats.read_fashion, _FASHION_NORM, False),
    "imagenet32": _Source("ImageNet32", _formats.IMAGENET32_LAYOUT, _formats.read_imagenet32, _IMAGENET_NORM, True),
}
