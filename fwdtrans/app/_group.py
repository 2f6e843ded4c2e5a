"""A run's place among processes: the device it trains on, and under ``torchrun`` its rank in the process group."""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .. import _distributed
from .._errors import FwdTransError

__all__ = ["World", "join_group", "leave_group", "resolve_device"]

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; refuse a device this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise FwdTransError(f"device={name!r} is not a device. Fix: use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise FwdTransError(f"device={name!r}: this machine has {count} CUDA device(s). Fix: use --device auto "
                                "or cpu, or a cuda:N that exists.")
    elif device.type != "cpu" and not getattr(torch, device.type).is_available():
        raise FwdTransError(f"device={name!r} is not available here. Fix: use --device auto or cpu.")
    return device


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel run: ``rank`` of ``size`` ranks (``torchrun``), in ``group``
    (``None``: a single process), exchanging values on ``device`` (NCCL's collectives take CUDA tensors only).
    Rank 0 writes the run directory and logs."""

    rank: int = 0
    size: int = 1
    group: Any = None
    device: torch.device = torch.device("cpu")
    owned: bool = False  # join_group started the group: leave_group ends it

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self, what: str) -> None:
        """Wait for every rank (a FwdTransError, not a hang, when one fails or does not come)."""
        if self.group is None:
            return
        with _distributed.guarded(f"wait for the other ranks {what}", self.group):
            dist.barrier(group=self.group)

    def agree(self, error: FwdTransError | None, what: str) -> None:
        """Raise on every rank when ``what`` failed on any (``error``: this rank's failure, or ``None``): this
        rank's own error, or one naming the rank that failed; one small all-reduce, so that a failure on one rank
        ends the others at once rather than after the timeout, and never pairs their later collectives wrongly."""
        if self.group is None:
            if error is not None:
                raise error
            return
        failed = self.sum({f"{r}": float(r == self.rank and error is not None) for r in range(self.size)})
        if error is not None:
            raise error
        ranks = [r for r in range(self.size) if failed[f"{r}"]]
        if ranks:
            raise FwdTransError(f"rank {ranks[0]} failed {what}; its error above names the fix.")

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean of each value over the ranks (one all-reduce)."""
        return {k: v / self.size for k, v in self.sum(values).items()}

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """The sum of each value over the ranks (one all-reduce; every rank must pass the same keys)."""
        if self.group is None or not values:
            return values
        keys = sorted(values)
        flat = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        with _distributed.guarded("sum of values over the ranks", self.group):
            dist.all_reduce(flat, group=self.group)
        return {k: float(v) for k, v in zip(keys, flat.tolist(), strict=True)}


def join_group(device: torch.device, timeout: float = 300.0) -> tuple[World, torch.device]:
    """This process's :class:`World` and the device it trains on. Under ``torchrun`` (``WORLD_SIZE`` > 1) the
    default process group is initialised from its environment on first use (gloo on CPU, NCCL on CUDA, each
    rank on ``cuda:LOCAL_RANK``), waiting at most ``timeout`` seconds for the other ranks; a group initialised
    beforehand (by the caller) is used as it is.

    Example:
        >>> world, device = join_group(torch.device("cpu"))  # not under torchrun: a single process
        >>> world.rank, world.size, world.main, device
        (0, 1, True, device(type='cpu'))
    """
    env = os.environ
    if dist.is_available() and dist.is_initialized():
        rank, size = dist.get_rank(), dist.get_world_size()
    else:
        try:
            size = int(env.get("WORLD_SIZE", "1"))
        except ValueError:
            raise FwdTransError(f"WORLD_SIZE={env['WORLD_SIZE']!r} is not a number of processes. Fix: launch with "
                                "torchrun --nproc-per-node N, which sets it, or unset it.") from None
        rank = 0
    if size <= 1:
        return World(), device
    if device.type == "cuda":
        local, per_node = int(env.get("LOCAL_RANK", "0")), int(env.get("LOCAL_WORLD_SIZE", "1"))
        if device.index is not None and per_node > 1:
            raise FwdTransError(f"--device {device} with {per_node} ranks on this machine: each rank trains on "
                                "cuda:LOCAL_RANK. Fix: --device cuda (or auto).")
        device = torch.device("cuda", local if device.index is None else device.index)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        missing = [k for k in _TORCHRUN_ENV if k not in env]
        if missing:
            raise FwdTransError(f"WORLD_SIZE={size} says this is one of several processes, but {', '.join(missing)} "
                                f"{'is' if len(missing) == 1 else 'are'} not set. Fix: launch with torchrun "
                                "--nproc-per-node N -m fwdtrans ... (it sets them all), or unset WORLD_SIZE.")
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, timeout=_distributed.timeout(timeout))
        except (RuntimeError, ValueError) as e:
            raise FwdTransError(
                f"rank {env['RANK']} of {size} could not join the process group ({backend}, rendezvous at "
                f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}, waiting at most {timeout:g} s): "
                f"{str(e).strip()[:300]}. Fix: start every rank (torchrun --nnodes/--nproc-per-node), with the same "
                "MASTER_ADDR and MASTER_PORT reachable from all of them.") from e
        atexit.register(_leave_group)
        return World(dist.get_rank(), size, dist.group.WORLD, device, owned=True), device
    return World(rank, size, dist.group.WORLD, device), device


def _leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def leave_group(world: World) -> None:
    """End the process group that :func:`join_group` started, once every rank is done: before the interpreter
    shuts down, where gloo's threads could still abort a rank that has finished ("terminate called without an
    active exception"). A group the caller started is left to the caller."""
    if world.owned:
        world.barrier("to finish")
        _leave_group()

