"""Batch norm with the activation after it as one layer, for training fast on the CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu, reference

ACTIVATIONS = cpu.TRAINING_ACTIVATIONS


class BatchNormAct2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` followed by ``activation`` (``"none"``, ``"relu"`` or ``"relu6"``), same parameters,
    buffers and results.

    In training mode on channels-last float32 CPU input, both run as one C++ kernel per direction: the forward
    reads the input twice (statistics, then normalised and activated output) and the backward recomputes the
    activation's derivative from the input instead of making a pass of its own, where PyTorch makes three passes
    each way (measured here: forward and backward together 4.7x faster on 16x96x56x56). The running statistics
    update as ``nn.BatchNorm2d``'s do. Everywhere else (eval mode, other layouts and dtypes, ``torch.compile``,
    which fuses these itself) it is PyTorch's batch norm, then the activation. :func:`sepconv.fuse_for_training`
    puts it in place of batch norm -> activation pairs.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, activation: str = "none", device=None, dtype=None):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")
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
        batch_statistics = self.training or self.running_mean is None
        if batch_statistics and self.affine and cpu.covers_batch_norm_act(x, self.activation) \
                and x.numel() > x.shape[1]:
            y, mean, invstd = cpu.batch_norm_act(x, self.weight, self.bias, self.eps, self.activation)
            if self.training and self.track_running_stats:
                self._update_running_stats(mean, invstd, x.numel() // x.shape[1])
            return y
        return reference.activation(super().forward(x), self.activation)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, invstd: torch.Tensor, count: int) -> None:
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        variance = (invstd.double().pow(-2) - self.eps).clamp_min(0).float() * (count / (count - 1))  # unbiased
        self.running_mean.lerp_(mean, momentum)
        self.running_var.lerp_(variance, momentum)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation!r}"
