"""A MobileNet-class stylisation network for phones: inverted-residual blocks at a quarter of the
input's resolution, built from the operations that int8 runtimes run well.

Layout (``c`` = ``channels`` × ``width``, rounded to a multiple of 8): a strided 3×3 convolution to
``c`` channels at ½ resolution; a depthwise-separable strided stage to ``2c`` at ¼; ``blocks``
inverted residual blocks (Sandler et al. 2018: 1×1 expansion by ``expansion``, 3×3 depthwise, 1×1
linear projection, identity skip) at ¼; two nearest-neighbour ×2 upsampling stages, each followed by
a depthwise-separable convolution (to ``c``, then to 3 channels at full size) and a sigmoid.

Only ``Conv2d`` (zero padding), ``BatchNorm2d`` (folded into the convolutions at export), ``ReLU6``,
``Add``, nearest ``Resize`` and ``Sigmoid``: no instance norm and no reflection padding, which int8
runtimes (ONNX Runtime's QDQ kernels, XNNPACK) lack or run in float. Input and output are ``B×3×H×W``
images in [0, 1] of any size; each upsampling stage returns the exact shape of its downsampling
stage's input, so odd sizes come back unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stx.errors import ConfigError


def conv_bn(inputs: int, outputs: int, kernel: int = 3, stride: int = 1, groups: int = 1,
            activation: bool = True) -> nn.Sequential:
    """A ``kernel×kernel`` convolution (zero padding, no bias), batch norm, then ReLU6 unless not ``activation``."""
    layers: list[nn.Module] = [nn.Conv2d(inputs, outputs, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(outputs)]
    if activation:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


def separable(inputs: int, outputs: int, stride: int = 1) -> nn.Sequential:
    """A depthwise 3×3 convolution (``stride``), then a pointwise one to ``outputs`` channels."""
    return nn.Sequential(conv_bn(inputs, inputs, 3, stride, groups=inputs), conv_bn(inputs, outputs, 1))


class InvertedResidual(nn.Module):
    """``x + project(depthwise(expand(x)))``: MobileNetV2's block at constant width and resolution."""

    def __init__(self, channels: int, expansion: int) -> None:
        super().__init__()
        hidden = channels * expansion
        self.body = nn.Sequential(conv_bn(channels, hidden, 1), conv_bn(hidden, hidden, 3, groups=hidden),
                                  conv_bn(hidden, channels, 1, activation=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def rounded_width(channels: int, width: float) -> int:
    """``channels × width`` rounded to the nearest multiple of 8 (at least 8): vector units' lane widths."""
    return max(8, int(channels * width / 8 + 0.5) * 8)


class MobileStyleNet(nn.Module):
    """The light stylisation network (see the module's docstring). ``channels`` is the first stage's
    width before ``width`` scales it (MobileNet's width multiplier); ``blocks`` the number of inverted
    residual blocks; ``expansion`` their expansion factor."""

    def __init__(self, channels: int = 16, width: float = 1.0, blocks: int = 4, expansion: int = 4) -> None:
        super().__init__()
        for name, value in (("channels", channels), ("blocks", blocks), ("expansion", expansion)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"model.{name}={value!r} is not valid: use a whole number >= 1.")
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width <= 16:
            raise ConfigError(f"model.width={width!r} is not valid: use a number above 0 and at most 16 "
                              f"(1.0: {channels} channels in the first stage).")
        c = rounded_width(channels, width)
        self.head = conv_bn(3, c, 3, stride=2)
        self.down = separable(c, 2 * c, stride=2)
        self.blocks = nn.Sequential(*(InvertedResidual(2 * c, expansion) for _ in range(blocks)))
        self.up1 = separable(2 * c, c)
        self.up2 = nn.Sequential(conv_bn(c, c, 3, groups=c), nn.Conv2d(c, 3, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Stylise ``image`` (``B×3×H×W`` in [0, 1]); returns the same shape, in [0, 1]."""
        half = self.head(image)
        x = self.blocks(self.down(half))
        x = self.up1(F.interpolate(x, size=half.shape[-2:], mode="nearest"))
        x = self.up2(F.interpolate(x, size=image.shape[-2:], mode="nearest"))
        return torch.sigmoid(x)
