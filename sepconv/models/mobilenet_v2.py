"""MobileNetV2, as ``keras.applications.MobileNetV2`` builds it, and its standard-convolution twin."""

from __future__ import annotations

from collections import OrderedDict
from functools import partial

import torch
from torch import nn

from ..layers import Conv2d, PointwiseConv2d
from ..layers._common import check_channels
from ._common import (Classifier, ConvNormAct, Dense, batch_norm, check_flag, check_init, check_input_size,
                      check_positive, depthwise_separable)
from ._registry import register_model

# (expansion t, output width c at alpha = 1, repeats n, first stride s): the paper's Table 2.
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
STEM_WIDTH = 32
LAST_WIDTH = 1280
MIN_INPUT_SIZE = 32  # Keras' minimum
# Keras' MobileNetV2 batch norm: epsilon 1e-3, momentum 0.999 (PyTorch momentum 0.001).
_norm = partial(batch_norm, keras_momentum=0.999)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Keras' (and the TF reference's) ``_make_divisible``: nearest multiple of ``divisor``, at least
    ``divisor``, and never more than 10% below ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class InvertedResidual(nn.Module):
    """Expand 1x1 -> BN -> ReLU6 (absent when ``expansion == 1``), depthwise 3x3 -> BN -> ReLU6, project 1x1
    -> BN with no activation (the linear bottleneck); the input is added when stride is 1 and the widths match.

    With ``separable=False`` the depthwise and projection layers (a depthwise separable convolution) become
    one standard 3x3 convolution from the expanded width to ``out_channels``, then BN.
    """

    def __init__(self, in_channels: int, out_channels: int, expansion: int, stride: int, *, separable: bool,
                 init: str):
        super().__init__()
        hidden = in_channels * expansion
        self.expand = None if expansion == 1 else ConvNormAct(
            PointwiseConv2d(in_channels, hidden, bias=False, init=init), _norm(hidden), nn.ReLU6())
        # Keras pads stride-2 layers with imagenet_utils.correct_pad, which is 'same' padding for a 3x3 kernel.
        self.bottleneck = depthwise_separable(hidden, out_channels, stride, "same", separable=separable, norm=_norm,
                                              activation=None, init=init)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bottleneck(x if self.expand is None else self.expand(x))
        return x + y if self.residual else y

    def residual_parts(self):
        """``(steps, shortcut, activation)`` of ``forward`` where it adds the input (``optimize_for_inference``
        adds in an epilogue), else None."""
        if not self.residual:
            return None
        return [step for step in (self.expand, self.bottleneck) if step is not None], None, None


@register_model("mobilenet_v2")
class MobileNetV2(Classifier):
    """MobileNetV2 (Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
    arXiv:1801.04381), layer for layer as ``keras.applications.MobileNetV2`` (Keras 3) builds it.

    Layout (Table 2): conv 3x3 stride 2 (32) -> BN -> ReLU6; 17 inverted residual blocks
    (:class:`InvertedResidual`); conv 1x1 (1280) -> BN -> ReLU6; global average pool; dense to the classes.
    As in Keras: no convolution bias; BN ``eps=1e-3``, Keras momentum 0.999 (PyTorch ``momentum=0.001``);
    widths ``make_divisible(width * alpha, 8)`` (block outputs from ``int(width * alpha)``), the last
    convolution widened only for ``alpha > 1``; 'same' padding; Glorot-uniform initialisation.

    Parameters equal Keras' trainable count (3,504,872 at ``alpha=1``); with the BN ``running_mean``/
    ``running_var`` buffers, Keras' total (3,538,984).

    Deliberate differences from Keras: the model returns logits (Keras ends in a softmax); input is NCHW.

    Args:
        num_classes: classifier outputs.
        alpha: width multiplier (0.35, 0.5, 0.75, 1.0, 1.3, 1.4 in the paper).
        in_channels: channels of the input image.
        input_size: nominal resolution, int or ``(H, W)`` (96 ... 224); the layers do not depend on it and any
            input of at least 32x32 is accepted; recorded in ``input_shape``.
        separable: ``False`` replaces each block's depthwise + projection pair by a standard 3x3 convolution
            of the same stride and widths (see :class:`InvertedResidual`).
        init: ``"keras"`` (Glorot-uniform, zero bias) or ``"torch"``.

    Examples:
        >>> import torch
        >>> model = MobileNetV2(alpha=0.35, num_classes=10, input_size=96)
        >>> model(torch.randn(2, *model.input_shape)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 1000, *, alpha: float = 1.0, in_channels: int = 3, input_size=224,
                 separable: bool = True, init: str = "keras"):
        check_channels(num_classes, "num_classes")
        check_channels(in_channels, "in_channels")
        check_positive(alpha, "alpha")
        height, width = check_input_size(input_size, MIN_INPUT_SIZE)
        check_flag(separable, "separable")
        check_init(init)

        channels = make_divisible(STEM_WIDTH * alpha)
        layers = [ConvNormAct(Conv2d(in_channels, channels, 3, 2, "same", bias=False, init=init), _norm(channels),
                              nn.ReLU6())]
        for expansion, stage_width, repeats, first_stride in STAGES:
            out_channels = make_divisible(int(stage_width * alpha))
            for index in range(repeats):
                layers.append(InvertedResidual(channels, out_channels, expansion, first_stride if index == 0 else 1,
                                               separable=separable, init=init))
                channels = out_channels
        last = make_divisible(LAST_WIDTH * alpha) if alpha > 1.0 else LAST_WIDTH
        layers.append(ConvNormAct(PointwiseConv2d(channels, last, bias=False, init=init), _norm(last), nn.ReLU6()))
        head = nn.Sequential(OrderedDict(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(1),
                                         classifier=Dense(last, num_classes, init=init)))
        super().__init__(nn.Sequential(*layers), head, (in_channels, height, width),
                         (MIN_INPUT_SIZE, MIN_INPUT_SIZE))
        self.alpha, self.separable = alpha, separable
