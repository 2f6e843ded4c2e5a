"""The tangent engine: every parameter's gradient for one batch, from ``torch.func`` alone.

One forward sweep runs the blocks in order, each as a pure function of its parameters under
``torch.func.vjp``, which keeps the block's pull-back for the block-local update. After each block
(but the last) its head gives the local loss, its gradient ``g = dl/dh`` and the block's Gradient
Guess (``_guesses``). Each guess opens a *bundle* of tangent streams at the block (the guess itself
in activity space, its image ``J_theta v`` in weight space) that ends at the block's target: its own
output (local target), the next block's output (intermediate) or the logits (global). Where a bundle
ends its streams are contracted with the target's cotangent, giving directional derivatives ``d``.

* ``engine="forward"``: the streams ride along the sweep by forward-mode AD (``torch.func.jvp``
  under ``vmap`` over all open streams, primal computed once per block). No pull-back crosses a
  cut.
* ``engine="reference"``: the same ``d`` from backprop (the block pull-backs chained back from each
  target), as the paper's code computes it.

Both engines then share ``_projection`` (estimate per projection unit) and the update: activity
estimates are pulled back through their block only; weight estimates are the gradients. The last
block always gets the exact gradient of the global loss.

The step is a pure function ``gradients(model, inputs, y, noise) -> (grads, buffers, metrics)``:
no ``torch.autograd`` call, no state written, so ``torch.compile(fullgraph=True)`` captures it whole.
BatchNorm buffers are cloned inside each block call and the new statistics returned, so they are
updated exactly once per step, as in eager mode.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp, vmap

from . import _projection
from ._errors import FwdTransError
from ._guesses import activity_guess, draw_noise, reinitialise, weight_guess

__all__ = ["as_inputs", "compute_gradients", "gradients", "push"]

State = tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]  # trained params, frozen params, buffers


# ----------------------------------------------------------------------------- blocks as functions
def state(module: nn.Module) -> State:
    """A module's trained parameters, frozen parameters and buffers, by name."""
    params = dict(module.named_parameters())
    trained = {k: p for k, p in params.items() if p.requires_grad}
    return trained, {k: p for k, p in params.items() if not p.requires_grad}, dict(module.named_buffers())


def _call(module: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], *args: Tensor):
    """``module(*args)`` with ``params``; returns ``(out, new_buffers)`` (buffers cloned, never mutated)."""
    fresh = {k: b.clone() for k, b in buffers.items()}
    return functional_call(module, (params, fresh), args), fresh


def _norm_affine(block: nn.Module) -> tuple[str, ...]:
    """Names of the affine parameters of ``block``'s normalisation layers."""
    return tuple(f"{name}.{k}" for name, m in block.named_modules()
                 if isinstance(m, nn.modules.batchnorm._NormBase) for k, _ in m.named_parameters(recurse=False))


def push(block: nn.Module, h: Tensor, streams: Tensor, st: State | None = None) -> tuple[Tensor, Tensor, dict]:
    """Run ``block`` on ``h`` and push the tangent ``streams`` (``(S, *h.shape)``) through it.

    Returns ``(out, tangents, new_buffers)``; the primal is computed once, dropout draws one mask for
    the primal and every stream. Under ``torch.compile`` the normalisation layers' affine parameters
    join the ``jvp`` primals with zero tangents: torch 2.13 fails to compile a BatchNorm whose input
    carries a tangent while its weight does not (pytorch/pytorch#139756).
    """
    trained, frozen, buffers = st or state(block)
    params = {**frozen, **trained}
    dual = {k: params[k] for k in _norm_affine(block) if k in params} if torch.compiler.is_compiling() else {}
    zeros = {k: torch.zeros_like(v) for k, v in dual.items()}

    def f(x, d):
        return _call(block, {**params, **d}, buffers, x)

    out, tangents, new = vmap(lambda t: jvp(f, (h, dual), (t, zeros), has_aux=True),
                              out_dims=(None, 0, 0), randomness="same")(streams)
    return out, tangents, {k: b[0] for k, b in new.items()}


def _push_params(block: nn.Module, h: tuple[Tensor, ...], directions: list[Tensor], st: State | None = None,
                 rng: list[Tensor] | None = None) -> Tensor:
    """``J_theta block(h) . v`` for each of the ``S`` directions (``(S, *p)`` per trained parameter).

    This runs the block again: ``rng`` (the random state its forward started from, see :func:`_rng`)
    makes it draw the forward's dropout masks again, and leaves the random state as it found it.
    """
    trained, frozen, buffers = st or state(block)
    names = list(trained)

    def one(*v):
        return jvp(lambda *p: _call(block, {**frozen, **dict(zip(names, p))}, buffers, *h)[0],
                   tuple(trained.values()), v)[1]

    if rng is None:
        return vmap(one, randomness="same")(*directions)
    devices = list(range(len(rng) - 1))
    with torch.random.fork_rng(devices):
        torch.set_rng_state(rng[0])
        for device, s in zip(devices, rng[1:]):
            torch.cuda.set_rng_state(s, device)
        return vmap(one, randomness="same")(*directions)


def _rng() -> list[Tensor]:
    """The random state dropout draws from: the CPU's, then every CUDA device's."""
    return [torch.get_rng_state(), *(torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [])]


# ----------------------------------------------------------------------------- per-block state
@dataclass
class _Block:
    out: Tensor
    inputs: tuple[Tensor, ...]
    pull: Callable | None = None  # the block's vjp: cotangent of out -> (params[, input]) cotangents
    head_loss: Tensor | None = None  # mean head loss
    g: Tensor | None = None  # d head_loss / d out
    directions: list[Tensor] | Tensor | None = None  # activity (k, B, *h); weight [(k, *p)] per parameter
    normalise: bool = True
    units: list[list[int]] = field(default_factory=list)  # weight space: parameter indices per unit
    values: Tensor | None = None  # directional derivatives, per stream (and per output sample)
    target: list[Tensor] | None = None  # reference engine: the target gradient in z-space
    rng: list[Tensor] | None = None  # the random state the block's forward started from, to replay its dropout


def _per_sample(method) -> bool:
    """Whether a bundle's values are read per output sample (else summed over the batch)."""
    return method.space == "span" or (method.space == "activity" and method.per_sample == "by-loss")


def _stream_directions(method, block: _Block) -> Tensor | list[Tensor]:
    """The bundle's streams in z-space: activity ``(S, B, *h)``, weight ``[(S, *p)]``."""
    v = block.directions
    if method.space == "weight":
        streams = []
        for i, vi in enumerate(v):
            rows = [vi if i in unit else torch.zeros_like(vi) for unit in block.units]
            streams.append(torch.cat(rows))  # stream (unit, tangent)
        return streams
    if method.space == "span":
        u = v[0]
        return u[:, None].expand(-1, *u.shape).contiguous()  # stream m: u_m at every sample
    if method.per_sample == "exact":
        batch = v.shape[1]
        eye = torch.eye(batch, dtype=v.dtype, device=v.device).view(1, batch, batch, *([1] * (v.dim() - 2)))
        return (eye * v[:, :, None]).flatten(0, 1)  # stream (i, n): v_i,n at sample n only
    return v


def _contract(tangents: Tensor, cotangent: Tensor, per_sample: bool) -> Tensor:
    """``<cotangent_m, tangent_s,m>`` per stream s and output sample m; summed over m unless ``per_sample``."""
    values = (tangents * cotangent).flatten(2).sum(-1)
    return values if per_sample else values.sum(-1)


def _rows(cotangent: Tensor) -> Tensor:
    """``(B, B, ...)``: row m holds sample m's cotangent, zeros elsewhere."""
    batch = cotangent.shape[0]
    eye = torch.eye(batch, dtype=cotangent.dtype, device=cotangent.device)
    return eye.view(batch, batch, *([1] * (cotangent.dim() - 1))) * cotangent


# ----------------------------------------------------------------------------- the step
def as_inputs(x) -> tuple:
    """The positional inputs of block 0: a tuple or list holds several inputs; a tensor or a dict is one."""
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def compute_gradients(model, x, y: Tensor, record: dict | None = None, compile=False) -> dict[str, Tensor]:
    """Fill ``p.grad`` for every parameter the method trains, update buffers (unless the loss is not
    finite); return detached metrics.

    ``model`` is a :class:`fwdtrans.Converted`; ``x`` its input (see :func:`as_inputs`), which reaches
    block 0 as is: no tangent is attached to it. Old gradients are cleared. ``record``, when given,
    receives per-block internals (targets, estimates, guesses) for :func:`fwdtrans.check`.
    ``compile`` (``True`` or ``torch.compile`` options) runs :func:`gradients` compiled whole.
    """
    for p in model.parameters():
        p.grad = None
    if model.method.guess == "ntk":
        for head in model.heads:
            reinitialise(head, model.generator)
    noise = draw_noise(model, y.shape[0])
    if compile:
        fn = model.compiled_gradients(compile if isinstance(compile, Mapping) else None)
    else:
        fn = functools.partial(gradients, model, record=record)
    with torch.no_grad():  # torch.func transforms differentiate on their own
        grads, buffers, metrics = fn(as_inputs(x), y, noise)
        for name, p in model.named_parameters():
            p.grad = grads.get(name)
        if torch.isfinite(metrics["loss"]):  # a non-finite step leaves the running statistics as they were
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
    return metrics


def gradients(model, inputs: tuple[Tensor, ...], y: Tensor, noise: list[list[Tensor]], record: dict | None = None):
    """The step as a pure function: ``(grads, new_buffers, metrics)``, grads and buffers by name."""
    return _Sweep(model, inputs, y, noise, record).run()


class _Sweep:
    """One step of any method."""

    def __init__(self, model, inputs: tuple[Tensor, ...], y: Tensor, noise: list[list[Tensor]], record: dict | None):
        self.model, self.inputs, self.y, self.noise, self.record = model, inputs, y, noise, record
        self.method = method = model.method
        self.forward = method.engine == "forward" and method.kind == "projected"
        # backprop and the reference engine chain the block pull-backs: they differentiate block inputs too
        self.chained = method.kind == "backprop" or (method.kind == "projected" and not self.forward)
        self.states = [state(b) for b in model.blocks]
        self.head_states = [state(h) for h in model.heads]
        self.blocks: list[_Block] = []
        self.grads: dict[str, Tensor] = {}
        self.buffers: dict[str, Tensor] = {}
        self.open: list[tuple[int, Tensor]] = []  # forward engine: (block, tangents)
        self.pending: list[tuple[int, Tensor]] = []  # streams="sequential": pushed after the sweep
        self.joint_total: Tensor | None = None  # the shared directional derivative of a joint method

    def _save(self, prefix: str, tensors: dict[str, Tensor], into: dict[str, Tensor]) -> None:
        into.update({f"{prefix}.{k}": v for k, v in tensors.items()})

    # -- the sweep
    def run(self):
        method, model, y = self.method, self.model, self.y
        last = len(model.blocks) - 1
        h = self.inputs
        for j in range(len(model.blocks)):
            tangents = torch.cat([t for _, t in self.open]) if self.open else None
            b, tangents = self._run(j, h, tangents)
            self.blocks.append(b)
            if tangents is not None:
                sizes = [t.shape[0] for _, t in self.open]
                self.open = [(i, t) for (i, _), t in zip(self.open, tangents.split(sizes))]
            if j < last and method.kind != "backprop":
                self._head(j, b)
                self._close(j, b.g)
                if method.kind == "projected":
                    self._guess(j, b)
                elif method.kind == "local":  # greedy local learning: the head loss trains the block
                    self._pull_params(j, b.g)
            h = (b.out,)
        logits = self.blocks[-1].out
        loss, pull = vjp(lambda o: F.cross_entropy(o, y), logits)
        (self.grad_logits,) = pull(torch.ones_like(loss))
        if method.kind == "backprop":
            self._backprop()
        elif method.kind == "local":
            self._pull_params(last, self.grad_logits)
        else:
            if self.forward:
                self._forward_values()
            else:
                self._reference_values()
            self._apply()
        return self.grads, self.buffers, self._metrics(loss, logits)

    def _run(self, j: int, inputs: tuple[Tensor, ...], tangents: Tensor | None) -> tuple[_Block, Tensor | None]:
        """Block ``j`` on ``inputs`` under ``vjp`` (pushing ``tangents`` if any); its new buffers are saved."""
        block, (trained, frozen, buffers) = self.model.blocks[j], self.states[j]
        chain = self.chained and j > 0

        def f(p, *x):
            x = x if chain else inputs
            if tangents is None:
                out, new = _call(block, {**frozen, **p}, buffers, *x)
                return out, {"buffers": new}
            out, t, new = push(block, x[0], tangents, (p, frozen, buffers))
            return out, {"buffers": new, "tangents": t}

        args = (trained, *(inputs if chain else ()))
        # the forward engine's weight space runs a block with dropout twice (_push_params): note its masks' seed
        rng = _rng() if self.forward and self.method.space == "weight" and self.model.dropout[j] else None
        if self.method.recompute and j < len(self.model.blocks) - 1:  # no pull-back kept: _pull recomputes it
            (out, aux), pull = f(*args), None
        else:
            out, pull, aux = vjp(f, *args, has_aux=True)
        new, tangents = aux["buffers"], aux.get("tangents")
        self._save(f"blocks.{j}", new, self.buffers)
        return _Block(out, inputs, pull, rng=rng), tangents

    def _pull(self, j: int, cotangent: Tensor) -> tuple:
        """Block ``j``'s vjp of ``cotangent``; recomputes the block's forward if it was not kept."""
        b = self.blocks[j]
        if b.pull is None:  # recompute=True: the same function, on the same inputs and buffers
            block, (trained, frozen, buffers) = self.model.blocks[j], self.states[j]
            return vjp(lambda p: _call(block, {**frozen, **p}, buffers, *b.inputs)[0], trained)[1](cotangent)
        return b.pull(cotangent)

    def _pull_params(self, j: int, cotangent: Tensor) -> None:
        self._save(f"blocks.{j}", self._pull(j, cotangent)[0], self.grads)

    def _back(self, k: int, cotangent: Tensor, batched: bool) -> Tensor:
        """The cotangent at block ``k``'s input from one at its output (rows ``(R, *out)`` if ``batched``)."""
        pull = self.blocks[k].pull
        return vmap(lambda c: pull(c)[1])(cotangent) if batched else pull(cotangent)[1]

    def _backprop(self) -> None:
        cotangent = self.grad_logits
        for k in range(len(self.blocks) - 1, -1, -1):
            grads, *rest = self.blocks[k].pull(cotangent)
            self._save(f"blocks.{k}", grads, self.grads)
            cotangent = rest[0] if rest else None

    def _head(self, j: int, b: _Block) -> None:
        head, (trained, frozen, buffers) = self.model.heads[j], self.head_states[j]
        train = self.method.trains_heads

        def f(o, p=trained):
            logits, new = _call(head, {**frozen, **p}, buffers, o)
            if isinstance(logits, Tensor):
                return F.cross_entropy(logits, self.y), new
            return sum(F.cross_entropy(z, self.y) for z in logits), new  # a SplitHead: one loss per tensor

        b.head_loss, pull, new = vjp(f, b.out, *((trained,) if train else ()), has_aux=True)
        b.g, *grads = pull(torch.ones_like(b.head_loss))
        self._save(f"heads.{j}", new, self.buffers)
        if train:
            self._save(f"heads.{j}", grads[0], self.grads)

    def _guess(self, j: int, b: _Block) -> None:
        method, model = self.method, self.model
        trained = self.states[j][0]
        if method.space == "weight" and not trained:  # nothing to estimate in a parameter-free block
            b.directions, b.units = [], [[]] if method.granularity == "joint" else []
            b.values = b.out.new_zeros(len(b.units) * method.tangents)
            return
        if method.space == "weight":
            head_grads = None
            if method.guess in ("local", "ntk", "fixed-ntk"):
                head_grads = list(self._pull(j, b.g)[0].values())
            if self.forward:  # weight estimates need no pull-back: free the block's activations now
                b.pull = None
            b.directions, b.normalise = weight_guess(head_grads, self.noise[j])
            b.units = [[i] for i in range(len(trained))] if method.granularity == "tensor" else [list(range(len(trained)))]
        else:
            try:
                b.directions, b.normalise = activity_guess(method, j, b.out, b.g, self.y, self.noise[j],
                                                           self._segments(j))
            except ValueError as e:
                raise FwdTransError(f"guess callable: {e}") from None
        if not self.forward:
            return  # the reference engine derives every value after the sweep
        streams = _stream_directions(method, b)
        origin = _push_params(model.blocks[j], b.inputs, streams, self.states[j], b.rng) if method.space == "weight" \
            else streams
        if method.target == "local":
            b.values = _contract(origin, b.g, _per_sample(method))
        elif method.streams == "sequential":
            self.pending.append((j, origin))
        elif method.joint and method.target == "global" and self.open:  # join the single stream here
            first, tangents = self.open[0]
            self.open[0] = (first, tangents + origin)
        else:
            self.open.append((j, origin))
        if method.space == "weight" and method.streams != "sequential":
            # nothing after this block reads its input, nor its head's gradient: free them now, so that
            # weight space holds no activation of a finished block
            b.inputs, b.g = (), None
            if j > 0:
                self.blocks[j - 1].out = None

    def _close(self, j: int, cotangent: Tensor) -> None:
        """End the bundles of block ``j - 1`` when its target is block ``j``'s head loss."""
        if self.method.target != "intermediate" or not self.forward:
            return
        keep = []
        for origin, tangents in self.open:
            if origin == j - 1:
                self.blocks[origin].values = _contract(tangents, cotangent, _per_sample(self.method))
            else:
                keep.append((origin, tangents))
        self.open = keep

    # -- directional derivatives
    def _forward_values(self) -> None:
        method, per_sample = self.method, _per_sample(self.method)
        for j, tangents in self.open:
            self.blocks[j].values = _contract(tangents, self.grad_logits, per_sample)
        for j, origin in self.pending:
            self.blocks[j].values = self._propagate(j, origin)
        if method.joint and method.target == "global" and self.open:  # one stream carried every guess
            self.joint_total = self.blocks[self.open[0][0]].values
        elif method.joint:  # local or intermediate targets: each block's value was read at its own target
            self.joint_total = sum(b.values for b in self.blocks[:-1])

    def _propagate(self, j: int, origin: Tensor) -> Tensor:
        """Push one bundle from block ``j`` to its target on its own, recomputing the primal."""
        last = len(self.blocks) - 1
        end = j + 1 if self.method.target == "intermediate" and j + 1 < last else last
        h, tangents = self.blocks[j].out, origin
        for k in range(j + 1, end + 1):
            h, tangents, _ = push(self.model.blocks[k], h, tangents, self.states[k])
        return _contract(tangents, self.blocks[end].g if end < last else self.grad_logits, _per_sample(self.method))

    def _reference_values(self) -> None:
        """The same values from the chained pull-backs: each target's cotangent at every block output."""
        method, blocks = self.method, self.blocks
        last = len(blocks) - 1
        per_sample = _per_sample(method)
        read = _rows if per_sample else (lambda c: c)
        cot: list[Tensor | None] = [None] * last
        if method.target == "global":  # one walk back from the logits reaches every block output
            c = read(self.grad_logits)
            for k in range(last, 0, -1):
                cot[k - 1] = c = self._back(k, c, per_sample)
        for j in range(last):
            if method.target == "local":
                cot[j] = read(blocks[j].g)
            elif method.target == "intermediate":
                cot[j] = self._back(j + 1, read(blocks[j + 1].g if j + 1 < last else self.grad_logits), per_sample)
        for j, b in enumerate(blocks[:-1]):
            if b.values is not None:  # a parameter-free block in weight space
                continue
            streams = _stream_directions(method, b)
            if method.space == "weight":
                grads = list(self._pull(j, cot[j])[0].values())
                b.values = sum((s * g).flatten(1).sum(-1) for s, g in zip(streams, grads))
                b.target = grads
            elif per_sample:
                b.values = torch.einsum("mnd,snd->sm", cot[j].flatten(2), streams.flatten(2))  # (S, B)
                b.target = [cot[j].sum(0)]
            else:
                b.values = (streams * cot[j]).flatten(1).sum(-1)
                b.target = [cot[j]]
        if method.joint:
            self.joint_total = sum(b.values for b in blocks[:-1])

    def _segments(self, j: int) -> tuple[int, ...]:
        """Per-sample sizes of the tensors packed in block ``j``'s output (one entry: a single tensor)."""
        return self.model.segments[j]

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
            m = len(self._segments(j))  # each crossing tensor's guesses form their own group of rows
            return sum(_projection.combine(di, vi.flatten(2), **agg) for di, vi in zip(d.chunk(m), v.chunk(m))).view_as(v[0])
        k = method.tangents
        est = [torch.zeros_like(vi[0]) for vi in v]
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

    def _apply(self) -> None:
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
        for j, est in enumerate(ests):
            if method.space == "weight":
                self._save(f"blocks.{j}", dict(zip(self.states[j][0], est)), self.grads)
            elif self.states[j][0]:
                self._pull_params(j, est)
        self._pull_params(last, self.grad_logits)  # the last block: the exact gradient of the global loss

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

    def _metrics(self, loss: Tensor, logits: Tensor) -> dict[str, Tensor]:
        metrics = {"loss": loss, "accuracy": (logits.argmax(-1) == self.y).float().mean()}
        for j, b in enumerate(self.blocks[:-1]):
            if b.head_loss is not None:
                metrics[f"loss/head{j}"] = b.head_loss
        return metrics
