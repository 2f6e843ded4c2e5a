"""Per-sample weight-space estimates: the official code's default ``space='weight'``, fast and light.

For a block and each of its trained parameter tensors ``p``, let ``t_n`` and ``g_n`` be sample ``n``'s
*share* of the batch gradient of the target and of the guess loss (``sum_n t_n`` is the batch
gradient of the target). The official code (``trainer/estimators.py::weight_perturb_estimator``,
shares from the hooks of ``trainer/per_sample_gradients.py``) sets

    estimate_p = sum_n <t_n, g_n> / (|g_n|^2 + eps) * g_n,        eps = 1e-16,

one projection per sample and per parameter tensor, summed over the batch. A layer's share for
sample ``n`` is built, as by those hooks, from *its own output gradient* for sample ``n`` (which
already holds the coupling of train-mode BatchNorm through the batch statistics, from the backward
pass) and sample ``n``'s input to that layer. It equals the gradient with respect to a per-sample
copy ``w_n`` of the parameter that only sample ``n`` uses (``tests/test_persample.py`` checks it so).

What this module does differently from the official code:

* no per-sample gradient is materialised where a cheaper contraction gives the same numbers
  ("ghost" inner products, as ghost clipping computes per-sample norms), the target's share of a
  Linear/Conv weight never is, and none is kept: each is reduced chunk by chunk;
* the official BatchNorm bug (its bias branch writes ``module.weight.grad``, so BN's weight gets the
  projected *bias* gradient and BN's bias keeps the raw guess gradient) is **not** reproduced: each
  parameter tensor gets its own projection;
* it is pure ``torch.func`` (no ``torch.autograd`` call, no module hook), so it composes with the
  engine and with ``torch.compile``.

**How.** The block's fx graph is rewritten once (cached per block and set of trained names): a zero
"delta" is added to the output of every parameterised node, and every such node's input is
returned as well. One forward under :func:`torch.func.vjp` with respect to the deltas
(:func:`record`), then a pull-back of the target cotangent and one of the guess cotangent
(:func:`project`) give each layer's output gradients ``Gt``, ``Gg`` (batch coupling included) and
inputs ``X``. Per layer:

* ``nn.Linear`` on ``(B, *pos, K)`` (``T`` positions), ``nn.Conv{1,2,3}d`` (``P`` output positions,
  ``K = C_in/groups * prod(kernel)``, ``O = C_out/groups``, per group): the weight share of sample
  ``n`` is ``t_n = sum_s Gt_ns X_ns^T`` (patches for a convolution). Two ways, chosen per layer by a
  FLOP count per sample and group:

  - *ghost* (ghost clipping's per-sample norms, extended to inner products):
    ``<t_n, g_n> = sum_{s,s'} <Gt_ns, Gg_ns'> <X_ns, X_ns'>`` and ``|g_n|^2`` alike, from ``(P, P)``
    Gram matrices (im2col patches for a convolution): ``P^2 (K + 2 O)``; then ``sum_n c_n g_n`` is
    one ordinary weight-gradient contraction of the guess's output gradient scaled by ``c_n``,
    ``P K O``;
  - *materialised*: ``g_n`` as a ``(chunk, O, K)`` tensor (``torch.bmm`` for Linear; for Conv the
    weight gradient of a convolution whose groups are the chunk's samples, where Opacus's
    ``grad_sample`` unfolds, which measured slower on CPU), and
    ``<t_n, g_n> = sum_s <Gt_ns, g_n X_ns>``, the layer run
    with the per-sample weights ``g_n`` (a grouped convolution) contracted with ``Gt``: ``2 P K O``,
    and ``t_n`` is never formed. ``|g_n|^2`` and ``sum_n c_n g_n`` follow chunk by chunk.

  Ghost is chosen when ``P^2 (K + 2 O) + P K O (+ P K for the patches) < 2 P K O``: for a Linear on
  ``(B, K)`` (``P = 1``, outer products: ``<t_n, g_n> = <Gt_n, Gg_n> |X_n|^2``) unless ``K`` or ``O``
  is tiny, and for the late, small feature maps of a CNN; materialised for the early, large ones.
  Biases: ``sum_s G_ns``, ``(B, O)``.
* ``nn.BatchNorm*``, ``nn.LayerNorm``, ``nn.GroupNorm`` (affine): weight share
  ``sum_s G_ns * xhat_ns``, bias share ``sum_s G_ns``, ``(B, C)`` (or ``(B, *normalized_shape)``).
  ``xhat`` is recomputed from the recorded input with the statistics the layer used (batch
  statistics in train mode or without running statistics, the running ones otherwise).
* Anything else holding a trained parameter (another module, or a parameter used by a
  ``call_function``/``call_method`` node) falls back to ``torch.func.vmap`` over samples (in chunks)
  of the node's own ``vjp`` with respect to its parameters, fed with the node's output gradient: the
  official hooks' rule, exact when the node does not mix samples. That is checked (eagerly, one
  extra forward of the node): a node that mixes samples (e.g. a custom normalisation with batch
  statistics) raises :class:`~fwdtrans.FwdTransError` naming it.

A parameter used by several nodes (weight sharing) is materialised: its shares ``g_n`` are summed
over the nodes, and ``<t_n, g_n>`` over the nodes' contributions.

**Random guesses.** The official code (``trainer/gradients.py::compute_random_directions``) draws,
for every module of blocks ``0..J-2``, noise shaped like the *per-sample* target share (``randn_like``
or Rademacher of ``module.target['weight']``, i.e. ``(B, *p)``), and projects with the same
normalised formula: ``sum_n <t_n, v_n> / (|v_n|^2 + eps) v_n``. Being normalised by ``|v_n|^2`` (not
the paper's ``<t, v> v``), it is biased down by about ``1/numel(p)``. Pass such draws as ``noise``
(one ``(B, *p)`` tensor per trained parameter) to get exactly that estimator; ``guess_cot`` is then
unused. ``<t_n, v_n>`` is read off the target's output gradient as above (the layer run with the
per-sample weights ``v_n``), so ``t_n`` is not formed either.

Memory: per-sample tensors live one chunk at a time. By default a chunk holds as many samples as keep
them within a quarter of what the block holds when its projection starts (every layer's recorded
input and output gradients for the whole batch); ``chunk=`` overrides. :func:`project` releases the
record's pull-back as soon as it has pulled, and each layer's tensors once its parameters are done.

**Forward mode.** :func:`forward_project` gives the same estimates with ``<t_n, g_n>`` from forward-mode
AD: sample ``n``'s share is the gradient with respect to a copy of the parameter only sample ``n`` uses, so
``<t_n, g_n>`` is the target's derivative along a tangent injected at the output of each layer using the
parameter (the layer's response to the weight ``g_n`` on sample ``n``'s input, zero at the other samples;
:meth:`_Context.site_tangent`), pushed through the rest of the block by the rewritten graph under
``vmap(jvp)`` with respect to those layers' deltas, and on to the target by the caller. One stream per
sample and parameter tensor, in chunks.

Engine integration (``space="weight", granularity="sample"``): ``_engine.PerSampleReference`` records
every block but the last with :func:`record` and, walking back from the logits, projects each with
:func:`project` (``pull_inputs`` for intermediate targets); ``_engine.PerSampleForward`` uses
:func:`forward_project`. :func:`prepare` and :func:`warm` build, eagerly, what a compiled step needs.
:func:`per_sample_projection` is :func:`record` and :func:`project` in one call.
"""

from __future__ import annotations

import math
import operator
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.func import functional_call, jvp, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ._blocks import norm_affine, replaying
from ._errors import FwdTransError

__all__ = ["PATHS", "PerSampleRecord", "choices", "forward_project", "per_sample_projection", "prepare", "project",
           "pull_inputs", "record", "warm"]

PATHS = ("auto", "ghost", "materialise", "fallback")

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


class _Ref:
    """In a fallback site's recorded arguments: a trained parameter, a frozen one, or recorded input ``i``."""

    __slots__ = ("kind", "ref")

    def __init__(self, kind: str, ref: str | int):
        self.kind, self.ref = kind, ref


def _add_delta(y: Tensor, d: Tensor | None) -> Tensor:
    """``y + d``: the node of the rewritten graph whose ``d`` cotangent is the layer's output gradient."""
    return y if d is None else y + d


# ----------------------------------------------------------------------------- the rewritten graph
@dataclass
class _Site:
    """A node whose output gets a delta: a layer (or op) holding trained parameters."""

    node: str  # the graph node's name, for messages
    kind: str  # _KNOWN, "module" (call_module fallback), "function" (call_function/call_method fallback)
    module: Any  # call_module: the module (its hyperparameters: typed loosely, nn.Module attributes are untyped)
    prefix: str  # call_module: the module's path in the block ("" for the root)
    roles: dict[str, str]  # local name -> full parameter name, trained parameters only
    call: Callable[..., Any] | None = None  # function / method sites: the node's op
    args: Any = None  # fallback sites: the node's (args, kwargs); function sites hold _Ref in place of Nodes


@dataclass
class _Plan:
    gm: fx.GraphModule  # forward(deltas, *inputs) -> (out, records): records[i] the recorded inputs of site i
    shapes_gm: fx.GraphModule  # forward(*inputs) -> (the sites' outputs, the block's output), for their shapes
    sites: list[_Site]
    uses: dict[str, list[tuple[int, str]]]  # trained name -> [(site index, local name)]
    graph: weakref.ref  # the block's graph it was built from (weakly: a graph refers to its module)
    # per input signature: each site's output shape and dtype, and the block output's (None: not one tensor)
    shapes: dict[tuple, tuple[list[tuple[torch.Size, torch.dtype]], tuple[torch.Size, torch.dtype] | None]] = \
        field(default_factory=dict)


# plans per block: id(block) -> {sorted trained names: plan}; a plain dict (torch.compile traces lookups in it,
# not in a WeakKeyDictionary), emptied by a finaliser when the block is collected
_PLANS: dict[int, dict[tuple[str, ...], _Plan]] = {}


def _plan(block: fx.GraphModule, trained: Mapping[str, Tensor]) -> _Plan:
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
    _plan(block, params)


def _param_of(block: nn.Module, target: str) -> bool:
    try:
        return isinstance(block.get_parameter(target), nn.Parameter)
    except AttributeError:
        return False


def _build(block: fx.GraphModule, trained: frozenset[str]) -> _Plan:
    graph = block.graph
    main, shapes = fx.Graph(), fx.Graph()
    deltas = main.placeholder("_fwdtrans_deltas")
    env: dict[fx.Node, fx.Node] = {}
    senv: dict[fx.Node, fx.Node] = {}
    sites: list[_Site] = []
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
    return _Plan(fx.GraphModule(block, main), fx.GraphModule(block, shapes), sites, uses, weakref.ref(graph))


def _site(block: fx.GraphModule, node: fx.Node, trained: frozenset[str]) -> tuple[_Site | None, list[fx.Node]]:
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
            return _Site(node.name, kind, m, target, roles), [first]
        # another module, or a known one called in an unusual way: the fallback calls it as written
        fx.node.map_arg((node.args, node.kwargs), recorded.append)
        return _Site(node.name, "module", m, target, roles, args=(node.args, node.kwargs)), recorded
    if node.op in ("call_function", "call_method"):

        def mark(n: fx.Node) -> _Ref:
            name = str(n.target)
            if n.op == "get_attr" and _param_of(block, name):
                if name in trained:
                    roles[name] = name
                    return _Ref("param", name)
                return _Ref("frozen", name)
            recorded.append(n)
            return _Ref("rec", len(recorded) - 1)

        args = fx.node.map_arg((node.args, node.kwargs), mark)  # type: ignore[arg-type]  # Nodes become _Ref
        if not roles:
            return None, []
        call = node.target if callable(node.target) else _method(str(node.target))
        return _Site(node.name, "function", None, "", roles, call=call, args=args), recorded
    return None, []


def _method(name: str) -> Callable[..., Any]:
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, name)(*args, **kwargs)
    return call


def _site_shapes(plan: _Plan, block: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor],
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
    plan = _plan(block, params)
    out = _site_shapes(plan, block, params, buffers, inputs)[1]
    like = next((x for x in tree_flatten(inputs)[0] if isinstance(x, Tensor)), None)
    if out is None or like is None:
        return None
    return torch.empty(out[0], dtype=out[1], device=like.device)


# ----------------------------------------------------------------------------- record and project
@dataclass
class PerSampleRecord:
    """What :func:`record` keeps of a block's forward for :func:`project`."""

    out: Any  # the block's output
    buffers: dict[str, Tensor]  # the block's buffers after the forward (new running statistics)
    pull: Callable[[Any], tuple] | None  # out's cotangent -> (delta cotangents[, input cotangents]); None: projected
    plan: _Plan
    params: dict[str, Tensor]
    old_buffers: dict[str, Tensor]  # the buffers the forward read (eval-mode normalisation uses them)
    records: tuple | None  # per site, its recorded inputs; None once projected
    batch: int
    wrt_inputs: bool
    inputs: tuple = ()  # the block's inputs (the forward engine runs the block again to inject tangents)
    shapes: list[tuple[torch.Size, torch.dtype]] = field(default_factory=list)  # per site: its output's


def record(block: fx.GraphModule, params: dict[str, Tensor], buffers: dict[str, Tensor],
           inputs: tuple[Tensor, ...], wrt_inputs: bool = False) -> PerSampleRecord:
    """Run ``block`` once (``functional_call`` with ``params`` and cloned ``buffers``), keeping what
    :func:`project` needs: every parameterised layer's input and a pull-back to every layer's output
    gradient (and, with ``wrt_inputs``, to the block's inputs, for chaining the target backwards).

    ``params`` are the trained parameters (the block's own tensors are used for the others).
    """
    # torch.func differentiates on its own: outer autograd must not record this forward too
    params = {k: v.detach() for k, v in params.items()}
    inputs = tuple(tree_map(lambda x: x.detach() if isinstance(x, Tensor) else x, inputs))
    like = next((x for x in tree_flatten(inputs)[0] if isinstance(x, Tensor)), None)
    if like is None:
        raise FwdTransError("per-sample projection: the block's inputs hold no tensor (the batch size is read "
                            "from the first one)")
    plan = _plan(block, params)
    shapes = _site_shapes(plan, block, params, buffers, inputs)[0]
    deltas = tuple(like.new_zeros((), dtype=dt).expand(shape) for shape, dt in shapes)

    constants: list = []  # the recorded values that are not tensors (a size read from an input), and the layout

    def f(d: tuple[Tensor, ...], *x: Tensor) -> tuple[Any, tuple[list[Tensor], dict[str, Tensor]]]:
        fresh = {k: b.clone() for k, b in buffers.items()}
        out, recs = functional_call(plan.gm, (params, fresh), (d, *x))
        leaves, spec = tree_flatten(recs)
        constants[:] = [spec, [(isinstance(v, Tensor), None if isinstance(v, Tensor) else v) for v in leaves]]
        return out, ([v for v in leaves if isinstance(v, Tensor)], fresh)  # a vjp's aux holds tensors only

    if wrt_inputs:
        res: Any = vjp(f, deltas, *inputs, has_aux=True)
    else:
        res = vjp(lambda d: f(d, *inputs), deltas, has_aux=True)
    out, pull, (tensors, new) = res
    spec, leaves = constants
    it = iter(tensors)
    recs = tree_unflatten([next(it) if tensor else v for tensor, v in leaves], spec)
    batch = like.shape[0]
    return PerSampleRecord(out, new, pull, plan, dict(params), dict(buffers), recs, batch, wrt_inputs, inputs,
                           list(shapes))


def pull_inputs(rec: PerSampleRecord, cotangent: Tensor) -> tuple[Tensor, ...]:
    """The cotangents at the block's inputs of ``cotangent`` at its output (a record made
    ``wrt_inputs``, not yet projected): e.g. an intermediate target, block ``j + 1``'s head loss
    pulled back to block ``j``'s output. One more pull-back through the block."""
    if not rec.wrt_inputs or rec.pull is None:
        raise FwdTransError("pull_inputs needs a record made with wrt_inputs=True that was not projected yet")
    return tuple(rec.pull(cotangent)[1:])


def per_sample_projection(block: fx.GraphModule, params: dict[str, Tensor], buffers: dict[str, Tensor],
                          inputs: tuple[Tensor, ...], target_cot: Tensor, guess_cot: Tensor | None,
                          noise: dict[str, Tensor] | None = None, eps: float = 1e-16,
                          chunk: int | None = None, path: str = "auto") -> dict[str, Tensor]:
    """The per-sample weight-space estimate for every trained parameter of ``block`` (by name).

    ``sum_n <t_n, g_n> / (|g_n|^2 + eps) * g_n`` per parameter tensor, ``t_n`` and ``g_n`` sample
    ``n``'s shares of the target's and the guess's batch gradient. ``target_cot`` and ``guess_cot``
    are the cotangents of the target and guess losses at the block's output (batch tensors
    ``(B, *out)``); the forward is ``functional_call(block, (params, cloned buffers), inputs)``.
    With ``noise`` (per trained parameter, ``(B, *p)`` draws ``v_n``) the estimate is
    ``sum_n <t_n, v_n> / (|v_n|^2 + eps) v_n``, the official code's random guess, and ``guess_cot``
    is not used. ``chunk`` bounds the samples whose per-sample tensors are alive at once (default:
    automatic). ``path`` forces a rule for Linear/Conv weights (``"ghost"``, ``"materialise"``) or the
    vmap fallback for every layer (``"fallback"``); ``"auto"`` chooses per layer by cost.

    This runs the block's forward once more than a caller that keeps its forward (see
    :func:`record` and :func:`project`, which the engine uses).
    """
    rec = record(block, params, buffers, inputs)
    return project(rec, target_cot, guess_cot, noise=noise, eps=eps, chunk=chunk, path=path)[0]


def project(rec: PerSampleRecord, target_cot: Tensor, guess_cot: Tensor | None,
            noise: dict[str, Tensor] | None = None, eps: float = 1e-16, chunk: int | None = None,
            path: str = "auto", batch: dict[str, dict[str, Tensor]] | None = None
            ) -> tuple[dict[str, Tensor], tuple[Tensor, ...] | None]:
    """The estimates of :func:`per_sample_projection` from a :func:`record`; also the target's
    cotangents at the block's inputs if the record was made ``wrt_inputs`` (else ``None``).

    A record is projected once: its pull-back and recorded inputs are released on the way (each
    layer's as soon as its parameters are estimated), so that the block's memory goes as the
    estimates are formed.

    ``batch``, when given, receives every parameter's batch gradient of the target
    (``batch["target"]``, ``sum_n t_n``) and of the guess (``batch["guess"]``: ``sum_n g_n``, or the
    noise summed over the samples), for ``fwdtrans.check``: one more weight-gradient contraction per
    layer (Linear and Conv weights; the other shares are small and summed).
    """
    if path not in PATHS:
        raise FwdTransError(f"path={path!r}: expected one of {PATHS}")
    if noise is None and guess_cot is None:
        raise FwdTransError("per-sample projection: give guess_cot (a guess loss's cotangent) or noise")
    if rec.pull is None:
        raise FwdTransError("per-sample projection: this record was already projected (a record is projected once)")
    # two pull-backs (stacking the cotangents under vmap measured slower on CPU): per site, its output
    # gradient for the target and for the guess, BatchNorm coupling included
    tgrads = rec.pull(target_cot)
    inputs_cot = tgrads[1:]
    grads: list[tuple[Tensor, ...]]
    if noise is not None:
        grads = [(gt,) for gt in tgrads[0]]
    else:
        grads = [(gt, gg) for gt, gg in zip(tgrads[0], rec.pull(guess_cot)[0], strict=True)]
    del tgrads
    rec.pull = None  # the block's saved activations: only the recorded inputs are still needed
    ctx = _Context(rec, grads, eps, chunk, path)
    rec.records = None
    est = {name: torch.zeros_like(p) for name, p in rec.params.items()}
    for name, uses in rec.plan.uses.items():
        if name in ctx.done:
            continue
        if noise is not None:
            if name not in noise:
                raise FwdTransError(f"noise has no draw for the trained parameter {name!r}: pass one (B, *p) "
                                    "tensor per trained parameter")
            est[name] = ctx.noise(name, uses, noise[name])
            names = [name]
        elif len(uses) == 1 and path != "fallback":
            i, _ = uses[0]
            names = [n for n in rec.plan.sites[i].roles.values() if len(rec.plan.uses[n]) == 1]
            est.update(ctx.single_site(i, names))
        else:
            est[name] = ctx.materialised(name, uses)
            names = [name]
        for n in names:
            if batch is not None:
                batch.setdefault("target", {})[n] = ctx.batch_gradient(n, 0)
                batch.setdefault("guess", {})[n] = ctx.batch_gradient(n, 1) if noise is None else noise[n].sum(0)
            ctx.done.add(n)
            ctx.finished(n)
    if batch is not None:  # a trained parameter no node uses: zero gradients
        for name, p in rec.params.items():
            for key in ("target", "guess"):
                batch.setdefault(key, {}).setdefault(name, torch.zeros_like(p))
    return est, (inputs_cot if rec.wrt_inputs else None)


def forward_project(rec: PerSampleRecord, guess_cot: Tensor | None, noise: dict[str, Tensor] | None,
                    read: Callable[[Tensor], Tensor], eps: float = 1e-16, chunk: int | None = None,
                    path: str = "auto", rng: list[Tensor] | None = None) -> dict[str, Tensor]:
    """The estimates of :func:`project`, with ``<t_n, g_n>`` from forward-mode AD instead of the
    target's pull-back (the forward engine): no target cotangent is pulled through the block.

    Sample ``n``'s share of a parameter's gradient is the gradient with respect to a copy of the
    parameter that only sample ``n`` uses, so ``<t_n, g_n>`` is the target's derivative along a
    perturbation of that copy by ``g_n``: a tangent injected at the output of every layer using the
    parameter, equal to the layer's response to the weight ``g_n`` on sample ``n``'s input (zero at the
    other samples), and pushed forward from there (through the coupling of train-mode BatchNorm) to the
    target. One *stream* per sample and parameter tensor, ``B`` times the block's trained tensors in all,
    pushed in chunks of ``chunk`` streams (default: as many as keep their tangents at the layers' outputs
    within 8 times what the block records for the whole batch); each chunk runs the block once more, under
    ``vmap(jvp)``. For each chunk ``read`` takes the tangents at the block output ``(S, *out)`` (the caller
    pushes them on to the target and contracts them with its cotangent) and returns the ``S`` directional
    derivatives. ``rng`` is the random state the block's forward started from: the block must draw the same
    dropout masks in every run.
    """
    if path not in PATHS:
        raise FwdTransError(f"path={path!r}: expected one of {PATHS}")
    if noise is None and guess_cot is None:
        raise FwdTransError("per-sample projection: give guess_cot (a guess loss's cotangent) or noise")
    if rec.pull is None:
        raise FwdTransError("per-sample projection: this record was already projected (a record is projected once)")
    sites = rec.plan.sites
    grads: list[tuple[Tensor, ...]] = ([(gg,) for gg in rec.pull(guess_cot)[0]] if noise is None
                                       else [() for _ in sites])
    rec.pull = None
    ctx = _Context(rec, grads, eps, None, path)
    rec.records = None
    est = {name: torch.zeros_like(p) for name, p in rec.params.items()}
    names, b = list(rec.plan.uses), rec.batch
    for name in names if noise is not None else ():
        if name not in noise:
            raise FwdTransError(f"noise has no draw for the trained parameter {name!r}: pass one (B, *p) "
                                "tensor per trained parameter")
        if noise[name].shape != (b, *rec.params[name].shape):
            raise FwdTransError(f"noise[{name!r}] has shape {tuple(noise[name].shape)}; expected "
                                f"{(b, *rec.params[name].shape)}")
    per_stream = sum(math.prod(shape) for shape, _ in rec.shapes) or 1  # a stream's tangents at the layers
    size = max(1, min(b * len(names), chunk if chunk is not None else 8 * ctx._budget // per_stream))
    streams = [(name, n) for name in names for n in range(b)]  # (parameter, sample), in chunks of ``size``
    for first in range(0, len(streams), size):
        pieces: list[tuple[str, slice, int]] = []  # (parameter, its samples, the first one's row in the chunk)
        for row, (name, n) in enumerate(streams[first:first + size]):
            if pieces and pieces[-1][0] == name:
                pieces[-1] = (name, slice(pieces[-1][1].start, n + 1), pieces[-1][2])
            else:
                pieces.append((name, slice(n, n + 1), row))
        count = min(size, len(streams) - first)
        tangents: dict[int, Tensor] = {}  # per site: (count, B, *out_i), stream r at its sample only
        directions = []
        for name, sl, row in pieces:
            uses = rec.plan.uses[name]
            if noise is None:
                parts = [ctx.share(i, local, sl, ctx.grads[i][0]) for i, local in uses]
                g = parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
            else:
                g = noise[name][sl]
            directions.append(g)
            index = torch.arange(sl.stop - sl.start, device=g.device)
            for i, local in uses:
                t = ctx.site_tangent(i, local, sl, g)
                if i not in tangents:
                    tangents[i] = t.new_zeros(count, *rec.shapes[i][0])
                tangents[i].index_put_((index + row, index + sl.start), t, accumulate=True)
        d = read(ctx.push(tangents, rng))
        for (name, sl, row), g in zip(pieces, directions, strict=True):
            gf = g.flatten(1)
            coeff = d[row:row + gf.shape[0]] / (torch.linalg.vector_norm(gf, dim=1).square() + eps)
            est[name] += (coeff @ gf).view_as(est[name])
            if sl.stop == b:  # the parameter's last stream
                ctx.done.add(name)
                ctx.finished(name)
    return est


def choices(rec: PerSampleRecord, path: str = "auto") -> list[dict]:
    """Per site of a :func:`record`: node, kind, positions/sizes and the rule the cost model picks."""
    ctx = _Context(rec, [()] * len(rec.plan.sites), 0.0, None, path)
    rows = []
    for i, s in enumerate(rec.plan.sites):
        row: dict[str, Any] = {"node": s.node, "kind": s.kind, "params": list(s.roles.values())}
        if s.kind in ("linear", "conv"):
            p, k, o, g = ctx.sizes(i)
            row.update(positions=p, K=k, O=o, groups=g, rule=ctx.rule(i))
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- the per-layer rules
def _flat_positions(x: Tensor) -> Tensor:
    """``(B, *pos, F)`` -> ``(B, T, F)``."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _bcast(c: Tensor, like: Tensor) -> Tensor:
    return c.view(*c.shape, *([1] * (like.dim() - c.dim())))


class _Context:
    """One :func:`project` call: the output gradients, the rules and the chunking.

    ``grads[i]`` holds site ``i``'s output gradients ``(B, *out)``: ``(target, guess)``, or
    ``(target,)`` with noise guesses.
    """

    def __init__(self, rec: PerSampleRecord, grads: list[tuple[Tensor, ...]], eps: float, chunk: int | None,
                 path: str):
        self.rec, self.grads, self.eps, self.chunk, self.path = rec, list(grads), eps, chunk, path
        if rec.records is None:
            raise FwdTransError("per-sample projection: this record was already projected")
        self.records: list[tuple] = list(rec.records)
        self.sites = rec.plan.sites
        self.done: set[str] = set()
        self._pending = [len(site.roles) for site in self.sites]  # parameters still to estimate, per site
        self._checked: set[int] = set()  # fallback sites checked not to mix samples
        self._xhat: dict[int, Tensor] = {}
        self._conv_in: dict[int, tuple[Tensor, list[int]]] = {}
        # what the block holds for the whole batch: every layer's recorded inputs and output gradients
        self._budget = 0
        for tensors in (*self.records, *self.grads):
            self._budget += sum(int(t.numel()) for t in tensors if isinstance(t, Tensor))

    def finished(self, name: str) -> None:
        """``name`` is estimated: release the sites whose parameters are all done."""
        for i, _ in self.rec.plan.uses[name]:
            self._pending[i] -= 1
            if not self._pending[i]:
                self.release(i)

    def release(self, i: int) -> None:
        """Site ``i`` is done: drop its output gradients, recorded inputs and caches."""
        self.grads[i], self.records[i] = (), ()
        self._xhat.pop(i, None)
        self._conv_in.pop(i, None)

    # -- sizes and the cost model
    def _x(self, i: int) -> Tensor:
        return self.records[i][0]

    def sizes(self, i: int) -> tuple[int, int, int, int]:
        """Linear/conv site: positions ``P``, then ``K`` and ``O`` per group, and the groups."""
        s, x = self.sites[i], self._x(i)
        m = s.module
        if s.kind == "linear":
            return x[0].numel() // x.shape[-1], m.in_features, m.out_features, 1
        g = m.groups
        return self._out_positions(i), m.in_channels // g * math.prod(m.kernel_size), m.out_channels // g, g

    def _out_positions(self, i: int) -> int:
        x, pads = self._conv_input(i)
        m = self.sites[i].module
        n = 1
        for j, (size, k, s, d) in enumerate(zip(x.shape[2:], m.kernel_size, m.stride, m.dilation, strict=True)):
            n *= (size + 2 * pads[j] - d * (k - 1) - 1) // s + 1
        return n

    def rule(self, i: int) -> str:
        """``"ghost"`` or ``"materialise"`` for a Linear/Conv weight: FLOPs per sample (and group)."""
        if self.path in ("ghost", "materialise"):
            return self.path
        p, k, o, _ = self.sizes(i)
        patches = p * k if self.sites[i].kind == "conv" else 0
        ghost = p * p * (k + 2 * o) + p * k * o + patches  # Grams, then one weight-gradient contraction
        return "ghost" if ghost < 2 * p * k * o else "materialise"  # t_n and g_n

    def _slices(self, i: int, per_sample: int) -> list[slice]:
        """Chunks of samples, each of at most ``budget // per_sample`` samples (``chunk=`` overrides).

        ``budget`` is a quarter of what the block holds for the whole batch when its projection
        starts (every layer's recorded inputs and output gradients): in the engine's backward walk the
        records of the earlier blocks are alive too, so a chunk adds little to the step's peak.
        """
        b = self.rec.batch
        if self.chunk is not None:
            c = max(1, min(b, self.chunk))
        else:
            c = max(1, min(b, self._budget // 4 // max(1, per_sample)))
        return [slice(a, min(a + c, b)) for a in range(0, b, c)]

    # -- the forward engine: per-sample directions as tangents at the layers' outputs
    def share(self, i: int, local: str, sl: slice, g: Tensor) -> Tensor:
        """``(c, *p)``: site ``i``'s shares of its parameter ``local`` for samples ``sl`` of one output gradient."""
        if self.path == "fallback":
            return self._fallback_shares(i, sl, (g,))[local][0]
        return self.shares(i, local, sl, (g,))[0]

    def site_tangent(self, i: int, local: str, sl: slice, v: Tensor) -> Tensor:
        """``(c, *out_i)``: site ``i``'s response to its parameter ``local`` moved by ``v_n`` (``(c, *p)``), on
        each sample ``n`` of ``sl`` alone: the derivative of the layer's output at sample ``n`` along ``v_n``."""
        s = self.sites[i]
        c = v.shape[0]
        out = (c, *self.rec.shapes[i][0][1:])
        if self.path != "fallback" and s.kind == "linear":
            if local == "bias":
                return v.view(c, *([1] * (len(out) - 2)), v.shape[-1]).expand(out)
            x = _flat_positions(self._x(i)[sl])  # (c, T, K)
            return torch.bmm(x, v.transpose(1, 2)).view(out)
        if self.path != "fallback" and s.kind == "conv":
            if local == "bias":
                return v.view(c, v.shape[1], *([1] * (len(out) - 2))).expand(out)
            m = s.module
            x, pads = self._conv_input(i)
            y = torch.ops.aten.convolution(x[sl].reshape(1, c * m.in_channels, *x.shape[2:]),
                                           v.reshape(c * m.out_channels, *v.shape[2:]), None, list(m.stride), pads,
                                           list(m.dilation), False, [0] * (x.dim() - 2), c * m.groups)
            return y.view(out)
        if self.path != "fallback" and s.kind in ("batchnorm", "groupnorm"):
            v = v.view(c, v.shape[1], *([1] * (len(out) - 2)))
            return v.expand(out) if local == "bias" else v * self._norm_xhat(i)[sl]
        if self.path != "fallback" and s.kind == "layernorm":
            shape = s.module.normalized_shape
            v = v.view(c, *([1] * (len(out) - 1 - len(shape))), *shape)
            return v.expand(out) if local == "bias" else v * self._norm_xhat(i)[sl]
        # any other node (checked not to mix samples): its own jvp, one sample at a time
        pvals, dims, part = self._fallback_args(i, sl)
        if all(d is None for d in dims):  # an output batched from the parameters alone: sample n's row
            n = torch.arange(c, device=v.device)
            site = vmap(lambda vn: jvp(lambda p: self._site_call(i, {**pvals, local: p}, part), (pvals[local],),
                                       (vn,))[1])(v)
            return site[n, n + sl.start]

        def one(vn: Tensor, *r: Tensor) -> Tensor:
            r = tuple(x[None] if d == 0 else x for x, d in zip(r, dims, strict=True))
            return jvp(lambda p: self._site_call(i, {**pvals, local: p}, r), (pvals[local],), (vn,))[1][0]

        return vmap(one, in_dims=(0, *dims))(v, *part)

    def push(self, tangents: dict[int, Tensor], rng: list[Tensor] | None) -> Tensor:
        """``(S, *out)``: the block output's tangents of ``S`` streams given by their tangents ``(S, *out_i)`` at the
        outputs of sites ``i`` (other sites: zero): one run of the rewritten block under ``vmap(jvp)`` with
        respect to those sites' deltas."""
        rec = self.rec
        first = next(iter(tangents.values()))
        streams = list(tangents.values())
        index = list(tangents)
        zeros = [first.new_zeros((), dtype=dt).expand(shape) for shape, dt in rec.shapes]
        params = {**dict(rec.plan.gm.named_parameters()), **rec.params}
        # under torch.compile the norms' affine parameters join the primals (pytorch/pytorch#139756, see _blocks.push)
        dual = {k: params[k] for k in norm_affine(rec.plan.gm) if k in params} if torch.compiler.is_compiling() else {}
        dual_zeros = {k: torch.zeros_like(v) for k, v in dual.items()}

        def f(d: tuple[Tensor, ...], p: dict[str, Tensor]) -> Tensor:
            deltas = list(zeros)
            for k, dk in zip(index, d, strict=True):
                deltas[k] = dk
            fresh = {k: v.clone() for k, v in rec.old_buffers.items()}
            return functional_call(rec.plan.gm, ({**params, **p}, fresh), (tuple(deltas), *rec.inputs))[0]

        primal = tuple(torch.zeros(zeros[k].shape, dtype=zeros[k].dtype, device=zeros[k].device) for k in index)
        with replaying(rng):
            return vmap(lambda *t: jvp(f, (primal, dual), (t, dual_zeros))[1], randomness="same")(*streams)

    def batch_gradient(self, name: str, which: int) -> Tensor:
        """``sum_n`` of the shares of ``name`` from output gradient ``which`` (0: the target, 1: the guess), i.e.
        the ordinary batch gradient: one weight-gradient contraction for a Linear/Conv weight."""
        p = self.rec.params[name]
        total = torch.zeros_like(p)
        for i, local in self.rec.plan.uses[name]:
            s, g = self.sites[i], self.grads[i][which]
            if self.path != "fallback" and s.kind == "linear" and local == "weight":
                x = self._x(i)
                total += torch.mm(g.reshape(-1, g.shape[-1]).T, x.reshape(-1, x.shape[-1])).view_as(p)
            elif self.path != "fallback" and s.kind == "conv" and local == "weight":
                m = s.module
                x, pads = self._conv_input(i)
                total += torch.ops.aten.convolution_backward(
                    g, x, p, None, list(m.stride), pads, list(m.dilation), False, [0] * (x.dim() - 2), m.groups,
                    [False, True, False])[1]
            else:
                for sl in self._slices(i, 2 * p.numel()):
                    total += self.share(i, local, sl, g).sum(0)
        return total

    # -- convolution geometry
    def _conv_input(self, i: int) -> tuple[Tensor, list[int]]:
        """The conv input, padded explicitly unless the padding is symmetric zeros; the symmetric pads."""
        if i not in self._conv_in:
            m, x = self.sites[i].module, self._x(i)
            nd = x.dim() - 2
            if isinstance(m.padding, str):
                same = m.padding == "same"
                total = [d * (k - 1) if same else 0 for d, k in zip(m.dilation, m.kernel_size, strict=True)]
                pads = [(t // 2, t - t // 2) for t in total]  # 'same': the extra one on the right, as aten
            else:
                pads = [(p, p) for p in m.padding]
            if m.padding_mode != "zeros":
                x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
                sym = [0] * nd
            elif any(a != b for a, b in pads):
                x = F.pad(x, [v for a, b in reversed(pads) for v in (a, b)])
                sym = [0] * nd
            else:
                sym = [a for a, _ in pads]
            self._conv_in[i] = (x, sym)
        return self._conv_in[i]

    # -- per-sample shares (materialised): one (c, *p) tensor per output gradient given
    def shares(self, i: int, local: str, sl: slice, grads: tuple[Tensor, ...]) -> list[Tensor]:
        """Site ``i``'s shares of its parameter ``local`` for samples ``sl``, one per gradient in ``grads``."""
        s = self.sites[i]
        if s.kind == "linear":
            if local == "bias":
                return [_flat_positions(g[sl]).sum(1) for g in grads]
            x = _flat_positions(self._x(i)[sl])  # (c, T, K)
            return [torch.bmm(_flat_positions(g[sl]).transpose(1, 2), x) for g in grads]  # (c, O, K)
        if s.kind == "conv":
            if local == "bias":
                return [g[sl].flatten(2).sum(-1) for g in grads]
            return [self._conv_weight_shares(i, sl, g[sl]) for g in grads]
        if s.kind in ("batchnorm", "layernorm", "groupnorm"):
            return [self._norm_shares(i, local, sl, g[sl]) for g in grads]
        return list(self._fallback_shares(i, sl, grads)[local])

    def _conv_weight_shares(self, i: int, sl: slice, g: Tensor) -> Tensor:
        """``(c, *weight)``: the weight gradient of a convolution whose groups are the chunk's samples
        times the layer's groups (group ``(n, k)`` pairs sample ``n``'s channels of group ``k``)."""
        m = self.sites[i].module
        x, pads = self._conv_input(i)
        x = x[sl]
        c = g.shape[0]
        shape = (c * m.out_channels, m.in_channels // m.groups, *m.kernel_size)
        gw = torch.ops.aten.convolution_backward(
            g.reshape(1, c * m.out_channels, *g.shape[2:]), x.reshape(1, c * m.in_channels, *x.shape[2:]),
            g.new_zeros(()).expand(shape), None, list(m.stride), pads, list(m.dilation), False, [0] * (x.dim() - 2),
            c * m.groups, [False, True, False])[1]
        return gw.view(c, m.out_channels, *shape[1:])

    def _norm_xhat(self, i: int) -> Tensor:
        """The normalised input, with the statistics the layer used."""
        if i not in self._xhat:
            s, x = self.sites[i], self._x(i)
            m = s.module
            if s.kind == "batchnorm":
                rm = self.rec.old_buffers.get(f"{s.prefix}.running_mean", m.running_mean)
                rv = self.rec.old_buffers.get(f"{s.prefix}.running_var", m.running_var)
                batch_stats = m.training or rm is None
                self._xhat[i] = F.batch_norm(x, None if batch_stats else rm, None if batch_stats else rv,
                                             training=batch_stats, momentum=0.0, eps=m.eps)
            elif s.kind == "layernorm":
                self._xhat[i] = F.layer_norm(x, m.normalized_shape, eps=m.eps)
            else:
                self._xhat[i] = F.group_norm(x, m.num_groups, eps=m.eps)
        return self._xhat[i]

    def _norm_shares(self, i: int, local: str, sl: slice, g: Tensor) -> Tensor:
        s = self.sites[i]
        c = g.shape[0]
        if s.kind == "layernorm":
            pshape = s.module.normalized_shape
            g3 = g.reshape(c, -1, math.prod(pshape))  # (c, M, N)
            if local == "bias":
                return g3.sum(1).view(c, *pshape)
            xh = self._norm_xhat(i)[sl].reshape(g3.shape)
            return (g3 * xh).sum(1).view(c, *pshape)
        g3 = g.reshape(c, g.shape[1], -1)  # (c, C, positions)
        if local == "bias":
            return g3.sum(-1)
        xh = self._norm_xhat(i)[sl].reshape(g3.shape)
        return (g3 * xh).sum(-1)  # measured faster than einsum's batched dot products on CPU

    # -- the fallback: vmap over samples of the node's own vjp
    def _site_call(self, i: int, pvals: dict[str, Tensor], recs: tuple) -> Tensor:
        s = self.sites[i]
        if s.kind == "function":
            def val(a: Any) -> Any:
                if not isinstance(a, _Ref):
                    return a
                if a.kind == "param":
                    return pvals[str(a.ref)]
                return self.rec.plan.gm.get_parameter(str(a.ref)) if a.kind == "frozen" else recs[int(a.ref)]
            args, kwargs = fx.node.map_aggregate(s.args, val)
            assert s.call is not None
            return s.call(*args, **kwargs)
        m = s.module
        local_p = {k: pvals[k] for k in s.roles}
        local_b = {k: b.clone() for k, b in m.named_buffers()}
        call_args: Any = ((recs[0],), {})
        if s.kind == "module":
            it = iter(recs)
            call_args = fx.node.map_arg(s.args, lambda _: next(it))
        return functional_call(m, (local_p, local_b), tuple(call_args[0]), dict(call_args[1]))

    def _fallback_args(self, i: int, sl: slice) -> tuple[dict[str, Tensor], tuple[int | None, ...], tuple]:
        """Site ``i``'s parameters by local name, which recorded inputs are batched, and those of samples ``sl``;
        the site is checked (once, eagerly) not to mix the samples."""
        s = self.sites[i]
        recs = self.records[i]
        batch = self.rec.batch
        pvals = {loc: self.rec.params[full] for loc, full in s.roles.items()}
        dims = tuple(0 if isinstance(r, Tensor) and r.dim() > 0 and r.shape[0] == batch else None for r in recs)
        if all(d is None for d in dims):
            # a parameter expanded to the batch by a size read from the input (a class token): row n is sample n's
            sizes = [r for r in recs if not isinstance(r, Tensor)]
            sized = any(r == batch or isinstance(r, tuple) and r[:1] == (batch,) for r in sizes)
            if sized and self.rec.shapes[i][0][:1] == (batch,):
                return pvals, dims, recs
            raise FwdTransError(f"per-sample projection: node {s.node!r} uses trained parameters "
                                f"{sorted(s.roles.values())} but none of its inputs is batched; no per-sample "
                                "share exists. Fix: freeze them, or use another weight-space granularity.")
        part = tuple(r[sl] if d == 0 else r for r, d in zip(recs, dims, strict=True))
        if not torch.compiler.is_compiling() and i not in self._checked:
            self._check_per_sample(i, pvals, recs, dims)
            self._checked.add(i)
        return pvals, dims, part

    def _fallback_shares(self, i: int, sl: slice, grads: tuple[Tensor, ...]) -> dict[str, Tensor]:
        """Shares ``(S, c, *p)`` of every parameter of site ``i`` for samples ``sl``, per gradient given."""
        gs = torch.stack([g[sl] for g in grads])
        pvals, dims, part = self._fallback_args(i, sl)
        if all(d is None for d in dims):  # sample n's share: the pull-back of its row of the output gradient
            pull = vjp(lambda p: self._site_call(i, p, part), pvals)[1]
            rows = gs.new_zeros(*gs.shape[:2], *self.rec.shapes[i][0])
            n = torch.arange(gs.shape[1], device=gs.device)
            rows[:, n, n + sl.start] = gs
            return vmap(vmap(lambda r: pull(r)[0]))(rows)

        def one(g: Tensor, *r: Tensor) -> dict[str, Tensor]:
            r = tuple(x[None] if d == 0 else x for x, d in zip(r, dims, strict=True))
            pull = vjp(lambda p: self._site_call(i, p, r), pvals)[1]
            return pull(g[None])[0]

        return vmap(vmap(one, in_dims=(0, *dims)), in_dims=(0, *([None] * len(dims))))(gs, *part)

    def _check_per_sample(self, i: int, pvals: dict[str, Tensor], recs: tuple, dims: tuple[int | None, ...]) -> None:
        """Refuse a fallback node whose output for one sample depends on the other samples."""
        s = self.sites[i]
        try:
            whole = self._site_call(i, pvals, recs)
            def one(*r: Tensor) -> Tensor:
                return self._site_call(i, pvals, tuple(x[None] if d == 0 else x
                                                       for x, d in zip(r, dims, strict=True)))[0]
            each = vmap(one, in_dims=dims)(*recs)
        except Exception as e:  # noqa: BLE001 - any failure of the per-sample call is the user's node
            raise FwdTransError(f"per-sample projection: node {s.node!r} ({s.kind}) could not be run one sample at a "
                                f"time under vmap: {e} Fix: freeze its parameters, or use another weight-space "
                                "granularity.") from None
        tol = 1e-10 if whole.dtype == torch.float64 else 1e-4
        if whole.shape != each.shape or not torch.allclose(whole, each, rtol=tol, atol=tol * whole.abs().max().item()):
            raise FwdTransError(f"per-sample projection: node {s.node!r} ({s.kind}) mixes the samples of the batch "
                                "(its output for one sample depends on the others), so its per-sample share cannot "
                                "be derived from its own output gradient. Fix: freeze its parameters, or use a "
                                "supported layer (Linear, Conv, BatchNorm, LayerNorm, GroupNorm).")

    # -- the estimators
    def single_site(self, i: int, names: list[str]) -> dict[str, Tensor]:
        """Every parameter of site ``i`` used nowhere else."""
        s = self.sites[i]
        inv = {full: loc for loc, full in s.roles.items()}
        out = {}
        for name in names:
            local = inv[name]
            if s.kind in ("linear", "conv") and local == "weight" and self.rule(i) == "ghost":
                out[name] = self._ghost(i)
            else:
                out[name] = self.materialised(name, [(i, local)])
        return out

    def materialised(self, name: str, uses: list[tuple[int, str]]) -> Tensor:
        """``sum_n c_n g_n`` chunk by chunk, ``g_n`` summed over the parameter's sites.

        Only ``g_n`` is formed: ``<t_n, g_n>`` is read off the target's output gradient (see
        :meth:`_target_dot`), which for Linear/Conv weights costs one layer forward with the per-sample
        weights ``g_n`` instead of forming ``t_n`` (measured 1.2-1.6x faster on CPU, half the memory).
        """
        p = self.rec.params[name]
        acc = torch.zeros_like(p)
        for sl in self._slices(uses[0][0], 2 * p.numel()):
            parts = [(self._fallback_shares(i, sl, self.grads[i][1:])[loc] if self.path == "fallback"
                      else self.shares(i, loc, sl, self.grads[i][1:]))[0] for i, loc in uses]
            g = parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
            dot = self._target_dot(*uses[0], sl, g)
            for i, loc in uses[1:]:
                dot = dot + self._target_dot(i, loc, sl, g)
            g = g.flatten(1)
            coeff = dot / (torch.linalg.vector_norm(g, dim=1).square() + self.eps)
            acc += (coeff @ g).view_as(p)
        return acc

    def noise(self, name: str, uses: list[tuple[int, str]], v: Tensor) -> Tensor:
        """``sum_n <t_n, v_n> / (|v_n|^2 + eps) v_n`` for per-sample noise ``v`` ``(B, *p)``."""
        p = self.rec.params[name]
        if v.shape[1:] != p.shape or v.shape[0] != self.rec.batch:
            raise FwdTransError(f"noise[{name!r}] has shape {tuple(v.shape)}; expected {(self.rec.batch, *p.shape)}")
        acc = torch.zeros_like(p)
        for sl in self._slices(uses[0][0], p.numel()):
            vs = v[sl]
            dot = self._target_dot(*uses[0], sl, vs)
            for i, loc in uses[1:]:
                dot = dot + self._target_dot(i, loc, sl, vs)
            vf = vs.flatten(1)
            coeff = dot / (torch.linalg.vector_norm(vf, dim=1).square() + self.eps)
            acc += (coeff @ vf).view_as(p)
        return acc

    def _target_dot(self, i: int, local: str, sl: slice, v: Tensor) -> Tensor:
        """``<t_n, v_n>`` for samples ``sl`` and per-sample directions ``v`` ``(c, *p)``.

        For Linear/Conv weights, the layer's response to the per-sample weight ``v_n`` contracted
        with the target's output gradient, ``sum_s <Gt_ns, v_n X_ns>`` (no ``t_n`` formed); otherwise
        ``t_n``'s share (small: a bias or a norm's affine parameter) dotted with ``v_n``.
        """
        s, gt = self.sites[i], self.grads[i][0][sl]
        if self.path != "fallback" and s.kind == "linear" and local == "weight":
            x = _flat_positions(self._x(i)[sl])
            return (torch.bmm(x, v.transpose(1, 2)) * _flat_positions(gt)).flatten(1).sum(1)
        if self.path != "fallback" and s.kind == "conv" and local == "weight":
            m = s.module
            x, pads = self._conv_input(i)
            c = v.shape[0]
            y = torch.ops.aten.convolution(x[sl].reshape(1, c * m.in_channels, *x.shape[2:]),
                                           v.reshape(c * m.out_channels, *v.shape[2:]), None, list(m.stride), pads,
                                           list(m.dilation), False, [0] * (x.dim() - 2), c * m.groups)
            return (y.view_as(gt) * gt).flatten(1).sum(1)
        first = self.grads[i][:1]
        sh = self._fallback_shares(i, sl, first)[local][0] if self.path == "fallback" else \
            self.shares(i, local, sl, first)[0]
        return (sh * v).flatten(1).sum(1)

    def _ghost(self, i: int) -> Tensor:
        """Ghost inner products from Gram matrices over positions, then one weight-gradient
        contraction of the guess's output gradient scaled by ``c_n``."""
        s = self.sites[i]
        p, k, o, grp = self.sizes(i)
        per = p * k * grp + 3 * grp * p * p if s.kind == "conv" else 3 * p * p  # patches and Grams
        gt_all, gg_all = self.grads[i]
        dots, norms = [], []
        for sl in self._slices(i, per):
            if s.kind == "linear":
                x = _flat_positions(self._x(i)[sl])  # (c, T, K)
                gt, gg = _flat_positions(gt_all[sl]), _flat_positions(gg_all[sl])
                if x.shape[1] == 1:  # outer products: <a b^T, c b^T> = <a, c> |b|^2
                    xx = (x * x).sum((1, 2))
                    dots.append((gt * gg).sum((1, 2)) * xx)
                    norms.append((gg * gg).sum((1, 2)) * xx)
                    continue
                gram_x = torch.bmm(x, x.transpose(1, 2))
                gram_tg = torch.bmm(gt, gg.transpose(1, 2))
                gram_gg = torch.bmm(gg, gg.transpose(1, 2))
            else:
                u = self._patches(i, sl)  # (c, groups, K, P)
                gram_x = torch.matmul(u.transpose(-1, -2), u)
                c = u.shape[0]
                gt = gt_all[sl].reshape(c, grp, o, p)
                gg = gg_all[sl].reshape(c, grp, o, p)
                gram_tg = torch.matmul(gt.transpose(-1, -2), gg)
                gram_gg = torch.matmul(gg.transpose(-1, -2), gg)
            dots.append((gram_x * gram_tg).flatten(1).sum(1))
            norms.append((gram_x * gram_gg).flatten(1).sum(1))
        coeff = torch.cat(dots) / (torch.cat(norms) + self.eps)
        scaled = gg_all * _bcast(coeff, gg_all)
        w = self.rec.params[s.roles["weight"]]
        if s.kind == "linear":
            x = self._x(i)
            return torch.mm(scaled.reshape(-1, scaled.shape[-1]).T, x.reshape(-1, x.shape[-1])).view_as(w)
        m = s.module
        x, pads = self._conv_input(i)
        return torch.ops.aten.convolution_backward(scaled, x, w, None, list(m.stride), pads, list(m.dilation), False,
                                                   [0] * (x.dim() - 2), m.groups, [False, True, False])[1]

    def _patches(self, i: int, sl: slice) -> Tensor:
        """The conv's input patches for samples ``sl``: ``(c, groups, C_in/groups * prod(kernel), P)``."""
        m = self.sites[i].module
        x, pads = self._conv_input(i)
        x = x[sl]
        c, grp, nd = x.shape[0], m.groups, x.dim() - 2
        if nd == 2:  # im2col
            u = F.unfold(x, m.kernel_size, m.dilation, tuple(pads), m.stride)
            return u.view(c, grp, -1, u.shape[-1])
        if any(pads):
            x = F.pad(x, [v for p in reversed(pads) for v in (p, p)])
        for j, (k, s, d) in enumerate(zip(m.kernel_size, m.stride, m.dilation, strict=True)):
            x = x.unfold(2 + j, d * (k - 1) + 1, s)[..., ::d]  # appends the window dim
        out_sp = x.shape[2:2 + nd]
        # (c, C_in, *out, *k) -> (c, groups, C_in/groups, *k, *out)
        x = x.reshape(c, grp, m.in_channels // grp, *out_sp, *m.kernel_size)
        perm = [0, 1, 2, *range(3 + nd, 3 + 2 * nd), *range(3, 3 + nd)]
        return x.permute(perm).reshape(c, grp, -1, math.prod(out_sp))
