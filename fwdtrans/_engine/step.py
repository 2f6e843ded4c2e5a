"""The step as a pure function of a :class:`~fwdtrans._engine.plan.Plan`, and the eager work around it."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _tangents
from .._blocks import norm_affine
from .._errors import FwdTransError
from .._method import Method
from .forward import Forward
from .guesses import guess_for
from .layout import channels_last
from .per_sample import PerSampleForward, PerSampleReference
from .plan import Plan
from .records import Grads
from .reference import Reference
from .spaces import space_for
from .sweeps import Backprop, LocalLearning, Sweep

__all__ = ["before_compiled_step", "before_step", "check_compilable", "gradients"]


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
    if plan.method.pushes_tangents and torch.compiler.is_compiling() and not plan.faulty_conv:
        inputs = tuple(channels_last(t) for t in inputs)
    return sweep(plan, inputs, y, noise, record).run()


def _sweep(method: Method) -> type[Sweep]:
    if method.kind != "projected":
        return _SWEEPS[method.kind]
    own = "sample" if method.per_sample_weight else None  # a space with sweeps of its own
    return _SWEEPS[(own, method.engine) if own else method.engine]


_SWEEPS: dict[str | tuple[str, str], type[Sweep]] = {
    "backprop": Backprop, "local": LocalLearning, "forward": Forward, "reference": Reference,
    ("sample", "forward"): PerSampleForward, ("sample", "reference"): PerSampleReference}
