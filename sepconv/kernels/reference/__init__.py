"""The reference backend: PyTorch's own convolutions, with padding applied the cheapest correct way.

It covers everything (any rank, dtype, device, padding mode) and is the tested twin of every fast backend; the
registry falls back to it rather than registering it, so it needs no ``available``/``supports``. It implements every
op of :mod:`sepconv.kernels` under the face's name and signature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import activations
from ..._memo import memoised

NAME = "reference"
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_PAD_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


@memoised
def _padding_plan(padding: tuple, padding_mode: str, pad_explicitly: bool):
    """``(conv_padding, pad_amounts)``: what goes inside the convolution and what ``F.pad`` does first."""
    if not pad_explicitly and padding_mode == "zeros" and all(before == after for before, after in padding):
        return tuple(before for before, _ in padding), None  # inside the convolution: no padded copy
    if not any(before or after for before, after in padding):
        return 0, None
    return 0, pad_amounts(padding)


def pad_amounts(padding) -> list:
    """``F.pad``'s list for ``(before, after)`` pairs: the last axis first."""
    return [amount for pair in reversed(padding) for amount in pair]


def pad(x, padding, padding_mode: str):
    """``x`` padded by ``(before, after)`` pairs per spatial axis in ``padding_mode``."""
    return F.pad(x, pad_amounts(padding), mode=_PAD_MODE[padding_mode])


def conv(x, weight, bias, geometry, groups, padding_mode):
    """Grouped N-d convolution of the resolved :class:`~sepconv.geometry.ConvGeometry`."""
    # PyTorch's CPU 1-D grouped convolution with a kernel wider than 3 runs several times faster on an explicitly
    # padded input than with the padding inside it
    pad_explicitly = weight.ndim == 3 and groups > 1 and weight.shape[-1] > 3
    conv_padding, amounts = _padding_plan(geometry.padding, padding_mode, pad_explicitly)
    if amounts is not None:
        x = F.pad(x, amounts, mode=_PAD_MODE[padding_mode])
    return _CONV[weight.ndim - 2](x, weight, bias, geometry.stride, conv_padding, geometry.dilation, groups)


def depthwise_conv(x, weight, bias, geometry, padding_mode):
    return conv(x, weight, bias, geometry, x.shape[1], padding_mode)


def pointwise_conv(x, weight, bias):
    return _CONV[weight.ndim - 2](x, weight, bias)


def conv_act(x, weight, bias, geometry, groups, padding_mode, activation: str, alpha: float = 1.0):
    """A convolution, then its bias and activation: the unfused twin of the fused kernels."""
    return activations.apply(conv(x, weight, bias, geometry, groups, padding_mode), activation, alpha)


def depthwise_conv_act(x, weight, bias, geometry, padding_mode, activation, alpha=1.0, prefer_channels_last=False):
    return conv_act(x, weight, bias, geometry, x.shape[1], padding_mode, activation, alpha)


def pointwise_conv_act(x, weight, bias, activation, alpha=1.0, residual=None):
    y = pointwise_conv(x, weight, bias)
    return activations.apply(y if residual is None else y + residual, activation, alpha)


def separable_conv_act(x, weight, bias, geometry, padding_mode, activation, alpha, pw_weight, pw_bias, pw_activation,
                       pw_alpha, residual=None):
    hidden = depthwise_conv_act(x, weight, bias, geometry, padding_mode, activation, alpha)
    return pointwise_conv_act(hidden, pw_weight, pw_bias, pw_activation, pw_alpha, residual)


def batch_norm_act(x, weight, bias, eps: float, activation: str):
    """``(activation(batch_norm(x)), mean, invstd)`` with the batch's statistics (invstd: 1 / sqrt(biased variance +
    eps)), differentiable in ``x``, ``weight`` and ``bias`` through PyTorch's own batch norm."""
    y, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
    return activations.apply(y, activation), mean, invstd
