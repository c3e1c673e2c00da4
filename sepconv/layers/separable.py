"""Depthwise separable convolution layers: depthwise spatial filter, then 1x1 channel mixer."""

from __future__ import annotations

import torch
from torch import nn

from .. import functional as F
from ..interop import keras as keras_io
from ..weights import fold_batch_norm, separable_dense_bias, separable_dense_weight
from ._common import (check_channels, check_init, check_input_channels, check_weight_fits, factory_kwargs,
                      make_activation, make_norm, new_weight, reset_keras_, reset_torch_, settings_repr, spatial_args,
                      spatial_repr)
from .conv import dense_conv


class _SeparableConvNd(nn.Module):
    r"""Depthwise separable convolution: depthwise (``C -> C * M``) then pointwise (``C * M -> C_out``).

    With neither ``norm`` nor ``activation`` this is Keras' ``SeparableConv`` (Xception style): one
    bias, after the pointwise step. ``norm="batch", activation="relu"`` puts BN + ReLU between the
    two steps (MobileNet style; add the second BN + ReLU after the layer yourself).

    Args:
        in_channels, out_channels: ``C`` and ``C_out``.
        kernel_size, stride, padding, dilation, padding_mode: of the depthwise step (the pointwise
            step is 1x1, stride 1); padding as in :mod:`sepconv.geometry` (``"same"`` for any stride,
            ``"causal"``, asymmetric pairs).
        depth_multiplier: ``M``.
        bias: bias after the pointwise step.
        depthwise_bias: bias after the depthwise step (off, as in Keras).
        norm: ``None``, ``"batch"`` or a callable ``channels -> nn.Module``, between the steps.
        activation: ``None``, a name (``"relu"``, ``"relu6"``, ...), a module or a factory, between the steps.
        init: ``"torch"`` or ``"keras"`` (Glorot-uniform with Keras' fans: depthwise ``(*k, C, M)``,
            pointwise ``(*1, C * M, C_out)``; zero biases).

    Shape:
        input ``(N, C, *spatial)`` or ``(C, *spatial)``; output ``(N, C_out, *out)``, ``out`` as for the
        depthwise step.

    Attributes:
        depthwise_weight: ``(C * M, 1, *kernel_size)``.
        pointwise_weight: ``(C_out, C * M, 1, ...)``.
        bias: ``(C_out,)`` or ``None``; depthwise_bias: ``(C * M,)`` or ``None``.
    """

    _rank: int

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, depth_multiplier=1,
                 bias=True, depthwise_bias=False, padding_mode="zeros", norm=None, activation=None, *, init="torch",
                 device=None, dtype=None):
        super().__init__()
        self.in_channels = check_channels(in_channels, "in_channels")
        self.out_channels = check_channels(out_channels, "out_channels")
        self.depth_multiplier = check_channels(depth_multiplier, "depth_multiplier")
        self.kernel_size, self.stride, self.padding, self.dilation, self.padding_mode = spatial_args(
            self._rank, kernel_size, stride, padding, dilation, padding_mode)
        self.init = check_init(init)
        hidden = in_channels * depth_multiplier
        factory = factory_kwargs(device, dtype)
        sizing = f"in_channels={in_channels}, depth_multiplier={depth_multiplier}, out_channels={out_channels}"
        check_weight_fits((out_channels, hidden, *(1,) * self._rank), factory, sizing)
        self.depthwise_weight = new_weight((hidden, 1, *self.kernel_size), factory,
                                           f"{sizing}, kernel_size={self.kernel_size}")
        self.pointwise_weight = new_weight((out_channels, hidden, *(1,) * self._rank), factory, sizing)
        self.depthwise_bias = nn.Parameter(torch.empty(hidden, **factory)) if depthwise_bias else None
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.norm = make_norm(norm, hidden, self._rank)
        if self.norm is not None:
            self.norm.to(**factory)
        self.activation = make_activation(activation)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.init == "keras":
            receptive = self.depthwise_weight[0, 0].numel()
            reset_keras_(self.depthwise_weight, self.depthwise_bias, receptive * self.in_channels,
                         receptive * self.depth_multiplier)
            reset_keras_(self.pointwise_weight, self.bias, self.pointwise_weight.shape[1], self.out_channels)
        else:
            reset_torch_(self.depthwise_weight, self.depthwise_bias)
            reset_torch_(self.pointwise_weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_channels(x, self.in_channels, len(self.kernel_size))
        if self.norm is None and self.activation is None:
            return F.separable_conv(x, self.depthwise_weight, self.pointwise_weight, self.bias, self.depthwise_bias,
                                    self.stride, self.padding, self.dilation, self.padding_mode)
        x = F.depthwise_conv(x, self.depthwise_weight, self.depthwise_bias, self.stride, self.padding, self.dilation,
                             self.padding_mode)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return F.pointwise_conv(x, self.pointwise_weight, self.bias)

    def _linear_factors(self):
        """Depthwise weight and bias with an eval-mode batch norm folded in; error if not linear."""
        if self.activation is not None:
            raise ValueError(f"to_dense() needs a linear layer; this one has activation={self.activation!r} "
                             "between its two steps")
        weight, bias = self.depthwise_weight, self.depthwise_bias
        if self.norm is None:
            return weight, bias
        if not isinstance(self.norm, nn.modules.batchnorm._BatchNorm) or self.norm.training \
                or self.norm.running_var is None:
            raise ValueError(f"to_dense() can fold only an eval-mode batch norm with running statistics; got "
                             f"norm={self.norm!r} (training={self.norm.training}); call .eval() first")
        return fold_batch_norm(weight, bias, self.norm)

    def to_dense(self) -> nn.Module:
        """The equivalent standard convolution (an eval-mode batch norm between the steps is folded in)."""
        depthwise_weight, depthwise_bias = self._linear_factors()
        weight = separable_dense_weight(depthwise_weight, self.pointwise_weight, self.in_channels)
        bias = separable_dense_bias(self.pointwise_weight, self.bias, depthwise_bias)
        return dense_conv(weight, bias, self.stride, self.padding, self.dilation, self.padding_mode)

    def _check_keras_compatible(self) -> None:
        if self.depthwise_bias is not None or self.norm is not None or self.activation is not None:
            raise ValueError("Keras' SeparableConv has no depthwise bias, norm or activation between its steps; "
                             f"this layer has depthwise_bias={self.depthwise_bias is not None}, norm={self.norm!r}, "
                             f"activation={self.activation!r}")

    def load_keras_weights(self, source) -> None:
        """Copy weights from a Keras ``SeparableConv1D/2D`` (or its ``get_weights()`` list)."""
        self._check_keras_compatible()
        keras_io.load_into(self, source, [
            ("depthwise kernel", (*self.kernel_size, self.in_channels, self.depth_multiplier), self.depthwise_weight,
             keras_io.depthwise_kernel_from_keras),
            ("pointwise kernel", (*(1,) * self._rank, self.pointwise_weight.shape[1], self.out_channels),
             self.pointwise_weight, keras_io.conv_kernel_from_keras),
        ], self.bias)

    def to_keras_weights(self) -> list:
        """Weights in Keras' ``SeparableConvND`` order: ``[depthwise (*k, C, M), pointwise (*1, C * M, C_out), bias]``."""
        self._check_keras_compatible()
        return keras_io.export([keras_io.depthwise_kernel_to_keras(self.depthwise_weight, self.in_channels),
                                keras_io.conv_kernel_to_keras(self.pointwise_weight)], self.bias)

    def extra_repr(self) -> str:
        return settings_repr([str(self.in_channels), str(self.out_channels), f"kernel_size={self.kernel_size}"],
                             [*spatial_repr(self, self._rank), ("depth_multiplier", self.depth_multiplier, 1),
                              ("bias", self.bias is not None, True),
                              ("depthwise_bias", self.depthwise_bias is not None, False), ("init", self.init, "torch")])


class SeparableConv1d(_SeparableConvNd):
    __doc__ = _SeparableConvNd.__doc__
    _rank = 1


class SeparableConv2d(_SeparableConvNd):
    __doc__ = _SeparableConvNd.__doc__ + """
    Examples:
        >>> layer = SeparableConv2d(3, 64, 3, padding="same", bias=True)   # Keras SeparableConv2D(64, 3, padding="same")
        >>> sum(p.numel() for p in layer.parameters())
        283
        >>> layer(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 64, 32, 32])
    """
    _rank = 2


class SeparableConv3d(_SeparableConvNd):
    __doc__ = _SeparableConvNd.__doc__
    _rank = 3
