"""Auxiliary heads: the small classifiers that give each block its local loss and its guess.

``convert(..., heads=...)`` accepts ``"auto"`` (the default: the largest paper-style head whose
forward FLOPs stay under 10% of its block's), ``"cnn"``, ``"mlp"``, ``"linear"``, one of the specs
below (to choose a width or a budget), any callable ``shape -> nn.Module`` that receives the
per-sample shape of the block output (e.g. ``(C, H, W)``) and returns a module mapping
``(N, *shape)`` to logits, or a dict from cut names to any of these (key ``"*"`` for the rest).

Feature shapes: images ``(C, H, W)`` get the paper's heads; tokens ``(T, D)`` are averaged over
tokens first; flat features ``(D,)`` get MLP or linear heads.

Examples:
    >>> import fwdtrans
    >>> head = fwdtrans.heads.CNNHead(width=8).build((16, 32, 32), num_classes=10)
    >>> sum(p.numel() for p in head.parameters())
    2226

The three families follow the paper (section 4.1 and appendix A.2 of Fournier et al., 2023).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ._cuts import unpack
from ._errors import FwdTransError

__all__ = ["AutoHead", "CNNHead", "HeadSpec", "LinearHead", "MLPHead", "SplitHead", "TokenMean", "head_flops"]


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
    """(2x2 pool for images, token mean for tokens), ``depth`` x [linear without bias + BN + ReLU], linear."""

    width: int = 1024
    depth: int = 3

    def build(self, shape: tuple[int, ...], num_classes: int) -> nn.Module:
        layers, features = _flatten(shape, "mlp")
        for _ in range(self.depth):
            layers += [nn.Linear(features, self.width, bias=False), nn.BatchNorm1d(self.width), nn.ReLU()]
            features = self.width
        return nn.Sequential(*layers, nn.Linear(features, num_classes))


@dataclass(frozen=True)
class LinearHead:
    """For images: BN + 2x2 average pool + linear (as Belilovsky et al., 2021); for tokens: token
    mean + linear; for (D,): linear."""

    def build(self, shape: tuple[int, ...], num_classes: int) -> nn.Module:
        if len(shape) == 3:
            c = shape[0]
            return nn.Sequential(nn.BatchNorm2d(c), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * c, num_classes))
        layers, features = _flatten(shape, "linear")
        return nn.Sequential(*layers, nn.Linear(features, num_classes))


class TokenMean(nn.Module):
    """Average ``(N, T, D)`` token features over the tokens."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(1)


def _flatten(shape: tuple[int, ...], family: str) -> tuple[list[nn.Module], int]:
    """Layers that turn ``(N, *shape)`` features into ``(N, D)``, and ``D``."""
    if len(shape) == 3:
        return [nn.AdaptiveAvgPool2d(2), nn.Flatten()], 4 * shape[0]
    if len(shape) == 2:
        return [TokenMean()], shape[1]
    if len(shape) == 1:
        return [], shape[0]
    raise FwdTransError(f"the '{family}' head takes (C, H, W), (T, D) or (D,) features, not {tuple(shape)}. "
                        "Fix: pass a callable head for this block.")


@dataclass(frozen=True)
class AutoHead:
    """The largest paper-style head whose forward FLOPs stay within ``budget`` x its block's.

    Images try CNN heads of width 32, 16, 8, 4; tokens and flat features MLP heads of width 1024
    down to 32; the linear head is the fallback.
    """

    budget: float = 0.1

    def candidates(self, shape: tuple[int, ...]) -> list:
        if len(shape) == 3:
            return [CNNHead(width=w) for w in (32, 16, 8, 4)]
        return [MLPHead(width=w) for w in (1024, 512, 256, 128, 64, 32)]

    def choose(self, shape: tuple[int, ...], num_classes: int, block_flops: int):
        for spec in self.candidates(shape):
            if head_flops(spec.build(shape, num_classes), shape) <= self.budget * block_flops:
                return spec
        return LinearHead()


HeadSpec = Union[str, CNNHead, MLPHead, LinearHead, AutoHead, Callable[[tuple[int, ...]], nn.Module], Mapping]
_NAMED = {"cnn": CNNHead(), "mlp": MLPHead(), "linear": LinearHead(), "auto": AutoHead()}


def head_flops(head: nn.Module, shape: tuple[int, ...]) -> int:
    """Forward FLOPs of ``head`` for one sample (BatchNorm counted in eval mode)."""
    param = next(head.parameters(), None)
    x = torch.zeros(1, *shape, dtype=param.dtype if param is not None else None)
    training = head.training
    head.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        head(x)
    head.train(training)
    return int(counter.get_total_flops())


def build_head(spec: HeadSpec, shape: tuple[int, ...], num_classes: int, *, name: str = "",
               block_flops: int = 0) -> nn.Module:
    """Instantiate ``spec`` for the block ending at cut ``name`` with per-sample output ``shape``.

    ``block_flops`` (per sample) sizes ``"auto"`` heads.
    """
    if isinstance(spec, Mapping):
        if name in spec:
            spec = spec[name]
        elif "*" in spec:
            spec = spec["*"]
        else:
            raise FwdTransError(f"heads: no head for the block ending at '{name}'. Fix: add it, or a '*' entry.")
    if isinstance(spec, str):
        if spec not in _NAMED:
            raise FwdTransError(f"heads='{spec}' is unknown. Fix: use one of {sorted(_NAMED)} or a callable.")
        spec = _NAMED[spec]
    if isinstance(spec, AutoHead):
        spec = spec.choose(tuple(shape), num_classes, block_flops)
    if isinstance(spec, (CNNHead, MLPHead, LinearHead)):
        return spec.build(tuple(shape), num_classes)
    if callable(spec):
        head = spec(tuple(shape))
        if not isinstance(head, nn.Module):
            raise FwdTransError(f"the head callable returned {type(head).__name__}, not an nn.Module.")
        return head
    raise FwdTransError(f"heads={spec!r}: expected 'auto', 'cnn', 'mlp', 'linear', a head spec, a callable or a dict.")


class SplitHead(nn.Module):
    """The heads of a cut that several tensors cross (``convert(..., multi_tensor=True)``): one head
    per tensor, each reading its own part of the packed block output; returns one set of logits per
    tensor, and the block's local loss is the sum of their losses."""

    def __init__(self, heads: list[nn.Module], shapes: tuple[tuple[int, ...], ...]):
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.shapes = tuple(shapes)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(head(t) for head, t in zip(self.heads, unpack(x, self.shapes)))


def build_cut_head(spec: HeadSpec, shapes: tuple[tuple[int, ...], ...], num_classes: int, *, name: str = "",
                   block_flops: int = 0) -> nn.Module:
    """:func:`build_head` for a cut crossed by tensors of per-sample ``shapes`` (a SplitHead for several,
    each with an equal share of the FLOP budget)."""
    if len(shapes) == 1:
        return build_head(spec, shapes[0], num_classes, name=name, block_flops=block_flops)
    return SplitHead([build_head(spec, s, num_classes, name=name, block_flops=block_flops // len(shapes))
                      for s in shapes], shapes)
