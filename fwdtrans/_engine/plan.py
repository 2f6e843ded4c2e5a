"""The plan of a step: everything the engine needs besides the batch and the noise, fixed by ``convert``;
and the two hooks through which code outside the engine sees a sweep as it runs (:class:`Reducer`, which a
data-parallel step plugs in, and :class:`SweepView`, what a space or a reducer reads of the sweep)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor, nn

from .._blocks import State
from .._method import Method
from .guesses import Guess
from .records import BlockRecord, Grads

__all__ = ["Plan", "Reducer", "SweepView", "cut_shapes", "segments"]

Shapes = tuple[tuple[tuple[int, ...], ...], ...]  # per cut: the per-sample shapes of the tensors crossing it


def segments(crossing_shapes: Shapes) -> tuple[tuple[int, ...], ...]:
    """Per cut: the per-sample sizes of the tensors crossing it (packed in that order)."""
    return tuple(tuple(math.prod(t) for t in shapes) for shapes in crossing_shapes)


def cut_shapes(crossing_shapes: Shapes) -> tuple[tuple[int, ...], ...]:
    """Per cut: the per-sample shape of the block output (one tensor, or ``(D,)`` when several are packed)."""
    return tuple(shapes[0] if len(shapes) == 1 else (sum(sizes),)
                 for shapes, sizes in zip(crossing_shapes, segments(crossing_shapes), strict=True))


@dataclass(frozen=True)
class Plan:
    """One step's fixed inputs: the engine reads these and nothing else of the converted model.

    Attributes:
        blocks: the chain of blocks; block 0 takes the model's inputs, each later one the previous output.
        heads: one auxiliary head per block but the last.
        method: what each block's gradient is.
        crossing_shapes: per cut, the per-sample shapes of the tensors crossing it.
        dropout: per block, whether its forward draws random numbers (replayed when it runs twice).
        reduce: a data-parallel step's reductions over a process group (a :class:`Reducer`, set per step by
            ``Converted``), or ``None``: the engine hands it what it reduces (weight-space guesses and
            directional derivatives, finished gradients).
        faulty_conv: the blocks or heads hold a convolution that oneDNN's AVX2 kernels get wrong channels-last
            (``layout.faulty_conv``): a compiled step on a CPU keeps the default layout.
    """

    blocks: Sequence[nn.Module]
    heads: Sequence[nn.Module]
    method: Method
    crossing_shapes: Shapes
    dropout: tuple[bool, ...]
    reduce: Reducer | None = None
    faulty_conv: bool = False

    @property
    def segments(self) -> tuple[tuple[int, ...], ...]:
        return segments(self.crossing_shapes)

    @property
    def cut_shapes(self) -> tuple[tuple[int, ...], ...]:
        return cut_shapes(self.crossing_shapes)


class SweepView(Protocol):
    """What a space, a guess or a :class:`Reducer` reads of the sweep running a step."""

    plan: Plan
    method: Method
    guess: Guess
    y: Tensor
    noise: list[list[Tensor]]
    states: list[State]
    blocks: list[BlockRecord]

    def param_grads(self, j: int, cotangent: Tensor) -> Grads:
        """Block ``j``'s parameter gradients from a cotangent at its output."""
        ...

    def target_param_grads(self, j: int, cotangent: Tensor) -> Grads:
        """The same for the target's cotangent (the reference engine may have them already)."""
        ...


class Reducer(Protocol):
    """A data-parallel step's hooks into the sweep (``_distributed.Reducer``); the engine calls them as it runs,
    eagerly or compiled. A pipeline of stages would plug in here too."""

    def guess(self, sweep: SweepView, directions: list[Tensor]) -> list[Tensor]:
        """A block's weight-space guess over the whole batch, before it is pushed."""
        ...

    def values(self, sweep: SweepView) -> None:
        """Every block's directional derivatives over the whole batch, before the projection."""
        ...

    def ready(self, prefix: str, tensors: dict[str, Tensor]) -> None:
        """Final gradients of ``prefix`` (``blocks.{j}``, ``heads.{j}``), formed while the sweep goes on."""
        ...
