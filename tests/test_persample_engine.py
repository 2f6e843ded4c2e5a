"""``space="weight", granularity="sample"`` in the engine: both engines against per-sample weight copies.

The reference (``test_persample``'s) gives every trained parameter of a block a stacked copy ``(B, *p)``,
sample ``n`` using row ``n`` in every layer, and runs the block on the whole batch in train mode, so
that ``torch.autograd.grad`` with respect to the copies gives each sample's share of a loss's batch
gradient, train-mode BatchNorm's coupling included. A block's estimate is
``sum_n <t_n, g_n> / (|g_n|^2 + eps) g_n`` per parameter tensor, ``t_n`` the share of its target's
gradient (the global loss through the later blocks, its head's loss, or block ``j+1``'s head loss
through block ``j+1``), ``g_n`` the share of its head's loss (local, NTK guesses) or the step's
per-sample noise draw. Everything in float64.
"""

from __future__ import annotations

import copy
import dataclasses
import time

import pytest
import torch
import torch.nn.functional as F
from models import Generated
from test_persample import Residual, _projection, _shares
from torch import nn
from torch._dynamo.utils import counters

import fwdtrans
from fwdtrans import FwdTransError
from fwdtrans._engine import before_step

pytestmark = pytest.mark.filterwarnings("ignore:.*tangent streams per step")


def _cnn():
    """Conv without bias -> BatchNorm, conv with bias -> GroupNorm, strided conv -> BatchNorm."""
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
                         nn.Conv2d(4, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))


def _residual():
    return nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), Residual(3, 4), Residual(4, 4, stride=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


MODELS = {
    "mlp-bn": (lambda: Generated("mlp", [4, 3, 4], "bn", 3, 2), (2,)),
    "cnn-bn-gn": (_cnn, (2, 6, 6)),
    "residual": (_residual, (2, 6, 6)),
}
TARGETS = ("global", "local", "intermediate")
GUESSES = ("local", "ntk", "gaussian")


def _converted(name, target, guess, engine, batch=5, seed=0, blocks=3):
    make, shape = MODELS[name]
    torch.manual_seed(seed)
    model = make()
    x, y = torch.randn(batch, *shape), torch.randint(0, 3, (batch,))
    projects = (target, guess) != ("local", "local")  # local learning has no engine to choose
    c = fwdtrans.convert(model, x[:2], blocks=blocks, heads="linear", target=target, guess=guess, space="weight",
                         granularity="sample", engine=engine if projects else None, seed=seed)
    return c, x, y


def _expected(converted, x, y):
    """Every block's estimate but the last's, from per-sample copies (the same noise and NTK heads as the step)."""
    ref = copy.deepcopy(converted)
    method = ref.method
    noise = before_step(ref.plan, len(y), ref.generator)  # what the step draws: NTK heads re-drawn, noise
    blocks, heads = list(ref.blocks), list(ref.heads)
    last = len(blocks) - 1
    ins, h = [x], x
    with torch.no_grad():
        for b in copy.deepcopy(blocks)[:-1]:
            h = b(h)
            ins.append(h)

    def head_loss(k, o):  # a multi-tensor cut's head returns one logits tensor per crossing tensor
        logits = heads[k](o)
        return sum(F.cross_entropy(z, y) for z in logits) if isinstance(logits, tuple) else F.cross_entropy(logits, y)

    def through(k0, k1, o):  # blocks k0..k1 (copies: their running statistics are not the step's business)
        for k in range(k0, k1 + 1):
            o = copy.deepcopy(blocks[k])(o)
        return o

    out = {}
    for j in range(last):
        block = blocks[j]
        params = {k: p for k, p in block.named_parameters() if p.requires_grad}
        if not params:
            continue
        if method.target == "global":
            target = lambda o, j=j: F.cross_entropy(through(j + 1, last, o), y)  # noqa: E731
        elif method.target == "local":
            target = lambda o, j=j: head_loss(j, o)  # noqa: E731
        elif j + 1 == last:  # intermediate: the global loss for the block before the last
            target = lambda o: F.cross_entropy(through(last, last, o), y)  # noqa: E731
        else:
            target = lambda o, j=j: head_loss(j + 1, through(j + 1, j + 1, o))  # noqa: E731
        t = _shares(block, params, ins[j], target)
        if method.guess in ("gaussian", "rademacher"):
            g = dict(zip(params, noise[j], strict=True))
        else:
            g = _shares(block, params, ins[j], lambda o, j=j: head_loss(j, o))
        out.update({f"blocks.{j}.{k}": _projection(t[k], g[k]) for k in params})
    return out


def _assert_close(actual, expected, rtol=1e-9):
    """Each tensor within ``rtol`` of its own norm or of its block's (a bias before BatchNorm is round-off)."""
    block = {}
    for k, e in expected.items():
        j = ".".join(k.split(".")[:2])
        block[j] = block.get(j, 0.0) + float(e.norm()) ** 2
    for k, e in expected.items():
        err = float((actual[k] - e).norm())
        scale = block[".".join(k.split(".")[:2])] ** 0.5
        assert err <= rtol * max(float(e.norm()), 1e-3 * scale) + 1e-14, (k, err, float(e.norm()), scale)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("engine", ["reference", "forward"])
@pytest.mark.parametrize("guess", GUESSES)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_both_engines_equal_per_sample_weight_copies(name, target, guess, engine):
    c, x, y = _converted(name, target, guess, engine)
    expected = _expected(c, x, y)
    c.compute_gradients(x, y)
    got = {n: p.grad for n, p in c.named_parameters() if n in expected}
    _assert_close(got, expected)
    # the last block gets the exact gradient of the global loss; heads learn when their loss is a guess or target
    backprop = copy.deepcopy(c)
    backprop.method = fwdtrans.Method(guess="global")
    backprop.compute_gradients(x, y)
    last = len(c.blocks) - 1
    for (n, p), q in zip(c.blocks[last].named_parameters(), backprop.blocks[last].parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-13, msg=n)
    assert all((p.grad is not None) == c.method.trains_heads for p in c.heads.parameters())


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("guess", ["rademacher", "fixed-ntk"])
def test_other_guesses_and_a_multi_tensor_cut(guess):
    """Rademacher and fixed-NTK guesses, and a cut inside a residual block (two tensors cross it)."""
    torch.manual_seed(1)
    model = Generated("rescnn", [3, 3], "bn", classes=3, in_features=2)
    x, y = torch.randn(4, 2, 5, 5), torch.randint(0, 3, (4,))
    inner = [p.name for p in fwdtrans.inspect(model, x, multi_tensor=True).points if len(p.shapes) > 1]
    for engine in ("reference", "forward"):
        c = fwdtrans.convert(model, x[:2], blocks=inner[:1], heads="linear", multi_tensor=True, guess=guess,
                             space="weight", granularity="sample", engine=engine)
        expected = _expected(c, x, y)
        c.compute_gradients(x, y)
        _assert_close({n: p.grad for n, p in c.named_parameters() if n in expected}, expected)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("guess", ["local", "gaussian"])
def test_layers_without_a_rule_take_the_fallback(guess):
    """A parameter used by a function (``x * self.scale``), PReLU and a transposed convolution: the vmap fallback
    (the node's own vjp, or jvp for the forward engine, one sample at a time)."""
    from test_persample import Scaled

    torch.manual_seed(0)
    model = nn.Sequential(Scaled(), nn.ReLU(), nn.Conv2d(2, 3, 3, stride=2), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))
    x, y = torch.randn(4, 2, 4, 4), torch.randint(0, 3, (4,))
    for engine in ("reference", "forward"):
        c = fwdtrans.convert(model, x, blocks=["1", "4"], heads="linear", guess=guess, space="weight",
                             granularity="sample", engine=engine)
        expected = _expected(c, x, y)
        c.compute_gradients(x, y)
        _assert_close({n: p.grad for n, p in c.named_parameters() if n in expected}, expected)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("guess", ["local", "gaussian"])
def test_a_block_without_trained_parameters_and_frozen_ones(guess):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    model[3].requires_grad_(False)
    x, y = torch.randn(6, 3), torch.randint(0, 3, (6,))
    for engine in ("reference", "forward"):
        c = fwdtrans.convert(model, x, blocks=["1", "2", "3"], heads="linear", guess=guess, space="weight",
                             granularity="sample", engine=engine)
        assert not list(c.blocks[1].parameters())  # a ReLU alone
        expected = _expected(c, x, y)
        c.compute_gradients(x, y)
        _assert_close({n: p.grad for n, p in c.named_parameters() if n in expected}, expected)
        assert all(p.grad is None for p in c.blocks[2].parameters() if not p.requires_grad)
        assert fwdtrans.check(c, (x, y)).ok


@pytest.mark.parametrize("guess", ["local", "gaussian"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_check_is_ok_and_reads_the_batch_gradients(guess, dtype):
    from test_check import conv_bn_net

    torch.manual_seed(0)
    model = conv_bn_net().to(dtype)
    x, y = torch.randn(8, 3, 16, 16, dtype=dtype), torch.randint(0, 5, (8,))
    c = fwdtrans.convert(model, x, blocks=3, space="weight", granularity="sample", guess=guess)
    report = fwdtrans.check(c, (x, y))
    assert report.ok, str(report)
    assert report.engine_gap < (1e-12 if dtype == torch.float64 else 1e-4)
    assert len(report.blocks) == 2 and "granularity=sample" in report.method
    for b in report.blocks:
        assert -1 <= b.cosine <= 1 and b.norm_ratio > 0 and -1 <= b.guess_cosine <= 1
    # the target check compares with is the global loss's batch gradient (backprop's)
    record: dict = {}
    ref = copy.deepcopy(c)
    ref.method = dataclasses.replace(c.method, engine="reference")
    ref._gradients(x, y, record=record)
    backprop = copy.deepcopy(model)
    F.cross_entropy(backprop(x), y).backward()
    truth = dict(backprop.named_parameters())
    for j, b in enumerate(record["blocks"][:-1]):
        names = [n for n, p in c.blocks[j].named_parameters() if p.requires_grad]
        assert len(b.target) == len(names)
        for n, t in zip(names, b.target, strict=True):
            e = truth[c.original_name(f"blocks.{j}.{n}")].grad
            torch.testing.assert_close(t, e, rtol=1e-4 if dtype == torch.float32 else 1e-10,
                                       atol=1e-6 if dtype == torch.float32 else 1e-13)


def test_dropout_masks_are_replayed_by_the_forward_engine(float64):
    """The forward engine runs each block, and those its streams cross, again per chunk of streams."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 8), nn.BatchNorm1d(8),
                          nn.Dropout(0.5), nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    c = fwdtrans.convert(model, x, blocks=["2", "5"], heads="linear", space="weight", granularity="sample")
    assert all(c.dropout)
    assert fwdtrans.check(c, (x, y)).ok
    with pytest.raises(FwdTransError, match="replay its dropout mask"):
        c.compute_gradients(x, y, compile=True)


def test_invalid_combinations_and_the_cost_warning():
    model, x = fwdtrans.models.resnet18(width=2), torch.randn(2, 3, 32, 32)
    for extra, message in (({"streams": "sequential"}, "use streams='per-block'"),
                           ({"guess": "gaussian", "tangents": 2}, "one direction per sample and parameter tensor"),
                           ({"streams": "joint"}, "streams='joint' applies to")):
        with pytest.raises(FwdTransError, match=message):
            fwdtrans.convert(model, x, blocks=2, space="weight", granularity="sample", **extra)
    with pytest.warns(UserWarning, match="Consider engine='reference'"):
        fwdtrans.convert(model, x, blocks=8, heads="linear", space="weight", granularity="sample")
    method = fwdtrans.Method(space="weight", granularity="sample")
    assert method.stream_count(3, 16, [4, 6, 2]) == 16 * 10
    assert dataclasses.replace(method, engine="reference").stream_count(3, 16, [4, 6, 2]) == 0
    assert method.describe() == "(target=global, guess=local, space=weight, granularity=sample)"


@pytest.mark.parametrize("engine", ["reference", "forward"])
def test_compiled_step_equals_eager(engine, float64):
    """``compile=True`` (``aot_eager``: the captured graph without code generation): the blocks' rewritten
    graphs and their deltas' shapes are built eagerly before the compiled call, so two steps compile once."""
    from test_compile import _compare

    torch.manual_seed(0)
    model = Generated("cnn", [4, 4], "bn", classes=3, in_features=2)
    x, y = torch.randn(6, 2, 5, 5), torch.randint(0, 3, (6,))
    converted = fwdtrans.convert(model, x[:2], blocks=3, heads="linear", space="weight", granularity="sample",
                                 guess="ntk", engine=engine)
    graphs = counters["stats"]["unique_graphs"]
    start = time.perf_counter()
    _compare(converted, x, y, {"backend": "aot_eager"})
    print(f"compiled per-sample step ({engine}): {time.perf_counter() - start:.0f} s")
    assert counters["stats"]["unique_graphs"] - graphs == 1  # two steps, one graph: no recompilation


def test_noise_guesses_follow_the_official_code_shrunk_by_the_tensor_size(float64):
    """A random guess is one draw ``v_n`` per sample, used as the official code does, normalised by ``|v_n|^2``:
    ``v_n / |v_n|`` is uniform on the sphere, so the estimate's expectation is ``T_p / numel(p)``, not ``T_p``."""
    from torch import fx
    from torch.func import vjp

    from fwdtrans._persample import per_sample_projection

    torch.manual_seed(0)
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(3, 2), nn.Tanh()))
    params = dict(gm.named_parameters())
    x, cot = torch.randn(4, 3), torch.randn(4, 2)
    pull = vjp(lambda p: torch.func.functional_call(gm, p, (x,)), params)[1]
    truth = {k: t.detach() for k, t in pull(cot)[0].items()}
    gen = torch.Generator().manual_seed(0)
    draws = 2000
    mean = {k: torch.zeros_like(p) for k, p in params.items()}
    for _ in range(draws):
        noise = {k: torch.randn(4, *p.shape, generator=gen) for k, p in params.items()}
        for k, e in per_sample_projection(gm, params, {}, (x,), cot, None, noise=noise).items():
            mean[k] += e / draws
    for k, p in params.items():
        scaled = mean[k] * p.numel()
        cosine = float((scaled * truth[k]).sum() / (scaled.norm() * truth[k].norm()))
        assert cosine > 0.98 and abs(float(scaled.norm() / truth[k].norm()) - 1) < 0.1, (k, cosine)
