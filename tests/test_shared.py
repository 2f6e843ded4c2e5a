"""Parameters used in several blocks: each block's gradient of its own use, summed over the uses (docs: Methods,
"Parameters used in several blocks"); a module with running statistics in several blocks is refused."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fwdtrans
import fwdtrans._step


class LinearReuse(nn.Module):
    """``shared`` runs before the first cut and after the second; ``tied=False``: its second use has its own copy."""

    cuts = ["tanh_1", "tanh_2"]

    def __init__(self, tied: bool = True, width: int = 8):
        super().__init__()
        self.inp, self.shared, self.mid, self.out = (nn.Linear(6, width), nn.Linear(width, width),
                                                     nn.Linear(width, width), nn.Linear(width, 3))
        self.again = self.shared if tied else copy.deepcopy(self.shared)

    def forward(self, x):
        h = torch.tanh(self.shared(torch.tanh(self.inp(x))))
        h = torch.tanh(self.mid(h))
        return self.out(torch.tanh(self.again(h)))


class ConvReuse(nn.Module):
    """A convolution and a parameter (read by ``get_attr``) reused across the cuts, and one parameter-free ReLU
    module for every activation."""

    cuts = ["act_1", "act_2"]

    def __init__(self, tied: bool = True):
        super().__init__()
        self.inp, self.shared = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.mid = nn.Conv2d(4, 4, 1)
        self.again = self.shared if tied else copy.deepcopy(self.shared)
        self.shift = nn.Parameter(torch.randn(4, 1, 1))
        self.shift_again = self.shift if tied else nn.Parameter(self.shift.detach().clone())
        self.act, self.fc = nn.ReLU(), nn.Linear(4, 3)

    def forward(self, x):
        h = self.act(self.shared(self.act(self.inp(x))) + self.shift)
        h = self.act(self.mid(h))
        h = self.act(self.again(h) + self.shift_again)
        return self.fc(h.mean((2, 3)))


MODELS = {"linear": (LinearReuse, (6,)), "conv": (ConvReuse, (3, 6, 6))}
PAIRS = {"shared": "again", "shift": "shift_again"}  # tied name -> the untied model's second copy


def batch(name, n=6):
    torch.manual_seed(1)
    return torch.randn(n, *MODELS[name][1]), torch.randint(0, 3, (n,))


def converted(name, tied=True, **method):
    torch.manual_seed(0)  # the same model, heads and noise for the tied and the untied model
    model = MODELS[name][0](tied)
    x, _ = batch(name)
    return model, fwdtrans.convert(model, x, blocks=model.cuts, heads="linear", **method)


def gradients(c, x, y):
    c.compute_gradients(x, y)
    return {n: p.grad for n, p in c.named_parameters()}


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def test_the_shared_parameters_run_in_two_blocks(float64):
    _, c = converted("conv")
    names = [n for n, _ in c.named_parameters(remove_duplicate=False)]
    for name in ("shared.weight", "shared.bias", "shift"):
        assert {int(n.split(".")[1]) for n in names if n.split(".", 2)[-1] == name and n.startswith("blocks")} == {0, 2}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_backprop_gives_a_shared_parameter_the_true_gradient(float64, name):
    model, c = converted(name, guess="global", target="global")
    _assert_backprop_is_autograd(model, c, *batch(name))


def _assert_backprop_is_autograd(model, c, x, y):
    """``c``'s backprop step gives every block parameter the original model's autograd gradient."""
    grads = gradients(c, x, y)
    F.cross_entropy(model(x), y).backward()
    expected = dict(model.named_parameters())
    for n, g in grads.items():
        if n.startswith("blocks."):
            close(g, expected[c.original_name(n)].grad)


def _per_block(c, x):
    """Each block's output, from its input detached: differentiating one differentiates that block's uses alone."""
    hs, h = [], x
    for block in c.blocks:
        h = block(h.detach())
        hs.append(h)
    return hs


def _local_learning(c, x, y):
    """Greedy local learning: each head's loss through its own block; the last block's loss is the global one."""
    hs = _per_block(c, x)
    return sum(F.cross_entropy(head(h), y) for head, h in zip(c.heads, hs, strict=False)) + F.cross_entropy(hs[-1], y)


def _global_local_exact(c, x, y):
    """Global target, local guess, activity space, ``per_sample="exact"``: each sample's target (the global loss's
    gradient at the cut) projected on its normalised head gradient, pulled back through its own block."""
    hs = _per_block(c, x)
    total = F.cross_entropy(hs[-1], y)
    for j, h in enumerate(hs[:-1]):
        leaf = h.detach().requires_grad_()
        out = leaf
        for block in c.blocks[j + 1:]:
            out = block(out)
        (target,) = torch.autograd.grad(F.cross_entropy(out, y), leaf)
        (guess,) = torch.autograd.grad(F.cross_entropy(c.heads[j](leaf), y), leaf)
        u = guess / guess.flatten(1).norm(dim=1).view(-1, *[1] * (guess.dim() - 1))
        d = (target * u).flatten(1).sum(1).view(-1, *[1] * (u.dim() - 1))
        total = total + (h * (d * u)).sum()
    return total


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("method, surrogate, engine", [
    ({"target": "local", "guess": "local"}, _local_learning, "forward"),
    ({"target": "global", "guess": "local", "per_sample": "exact"}, _global_local_exact, "forward"),
    ({"target": "global", "guess": "local", "per_sample": "exact"}, _global_local_exact, "reference"),
], ids=["local-learning", "global-local-activity-forward", "global-local-activity-reference"])
def test_a_shared_parameter_gets_the_sum_of_its_uses_gradients(float64, name, engine, method, surrogate):
    """Against plain autograd of a loss whose every block sees its input detached (its own uses alone)."""
    _, c = converted(name, engine=engine, **method)
    x, y = batch(name)
    grads = gradients(c, x, y)
    params = dict(c.blocks.named_parameters(prefix="blocks"))
    expected = torch.autograd.grad(surrogate(c, x, y), list(params.values()))
    for (n, _), e in zip(params.items(), expected, strict=True):
        close(grads[n], e)


METHODS = [
    {"guess": "ntk"}, {"guess": "gaussian", "tangents": 2}, {"target": "intermediate", "guess": "rademacher"},
    {"space": "span"}, {"streams": "joint"}, {"streams": "sequential"}, {"recompute": True},
    {"space": "weight"}, {"space": "weight", "granularity": "block", "guess": "gaussian"},
    {"space": "weight", "granularity": "joint"}, {"space": "weight", "granularity": "sample"},
    {"target": "local", "guess": "gaussian", "space": "weight"},
]


def _untied_sum(name, x, y, **method):
    """The tied model's gradients from the untied one's (each use its own parameter): its copies' summed."""
    _, c = converted(name, tied=False, **method)
    first = {second: first for first, second in PAIRS.items()}
    out: dict = {}
    for n, g in gradients(c, x, y).items():
        attr, dot, tail = n.split(".", 2)[-1].partition(".")
        key = f"blocks.0.{first[attr]}{dot}{tail}" if n.startswith("blocks.") and attr in first else n
        out[key] = g if key not in out else out[key] + g
    return out


@pytest.mark.filterwarnings("ignore:.*tangent streams per step")
@pytest.mark.parametrize("method, engine", [
    pytest.param(m, e, id=f"{'-'.join(f'{k}={v}' for k, v in m.items())}-{e}")
    for m in METHODS for e in ("forward", "reference")
    if not (e == "reference" and (m.get("recompute") or m.get("streams") == "sequential"))])
def test_every_method_sums_the_estimates_of_the_uses(float64, method, engine):
    """Each block's estimate treats its use as a parameter of its own: the tied model's gradient is the sum of
    the untied model's (same weights, heads and noise) over the copies."""
    for name in MODELS:
        x, y = batch(name)
        _, c = converted(name, engine=engine, **method)
        grads = gradients(c, x, y)
        expected = _untied_sum(name, x, y, engine=engine, **method)
        assert grads.keys() == expected.keys()
        for n, g in grads.items():
            torch.testing.assert_close(g, expected[n], rtol=1e-9, atol=1e-12, msg=f"{name}: {n}")


def test_a_parameter_used_twice_in_one_block_is_differentiated_as_usual(float64):
    model = LinearReuse()
    x, y = batch("linear")
    F.cross_entropy(model(x), y).backward()
    expected = {n: p.grad for n, p in model.named_parameters()}
    c = fwdtrans.convert(model, x, blocks=["tanh_3"], guess="global", target="global")
    names = [n for n, _ in c.named_parameters(remove_duplicate=False)]
    assert [n for n in names if n.endswith("shared.weight")] == ["blocks.0.shared.weight"]  # both uses in block 0
    for n, g in gradients(c, x, y).items():
        if n.startswith("blocks."):
            close(g, expected[c.original_name(n)])


def test_check_sees_a_shared_parameter_that_gets_one_use_only(float64, monkeypatch):
    """Both engines share how the gradients of a parameter's uses are gathered: check's autograd through the
    whole model catches an error there."""
    x, y = batch("conv")
    for space in ("activity", "weight"):
        _, c = converted("conv", space=space)
        report = fwdtrans.check(c, (x, y))
        assert report.ok and report.backprop_gap < 1e-12, report

    def first_use_only(model, grads):  # the bug of issue 21: named_parameters() names each parameter once
        for n, p in model.named_parameters():
            p.grad = grads.get(n)

    monkeypatch.setattr(fwdtrans._step, "write_gradients", first_use_only)
    report = fwdtrans.check(c, (x, y))
    assert report.engine_gap < 1e-12  # the engines agree on the wrong gradient
    assert not report.ok and report.backprop_gap > 1e-2
    assert report.backprop_worst.split(".", 2)[-1].split(".")[0] in ("shared", "shift")
    assert "backprop DISAGREES" in str(report) and report.backprop_worst in str(report)


class SharedNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.bn = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3), nn.BatchNorm1d(8)

    def forward(self, x):
        h = torch.tanh(self.bn(self.a(x)))
        h = torch.tanh(self.bn(self.b(h)))
        return self.c(h)


def test_a_batchnorm_run_in_two_blocks_is_refused_naming_it_and_the_fix(float64):
    x, y = torch.randn(6, 6), torch.randint(0, 3, (6,))
    with pytest.raises(fwdtrans.FwdTransError, match=r"module 'bn' \(BatchNorm1d\) runs in blocks 0, 1: .*Fix: cut"):
        fwdtrans.convert(SharedNorm(), x, blocks=["tanh"])
    model = SharedNorm()
    c = fwdtrans.convert(model, x, blocks=["tanh_1"])  # both uses in block 0: its statistics updated twice
    c.compute_gradients(x, y)
    model(x)
    close(c.blocks[0].bn.running_mean, model.bn.running_mean)
    close(c.blocks[0].bn.running_var, model.bn.running_var)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_original_state_dict_of_a_tied_model_round_trips(float64, name):
    model, c = converted(name)
    x, y = batch(name)
    step = c.train_step(torch.optim.SGD(c.parameters(), lr=0.5))
    for _ in range(2):
        step(x, y)
    state = c.original_state_dict()
    assert state.keys() == model.state_dict().keys()
    fresh = MODELS[name][0]()
    fresh.load_state_dict(state)
    assert fresh.again is fresh.shared
    close(fresh(x), c(x))
    other = converted(name)[1]
    other.load_original_state_dict(state)
    close(other(x), c(x))


@pytest.mark.usefixtures("float64")
@settings(max_examples=6, deadline=None)
@given(uses=st.lists(st.booleans(), min_size=4, max_size=6), data=st.data())
def test_backprop_through_generated_chains_with_a_reused_layer(uses, data):
    """A chain of tanh layers, each the shared Linear or one of its own, cut anywhere: backprop is autograd's."""

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(5, 5)
            self.own = nn.ModuleList(nn.Linear(5, 5) for _ in uses)
            self.out = nn.Linear(5, 3)

        def forward(self, x):
            for i, shared in enumerate(uses):
                x = torch.tanh((self.shared if shared else self.own[i])(x))
            return self.out(x)

    torch.manual_seed(0)
    model, x, y = Chain(), torch.randn(4, 5), torch.randint(0, 3, (4,))
    points = fwdtrans.inspect(model, x).points
    blocks = data.draw(st.integers(2, min(4, len(points) + 1)), label="blocks")
    c = fwdtrans.convert(model, x, blocks=blocks, guess="global", target="global")
    _assert_backprop_is_autograd(model, c, x, y)
