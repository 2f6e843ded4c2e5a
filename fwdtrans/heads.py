"""Auxiliary heads: the small classifiers that give each block its local loss and its guess.

``convert(..., heads=...)`` accepts ``"auto"`` (the default: the largest paper-style head whose
forward FLOPs stay under 10% of its block's), ``"cnn"``, ``"mlp"``, ``"linear"``, one of the specs
below (to choose a width or a budget), an ``nn.Module`` mapping ``(N, *shape)`` features to logits,
any callable ``shape -> nn.Module`` that receives the per-sample shape of the block output (e.g.
``(C, H, W)``) and returns such a module (one with two required positional parameters is called
``(shape, num_classes)``), or a dict from cut names to any of these (key ``"*"`` for
the rest). A dict key may be any name that ``blocks=[...]`` accepts for the cut (its aliases
included); a key that names none of the cuts is refused, listing the valid ones.

A module, given directly or returned by a callable, is deep-copied: each cut gets its own head, and
fwdtrans never trains, moves or otherwise changes the object you passed. ``convert`` runs every head
once on its block's output for the example inputs and refuses one that does not return logits
``(N, num_classes)``.

Feature shapes: images ``(C, H, W)`` get the paper's heads; tokens ``(T, D)`` are averaged over
tokens first; flat features ``(D,)`` get MLP or linear heads.

Examples:
    >>> import torch, fwdtrans
    >>> head = fwdtrans.heads.CNNHead(width=8).build((16, 32, 32), num_classes=10)
    >>> sum(p.numel() for p in head.parameters())
    2250
    >>> mine = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.LazyLinear(10))
    >>> converted = fwdtrans.convert(fwdtrans.models.resnet18(width=4), torch.randn(2, 3, 32, 32),
    ...                              blocks=["layer2"], heads={"layer2": mine})
    >>> converted.heads[0] is mine
    False

The three families follow the paper (section 4.1 and appendix A.2 of Fournier et al., 2023).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ._cuts import CutPoint, unpack
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
    """1x1 conv (C->width) + BN + ReLU, ``depth`` x [3x3 conv stride 2 + BN + ReLU], 2x2 pool, linear.

    On CPU the head runs its layers in channels-last memory format (faster there; its input and the
    gradient fwdtrans hands back to the block keep the block output's layout).
    """

    width: int = 32
    depth: int = 3

    def build(self, shape: tuple[int, ...], num_classes: int) -> nn.Module:
        c = _image(shape, "cnn")
        layers: list[nn.Module] = [nn.Conv2d(c, self.width, 1, bias=False), nn.BatchNorm2d(self.width), nn.ReLU()]
        for _ in range(self.depth):
            layers += [nn.Conv2d(self.width, self.width, 3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(self.width), nn.ReLU()]
        return _CNN(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * self.width, num_classes))


class _CNN(nn.Sequential):
    """A CNN head's layers; on CPU they run in channels-last memory format, where oneDNN's kernels for
    these few channels are faster (the paper's head on 16x32x32 features: forward and backward 1.36x
    faster on a 2-core Xeon; the same layers, the same values up to float rounding). None of them is the
    case oneDNN's AVX2 kernels get wrong channels-last (``fwdtrans._engine.faulty_conv``): the 1x1
    convolution has stride 1, the strided ones are 3x3."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x)


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
            return nn.Sequential(nn.BatchNorm2d(c), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                 nn.Linear(4 * c, num_classes))
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

    def candidates(self, shape: tuple[int, ...]) -> list[CNNHead | MLPHead]:
        if len(shape) == 3:
            return [CNNHead(width=w) for w in (32, 16, 8, 4)]
        return [MLPHead(width=w) for w in (1024, 512, 256, 128, 64, 32)]

    def choose(self, shape: tuple[int, ...], num_classes: int, block_flops: int) -> CNNHead | MLPHead | LinearHead:
        for spec in self.candidates(shape):
            if head_flops(spec.build(shape, num_classes), shape) <= self.budget * block_flops:
                return spec
        return LinearHead()


HeadSpec = (str | CNNHead | MLPHead | LinearHead | AutoHead | nn.Module | Callable[..., nn.Module]
            | Mapping)
_NAMED: dict[str, HeadSpec] = {"cnn": CNNHead(), "mlp": MLPHead(), "linear": LinearHead(), "auto": AutoHead()}


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
               block_flops: int = 0, aliases: Sequence[str] = ()) -> nn.Module:
    """Instantiate ``spec`` for the block ending at cut ``name`` (also called ``aliases``) with
    per-sample output ``shape``; a module is deep-copied.

    ``block_flops`` (per sample) sizes ``"auto"`` heads.
    """
    if isinstance(spec, Mapping):
        key = next((k for k in (name, *aliases, "*") if k in spec), None)
        if key is None:
            raise FwdTransError(f"heads: no head for the block ending at '{name}'. Fix: add it, or a '*' entry.")
        spec = spec[key]
    if isinstance(spec, str):
        if spec not in _NAMED:
            raise FwdTransError(f"heads='{spec}' is unknown. Fix: use one of {sorted(_NAMED)} or a callable.")
        spec = _NAMED[spec]
    if isinstance(spec, AutoHead):
        spec = spec.choose(tuple(shape), num_classes, block_flops)
    if isinstance(spec, (CNNHead, MLPHead, LinearHead)):
        return spec.build(tuple(shape), num_classes)
    head = _call(spec, tuple(shape), num_classes) if callable(spec) and not isinstance(spec, nn.Module) else spec
    if not isinstance(head, nn.Module):
        raise FwdTransError(
            f"heads: the head callable returned {type(head).__name__}, not an nn.Module." if head is not spec else
            f"heads={spec!r}: expected 'auto', 'cnn', 'mlp', 'linear', a head spec, an nn.Module, a callable or a dict."
        )
    return copy.deepcopy(head)


def check_head_keys(spec: HeadSpec, cuts: Sequence[CutPoint]) -> None:
    """Refuse a ``heads`` mapping with a key that names none of ``cuts`` (any name ``blocks=`` accepts for
    a cut counts), or with two keys for one cut."""
    if not isinstance(spec, Mapping):
        return
    cut_of = {a: c.name for c in cuts for a in c.aliases}
    unknown = [k for k in spec if k != "*" and k not in cut_of]
    if unknown:
        raise FwdTransError(
            f"heads: {', '.join(map(repr, unknown))} names no cut of this conversion. Valid keys: "
            f"{', '.join(repr(c.name) for c in cuts)} (or another name of the same cut that blocks= accepts) and '*' "
            "for the others. Fix: use those keys, or cut there too with blocks=[...]."
        )
    named = [cut_of[k] for k in spec if k != "*"]
    twice = sorted({n for n in named if named.count(n) > 1})
    if twice:
        raise FwdTransError(f"heads: several keys name the cut '{twice[0]}'. Fix: keep one key per cut.")


def _batched(shape: tuple[int, ...]) -> str:
    return "(N" + "".join(f", {d}" for d in shape) + ")"


def check_head(head: nn.Module, h: Tensor, num_classes: int, name: str) -> None:
    """Run ``head`` once on its block's output ``h`` (in the caller's mode and grad context); refuse it unless
    it returns logits ``(N, num_classes)`` (each of a SplitHead's heads on its own tensor)."""
    pairs = zip(head.heads, unpack(h, head.shapes), strict=True) if isinstance(head, SplitHead) else [(head, h)]
    expected = (h.shape[0], num_classes)
    for one, x in pairs:
        try:
            out = one(x)
        except Exception as e:  # noqa: BLE001 - any failure of user code is reported with the shapes
            raise FwdTransError(
                f"heads: the head of the block ending at '{name}' ({type(one).__name__}) fails on the block's output "
                f"{tuple(x.shape)}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}. Fix: make it map "
                f"features {_batched(x.shape[1:])} to logits (N, {num_classes})."
            ) from None
        if not isinstance(out, Tensor) or tuple(out.shape) != expected:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise FwdTransError(
                f"heads: the head of the block ending at '{name}' ({type(one).__name__}) maps the block's output "
                f"{tuple(x.shape)} to {got}, not to logits {expected} (batch, classes). Fix: make it map "
                f"features {_batched(x.shape[1:])} to (N, {num_classes}), e.g. ending with nn.Flatten() and "
                f"nn.Linear(features, {num_classes})."
            )


class SplitHead(nn.Module):
    """The heads of a cut that several tensors cross (``convert(..., multi_tensor=True)``): one head
    per tensor, each reading its own part of the packed block output; returns one set of logits per
    tensor, and the block's local loss is the sum of their losses."""

    def __init__(self, heads: list[nn.Module], shapes: tuple[tuple[int, ...], ...]):
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.shapes = tuple(shapes)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(head(t) for head, t in zip(self.heads, unpack(x, self.shapes), strict=True))


def _call(fn: Callable, shape: tuple[int, ...], num_classes: int) -> object:
    """A head callable's head: ``fn(shape, num_classes)`` when it requires two positional parameters, else
    ``fn(shape)``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins): the documented one
        return fn(shape)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    if len(required) == 2:
        return fn(shape, num_classes)
    if len(required) > 2 or not (positional or any(p.kind == p.VAR_POSITIONAL for p in params)):
        raise FwdTransError(f"heads: the head callable {getattr(fn, '__name__', fn)!r} has the signature "
                            f"{inspect.signature(fn)}. Fix: make it head(shape) or head(shape, num_classes), "
                            "returning an nn.Module.")
    return fn(shape)


def build_cut_head(spec: HeadSpec, shapes: tuple[tuple[int, ...], ...], num_classes: int, *, name: str = "",
                   block_flops: int = 0, aliases: Sequence[str] = ()) -> nn.Module:
    """:func:`build_head` for a cut crossed by tensors of per-sample ``shapes`` (a SplitHead for several,
    each with an equal share of the FLOP budget)."""
    if len(shapes) == 1:
        return build_head(spec, shapes[0], num_classes, name=name, block_flops=block_flops, aliases=aliases)
    return SplitHead([build_head(spec, s, num_classes, name=name, block_flops=block_flops // len(shapes),
                                 aliases=aliases) for s in shapes], shapes)
