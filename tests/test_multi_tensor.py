"""Cuts that several tensors cross (``multi_tensor=True``): equivalence, one projection per crossing
tensor (checked against plain autograd in float64), engine agreement, and refusals."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from models import Generated, assert_gradients_match, grads

import fwdtrans
from fwdtrans._errors import FwdTransError
from fwdtrans._method import on_reference


@st.composite
def residual_models(draw, norms=("none", "gn", "bn")):
    """A residual CNN (cuts inside its residual blocks are crossed by the branch and the skip)."""
    widths = draw(st.lists(st.integers(2, 4), min_size=1, max_size=2))
    norm = draw(st.sampled_from(norms))
    classes = draw(st.integers(2, 3))
    batch = draw(st.integers(2, 4))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = Generated("rescnn", widths, norm, classes, in_features=2)
    return model, torch.randn(batch, 2, 4, 4), torch.randint(0, classes, (batch,))


def _multi_cuts(model, x, data) -> list[str]:
    points = fwdtrans.inspect(model, x, multi_tensor=True).points
    multi = [i for i, p in enumerate(points) if len(p.shapes) > 1]
    assert multi, "a residual block is always crossed by two tensors somewhere"
    chosen = {data.draw(st.sampled_from(multi), label="multi cut")}
    chosen |= set(data.draw(st.lists(st.integers(0, len(points) - 1), max_size=2), label="more cuts"))
    return [points[i].name for i in sorted(chosen)]


def _reference(converted, x, y) -> dict[str, torch.Tensor]:
    """Global target, local guess, activity space, with autograd only: at a multi-tensor cut each
    tensor's target is projected on its own head's normalised loss gradient, sample by sample."""
    blocks, heads = list(converted.blocks), list(converted.heads)
    hs, h = [], x.detach().requires_grad_()
    for block in blocks:
        h = block(h)
        hs.append(h)
    loss = F.cross_entropy(hs[-1], y)
    targets = torch.autograd.grad(loss, hs[:-1], retain_graph=True)
    out = {}
    for j, (hj, target) in enumerate(zip(hs[:-1], targets, strict=True)):
        leaf = hj.detach().requires_grad_()
        logits = heads[j](leaf)
        head_loss = sum(F.cross_entropy(z, y) for z in (logits if isinstance(logits, tuple) else (logits,)))
        g, *head_grads = torch.autograd.grad(head_loss, [leaf, *heads[j].parameters()])
        out.update({f"heads.{j}.{n}": gp for (n, _), gp in zip(heads[j].named_parameters(), head_grads, strict=True)})
        estimate, start = torch.zeros_like(g.flatten(1)), 0
        for size in converted.segments[j]:
            part = slice(start, start + size)
            u = g.flatten(1)[:, part]
            u = u / u.norm(dim=1, keepdim=True)
            estimate[:, part] = (target.flatten(1)[:, part] * u).sum(1, keepdim=True) * u
            start += size
        params = list(blocks[j].named_parameters())
        gs = torch.autograd.grad(hj, [p for _, p in params], estimate.view_as(g), retain_graph=True) if params else []
        out.update({f"blocks.{j}.{n}": gp for (n, _), gp in zip(params, gs, strict=True)})
    params = list(blocks[-1].named_parameters())
    out.update({f"blocks.{len(blocks) - 1}.{n}": gp
                for (n, _), gp in zip(params, torch.autograd.grad(loss, [p for _, p in params]), strict=True)})
    return out


@given(residual_models(), st.data())
def test_multi_tensor_cuts_compute_what_the_model_computes(sample, data):
    model, x, _ = sample
    converted = fwdtrans.convert(model, x, blocks=_multi_cuts(model, x, data), heads="linear", multi_tensor=True)
    assert any(isinstance(h, fwdtrans.heads.SplitHead) for h in converted.heads)
    for mode in (True, False):
        model.train(mode)
        converted.train(mode)
        # packing copies the crossing tensors into new memory layouts, which may change the kernels'
        # summation order: equal up to float32 round-off
        torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("float64")
@given(residual_models(norms=("none", "gn")), st.data())
def test_each_crossing_tensor_gets_its_own_projection_in_float64(sample, data):
    model, x, y = sample
    converted = fwdtrans.convert(model, x, blocks=_multi_cuts(model, x, data), heads="linear",
                                 multi_tensor=True)
    expected = _reference(copy.deepcopy(converted), x, y)
    converted.compute_gradients(x, y)
    assert_gradients_match(grads(converted), expected)


@pytest.mark.parametrize("method", [
    dict(),
    dict(guess="gaussian", tangents=2),
    dict(target="intermediate", streams="sequential"),
    dict(space="weight", granularity="block"),
], ids=lambda m: "-".join(map(str, m.values())) or "flagship")
@pytest.mark.usefixtures("float64")
@given(sample=residual_models(norms=("bn",)), data=st.data())
def test_engines_agree_on_multi_tensor_cuts_in_float64(method, sample, data):
    model, x, y = sample
    forward = fwdtrans.convert(model, x, blocks=_multi_cuts(model, x, data), heads="linear",
                               multi_tensor=True, **method)
    reference = copy.deepcopy(forward)
    reference.method = on_reference(forward.method)
    for c in (forward, reference):
        c.compute_gradients(x, y)
    assert_gradients_match(grads(forward), grads(reference))


def test_resnet_inspect_lists_points_inside_residual_blocks():
    model, x = fwdtrans.models.resnet18(width=4), torch.randn(2, 3, 32, 32)
    single = fwdtrans.inspect(model, x).names
    multi = fwdtrans.inspect(model, x, multi_tensor=True)
    inner = [p for p in multi.points if len(p.shapes) > 1]
    assert set(single) <= set(multi.names) and inner
    assert all(p.name.startswith("layer") for p in inner)
    assert " + " in str(multi)


def test_multi_tensor_cuts_refuse_methods_without_a_guess_per_tensor():
    model, x = Generated("rescnn", [3], "none", 2, 2), torch.randn(2, 2, 4, 4)
    names = [p.name for p in fwdtrans.inspect(model, x, multi_tensor=True).points if len(p.shapes) > 1]
    with pytest.raises(FwdTransError, match="its own guess"):
        fwdtrans.convert(model, x, blocks=names[:1], heads="linear", multi_tensor=True, space="span")
    with pytest.raises(FwdTransError, match="multi_tensor=True"):
        fwdtrans.convert(model, x, blocks=names[:1], heads="linear")
