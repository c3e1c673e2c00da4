"""Batch norm with the activation after it as one layer, for training fast on the CPU."""

from __future__ import annotations

import torch
from torch import nn

from .. import activations, functional


class BatchNormAct2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` followed by ``activation`` (``"none"``, ``"relu"`` or ``"relu6"``), same parameters,
    buffers and results.

    It runs :func:`sepconv.functional.batch_norm_act`. In training mode on channels-last float32 CPU input, the
    C++ backend runs both as one kernel per direction: the forward reads the input twice (statistics, then
    normalised and activated output) and the backward recomputes the activation's derivative from the input
    instead of making a pass of its own, where PyTorch makes three passes each way. The running statistics update
    as ``nn.BatchNorm2d``'s do. Everywhere else (eval mode, other layouts and dtypes, ``torch.compile``, which fuses
    these itself) it is PyTorch's batch norm, then the activation. :func:`sepconv.fuse_for_training` puts it in
    place of batch norm -> activation pairs.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, activation: str = "none", device=None, dtype=None):
        activations.check(activation, activations.TRAINABLE)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.activation = activation

    @classmethod
    def from_batch_norm(cls, norm: nn.BatchNorm2d, activation: str) -> "BatchNormAct2d":
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
        # nn.BatchNorm2d's bookkeeping: the running averages' factor and when the batch's statistics are used
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
