"""Spaces: where a block's target and guess live, and what one projection covers. One class per space.

A space is chosen once from the :class:`~fwdtrans.Method` (:func:`space_for`) and answers every question
the engine, ``check`` and ``Method.stream_count`` ask that depends on it:

* :meth:`Space.guess`: the block's directions, from the method's :class:`~fwdtrans._engine.guesses.Guess`;
* :meth:`Space.streams` and :meth:`Space.origin`: the tangent streams they open, where the guess lives
  and at the block output (where the forward engine carries them);
* :meth:`Space.reference_values`: the directional derivatives from a cotangent at the block output
  (the reference engine);
* :meth:`Space.estimate` (:meth:`Space.joint_estimates`) and :meth:`Space.gradients`: the estimate per
  projection unit, and the block's parameter gradients from it;
* :meth:`Space.alignment`: estimate, target and guess side by side, for ``check``;
* :meth:`Space.rerun` and :meth:`Space.warm`: the blocks a step runs twice (dropout replayed), and what a
  compiled step needs done eagerly first;
* and, as attributes, how the engine treats it (read per sample, pulled back, block run twice, sweeps of
  its own, ...).

Adding a space: a :class:`Space` subclass and one entry in :data:`SPACES`, keyed by the ``space=`` name
or, for a granularity with an estimator of its own, by ``(space, granularity)``; the option's name goes
in ``_method``'s ``Literal`` (which gives its type, its validation and its CLI choice), and its static facts
(the streams it opens, whether they are read per sample, multi-tensor cuts, its rules) in ``_method.Method``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor

from .. import _persample, _projection
from .._blocks import push_params
from .._method import Method
from .plan import Plan, SweepView
from .records import BlockRecord

__all__ = ["SPACES", "Activity", "PerSampleWeight", "Space", "Span", "Weight", "space_class", "space_for"]

Estimate = Any  # a tensor shaped like the block output (activity, span), or one tensor per parameter (weight)


class Space:
    """One space. The class attributes say how the engine treats it."""

    pulls_back = True  # the estimate is pulled back through the block (else it is the parameters' gradient)

    def __init__(self, method: Method):
        self.method = method
        self.k = method.tangents
        self.per_sample = method.reads_per_sample  # the streams' values are read per output sample
        self.param_tangents = method.param_tangents  # parameter directions pushed through the block, run again
        # the step runs a block's forward a second time: the random state its first run started from is
        # noted, to replay its dropout masks
        self.reruns_block = self.param_tangents and method.engine == "forward"

    def rerun(self, plan: Plan) -> tuple[int, ...]:
        """The blocks whose forward the step runs a second time: their random state is noted before the
        sweep runs them, to replay their dropout masks (which a compiled step cannot do)."""
        blocks = set(range(len(plan.blocks) - 1)) if self.reruns_block else set()
        if self.method.engine == "forward" and self.method.streams == "sequential" and self.method.target != "local":
            blocks |= set(range(1, len(plan.blocks)))  # each bundle is pushed again through the blocks it crosses
        return tuple(sorted(blocks))

    def warm(self, plan: Plan, inputs: tuple) -> None:
        """Eager work a compiled step needs done before it runs (``inputs``: the step's)."""

    def noise_shapes(self, plan: Plan, j: int, batch: int) -> list[tuple[int, ...]]:
        """The shapes of block ``j``'s noise guesses, drawn before the step."""
        raise NotImplementedError

    def guess(self, sweep: SweepView, j: int, b: BlockRecord) -> bool:
        """Set ``b``'s directions (and whatever the space's estimate needs); return whether they open
        streams (``False``: nothing to estimate, and ``b.values`` is set)."""
        raise NotImplementedError

    def streams(self, b: BlockRecord) -> Tensor | list[Tensor]:
        """The bundle's streams where the guess lives."""
        raise NotImplementedError

    def origin(self, sweep: SweepView, j: int, b: BlockRecord) -> Tensor:
        """The bundle's tangents at the block output ``(S, *out)``, for the forward engine."""
        raise NotImplementedError

    def reference_values(self, sweep: SweepView, j: int, b: BlockRecord, cotangent: Tensor) -> tuple[Tensor, list]:
        """The streams' values from the target's cotangent at the block output (per output sample, rows
        ``(B, B, ...)``, when ``per_sample``); and the target gradient in the space, for ``check``."""
        raise NotImplementedError

    def estimate(self, b: BlockRecord, values: Tensor, segments: tuple[int, ...]) -> Estimate:
        """The block's estimate from its streams' values (``segments``: the tensors packed at its cut)."""
        raise NotImplementedError

    def joint_estimates(self, blocks: Sequence[BlockRecord], total: Tensor, plan: Plan) -> list[Estimate]:
        """Every block's estimate from one value shared by all blocks (``Method.joint``)."""
        return [self.estimate(b, total, s) for b, s in zip(blocks, plan.segments, strict=True)]

    def gradients(self, sweep: SweepView, j: int, estimate: Estimate) -> dict[str, Tensor]:
        """Block ``j``'s parameter gradients, by name, from its estimate."""
        raise NotImplementedError

    def alignment(self, b: BlockRecord, estimate: Estimate, segments: tuple[int, ...]
                  ) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]] | None:
        """For ``check``: the target and the estimate (flat or as is), and the (target, guess) pairs whose
        cosines average to the paper's Eq. 6; ``None`` for a block with nothing estimated."""
        raise NotImplementedError


def _unit(g: Tensor) -> Tensor:
    """Each sample's slice divided by its norm (zero stays zero). Normalising before the tangents
    are pushed matters: with samples mixed downstream, one stream carries every sample's guess."""
    norms = g.flatten(1).norm(dim=1).clamp_min(torch.finfo(g.dtype).tiny)
    return g / norms.view(-1, *([1] * (g.dim() - 1)))


def _per_segment(v: Tensor, segments: tuple[int, ...], normalise: bool) -> Tensor:
    """With several ``segments`` (tensors packed in the block output, per-sample sizes) each tensor gets
    guesses of its own: ``(m * k, B, *h)``, row ``(i, t)`` being guess ``t`` restricted to tensor ``i``."""
    if len(segments) > 1:
        parts = v.flatten(2).split(list(segments), -1)
        v = torch.cat([torch.cat([p if i == k else torch.zeros_like(p) for k, p in enumerate(parts)], -1)
                       for i in range(len(parts))]).view(-1, *v.shape[1:])
    return torch.stack([_unit(r) for r in v]) if normalise else v


class Activity(Space):
    """``space="activity"`` (Eq. 5): the block output's gradient, projected per sample, then pulled back
    through the block. ``per_sample="exact"`` opens one stream per sample, read summed over the outputs."""

    def __init__(self, method: Method):
        super().__init__(method)
        self.exact = method.per_sample == "exact"

    def noise_shapes(self, plan, j, batch):
        return [(self.k, batch, *plan.cut_shapes[j])]

    def guess(self, sweep, j, b):
        v = sweep.guess.at_output(j, b.out, b.g, sweep.y, sweep.noise[j])
        b.normalise = sweep.guess.normalise
        b.directions = _per_segment(v, sweep.plan.segments[j], b.normalise)
        return True

    def streams(self, b):
        v = b.directions
        if not self.exact:
            return v  # stream i: guess i at every sample
        batch = v.shape[1]
        eye = torch.eye(batch, dtype=v.dtype, device=v.device).view(1, batch, batch, *([1] * (v.dim() - 2)))
        return (eye * v[:, :, None]).flatten(0, 1)  # stream (i, n): v_i,n at sample n only

    def origin(self, sweep, j, b):
        return self.streams(b)

    def reference_values(self, sweep, j, b, cotangent):
        if self.exact:  # stream (i, n) is v_i,n at sample n alone: its value is <t_n, v_i,n>, without the streams
            return (b.directions * cotangent).flatten(2).sum(-1).flatten(), [cotangent]
        streams = self.streams(b)
        if self.per_sample:
            return torch.einsum("mnd,snd->sm", cotangent.flatten(2), streams.flatten(2)), [cotangent.sum(0)]  # (S, B)
        return (streams * cotangent).flatten(1).sum(-1), [cotangent]

    def estimate(self, b, values, segments):
        v = b.directions
        k, batch = v.shape[:2]
        d = values.view(k, batch) if self.exact else values
        m = len(segments)  # each crossing tensor's guesses form their own group of rows
        est = sum(_projection.combine(di, vi.flatten(2), normalise=b.normalise, aggregation=self.method.aggregation)
                  for di, vi in zip(d.chunk(m), v.chunk(m), strict=True))
        return cast(Tensor, est).view_as(v[0])

    def gradients(self, sweep, j, estimate):
        return sweep.param_grads(j, estimate) if sweep.states[j][0] else {}

    def alignment(self, b, estimate, segments):
        target = b.target[0]
        first = b.directions.unflatten(0, (len(segments), -1))[:, 0].sum(0)  # each tensor's first guess, together
        t, v = target.flatten(1), first.flatten(1)
        return target, estimate, [(t[n], v[n]) for n in range(t.shape[0])]


class Span(Activity):
    """``space="span"`` (Table 6): each sample's output gradient projected on the span of the batch's
    guesses; stream ``m`` carries guess ``m`` at every sample."""

    def streams(self, b):
        u = b.directions[0]
        return u[:, None].expand(-1, *u.shape).contiguous()  # stream m: u_m at every sample

    def estimate(self, b, values, segments):
        u = b.directions[0]
        return _projection.span(values, u.flatten(1)).view_as(u)


class Weight(Space):
    """``space="weight"`` (Eq. 4): the block's parameter gradient, projected over the batch per unit of
    ``granularity``: each parameter tensor, the block, or every block at once (``"joint"``)."""

    pulls_back = False

    def units(self, tensors: int) -> list[list[int]]:
        """The projection units of a block: lists of its parameter indices."""
        return [[i] for i in range(tensors)] if self.method.granularity == "tensor" else [list(range(tensors))]

    def noise_shapes(self, plan, j, batch):
        return [(self.k, *p.shape) for p in plan.blocks[j].parameters() if p.requires_grad]

    def guess(self, sweep, j, b):
        trained = sweep.states[j][0]
        if not trained:  # nothing to estimate in a parameter-free block (a joint unit still counts it)
            b.directions, b.units = [], [[]] if self.method.granularity == "joint" else []
            b.values = b.out.new_zeros(len(b.units) * self.k)
            return False
        b.directions = sweep.guess.at_params(lambda: list(sweep.param_grads(j, b.g).values()), sweep.noise[j])
        if sweep.plan.reduce is not None:  # data parallel: the whole batch's guess, before it is pushed
            b.directions = sweep.plan.reduce.guess(sweep, b.directions)
        if sweep.guess.normalise:  # a head's gradient: a tensor whose guess is round-off has none (see _significant)
            keep = _significant(b.directions)
            b.directions = [torch.where(k.view(-1, *([1] * (v.dim() - 1))), v, 0)
                            for k, v in zip(keep, b.directions, strict=True)]
        b.normalise, b.units = sweep.guess.normalise, self.units(len(trained))
        return True

    def streams(self, b):
        # per parameter: the rows of every (unit, tangent) stream, zero outside the unit
        return [torch.cat([vi if i in unit else torch.zeros_like(vi) for unit in b.units])
                for i, vi in enumerate(b.directions)]

    def origin(self, sweep, j, b):
        first = {i: u * self.k for u, unit in enumerate(b.units) for i in unit}  # a parameter is in one unit
        directions = [(first[i], vi) for i, vi in enumerate(b.directions)]
        return push_params(sweep.plan.blocks[j], b.inputs, directions, len(b.units) * self.k, sweep.states[j], b.rng)

    def reference_values(self, sweep, j, b, cotangent):
        grads = list(sweep.target_param_grads(j, cotangent).values())
        return sum((s * g).flatten(1).sum(-1) for s, g in zip(self.streams(b), grads, strict=True)), grads

    def estimate(self, b, values, segments):
        v, k = b.directions, self.k
        est = [torch.zeros_like(vi[0]) for vi in v]
        for u_index, unit in enumerate(b.units):
            d = values[u_index * k:(u_index + 1) * k].view(k, 1)
            flat = torch.cat([v[i].flatten(1) for i in unit], dim=1)[:, None]  # (k, 1, D)
            e = _projection.combine(d, flat, normalise=b.normalise, aggregation=self.method.aggregation)[0]
            offset = 0
            for i in unit:
                n = v[i][0].numel()
                est[i] = e[offset:offset + n].view_as(v[i][0])
                offset += n
        return est

    def joint_estimates(self, blocks, total, plan):
        """One projection over every block's parameters: ``sum_i <T_i, G_i> / sum_i |G_i|^2 G_j``."""
        k = self.k
        out = []
        for b in blocks:
            if b.normalise:
                norm2 = sum((bb.directions[i] * bb.directions[i]).flatten(1).sum(-1)
                            for bb in blocks for i in range(len(bb.directions)))
                scale = total / norm2.clamp_min(torch.finfo(total.dtype).tiny)
            else:
                scale = total
            out.append([(scale.view(k, *([1] * (vi.dim() - 1))) * vi).mean(0) for vi in b.directions])
        return out

    def gradients(self, sweep, j, estimate):
        return dict(zip(sweep.states[j][0], estimate, strict=True))

    def alignment(self, b, estimate, segments):
        return _weight_alignment(b.target, b.directions, estimate)


def _significant(tensors: Sequence[Tensor]) -> Tensor:
    """``(P, k)`` for a block's ``P`` tensors of rows ``(k, *p)``: whether row ``i`` of a tensor is more than
    round-off next to the block's, ``|x_p| > sqrt(eps) |x|`` (``x`` all ``P`` tensors' rows ``i``). A head's loss
    may ignore a tensor (a bias before BatchNorm, one shifting every sample alike before the ``"mlp"`` head's
    BatchNorm): its gradient is zero but for round-off, whose direction depends on how it was computed."""
    norms = torch.stack([x.flatten(1).norm(dim=1) for x in tensors])
    return norms > torch.finfo(norms.dtype).eps ** 0.5 * norms.norm(dim=0)


def _weight_alignment(targets: list[Tensor] | None, guesses: list[Tensor], estimate: Sequence[Tensor]
                      ) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]] | None:
    """Weight space's ``alignment``: per parameter tensor the target, the estimate and the guess ``(1, *p)``; a
    tensor whose target or guess is round-off next to the block's has no direction and is left out of the pairs."""
    if not targets:
        return None
    keep = _significant([t[None] for t in targets])[:, 0] & _significant(guesses)[:, 0]
    pairs = [(t, v[0]) for t, v, k in zip(targets, guesses, keep.tolist(), strict=True) if k]
    return torch.cat([t.reshape(-1) for t in targets]), torch.cat([e.reshape(-1) for e in estimate]), pairs


class PerSampleWeight(Space):
    """``space="weight", granularity="sample"``: the official code's default weight space. Per sample ``n`` and
    parameter tensor, sample ``n``'s share ``t_n`` of the target's batch gradient projected on its share ``g_n``
    of the guess's (or on a per-sample noise draw ``v_n``), summed over the batch:
    ``sum_n <t_n, g_n> / (|g_n|^2 + eps) g_n`` (:mod:`fwdtrans._persample`).

    Its sweeps are the engine's own (``per_sample.PerSampleReference``, ``per_sample.PerSampleForward``): every block
    but the last runs through ``_persample.record``, and each block's estimate is formed at once from its
    target's and its guess's cotangents at the block output (reference engine: two pull-backs through the
    block; forward engine: one tangent stream per sample and parameter tensor, in chunks). So this class
    holds no streams, values or estimate of its own: only the guess, the gradients, ``check``'s alignment
    and its rerun/warm rules.
    """

    pulls_back = False

    def noise_shapes(self, plan, j, batch):
        return [(batch, *p.shape) for p in plan.blocks[j].parameters() if p.requires_grad]

    def guess(self, sweep, j, b):
        draws = sweep.guess.at_samples(sweep.noise[j])
        b.directions = None if draws is None else dict(zip(sweep.states[j][0], draws, strict=True))
        return True

    def gradients(self, sweep, j, estimate):
        return dict(estimate)

    def alignment(self, b, estimate, segments):
        return _weight_alignment(b.target, b.directions, list(estimate.values()))

    def rerun(self, plan):
        if self.method.engine != "forward":  # the reference engine runs every block once
            return ()
        last = len(plan.blocks) - 1  # the forward engine runs each block, and those its streams cross, again
        return tuple(range(last if self.method.target == "local" else last + 1))

    def warm(self, plan, inputs):
        """The blocks' rewritten graphs, and the shapes of their deltas for this batch (a run on the meta device)."""
        h: tuple | None = inputs
        for block in plan.blocks[:-1]:
            trained = {k: p for k, p in block.named_parameters() if p.requires_grad}
            if h is None:  # a block output that is not one tensor: the graph only
                _persample.prepare(block, trained)
                continue
            out = _persample.warm(block, trained, dict(block.named_buffers()), h)
            h = None if out is None else (out,)


# The spaces by ``space=`` name; a ``(space, granularity)`` key takes precedence, for a granularity with an
# estimator of its own (e.g. ``("weight", "sample"): PerSampleWeight``).
SPACES: dict[str | tuple[str, str], type[Space]] = {"activity": Activity, "weight": Weight, "span": Span,
                                                    ("weight", "sample"): PerSampleWeight}


def space_class(method: Method) -> type[Space]:
    """The class of the method's space."""
    return SPACES.get((method.space, method.granularity), SPACES[method.space])


def space_for(method: Method) -> Space:
    """The method's space (a sweep resolves it once and carries it)."""
    return space_class(method)(method)
