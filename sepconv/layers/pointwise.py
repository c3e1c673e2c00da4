"""Pointwise (1x1) convolution layers: channel mixing at every position."""

from __future__ import annotations

import torch
from torch import nn

from .. import functional as F
from ..interop import keras as keras_io
from ._common import check_channels, check_init, factory_kwargs, new_weight, reset_keras_, reset_torch_, settings_repr
from .conv import dense_conv


class _PointwiseConvNd(nn.Module):
    r"""1x1 convolution: :math:`\text{out}[n, o] = \text{bias}[o] + \sum_i \text{weight}[o, i]\,\text{input}[n, i]`.

    Args:
        in_channels, out_channels: channels before and after.
        bias: add a learnable bias per output channel.
        init: ``"torch"`` or ``"keras"`` (Glorot-uniform, ``fan_in = C_in``, ``fan_out = C_out``, zero bias).

    Shape: input ``(N, C_in, *spatial)`` or ``(C_in, *spatial)``; output ``(N, C_out, *spatial)``.

    Attributes:
        weight: ``(C_out, C_in, 1, ...)`` (a ``ConvNd`` weight, so it ports to and from ``nn.ConvNd``).
        bias: ``(C_out,)`` or ``None``.
    """

    _rank: int

    def __init__(self, in_channels, out_channels, bias=True, *, init="torch", device=None, dtype=None):
        super().__init__()
        self.in_channels = check_channels(in_channels, "in_channels")
        self.out_channels = check_channels(out_channels, "out_channels")
        self.init = check_init(init)
        factory = factory_kwargs(device, dtype)
        self.weight = new_weight((out_channels, in_channels, *(1,) * self._rank), factory,
                                 f"in_channels={in_channels}, out_channels={out_channels}")
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.init == "keras":
            reset_keras_(self.weight, self.bias, self.in_channels, self.out_channels)
        else:
            reset_torch_(self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pointwise_conv(x, self.weight, self.bias)

    def to_dense(self) -> nn.Module:
        """The equivalent ``nn.ConvNd`` with a 1x1 kernel."""
        return dense_conv(self.weight, self.bias, (1,) * self._rank, 0, (1,) * self._rank, "zeros")

    def load_keras_weights(self, source) -> None:
        """Copy weights from a Keras ``ConvND`` with a 1x1 kernel (or its ``get_weights()`` list)."""
        shape = (*(1,) * self._rank, self.in_channels, self.out_channels)
        keras_io.load_into(self, source, [("kernel", shape, self.weight, keras_io.conv_kernel_from_keras)], self.bias)

    def to_keras_weights(self) -> list:
        """Weights of the Keras ``ConvND(out_channels, 1)`` equivalent: ``[kernel (*1, C_in, C_out), bias]``."""
        return keras_io.export([keras_io.conv_kernel_to_keras(self.weight)], self.bias)

    def extra_repr(self) -> str:
        return settings_repr([str(self.in_channels), str(self.out_channels)],
                             [("bias", self.bias is not None, True), ("init", self.init, "torch")])


class PointwiseConv1d(_PointwiseConvNd):
    __doc__ = _PointwiseConvNd.__doc__
    _rank = 1


class PointwiseConv2d(_PointwiseConvNd):
    __doc__ = _PointwiseConvNd.__doc__
    _rank = 2


class PointwiseConv3d(_PointwiseConvNd):
    __doc__ = _PointwiseConvNd.__doc__
    _rank = 3
