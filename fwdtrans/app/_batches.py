"""Mini-batches of one epoch: order, the paper's augmentation, normalisation.

An epoch's randomness (the sample order, each sample's crop offset and flip) is drawn at once,
before the first batch, from one generator. So the training loop can seed a generator per epoch
and restart an epoch at any batch: ``batches(..., start=b)`` yields exactly the batches ``b, b+1,
...`` of the uninterrupted epoch, which is what makes a resumed run equal an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .._errors import FwdTransError

__all__ = ["PADDING", "batches", "epoch_generator", "num_batches"]

PADDING = 4  # the paper's random-crop padding, in pixels


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    """How many batches :func:`batches` yields for ``n`` samples.

    Raises:
        FwdTransError: ``batch_size`` is below 1.

    Example:
        >>> num_batches(1000, 128, drop_last=False), num_batches(1000, 128, drop_last=True)
        (8, 7)
    """
    if batch_size < 1:
        raise FwdTransError(f"batch_size must be at least 1, got {batch_size}")
    return n // batch_size if drop_last else -(-n // batch_size)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator that epoch ``epoch`` (0-based) of a run seeded with ``seed`` draws from.

    Example:
        >>> a, b = epoch_generator(0, 3), epoch_generator(0, 3)
        >>> bool(torch.equal(torch.randperm(5, generator=a), torch.randperm(5, generator=b)))
        True
    """
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)


def batches(x: Tensor, y: Tensor, batch_size: int, *, mean: Sequence[float], std: Sequence[float],
            shuffle: bool, augment: bool, generator: torch.Generator | None = None, drop_last: bool = False,
            start: int = 0, shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[Tensor, Tensor]]:
    """Iterate over one epoch of normalised mini-batches.

    Images are scaled to [0, 1] and normalised per channel with ``mean`` and ``std``. With
    ``augment`` (the paper's augmentation), each image is first cropped back to its size from a
    copy padded with 4 zero pixels on every side, at a random offset, then flipped left to right
    with probability 0.5.

    Args:
        x: Images, uint8, shape (N, C, H, W), on any device (batches are made there).
        y: Labels, shape (N,).
        batch_size: Samples per batch, at least 1.
        mean: Per-channel mean, ``C`` values.
        std: Per-channel standard deviation, ``C`` values.
        shuffle: Visit the samples in a random order rather than in order.
        augment: Apply random crops and flips.
        generator: CPU generator that all of the epoch's randomness is drawn from (all at once,
            when this function is called); ``None`` uses torch's global generator.
        drop_last: Drop a final batch smaller than ``batch_size``.
        start: Index of the first batch to yield: the epoch resumed at batch ``start``.
        shard: ``(rank, ranks)``: yield only rank ``rank``'s contiguous slice of each batch (samples
            ``b * batch_size + [batch * rank // ranks, batch * (rank + 1) // ranks)`` of the epoch's order, for
            a batch of ``batch`` samples), as a data-parallel run's ranks share each batch. The epoch's order
            and augmentation are drawn whole, the same for any number of ranks.

    Returns:
        An iterator over ``(images, labels)``: float32 images (B, C, H, W) and their labels.

    Raises:
        FwdTransError: ``x`` is not a uint8 (N, C, H, W) tensor, ``x`` and ``y`` differ in length,
            ``mean``/``std`` do not have ``C`` values, or ``batch_size`` is below 1.

    Example:
        >>> x, y = torch.zeros(10, 3, 32, 32, dtype=torch.uint8), torch.arange(10)
        >>> g = torch.Generator().manual_seed(0)
        >>> it = batches(x, y, 4, mean=(0.5,) * 3, std=(0.25,) * 3, shuffle=True, augment=True, generator=g)
        >>> [tuple(xb.shape) for xb, _ in it]
        [(4, 3, 32, 32), (4, 3, 32, 32), (2, 3, 32, 32)]
    """
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise FwdTransError(f"batches needs uint8 images of shape (N, C, H, W), got {x.dtype} {tuple(x.shape)}; "
                            "pass the tensors of an ImageDataset")
    if len(x) != len(y):
        raise FwdTransError(f"x has {len(x)} samples but y has {len(y)}; pass matching images and labels")
    rank, ranks = shard
    if not 0 <= rank < ranks:
        raise FwdTransError(f"shard={shard}: use (rank, ranks) with 0 <= rank < ranks")
    if len(mean) != x.shape[1] or len(std) != x.shape[1]:
        raise FwdTransError(f"mean and std need one value per channel ({x.shape[1]}), got {len(mean)} and {len(std)}")
    count = num_batches(len(x), batch_size, drop_last)
    n = len(x)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    shifts = torch.randint(-PADDING, PADDING + 1, (n, 2), generator=generator) if augment else None
    flips = torch.rand(n, generator=generator) < 0.5 if augment else None
    return _iterate(x, y, batch_size, range(start, count), order, shifts, flips, mean, std, shard)


def _iterate(x: Tensor, y: Tensor, batch_size: int, indices: range, order: Tensor, shifts: Tensor | None,
             flips: Tensor | None, mean: Sequence[float], std: Sequence[float],
             shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[Tensor, Tensor]]:
    shape = (1, -1, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(shape)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(shape)
    rank, ranks = shard
    for b in indices:
        first, end = b * batch_size, min((b + 1) * batch_size, len(order))
        size = end - first
        positions = slice(first + size * rank // ranks, first + size * (rank + 1) // ranks)
        idx = order[positions].to(x.device)
        xb = x[idx]
        if shifts is not None and flips is not None:
            xb = _flip(_crop(xb, shifts[positions].to(x.device), PADDING), flips[positions].to(x.device))
        yield xb.float().div_(255).sub_(mean_t).div_(std_t), y[idx.to(y.device)]


def _crop(x: Tensor, shifts: Tensor, padding: int) -> Tensor:
    """Crop each image, at its own offset, from a copy of the batch padded with zeros.

    Output pixel ``(r, c)`` of image ``i`` is input pixel ``(r + shifts[i, 0], c + shifts[i, 1])``,
    or 0 outside the image; a shift of (0, 0) is the identity. The padded batch is viewed as all its
    H x W windows (no copy), from which one advanced-indexing gather picks each image's window.
    """
    n, _, h, w = x.shape
    windows = F.pad(x, (padding, padding, padding, padding)).unfold(2, h, 1).unfold(3, w, 1)
    # windows: (N, C, 2 * padding + 1, 2 * padding + 1, H, W); the result is (N, C, H, W)
    return windows[torch.arange(n, device=x.device), :, shifts[:, 0] + padding, shifts[:, 1] + padding]


def _flip(x: Tensor, mask: Tensor) -> Tensor:
    """Mirror the images of ``x`` (N, C, H, W) left to right where the bool ``mask`` (N,) is set."""
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)
