"""The sweeps: one step's walk through the blocks under ``vjp``. The base sweep, backprop, greedy local
learning and the projected sweep that the forward and reference engines refine."""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor

from .._blocks import call, push, rng_state, state, vjp
from .guesses import guess_for
from .plan import Plan
from .records import BlockRecord, Grads
from .spaces import space_for

__all__ = ["Backprop", "LocalLearning", "Projected", "Sweep"]


class Sweep:
    """One step: the blocks in order under ``vjp``, the heads, the loss; subclasses say what happens at
    each head (:meth:`_at_head`) and at the logits (:meth:`_at_logits`)."""

    chained = False  # differentiate each block's input too: backprop and the reference engine chain pull-backs
    runs_heads = True

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


class Backprop(Sweep):
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


class LocalLearning(Sweep):
    """Local target, local guess: each head's loss trains its block (greedy local learning)."""

    def _at_head(self, j, b):
        self._train(j, b.g)

    def _at_logits(self):
        self._train(self.last, self.grad_logits)


class Projected(Sweep):
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
