"""Weight algebra: the dense kernel a factored convolution equals.

A depthwise, separable or spatially separable convolution is a linear, shift-invariant map, so it
equals one standard convolution (``groups=1``) with a materialised kernel. These functions compute
that kernel; ``to_dense()`` on every layer and the tests comparing ops with their dense twins use them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def ungroup(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Block-diagonal ``(C_out, C_in, *k)`` kernel equal to a grouped one ``(C_out, C_in / groups, *k)``."""
    out_channels, per_group = weight.shape[:2]
    if groups == 1:
        return weight
    out_per_group = out_channels // groups
    dense = weight.new_zeros(out_channels, per_group * groups, *weight.shape[2:])
    for g in range(groups):
        rows = slice(g * out_per_group, (g + 1) * out_per_group)
        dense[rows, g * per_group:(g + 1) * per_group] = weight[rows]
    return dense


def depthwise_dense_weight(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Dense kernel of a depthwise weight ``(C * M, 1, *k)``."""
    return ungroup(weight, in_channels)


def separable_dense_weight(depthwise_weight: torch.Tensor, pointwise_weight: torch.Tensor,
                           in_channels: int) -> torch.Tensor:
    """Dense kernel ``(C_out, C, *k)`` of depthwise ``(C * M, 1, *k)`` followed by pointwise ``(C_out, C * M, ...)``.

    ``W[o, c] = sum_m pointwise[o, c * M + m] * depthwise[c * M + m]``.
    """
    kernel_size = depthwise_weight.shape[2:]
    multiplier = depthwise_weight.shape[0] // in_channels
    pointwise = pointwise_weight.reshape(pointwise_weight.shape[0], in_channels, multiplier)
    depthwise = depthwise_weight.reshape(in_channels, multiplier, -1)
    return torch.einsum("ocm,cmk->ock", pointwise, depthwise).reshape(-1, in_channels, *kernel_size)


def separable_dense_bias(pointwise_weight: torch.Tensor, bias: torch.Tensor | None,
                         depthwise_bias: torch.Tensor | None) -> torch.Tensor | None:
    """A depthwise bias passes through the pointwise step as ``pointwise @ depthwise_bias``."""
    if depthwise_bias is None:
        return bias
    carried = pointwise_weight.reshape(pointwise_weight.shape[0], -1) @ depthwise_bias
    return carried if bias is None else bias + carried


def compose(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Dense kernel of ``first`` then ``second`` (both ``groups=1``) when they filter disjoint axes.

    Each spatial axis has size 1 in at least one of the two kernels, so the composed kernel is an
    outer product over space and a matrix product over the middle channels.
    """
    return (second.unsqueeze(2) * first.unsqueeze(0)).sum(1)


def spatial_dense_weight(factors: Sequence[torch.Tensor], in_channels: int,
                         axes: Sequence[int] | None = None) -> torch.Tensor:
    """Dense kernel of 1-D factors ``(C_out_i, C_in_i / groups_i, k_i)`` applied along ``axes`` in turn."""
    rank = len(factors)
    axes = tuple(range(rank)) if axes is None else tuple(axes)
    channels = in_channels
    dense = None
    for factor, axis in zip(factors, axes):
        shape = [1] * rank
        shape[axis] = factor.shape[2]
        step = ungroup(factor.reshape(*factor.shape[:2], *shape), channels // factor.shape[1])
        dense = step if dense is None else compose(dense, step)
        channels = factor.shape[0]
    return dense


def fold_batch_norm(weight: torch.Tensor, bias: torch.Tensor | None, norm) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the convolution that equals ``conv`` followed by the eval-mode batch norm ``norm``.

    Output channel ``o`` is scaled by ``gamma_o / sqrt(var_o + eps)`` and shifted by ``beta_o - mean_o * scale_o``.
    ``norm`` must hold running statistics (``ValueError`` otherwise).
    """
    if norm.running_var is None or norm.running_mean is None:
        raise ValueError(f"only a batch norm with running statistics can be folded; got {norm!r}")
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    weight = weight * scale.reshape(-1, *(1,) * (weight.ndim - 1))
    return weight, (shift if bias is None else bias * scale + shift)
