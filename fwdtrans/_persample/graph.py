"""Graph preparation: a block's rewritten graph (its *plan*), built once per block and set of trained parameters.

A zero "delta" is added to the output of every node holding trained parameters (a *site*), and every site's
inputs are returned as well: a pull-back with respect to the deltas gives each layer's output gradient (batch
coupling included), a push of tangents at the deltas the forward engine's streams. A second copy of the graph
returns the sites' outputs, for the deltas' shapes (a run on the meta device, cached per input signature).
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_map

from .._errors import FwdTransError

_KNOWN = ("linear", "conv", "batchnorm", "layernorm", "groupnorm")


def _kind(m: nn.Module) -> str:
    """The rule for a module: one of ``_KNOWN``, or ``"module"`` (the vmap fallback).

    A subclass that overrides ``forward`` computes something else: it takes the fallback.
    """
    fwd = type(m).forward
    if isinstance(m, nn.Linear) and fwd is nn.Linear.forward:
        return "linear"
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and fwd in (nn.Conv1d.forward, nn.Conv2d.forward,
                                                                    nn.Conv3d.forward):
        return "conv"
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and fwd is nn.modules.batchnorm._BatchNorm.forward:
        return "batchnorm"
    if isinstance(m, nn.LayerNorm) and fwd is nn.LayerNorm.forward:
        return "layernorm"
    if isinstance(m, nn.GroupNorm) and fwd is nn.GroupNorm.forward:
        return "groupnorm"
    return "module"


class Ref:
    """In a fallback site's recorded arguments: a trained parameter, a frozen one, or recorded input ``i``."""

    __slots__ = ("kind", "ref")

    def __init__(self, kind: str, ref: str | int):
        self.kind, self.ref = kind, ref


def _add_delta(y: Tensor, d: Tensor | None) -> Tensor:
    """``y + d``: the node of the rewritten graph whose ``d`` cotangent is the layer's output gradient."""
    return y if d is None else y + d


@dataclass
class Site:
    """A node whose output gets a delta: a layer (or op) holding trained parameters."""

    node: str  # the graph node's name, for messages
    kind: str  # _KNOWN, "module" (call_module fallback), "function" (call_function/call_method fallback)
    module: Any  # call_module: the module (its hyperparameters: typed loosely, nn.Module attributes are untyped)
    prefix: str  # call_module: the module's path in the block ("" for the root)
    roles: dict[str, str]  # local name -> full parameter name, trained parameters only
    call: Callable[..., Any] | None = None  # function / method sites: the node's op
    args: Any = None  # fallback sites: the node's (args, kwargs); function sites hold Ref in place of Nodes


@dataclass
class Plan:
    gm: fx.GraphModule  # forward(deltas, *inputs) -> (out, records): records[i] the recorded inputs of site i
    shapes_gm: fx.GraphModule  # forward(*inputs) -> (the sites' outputs, the block's output), for their shapes
    sites: list[Site]
    uses: dict[str, list[tuple[int, str]]]  # trained name -> [(site index, local name)]
    graph: weakref.ref  # the block's graph it was built from (weakly: a graph refers to its module)
    # per input signature: each site's output shape and dtype, and the block output's (None: not one tensor)
    shapes: dict[tuple, tuple[list[tuple[torch.Size, torch.dtype]], tuple[torch.Size, torch.dtype] | None]] = \
        field(default_factory=dict)


# plans per block: id(block) -> {sorted trained names: plan}; a plain dict (torch.compile traces lookups in it,
# not in a WeakKeyDictionary), emptied by a finaliser when the block is collected
_PLANS: dict[int, dict[tuple[str, ...], Plan]] = {}


def plan_for(block: fx.GraphModule, trained: Mapping[str, Tensor]) -> Plan:
    """The rewritten graph of ``block`` for these trained parameters, built on first use.

    Under ``torch.compile`` the plan must exist already (one eager call builds it: the engine's
    first step, or its conversion-time checks): Dynamo does not trace ``torch.fx`` internals.
    """
    key = tuple(sorted(trained))
    plans = _PLANS.get(id(block))
    if torch.compiler.is_compiling():
        if plans is None or key not in plans:
            raise FwdTransError("per-sample projection: no plan for this block under torch.compile. Fix: call "
                                "fwdtrans._persample.prepare(block, params) before compiling, or run one step "
                                "eagerly first (it builds the block's rewritten graph).")
        return plans[key]
    if not isinstance(block, fx.GraphModule):
        raise FwdTransError(f"per-sample projection needs a torch.fx.GraphModule block, got {type(block).__name__}. "
                            "Fix: pass a block of fwdtrans.convert(...).blocks, or torch.fx.symbolic_trace(module).")
    if plans is None:
        plans = _PLANS[id(block)] = {}
        weakref.finalize(block, _PLANS.pop, id(block), None)
    plan = plans.get(key)
    if plan is None or plan.graph() is not block.graph:  # first use, or the block's graph was replaced
        plan = plans[key] = _build(block, frozenset(trained))
    return plan


def prepare(block: fx.GraphModule, params: Mapping[str, Tensor]) -> None:
    """Build (eagerly) the rewritten graph :func:`record` uses for ``block`` with these trained parameters.

    Call it before compiling a step that records the block (at conversion time, say): Dynamo does
    not trace ``torch.fx`` internals, so under ``torch.compile`` the plan must exist already. The
    deltas' shapes are cached too, per input signature, on the first eager :func:`record`; a cold
    shape cache under ``torch.compile`` costs one extra forward of the block in the graph.
    """
    plan_for(block, params)


def _param_of(block: nn.Module, target: str) -> bool:
    try:
        return isinstance(block.get_parameter(target), nn.Parameter)
    except AttributeError:
        return False


def _build(block: fx.GraphModule, trained: frozenset[str]) -> Plan:
    graph = block.graph
    main, shapes = fx.Graph(), fx.Graph()
    deltas = main.placeholder("_fwdtrans_deltas")
    env: dict[fx.Node, fx.Node] = {}
    senv: dict[fx.Node, fx.Node] = {}
    sites: list[Site] = []
    records: list[tuple[fx.Node, ...]] = []
    site_outputs: list[fx.Node] = []
    out = sout = None
    for node in graph.nodes:
        if node.op == "output":
            out = fx.node.map_arg(node.args[0], lambda n: env[n])
            sout = fx.node.map_arg(node.args[0], lambda n: senv[n])
            continue
        new = main.node_copy(node, lambda n: env[n])
        snew = shapes.node_copy(node, lambda n: senv[n])
        env[node], senv[node] = new, snew
        site, recorded = _site(block, node, trained)
        if site is None:
            continue
        records.append(tuple(env[n] for n in recorded))
        d = main.call_function(operator.getitem, (deltas, len(sites)))
        env[node] = main.call_function(_add_delta, (new, d))
        site_outputs.append(snew)
        sites.append(site)
    main.output((out, tuple(records)))
    shapes.output((tuple(site_outputs), sout))
    uses: dict[str, list[tuple[int, str]]] = {}
    for i, s in enumerate(sites):
        for local, full in s.roles.items():
            uses.setdefault(full, []).append((i, local))
    return Plan(fx.GraphModule(block, main), fx.GraphModule(block, shapes), sites, uses, weakref.ref(graph))


def _site(block: fx.GraphModule, node: fx.Node, trained: frozenset[str]) -> tuple[Site | None, list[fx.Node]]:
    """The site a node is (None if it uses no trained parameter) and the nodes to record for it."""
    roles: dict[str, str] = {}
    recorded: list[fx.Node] = []
    if node.op == "call_module":
        target = str(node.target)
        m = block.get_submodule(target)
        prefix = f"{target}." if target else ""
        roles = {k: prefix + k for k, _ in m.named_parameters() if prefix + k in trained}
        if not roles:
            return None, []
        kind = _kind(m)
        first = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if kind != "module" and isinstance(first, fx.Node):
            return Site(node.name, kind, m, target, roles), [first]
        # another module, or a known one called in an unusual way: the fallback calls it as written
        fx.node.map_arg((node.args, node.kwargs), recorded.append)
        return Site(node.name, "module", m, target, roles, args=(node.args, node.kwargs)), recorded
    if node.op in ("call_function", "call_method"):

        def mark(n: fx.Node) -> Ref:
            name = str(n.target)
            if n.op == "get_attr" and _param_of(block, name):
                if name in trained:
                    roles[name] = name
                    return Ref("param", name)
                return Ref("frozen", name)
            recorded.append(n)
            return Ref("rec", len(recorded) - 1)

        args = fx.node.map_arg((node.args, node.kwargs), mark)  # type: ignore[arg-type]  # Nodes become Ref
        if not roles:
            return None, []
        call = node.target if callable(node.target) else _method(str(node.target))
        return Site(node.name, "function", None, "", roles, call=call, args=args), recorded
    return None, []


def _method(name: str) -> Callable[..., Any]:
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, name)(*args, **kwargs)
    return call


def site_shapes(plan: Plan, block: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor],
                 inputs: tuple[Tensor, ...]
                 ) -> tuple[list[tuple[torch.Size, torch.dtype]], tuple[torch.Size, torch.dtype] | None]:
    """The output shape and dtype of every site, and of the block (``None`` unless one tensor), by a run on
    the meta device (cached per input signature)."""
    leaves, spec = tree_flatten(inputs)
    key = (str(spec), *((tuple(x.shape), x.dtype, x.device) if isinstance(x, Tensor) else repr(x) for x in leaves))
    if key not in plan.shapes:
        allp = {**dict(block.named_parameters()), **params}
        allb = {**dict(block.named_buffers()), **buffers}

        def run(to: str | None) -> tuple[tuple[Tensor, ...], Any]:
            p = {k: v.to(to) if to is not None else v for k, v in allp.items()}
            b = {k: v.to(to) if to is not None else v.clone() for k, v in allb.items()}
            x = tree_map(lambda v: v.to(to) if isinstance(v, Tensor) and to is not None else v, inputs)
            with torch.no_grad():
                return functional_call(plan.shapes_gm, (p, b), x)

        if torch.compiler.is_compiling():
            outs, out = run(None)  # a cold cache under torch.compile: one real forward (traceable), on cloned buffers
        else:
            try:
                outs, out = run("meta")
            except Exception:  # an op without a meta kernel: one real forward, on cloned buffers
                outs, out = run(None)
        plan.shapes[key] = ([(o.shape, o.dtype) for o in outs],
                            (out.shape, out.dtype) if isinstance(out, Tensor) else None)
    return plan.shapes[key]


def warm(block: fx.GraphModule, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor],
         inputs: tuple[Tensor, ...]) -> Tensor | None:
    """:func:`prepare`, and the deltas' shapes cached for these inputs, eagerly and without a forward on
    real data (a run on the meta device). Returns an uninitialised tensor shaped like the block's output
    (``None`` unless it is one tensor), the next block's inputs for warming it: called for every block
    before a compiled step, so that the compiled graph neither runs a block for its shapes nor is
    recompiled once the cache fills."""
    plan = plan_for(block, params)
    out = site_shapes(plan, block, params, buffers, inputs)[1]
    like = next((x for x in tree_flatten(inputs)[0] if isinstance(x, Tensor)), None)
    if out is None or like is None:
        return None
    return torch.empty(out[0], dtype=out[1], device=like.device)
