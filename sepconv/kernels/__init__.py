"""Compute kernels behind :mod:`sepconv.functional`.

The functional ops check arguments and resolve geometry, then call the entry points here with
tensors that are known to be valid and with padding as integer ``(before, after)`` pairs. Today every
entry point runs the PyTorch reference path (:mod:`sepconv.kernels.reference`); fast kernels for
shapes where PyTorch is slow plug in here, behind the same signatures, with the reference kept as
their twin for tests.
"""

from __future__ import annotations

from . import reference


def conv(x, weight, bias, stride, padding, dilation, groups, padding_mode):
    """Grouped N-d convolution; ``padding`` is a tuple of integer ``(before, after)`` pairs."""
    return reference.conv(x, weight, bias, stride, padding, dilation, groups, padding_mode)


def depthwise_conv(x, weight, bias, stride, padding, dilation, padding_mode):
    """Depthwise convolution: ``groups`` equals the input's channel count."""
    return reference.conv(x, weight, bias, stride, padding, dilation, x.shape[1], padding_mode)


def pointwise_conv(x, weight, bias):
    """1x1 convolution; ``weight`` is ``(C_out, C_in, 1, ...)``."""
    return reference.pointwise_conv(x, weight, bias)
