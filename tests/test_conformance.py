"""Conformance over random DAG models: chains, residual and multi-branch merges, concatenations,
conv/linear/norm/activation/pool layers, attention and einops rearranges."""

import copy

import einops
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from models import assert_gradients_match, grads, reference_gradients
from torch import nn

import fwdtrans

KINDS = ["conv", "residual", "merge", "concat", "pool", "tokens", "attention", "norm"]


class Node(nn.Module):
    """One DAG node on (B, C, H, W) features; ``inputs`` are indices of earlier nodes."""

    def __init__(self, kind: str, c: int, norm: str):
        super().__init__()
        self.kind = kind
        if kind in ("conv", "residual"):
            self.f = nn.Sequential(nn.Conv2d(c, c, 3, padding=1),
                                   nn.BatchNorm2d(c) if norm == "bn" else nn.GroupNorm(1, c), nn.ReLU())
        elif kind == "concat":
            self.f = nn.Conv2d(2 * c, c, 1)
        elif kind == "pool":
            self.f = nn.MaxPool2d(3, 1, 1)
        elif kind == "tokens":
            self.f = nn.Sequential(nn.Linear(c, c), nn.GELU())
        elif kind == "attention":
            self.f = nn.MultiheadAttention(c, 1, batch_first=True)
        elif kind == "norm":
            self.f = nn.LayerNorm(c)

    def forward(self, a, b):
        if self.kind == "residual":
            return a + self.f(a)
        if self.kind == "merge":
            return a + b
        if self.kind == "concat":
            return self.f(torch.cat([a, b], dim=1))
        if self.kind in ("tokens", "attention", "norm"):
            h = a.shape[2]
            t = einops.rearrange(a, "b c h w -> b (h w) c")
            t = t + (self.f(t, t, t, need_weights=False)[0] if self.kind == "attention" else self.f(t))
            return einops.rearrange(t, "b (h w) c -> b c h w", h=h)
        return self.f(a)


class Dag(nn.Module):
    def __init__(self, spec, c: int, norm: str, classes: int):
        super().__init__()
        self.stem = nn.Conv2d(2, c, 1)
        self.nodes = nn.ModuleList(Node(kind, c, norm) for kind, _, _ in spec)
        self.edges = [(i, j) for _, i, j in spec]
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        outs = [self.stem(x)]
        for node, (i, j) in zip(self.nodes, self.edges, strict=False):
            outs.append(node(outs[i], outs[j]))
        return self.fc(outs[-1].mean((2, 3)))


@st.composite
def dag_models(draw):
    n = draw(st.integers(2, 6))
    spec = []
    for k in range(n):  # node k+1 reads earlier outputs; mostly the previous one, sometimes a skip
        i = draw(st.integers(max(0, k - 2), k))
        j = draw(st.integers(0, k))
        spec.append((draw(st.sampled_from(KINDS)), k if draw(st.booleans()) else i, j))
    c = draw(st.sampled_from([2, 4]))
    norm = draw(st.sampled_from(["bn", "gn"]))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = Dag(spec, c, norm, classes=3)
    batch = draw(st.integers(2, 4))
    return model, torch.randn(batch, 2, 3, 3), torch.randint(0, 3, (batch,))


@given(dag_models(), st.data())
def test_dag_forward_equivalence_no_mutation_and_round_trip(sample, data):
    model, x, y = sample
    before = copy.deepcopy(model.state_dict())
    points = fwdtrans.inspect(model, x).points
    assume(points)  # one block has no cut: convert refuses it
    blocks = data.draw(st.integers(2, min(5, len(points) + 1)), label="blocks")
    converted = fwdtrans.convert(model, x, blocks=blocks, heads="linear")
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])
    for mode in (False, True):
        model.train(mode)
        converted.train(mode)
        assert torch.equal(converted(x), model(x))
    assert converted.original_state_dict().keys() == model.state_dict().keys()
    for name, value in converted.original_state_dict().items():
        if name not in converted.unused:  # dead branches still run (and update BatchNorm stats) in eager mode
            assert torch.equal(value, model.state_dict()[name])


@given(dag_models(), st.data())
def test_dag_forward_engine_matches_autograd_in_float64(sample, data):
    model, x, y = sample
    model, x = model.double(), x.double()
    points = fwdtrans.inspect(model, x).points
    if not points:
        return
    blocks = data.draw(st.integers(2, min(4, len(points) + 1)), label="blocks")
    converted = fwdtrans.convert(model, x, blocks=blocks, heads="linear")
    with fwdtrans._support.attention_context(converted.math_attention):
        expected = reference_gradients(copy.deepcopy(converted), x, y, "by-loss")
    converted.compute_gradients(x, y)
    assert_gradients_match(grads(converted), expected)
