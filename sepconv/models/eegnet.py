"""EEGNet, as the Keras reference (arl-eegmodels ``EEGModels.EEGNet``) builds it, and its standard-conv twin."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ..constraints import check_max_norm, max_norm_
from ..layers import Conv2d, DepthwiseConv2d
from ..layers._common import check_channels
from ._common import (Classifier, ConvNormAct, Dense, batch_norm, check_flag, check_init, check_positive, check_rate,
                      conv_or_separable)
from ._registry import register_model

SEPARABLE_KERNEL_LENGTH = 16  # block 2's (1, 16) kernel, fixed in the reference
POOLS = (4, 8)  # the average pools of blocks 1 and 2, along time
DROPOUT_TYPES = {"dropout": nn.Dropout, "spatial": nn.Dropout2d}  # Keras Dropout, SpatialDropout2D


class MaxNormConv2d(Conv2d):
    """:class:`sepconv.Conv2d` whose filters are projected to an L2 norm of at most ``max_norm`` over the first
    spatial axis (dim 2; Keras' kernel axis 0), as the depthwise layer it replaces in EEGNet's twin."""

    def __init__(self, *args, max_norm: float | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_norm = check_max_norm(max_norm)

    def constrain_(self) -> None:
        if self.max_norm is not None:
            max_norm_(self.weight, self.max_norm, dim=2)


@register_model("eegnet")
class EEGNet(Classifier):
    """EEGNet (Lawhern et al. 2018, "EEGNet: a compact convolutional neural network for EEG-based brain-computer
    interfaces", J. Neural Eng. 15 056013), layer for layer as the Keras reference ``EEGNet`` of the
    arl-eegmodels project builds it (EEGNet-8,2 by default).

    Input ``(N, 1, channels, samples)``: the EEG of ``channels`` electrodes over ``samples`` time steps.

    Block 1: conv ``(1, kernel_length)`` with ``F1`` filters, 'same', no bias -> BN; depthwise ``(channels, 1)``
    with depth multiplier ``D``, no bias, max-norm ``depthwise_max_norm`` -> BN -> ELU; average pool
    ``(1, 4)``; dropout. Block 2: separable ``(1, 16)`` with ``F2`` filters, 'same', no bias -> BN -> ELU;
    average pool ``(1, 8)``; dropout. Flatten; dense to the classes with max-norm ``dense_max_norm``.
    BN with Keras' defaults (``eps=1e-3``, PyTorch ``momentum=0.01``); Glorot-uniform initialisation.
    The max-norms are Keras' (``w * clip(n, 0, v) / (1e-7 + n)``), applied by
    :func:`sepconv.apply_constraints` / :func:`sepconv.attach_constraints` after each optimiser step.

    Parameters: ``2,128 + 65 * num_classes`` at the defaults with 64 channels and 128 samples, Keras' trainable
    count; with the 80 BN moving statistics (buffers here), Keras' total ``2,208 + 65 * num_classes``.

    Deliberate differences from the reference: the model returns logits (the reference ends in a softmax);
    input is NCHW ``(N, 1, C, T)`` where the reference takes ``(N, C, T, 1)``; the dense layer reads the NCHW
    flatten, and :func:`sepconv.models.load_keras_weights` reorders Keras' kernel rows to match.

    Args:
        num_classes: classifier outputs.
        channels: electrodes ``C`` (the depthwise kernel's height).
        samples: time steps ``T``, at least 32 (the two pools divide time by 32).
        F1: temporal filters. D: spatial filters per temporal filter (depth multiplier). F2: pointwise filters
            of block 2 (``F1 * D`` in the paper's EEGNet-8,2 and -4,2).
        kernel_length: of the temporal convolution (half the sampling rate in the paper).
        dropout: rate after each block (0.5 within-subject, 0.25 cross-subject in the paper).
        dropout_type: ``"dropout"`` (Keras ``Dropout``) or ``"spatial"`` (``SpatialDropout2D``: whole feature maps).
        depthwise_max_norm, dense_max_norm: the max-norm constraints (1 and 0.25 in the reference; ``None``
            turns one off).
        separable: ``False`` builds the twin: the depthwise layer becomes a standard ``(channels, 1)``
            convolution from ``F1`` to ``F1 * D`` filters (with the same max-norm over the electrode axis) and
            the separable layer a standard ``(1, 16)`` convolution from ``F1 * D`` to ``F2``.
        init: ``"keras"`` (Glorot-uniform, zero bias) or ``"torch"``.

    Examples:
        >>> import torch
        >>> model = EEGNet(num_classes=4, channels=22, samples=256)
        >>> model(torch.randn(8, 1, 22, 256)).shape
        torch.Size([8, 4])
    """

    def __init__(self, num_classes: int = 2, *, channels: int = 64, samples: int = 128, F1: int = 8, D: int = 2,
                 F2: int = 16, kernel_length: int = 64, dropout: float = 0.5, dropout_type: str = "dropout",
                 depthwise_max_norm: float | None = 1.0, dense_max_norm: float | None = 0.25, separable: bool = True,
                 init: str = "keras"):
        for value, name in ((num_classes, "num_classes"), (channels, "channels"), (samples, "samples"), (F1, "F1"),
                            (D, "D"), (F2, "F2"), (kernel_length, "kernel_length")):
            check_channels(value, name)
        time_steps_left = samples // POOLS[0] // POOLS[1]
        if time_steps_left < 1:
            raise ValueError(f"samples must be at least {POOLS[0] * POOLS[1]} (blocks 1 and 2 average-pool time by "
                             f"{POOLS[0]} and {POOLS[1]}); got {samples!r}")
        check_rate(dropout, "dropout")
        for value, name in ((depthwise_max_norm, "depthwise_max_norm"), (dense_max_norm, "dense_max_norm")):
            if value is not None:
                check_positive(value, name)
        if dropout_type not in DROPOUT_TYPES:
            raise ValueError(f"dropout_type must be one of {tuple(DROPOUT_TYPES)}; got {dropout_type!r}")
        check_flag(separable, "separable")
        check_init(init)
        spatial_filters = F1 * D

        temporal = Conv2d(1, F1, (1, kernel_length), padding="same", bias=False, init=init)
        if separable:
            spatial = DepthwiseConv2d(F1, (channels, 1), depth_multiplier=D, bias=False, init=init,
                                      max_norm=depthwise_max_norm)
        else:
            spatial = MaxNormConv2d(F1, spatial_filters, (channels, 1), bias=False, init=init,
                                    max_norm=depthwise_max_norm)
        mixing = conv_or_separable(spatial_filters, F2, (1, SEPARABLE_KERNEL_LENGTH), separable=separable,
                                   bias=False, init=init)
        drop = DROPOUT_TYPES[dropout_type]
        features = nn.Sequential(OrderedDict(
            block1=nn.Sequential(OrderedDict(
                temporal=ConvNormAct(temporal, batch_norm(F1)),
                spatial=ConvNormAct(spatial, batch_norm(spatial_filters), nn.ELU()),
                pool=nn.AvgPool2d((1, POOLS[0])),
                dropout=drop(dropout))),
            block2=nn.Sequential(OrderedDict(
                separable=ConvNormAct(mixing, batch_norm(F2), nn.ELU()),
                pool=nn.AvgPool2d((1, POOLS[1])),
                dropout=drop(dropout)))))
        head = nn.Sequential(OrderedDict(
            flatten=nn.Flatten(1),
            classifier=Dense(F2 * time_steps_left, num_classes, init=init, max_norm=dense_max_norm,
                             feature_shape=(F2, 1, time_steps_left))))
        super().__init__(features, head, (1, channels, samples), None)
        self.separable = separable
