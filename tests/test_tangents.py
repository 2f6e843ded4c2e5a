"""The tangent rules (``fwdtrans._tangents``) against ``torch.func``'s ``vmap(jvp)``, in float64, on generated
blocks: the output, the tangents of input streams and of parameter directions, and the new buffers."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import fx, nn

import fwdtrans
from fwdtrans import _blocks, _tangents


class Residual(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class Functional(nn.Module):
    """``torch.relu``, ``Tensor.relu``, ``F.relu``, a scalar added, ``torch.flatten`` / ``Tensor.flatten``."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        if self.kind == "relu":
            return torch.relu(x)
        if self.kind == "method-relu":
            return x.relu()
        if self.kind == "F.relu":
            return F.relu(x) + 1.5
        if self.kind == "method-add":
            return x.add(x)
        return x


@st.composite
def blocks(draw) -> tuple[nn.Module, int, int]:
    """A chain of supported layers on ``(B, C, H, W)`` inputs, ending in a classifier or not: the block, C, H."""
    c, size = draw(st.integers(2, 4)), draw(st.sampled_from([4, 6]))
    channels = c
    layers: list[nn.Module] = []
    shape = (c, size, size)
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["conv", "bn", "relu", "residual", "pool", "functional", "identity"]))
        if kind == "conv":
            groups = draw(st.sampled_from([1, c])) if c % 2 == 0 else 1
            out = draw(st.sampled_from([c, 2 * c])) if groups == 1 else c
            stride = draw(st.sampled_from([1, 2])) if shape[1] >= 4 else 1
            layers.append(nn.Conv2d(c, out, 3, stride=stride, padding=1, groups=groups, bias=draw(st.booleans())))
            c = out
            shape = (c, (shape[1] - 1) // stride + 1, (shape[2] - 1) // stride + 1)
        elif kind == "bn":
            layers.append(nn.BatchNorm2d(c, momentum=draw(st.sampled_from([0.1, None])), affine=draw(st.booleans()),
                                         track_running_stats=draw(st.booleans())))
        elif kind == "relu":
            # in place on the block's input, torch.func's jvp refuses it (it writes a captured tensor)
            fresh = bool(layers) and isinstance(layers[-1], (nn.Conv2d, nn.BatchNorm2d))
            layers.append(nn.ReLU(inplace=fresh and draw(st.booleans())))
        elif kind == "residual":
            layers.append(Residual(nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))))
        elif kind == "pool" and shape[1] >= 4:
            pool = draw(st.sampled_from(["max", "avg"]))
            layers.append(nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2))
            shape = (c, shape[1] // 2, shape[2] // 2)
        elif kind == "functional":
            layers.append(Functional(draw(st.sampled_from(["relu", "method-relu", "F.relu", "method-add"]))))
        else:
            layers.append(nn.Identity())
    if draw(st.booleans()):
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 3, bias=draw(st.booleans()))]
    return nn.Sequential(*layers).double(), channels, size


@contextlib.contextmanager
def without_rules(block: nn.Module):
    """``torch.func``'s ``vmap(jvp)``: the program cached on ``block`` set aside."""
    object.__setattr__(block, _tangents._ATTR, False)
    try:
        yield
    finally:
        object.__setattr__(block, _tangents._ATTR, None)


def close(a, b):
    return (a - b).abs().max().item() <= 1e-10 * (1 + b.abs().max().item())


@given(blocks(), st.booleans(), st.integers(1, 3), st.data())
def test_rules_equal_vmap_jvp_in_float64(drawn, train, streams, data):
    model, channels, size = drawn
    block = fx.symbolic_trace(model).train(train)
    assert _tangents.program(block) is not None, block.graph
    x = torch.randn(4, channels, size, size, dtype=torch.float64)
    state = _blocks.state(block)
    trained = state[0]
    # the streams in chunks (the open bundles), pushed together: each chunk's tangents as if pushed alone
    sizes = data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    chunks = [torch.randn(s, *x.shape, dtype=x.dtype) for s in sizes]
    before = {k: b.clone() for k, b in block.named_buffers()}
    out, t, new = _blocks.push(block, x, chunks, state)
    with without_rules(block):
        out0, t0, new0 = _blocks.push(block, x, chunks, state)
    assert len(t) == len(t0) == len(chunks)
    assert close(out, out0) and all(close(a, b) for a, b in zip(t, t0, strict=True))
    assert all(a.shape == (s, *out.shape) for a, s in zip(t, sizes, strict=True))
    assert new.keys() == new0.keys() and all(torch.equal(new[k], new0[k]) or close(new[k], new0[k]) for k in new)
    # parameter directions: each on its own rows of the streams
    directions = []
    for p in trained.values():
        first = data.draw(st.integers(0, streams - 1))
        count = data.draw(st.integers(1, streams - first))
        directions.append((first, torch.randn(count, *p.shape, dtype=p.dtype)))
    if directions:
        image = _blocks.push_params(block, (x,), directions, streams, state)
        with without_rules(block):
            image0 = _blocks.push_params(block, (x,), directions, streams, state)
        assert close(image, image0)
    assert all(torch.equal(b, before[k]) for k, b in block.named_buffers()), "the block's own buffers were written"


def test_resnet_blocks_use_the_rules_and_agree_in_every_mode():
    torch.manual_seed(0)
    model = fwdtrans.models.resnet18(width=4).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    c = fwdtrans.convert(model, x, blocks=model.paper_cuts(), heads="linear")
    h = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    for j, block in enumerate(c.blocks):
        assert _tangents.program(block) is not None, j
        for train in (True, False):
            block.train(train)
            state = _blocks.state(block)
            t = [torch.randn(2, *h.shape, dtype=h.dtype)]
            out, (tangents,), new = _blocks.push(block, h, t, state)
            with without_rules(block):
                out0, (tangents0,), new0 = _blocks.push(block, h, t, state)
            assert close(out, out0) and close(tangents, tangents0) and all(close(new[k], new0[k]) for k in new)
        block.train(True)
        with torch.no_grad():
            h = block(h)


class Dropping(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.drop = nn.Conv2d(2, 2, 1), nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.conv(x))


class Overwritten(nn.Module):  # an in-place ReLU overwrites what the addition reads
    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(x) + x


@pytest.mark.parametrize("model", [Dropping(), Overwritten(), nn.Sequential(nn.Conv2d(2, 2, 1), nn.Tanh()),
                                   nn.Sequential(nn.Conv2d(2, 2, 1, padding_mode="circular"))],
                         ids=["dropout", "inplace-relu-read-again", "tanh", "circular-padding"])
def test_blocks_without_rules_are_left_to_torch_func(model):
    assert _tangents.program(fx.symbolic_trace(model)) is None
    assert _tangents.program(model) is None  # not an fx graph


def test_a_module_changing_class_invalidates_the_program():
    block = fx.symbolic_trace(nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)))
    assert _tangents.program(block) is not None

    class Synchronised(nn.BatchNorm2d):
        pass

    block.get_submodule("1").__class__ = Synchronised  # as sync_batchnorm=True does
    assert _tangents.program(block) is None


def test_parameter_directions_of_a_block_with_frozen_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Linear(4, 5)).double()
    model[0].weight.requires_grad_(False)  # its bias's direction alone: an expanded image
    model[1].bias.requires_grad_(False)
    block = fx.symbolic_trace(model)
    state = _blocks.state(block)
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    directions = [(0, torch.randn(3, *p.shape, dtype=p.dtype)) if i % 2 == 0 else
                  (1, torch.randn(2, *p.shape, dtype=p.dtype)) for i, p in enumerate(state[0].values())]
    image = _blocks.push_params(block, (x,), directions, 3, state)
    with without_rules(block):
        assert close(image, _blocks.push_params(block, (x,), directions, 3, state))


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("name", ["mlp", "conv1d", "conv3d"])
def test_one_and_three_dimensional_layers(name, train):
    torch.manual_seed(0)
    if name == "mlp":  # (B, D): Linear, BatchNorm1d, ReLU
        model, x = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)), torch.randn(8, 6)
    elif name == "conv1d":  # (B, C, L)
        model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU(), nn.AvgPool1d(2),
                              nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 3))
        x = torch.randn(8, 2, 6)
    else:  # (B, C, D, H, W)
        model = nn.Sequential(nn.Conv3d(2, 3, 3, padding=1), nn.BatchNorm3d(3), nn.ReLU(), nn.AvgPool3d(2),
                              nn.AdaptiveAvgPool3d(1), nn.Flatten(1))
        x = torch.randn(4, 2, 4, 4, 4)
    block = fx.symbolic_trace(model.double()).train(train)
    x = x.double()
    assert _tangents.program(block) is not None
    state = _blocks.state(block)
    chunks = [torch.randn(2, *x.shape, dtype=x.dtype), torch.randn(1, *x.shape, dtype=x.dtype)]
    directions = [(i % 2, torch.randn(2, *p.shape, dtype=p.dtype)) for i, p in enumerate(state[0].values())]
    out, tangents, new = _blocks.push(block, x, chunks, state)
    image = _blocks.push_params(block, (x,), directions, 3, state)
    with without_rules(block):
        out0, tangents0, new0 = _blocks.push(block, x, chunks, state)
        image0 = _blocks.push_params(block, (x,), directions, 3, state)
    assert close(out, out0) and all(close(a, b) for a, b in zip(tangents, tangents0, strict=True))
    assert close(image, image0) and all(close(new[k], new0[k]) for k in new)


def test_a_module_replaced_in_the_block_is_the_one_that_runs():
    block = fx.symbolic_trace(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU())).double()
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    assert _blocks.push(block, x, [torch.randn(1, *x.shape, dtype=x.dtype)])[0].shape == (2, 2, 8, 8)
    block.set_submodule("0", nn.Conv2d(2, 2, 3, stride=2, padding=1).double())  # same class, another stride
    out, (t,), _ = _blocks.push(block, x, [torch.randn(1, *x.shape, dtype=x.dtype)])
    assert out.shape == t.shape[1:] == block(x).shape == (2, 2, 4, 4)
