"""Each architecture converts, computes what it computed, and trains one step with forward gradients."""

import copy

import pytest
import torch
import torch.nn.functional as F
from models import assert_gradients_match, grads
from torch import nn
from torch.func import jvp, vjp, vmap
from zoo import ZOO, Warp

import fwdtrans
from fwdtrans._support import NativeGRU, NativeLSTM, NativeRNN, fused_rnn_free


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("space", ["activity", "weight"])
def test_zoo_converts_and_trains(name, space):
    cls, shape = ZOO[name]
    torch.manual_seed(0)
    model = cls()
    x, y = torch.randn(shape), torch.randint(0, 5, (shape[0],))
    report = fwdtrans.inspect(model, x, blocks=3)
    assert len(report.plan) == 3 and all(r["head_ratio"] <= 0.1 for r in report.plan[:-1] if r["head"] != "linear")
    converted = fwdtrans.convert(model, x, blocks=3, space=space, granularity="block" if space == "weight" else None)
    model.eval()
    converted.eval()
    assert torch.equal(converted(x), model(x))
    converted.train()
    metrics = converted.train_step(torch.optim.SGD(converted.parameters(), lr=0.01))(x, y)
    assert torch.isfinite(metrics["loss"])
    for n, p in converted.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize("name", ["vit", "mlp-mixer", "torchvision-resnet", "lstm"])
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
    from fwdtrans._blocks import push

    block = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Dropout(0.5)))
    h = torch.randn(4, 6) + 3
    streams = torch.randn(5, 4, 6)
    out, tangents, _ = push(block, h, [streams[:2], streams[2:]])  # two chunks: one mask for both
    mask = (out != 0).float() * 2  # inverted dropout keeps 1/(1-p)
    assert 0 < mask.count_nonzero() < mask.numel()
    torch.testing.assert_close(torch.cat(tangents), streams * mask)


def test_state_dict_round_trip_with_a_plain_checkpoint(tmp_path):
    model = ZOO["vit"][0]()
    converted = fwdtrans.convert(model, torch.randn(2, 3, 16, 16), blocks=3)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    trained = copy.deepcopy(converted)
    trained.load_original_state_dict(torch.load(tmp_path / "plain.pt"))
    step = trained.train_step(torch.optim.SGD(trained.parameters(), lr=0.1))
    step(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))
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
    with pytest.raises(fwdtrans.FwdTransError, match=r"different operations in train and eval mode.*'1' \(Noisy\)"):
        fwdtrans.convert(model, torch.randn(2, 3), blocks=2)
    fwdtrans.convert(model, torch.randn(2, 3), blocks=2, leaf_modules=[Noisy])  # the escape hatch


def test_attention_uses_the_math_kernel_only_when_needed():
    vit = fwdtrans.convert(ZOO["vit"][0](dropout=0.0), torch.randn(2, 3, 16, 16), blocks=3)  # flash kernel
    assert vit.math_attention
    cnn = fwdtrans.convert(ZOO["vgg"][0](), torch.randn(2, 3, 16, 16), blocks=3)
    assert not cnn.math_attention


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


RNNS = {
    "lstm": lambda: nn.LSTM(4, 5),
    "lstm-batch-first": lambda: nn.LSTM(4, 5, batch_first=True),
    "lstm-2-layers-bidirectional": lambda: nn.LSTM(4, 5, num_layers=2, bidirectional=True, batch_first=True),
    "lstm-projection": lambda: nn.LSTM(4, 5, proj_size=3, batch_first=True),
    "gru-2-layers-bidirectional": lambda: nn.GRU(4, 5, num_layers=2, bidirectional=True),
    "rnn-relu": lambda: nn.RNN(4, 5, nonlinearity="relu", batch_first=True),
}


@pytest.mark.parametrize("name", sorted(RNNS))
@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")  # torch's fused path
def test_native_rnns_equal_torch_s_and_have_forward_ad(name):
    torch.manual_seed(0)
    fused = RNNS[name]()
    native = fused_rnn_free(copy.deepcopy(fused))
    assert type(native) in (NativeLSTM, NativeGRU, NativeRNN) and isinstance(native, type(fused))
    assert native.state_dict().keys() == fused.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(native.parameters(), fused.parameters(), strict=True))
    x, streams = torch.randn(3, 7, 4), torch.randn(2, 3, 7, 4)  # (B, T) or (T, B): both are sequences here
    leaves = torch.utils._pytree.tree_leaves
    assert all(torch.equal(a, b)  # the fused kernels
               for a, b in zip(leaves(native(x)), leaves(fused(x)), strict=True))

    with torch.no_grad():  # as the engine runs: tangent streams under vmap, no autograd graph
        out, tangents = vmap(lambda t: jvp(lambda h: native(h)[0], (x,), (t,)), out_dims=(None, 0))(streams)
    torch.testing.assert_close(out, fused(x)[0])
    exact = copy.deepcopy(fused).double()  # torch's float64 RNNs have forward AD: the exact derivative
    for s, t in zip(streams, tangents, strict=True):
        torch.testing.assert_close(t, jvp(lambda h: exact(h)[0], (x.double(),), (s.double(),))[1].float())
    with torch.no_grad():  # oneDNN's LSTM has no vjp under no_grad ("argument 'workspace'"), the native kernels do
        (grad,) = vjp(lambda h: native(h)[0].sum(), x)[1](torch.tensor(1.0))
    torch.testing.assert_close(grad, torch.func.grad(lambda h: exact(h)[0].sum())(x.double()).float())


def test_convert_swaps_the_copy_s_rnns_never_the_model_s():
    model = ZOO["lstm"][0]()
    converted = fwdtrans.convert(model, torch.randn(4, 7, 6), blocks=3)
    assert type(model.lstm1) is nn.LSTM and type(model.lstm2) is nn.LSTM
    assert sum(type(m) is NativeLSTM for m in converted.modules()) == 2
    model.load_state_dict(converted.original_state_dict())  # the same names


def test_fused_rnn_free_leaves_subclasses_and_other_modules_alone():
    class MyLSTM(nn.LSTM):
        pass

    model = nn.Sequential(MyLSTM(2, 3), nn.Linear(3, 3), nn.GRU(3, 3))
    assert fused_rnn_free(model) is model
    assert [type(m) for m in model] == [MyLSTM, nn.Linear, NativeGRU]


def test_an_op_without_forward_ad_is_named_at_convert_time():
    with pytest.raises(fwdtrans.FwdTransError, match=r"(?s)node 'grid_sample'.*first cut.*engine='reference'"):
        fwdtrans.convert(Warp(), torch.randn(2, 3, 4, 4), blocks=2, heads="linear")
    fwdtrans.convert(Warp(), torch.randn(2, 3, 4, 4), blocks=["grid_sample"], heads="linear")  # in block 0


def test_the_op_named_is_the_one_the_math_attention_kernel_does_not_fix():
    class AttentionWarp(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.qkv, self.fc = nn.Conv2d(3, 4, 1), nn.Linear(4, 12), nn.Linear(4, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            q, k, v = self.qkv(h.flatten(2).transpose(1, 2)).unflatten(-1, (3, 1, 4)).permute(2, 0, 3, 1, 4)
            h = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(h.shape)
            h = F.grid_sample(h, h[:, :2].permute(0, 2, 3, 1).tanh(), align_corners=False)
            return self.fc(h.mean((2, 3)))

    with pytest.raises(fwdtrans.FwdTransError, match="node 'grid_sample'"):
        fwdtrans.convert(AttentionWarp(), torch.randn(2, 3, 4, 4), blocks=["relu"], heads="linear")


def fixes(model, x, **method):
    with pytest.raises(fwdtrans.FwdTransError) as error:
        fwdtrans.convert(model, x, **method)
    return str(error.value).split("Fix: ")[-1].split("Fixes: ")[-1].rstrip(".").split("; ")


def trains(model, x, **options):
    converted = fwdtrans.convert(model, x, heads="linear", **options)
    metrics = converted.train_step(torch.optim.SGD(converted.parameters(), lr=0.01))(x, torch.tensor([0, 1]))
    return bool(torch.isfinite(metrics["loss"]))


@pytest.mark.parametrize("method", [{}, {"space": "weight", "granularity": "block"}, {"space": "span"},
                                    {"space": "weight", "guess": "gaussian"}, {"target": "intermediate"}])
def test_every_fix_the_forward_ad_error_suggests_works(method):
    x = torch.randn(2, 3, 4, 4)
    suggested = fixes(Warp(), x, blocks=["relu", "grid_sample"], heads="linear", **method)
    assert suggested[-1].startswith("replace it with an equivalent that has forward AD")  # the docs list them
    suggested = suggested[:-1]
    if method.get("space") != "weight":  # grid_sample then fc: a cut point follows it
        assert suggested.pop(0).startswith("if fwdtrans.inspect lists a cut point after it, make that the first cut")
        assert "grid_sample" in fwdtrans.inspect(Warp(), x).names
        assert trains(Warp(), x, blocks=["grid_sample"], **method)
    for fix in suggested:
        key, value = fix.removeprefix("train with ").split(" (")[0].split("=")
        assert trains(Warp(), x, blocks=["relu", "grid_sample"], **{**method, key: value.strip("'")}), fix
    expected = [] if method.get("guess") == "gaussian" else ["target"]
    assert [f.split("=")[0].removeprefix("train with ") for f in suggested] == [*expected, "engine"]


class Opaque(torch.autograd.Function):  # no setup_context, no jvp: torch.func differentiates it neither way
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g


class Wrapped(nn.Module):
    def forward(self, x):
        return Opaque.apply(x)


@pytest.mark.parametrize("method", [{}, {"space": "weight"}])
def test_an_op_no_method_can_differentiate_gets_one_fix(method):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), Wrapped(), nn.Linear(4, 2))
    suggested = fixes(model, torch.randn(2, 3), blocks=["1"], heads="linear", leaf_modules=[Wrapped], **method)
    assert len(suggested) == 1 and suggested[0].startswith("replace it with an equivalent that has forward AD")


def test_every_fix_the_recompute_error_suggests_works():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.1), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Dropout(0.1),
                          nn.Linear(4, 2))
    x = torch.randn(2, 3)
    with pytest.raises(fwdtrans.FwdTransError, match="Fix: recompute=False, or remove dropout from the blocks before"):
        fwdtrans.convert(model, x, blocks=["2", "4"], recompute=True)
    assert trains(model, x, blocks=["2", "4"], recompute=False)
    del model[1]  # dropout left in the last block only
    assert trains(model, x, blocks=["1", "3"], recompute=True)


def test_convert_prints_nothing_while_probing_attention(capfd):
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.qkv, self.fc = nn.Linear(8, 8), nn.Linear(8, 24), nn.Linear(8, 5)

        def forward(self, x):
            q, k, v = self.qkv(torch.relu(self.inp(x))).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
            return self.fc(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2).mean(1))

    for space in ("activity", "weight"):
        converted = fwdtrans.convert(Attention(), torch.randn(2, 5, 8), blocks=["relu"], space=space)
        assert converted.math_attention
    assert capfd.readouterr() == ("", "")
