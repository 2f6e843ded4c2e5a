"""The reference engine: the same directional derivatives from backprop, as the paper's code computes them."""

from __future__ import annotations

import functools

from torch import Tensor
from torch.func import vmap

from .records import Grads, rows
from .sweeps import Projected

__all__ = ["Reference"]


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
        read = rows if per_sample else (lambda c: c)
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
