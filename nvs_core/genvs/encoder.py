"""Image -> feature volume: a resnet34-layout encoder with frozen batch norm and output stride 16, and
the modified DeepLabV3+ decoder of the unofficial GeNVS (no batch norm, learnable x2 up-blocks back to
the input resolution). Module and parameter names follow the published checkpoint
(``input_unet.encoder.*``, ``input_unet.decoder.*``).
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET_WIDTHS = (64, 128, 256, 512)


def preprocess(images01: torch.Tensor) -> torch.Tensor:
    """[N,3,H,W] images in [0,1] -> ImageNet-normalised and flipped vertically (rows reversed), as the
    sampling scripts feed the encoder. After the flip row 0 is the bottom of the image, which matches
    the y-up (OpenGL) camera used by the lifting."""
    mean = images01.new_tensor(IMAGENET_MEAN)[:, None, None]
    std = images01.new_tensor(IMAGENET_STD)[:, None, None]
    return torch.flip((images01 - mean) / std, [-2])


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters, all stored as buffers."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[:, None, None] + shift[:, None, None]


def _conv(c_in: int, c_out: int, k: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, k, stride=stride, padding=(k // 2) * dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        # With dilation (layer4 at output stride 16) every conv of the block runs at stride 1.
        self.conv1 = _conv(c_in, c_out, 3, stride, dilation)
        self.bn1 = FrozenBatchNorm2d(c_out)
        self.conv2 = _conv(c_out, c_out, 3, 1, dilation)
        self.bn2 = FrozenBatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(_conv(c_in, c_out, 1, stride, dilation), FrozenBatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNetEncoder(nn.Module):
    """Returns six features: the input, then strides 2, 4, 8, 16 and 16 (layer4 dilated)."""

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(64)
        c = 64
        for i, (n, width) in enumerate(zip(layers, RESNET_WIDTHS)):
            # Output stride 16: layer4 loses its stride and dilates every conv by 2 (incl. downsample).
            stride, dilation = (1, 1) if i == 0 else ((1, 2) if i == 3 else (2, 1))
            blocks = [BasicBlock(c, width, stride, dilation)]
            blocks += [BasicBlock(width, width, 1, dilation) for _ in range(int(n) - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            c = width
        self.out_channels = (in_channels, 64) + RESNET_WIDTHS

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        f1 = F.relu(self.bn1(self.conv1(x)))
        f2 = self.layer1(F.max_pool2d(f1, 3, 2, 1))
        f3 = self.layer2(f2)
        f4 = self.layer3(f3)
        f5 = self.layer4(f4)
        return [x, f1, f2, f3, f4, f5]


class SeparableConv2d(nn.Sequential):
    """Depthwise k x k (optionally dilated) then pointwise 1x1; no bias on the depthwise part."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, padding: int = 1, dilation: int = 1,
                 bias: bool = False):
        super().__init__(nn.Conv2d(c_in, c_in, kernel_size, padding=padding, dilation=dilation, groups=c_in,
                                   bias=False),
                         nn.Conv2d(c_in, c_out, 1, bias=bias))


class ASPPPooling(nn.Sequential):
    def __init__(self, c_in: int, c_out: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c_in, c_out, 1, bias=False), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Bilinear resize of a 1x1 map is a broadcast.
        return super().forward(x).expand(-1, -1, *x.shape[-2:])


class ASPP(nn.Module):
    """1x1 branch, three separable dilated branches, image pooling; concat, 1x1 projection, ReLU."""

    def __init__(self, c_in: int, c_out: int, rates: Sequence[int]):
        super().__init__()
        branches = [nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.ReLU())]
        branches += [nn.Sequential(SeparableConv2d(c_in, c_out, 3, padding=r, dilation=r), nn.ReLU())
                     for r in rates]
        branches.append(ASPPPooling(c_in, c_out))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(nn.Conv2d(len(branches) * c_out, c_out, 1, bias=False), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


class UpBlock(nn.Module):
    """ConvTranspose 2x2 stride 2 -> concat [x, skip] -> 3x3 conv -> ReLU (optional)."""

    def __init__(self, channels: int, extra_channels: int, relu: bool = True):
        super().__init__()
        self.up = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.conv = nn.Conv2d(channels + extra_channels, channels, 3, padding=1)
        self.relu = relu

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.conv(torch.cat([self.up(x), skip], dim=1))
        return F.relu(x) if self.relu else x


class DeepLabV3PlusDecoder(nn.Module):
    """The GeNVS decoder. ``encoder_channels`` are the six feature widths; the up-blocks take the
    resnet34 widths of features 3, 1 and 0 (128, 64, in_channels)."""

    def __init__(self, encoder_channels: Sequence[int] = (3, 64, 64, 128, 256, 512), out_channels: int = 1024,
                 atrous_rates: Sequence[int] = (12, 24, 36)):
        super().__init__()
        self.aspp = nn.Sequential(ASPP(encoder_channels[-1], out_channels, atrous_rates),
                                  SeparableConv2d(out_channels, out_channels, 3, padding=1), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(encoder_channels[-4], 48, 1, bias=False), nn.ReLU())
        self.block2 = nn.Sequential(SeparableConv2d(48 + out_channels, out_channels, 3, padding=1), nn.ReLU())
        self.up_block1b = UpBlock(out_channels, encoder_channels[-3])
        self.up_block2 = UpBlock(out_channels, encoder_channels[-5])
        self.up_block3 = UpBlock(out_channels, encoder_channels[-6], relu=False)

    @staticmethod
    def up2(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)

    def forward(self, *features: torch.Tensor, intermediates: dict = None) -> torch.Tensor:
        steps = intermediates if intermediates is not None else {}
        x = steps["aspp"] = self.aspp(features[-1])
        x = steps["up_block1b"] = self.up_block1b(x, features[-3])
        x = steps["up2"] = self.up2(x)
        high = steps["block1"] = self.block1(features[-4])
        x = steps["block2"] = self.block2(torch.cat([x, high], dim=1))
        x = steps["up_block2"] = self.up_block2(x, features[-5])
        return self.up_block3(x, features[-6])


class InputUNet(nn.Module):
    """``input_unet``: encoder + decoder; input [N,3,H,W] already preprocessed, H and W multiples of 16."""

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), decoder_channels: int = 1024,
                 atrous_rates: Sequence[int] = (12, 24, 36), in_channels: int = 3):
        super().__init__()
        self.encoder = ResNetEncoder(layers, in_channels)
        self.decoder = DeepLabV3PlusDecoder(self.encoder.out_channels, decoder_channels, atrous_rates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % 16 or w % 16:
            raise ValueError(f"encoder input must be a multiple of 16 pixels, got {h}x{w}")
        return self.decoder(*self.encoder(x))
