"""The benchmark's model: a ResNet-18-shaped network of the project's own (He et al.,
"Deep Residual Learning for Image Recognition", CVPR 2016), so that the benchmark needs
no torchvision.

Its layout is that of ResNet-18: a 7x7 stride-2 stem with batch norm and max pooling,
four stages of two basic blocks (two 3x3 convolutions with batch norm each; a 1x1
projection with batch norm where a stage halves the resolution), global average pooling
and a linear classifier. At ``width=64`` and 1000 classes it has 62 gradient tensors and
11,689,512 parameters; a smaller ``width`` keeps the 62 tensors and scales the
convolutions by ``(width / 64) ** 2``, which is what the small preset uses.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (a 1x1 projection when the
    shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class ResNet18Like(nn.Module):
    """A ResNet-18-shaped classifier for 3-channel images of any size >= 32x32.

    Args:
        width: channels of the first stage (default 64, ResNet-18's); the stages have
            ``width``, ``2 width``, ``4 width`` and ``8 width`` channels.
        num_classes: outputs of the classifier (default 1000).
    """

    def __init__(self, width: int = 64, num_classes: int = 1000):
        super().__init__()
        if width < 1 or num_classes < 1:
            raise ValueError(f"width and num_classes must be >= 1, got {width} and {num_classes}")
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages = []
        channels = width
        for index, out_channels in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if index == 0 else 2
            stages.append(nn.Sequential(BasicBlock(channels, out_channels, stride),
                                        BasicBlock(out_channels, out_channels, 1)))
            channels = out_channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores ``(batch, num_classes)`` of images ``(batch, 3, H, W)``."""
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
