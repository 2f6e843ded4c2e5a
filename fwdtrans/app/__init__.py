"""The application on top of the library: data sets, resumable training runs and the command line.

The core (``fwdtrans``) never imports this package. ``fwdtrans train`` / ``fwdtrans demo`` are
``fwdtrans.app.main``; the same runs from Python:

Example:
    >>> from fwdtrans.app import TrainConfig, train
    >>> summary = train(TrainConfig(width=2, blocks=2, heads="linear", epochs=1, limit=64, batch_size=32))
    >>> sorted(summary["epochs"][0])[:4]
    ['epoch', 'lr', 'seconds', 'step']
"""

from ._batches import batches, num_batches
from ._cli import main
from ._config import TrainConfig
from ._datasets import DATASETS, ImageDataset, load_dataset
from ._loop import evaluate, train
from ._rundir import RunDir, load_checkpoint
from ._schedule import SCHEDULES, lr_factor

__all__ = ["DATASETS", "SCHEDULES", "ImageDataset", "RunDir", "TrainConfig", "batches", "evaluate", "load_checkpoint",
           "load_dataset", "lr_factor", "main", "num_batches", "train"]
