"""The fused modules an optimised model is made of: a convolution with batch norm folded into its weights, and
its bias and activation applied in the kernel's epilogue."""

from __future__ import annotations

import torch
from torch import nn

from .. import functional
from ..kernels import cpu, reference, registry

KINDS = ("depthwise", "pointwise", "conv")


class FusedConv(nn.Module):
    """``activation(conv(x) + bias)`` as one kernel where sepconv has one, for inference only.

    ``kind`` says which kernel: ``"depthwise"`` (weight ``(C * M, 1, *k)``; the C++ depthwise kernel with the
    activation in its epilogue, where the kernels mode picks it for this call), ``"pointwise"`` (1x1, stride 1:
    a matrix product finished block by block in cache) or ``"conv"`` (any other convolution: PyTorch's, then the
    activation in place). Under tracing and ONNX export it is PyTorch's convolution and activation, so exported
    graphs hold standard nodes; ``torch.compile`` records the sepconv op.

    The weights are buffers: the module has no parameters and refuses inputs that need gradients.
    """

    def __init__(self, kind: str, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation,
                 groups: int, padding_mode: str = "zeros", activation: str = "none", alpha: float = 1.0):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
        if activation not in reference.ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(reference.ACTIVATIONS)}; got {activation!r}")
        self.kind = kind
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.kernel_size = tuple(weight.shape[2:])
        self.stride, self.padding, self.dilation = tuple(stride), padding, tuple(dilation)
        self.groups, self.padding_mode = groups, padding_mode
        self.activation, self.alpha = activation, float(alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError(f"{type(self).__name__} is for inference only (a model from "
                               "sepconv.optimize_for_inference); its input must not require gradients")
        unbatched = x.ndim == self.weight.ndim - 1
        if unbatched:
            x = x.unsqueeze(0)
        y = self._fused(x)
        return y.squeeze(0) if unbatched else y

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        geometry = functional._geometry(x, self.kernel_size, self.stride, self.padding, self.dilation,
                                        self.padding_mode)
        if self.kind == "pointwise" and registry.get_kernels() != "reference" and not registry.exporting() \
                and cpu.supports(x, self.weight, self.bias) and cpu.available():
            return cpu.pointwise_conv_act(x, self.weight, self.bias, self.activation, self.alpha)
        if self.kind == "depthwise" and registry.select(x, self.weight, self.bias, geometry, self.padding_mode) is cpu:
            if self.padding_mode != "zeros" and geometry.padded:
                x, geometry = reference.pad(x, geometry.padding, self.padding_mode), geometry.without_padding()
            return cpu.depthwise_conv_act(x, self.weight, self.bias, geometry, self.activation, self.alpha)
        return reference.conv_act(x, self.weight, self.bias, geometry, self.groups, self.padding_mode,
                                  self.activation, self.alpha)

    def extra_repr(self) -> str:
        out_channels, in_per_group = self.weight.shape[:2]
        text = (f"{self.kind}, {in_per_group * self.groups}, {out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}")
        if self.padding not in (0, "valid") and any(self.kernel_size[i] > 1 for i in range(len(self.kernel_size))):
            text += f", padding={self.padding!r}"
        if any(d != 1 for d in self.dilation):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        text += f", bias={self.bias is not None}, activation={self.activation!r}"
        return text + (f", alpha={self.alpha}" if self.activation in ("elu", "leaky_relu") else "")
