"""Standard convolutions that speak sepconv's padding ("same" for any stride, "causal", asymmetric pairs).

``Conv1d/2d/3d`` subclass ``torch.nn.ConvNd`` (so ``isinstance(m, nn.Conv2d)`` holds and every tool that
knows PyTorch convolutions knows these), replacing only how padding is resolved. They are the standard
twins of the separable layers: ``to_dense()`` returns a plain ``nn.ConvNd`` when PyTorch's own padding
can express the layer's, and one of these otherwise.
"""

from __future__ import annotations

from torch import nn

from .. import functional as F
from ..geometry import check_padding_mode, is_static, normalize_padding, resolve_padding, to_tuple
from ..interop import keras as keras_io
from ..weights import ungroup
from ._common import (check_channels, check_init, check_weight_fits, compact_padding, factory_kwargs, reset_keras_,
                      reset_torch_)

_TORCH_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class _ConvNd:
    """Mixin over ``nn.ConvNd``: sepconv padding semantics and Keras initialisation/interop."""

    _rank: int

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", *, init="torch", device=None, dtype=None):
        rank = self._rank
        check_channels(in_channels, "in_channels")
        check_channels(out_channels, "out_channels")
        groups = check_channels(groups, "groups")
        factory = factory_kwargs(device, dtype)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels (={in_channels}) and out_channels (={out_channels}) must be divisible "
                             f"by groups (={groups})")
        canonical = normalize_padding(padding, rank)
        check_padding_mode(padding_mode)
        self.init = check_init(init)
        kernel_size = to_tuple(kernel_size, rank, "kernel_size")
        check_weight_fits((out_channels, in_channels // groups, *kernel_size), factory,
                          f"in_channels={in_channels}, out_channels={out_channels}, kernel_size={kernel_size}")
        _TORCH_CONV[rank].__init__(self, in_channels, out_channels, kernel_size,
                                   to_tuple(stride, rank, "stride"), 0, to_tuple(dilation, rank, "dilation"),
                                   groups, bias, padding_mode, **factory)
        self.padding = canonical

    def reset_parameters(self) -> None:
        if getattr(self, "init", "torch") == "keras":
            receptive = self.weight[0, 0].numel()
            reset_keras_(self.weight, self.bias, receptive * self.weight.shape[1], receptive * self.out_channels)
        else:
            reset_torch_(self.weight, self.bias)

    def _conv_forward(self, input, weight, bias):
        return F.conv(input, weight, bias, self.stride, self.padding, self.dilation, self.groups, self.padding_mode)

    def extra_repr(self) -> str:
        padding = compact_padding(self.padding)
        text = super().extra_repr().replace(f", padding={self.padding}", f", padding={padding!r}" if padding else "")
        return text + (f", init={self.init!r}" if self.init != "torch" else "")

    def to_dense(self) -> nn.Module:
        """A copy with ``groups=1`` (block-diagonal kernel); a plain ``nn.ConvNd`` when its padding allows."""
        return dense_conv(ungroup(self.weight, self.groups), self.bias, self.stride, self.padding, self.dilation,
                          self.padding_mode)

    def load_keras_weights(self, source) -> None:
        """Copy weights from a Keras ``ConvND`` layer (or its ``get_weights()`` list)."""
        shape = keras_io.conv_kernel_to_keras(self.weight).shape
        keras_io.load_into(self, source, [("kernel", shape, self.weight, keras_io.conv_kernel_from_keras)], self.bias)

    def to_keras_weights(self) -> list:
        """Weights in Keras' ``ConvND`` order and layout: ``[kernel (*k, C_in / groups, C_out), bias]``."""
        return keras_io.export([keras_io.conv_kernel_to_keras(self.weight)], self.bias)


class Conv1d(_ConvNd, nn.Conv1d):
    """``torch.nn.Conv1d`` with sepconv padding: int, ``(before, after)``, ``"same"`` (any stride), ``"causal"``."""
    _rank = 1


class Conv2d(_ConvNd, nn.Conv2d):
    """``torch.nn.Conv2d`` with sepconv padding: ints, ``(before, after)`` pairs, ``"same"`` (any stride), ``"causal"``."""
    _rank = 2


class Conv3d(_ConvNd, nn.Conv3d):
    """``torch.nn.Conv3d`` with sepconv padding: ints, ``(before, after)`` pairs, ``"same"`` (any stride), ``"causal"``."""
    _rank = 3


_SEPCONV_CONV = {1: Conv1d, 2: Conv2d, 3: Conv3d}


def dense_conv(weight, bias, stride, padding, dilation, padding_mode, groups=1) -> nn.Module:
    """A standard convolution module holding copies of ``weight`` and ``bias``.

    A plain ``torch.nn.ConvNd`` when PyTorch's symmetric padding can express ``padding``; otherwise
    sepconv's ``ConvNd`` (a subclass of it) for asymmetric, input-dependent ("same" with stride) or
    causal padding.
    """
    rank = weight.ndim - 2
    kernel_size = tuple(weight.shape[2:])
    canonical = normalize_padding(padding, rank)
    pairs = resolve_padding(canonical, kernel_size, stride, dilation) if is_static(canonical, stride) else None
    symmetric = pairs is not None and all(before == after for before, after in pairs)
    cls = _TORCH_CONV[rank] if symmetric else _SEPCONV_CONV[rank]
    module = cls(weight.shape[1] * groups, weight.shape[0], kernel_size, stride,
                 tuple(before for before, _ in pairs) if symmetric else canonical, dilation, groups,
                 bias is not None, padding_mode, device=weight.device, dtype=weight.dtype)
    keras_io.assign(module.weight, weight.detach())
    if bias is not None:
        keras_io.assign(module.bias, bias.detach())
    return module
