"""What a sweep keeps per block: its record, the tangent bundles it opens, and how their values are read."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import _persample

__all__ = ["BlockRecord", "Bundle", "Grads", "contract", "rows"]

Grads = dict[str, Tensor]


@dataclass
class BlockRecord:
    """What the sweep knows of one block."""

    out: Tensor
    inputs: tuple
    pull: Callable | None = None  # the block's vjp: cotangent of out[, argnums] -> (params[, input]) cotangents
    head_loss: Tensor | None = None  # mean head loss
    g: Tensor | None = None  # d head_loss / d out
    directions: Any = None  # the guess: activity (k, B, *h); weight [(k, *p)] per parameter
    normalise: bool = True
    units: list[list[int]] = field(default_factory=list)  # weight space: parameter indices per unit
    values: Tensor | None = None  # directional derivatives, per stream (and per output sample)
    target: list[Tensor] | None = None  # reference engine: the target gradient in the space
    rng: list[Tensor] | None = None  # the random state the block's forward started from, to replay its dropout
    rec: _persample.PerSampleRecord | None = None  # per-sample weight space: the block's record, until projected


@dataclass
class Bundle:
    """The tangent streams opened at block ``origin``, read at block ``end``'s output."""

    origin: int
    end: int
    tangents: Tensor


def contract(tangents: Tensor, cotangent: Tensor, per_sample: bool) -> Tensor:
    """``<cotangent_m, tangent_s,m>`` per stream s and output sample m; summed over m unless ``per_sample``."""
    values = (tangents * cotangent).flatten(2).sum(-1)
    return values if per_sample else values.sum(-1)


def rows(cotangent: Tensor) -> Tensor:
    """``(B, B, ...)``: row m holds sample m's cotangent, zeros elsewhere."""
    batch = cotangent.shape[0]
    eye = torch.eye(batch, dtype=cotangent.dtype, device=cotangent.device)
    return eye.view(batch, batch, *([1] * (cotangent.dim() - 1))) * cotangent
