"""Forward mode: the estimates of :func:`~.projection.project` with ``<t_n, g_n>`` from forward-mode AD (the
forward engine). Sample ``n``'s share is the gradient with respect to a copy of the parameter only sample ``n``
uses, so ``<t_n, g_n>`` is the target's derivative along a tangent injected at the output of each layer using
the parameter (the layer's response to the weight ``g_n`` on sample ``n``'s input, zero at the other samples;
:meth:`~.rules.Rules.site_tangent`), pushed through the rest of the block by the rewritten graph under
``vmap(jvp)`` with respect to those layers' deltas, and on to the target by the caller. One stream per sample
and parameter tensor, in chunks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import functional_call, jvp, vmap

from .._blocks import norm_affine, replaying
from .projection import Context, check_args, projected
from .records import PerSampleRecord


def forward_project(rec: PerSampleRecord, guess_cot: Tensor | None, noise: dict[str, Tensor] | None,
                    read: Callable[[Tensor], Tensor], eps: float = 1e-16, chunk: int | None = None,
                    path: str = "auto", rng: list[Tensor] | None = None) -> dict[str, Tensor]:
    """The estimates of :func:`project`, with ``<t_n, g_n>`` from forward-mode AD instead of the
    target's pull-back (the forward engine): no target cotangent is pulled through the block.

    Sample ``n``'s share of a parameter's gradient is the gradient with respect to a copy of the
    parameter that only sample ``n`` uses, so ``<t_n, g_n>`` is the target's derivative along a
    perturbation of that copy by ``g_n``: a tangent injected at the output of every layer using the
    parameter, equal to the layer's response to the weight ``g_n`` on sample ``n``'s input (zero at the
    other samples), and pushed forward from there (through the coupling of train-mode BatchNorm) to the
    target. One *stream* per sample and parameter tensor, ``B`` times the block's trained tensors in all,
    pushed in chunks of ``chunk`` streams (default: as many as keep their tangents at the layers' outputs
    within 8 times what the block records for the whole batch); each chunk runs the block once more, under
    ``vmap(jvp)``. For each chunk ``read`` takes the tangents at the block output ``(S, *out)`` (the caller
    pushes them on to the target and contracts them with its cotangent) and returns the ``S`` directional
    derivatives. ``rng`` is the random state the block's forward started from: the block must draw the same
    dropout masks in every run.
    """
    pull = check_args(rec, guess_cot, noise, path)
    grads: list[tuple[Tensor, ...]] = ([(gg,) for gg in pull(guess_cot)[0]] if noise is None
                                       else [() for _ in rec.plan.sites])
    del pull
    rec.pull = None
    ctx = Context(rec, grads, eps, None, path)
    rec.records = None
    est = {name: torch.zeros_like(p) for name, p in rec.params.items()}
    names, b = list(rec.plan.uses), rec.batch
    per_stream = sum(math.prod(shape) for shape, _ in rec.shapes) or 1  # a stream's tangents at the layers
    size = max(1, min(b * len(names), chunk if chunk is not None else 8 * ctx._budget // per_stream))
    streams = [(name, n) for name in names for n in range(b)]  # (parameter, sample), in chunks of ``size``
    for first in range(0, len(streams), size):
        pieces: list[tuple[str, slice, int]] = []  # (parameter, its samples, the first one's row in the chunk)
        for row, (name, n) in enumerate(streams[first:first + size]):
            if pieces and pieces[-1][0] == name:
                pieces[-1] = (name, slice(pieces[-1][1].start, n + 1), pieces[-1][2])
            else:
                pieces.append((name, slice(n, n + 1), row))
        count = min(size, len(streams) - first)
        tangents: dict[int, Tensor] = {}  # per site: (count, B, *out_i), stream r at its sample only
        directions = []
        for name, sl, row in pieces:
            uses = rec.plan.uses[name]
            g = ctx.shares_summed(uses, sl, 0) if noise is None else noise[name][sl]
            directions.append(g)
            index = torch.arange(sl.stop - sl.start, device=g.device)
            for i, local in uses:
                t = ctx.site_tangent(i, local, sl, g)
                if i not in tangents:
                    tangents[i] = t.new_zeros(count, *rec.shapes[i][0])
                tangents[i].index_put_((index + row, index + sl.start), t, accumulate=True)
        d = read(_push(rec, tangents, rng))
        for (name, sl, row), g in zip(pieces, directions, strict=True):
            est[name] += projected(d[row:row + g.shape[0]], g, eps)
            if sl.stop == b:  # the parameter's last stream
                ctx.finished(name)
    return est


def _push(rec: PerSampleRecord, tangents: dict[int, Tensor], rng: list[Tensor] | None) -> Tensor:
    """``(S, *out)``: the block output's tangents of ``S`` streams given by their tangents ``(S, *out_i)`` at the
    outputs of sites ``i`` (other sites: zero): one run of the rewritten block under ``vmap(jvp)`` with respect
    to those sites' deltas."""
    first = next(iter(tangents.values()))
    streams = list(tangents.values())
    index = list(tangents)
    zeros = [first.new_zeros((), dtype=dt).expand(shape) for shape, dt in rec.shapes]
    params = {**dict(rec.plan.gm.named_parameters()), **rec.params}
    # under torch.compile the norms' affine parameters join the primals (pytorch/pytorch#139756, see _blocks.push)
    dual = {k: params[k] for k in norm_affine(rec.plan.gm) if k in params} if torch.compiler.is_compiling() else {}
    dual_zeros = {k: torch.zeros_like(v) for k, v in dual.items()}

    def f(d: tuple[Tensor, ...], p: dict[str, Tensor]) -> Tensor:
        deltas = list(zeros)
        for k, dk in zip(index, d, strict=True):
            deltas[k] = dk
        fresh = {k: v.clone() for k, v in rec.old_buffers.items()}
        return functional_call(rec.plan.gm, ({**params, **p}, fresh), (tuple(deltas), *rec.inputs))[0]

    primal = tuple(torch.zeros(zeros[k].shape, dtype=zeros[k].dtype, device=zeros[k].device) for k in index)
    with replaying(rng):
        return vmap(lambda *t: jvp(f, (primal, dual), (t, dual_zeros))[1], randomness="same")(*streams)
