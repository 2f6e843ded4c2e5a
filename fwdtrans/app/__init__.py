"""The application on top of the library: data sets, resumable training runs and the command line.

The core (``fwdtrans``) never imports this package. ``fwdtrans train`` / ``fwdtrans demo`` are
``fwdtrans.app.main``; the same runs from Python:

Example:
    >>> from fwdtrans.app import TrainConfig, train
    >>> summary = train(TrainConfig(width=2, blocks=2, heads="linear", epochs=1, limit=64, batch_size=32))
    >>> sorted(summary["epochs"][0])[:4]
    ['epoch', 'lr', 'seconds', 'step']
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._batches import batches, num_batches
    from ._cli import main
    from ._config import TrainConfig
    from ._datasets import DATASETS, ImageDataset, load_dataset
    from ._loop import evaluate, train
    from ._rundir import RunDir, load_checkpoint
    from ._schedule import SCHEDULES, lr_factor

__all__ = ["DATASETS", "SCHEDULES", "ImageDataset", "RunDir", "TrainConfig", "batches", "evaluate", "load_checkpoint",
           "load_dataset", "lr_factor", "main", "num_batches", "train"]
# each name's module, imported on first use: ``fwdtrans --version`` and ``--help`` import no training code
_MODULES = {"batches": "_batches", "num_batches": "_batches", "main": "_cli", "TrainConfig": "_config",
            "DATASETS": "_datasets", "ImageDataset": "_datasets", "load_dataset": "_datasets", "evaluate": "_loop",
            "train": "_loop", "RunDir": "_rundir", "load_checkpoint": "_rundir", "SCHEDULES": "_schedule",
            "lr_factor": "_schedule"}


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = getattr(importlib.import_module(f".{_MODULES[name]}", __name__), name)
    return value
