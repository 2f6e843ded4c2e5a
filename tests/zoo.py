"""Small versions of common architectures, written the way their reference implementations are."""

import einops
import torch
import torch.nn.functional as F
from einops.layers.torch import Rearrange
from torch import nn


class TVBasicBlock(nn.Module):  # torchvision style: shared inplace ReLU, `downsample`
    def __init__(self, inputs, outputs, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.downsample = None
        if stride != 1 or inputs != outputs:
            self.downsample = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TVResNet(nn.Module):
    def __init__(self, classes=5, width=4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(TVBasicBlock(width, width), TVBasicBlock(width, width))
        self.layer2 = nn.Sequential(TVBasicBlock(width, 2 * width, 2), TVBasicBlock(2 * width, 2 * width))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class VGG(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        cfg = [4, "M", 8, "M", 8]
        layers, c = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(c * 4, 16), nn.ReLU(True), nn.Dropout(0.5), nn.Linear(16, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class InvertedResidual(nn.Module):  # bias=True: conv biases before BatchNorm, whose true gradient is zero
    def __init__(self, c, expand=2, bias=False):
        super().__init__()
        h = c * expand
        self.conv = nn.Sequential(
            nn.Conv2d(c, h, 1, bias=bias), nn.BatchNorm2d(h), nn.ReLU6(inplace=True),
            nn.Conv2d(h, h, 3, padding=1, groups=h, bias=bias), nn.BatchNorm2d(h), nn.ReLU6(inplace=True),
            nn.Conv2d(h, c, 1, bias=bias), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.conv(x)


class MobileNet(nn.Module):
    def __init__(self, classes=5, c=4, bias=False):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1, bias=bias), nn.BatchNorm2d(c), nn.ReLU6(inplace=True),
                                      *[InvertedResidual(c, bias=bias) for _ in range(3)])
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(c, classes))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


class ViT(nn.Module):
    def __init__(self, classes=5, dim=8, patch=8, image=16, dropout=0.1):
        super().__init__()
        tokens = (image // patch) ** 2
        self.to_patch = nn.Sequential(Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch, p2=patch),
                                      nn.Linear(patch * patch * 3, dim))
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim))
        self.encoder = nn.Sequential(*[nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=dropout, batch_first=True)
                                       for _ in range(2)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.to_patch(x)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.encoder(x))[:, 0])


class MixerBlock(nn.Module):
    def __init__(self, tokens, dim):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.tokens = nn.Sequential(nn.Linear(tokens, 2 * tokens), nn.GELU(), nn.Linear(2 * tokens, tokens))
        self.channels = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        y = einops.rearrange(self.norm1(x), "b t d -> b d t")
        x = x + einops.rearrange(self.tokens(y), "b d t -> b t d")
        return x + self.channels(self.norm2(x))


class Mixer(nn.Module):
    def __init__(self, classes=5, dim=8, patch=4, image=16):
        super().__init__()
        tokens = (image // patch) ** 2
        self.stem = nn.Conv2d(3, dim, patch, patch)
        self.blocks = nn.Sequential(MixerBlock(tokens, dim), MixerBlock(tokens, dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = einops.rearrange(self.stem(x), "b d h w -> b (h w) d")
        return self.head(self.norm(self.blocks(x)).mean(1))


class LSTMClassifier(nn.Module):  # a sequence classifier: per-step features, two LSTMs, the last step's output
    def __init__(self, classes=5, features=6, hidden=8):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(features, hidden), nn.Tanh())
        self.lstm1 = nn.LSTM(hidden, hidden, batch_first=True)
        self.lstm2 = nn.LSTM(hidden, hidden, num_layers=2, bidirectional=True)  # sequence first
        self.fc = nn.Linear(2 * hidden, classes)

    def forward(self, x):
        h, _ = self.lstm1(self.embed(x))
        h, _ = self.lstm2(h.transpose(0, 1))
        return self.fc(h[-1])


ZOO = {
    "torchvision-resnet": (TVResNet, (4, 3, 32, 32)),
    "vgg": (VGG, (4, 3, 16, 16)),
    "mobilenet": (MobileNet, (4, 3, 16, 16)),
    "vit": (ViT, (4, 3, 16, 16)),
    "mlp-mixer": (Mixer, (4, 3, 16, 16)),
    "lstm": (LSTMClassifier, (4, 7, 6)),  # convert must call _support.fused_rnn_free (see tests/test_zoo.py)
}


class Warp(nn.Module):  # grid_sample has no forward-mode derivative
    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 2, 1), nn.Conv2d(2, 2, 1), nn.Linear(2, 2)

    def forward(self, x):
        h = torch.relu(self.b(torch.relu(self.a(x))))
        h = F.grid_sample(h, h.permute(0, 2, 3, 1).tanh(), align_corners=False)
        return self.fc(h.mean((2, 3)))
