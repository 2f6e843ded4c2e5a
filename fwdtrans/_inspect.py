"""``inspect``: list where a model can be cut, with the cost of each segment."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import Tensor, nn

from ._cuts import CutPoint, find_cut_points
from ._trace import trace

__all__ = ["CutReport", "inspect"]


@dataclass(frozen=True)
class CutReport:
    """The candidate cut points of a model; ``print`` it for a table."""

    model: str
    points: tuple[CutPoint, ...]
    total_flops: int
    total_params: int

    @property
    def names(self) -> list[str]:
        """The primary name of every cut point, in order (valid entries for ``blocks=[...]``)."""
        return [p.name for p in self.points]

    def __str__(self) -> str:
        rows = [("cut after", "output shape", "params", "FLOPs", "cum. FLOPs")]
        cum = 0
        for p in self.points:
            cum += p.flops
            rows.append((p.name, "x".join(map(str, p.shape[1:])), f"{p.params:,}", f"{p.flops:,}",
                         f"{cum / max(self.total_flops, 1):.0%}"))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = [f"{self.model}: {len(self.points)} cut points, {self.total_params:,} params, "
                 f"{self.total_flops:,} forward FLOPs"]
        lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                  for r in rows]
        return "\n".join(lines)


def inspect(
    model: nn.Module,
    example_inputs: tuple[Tensor, ...] | Tensor,
    *,
    leaf_modules: Iterable[type] = (),
    autowrap_functions: Iterable[Callable] = (),
) -> CutReport:
    """List the points where ``model`` can be cut into blocks.

    Each row gives the name to pass in ``convert(..., blocks=[...])``, the per-sample output shape
    there, and the parameters and forward FLOPs (on ``example_inputs``) since the previous point.

    Example:
        >>> import torch, fwdtrans
        >>> report = fwdtrans.inspect(fwdtrans.models.resnet18(width=8), torch.randn(1, 3, 32, 32))
        >>> report.names[:3]
        ['stem', 'layer1.0', 'layer1.1']
    """
    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    traced = trace(model, tuple(example_inputs), leaf_modules=leaf_modules, autowrap_functions=autowrap_functions)
    return CutReport(
        type(model).__name__,
        tuple(find_cut_points(traced)),
        sum(i.flops for i in traced.info.values()),
        sum(i.params for i in traced.info.values()),
    )
