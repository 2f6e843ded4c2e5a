"""``check``: compare a converted model's estimates with the true gradients, block by block."""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ._spaces import space_for

if TYPE_CHECKING:
    from ._converted import Converted

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
            (activity space) or parameter tensors (weight space; a tensor whose target is round-off next to
            the block's, such as a bias before BatchNorm, has no direction and is left out).
        engine_gap: the largest difference between the engines' gradients of one of the block's parameters,
            relative to the norm of the block's whole gradient (reference engine).
    """

    block: int
    cosine: float  # cos(estimate, target gradient), in the method's space
    norm_ratio: float  # |estimate| / |target gradient|
    guess_cosine: float  # the paper's Eq. 6: cos(guess, target), averaged over samples (activity) or tensors
    engine_gap: float  # max over the block's tensors of |forward - reference| / |block's reference gradient|


@dataclass(frozen=True)
class CheckReport:
    """What [`check`][fwdtrans.check] found; ``print`` it for a table.

    Engine gaps are scale-aware: a tensor's difference between the engines is measured relative to
    the norm of its block's (or head's) whole gradient, so a tensor whose true gradient is round-off
    (a convolution bias followed by BatchNorm) cannot make a healthy model look broken.

    Attributes:
        method: the method's description, e.g. ``(target=global, guess=local, space=activity)``.
        blocks: one [`BlockCheck`][fwdtrans.BlockCheck] per block but the last.
        missing: trained parameters without a finite gradient of their own shape.
        engine_gap: the largest engine gap over all parameters (blocks and heads).
        worst: the parameter with that gap (``""`` when the engines agree exactly).
        tolerance: the largest gap ``ok`` accepts: the square root of the parameters' dtype's machine epsilon
            (``3.5e-4`` in float32, ``1.5e-8`` in float64): a bug makes the engines differ by far more.
    """

    method: str
    blocks: tuple[BlockCheck, ...]
    missing: tuple[str, ...]  # trained parameters without a finite gradient of their own shape
    engine_gap: float  # the largest engine gap over all parameters
    worst: str  # the parameter with the largest engine gap
    tolerance: float  # the largest engine gap `ok` accepts

    @property
    def ok(self) -> bool:
        """Every trained parameter covered and the engines agree to ``tolerance``."""
        return not self.missing and self.engine_gap <= self.tolerance

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
        covered = "all trained parameters have finite gradients"
        lines.append(f"coverage: {'MISSING ' + ', '.join(self.missing) if self.missing else covered}")
        verdict = "agree to" if self.engine_gap <= self.tolerance else f"DISAGREE (tolerance {self.tolerance:.1e}) by"
        lines.append(f"engines {verdict} {self.engine_gap:.1e} of their block's gradient"
                     + (f" (worst: {self.worst})" if self.worst else ""))
        return "\n".join(lines)


def _cos(a: Tensor, b: Tensor) -> float:
    denominator = float(a.norm() * b.norm())
    return float((a * b).sum()) / denominator if denominator > 0 else math.nan


def _gaps(forward: nn.Module, reference: nn.Module) -> dict[str, float]:
    """Per parameter: ``|forward - reference|`` relative to the norm of its block's (head's) whole reference
    gradient; 0 if neither engine gives it a gradient, inf if only one does."""
    pairs = {n: (p.grad, q.grad)
             for (n, p), (_, q) in zip(forward.named_parameters(), reference.named_parameters(), strict=True)}
    unit = {n: ".".join(n.split(".")[:2]) for n in pairs}  # blocks.{j} or heads.{j}
    squares: dict[str, float] = {}
    for n, (_, b) in pairs.items():
        squares[unit[n]] = squares.get(unit[n], 0.0) + (float(b.norm()) ** 2 if b is not None else 0.0)
    gaps = {}
    for n, (a, b) in pairs.items():
        if a is None or b is None:
            gaps[n] = 0.0 if a is b else math.inf
        else:
            gaps[n] = float((a - b).norm()) / (math.sqrt(squares[unit[n]]) or 1.0)
    return gaps


def check(converted: Converted, batch: tuple[Any, Tensor], *, verbose: bool = False) -> CheckReport:
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
    device = next((p.device for p in converted.parameters()), torch.device("cpu"))
    devices = [] if device.type == "cpu" else [device]
    with torch.random.fork_rng(devices, device_type=device.type):  # both engines draw the same dropout masks
        # on copies, on this process's batch alone: the caller's mode is the caller's business
        forward.compute_gradients(x, y, allow_eval=True, distributed=False)
    record: dict = {}
    reference._gradients(x, y, record=record)

    gaps = _gaps(forward, reference)
    trained = {n for n, p in forward.blocks.named_parameters(prefix="blocks") if p.requires_grad}  # frozen: no grad
    if converted.method.trains_heads:
        trained |= {n for n, p in forward.heads.named_parameters(prefix="heads") if p.requires_grad}
    missing = tuple(n for n, p in forward.named_parameters()
                    if n in trained and (p.grad is None or p.grad.shape != p.shape or not torch.isfinite(p.grad).all()))

    blocks = []
    space = space_for(converted.method)
    for j in range(len(converted.blocks) - 1):
        block_gap = max((gaps[n] for n in gaps if n.startswith(f"blocks.{j}.")), default=0.0)
        if "blocks" not in record:  # backprop or greedy local learning: the target itself
            blocks.append(BlockCheck(j, 1.0, 1.0, 1.0, block_gap))
            continue
        aligned = space.alignment(record["blocks"][j], record["estimates"][j], converted.segments[j])
        if aligned is None:  # nothing estimated in this block
            continue
        target, est, pairs = aligned
        guess = sum(_cos(t, v) for t, v in pairs) / len(pairs) if pairs else math.nan
        ratio = float(est.norm() / target.norm()) if float(target.norm()) > 0 else math.nan
        blocks.append(BlockCheck(j, _cos(est, target), ratio, guess, block_gap))
    worst = max(gaps, key=gaps.__getitem__, default="")
    worst = worst if gaps.get(worst) else ""
    dtype = next(converted.parameters()).dtype if gaps else torch.float32
    report = CheckReport(converted.method.describe(), tuple(blocks), missing, gaps.get(worst, 0.0), worst,
                         torch.finfo(dtype).eps ** 0.5)
    if verbose:
        print(report)
    return report
