"""The 6-convolution VGG-block network for CIFAR-sized images, with separable or standard convolutions."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ..layers._common import check_channels
from ._common import (Classifier, ConvNormAct, Dense, check_flag, check_init, check_input_size, check_rate,
                      conv_or_separable)
from ._common import batch_norm as keras_batch_norm  # the model's `batch_norm` argument would shadow it
from ._registry import register_model

WIDTHS = (64, 128, 256)  # filters of the three blocks; each block is two 3x3 convolutions then a 2x2 max pool
CONVS_PER_BLOCK = 2
MIN_INPUT_SIZE = 2 ** len(WIDTHS)  # three 2x2 pools


@register_model("vgg_cifar")
class VGGCifar(Classifier):
    """Three VGG blocks (Simonyan & Zisserman 2015, arXiv:1409.1556) of two 3x3 'same' convolutions with 64, 128
    and 256 filters, each -> [BN ->] ReLU, each block ending in a 2x2 max pool [-> dropout]; flatten; dense
    to the classes. The small-image experiment of separable-convolution tutorials, written as Keras
    ``Sequential`` code would write it: with ``separable=True`` every convolution, the first included, is
    Keras' ``SeparableConv2D`` (one bias, after the pointwise step), with ``False`` a ``Conv2D``.

    Parameters at 32x32x3 and 10 classes: 1,186,378 standard, 174,821 separable (40,970 of them the dense
    layer); see ``tests/test_models.py`` for the per-layer formulas.

    Deliberate difference from Keras: the model returns logits; input is NCHW, and the dense layer reads the
    NCHW flatten (:func:`sepconv.models.load_keras_weights` reorders Keras' kernel rows to match).

    Args:
        num_classes: classifier outputs.
        in_channels: channels of the input image.
        input_size: int or ``(H, W)``, at least 8; the dense layer is built for it, so inputs must have exactly
            this size.
        batch_norm: BN (Keras' defaults) after each convolution, before the ReLU; the convolutions then have
            no bias (BN's shift replaces it). Off by default.
        dropout: rate of a dropout after each block's pool; 0 (off) by default.
        separable: Keras-style separable convolutions (``True``) or standard ones (``False``).
        init: ``"keras"`` (Glorot-uniform, zero bias) or ``"torch"``.

    Examples:
        >>> import torch
        >>> model = VGGCifar(num_classes=10)
        >>> model(torch.randn(4, 3, 32, 32)).shape
        torch.Size([4, 10])
    """

    def __init__(self, num_classes: int = 10, *, in_channels: int = 3, input_size=32, batch_norm: bool = False,
                 dropout: float = 0.0, separable: bool = True, init: str = "keras"):
        check_channels(num_classes, "num_classes")
        check_channels(in_channels, "in_channels")
        input_height, input_width = check_input_size(input_size, MIN_INPUT_SIZE)
        check_flag(batch_norm, "batch_norm")
        check_rate(dropout, "dropout")
        check_flag(separable, "separable")
        check_init(init)

        blocks, channels, height, width = [], in_channels, input_height, input_width
        for block_width in WIDTHS:
            layers = []
            for _ in range(CONVS_PER_BLOCK):
                conv = conv_or_separable(channels, block_width, 3, separable=separable, bias=not batch_norm,
                                         init=init)
                layers.append(ConvNormAct(conv, keras_batch_norm(block_width) if batch_norm else None, nn.ReLU()))
                channels = block_width
            layers.append(nn.MaxPool2d(2))
            if dropout:
                layers.append(nn.Dropout(dropout))
            blocks.append(nn.Sequential(*layers))
            height, width = height // 2, width // 2
        head = nn.Sequential(OrderedDict(
            flatten=nn.Flatten(1),
            classifier=Dense(channels * height * width, num_classes, init=init,
                             feature_shape=(channels, height, width))))
        super().__init__(nn.Sequential(*blocks), head, (in_channels, input_height, input_width), None)
        self.separable = separable
