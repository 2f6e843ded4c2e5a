"""The paper's CIFAR ResNet-18: 3x3 stem, no max-pool, four stages of two BasicBlocks."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["BasicBlock", "ResNet18", "resnet18"]


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with a residual connection (1x1 conv + BN when the shape changes)."""

    def __init__(self, inputs: int, outputs: int, stride: int = 1, skip: bool = True):
        super().__init__()
        self.skip = skip
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(outputs, outputs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if skip and (stride != 1 or inputs != outputs):
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(outputs))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x) if self.skip else out)


class ResNet18(nn.Module):
    """CIFAR ResNet-18 with stage widths ``width * (1, 2, 4, 8)``; its 8 BasicBlocks are the
    paper's 8-block cut (block 0 also holds the stem, the last block the classifier). With
    ``skip=False`` (the paper's 16-block network) every conv-BN-ReLU layer is a cut point."""

    def __init__(self, num_classes: int = 10, width: int = 64, in_channels: int = 3, skip: bool = True):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        widths = [width, 2 * width, 4 * width, 8 * width]
        stages, inputs = [], width
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(inputs, w, stride, skip), BasicBlock(w, w, 1, skip)))
            inputs = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.skip = skip
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():  # the paper's initialisation (kaiming-uniform, bias 0.01)
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0.01)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))

    def paper_cuts(self) -> list[str]:
        """The paper's cuts: after each residual block (8 blocks), or without skip connections after
        every conv layer but the stem (16 blocks, block 0 = stem + first layer)."""
        names = []
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            for block in ("0", "1"):
                names += [f"{stage}.{block}"] if self.skip else [f"{stage}.{block}.relu1", f"{stage}.{block}"]
        return names[:-1]


def resnet18(num_classes: int = 10, width: int = 64, skip: bool = True, in_channels: int = 3) -> ResNet18:
    """The paper's CIFAR ResNet-18 (``width=64`` is the standard model, 11.2M parameters).

    ``in_channels`` is the images' channel count (1 for Fashion-MNIST).

    ``blocks=model.paper_cuts()`` gives the paper's 8-block setting (``blocks=8`` finds the same
    cuts by balancing FLOPs); ``resnet18(skip=False)`` with ``blocks=model.paper_cuts()`` is its
    16-block setting (no skip connections).

    Examples:
        >>> import torch, fwdtrans
        >>> fwdtrans.models.resnet18(width=8)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return ResNet18(num_classes, width, in_channels=in_channels, skip=skip)
