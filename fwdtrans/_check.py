"""``check``: compare a converted model's estimates with the true gradients, block by block."""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _engine

__all__ = ["BlockCheck", "CheckReport", "check"]


@dataclass(frozen=True)
class BlockCheck:
    """Diagnostics of one block (all but the last, which always gets the exact gradient).

    Attributes:
        block: the block index.
        cosine: cosine between the estimate and the true gradient of the block's target, in the
            method's space.
        norm_ratio: ``|estimate| / |target gradient|``.
        guess_cosine: the paper's Eq. 6: cosine between guess and target, averaged over samples
            (activity space) or parameter tensors (weight space).
        engine_gap: relative difference of the block's parameter gradients, forward vs reference engine.
    """

    block: int
    cosine: float  # cos(estimate, target gradient), in the method's space
    norm_ratio: float  # |estimate| / |target gradient|
    guess_cosine: float  # the paper's Eq. 6: cos(guess, target), averaged over samples (activity) or tensors
    engine_gap: float  # relative difference of the block's parameter gradients, forward vs reference engine


@dataclass(frozen=True)
class CheckReport:
    """What [`check`][fwdtrans.check] found; ``print`` it for a table.

    Attributes:
        method: the method's description, e.g. ``(target=global, guess=local, space=activity)``.
        blocks: one [`BlockCheck`][fwdtrans.BlockCheck] per block but the last.
        missing: trained parameters without a finite gradient of their own shape.
        engine_gap: the largest relative difference between the two engines, over all parameters.
    """

    method: str
    blocks: tuple[BlockCheck, ...]
    missing: tuple[str, ...]  # trained parameters without a finite gradient of their own shape
    engine_gap: float  # the largest relative difference between the two engines, over all parameters

    @property
    def ok(self) -> bool:
        """Every trained parameter covered and the engines agree to float round-off."""
        return not self.missing and self.engine_gap < 1e-4

    def metrics(self) -> dict[str, float]:
        """The report as flat per-step metrics (``cosine/block0``, ...)."""
        out: dict[str, float] = {}
        for b in self.blocks:
            out[f"cosine/block{b.block}"] = b.cosine
            out[f"norm_ratio/block{b.block}"] = b.norm_ratio
            out[f"guess_cosine/block{b.block}"] = b.guess_cosine
        return out

    def __str__(self) -> str:
        lines = [f"fwdtrans.check {self.method}",
                 f"{'block':>5}  {'cos(est, target)':>16}  {'|est|/|target|':>14}  {'cos(guess, target)':>18}  "
                 f"{'engine gap':>10}"]
        for b in self.blocks:
            lines.append(f"{b.block:>5}  {b.cosine:>16.4f}  {b.norm_ratio:>14.4f}  {b.guess_cosine:>18.4f}  "
                         f"{b.engine_gap:>10.1e}")
        lines.append(f"coverage: {'all trained parameters have finite gradients' if not self.missing else 'MISSING ' + ', '.join(self.missing)}")
        lines.append(f"engines agree to {self.engine_gap:.1e} (relative)")
        return "\n".join(lines)


def _flat(tensors) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _cos(a: Tensor, b: Tensor) -> float:
    denominator = float(a.norm() * b.norm())
    return float((a * b).sum()) / denominator if denominator > 0 else math.nan


def _gap(a: Tensor | None, b: Tensor | None) -> float:
    if a is None or b is None:
        return 0.0 if a is b else math.inf
    scale = float(b.norm())
    return float((a - b).norm()) / scale if scale > 0 else float((a - b).norm())


def check(converted, batch: tuple[Tensor, Tensor], *, verbose: bool = False) -> CheckReport:
    """Run one step of both engines on copies of ``converted`` and report, per block, how the
    estimate compares with the true gradient of its target. ``converted`` is left untouched.

    Examples:
        >>> import torch, fwdtrans
        >>> c = fwdtrans.convert(fwdtrans.models.resnet18(width=4), torch.randn(2, 3, 32, 32), blocks=4,
        ...                      heads="linear")
        >>> report = fwdtrans.check(c, (torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))))
        >>> report.ok
        True
    """
    x, y = batch
    forward, reference = copy.deepcopy(converted), copy.deepcopy(converted)
    reference.method = dataclasses.replace(converted.method, engine="reference")
    state = converted.generator.get_state()
    forward.generator.set_state(state)
    reference.generator.set_state(state)
    forward.compute_gradients(x, y)
    record: dict = {}
    for p in reference.parameters():
        p.grad = None
    _engine.compute_gradients(reference, x, y, record=record)

    gaps = {n: _gap(p.grad, q.grad) for (n, p), (_, q) in zip(forward.named_parameters(), reference.named_parameters())}
    trained = set(dict(forward.blocks.named_parameters(prefix="blocks")))
    if converted.method.trains_heads:
        trained |= set(dict(forward.heads.named_parameters(prefix="heads")))
    missing = tuple(n for n, p in forward.named_parameters()
                    if n in trained and (p.grad is None or p.grad.shape != p.shape or not torch.isfinite(p.grad).all()))

    blocks = []
    for j in range(len(converted.blocks) - 1):
        block_gap = max((gaps[n] for n in gaps if n.startswith(f"blocks.{j}.")), default=0.0)
        if "blocks" not in record:  # backprop or greedy local learning: the target itself
            blocks.append(BlockCheck(j, 1.0, 1.0, 1.0, block_gap))
            continue
        b, estimate = record["blocks"][j], record["estimates"][j]
        if converted.method.space == "weight":
            if not b.target:
                continue
            target, est = _flat(b.target), _flat(estimate)
            guess = sum(_cos(t, v[0]) for t, v in zip(b.target, b.directions)) / len(b.target)
        else:
            target, est = b.target[0], estimate
            m = len(converted.segments[j])  # tensors packed at a multi-tensor cut
            first = b.directions.unflatten(0, (m, -1))[:, 0].sum(0)  # each tensor's first guess, together
            t, v = target.flatten(1), first.flatten(1)
            guess = sum(_cos(t[n], v[n]) for n in range(t.shape[0])) / t.shape[0]
        ratio = float(est.norm() / target.norm()) if float(target.norm()) > 0 else math.nan
        blocks.append(BlockCheck(j, _cos(est, target), ratio, guess, block_gap))
    report = CheckReport(converted.method.describe(), tuple(blocks), missing, max(gaps.values(), default=0.0))
    if verbose:
        print(report)
    return report
