"""Functional separable convolutions: the core every layer, model and tool builds on.

Every op is N-d: the number of spatial dimensions (1, 2 or 3) comes from the weight's rank
(or, for :func:`spatial_separable_conv`, from the number of factors). Inputs are
``(N, C, *spatial)`` or unbatched ``(C, *spatial)``, in any memory format.

Padding takes every form :mod:`sepconv.geometry` understands: an int, per-axis ints or
``(before, after)`` pairs, ``"valid"``, ``"same"`` (TensorFlow/Keras semantics for any stride and
dilation) and ``"causal"`` (only before, on the last spatial axis). ``padding_mode`` is one of
``"zeros"``, ``"reflect"``, ``"replicate"``, ``"circular"``.

Each op checks its arguments, resolves the geometry once, then calls :mod:`sepconv.kernels`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

import torch.nn.functional as F

from . import activations, kernels
from ._memo import memoised
from .geometry import (ConvGeometry, check_fits, check_padding_mode, check_positive_int, conv_geometry, resolve_padding,
                       to_tuple)

__all__ = ["batch_norm_act", "conv", "depthwise_conv", "pointwise_conv", "separable_conv", "spatial_separable_conv"]


# --- argument checks -------------------------------------------------------------------------------

def _check_tensor(value, name: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    if value.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor; got layout {value.layout}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {value.dtype}")


def _check_weight(weight, name: str, rank: int | None = None) -> int:
    """Check a convolution weight ``(C_out, C_in / groups, *kernel)``; return its spatial rank."""
    _check_tensor(weight, name)
    if rank is None:
        rank = weight.ndim - 2
        if rank not in (1, 2, 3):
            raise ValueError(f"{name} must have shape (C_out, C_in / groups, *kernel_size) with 1, 2 or 3 "
                             f"spatial dims; got shape {tuple(weight.shape)}")
    elif weight.ndim != rank + 2:
        raise ValueError(f"{name} must have {rank + 2} dims (C_out, C_in / groups, *kernel_size); "
                         f"got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise ValueError(f"{name} must have non-zero sizes; got shape {tuple(weight.shape)}")
    return rank


def _check_bias(bias, channels: int, name: str, like: torch.Tensor) -> None:
    if bias is None:
        return
    _check_tensor(bias, name)
    if bias.shape != (channels,):
        raise ValueError(f"{name} must have shape ({channels},); got shape {tuple(bias.shape)}")
    if bias.dtype != like.dtype:
        raise TypeError(f"{name} dtype {bias.dtype} does not match the weight dtype {like.dtype}")


def _autocast_casts(*tensors) -> bool:
    """Whether ``torch.autocast`` will bring these to one dtype (float32 and its dtype mix there, as in PyTorch's
    convolutions)."""
    device = tensors[0].device.type
    return torch.is_autocast_enabled(device) and \
        all(t.dtype in (torch.float32, torch.get_autocast_dtype(device)) for t in tensors)


def _batched(x, rank: int, weight: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Check the input against the weight; return it with a batch dim and whether one was added."""
    _check_tensor(x, "x")
    if x.ndim not in (rank + 1, rank + 2):
        raise ValueError(f"x must have shape (N, C, *spatial) or (C, *spatial) with {rank} spatial dims "
                         f"({rank + 2} or {rank + 1} dims); got shape {tuple(x.shape)}")
    if x.dtype != weight.dtype and not _autocast_casts(x, weight):
        raise TypeError(f"x dtype {x.dtype} does not match the weight dtype {weight.dtype}")
    unbatched = x.ndim == rank + 1
    x = x.unsqueeze(0) if unbatched else x
    if 0 in x.shape[1:]:
        raise ValueError(f"x must have non-zero channel and spatial sizes; got shape {tuple(x.shape)}")
    return x, unbatched


def _check_depthwise(channels: int, weight: torch.Tensor) -> None:
    if weight.shape[1] == 1 and weight.shape[0] % channels:  # the weight is depthwise: blame the input
        raise ValueError(f"x has {channels} channels, which do not divide the {weight.shape[0]} output channels (C * "
                         f"depth_multiplier) of the depthwise weight of shape {tuple(weight.shape)}")
    if weight.shape[1] != 1:
        raise ValueError(f"depthwise weight must have shape (C * depth_multiplier, 1, *kernel_size) with C = {channels} "
                         f"input channels; got shape {tuple(weight.shape)}")


def _unbatch(y: torch.Tensor, unbatched: bool) -> torch.Tensor:
    return y.squeeze(0) if unbatched else y


def _groups(in_channels: int, weight: torch.Tensor, name: str) -> int:
    """Groups implied by the input channels and a weight ``(C_out, C_in / groups, ...)``."""
    per_group = weight.shape[1]
    if in_channels % per_group:
        raise ValueError(f"{name} of shape {tuple(weight.shape)} does not fit an input with {in_channels} channels: "
                         f"C_in / groups = {per_group} must divide {in_channels}")
    if weight.shape[0] % (in_channels // per_group):
        raise ValueError(f"{name} of shape {tuple(weight.shape)} does not fit an input with {in_channels} channels: "
                         f"C_out = {weight.shape[0]} must be a multiple of groups = {in_channels // per_group}")
    return in_channels // per_group


@memoised
def _resolve_geometry(spatial, kernel_size, stride, padding, dilation, padding_mode):
    rank = len(kernel_size)
    stride = to_tuple(stride, rank, "stride")
    dilation = to_tuple(dilation, rank, "dilation")
    check_padding_mode(padding_mode)
    pairs = resolve_padding(padding, kernel_size, stride, dilation, spatial)
    check_fits(spatial, kernel_size, pairs, dilation, padding_mode)
    return conv_geometry(spatial, kernel_size, stride, pairs, dilation)


def _geometry(x, kernel_size, stride, padding, dilation, padding_mode) -> ConvGeometry:
    """Normalise stride, dilation and padding for ``x``; check the kernel fits; the resolved geometry."""
    spatial = x.shape[2:]
    if torch.jit.is_tracing():  # sizes are tensors while tracing; as ints the trace records them as constants
        spatial, kernel_size = tuple(int(n) for n in spatial), tuple(int(k) for k in kernel_size)
    return _resolve_geometry(spatial, kernel_size, stride, padding, dilation, padding_mode)


# --- ops -------------------------------------------------------------------------------------------

def conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"):
    """Standard (optionally grouped) convolution with sepconv's padding semantics.

    The dense reference the separable ops are compared with, and what ``to_dense()`` layers run.
    ``weight``: ``(C_out, C_in / groups, *kernel_size)``.
    """
    rank = _check_weight(weight, "weight")
    x, unbatched = _batched(x, rank, weight)
    groups = check_positive_int(groups, "groups")
    if x.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"x has {x.shape[1]} channels but weight of shape {tuple(weight.shape)} with "
                         f"groups={groups} expects {weight.shape[1] * groups}")
    if weight.shape[0] % groups:
        raise ValueError(f"weight's C_out = {weight.shape[0]} must be divisible by groups = {groups}")
    _check_bias(bias, weight.shape[0], "bias", weight)
    geometry = _geometry(x, weight.shape[2:], stride, padding, dilation, padding_mode)
    return _unbatch(kernels.conv(x, weight, bias, geometry, groups, padding_mode), unbatched)


def depthwise_conv(x, weight, bias=None, stride=1, padding=0, dilation=1, padding_mode="zeros"):
    """Per-channel spatial convolution.

    ``weight``: ``(C * M, 1, *kernel_size)`` for ``C`` input channels and depth multiplier ``M``
    (inferred). Output channel ``c * M + m`` is input channel ``c`` filtered by ``weight[c * M + m]``.

    >>> x = torch.ones(1, 2, 5, 5)
    >>> depthwise_conv(x, torch.ones(4, 1, 3, 3), padding="same").shape
    torch.Size([1, 4, 5, 5])
    """
    rank = _check_weight(weight, "weight")
    x, unbatched = _batched(x, rank, weight)
    _check_depthwise(x.shape[1], weight)
    _check_bias(bias, weight.shape[0], "bias", weight)
    geometry = _geometry(x, weight.shape[2:], stride, padding, dilation, padding_mode)
    return _unbatch(kernels.depthwise_conv(x, weight, bias, geometry, padding_mode), unbatched)


def pointwise_conv(x, weight, bias=None):
    """1x1 channel mixing. ``weight``: ``(C_out, C_in)`` or ``(C_out, C_in, 1, ...)``.

    With a 2-D weight the input must be batched ``(N, C_in, *spatial)``.
    """
    _check_tensor(weight, "weight")
    if weight.ndim == 2:
        _check_tensor(x, "x")
        rank = x.ndim - 2
        if rank not in (1, 2, 3):
            raise ValueError(f"x must have shape (N, C, *spatial) with 1, 2 or 3 spatial dims; got shape {tuple(x.shape)}")
        weight = weight.reshape(*weight.shape, *(1,) * rank)
    rank = _check_weight(weight, "weight")
    if any(size != 1 for size in weight.shape[2:]):
        raise ValueError(f"pointwise weight must have shape (C_out, C_in) or (C_out, C_in, 1, ...); "
                         f"got shape {tuple(weight.shape)}")
    x, unbatched = _batched(x, rank, weight)
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[1]} channels but the pointwise weight of shape {tuple(weight.shape)} "
                         f"expects {weight.shape[1]}")
    _check_bias(bias, weight.shape[0], "bias", weight)
    return _unbatch(kernels.pointwise_conv(x, weight, bias), unbatched)


def separable_conv(x, depthwise_weight, pointwise_weight, bias=None, depthwise_bias=None, stride=1, padding=0,
                   dilation=1, padding_mode="zeros"):
    """Depthwise separable convolution: :func:`depthwise_conv` then :func:`pointwise_conv`.

    Stride, padding and dilation apply to the depthwise step; ``bias`` to the pointwise step
    (Keras' ``SeparableConv`` has only this one); ``depthwise_bias`` optionally to the first.
    ``pointwise_weight``: ``(C_out, C * M)`` or ``(C_out, C * M, 1, ...)``.
    """
    rank = _check_weight(depthwise_weight, "depthwise_weight")
    x, unbatched = _batched(x, rank, depthwise_weight)
    _check_depthwise(x.shape[1], depthwise_weight)
    hidden_channels = depthwise_weight.shape[0]
    _check_tensor(pointwise_weight, "pointwise_weight")
    given_shape = tuple(pointwise_weight.shape)
    if pointwise_weight.ndim == 2:  # (C_out, C * M): give it the depthwise weight's spatial rank
        pointwise_weight = pointwise_weight.reshape(*given_shape, *(1,) * rank)
    if pointwise_weight.shape[1:] != (hidden_channels, *(1,) * rank):
        raise ValueError(f"pointwise_weight must have shape (C_out, {hidden_channels}) or "
                         f"(C_out, {hidden_channels}, {', '.join('1' * rank)}) to follow the depthwise step; "
                         f"got shape {given_shape}")
    if pointwise_weight.dtype != depthwise_weight.dtype:
        raise TypeError(f"pointwise_weight dtype {pointwise_weight.dtype} does not match the depthwise_weight dtype "
                        f"{depthwise_weight.dtype}")
    _check_bias(depthwise_bias, hidden_channels, "depthwise_bias", depthwise_weight)
    _check_bias(bias, pointwise_weight.shape[0], "bias", depthwise_weight)
    geometry = _geometry(x, depthwise_weight.shape[2:], stride, padding, dilation, padding_mode)
    hidden = kernels.depthwise_conv(x, depthwise_weight, depthwise_bias, geometry, padding_mode)
    return _unbatch(kernels.pointwise_conv(hidden, pointwise_weight, bias), unbatched)


def spatial_separable_conv(x, weights: Sequence[torch.Tensor], bias=None, stride=1, padding=0, dilation=1,
                           padding_mode="zeros", axes: Sequence[int] | None = None):
    """A sequence of 1-D convolutions, one per spatial axis, applied in turn (e.g. k x 1 then 1 x k).

    ``weights[i]`` has shape ``(C_out_i, C_in_i / groups_i, k_i)`` and filters spatial axis
    ``axes[i]`` (default: axis ``i``); ``len(weights)`` is the number of spatial dims. The groups of
    each step follow from the shapes, so both forms are covered:

    * per-channel (rank-1 depthwise kernels): ``(C * M, 1, k_0)``, then ``(C * M, 1, k_1)``, ...;
    * channel-mixing (Inception-v3 / Jaderberg et al.): ``(C_mid, C_in, k_0)``, ``(C_out, C_mid, k_1)``.

    Stride, dilation and padding are per spatial axis and apply in the step that filters that axis,
    so the result equals the dense convolution with the composed kernel. ``bias`` is added at the end.
    """
    if isinstance(weights, torch.Tensor) or not isinstance(weights, Sequence) or not weights:
        raise TypeError(f"weights must be a non-empty sequence of 1-D factors (C_out, C_in / groups, k); "
                        f"got {type(weights).__name__}")
    rank = len(weights)
    if rank not in (1, 2, 3):
        raise ValueError(f"weights must hold one factor per spatial axis (1, 2 or 3); got {rank}")
    for i, w in enumerate(weights):
        _check_weight(w, f"weights[{i}]", rank=1)
        if w.dtype != weights[0].dtype:
            raise TypeError(f"weights[{i}] dtype {w.dtype} does not match the weights[0] dtype {weights[0].dtype}")
    if axes is not None and (isinstance(axes, (str, bytes)) or not isinstance(axes, Sequence)):
        raise TypeError(f"axes must be None or a sequence of spatial axes; got {axes!r}")
    axes = tuple(range(rank)) if axes is None else tuple(axes)
    if sorted(axes) != list(range(rank)):
        raise ValueError(f"axes must be a permutation of {tuple(range(rank))}; got {axes!r}")
    x, unbatched = _batched(x, rank, weights[0])
    kernel_size = [1] * rank
    for w, axis in zip(weights, axes):
        kernel_size[axis] = w.shape[2]
    _check_bias(bias, weights[-1].shape[0], "bias", weights[-1])
    whole = _geometry(x, tuple(kernel_size), stride, padding, dilation, padding_mode)

    for i, (w, axis) in enumerate(zip(weights, axes)):
        groups = _groups(x.shape[1], w, f"weights[{i}]")
        step = _one_axis(whole, axis, x.shape[2:])
        x = kernels.conv(x, w.reshape(*w.shape[:2], *step.kernel_size), bias if i == rank - 1 else None, step,
                         groups, padding_mode)
    return _unbatch(x, unbatched)


@memoised
def _one_axis(whole: ConvGeometry, axis: int, spatial) -> ConvGeometry:
    """The geometry of the step of a spatially separable convolution that filters ``axis`` alone."""
    def only(values, rest):
        return tuple(value if i == axis else rest for i, value in enumerate(values))
    return conv_geometry(spatial, only(whole.kernel_size, 1), only(whole.stride, 1), only(whole.padding, (0, 0)),
                         only(whole.dilation, 1))


def batch_norm_act(x, running_mean=None, running_var=None, weight=None, bias=None, training=False, momentum=0.1,
                   eps=1e-5, activation="none"):
    """``activation(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps))``.

    Batch norm over the channels of ``x`` ``(N, C, *spatial)`` with :func:`torch.nn.functional.batch_norm`'s
    arguments and results, then an activation of :data:`sepconv.activations.FUSED`. With ``training`` it uses the
    batch's statistics (``kernels.batch_norm_act``: on channels-last float32 CPU input the C++ backend makes two
    passes over memory each way) and updates ``running_mean``/``running_var``, when given, in place.
    """
    _check_tensor(x, "x")
    if x.ndim < 2:
        raise ValueError(f"x must have shape (N, C, *spatial); got shape {tuple(x.shape)}")
    activations.check(activation)
    for name, value in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                        ("bias", bias)):
        if value is not None:
            _check_tensor(value, name)
            if value.shape != (x.shape[1],):
                raise ValueError(f"{name} must have shape ({x.shape[1]},); got shape {tuple(value.shape)}")
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var must be given when training=False")
        return activations.apply(F.batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps),
                                 activation)
    count = x.numel() // x.shape[1]
    if count < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    y, mean, invstd = kernels.batch_norm_act(x, weight, bias, eps, activation)
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            variance = (invstd.double().pow(-2) - eps).clamp_min(0) * (count / (count - 1))  # unbiased, as PyTorch's
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_(variance.to(running_var.dtype), momentum)
    return y
