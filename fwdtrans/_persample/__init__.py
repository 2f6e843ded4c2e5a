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
inputs ``X``. One file per step:

* :mod:`.graph`: the rewritten graph (the block's *plan*: its *sites*, the nodes holding trained parameters),
  :func:`prepare` and :func:`warm`;
* :mod:`.records`: :func:`record` (one forward) and :func:`pull_inputs`;
* :mod:`.sites`: one projection's per-site state (output gradients, recorded inputs), the chunking of the
  samples (memory: per-sample tensors live one chunk at a time) and the cost model;
* :mod:`.rules`, :mod:`.fallback`: the per-layer rules (Linear, Conv, BatchNorm, LayerNorm, GroupNorm; for
  any other node ``torch.func.vmap`` over samples of its own ``vjp``, refused if it mixes samples);
* :mod:`.projection`: forming the estimate, :func:`project` (ghost or materialised per Linear/Conv weight,
  chosen by a FLOP count) and :func:`choices`;
* :mod:`.forward`: :func:`forward_project`, the same estimates with ``<t_n, g_n>`` from forward-mode AD.

**Random guesses.** The official code (``trainer/gradients.py::compute_random_directions``) draws,
for every module of blocks ``0..J-2``, noise shaped like the *per-sample* target share (``randn_like``
or Rademacher of ``module.target['weight']``, i.e. ``(B, *p)``), and projects with the same
normalised formula: ``sum_n <t_n, v_n> / (|v_n|^2 + eps) v_n``. Being normalised by ``|v_n|^2`` (not
the paper's ``<t, v> v``), it is biased down by about ``1/numel(p)``. Pass such draws as ``noise``
(one ``(B, *p)`` tensor per trained parameter) to get exactly that estimator; ``guess_cot`` is then
unused. ``<t_n, v_n>`` is read off the target's output gradient as above (the layer run with the
per-sample weights ``v_n``), so ``t_n`` is not formed either.

Engine integration (``space="weight", granularity="sample"``): ``_engine.per_sample.PerSampleReference`` records
every block but the last with :func:`record` and, walking back from the logits, projects each with
:func:`project` (``pull_inputs`` for intermediate targets); ``_engine.per_sample.PerSampleForward`` uses
:func:`forward_project`. :func:`prepare` and :func:`warm` build, eagerly, what a compiled step needs.
:func:`per_sample_projection` is :func:`record` and :func:`project` in one call.
"""

from __future__ import annotations

from .forward import forward_project
from .graph import prepare, warm
from .projection import PATHS, choices, per_sample_projection, project
from .records import PerSampleRecord, pull_inputs, record

__all__ = ["PATHS", "PerSampleRecord", "choices", "forward_project", "per_sample_projection", "prepare", "project",
           "pull_inputs", "record", "warm"]
