"""The collectives a data-parallel step runs, and the one error every failed collective raises."""

from __future__ import annotations

import contextlib
import datetime
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .._errors import FwdTransError

__all__ = ["GroupFailure", "all_reduce", "collective_error", "failure", "flatten", "group_rank", "timeout",
           "unflatten", "weighted_mean"]


class GroupFailure(FwdTransError):
    """A collective of the data-parallel step failed: another rank raised, died or timed out."""


def failure(error: BaseException, what: str, group: Any = None) -> GroupFailure:
    """The :class:`GroupFailure` of a collective (``what``) that raised ``error``."""
    rank = dist.get_rank(group) if dist.is_initialized() else "?"
    return GroupFailure(
        f"data-parallel run, rank {rank}: the {what} failed ({type(error).__name__}: {str(error).strip()[:400]}). "
        "Another rank raised, died or did not answer within the process group's timeout, or the group is "
        "misconfigured. Fix: read the first error among the ranks' outputs; every rank must run the same "
        "steps with the same model, method and batch structure.")


def collective_error(error: BaseException) -> bool:
    """Whether ``error`` came from a collective (not from the step's own computation)."""
    if isinstance(error, FwdTransError):
        return False
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error).lower()
    return any(word in text for word in ("gloo", "nccl", "c10d", "connection", "timed out", "timeout"))


def group_rank(group: Any = None) -> tuple[int, int]:
    """``(rank, world size)`` in ``group`` (the default group by default); ``(0, 1)`` without one.

    Example:
        >>> group_rank()  # no process group initialised
        (0, 1)
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


# ----------------------------------------------------------------------------- collectives
@contextlib.contextmanager
def guarded(what: str, group: Any) -> Iterator[None]:
    """Run collectives: a failed one (a rank died, timed out, a broken connection) raises :class:`GroupFailure`
    naming ``what``; any other error passes."""
    try:
        yield
    except RuntimeError as e:
        if collective_error(e):
            raise failure(e, what, group) from e
        raise


def all_reduce(flat: Tensor, group: Any, what: str, async_op: bool = False) -> Any:
    """Sum ``flat`` over ``group`` in place (eager); the work handle when ``async_op``."""
    with guarded(what, group):
        return dist.all_reduce(flat, group=group, async_op=async_op)


def group_sum(flat: Tensor, group: Any, what: str) -> Tensor:
    """``flat`` summed over ``group``: a functional collective when compiling (inside the graph), else eager."""
    if torch.compiler.is_compiling():
        from torch.distributed import _functional_collectives as funcol

        return funcol.all_reduce(flat, "sum", group)
    out = flat.clone(memory_format=torch.contiguous_format)
    all_reduce(out, group, what)
    return out


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, at = [], 0
    for t in like:
        out.append(flat[at:at + t.numel()].view_as(t).to(t.dtype))
        at += t.numel()
    return out


def weighted_mean(tensors: Sequence[Tensor], batch: int, group: Any, what: str) -> list[Tensor]:
    """``sum_r B_r t_r / sum_r B_r`` for each tensor, in one all-reduce (``batch``: this rank's ``B_r``)."""
    if not tensors:
        return []
    flat = torch.cat([flatten(tensors) * batch, tensors[0].new_full((1,), float(batch))])
    summed = group_sum(flat, group, what)
    return unflatten(summed[:-1] / summed[-1], tensors)


def timeout(seconds: float) -> datetime.timedelta:
    """A process group's timeout from seconds (refusing a non-positive or non-finite one)."""
    if not (math.isfinite(seconds) and seconds > 0):
        raise FwdTransError(f"dist_timeout={seconds!r}: use a positive number of seconds.")
    return datetime.timedelta(seconds=seconds)
