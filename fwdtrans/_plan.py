"""The plan of a step: everything the engine needs besides the batch and the noise, fixed by ``convert``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ._method import Method

__all__ = ["Plan", "cut_shapes", "segments"]

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
        reduce: a data-parallel step's reductions over a process group (a ``_distributed.Reducer``, set per
            step by ``Converted``), or ``None``: the engine hands it what it reduces (weight-space guesses and
            directional derivatives, finished gradients).
        faulty_conv: the blocks or heads hold a convolution that oneDNN's AVX2 kernels get wrong channels-last
            (``_engine.faulty_conv``): a compiled step on a CPU keeps the default layout.
    """

    blocks: Sequence[nn.Module]
    heads: Sequence[nn.Module]
    method: Method
    crossing_shapes: Shapes
    dropout: tuple[bool, ...]
    reduce: Any = None
    faulty_conv: bool = False

    @property
    def segments(self) -> tuple[tuple[int, ...], ...]:
        return segments(self.crossing_shapes)

    @property
    def cut_shapes(self) -> tuple[tuple[int, ...], ...]:
        return cut_shapes(self.crossing_shapes)
