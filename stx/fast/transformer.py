"""The feed-forward stylisation network of Johnson, Alahi & Fei-Fei (2016).

A fully convolutional image transformer: a 9×9 convolution, two stride-2 downsampling
convolutions, ``residual_blocks`` residual blocks, two upsample-then-convolve stages (nearest
neighbour ×2 followed by a 3×3 convolution, instead of transposed convolutions, which leave
checkerboard artefacts; Odena et al. 2016) and a 9×9 output convolution. Every convolution but
the last is followed by instance normalisation (Ulyanov et al. 2016) and a ReLU; borders are
reflection-padded. Input and output are ``B×3×H×W`` images in [0, 1] of any size: each
upsampling stage returns exactly the shape of the matching downsampling stage's input, so odd
sizes come back unchanged. Written so that ``torch.jit.script`` and ONNX export keep the size
dynamic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stx.errors import ConfigError


class ConvLayer(nn.Sequential):
    """Reflection padding, a ``kernel×kernel`` convolution (stride ``stride``), then instance
    norm and ReLU unless ``last``."""

    def __init__(self, inputs: int, outputs: int, kernel: int, stride: int = 1, last: bool = False) -> None:
        layers: list[nn.Module] = [nn.ReflectionPad2d(kernel // 2), nn.Conv2d(inputs, outputs, kernel, stride)]
        if not last:
            layers += [nn.InstanceNorm2d(outputs, affine=True), nn.ReLU(inplace=True)]
        super().__init__(*layers)


class ResidualBlock(nn.Module):
    """``x + norm(conv(relu(norm(conv(x)))))`` with 3×3 convolutions (Johnson et al.'s block)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ConvLayer(channels, channels, 3),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels, affine=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class UpsampleConv(nn.Module):
    """Nearest-neighbour upsampling to a given ``H×W``, then a :class:`ConvLayer`."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.conv = ConvLayer(inputs, outputs, 3)

    def forward(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=like.shape[-2:], mode="nearest"))


class TransformerNet(nn.Module):
    """Johnson et al.'s image transformation network; ``channels`` is the width of the first
    stage (32 in the paper; the two deeper stages have 2× and 4× as many), ``residual_blocks``
    the number of residual blocks (5 in the paper). The output passes through a sigmoid, so it
    is an image in [0, 1]."""

    def __init__(self, channels: int = 32, residual_blocks: int = 5) -> None:
        super().__init__()
        for name, value in (("channels", channels), ("residual_blocks", residual_blocks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"model.{name}={value!r} is not valid: use a whole number >= 1.")
        c = channels
        self.head = ConvLayer(3, c, 9)
        self.down1 = ConvLayer(c, 2 * c, 3, stride=2)
        self.down2 = ConvLayer(2 * c, 4 * c, 3, stride=2)
        self.residuals = nn.Sequential(*(ResidualBlock(4 * c) for _ in range(residual_blocks)))
        self.up1 = UpsampleConv(4 * c, 2 * c)
        self.up2 = UpsampleConv(2 * c, c)
        self.tail = ConvLayer(c, 3, 9, last=True)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Stylise ``image`` (``B×3×H×W`` in [0, 1]); returns the same shape, in [0, 1]."""
        full = self.head(image)
        half = self.down1(full)
        x = self.residuals(self.down2(half))
        x = self.up2(self.up1(x, half), full)
        return torch.sigmoid(self.tail(x))
