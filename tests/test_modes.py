"""Layers traced through whose arguments depend on the mode (``F.batch_norm(..., self.training)``,
``F.dropout(..., training=self.training)``), buffers written in Python, unsupplied default arguments and
the messages of models that cannot be cut (issue 21, items 1, 4 and 6)."""

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from models import FunctionalBatchNorm, assert_gradients_match, draw_plan, generated_models
from torch import nn

import fwdtrans


class Drop(nn.Module):  # dropout written as many libraries write it
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, training=self.training)


class Net(nn.Module):
    def __init__(self, p: float = 0.5):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 3, padding=1), FunctionalBatchNorm(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), FunctionalBatchNorm(4)
        self.drop, self.fc = Drop(p), nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(self.drop(x.mean((2, 3))))


def _buffers(state: dict) -> dict:
    return {k: v.clone() for k, v in state.items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("training", [True, False])
def test_a_converted_model_follows_the_mode_of_layers_traced_through(training):
    torch.manual_seed(0)
    model, x = Net(), torch.randn(4, 3, 8, 8)
    model(x)  # running statistics that are not the initial ones
    model.train(training)
    before = _buffers(model.state_dict())
    converted = fwdtrans.convert(model, x, blocks=2, heads="linear")
    # convert leaves every buffer as the model had it, the model's and the converted model's own
    assert all(torch.equal(v, before[k]) for k, v in _buffers(model.state_dict()).items())
    assert all(torch.equal(v, before[k]) for k, v in _buffers(converted.original_state_dict()).items())
    model.eval(), converted.eval()
    assert torch.equal(converted(x), model(x))  # running statistics, dropout off
    assert all(torch.equal(v, before[k]) for k, v in _buffers(converted.original_state_dict()).items())
    model.train(), converted.train()
    torch.manual_seed(1)
    expected = model(x)
    torch.manual_seed(1)
    assert torch.equal(converted(x), expected)  # batch statistics, the same dropout mask
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in _buffers(converted.original_state_dict()).items())


def test_a_step_updates_the_statistics_as_one_eager_forward_and_counts_the_batch():
    torch.manual_seed(0)
    model, x, y = Net(p=0.0), torch.randn(6, 3, 8, 8), torch.randint(0, 3, (6,))
    converted = fwdtrans.convert(model, x, blocks=2, heads="linear")
    converted.train_step(torch.optim.SGD(converted.parameters(), lr=0.0))(x, y)
    model(x)
    state = converted.original_state_dict()
    for k, v in _buffers(model.state_dict()).items():
        torch.testing.assert_close(state[k], v, rtol=1e-6, atol=1e-7, msg=k)
    assert int(state["b1.num_batches_tracked"]) == 1
    converted.eval()  # an eval-mode step (allow_eval) counts nothing and uses the running statistics
    converted.compute_gradients(x, y, allow_eval=True)
    assert torch.equal(converted.original_state_dict()["b1.running_mean"], state["b1.running_mean"])
    assert int(converted.original_state_dict()["b1.num_batches_tracked"]) == 1


@given(generated_models(norms=("bnf",), kinds=("cnn", "rescnn")), st.data())
def test_generated_models_with_batchnorm_traced_through(sample, data):
    """converted == model in both modes, buffers untouched by convert, a step's statistics those of one
    eager forward."""
    model, x, y = sample
    blocks, heads = draw_plan(data, model, x)
    before = _buffers(model.state_dict())
    converted = fwdtrans.convert(model, x, blocks=blocks, heads=heads)
    assert all(torch.equal(v, before[k]) for k, v in _buffers(converted.original_state_dict()).items())
    model.eval(), converted.eval()
    assert torch.equal(converted(x), model(x))
    converted.train()
    converted.compute_gradients(x, y)
    model.train()(x)
    for k, v in _buffers(model.state_dict()).items():
        torch.testing.assert_close(converted.original_state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_backprop_through_layers_traced_through_equals_autograd(float64):
    torch.manual_seed(0)
    model, x, y = Net(p=0.0).double(), torch.randn(6, 3, 8, 8), torch.randint(0, 3, (6,))
    converted = fwdtrans.convert(model, x, blocks=3, heads="linear", guess="global")
    converted.compute_gradients(x, y)
    F.cross_entropy(model(x), y).backward()
    expected = {n: p.grad for n, p in model.named_parameters()}
    actual = {converted.original_name(n): p.grad for n, p in converted.named_parameters() if n.startswith("blocks.")}
    assert_gradients_match(actual, expected, rtol=1e-10)


@pytest.mark.parametrize("space", ["activity", "weight"])
def test_check_is_ok_on_layers_traced_through(space):
    torch.manual_seed(0)
    model, x, y = Net(p=0.0).double(), torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (6,))
    converted = fwdtrans.convert(model, x, blocks=3, heads="linear", space=space)
    assert fwdtrans.check(converted, (x, y)).ok


def test_a_modal_block_survives_copy_and_pickle():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(4, 3, 8, 8)
    converted = fwdtrans.convert(model, x, blocks=2, heads="linear")
    for twin in (copy.deepcopy(converted), pickle.loads(pickle.dumps(converted))):
        original = copy.deepcopy(model)
        for mode in (False, True, False):
            original.train(mode), twin.train(mode), converted.train(mode)
            torch.manual_seed(2)
            expected = original(x)
            torch.manual_seed(2)
            assert torch.equal(twin(x), expected)
    assert converted.blocks[0].graph is converted.blocks[0].mode_graphs[False]


def test_a_block_in_mixed_modes_is_refused():
    converted = fwdtrans.convert(Net(), torch.randn(4, 3, 8, 8), blocks=2, heads="linear")
    converted.blocks[0].b1.eval()
    with pytest.raises(fwdtrans.FwdTransError, match=r"block 0 is in train mode but its module 'b1' is not"):
        converted.compute_gradients(torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,)))


def test_buffers_written_in_python_are_refused_or_counted():
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(3, 3), nn.Linear(3, 2)
            self.register_buffer("count", torch.zeros(()))

        def forward(self, x):
            self.count += 1
            return self.fc2(torch.relu(self.fc1(x)))

    with pytest.raises(fwdtrans.FwdTransError, match=r"'the top-level module' \(Counting\) writes its buffer 'count'"):
        fwdtrans.convert(Counting(), torch.randn(2, 3), blocks=2)
    cumulative = Net()
    cumulative.b2.momentum = None
    with pytest.raises(fwdtrans.FwdTransError, match=r"'b2' \(FunctionalBatchNorm\) is a BatchNorm with momentum=None"):
        fwdtrans.convert(cumulative, torch.randn(4, 3, 8, 8), blocks=2)


def test_operations_that_differ_by_mode_are_refused_naming_the_class():
    class Noisy(nn.Module):
        def forward(self, x):
            return x + torch.randn_like(x) if self.training else x

    with pytest.raises(fwdtrans.FwdTransError, match=r"module '1' \(Noisy\).*leaf_modules=\[Noisy\]"):
        fwdtrans.convert(nn.Sequential(nn.Linear(3, 4), Noisy(), nn.Linear(4, 2)), torch.randn(2, 3), blocks=2)


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, mask=None, causal=False):
        y = self.fc(x)
        if mask is not None:
            y = y + mask
        return torch.tanh(2 * y if causal else y)


class Stack(nn.Module):  # timm's ViT: forward(x, attn_mask=None, is_causal=False)
    def __init__(self):
        super().__init__()
        self.layers, self.out = nn.ModuleList(Layer() for _ in range(4)), nn.Linear(8, 3)

    def forward(self, x, attn_mask=None, is_causal=False):
        for layer in self.layers:
            x = layer(x, attn_mask, is_causal)
        return self.out(x)


def test_unsupplied_default_arguments_are_specialised():
    model, x = Stack(), torch.randn(4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        converted = fwdtrans.convert(model, x, blocks=4, heads="linear")
    assert converted.cut_names == ("layers.0", "layers.1", "layers.2")
    assert converted.input_names == ("x",)
    assert torch.equal(converted(x), model(x))


def test_unbalanced_blocks_warn_naming_the_tensor_that_blocks_the_cut():
    model, x = Stack(), torch.randn(4, 8)
    with pytest.warns(UserWarning, match=r"block 0 holds \d+% of the flops.*the input 'attn_mask' is live across it"):
        fwdtrans.convert(model, (x, torch.randn(4, 8)), blocks=2, heads="linear")


def test_a_model_with_no_cut_point_is_told_why():
    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(x) * self.a(x).sum(1, keepdim=True)

    with pytest.raises(fwdtrans.FwdTransError, match=r"Both cannot be cut: it has no place where exactly one tensor "
                                                      r"crosses.*multi_tensor=True") as error:
        fwdtrans.convert(Both(), torch.randn(2, 4), blocks=2)
    assert "blocks=1" not in str(error.value)


def test_a_top_level_forward_of_args_and_kwargs_is_told_to_be_wrapped():
    class Model(nn.Module):  # a decorated forward, as transformers' models have
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def _forward(self, x):
            return self.b(torch.relu(self.a(x)))

        def forward(self, *args, **kwargs):
            return {"logits": self._forward(*args, **kwargs)}

    with pytest.raises(fwdtrans.FwdTransError, match=r"Model.forward takes \*args/\*\*kwargs.*Wrapper") as error:
        fwdtrans.convert(Model(), torch.randn(2, 4), blocks=2)
    assert "leaf_modules" not in str(error.value)



def test_a_batchnorm_traced_through_in_two_blocks_is_refused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.bn = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), FunctionalBatchNorm(4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            x = self.bn(self.c2(torch.relu(self.bn(self.c1(x)))))
            return self.fc(x.mean((2, 3)))

    with pytest.raises(fwdtrans.FwdTransError, match=r"module 'bn' \(BatchNorm traced through\) runs in blocks 0, 1"):
        fwdtrans.convert(Twice(), torch.randn(2, 3, 4, 4), blocks=["c2"])


def test_a_compiled_step_through_layers_traced_through_equals_eager(float64):
    """torch 2.13 cannot compile a BatchNorm whose input carries a tangent while its weight does not
    (pytorch/pytorch#139756): F.batch_norm calls traced through get the same work-around as BatchNorm modules."""
    torch.manual_seed(0)
    model, x, y = Net(p=0.0).double(), torch.randn(6, 3, 8, 8), torch.randint(0, 3, (6,))
    compiled = fwdtrans.convert(model, x, blocks=3, heads="linear")
    eager = copy.deepcopy(compiled)
    compiled.compute_gradients(x, y, compile=True)
    eager.compute_gradients(x, y)
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name)
    assert torch.equal(compiled.original_state_dict()["b1.num_batches_tracked"], torch.tensor(1))


def test_one_operation_over_its_share_is_no_imbalance_to_warn_about():
    class Stem(nn.Module):  # DenseNet's 7x7 stem holds over half of its FLOPs at a small input size
        def __init__(self):
            super().__init__()
            self.conv, self.c2, self.c3, self.fc = nn.Conv2d(3, 64, 7), nn.Conv2d(64, 4, 1), nn.Conv2d(4, 4, 1), \
                nn.Linear(4, 2)

        def forward(self, x):
            h = self.conv(x)
            h = h * torch.sigmoid(h.mean((2, 3), keepdim=True))
            return self.fc(self.c3(self.c2(h).relu()).mean((2, 3)))

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fwdtrans.convert(Stem(), torch.randn(2, 3, 16, 16), blocks=3, heads="linear")
