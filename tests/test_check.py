"""fwdtrans.check: healthy models report ok in float32 and float64, a disagreement between the engines does not."""

import math

import pytest
import torch
from torch import nn
from zoo import MobileNet

import fwdtrans
import fwdtrans._step


def conv_bn_net():  # every conv has a bias before BatchNorm: its true gradient is round-off
    layers, c = [], 3
    for width in (4, 4, 8):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        c = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 5))


MODELS = {"conv-bias-bn": conv_bn_net, "mobilenet-bias": lambda: MobileNet(bias=True)}


def converted(name, dtype, space="activity"):
    torch.manual_seed(0)
    model = MODELS[name]().to(dtype)
    x, y = torch.randn(8, 3, 16, 16, dtype=dtype), torch.randint(0, 5, (8,))
    return fwdtrans.convert(model, x, blocks=3, space=space), (x, y)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("space", ["activity", "weight"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_healthy_model_with_biases_before_batchnorm_is_ok(name, space, dtype):
    c, batch = converted(name, dtype, space)
    report = fwdtrans.check(c, batch)
    assert report.ok, str(report)
    assert report.engine_gap < (1e-12 if dtype == torch.float64 else 1e-5)
    assert report.worst in dict(c.named_parameters())
    assert all(math.isfinite(b.guess_cosine) and b.engine_gap <= report.engine_gap for b in report.blocks)
    assert "engines agree" in str(report)


@pytest.mark.parametrize("tensor", ["blocks.1.features.4.conv.3.bias", "blocks.1.features.4.conv.3.weight"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_disagreement_between_the_engines_is_reported_with_the_tensor(monkeypatch, tensor, dtype):
    c, batch = converted("mobilenet-bias", dtype)
    assert tensor in dict(c.named_parameters())
    run = fwdtrans._step.run  # every step check runs

    def perturbed(model, x, y, **kwargs):  # the forward engine errs on one tensor by 1e-3 of its block's gradient
        metrics = run(model, x, y, **kwargs)
        if model.method == c.method:  # the forward engine's copy (the others run other methods)
            grads = [p.grad for n, p in model.named_parameters() if n.startswith("blocks.1.")]
            p = model.get_parameter(tensor)
            p.grad = p.grad + 1e-3 * torch.cat([g.flatten() for g in grads]).norm() / p.numel() ** 0.5
        return metrics

    monkeypatch.setattr(fwdtrans._step, "run", perturbed)
    report = fwdtrans.check(c, batch)
    assert not report.ok
    assert report.worst == tensor
    assert report.engine_gap == pytest.approx(1e-3, rel=1e-2)
    assert [b.engine_gap > 1e-4 for b in report.blocks] == [False, True]
    assert "DISAGREE" in str(report) and tensor in str(report)


def test_dropout_masks_are_shared_by_the_engines(float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.5),
                          nn.Linear(8, 3))
    c = fwdtrans.convert(model, torch.randn(4, 6), blocks=3, heads="linear")
    assert fwdtrans.check(c, (torch.randn(16, 6), torch.randint(0, 3, (16,)))).ok


@pytest.mark.parametrize("where", ["module", "inside a module kept whole"])
def test_weight_space_replays_the_dropout_masks_of_a_block_it_runs_twice(float64, where):
    """Weight space runs a block again for J_theta v: it must draw the forward's dropout masks, whether
    the dropout is a module of the block or hidden in a leaf module (nn.TransformerEncoderLayer)."""
    from zoo import ViT

    torch.manual_seed(0)
    if where == "module":
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.5),
                              nn.Linear(8, 3))
        x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    else:
        model, x, y = ViT(dropout=0.1), torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    c = fwdtrans.convert(model, x, blocks=3, heads="linear", space="weight")
    assert c.dropout[1]
    report = fwdtrans.check(c, (x, y))
    assert report.ok, report


@pytest.mark.parametrize("target", ["global", "intermediate"])
def test_sequential_streams_replay_the_dropout_masks_of_the_blocks_they_cross(float64, target):
    """streams='sequential' pushes each block's stream on its own after the sweep, running the blocks it crosses
    again: with the sweep's dropout masks, it gives the reference engine's estimate."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.5),
                          nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
    c = fwdtrans.convert(model, torch.randn(4, 6), blocks=3, heads="linear", streams="sequential", target=target)
    assert c.dropout[1] and c.dropout[2]
    report = fwdtrans.check(c, (torch.randn(16, 6), torch.randint(0, 3, (16,))))
    assert report.ok, report
    with pytest.raises(fwdtrans.FwdTransError, match="streams='sequential': for each stream"):
        c.compute_gradients(torch.randn(4, 6), torch.randint(0, 3, (4,)), compile=True)


def test_compiled_weight_space_refuses_dropout_before_the_last_block():
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    c = fwdtrans.convert(model, torch.randn(4, 6), blocks=2, heads="linear", space="weight")
    with pytest.raises(fwdtrans.FwdTransError, match="replay its dropout mask"):
        c.compute_gradients(torch.randn(4, 6), torch.randint(0, 3, (4,)), compile=True)


def test_a_missing_gradient_is_not_ok(monkeypatch):
    c, batch = converted("conv-bias-bn", torch.float64)
    run = fwdtrans._step.run

    def dropped(model, x, y, **kwargs):
        metrics = run(model, x, y, **kwargs)
        if model.method == c.method:  # the forward engine's copy
            model.get_parameter("blocks.0.0.weight").grad = None
        return metrics

    monkeypatch.setattr(fwdtrans._step, "run", dropped)
    report = fwdtrans.check(c, batch)
    assert not report.ok and report.missing == ("blocks.0.0.weight",) and report.worst == "blocks.0.0.weight"
