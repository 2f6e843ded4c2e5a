"""The cost model: what one step of a method costs with each engine, in forward passes.

A FLOP model in units of ``F``, one forward pass of the blocks (the heads excluded), from each block's
forward FLOPs ``f_j`` (as a fraction of ``F``), its head's ``h_j``, its number of trained parameter tensors
``P_j`` and the streams it opens ``s_j`` (``Method.stream_count``'s, per block). It counts:

* a block's forward: ``f_j``; its pull-back to its parameters and input: ``2 f_j`` (a weight gradient
  and an input gradient per layer, each about the forward's FLOPs); to its input alone: ``f_j``; to its
  parameters alone: ``2 f_j`` (the layers' input gradients inside the block are still needed);
* a tangent stream crossing block ``k``: ``f_k`` (a JVP of a linear layer costs its forward), and
  opened from a parameter direction at its own block ``j``: ``2 f_j`` (the weight's tangent and the
  input's, per layer) plus one more primal forward of the block per bundle;
* a head: forward ``h_j``, backward ``2 h_j`` when it is trained (``h_j`` to its input otherwise).

Backprop is ``3F``. What the model leaves out is what makes measured ratios exceed it: small layers
(the heads' convolutions) and a convolution's backward being slower per FLOP than its forward in oneDNN,
and, in blocks without tangent rules (``_tangents``), ``vmap(jvp)``'s overheads (train-mode BatchNorm's
tangent from its decomposition). The docs' Methods page gives the model next to measured ratios.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from torch import nn

from ._cuts import CutPoint
from ._method import BACKPROP, Cost, Method
from .heads import head_flops

__all__ = ["of_blocks", "predict"]

def predict(method: Method, block_flops: Sequence[float], head_flops: Sequence[float], tensors: Sequence[int],
            batch: int, out_sizes: Sequence[int] = (), crossing: Sequence[int] | None = None) -> Cost:
    """The cost of one step of ``method`` on a chain of blocks.

    ``block_flops``: forward FLOPs per block (any unit); ``head_flops``: per head (blocks but the last, the same
    unit); ``tensors``: trained parameter tensors per block; ``out_sizes``: per-sample elements of each block's
    output (for ``tangent_bytes``); ``crossing``: tensors crossing each cut (1 each by default).
    """
    total = float(sum(block_flops)) or 1.0
    f = [x / total for x in block_flops]
    h = [x / total for x in head_flops]
    last = len(f) - 1
    crossing = list(crossing or [1] * len(f))
    if method.kind == "backprop":
        return Cost(0, BACKPROP, BACKPROP)
    heads = sum(h[:last]) * (3.0 if method.trains_heads else 2.0)
    if method.kind == "local":
        cost = 1.0 + 2.0 * sum(f) + heads
        return Cost(0, cost, cost)
    k, joint = method.tangents, method.joint
    opened = [method.streams_at(batch, tensors[j], crossing[j]) if tensors[j] or not method.param_tangents else 0
              for j in range(last)]
    ends = [method.target_end(j, last) for j in range(last)]
    head_guess = not callable(method.guess) and method.guess in ("local", "ntk", "fixed-ntk")
    sample = method.per_sample_weight
    base = 1.0 + heads + 2.0 * f[last]  # the forward, the heads, the last block's exact gradient

    # reference engine: the walk back (input gradients only; per output sample: one row per sample), then per block
    rows = batch if method.reads_per_sample else 1
    walk = rows * sum(f[1:]) if method.target != "local" else 0.0
    reference = base + walk
    for j in range(last):
        if not tensors[j]:
            continue
        if sample:  # two pull-backs through the recorded block and the per-layer contractions
            reference += 4.0 * f[j]
        elif method.param_tangents:  # the target's parameter gradient, and the guess's
            reference += 2.0 * f[j] * (2 if head_guess else 1)
        else:  # the estimate's pull-back to the parameters
            reference += 2.0 * f[j]

    # forward engine: the estimate's pull-backs or the parameter directions' tangents, and the streams' crossings
    forward = base
    crossings = [0.0] * len(f)  # streams pushed through each block from its input
    alive = [0] * len(f)  # streams open at each block's output
    for j in range(last):
        if method.param_tangents:
            if tensors[j]:
                forward += (2.0 * f[j] if head_guess else 0.0) + f[j] + opened[j] * 2.0 * f[j]
        else:
            forward += 2.0 * f[j] + (f[j] if method.recompute else 0.0)
        if joint:
            continue
        for i in range(j, ends[j] + 1):
            alive[i] += opened[j]
            if i > j:
                crossings[i] += opened[j]
                if method.streams == "sequential":
                    forward += f[i]  # each bundle runs the primal of the blocks it crosses again
    if joint:
        crossings[1:] = [float(k)] * last
        alive = [k] * len(f)
    forward += sum(c * fi for c, fi in zip(crossings, f, strict=True))
    streams = dataclasses.replace(method, engine="forward").stream_count(len(f), batch, list(tensors), crossing)
    sizes = list(out_sizes) or [0] * len(f)
    tangent_bytes = max((a * batch * sizes[i] * 4 for i, a in enumerate(alive[:last])), default=0)
    return Cost(streams, forward, reference, tangent_bytes=tangent_bytes)


def of_blocks(method: Method, blocks: Sequence[nn.Module], heads: Sequence[nn.Module], cuts: Sequence[CutPoint],
              costs: Sequence[dict[str, int]], example_batch: int, batch: int) -> Cost:
    """:func:`predict` for the blocks ``convert`` makes (``costs``: ``block_costs``' figures on ``example_batch``
    samples), at a step of ``batch`` samples."""
    per_sample = [c["flops"] / max(example_batch, 1) for c in costs]
    head = []
    for h, cut in zip(heads, cuts, strict=False):
        try:
            head.append(float(head_flops(h, tuple(cut.shape[1:]))))
        except (RuntimeError, TypeError, ValueError):  # a head that takes several tensors: FLOPs unknown, free
            head.append(0.0)
    sizes = [sum(math.prod(s) for s in cut.shapes) for cut in cuts] + [0]
    tensors = [sum(1 for p in b.parameters() if p.requires_grad) for b in blocks]
    return predict(method, per_sample, head, tensors, batch, sizes, [max(1, len(c.crossing)) for c in cuts] + [1])
