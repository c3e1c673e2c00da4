"""Spatially separable convolution layers: a 1-D filter per spatial axis, applied in turn (k x 1, then 1 x k)."""

from __future__ import annotations

import torch
from torch import nn

from .. import functional as F
from ..weights import spatial_dense_weight
from ._common import (check_channels, check_init, check_input_channels, factory_kwargs, make_activation, make_norm,
                      new_weight, reset_keras_, reset_torch_, settings_repr, spatial_args, spatial_repr)
from .conv import dense_conv


class _SpatialSeparableConvNd(nn.Module):
    r"""Spatially separable convolution: 1-D filters along each spatial axis in turn (axis 0 first).

    Two forms:

    * channel-mixing (default; Inception-v3, Jaderberg et al. 2014): ``C_in -> mid -> ... -> C_out``,
      each step a full 1-D convolution along one axis; costs ``sum_a k_a * C_a * C_{a+1}`` weights
      instead of ``prod(k) * C_in * C_out``;
    * per-channel (``depthwise=True``): every channel filtered by a rank-1 (outer-product) kernel such
      as Sobel or Gaussian; ``out_channels`` must be a multiple ``M`` of ``in_channels`` (the first step
      carries the depth multiplier).

    Stride, dilation and padding are per axis and act in the step that filters that axis, so
    without ``norm``/``activation`` the layer equals the dense convolution with the composed kernel
    (:meth:`to_dense`).

    Args:
        in_channels, out_channels: channels before and after.
        kernel_size: int or tuple, one per spatial axis.
        mid_channels: width between the steps of the mixing form (default ``out_channels``).
        stride, padding, dilation, padding_mode: as for :class:`sepconv.DepthwiseConv2d`.
        bias: bias after the last step.
        depthwise: the per-channel form.
        norm, activation: optionally between the steps (as in Inception-v3), as for
            :class:`sepconv.SeparableConv2d`.
        init: ``"torch"`` or ``"keras"`` (Glorot-uniform with the fans of the Keras ``Conv1D`` /
            ``DepthwiseConv1D`` kernel each step corresponds to; zero bias).

    Attributes:
        factors: ``nn.ParameterList``; ``factors[a]`` has shape ``(C_out_a, C_in_a / groups_a, k_a)``.
        bias: ``(C_out,)`` or ``None``.
    """

    _rank: int

    def __init__(self, in_channels, out_channels, kernel_size, mid_channels=None, stride=1, padding=0, dilation=1,
                 bias=True, padding_mode="zeros", depthwise=False, norm=None, activation=None, *, init="torch",
                 device=None, dtype=None):
        super().__init__()
        self.in_channels = check_channels(in_channels, "in_channels")
        self.out_channels = check_channels(out_channels, "out_channels")
        self.kernel_size, self.stride, self.padding, self.dilation, self.padding_mode = spatial_args(
            self._rank, kernel_size, stride, padding, dilation, padding_mode)
        self.depthwise = bool(depthwise)
        self.init = check_init(init)
        if self.depthwise:
            if mid_channels is not None:
                raise ValueError(f"mid_channels must be None with depthwise=True; got {mid_channels!r}")
            if out_channels % in_channels:
                raise ValueError(f"out_channels (={out_channels}) must be a multiple of in_channels (={in_channels}) "
                                 "with depthwise=True")
            widths = [out_channels] * self._rank
            per_group = [1] * self._rank
        else:
            mid_channels = out_channels if mid_channels is None else check_channels(mid_channels, "mid_channels")
            widths = [mid_channels] * (self._rank - 1) + [out_channels]
            per_group = [in_channels] + widths[:-1]
        self.mid_channels = mid_channels
        factory = factory_kwargs(device, dtype)
        self.factors = nn.ParameterList(
            new_weight((width, group, k), factory, f"in_channels={in_channels}, out_channels={out_channels}, "
                       f"kernel_size={self.kernel_size}")
            for width, group, k in zip(widths, per_group, self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.norms = nn.ModuleList(m for m in (make_norm(norm, w, self._rank) for w in widths[:-1]) if m is not None)
        self.norms.to(**factory)
        self.activation = make_activation(activation)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for i, factor in enumerate(self.factors):
            bias = self.bias if i == self._rank - 1 else None
            if self.init == "keras":
                k = factor.shape[2]
                if self.depthwise:  # DepthwiseConv1D kernel (k, C, M)
                    channels = self.in_channels if i == 0 else factor.shape[0]
                    reset_keras_(factor, bias, k * channels, k * (factor.shape[0] // channels))
                else:  # Conv1D kernel (k, C_in, C_out)
                    reset_keras_(factor, bias, k * factor.shape[1], k * factor.shape[0])
            else:
                reset_torch_(factor, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_channels(x, self.in_channels, len(self.factors))
        if not len(self.norms) and self.activation is None:
            return F.spatial_separable_conv(x, list(self.factors), self.bias, self.stride, self.padding, self.dilation,
                                            self.padding_mode)
        for axis, factor in enumerate(self.factors):
            x = self._step(x, axis, factor)
            if axis < self._rank - 1:
                if len(self.norms):
                    x = self.norms[axis](x)
                if self.activation is not None:
                    x = self.activation(x)
        return x

    def _step(self, x: torch.Tensor, axis: int, factor: torch.Tensor) -> torch.Tensor:
        """One 1-D convolution along ``axis`` with that axis' stride, padding and dilation."""
        def only(value, rest):
            return tuple(value if a == axis else rest for a in range(self._rank))
        shape = only(factor.shape[2], 1)
        channels = x.shape[-self._rank - 1]
        return F.conv(x, factor.reshape(*factor.shape[:2], *shape), self.bias if axis == self._rank - 1 else None,
                      only(self.stride[axis], 1), only(self.padding[axis], (0, 0)), only(self.dilation[axis], 1),
                      channels // factor.shape[1], self.padding_mode)

    def to_dense(self) -> nn.Module:
        """The equivalent standard convolution (its kernel is the composition of the factors)."""
        if len(self.norms) or self.activation is not None:
            raise ValueError("to_dense() needs a linear layer; this one has a norm or activation between its steps")
        weight = spatial_dense_weight(list(self.factors), self.in_channels)
        return dense_conv(weight, self.bias, self.stride, self.padding, self.dilation, self.padding_mode)

    def extra_repr(self) -> str:
        return settings_repr([str(self.in_channels), str(self.out_channels), f"kernel_size={self.kernel_size}"],
                             [("mid_channels", self.mid_channels, None if self.depthwise else self.out_channels),
                              *spatial_repr(self, self._rank), ("bias", self.bias is not None, True),
                              ("depthwise", self.depthwise, False), ("init", self.init, "torch")])


class SpatialSeparableConv2d(_SpatialSeparableConvNd):
    __doc__ = _SpatialSeparableConvNd.__doc__ + """
    Examples:
        >>> layer = SpatialSeparableConv2d(64, 64, 7, padding="same")     # 7x1 then 1x7, 64 -> 64 -> 64
        >>> sum(f.numel() for f in layer.factors), 7 * 7 * 64 * 64
        (57344, 200704)
    """
    _rank = 2


class SpatialSeparableConv3d(_SpatialSeparableConvNd):
    __doc__ = _SpatialSeparableConvNd.__doc__
    _rank = 3
