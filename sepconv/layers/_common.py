"""Pieces every layer shares: argument checks, initialisation, norm/activation factories, repr."""

from __future__ import annotations

import math
import numbers

import numpy as np

import torch
from torch import nn

from .._io import machine_memory_bytes
from ..activations import LAYER_FACTORIES
from ..geometry import check_padding_mode, normalize_padding, to_tuple

INITS = ("torch", "keras")

_NORMS = {"batch": {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}}


def check_channels(value, name: str) -> int:
    """A positive int (numpy integers accepted and returned as int)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return int(value)


def factory_kwargs(device, dtype) -> dict:
    """``device`` and ``dtype`` for a layer's parameters; the dtype must be floating point (or None)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be None or a floating-point torch.dtype; got {dtype!r}")
    return {"device": device, "dtype": dtype}


def check_weight_fits(shape, factory: dict, sizing: str) -> None:
    """A one-line error naming the sizing arguments and the bytes, before a weight of ``shape`` that this machine's
    memory could not hold is allocated (on the CPU; other devices say so themselves)."""
    device = factory.get("device")
    if device is not None and torch.device(device).type != "cpu":
        return
    dtype = factory.get("dtype") or torch.get_default_dtype()
    needed, available = math.prod(shape) * dtype.itemsize, machine_memory_bytes()
    if needed > available:
        raise ValueError(f"{sizing} makes a weight of {' x '.join(map(str, shape))} {str(dtype).removeprefix('torch.')}"
                         f" = {needed / 2**30:,.1f} GiB, more than this machine's {available / 2**30:,.1f} GiB of "
                         "memory")


def new_weight(shape, factory: dict, sizing: str) -> nn.Parameter:
    """An uninitialised parameter of ``shape``, checked first by :func:`check_weight_fits`."""
    check_weight_fits(shape, factory, sizing)
    return nn.Parameter(torch.empty(*shape, **factory))


def _built(factory, argument: str, what: str, *args) -> nn.Module:
    """``factory(*args)``, which must build an ``nn.Module``; a TypeError naming ``argument`` otherwise."""
    try:
        module = factory(*args)
    except TypeError as error:
        raise TypeError(f"{argument} must be {what}; got {factory!r}, and calling it failed ({error})") from None
    if not isinstance(module, nn.Module):
        raise TypeError(f"{argument} must be {what}; got {factory!r}, which returned a {type(module).__name__}")
    return module


def check_input_channels(x, in_channels: int, rank: int) -> None:
    """The layer's own check of its input's channels: the depthwise ops infer the depth multiplier (and the
    spatial ones the groups) from them, so an input with a divisor of ``in_channels`` would run, wrongly."""
    if isinstance(x, torch.Tensor) and x.ndim in (rank + 1, rank + 2) and x.shape[-rank - 1] != in_channels:
        raise ValueError(f"x has {x.shape[-rank - 1]} channels but the layer has in_channels = {in_channels}; got "
                         f"shape {tuple(x.shape)}")


def check_init(init: str) -> str:
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}; got {init!r}")
    return init


@torch.no_grad()
def reset_torch_(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """PyTorch's default for ``nn.ConvNd``: Kaiming-uniform with ``a = sqrt(5)``, bias U(+-1/sqrt(fan_in))."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        bound = 1 / math.sqrt(weight[0].numel())
        nn.init.uniform_(bias, -bound, bound)


@torch.no_grad()
def reset_keras_(weight: torch.Tensor, bias: torch.Tensor | None, fan_in: int, fan_out: int) -> None:
    """Keras' default: Glorot-uniform with the fans Keras computes from its own kernel layout; zero bias."""
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    nn.init.uniform_(weight, -limit, limit)
    if bias is not None:
        nn.init.zeros_(bias)


def make_norm(norm, channels: int, rank: int) -> nn.Module | None:
    """``None``, ``"batch"`` or a callable ``channels -> nn.Module``."""
    if norm is None:
        return None
    if isinstance(norm, str):
        if norm not in _NORMS:
            raise ValueError(f"norm must be None, one of {tuple(_NORMS)} or a callable taking the channel count; "
                             f"got {norm!r}")
        return _NORMS[norm][rank](channels)
    if callable(norm):
        return _built(norm, "norm", "a factory taking the channel count and returning an nn.Module", channels)
    raise TypeError(f"norm must be None, a str or a callable taking the channel count; got {norm!r}")


def make_activation(activation) -> nn.Module | None:
    """``None``, a name (``"relu"``, ``"relu6"``, ...), an ``nn.Module`` or a zero-argument factory."""
    if activation is None or isinstance(activation, nn.Module):
        return activation
    if isinstance(activation, str):
        if activation not in LAYER_FACTORIES:
            raise ValueError(f"activation must be None, one of {tuple(LAYER_FACTORIES)}, an nn.Module or a factory; "
                             f"got {activation!r}")
        return LAYER_FACTORIES[activation]()
    if callable(activation):  # a factory such as nn.ReLU; a function such as torch.relu is not one
        return _built(activation, "activation", "an nn.Module or a factory called with no arguments")
    raise TypeError(f"activation must be None, a str, an nn.Module or a factory; got {activation!r}")


def settings_repr(required: list[str], optional: list[tuple[str, object, object]]) -> str:
    """``extra_repr`` text: the required settings, then the optional ones that differ from their default."""
    parts = list(required)
    parts += [f"{name}={value!r}" for name, value, default in optional if value != default]
    return ", ".join(parts)


def compact_padding(padding: tuple) -> object:
    """Shortest user form of a canonical padding, for reprs: ``'same'``, ``'causal'``, ``1``, or per axis."""
    rank = len(padding)
    if rank and padding[-1] == "causal" and all(p == "same" for p in padding[:-1]):
        return "causal"
    if len(set(padding)) == 1:
        first = padding[0]
        if isinstance(first, str):
            return first
        if first[0] == first[1]:
            return first[0]
    return tuple(p if isinstance(p, str) or p[0] != p[1] else p[0] for p in padding)


def spatial_args(rank: int, kernel_size, stride, padding, dilation, padding_mode):
    """Normalise the spatial arguments every layer takes, once, with errors naming each argument."""
    return (to_tuple(kernel_size, rank, "kernel_size"), to_tuple(stride, rank, "stride"),
            normalize_padding(padding, rank), to_tuple(dilation, rank, "dilation"), check_padding_mode(padding_mode))


def spatial_repr(module, rank: int) -> list[tuple[str, object, object]]:
    """The optional spatial settings of a layer with their defaults, for :func:`settings_repr`."""
    return [("stride", module.stride, (1,) * rank),
            ("padding", compact_padding(module.padding), compact_padding(normalize_padding(0, rank))),
            ("dilation", module.dilation, (1,) * rank),
            ("padding_mode", module.padding_mode, "zeros")]
