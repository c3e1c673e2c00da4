"""Compute kernels behind :mod:`sepconv.functional`.

The functional ops check arguments and resolve geometry, then call the entry points here with
tensors that are known to be valid and with padding as integer ``(before, after)`` pairs. ``conv`` and
``pointwise_conv`` run the PyTorch reference path (:mod:`sepconv.kernels.reference`);
``depthwise_conv`` goes through :mod:`sepconv.kernels.dispatch`, which picks between the Numba
kernels (:mod:`sepconv.kernels.numba_depthwise`) and the reference per the ``SEPCONV_KERNELS`` mode
(:func:`set_kernels`), with the reference kept as their tested twin.
"""

from __future__ import annotations

from . import dispatch, reference
from .dispatch import get_kernels, set_kernels, use_kernels

__all__ = ["conv", "depthwise_conv", "get_kernels", "pointwise_conv", "set_kernels", "use_kernels"]


def conv(x, weight, bias, stride, padding, dilation, groups, padding_mode):
    """Grouped N-d convolution; ``padding`` is a tuple of integer ``(before, after)`` pairs."""
    return reference.conv(x, weight, bias, stride, padding, dilation, groups, padding_mode)


def depthwise_conv(x, weight, bias, stride, padding, dilation, padding_mode):
    """Depthwise convolution: ``groups`` equals the input's channel count."""
    return dispatch.depthwise_conv(x, weight, bias, stride, padding, dilation, padding_mode)


def pointwise_conv(x, weight, bias):
    """1x1 convolution; ``weight`` is ``(C_out, C_in, 1, ...)``."""
    return reference.pointwise_conv(x, weight, bias)
