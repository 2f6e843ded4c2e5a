"""The tangent engine: every parameter's gradient for one batch, from ``torch.func`` alone.

One forward sweep runs the blocks in order, each as a pure function of its parameters under
``torch.func.vjp``, which keeps the block's pull-back for the block-local update. After each block
(but the last) its head gives the local loss, its gradient ``g = dl/dh`` and the block's Gradient
Guess. Each guess opens a *bundle* of tangent streams at the block (``_spaces``: the guess itself in
activity space, its image ``J_theta v`` in weight space) that ends where the block's target is read
(``Method.target_end``): its own output (local target), the next block's output (intermediate) or the
logits (global). There its streams are contracted with the target's cotangent, giving directional
derivatives ``d``.

* ``engine="forward"`` (:class:`Forward`): the streams ride along the sweep by forward-mode AD
  (``torch.func.jvp`` under ``vmap`` over all open streams, primal computed once per block). No
  pull-back crosses a cut.
* ``engine="reference"`` (:class:`Reference`): the same ``d`` from backprop (the block pull-backs
  chained back from each target), as the paper's code computes it.

Both then share the space's estimate (``_projection``) and update: activity estimates are pulled back
through their block only; weight estimates are the gradients. The last block always gets the exact
gradient of the global loss. Backprop and greedy local learning are sweeps of their own, and so is
the per-sample weight space (``granularity="sample"``, :class:`PerSampleReference` and
:class:`PerSampleForward`), whose blocks are recorded by :mod:`fwdtrans._persample` and projected one
at a time after the sweep.

The step is a pure function of a :class:`~fwdtrans._plan.Plan`:
``gradients(plan, inputs, y, noise) -> (grads, buffers, metrics)``, with no ``torch.autograd`` call and
no state written, so ``torch.compile(fullgraph=True)`` captures it whole. :func:`before_step` does what
must happen before it, eagerly (NTK heads re-drawn, noise drawn).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.func
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.func import vmap

from . import _persample, _tangents
from ._blocks import call, norm_affine, push, replaying, rng_state, state, vjp
from ._errors import FwdTransError
from ._guesses import guess_for
from ._method import Method
from ._plan import Plan
from ._spaces import space_for

__all__ = ["Backprop", "BlockRecord", "Forward", "LocalLearning", "PerSampleForward", "PerSampleReference", "Projected",
           "Reference", "before_compiled_step", "before_step", "check_compilable", "faulty_conv", "gradients",
           "inductor_options"]

Grads = dict[str, Tensor]

def check_compilable(plan: Plan) -> None:
    """Refuse a plan whose step cannot be compiled."""
    method = plan.method
    if method.kind != "projected":
        return
    rerun = [j for j in space_for(method).rerun(plan) if plan.dropout[j]]
    if rerun:
        blocks = ", ".join(map(str, rerun))
        raise FwdTransError(
            f"compile=True with {method.describe()} and dropout in block(s) {blocks}: the forward engine's step "
            "runs such a block twice (weight space: for J_theta v; streams='sequential': for each stream) and must "
            "replay its dropout mask, which a compiled graph cannot. Fix: the eager step (compile=False), "
            "engine='reference', or remove dropout from those blocks.")


def before_compiled_step(plan: Plan, inputs: tuple) -> None:
    """Eager work a compiled step of ``plan`` needs done first, on this step's ``inputs`` (the blocks'
    tangent programs; the per-sample weight space builds its blocks' rewritten graphs and the shapes of their
    deltas: Dynamo traces none of these)."""
    for block in plan.blocks:
        _tangents.program(block)
        norm_affine(block)  # read from the graph: Dynamo traces no fx internals
    if plan.method.kind == "projected":
        space_for(plan.method).warm(plan, inputs)


def before_step(plan: Plan, batch: int, generator: torch.Generator) -> list[list[Tensor]]:
    """What runs eagerly before the pure step: NTK heads re-drawn, and the step's noise guesses drawn,
    per block but the last (``[(k, B, *h)]`` in activity space, ``[(k, *p)]`` per trained parameter in
    weight space; empty lists for other guesses), so that an eager and a compiled step, and both
    engines, use the same numbers."""
    method = plan.method
    if method.kind != "projected":
        return [[] for _ in plan.blocks[:-1]]
    guess, space = guess_for(method), space_for(method)
    guess.prepare(plan.heads, generator)
    like = next((p for m in (*plan.blocks, *plan.heads) for p in m.parameters()), torch.empty(0))  # dtype, device
    return [guess.draw(space.noise_shapes(plan, j, batch), generator, like) for j in range(len(plan.blocks) - 1)]


def gradients(plan: Plan, inputs: tuple, y: Tensor, noise: list[list[Tensor]],
              record: dict | None = None) -> tuple[Grads, Grads, dict[str, Tensor]]:
    """The step as a pure function: ``(grads, new_buffers, metrics)``, grads and buffers by name
    (``blocks.{j}.*``, ``heads.{j}.*``). ``record``, when given, receives the projected sweep's
    per-block internals (``blocks``: :class:`BlockRecord` s, ``estimates``) for ``check``."""
    sweep = _sweep(plan.method)
    if sweep.pushes_tangents and torch.compiler.is_compiling() and not plan.faulty_conv:
        inputs = tuple(_channels_last(t) for t in inputs)
    return sweep(plan, inputs, y, noise, record).run()


def _sweep(method: Method) -> type[_Sweep]:
    if method.kind != "projected":
        return _SWEEPS[method.kind]
    own = space_for(method).sweeps  # a space with sweeps of its own
    return _SWEEPS[(own, method.engine) if own else method.engine]


def inductor_options(plan: Plan) -> dict[str, Any]:
    """Inductor options for ``plan``'s compiled step. A step that pushes tangent streams turns inductor's
    layout optimisation off: that optimisation gives each convolution's (4-d) output the channels-last
    layout, which the streams' stacked ``(S, B, C, H, W)`` tangents do not get, and the fused kernels that
    mix the two layouts read one of them strided, element by element. Such a step instead takes its image
    inputs channels-last (``gradients``), and every tensor derived from them, the streams' too, follows
    (see the Performance page). Every step of a plan with a :func:`faulty_conv` turns it off too, and keeps
    its inputs' layout. On a CPU only: on other devices, where it was not measured, inductor's defaults
    stay."""
    cpu = all(p.device.type == "cpu" for b in plan.blocks for p in b.parameters())
    off = plan.faulty_conv or _sweep(plan.method).pushes_tangents
    return {"layout_optimization": False} if cpu and off else {}


def faulty_conv(modules: Iterable[nn.Module]) -> bool:
    """Whether ``modules`` hold a convolution that oneDNN's AVX2 kernels get wrong channels-last.

    On CPUs without AVX-512 (AMD EPYC up to Zen 3, many laptops) oneDNN's 1x1 backward-weights convolution
    (``jit_avx2_1x1_convolution_bwd_weights_t``) with a channels-last float32 source, a stride over 1 and
    fewer input channels per group than its block of 8 computes a wrong weight gradient, crashes or never
    returns (oneDNN issue #6035; an NCHW source, float64, stride 1 or 8 channels take other kernels). Such a
    convolution: an ``nn.Conv2d`` or ``F.conv2d`` with a 1x1 kernel, a stride over 1 in either dimension and
    a weight of fewer than 8 input channels per group; erring on the safe side, also an ``F.conv2d`` of a
    graph whose weight or stride is not a constant of it. A compiled step on a CPU whose blocks or heads hold
    one keeps every tensor in the default layout (:func:`inductor_options`, :func:`gradients`)."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Conv2d) and _faulty(m.weight, m.stride):
                return True
            if isinstance(m, fx.GraphModule) and any(_faulty_call(m, n) for n in m.graph.nodes):
                return True
    return False


def _faulty(weight: Any, stride: Any) -> bool:
    """A convolution of ``weight`` at ``stride`` counts unless its stride is known to be 1 or its weight known
    not to be 1x1 with fewer than 8 input channels per group."""
    strides = stride if isinstance(stride, tuple | list) else (stride,)
    if all(isinstance(s, int) for s in strides) and max(strides) == 1:
        return False
    return not isinstance(weight, Tensor) or (tuple(weight.shape[2:]) == (1, 1) and weight.shape[1] < 8)


def _faulty_call(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` of ``gm`` is an ``F.conv2d`` call that :func:`faulty_conv` counts."""
    if node.op != "call_function" or node.target is not torch.conv2d:
        return False
    args = {**dict(zip(("input", "weight", "bias", "stride"), node.args, strict=False)), **node.kwargs}
    weight: Any = args.get("weight")
    if isinstance(weight, fx.Node) and weight.op == "get_attr":
        weight = functools.reduce(getattr, str(weight.target).split("."), gm)
    return _faulty(weight, args.get("stride", 1))


def _channels_last(t: Any) -> Any:
    """An image batch on a CPU in channels-last memory format, where oneDNN's convolutions are faster."""
    image = isinstance(t, Tensor) and t.dim() == 4 and t.is_floating_point() and t.device.type == "cpu"
    return t.contiguous(memory_format=torch.channels_last) if image else t


# ----------------------------------------------------------------------------- per-block state
@dataclass
class BlockRecord:
    """What the sweep knows of one block."""

    out: Tensor
    inputs: tuple
    pull: Callable | None = None  # the block's vjp: cotangent of out[, argnums] -> (params[, input]) cotangents
    head_loss: Tensor | None = None  # mean head loss
    g: Tensor | None = None  # d head_loss / d out
    directions: Any = None  # the guess: activity (k, B, *h); weight [(k, *p)] per parameter
    normalise: bool = True
    units: list[list[int]] = field(default_factory=list)  # weight space: parameter indices per unit
    values: Tensor | None = None  # directional derivatives, per stream (and per output sample)
    target: list[Tensor] | None = None  # reference engine: the target gradient in the space
    rng: list[Tensor] | None = None  # the random state the block's forward started from, to replay its dropout
    rec: _persample.PerSampleRecord | None = None  # per-sample weight space: the block's record, until projected


@dataclass
class _Bundle:
    """The tangent streams opened at block ``origin``, read at block ``end``'s output."""

    origin: int
    end: int
    tangents: Tensor


def _contract(tangents: Tensor, cotangent: Tensor, per_sample: bool) -> Tensor:
    """``<cotangent_m, tangent_s,m>`` per stream s and output sample m; summed over m unless ``per_sample``."""
    values = (tangents * cotangent).flatten(2).sum(-1)
    return values if per_sample else values.sum(-1)


def _rows(cotangent: Tensor) -> Tensor:
    """``(B, B, ...)``: row m holds sample m's cotangent, zeros elsewhere."""
    batch = cotangent.shape[0]
    eye = torch.eye(batch, dtype=cotangent.dtype, device=cotangent.device)
    return eye.view(batch, batch, *([1] * (cotangent.dim() - 1))) * cotangent


# ----------------------------------------------------------------------------- the sweeps
class _Sweep:
    """One step: the blocks in order under ``vjp``, the heads, the loss; subclasses say what happens at
    each head (:meth:`_at_head`) and at the logits (:meth:`_at_logits`)."""

    chained = False  # differentiate each block's input too: backprop and the reference engine chain pull-backs
    runs_heads = True
    pushes_tangents = False  # carries tangent streams by forward-mode AD

    def __init__(self, plan: Plan, inputs: tuple, y: Tensor, noise: list[list[Tensor]], record: dict | None):
        self.plan, self.method, self.inputs, self.y, self.noise = plan, plan.method, inputs, y, noise
        self.record = record
        self.last = len(plan.blocks) - 1
        self.states = [state(b) for b in plan.blocks]
        self.head_states = [state(h) for h in plan.heads]
        self.blocks: list[BlockRecord] = []
        self.grads: Grads = {}
        self.buffers: Grads = {}
        self.grad_logits: Tensor  # d loss / d logits, once the sweep reaches them

    def run(self) -> tuple[Grads, Grads, dict[str, Tensor]]:
        h = self.inputs
        for j in range(self.last + 1):
            b = self._block(j, h)
            self.blocks.append(b)
            if j < self.last and self.runs_heads:
                self._head(j, b)
                self._at_head(j, b)
            h = (b.out,)
        logits = self.blocks[-1].out
        loss, pull = vjp(lambda o: F.cross_entropy(o, self.y), logits)
        (self.grad_logits,) = pull(torch.ones_like(loss))
        self._at_logits()
        return self.grads, self.buffers, self._metrics(loss, logits)

    def _at_head(self, j: int, b: BlockRecord) -> None:
        pass

    def _at_logits(self) -> None:
        raise NotImplementedError

    def _save(self, prefix: str, tensors: dict[str, Tensor], into: Grads) -> None:
        into.update({f"{prefix}.{k}": v for k, v in tensors.items()})
        if into is self.grads and self.plan.reduce is not None:  # data parallel: these gradients are final
            self.plan.reduce.ready(prefix, tensors)

    def _block(self, j: int, inputs: tuple) -> BlockRecord:
        return self._run(j, inputs, None)[0]

    def _rng(self, j: int) -> list[Tensor] | None:
        """The random state to note before block ``j``'s forward, when it will run again (see ``_blocks``)."""
        return None

    def _run(self, j: int, inputs: tuple, tangents: list[Tensor] | None) -> tuple[BlockRecord, list[Tensor] | None]:
        """Block ``j`` on ``inputs`` under ``vjp`` (pushing the chunks of ``tangents`` if any); its new buffers
        are saved."""
        block, (trained, frozen, buffers) = self.plan.blocks[j], self.states[j]
        chain = self.chained and j > 0

        def f(p, *x):
            x = x if chain else inputs
            if tangents is None:
                out, new = call(block, {**frozen, **p}, buffers, *x)
                return out, {"buffers": new}
            out, t, new = push(block, x[0], tangents, (p, frozen, buffers))
            return out, {"buffers": new, "tangents": t}

        args = (trained, *(inputs if chain else ()))
        rng = self._rng(j)
        if self.method.recompute and j < self.last:  # no pull-back kept: param_grads recomputes it
            (out, aux), pull = f(*args), None
        else:
            out, pull, aux = vjp(f, *args, has_aux=True)
        self._save(f"blocks.{j}", aux["buffers"], self.buffers)
        return BlockRecord(out, inputs, pull, rng=rng), aux.get("tangents")

    def param_grads(self, j: int, cotangent: Tensor) -> Grads:
        """Block ``j``'s parameter cotangents from one at its output, by name; recomputes the block's
        forward if its pull-back was not kept."""
        b = self.blocks[j]
        if b.pull is None:  # recompute=True: the same function, on the same inputs and buffers
            block, (trained, frozen, buffers) = self.plan.blocks[j], self.states[j]
            return vjp(lambda p: call(block, {**frozen, **p}, buffers, *b.inputs)[0], trained)[1](cotangent)[0]
        return b.pull(cotangent, argnums=(0,))[0]  # no gradient at the block's input (a chained block has one)

    def _train(self, j: int, cotangent: Tensor) -> None:
        """Block ``j``'s gradient: its pull-back of ``cotangent``."""
        self._save(f"blocks.{j}", self.param_grads(j, cotangent), self.grads)

    def _head(self, j: int, b: BlockRecord) -> None:
        head, (trained, frozen, buffers) = self.plan.heads[j], self.head_states[j]
        train = self.method.trains_heads

        def f(o, p=trained):
            logits, new = call(head, {**frozen, **p}, buffers, o)
            if isinstance(logits, Tensor):
                return F.cross_entropy(logits, self.y), new
            return sum(F.cross_entropy(z, self.y) for z in logits), new  # a SplitHead: one loss per tensor

        b.head_loss, pull, new = vjp(f, b.out, *((trained,) if train else ()), has_aux=True)
        b.g, *grads = pull(torch.ones_like(b.head_loss))
        if b.g.stride() != b.out.stride():  # a head that changes the memory format (a CNN head on CPU)
            b.g = torch.empty_like(b.out).copy_(b.g)
        self._save(f"heads.{j}", new, self.buffers)
        if train:
            self._save(f"heads.{j}", grads[0], self.grads)

    def _metrics(self, loss: Tensor, logits: Tensor) -> dict[str, Tensor]:
        metrics = {"loss": loss, "accuracy": (logits.argmax(-1) == self.y).float().mean()}
        for j, b in enumerate(self.blocks[:-1]):
            if b.head_loss is not None:
                metrics[f"loss/head{j}"] = b.head_loss
        return metrics


class Backprop(_Sweep):
    """``guess="global"``: the block pull-backs chained from the logits."""

    chained, runs_heads = True, False

    def _at_logits(self):
        cotangent: Tensor | None = self.grad_logits
        for k in range(self.last, -1, -1):
            pull = self.blocks[k].pull
            assert pull is not None
            grads, *rest = pull(cotangent)
            self._save(f"blocks.{k}", grads, self.grads)
            cotangent = rest[0] if rest else None


class LocalLearning(_Sweep):
    """Local target, local guess: each head's loss trains its block (greedy local learning)."""

    def _at_head(self, j, b):
        self._train(j, b.g)

    def _at_logits(self):
        self._train(self.last, self.grad_logits)


class Projected(_Sweep):
    """A forward gradient: each block's target projected on its guess, in the method's space."""

    def __init__(self, *args):
        super().__init__(*args)
        self.space, self.guess = space_for(self.method), guess_for(self.method)
        self.reruns = set(self.space.rerun(self.plan))

    def _rng(self, j):
        return rng_state() if self.plan.dropout[j] and j in self.reruns else None

    def _at_head(self, j, b):
        if self.space.guess(self, j, b):
            self._open(j, b)

    def _open(self, j: int, b: BlockRecord) -> None:
        """Start block ``j``'s streams (the reference engine derives every value after the sweep)."""

    def _values(self) -> None:
        raise NotImplementedError

    def _end(self, j: int) -> int:
        return self.method.target_end(j, self.last)

    def target_param_grads(self, j: int, cotangent: Tensor) -> Grads:
        """Block ``j``'s parameter cotangents from its target's ``cotangent`` at its output."""
        return self.param_grads(j, cotangent)

    def _cotangent(self, k: int) -> Tensor:
        """The cotangent of the loss read at block ``k``'s output: its head's, or the global loss's at the logits."""
        g = self.blocks[k].g if k < self.last else self.grad_logits
        assert g is not None
        return g

    def _at_logits(self):
        self._values()
        if self.plan.reduce is not None:  # data parallel: batch-level projection scalars over the whole batch
            self.plan.reduce.values(self)
        space, blocks = self.space, self.blocks[:-1]
        if self.method.joint:  # one directional derivative shared by every block
            total = cast(Tensor, sum(b.values for b in blocks if b.values is not None))
            estimates = space.joint_estimates(blocks, total, self.plan)
        else:
            estimates = [space.estimate(b, cast(Tensor, b.values), s)
                         for b, s in zip(blocks, self.plan.segments, strict=True)]
        if self.record is not None:
            self.record.update(blocks=self.blocks, estimates=estimates)
        for j, est in enumerate(estimates):
            self._save(f"blocks.{j}", space.gradients(self, j, est), self.grads)
        self._train(self.last, self.grad_logits)  # the last block: the exact gradient of the global loss


class Forward(Projected):
    """``engine="forward"``: the streams ride along the sweep by forward-mode AD."""

    pushes_tangents = True

    def __init__(self, *args):
        super().__init__(*args)
        self.open: list[_Bundle] = []  # pushed through every block the sweep runs
        self.pending: list[_Bundle] = []  # streams="sequential": pushed on their own after the sweep

    def _block(self, j, inputs):
        b, tangents = self._run(j, inputs, [s.tangents for s in self.open] or None)
        for s, t in zip(self.open, tangents or (), strict=True):
            s.tangents = t
        return b

    def _at_head(self, j, b):
        self._close(j)
        super()._at_head(j, b)

    def _close(self, k: int) -> None:
        """Read the open bundles whose target is block ``k``'s output."""
        for s in self.open:
            if s.end == k:
                self.blocks[s.origin].values = _contract(s.tangents, self._cotangent(k), self.space.per_sample)
        self.open = [s for s in self.open if s.end != k]

    def _open(self, j, b):
        if not self.space.pulls_back:  # the estimate needs no pull-back: free the block's activations now
            b.pull = None
        bundle = _Bundle(j, self._end(j), self.space.origin(self, j, b))
        if bundle.end == j:  # a local target: read at the block itself
            b.values = _contract(bundle.tangents, self._cotangent(j), self.space.per_sample)
        elif self.method.streams == "sequential":
            self.pending.append(bundle)
        elif self.method.joint and self.open and self.open[0].end == bundle.end:  # join the single stream here
            self.open[0].tangents = self.open[0].tangents + bundle.tangents
        else:
            self.open.append(bundle)
        if not self.space.pulls_back and self.method.streams != "sequential":
            # nothing after this block reads its input, nor its head's gradient: free them now, so that
            # weight space holds no activation of a finished block
            b.inputs, b.g = (), None
            if j > 0:
                self.blocks[j - 1].out = None

    def _values(self):
        self._close(self.last)
        for s in self.pending:
            self.blocks[s.origin].values = self._propagate(s)

    def _propagate(self, s: _Bundle) -> Tensor:
        """Push one bundle from its block to its target on its own, recomputing the primal."""
        h, tangents = self.blocks[s.origin].out, s.tangents
        for k in range(s.origin + 1, s.end + 1):
            with replaying(self.blocks[k].rng):  # the sweep's dropout masks
                h, (tangents,), _ = push(self.plan.blocks[k], h, [tangents], self.states[k])
        return _contract(tangents, self._cotangent(s.end), self.space.per_sample)


class Reference(Projected):
    """``engine="reference"``: the same values from the chained pull-backs, as the paper's code.

    Each pull-back differentiates only what is read of it (``_blocks.vjp``): the walk back asks a block for
    its input's cotangent alone, an activity estimate's pull-back for the parameters alone, so the two cost
    one backward between them. Where the walk's cotangent at a block is also what the block's parameters
    need (the last block's exact gradient; in weight space, a block's target gradient on the walk of the
    global target) one pull-back gives both, kept in ``target_grads``."""

    chained = True

    def __init__(self, *args):
        super().__init__(*args)
        self.target_grads: dict[int, Grads] = {}  # block -> its parameters' gradient of its target's cotangent

    def _values(self):
        per_sample = self.space.per_sample
        read = _rows if per_sample else (lambda c: c)
        origins: dict[int, list[int]] = {}  # by the block where their target is read
        for j in range(self.last):
            origins.setdefault(self._end(j), []).append(j)
        cotangents: dict[int, Tensor] = {}
        for end, js in origins.items():  # one walk back from each place a target is read
            c, k = read(self._cotangent(end)), end
            for j in reversed(js):
                while k > j:
                    # the last block's cotangent is the global loss's (its exact gradient); in weight space a
                    # block on the walk carries its own target (its target gradient): keep the parameters' part
                    keep = not per_sample and (k == self.last or (self.space.param_tangents and cotangents.get(k) is c))
                    c, k = self._back(k, c, per_sample, keep), k - 1
                cotangents[j] = c
        for j, b in enumerate(self.blocks[:-1]):
            if b.values is None:  # else set by the space (a parameter-free block in weight space)
                b.values, b.target = self.space.reference_values(self, j, b, cotangents[j])

    def _back(self, k: int, cotangent: Tensor, batched: bool, keep: bool = False) -> Tensor:
        """The cotangent at block ``k``'s input from one at its output (rows ``(R, *out)`` if ``batched``);
        ``keep``: the parameters' cotangents too, into ``target_grads``."""
        pull = self.blocks[k].pull
        assert pull is not None
        if keep:
            self.target_grads[k], cotangent = pull(cotangent)
            return cotangent
        back = functools.partial(pull, argnums=(1,))  # the input's cotangent only: no weight gradient
        return vmap(lambda c: back(c)[1])(cotangent) if batched else back(cotangent)[1]

    def target_param_grads(self, j, cotangent):
        """Kept from the walk if it passed block ``j`` with this cotangent, else a pull-back of it."""
        grads = self.target_grads.pop(j, None)
        return self.param_grads(j, cotangent) if grads is None else grads

    def _train(self, j, cotangent):
        if j == self.last and j in self.target_grads:  # the walk's pull-back of the global loss's cotangent
            self._save(f"blocks.{j}", self.target_grads.pop(j), self.grads)
        else:
            super()._train(j, cotangent)


class _PerSample(Projected):
    """``space="weight", granularity="sample"`` (:class:`~fwdtrans._spaces.PerSampleWeight`): every block but
    the last runs through :func:`fwdtrans._persample.record` (its output, every parameterised layer's input,
    and a pull-back to every such layer's output gradient), the last block under ``vjp`` as usual. After
    the sweep each block's estimate is formed from its target's and its guess's cotangents at its output,
    block by block, each block's record dropped as soon as its estimate is formed."""

    def _wrt_inputs(self, j: int) -> bool:
        """Whether block ``j``'s record must pull a cotangent back to its input too."""
        return False

    def _run(self, j, inputs, tangents):
        if j == self.last:
            return super()._run(j, inputs, tangents)
        block, (trained, _, buffers) = self.plan.blocks[j], self.states[j]
        rng = self._rng(j)
        rec = _persample.record(cast(fx.GraphModule, block), trained, buffers, inputs, wrt_inputs=self._wrt_inputs(j))
        self._save(f"blocks.{j}", rec.buffers, self.buffers)
        return BlockRecord(rec.out, inputs, None, rng=rng, rec=rec), None

    def _at_logits(self):
        estimates = self._estimates()
        if self.record is not None:
            self.record.update(blocks=self.blocks, estimates=estimates)

    def _estimates(self) -> list[dict[str, Tensor]]:
        raise NotImplementedError

    def _done(self, j: int, est: dict[str, Tensor]) -> None:
        """Block ``j``'s estimate is its gradient; its record and head gradient are no longer needed."""
        b = self.blocks[j]
        self._save(f"blocks.{j}", self.space.gradients(self, j, est), self.grads)
        b.rec = b.g = None
        b.inputs = ()


class PerSampleReference(_PerSample):
    """The per-sample weight space from pull-backs, as the official code: per block ``j = J-2..0``, the
    target's cotangent at its output (the global loss's, chained back through the blocks above by the
    records' pull-backs to their inputs; the head's; or block ``j+1``'s head loss pulled back through
    block ``j+1``), then :func:`fwdtrans._persample.project`: two pull-backs through the block."""

    chained = True  # the last block's pull-back reaches its input

    def _wrt_inputs(self, j):
        return self.method.target != "local" and j > 0

    def _estimates(self):
        grads, *rest = cast(Callable, self.blocks[-1].pull)(self.grad_logits)  # the last block: exact, and chained
        self._save(f"blocks.{self.last}", grads, self.grads)
        self.blocks[-1].pull = None
        below = rest[0] if rest else None  # the target's cotangent at the output of the block being projected
        target = self.method.target
        estimates: list[dict[str, Tensor]] = [{} for _ in range(self.last)]
        for j in range(self.last - 1, -1, -1):
            b = self.blocks[j]
            rec, g = cast(_persample.PerSampleRecord, b.rec), cast(Tensor, b.g)
            cotangent = g if target == "local" else below
            if target == "intermediate" and j > 0:  # block j-1's target: this head's loss, through this block
                below = _persample.pull_inputs(rec, g)[0]
            batch: dict[str, dict[str, Tensor]] | None = {} if self.record is not None else None
            est, inputs_cot = _persample.project(rec, cast(Tensor, cotangent), g, noise=b.directions, batch=batch)
            if target == "global":
                below = inputs_cot[0] if inputs_cot else None
            if batch is not None:  # for check: the target's and the guess's batch gradients
                names = list(rec.params)
                b.target = [batch["target"][n] for n in names]
                b.directions = [batch["guess"][n][None] for n in names]
            self._done(j, est)
            estimates[j] = est
        return estimates


class PerSampleForward(_PerSample):
    """The per-sample weight space by forward-mode AD: per block, one tangent stream per sample and parameter
    tensor (sample ``n``'s share of the guess, injected at the outputs of the layers using the parameter, at
    sample ``n`` only), pushed in chunks through the rest of the block and on to the target, where it is
    contracted with the target's cotangent (:func:`fwdtrans._persample.forward_project`). Each chunk runs the
    block and those it crosses again (dropout replayed). No pull-back of the target crosses a block."""

    pushes_tangents = True

    def _estimates(self):
        self._train(self.last, self.grad_logits)  # the last block: the exact gradient of the global loss
        estimates = []
        for j in range(self.last):  # ascending: block j+1's head gradient is block j's intermediate target
            b, end = self.blocks[j], self._end(j)
            read = functools.partial(self._read, j, end, self._cotangent(end))
            est = _persample.forward_project(cast(_persample.PerSampleRecord, b.rec), b.g, b.directions, read,
                                             rng=b.rng)
            self._done(j, est)
            estimates.append(est)
        return estimates

    def _read(self, j: int, end: int, cotangent: Tensor, tangents: Tensor) -> Tensor:
        """Push tangents ``(S, *out)`` at block ``j``'s output to block ``end``'s and contract them there."""
        h = self.blocks[j].out
        for k in range(j + 1, end + 1):
            with replaying(self.blocks[k].rng):
                h, (tangents,), _ = push(self.plan.blocks[k], h, [tangents], self.states[k])
        return _contract(tangents, cotangent, False)


_SWEEPS: dict[str | tuple[str, str], type[_Sweep]] = {
    "backprop": Backprop, "local": LocalLearning, "forward": Forward, "reference": Reference,
    ("sample", "forward"): PerSampleForward, ("sample", "reference"): PerSampleReference}
