"""Reference kernels: PyTorch's own convolutions, with padding applied the cheapest correct way."""

from __future__ import annotations

import torch.nn.functional as F

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_PAD_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}
NO_PADDING = ()


def conv(x, weight, bias, stride, padding, dilation, groups, padding_mode):
    """``padding``: integer ``(before, after)`` pairs per spatial axis (``NO_PADDING``: none)."""
    conv_padding = 0
    if padding_mode == "zeros" and all(before == after for before, after in padding):
        # Symmetric zero padding is done inside the convolution: no padded copy of the input.
        conv_padding = tuple(before for before, _ in padding) or 0
    elif any(before or after for before, after in padding):
        amounts = [amount for pair in reversed(padding) for amount in pair]  # F.pad wants last axis first
        x = F.pad(x, amounts, mode=_PAD_MODE[padding_mode])
    return _CONV[weight.ndim - 2](x, weight, bias, stride, conv_padding, dilation, groups)
