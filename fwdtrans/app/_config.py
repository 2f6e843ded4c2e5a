"""A run's configuration: :class:`TrainConfig`, the fields that define a run and their validation."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .._errors import FwdTransError
from .._method import Method
from ..heads import AutoHead, CNNHead, HeadSpec, LinearHead, MLPHead
from ._datasets import DATASETS
from ._group import resolve_device
from ._schedule import SCHEDULES

__all__ = ["EXECUTION_KEYS", "METHOD_KEYS", "TrainConfig"]

# settings that may change when a run resumes: they change how, where or what is logged, not what is trained (and,
# like the number of ranks, sync_batchnorm only changes which samples share BatchNorm's statistics)
EXECUTION_KEYS = ("epochs", "device", "threads", "compile", "checkpoint_every", "diagnostics_every", "tensorboard",
                  "log_every", "data_dir", "sync_batchnorm", "dist_timeout")
_PAPER_SCHEDULE = {"imagenet32": (20, 0.1)}  # (step_size, gamma); the others: (30, 0.2)
_HEADS = ("auto", "cnn", "mlp", "linear")
METHOD_KEYS = tuple(f.name for f in fields(Method))  # the method's fields, flat in config.json, studies and flags


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run; recorded in its ``config.json`` and summary.

    Model: ``width`` scales the ResNet-18 (64 = the paper's); ``blocks=8`` and ``16`` are the
    paper's cuts (16: no skip connections); ``heads="auto"`` sizes each head to 10% of its
    block's FLOPs, and ``head_width=None`` scales the paper's CNN/MLP widths (32/1024 for 8 blocks,
    16/512 for 16 blocks, at width 64) with ``width``. ``method``: a [`fwdtrans.Method`][fwdtrans.Method];
    recorded flat (:meth:`to_dict`, :meth:`from_dict`: ``guess="local"`` beside ``width=16``), as
    studies and the command line's flags set it. Data: ``dataset`` read from ``data_dir`` (``None``: the
    CIFAR-10 subset shipped with fwdtrans), the first ``limit`` training images (0: all).
    Optimisation: SGD; ``schedule="step"`` multiplies the rate by ``gamma`` every ``step_size``
    epochs (``None``: the paper's, 30 and 0.2, ImageNet32 20 and 0.1). Execution (may differ when
    a run resumes): ``device`` (``"auto"``: CUDA when available), ``threads``, ``compile``,
    ``checkpoint_every`` steps, ``diagnostics_every`` steps (per-block cosines, Eq. 6),
    ``tensorboard``, ``log_every`` (seconds between progress lines without a progress bar; 0: none);
    under ``torchrun`` (several ranks): ``sync_batchnorm`` (BatchNorm statistics over every rank's share of
    the batch) and ``dist_timeout`` (seconds a rank waits for the others).
    ``probe_epochs``: after training, fresh heads are trained that many epochs on the frozen network's
    block outputs, for per-block losses of methods that train no heads (the paper's Figure 2).

    Example:
        >>> TrainConfig(width=4, blocks=2, epochs=1).validate().schedule
        'step'
        >>> TrainConfig.from_dict({"width": 4, "guess": "ntk"}).method.guess
        'ntk'
    """

    model: str = "resnet18"
    width: int = 16
    blocks: int = 8
    heads: str = "auto"
    head_width: int | None = None
    method: Method = field(default_factory=Method)
    dataset: str = "cifar10"
    data_dir: str | None = None
    limit: int = 0
    augment: bool = True
    epochs: int = 3
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"
    step_size: int | None = None
    gamma: float | None = None
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    compile: bool = False
    checkpoint_every: int = 0
    diagnostics_every: int = 0
    tensorboard: bool = False
    log_every: float = 30.0
    sync_batchnorm: bool = False
    dist_timeout: float = 300.0
    probe_epochs: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The config as ``config.json`` and the summary record it: flat, the method's fields in its place."""
        out: dict[str, Any] = {}
        for f in fields(self):
            out.update(self.method.to_dict() if f.name == "method" else {f.name: getattr(self, f.name)})
        return out

    def to_record(self) -> dict[str, Any]:
        """:meth:`to_dict` as run directories and studies record it: ``data_dir`` by the folder's name alone, so that
        shared or published run files carry no path of the machine that wrote them."""
        return {**self.to_dict(), **({"data_dir": Path(self.data_dir).resolve().name} if self.data_dir else {})}

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any]) -> TrainConfig:
        """A config from flat settings (:meth:`to_dict`'s form): the method's fields make its ``method``."""
        method = {k: v for k, v in settings.items() if k in METHOD_KEYS}
        rest = {k: v for k, v in settings.items() if k not in METHOD_KEYS}
        if "method" in rest and method:
            raise FwdTransError(f"method= and the method field(s) {', '.join(method)}: give the method one way.")
        return cls(**rest) if "method" in rest else cls(**rest, method=Method(**method))

    def validate(self) -> TrainConfig:
        """Refuse a bad value before anything runs; return the config with the paper's schedule
        filled in for the data set where ``step_size``/``gamma`` are ``None``."""
        checks = [
            (self.model == "resnet18", "model", "the CLI trains resnet18; use fwdtrans.convert for other models"),
            (self.width >= 1, "width", "use a positive integer"),
            (self.blocks >= 2, "blocks", "use at least 2 (one block has no cut)"),
            (self.heads in _HEADS, "heads", f"use one of {', '.join(_HEADS)}"),
            (self.head_width is None or self.head_width >= 1, "head_width", "use a positive integer"),
            (self.dataset in DATASETS, "dataset", f"use one of {', '.join(DATASETS)}"),
            (self.limit >= 0, "limit", "use 0 (all images) or a positive count"),
            (self.epochs >= 1, "epochs", "use at least 1"),
            (self.batch_size >= 1, "batch_size", "use at least 1"),
            (math.isfinite(self.lr) and self.lr > 0, "lr", "use a positive learning rate"),
            (0 <= self.momentum < 1, "momentum", "use a value in [0, 1)"),
            (self.weight_decay >= 0, "weight_decay", "use a value >= 0"),
            (self.schedule in SCHEDULES, "schedule", f"use one of {', '.join(SCHEDULES)}"),
            (self.step_size is None or self.step_size >= 1, "step_size", "use at least 1 epoch"),
            (self.gamma is None or 0 < self.gamma <= 1, "gamma", "use a value in (0, 1]"),
            (self.threads is None or self.threads >= 1, "threads", "use at least 1"),
            (self.checkpoint_every >= 0, "checkpoint_every", "use 0 (end of each epoch only) or a step count"),
            (self.diagnostics_every >= 0, "diagnostics_every", "use 0 (off) or a step count"),
            (math.isfinite(self.log_every) and self.log_every >= 0, "log_every", "use 0 (one line per epoch) or "
             "a number of seconds"),
            (self.probe_epochs >= 0, "probe_epochs", "use 0 (off) or an epoch count"),
            (math.isfinite(self.dist_timeout) and self.dist_timeout > 0, "dist_timeout", "use a positive number of "
             "seconds"),
        ]
        for ok, key, fix in checks:
            if not ok:
                raise FwdTransError(f"{key}={getattr(self, key)!r} is not valid: {fix}.")
        if not isinstance(self.method, Method):
            raise FwdTransError(f"method={self.method!r} is not valid: use a fwdtrans.Method.")
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise FwdTransError("tensorboard=True needs the tensorboard package. Fix: pip install tensorboard, or "
                                "leave it off (metrics.jsonl is always written).")
        resolve_device(self.device)
        step_size, gamma = _PAPER_SCHEDULE.get(self.dataset, (30, 0.2))
        return dataclasses.replace(self, step_size=self.step_size or step_size,
                                   gamma=self.gamma if self.gamma is not None else gamma)

    def head_spec(self) -> HeadSpec:
        scale = self.width / 64
        if self.heads == "cnn":
            return CNNHead(width=self.head_width or max(4, round((16 if self.blocks == 16 else 32) * scale)))
        if self.heads == "mlp":
            return MLPHead(width=self.head_width or max(16, round((512 if self.blocks == 16 else 1024) * scale)))
        return LinearHead() if self.heads == "linear" else AutoHead()

