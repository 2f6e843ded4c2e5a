"""convert(): equivalence with the original model, no mutation, names, cut choice, heads."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from models import draw_plan, generated_models

import fwdtrans


def _convert(model, x, data, **kw):
    blocks, heads = draw_plan(data, model, x)
    return fwdtrans.convert(model, x, blocks=blocks, heads=heads, **kw), blocks


@given(generated_models(), st.data())
def test_converted_computes_what_the_model_computes(sample, data):
    model, x, _ = sample
    converted, blocks = _convert(model, x, data)
    assert len(converted.blocks) == blocks and len(converted.heads) == blocks - 1
    for mode in (True, False):
        model.train(mode)
        converted.train(mode)
        expected = model(x)
        assert torch.equal(converted(x), expected)
    # train mode updated both models' BatchNorm statistics identically
    for name, buffer in converted.original_state_dict().items():
        assert torch.equal(buffer, model.state_dict()[name]), name


@given(generated_models(), st.data())
def test_the_input_model_is_never_modified(sample, data):
    model, x, y = sample
    before = copy.deepcopy(model.state_dict())
    training = model.training
    converted, _ = _convert(model, x, data)
    torch.optim.SGD(converted.parameters(), lr=0.1)
    converted.train_step(torch.optim.SGD(converted.parameters(), lr=0.1))(x, y)
    assert model.training == training
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in model.parameters())
    assert not any(p is q for p in model.parameters() for q in converted.parameters())


@given(generated_models(), st.data())
def test_state_dict_round_trips_through_original_names(sample, data):
    model, x, _ = sample
    converted, _ = _convert(model, x, data)
    assert set(converted.original_state_dict()) == set(model.state_dict())
    fresh = copy.deepcopy(model)
    for p in fresh.parameters():
        torch.nn.init.normal_(p.detach())
    converted.load_original_state_dict(fresh.state_dict())
    for name, value in converted.original_state_dict().items():
        assert torch.equal(value, fresh.state_dict()[name])


def test_resnet18_natural_cuts():
    model = fwdtrans.models.resnet18(width=4)
    x = torch.randn(2, 3, 32, 32)
    converted = fwdtrans.convert(model, x, blocks=8, heads="linear")
    assert converted.cut_names == ("layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0")
    named = fwdtrans.convert(model, x, blocks=["layer2.1"], heads="linear")
    assert named.cut_names == ("layer2.1",)
    assert fwdtrans.convert(model, x, blocks=["layer2"], heads="linear").cut_names == ("layer2.1",)  # an alias


def test_inspect_reports_shapes_params_and_flops():
    model = fwdtrans.models.resnet18(width=4)
    report = fwdtrans.inspect(model, torch.randn(1, 3, 32, 32))
    rows = {p.name: p for p in report.points}
    assert rows["layer1.0"].shape == (1, 4, 32, 32) and rows["layer4.0"].shape == (1, 32, 4, 4)
    assert report.total_params == sum(p.numel() for p in model.parameters())
    # stem conv: 3x3x3 -> 4 channels at 32x32, 2 FLOPs per multiply-add
    assert rows["stem.0"].flops == 2 * 3 * 9 * 4 * 32 * 32
    assert sum(p.flops for p in report.points) <= report.total_flops
    text = str(report)
    assert "layer3.1" in text and "cum. FLOPs" in text
    # no cut inside a residual block: there the block input and the branch are both live
    assert not any(".conv" in n or ".bn" in n for n in report.names)


@pytest.mark.parametrize("spec", ["cnn", "mlp", "linear", fwdtrans.heads.CNNHead(width=4)])
def test_heads_are_built_for_each_cut_shape(spec):
    model = fwdtrans.models.resnet18(width=4)
    converted = fwdtrans.convert(model, torch.randn(2, 3, 32, 32), blocks=4, heads=spec)
    x = torch.randn(3, 3, 32, 32)
    h = x
    for block, head in zip(converted.blocks, converted.heads, strict=False):
        h = block(h)
        assert head(h).shape == (3, 10)


def test_cnn_heads_run_channels_last_on_cpu_with_the_plain_layers_values():
    torch.manual_seed(0)
    head = fwdtrans.heads.CNNHead(width=8).build((6, 16, 16), num_classes=10).double()
    plain = torch.nn.Sequential(*copy.deepcopy(list(head)))  # the same layers, run as they come
    seen = []
    head[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    x = torch.randn(4, 6, 16, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 10, (4,))
    out, expected = head(x), plain(x)
    assert seen == [True] and x.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(out, y), [x, *head.parameters()])
    grads0 = torch.autograd.grad(torch.nn.functional.cross_entropy(expected, y), [x, *plain.parameters()])
    for g, g0 in zip(grads, grads0, strict=True):
        torch.testing.assert_close(g, g0, rtol=1e-12, atol=1e-12)
    assert [k for k, _ in head.state_dict().items()] == [k for k, _ in plain.state_dict().items()]


def test_a_heads_input_gradient_keeps_the_block_outputs_layout():
    # the CNN heads run channels-last: the gradient they hand back to the block, its cotangent and its
    # guess, is laid out as the block's output, as every other tensor the block's pull-back meets
    torch.manual_seed(0)
    model = fwdtrans.models.resnet18(width=4)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    converted = fwdtrans.convert(model, x, blocks=3, heads="cnn")
    record: dict = {}
    converted._gradients(x, y, record=record)
    for b in record["blocks"][:-1]:
        assert b.g.is_contiguous() and b.g.stride() == b.out.stride()


def test_user_head_callable_gets_the_per_sample_shape():
    seen = []

    def head(shape):
        seen.append(shape)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(10))

    fwdtrans.convert(fwdtrans.models.resnet18(width=4), torch.randn(2, 3, 32, 32), blocks=["layer1.0"], heads=head)
    assert seen == [(4, 32, 32)]


@pytest.mark.parametrize("method", [dict(guess="global"), dict(), dict(space="weight", granularity="block"),
                                    dict(target="local")], ids=["backprop", "flagship", "weight", "local"])
def test_frozen_parameters_get_no_gradient(method):
    torch.manual_seed(0)
    model = fwdtrans.models.resnet18(width=4)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    converted = fwdtrans.convert(model, x, blocks=3, heads="linear", **method)
    frozen = {n for n, p in converted.blocks.named_parameters(prefix="blocks") if ".stem." in f".{n}."}
    for n, p in converted.named_parameters():
        p.requires_grad_(n not in frozen)
    converted.compute_gradients(x, y)
    assert frozen
    for n, p in converted.blocks.named_parameters(prefix="blocks"):
        assert (p.grad is None) == (n in frozen), n


def test_the_method_is_given_whole_or_as_keywords_never_both():
    import dataclasses
    import inspect

    model, x = fwdtrans.models.resnet18(width=2), torch.randn(2, 3, 32, 32)
    method = fwdtrans.Method(target="intermediate", guess="gaussian", space="weight", granularity="block")
    whole = fwdtrans.convert(model, x, blocks=3, heads="linear", method=method)
    keywords = fwdtrans.convert(model, x, blocks=3, heads="linear", **method.to_dict())
    assert whole.method == keywords.method == method
    assert fwdtrans.convert(model, x, blocks=3, heads="linear").method == fwdtrans.Method()  # the Method's defaults
    with pytest.raises(fwdtrans.FwdTransError, match="method= and the method keyword.s. space, tangents"):
        fwdtrans.convert(model, x, blocks=3, method=method, space="activity", tangents=2)
    with pytest.raises(fwdtrans.FwdTransError, match="not a fwdtrans.Method"):
        fwdtrans.convert(model, x, blocks=3, method={"guess": "local"})
    # convert's method keywords are exactly the Method's fields: they cannot drift apart
    parameters = list(inspect.signature(fwdtrans.convert).parameters)
    fields = [f.name for f in dataclasses.fields(fwdtrans.Method)]
    start = parameters.index(fields[0])
    assert parameters[start:start + len(fields)] == fields


def test_every_option_has_its_space_and_guess():
    import typing

    from fwdtrans import _method
    from fwdtrans._engine import guesses as _guesses
    from fwdtrans._engine import spaces as _spaces

    assert set(typing.get_args(_method.SpaceName)) <= set(_spaces.SPACES)
    assert set(typing.get_args(_method.GuessName)) - {"global"} == set(_guesses.GUESSES)  # global: backprop
    for space in typing.get_args(_method.SpaceName):
        assert isinstance(_spaces.space_for(fwdtrans.Method(space=space)), _spaces.Space)
