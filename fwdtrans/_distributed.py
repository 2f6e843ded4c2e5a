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

import contextlib
import contextvars
import datetime
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._errors import FwdTransError

if TYPE_CHECKING:
    from ._converted import Converted
    from ._engine import Projected
    from ._method import Method
    from ._plan import Plan

__all__ = ["BUCKET_BYTES", "GroupFailure", "Reducer", "broadcast_state", "enable_sync_batchnorm", "failure",
           "group_rank", "resolve", "sync_problems"]

BUCKET_BYTES = 25 * 2**20  # gradients sent per all-reduce during the eager step (DDP's default bucket size)

# the group whose BatchNorm statistics synchronised BatchNorm layers share, during a step that asks for it
_SYNC: contextvars.ContextVar[Any] = contextvars.ContextVar("fwdtrans_sync_batchnorm", default=None)


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


def _collective_error(error: BaseException) -> bool:
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
def _all_reduce(flat: Tensor, group: Any, what: str, async_op: bool = False) -> Any:
    """Sum ``flat`` over ``group`` in place (eager); the work handle when ``async_op``."""
    try:
        return dist.all_reduce(flat, group=group, async_op=async_op)
    except RuntimeError as e:
        if _collective_error(e):
            raise failure(e, what, group) from e
        raise


def _summed(flat: Tensor, group: Any, what: str) -> Tensor:
    """``flat`` summed over ``group``: a functional collective when compiling (inside the graph), else eager."""
    if torch.compiler.is_compiling():
        from torch.distributed import _functional_collectives as funcol

        return funcol.all_reduce(flat, "sum", group)
    out = flat.clone(memory_format=torch.contiguous_format)
    _all_reduce(out, group, what)
    return out


def _flatten(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflatten(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, at = [], 0
    for t in like:
        out.append(flat[at:at + t.numel()].view_as(t).to(t.dtype))
        at += t.numel()
    return out


def _weighted_mean(tensors: Sequence[Tensor], batch: int, group: Any, what: str) -> list[Tensor]:
    """``sum_r B_r t_r / sum_r B_r`` for each tensor, in one all-reduce (``batch``: this rank's ``B_r``)."""
    if not tensors:
        return []
    flat = torch.cat([_flatten(tensors) * batch, tensors[0].new_full((1,), float(batch))])
    summed = _summed(flat, group, what)
    return _unflatten(summed[:-1] / summed[-1], tensors)


class _AllReduce(torch.autograd.Function):
    """Sum over a process group, differentiable in both modes and under ``vmap``: its adjoint and its
    tangent map are the same sum (a cotangent or tangent per rank, summed), and a batch of tensors is summed
    element by element, so ``vmap`` sends the batched tensor at once. Collectives run in program order,
    which is the same on every rank: every rank runs the same transforms over the same blocks."""

    @staticmethod
    def forward(x: Tensor, group: Any) -> Tensor:
        out = x.clone(memory_format=torch.contiguous_format)
        _all_reduce(out, group, "BatchNorm statistics' all-reduce")
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
        group = _SYNC.get()
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


_SYNCED: dict[type, type] = {nn.BatchNorm1d: SyncedBatchNorm1d, nn.BatchNorm2d: SyncedBatchNorm2d,
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


def enable_sync_batchnorm(converted: Converted) -> int:
    """Give every BatchNorm layer of ``converted`` (blocks and heads) the synchronised forward, in place
    (its class becomes a subclass of its own; parameters, buffers and names unchanged); return how many."""
    count = 0
    for module in converted.modules():
        cls = type(module)
        if isinstance(module, _Synced) or not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        if isinstance(module, nn.SyncBatchNorm):
            raise FwdTransError("sync_batchnorm=True: the model holds torch.nn.SyncBatchNorm layers, whose collectives "
                                "cannot run under torch.func transforms. Fix: build it with nn.BatchNorm*d layers.")
        if cls not in _SYNCED:
            _SYNCED[cls] = type(f"Synced{cls.__name__}", (_Synced, cls), {"__module__": __name__})
        module.__class__ = _SYNCED[cls]
        count += 1
    return count


# ----------------------------------------------------------------------------- the step's reductions
def resolve(converted: Converted, process_group: Any, distributed: bool | None,
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
    cache: dict = converted.__dict__.setdefault("_reducers", {})
    key = (id(group), bool(sync))
    if key not in cache:
        cache[key] = Reducer(group, method, len(converted.blocks), bool(sync))
    return cache[key]


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
        token = _SYNC.set(self.group if self.sync_batchnorm else None)
        try:
            yield
        except RuntimeError as e:
            if _collective_error(e):
                raise failure(e, "step's collectives", self.group) from e
            raise
        finally:
            _SYNC.reset(token)
            self._pending, self._sent, self._seen = [], [], set()

    # --- before the step
    def sizes(self, batch: int, like: Tensor) -> list[int]:
        """Every rank's local batch size (one small all-reduce)."""
        slots = torch.zeros(self.world, dtype=torch.float64, device=like.device)
        slots[self.rank] = batch
        _all_reduce(slots, self.group, "exchange of batch sizes")
        return [int(s) for s in slots.tolist()]

    def draw(self, plan: Plan, batch: int, generator: torch.Generator, like: Tensor) -> list[list[Tensor]]:
        """``_engine.before_step`` for the whole batch, each per-sample draw cut to this rank's slice, so that
        every rank draws the same numbers and the generator stays in step everywhere."""
        from ._engine import before_step
        from ._spaces import space_for

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
    def guess(self, sweep: Projected, directions: list[Tensor]) -> list[Tensor]:
        """A block's weight-space guess over the whole batch: head guesses averaged (``sum_r w_r G_r``)
        before the sweep pushes them; noise is the same draw on every rank already."""
        if not sweep.guess.normalise:
            return directions
        return _weighted_mean(directions, sweep.y.shape[0], self.group, "all-reduce of a weight-space guess")

    def values(self, sweep: Projected) -> None:
        """Every block's directional derivatives ``<T, G>`` over the whole batch, in one all-reduce (weight
        space: the projection scalars, before the projection)."""
        if sweep.method.space != "weight":
            return
        blocks = [b for b in sweep.blocks[:-1] if b.values is not None]
        reduced = _weighted_mean([cast(Tensor, b.values) for b in blocks], sweep.y.shape[0], self.group,
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
            flat = _flatten([v for _, v in entries]) * self.batch
            work = _all_reduce(flat, self.group, "all-reduce of a gradient bucket", async_op=True)
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
        counted = _all_reduce(flat, self.group, "all-reduce of the metrics", async_op=True)
        try:
            for _, work, _ in self._sent:
                work.wait()
            counted.wait()
        except RuntimeError as e:
            if _collective_error(e):
                raise failure(e, "wait for the step's all-reduces", self.group) from e
            raise
        total = flat[-1]
        grads, buffers = dict(grads), dict(buffers)
        for summed, _, entries in self._sent:
            results = _unflatten(summed / total.to(summed.dtype), [v for _, v in entries])
            for (name, _), r in zip(entries, results, strict=True):
                if name.startswith("buffer:"):
                    buffers[name[7:]] = r
                else:
                    grads[name] = r
        metrics = {k: (flat[i] / total).to(metrics[k].dtype) for i, k in enumerate(names)}
        self._sent = []
        return grads, buffers, metrics


def broadcast_state(converted: Converted, group: Any) -> None:
    """Make every rank start from rank 0's parameters, buffers and noise generator (as DDP does when it
    wraps a model): one broadcast per dtype and device, and one for the generator's state."""
    src = dist.get_global_rank(group, 0) if group is not None and group is not dist.group.WORLD else 0
    tensors = [t for t in (*converted.parameters(), *converted.buffers())]
    groups: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    try:
        with torch.no_grad():
            for members in groups.values():
                flat = _flatten([t.detach() for t in members])
                dist.broadcast(flat, src, group=group)
                for t, r in zip(members, _unflatten(flat, members), strict=True):
                    t.copy_(r)
            like = tensors[0] if tensors else torch.empty(0)
            state = converted.generator.get_state().to(like.device)
            dist.broadcast(state, src, group=group)
            converted.generator.set_state(state.cpu())
    except RuntimeError as e:
        if _collective_error(e):
            raise failure(e, "broadcast of rank 0's parameters", group) from e
        raise


def timeout(seconds: float) -> datetime.timedelta:
    """A process group's timeout from seconds (refusing a non-positive or non-finite one)."""
    if not (math.isfinite(seconds) and seconds > 0):
        raise FwdTransError(f"dist_timeout={seconds!r}: use a positive number of seconds.")
    return datetime.timedelta(seconds=seconds)
