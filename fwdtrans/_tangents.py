"""Tangent rules: a block's forward and the forward derivative of many tangent streams at once, node by node.

``torch.func.jvp`` under ``vmap`` pushes streams through any block, but it computes each op's tangent from
the op's generic decomposition, one batching rule at a time: a train-mode BatchNorm's tangent costs several
times its hand-derived formula, and under the sweep's ``vjp`` every tangent op is recorded for a backward
that never reads it. For a block made only of the layers below (a ResNet's, a VGG's, an MLP's),
:func:`push` interprets its fx graph instead: each node's primal as the layer computes it, and the tangents
of ``S`` streams, stacked ``(S, B, ...)`` in chunks (the open bundles), from the layer's derivative written
out (convolutions and linear layers run once per chunk on its streams folded into the batch; BatchNorm's
tangent from the statistics its forward already computed), outside autograd. Parameter directions enter at
the layers that use them.

Any other node (dropout, whose masks ``vmap`` draws; a synchronised BatchNorm; an unknown function) leaves
the block to ``torch.func``: :func:`program` returns ``None``. Both paths agree to float64 rounding
(``tests/test_tangents.py``).

Adding a layer: a rule ``(ctx, prefix, module, primals) -> (out, tangent)`` (``tangent``: one chunk of the
arguments' tangents to the output's) in :data:`_MODULES`, :data:`_FUNCTIONS` or :data:`_METHODS`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

__all__ = ["Program", "program", "push"]

_ATTR = "_fwdtrans_tangent_program"


@dataclass
class _Ctx:
    """One run of a program: the block's parameters and (cloned) buffers by name, the stream count, and
    the parameter directions ``name -> (first stream, (s, *p))``."""

    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    streams: int
    directions: dict[str, tuple[int, Tensor]]

    def param(self, prefix: str, name: str) -> Tensor | None:
        return self.params.get(f"{prefix}.{name}" if prefix else name)

    def has(self, prefix: str, name: str) -> bool:
        """Whether the parameter has a direction."""
        return (f"{prefix}.{name}" if prefix else name) in self.directions

    def buffer(self, prefix: str, name: str) -> Tensor | None:
        return self.buffers.get(f"{prefix}.{name}" if prefix else name)

    def with_directions(self, prefix: str, out: Tensor, tangent: Tensor | None,
                        terms: Sequence[tuple[str, Callable[[Tensor], Tensor]]]) -> Tensor | None:
        """``tangent`` plus each parameter direction's image ``term(v)`` ``(s, *out)``, on its streams' rows
        (added in place: ``tangent`` is the rule's own; only the last term, a bias's, may be an expanded view)."""
        for name, term in terms:
            entry = self.directions.get(f"{prefix}.{name}" if prefix else name)
            if entry is None:
                continue
            first, v = entry
            image = term(v)
            if tangent is None and first == 0 and v.shape[0] == self.streams:
                tangent = image
                continue
            if tangent is None:
                tangent = out.new_zeros(self.streams, *out.shape)
            tangent[first:first + v.shape[0]] += image
        return tangent


def _fold(f: Callable[[Tensor], Tensor], t: Tensor) -> Tensor:
    """``f`` on streams ``(S, B, ...)`` folded into the batch."""
    return f(t.flatten(0, 1)).unflatten(0, t.shape[:2])


def _per_channel(c: Tensor, dims: int, streams: bool = True) -> Tensor:
    """A ``(S, C)`` (or ``(C,)``) tensor shaped to broadcast over ``(S, B, C, *spatial)`` (or ``(B, C, ...)``)."""
    return c.reshape(*c.shape[:-1], *([1] if streams else []), c.shape[-1], *([1] * dims))


# ----------------------------------------------------------------------------- rules
# A rule: (ctx, prefix (the module's name), module or None, primal args) -> (out, tangent), where
# tangent(ts) maps one chunk of streams' tangents of the args (None: zero) to the output's. The primal runs
# as the layer's own forward does (recorded by an enclosing vjp); the tangents outside autograd.
Tangent = Callable[[list], Tensor | None]
Rule = Callable[[_Ctx, str, Any, list], tuple[Tensor, Tangent]]


def _untracked() -> torch.no_grad:
    """Tangent work is never differentiated: it runs outside autograd (and the sweep's ``vjp``)."""
    return torch.no_grad()


def _conv(ctx: _Ctx, prefix: str, m: Any, args: list) -> tuple[Tensor, Tangent]:
    (x,) = args
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[x.dim() - 2]
    w, b = ctx.param(prefix, "weight"), ctx.param(prefix, "bias")
    assert w is not None
    out = conv(x, w, b, m.stride, m.padding, m.dilation, m.groups)

    def apply(z: Tensor, weight: Tensor) -> Tensor:
        return conv(z, weight, None, m.stride, m.padding, m.dilation, m.groups)

    def weight_term(v: Tensor) -> Tensor:  # conv(x, v_s) for every direction s, as one convolution
        s, g = v.shape[0], m.groups
        stacked = v.unflatten(1, (g, -1)).transpose(0, 1).flatten(0, 2)  # (g * s * Cout/g, Cin/g, *k)
        return apply(x, stacked).unflatten(1, (g, s, -1)).movedim(2, 0).flatten(2, 3)  # (s, B, Cout, *sp)

    def tangent(ts: list) -> Tensor | None:
        t = None if ts[0] is None else _fold(lambda z: apply(z, w), ts[0])
        return ctx.with_directions(prefix, out, t, [
            ("weight", weight_term), ("bias", lambda v: _per_channel(v, x.dim() - 2).expand(-1, *out.shape))])
    return out, tangent


def _linear(ctx: _Ctx, prefix: str, m: Any, args: list) -> tuple[Tensor, Tangent]:
    (x,) = args
    w, b = ctx.param(prefix, "weight"), ctx.param(prefix, "bias")
    assert w is not None
    out = F.linear(x, w, b)
    lead = [1] * (x.dim() - 2)

    def tangent(ts: list) -> Tensor | None:
        return ctx.with_directions(prefix, out, None if ts[0] is None else ts[0] @ w.T, [
            ("weight", lambda v: x @ v.mT.reshape(v.shape[0], *lead, v.shape[2], v.shape[1])),
            ("bias", lambda v: v.reshape(v.shape[0], *lead, 1, -1).expand(-1, *out.shape))])
    return out, tangent


def _batch_norm(ctx: _Ctx, prefix: str, m: Any, args: list) -> tuple[Tensor, Tangent]:
    """The module's forward (running statistics updated as it does), and the tangent of ``w * xhat + b``:
    with batch statistics ``(t - mean(t) - xhat * mean(t * xhat)) * w / sigma``, else ``t * w / sigma``;
    a direction ``(u, c)`` of ``(w, b)`` adds ``u * xhat + c``."""
    (x,) = args
    w, b = ctx.param(prefix, "weight"), ctx.param(prefix, "bias")
    mean, var = ctx.buffer(prefix, "running_mean"), ctx.buffer(prefix, "running_var")
    tracked = ctx.buffer(prefix, "num_batches_tracked")
    factor = 0.0 if m.momentum is None else m.momentum
    if m.training and m.track_running_stats and tracked is not None:
        tracked.add_(1)
        factor = 1.0 / float(tracked) if m.momentum is None else m.momentum
    batch_stats = m.training or (mean is None and var is None)
    keep = not m.training or m.track_running_stats
    out, save_mean, save_invstd = torch.native_batch_norm(
        x, w, b, mean if keep else None, var if keep else None, batch_stats, factor, m.eps)
    dims = x.dim() - 2
    compiling = torch.compiler.is_compiling()

    with _untracked():
        if batch_stats:
            invstd, centre = save_invstd, save_mean
        else:
            assert mean is not None and var is not None
            invstd, centre = torch.rsqrt(var + m.eps), mean
        scale = _per_channel(invstd if w is None else invstd * w, dims, False)
        xhat = None
        if ctx.has(prefix, "weight") or (compiling and batch_stats):
            xhat = (x - _per_channel(centre, dims, False)) * _per_channel(invstd, dims, False)

    def tangent(ts: list) -> Tensor | None:
        t = ts[0]
        if t is not None and batch_stats and compiling:  # one fused kernel for every stream
            assert xhat is not None
            reduce = (1, *range(3, t.dim()))
            n = x.numel() // x.shape[1]
            t_mean, tx_mean = t.sum(reduce) / n, (t * xhat).sum(reduce) / n
            t = (t - _per_channel(t_mean, dims) - xhat * _per_channel(tx_mean, dims)) * scale
        elif t is not None and batch_stats:
            # the Jacobian of batch normalisation is symmetric: its tangent is its backward's input gradient,
            # (t - mean(t) - xhat * mean(t * xhat)) * w / sigma, which torch's kernel computes per stream
            # (one stream: no stack, which would copy it)
            per_stream = [torch.ops.aten.native_batch_norm_backward(
                stream, x, w, mean, var, save_mean, save_invstd, True, m.eps, [True, False, False])[0]
                for stream in t]
            t = per_stream[0][None] if len(per_stream) == 1 else torch.stack(per_stream)
        elif t is not None:
            t = t * scale
        return ctx.with_directions(prefix, out, t, [
            ("weight", lambda v: cast(Tensor, xhat) * _per_channel(v, dims)),
            ("bias", lambda v: _per_channel(v, dims).expand(-1, *out.shape))])
    return out, tangent


def _relu(ctx: _Ctx, prefix: str, m: Any, args: list) -> tuple[Tensor, Tangent]:
    out = F.relu(args[0])
    # the tangent where the output is positive, else 0: one kernel (torch's own ReLU derivative), where
    # `t * (out > 0)` would also build the mask and convert it to the tangent's dtype
    return out, lambda ts: None if ts[0] is None else torch.ops.aten.threshold_backward(ts[0], out, 0)


def _identity(ctx: _Ctx, prefix: str, m: Any, args: list) -> tuple[Tensor, Tangent]:
    return args[0], lambda ts: ts[0]


def _pool(ctx: _Ctx, prefix: str, m: Any, args: list) -> tuple[Tensor, Tangent]:
    """A layer linear in its input, without parameters (average pooling)."""
    return m(args[0]), lambda ts: None if ts[0] is None else _fold(m, ts[0])


def _max_pool(ctx: _Ctx, prefix: str, m: Any, args: list) -> tuple[Tensor, Tangent]:
    out, index = F.max_pool2d(args[0], m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                              return_indices=True)

    def tangent(ts: list) -> Tensor | None:
        t = ts[0]
        if t is None:
            return None
        flat = index.flatten(-2).expand(t.shape[0], *index.shape[:-2], -1)
        return t.flatten(-2).gather(-1, flat).view(t.shape[0], *out.shape)
    return out, tangent


def _flatten(ctx: _Ctx, prefix: str, m: Any, args: list) -> tuple[Tensor, Tangent]:
    """``torch.flatten``; the streams' dimension shifts every non-negative dimension by one."""
    start, end = (m.start_dim, m.end_dim) if m is not None else [*args[1:], *[0, -1][len(args) - 1:]]
    shift = (start + 1 if start >= 0 else start, end + 1 if end >= 0 else end)
    return torch.flatten(args[0], start, end), lambda ts: None if ts[0] is None else torch.flatten(ts[0], *shift)


def _add(ctx: _Ctx, prefix: str, m: Any, args: list) -> tuple[Tensor, Tangent]:
    out = args[0] + args[1]

    def tangent(ts: list) -> Tensor | None:
        terms = [t.view(t.shape[0], *([1] * (out.dim() - t.dim() + 1)), *t.shape[1:]) for t in ts if t is not None]
        if not terms:
            return None
        t = terms[0] if len(terms) == 1 else terms[0] + terms[1]
        return t if t.shape[1:] == out.shape else t.expand(-1, *out.shape)
    return out, tangent


_MODULES: dict[type, Rule] = {
    nn.Conv1d: _conv, nn.Conv2d: _conv, nn.Conv3d: _conv, nn.Linear: _linear,
    nn.BatchNorm1d: _batch_norm, nn.BatchNorm2d: _batch_norm, nn.BatchNorm3d: _batch_norm,
    nn.ReLU: _relu, nn.Identity: _identity, nn.MaxPool2d: _max_pool, nn.Flatten: _flatten,
    nn.AdaptiveAvgPool1d: _pool, nn.AdaptiveAvgPool2d: _pool, nn.AdaptiveAvgPool3d: _pool,
    nn.AvgPool1d: _pool, nn.AvgPool2d: _pool, nn.AvgPool3d: _pool,
}
_FUNCTIONS: dict[Any, Rule] = {operator.add: _add, torch.add: _add, F.relu: _relu, torch.relu: _relu,
                               torch.flatten: _flatten}
_METHODS: dict[str, Rule] = {"add": _add, "relu": _relu, "flatten": _flatten}


def _rule(gm: fx.GraphModule, node: fx.Node) -> tuple[Rule, Any] | None:
    """The rule of a call node and its module (``None``: no rule, the block is left to ``torch.func``)."""
    args, kwargs = node.args, node.kwargs
    if not args or not isinstance(args[0], fx.Node) or kwargs and dict(kwargs) != {"inplace": False}:
        return None
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        rule = _MODULES.get(type(m))
        if rule is None or len(args) != 1:
            return None
        if isinstance(m, nn.modules.conv._ConvNd) and m.padding_mode != "zeros":
            return None
        if isinstance(m, nn.ReLU) and m.inplace and len(args[0].users) > 1:  # others read what it overwrites
            return None
        if isinstance(m, nn.MaxPool2d) and m.return_indices:
            return None
        return rule, m
    table: dict = _FUNCTIONS if node.op == "call_function" else _METHODS if node.op == "call_method" else {}
    rule = table.get(node.target)
    if rule is None:
        return None
    if rule is _add and (len(args) != 2 or not isinstance(args[1], (fx.Node, int, float))):
        return None
    if rule is _relu and len(args) != 1:
        return None
    if rule is _flatten and not all(isinstance(a, int) for a in args[1:]):
        return None
    return rule, None


# ----------------------------------------------------------------------------- programs
@dataclass(frozen=True)
class Program:
    """A block's graph as a list of steps, each ``(rule, module prefix, module, args, last)`` where an arg
    is ``_Ref(i)`` (value ``i``: the inputs, then each step's output) or a constant, and ``last`` the values
    no later step reads (released after this one, so that a block holds no more than its forward does);
    ``modules``: every module it calls, by name, and ``types`` their classes: neither may change (a module
    replaced in the block, or a BatchNorm made synchronised, which has no rule here)."""

    inputs: int
    steps: tuple[tuple[Rule, str, Any, tuple, tuple[int, ...]], ...]
    result: int
    modules: dict[str, nn.Module]
    types: tuple[type, ...]
    forward: Callable  # the graph module's code when it was built

    def current(self, block: nn.Module) -> bool:
        """Whether ``block`` still runs this graph, with these modules, of these classes."""
        return (type(block).forward is self.forward
                and all(block.get_submodule(name) is m for name, m in self.modules.items())
                and tuple(type(m) for m in self.modules.values()) == self.types)


@dataclass(frozen=True)
class _Ref:
    index: int


def _build(gm: fx.GraphModule) -> Program | None:
    index: dict[fx.Node, int] = {}
    steps: list[tuple[Rule, str, Any, tuple]] = []
    inputs = 0
    result = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if steps:
                return None
            index[node], inputs = inputs, inputs + 1
        elif node.op == "output":
            result = index.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        else:
            found = _rule(gm, node)
            if found is None:
                return None
            rule, m = found
            args = tuple(_Ref(index[a]) if isinstance(a, fx.Node) else a for a in node.args)
            index[node] = inputs + len(steps)
            steps.append((rule, str(node.target) if m is not None else "", m, args))
    if result is None or not inputs:
        return None
    read_last = {a.index: i for i, (*_, args) in enumerate(steps) for a in args if isinstance(a, _Ref)}
    last = [tuple(v for v, i in read_last.items() if i == n and v != result) for n in range(len(steps))]
    modules = {prefix: m for _, prefix, m, _ in steps if m is not None}
    return Program(inputs, tuple((*step, free) for step, free in zip(steps, last, strict=True)), result, modules,
                   tuple(type(m) for m in modules.values()), type(gm).forward)


def program(block: nn.Module) -> Program | None:
    """``block``'s program, or ``None`` when one of its nodes has no rule (or it is no fx graph). Built
    once per block, eagerly, and kept on it (a converted model's own module); built again when the block's
    code or one of its modules changed."""
    cached = getattr(block, _ATTR, None)
    if (cached is None or cached and not cached.current(block)) and isinstance(block, fx.GraphModule) \
            and not torch.compiler.is_compiling():
        cached = _build(block) or False
        object.__setattr__(block, _ATTR, cached)
    return cached if cached and cached.current(block) else None


def push(prog: Program, params: dict[str, Tensor], buffers: dict[str, Tensor], inputs: Sequence[Tensor],
         tangents: Sequence[Tensor] = (), directions: dict[str, tuple[int, Tensor]] | None = None, streams: int = 0
         ) -> tuple[Tensor, list[Tensor | None], dict[str, Tensor]]:
    """Run the block: ``(out, tangents (S_c, *out) per chunk (None: zero), new buffers)``.

    ``tangents``: chunks of streams ``(S_c, *x)`` at the first input, each pushed on its own (the open
    bundles, which are never copied into one stack); ``directions``: per trained parameter name,
    ``(first stream, (s, *p))``, the parameter direction of streams ``first .. first + s`` of one chunk of
    ``streams`` streams, when no input tangent is given. Buffers are cloned, never written.
    """
    assert not (tangents and directions), "parameter directions go with no input tangents"
    fresh = {k: b.clone() for k, b in buffers.items()}
    ctx = _Ctx(params, fresh, streams, directions or {})
    chunks = len(tangents) or 1
    values: list[Tensor | None] = list(inputs)
    first: list[Tensor | None] = list(tangents) or [None]
    none: list[Tensor | None] = [None] * chunks
    tans: list[list[Tensor | None] | None] = [first, *[none] * (prog.inputs - 1)]
    for rule, prefix, m, refs, last in prog.steps:
        args = [values[a.index] if isinstance(a, _Ref) else a for a in refs]
        value, tangent = rule(ctx, prefix, m, args)
        del args
        per_arg = [cast(list, tans[a.index]) if isinstance(a, _Ref) else none for a in refs]
        with _untracked():
            tans.append([tangent([ts[c] for ts in per_arg]) for c in range(chunks)])
        values.append(value)
        per_arg = []  # released (not with `del`: Dynamo cannot trace deleting a name a comprehension reads)
        for i in last:
            values[i] = tans[i] = None
    out, result = values[prog.result], tans[prog.result]
    assert out is not None and result is not None
    return out, result, fresh
