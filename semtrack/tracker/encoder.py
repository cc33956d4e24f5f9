"""Per-frame feature encoder of CoTracker3 (`fnet.*`, ARCHITECTURE.md sec. 3.1).

Every norm is a parameter-free InstanceNorm2d (eps 1e-5), so the encoder behaves the same in
train and eval mode and the only state-dict keys are the conv weights and biases.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResBlock(nn.Module):
    """Two 3x3 convs with InstanceNorm + ReLU and a (strided 1x1 conv + IN) shortcut when stride > 1.

    (M, in_ch, h, w) -> (M, out_ch, ceil(h / stride), ceil(w / stride)).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1)
        self.norm = nn.InstanceNorm2d(out_ch)
        self.relu = nn.ReLU()
        self.downsample = (
            nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride), nn.InstanceNorm2d(out_ch))
            if stride != 1
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.norm(self.conv1(x)))
        y = self.relu(self.norm(self.conv2(y)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(shortcut + y)


class BasicEncoder(nn.Module):
    """Multi-scale conv encoder: (M, 3, H, W) normalised frames in [-1, 1] -> (M, 128, H/4, W/4).

    H and W must be multiples of 4. The output is the raw conv3 output (not yet L2-normalised).
    """

    def __init__(self, output_dim: int = 128, stride: int = 4):
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3)
        self.norm = nn.InstanceNorm2d(64)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(ResBlock(64, 64, 1), ResBlock(64, 64, 1))
        self.layer2 = nn.Sequential(ResBlock(64, 96, 2), ResBlock(96, 96, 1))
        self.layer3 = nn.Sequential(ResBlock(96, 128, 2), ResBlock(128, 128, 1))
        self.layer4 = nn.Sequential(ResBlock(128, 128, 2), ResBlock(128, 128, 1))
        self.conv2 = nn.Conv2d(64 + 96 + 128 + 128, 256, 3, padding=1)
        self.norm2 = nn.InstanceNorm2d(256)
        self.conv3 = nn.Conv2d(256, output_dim, 1)

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four layer outputs [a (H/2), b (H/4), c (H/8), d (H/16)] before resizing."""
        x = self.relu(self.norm(self.conv1(x)))
        a = self.layer1(x)
        b = self.layer2(a)
        c = self.layer3(b)
        d = self.layer4(c)
        return [a, b, c, d]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = (x.shape[-2] // self.stride, x.shape[-1] // self.stride)
        feats = [F.interpolate(f, size=size, mode="bilinear", align_corners=True) for f in self.stages(x)]
        x = self.relu(self.norm2(self.conv2(torch.cat(feats, dim=1))))
        return self.conv3(x)
