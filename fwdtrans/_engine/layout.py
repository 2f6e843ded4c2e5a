"""The memory layout of a compiled step on a CPU: inductor's options, channels-last inputs, and the
convolutions that must never run channels-last (oneDNN's faulty AVX2 kernel)."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, fx, nn

from .plan import Plan

__all__ = ["channels_last", "faulty_conv", "inductor_options"]


def inductor_options(plan: Plan) -> dict[str, Any]:
    """Inductor options for ``plan``'s compiled step. A step that pushes tangent streams turns inductor's
    layout optimisation off: that optimisation gives each convolution's (4-d) output the channels-last
    layout, which the streams' stacked ``(S, B, C, H, W)`` tangents do not get, and the fused kernels that
    mix the two layouts read one of them strided, element by element. Such a step instead takes its image
    inputs channels-last (``gradients``), and every tensor derived from them, the streams' too, follows
    (see the Performance page). Every step of a plan with a :func:`faulty_conv` turns it off too, and keeps
    its inputs' layout. On a CPU only: on other devices, where it was not measured, inductor's defaults
    stay."""
    cpu = all(p.device.type == "cpu" for b in plan.blocks for p in b.parameters())
    off = plan.faulty_conv or plan.method.pushes_tangents
    return {"layout_optimization": False} if cpu and off else {}


def faulty_conv(modules: Iterable[nn.Module]) -> bool:
    """Whether ``modules`` hold a convolution that oneDNN's AVX2 kernels get wrong channels-last.

    On CPUs without AVX-512 (AMD EPYC up to Zen 3, many laptops) oneDNN's 1x1 backward-weights convolution
    (``jit_avx2_1x1_convolution_bwd_weights_t``) with a channels-last float32 source, a stride over 1 and
    fewer input channels per group than its block of 8 computes a wrong weight gradient, crashes or never
    returns (oneDNN issue #6035; an NCHW source, float64, stride 1 or 8 channels take other kernels). Such a
    convolution: an ``nn.Conv2d`` or ``F.conv2d`` with a 1x1 kernel, a stride over 1 in either dimension and
    a weight of fewer than 8 input channels per group; erring on the safe side, also an ``F.conv2d`` of a
    graph whose weight or stride is not a constant of it. A compiled step on a CPU whose blocks or heads hold
    one keeps every tensor in the default layout (:func:`inductor_options`, :func:`gradients`)."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Conv2d) and _faulty(m.weight, m.stride):
                return True
            if isinstance(m, fx.GraphModule) and any(_faulty_call(m, n) for n in m.graph.nodes):
                return True
    return False


def _faulty(weight: Any, stride: Any) -> bool:
    """A convolution of ``weight`` at ``stride`` counts unless its stride is known to be 1 or its weight known
    not to be 1x1 with fewer than 8 input channels per group."""
    strides = stride if isinstance(stride, tuple | list) else (stride,)
    if all(isinstance(s, int) for s in strides) and max(strides) == 1:
        return False
    return not isinstance(weight, Tensor) or (tuple(weight.shape[2:]) == (1, 1) and weight.shape[1] < 8)


def _faulty_call(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` of ``gm`` is an ``F.conv2d`` call that :func:`faulty_conv` counts."""
    if node.op != "call_function" or node.target is not torch.conv2d:
        return False
    args = {**dict(zip(("input", "weight", "bias", "stride"), node.args, strict=False)), **node.kwargs}
    weight: Any = args.get("weight")
    if isinstance(weight, fx.Node) and weight.op == "get_attr":
        weight = functools.reduce(getattr, str(weight.target).split("."), gm)
    return _faulty(weight, args.get("stride", 1))


def channels_last(t: Any) -> Any:
    """An image batch on a CPU in channels-last memory format, where oneDNN's convolutions are faster."""
    image = isinstance(t, Tensor) and t.dim() == 4 and t.is_floating_point() and t.device.type == "cpu"
    return t.contiguous(memory_format=torch.channels_last) if image else t
