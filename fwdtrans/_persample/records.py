"""Records: what :func:`record` keeps of a block's forward for the projections (:func:`~.projection.project`,
:func:`~.forward.forward_project`): the block's output and new buffers, every site's recorded inputs, and a
pull-back from the block output to every site's output gradient (and to the block's inputs, ``wrt_inputs``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx
from torch.func import functional_call, vjp
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .._errors import FwdTransError
from .graph import Plan, plan_for, site_shapes


@dataclass
class PerSampleRecord:
    """What :func:`record` keeps of a block's forward for :func:`project`."""

    out: Any  # the block's output
    buffers: dict[str, Tensor]  # the block's buffers after the forward (new running statistics)
    pull: Callable[[Any], tuple] | None  # out's cotangent -> (delta cotangents[, input cotangents]); None: projected
    plan: Plan
    params: dict[str, Tensor]
    old_buffers: dict[str, Tensor]  # the buffers the forward read (eval-mode normalisation uses them)
    records: tuple | None  # per site, its recorded inputs; None once projected
    batch: int
    wrt_inputs: bool
    inputs: tuple = ()  # the block's inputs (the forward engine runs the block again to inject tangents)
    shapes: list[tuple[torch.Size, torch.dtype]] = field(default_factory=list)  # per site: its output's


def record(block: fx.GraphModule, params: dict[str, Tensor], buffers: dict[str, Tensor],
           inputs: tuple[Tensor, ...], wrt_inputs: bool = False) -> PerSampleRecord:
    """Run ``block`` once (``functional_call`` with ``params`` and cloned ``buffers``), keeping what
    :func:`project` needs: every parameterised layer's input and a pull-back to every layer's output
    gradient (and, with ``wrt_inputs``, to the block's inputs, for chaining the target backwards).

    ``params`` are the trained parameters (the block's own tensors are used for the others).
    """
    # torch.func differentiates on its own: outer autograd must not record this forward too
    params = {k: v.detach() for k, v in params.items()}
    inputs = tuple(tree_map(lambda x: x.detach() if isinstance(x, Tensor) else x, inputs))
    like = next((x for x in tree_flatten(inputs)[0] if isinstance(x, Tensor)), None)
    if like is None:
        raise FwdTransError("per-sample projection: the block's inputs hold no tensor (the batch size is read "
                            "from the first one)")
    plan = plan_for(block, params)
    shapes = site_shapes(plan, block, params, buffers, inputs)[0]
    deltas = tuple(like.new_zeros((), dtype=dt).expand(shape) for shape, dt in shapes)

    constants: list = []  # the recorded values that are not tensors (a size read from an input), and the layout

    def f(d: tuple[Tensor, ...], *x: Tensor) -> tuple[Any, tuple[list[Tensor], dict[str, Tensor]]]:
        fresh = {k: b.clone() for k, b in buffers.items()}
        out, recs = functional_call(plan.gm, (params, fresh), (d, *x))
        leaves, spec = tree_flatten(recs)
        constants[:] = [spec, [(isinstance(v, Tensor), None if isinstance(v, Tensor) else v) for v in leaves]]
        return out, ([v for v in leaves if isinstance(v, Tensor)], fresh)  # a vjp's aux holds tensors only

    if wrt_inputs:
        res: Any = vjp(f, deltas, *inputs, has_aux=True)
    else:
        res = vjp(lambda d: f(d, *inputs), deltas, has_aux=True)
    out, pull, (tensors, new) = res
    spec, leaves = constants
    it = iter(tensors)
    recs = tree_unflatten([next(it) if tensor else v for tensor, v in leaves], spec)
    batch = like.shape[0]
    return PerSampleRecord(out, new, pull, plan, dict(params), dict(buffers), recs, batch, wrt_inputs, inputs,
                           list(shapes))


def pull_inputs(rec: PerSampleRecord, cotangent: Tensor) -> tuple[Tensor, ...]:
    """The cotangents at the block's inputs of ``cotangent`` at its output (a record made
    ``wrt_inputs``, not yet projected): e.g. an intermediate target, block ``j + 1``'s head loss
    pulled back to block ``j``'s output. One more pull-back through the block."""
    if not rec.wrt_inputs or rec.pull is None:
        raise FwdTransError("pull_inputs needs a record made with wrt_inputs=True that was not projected yet")
    return tuple(rec.pull(cotangent)[1:])
