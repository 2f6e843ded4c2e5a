"""The tangent engine: every parameter's gradient for one batch, from ``torch.func`` alone.

One forward sweep runs the blocks in order, each as a pure function of its parameters under
``torch.func.vjp``, which keeps the block's pull-back for the block-local update. After each block
(but the last) its head gives the local loss, its gradient ``g = dl/dh`` and the block's Gradient
Guess. Each guess opens a *bundle* of tangent streams at the block (``spaces``: the guess itself in
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

The step is a pure function of a :class:`~fwdtrans._engine.plan.Plan`:
``gradients(plan, inputs, y, noise) -> (grads, buffers, metrics)``, with no ``torch.autograd`` call and
no state written, so ``torch.compile(fullgraph=True)`` captures it whole. :func:`before_step` does what
must happen before it, eagerly (NTK heads re-drawn, noise drawn).
"""

from .layout import faulty_conv, inductor_options
from .plan import Plan, Reducer, SweepView, cut_shapes, segments
from .records import BlockRecord
from .spaces import space_for
from .step import before_compiled_step, before_step, check_compilable, gradients

__all__ = ["BlockRecord", "Plan", "Reducer", "SweepView", "before_compiled_step", "before_step", "check_compilable",
           "cut_shapes", "faulty_conv", "gradients", "inductor_options", "segments", "space_for"]
