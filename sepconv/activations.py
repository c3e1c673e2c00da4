"""Activations: the names layers accept, the ones kernels apply in their epilogue, and how each is computed.

:data:`FUSED` lists the activations a fused op (``depthwise_conv_act``, ``pointwise_conv_act``,
``separable_conv_act``, ``batch_norm_act``) takes by name; a name's index is its code in the C++ kernels
(``enum class Act`` in ``kernels/cpu/common.h``, which a test keeps in this order). :data:`TRAINABLE` are those
whose derivative the fused batch-norm kernel recomputes from its input. ``alpha`` is ELU's alpha and
LeakyReLU's negative slope; the others ignore it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FUSED", "LAYER_FACTORIES", "TRAINABLE", "apply", "check", "code", "of_module"]

FUSED = ("none", "relu", "relu6", "elu", "silu", "hardswish", "gelu", "leaky_relu")
TRAINABLE = ("none", "relu", "relu6")

# What a layer's ``activation="name"`` builds (a superset of FUSED: any module works in a layer)
LAYER_FACTORIES: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "elu": nn.ELU, "gelu": nn.GELU, "silu": nn.SiLU,
    "swish": nn.SiLU, "hardswish": nn.Hardswish, "leaky_relu": nn.LeakyReLU, "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}

_FUNCTIONS = {"relu": F.relu, "relu6": F.relu6, "silu": F.silu, "hardswish": F.hardswish, "gelu": F.gelu}


def check(name, allowed: tuple[str, ...] = FUSED, argument: str = "activation") -> str:
    """``name`` if it is one of ``allowed``, else a ValueError naming ``argument`` and the value."""
    if name not in allowed:
        raise ValueError(f"{argument} must be one of {', '.join(allowed)}; got {name!r}")
    return name


def code(name: str) -> int:
    """The C++ kernels' code of a :data:`FUSED` activation."""
    return FUSED.index(name)


def of_module(module: nn.Module) -> tuple[str, float] | None:
    """``(name, alpha)`` of an activation module a fused op can apply (one of :data:`FUSED`), or None."""
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


def apply(y: torch.Tensor, name: str, alpha: float = 1.0) -> torch.Tensor:
    """``y`` through the :data:`FUSED` activation ``name``, as PyTorch computes it."""
    if name == "none":
        return y
    if name == "elu":
        return F.elu(y, alpha)
    if name == "leaky_relu":
        return F.leaky_relu(y, alpha)
    return _FUNCTIONS[name](y)
