"""oneDNN's AVX2 1x1 backward-weights convolution with a channels-last source, a stride over 1 and fewer than 8
input channels (oneDNN issue #6035) gets the weight gradient wrong, crashes or hangs: fwdtrans never hands it
that case where it chooses the layout (``fwdtrans._engine.faulty_conv``). Any x86 CPU runs the AVX2 kernels
with ``ONEDNN_MAX_CPU_ISA=AVX2``, set before torch loads oneDNN: in a subprocess, with a timeout, so that a
crash or a hang fails the test instead of the suite."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fwdtrans
from fwdtrans import _engine

ROOT = Path(__file__).resolve().parent.parent

def test_faulty_conv_finds_1x1_strided_convolutions_of_few_channels():
    assert _engine.faulty_conv([nn.Conv2d(4, 8, 1, stride=2)])
    assert _engine.faulty_conv([nn.Sequential(nn.Conv2d(16, 16, 1, stride=(1, 2), groups=4))])  # 4 channels per group
    assert not any(_engine.faulty_conv([m]) for m in (nn.Conv2d(8, 8, 1, stride=2), nn.Conv2d(4, 8, 1),
                                              nn.Conv2d(4, 8, 3, stride=2)))

    class Functional(nn.Module):  # F.conv2d of a parameter, or of a weight computed from it (counted if strided)
        def __init__(self, stride, computed=False):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 4, 1, 1))
            self.stride, self.computed = stride, computed

        def forward(self, x):
            return F.conv2d(x, 2 * self.weight if self.computed else self.weight, stride=self.stride)

    assert _engine.faulty_conv([fx.symbolic_trace(Functional(2))])
    assert _engine.faulty_conv([fx.symbolic_trace(Functional(2, computed=True))])
    assert not _engine.faulty_conv([fx.symbolic_trace(Functional(1, computed=True))])
    x = torch.zeros(2, 3, 32, 32)
    assert fwdtrans.convert(fwdtrans.models.resnet18(width=4), x, blocks=4, heads="cnn").faulty_conv
    assert not fwdtrans.convert(fwdtrans.models.resnet18(width=8), x, blocks=4, heads="cnn").faulty_conv
    head = fwdtrans.heads.CNNHead(width=4).build((4, 32, 32), 10)
    assert not _engine.faulty_conv([head])  # its 1x1 convolution has stride 1, its strided ones are 3x3


def test_a_faulty_conv_turns_layout_optimisation_off_for_every_compiled_cpu_step():
    model = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
    plan = fwdtrans.convert(model, torch.zeros(2, 4, 8, 8), blocks=2, heads="linear", guess="global").plan
    assert plan.faulty_conv and _engine.inductor_options(plan) == {"layout_optimization": False}
    assert _engine.inductor_options(dataclasses.replace(plan, faulty_conv=False)) == {}  # backprop's defaults


# a converted model with a residual stage whose shortcut is a 1x1 stride-2 convolution of 4 channels (as
# ResNet-18 width 4's layer2), or a CNN head; its weight gradients in float32 against float64 (no oneDNN)
GRADIENTS = """
import copy, json, sys
import torch, fwdtrans
import torch.nn.functional as F
from torch import nn

class Down(nn.Module):
    def __init__(self, c, d):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, d, 3, 2, 1, bias=False), nn.BatchNorm2d(d)
        self.conv2, self.bn2 = nn.Conv2d(d, d, 3, 1, 1, bias=False), nn.BatchNorm2d(d)
        self.short, self.bn3 = nn.Conv2d(c, d, 1, 2, bias=False), nn.BatchNorm2d(d)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + self.bn3(self.short(x)))

torch.set_num_threads(1)  # the faulty kernel crashes at one thread (at two: wrong values or a hang)
torch.manual_seed(0)
case = sys.argv[1]
x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
if case == "cnn-head":  # channels-last on a CPU, here on 4-channel features
    net = fwdtrans.heads.CNNHead(width=4).build((4, 16, 16), 10)
    ref, h = copy.deepcopy(net).double(), torch.randn(32, 4, 16, 16)
    F.cross_entropy(net(h), y).backward()
    F.cross_entropy(ref(h.double()), y).backward()
else:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), Down(4, 8),
                          Down(8, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    # compiled (inductor): backprop has inductor's layout optimisation, the flagship channels-last inputs
    net = fwdtrans.convert(model, x[:2], blocks=2, heads="cnn", **({"guess": "global"} if "backprop" in case else {}))
    ref = copy.deepcopy(net).double()
    ref.compute_gradients(x.double(), y)
    net.compute_gradients(x, y, compile=case.startswith("compiled"))
exact = dict(ref.named_parameters())
print(json.dumps({n: float((p.grad - exact[n].grad).abs().max() / exact[n].grad.abs().max())
                  for n, p in net.named_parameters() if p.grad is not None}))
"""


@pytest.mark.parametrize("case", ["cnn-head", "eager-backprop", "eager-flagship", "compiled-backprop",
                                  "compiled-flagship"])
def test_weight_gradients_equal_float64_on_avx2_kernels(case):
    done = subprocess.run([sys.executable, "-c", GRADIENTS, case], capture_output=True, text=True, timeout=180,
                          check=False, env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.splitlines()[-1])
    assert case == "cnn-head" or any(".short." in n for n in errors), errors
    assert max(errors.values()) < 1e-3, errors
