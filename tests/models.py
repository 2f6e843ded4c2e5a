"""Hypothesis strategies that generate small fx-traceable models, and autograd references."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import assume
from hypothesis import strategies as st
from torch import nn

import fwdtrans


class FunctionalBatchNorm(nn.BatchNorm2d):
    """A BatchNorm written as timm's ``BatchNormAct2d`` is: ``F.batch_norm(..., self.training)``, traced through,
    counting its batches in Python."""

    def forward(self, x):
        if self.training:
            self.num_batches_tracked.add_(1)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                            self.momentum, self.eps)


def _norm(kind: str, channels: int, dims: int) -> nn.Module:
    if kind == "bnf" and dims == 2:
        return FunctionalBatchNorm(channels)
    if kind in ("bn", "bnf"):
        return nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm1d(channels)
    if kind == "gn":
        return nn.GroupNorm(1, channels)
    return nn.Identity()


class Residual(nn.Module):
    def __init__(self, channels: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm1 = _norm(norm, channels, 2)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = _norm(norm, channels, 2)

    def forward(self, x):
        return F.relu(x + self.norm2(self.conv2(F.relu(self.norm1(self.conv1(x))))))


class Generated(nn.Module):
    """An MLP chain, a CNN chain or a residual CNN, with optional BatchNorm/GroupNorm."""

    def __init__(self, kind: str, widths: list[int], norm: str, classes: int, in_features: int):
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_features
        for w in widths:
            if kind == "mlp":
                layers += [nn.Linear(previous, w), _norm(norm, w, 1), nn.Tanh() if w % 2 else nn.ReLU()]
            elif kind == "cnn":
                layers += [nn.Conv2d(previous, w, 3, padding=1), _norm(norm, w, 2), nn.ReLU()]
            else:
                layers += [nn.Conv2d(previous, w, 1), Residual(w, norm)]
            previous = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(previous, classes)
        self.kind = kind

    def forward(self, x):
        h = self.features(x)
        if self.kind != "mlp":
            h = h.mean((2, 3))
        return self.classifier(h)


@st.composite
def generated_models(draw, norms=("none", "bn", "gn"), kinds=("mlp", "cnn", "rescnn")):
    """``(model, x, y)`` with a random architecture, batch and labels (in the default dtype); ``norms`` may
    also name ``"bnf"``, a BatchNorm traced through (:class:`FunctionalBatchNorm`)."""
    kind = draw(st.sampled_from(kinds))
    widths = draw(st.lists(st.integers(2, 5), min_size=2, max_size=4))
    norm = draw(st.sampled_from(norms))
    classes = draw(st.integers(2, 4))
    batch = draw(st.integers(2, 5))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    in_features = draw(st.integers(1, 3))
    model = Generated(kind, widths, norm, classes, in_features)
    shape = (batch, in_features) if kind == "mlp" else (batch, in_features, 5, 5)
    x = torch.randn(shape)
    y = torch.randint(0, classes, (batch,))
    return model, x, y


def heads_for(model) -> list:
    """Head specs that fit every cut of models made by :func:`generated_models`."""
    classes = model.classifier.out_features

    def cnn_or_linear(shape):  # a user callable: CNN heads on image features, linear on flat ones
        spec = fwdtrans.heads.CNNHead(width=3, depth=1) if len(shape) == 3 else fwdtrans.heads.LinearHead()
        return spec.build(shape, classes)

    return ["linear", fwdtrans.heads.MLPHead(width=6, depth=1), cnn_or_linear]


def draw_plan(data, model, x, most: int | None = None) -> tuple[int, object]:
    """Draw a block count (2 to one more than the cut points, at most ``most``) and a head of
    :func:`heads_for` for ``model``; a model with no cut point is skipped (one block has no cut)."""
    points = fwdtrans.inspect(model, x).points
    assume(points)
    top = len(points) + 1 if most is None else min(most, len(points) + 1)
    blocks = data.draw(st.integers(2, top), label="blocks")
    return blocks, data.draw(st.sampled_from(heads_for(model)), label="heads")


def grads(module: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in module.named_parameters()}


def reference_gradients(converted, x, y, per_sample: str) -> dict[str, torch.Tensor]:
    """The flagship estimator (global target, local guess, activity) with plain autograd only.

    Target gradients come from one full backward; each sample's target is projected on its
    normalised guess; the projection is pulled back through its own block. ``by-loss`` forms sample
    m's scalar as sum_n <d(loss_m / B)/dh_n, u_n> from the full per-sample Jacobian.
    """
    blocks, heads = list(converted.blocks), list(converted.heads)
    hs, h = [], x.detach().requires_grad_()  # a leaf input, so every block output is in the graph
    for block in blocks:
        h = block(h)
        hs.append(h)
    loss = F.cross_entropy(hs[-1], y)
    targets = torch.autograd.grad(loss, hs[:-1], retain_graph=True) if len(hs) > 1 else []
    out: dict[str, torch.Tensor] = {}
    for j, (hj, target) in enumerate(zip(hs[:-1], targets, strict=True)):
        leaf = hj.detach().requires_grad_()
        head_loss = F.cross_entropy(heads[j](leaf), y)
        head_params = list(heads[j].parameters())
        guess, *head_grads = torch.autograd.grad(head_loss, [leaf, *head_params])
        for (name, _), g in zip(heads[j].named_parameters(), head_grads, strict=True):
            out[f"heads.{j}.{name}"] = g
        u = guess / guess.flatten(1).norm(dim=1).view(-1, *[1] * (guess.dim() - 1))
        if per_sample == "exact":
            d = (target * u).flatten(1).sum(1)
        else:
            per_loss = F.cross_entropy(hs[-1], y, reduction="none") / len(y)
            eye = torch.eye(len(y), dtype=x.dtype)
            (jac,) = torch.autograd.grad(per_loss, hj, eye, retain_graph=True, is_grads_batched=True)
            d = (jac * u[None]).flatten(2).sum(-1).sum(-1)
        estimate = d.view(-1, *[1] * (u.dim() - 1)) * u
        params = list(blocks[j].named_parameters())
        gs = (torch.autograd.grad(hj, [p for _, p in params], estimate, retain_graph=True, allow_unused=True)
              if params else [])
        for (name, p), g in zip(params, gs, strict=True):
            out[f"blocks.{j}.{name}"] = torch.zeros_like(p) if g is None else g
    params = list(blocks[-1].named_parameters())
    gs = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True) if params else []
    for (name, p), g in zip(params, gs, strict=True):
        out[f"blocks.{len(blocks) - 1}.{name}"] = torch.zeros_like(p) if g is None else g
    return out


def mixes_samples(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())


def assert_gradients_match(actual: dict, expected: dict, rtol: float = 1e-8) -> None:
    """Each gradient within ``rtol`` relative error, or within ``rtol`` of the whole gradient's norm.

    The second clause covers gradients that are zero in exact arithmetic and round-off in float64
    (e.g. a Linear feeding a BatchNorm over two samples).
    """
    total = torch.sqrt(sum((g * g).sum() for g in expected.values() if g is not None))
    for name, e in expected.items():
        a = actual[name]
        assert (a is None) == (e is None), name
        if e is None:
            continue
        assert a.shape == e.shape, name
        err = (a - e).norm()
        assert err <= rtol * e.norm() or err <= rtol * total * 1e-1, f"{name}: error {err:.3e}, norm {e.norm():.3e}"
