"""Data-parallel forward-gradient steps on ``torch.distributed``: N ranks on 1/N of a batch each give what
one process gives on the whole batch, wherever the method allows it.

A forward-gradient step has no global backward pass, so DDP's gradient hooks never fire: the step reduces
its estimates itself, over the default process group or the one given to ``train_step`` /
``compute_gradients`` (gloo on CPU, NCCL on CUDA). Every loss is a batch mean, so with local batches
``B_r`` summing to ``B`` the whole batch's value of anything linear in the losses is
``sum_r (B_r / B) x_r``: each rank sends ``B_r x_r`` and ``B_r``, and divides the sums.

What is reduced, by method (the docs' "Scaling out" page has the table and the cost model):

* **Per-sample estimators** (activity space, ``per_sample`` either way, ``streams`` any; the per-sample
  weight space; backprop; local learning; the last block; the heads): each sample's estimate involves that
  sample's target and guess only, so the rank computes its samples' share of the gradient and the shares
  are averaged once, after the estimates are formed (:meth:`Reducer.ready`, :meth:`Reducer.finish`). In the
  eager step a bucket is sent as soon as the engine has formed its gradients (``BUCKET_BYTES``, as DDP's
  buckets), asynchronously, so its all-reduce overlaps the pull-backs of the next blocks.
* **Batch-level projections** (weight space, ``granularity="tensor"``, ``"block"``, ``"joint"``): the
  projection is not linear in the batch, so the *guess* and the *projection scalars* are reduced, not the
  estimates: a head guess ``G = sum_r w_r G_r`` is all-reduced where the sweep forms it, before its
  direction is pushed through the block (:meth:`Reducer.guess`, one collective per block; noise guesses
  are drawn identically on every rank and need none), and every block's directional derivatives
  ``<T, G> = sum_r w_r <T_r, G>`` in one bucket before the projection (:meth:`Reducer.values`). Both
  engines reduce the same scalars (the reference engine's ``<T_r, G>`` is its target gradient contracted with
  the reduced guess: by linearity, the same as all-reducing ``T`` and projecting, at a fraction of the
  traffic). The estimates are then identical on every rank and are not reduced again.
* **Not reducible**: ``space="span"`` projects each sample on the span of its own rank's guesses, and
  ``per_sample="exact"`` and the per-sample weight space read a sample's target *through* its rank's
  BatchNorm statistics; without synchronised BatchNorm, BatchNorm normalises each rank's batch on its own
  (as under DDP). These are computed per rank and averaged: they equal the single-process step when
  nothing couples samples, and are otherwise the estimator of a batch of ``B_r`` samples, averaged.

Noise: every rank draws the whole batch's per-sample noise from the shared generator and keeps its slice
(the batch sizes are exchanged first, one small all-reduce), so the generator stays in step on every rank,
and the per-parameter draws and NTK re-initialisations are the same everywhere.

Compiled steps: the in-sweep reductions of the batch-level projections run inside the compiled graph as
functional collectives (``torch.distributed._functional_collectives``); the buckets of estimates, buffers
and metrics are reduced after the compiled function returns, outside the graph.

Synchronised BatchNorm (``sync_batchnorm=True``): BatchNorm layers compute their batch statistics over the
whole group (``torch.nn.SyncBatchNorm``'s semantics) through :class:`_AllReduce`, an ``autograd.Function``
with a backward, a forward-mode (``jvp``) and a ``vmap`` rule, so the statistics' tangents and cotangents
are summed over the group inside ``torch.func`` transforms too.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._errors import FwdTransError
from .._method import Method
from .collectives import GroupFailure, failure, flatten, group_rank, guarded, timeout, unflatten
from .reducer import BUCKET_BYTES, Reducer
from .syncbn import enable_sync_batchnorm, sync_problems

__all__ = ["BUCKET_BYTES", "GroupFailure", "Reducer", "Replica", "broadcast_state", "enable_sync_batchnorm", "failure",
           "group_rank", "guarded", "resolve", "sync_problems", "timeout"]


class Replica(Protocol):
    """What a data-parallel step reads and sets of the converted model (``Converted`` is one)."""

    method: Method
    blocks: nn.ModuleList
    sync_batchnorm: bool
    generator: torch.Generator
    reducers: dict[tuple[int, bool], Reducer]  # per (group, synchronised BatchNorm): the step's reductions

    def modules(self) -> Any: ...

    def parameters(self, recurse: bool = True) -> Any: ...

    def buffers(self, recurse: bool = True) -> Any: ...


def resolve(converted: Replica, process_group: Any, distributed: bool | None,
            sync_batchnorm: bool | None, compile: bool) -> Reducer | None:
    """The step's :class:`Reducer`, or ``None`` for a single-process step: ``distributed=None`` reduces
    whenever ``torch.distributed`` is initialised (over ``process_group`` or the default group) and the
    group has more than one rank; ``False`` never; ``True`` requires a group."""
    if distributed is False:
        if process_group is not None:
            raise FwdTransError("process_group= was given with distributed=False. Fix: drop one of them.")
        return None
    ready = dist.is_available() and dist.is_initialized()
    if not ready:
        if distributed or process_group is not None:
            raise FwdTransError(
                "distributed=True (or process_group=) but torch.distributed is not initialised. Fix: call "
                "torch.distributed.init_process_group (torchrun sets its environment) before the step.")
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    if dist.get_rank(group) < 0:
        raise FwdTransError("process_group= does not hold this rank. Fix: pass a group this rank belongs to, or "
                            "distributed=False on ranks outside it.")
    if dist.get_world_size(group) == 1:
        return None
    sync = converted.sync_batchnorm if sync_batchnorm is None else sync_batchnorm
    method = converted.method
    if sync:
        problems = sync_problems(method, compile)
        if problems:
            raise FwdTransError(f"sync_batchnorm=True with {method.describe()}: " + "; ".join(problems) + ". Fix: "
                                "sync_batchnorm=False (each rank normalises its own batch, as under DDP), or change "
                                "the method.")
        enable_sync_batchnorm(converted)
    key = (id(group), bool(sync))
    if key not in converted.reducers:
        converted.reducers[key] = Reducer(group, method, len(converted.blocks), bool(sync))
    return converted.reducers[key]


def broadcast_state(converted: Replica, group: Any) -> None:
    """Make every rank start from rank 0's parameters, buffers and noise generator (as DDP does when it
    wraps a model): one broadcast per dtype and device, and one for the generator's state."""
    src = dist.get_global_rank(group, 0) if group is not None and group is not dist.group.WORLD else 0
    tensors = [t for t in (*converted.parameters(), *converted.buffers())]
    groups: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    with guarded("broadcast of rank 0's parameters", group), torch.no_grad():
        for members in groups.values():
            flat = flatten([t.detach() for t in members])
            dist.broadcast(flat, src, group=group)
            for t, r in zip(members, unflatten(flat, members), strict=True):
                t.copy_(r)
        like = tensors[0] if tensors else torch.empty(0)
        state = converted.generator.get_state().to(like.device)
        dist.broadcast(state, src, group=group)
        converted.generator.set_state(state.cpu())
