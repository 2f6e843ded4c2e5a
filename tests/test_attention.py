"""Weight space through ``F.scaled_dot_product_attention``: both engines against plain autograd, in float64.

``convert`` runs a step on the math attention kernel when the CPU flash kernel lacks forward AD. With ``"mlp"``
heads (a linear map of the token mean, then BatchNorm) a head's loss ignores every parameter that shifts all
tokens alike (the value and output projections' biases): their guesses are zero but for round-off, which
differs with the path that computed them (the attention kernel, an engine). Such a tensor's guess carries no
direction (docs/methods.md): its per-tensor estimate is zero, whatever the path. Every step, either engine's
and ``check``'s, still runs on the kernel ``convert`` chose.
"""

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from models import assert_gradients_match, grads
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from zoo import ZOO

import fwdtrans
import fwdtrans._step
from fwdtrans._engine import before_step
from fwdtrans._errors import FwdTransError


class Attention(nn.Module):
    """Multi-head self-attention from four ``Linear`` layers and ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (f(x).view(b, t, self.heads, d // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))


class Residual(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attention = Attention(dim, heads)

    def forward(self, x):
        return x + self.attention(x)


class Encoder(nn.Module):
    """A pre-norm transformer layer: attention and a GELU MLP, each after a LayerNorm, with residuals."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Tokens(nn.Module):
    """Features ``(N, 5, 4)``, a linear embedding, three attention layers, token mean, classifier."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.layers = nn.Sequential(*[Residual(dim, heads) for _ in range(3)])
        self.fc = nn.Linear(dim, 5)

    def forward(self, x):
        return self.fc(self.layers(self.embed(x)).mean(1))


class Bert(nn.Module):
    """Token ids ``(N, 5)``, embeddings and positions, two encoder layers, LayerNorm, token mean, classifier."""

    def __init__(self, dim=8, heads=2, vocab=11):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, 5, dim))
        self.layers = nn.Sequential(Encoder(dim, heads), Encoder(dim, heads))
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 5)

    def forward(self, x):
        return self.fc(self.norm(self.layers(self.embed(x) + self.pos)).mean(1))


class ViT(nn.Module):
    """Images ``(N, 3, 8, 8)``, 4x4 patches, a class token, two encoder layers, LayerNorm, classifier."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.patches = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 5, dim))
        self.layers = nn.Sequential(Encoder(dim, heads), Encoder(dim, heads))
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.patches(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.fc(self.norm(self.layers(x))[:, 0])


MODELS = {"tokens": (Tokens, lambda n: torch.randn(n, 5, 4)),
          "bert": (Bert, lambda n: torch.randint(0, 11, (n, 5))),
          "vit": (ViT, lambda n: torch.randn(n, 3, 8, 8))}


def _converted(name, heads, **method):
    torch.manual_seed(0)
    model, inputs = MODELS[name]
    x, y = inputs(6), torch.randint(0, 5, (6,))
    converted = fwdtrans.convert(model(), x[:2], blocks=3, heads=heads, **{"space": "weight", **method})
    assert converted.math_attention  # the CPU flash kernel has no forward AD
    return converted, (x, y)


def _methods():
    out = []
    for target in ("global", "local"):
        for guess in ("local", "ntk", "gaussian"):
            for granularity in ("tensor", "block", "joint"):
                try:
                    out.append(fwdtrans.Method(target=target, guess=guess, space="weight", granularity=granularity))
                except FwdTransError:  # joint needs the global target
                    pass
    return out


METHODS = _methods()


def reference(converted, x, y):
    """The weight-space estimator from its definition (docs/methods.md), with ``torch.autograd`` on a copy, on the
    math kernel. Per projection unit (a tensor, a block, every block) the target ``T`` is projected on the guess
    ``G``: ``sum <T, G> / sum |G|^2 G`` for a head's gradient (zero for a unit whose ``G`` is zero), ``sum <T, v> v``
    for noise ``v``; a head's gradient of a tensor within ``sqrt(eps)`` of its block's is round-off, taken as zero.
    The last block gets the global loss's gradient. The random draws (noise, NTK heads) are the step's:
    ``before_step``'s."""
    c = copy.deepcopy(converted)
    method, last = c.method, len(c.blocks) - 1
    noise = before_step(c.plan, len(y), c.generator)
    with sdpa_kernel(SDPBackend.MATH):
        hs, h = [], (x,)
        for block in c.blocks:
            hs.append(block(*h))
            h = (hs[-1],)
        loss = F.cross_entropy(hs[-1], y)
        names = [[f"blocks.{j}.{n}" for n, _ in block.named_parameters()] for j, block in enumerate(c.blocks)]
        params = [list(block.parameters()) for block in c.blocks]
        targets, guesses = {}, {}
        for j in range(last):
            head_loss = F.cross_entropy(c.heads[j](hs[j]), y)
            t = torch.autograd.grad(loss if method.target == "global" else head_loss, params[j], retain_graph=True)
            if method.guess == "gaussian":
                g = [v[0] for v in noise[j]]
            else:
                g = torch.autograd.grad(head_loss, params[j], retain_graph=True)
                floor = torch.finfo(g[0].dtype).eps ** 0.5 * math.sqrt(sum(float(v.norm()) ** 2 for v in g))
                g = [v if float(v.norm()) > floor else torch.zeros_like(v) for v in g]
            targets.update(zip(names[j], t, strict=True))
            guesses.update(zip(names[j], g, strict=True))
        out = dict(zip(names[last], torch.autograd.grad(loss, params[last]), strict=True))
    units = {"tensor": [[n] for j in range(last) for n in names[j]], "block": names[:last],
             "joint": [[n for j in range(last) for n in names[j]]]}[method.granularity]
    for unit in units:
        d = sum((targets[n] * guesses[n]).sum() for n in unit)
        norm2 = sum((guesses[n] ** 2).sum() for n in unit)
        scale = d if method.guess == "gaussian" else d / norm2 if norm2 > 0 else 0.0
        out.update({n: scale * guesses[n] for n in unit})
    return out


@pytest.mark.usefixtures("float64")
@settings(max_examples=8)
@given(name=st.sampled_from(sorted(MODELS)), heads=st.sampled_from(["mlp", "linear"]),
       method=st.sampled_from(METHODS))
def test_both_engines_match_autograd_on_the_math_kernel(name, heads, method):
    """Either engine's step, as ``compute_gradients`` and as ``check`` run it, equals the autograd reference."""
    converted, (x, y) = _converted(name, heads, **method.to_dict())
    expected = reference(converted, x, y)
    for engine in ("forward", "reference"):
        for step in ("compute_gradients", "_gradients"):  # the latter: the step check runs, without the checks
            c = copy.deepcopy(converted)
            c.method = dataclasses.replace(method, engine=engine)
            getattr(c, step)(x, y)
            actual = {n: g for n, g in grads(c).items() if n.startswith("blocks.")}
            assert_gradients_match(actual, expected, rtol=1e-9)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("heads", ["mlp", "linear"])
@pytest.mark.parametrize("granularity", ["tensor", "block", "joint", "sample"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_check_is_ok_with_attention(name, granularity, heads):
    converted, batch = _converted(name, heads, granularity=granularity)
    report = fwdtrans.check(converted, batch)
    assert report.ok and report.engine_gap < 1e-12, str(report)


ROUND_OFF = ("attention.v.bias", "attention.o.bias")  # every token shifted alike: the mlp head ignores them


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("granularity", ["tensor", "block"])
@pytest.mark.parametrize("engine", ["forward", "reference"])
def test_a_tensor_whose_guess_is_round_off_gets_a_zero_estimate(engine, granularity):
    """Tokens with mlp heads: the value and output biases of the blocks but the last have a round-off guess (but a
    real target) and get exactly zero; with the old ``<T, G> / |G|^2 G`` their per-tensor estimate was ``|T| cos``
    along the round-off."""
    converted, (x, y) = _converted("tokens", "mlp", granularity=granularity)
    converted.method = dataclasses.replace(converted.method, engine=engine)
    converted.compute_gradients(x, y)
    last = len(converted.blocks) - 1
    named = [(n, p) for n, p in converted.named_parameters() if n.startswith("blocks.") and n.endswith(ROUND_OFF)]
    assert {n.split(".")[1] for n, _ in named} == {str(j) for j in range(last + 1)}
    for n, p in named:
        assert (p.grad.count_nonzero() == 0) == (not n.startswith(f"blocks.{last}.")), n
    expected = reference(converted, x, y)
    assert all(float(expected[n].norm()) == 0 for n, _ in named if not n.startswith(f"blocks.{last}."))


def test_the_zoo_vit_with_mlp_heads_per_tensor(float64):
    """The ViT of tests/zoo.py (``nn.TransformerEncoderLayer``): its class token, positions, patch embedding bias
    and encoder biases before the mlp head have round-off guesses; both engines equal the reference and check
    is ok."""
    torch.manual_seed(0)
    model = ZOO["vit"][0](dropout=0.0)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    converted = fwdtrans.convert(model, x[:2], blocks=3, heads="mlp", space="weight", granularity="tensor")
    expected = reference(converted, x, y)
    assert float(expected["blocks.0.cls"].norm()) == 0 and float(expected["blocks.1.encoder.0.norm2.bias"].norm()) == 0
    for engine in ("forward", "reference"):
        c = copy.deepcopy(converted)
        c.method = dataclasses.replace(c.method, engine=engine)
        c.compute_gradients(x, y)
        assert_gradients_match({n: g for n, g in grads(c).items() if n.startswith("blocks.")}, expected, rtol=1e-9)
    report = fwdtrans.check(converted, (x, y))
    assert report.ok and report.engine_gap < 1e-12, str(report)


def test_check_runs_every_step_on_the_kernel_convert_chose(float64, monkeypatch):
    converted, batch = _converted("tokens", "mlp")
    kernels = []
    context = fwdtrans._step.attention_context

    def spy(math_attention):
        kernels.append(math_attention)
        return context(math_attention)

    monkeypatch.setattr(fwdtrans._step, "attention_context", spy)
    fwdtrans.check(converted, batch)
    assert len(kernels) >= 3 and all(kernels)  # both engines' steps and the backprop step


def test_a_reference_step_off_the_math_kernel_differs_by_round_off_only(float64, monkeypatch):
    """``check``'s reference engine on SDPA's default kernel, the forward engine's on the math kernel: the biases the
    mlp head ignores get round-off guesses that differ with the kernel (an engine gap above 1e-3 when their
    direction counted), and no estimate."""
    converted, batch = _converted("tokens", "mlp")
    run = fwdtrans._step.run

    def off_kernel(model, x, y, **kwargs):
        if model.method.engine == "reference":
            model.math_attention = False
        return run(model, x, y, **kwargs)

    monkeypatch.setattr(fwdtrans._step, "run", off_kernel)
    report = fwdtrans.check(converted, batch)
    assert report.ok and report.engine_gap < 1e-12, str(report)
