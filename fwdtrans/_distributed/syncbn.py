"""Synchronised BatchNorm: statistics over the whole process group, inside ``torch.func`` transforms too."""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._errors import FwdTransError
from .._method import Method
from .collectives import all_reduce

__all__ = ["SYNC", "SyncedBatchNorm1d", "SyncedBatchNorm2d", "SyncedBatchNorm3d", "enable_sync_batchnorm",
           "sync_problems"]

# the group whose BatchNorm statistics synchronised BatchNorm layers share, during a step that asks for it
SYNC: contextvars.ContextVar[Any] = contextvars.ContextVar("fwdtrans_sync_batchnorm", default=None)


class _AllReduce(torch.autograd.Function):
    """Sum over a process group, differentiable in both modes and under ``vmap``: its adjoint and its
    tangent map are the same sum (a cotangent or tangent per rank, summed), and a batch of tensors is summed
    element by element, so ``vmap`` sends the batched tensor at once. Collectives run in program order,
    which is the same on every rank: every rank runs the same transforms over the same blocks."""

    @staticmethod
    def forward(x: Tensor, group: Any) -> Tensor:
        out = x.clone(memory_format=torch.contiguous_format)
        all_reduce(out, group, "BatchNorm statistics' all-reduce")
        return out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _AllReduce.apply(grad, ctx.group), None

    @staticmethod
    def jvp(ctx: Any, tangent: Tensor, _: Any) -> Tensor:
        return _AllReduce.apply(tangent, ctx.group)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, x: Tensor, group: Any) -> tuple[Tensor, int | None]:
        return _AllReduce.apply(x, group), in_dims[0]


# ----------------------------------------------------------------------------- synchronised BatchNorm
def _sync_batch_norm(m: nn.modules.batchnorm._BatchNorm, x: Tensor, group: Any) -> Tensor:
    """``m(x)`` with batch statistics over ``group`` (every rank's batch of the same size): each rank's mean
    and sum of squared deviations, gathered in one all-reduce (a slot per rank), combined exactly (Chan et
    al.); the running statistics are updated with the whole batch's mean and unbiased variance, as
    ``torch.nn.SyncBatchNorm`` does, so they are the same on every rank."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    channels = x.shape[1]
    dims = [0, *range(2, x.dim())]
    shape = (1, channels, *([1] * (x.dim() - 2)))
    n = x.numel() // channels  # values per channel on this rank (the same on every rank)
    mean = x.mean(dims)
    m2 = ((x - mean.view(shape)) ** 2).sum(dims)
    local = torch.stack([mean, m2])[None]  # (1, 2, C)
    slots = torch.cat([local.new_zeros(rank, 2, channels), local, local.new_zeros(world - rank - 1, 2, channels)])
    means, m2s = _AllReduce.apply(slots, group).unbind(1)  # (world, C) each
    total = n * world
    gmean = means.mean(0)
    gm2 = (m2s + n * (means - gmean) ** 2).sum(0)
    y = (x - gmean.view(shape)) * torch.rsqrt(gm2.view(shape) / total + m.eps)
    if m.weight is not None:
        y = y * m.weight.view(shape)
    if m.bias is not None:
        y = y + m.bias.view(shape)
    if m.training and m.track_running_stats and m.running_mean is not None and m.running_var is not None:
        factor = 0.0 if m.momentum is None else m.momentum
        if m.num_batches_tracked is not None:
            m.num_batches_tracked.add_(1)
            if m.momentum is None:  # a cumulative moving average
                factor = 1.0 / float(m.num_batches_tracked)
        with torch.no_grad():
            m.running_mean.mul_(1 - factor).add_(gmean.detach(), alpha=factor)
            m.running_var.mul_(1 - factor).add_((gm2 / (total - 1)).detach(), alpha=factor)
    return y


class _Synced:
    """Mixed into a BatchNorm class: during a step with ``sync_batchnorm``, batch statistics over the group;
    otherwise (evaluation, ``check``, a step without it) exactly the class's own forward."""

    def forward(self, input: Tensor) -> Tensor:
        group = SYNC.get()
        m: Any = self
        uses_batch = m.training or (m.running_mean is None and m.running_var is None)
        if group is None or not uses_batch:
            return super().forward(input)  # type: ignore[misc]
        m._check_input_dim(input)
        return _sync_batch_norm(m, input, group)


class SyncedBatchNorm1d(_Synced, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose batch statistics span the process group during a synchronised step."""


class SyncedBatchNorm2d(_Synced, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose batch statistics span the process group during a synchronised step."""


class SyncedBatchNorm3d(_Synced, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` whose batch statistics span the process group during a synchronised step."""


SYNCED: dict[type, type] = {nn.BatchNorm1d: SyncedBatchNorm1d, nn.BatchNorm2d: SyncedBatchNorm2d,
                             nn.BatchNorm3d: SyncedBatchNorm3d}


def sync_problems(method: Method, compile: bool) -> list[str]:
    """What makes synchronised BatchNorm unavailable to ``method`` (one sentence each)."""
    out = []
    if compile:
        out.append("compile=True: the statistics' all-reduce is an autograd.Function with collectives, which the "
                   "compiled step does not trace; use the eager step")
    if method.kind == "projected":
        if method.space == "span":
            out.append("space='span' projects on the span of each rank's own guesses")
        if method.per_sample == "exact":
            out.append("per_sample='exact' opens one stream per local sample, and the statistics' tangents would add "
                       "up different samples' streams across ranks")
        if method.space == "weight" and method.granularity == "sample":
            out.append("granularity='sample' rebuilds each layer's per-sample share from local statistics")
        if method.engine == "reference" and method.space == "activity":
            out.append("the reference engine reads activity-space targets per output sample by vmap over local rows, "
                       "and the statistics' cotangents would add up different samples' rows across ranks; use "
                       "engine='forward'")
    return out


class _Modules(Protocol):
    def modules(self) -> Iterator[nn.Module]: ...


def enable_sync_batchnorm(model: _Modules) -> int:
    """Give every BatchNorm layer of ``model`` (a converted model: blocks and heads) the synchronised forward, in place
    (its class becomes a subclass of its own; parameters, buffers and names unchanged); return how many."""
    count = 0
    for module in model.modules():
        cls = type(module)
        if isinstance(module, _Synced) or not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        if isinstance(module, nn.SyncBatchNorm):
            raise FwdTransError("sync_batchnorm=True: the model holds torch.nn.SyncBatchNorm layers, whose collectives "
                                "cannot run under torch.func transforms. Fix: build it with nn.BatchNorm*d layers.")
        if cls not in SYNCED:
            SYNCED[cls] = type(f"Synced{cls.__name__}", (_Synced, cls), {"__module__": __name__})
        module.__class__ = SYNCED[cls]
        count += 1
    return count
