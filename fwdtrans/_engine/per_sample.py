"""The per-sample weight space's sweeps (``granularity="sample"``): blocks recorded by
:mod:`fwdtrans._persample`, projected one at a time after the sweep."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import cast

from torch import Tensor, fx

from .. import _persample
from .._blocks import push, replaying
from .records import BlockRecord, contract
from .sweeps import Projected

__all__ = ["PerSampleForward", "PerSampleReference"]


class _PerSample(Projected):
    """``space="weight", granularity="sample"`` (:class:`~fwdtrans._engine.spaces.PerSampleWeight`): every block but
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
        return contract(tangents, cotangent, False)
