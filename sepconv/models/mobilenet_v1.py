"""MobileNetV1, as ``keras.applications.MobileNet`` builds it, and its standard-convolution twin."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ..layers import Conv2d, PointwiseConv2d
from ..layers._common import check_channels
from ._common import (Classifier, ConvNormAct, batch_norm, check_flag, check_init, check_input_size, check_positive,
                      check_rate, depthwise_separable)
from ._registry import register_model

# (depthwise stride, pointwise width at alpha = 1) of the 13 depthwise separable blocks: the paper's Table 1,
# with stride 1 in the last block (the table prints 2, a typo: stride 1 gives its 569M mult-adds, and Keras
# builds stride 1).
BLOCKS = ((1, 64), (2, 128), (1, 128), (2, 256), (1, 256), (2, 512),
          (1, 512), (1, 512), (1, 512), (1, 512), (1, 512), (2, 1024), (1, 1024))
STEM_WIDTH = 32
# Keras pads a stride-2 depthwise layer with ZeroPadding2D(((0, 1), (0, 1))) then runs it 'valid'. This equals
# 'same' on even sizes only: on an odd size 'same' would pad (1, 1).
STRIDE_2_PADDING = ((0, 1), (0, 1))
MIN_INPUT_SIZE = 32  # Keras' minimum


@register_model("mobilenet_v1_025", alpha=0.25)
@register_model("mobilenet_v1_050", alpha=0.5)
@register_model("mobilenet_v1_075", alpha=0.75)
@register_model("mobilenet_v1_100", alpha=1.0)
@register_model("mobilenet_v1")
class MobileNetV1(Classifier):
    """MobileNetV1 (Howard et al. 2017, "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision
    Applications", arXiv:1704.04861), layer for layer as ``keras.applications.MobileNet`` (Keras 3) builds it.

    Layout (Table 1): conv 3x3 stride 2 (32) -> BN -> ReLU6, then 13 blocks of depthwise 3x3 -> BN -> ReLU6 ->
    pointwise 1x1 -> BN -> ReLU6, widths 64 ... 1024; global average pool -> dropout -> 1x1 conv with bias to
    the classes (Keras' top: ``GlobalAveragePooling2D(keepdims=True)``, ``Dropout``, ``Conv2D(classes, 1)``,
    ``Reshape``). As in Keras: no convolution bias elsewhere; BN ``eps=1e-3`` and Keras momentum 0.99
    (PyTorch ``momentum=0.01``); ``'same'`` padding, except stride-2 depthwise layers, padded
    ``((0, 1), (0, 1))`` then ``'valid'``; widths ``int(width * alpha)``; Glorot-uniform initialisation.

    BN moving statistics are buffers, so ``sum(p.numel() for p in model.parameters())`` is Keras' trainable
    count (4,231,976 at ``alpha=1``) and adding the ``running_mean``/``running_var`` buffers gives Keras' total
    (4,253,864).

    Deliberate differences from Keras: the model returns logits (Keras ends in a softmax); input is NCHW.

    Args:
        num_classes: classifier outputs.
        alpha: width multiplier (the paper's Table 6: 1.0, 0.75, 0.5, 0.25).
        depth_multiplier: of the depthwise layers (Keras' ``depth_multiplier``; 1 in the paper).
        dropout: rate before the classifier (Keras' default ``1e-3``).
        in_channels: channels of the input image.
        input_size: nominal resolution, int or ``(H, W)``: the paper's resolution multiplier (224, 192, 160,
            128). The layers do not depend on it (the pooling is global) and any input of at least 32x32 is
            accepted; it is recorded in ``input_shape`` for cost reports and example inputs.
        separable: ``False`` builds the twin of Table 4 ("Conv MobileNet"): each depthwise separable block
            becomes one standard 3x3 convolution with the same stride, padding and widths, then BN and ReLU6
            (``depth_multiplier`` then has no effect).
        init: ``"keras"`` (Glorot-uniform, zero bias) or ``"torch"`` (PyTorch's defaults).

    Examples:
        >>> import torch
        >>> model = MobileNetV1(alpha=0.25, num_classes=10, input_size=128)
        >>> model(torch.randn(2, *model.input_shape)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 1000, *, alpha: float = 1.0, depth_multiplier: int = 1,
                 dropout: float = 1e-3, in_channels: int = 3, input_size=224, separable: bool = True,
                 init: str = "keras"):
        check_channels(num_classes, "num_classes")
        check_channels(in_channels, "in_channels")
        check_channels(depth_multiplier, "depth_multiplier")
        check_positive(alpha, "alpha")
        if int(STEM_WIDTH * alpha) < 1:
            raise ValueError(f"alpha must be at least 1/{STEM_WIDTH} so that every layer keeps a channel "
                             f"(widths are int(width * alpha)); got {alpha!r}")
        height, width = check_input_size(input_size, MIN_INPUT_SIZE)
        check_rate(dropout, "dropout")
        check_flag(separable, "separable")
        check_init(init)

        channels = int(STEM_WIDTH * alpha)
        layers = [ConvNormAct(Conv2d(in_channels, channels, 3, 2, "same", bias=False, init=init),
                              batch_norm(channels), nn.ReLU6())]
        for stride, block_width in BLOCKS:
            out_channels = int(block_width * alpha)
            padding = "same" if stride == 1 else STRIDE_2_PADDING
            layers.append(depthwise_separable(channels, out_channels, stride, padding, separable=separable,
                                              norm=batch_norm, activation=nn.ReLU6,
                                              depth_multiplier=depth_multiplier, init=init))
            channels = out_channels
        head = nn.Sequential(OrderedDict(
            pool=nn.AdaptiveAvgPool2d(1),
            dropout=nn.Dropout(dropout),
            classifier=PointwiseConv2d(channels, num_classes, bias=True, init=init),
            flatten=nn.Flatten(1)))
        super().__init__(nn.Sequential(*layers), head, (in_channels, height, width),
                         (MIN_INPUT_SIZE, MIN_INPUT_SIZE))
        self.alpha, self.separable = alpha, separable
