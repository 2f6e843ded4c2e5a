"""The tangent engine: every parameter's gradient for one batch.

One forward sweep runs the blocks in order. After each block (but the last) its head gives the
local loss, its gradient ``g = dl/dh`` and the block's Gradient Guess (``_guesses``). Each guess
opens a *bundle* of tangent streams at the block (the guess itself in activity space, its image
``J_theta v`` in weight space) that ends at the block's target: its own output (local target), the
next block's output (intermediate) or the logits (global). Where a bundle ends its streams are
contracted with the target's cotangent, giving directional derivatives ``d``.

* ``engine="forward"``: the streams ride along the sweep by forward-mode AD (``torch.func.jvp``
  under ``vmap`` over all open streams, primal computed once per block). No backward pass crosses a
  cut: blocks see detached inputs.
* ``engine="reference"``: the same ``d`` from backprop, as the paper's code computes it.

Both engines then share ``_projection`` (estimate per projection unit) and the update: activity
estimates are pulled back through their block only; weight estimates are the gradients. The last
block always gets the exact gradient of the global loss.

BatchNorm in train mode cannot mutate its running statistics inside ``torch.func.jvp``: blocks
are called functionally with buffers cloned inside the transform, and the new statistics are
copied back once, so they are updated exactly once per step, as in eager mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap

from . import _projection
from ._errors import FwdTransError
from ._guesses import activity_guess, reinitialise, weight_guess

__all__ = ["compute_gradients", "push"]


# ----------------------------------------------------------------------------- tangent pushing
def _functional(block: nn.Module) -> tuple[Callable, dict[str, Tensor], dict[str, Tensor]]:
    """``block`` as a pure function ``(params, h) -> (out, new_buffers)`` (buffers cloned inside)."""
    params = dict(block.named_parameters())
    buffers = dict(block.named_buffers())

    def f(p: dict[str, Tensor], h: Tensor):
        fresh = {k: b.clone() for k, b in buffers.items()}
        return functional_call(block, (p, fresh), (h,)), fresh

    return f, params, buffers


def push(block: nn.Module, h: Tensor, streams: Tensor, update_buffers: bool = True) -> tuple[Tensor, Tensor]:
    """Run ``block`` on ``h`` and push the tangent ``streams`` (``(S, *h.shape)``) through it.

    The primal output is computed once and keeps its autograd graph to the block's parameters
    (unless grad mode is off); the block's buffers are updated once (if ``update_buffers``).
    """
    f, params, buffers = _functional(block)
    out, tangents, new = vmap(lambda t: jvp(lambda x: f(params, x), (h,), (t,), has_aux=True),
                              out_dims=(None, 0, 0), randomness="same")(streams)
    if update_buffers:
        with torch.no_grad():
            for k, b in buffers.items():
                b.copy_(new[k][0])
    return out, tangents


def _push_params(block: nn.Module, h: Tensor, directions: list[Tensor]) -> Tensor:
    """``J_theta block(h) . v`` for each of the ``S`` parameter directions (``(S, *p)`` per parameter)."""
    f, params, _ = _functional(block)
    names = list(params)

    def one(*v):
        return jvp(lambda *p: f(dict(zip(names, p)), h)[0], tuple(params.values()), v)[1]

    return vmap(one, randomness="same")(*directions)


# ----------------------------------------------------------------------------- per-block state
@dataclass
class _Block:
    out: Tensor
    head_loss: Tensor | None = None  # mean head loss
    g: Tensor | None = None  # d head_loss / d out
    directions: list[Tensor] | Tensor | None = None  # activity (k, B, *h); weight [(k, *p)] per parameter
    normalise: bool = True
    units: list[list[int]] = field(default_factory=list)  # weight space: parameter indices per unit
    values: Tensor | None = None  # directional derivatives, per stream (and per output sample)
    target: list[Tensor] | None = None  # reference engine: the target gradient in z-space


def _stream_directions(method, block: _Block, params: list[Tensor]) -> tuple[Tensor | list[Tensor], str]:
    """The bundle's streams in z-space (activity ``(S, B, *h)``, weight ``[(S, *p)]``) and its read."""
    v = block.directions
    if method.space == "weight":
        units = block.units
        streams = []
        for i, p in enumerate(params):
            rows = [v[i] if i in unit else torch.zeros_like(v[i]) for unit in units]
            streams.append(torch.cat(rows))  # stream (unit, tangent)
        return streams, "sum"
    if method.space == "span":
        u = v[0]
        return u[:, None].expand(-1, *u.shape).contiguous(), "sample"  # stream m: u_m at every sample
    if method.per_sample == "exact":
        k, batch = v.shape[:2]
        eye = torch.eye(batch, dtype=v.dtype, device=v.device).view(1, batch, batch, *([1] * (v.dim() - 2)))
        return (eye * v[:, :, None]).flatten(0, 1), "sum"  # stream (i, n): v_i,n at sample n only
    return v, "sample"


def _contract(tangents: Tensor, cotangent: Tensor, read: str) -> Tensor:
    """``<cotangent_m, tangent_s,m>`` per stream s and output sample m; summed over m for ``"sum"``."""
    values = (tangents.detach() * cotangent.detach()).flatten(2).sum(-1)
    return values.sum(-1) if read == "sum" else values


# ----------------------------------------------------------------------------- the step
def compute_gradients(model, x: Tensor, y: Tensor, record: dict | None = None) -> dict[str, Tensor]:
    """Fill ``p.grad`` for every parameter the method trains; return detached metrics.

    ``model`` is a :class:`fwdtrans.Converted`. Old gradients are cleared. ``record``, when given,
    receives per-block internals (targets, estimates, guesses) for :func:`fwdtrans.check`.
    """
    for p in model.parameters():
        p.grad = None
    method = model.method
    if method.kind == "backprop":
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        return _metrics(loss, logits, y, [])
    return _Sweep(model, x, y, record).run()


def _metrics(loss: Tensor, logits: Tensor, y: Tensor, blocks: list[_Block]) -> dict[str, Tensor]:
    metrics = {"loss": loss.detach(), "accuracy": (logits.detach().argmax(-1) == y).float().mean()}
    for j, b in enumerate(blocks[:-1]):
        if b.head_loss is not None:
            metrics[f"loss/head{j}"] = b.head_loss.detach()
    return metrics


class _Sweep:
    """One step of a ``local`` or ``projected`` method."""

    def __init__(self, model, x: Tensor, y: Tensor, record: dict | None):
        self.model, self.x, self.y, self.record = model, x, y, record
        self.method = model.method
        self.forward = self.method.engine == "forward" and self.method.kind == "projected"
        self.blocks: list[_Block] = []
        self.params = [list(b.parameters()) for b in model.blocks]
        self.open: list[tuple[int, Tensor, str]] = []  # forward engine: (block, tangents, read)
        self.pending: list[tuple[int, Tensor, str]] = []  # streams="sequential": pushed after the sweep
        self.joint_total: Tensor | None = None  # the shared directional derivative of a joint method

    # -- the sweep
    def run(self) -> dict[str, Tensor]:
        method, model, y = self.method, self.model, self.y
        last = len(model.blocks) - 1
        if method.guess == "ntk":
            for head in model.heads:
                reinitialise(head, model.generator)
        h = self.x
        for j, block in enumerate(model.blocks):
            tangents = torch.cat([t for _, t, _ in self.open]) if self.open else None
            if tangents is None:
                out = block(h)
            else:
                out, tangents = push(block, h, tangents)
                self._split(tangents)
            b = _Block(out)
            self.blocks.append(b)
            if j < last:
                self._head(j, b)
                self._close(j, b.g)
                if method.kind == "projected":
                    self._guess(j, b)
            # the reference engine keeps one chained graph for the targets; the forward engine cuts
            h = out if method.engine == "reference" and method.kind == "projected" else out.detach()
        logits = self.blocks[-1].out
        loss = F.cross_entropy(logits, y)
        if method.kind == "local":
            torch.autograd.backward([loss, *(b.head_loss for b in self.blocks[:-1])])
            return _metrics(loss, logits, y, self.blocks)
        (grad_logits,) = torch.autograd.grad(loss, logits, retain_graph=True)
        self.grad_logits = grad_logits
        if self.forward:
            for j, tangents, read in self.open:
                self.blocks[j].values = _contract(tangents, grad_logits, read)
            for j, origin, read in self.pending:
                self.blocks[j].values = self._propagate(j, origin, read)
            if method.joint and method.target == "global" and self.open:  # one stream carried every guess
                self.joint_total = self.blocks[self.open[0][0]].values
            elif method.joint:  # local or intermediate targets: each block's value was read at its own target
                self.joint_total = sum(b.values for b in self.blocks[:-1])
        else:
            for j in range(last):
                self._reference_values(j)
            if method.joint:
                self.joint_total = sum(b.values for b in self.blocks[:-1])
        self._apply(loss)
        return _metrics(loss, logits, y, self.blocks)

    def _head(self, j: int, b: _Block) -> None:
        method, head = self.method, self.model.heads[j]
        if method.kind == "local":  # greedy local learning: the head loss trains block and head
            b.head_loss = F.cross_entropy(head(b.out), self.y)
            return
        leaf = b.out.detach().requires_grad_()
        b.head_loss = F.cross_entropy(head(leaf), self.y)
        params = list(head.parameters()) if method.trains_heads else []
        b.g, *grads = torch.autograd.grad(b.head_loss, [leaf, *params])
        for p, gp in zip(params, grads):
            p.grad = gp

    def _guess(self, j: int, b: _Block) -> None:
        method, model, params = self.method, self.model, self.params[j]
        if method.space == "weight" and not params:  # nothing to estimate in a parameter-free block
            b.directions, b.units = [], [[]] if method.granularity == "joint" else []
            b.values = b.out.new_zeros(len(b.units) * method.tangents)
            return
        if method.space == "weight":
            head_grads = None
            if method.guess in ("local", "ntk", "fixed-ntk"):
                head_grads = torch.autograd.grad(b.out, params, b.g, retain_graph=not self.forward, allow_unused=True)
                head_grads = [torch.zeros_like(p) if gp is None else gp for p, gp in zip(params, head_grads)]
            if self.forward:  # weight estimates need no pull-back: free the block's activations now
                b.out = b.out.detach()
            b.directions, b.normalise = weight_guess(method, params, head_grads, model.generator)
            b.units = [[i] for i in range(len(params))] if method.granularity == "tensor" else [list(range(len(params)))]
        else:
            try:
                b.directions, b.normalise = activity_guess(method, j, b.out, b.g, self.y, model.generator)
            except ValueError as e:
                raise FwdTransError(f"guess callable: {e}") from None
        if not self.forward:
            return  # the reference engine derives every value after the sweep
        streams, read = _stream_directions(method, b, params)
        if method.space == "weight":
            origin = _push_params(model.blocks[j], self.x if j == 0 else self.blocks[j - 1].out.detach(), streams)
        else:
            origin = streams
        if method.target == "local":
            b.values = _contract(origin, b.g, read)
        elif method.streams == "sequential":
            self.pending.append((j, origin, read))
        elif method.joint and method.target == "global" and self.open:  # join the single stream here
            first, tangents, read = self.open[0]
            self.open[0] = (first, tangents + origin, read)
        else:
            self.open.append((j, origin, read))

    def _propagate(self, j: int, origin: Tensor, read: str) -> Tensor:
        """Push one bundle from block ``j`` to its target on its own, recomputing the primal."""
        last = len(self.blocks) - 1
        end = j + 1 if self.method.target == "intermediate" and j + 1 < last else last
        h, tangents = self.blocks[j].out.detach(), origin
        with torch.no_grad():
            for k in range(j + 1, end + 1):
                h, tangents = push(self.model.blocks[k], h, tangents, update_buffers=False)
        return _contract(tangents, self.blocks[end].g if end < last else self.grad_logits, read)

    def _split(self, tangents: Tensor) -> None:
        sizes = [t.shape[0] for _, t, _ in self.open]
        self.open = [(j, t, read) for (j, _, read), t in zip(self.open, tangents.split(sizes))]

    def _close(self, j: int, cotangent: Tensor) -> None:
        """End the bundles of block ``j - 1`` when its target is block ``j``'s head loss."""
        if self.method.target != "intermediate" or not self.forward:
            return
        keep = []
        for origin, tangents, read in self.open:
            if origin == j - 1:
                self.blocks[origin].values = _contract(tangents, cotangent, read)
            else:
                keep.append((origin, tangents, read))
        self.open = keep

    # -- reference engine: the same values from backprop
    def _terminal(self, j: int) -> tuple[Tensor, Tensor]:
        last = len(self.blocks) - 1
        target = self.method.target
        if target == "local":
            return self.blocks[j].out, self.blocks[j].g
        if target == "intermediate" and j + 1 < last:
            return self.blocks[j + 1].out, self.blocks[j + 1].g
        return self.blocks[-1].out, self.grad_logits

    def _reference_values(self, j: int) -> None:
        b, method = self.blocks[j], self.method
        params = self.params[j]
        if b.values is not None:  # a parameter-free block in weight space
            return
        streams, read = _stream_directions(method, b, params)
        terminal, cotangent = self._terminal(j)
        z = params if method.space == "weight" else [b.out]
        if read == "sum":
            grads = torch.autograd.grad(terminal, z, cotangent, retain_graph=True, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(z, grads)]
            streams = streams if isinstance(streams, list) else [streams]
            b.values = sum((s * g).flatten(1).sum(-1) for s, g in zip(streams, grads))
            b.target = grads
        else:
            batch = cotangent.shape[0]
            eye = torch.eye(batch, dtype=cotangent.dtype, device=cotangent.device)
            rows = eye.view(batch, batch, *([1] * (cotangent.dim() - 1))) * cotangent  # cotangent of sample m only
            (jac,) = torch.autograd.grad(terminal, z, rows, retain_graph=True, is_grads_batched=True)
            b.values = torch.einsum("mnd,snd->sm", jac.flatten(2), streams.flatten(2))  # (S, B)
            b.target = [jac.sum(0)]

    # -- estimates and updates
    def _estimate(self, j: int, values: Tensor) -> Tensor | list[Tensor]:
        method, b = self.method, self.blocks[j]
        v = b.directions
        agg = dict(normalise=b.normalise, aggregation=method.aggregation)
        if method.space == "span":
            u = v[0].flatten(1)
            return _projection.span(values, u).view_as(v[0])
        if method.space == "activity":
            k, batch = v.shape[:2]
            d = values.view(k, batch) if method.per_sample == "exact" else values
            return _projection.combine(d, v.flatten(2), **agg).view_as(v[0])
        k = method.tangents
        est = [torch.zeros_like(p) for p in self.params[j]]
        for u_index, unit in enumerate(b.units):
            d = values[u_index * k:(u_index + 1) * k].view(k, 1)
            flat = torch.cat([v[i].flatten(1) for i in unit], dim=1)[:, None]  # (k, 1, D)
            e = _projection.combine(d, flat, **agg)[0]
            offset = 0
            for i in unit:
                n = v[i][0].numel()
                est[i] = e[offset:offset + n].view_as(v[i][0])
                offset += n
        return est

    def _apply(self, loss: Tensor) -> None:
        method, blocks = self.method, self.blocks
        last = len(blocks) - 1
        if method.space == "weight" and method.joint:
            ests = [self._joint_estimate(j, self.joint_total) for j in range(last)]
        elif method.joint:
            ests = [self._estimate(j, self.joint_total) for j in range(last)]
        else:
            ests = [self._estimate(j, blocks[j].values) for j in range(last)]
        if self.record is not None:
            self.record.update(blocks=blocks, estimates=ests)
        chained = method.engine == "reference"
        for j, est in enumerate(ests):
            params = self.params[j]
            if method.space == "weight":
                for p, e in zip(params, est):
                    p.grad = e.detach()
            elif blocks[j].out.requires_grad and params:
                torch.autograd.backward(blocks[j].out, est.detach(), inputs=params, retain_graph=chained)
        if self.params[-1]:  # the last block: the exact gradient of the global loss
            torch.autograd.backward(loss, inputs=self.params[-1])

    def _joint_estimate(self, j: int, total: Tensor) -> list[Tensor]:
        b, k = self.blocks[j], self.method.tangents
        v = b.directions
        if b.normalise:
            norm2 = sum((bb.directions[i] * bb.directions[i]).flatten(1).sum(-1)
                        for bb in self.blocks[:-1] for i in range(len(bb.directions)))
            scale = total / norm2.clamp_min(torch.finfo(total.dtype).tiny)
        else:
            scale = total
        return [(scale.view(k, *([1] * (vi.dim() - 1))) * vi).mean(0) for vi in v]
