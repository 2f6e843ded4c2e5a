"""The training loop behind ``fwdtrans train``: data, model, method, epochs, an atomic JSON summary."""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from ._converted import Converted, convert
from ._data import ImageDataset, batches, load_cifar10, num_batches
from ._errors import FwdTransError
from ._method import Method
from .heads import AutoHead, CNNHead, HeadSpec, LinearHead, MLPHead
from .models import resnet18

__all__ = ["TrainConfig", "evaluate", "train", "write_json"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run; recorded in its summary.

    ``heads="auto"`` sizes each head to 10% of its block's FLOPs; for ``"cnn"``/``"mlp"``,
    ``head_width=None`` scales the paper's widths (CNN 32, MLP 1024 for width-64 models) with ``width``.
    """

    model: str = "resnet18"
    width: int = 16
    blocks: int = 8
    heads: str = "auto"
    head_width: int | None = None
    target: str = "global"
    guess: str = "local"
    space: str = "activity"
    granularity: str = "tensor"
    tangents: int = 1
    aggregation: str = "mean"
    per_sample: str = "by-loss"
    engine: str = "forward"
    streams: str = "per-block"
    recompute: bool = False
    compile: bool = False
    epochs: int = 3
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = True
    seed: int = 0
    data_dir: str | None = None
    threads: int | None = None
    extra: dict = field(default_factory=dict)

    def head_spec(self) -> HeadSpec:
        scale = self.width / 64
        if self.heads == "cnn":
            return CNNHead(width=self.head_width or max(4, round(32 * scale)))
        if self.heads == "mlp":
            return MLPHead(width=self.head_width or max(16, round(1024 * scale)))
        if self.heads == "linear":
            return LinearHead()
        if self.heads == "auto":
            return AutoHead()
        raise FwdTransError(f"--heads {self.heads!r}: use cnn, mlp or linear.")


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Write ``data`` as JSON atomically (a temporary file in the same folder, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on uint8 images ``x``; restores the training flag."""
    was_training = model.training
    model.eval()
    correct = 0
    for xb, yb in batches(x, y, batch_size, shuffle=False, augment=False):
        correct += int((model(xb).argmax(-1) == yb).sum())
    model.train(was_training)
    return correct / max(len(y), 1)


def _build(config: TrainConfig, data: ImageDataset) -> Converted:
    if config.model != "resnet18":
        raise FwdTransError(f"--model {config.model!r}: the CLI ships resnet18; use fwdtrans.convert for others.")
    # the paper's settings: 8 blocks = one residual block each, 16 blocks = one layer each, no skips
    model = resnet18(num_classes=len(data.classes), width=config.width, skip=config.blocks != 16)
    blocks = model.paper_cuts() if config.blocks in (8, 16) else config.blocks
    method = {f.name: getattr(config, f.name) for f in fields(Method)}  # the run's method options
    return convert(model, data.train_x[:2].float(), blocks=blocks, heads=config.head_spec(), seed=config.seed, **method)


def train(config: TrainConfig, *, out: str | os.PathLike | None = None,
          progress: Callable | None = None) -> dict:
    """Train with ``config`` and return the summary (also written to ``out`` as JSON when given).

    ``progress`` wraps the batch iterator (e.g. ``functools.partial(tqdm, desc=...)``).

    Example:
        >>> summary = train(TrainConfig(width=4, blocks=2, epochs=1, extra={"limit": 128}))  # doctest: +SKIP
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    data = load_cifar10(config.data_dir)
    limit = int(config.extra.get("limit", 0)) or len(data.train_y)
    train_x, train_y = data.train_x[:limit], data.train_y[:limit]
    converted = _build(config, data)
    optimizer = torch.optim.SGD(converted.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    steps = config.epochs * num_batches(len(train_y), config.batch_size, drop_last=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    step = converted.train_step(optimizer, compile=config.compile)
    generator = torch.Generator().manual_seed(config.seed)
    history = []
    start = time.perf_counter()
    step_seconds = []  # per training step (evaluation excluded)
    for epoch in range(config.epochs):
        converted.train()
        it = batches(train_x, train_y, config.batch_size, shuffle=True, augment=config.augment,
                     generator=generator, drop_last=True)
        if progress is not None:
            it = progress(it, total=num_batches(len(train_y), config.batch_size, True), desc=f"epoch {epoch + 1}")
        losses = []
        for xb, yb in it:
            tick = time.perf_counter()
            loss = float(step(xb, yb)["loss"])
            step_seconds.append(time.perf_counter() - tick)
            losses.append(loss)
            schedule.step()
            if progress is not None and hasattr(it, "set_postfix"):
                it.set_postfix(loss=f"{loss:.3f}")
        history.append({"epoch": epoch + 1, "train_loss": sum(losses) / len(losses),
                        "test_accuracy": evaluate(converted, data.test_x, data.test_y),
                        "seconds": time.perf_counter() - start})
    summary = {
        "config": asdict(config),
        "method": converted.method.to_dict(),
        "cuts": list(converted.cut_names),
        "dataset": {"name": data.name, "train": len(train_y), "test": len(data.test_y)},
        "epochs": history,
        "test_accuracy": history[-1]["test_accuracy"] if history else None,
        # the first step pays one-off costs (with --compile: the compilation), reported on its own
        "first_step_seconds": step_seconds[0] if step_seconds else None,
        "seconds_per_step": sum(step_seconds[1:]) / (len(step_seconds) - 1) if len(step_seconds) > 1
        else sum(step_seconds) / max(len(step_seconds), 1),
        "seconds": time.perf_counter() - start,
        "versions": {"fwdtrans": __import__("fwdtrans").__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
    }
    if out is not None:
        write_json(out, summary)
    return summary
