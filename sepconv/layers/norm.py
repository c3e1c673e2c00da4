"""Batch norm with the activation after it as one layer, for training fast on the CPU."""

from __future__ import annotations

import torch
from torch import nn

from .. import activations, functional


class _BatchNormAct:
    """Batch norm followed by ``activation`` (``"none"``, ``"relu"`` or ``"relu6"``), same parameters, buffers and
    results as the batch norm layer it derives from, then the activation.

    It runs :func:`sepconv.functional.batch_norm_act`. In training mode on channels-last float32 CPU input
    (``channels_last``, or ``channels_last_3d`` in 3-D), the C++ backend runs both as one kernel per direction: the
    forward reads the input twice (statistics, then normalised and activated output) and the backward recomputes
    the activation's derivative from the input instead of making a pass of its own, where PyTorch makes three passes
    each way. The running statistics update as the batch norm's do. Everywhere else (eval mode, other layouts and
    dtypes, ``torch.compile``, which fuses these itself) it is PyTorch's batch norm, then the activation.
    :func:`sepconv.fuse_for_training` puts it in place of batch norm -> activation pairs.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, activation: str = "none", device=None, dtype=None):
        activations.check(activation, activations.TRAINABLE)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.activation = activation

    @classmethod
    def from_batch_norm(cls, norm: nn.modules.batchnorm._BatchNorm, activation: str):
        """The fused layer holding ``norm``'s own parameters and buffers (the same tensors, not copies)."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.__dict__.update({key: value for key, value in norm.__dict__.items() if not key.startswith("_")})
        fused._parameters, fused._buffers = norm._parameters, norm._buffers
        fused.training = norm.training
        fused.activation = activation
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        # PyTorch's batch norm bookkeeping: the running averages' factor and when the batch's statistics are used
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_statistics = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return functional.batch_norm_act(x, self.running_mean if track else None, self.running_var if track else None,
                                         self.weight, self.bias, batch_statistics, factor, self.eps, self.activation)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation!r}"


class BatchNormAct2d(_BatchNormAct, nn.BatchNorm2d):
    __doc__ = "``nn.BatchNorm2d`` then an activation, as one layer.\n\n" + _BatchNormAct.__doc__.split("\n\n", 1)[1]


class BatchNormAct3d(_BatchNormAct, nn.BatchNorm3d):
    __doc__ = "``nn.BatchNorm3d`` then an activation, as one layer.\n\n" + _BatchNormAct.__doc__.split("\n\n", 1)[1]
