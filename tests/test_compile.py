"""``compile=True``: the whole step is one ``torch.compile(fullgraph=True)`` graph (a graph break
raises), and it computes what the eager step computes, checked in float64.

Compiling is slow on a CPU (a ResNet-18's step takes minutes with the default backend, inductor), so
the cases are few and small: the flagship method on a residual BatchNorm CNN with inductor (its
generated kernels, the compiled BatchNorm tangent among them), and the other method families on a
small BatchNorm CNN with ``aot_eager`` (the same captured graph and autograd tracing, without code
generation). ResNet-18 itself is compiled with inductor by ``test_compile_time.py`` (its first step
checked against eager in float32: the loss and the last block's exact gradient).
"""

import copy
import dataclasses

import pytest
import torch
from models import Generated

import fwdtrans


def _compare(converted, x, y, options, steps: int = 2):
    eager, compiled = converted, copy.deepcopy(converted)
    for _ in range(steps):  # the second step runs from the first one's buffers and draws
        m_eager = eager.compute_gradients(x, y)
        m_compiled = compiled.compute_gradients(x, y, compile=options)
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)
        for (name, b), c in zip(eager.named_buffers(), compiled.buffers(), strict=True):
            torch.testing.assert_close(c, b, rtol=1e-9, atol=1e-12, msg=name)
        assert m_compiled.keys() == m_eager.keys()
        for k in m_eager:
            torch.testing.assert_close(m_compiled[k], m_eager[k], rtol=1e-9, atol=1e-12)


def test_compiled_flagship_equals_eager_in_float64(float64):
    torch.manual_seed(0)
    model = Generated("rescnn", [4, 4, 4], "bn", classes=3, in_features=2)  # conv, train-mode BN, residual adds
    x, y = torch.randn(8, 2, 6, 6), torch.randint(0, 3, (8,))
    converted = fwdtrans.convert(model, x[:2], blocks=3, heads="linear")
    _compare(converted, x, y, True)


@pytest.mark.parametrize("method", [
    dict(guess="global"),
    dict(target="local", guess="local"),
    dict(guess="gaussian", space="weight", granularity="block", tangents=2),
    dict(guess="local", streams="joint"),
    dict(target="intermediate", guess="ntk", recompute=True),
    dict(guess="rademacher", engine="reference"),
], ids=lambda m: "-".join(f"{v}" for v in m.values()))
def test_compiled_methods_equal_eager_in_float64(method, float64):
    torch.manual_seed(0)
    model = Generated("cnn", [4, 4, 4], "bn", classes=3, in_features=2)
    x, y = torch.randn(6, 2, 5, 5), torch.randint(0, 3, (6,))
    converted = fwdtrans.convert(model, x[:2], blocks=3, heads="linear", **method)
    _compare(converted, x, y, {"backend": "aot_eager"})


def test_train_step_compiles_once_and_copies_compile_afresh():
    torch.manual_seed(0)
    model = Generated("mlp", [4, 4], "bn", classes=3, in_features=5)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    converted = fwdtrans.convert(model, x[:2], blocks=2, heads="linear")
    step = converted.train_step(torch.optim.SGD(converted.parameters(), lr=0.1), compile={"backend": "aot_eager"})
    step(x, y)
    step(x, y)
    assert len(converted._compiled) == 1
    assert copy.deepcopy(converted)._compiled == {}  # a copy must not reuse a step bound to this model


def test_compiled_multi_tensor_cuts_equal_eager_in_float64(float64):
    torch.manual_seed(0)
    model = Generated("rescnn", [3, 3], "bn", classes=3, in_features=2)
    x, y = torch.randn(4, 2, 4, 4), torch.randint(0, 3, (4,))
    inner = [p.name for p in fwdtrans.inspect(model, x, multi_tensor=True).points if len(p.shapes) > 1]
    converted = fwdtrans.convert(model, x, blocks=inner[:2], heads="linear", multi_tensor=True)
    _compare(converted, x, y, {"backend": "aot_eager"})


@pytest.mark.parametrize("method, pushes", [
    (dict(guess="global"), False),
    (dict(target="local", guess="local"), False),
    (dict(guess="local", streams="joint"), True),
    (dict(guess="ntk", space="weight"), True),
    (dict(guess="local", engine="reference"), False),
], ids=lambda m: "-".join(f"{v}" for v in m.values()) if isinstance(m, dict) else str(m))
def test_compile_options(method, pushes, monkeypatch):
    """A step that pushes tangent streams compiles with inductor's layout optimisation off; a mode becomes
    its options (torch.compile takes one or the other); the caller's options win; other backends get none."""
    from torch._inductor import list_mode_options

    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append(kwargs) or fn)
    x = torch.randn(4, 5)
    converted = fwdtrans.convert(Generated("mlp", [3, 3], "bn", 3, 5), x[:2], blocks=2, heads="linear", **method)
    off = {"layout_optimization": False} if pushes else {}
    for given in (None, {"mode": "max-autotune-no-cudagraphs", "options": {"epilogue_fusion": False}},
                  {"options": {"layout_optimization": True}}, {"backend": "aot_eager"}):
        converted.compiled_gradients(given)
    assert calls == [
        {"fullgraph": True, "dynamic": False, **({"options": off} if off else {})},
        {"fullgraph": True, "dynamic": False,
         "options": {**list_mode_options("max-autotune-no-cudagraphs"), **off, "epilogue_fusion": False}},
        {"fullgraph": True, "dynamic": False, "options": {"layout_optimization": True}},
        {"fullgraph": True, "dynamic": False, "backend": "aot_eager"},
    ]


def test_the_layout_option_is_for_cpu_steps_only():
    """Off the CPU (not measured there) a step that pushes tangent streams keeps inductor's defaults."""
    x = torch.randn(4, 5)
    plan = fwdtrans.convert(Generated("mlp", [3, 3], "bn", 3, 5), x[:2], blocks=2, heads="linear").plan
    assert fwdtrans._engine.inductor_options(plan) == {"layout_optimization": False}
    moved = dataclasses.replace(plan, blocks=type(plan.blocks)(copy.deepcopy(b).to("meta") for b in plan.blocks))
    assert fwdtrans._engine.inductor_options(moved) == {}


def test_many_models_do_not_share_a_recompile_budget():
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    limit = torch._dynamo.config.recompile_limit
    for i in range(limit + 1):  # more models than one code object's budget
        torch.manual_seed(i)
        converted = fwdtrans.convert(Generated("mlp", [3], "none", 3, 5), x[:2], blocks=2, heads="linear")
        converted.compute_gradients(x, y, compile={"backend": "eager"})
