"""A ConvNeXt-style stack of depthwise 7x7 blocks, and its standard-convolution twin."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ..layers import Conv2d, DepthwiseConv2d, PointwiseConv2d
from ._common import Classifier, ConvNormAct, check_staged, pooled_head
from ._registry import register_model

EXPANSION = 4  # the inverted bottleneck's hidden width, in multiples of the block's width


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 -> BN -> pointwise (4x expand) -> GELU -> pointwise (project), added to the input.

    With ``separable=False`` the depthwise 7x7 becomes a standard 7x7 convolution of the same width.
    """

    def __init__(self, channels: int, kernel_size: int, *, separable: bool, init: str):
        super().__init__()
        spatial = (DepthwiseConv2d(channels, kernel_size, padding="same", bias=False, init=init) if separable
                   else Conv2d(channels, channels, kernel_size, padding="same", bias=False, init=init))
        hidden = EXPANSION * channels
        self.main = nn.Sequential(OrderedDict(
            spatial=ConvNormAct(spatial, nn.BatchNorm2d(channels)),
            expand=ConvNormAct(PointwiseConv2d(channels, hidden, init=init), activation=nn.GELU()),
            project=PointwiseConv2d(hidden, channels, init=init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.main(x)


@register_model("convnext_k7")
class ConvNeXtK7(Classifier):
    """A small ConvNeXt-style network (Liu et al. 2022, "A ConvNet for the 2020s", arXiv:2201.03545): the
    depthwise 7x7 inverted-bottleneck block at small widths, for benchmarks of large-kernel depthwise layers.

    Layout: patchify stem conv 4x4 stride 4 -> BN; per stage ``depths[i]`` :class:`ConvNeXtBlock` of width
    ``widths[i]``, stages joined by a conv 2x2 stride 2 -> BN; global average pool; dense to the classes.

    Deliberate differences from the paper: BatchNorm instead of LayerNorm (so that inference folds it into the
    convolutions), no layer scale or stochastic depth, and small default widths and depths.

    Args:
        num_classes: classifier outputs.
        in_channels: channels of the input image.
        input_size: nominal resolution, int or ``(H, W)``; any input of at least ``4 * 2**(stages - 1)`` is
            accepted.
        widths, depths: channels and blocks per stage.
        kernel_size: the depthwise kernel (7 in the paper).
        separable: ``False`` makes each block's depthwise convolution a standard one (see :class:`ConvNeXtBlock`).
        init: ``"torch"`` (PyTorch's default initialisation) or ``"keras"``.

    Examples:
        >>> import torch
        >>> model = ConvNeXtK7(num_classes=10, input_size=32)
        >>> model(torch.randn(2, *model.input_shape)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 1000, *, in_channels: int = 3, input_size=224, widths=(48, 96, 192),
                 depths=(1, 1, 2), kernel_size: int = 7, separable: bool = True, init: str = "torch"):
        widths, depths, minimum, (height, width) = check_staged(num_classes, in_channels, widths, depths, kernel_size,
                                                                input_size, separable, init)

        layers = [ConvNormAct(Conv2d(in_channels, widths[0], 4, 4, init=init), nn.BatchNorm2d(widths[0]))]
        for stage, (channels, depth) in enumerate(zip(widths, depths)):
            if stage:
                layers.append(ConvNormAct(Conv2d(widths[stage - 1], channels, 2, 2, init=init),
                                          nn.BatchNorm2d(channels)))
            layers += [ConvNeXtBlock(channels, kernel_size, separable=separable, init=init) for _ in range(depth)]
        super().__init__(nn.Sequential(*layers), pooled_head(widths[-1], num_classes, init),
                         (in_channels, height, width), (minimum, minimum))
        self.widths, self.depths, self.kernel_size, self.separable = widths, depths, kernel_size, separable
