"""fwdtrans: train any PyTorch model with forward gradients (Fournier et al., ICML 2023).

Example:
    >>> import torch, fwdtrans
    >>> model = fwdtrans.models.resnet18(width=8)
    >>> converted = fwdtrans.convert(model, torch.randn(2, 3, 32, 32), blocks=4, heads="linear",
    ...                              target="global", guess="local", space="activity")
    >>> step = converted.train_step(torch.optim.SGD(converted.parameters(), lr=0.05))
    >>> metrics = step(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import heads, models
    from ._check import BlockCheck, CheckReport, check
    from ._convert import convert
    from ._converted import Converted
    from ._errors import FwdTransError
    from ._inspect import CutReport, inspect
    from ._method import Cost, Method

__version__ = "0.1.0"
__all__ = [
    "BlockCheck", "CheckReport", "Converted", "Cost", "CutReport", "FwdTransError", "Method", "check", "convert",
    "heads", "inspect", "models",
]

# where each public name lives; imported on first use, so that `fwdtrans --version` and `--help` need no torch
_HOMES = {"BlockCheck": "_check", "CheckReport": "_check", "check": "_check", "Converted": "_converted",
          "convert": "_convert", "Cost": "_method", "Method": "_method", "CutReport": "_inspect",
          "inspect": "_inspect", "FwdTransError": "_errors", "heads": "heads", "models": "models"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'fwdtrans' has no attribute {name!r}")
    module = importlib.import_module(f".{_HOMES[name]}", __name__)
    value = module if name in ("heads", "models") else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
