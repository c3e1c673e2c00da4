"""Weight constraints applied as Keras applies them: a projection after each optimiser step.

Keras' ``MaxNorm(max_value, axis)`` rescales ``w`` to ``w * clip(n, 0, max_value) / (1e-7 + n)``, ``n``
being the L2 norm over ``axis``; the optimiser step is taken unconstrained, then the weight is
projected. sepconv does the same (not a parametrisation), so trained weights match a Keras run.

A module takes part by defining ``constrain_()``; :func:`apply_constraints` calls it on every
module of a model, and :func:`attach_constraints` makes an optimiser do so after each ``step()``.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

_EPSILON = 1e-7  # Keras' backend epsilon


@torch.no_grad()
def max_norm_(weight: torch.Tensor, max_value: float, dim) -> torch.Tensor:
    """Project ``weight`` in place so that its L2 norm over ``dim`` is at most ``max_value`` (Keras formula)."""
    norms = torch.linalg.vector_norm(weight, dim=dim, keepdim=True)
    weight.mul_(norms.clamp(0, max_value) / (_EPSILON + norms))
    return weight


def check_max_norm(max_norm, name: str = "max_norm") -> float | None:
    if max_norm is None:
        return None
    if isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real) or not max_norm > 0:
        raise ValueError(f"{name} must be None or a positive number; got {max_norm!r}")
    return float(max_norm)


def apply_constraints(model: nn.Module) -> None:
    """Project every constrained weight of ``model`` (call after ``optimizer.step()``)."""
    for module in model.modules():
        constrain = getattr(module, "constrain_", None)
        if callable(constrain):
            constrain()


def attach_constraints(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Apply ``model``'s constraints after every ``optimizer.step()``; returns the removable hook handle."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    return optimizer.register_step_post_hook(lambda *_: apply_constraints(model))
