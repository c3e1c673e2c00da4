"""Closed-form separable approximations of trained convolutions, by truncated SVDs.

Every standard convolution ``W`` of shape ``(C_out, C_in / g, *k)`` has a best approximation of each
separable form, optimal in Frobenius norm (Eckart-Young) and exact at full rank:

* ``"depthwise_separable"`` (depthwise then pointwise, as in MobileNet / Xception): for each input
  channel ``i``, the slice ``W[:, i]`` as a ``(C_out / g) x prod(k)`` matrix has an SVD; its top ``M``
  singular pairs give ``M`` depthwise filters (``S_m V_m``) and their pointwise weights (``U_m``).
  Exact at ``M = min(C_out / g, prod(k))``.
* ``"pointwise_depthwise"`` (1x1 first, then a grouped ``k`` convolution summing ``M`` filtered channels per
  output, as in Network Decoupling, Guo et al. 2018): the SVD of each output's ``(C_in / g) x prod(k)``
  slice. Exact at ``M = min(C_in / g, prod(k))``.
* ``"spatial"`` (2-D only: ``k_h x 1`` into ``K`` mid channels, then ``1 x k_w``; the shared-basis form of
  Jaderberg et al. 2014, solved in closed form as in Tai et al. 2016): the SVD of ``W`` rearranged as a
  ``(C_in/g * k_h) x (C_out/g * k_w)`` matrix per group. Exact at ``K = min`` of the two. On a depthwise
  convolution this is the rank-``K`` SVD of each kernel, so Sobel or Gaussian kernels factor exactly at 1.

The squared relative error of a truncation is the discarded share of the squared singular values, which
is what :class:`DecompositionReport` reports (and what the tests check against the materialised weight).

>>> import torch
>>> conv = torch.nn.Conv2d(16, 32, 3, padding=1)
>>> module, report = decompose(conv, energy=1.0)
>>> type(module).__name__, report.rank, report.relative_error < 1e-6
('SeparableConv2d', 9, True)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from . import geometry
from .layers import DepthwiseConv1d, DepthwiseConv2d, DepthwiseConv3d, PointwiseConv1d, PointwiseConv2d, \
    PointwiseConv3d, SeparableConv1d, SeparableConv2d, SeparableConv3d, SpatialSeparableConv2d
from .layers.conv import Conv1d, Conv2d, Conv3d

KINDS = ("depthwise_separable", "pointwise_depthwise", "spatial")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SEPCONV_CONV = {1: Conv1d, 2: Conv2d, 3: Conv3d}
_DEPTHWISE = {1: DepthwiseConv1d, 2: DepthwiseConv2d, 3: DepthwiseConv3d}
_POINTWISE = {1: PointwiseConv1d, 2: PointwiseConv2d, 3: PointwiseConv3d}
_SEPARABLE = {1: SeparableConv1d, 2: SeparableConv2d, 3: SeparableConv3d}


@dataclass
class DecompositionReport:
    """What a decomposition kept and what it costs. MACs are per image, for ``input_size`` when given."""

    kind: str
    rank: int                       # depth multiplier M (or mid channels per group K for "spatial")
    full_rank: int                  # the rank at which the decomposition is exact
    ranks_per_channel: list[int]    # per SVD slice: singular values kept that are not zero
    relative_error: float           # ||W - W_approx||_F / ||W||_F
    retained_energy: float          # share of sum(sigma^2) kept
    params_before: int
    params_after: int
    macs_before: int | None = None
    macs_after: int | None = None
    input_size: tuple[int, ...] | None = field(default=None)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        macs = ("" if self.macs_before is None else
                f", MACs {self.macs_before:,} -> {self.macs_after:,} for input size {self.input_size}")
        return (f"{self.kind} rank {self.rank}/{self.full_rank}: relative error {self.relative_error:.4g}, "
                f"retained energy {self.retained_energy:.6f}, params {self.params_before:,} -> "
                f"{self.params_after:,}{macs}")


def conv_settings(conv: nn.Module) -> dict:
    """Stride, canonical padding, dilation, groups and padding mode of a ``torch.nn.ConvNd``."""
    if not isinstance(conv, _CONVS):
        raise TypeError(f"conv must be a torch.nn.Conv1d/2d/3d (or a sepconv Conv); got {type(conv).__name__}")
    rank = conv.weight.ndim - 2
    return dict(stride=tuple(conv.stride), padding=geometry.normalize_padding(conv.padding, rank),
                dilation=tuple(conv.dilation), groups=conv.groups, padding_mode=conv.padding_mode)


class Factorization:
    """The SVDs of one convolution for one kind; builds the rank-``M`` module and prices it."""

    def __init__(self, conv: nn.Module, kind: str = "depthwise_separable"):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
        self.settings = conv_settings(conv)
        self.conv, self.kind = conv, kind
        weight = conv.weight.detach()
        self.rank_dims = weight.ndim - 2
        if kind == "spatial" and self.rank_dims != 2:
            raise ValueError(f"kind='spatial' factors 2-D kernels (k_h x 1 then 1 x k_w); conv has "
                             f"{self.rank_dims} spatial dims")
        self.out_channels, per_group, *self.kernel_size = weight.shape
        self.groups = self.settings["groups"]
        self.in_channels = per_group * self.groups
        self.taps = math.prod(self.kernel_size)
        matrices = self._matrices(weight.to(torch.float64))
        self.U, self.S, self.Vh = torch.linalg.svd(matrices, full_matrices=False)
        self.total_energy = float((self.S ** 2).sum())
        self.full_rank = self.S.shape[-1]

    def _matrices(self, weight: torch.Tensor) -> torch.Tensor:
        """A batch of matrices whose SVDs give the factors."""
        g, out_per_group, in_per_group = self.groups, self.out_channels // self.groups, weight.shape[1]
        if self.kind == "depthwise_separable":  # per input channel: (C_out / g) x taps
            w = weight.reshape(g, out_per_group, in_per_group, self.taps)
            return w.permute(0, 2, 1, 3).reshape(self.in_channels, out_per_group, self.taps)
        if self.kind == "pointwise_depthwise":  # per output channel: (C_in / g) x taps
            return weight.reshape(self.out_channels, in_per_group, self.taps)
        kh, kw = self.kernel_size  # spatial, per group: (C_in/g * k_h) x (C_out/g * k_w)
        w = weight.reshape(g, out_per_group, in_per_group, kh, kw).permute(0, 2, 3, 1, 4)
        return w.reshape(g, in_per_group * kh, out_per_group * kw)

    # --- choosing a rank --------------------------------------------------------------------------

    def retained_energy(self, rank: int) -> float:
        if self.total_energy == 0:
            return 1.0
        return float((self.S[:, :rank] ** 2).sum()) / self.total_energy

    def relative_error(self, rank: int) -> float:
        return math.sqrt(max(1.0 - self.retained_energy(rank), 0.0))

    def choose_rank(self, rank=None, energy=None, max_error=None) -> int:
        """The rank given, or the smallest one retaining ``energy`` / within ``max_error``; default exact."""
        given = [name for name, value in (("rank", rank), ("energy", energy), ("max_error", max_error))
                 if value is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of rank, energy, max_error; got {', '.join(given)}")
        if rank is not None:
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise ValueError(f"rank must be a positive int; got {rank!r}")
            return min(rank, self.full_rank)
        if max_error is not None:
            if not 0 <= max_error <= 1:
                raise ValueError(f"max_error must be in [0, 1]; got {max_error!r}")
            energy = 1.0 - max_error ** 2
        if energy is None:
            return self.full_rank
        if not 0 < energy <= 1:
            raise ValueError(f"energy must be in (0, 1]; got {energy!r}")
        cumulative = torch.cumsum((self.S ** 2).sum(0), 0) / max(self.total_energy, 1e-300)
        # 1e-12: a full-rank truncation must satisfy energy=1.0 despite rounding in the sums.
        return min(int((cumulative < energy - 1e-12).sum()) + 1, self.full_rank)

    # --- costs --------------------------------------------------------------------------------------

    def params(self, rank: int) -> int:
        bias = self.out_channels if self.conv.bias is not None else 0
        per_group_in, per_group_out = self.in_channels // self.groups, self.out_channels // self.groups
        if self.kind == "depthwise_separable":
            return self.in_channels * rank * (self.taps + per_group_out) + bias
        if self.kind == "pointwise_depthwise":
            return self.out_channels * rank * (per_group_in + self.taps) + bias
        kh, kw = self.kernel_size
        return self.groups * rank * per_group_in * kh + self.out_channels * rank * kw + bias

    def macs(self, rank: int, input_size) -> int:
        """Mult-adds per image: each step's weights times its output positions (from sepconv.geometry)."""
        s = self.settings
        out = geometry.conv_output_shape(input_size, self.kernel_size, s["stride"], s["padding"], s["dilation"])
        positions_out, positions_in = math.prod(out), math.prod(input_size)
        per_group_in, per_group_out = self.in_channels // self.groups, self.out_channels // self.groups
        if self.kind == "depthwise_separable":
            return self.in_channels * rank * (self.taps + per_group_out) * positions_out
        if self.kind == "pointwise_depthwise":  # the 1x1 step runs at the input's resolution
            return self.out_channels * rank * (per_group_in * positions_in + self.taps * positions_out)
        kh, kw = self.kernel_size
        positions_mid = out[0] * input_size[1]  # after the k_h x 1 step only axis 0 is reduced
        return self.groups * rank * per_group_in * kh * positions_mid + self.out_channels * rank * kw * positions_out

    def macs_before(self, input_size) -> int:
        s = self.settings
        out = geometry.conv_output_shape(input_size, self.kernel_size, s["stride"], s["padding"], s["dilation"])
        return self.conv.weight.numel() * math.prod(out)

    # --- building -----------------------------------------------------------------------------------

    def build(self, rank: int) -> nn.Module:
        """The rank-``rank`` module, with the original stride, padding, dilation, groups and bias."""
        U, S, Vh = self.U[..., :rank], self.S[:, :rank], self.Vh[:, :rank]
        dtype, device = self.conv.weight.dtype, self.conv.weight.device
        bias = None if self.conv.bias is None else self.conv.bias.detach()
        build = {"depthwise_separable": self._depthwise_separable, "pointwise_depthwise": self._pointwise_depthwise,
                 "spatial": self._spatial}[self.kind]
        return build(U, S, Vh, rank, bias is not None, dict(device=device, dtype=dtype))

    def _geometry_kwargs(self, factory: dict) -> dict:
        s = self.settings
        return dict(stride=s["stride"], padding=s["padding"], dilation=s["dilation"], padding_mode=s["padding_mode"],
                    **factory)

    def _depthwise_separable(self, U, S, Vh, rank, has_bias, factory):
        g, rank_dims = self.groups, self.rank_dims
        depthwise = (S.unsqueeze(-1) * Vh).reshape(self.in_channels * rank, 1, *self.kernel_size)
        # U: (C_in, C_out/g, M) -> grouped pointwise (C_out, C_in/g * M): row g*C_out/g + o, column i_local*M + m
        per_group_out = self.out_channels // g
        pointwise = U.reshape(g, self.in_channels // g, per_group_out, rank).permute(0, 2, 1, 3)
        pointwise = pointwise.reshape(self.out_channels, (self.in_channels // g) * rank, *(1,) * rank_dims)
        if g == 1:
            module = _SEPARABLE[rank_dims](self.in_channels, self.out_channels, self.kernel_size, depth_multiplier=rank,
                                           bias=has_bias, **self._geometry_kwargs(factory))
            _copy(module, depthwise_weight=depthwise, pointwise_weight=pointwise, bias=self.conv.bias)
            return module
        depthwise_layer = _DEPTHWISE[rank_dims](self.in_channels, self.kernel_size, depth_multiplier=rank, bias=False,
                                                **self._geometry_kwargs(factory))
        pointwise_layer = _SEPCONV_CONV[rank_dims](self.in_channels * rank, self.out_channels, 1, groups=g,
                                                   bias=has_bias, **factory)
        _copy(depthwise_layer, weight=depthwise)
        _copy(pointwise_layer, weight=pointwise, bias=self.conv.bias)
        return nn.Sequential(_named(depthwise=depthwise_layer, pointwise=pointwise_layer))

    def _pointwise_depthwise(self, U, S, Vh, rank, has_bias, factory):
        g, rank_dims = self.groups, self.rank_dims
        # U: (C_out, C_in/g, M) -> pointwise (C_out * M, C_in/g): row o*M + m
        pointwise = U.permute(0, 2, 1).reshape(self.out_channels * rank, self.in_channels // g, *(1,) * rank_dims)
        spatial = (S.unsqueeze(-1) * Vh).reshape(self.out_channels, rank, *self.kernel_size)
        if g == 1:
            pointwise_layer = _POINTWISE[rank_dims](self.in_channels, self.out_channels * rank, bias=False, **factory)
        else:
            pointwise_layer = _SEPCONV_CONV[rank_dims](self.in_channels, self.out_channels * rank, 1, groups=g,
                                                       bias=False, **factory)
        spatial_layer = _SEPCONV_CONV[rank_dims](self.out_channels * rank, self.out_channels, self.kernel_size,
                                                 groups=self.out_channels, bias=has_bias, **self._geometry_kwargs(factory))
        _copy(pointwise_layer, weight=pointwise)
        _copy(spatial_layer, weight=spatial, bias=self.conv.bias)
        return nn.Sequential(_named(pointwise=pointwise_layer, depthwise=spatial_layer))

    def _spatial(self, U, S, Vh, rank, has_bias, factory):
        g = self.groups
        kh, kw = self.kernel_size
        per_group_in, per_group_out = self.in_channels // g, self.out_channels // g
        # U: (g, C_in/g * k_h, K) -> vertical (g * K, C_in/g, k_h); S Vh: (g, K, C_out/g * k_w) -> (C_out, K, k_w)
        vertical = U.reshape(g, per_group_in, kh, rank).permute(0, 3, 1, 2).reshape(g * rank, per_group_in, kh)
        horizontal = (S.unsqueeze(-1) * Vh).reshape(g, rank, per_group_out, kw).permute(0, 2, 1, 3)
        horizontal = horizontal.reshape(self.out_channels, rank, kw)
        kwargs = self._geometry_kwargs(factory)
        if g == 1:
            module = SpatialSeparableConv2d(self.in_channels, self.out_channels, self.kernel_size, mid_channels=rank,
                                            bias=has_bias, **kwargs)
            with torch.no_grad():
                module.factors[0].copy_(vertical)
                module.factors[1].copy_(horizontal)
            _copy(module, bias=self.conv.bias)
            return module
        (s0, s1), (p0, p1), (d0, d1) = kwargs["stride"], kwargs["padding"], kwargs["dilation"]
        first = Conv2d(self.in_channels, g * rank, (kh, 1), (s0, 1), (p0, (0, 0)), (d0, 1), groups=g, bias=False,
                       padding_mode=kwargs["padding_mode"], **factory)
        second = Conv2d(g * rank, self.out_channels, (1, kw), (1, s1), ((0, 0), p1), (1, d1), groups=g,
                        bias=has_bias, padding_mode=kwargs["padding_mode"], **factory)
        _copy(first, weight=vertical.unsqueeze(-1))
        _copy(second, weight=horizontal.unsqueeze(-2), bias=self.conv.bias)
        return nn.Sequential(_named(vertical=first, horizontal=second))

    def report(self, rank: int, module: nn.Module, input_size=None) -> DecompositionReport:
        nonzero = (self.S[:, :rank] > self.S[:, :1] * 1e-10).sum(1)  # per slice, relative to its largest
        report = DecompositionReport(
            kind=self.kind, rank=rank, full_rank=self.full_rank, ranks_per_channel=nonzero.tolist(),
            relative_error=self.relative_error(rank), retained_energy=self.retained_energy(rank),
            params_before=sum(p.numel() for p in self.conv.parameters()),
            params_after=sum(p.numel() for p in module.parameters()))
        if input_size is not None:
            report.input_size = tuple(input_size)
            report.macs_before, report.macs_after = self.macs_before(input_size), self.macs(rank, input_size)
        return report


def _named(**modules):
    from collections import OrderedDict
    return OrderedDict(modules)


@torch.no_grad()
def _copy(module: nn.Module, **tensors) -> None:
    for name, value in tensors.items():
        if value is not None:
            getattr(module, name).copy_(value.detach().reshape(getattr(module, name).shape))


def decompose(conv: nn.Module, kind: str = "depthwise_separable", rank: int | None = None,
              energy: float | None = None, max_error: float | None = None, input_size=None):
    """Best separable approximation of a standard convolution: ``(module, report)``.

    Args:
        conv: a ``torch.nn.Conv1d/2d/3d`` (grouped, strided, dilated, any padding and padding mode).
        kind: ``"depthwise_separable"``, ``"pointwise_depthwise"`` or ``"spatial"`` (2-D).
        rank / energy / max_error: at most one: the depth multiplier ``M`` (mid channels per group for
            ``"spatial"``), or the smallest rank retaining ``energy`` of ``sum(sigma^2)``, or the smallest
            with relative Frobenius error ``<= max_error``. None of them: the exact (full-rank) form.
        input_size: spatial input size, to report MACs before and after.

    The module is a sepconv layer (``SeparableConvNd``, ``SpatialSeparableConv2d``) or, for grouped
    convolutions and the pointwise-first order, an ``nn.Sequential`` of sepconv layers; it keeps the
    original stride, padding, dilation, padding mode, dtype, device and bias.
    """
    factorization = Factorization(conv, kind)
    chosen = factorization.choose_rank(rank, energy, max_error)
    module = factorization.build(chosen)
    return module, factorization.report(chosen, module, input_size)
