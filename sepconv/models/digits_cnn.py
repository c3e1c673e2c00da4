"""A small CNN for 8x8 digit images (scikit-learn's ``load_digits``), with separable or standard convolutions."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ..layers import Conv2d, SpatialSeparableConv2d
from ..layers._common import check_channels
from ._common import Classifier, ConvNormAct, Dense, check_flag, check_input_size, check_rate, conv_or_separable
from ._registry import register_model

STEM_WIDTH = 32
BLOCK_WIDTHS = (64, 128)  # each block: a 3x3 'same' convolution -> BN -> ReLU -> 2x2 max pool
MIN_INPUT_SIZE = 2 ** len(BLOCK_WIDTHS)


def _stem(in_channels: int, *, separable: bool) -> nn.Module:
    """3x3 'same' convolution to ``STEM_WIDTH`` filters; separable: each filter a rank-1 kernel (3x1 then 1x3).

    A depthwise separable stem would be useless on a one-channel image: its depthwise step is a single
    3x3 filter, and the pointwise step only scales that one filtered image into every output channel. The
    per-channel spatially separable form keeps ``STEM_WIDTH`` different (rank-1) filters.
    """
    if separable:
        return SpatialSeparableConv2d(in_channels, in_channels * STEM_WIDTH, 3, padding="same", depthwise=True,
                                      bias=False)
    return Conv2d(in_channels, in_channels * STEM_WIDTH, 3, padding="same", bias=False)


@register_model("digits_cnn")
class DigitsCNN(Classifier):
    """A CNN sized for scikit-learn's 8x8 handwritten digits: trains in seconds on a CPU.

    Layout: stem 3x3 'same' convolution (32 filters per input channel) -> BN -> ReLU; two blocks of a 3x3 'same'
    convolution (64, then 128 filters) -> BN -> ReLU -> 2x2 max pool; global average pool -> dropout -> dense
    to the classes. No convolution biases (BN's shift replaces them). A PyTorch-native network: BN has PyTorch's
    defaults (``momentum=0.1``), and every convolution weight (each step of a separable one too) He's
    initialisation (normal, fan-in, ReLU gain, as torchvision's CNNs), which keeps the BN inputs near unit
    variance. With the Keras or PyTorch defaults they start 10 to 100 times smaller in the separable twin, and
    the running variance (initialised to 1) misleads evaluation for the first few dozen steps.

    With ``separable=True`` the blocks' convolutions are depthwise separable (:class:`sepconv.SeparableConv2d`)
    and the stem is spatially separable per channel (:class:`sepconv.SpatialSeparableConv2d` with
    ``depthwise=True``: every filter is the outer product of a 3x1 and a 1x3 kernel); with ``False``, all
    three are standard convolutions of the same kernel, padding and widths.

    Parameters at 1x8x8 and 10 classes (batch-norm scales and shifts included): 94,186 standard, 13,034
    separable.

    Args:
        num_classes: classifier outputs.
        in_channels: channels of the input image.
        input_size: int or ``(H, W)``, at least 4 (two 2x2 pools); nominal, the head pools globally.
        dropout: rate before the dense layer.
        separable: separable convolutions (``True``) or standard ones (``False``).

    Examples:
        >>> import torch
        >>> model = DigitsCNN(num_classes=10)
        >>> model(torch.randn(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """

    def __init__(self, num_classes: int = 10, *, in_channels: int = 1, input_size=8, dropout: float = 0.25,
                 separable: bool = True):
        check_channels(num_classes, "num_classes")
        check_channels(in_channels, "in_channels")
        height, width = check_input_size(input_size, MIN_INPUT_SIZE)
        check_rate(dropout, "dropout")
        check_flag(separable, "separable")

        channels = in_channels * STEM_WIDTH
        layers = OrderedDict(stem=ConvNormAct(_stem(in_channels, separable=separable),
                                              nn.BatchNorm2d(channels), nn.ReLU()))
        for index, block_width in enumerate(BLOCK_WIDTHS, start=1):
            conv = conv_or_separable(channels, block_width, 3, separable=separable, bias=False,
                                     init="torch")  # then He, below
            layers[f"block{index}"] = nn.Sequential(OrderedDict(
                conv=ConvNormAct(conv, nn.BatchNorm2d(block_width), nn.ReLU()), pool=nn.MaxPool2d(2)))
            channels = block_width
        head = nn.Sequential(OrderedDict(
            pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(1), dropout=nn.Dropout(dropout),
            classifier=Dense(channels, num_classes, init="torch")))
        super().__init__(nn.Sequential(layers), head, (in_channels, height, width), (MIN_INPUT_SIZE, MIN_INPUT_SIZE))
        self.separable = separable
        with torch.no_grad():
            for weight in (p for p in self.features.parameters() if p.dim() >= 3):  # convolution weights, factors
                nn.init.kaiming_normal_(weight, nonlinearity="relu")
