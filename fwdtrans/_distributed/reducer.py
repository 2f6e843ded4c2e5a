"""The reductions of one data-parallel step (the package docstring says what is reduced, by method)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor

from .._engine import Plan, SweepView, before_step, space_for
from .._errors import FwdTransError
from .._method import Method
from .collectives import all_reduce, flatten, guarded, unflatten, weighted_mean
from .syncbn import SYNC

__all__ = ["BUCKET_BYTES", "Reducer"]

BUCKET_BYTES = 25 * 2**20  # gradients sent per all-reduce during the eager step (DDP's default bucket size)


class Reducer:
    """One data-parallel step's reductions over ``group`` (see the module docstring). The engine calls
    :meth:`guess`, :meth:`values` and :meth:`ready` (``plan.reduce``); ``Converted`` calls :meth:`draw` before
    and :meth:`finish` after the step, inside :meth:`step`."""

    def __init__(self, group: Any, method: Method, blocks: int, sync_batchnorm: bool):
        self.group = group
        self.method = method
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.sync_batchnorm = sync_batchnorm
        # batch-level projections: blocks 0..J-2's estimates come out the same on every rank
        self.shared = {f"blocks.{j}." for j in range(blocks - 1)} if (
            method.kind == "projected" and method.space == "weight" and method.granularity != "sample") else set()
        self.batch = 0
        self._pending: list[tuple[str, Tensor]] = []
        self._sent: list[tuple[Tensor, Any, list[tuple[str, Tensor]]]] = []
        self._seen: set[str] = set()

    def _is_shared(self, name: str) -> bool:
        return any(name.startswith(prefix) for prefix in self.shared)

    @contextlib.contextmanager
    def step(self, batch: int) -> Iterator[None]:
        """One step on ``batch`` local samples: synchronised BatchNorm on (if asked), a collective's failure
        raised as :class:`GroupFailure`."""
        self.batch = batch
        self._pending, self._sent, self._seen = [], [], set()
        token = SYNC.set(self.group if self.sync_batchnorm else None)
        try:
            with guarded("step's collectives", self.group):
                yield
        finally:
            SYNC.reset(token)
            self._pending, self._sent, self._seen = [], [], set()

    # --- before the step
    def sizes(self, batch: int, like: Tensor) -> list[int]:
        """Every rank's local batch size (one small all-reduce)."""
        slots = torch.zeros(self.world, dtype=torch.float64, device=like.device)
        slots[self.rank] = batch
        all_reduce(slots, self.group, "exchange of batch sizes")
        return [int(s) for s in slots.tolist()]

    def draw(self, plan: Plan, batch: int, generator: torch.Generator, like: Tensor) -> list[list[Tensor]]:
        """``_engine.before_step`` for the whole batch, each per-sample draw cut to this rank's slice, so that
        every rank draws the same numbers and the generator stays in step everywhere."""
        method = plan.method
        noisy = method.kind == "projected" and method.guess in ("gaussian", "rademacher")
        space = space_for(method) if method.kind == "projected" else None
        per_sample = noisy and space is not None and any(
            space.noise_shapes(plan, j, 1) != space.noise_shapes(plan, j, 2) for j in range(len(plan.blocks) - 1))
        if not (per_sample or self.sync_batchnorm):
            return before_step(plan, batch, generator)
        sizes = self.sizes(batch, like)
        if self.sync_batchnorm and len(set(sizes)) > 1:
            raise FwdTransError(f"sync_batchnorm=True needs the same batch size on every rank, got {sizes}. Fix: split "
                                "each global batch evenly (a batch size divisible by the number of ranks).")
        if not per_sample:
            return before_step(plan, batch, generator)
        assert space is not None
        offset, total = sum(sizes[:self.rank]), sum(sizes)
        noise = before_step(plan, total, generator)
        out = []
        for j, draws in enumerate(noise):
            one, two = space.noise_shapes(plan, j, 1), space.noise_shapes(plan, j, 2)
            cut = []
            for d, a, b in zip(draws, one, two, strict=True):
                dim = next((i for i, (p, q) in enumerate(zip(a, b, strict=True)) if p != q), None)
                cut.append(d if dim is None else d.narrow(dim, offset, batch).contiguous())
            out.append(cut)
        return out

    # --- inside the engine (eager or compiled)
    def guess(self, sweep: SweepView, directions: list[Tensor]) -> list[Tensor]:
        """A block's weight-space guess over the whole batch: head guesses averaged (``sum_r w_r G_r``)
        before the sweep pushes them; noise is the same draw on every rank already."""
        if not sweep.guess.normalise:
            return directions
        return weighted_mean(directions, sweep.y.shape[0], self.group, "all-reduce of a weight-space guess")

    def values(self, sweep: SweepView) -> None:
        """Every block's directional derivatives ``<T, G>`` over the whole batch, in one all-reduce (weight
        space: the projection scalars, before the projection)."""
        if sweep.method.space != "weight":
            return
        blocks = [b for b in sweep.blocks[:-1] if b.values is not None]
        reduced = weighted_mean([cast(Tensor, b.values) for b in blocks], sweep.y.shape[0], self.group,
                                 "all-reduce of the directional derivatives")
        for b, v in zip(blocks, reduced, strict=True):
            b.values = v

    def ready(self, prefix: str, tensors: dict[str, Tensor]) -> None:
        """The engine has formed these gradients: queue them, and send a full bucket now (eager step only:
        the all-reduce runs while the engine goes on)."""
        if torch.compiler.is_compiling():
            return
        for k, v in tensors.items():
            name = f"{prefix}.{k}"
            if not self._is_shared(name):
                self._pending.append((name, v))
                self._seen.add(name)
        if sum(v.numel() * v.element_size() for _, v in self._pending) >= BUCKET_BYTES:
            self._send()

    def _send(self) -> None:
        """All-reduce the queued tensors (``B_r x``), one asynchronous collective per dtype and device."""
        groups: dict[tuple, list[tuple[str, Tensor]]] = {}
        for name, v in self._pending:
            groups.setdefault((v.dtype, v.device), []).append((name, v))
        for entries in groups.values():
            flat = flatten([v for _, v in entries]) * self.batch
            work = all_reduce(flat, self.group, "all-reduce of a gradient bucket", async_op=True)
            self._sent.append((flat, work, entries))
        self._pending = []

    # --- after the step
    def finish(self, grads: dict[str, Tensor], buffers: dict[str, Tensor], metrics: dict[str, Tensor]
               ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
        """The step's results over the whole batch: gradients not reduced yet (every per-sample estimate, the
        last block's, the heads'), floating-point buffers (running statistics) and metrics, weighted by the
        local batch sizes; a batch-level projection's estimates are the same on every rank and kept."""
        for name, v in grads.items():
            if name not in self._seen and not self._is_shared(name):
                self._pending.append((name, v))
        self._pending += [(f"buffer:{k}", v) for k, v in buffers.items() if v.is_floating_point()]
        self._send()
        names = list(metrics)
        like = next(iter(metrics.values()))
        flat = torch.stack([metrics[k].to(torch.float64) for k in names] + [like.new_tensor(1.0, dtype=torch.float64)])
        flat = (flat * self.batch).to(like.device)
        counted = all_reduce(flat, self.group, "all-reduce of the metrics", async_op=True)
        with guarded("wait for the step's all-reduces", self.group):
            for _, work, _ in self._sent:
                work.wait()
            counted.wait()
        total = flat[-1]
        grads, buffers = dict(grads), dict(buffers)
        for summed, _, entries in self._sent:
            results = unflatten(summed / total.to(summed.dtype), [v for _, v in entries])
            for (name, _), r in zip(entries, results, strict=True):
                if name.startswith("buffer:"):
                    buffers[name[7:]] = r
                else:
                    grads[name] = r
        metrics = {k: (flat[i] / total).to(metrics[k].dtype) for i, k in enumerate(names)}
        self._sent = []
        return grads, buffers, metrics
