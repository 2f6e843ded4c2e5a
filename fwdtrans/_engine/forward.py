"""The forward engine: the guesses' tangent streams ride along the sweep by forward-mode AD."""

from __future__ import annotations

from torch import Tensor

from .._blocks import push, replaying
from .records import Bundle, contract
from .sweeps import Projected

__all__ = ["Forward"]


class Forward(Projected):
    """``engine="forward"``: the streams ride along the sweep by forward-mode AD."""


    def __init__(self, *args):
        super().__init__(*args)
        self.open: list[Bundle] = []  # pushed through every block the sweep runs
        self.pending: list[Bundle] = []  # streams="sequential": pushed on their own after the sweep

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
                self.blocks[s.origin].values = contract(s.tangents, self._cotangent(k), self.space.per_sample)
        self.open = [s for s in self.open if s.end != k]

    def _open(self, j, b):
        if not self.space.pulls_back:  # the estimate needs no pull-back: free the block's activations now
            b.pull = None
        bundle = Bundle(j, self._end(j), self.space.origin(self, j, b))
        if bundle.end == j:  # a local target: read at the block itself
            b.values = contract(bundle.tangents, self._cotangent(j), self.space.per_sample)
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

    def _propagate(self, s: Bundle) -> Tensor:
        """Push one bundle from its block to its target on its own, recomputing the primal."""
        h, tangents = self.blocks[s.origin].out, s.tangents
        for k in range(s.origin + 1, s.end + 1):
            with replaying(self.blocks[k].rng):  # the sweep's dropout masks
                h, (tangents,), _ = push(self.plan.blocks[k], h, [tangents], self.states[k])
        return contract(tangents, self._cotangent(s.end), self.space.per_sample)
