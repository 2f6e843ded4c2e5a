"""The per-sample weight-space estimate (``fwdtrans._persample``) against per-sample copies of the weights.

The reference gives every trained parameter ``p`` a stacked copy ``W`` of shape ``(B, *p)`` and runs
the block on the whole batch (train mode, BatchNorm with batch statistics) so that sample ``n`` uses
``W[n]`` in every layer. ``torch.autograd.grad`` of a loss with respect to ``W`` then gives, in row
``n``, sample ``n``'s share of that loss's batch gradient, BatchNorm coupling included. The estimate
is ``sum_n <t_n, g_n> / (|g_n|^2 + eps) g_n`` per parameter tensor, all in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import fx, nn
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_leaves, tree_map

import fwdtrans
from fwdtrans import FwdTransError
from fwdtrans._persample import choices, per_sample_projection, prepare, project, pull_inputs, record

EPS = 1e-16
TOL = 1e-10


# ----------------------------------------------------------------------------- the reference
class _PerSampleCopies(fx.Interpreter):
    """Runs a GraphModule with per-sample parameter copies ``stacked[name]`` (``(B, *p)``)."""

    def __init__(self, gm: fx.GraphModule, stacked: dict[str, torch.Tensor]):
        super().__init__(gm)
        self.stacked = stacked

    def get_attr(self, target, args, kwargs):
        return self.stacked.get(target, super().get_attr(target, args, kwargs))  # broadcast in elementwise ops

    def call_method(self, target, args, kwargs):
        if target == "expand" and any(args[0] is s for s in self.stacked.values()):  # (1, ...) expanded to the batch
            return args[0].squeeze(1)  # row n: sample n's copy
        return super().call_method(target, args, kwargs)

    def call_module(self, target, args, kwargs):
        m = self.fetch_attr(target)
        pre = f"{target}."
        w = {k: self.stacked[pre + k] for k, _ in m.named_parameters() if pre + k in self.stacked}
        if not w:
            return super().call_module(target, args, kwargs)
        x = args[0]
        b = x.shape[0]

        def per_channel(v, dim=1):  # (B, C) -> (B, C, 1, ...) against x
            return v.view(b, *([1] * (dim - 1)), *v.shape[1:], *([1] * (x.dim() - dim - v.dim() + 1)))

        if type(m) is nn.Linear:
            y = torch.einsum("n...k,nok->n...o", x, w["weight"])
            return y if m.bias is None else y + w["bias"].view(b, *([1] * (x.dim() - 2)), -1)
        if type(m) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
            if m.bias is None:
                return vmap(lambda xi, wi: m._conv_forward(xi[None], wi, None)[0])(x, w["weight"])
            return vmap(lambda xi, wi, bi: m._conv_forward(xi[None], wi, bi)[0])(x, w["weight"], w["bias"])
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            dims = [0, *range(2, x.dim())]
            if m.training or m.running_mean is None:
                mean, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
            else:
                mean = per_channel(m.running_mean[None].expand(b, -1))
                var = per_channel(m.running_var[None].expand(b, -1))
            xhat = (x - mean) / torch.sqrt(var + m.eps)
            return per_channel(w["weight"]) * xhat + per_channel(w["bias"])
        if type(m) is nn.LayerNorm:
            dims = tuple(range(x.dim() - len(m.normalized_shape), x.dim()))
            mean, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
            xhat = (x - mean) / torch.sqrt(var + m.eps)
            lead = (b, *([1] * (x.dim() - 1 - len(m.normalized_shape))), *m.normalized_shape)
            return w["weight"].view(lead) * xhat + w["bias"].view(lead)
        if type(m) is nn.GroupNorm:
            xg = x.reshape(b, m.num_groups, -1)
            xhat = ((xg - xg.mean(-1, keepdim=True)) / torch.sqrt(xg.var(-1, unbiased=False, keepdim=True) + m.eps))
            return per_channel(w["weight"]) * xhat.view_as(x) + per_channel(w["bias"])
        names = list(w)  # any other module: it does not mix samples, run it one sample at a time
        def one(xi, *ps):
            return functional_call(m, dict(zip(names, ps, strict=True)), (xi[None],))[0]
        return vmap(one)(x, *w.values())


def _shares(gm, params, x, loss_fn):
    """Per-sample shares ``(B, *p)`` of ``loss_fn(block(x))``'s gradient, per parameter."""
    block = copy.deepcopy(gm)  # the forward updates running statistics: keep the caller's
    stacked = {k: p.detach()[None].expand(x.shape[0], *p.shape).clone().requires_grad_() for k, p in params.items()}
    out = _PerSampleCopies(block, stacked).run(x)
    grads = torch.autograd.grad(loss_fn(out), list(stacked.values()), allow_unused=True)
    return {k: (torch.zeros_like(s) if g is None else g) for (k, s), g in zip(stacked.items(), grads, strict=True)}


def _projection(t, g, eps=EPS):
    tf, gf = t.flatten(1), g.flatten(1)
    c = (tf * gf).sum(1) / ((gf * gf).sum(1) + eps)
    return (c @ gf).view(t.shape[1:])


def _cotangent(gm, params, buffers, x, loss_fn):
    out = functional_call(gm, (params, {k: b.clone() for k, b in buffers.items()}), (x,))
    return torch.autograd.grad(loss_fn(out), out)[0]


def _check(est, ref):
    scale = max(float(r.norm()) for r in ref.values())
    for k in ref:
        err = float((est[k] - ref[k]).norm())
        assert err <= TOL * float(ref[k].norm()) + 1e-12 * scale, (k, err, float(ref[k].norm()))


def _case(net, x, target_loss, guess_loss, noise=False, paths=("auto", "ghost", "materialise"), chunk=None,
          seed=0):
    """``per_sample_projection`` on ``net`` (traced) against the per-sample-copies reference."""
    gm = fx.symbolic_trace(net)
    params = {k: p for k, p in gm.named_parameters() if p.requires_grad}
    buffers = dict(gm.named_buffers())
    t = _shares(gm, params, x, target_loss)
    tc = _cotangent(gm, params, buffers, x, target_loss)
    if noise:
        gen = torch.Generator().manual_seed(seed)
        v = {k: torch.randn(x.shape[0], *p.shape, generator=gen) for k, p in params.items()}
        ref = {k: _projection(t[k], v[k]) for k in params}
        gc = None
    else:
        g = _shares(gm, params, x, guess_loss)
        gc = _cotangent(gm, params, buffers, x, guess_loss)
        ref = {k: _projection(t[k], g[k]) for k in params}
        v = None
    before = {k: b.clone() for k, b in buffers.items()}
    for path in paths:
        est = per_sample_projection(gm, params, buffers, (x,), tc, gc, noise=v, chunk=chunk, path=path)
        _check(est, ref)
    for k, b in buffers.items():  # buffers are cloned inside, never mutated
        assert torch.equal(b, before[k])
    return gm, params, buffers, tc, gc


# ----------------------------------------------------------------------------- losses (targets and guesses)
def _ce(head, y):
    return lambda h: F.cross_entropy(head(h), y)


def _cnn_target(c, classes):
    """A downstream network with train-mode BatchNorm: the target's cotangent mixes the samples too."""
    return nn.Sequential(nn.Conv2d(c, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(3, classes))


def _cnn_head(c, classes, seed):
    torch.manual_seed(seed)  # seed 1: the trained "local" head; another seed: an NTK head, freshly drawn
    return nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * c, classes))


GUESSES = ["local", "ntk", "noise"]


def _losses(target_net, head_fn, c, classes, y, guess):
    target = _ce(target_net, y)
    head = head_fn(c, classes, 1 if guess == "local" else 7)
    return target, _ce(head, y)


# ----------------------------------------------------------------------------- models
class Residual(nn.Module):
    """A ResNet BasicBlock with a downsampling shortcut."""

    def __init__(self, cin, cout, stride=2):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("guess", GUESSES)
@given(batch=st.integers(2, 5), widths=st.lists(st.integers(1, 6), min_size=3, max_size=3), seed=st.integers(0, 99))
def test_mlp_with_batchnorm(guess, batch, widths, seed):
    torch.manual_seed(seed)
    d_in, d_hidden, d_out = widths
    d_out += 1  # LayerNorm over one feature outputs zeros: every gradient would be rounding noise
    net = nn.Sequential(nn.Linear(d_in, d_hidden), nn.BatchNorm1d(d_hidden), nn.ReLU(),
                        nn.Linear(d_hidden, d_out, bias=seed % 2 == 0), nn.LayerNorm(d_out), nn.Tanh())
    x, y = torch.randn(batch, d_in), torch.randint(0, 3, (batch,))
    target = _ce(nn.Sequential(nn.Linear(d_out, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3)), y)
    head = nn.Linear(d_out, 3) if guess == "local" else (torch.manual_seed(7), nn.Linear(d_out, 3))[1]
    _case(net, x, target, _ce(head, y), noise=guess == "noise", seed=seed)


conv_configs = st.fixed_dictionaries({
    "groups": st.sampled_from([1, 2]),
    "kernel": st.integers(1, 3),
    "stride": st.integers(1, 2),
    "padding": st.sampled_from([0, 1, 2, "same"]),
    "dilation": st.integers(1, 2),
    "bias": st.booleans(),
    "padding_mode": st.sampled_from(["zeros", "zeros", "reflect", "circular"]),
})


@pytest.mark.usefixtures("float64")
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")  # the model's own
@pytest.mark.parametrize("guess", GUESSES)
@given(cfg=conv_configs, batch=st.integers(2, 4), size=st.integers(5, 8), seed=st.integers(0, 99))
def test_cnn_with_batchnorm_and_groupnorm(guess, cfg, batch, size, seed):
    torch.manual_seed(seed)
    g = cfg["groups"]
    padding = cfg["padding"] if cfg["stride"] == 1 or cfg["padding"] != "same" else 1  # 'same' needs stride 1
    conv = nn.Conv2d(2 * g, 2 * g, cfg["kernel"], cfg["stride"], padding, cfg["dilation"], g, cfg["bias"],
                     cfg["padding_mode"])
    net = nn.Sequential(nn.Conv2d(3, 2 * g, 3, padding=1, bias=not cfg["bias"]), nn.BatchNorm2d(2 * g), nn.ReLU(),
                        conv, nn.GroupNorm(g, 2 * g), nn.ReLU(), nn.Conv2d(2 * g, 3, 1))
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 4, (batch,))
    target, guess_loss = _losses(_cnn_target(3, 4), _cnn_head, 3, 4, y, guess)
    _case(net, x, target, guess_loss, noise=guess == "noise", seed=seed)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("guess", GUESSES)
@given(batch=st.integers(2, 4), cin=st.integers(1, 3), cout=st.integers(1, 4), seed=st.integers(0, 99))
def test_residual_block(guess, batch, cin, cout, seed):
    torch.manual_seed(seed)
    net = Residual(cin, cout)
    x, y = torch.randn(batch, cin, 6, 6), torch.randint(0, 3, (batch,))
    target, guess_loss = _losses(_cnn_target(cout, 3), _cnn_head, cout, 3, y, guess)
    _case(net, x, target, guess_loss, noise=guess == "noise", seed=seed)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("guess", GUESSES)
@given(batch=st.integers(2, 4), t=st.integers(1, 6), d=st.integers(1, 5), seed=st.integers(0, 99))
def test_linear_on_sequences(guess, batch, t, d, seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(d, 4), nn.LayerNorm(4), nn.GELU(), nn.Linear(4, 3))
    x, y = torch.randn(batch, t, d), torch.randint(0, 3, (batch,))
    torch.manual_seed(1 if guess == "local" else 7)
    head = nn.Linear(3, 3)
    target = _ce(lambda h: nn.functional.linear(torch.tanh(h).mean(1), torch.ones(3, 3) + torch.eye(3)), y)
    _case(net, x, target, _ce(lambda h: head(h.mean(1)), y), noise=guess == "noise", seed=seed)


class ClassToken(nn.Module):
    """A ViT's class token, expanded to the batch by a size read from the input: no input of its node is batched."""

    def __init__(self, d=4):
        super().__init__()
        self.embed = nn.Linear(3, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        x = self.embed(x)
        return self.norm(torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1))


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("guess", GUESSES)
def test_a_parameter_expanded_to_the_batch_size(guess):
    """Sample ``n``'s share of the class token is its row's: the recorded size is a constant, not a layer input."""
    torch.manual_seed(0)
    x, y = torch.randn(3, 5, 3), torch.randint(0, 3, (3,))
    target = _ce(nn.Sequential(nn.Linear(4, 2), nn.Tanh(), nn.Linear(2, 3)), y)
    torch.manual_seed(1 if guess == "local" else 7)
    head = nn.Linear(4, 3)
    _case(ClassToken(), x, lambda h: target(h.mean(1)), _ce(lambda h: head(h[:, 0]), y), noise=guess == "noise",
          paths=("auto", "fallback"))


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("dims", [1, 3])
@given(batch=st.integers(2, 3), kernel=st.integers(1, 3), stride=st.integers(1, 2), groups=st.sampled_from([1, 2]),
       seed=st.integers(0, 99))
def test_conv1d_and_conv3d(dims, batch, kernel, stride, groups, seed):
    torch.manual_seed(seed)
    conv, bn = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv3d, nn.BatchNorm3d)
    net = nn.Sequential(conv(2, 2 * groups, kernel, stride, 1, groups=1), bn(2 * groups), nn.ReLU(),
                        conv(2 * groups, 2, kernel, 1, 1, 2, groups, bias=False), nn.Flatten())
    size = (5,) * dims
    x, y = torch.randn(batch, 2, *size), torch.randint(0, 3, (batch,))
    with torch.no_grad():
        features = net(x).shape[1]
    net.apply(lambda m: isinstance(m, nn.modules.batchnorm._BatchNorm) and m.reset_running_stats())
    target = _ce(nn.Sequential(nn.Linear(features, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3)), y)
    _case(net, x, target, _ce(nn.Linear(features, 3), y))


# ----------------------------------------------------------------------------- the paths agree, the fallback
class Scaled(nn.Module):
    """Parameters used by call_function nodes, and modules fwdtrans has no rule for: the vmap fallback."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.scale = nn.Parameter(torch.randn(3, 1, 1))
        self.prelu = nn.PReLU(3)
        self.up = nn.ConvTranspose2d(3, 2, 2, stride=2)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x):
        return self.bn(self.up(self.prelu(self.conv(x) * self.scale)))


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("guess", GUESSES)
def test_fallback_for_unknown_parameterised_nodes(guess):
    torch.manual_seed(0)
    net = Scaled()
    x, y = torch.randn(3, 2, 4, 4), torch.randint(0, 3, (3,))
    target, guess_loss = _losses(_cnn_target(2, 3), _cnn_head, 2, 3, y, guess)
    gm, *_ = _case(net, x, target, guess_loss, noise=guess == "noise")
    kinds = {n.op for n in gm.graph.nodes}
    assert "call_function" in kinds


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("guess", GUESSES)
def test_fallback_path_equals_the_rules_where_nothing_mixes_samples(guess):
    """``path="fallback"`` (vmap over samples of each node's own vjp) for every layer kind."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 3, 2),
                        nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(27, 6), nn.LayerNorm(6))
    net[4].eval()  # running statistics: BatchNorm does not mix samples
    with torch.no_grad():
        net[4].running_mean.uniform_(-1, 1)
        net[4].running_var.uniform_(0.5, 2)
    x, y = torch.randn(3, 2, 4, 4), torch.randint(0, 3, (3,))
    target = _ce(nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3)), y)
    _case(net, x, target, _ce(nn.Linear(6, 3), y), noise=guess == "noise",
          paths=("auto", "ghost", "materialise", "fallback"))


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("path", ["ghost", "materialise", "fallback"])
@pytest.mark.parametrize("chunk", [None, 1, 2])
def test_paths_and_chunks_agree_on_every_layer_kind(path, chunk):
    """Linear (flat and on sequences), Conv (grouped, strided, dilated, padded), norms: each forced path,
    each chunk size, gives the same numbers (and matches the reference)."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, 2, 1, 2, 2), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                        nn.Flatten(2), nn.Linear(4, 5), nn.LayerNorm(5), nn.Flatten(), nn.Linear(20, 4))
    x, y = torch.randn(5, 2, 5, 5), torch.randint(0, 3, (5,))
    target = _ce(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3)), y)
    _case(net, x, target, _ce(nn.Linear(4, 3), y), paths=(path,), chunk=chunk)
    _case(net, x, target, None, noise=True, paths=(path,), chunk=chunk)


def test_the_cost_model_picks_ghost_where_positions_are_few(float64):
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 64, 3, stride=4), nn.Flatten(2), nn.Linear(16, 2),
                        nn.Flatten(), nn.Linear(128, 3))
    gm = fx.symbolic_trace(net)
    params = dict(gm.named_parameters())
    rows = choices(record(gm, params, {}, (torch.randn(2, 3, 16, 16),)))
    assert [r["rule"] for r in rows] == ["materialise", "ghost", "materialise", "ghost"]
    assert rows[0]["positions"] == 256 and rows[1]["positions"] == 16 and rows[3]["positions"] == 1


def test_fallback_refuses_a_node_that_mixes_samples(float64):
    torch.manual_seed(0)
    x, cot = torch.randn(4, 2, 5, 5), torch.randn(4, 3, 3, 3)
    cases = ((False, "node '_1' .batchnorm. mixes the samples"), (True, "node '_1' .batchnorm. could not"))
    for stats, message in cases:
        # train mode: batch statistics (with running statistics vmap itself refuses the in-place update)
        gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, track_running_stats=stats)))
        params, buffers = dict(gm.named_parameters()), dict(gm.named_buffers())
        with pytest.raises(FwdTransError, match=message):
            per_sample_projection(gm, params, buffers, (x,), cot, cot, path="fallback")
        per_sample_projection(gm, params, buffers, (x,), cot, cot)  # its own rule is exact


@pytest.mark.usefixtures("float64")
def test_weight_sharing_sums_the_shares_before_projecting():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x):
            return self.lin(torch.relu(self.bn(self.lin(x))))

    torch.manual_seed(0)
    x, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
    target = _ce(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), y)
    net = Shared()
    gm = fx.symbolic_trace(net)
    params = dict(gm.named_parameters())
    # the reference's stacked copy is used at both call sites: its gradient is the summed share
    guess = _ce(nn.Linear(3, 3), y)
    t = _shares(gm, params, x, target)
    g = _shares(gm, params, x, guess)
    ref = {k: _projection(t[k], g[k]) for k in params}
    buffers = dict(gm.named_buffers())
    tc = _cotangent(gm, params, buffers, x, target)
    gc = _cotangent(gm, params, buffers, x, guess)
    _check(per_sample_projection(gm, params, buffers, (x,), tc, gc), ref)


def test_frozen_parameters_are_left_out(float64):
    torch.manual_seed(0)
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)))
    gm.get_submodule("1").weight.requires_grad_(False)
    params = {k: p for k, p in gm.named_parameters() if p.requires_grad}
    est = per_sample_projection(gm, params, dict(gm.named_buffers()), (torch.randn(3, 3),), torch.randn(3, 2),
                                torch.randn(3, 2))
    assert set(est) == set(params) and "1.weight" not in est


# ----------------------------------------------------------------------------- on fwdtrans blocks
@pytest.mark.usefixtures("float64")
def test_resnet18_blocks_of_convert_and_the_two_phase_api():
    """The paper's 8-block ResNet-18 (width 2): every block but the last, targets chained back from the
    global loss through :func:`record` ``wrt_inputs`` pull-backs, against the reference."""
    torch.manual_seed(0)
    model = fwdtrans.models.resnet18(width=2)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    conv = fwdtrans.convert(model, x[:2], blocks=model.paper_cuts(), heads="linear", target="global",
                            guess="local", space="weight")
    blocks, heads = conv.blocks, conv.heads
    states = [({k: p for k, p in b.named_parameters()}, {k: v.clone() for k, v in b.named_buffers()}) for b in blocks]
    recs, h = [], (x,)
    for j, b in enumerate(blocks):
        recs.append(record(b, *states[j], h, wrt_inputs=True))
        h = (recs[-1].out,)
    logits = h[0].detach().requires_grad_()
    cot = torch.autograd.grad(F.cross_entropy(logits, y), logits)[0]
    cot = project(recs[-1], cot, cot)[1][0]  # the last block: only its pull-back to its input is used here
    for j in range(len(blocks) - 2, -1, -1):
        out = recs[j].out.detach().requires_grad_()
        guess_cot = torch.autograd.grad(F.cross_entropy(heads[j](out), y), out)[0]
        est, inputs_cot = project(recs[j], cot, guess_cot)
        # reference: the global loss through the later blocks (their running statistics as in the sweep)
        later = nn.Sequential(*[copy.deepcopy(blocks[k]) for k in range(j + 1, len(blocks))])
        gm = blocks[j]
        params = states[j][0]
        xin = recs[j - 1].out.detach() if j else x
        t = _shares(gm, params, xin, lambda o, later=later: F.cross_entropy(later(o), y))
        g = _shares(gm, params, xin, lambda o, head=heads[j]: F.cross_entropy(head(o), y))
        _check(est, {k: _projection(t[k], g[k]) for k in params})
        cot = inputs_cot[0]


@pytest.mark.usefixtures("float64")
def test_intermediate_target_through_the_next_block():
    """Block ``j``'s target is block ``j + 1``'s head loss: pulled back with :func:`pull_inputs`."""
    torch.manual_seed(0)
    first = fx.symbolic_trace(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU()))
    second = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU()))
    x, y = torch.randn(4, 2, 6, 6), torch.randint(0, 3, (4,))
    head0, head1 = _cnn_head(3, 3, 1), _cnn_head(4, 3, 2)
    p0, b0 = dict(first.named_parameters()), dict(first.named_buffers())
    p1, b1 = dict(second.named_parameters()), dict(second.named_buffers())
    with torch.no_grad():
        r0 = record(first, p0, b0, (x,))
        r1 = record(second, p1, b1, (r0.out,), wrt_inputs=True)
    h1 = r1.out.detach().requires_grad_()
    (target,) = pull_inputs(r1, torch.autograd.grad(F.cross_entropy(head1(h1), y), h1)[0])
    h0 = r0.out.detach().requires_grad_()
    guess = torch.autograd.grad(F.cross_entropy(head0(h0), y), h0)[0]
    with torch.no_grad():
        est, inputs_cot = project(r0, target, guess)
    assert inputs_cot is None  # r0 was not recorded wrt its inputs
    nxt = copy.deepcopy(second)
    t = _shares(first, p0, x, lambda o: F.cross_entropy(head1(nxt(o)), y))
    g = _shares(first, p0, x, lambda o: F.cross_entropy(head0(o), y))
    _check(est, {k: _projection(t[k], g[k]) for k in p0})


def test_a_record_is_projected_once_and_noise_covers_every_parameter(float64):
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2)))
    params = dict(gm.named_parameters())
    x, cot = torch.randn(3, 3), torch.randn(3, 2)
    rec = record(gm, params, {}, (x,))
    project(rec, cot, cot)
    with pytest.raises(FwdTransError, match="already projected"):
        project(rec, cot, cot)
    with pytest.raises(FwdTransError, match="no draw for the trained parameter '1.bias'"):
        noise = {k: torch.randn(3, *p.shape) for k, p in params.items() if k != "1.bias"}
        per_sample_projection(gm, params, {}, (x,), cot, None, noise=noise)
    with pytest.raises(FwdTransError, match="guess_cot"):
        per_sample_projection(gm, params, {}, (x,), cot, None)


def test_compiles_whole_with_fullgraph(float64):
    """The projection is one ``torch.compile(fullgraph=True)`` graph once an eager call built the block's
    plan (``aot_eager``: the captured graph without code generation, as in ``test_compile.py``)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2),
                        nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 3))
    gm = fx.symbolic_trace(net)
    params, buffers = dict(gm.named_parameters()), dict(gm.named_buffers())
    x, tc, gc = torch.randn(4, 2, 4, 4), torch.randn(4, 3), torch.randn(4, 3)

    def step(x, tc, gc):
        return per_sample_projection(gm, params, buffers, (x,), tc, gc)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        with pytest.raises(Exception, match="prepare"):
            compiled(x, tc, gc)  # no plan yet
        torch._dynamo.reset()
        prepare(gm, params)
        out = compiled(x, tc, gc)  # cold shape cache: one real forward inside the graph
        eager = step(x, tc, gc)
        rules = [r["rule"] for r in choices(record(gm, params, buffers, (x,))) if "rule" in r]
        assert rules == ["materialise", "ghost", "ghost"]
        again = compiled(x, tc, gc)  # warm shape cache: recompiled once, without the extra forward
    for k in eager:
        torch.testing.assert_close(out[k], eager[k], rtol=1e-10, atol=1e-14, msg=k)
        torch.testing.assert_close(again[k], eager[k], rtol=1e-10, atol=1e-14, msg=k)


@pytest.mark.usefixtures("float64")
def test_several_and_dict_inputs():
    """A block taking a dict (block 0 of a model with dict inputs) or several tensors (a multi-tensor cut)."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.bn = nn.Linear(3, 4), nn.Linear(2, 4), nn.BatchNorm1d(4)

        def forward(self, d):
            return self.bn(self.a(d["x"]) + self.b(d["z"]))

    class Pair(Two):
        def forward(self, x, z):
            return super().forward({"x": x, "z": z})

    torch.manual_seed(0)
    x, z, y = torch.randn(5, 3), torch.randn(5, 2), torch.randint(0, 3, (5,))
    head, target_head = nn.Linear(4, 3), nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    for net, inputs in ((Two(), ({"x": x, "z": z},)), (Pair(), (x, z))):
        gm = fx.symbolic_trace(net)
        params, buffers = dict(gm.named_parameters()), dict(gm.named_buffers())
        out = functional_call(gm, (params, {k: b.clone() for k, b in buffers.items()}), inputs)
        tc = torch.autograd.grad(F.cross_entropy(target_head(out), y), out)[0]
        gc = torch.autograd.grad(F.cross_entropy(head(out), y), out)[0]
        with torch.no_grad():
            est, cots = project(record(gm, params, buffers, inputs, wrt_inputs=True), tc, gc)
        # reference: the per-sample copies, through the same graph (the interpreter runs it on the whole batch)
        ref_net = copy.deepcopy(gm)
        stacked = {k: p.detach()[None].expand(5, *p.shape).clone().requires_grad_() for k, p in params.items()}
        t = torch.autograd.grad(F.cross_entropy(target_head(_PerSampleCopies(ref_net, stacked).run(*inputs)), y),
                                list(stacked.values()))
        g = torch.autograd.grad(F.cross_entropy(head(_PerSampleCopies(ref_net, stacked).run(*inputs)), y),
                                list(stacked.values()))
        _check(est, {k: _projection(tk, gk) for k, tk, gk in zip(params, t, g, strict=True)})
        xin = tuple(tree_map(lambda v: v.detach().requires_grad_(), inputs))
        o = functional_call(copy.deepcopy(gm), (params, {k: b.clone() for k, b in buffers.items()}), xin)
        want = torch.autograd.grad(o, [v for v in tree_leaves(xin)], tc)
        got = [v for v in tree_leaves(cots)]
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
