"""Reference kernels: PyTorch's own convolutions, with padding applied the cheapest correct way."""

from __future__ import annotations

import torch.nn.functional as F

from .._memo import memoised

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_PAD_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


@memoised
def _padding_plan(padding: tuple, padding_mode: str):
    """``(conv_padding, pad_amounts)``: what goes inside the convolution and what ``F.pad`` does first."""
    if padding_mode == "zeros" and all(before == after for before, after in padding):
        return tuple(before for before, _ in padding), None  # inside the convolution: no padded copy
    if not any(before or after for before, after in padding):
        return 0, None
    return 0, [amount for pair in reversed(padding) for amount in pair]  # F.pad wants the last axis first


def conv(x, weight, bias, stride, padding, dilation, groups, padding_mode):
    """``padding``: integer ``(before, after)`` pairs per spatial axis."""
    conv_padding, pad_amounts = _padding_plan(padding, padding_mode)
    if pad_amounts is not None:
        x = F.pad(x, pad_amounts, mode=_PAD_MODE[padding_mode])
    return _CONV[weight.ndim - 2](x, weight, bias, stride, conv_padding, dilation, groups)


def pointwise_conv(x, weight, bias):
    return _CONV[weight.ndim - 2](x, weight, bias)
