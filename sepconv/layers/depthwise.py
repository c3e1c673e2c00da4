"""Depthwise convolution layers: one spatial filter per input channel (times a depth multiplier)."""

from __future__ import annotations

import torch
from torch import nn

from .. import functional as F
from ..constraints import check_max_norm, max_norm_
from ..interop import keras as keras_io
from ..weights import depthwise_dense_weight
from ._common import (check_channels, check_init, check_input_channels, factory_kwargs, new_weight, reset_keras_,
                      reset_torch_, settings_repr, spatial_args, spatial_repr)
from .conv import dense_conv


class _DepthwiseConvNd(nn.Module):
    r"""Depthwise convolution over ``rank`` spatial dims.

    .. math::
        \text{out}[n, cM + m] = \text{bias}[cM + m] + \text{weight}[cM + m] \star \text{input}[n, c]

    Args:
        in_channels: channels ``C`` of the input.
        kernel_size: int or tuple, one per spatial axis.
        stride, dilation: int or tuple (both > 1 together is allowed).
        padding: int, per-axis ints or ``(before, after)`` pairs, ``"valid"``, ``"same"`` (TF/Keras
            semantics for any stride) or ``"causal"`` (last axis padded before only); see
            :mod:`sepconv.geometry`.
        depth_multiplier: ``M`` filters per input channel; ``out_channels = C * M``.
        bias: add a learnable bias per output channel.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.
        init: ``"torch"`` (PyTorch's ``ConvNd`` default) or ``"keras"`` (Glorot-uniform with Keras'
            fans for a ``(*k, C, M)`` kernel: ``fan_in = C * prod(k)``, ``fan_out = M * prod(k)``; zero bias).
        max_norm: if set, :func:`sepconv.constraints.apply_constraints` projects each filter to an
            L2 norm of at most this over the first spatial axis, as Keras'
            ``depthwise_constraint=max_norm(v)`` (axis 0 of the Keras kernel) does in EEGNet.

    Shape:
        input ``(N, C, *spatial)`` or ``(C, *spatial)``; output ``(N, C * M, *out)`` with, per axis,
        ``out = floor((n + before + after - (k - 1) * d - 1) / s) + 1`` (``ceil(n / s)`` for ``"same"``).

    Attributes:
        weight: ``(C * M, 1, *kernel_size)``.
        bias: ``(C * M,)`` or ``None``.
    """

    _rank: int

    def __init__(self, in_channels, kernel_size, stride=1, padding=0, dilation=1, depth_multiplier=1, bias=True,
                 padding_mode="zeros", *, init="torch", max_norm=None, device=None, dtype=None):
        super().__init__()
        self.in_channels = check_channels(in_channels, "in_channels")
        self.depth_multiplier = check_channels(depth_multiplier, "depth_multiplier")
        self.kernel_size, self.stride, self.padding, self.dilation, self.padding_mode = spatial_args(
            self._rank, kernel_size, stride, padding, dilation, padding_mode)
        self.init = check_init(init)
        self.max_norm = check_max_norm(max_norm)
        self.out_channels = in_channels * depth_multiplier
        factory = factory_kwargs(device, dtype)
        self.weight = new_weight((self.out_channels, 1, *self.kernel_size), factory,
                                 f"in_channels={in_channels}, depth_multiplier={depth_multiplier}, "
                                 f"kernel_size={self.kernel_size}")
        self.bias = nn.Parameter(torch.empty(self.out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.init == "keras":
            receptive = self.weight[0, 0].numel()
            reset_keras_(self.weight, self.bias, receptive * self.in_channels, receptive * self.depth_multiplier)
        else:
            reset_torch_(self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_channels(x, self.in_channels, len(self.kernel_size))
        return F.depthwise_conv(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.padding_mode)

    def constrain_(self) -> None:
        if self.max_norm is not None:
            max_norm_(self.weight, self.max_norm, dim=2)

    def to_dense(self) -> nn.Module:
        """The equivalent standard convolution (``groups=1``, block-diagonal kernel)."""
        return dense_conv(depthwise_dense_weight(self.weight, self.in_channels), self.bias, self.stride,
                          self.padding, self.dilation, self.padding_mode)

    def load_keras_weights(self, source) -> None:
        """Copy weights from a Keras ``DepthwiseConv1D/2D`` (or its ``get_weights()`` list)."""
        shape = (*self.kernel_size, self.in_channels, self.depth_multiplier)
        keras_io.load_into(self, source, [("depthwise kernel", shape, self.weight, keras_io.depthwise_kernel_from_keras)],
                           self.bias)

    def to_keras_weights(self) -> list:
        """Weights in Keras' ``DepthwiseConvND`` order and layout: ``[kernel (*k, C, M), bias]``."""
        return keras_io.export([keras_io.depthwise_kernel_to_keras(self.weight, self.in_channels)], self.bias)

    def extra_repr(self) -> str:
        return settings_repr([str(self.in_channels), f"kernel_size={self.kernel_size}"],
                             [("depth_multiplier", self.depth_multiplier, 1), *spatial_repr(self, self._rank),
                              ("bias", self.bias is not None, True), ("init", self.init, "torch"),
                              ("max_norm", self.max_norm, None)])


class DepthwiseConv1d(_DepthwiseConvNd):
    __doc__ = _DepthwiseConvNd.__doc__.replace("over ``rank`` spatial dims", "over one spatial dim (time)")
    _rank = 1


class DepthwiseConv2d(_DepthwiseConvNd):
    __doc__ = _DepthwiseConvNd.__doc__.replace("over ``rank`` spatial dims", "over two spatial dims") + """
    Examples:
        >>> layer = DepthwiseConv2d(8, 3, stride=2, padding="same", depth_multiplier=2)
        >>> layer(torch.randn(1, 8, 15, 15)).shape
        torch.Size([1, 16, 8, 8])
    """
    _rank = 2


class DepthwiseConv3d(_DepthwiseConvNd):
    __doc__ = _DepthwiseConvNd.__doc__.replace("over ``rank`` spatial dims", "over three spatial dims")
    _rank = 3
