"""Xception, as ``keras.applications.Xception`` builds it, and its standard-convolution twin."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ..layers import Conv2d
from ..layers._common import check_channels
from ._common import (Classifier, ConvNormAct, Dense, MaxPool2dSame, batch_norm, check_flag, check_init,
                      check_input_size, conv_or_separable)
from ._registry import register_model

MIDDLE_WIDTH = 728
MIDDLE_BLOCKS = 8
MIN_INPUT_SIZE = 71  # Keras' minimum


def _separable_bn(in_channels: int, out_channels: int, *, separable: bool, init: str, relu_before: bool,
                  relu_after: bool = False) -> nn.Sequential:
    """[ReLU ->] separable 3x3 'same' (no bias) -> BN [-> ReLU]: Xception's unit (the ReLU comes first in the
    entry, middle and exit-module flows, after in the last two layers)."""
    layers = OrderedDict(act_before=nn.ReLU()) if relu_before else OrderedDict()
    layers["conv"] = conv_or_separable(in_channels, out_channels, 3, separable=separable, bias=False, init=init)
    layers["norm"] = batch_norm(out_channels)
    if relu_after:
        layers["act"] = nn.ReLU()
    return nn.Sequential(layers)


def _stem_conv(in_channels: int, out_channels: int, stride: int, init: str) -> ConvNormAct:
    """Standard 3x3 'valid' conv (no bias) -> BN -> ReLU: the entry flow's first two layers."""
    return ConvNormAct(Conv2d(in_channels, out_channels, 3, stride, "valid", bias=False, init=init),
                       batch_norm(out_channels), nn.ReLU())


class DownsamplingBlock(nn.Module):
    """Two separable units then a 3x3 stride-2 'same' max pool, plus a 1x1 stride-2 conv -> BN shortcut.

    The main path is registered before the shortcut because Keras lists its layers in that order.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, *, relu_first: bool, separable: bool,
                 init: str):
        super().__init__()
        self.main = nn.Sequential(
            _separable_bn(in_channels, mid_channels, separable=separable, init=init, relu_before=relu_first),
            _separable_bn(mid_channels, out_channels, separable=separable, init=init, relu_before=True),
            MaxPool2dSame(3, 2))
        self.shortcut = ConvNormAct(Conv2d(in_channels, out_channels, 1, 2, "same", bias=False, init=init),
                                    batch_norm(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.shortcut(x)


class MiddleBlock(nn.Module):
    """Three ReLU -> separable 3x3 -> BN units with an identity shortcut."""

    def __init__(self, channels: int, *, separable: bool, init: str):
        super().__init__()
        self.main = nn.Sequential(*(_separable_bn(channels, channels, separable=separable, init=init,
                                                  relu_before=True) for _ in range(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.main(x)

    def residual_parts(self):
        """``(steps, shortcut, activation)`` of ``forward`` (``optimize_for_inference`` adds in an epilogue)."""
        return [self.main], None, None


@register_model("xception")
class Xception(Classifier):
    """Xception (Chollet 2017, "Xception: Deep Learning with Depthwise Separable Convolutions",
    arXiv:1610.02357), layer for layer as ``keras.applications.Xception`` (Keras 3) builds it.

    Entry flow: conv 3x3 stride 2 (32) and conv 3x3 (64), both 'valid', each -> BN -> ReLU; three
    :class:`DownsamplingBlock` (128, 256, 728). Middle flow: eight :class:`MiddleBlock` (728). Exit flow:
    a :class:`DownsamplingBlock` (728 then 1024), separable 1536 and 2048, each -> BN -> ReLU; global
    average pool; dense to the classes. As in Keras: separable convolutions have no bias and no BN between
    their steps (Keras' ``SeparableConv2D``); BN with Keras' defaults (``eps=1e-3``, PyTorch
    ``momentum=0.01``); the max pools pad as TensorFlow's 'same' (extra element after); Glorot-uniform
    initialisation.

    Parameters equal the paper's and Keras' trainable count (22,855,952); with the BN ``running_mean``/
    ``running_var`` buffers, Keras' total (22,910,480).

    Deliberate differences from Keras: the model returns logits (Keras ends in a softmax); input is NCHW.

    Args:
        num_classes: classifier outputs.
        in_channels: channels of the input image.
        input_size: nominal resolution, int or ``(H, W)``, default 299; the layers do not depend on it and any
            input of at least 71x71 is accepted; recorded in ``input_shape``.
        separable: ``False`` makes every separable convolution a standard 3x3 'same' convolution of the same
            widths (7.8 times the parameters: 179,071,688).
        init: ``"keras"`` (Glorot-uniform, zero bias) or ``"torch"``.

    Examples:
        >>> import torch
        >>> model = Xception(num_classes=10, input_size=71)
        >>> model(torch.randn(1, *model.input_shape)).shape
        torch.Size([1, 10])
    """

    def __init__(self, num_classes: int = 1000, *, in_channels: int = 3, input_size=299, separable: bool = True,
                 init: str = "keras"):
        check_channels(num_classes, "num_classes")
        check_channels(in_channels, "in_channels")
        height, width = check_input_size(input_size, MIN_INPUT_SIZE)
        check_flag(separable, "separable")
        check_init(init)
        options = {"separable": separable, "init": init}

        features = nn.Sequential(OrderedDict(
            entry=nn.Sequential(
                _stem_conv(in_channels, 32, 2, init), _stem_conv(32, 64, 1, init),
                DownsamplingBlock(64, 128, 128, relu_first=False, **options),  # the stem already ends in a ReLU
                DownsamplingBlock(128, 256, 256, relu_first=True, **options),
                DownsamplingBlock(256, MIDDLE_WIDTH, MIDDLE_WIDTH, relu_first=True, **options)),
            middle=nn.Sequential(*(MiddleBlock(MIDDLE_WIDTH, **options) for _ in range(MIDDLE_BLOCKS))),
            exit=nn.Sequential(
                DownsamplingBlock(MIDDLE_WIDTH, MIDDLE_WIDTH, 1024, relu_first=True, **options),
                _separable_bn(1024, 1536, relu_before=False, relu_after=True, **options),
                _separable_bn(1536, 2048, relu_before=False, relu_after=True, **options))))
        head = nn.Sequential(OrderedDict(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(1),
                                         classifier=Dense(2048, num_classes, init=init)))
        super().__init__(features, head, (in_channels, height, width), (MIN_INPUT_SIZE, MIN_INPUT_SIZE))
        self.separable = separable
