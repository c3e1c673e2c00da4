"""Compute kernels behind :mod:`sepconv.functional` and :mod:`sepconv.inference`: one face per op, backends behind it.

Callers check arguments and resolve the geometry once (a :class:`sepconv.geometry.ConvGeometry`), then call the
faces here with tensors known to be valid. Each face asks :mod:`.registry` which implementation runs the call: the
reference (:mod:`.reference`, PyTorch's own operations) or a registered fast backend (:mod:`.cpu`, C++ kernels
behind the ``torch.ops.sepconv`` operators of :mod:`.ops`). The ops:

* ``depthwise_conv`` (with gradients; ``conv`` sends every convolution with one group per input channel here,
  e.g. EEGNet's one-channel temporal convolution);
* inference, forward only, bias and activation (:data:`sepconv.activations.FUSED`) in the epilogue:
  ``depthwise_conv_act``, ``pointwise_conv_act`` and ``separable_conv_act`` (the two in one pass; its baseline is
  the two faces one after the other);
* training: ``batch_norm_act`` (batch norm with the batch's statistics, then an activation).

``conv`` on anything else, ``conv_act`` and ``pointwise_conv`` run on the reference. Under
``torch.autocast("cpu")`` the faces cast float32 tensors to autocast's dtype, as PyTorch casts its convolutions.

Adding a backend: a subpackage with the :class:`.registry.Backend` attributes and a function per op it covers,
registered below; kernels of its own register as the device implementations of the ops in :mod:`.ops`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import cpu, reference, registry
from .registry import choices, clear_choices, get_kernels, register_backend, set_kernels, use_kernels

__all__ = ["batch_norm_act", "bound", "choices", "clear_choices", "conv", "conv_act", "depthwise_conv", "depthwise_conv_act",
           "get_kernels", "pointwise_conv", "pointwise_conv_act", "register_backend", "separable_conv_act",
           "set_kernels", "use_kernels"]

registry.register_backend(cpu)


def _autocast(*tensors):
    """Under ``torch.autocast("cpu")``, float32 tensors in autocast's dtype, as PyTorch's own convolutions are cast
    (the backends' eager paths do not pass through the dispatcher, where the ops' autocast rule sits)."""
    if not (torch.is_autocast_enabled("cpu") and tensors[0].device.type == "cpu"):
        return tensors
    dtype = torch.get_autocast_dtype("cpu")
    return tuple(t.to(dtype) if t is not None and t.dtype == torch.float32 else t for t in tensors)


def depthwise_conv(x, weight, bias, geometry, padding_mode):
    """Depthwise convolution: ``weight`` ``(C * M, 1, *kernel_size)`` on ``x`` ``(N, C, *spatial)``."""
    x, weight, bias = _autocast(x, weight, bias)
    args = (x, weight, bias, geometry, padding_mode)
    return registry.select("depthwise_conv", args)(*args)


def _depthwise(x, weight, groups: int) -> bool:
    return groups == x.shape[1] and weight.shape[1] == 1


def conv(x, weight, bias, geometry, groups, padding_mode):
    """Grouped N-d convolution; one group per input channel is a depthwise convolution."""
    if _depthwise(x, weight, groups):
        return depthwise_conv(x, weight, bias, geometry, padding_mode)
    return reference.conv(x, weight, bias, geometry, groups, padding_mode)


def pointwise_conv(x, weight, bias):
    """1x1 convolution; ``weight`` is ``(C_out, C_in, 1, ...)``."""
    return reference.pointwise_conv(x, weight, bias)


def depthwise_conv_act(x, weight, bias, geometry, padding_mode, activation, alpha=1.0, prefer_channels_last=False):
    """``activation(depthwise_conv(x) + bias)``; ``prefer_channels_last``: a one-channel input (whose layout is
    ambiguous) answers channels-last where the backend can."""
    x, weight, bias = _autocast(x, weight, bias)
    args = (x, weight, bias, geometry, padding_mode, activation, alpha, prefer_channels_last)
    return registry.select("depthwise_conv_act", args)(*args)


def _per_frame(x, geometry) -> bool:
    """Whether a 3-D convolution is a 2-D one on each frame of a view of ``x``: a kernel one frame deep, stride 1
    and no padding in depth, a channels_last_3d input (outside exported graphs, which keep the 3-D node)."""
    return (x.ndim == 5 and geometry.kernel_size[0] == 1 and geometry.stride[0] == 1 and geometry.padding[0] == (0, 0)
            and x.is_contiguous(memory_format=torch.channels_last_3d) and not registry.exporting())


def conv_act(x, weight, bias, geometry, groups, padding_mode, activation, alpha=1.0):
    """``activation(conv(x) + bias)`` for convolutions that are neither depthwise nor pointwise. A 3-D one with a
    kernel one frame deep (X3D's stem, strided 1x1x1 shortcuts) runs as PyTorch's 2-D convolution over the frames,
    2-4x faster than its 3-D one on those shapes."""
    if _per_frame(x, geometry):
        n, channels, frames = x.shape[:3]
        images = x.transpose(1, 2).reshape(n * frames, channels, *x.shape[3:])  # a view in channels_last_3d
        plane = geometry._make(axis[1:] for axis in geometry)
        y = reference.conv_act(images, weight[:, :, 0], bias, plane, groups, padding_mode, activation, alpha)
        return y.reshape(n, frames, *y.shape[1:]).transpose(1, 2)
    return reference.conv_act(x, weight, bias, geometry, groups, padding_mode, activation, alpha)


def pointwise_conv_act(x, weight, bias, activation, alpha=1.0, residual=None):
    """``activation(pointwise_conv(x) + bias + residual)`` (``residual``: None, or a tensor of the output's shape,
    e.g. a residual block's shortcut, added in the epilogue)."""
    x, weight, bias, residual = _autocast(x, weight, bias, residual)
    args = (x, weight, bias, activation, alpha, residual)
    return registry.select("pointwise_conv_act", args)(*args)


def _separable_steps(x, weight, bias, geometry, padding_mode, activation, alpha, pw_weight, pw_bias, pw_activation,
                     pw_alpha, residual=None):
    hidden = depthwise_conv_act(x, weight, bias, geometry, padding_mode, activation, alpha)
    return pointwise_conv_act(hidden, pw_weight, pw_bias, pw_activation, pw_alpha, residual)


def separable_conv_act(x, weight, bias, geometry, padding_mode, activation, alpha, pw_weight, pw_bias, pw_activation,
                       pw_alpha, residual=None):
    """``pointwise_conv_act(depthwise_conv_act(x), ..., residual)`` where a backend runs the two as one kernel and
    that pays; otherwise the two faces one after the other."""
    x, weight, bias, pw_weight, pw_bias, residual = _autocast(x, weight, bias, pw_weight, pw_bias, residual)
    args = (x, weight, bias, geometry, padding_mode, activation, alpha, pw_weight, pw_bias, pw_activation, pw_alpha,
            residual)
    return registry.select("separable_conv_act", args, baseline=_separable_steps)(*args)


_BASELINES = {"separable_conv_act": _separable_steps}


def bound(op: str, x: torch.Tensor, *rest, residual: torch.Tensor | None = None) -> Callable[..., torch.Tensor]:
    """What the inference face ``op`` (``depthwise_conv_act``, ``pointwise_conv_act``, ``separable_conv_act`` or
    ``conv_act``) runs on ``(x, *rest)``, as a function of ``x`` alone (of ``x`` and the residual where one is given):
    the registry's choice bound to ``rest``. It stands for the face on inputs with the :func:`registry.reuse_key`
    of these (which excludes autocast, so the face's casts do nothing there)."""
    if op == "conv_act":
        return lambda x: conv_act(x, *rest)
    if residual is not None:
        function = registry.select(op, (x, *rest, residual), _BASELINES.get(op))
        return lambda x, residual: function(x, *rest, residual)
    function = registry.select(op, (x, *rest), _BASELINES.get(op))
    return lambda x: function(x, *rest)


def batch_norm_act(x, weight, bias, eps, activation):
    """``(activation(batch_norm(x)), mean, invstd)`` with the batch's statistics (invstd = 1 / sqrt(biased variance
    + eps)); differentiable in ``x``, ``weight`` and ``bias``."""
    args = (x, weight, bias, eps, activation)
    return registry.select("batch_norm_act", args)(*args)
