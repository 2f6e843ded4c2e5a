"""Reference models: the paper's CIFAR ResNet-18."""

from ._resnet import BasicBlock, ResNet18, resnet18

__all__ = ["BasicBlock", "ResNet18", "resnet18"]
