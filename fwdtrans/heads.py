"""Auxiliary heads: the small classifiers that give each block its local loss and its guess.

``convert(..., heads=...)`` accepts ``"cnn"``, ``"mlp"``, ``"linear"``, one of the specs below
(to choose a width), or any callable ``shape -> nn.Module`` that receives the per-sample shape of
the block output (e.g. ``(C, H, W)``) and returns a module mapping ``(N, *shape)`` to logits.

Example:
    >>> import fwdtrans
    >>> head = fwdtrans.heads.CNNHead(width=8).build((16, 32, 32), num_classes=10)
    >>> sum(p.numel() for p in head.parameters())
    2226

The three families follow the paper (section 4.1 and appendix A.2 of Fournier et al., 2023).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Union

from torch import nn

from ._errors import FwdTransError

__all__ = ["CNNHead", "HeadSpec", "LinearHead", "MLPHead"]


def _image(shape: tuple[int, ...], family: str) -> int:
    if len(shape) != 3:
        raise FwdTransError(
            f"the '{family}' head needs image features (C, H, W), but this block outputs per-sample shape "
            f"{tuple(shape)}. Fix: use heads='mlp' or 'linear' for flat features, or pass a callable head."
        )
    return shape[0]


@dataclass(frozen=True)
class CNNHead:
    """1x1 conv (C->width) + BN + ReLU, ``depth`` x [3x3 conv stride 2 + BN + ReLU], 2x2 pool, linear."""

    width: int = 32
    depth: int = 3

    def build(self, shape: tuple[int, ...], num_classes: int) -> nn.Module:
        c = _image(shape, "cnn")
        layers: list[nn.Module] = [nn.Conv2d(c, self.width, 1, bias=False), nn.BatchNorm2d(self.width), nn.ReLU()]
        for _ in range(self.depth):
            layers += [nn.Conv2d(self.width, self.width, 3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(self.width), nn.ReLU()]
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * self.width, num_classes))


@dataclass(frozen=True)
class MLPHead:
    """(2x2 pool for images), ``depth`` x [linear without bias + BN + ReLU], linear."""

    width: int = 1024
    depth: int = 3

    def build(self, shape: tuple[int, ...], num_classes: int) -> nn.Module:
        layers: list[nn.Module] = []
        if len(shape) == 3:
            layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten()]
            features = 4 * shape[0]
        elif len(shape) == 1:
            features = shape[0]
        else:
            raise FwdTransError(f"the 'mlp' head takes (C, H, W) or (D,) features, not {tuple(shape)}.")
        for _ in range(self.depth):
            layers += [nn.Linear(features, self.width, bias=False), nn.BatchNorm1d(self.width), nn.ReLU()]
            features = self.width
        return nn.Sequential(*layers, nn.Linear(features, num_classes))


@dataclass(frozen=True)
class LinearHead:
    """For images: BN + 2x2 average pool + linear (as Belilovsky et al., 2021); for (D,): linear."""

    def build(self, shape: tuple[int, ...], num_classes: int) -> nn.Module:
        if len(shape) == 1:
            return nn.Linear(shape[0], num_classes)
        c = _image(shape, "linear")
        return nn.Sequential(nn.BatchNorm2d(c), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * c, num_classes))


HeadSpec = Union[str, CNNHead, MLPHead, LinearHead, Callable[[tuple[int, ...]], nn.Module]]
_NAMED = {"cnn": CNNHead(), "mlp": MLPHead(), "linear": LinearHead()}


def build_head(spec: HeadSpec, shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Instantiate ``spec`` for a block whose output has per-sample ``shape``."""
    if isinstance(spec, str):
        if spec not in _NAMED:
            raise FwdTransError(f"heads='{spec}' is unknown. Fix: use one of {sorted(_NAMED)} or a callable.")
        spec = _NAMED[spec]
    if isinstance(spec, (CNNHead, MLPHead, LinearHead)):
        return spec.build(tuple(shape), num_classes)
    if callable(spec):
        head = spec(tuple(shape))
        if not isinstance(head, nn.Module):
            raise FwdTransError(f"the head callable returned {type(head).__name__}, not an nn.Module.")
        return head
    raise FwdTransError(f"heads={spec!r}: expected 'cnn', 'mlp', 'linear', a head spec or a callable.")
