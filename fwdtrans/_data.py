"""CIFAR-10 loading and mini-batching.

``load_cifar10()`` decodes the class-balanced subset shipped in ``fwdtrans/data/`` (5,000 train and
1,000 test images) or reads the full data set from a directory in the official python format;
``batches`` turns uint8 images into normalised float32 mini-batches, with optional augmentation.
"""

import importlib.resources
import io
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ._errors import FwdTransError

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "ImageDataset", "load_cifar10", "batches", "num_batches"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)

_SUBSET_FILE = "cifar10_subset.npz"
_OFFICIAL_DIR = "cifar-10-batches-py"
_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_OFFICIAL_FILES = (*_TRAIN_FILES, "test_batch", "batches.meta")
_LAYOUT = (f"DATA_DIR/{_OFFICIAL_DIR}/{{data_batch_1..5, test_batch, batches.meta}} (or DATA_DIR "
           f"being {_OFFICIAL_DIR} itself), as unpacked from "
           "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz")
_PADDING = 4  # random-crop padding, in pixels


@dataclass(frozen=True)
class ImageDataset:
    """An image classification data set held in memory.

    Attributes:
        train_x: Training images, uint8, shape (N, 3, 32, 32).
        train_y: Training labels, int64, shape (N,).
        test_x: Test images, uint8, shape (M, 3, 32, 32).
        test_y: Test labels, int64, shape (M,).
        classes: Class names, indexed by label.
        name: Short name of the data set, e.g. ``"cifar10_subset"``.

    Example:
        >>> data = load_cifar10()
        >>> data.classes[:3]
        ('airplane', 'automobile', 'bird')
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]
    name: str


def load_cifar10(data_dir: str | os.PathLike[str] | None = None) -> ImageDataset:
    """Load CIFAR-10 as uint8 image tensors.

    Args:
        data_dir: ``None`` for the subset shipped with the library (500 train and 100 test images
            per class, decoded from JPEG). Otherwise a directory holding the official python
            version, ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``, or that
            folder itself; its files are unpickled, so use only a trusted copy.

    Returns:
        The data set, named ``"cifar10_subset"`` or ``"cifar10"``.

    Raises:
        FwdTransError: A file is missing or is not in the expected format.

    Example:
        >>> data = load_cifar10()
        >>> tuple(data.train_x.shape), tuple(data.test_x.shape)
        ((5000, 3, 32, 32), (1000, 3, 32, 32))
    """
    return _load_shipped() if data_dir is None else _load_official(Path(data_dir))


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    """Return how many batches ``batches`` yields for ``n`` samples.

    Args:
        n: Number of samples.
        batch_size: Samples per batch, at least 1.
        drop_last: Whether a final, smaller batch is dropped.

    Raises:
        FwdTransError: ``batch_size`` is below 1.

    Example:
        >>> num_batches(1000, 128, drop_last=False), num_batches(1000, 128, drop_last=True)
        (8, 7)
    """
    if batch_size < 1:
        raise FwdTransError(f"batch_size must be at least 1, got {batch_size}")
    return n // batch_size if drop_last else -(-n // batch_size)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool, augment: bool,
            generator: torch.Generator | None = None,
            drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Iterate over one epoch of normalised mini-batches.

    Images are scaled to [0, 1], then normalised with ``CIFAR10_MEAN`` and ``CIFAR10_STD``. With
    ``augment``, each image is first randomly cropped back to its size from a copy padded with 4
    zero pixels on every side, then flipped horizontally with probability 0.5.

    Args:
        x: Images, uint8, shape (N, 3, H, W).
        y: Labels, shape (N,).
        batch_size: Samples per batch, at least 1.
        shuffle: Visit the samples in a random order rather than in order.
        augment: Apply random crops and flips.
        generator: CPU generator that all randomness is drawn from; a seeded one makes the
            batches reproducible. ``None`` uses torch's global generator.
        drop_last: Drop a final batch smaller than ``batch_size``.

    Returns:
        An iterator over ``(images, labels)`` pairs: float32 images of shape (B, 3, H, W) on
        ``x``'s device and the matching labels. Arguments are checked at once; the random draws
        happen as the iterator is consumed.

    Raises:
        FwdTransError: ``x`` is not a uint8 (N, 3, H, W) tensor, ``x`` and ``y`` differ in length,
            or ``batch_size`` is below 1.

    Example:
        >>> x, y = torch.zeros(10, 3, 32, 32, dtype=torch.uint8), torch.arange(10)
        >>> g = torch.Generator().manual_seed(0)
        >>> [tuple(xb.shape) for xb, _ in batches(x, y, 4, shuffle=True, augment=True, generator=g)]
        [(4, 3, 32, 32), (4, 3, 32, 32), (2, 3, 32, 32)]
    """
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
        raise FwdTransError(f"batches needs uint8 images of shape (N, 3, H, W), got {x.dtype} "
                            f"{tuple(x.shape)}; pass the tensors of an ImageDataset")
    if len(x) != len(y):
        raise FwdTransError(f"x has {len(x)} samples but y has {len(y)}; pass matching images and labels")
    count = num_batches(len(x), batch_size, drop_last)
    return _iterate(x, y, batch_size, count, shuffle, augment, generator)


def _iterate(x: torch.Tensor, y: torch.Tensor, batch_size: int, count: int, shuffle: bool,
             augment: bool, generator: torch.Generator | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield the batches that ``batches`` describes, once its arguments are checked."""
    mean = torch.tensor(CIFAR10_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, device=x.device).view(1, 3, 1, 1)
    order = torch.randperm(len(x), generator=generator) if shuffle else torch.arange(len(x))
    for b in range(count):
        idx = order[b * batch_size:(b + 1) * batch_size]
        xb = x[idx.to(x.device)]
        if augment:
            shifts = torch.randint(-_PADDING, _PADDING + 1, (len(idx), 2), generator=generator)
            flips = torch.rand(len(idx), generator=generator) < 0.5
            xb = _flip(_crop(xb, shifts.to(x.device), _PADDING), flips.to(x.device))
        yield xb.float().div_(255).sub_(mean).div_(std), y[idx.to(y.device)]


def _crop(x: torch.Tensor, shifts: torch.Tensor, padding: int) -> torch.Tensor:
    """Crop each image, at its own offset, from a copy of the batch padded with zeros.

    Output pixel ``(r, c)`` of image ``i`` is input pixel ``(r + shifts[i, 0], c + shifts[i, 1])``,
    or 0 outside the image; a shift of (0, 0) is the identity. The padded batch is viewed as all its
    H x W windows (no copy), from which one advanced-indexing gather picks each image's window.

    Args:
        x: Images, shape (N, C, H, W).
        shifts: Integer (dy, dx) per image, shape (N, 2), each in [-padding, padding].
        padding: Width of the zero border.
    """
    n, _, h, w = x.shape
    windows = F.pad(x, (padding, padding, padding, padding)).unfold(2, h, 1).unfold(3, w, 1)
    # windows: (N, C, 2 * padding + 1, 2 * padding + 1, H, W); the result is (N, C, H, W)
    return windows[torch.arange(n, device=x.device), :, shifts[:, 0] + padding, shifts[:, 1] + padding]


def _flip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror the images of ``x`` (N, C, H, W) left to right where the bool ``mask`` (N,) is set."""
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)


def _load_shipped() -> ImageDataset:
    """Decode the subset shipped in ``fwdtrans/data/``."""
    resource = importlib.resources.files("fwdtrans") / "data" / _SUBSET_FILE
    if not resource.is_file():
        raise FwdTransError(f"the shipped data file fwdtrans/data/{_SUBSET_FILE} is missing; reinstall "
                            f"fwdtrans, or pass the directory of the official CIFAR-10 python version")
    with resource.open("rb") as f, np.load(f) as z:
        arrays = {key: z[key] for key in z.files}
    return ImageDataset(
        train_x=_decode_jpegs(arrays["train_jpeg"], arrays["train_offsets"]),
        train_y=torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        test_x=_decode_jpegs(arrays["test_jpeg"], arrays["test_offsets"]),
        test_y=torch.from_numpy(arrays["test_labels"].astype(np.int64)),
        classes=tuple(str(name) for name in arrays["classes"]),
        name="cifar10_subset",
    )


def _decode_jpegs(blob: np.ndarray, offsets: np.ndarray) -> torch.Tensor:
    """Decode concatenated 32x32 JPEGs, image i being ``blob[offsets[i]:offsets[i + 1]]``, to uint8 NCHW."""
    data = blob.tobytes()
    images = np.empty((len(offsets) - 1, 32, 32, 3), dtype=np.uint8)
    for i in range(len(images)):
        with Image.open(io.BytesIO(data[offsets[i]:offsets[i + 1]])) as img:
            images[i] = np.asarray(img.convert("RGB"))
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def _load_official(data_dir: Path) -> ImageDataset:
    """Read the official CIFAR-10 python version from ``data_dir`` or its ``cifar-10-batches-py``."""
    folder = data_dir / _OFFICIAL_DIR if (data_dir / _OFFICIAL_DIR).is_dir() else data_dir
    missing = [name for name in _OFFICIAL_FILES if not (folder / name).is_file()]
    if missing:
        raise FwdTransError(f"CIFAR-10 file(s) missing from {folder}: {', '.join(missing)}; "
                            f"expected the official python layout {_LAYOUT}")
    train = [_read_batch(folder / name) for name in _TRAIN_FILES]
    test_x, test_y = _read_batch(folder / "test_batch")
    meta_path = folder / "batches.meta"
    names = _field(_unpickle(meta_path), "label_names", meta_path)
    return ImageDataset(
        train_x=torch.cat([bx for bx, _ in train]),
        train_y=torch.cat([by for _, by in train]),
        test_x=test_x,
        test_y=test_y,
        classes=tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names),
        name="cifar10",
    )


def _read_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one official batch file into (N, 3, 32, 32) uint8 images and int64 labels."""
    entry = _unpickle(path)
    data = np.asarray(_field(entry, "data", path), dtype=np.uint8)
    labels = np.asarray(_field(entry, "labels", path), dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise FwdTransError(f"{path} holds data of shape {data.shape} and {len(labels)} labels; expected "
                            f"(N, 3072) uint8 rows and N labels, as in the official CIFAR-10 python version")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def _unpickle(path: Path) -> dict[Any, Any]:
    """Load a pickled dict, keeping Python 2 strings as bytes."""
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _field(entry: dict[Any, Any], key: str, path: Path) -> Any:
    """Return ``entry[key]``, accepting a str or a bytes key."""
    for k in (key, key.encode()):
        if k in entry:
            return entry[k]
    raise FwdTransError(f"{path} has no '{key}' entry; expected a file of the official CIFAR-10 "
                        "python version")
