"""``check``: compare a converted model's estimates with the true gradients, block by block."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _step
from ._blocks import as_inputs, call, replaying, rng_state
from ._engine import space_for
from ._method import Method, on_reference


class Checked(_step.Stepped, Protocol):
    """What ``check`` reads of a converted model (``Converted`` is one), besides what a step does."""

    heads: nn.ModuleList

    @property
    def segments(self) -> tuple[tuple[int, ...], ...]: ...

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
            (activity space) or parameter tensors (weight space; a tensor whose target or guess is round-off next
            to the block's, such as a bias before BatchNorm, has no direction and is left out).
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
        backprop_gap: the largest difference between the step's backprop (``guess="global"``, block by block,
            a parameter used in several blocks summed over its uses) and plain autograd of the global loss
            through the whole model, relative to the norm of the block's whole true gradient: an error that
            both engines share (how gradients are gathered into ``p.grad``) shows here.
        backprop_worst: the parameter with that gap (``""`` when they agree exactly).
    """

    method: str
    blocks: tuple[BlockCheck, ...]
    missing: tuple[str, ...]  # trained parameters without a finite gradient of their own shape
    engine_gap: float  # the largest engine gap over all parameters
    worst: str  # the parameter with the largest engine gap
    tolerance: float  # the largest engine gap `ok` accepts
    backprop_gap: float = 0.0  # the step's backprop against autograd through the whole model
    backprop_worst: str = ""  # the parameter with the largest backprop gap

    @property
    def ok(self) -> bool:
        """Every trained parameter covered, the engines agree to ``tolerance``, and so do the step's backprop and
        autograd through the whole model."""
        return not self.missing and max(self.engine_gap, self.backprop_gap) <= self.tolerance

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
        verdict = "agrees to" if self.backprop_gap <= self.tolerance else "DISAGREES by"
        lines.append(f"backprop {verdict} {self.backprop_gap:.1e} with autograd through the whole model"
                     + (f" (worst: {self.backprop_worst})" if self.backprop_worst else ""))
        return "\n".join(lines)


def _cos(a: Tensor, b: Tensor) -> float:
    denominator = float(a.norm() * b.norm())
    return float((a * b).sum()) / denominator if denominator > 0 else math.nan


def _gaps(pairs: dict[str, tuple[Tensor | None, Tensor | None]]) -> dict[str, float]:
    """Per parameter, from its pair ``(a, b)`` of gradients: ``|a - b|`` relative to the norm of its block's
    (head's) whole gradient ``b``; 0 if neither is given, inf if only one is."""
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


def _engine_pairs(forward: Checked, reference: Checked) -> dict[str, tuple[Tensor | None, Tensor | None]]:
    return {n: (p.grad, q.grad)
            for (n, p), (_, q) in zip(forward.named_parameters(), reference.named_parameters(), strict=True)}


def _backprop_pairs(model: Checked, x: Any, y: Tensor) -> dict[str, tuple[Tensor | None, Tensor | None]]:
    """Per trained block parameter (each once): the step's backprop (``guess="global"``) and the gradient of the
    global loss through the whole ``model`` (a copy, which this changes) as one function of its parameters, each
    passed once (``torch.func.grad``, under which dropout draws the step's masks)."""
    model.method = Method(target="global", guess="global")
    params: dict[str, Tensor] = {n: p for n, p in model.blocks.named_parameters(prefix="blocks") if p.requires_grad}
    buffers = dict(model.named_buffers())

    def loss(p: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(call(cast(nn.Module, model), p, buffers, *as_inputs(x))[0], y)

    rng = rng_state()
    with replaying(rng):
        _step.run(model, as_inputs(x), y)
    with replaying(rng), torch.no_grad():  # torch.func.grad differentiates on its own
        true = torch.func.grad(loss)(params)
    return {n: (p.grad, true[n]) for n, p in params.items()}


def check(converted: Checked, batch: tuple[Any, Tensor], *, verbose: bool = False) -> CheckReport:
    """Run one step of both engines on copies of ``converted`` and report, per block, how the
    estimate compares with the true gradient of its target; then compare the step's backprop with autograd
    through the whole model (``backprop_gap``). ``converted`` is left untouched.

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
    reference.method = on_reference(converted.method)
    state = converted.generator.get_state()
    forward.generator.set_state(state)
    reference.generator.set_state(state)
    device = next((p.device for p in converted.parameters()), torch.device("cpu"))
    devices = [] if device.type == "cpu" else [device]
    with torch.random.fork_rng(devices, device_type=device.type):  # both engines draw the same dropout masks
        # on copies, on this process's batch alone: the caller's mode is the caller's business
        _step.check_step(forward, as_inputs(x), y, allow_eval=True)
        _step.run(forward, as_inputs(x), y)
    record: dict = {}
    _step.run(reference, as_inputs(x), y, record=record)

    gaps = _gaps(_engine_pairs(forward, reference))
    backprop = _gaps(_backprop_pairs(reference, x, y))
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
    backprop_worst = max(backprop, key=backprop.__getitem__, default="")
    backprop_worst = backprop_worst if backprop.get(backprop_worst) else ""
    dtype = next(converted.parameters()).dtype if gaps else torch.float32
    report = CheckReport(converted.method.describe(), tuple(blocks), missing, gaps.get(worst, 0.0), worst,
                         torch.finfo(dtype).eps ** 0.5, backprop.get(backprop_worst, 0.0), backprop_worst)
    if verbose:
        print(report)
    return report
