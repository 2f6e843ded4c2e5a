"""Blocks as pure functions: every call the engine, ``check`` and ``convert``'s probes make of a block.

A block (or a head) is called with ``torch.func.functional_call`` on parameters and buffers passed in,
never on its own state: buffers are cloned and their new values returned, so BatchNorm's running
statistics are updated once per step however often the block runs, and nothing is written while a
``torch.func`` transform (or ``torch.compile``) traces the step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.func
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch._functorch import eager_transforms as _et  # torch.func.vjp's building blocks (see vjp)
from torch.func import functional_call, jvp
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import _tangents

vmap: Callable[..., Any] = torch.func.vmap  # its stub refuses out_dims entries of None

__all__ = ["State", "as_inputs", "call", "norm_affine", "push", "push_params", "replaying", "rng_state", "state",
           "vjp"]

State = tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]  # trained params, frozen params, buffers


def vjp(func: Callable[..., Any], *primals: Any, has_aux: bool = False) -> tuple:
    """``torch.func.vjp``, whose pull-back differentiates only the primals it is asked for.

    ``pull(cotangent, argnums=None)`` returns one entry per primal, like ``torch.func.vjp``'s; with
    ``argnums`` (positions), only those entries are computed and the others are ``None``. The backward
    then skips the work no requested primal needs: a block's pull-back to its input alone computes no
    weight gradient (a convolution's ``grad_weight``), and to its parameters alone no gradient at the
    block's input, so walking a cotangent back through a block and pulling back an estimate through it
    cost one backward between them, as in backprop, instead of two. The same implementation as
    ``torch.func.vjp`` (whose pull-back always differentiates every primal); Dynamo traces it the same way.
    """
    with _et.grad_increment_nesting() as level, torch.enable_grad():
        wrapped = _et._wrap_all_tensors(primals, level)
        diff = _et._create_differentiable(wrapped, level)
        out = func(*wrapped)
        aux = None
        if has_aux:
            out, aux = out
            aux = _et._undo_create_differentiable(aux, level)
        flat_out, out_spec = tree_flatten(out)
        result = _et._undo_create_differentiable(out, level)
    flat_diff = [tree_flatten(d) for d in diff]

    def pull(cotangent: Any, argnums: Sequence[int] | None = None) -> tuple:
        flat_cot, spec = tree_flatten(cotangent)
        if spec != out_spec:
            raise RuntimeError(f"vjp: the cotangent's structure {spec} differs from the output's {out_spec}")
        chosen = range(len(flat_diff)) if argnums is None else argnums
        inputs = [t for i in chosen for t in flat_diff[i][0]]
        ctx = contextlib.nullcontext() if torch.compiler.is_compiling() else _no_inference_mode()
        with ctx:
            grads = list(_et._autograd_grad(flat_out, inputs, flat_cot, retain_graph=True,
                                            create_graph=torch.is_grad_enabled()))
        entries: list[Any] = [None] * len(flat_diff)
        at = 0
        for i in chosen:
            leaves, tree = flat_diff[i]
            entries[i] = tree_unflatten(grads[at:at + len(leaves)], tree)
            at += len(leaves)
        return tuple(entries)

    return (result, pull, aux) if has_aux else (result, pull)


def _no_inference_mode() -> contextlib.AbstractContextManager:
    disable = getattr(_et, "_disable_inference_mode", None)
    return disable() if disable is not None else torch.inference_mode(False)


def as_inputs(x: object) -> tuple:
    """The positional inputs of block 0: a tuple or list holds several inputs; a tensor or a dict is one."""
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def state(module: nn.Module) -> State:
    """A module's trained parameters, frozen parameters and buffers, by name."""
    params: dict[str, Tensor] = dict(module.named_parameters())
    trained = {k: p for k, p in params.items() if p.requires_grad}
    return trained, {k: p for k, p in params.items() if not p.requires_grad}, dict(module.named_buffers())


def call(module: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], *args: Any) -> tuple:
    """``module(*args)`` with ``params``; returns ``(out, new_buffers)`` (buffers cloned, never mutated)."""
    fresh = {k: b.clone() for k, b in buffers.items()}
    return functional_call(module, (params, fresh), args), fresh


def norm_affine(block: nn.Module) -> tuple[str, ...]:
    """Names of the affine parameters of ``block``'s BatchNorms: modules, and ``F.batch_norm`` calls traced
    through (read from the graph eagerly, once per graph: under ``torch.compile`` the last eager answer)."""
    modules = tuple(f"{name}.{k}" for name, m in block.named_modules()
                    if isinstance(m, nn.modules.batchnorm._NormBase) for k, _ in m.named_parameters(recurse=False))
    cached: tuple[int, tuple[str, ...]] | None = block.__dict__.get("_fwdtrans_functional_norms")
    if torch.compiler.is_compiling() or not isinstance(block, fx.GraphModule):
        return modules + (cached[1] if cached else ())
    if cached is None or cached[0] != id(block.graph):
        cached = id(block.graph), _functional_norm_affine(block.graph)
        block.__dict__["_fwdtrans_functional_norms"] = cached
    return modules + cached[1]


def _functional_norm_affine(graph: fx.Graph) -> tuple[str, ...]:
    """The ``get_attr`` targets of the weight and bias of every ``F.batch_norm`` call in ``graph``."""
    names: list[str] = []
    for n in graph.nodes:
        if n.op == "call_function" and n.target in (F.batch_norm, torch.batch_norm):
            signature = ("input", "running_mean", "running_var", "weight", "bias")
            args = {**dict(zip(signature, n.args, strict=False)), **n.kwargs}
            names += [str(a.target) for k in ("weight", "bias")
                      if isinstance(a := args.get(k), fx.Node) and a.op == "get_attr"]
    return tuple(dict.fromkeys(names))


def push(block: nn.Module, h: Tensor, streams: Sequence[Tensor], st: State | None = None
         ) -> tuple[Tensor, list[Tensor], dict]:
    """Run ``block`` on ``h`` and push the tangent streams through it: ``streams`` holds chunks ``(S_c, *h.shape)``
    (the open bundles), pushed together.

    Returns ``(out, tangents per chunk, new_buffers)``; the primal is computed once. A block whose every node
    has a tangent rule (:mod:`fwdtrans._tangents`) is interpreted with them, each chunk on its own (no copy
    into one stack); any other runs under ``vmap(jvp)`` over the chunks concatenated, where dropout draws
    one mask for the primal and every stream, and, under ``torch.compile``, the normalisation layers'
    affine parameters join the ``jvp`` primals with zero tangents: torch 2.13 fails to compile a BatchNorm
    whose input carries a tangent while its weight does not (pytorch/pytorch#139756).
    """
    trained, frozen, buffers = st or state(block)
    params = {**frozen, **trained}
    prog = _tangents.program(block)
    if prog is not None:
        out, chunks, new = _tangents.push(prog, params, buffers, (h,), streams)
        return out, [t if t is not None else out.new_zeros(s.shape[0], *out.shape)
                     for t, s in zip(chunks, streams, strict=True)], new
    dual = {k: params[k] for k in norm_affine(block) if k in params} if torch.compiler.is_compiling() else {}
    zeros = {k: torch.zeros_like(v) for k, v in dual.items()}

    def f(x: Tensor, d: dict[str, Tensor]) -> tuple:
        return call(block, {**params, **d}, buffers, x)

    stacked = streams[0] if len(streams) == 1 else torch.cat(list(streams))
    out, tangents, new = vmap(lambda t: jvp(f, (h, dual), (t, zeros), has_aux=True),
                              out_dims=(None, 0, 0), randomness="same")(stacked)
    return out, list(tangents.split([s.shape[0] for s in streams])), {k: b[0] for k, b in new.items()}


def push_params(block: nn.Module, h: tuple, directions: Sequence[tuple[int, Tensor]], streams: int,
                st: State | None = None, rng: list[Tensor] | None = None) -> Tensor:
    """``J_theta block(h) . v`` for ``streams`` directions ``v``: per trained parameter, ``(first, (s, *p))``
    gives its direction in streams ``first .. first + s`` (zero in the others).

    This runs the block again: ``rng`` (the random state its forward started from, see
    :func:`rng_state`) makes it draw the forward's dropout masks again, and leaves the random state
    as it found it.
    """
    trained, frozen, buffers = st or state(block)
    names = list(trained)
    prog = _tangents.program(block)
    if prog is not None:
        out, (tangents,), _ = _tangents.push(prog, {**frozen, **trained}, buffers, h,
                                             directions=dict(zip(names, directions, strict=True)), streams=streams)
        return tangents if tangents is not None else out.new_zeros(streams, *out.shape)
    dense = []
    for (first, v), p in zip(directions, trained.values(), strict=True):
        rows = [p.new_zeros(first, *p.shape), v, p.new_zeros(streams - first - v.shape[0], *p.shape)]
        dense.append(torch.cat([r for r in rows if r.shape[0]]) if v.shape[0] < streams else v)

    def one(*v: Tensor) -> Tensor:
        return jvp(lambda *p: call(block, {**frozen, **dict(zip(names, p, strict=True))}, buffers, *h)[0],
                   tuple(trained.values()), v)[1]

    with replaying(rng):
        return vmap(one, randomness="same")(*dense)


@contextlib.contextmanager
def replaying(rng: list[Tensor] | None) -> Iterator[None]:
    """Run the body from the random state ``rng`` (see :func:`rng_state`), so that a block run again draws
    the dropout masks of its first run; the random state is left as it was. ``None``: nothing to replay."""
    if rng is None:
        yield
        return
    devices = list(range(len(rng) - 1))
    with torch.random.fork_rng(devices):
        torch.set_rng_state(rng[0])
        for device, s in zip(devices, rng[1:], strict=True):
            torch.cuda.set_rng_state(s, device)
        yield


def rng_state() -> list[Tensor]:
    """The random state dropout draws from: the CPU's, then every CUDA device's."""
    return [torch.get_rng_state(), *(torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [])]
