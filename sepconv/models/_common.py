"""What the reference models share: argument checks, Keras-configured batch norm, the convolution units
(separable or their standard twin), a Keras-style dense layer, TensorFlow-'same' max pooling and the
classifier base class that checks its input."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..constraints import check_max_norm, max_norm_
from ..geometry import resolve_padding, to_tuple
from ..layers import Conv2d, DepthwiseConv2d, PointwiseConv2d, SeparableConv2d
from ..layers._common import check_channels, check_init, reset_keras_

# --- argument checks -------------------------------------------------------------------------------

def check_positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number; got {value!r}")
    return float(value)


def check_rate(value, name: str) -> float:
    """A dropout rate: Keras' ``Dropout`` accepts ``0 <= rate < 1``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1); got {value!r}")
    return float(value)


def check_flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {value!r}")
    return value


def check_stages(widths, depths) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-stage ``widths`` and block counts ``depths``: equally long, non-empty sequences of positive ints."""
    for value, name in ((widths, "widths"), (depths, "depths")):
        if (not isinstance(value, (tuple, list)) or not value
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
            raise ValueError(f"{name} must be a non-empty sequence of positive ints; got {value!r}")
    if len(widths) != len(depths):
        raise ValueError(f"widths and depths must have one entry per stage; got {len(widths)} widths "
                         f"{tuple(widths)} and {len(depths)} depths {tuple(depths)}")
    return tuple(widths), tuple(depths)


def check_staged(num_classes, in_channels, widths, depths, kernel_size, input_size, separable, init):
    """The arguments of a staged model (``convnext_k7``, ``replknet_k31``): checked, and the input's minimum side
    (a stride-4 stem, then one halving per later stage). Returns ``(widths, depths, minimum, (H, W))``."""
    check_channels(num_classes, "num_classes")
    check_channels(in_channels, "in_channels")
    widths, depths = check_stages(widths, depths)
    check_channels(kernel_size, "kernel_size")
    minimum = 4 * 2 ** (len(widths) - 1)
    size = check_input_size(input_size, minimum)
    check_flag(separable, "separable")
    check_init(init)
    return widths, depths, minimum, size


def check_input_size(value, minimum: int, name: str = "input_size") -> tuple[int, int]:
    """``(H, W)`` from an int or a pair, each at least ``minimum``."""
    return to_tuple(value, 2, name, minimum=minimum)


# --- building blocks -------------------------------------------------------------------------------

def batch_norm(channels: int, keras_momentum: float = 0.99, epsilon: float = 1e-3) -> nn.BatchNorm2d:
    """Keras' ``BatchNormalization`` (defaults ``momentum=0.99, epsilon=1e-3``) as ``nn.BatchNorm2d``.

    Keras' momentum weighs the old running statistic, PyTorch's the new batch statistic, so PyTorch's
    momentum is ``1 - keras_momentum`` (rounded, so that ``0.99`` gives ``0.01`` and not ``0.010000000000000009``).
    """
    return nn.BatchNorm2d(channels, eps=epsilon, momentum=round(1.0 - keras_momentum, 12))


class ConvNormAct(nn.Sequential):
    """A convolution, then an optional norm and activation (children ``conv``, ``norm``, ``act``)."""

    def __init__(self, conv: nn.Module, norm: nn.Module | None = None, activation: nn.Module | None = None):
        layers = OrderedDict(conv=conv)
        if norm is not None:
            layers["norm"] = norm
        if activation is not None:
            layers["act"] = activation
        super().__init__(layers)


def conv_or_separable(in_channels: int, out_channels: int, kernel_size, stride=1, padding="same", *,
                      separable: bool, bias: bool, init: str) -> nn.Module:
    """Keras' ``SeparableConv2D`` (depthwise then pointwise, one bias after the pointwise step), or with
    ``separable=False`` its twin: a standard ``Conv2d`` with the same kernel, stride, padding and widths."""
    if separable:
        return SeparableConv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias, init=init)
    return Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias, init=init)


def depthwise_separable(in_channels: int, out_channels: int, stride: int, padding, *, separable: bool,
                        norm: Callable[[int], nn.Module], activation: Callable[[], nn.Module] | None,
                        depth_multiplier: int = 1, init: str) -> nn.Module:
    """MobileNet's unit, with no biases: depthwise 3x3 -> norm -> ReLU6 -> pointwise 1x1 -> norm -> ``activation``.

    With ``separable=False``, its twin (MobileNet's Table 4 "Conv MobileNet"): a standard 3x3 convolution
    from ``in_channels`` to ``out_channels`` with the same stride and padding -> norm -> ``activation``.
    ``activation=None`` leaves the output linear (MobileNetV2's bottleneck).
    """
    last_activation = activation() if activation is not None else None
    if not separable:
        conv = Conv2d(in_channels, out_channels, 3, stride, padding, bias=False, init=init)
        return ConvNormAct(conv, norm(out_channels), last_activation)
    hidden = in_channels * depth_multiplier
    depthwise = DepthwiseConv2d(in_channels, 3, stride, padding, depth_multiplier=depth_multiplier, bias=False,
                                init=init)
    return nn.Sequential(OrderedDict(
        depthwise=ConvNormAct(depthwise, norm(hidden), nn.ReLU6()),
        pointwise=ConvNormAct(PointwiseConv2d(hidden, out_channels, bias=False, init=init), norm(out_channels),
                              last_activation)))


class Dense(nn.Linear):
    """``nn.Linear`` with what Keras' ``Dense`` brings to these models.

    Args:
        in_features, out_features: as ``nn.Linear``.
        init: ``"keras"`` (Glorot-uniform, zero bias) or ``"torch"`` (``nn.Linear``'s default).
        max_norm: if set, :func:`sepconv.constraints.apply_constraints` projects each output unit's incoming
            weights (Keras' kernel axis 0, ``weight`` dim 1 here) to an L2 norm of at most this, as Keras'
            ``kernel_constraint=max_norm(v)``.
        feature_shape: ``(C, H, W)`` of the feature map flattened into this layer, if it follows a flatten.
            PyTorch flattens ``(C, H, W)``, Keras ``(H, W, C)``; Keras weight porting uses this to reorder
            the kernel's rows.
    """

    def __init__(self, in_features: int, out_features: int, *, init: str = "keras", max_norm: float | None = None,
                 feature_shape: tuple[int, int, int] | None = None):
        self.init = check_init(init)  # read by reset_parameters(), which nn.Linear.__init__ calls
        super().__init__(in_features, out_features)
        self.max_norm = check_max_norm(max_norm)
        self.feature_shape = feature_shape

    def reset_parameters(self) -> None:
        if self.init == "keras":
            reset_keras_(self.weight, self.bias, self.in_features, self.out_features)
        else:
            super().reset_parameters()

    def constrain_(self) -> None:
        if self.max_norm is not None:
            max_norm_(self.weight, self.max_norm, dim=1)

    def extra_repr(self) -> str:
        extra = "" if self.max_norm is None else f", max_norm={self.max_norm}"
        return super().extra_repr() + extra


class MaxPool2dSame(nn.Module):
    """Max pooling with Keras' ``padding="same"``: ``out = ceil(n / stride)``, the odd padding element after.

    Padded cells never win (they hold ``-inf``). Amounts come from :func:`sepconv.geometry.resolve_padding`.
    """

    def __init__(self, kernel_size: int, stride: int):
        super().__init__()
        self.kernel_size = to_tuple(kernel_size, 2, "kernel_size")
        self.stride = to_tuple(stride, 2, "stride")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[2:])
        if torch.jit.is_tracing():  # sizes are tensors while tracing; as ints the trace records them as constants
            size = tuple(int(n) for n in size)
        pairs = resolve_padding("same", self.kernel_size, self.stride, 1, size)
        if all(before == after for before, after in pairs):  # pooling pads symmetrically with -inf itself
            return F.max_pool2d(x, self.kernel_size, self.stride, tuple(before for before, _ in pairs))
        x = F.pad(x, [amount for pair in reversed(pairs) for amount in pair], value=-math.inf)
        return F.max_pool2d(x, self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding='same'"


def pooled_head(channels: int, num_classes: int, init: str) -> nn.Sequential:
    """Global average pooling, flatten, then the classifier layer: the head of the staged models."""
    return nn.Sequential(OrderedDict(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(1),
                                     classifier=Dense(channels, num_classes, init=init)))


_SPATIAL_AXES = ("T", "H", "W")  # the names of an input's trailing axes, in its error messages


class Classifier(nn.Module):
    """Base of the reference models: ``features`` then ``head``, after a check of the input's shape.

    Attributes:
        features: the convolutional body (``nn.Sequential``).
        head: pooling/flatten and the classifier layer; the models return logits (no softmax).
        input_shape: ``(C, H, W)`` (``(C, T, H, W)`` for video) of one input at the nominal size the model was
            built for.
        min_input_size: smallest ``(H, W)`` (``(T, H, W)``) accepted; ``None`` when the head flattens a
            fixed-size feature map, so the input must be exactly ``input_shape``.
    """

    def __init__(self, features: nn.Sequential, head: nn.Sequential, input_shape: tuple[int, ...],
                 min_input_size: tuple[int, ...] | None):
        super().__init__()
        self.features = features
        self.head = head
        self.input_shape = tuple(input_shape)
        self.min_input_size = min_input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.head(self.features(x))

    def _check_input(self, x) -> None:
        name = type(self).__name__
        channels, *size = self.input_shape
        if not isinstance(x, torch.Tensor) or x.ndim != len(self.input_shape) + 1 or x.shape[1] != channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            axes = ", ".join(_SPATIAL_AXES[-len(size):])
            raise ValueError(f"{name} needs input of shape (N, {channels}, {axes}); got {shape}")
        if self.min_input_size is None:
            if list(x.shape[2:]) != size:
                raise ValueError(f"{name} was built for input of shape (N, {', '.join(map(str, self.input_shape))}) "
                                 f"(its dense layer reads a fixed-size feature map); got {tuple(x.shape)}")
        elif any(n < minimum for n, minimum in zip(x.shape[2:], self.min_input_size)):
            raise ValueError(f"{name} needs input of at least {'x'.join(map(str, self.min_input_size))}; got shape "
                             f"{tuple(x.shape)}")

