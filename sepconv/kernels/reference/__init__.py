"""The reference backend: PyTorch's own convolutions, with padding applied the cheapest correct way.

It covers everything (any rank, dtype, device, padding mode) and is the tested twin of every fast backend; the
registry falls back to it rather than registering it, so it needs no ``available``/``supports``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

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
    # PyTorch's CPU 1-D grouped convolution is far slower with padding inside it than after an explicit
    # F.pad (measured here, 16x16x512 depthwise: k15 forward 2.24 ms vs 0.24 ms, forward+backward
    # 4.18 ms vs 2.07 ms); at k3 the two are close and inside wins forward+backward.
    pad_explicitly = weight.ndim == 3 and groups > 1 and weight.shape[-1] > 3
    conv_padding, amounts = _padding_plan(geometry.padding, padding_mode, pad_explicitly)
    if amounts is not None:
        x = F.pad(x, amounts, mode=_PAD_MODE[padding_mode])
    return _CONV[weight.ndim - 2](x, weight, bias, geometry.stride, conv_padding, geometry.dilation, groups)


def depthwise_conv(x, weight, bias, geometry, padding_mode):
    return conv(x, weight, bias, geometry, x.shape[1], padding_mode)


def pointwise_conv(x, weight, bias):
    return _CONV[weight.ndim - 2](x, weight, bias)


# The activations that fused kernels apply in their epilogue (their codes in cpu/common.h follow this order);
# ``alpha`` is ELU's alpha and LeakyReLU's negative slope.
ACTIVATIONS = ("none", "relu", "relu6", "elu", "silu", "hardswish", "gelu", "leaky_relu")


def activation_of(module: nn.Module) -> tuple[str, float] | None:
    """``(name, alpha)`` of an activation module the kernels apply in their epilogue (one of :data:`ACTIVATIONS`),
    or None."""
    if isinstance(module, nn.ReLU):
        return "relu", 1.0
    if isinstance(module, nn.ReLU6) or (isinstance(module, nn.Hardtanh) and (module.min_val, module.max_val) == (0, 6)):
        return "relu6", 1.0
    if isinstance(module, nn.ELU):
        return "elu", float(module.alpha)
    if isinstance(module, nn.LeakyReLU):
        return "leaky_relu", float(module.negative_slope)
    if isinstance(module, nn.GELU) and module.approximate == "none":
        return "gelu", 1.0
    if isinstance(module, nn.Identity):
        return "none", 1.0
    for kind, name in ((nn.SiLU, "silu"), (nn.Hardswish, "hardswish")):
        if isinstance(module, kind):
            return name, 1.0
    return None


def activation(y, name: str, alpha: float = 1.0):
    """``y`` through the activation ``name`` (one of :data:`ACTIVATIONS`), as PyTorch computes it."""
    if name == "none":
        return y
    if name == "elu":
        return F.elu(y, alpha)
    if name == "leaky_relu":
        return F.leaky_relu(y, alpha)
    return {"relu": F.relu, "relu6": F.relu6, "silu": F.silu, "hardswish": F.hardswish, "gelu": F.gelu}[name](y)


def conv_act(x, weight, bias, geometry, groups, padding_mode, name: str, alpha: float = 1.0):
    """A convolution, then its bias and activation: the unfused twin of the fused kernels."""
    return activation(conv(x, weight, bias, geometry, groups, padding_mode), name, alpha)
