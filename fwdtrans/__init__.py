"""fwdtrans: train any PyTorch model with forward gradients (Fournier et al., ICML 2023).

Example:
    >>> import torch, fwdtrans
    >>> model = fwdtrans.models.resnet18(width=8)
    >>> converted = fwdtrans.convert(model, torch.randn(2, 3, 32, 32), blocks=4, heads="linear",
    ...                              target="global", guess="local", space="activity")
    >>> step = converted.train_step(torch.optim.SGD(converted.parameters(), lr=0.05))
    >>> metrics = step(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
"""

from . import heads, models
from ._check import BlockCheck, CheckReport, check
from ._converted import Converted, convert
from ._errors import FwdTransError
from ._inspect import CutReport, inspect
from ._method import Cost, Method

__version__ = "0.1.0"
__all__ = [
    "BlockCheck", "CheckReport", "Converted", "Cost", "CutReport", "FwdTransError", "Method", "check", "convert",
    "heads", "inspect", "models",
]
