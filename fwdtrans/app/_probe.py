"""Probes: per-block losses of fresh heads trained on a trained network's frozen block outputs (the paper's Figure 2,
for methods that train no heads)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import fwdtrans

from ._batches import batches, epoch_generator
from ._config import TrainConfig
from ._datasets import ImageDataset

__all__ = ["probe"]


def probe(converted: fwdtrans.Converted, config: TrainConfig, data: ImageDataset, train_set, test_set) -> dict:
    """Per-block losses of fresh heads trained on the frozen, detached block outputs (eval mode):
    ``probe_train_loss/head{j}`` (the last probe epoch's mean) and ``probe_test_loss/head{j}``.
    The network is not touched and the run's random state is left as it was."""
    devices = [train_set[0].device] if train_set[0].device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        heads = copy.deepcopy(converted.heads).train()
        for m in heads.modules():
            if m is not heads and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        optimizer = torch.optim.SGD(heads.parameters(), lr=0.05, momentum=0.9, weight_decay=config.weight_decay)
        converted.eval()
        out: dict[str, float] = {}
        for epoch in range(config.probe_epochs):
            sums = torch.zeros(len(heads))
            count = 0
            for xb, yb in batches(*train_set, config.batch_size, mean=data.mean, std=data.std, shuffle=True,
                                  augment=config.augment and data.augment, drop_last=True,
                                  generator=epoch_generator(config.seed + 1, epoch)):
                losses = torch.stack([F.cross_entropy(head(h), yb)
                                      for head, h in zip(heads, _features(converted, xb), strict=True)])
                optimizer.zero_grad()
                losses.sum().backward()
                optimizer.step()
                sums += losses.detach().cpu()
                count += 1
            out = {f"probe_train_loss/head{j}": float(v) / count for j, v in enumerate(sums)}
        heads.eval()
        tests = torch.zeros(len(heads))
        with torch.no_grad():
            for xb, yb in batches(*test_set, 500, mean=data.mean, std=data.std, shuffle=False, augment=False):
                tests += torch.stack([F.cross_entropy(head(h), yb, reduction="sum")
                                      for head, h in zip(heads, _features(converted, xb), strict=True)]).cpu()
        converted.train()
    return {**out, **{f"probe_test_loss/head{j}": float(v) / len(test_set[1]) for j, v in enumerate(tests)}}


@torch.no_grad()
def _features(converted: fwdtrans.Converted, x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of every block but the last."""
    h, out = (x,), []
    for block in converted.blocks[:-1]:
        h = (block(*h),)
        out.append(h[0])
    return out
