"""Each architecture converts, computes what it computed, and trains one step with forward gradients."""

import copy

import pytest
import torch
import torch.nn.functional as F
from models import assert_gradients_match, grads
from zoo import ZOO

import fwdtrans


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("space", ["activity", "weight"])
def test_zoo_converts_and_trains(name, space):
    cls, shape = ZOO[name]
    torch.manual_seed(0)
    model = cls()
    x, y = torch.randn(shape), torch.randint(0, 5, (shape[0],))
    report = fwdtrans.inspect(model, x, blocks=3)
    assert len(report.plan) == 3 and all(r["head_ratio"] <= 0.1 for r in report.plan[:-1] if r["head"] != "linear")
    converted = fwdtrans.convert(model, x, blocks=3, space=space, granularity="block")
    model.eval()
    converted.eval()
    assert torch.equal(converted(x), model(x))
    converted.train()
    metrics = converted.train_step(torch.optim.SGD(converted.parameters(), lr=0.01))(x, y)
    assert torch.isfinite(metrics["loss"])
    for n, p in converted.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize("name", ["vit", "mlp-mixer", "torchvision-resnet"])
def test_zoo_forward_engine_matches_reference_in_float64(name, float64):
    cls, shape = ZOO[name]
    torch.manual_seed(0)
    model = (cls(dropout=0.0) if name == "vit" else cls()).double()
    x, y = torch.randn(shape), torch.randint(0, 5, (shape[0],))
    forward = fwdtrans.convert(model, x, blocks=3)
    reference = copy.deepcopy(forward)
    reference.method = fwdtrans.Method(engine="reference")
    for c in (forward, reference):
        c.compute_gradients(x, y)
    assert_gradients_match(grads(forward), grads(reference))


def test_dropout_uses_the_primal_mask_for_every_tangent():
    from fwdtrans._engine import push

    block = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Dropout(0.5)))
    h = torch.randn(4, 6) + 3
    streams = torch.randn(5, 4, 6)
    out, tangents, _ = push(block, h, streams)
    mask = (out != 0).float() * 2  # inverted dropout keeps 1/(1-p)
    assert 0 < mask.count_nonzero() < mask.numel()
    torch.testing.assert_close(tangents, streams * mask)


def test_state_dict_round_trip_with_a_plain_checkpoint(tmp_path):
    model = ZOO["vit"][0]()
    converted = fwdtrans.convert(model, torch.randn(2, 3, 16, 16), blocks=3)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    trained = copy.deepcopy(converted)
    trained.load_original_state_dict(torch.load(tmp_path / "plain.pt"))
    trained.train_step(torch.optim.SGD(trained.parameters(), lr=0.1))(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))
    fresh = ZOO["vit"][0]()
    fresh.load_state_dict(trained.original_state_dict())  # back to a plain checkpoint
    fresh.eval()
    trained.eval()
    x = torch.randn(3, 3, 16, 16)
    assert torch.equal(fresh(x), trained(x))


def test_training_branch_is_refused_with_the_module_named():
    class Noisy(torch.nn.Module):
        def forward(self, x):
            return x + torch.randn_like(x) if self.training else x

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), Noisy(), torch.nn.Linear(4, 2))
    with pytest.raises(fwdtrans.FwdTransError, match=r"different graphs in train and eval mode.*'1'"):
        fwdtrans.convert(model, torch.randn(2, 3), blocks=2)
    fwdtrans.convert(model, torch.randn(2, 3), blocks=2, leaf_modules=[Noisy])  # the escape hatch


def test_attention_uses_the_math_kernel_only_when_needed():
    vit = fwdtrans.convert(ZOO["vit"][0](dropout=0.0), torch.randn(2, 3, 16, 16), blocks=3)  # flash kernel
    assert vit.math_attention
    cnn = fwdtrans.convert(ZOO["vgg"][0](), torch.randn(2, 3, 16, 16), blocks=3)
    assert not cnn.math_attention


def test_an_op_without_forward_ad_is_named_at_convert_time():
    class Warp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = torch.nn.Conv2d(3, 2, 1), torch.nn.Conv2d(2, 2, 1), torch.nn.Linear(2, 2)

        def forward(self, x):
            h = torch.relu(self.b(torch.relu(self.a(x))))
            h = F.grid_sample(h, h.permute(0, 2, 3, 1).tanh(), align_corners=False)
            return self.fc(h.mean((2, 3)))

    with pytest.raises(fwdtrans.FwdTransError, match=r"(?s)node 'grid_sample'.*first block.*engine='reference'"):
        fwdtrans.convert(Warp(), torch.randn(2, 3, 4, 4), blocks=2, heads="linear")
    # placed in the first block, no activity-space tangent crosses it
    fwdtrans.convert(Warp(), torch.randn(2, 3, 4, 4), blocks=["grid_sample"], heads="linear")


@pytest.mark.parametrize("name", ["vgg", "torchvision-resnet"])
def test_no_cut_right_before_an_in_place_op(name, float64):
    cls, shape = ZOO[name]
    torch.manual_seed(0)
    model = cls().double()
    for m in model.modules():  # the two engines draw dropout masks in different orders
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    report = fwdtrans.inspect(model, torch.randn(shape))
    assert not any(n in ("features.0", "bn1") for n in report.names)  # each is followed by ReLU(inplace=True)
    x, y = torch.randn(shape), torch.randint(0, 5, (shape[0],))
    for balance in ("flops", "memory"):
        forward = fwdtrans.convert(model, x, blocks=3, balance=balance)
        reference = copy.deepcopy(forward)
        reference.method = fwdtrans.Method(engine="reference")
        forward.compute_gradients(x, y)
        reference.compute_gradients(x, y)
        assert_gradients_match(grads(forward), grads(reference))
