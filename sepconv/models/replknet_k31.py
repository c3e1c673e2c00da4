"""A RepLKNet-style network of depthwise 31x31 blocks, and its standard-convolution twin."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ..layers import Conv2d, DepthwiseConv2d, PointwiseConv2d
from ._common import Classifier, ConvNormAct, check_staged, pooled_head
from ._registry import register_model


class RepLKBlock(nn.Module):
    """Pointwise -> BN -> ReLU -> depthwise k x k -> BN -> pointwise -> BN, added to the input.

    With ``separable=False`` the depthwise k x k becomes a standard k x k convolution of the same width.
    """

    def __init__(self, channels: int, kernel_size: int, *, separable: bool, init: str):
        super().__init__()
        self.main = nn.Sequential(OrderedDict(
            pre=ConvNormAct(PointwiseConv2d(channels, channels, bias=False, init=init), nn.BatchNorm2d(channels),
                            nn.ReLU()),
            large=ConvNormAct(_spatial(channels, kernel_size, 1, separable, init), nn.BatchNorm2d(channels)),
            post=ConvNormAct(PointwiseConv2d(channels, channels, bias=False, init=init), nn.BatchNorm2d(channels))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.main(x)


def _spatial(channels: int, kernel_size: int, stride: int, separable: bool, init: str) -> nn.Module:
    """A depthwise k x k 'same' convolution, or with ``separable=False`` the standard one of the same width."""
    if separable:
        return DepthwiseConv2d(channels, kernel_size, stride, "same", bias=False, init=init)
    return Conv2d(channels, channels, kernel_size, stride, "same", bias=False, init=init)


def _conv_bn_relu(conv: nn.Module, channels: int) -> nn.Module:
    return ConvNormAct(conv, nn.BatchNorm2d(channels), nn.ReLU())


@register_model("replknet_k31")
class RepLKNetK31(Classifier):
    """A small RepLKNet-style network (Ding et al. 2022, "Scaling Up Your Kernels to 31x31", arXiv:2203.06717):
    the very large depthwise kernel at small widths, for benchmarks of large-kernel depthwise layers.

    Layout: stem conv 3x3 stride 2 -> BN -> ReLU -> depthwise 3x3 stride 2 -> BN -> ReLU; per stage
    ``depths[i]`` :class:`RepLKBlock` of width ``widths[i]``, stages joined by pointwise -> BN -> ReLU ->
    depthwise 3x3 stride 2 -> BN -> ReLU; global average pool; dense to the classes.

    Deliberate differences from the paper: no small-kernel re-parameterised branch, ConvFFN or stochastic
    depth; small default widths and depths.

    Args: as :class:`~sepconv.models.convnext_k7.ConvNeXtK7`'s (``num_classes``, ``in_channels``, ``input_size``,
    ``widths``, ``depths``, ``init``), except ``kernel_size``, the large depthwise kernel (31 in the paper), and
    ``separable``: ``False`` makes every depthwise convolution (stem, transitions, blocks) a standard one of the
    same kernel, stride and width.

    Examples:
        >>> import torch
        >>> model = RepLKNetK31(num_classes=10, input_size=32)
        >>> model(torch.randn(2, *model.input_shape)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 1000, *, in_channels: int = 3, input_size=224, widths=(64, 128),
                 depths=(1, 1), kernel_size: int = 31, separable: bool = True, init: str = "torch"):
        widths, depths, minimum, (height, width) = check_staged(num_classes, in_channels, widths, depths, kernel_size,
                                                                input_size, separable, init)

        stem = widths[0]
        layers = [_conv_bn_relu(Conv2d(in_channels, stem, 3, 2, "same", bias=False, init=init), stem),
                  _conv_bn_relu(_spatial(stem, 3, 2, separable, init), stem)]
        for stage, (channels, depth) in enumerate(zip(widths, depths)):
            if stage:
                layers += [_conv_bn_relu(PointwiseConv2d(widths[stage - 1], channels, bias=False, init=init), channels),
                           _conv_bn_relu(_spatial(channels, 3, 2, separable, init), channels)]
            layers += [RepLKBlock(channels, kernel_size, separable=separable, init=init) for _ in range(depth)]
        super().__init__(nn.Sequential(*layers), pooled_head(widths[-1], num_classes, init),
                         (in_channels, height, width), (minimum, minimum))
        self.widths, self.depths, self.kernel_size, self.separable = widths, depths, kernel_size, separable
