"""What a new user gets wrong: each trap either works or is refused at once with one FwdTransError that
names the argument (module, cut, input) and the fix, leaving the model and the original model untouched."""

import contextlib
import copy
import warnings

import pytest
import torch
from torch import nn

import fwdtrans
from fwdtrans import FwdTransError


@contextlib.contextmanager
def refused(match: str, *modules: nn.Module):
    """Expect a FwdTransError matching ``match`` (and a fix); the modules' states must not change."""
    before = [copy.deepcopy(m.state_dict()) for m in modules]
    with pytest.raises(FwdTransError, match=match) as info:
        yield
    assert "Fix:" in str(info.value)
    for module, state in zip(modules, before, strict=True):
        after = module.state_dict()
        assert after.keys() == state.keys()
        for name, value in state.items():
            assert torch.equal(after[name], value), name


def _resnet(**kw):
    torch.manual_seed(0)
    model = fwdtrans.models.resnet18(width=2)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    return model, fwdtrans.convert(model, x[:2], **{"blocks": 3, "heads": "linear", **kw}), x, y


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


# ----------------------------------------------------------------------------- the optimizer
def test_an_optimizer_over_the_original_model_is_refused():
    model, converted, _, _ = _resnet()
    with refused(r"holds none of the \d+ parameters .*original model.*converted\.parameters\(\)", model, converted):
        converted.train_step(torch.optim.SGD(model.parameters(), lr=0.1))
    with refused(r"needs a torch\.optim\.Optimizer, got generator", model, converted):
        converted.train_step(converted.parameters())


@pytest.mark.parametrize("method, warns", [
    ({}, True), ({"target": "local", "guess": "gaussian"}, True), ({"guess": "ntk"}, False),
    ({"guess": "global"}, False), ({"guess": "gaussian"}, False),
], ids=["local-guess", "local-target", "ntk", "backprop", "random-guess"])
def test_an_optimizer_without_the_heads_warns_when_the_method_trains_them(method, warns):
    _, converted, _, _ = _resnet(**method)
    assert converted.method.trains_heads == warns
    optimizer = torch.optim.SGD(converted.blocks.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted.train_step(optimizer)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    if warns:
        assert len(messages) == 1 and "the heads (the method trains them): heads.0." in messages[0]
        assert "converted.parameters()" in messages[0]
    else:
        assert not messages


# ----------------------------------------------------------------------------- eval mode
@pytest.mark.parametrize("when", ["after convert", "before convert"])
def test_training_in_eval_mode_is_refused_unless_allowed(when):
    model = fwdtrans.models.resnet18(width=2)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    if when == "before convert":
        model.eval()
    converted = fwdtrans.convert(model, x[:2], blocks=3, heads="linear")
    if when == "after convert":
        converted.eval()
    step = converted.train_step(torch.optim.SGD(converted.parameters(), lr=0.1))
    with refused(r"eval mode.*Fix: converted\.train\(\).*allow_eval=True", model, converted):
        step(x, y)
    with refused(r"eval mode", model, converted):
        converted.compute_gradients(x, y)
    buffers = copy.deepcopy(dict(converted.named_buffers()))
    converted.compute_gradients(x, y, allow_eval=True)
    converted.train_step(torch.optim.SGD(converted.parameters(), lr=0.1), allow_eval=True)(x, y)
    for name, b in converted.named_buffers():  # eval-mode BatchNorm keeps its statistics
        assert torch.equal(b, buffers[name]), name


# ----------------------------------------------------------------------------- heads
@pytest.mark.parametrize("head, match", [
    (lambda shape: nn.Sequential(nn.Flatten(), nn.LazyLinear(5)), r"output \(2, 2, 16, 16\) to \(2, 5\), not"),
    (lambda shape: nn.Sequential(nn.Flatten(), nn.LazyLinear(10), nn.Unflatten(1, (10, 1))), r"to \(2, 10, 1\)"),
    (nn.Linear(3, 10), r"\(Linear\) fails on the block's output \(2, 2, 16, 16\): RuntimeError"),
    (lambda shape: nn.Identity(), r"to \(2, 2, 16, 16\), not to logits \(2, 10\)"),
], ids=["classes", "extra-dim", "raises", "features"])
def test_a_head_that_does_not_return_logits_is_refused_at_convert(head, match):
    model = fwdtrans.models.resnet18(width=2)
    with refused(rf"the block ending at 'layer1.1'.*{match}.*Fix: make it map features \(N, 2, 16, 16\)", model):
        fwdtrans.convert(model, torch.randn(2, 3, 16, 16), blocks=["layer1"], heads=head)


def test_a_head_callable_may_take_the_number_of_classes():
    model, x = fwdtrans.models.resnet18(width=2), torch.randn(2, 3, 16, 16)
    seen = []

    def head(shape, classes):
        seen.append((shape, classes))
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(classes))

    fwdtrans.convert(model, x, blocks=["layer1"], heads=head)
    assert seen == [((2, 16, 16), 10)]
    with refused(r"head callable 'three' has the signature \(shape, classes, width\).*head\(shape, num_classes\)",
                 model):
        def three(shape, classes, width):
            return nn.Identity()

        fwdtrans.convert(model, x, blocks=["layer1"], heads=three)


def test_a_heads_key_that_names_no_cut_is_refused_with_the_valid_keys():
    model = fwdtrans.models.resnet18(width=2)
    x = torch.randn(2, 3, 16, 16)
    with refused(r"'layer9' names no cut.*Valid keys: 'layer1.1', 'layer2.1'.*'\*'", model):
        fwdtrans.convert(model, x, blocks=["layer1", "layer2"], heads={"layer9": "mlp", "*": "linear"})
    with refused(r"several keys name the cut 'layer1.1'", model):
        fwdtrans.convert(model, x, blocks=["layer1"], heads={"layer1": "mlp", "layer1.1": "linear"})


def test_heads_keys_accept_every_name_that_blocks_accepts():
    model = fwdtrans.models.resnet18(width=2)
    x = torch.randn(2, 3, 16, 16)
    point = next(p for p in fwdtrans.inspect(model, x).points if len(p.aliases) > 2)
    for alias in point.aliases:
        converted = fwdtrans.convert(model, x, blocks=[alias], heads={alias: "mlp", "*": "linear"})
        assert converted.cut_names == (point.name,)
        assert any(isinstance(m, nn.BatchNorm1d) for m in converted.heads[0].modules()), alias  # the MLP head


def test_a_module_head_is_deep_copied_for_each_cut():
    model = fwdtrans.models.resnet18(width=2)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    mine = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 10))
    before = copy.deepcopy(mine.state_dict())
    converted = fwdtrans.convert(model, x[:2], blocks=["layer1.0", "layer1.1"], heads=mine)
    first, second = converted.heads[0], converted.heads[1]
    assert first is not mine and second is not mine and first is not second
    converted.train_step(torch.optim.SGD(converted.parameters(), lr=0.5))(x, y)
    assert not torch.equal(first[2].weight, before["2.weight"])  # the copies train
    for name, value in mine.state_dict().items():  # the user's module does not
        assert torch.equal(value, before[name]), name


# ----------------------------------------------------------------------------- blocks
@pytest.mark.parametrize("blocks, match", [
    (1, r"blocks=1: fwdtrans needs at least 2 blocks; one block has no cut"),
    ([], r"blocks=\[\]: fwdtrans needs at least 2 blocks; one block has no cut"),
    (0, r"blocks=0: fwdtrans needs at least 2 blocks"),
    (-3, r"blocks=-3: fwdtrans needs at least 2 blocks"),
    (True, r"blocks=True is neither a block count nor a list of cut names"),
    (2.5, r"blocks=2.5 is neither a block count nor a list of cut names"),
    ("layer1", r"blocks='layer1' is neither.*e\.g\. blocks=\['layer1'\]"),
], ids=str)
def test_block_requests_that_mean_nothing_are_refused(blocks, match):
    model = fwdtrans.models.resnet18(width=2)
    with refused(match, model):
        fwdtrans.convert(model, torch.randn(2, 3, 16, 16), blocks=blocks)


# ----------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("make, match", [
    (lambda x: x[:, :1], r"x is float32 \(4, 1, 16, 16\).* float32 \(N, 3, 16, 16\).*Fix: pass x with per-sample"),
    (lambda x: (x * 50).to(torch.uint8), r"input x is uint8 .*Fix: x\.float\(\) / 255"),
    (lambda x: x.double(), r"x is float64 \(4, 3, 16, 16\).*float32 \(N, 3, 16, 16\).*Fix: x\.to\(torch\.float32\)"),
    (lambda x: x.numpy(), r"input x is a numpy\.ndarray of shape \(4, 3, 16, 16\).*Fix: torch\.as_tensor\(x\)"),
    (lambda x: (x, x), r"expected x: float32 \(N, 3, 16, 16\); got x: .*, extra input 1: .*Fix: pass"),
], ids=["channels", "uint8", "float64", "numpy", "two-inputs"])
def test_inputs_that_do_not_match_the_example_inputs_are_refused(make, match):
    model, converted, x, y = _resnet()
    step = converted.train_step(torch.optim.SGD(converted.parameters(), lr=0.1))
    with refused(match, model, converted):
        step(make(x), y)


def test_a_batch_of_one_with_batchnorm_and_an_empty_batch_are_refused():
    model = _mlp()
    x, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    converted = fwdtrans.convert(model, x, blocks=["2"], heads="mlp")
    step = converted.train_step(torch.optim.SGD(converted.parameters(), lr=0.1))
    with refused(r"a batch of 1 sample: BatchNorm 'blocks.0.1' .*Fix: use batches of at least 2", model, converted):
        step(x[:1], y[:1])
    with refused(r"the batch is empty \(0 samples\).*Fix: skip empty batches", model, converted):
        step(x[:0], y[:0])
    converted.blocks[0].get_submodule("1").eval()  # only the head's BatchNorm left in train mode
    with refused(r"BatchNorm 'heads.0.1'", model, converted):
        step(x[:1], y[:1])


# ----------------------------------------------------------------------------- other raw errors
@pytest.mark.parametrize("name", ["meta", "graph", "code"])
def test_a_submodule_named_like_a_graph_module_attribute_converts_and_trains(name):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            setattr(self, name, nn.Sequential(nn.Linear(4, 8), nn.ReLU()))
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(getattr(self, name)(x))

    torch.manual_seed(0)
    model = Model()
    x, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    converted = fwdtrans.convert(model, x, blocks=[name], heads="linear")
    assert converted.cut_names == (name,) and torch.equal(converted(x), model(x))
    converted.train_step(torch.optim.SGD(converted.parameters(), lr=0.5))(x, y)
    trained = Model()
    trained.load_state_dict(converted.original_state_dict())  # strict: the original names
    assert torch.equal(trained(x), converted(x)) and not torch.equal(trained(x), model(x))
    converted.load_original_state_dict(model.state_dict())
    assert torch.equal(converted(x), model(x))


def test_a_model_on_the_meta_device_is_refused():
    with torch.device("meta"):
        model = _mlp()
    with refused(r"Sequential has parameters on the meta device.*Fix: .*to_empty"):  # no data to compare
        fwdtrans.convert(model, torch.randn(2, 4), blocks=2)


def test_a_function_is_not_a_model():
    with pytest.raises(FwdTransError, match=r"model is a function, not an nn\.Module.*Fix: wrap it"):
        fwdtrans.convert(lambda x: x.sum(1, keepdim=True), torch.randn(2, 4), blocks=2)


def test_autocast_is_refused_with_the_reason():
    model, converted, x, y = _resnet()
    step = converted.train_step(torch.optim.SGD(converted.parameters(), lr=0.1))
    with torch.autocast("cpu", dtype=torch.bfloat16), refused(
            r"torch\.autocast\('cpu', torch\.bfloat16\), which torch\.func\.jvp does not support.*Fix: call the step "
            r"outside torch\.autocast", model, converted):
        step(x, y)


def test_the_non_finite_loss_check_still_applies():
    model, converted, x, y = _resnet()
    x[0, 0, 0, 0] = float("inf")
    with refused(r"the loss is (nan|inf): the step was not applied.*Fix: lower the learning rate", model, converted):
        converted.train_step(torch.optim.SGD(converted.parameters(), lr=0.1))(x, y)


# ----------------------------------------------------------------------------- several inputs
class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(3, 6)
        self.mid = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Tanh())
        self.fc = nn.Linear(6, 3)

    def forward(self, a, b):
        return self.fc(self.mid(torch.relu(self.a(a) + self.b(b))))


class DictInput(nn.Module):
    """An image vector, token ids and a float mask in one dict."""

    def __init__(self):
        super().__init__()
        self.image, self.tokens = nn.Linear(4, 6), nn.Embedding(10, 6)
        self.mid = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Tanh())
        self.fc = nn.Linear(6, 3)

    def forward(self, batch):
        tokens = (self.tokens(batch["ids"]) * batch["mask"][..., None]).sum(1)
        return self.fc(self.mid(torch.relu(self.image(batch["image"]) + tokens)))


def _inputs(kind: str, n: int):
    if kind == "two":
        return TwoInputs(), (torch.randn(n, 4), torch.randn(n, 3))
    return DictInput(), {"image": torch.randn(n, 4), "ids": torch.randint(0, 10, (n, 5)),
                         "mask": (torch.rand(n, 5) > 0.3).to(torch.get_default_dtype())}


def _call(model, x):
    return model(*x) if isinstance(x, tuple) else model(x)


@pytest.mark.parametrize("kind", ["two", "dict"])
def test_several_inputs_reach_block_0_and_train(kind, float64):
    torch.manual_seed(0)
    model, x = _inputs(kind, 6)
    y = torch.randint(0, 3, (6,))
    backprop = fwdtrans.convert(model, x, blocks=2, heads="linear", guess="global")
    assert torch.equal(_call(backprop, x), _call(model, x))
    backprop.compute_gradients(x, y)
    expected = copy.deepcopy(model)
    torch.nn.functional.cross_entropy(_call(expected, x), y).backward()
    for name, p in backprop.blocks.named_parameters(prefix="blocks"):
        torch.testing.assert_close(p.grad, dict(expected.named_parameters())[backprop.original_name(name)].grad)
    # forward gradients: the forward engine agrees with the reference engine; the step applies the optimizer
    for space in ("weight", "activity"):
        forward = fwdtrans.convert(model, x, blocks=2, heads="linear", space=space)
        reference = copy.deepcopy(forward)
        reference.method = fwdtrans.Method(space=space, engine="reference")
        forward.compute_gradients(x, y)
        reference.compute_gradients(x, y)
        for (name, p), q in zip(forward.named_parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=f"{space}: {name}")
    first = next(forward.blocks[0].parameters())
    before = first.detach().clone()
    metrics = forward.train_step(torch.optim.SGD(forward.parameters(), lr=0.1))(x, y)
    assert torch.isfinite(metrics["loss"]) and not torch.equal(first, before)


@pytest.mark.parametrize("kind, make, match", [
    ("two", lambda x: x[0], r"expected a: float32 \(N, 4\), b: float32 \(N, 3\); got a: float32 \(6, 4\)"),
    ("two", lambda x: (x[1], x[0]), r"input a is float32 \(6, 3\).*float32 \(N, 4\)"),
    ("dict", lambda x: {k: v for k, v in x.items() if k != "mask"}, r"expected batch\['image'\]: .*batch\['mask'\]"),
    ("dict", lambda x: {**x, "ids": x["ids"].float()}, r"input batch\['ids'\] is float32 \(6, 5\).*int64 \(N, 5\)"),
], ids=["one-of-two", "swapped", "missing-key", "float-ids"])
def test_several_inputs_that_do_not_match_are_refused(kind, make, match):
    torch.manual_seed(0)
    model, x = _inputs(kind, 6)
    converted = fwdtrans.convert(model, x, blocks=2, heads="linear")
    with refused(match, model, converted):
        converted.compute_gradients(make(x), torch.randint(0, 3, (6,)))


@pytest.mark.parametrize("kind", ["two", "dict"])
def test_several_inputs_compile_to_what_eager_computes(kind, float64):
    torch.manual_seed(0)
    model, x = _inputs(kind, 6)
    y = torch.randint(0, 3, (6,))
    eager = fwdtrans.convert(model, x, blocks=2, heads="linear")
    compiled = copy.deepcopy(eager)
    m_eager = eager.compute_gradients(x, y)
    m_compiled = compiled.compute_gradients(x, y, compile={"backend": "aot_eager"})
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)
    for k in m_eager:
        torch.testing.assert_close(m_compiled[k], m_eager[k], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("compile", ["yes", 1, None])
def test_compile_takes_a_bool_or_a_mapping(compile):
    model, converted, x, y = _resnet()
    with refused(rf"compile={compile!r} is neither a bool nor a mapping.*Fix: compile=True", converted):
        converted.train_step(torch.optim.SGD(converted.parameters(), lr=0.1), compile=compile)
    with refused(rf"compile={compile!r}", converted):
        converted.compute_gradients(x, y, compile=compile)


def test_a_checkpoint_with_a_wrong_shape_names_the_original_key():
    model, converted, x, y = _resnet()
    state = model.state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(3, 2, 3, 3)
    with refused(r"'layer1.0.conv1.weight' has shape \(3, 2, 3, 3\), the converted model's \(2, 2, 3, 3\)",
                 converted):
        converted.load_original_state_dict(state)
