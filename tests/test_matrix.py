"""The study matrix: every valid target x guess x space, both engines, and the estimator's properties."""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from models import Generated, assert_gradients_match, generated_models, grads, heads_for

import fwdtrans
from fwdtrans._errors import FwdTransError
from fwdtrans._method import on_reference


def _methods():
    out = []
    for target, guess in itertools.product(["global", "local", "intermediate"],
                                           ["local", "ntk", "fixed-ntk", "gaussian", "rademacher"]):
        for space in ["activity", "weight", "span"]:
            variants = [{}]
            if space == "activity":
                variants = [{"per_sample": "by-loss"}, {"per_sample": "exact"}, {"streams": "sequential"},
                            {"streams": "joint"}]
            if space == "weight":
                variants = [{"granularity": g} for g in ("tensor", "block", "joint", "sample")]
            if guess in ("gaussian", "rademacher") and space != "span":
                variants += [{**variants[0], "tangents": 3, "aggregation": a} for a in ("mean", "project")]
            for extra in variants:
                try:
                    out.append(fwdtrans.Method(target=target, guess=guess, space=space, **extra))
                except FwdTransError:
                    pass
    return out


METHODS = _methods()


def _pair(model, x, blocks, heads, method):
    forward = fwdtrans.convert(model, x, blocks=blocks, heads=heads, **method.to_dict())
    reference = copy.deepcopy(forward)
    reference.method = on_reference(method)
    for c in (forward, reference):
        c.generator.manual_seed(7)
    return forward, reference


@pytest.mark.usefixtures("float64")
@pytest.mark.filterwarnings("ignore:.*tangent streams per step")
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.describe().replace(" ", ""))
@settings(max_examples=2)
@given(sample=generated_models(), data=st.data())
def test_forward_and_reference_engines_agree(method, sample, data):
    model, x, y = sample
    points = fwdtrans.inspect(model, x).points
    assume(points)  # one block has no cut: convert refuses blocks=1
    blocks = data.draw(st.integers(2, min(4, len(points) + 1)), label="blocks")
    heads = data.draw(st.sampled_from(heads_for(model)), label="heads")
    forward, reference = _pair(model, x, blocks, heads, method)
    backprop = copy.deepcopy(model)
    F.cross_entropy(backprop(x), y).backward()
    try:
        forward.compute_gradients(x, y)
    except FwdTransError as e:  # a unit with fewer dimensions than tangents: tested on its own below
        assume("singular Gram" not in str(e))
        raise
    reference.compute_gradients(x, y)
    assert_gradients_match(grads(forward), grads(reference))
    # the last block always gets the exact gradient of the global loss
    expected = dict(backprop.named_parameters())
    for name, p in forward.blocks[-1].named_parameters():
        torch.testing.assert_close(p.grad, expected[name].grad, rtol=1e-10, atol=1e-12)
    # heads learn only when their loss is a guess or a target, and never for NTK guesses
    for p in forward.heads.parameters():
        assert (p.grad is not None) == method.trains_heads
    for name, p in forward.blocks.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape and torch.isfinite(p.grad).all(), name


def test_the_matrix_is_complete():
    names = {(m.target, m.guess, m.space) for m in METHODS}
    assert len(names) == 3 * 5 * 2 + 3 * 3  # span needs a head guess
    assert len(METHODS) >= 100


def _record(converted, x, y):
    record = {}
    converted._gradients(x, y, record=record)
    return record


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("space", ["activity", "weight"])
@pytest.mark.parametrize("guess", ["local", "gaussian"])
@given(sample=generated_models(), data=st.data())
def test_the_estimate_is_an_orthogonal_projection(space, guess, sample, data):
    model, x, y = sample
    extra = {"per_sample": "exact"} if space == "activity" else {"granularity": "tensor"}
    if guess == "gaussian":  # noise guesses are used as drawn: orthogonal only through aggregation="project"
        extra["aggregation"] = "project"
    converted = fwdtrans.convert(model, x, blocks=2, heads="linear", target="global", guess=guess, space=space,
                                 engine="reference", **extra) if fwdtrans.inspect(model, x).points else None
    if converted is None:
        return
    rec = _record(converted, x, y)
    for b, est in zip(rec["blocks"][:-1], rec["estimates"], strict=True):
        if space == "activity":
            t, v = b.target[0].flatten(1), b.directions[0].flatten(1)
            residual = ((t - est.flatten(1)) * v).sum(1)  # per sample
            assert residual.abs().max() <= 1e-10 * (t.norm() * v.norm() + 1e-300)
        else:
            for t, e, v in zip(b.target, est, b.directions, strict=True):
                assert abs(float(((t - e) * v[0]).sum())) <= 1e-10 * float(t.norm() * v[0].norm() + 1e-300)


def _targets(converted, x, y):
    """Per-sample global-target gradients dL/dh_j of every cut, from a plain backward on a copy."""
    c = copy.deepcopy(converted)
    hs, h = [], x.detach().requires_grad_()
    for block in c.blocks:
        h = block(h)
        hs.append(h)
    return torch.autograd.grad(F.cross_entropy(hs[-1], y), hs[:-1])


@pytest.mark.usefixtures("float64")
@given(sample=generated_models(), data=st.data())
def test_a_guess_equal_to_the_target_gives_the_target(sample, data):
    model, x, y = sample
    if not fwdtrans.inspect(model, x).points:
        return
    probe = fwdtrans.convert(model, x, blocks=2, heads="linear")
    targets = _targets(probe, x, y)
    converted = copy.deepcopy(probe)
    converted.method = fwdtrans.Method(guess=lambda j, h, y: targets[j], per_sample="exact")
    backprop = copy.deepcopy(probe)
    backprop.method = fwdtrans.Method(guess="global")
    converted.compute_gradients(x, y)
    backprop.compute_gradients(x, y)
    assert_gradients_match({n: p.grad for n, p in converted.blocks.named_parameters()},
                           {n: p.grad for n, p in backprop.blocks.named_parameters()})


@pytest.mark.usefixtures("float64")
@given(sample=generated_models(), scale=st.floats(1e-3, 1e3), data=st.data())
def test_scaling_a_guess_changes_nothing(sample, scale, data):
    model, x, y = sample
    if not fwdtrans.inspect(model, x).points:
        return
    base = fwdtrans.convert(model, x, blocks=2, heads="linear")
    torch.manual_seed(0)
    directions = [torch.randn_like(h) for h in _targets(base, x, y)]
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    a.method = fwdtrans.Method(guess=lambda j, h, y: directions[j])
    b.method = fwdtrans.Method(guess=lambda j, h, y: scale * directions[j])
    a.compute_gradients(x, y)
    b.compute_gradients(x, y)
    assert_gradients_match(grads(a), grads(b), rtol=1e-10)


@pytest.mark.usefixtures("float64")
@pytest.mark.filterwarnings("ignore:.*tangent streams per step")
@pytest.mark.parametrize("guess", ["gaussian", "rademacher"])
@pytest.mark.parametrize("space", ["activity", "weight"])
def test_random_guesses_are_unbiased(guess, space):
    torch.manual_seed(0)
    model = Generated("mlp", [3, 3], "none", 3, 2)
    x, y = torch.randn(4, 2), torch.randint(0, 3, (4,))
    extra = {"granularity": "tensor"} if space == "weight" else {}
    converted = fwdtrans.convert(model, x, blocks=["features.2"], heads="linear", guess=guess, space=space,
                                 tangents=4000, seed=0, **extra)
    backprop = copy.deepcopy(model)
    F.cross_entropy(backprop(x), y).backward()
    converted.compute_gradients(x, y)
    estimate = torch.cat([p.grad.flatten() for p in converted.blocks[0].parameters()])
    truth = torch.cat([p.grad.flatten() for p in backprop.features[:2].parameters()])
    cosine = float(estimate @ truth / (estimate.norm() * truth.norm()))
    assert cosine > 0.99
    assert abs(float(estimate.norm() / truth.norm()) - 1) < 0.05


def test_local_heads_learn_only_from_their_own_loss(float64):
    torch.manual_seed(0)
    model = fwdtrans.models.resnet18(width=2)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    converted = fwdtrans.convert(model, x, blocks=3, heads="linear")
    ref = copy.deepcopy(converted)
    converted.compute_gradients(x, y)
    h = x
    for j, head in enumerate(ref.heads):
        h = ref.blocks[j](h).detach()
        expected = torch.autograd.grad(F.cross_entropy(head(h), y), list(head.parameters()))
        for p, e in zip(converted.heads[j].parameters(), expected, strict=True):
            torch.testing.assert_close(p.grad, e, rtol=1e-12, atol=1e-14)


def test_ntk_heads_are_redrawn_every_step_and_never_trained():
    model = fwdtrans.models.resnet18(width=2)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for guess, redrawn in (("ntk", True), ("fixed-ntk", False)):
        converted = fwdtrans.convert(model, x, blocks=3, heads="linear", guess=guess)
        step = converted.train_step(torch.optim.SGD(converted.parameters(), lr=0.1))
        before = [p.detach().clone() for p in converted.heads.parameters()]
        step(x, y)
        assert all(p.grad is None for p in converted.heads.parameters())
        changed = [not torch.equal(a, b) for a, b in zip(before, converted.heads.parameters(), strict=True)]
        assert any(changed) == redrawn


@pytest.mark.parametrize("kwargs, message", [
    ({"guess": "global", "target": "local"}, "use it with target='global'"),
    ({"guess": "local", "tangents": 2}, "needs a random guess"),
    ({"space": "span", "guess": "gaussian"}, "span of the batch's head guesses"),
    ({"space": "weight", "per_sample": "exact"}, "applies to space='activity'"),
    ({"target": "everything"}, "is not an option"),
])
def test_invalid_combinations_fail_at_convert_time(kwargs, message):
    with pytest.raises(FwdTransError, match=message):
        fwdtrans.convert(fwdtrans.models.resnet18(width=2), torch.randn(2, 3, 32, 32), blocks=2, **kwargs)


def test_many_tangent_streams_warn():
    with pytest.warns(UserWarning, match="tangent streams per step"):
        fwdtrans.convert(fwdtrans.models.resnet18(width=2), torch.randn(2, 3, 32, 32), blocks=8, heads="linear",
                         space="weight", granularity="tensor", guess="gaussian", tangents=4)


def test_singular_projection_is_a_clear_error():
    model = Generated("mlp", [2, 2], "none", 2, 1)
    x, y = torch.randn(3, 1), torch.randint(0, 2, (3,))
    converted = fwdtrans.convert(model, x, blocks=["features.2"], heads="linear", guess="rademacher",
                                 tangents=3, aggregation="project")  # 3 directions in a 2-dimensional space
    with pytest.raises(FwdTransError, match="singular Gram"):
        converted.compute_gradients(x, y)
