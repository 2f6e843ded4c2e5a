"""The cost model: ``fwdtrans.Cost``, ``inspect(..., method=)``, ``converted.cost`` and the cost warning."""

import dataclasses
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import draw_plan, generated_models

import fwdtrans
from fwdtrans import Cost, FwdTransError, Method
from fwdtrans._cost import predict
from fwdtrans._method import on_reference

GLOBAL_LOCAL = dict(target="global", guess="local")


def _methods():
    return st.sampled_from([
        Method(**GLOBAL_LOCAL, space="activity"), Method(**GLOBAL_LOCAL, space="activity", per_sample="exact"),
        Method(**GLOBAL_LOCAL, space="activity", streams="joint"),
        Method(**GLOBAL_LOCAL, space="activity", streams="sequential"),
        Method(target="intermediate", guess="ntk", space="activity"),
        Method(target="global", guess="gaussian", space="activity", tangents=3),
        *(Method(**GLOBAL_LOCAL, space="weight", granularity=g) for g in ("tensor", "block", "joint", "sample")),
        Method(target="global", guess="gaussian", space="weight", granularity="tensor", tangents=2),
        Method(**GLOBAL_LOCAL, space="span"), Method(target="local", guess="local"), Method(guess="global"),
    ])


@st.composite
def _chains(draw):
    """A chain of blocks: forward FLOPs, head FLOPs (blocks but the last), trained tensors (>= 1), batch."""
    blocks = draw(st.integers(2, 6))
    flops = draw(st.lists(st.integers(1, 10**6), min_size=blocks, max_size=blocks))
    head = draw(st.lists(st.integers(0, 10**5), min_size=blocks - 1, max_size=blocks - 1))
    tensors = draw(st.lists(st.integers(1, 12), min_size=blocks, max_size=blocks))
    return flops, head, tensors, draw(st.integers(1, 128))


def test_a_three_block_chain_by_hand():
    """f = (1/4, 1/4, 1/2) of F, heads 1/10 each (trained: 3x), P = (2, 1, 2), B = 4, one tangent.

    Every step: one forward, the heads (0.6) and the last block's exact gradient (2 f_2 = 1): 2.6F.
    """
    def cost(**kw):
        return dataclasses.astuple(predict(Method(**GLOBAL_LOCAL, **kw), [1, 1, 2], [0.4, 0.4], [2, 1, 2], batch=4))

    def Cost(*fields):  # noqa: N802 (compared as tuples: the sums are rounded differently)
        return pytest.approx(dataclasses.astuple(fwdtrans.Cost(*fields)))

    # weight, per tensor: streams P_0 + P_1 = 3. Forward: per block the guess's backward (2f), the primal again (f)
    # and 2f per stream (4f + 2f); the streams cross blocks 1 (2) and 2 (3): 0.5 + 1.5. Reference: the walk
    # (f_1 + f_2 = 0.75), per block the target's and the guess's parameter gradients (4f each: 2).
    assert cost(space="weight", granularity="tensor") == Cost(3, 2.6 + 1.75 + 1.25 + 2.0, 2.6 + 0.75 + 2.0)
    # activity, by-loss: one stream per block, crossing the blocks after it: 0.25 + 2 * 0.5; both engines pull the
    # estimate back (2f per block: 1.0). The reference engine walks back per output sample: 4 * 0.75.
    assert cost(space="activity") == Cost(2, 2.6 + 1.0 + 1.25, 2.6 + 1.0 + 3.0)
    # exact: B = 4 streams per block (8 in all), crossing 4 * 1.25; the reference walk is one row: 0.75
    assert cost(space="activity", per_sample="exact") == Cost(8, 2.6 + 1.0 + 5.0, 2.6 + 1.0 + 0.75)
    # one joint stream crosses blocks 1 and 2 once: 0.75
    assert cost(space="activity", streams="joint") == Cost(1, 2.6 + 1.0 + 0.75, 2.6 + 1.0 + 3.0)
    # local learning: the forward, every block's local backward (2F), the heads
    for kw, expected in ((dict(target="local", guess="local"), Cost(0, 3.6, 3.6)),
                         (dict(guess="global"), Cost(0, 3.0, 3.0))):
        assert dataclasses.astuple(predict(Method(**kw), [1, 1, 2], [0.4, 0.4], [2, 1, 2], batch=4)) == expected


@given(method=_methods(), chain=_chains(), scale=st.integers(2, 1000))
def test_the_prediction_is_in_units_of_a_forward_pass(method, chain, scale):
    flops, head, tensors, batch = chain
    cost = predict(method, flops, head, tensors, batch)
    assert cost == predict(method, [scale * f for f in flops], [scale * h for h in head], tensors, batch)
    assert cost.reference == predict(on_reference(method), flops, head, tensors, batch).reference
    assert cost.streams == method.stream_count(len(flops), batch, tensors)
    assert cost.backprop == 3.0 and cost.ratio("forward") == pytest.approx(cost.forward / 3.0)
    assert cost.cheaper == ("reference" if cost.reference < cost.forward else "forward")
    if method.kind == "backprop":
        assert cost == Cost(0, 3.0, 3.0)
    else:  # at least a forward and every block's backward
        assert min(cost.forward, cost.reference) >= 3.0 - 1e-9


@given(chain=_chains())
def test_the_cheaper_engine_follows_the_streams(chain):
    flops, head, tensors, batch = chain
    blocks = len(flops)

    def cost(**kw):
        return predict(Method(**GLOBAL_LOCAL, **kw), flops, head, tensors, batch)

    # a stream per parameter tensor, each crossing every later block: more than the reference's walk
    assert cost(space="weight", granularity="tensor").cheaper == "reference"
    # a stream per sample crossing every later block, against one walk back
    if batch >= 2:
        assert cost(space="activity", per_sample="exact").cheaper == "reference"
    # by-loss: block j's stream crosses J-1-j blocks; the reference engine walks back once per output sample
    if batch >= blocks:
        assert cost(space="activity").cheaper == "forward"
    # local learning: one engine
    assert predict(Method(target="local", guess="local"), flops, head, tensors, batch).cheaper == "forward"


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = fwdtrans.models.resnet18(width=4)
    return model, torch.randn(2, 3, 32, 32)


def _inspect(resnet, method, **kw):
    model, x = resnet
    return fwdtrans.inspect(model, x, blocks=model.paper_cuts(), heads="cnn", method=method, **kw)


def test_inspect_predicts_the_streams_and_both_engines(resnet):
    weight = Method(**GLOBAL_LOCAL, space="weight", granularity="tensor")
    report = _inspect(resnet, weight, batch=64)
    assert report.method == weight
    assert report.cost.streams == weight.stream_count(8, 64, [9, 6, 9, 6, 9, 6, 9, 2]) == 54  # the Methods page's
    assert report.cost.forward > 2 * report.cost.reference and report.cost.cheaper == "reference"
    exact = _inspect(resnet, Method(**GLOBAL_LOCAL, space="activity", per_sample="exact"), batch=64).cost
    assert exact.streams == 7 * 64 and exact.cheaper == "reference"
    assert _inspect(resnet, Method(**GLOBAL_LOCAL, space="activity", per_sample="exact")).cost.streams == 7 * 2
    assert _inspect(resnet, Method(**GLOBAL_LOCAL, space="activity"), batch=64).cost.cheaper == "forward"
    assert _inspect(resnet, Method(guess="global")).cost == Cost(0, 3.0, 3.0)
    text = str(report)
    assert text.splitlines()[-1].startswith(f"method {weight.describe()}: 54 tangent streams; predicted cost")
    assert "reference engine" in text and "x backprop" in text
    assert fwdtrans.inspect(*resnet, blocks=8).cost is None and "method" not in str(fwdtrans.inspect(*resnet))


def test_inspect_needs_the_blocks_to_predict_a_cost(resnet):
    with pytest.raises(FwdTransError, match="pass blocks= too"):
        fwdtrans.inspect(*resnet, method=Method(space="weight"))


@pytest.mark.filterwarnings("ignore:.*tangent streams per step")
def test_convert_sets_the_cost_inspect_predicts(resnet):
    model, x = resnet
    method = Method(**GLOBAL_LOCAL, space="activity", per_sample="exact")
    converted = fwdtrans.convert(model, x, blocks=model.paper_cuts(), heads="cnn", method=method)
    assert converted.cost == _inspect(resnet, method).cost
    assert converted.cost.streams == 14


@pytest.mark.filterwarnings("ignore:.*tangent streams per step")
@settings(max_examples=10, deadline=None)
@given(sample=generated_models(), method=_methods(), data=st.data())
def test_convert_and_inspect_agree_on_any_model(sample, method, data):
    model, x, _ = sample
    blocks, heads = draw_plan(data, model, x, most=4)
    converted = fwdtrans.convert(model, x, blocks=blocks, heads=heads, method=method)
    cost = fwdtrans.inspect(model, x, blocks=blocks, heads=heads, method=method).cost
    assert converted.cost == cost
    tensors = [sum(1 for p in b.parameters() if p.requires_grad) for b in converted.blocks]
    assert cost.streams == dataclasses.replace(method, engine="forward").stream_count(blocks, len(x), tensors)
    assert fwdtrans.inspect(model, x, blocks=blocks, heads=heads, method=method, batch=3 * len(x)).cost.streams == (
        dataclasses.replace(method, engine="forward").stream_count(blocks, 3 * len(x), tensors))


def test_the_stream_warning_names_the_cheaper_engine(resnet):
    model, x = resnet
    method = Method(target="global", guess="gaussian", space="weight", granularity="tensor", tangents=2)  # 108
    with pytest.warns(UserWarning, match=r"propagates 108 tangent streams.*predicted step: .* forward passes with "
                                         r"engine='forward'.*Consider engine='reference' \(the same estimates, "
                                         r"cheaper here\)"):
        fwdtrans.convert(model, x, blocks=model.paper_cuts(), heads="cnn", method=method)
    # where the forward engine is the cheaper, the advice is the space's own
    activity = Method(target="global", guess="gaussian", space="activity", tangents=10)
    with pytest.warns(UserWarning) as caught:
        activity.warn_if_costly(70, Cost(70, 5.0, 50.0))
    assert "Consider engine='reference'" not in str(caught[0].message) and "fewer tangents" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        activity.warn_if_costly(64, Cost(64, 50.0, 5.0))  # at most 64 streams: no warning
