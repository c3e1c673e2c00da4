"""Compute kernels behind :mod:`sepconv.functional`: one face per op, backends behind it.

The functional ops check arguments and resolve the geometry once (a :class:`sepconv.geometry.ConvGeometry`),
then call the faces here with tensors known to be valid. ``depthwise_conv`` (and ``conv`` whenever its groups
equal the input's channels, e.g. EEGNet's one-channel temporal convolution) goes to the backend that
:mod:`.registry` selects: the reference (:mod:`.reference`, PyTorch's own convolutions) or a registered fast
backend (:mod:`.cpu`, C++ kernels behind the ``torch.ops.sepconv`` operators of :mod:`.ops`).
``pointwise_conv`` and the other convolutions run on the reference.

Adding a backend: a subpackage with the :class:`.registry.Backend` attributes, registered below; if it has
kernels of its own, it registers them as the device implementations of the ops in :mod:`.ops`.
"""

from __future__ import annotations

from . import cpu, reference, registry
from .registry import choices, clear_choices, get_kernels, register_backend, set_kernels, use_kernels

__all__ = ["choices", "clear_choices", "conv", "depthwise_conv", "get_kernels", "pointwise_conv", "register_backend",
           "set_kernels", "use_kernels"]

registry.register_backend(cpu)


def depthwise_conv(x, weight, bias, geometry, padding_mode):
    """Depthwise convolution: ``weight`` ``(C * M, 1, *kernel_size)`` on ``x`` ``(N, C, *spatial)``."""
    return registry.select(x, weight, bias, geometry, padding_mode).depthwise_conv(x, weight, bias, geometry,
                                                                                   padding_mode)


def conv(x, weight, bias, geometry, groups, padding_mode):
    """Grouped N-d convolution; one group per input channel is a depthwise convolution."""
    if groups == x.shape[1] and weight.shape[1] == 1:
        return depthwise_conv(x, weight, bias, geometry, padding_mode)
    return reference.conv(x, weight, bias, geometry, groups, padding_mode)


def pointwise_conv(x, weight, bias):
    """1x1 convolution; ``weight`` is ``(C_out, C_in, 1, ...)``."""
    return reference.pointwise_conv(x, weight, bias)
