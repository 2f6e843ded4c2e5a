"""``inspect``: list where a model can be cut, with the cost of each segment."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ._blocks import as_inputs
from ._cost import of_blocks
from ._cuts import CutPoint, block_costs, choose_cuts, find_cut_points, split
from ._errors import FwdTransError
from ._method import Cost, Method
from ._trace import trace
from .heads import HeadSpec, build_cut_head, check_head_keys, head_flops

__all__ = ["CutReport", "inspect"]


@dataclass(frozen=True)
class CutReport:
    """The candidate cut points of a model; ``print`` it for a table.

    Attributes:
        model: the model's class name.
        points: every cut point, in the order the model computes them.
        total_flops: forward FLOPs of the model on the example inputs.
        total_params: parameters of the model.
        plan: with ``blocks=...``: per block, its cost and its head's (FLOPs per sample).
        method: with ``method=...``: the method the cost is predicted for.
        cost: with ``method=...``: its tangent streams per step and the predicted step time of each
            engine, in forward passes ([`fwdtrans.Cost`][fwdtrans.Cost]).
    """

    model: str
    points: tuple[CutPoint, ...]
    total_flops: int
    total_params: int
    plan: tuple[dict, ...] = ()  # with blocks=...: per block, its cost and its head's (FLOPs per sample)
    method: Method | None = None
    cost: Cost | None = None

    @property
    def names(self) -> list[str]:
        """The primary name of every cut point, in order (valid entries for ``blocks=[...]``)."""
        return [p.name for p in self.points]

    def __str__(self) -> str:
        rows: list[tuple[str, ...]] = [("cut after", "output shape", "params", "FLOPs", "cum. FLOPs")]
        cum = 0
        for p in self.points:
            cum += p.flops
            rows.append((p.name, " + ".join("x".join(map(str, s)) for s in p.shapes), f"{p.params:,}", f"{p.flops:,}",
                         f"{cum / max(self.total_flops, 1):.0%}"))
        lines = [f"{self.model}: {len(self.points)} cut points, {self.total_params:,} params, "
                 f"{self.total_flops:,} forward FLOPs"]
        lines += _table(rows)
        if self.plan:
            lines.append("plan (FLOPs per sample):")
            plan: list[tuple[str, ...]] = [("block", "ends after", "FLOPs", "params", "head", "head FLOPs",
                                            "head/block")]
            plan += [(str(r["block"]), r["ends_after"], f"{r['flops']:,}", f"{r['params']:,}", r["head"],
                      f"{r['head_flops']:,}", f"{r['head_ratio']:.1%}" if r["head"] != "-" else "-") for r in self.plan]
            lines += _table(plan)
        if self.method is not None and self.cost is not None:
            lines.append(f"method {self.method.describe()}: {self.cost}")
        return "\n".join(lines)


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i <= 1 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=False)))
            for r in rows]


def inspect(
    model: nn.Module,
    example_inputs: tuple[Tensor, ...] | Tensor,
    *,
    blocks: int | list[str] | None = None,
    heads: HeadSpec = "auto",
    balance: str = "flops",
    multi_tensor: bool = False,
    leaf_modules: Iterable[type] = (),
    autowrap_functions: Iterable[Callable] = (),
    concrete_args: dict | None = None,
    method: Method | None = None,
    batch: int | None = None,
) -> CutReport:
    """List the points where ``model`` can be cut into blocks.

    Each row gives the name to pass in ``convert(..., blocks=[...])``, the per-sample output shape
    there, and the parameters and forward FLOPs (on ``example_inputs``) since the previous point.
    With ``blocks`` (and ``heads``, ``balance`` as in [`fwdtrans.convert`][fwdtrans.convert]) the report also
    shows the plan ``convert`` would make: each block's cost and its head's FLOPs relative to it.
    ``multi_tensor=True`` also lists the points several tensors cross (their shapes joined by ``+``).
    With ``blocks`` and ``method`` (a [`fwdtrans.Method`][fwdtrans.Method]) it also predicts one step's cost
    (``report.cost``): the tangent streams the forward engine propagates and the time of a step with each
    engine, in forward passes and as a ratio to backprop, for a batch of ``batch`` samples (default: that of
    ``example_inputs``; the per-sample methods' streams grow with it).

    Examples:
        >>> import torch, fwdtrans
        >>> report = fwdtrans.inspect(fwdtrans.models.resnet18(width=8), torch.randn(1, 3, 32, 32))
        >>> report.names[:3]
        ['stem.0', 'stem.1', 'stem']
    """
    step_batch = batch  # the plan's rows below use ``batch`` for the example inputs'
    traced = trace(model, as_inputs(example_inputs), leaf_modules=leaf_modules, autowrap_functions=autowrap_functions,
                   concrete_args=concrete_args)
    plan: tuple[dict[str, Any], ...] = ()
    if blocks is not None:
        cuts = choose_cuts(traced, blocks, balance, multi_tensor)
        check_head_keys(heads, cuts)
        batch = traced.batch
        num_classes = traced.output_shape[-1]
        rows = []
        for j, cost in enumerate(block_costs(traced, cuts)):
            row: dict[str, Any] = {"block": j, "ends_after": cuts[j].name if j < len(cuts) else "(output)",
                   "flops": cost["flops"] // batch, "params": cost["params"], "head": "-", "head_flops": 0,
                   "head_ratio": 0.0}
            if j < len(cuts):
                shape = cuts[j].shape[1:]
                head = build_cut_head(heads, cuts[j].shapes, num_classes, name=cuts[j].name, block_flops=row["flops"],
                                      aliases=cuts[j].aliases)
                row["head"] = _describe(head)
                row["head_flops"] = head_flops(head, shape)
                row["head_ratio"] = row["head_flops"] / max(row["flops"], 1)
            rows.append(row)
        plan = tuple(rows)
    predicted: Cost | None = None
    if method is not None:
        if blocks is None:
            raise FwdTransError("inspect(..., method=...) predicts the cost of a step on the blocks it cuts: pass "
                                "blocks= too.")
        modules = split(traced, cuts)
        built = [build_cut_head(heads, c.shapes, traced.output_shape[-1], name=c.name,
                                block_flops=r["flops"], aliases=c.aliases) for c, r in zip(cuts, plan, strict=False)]
        predicted = of_blocks(method, modules, built, cuts, block_costs(traced, cuts), traced.batch,
                         step_batch or traced.batch)
    return CutReport(
        type(model).__name__,
        tuple(find_cut_points(traced, multi_tensor)),
        sum(i.flops for i in traced.info.values()),
        sum(i.params for i in traced.info.values()),
        plan,
        method,
        predicted,
    )


def _describe(head: nn.Module) -> str:
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if convs:
        return f"cnn(width={convs[0].out_channels})"
    if len(linears) > 1:
        return f"mlp(width={linears[0].out_features})"
    return "linear" if linears else type(head).__name__
