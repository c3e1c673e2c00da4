"""Analytic cost of convolution-like layers: output shape, parameters, mult-adds, bytes, intensity.

Every function takes the input shape ``(N, C, *spatial)`` (1, 2 or 3 spatial dims) and the layer's
settings, resolves the geometry with :mod:`sepconv.geometry` (the module the ops use, so the output
shapes here are the shapes the layers produce) and returns a :class:`LayerCost`.

Conventions (the same as Howard et al. 2017, MobileNets, and as :func:`sepconv.profile`):

* **MACs** (mult-adds): one multiply and one add. A convolution's output element is one dot product
  with a filter ``C_in / groups * prod(kernel_size)`` long, so a layer costs
  ``numel(output) * C_in / groups * prod(kernel_size)`` MACs. Positions where the kernel covers zero
  padding count like any other (as in the paper and in PyTorch's ``FlopCounterMode``).
  **FLOPs = 2 x MACs**. Bias additions, batch norm, activations and pooling are not counted.
* **Parameters**: weights and biases are reported apart (``weights``, ``biases``; ``params`` is their
  sum). Only the convolutions' own parameters count: a norm between the steps of a separable layer,
  and batch-norm running statistics (buffers, which Keras reports as non-trainable parameters), do not.
* **Bytes**: the minimum traffic: every element of the input, the output and the parameters moved once,
  at the dtype's size. A multi-step layer (depthwise separable, spatially separable) counts only its
  outer input and output, as a fused implementation would; its ``steps`` report their own traffic,
  intermediate tensors included.
* **Intensity**: FLOPs per byte (``flops / bytes``), the x axis of a roofline.

>>> cost = separable_cost((1, 512, 14, 14), 512, 3, padding=1)       # MobileNets Table 3
>>> cost.params, cost.macs
(266752, 52283392)
>>> print(cost.steps[0])  # doctest: +NORMALIZE_WHITESPACE
depthwise conv 1x512x14x14 -> 1x512x14x14: 4,608 params (4,608 weights + 0 biases),
903,168 MACs = 1,806,336 FLOPs, 821,248 bytes, 2.20 FLOP/byte
>>> closed_form_reduction(512, (3, 3))                                 # 1/512 + 1/9
Fraction(521, 4608)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn

from .geometry import check_fits, output_shape, resolve_padding, to_tuple
from .layers.depthwise import _DepthwiseConvNd
from .layers.pointwise import _PointwiseConvNd
from .layers.separable import _SeparableConvNd
from .layers.spatial import _SpatialSeparableConvNd

__all__ = ["LayerCost", "Reduction", "conv_cost", "depthwise_cost", "pointwise_cost", "separable_cost",
           "spatial_separable_cost", "linear_cost", "layer_cost", "separable_reduction", "closed_form_reduction",
           "conv_kind", "conv_mult_adds"]

# Layer kinds; the first four are the rows of MobileNets' Table 2 (conv 1x1, depthwise, full conv, FC).
POINTWISE = "pointwise conv"
DEPTHWISE = "depthwise conv"
CONV = "conv"
FULLY_CONNECTED = "fully connected"
GROUPED = "grouped conv"
TRANSPOSED = "transposed conv"
MATMUL = "matmul"
SEPARABLE = "depthwise separable conv"
SPATIAL_SEPARABLE = "spatially separable conv"


def conv_kind(in_channels: int, groups: int, kernel_size: Sequence[int], transposed: bool = False) -> str:
    """The kind of one convolution: pointwise (1x1), depthwise, grouped, standard ("conv") or transposed.

    A convolution with one input channel is a standard one even though ``groups == in_channels``.
    """
    if transposed:
        return TRANSPOSED
    if groups == 1:
        return POINTWISE if all(k == 1 for k in kernel_size) else CONV
    return DEPTHWISE if groups == in_channels else GROUPED


def conv_mult_adds(weight_shape: Sequence[int], output_shape: Sequence[int]) -> int:
    """MACs of a convolution with weight ``(C_out, C_in / groups, *k)``: ``numel(output) * C_in / groups * prod(k)``.

    Each output element is one dot product with a filter ``weight[o]``. For a transposed convolution
    (weight ``(C_in, C_out / groups, *k)``) pass the *input* shape: each input element is scattered
    through one ``weight[i]``. The input gradient and the weight gradient each cost the same again.
    """
    return math.prod(output_shape) * math.prod(weight_shape[1:])


@dataclass(frozen=True)
class LayerCost:
    """Cost of one layer on one input: shapes, parameter counts, MACs, bytes; FLOPs and intensity derived.

    Attributes:
        kind: ``"conv"``, ``"pointwise conv"``, ``"depthwise conv"``, ``"grouped conv"``,
            ``"depthwise separable conv"``, ``"spatially separable conv"`` or ``"fully connected"``.
        input_shape, output_shape: ``(N, C, *spatial)``.
        weights, biases: parameter counts (elements).
        macs: multiply-adds.
        bytes: minimum bytes moved (input + output + parameters).
        steps: the costs of the steps of a multi-step layer, in order; empty for a single step.
    """

    kind: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    weights: int
    biases: int
    macs: int
    bytes: int
    steps: tuple[LayerCost, ...] = ()

    @property
    def params(self) -> int:
        """Weights plus biases."""
        return self.weights + self.biases

    @property
    def flops(self) -> int:
        """Floating-point operations: 2 x MACs (a multiply and an add)."""
        return 2 * self.macs

    @property
    def intensity(self) -> float:
        """Arithmetic intensity in FLOPs per byte."""
        return self.flops / self.bytes

    def __str__(self) -> str:
        return (f"{self.kind} {format_shape(self.input_shape)} -> {format_shape(self.output_shape)}: "
                f"{self.params:,} params ({self.weights:,} weights + {self.biases:,} biases), {self.macs:,} MACs = "
                f"{self.flops:,} FLOPs, {self.bytes:,} bytes, {self.intensity:.2f} FLOP/byte")


def format_shape(shape: Sequence[int]) -> str:
    """``(1, 3, 224, 224)`` -> ``"1x3x224x224"``, the form the command line takes."""
    return "x".join(str(size) for size in shape)


# --- single convolutions --------------------------------------------------------------------------

def _check_input_shape(input_shape) -> tuple[int, ...]:
    rule = "(N, C, *spatial) with 1, 2 or 3 spatial dims, all positive ints"
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence):
        raise TypeError(f"input_shape must be a tuple {rule}; got {input_shape!r}")
    shape = tuple(input_shape)
    if not 3 <= len(shape) <= 5 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
        raise ValueError(f"input_shape must be {rule}; got {input_shape!r}")
    return shape


def _bytes(input_shape, output_shape, params: int, dtype: torch.dtype) -> int:
    return (math.prod(input_shape) + math.prod(output_shape) + params) * dtype.itemsize


def conv_cost(input_shape, out_channels: int, kernel_size, stride=1, padding=0, dilation=1, groups: int = 1,
              bias: bool = False, dtype: torch.dtype = torch.float32) -> LayerCost:
    """Cost of a (grouped) convolution; padding in any form :mod:`sepconv.geometry` accepts.

    >>> print(conv_cost((1, 3, 224, 224), 64, 3, padding=1, bias=True))  # doctest: +NORMALIZE_WHITESPACE
    conv 1x3x224x224 -> 1x64x224x224: 1,792 params (1,728 weights + 64 biases),
    86,704,128 MACs = 173,408,256 FLOPs, 13,454,336 bytes, 12.89 FLOP/byte
    """
    batch, in_channels, *spatial = _check_input_shape(input_shape)
    rank = len(spatial)
    kernel_size = to_tuple(kernel_size, rank, "kernel_size")
    stride = to_tuple(stride, rank, "stride")
    dilation = to_tuple(dilation, rank, "dilation")
    if not isinstance(out_channels, int) or out_channels < 1:
        raise ValueError(f"out_channels must be a positive int; got {out_channels!r}")
    if not isinstance(groups, int) or groups < 1 or in_channels % groups or out_channels % groups:
        raise ValueError(f"groups (={groups!r}) must be a positive int dividing the input channels "
                         f"(={in_channels}) and out_channels (={out_channels})")
    pairs = resolve_padding(padding, kernel_size, stride, dilation, tuple(spatial))
    check_fits(spatial, kernel_size, pairs, dilation)
    output = (batch, out_channels, *output_shape(spatial, kernel_size, stride, pairs, dilation))
    weight_shape = (out_channels, in_channels // groups, *kernel_size)
    weights = math.prod(weight_shape)
    biases = out_channels if bias else 0
    return LayerCost(conv_kind(in_channels, groups, kernel_size), tuple(input_shape), output, weights, biases,
                     conv_mult_adds(weight_shape, output), _bytes(input_shape, output, weights + biases, dtype))


def depthwise_cost(input_shape, kernel_size, stride=1, padding=0, dilation=1, depth_multiplier: int = 1,
                   bias: bool = False, dtype: torch.dtype = torch.float32) -> LayerCost:
    """Cost of a depthwise convolution: ``C -> C * depth_multiplier`` channels, one filter each."""
    channels = _check_input_shape(input_shape)[1]
    return conv_cost(input_shape, channels * depth_multiplier, kernel_size, stride, padding, dilation, channels,
                     bias, dtype)


def pointwise_cost(input_shape, out_channels: int, bias: bool = False, groups: int = 1,
                   dtype: torch.dtype = torch.float32) -> LayerCost:
    """Cost of a 1x1 convolution (``groups > 1``: ShuffleNet's grouped pointwise)."""
    return conv_cost(input_shape, out_channels, 1, groups=groups, bias=bias, dtype=dtype)


def linear_cost(input_shape, out_features: int, bias: bool = False,
                dtype: torch.dtype = torch.float32) -> LayerCost:
    """Cost of a fully connected layer on ``(*, in_features)``: ``numel(output) * in_features`` MACs.

    >>> linear_cost((1, 1024), 1000).macs
    1024000
    """
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence) or not input_shape \
            or not all(isinstance(n, int) and n > 0 for n in input_shape):
        raise ValueError(f"input_shape must be (*, in_features) with positive ints; got {input_shape!r}")
    output = (*input_shape[:-1], out_features)
    weights = input_shape[-1] * out_features
    biases = out_features if bias else 0
    return LayerCost(FULLY_CONNECTED, tuple(input_shape), output, weights, biases,
                     math.prod(output) * input_shape[-1], _bytes(input_shape, output, weights + biases, dtype))


# --- multi-step layers ----------------------------------------------------------------------------

def _chain(kind: str, steps: Sequence[LayerCost], dtype: torch.dtype) -> LayerCost:
    """A layer made of ``steps`` run in turn; its traffic is the outer input and output only."""
    weights, biases = sum(s.weights for s in steps), sum(s.biases for s in steps)
    return LayerCost(kind, steps[0].input_shape, steps[-1].output_shape, weights, biases, sum(s.macs for s in steps),
                     _bytes(steps[0].input_shape, steps[-1].output_shape, weights + biases, dtype), tuple(steps))


def separable_cost(input_shape, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                   depth_multiplier: int = 1, bias: bool = False, depthwise_bias: bool = False, groups: int = 1,
                   dtype: torch.dtype = torch.float32) -> LayerCost:
    """Cost of a depthwise separable convolution: depthwise (stride, padding, dilation) then 1x1.

    ``groups`` groups the pointwise step (1, the usual case, mixes all ``C * M`` channels).
    """
    depthwise = depthwise_cost(input_shape, kernel_size, stride, padding, dilation, depth_multiplier, depthwise_bias,
                               dtype)
    pointwise = pointwise_cost(depthwise.output_shape, out_channels, bias, groups, dtype)
    return _chain(SEPARABLE, (depthwise, pointwise), dtype)


def _on_axis(axis: int, rank: int, value, rest) -> tuple:
    """``value`` on spatial ``axis``, ``rest`` on the others: the settings of a 1-D step along ``axis``."""
    return tuple(value if a == axis else rest for a in range(rank))


def spatial_separable_cost(input_shape, out_channels: int, kernel_size, mid_channels: int | None = None, stride=1,
                           padding=0, dilation=1, bias: bool = False, depthwise: bool = False,
                           dtype: torch.dtype = torch.float32) -> LayerCost:
    """Cost of a spatially separable convolution: one 1-D convolution per spatial axis, axis 0 first.

    Channel-mixing form: ``C_in -> mid -> ... -> C_out`` (``mid`` defaults to ``out_channels``);
    per-channel form (``depthwise=True``): every step depthwise, the first carrying the depth multiplier
    ``out_channels / C_in``. Each axis' stride, dilation and padding act in the step along that axis,
    as in :func:`sepconv.functional.spatial_separable_conv`.
    """
    shape = _check_input_shape(input_shape)
    spatial = shape[2:]
    rank = len(spatial)
    kernel_size = to_tuple(kernel_size, rank, "kernel_size")
    stride = to_tuple(stride, rank, "stride")
    dilation = to_tuple(dilation, rank, "dilation")
    pairs = resolve_padding(padding, kernel_size, stride, dilation, spatial)
    if depthwise:
        widths = [out_channels] * rank
    else:
        widths = [out_channels if mid_channels is None else mid_channels] * (rank - 1) + [out_channels]
    steps = []
    for axis, width in enumerate(widths):
        step_input = steps[-1].output_shape if steps else shape
        steps.append(conv_cost(step_input, width, _on_axis(axis, rank, kernel_size[axis], 1),
                               _on_axis(axis, rank, stride[axis], 1), _on_axis(axis, rank, pairs[axis], (0, 0)),
                               _on_axis(axis, rank, dilation[axis], 1), step_input[1] if depthwise else 1,
                               bias and axis == rank - 1, dtype))
    return _chain(SPATIAL_SEPARABLE, steps, dtype)


# --- from modules ---------------------------------------------------------------------------------

def _check_layer_input(module: nn.Module, expected: int, given: int, what: str = "channels") -> None:
    if expected != given:
        raise ValueError(f"input_shape has {given} {what} but {type(module).__name__} expects {expected}")


def layer_cost(module: nn.Module, input_shape) -> LayerCost:
    """Cost of a sepconv layer, a ``torch.nn.ConvNd`` (sepconv's ``ConvNd`` too) or an ``nn.Linear``.

    The dtype (for bytes) is the module's parameter dtype.

    >>> from sepconv import SeparableConv2d
    >>> layer_cost(SeparableConv2d(3, 64, 3, padding=1, bias=True), (1, 3, 224, 224)).params   # Keras: 283
    283
    """
    parameter = next(module.parameters(), None)
    dtype = torch.float32 if parameter is None else parameter.dtype
    if isinstance(module, nn.Linear):
        cost = linear_cost(input_shape, module.out_features, module.bias is not None, dtype)
        _check_layer_input(module, module.in_features, cost.input_shape[-1], "features")
        return cost
    shape = _check_input_shape(input_shape)
    if hasattr(module, "in_channels"):
        _check_layer_input(module, module.in_channels, shape[1])
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.transposed:
            raise TypeError(f"layer_cost does not model transposed convolutions; got {type(module).__name__} "
                            "(sepconv.profile counts them as they run)")
        return conv_cost(shape, module.out_channels, module.kernel_size, module.stride, module.padding,
                         module.dilation, module.groups, module.bias is not None, dtype)
    if isinstance(module, _DepthwiseConvNd):
        return depthwise_cost(shape, module.kernel_size, module.stride, module.padding, module.dilation,
                              module.depth_multiplier, module.bias is not None, dtype)
    if isinstance(module, _PointwiseConvNd):
        return pointwise_cost(shape, module.out_channels, module.bias is not None, dtype=dtype)
    if isinstance(module, _SeparableConvNd):
        return separable_cost(shape, module.out_channels, module.kernel_size, module.stride, module.padding,
                              module.dilation, module.depth_multiplier, module.bias is not None,
                              module.depthwise_bias is not None, dtype=dtype)
    if isinstance(module, _SpatialSeparableConvNd):
        return spatial_separable_cost(shape, module.out_channels, module.kernel_size, module.mid_channels,
                                      module.stride, module.padding, module.dilation, module.bias is not None,
                                      module.depthwise, dtype)
    raise TypeError(f"layer_cost supports sepconv's layers, torch.nn.Conv1d/2d/3d and nn.Linear; got "
                    f"{type(module).__name__} (sepconv.profile counts any model as it runs)")


# --- separable vs standard ------------------------------------------------------------------------

def closed_form_reduction(out_channels: int, kernel_size: Sequence[int], depth_multiplier: int = 1,
                          groups: int = 1) -> Fraction:
    """Cost of a depthwise separable layer as a fraction of its standard equivalent, without biases.

    ``M * groups / C_out + M / prod(kernel_size)`` for depth multiplier ``M``; with ``M = groups = 1``
    and a ``K x K`` kernel this is MobileNets' ``1/C_out + 1/K^2``. The standard layer is a convolution
    with ``groups`` groups; the separable one is a depthwise step (``C -> C * M``) and a 1x1 step with
    the same ``groups``. The fraction is exact, and the same for weights and for mult-adds (both steps
    have the standard layer's output size).

    >>> round(float(1 / closed_form_reduction(64, (3, 3))), 2), round(float(1 / closed_form_reduction(1024, (3, 3))), 2)
    (7.89, 8.92)
    """
    if isinstance(kernel_size, int) or not isinstance(kernel_size, Sequence) or not kernel_size:
        raise TypeError(f"kernel_size must be a tuple with one size per spatial axis, e.g. (3, 3); got {kernel_size!r}")
    return Fraction(depth_multiplier * groups, out_channels) + Fraction(depth_multiplier, math.prod(kernel_size))


@dataclass(frozen=True)
class Reduction:
    """A separable layer against its standard equivalent: both costs, counted ratios and the closed form."""

    standard: LayerCost
    separable: LayerCost
    closed_form: Fraction

    @property
    def params_ratio(self) -> Fraction:
        """Separable params / standard params (biases included when the layers have them)."""
        return Fraction(self.separable.params, self.standard.params)

    @property
    def macs_ratio(self) -> Fraction:
        """Separable MACs / standard MACs."""
        return Fraction(self.separable.macs, self.standard.macs)

    def __str__(self) -> str:
        params, macs = float(self.params_ratio), float(self.macs_ratio)
        return (f"separable / standard: params {params:.4f} ({1 / params:.2f}x fewer), "
                f"MACs {macs:.4f} ({1 / macs:.2f}x fewer); "
                f"closed form M*groups/C_out + M/prod(k) = {float(self.closed_form):.4f}")


def separable_reduction(input_shape, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                        depth_multiplier: int = 1, groups: int = 1, bias: bool = False,
                        dtype: torch.dtype = torch.float32) -> Reduction:
    """Count a standard convolution and its depthwise separable replacement; compare with the closed form.

    >>> print(separable_reduction((1, 512, 14, 14), 512, 3, padding=1))  # doctest: +NORMALIZE_WHITESPACE
    separable / standard: params 0.1131 (8.84x fewer), MACs 0.1131 (8.84x fewer);
    closed form M*groups/C_out + M/prod(k) = 0.1131
    """
    standard = conv_cost(input_shape, out_channels, kernel_size, stride, padding, dilation, groups, bias, dtype)
    separable = separable_cost(input_shape, out_channels, kernel_size, stride, padding, dilation, depth_multiplier,
                               bias, groups=groups, dtype=dtype)
    kernel_size = to_tuple(kernel_size, len(standard.input_shape) - 2, "kernel_size")
    return Reduction(standard, separable, closed_form_reduction(out_channels, kernel_size, depth_multiplier, groups))
