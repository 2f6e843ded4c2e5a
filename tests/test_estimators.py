"""Every method against plain autograd, in float64."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from models import assert_gradients_match, draw_plan, generated_models, grads, mixes_samples, reference_gradients

import fwdtrans


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _converted(sample, data, **method):
    model, x, y = sample
    blocks, heads = draw_plan(data, model, x)
    return fwdtrans.convert(model, x, blocks=blocks, heads=heads, **method)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("per_sample", ["by-loss", "exact"])
@given(sample=generated_models(), data=st.data())
def test_forward_gradient_matches_its_autograd_reference(per_sample, sample, data):
    converted = _converted(sample, data, target="global", guess="local", space="activity", per_sample=per_sample)
    _, x, y = sample
    reference = reference_gradients(copy.deepcopy(converted), x, y, per_sample)
    converted.compute_gradients(x, y)
    assert all(p.grad is not None for p in converted.parameters())
    assert_gradients_match(grads(converted), reference)


@pytest.mark.usefixtures("float64")
@given(sample=generated_models(norms=("bn",)), data=st.data())
def test_by_loss_and_exact_differ_only_when_samples_mix(sample, data):
    model, x, y = sample
    fast = _converted(sample, data, per_sample="by-loss")
    exact = copy.deepcopy(fast)
    exact.method = fwdtrans.Method(per_sample="exact")
    for mode in (True, False):
        fast.train(mode)
        exact.train(mode)
        a, b = copy.deepcopy(fast), copy.deepcopy(exact)
        a.compute_gradients(x, y, allow_eval=True)  # eval mode on purpose: there nothing mixes the samples
        b.compute_gradients(x, y, allow_eval=True)
        diffs = [_rel(p.grad, q.grad)
                 for p, q in zip(a.blocks[:-1].parameters(), b.blocks[:-1].parameters(), strict=True)]
        if not mixes_samples(a.blocks[1:]):  # eval mode, or no BatchNorm after the first cut
            assert max(diffs, default=0) < 1e-10


def test_by_loss_and_exact_differ_under_train_mode_batchnorm(float64):
    torch.manual_seed(0)
    model = fwdtrans.models.resnet18(width=2)
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    a = fwdtrans.convert(model, x, blocks=3, heads="linear", per_sample="by-loss")
    b = copy.deepcopy(a)
    b.method = fwdtrans.Method(per_sample="exact")
    a.compute_gradients(x, y)
    b.compute_gradients(x, y)
    gap = max(_rel(p.grad, q.grad) for p, q in zip(a.blocks[0].parameters(), b.blocks[0].parameters(), strict=True))
    assert gap > 1e-3  # the downstream BatchNorm couples the samples: the two estimators differ


@pytest.mark.usefixtures("float64")
@given(sample=generated_models(), data=st.data())
def test_global_guess_is_backprop_exactly(sample, data):
    model, x, y = sample
    converted = _converted(sample, data, target="global", guess="global")
    reference = copy.deepcopy(model)
    F.cross_entropy(reference(x), y).backward()
    converted.compute_gradients(x, y)
    expected = dict(reference.named_parameters())
    for name, p in converted.blocks.named_parameters():
        assert torch.equal(p.grad, expected[name.split(".", 1)[1]].grad), name
    assert all(p.grad is None for p in converted.heads.parameters())  # heads play no part in backprop


@pytest.mark.usefixtures("float64")
@given(sample=generated_models(), data=st.data())
def test_local_target_local_guess_is_greedy_local_learning(sample, data):
    _, x, y = sample
    converted = _converted(sample, data, target="local", guess="local")
    ref = copy.deepcopy(converted)
    h = x
    for j, block in enumerate(ref.blocks):
        out = block(h)
        loss = F.cross_entropy(ref.heads[j](out) if j < len(ref.heads) else out, y)
        loss.backward()
        h = out.detach()
    converted.compute_gradients(x, y)
    assert_gradients_match(grads(converted), grads(ref), rtol=1e-12)


def test_batchnorm_statistics_update_once_per_step():
    torch.manual_seed(0)
    model = fwdtrans.models.resnet18(width=4)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for method in ({"guess": "local"}, {"guess": "global"}, {"target": "local"}):
        converted = fwdtrans.convert(model, x, blocks=4, heads="linear", **method)
        eager = copy.deepcopy(model)
        eager(x)
        converted.compute_gradients(x, y)
        for name, value in converted.original_state_dict().items():
            torch.testing.assert_close(value, eager.state_dict()[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.usefixtures("float64")
@pytest.mark.filterwarnings("ignore:.*tangent streams per step")  # span opens one stream per sample
@pytest.mark.parametrize("method", [dict(), dict(target="intermediate", guess="gaussian", tangents=2),
                                    dict(space="span")], ids=["flagship", "intermediate-gaussian", "span"])
@given(sample=generated_models(), data=st.data())
def test_recompute_gives_the_same_gradients_and_statistics(method, sample, data):
    stored = _converted(sample, data, **method)
    recomputed = copy.deepcopy(stored)
    recomputed.method = fwdtrans.Method(**{**stored.method.to_dict(), "recompute": True})
    _, x, y = sample
    for c in (stored, recomputed):
        c.compute_gradients(x, y)
    assert_gradients_match(grads(recomputed), grads(stored), rtol=1e-12)
    for a, b in zip(recomputed.buffers(), stored.buffers(), strict=True):
        assert torch.equal(a, b)
