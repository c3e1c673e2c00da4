"""The fused modules an optimised model is made of: a convolution with batch norm folded into its weights, and
its bias and activation applied in the kernel's epilogue."""

from __future__ import annotations

import torch
from torch import nn

from .. import functional
from ..kernels import cpu, ops, reference, registry
from ..profiling.timing import fastest

KINDS = ("depthwise", "pointwise", "conv")


def _as_columns(weight: torch.Tensor) -> torch.Tensor:
    """A pointwise weight ``(C_out, C_in, 1, ...)`` stored as the pointwise kernel reads it: W^T's rows (``C_out``
    values each), their leading dimension padded off multiples of 512 bytes (see ``weight_columns`` in
    ``kernels/cpu/pointwise.h``); the same values, as a view."""
    out_channels, in_channels = weight.shape[:2]
    size = weight.element_size()
    leading = out_channels + 64 // size if (out_channels * size) % 512 == 0 else out_channels
    columns = weight.new_zeros(in_channels, leading)
    columns[:, :out_channels] = weight.reshape(out_channels, in_channels).t()
    return columns[:, :out_channels].t().reshape(weight.shape)


def _in_layout(y: torch.Tensor, memory_format: torch.memory_format | None) -> torch.Tensor:
    """A 4-D output in the model's layout: a kernel whose output has one channel, or a planar kernel, may answer
    in another, and everything after it (pooling too) would then run in that one."""
    return y.contiguous(memory_format=memory_format) if memory_format is not None and y.ndim == 4 else y


def _kernels_usable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the kernels mode allows the C++ kernels for this call and they cover it."""
    return (registry.get_kernels() != "reference" and not registry.exporting() and cpu.supports(x, weight, bias)
            and cpu.available())


def _kernel_pays(choices: dict, x: torch.Tensor, kernel, unfused) -> bool:
    """The kernels mode's choice between a fused kernel and its unfused twin: a forced mode and compiled graphs take
    the kernel; ``auto`` times both once per input signature (the fused calls themselves, which may differ from the
    plain convolutions the registry times) and keeps the answer in ``choices``."""
    if registry.get_kernels() != "auto" or torch.compiler.is_compiling():
        return True
    signature = (tuple(x.shape), x.stride(), torch.get_num_threads())
    if signature not in choices:
        with torch.no_grad():
            choices[signature] = fastest({"kernel": lambda: kernel(x), "unfused": lambda: unfused(x)}) == "kernel"
    return choices[signature]


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
        weight = weight.detach().clone()
        if kind == "pointwise":
            weight = _as_columns(weight)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.kernel_size = tuple(weight.shape[2:])
        self.stride, self.padding, self.dilation = tuple(stride), padding, tuple(dilation)
        self.groups, self.padding_mode = groups, padding_mode
        self.activation, self.alpha = activation, float(alpha)
        self.memory_format: torch.memory_format | None = None  # the model's layout, which 4-D outputs keep
        self._choices: dict[tuple, bool] = {}  # input signature -> whether the kernel beat the reference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError(f"{type(self).__name__} is for inference only (a model from "
                               "sepconv.optimize_for_inference); its input must not require gradients")
        unbatched = x.ndim == self.weight.ndim - 1
        if unbatched:
            x = x.unsqueeze(0)
        y = _in_layout(self._fused(x), self.memory_format)
        return y.squeeze(0) if unbatched else y

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        geometry = functional._geometry(x, self.kernel_size, self.stride, self.padding, self.dilation,
                                        self.padding_mode)
        usable = _kernels_usable(x, self.weight, self.bias)
        if usable and self.kind == "pointwise":
            return cpu.pointwise_conv_act(x, self.weight, self.bias, self.activation, self.alpha)
        if usable and self.kind == "depthwise" and _kernel_pays(self._choices, x, lambda t: self._kernel(t, geometry),
                                                                lambda t: self._reference(t, geometry)):
            return self._kernel(x, geometry)
        return self._reference(x, geometry)

    def _reference(self, x: torch.Tensor, geometry) -> torch.Tensor:
        return reference.conv_act(x, self.weight, self.bias, geometry, self.groups, self.padding_mode,
                                  self.activation, self.alpha)

    def _kernel(self, x: torch.Tensor, geometry) -> torch.Tensor:
        if self.padding_mode != "zeros" and geometry.padded:
            x, geometry = reference.pad(x, geometry.padding, self.padding_mode), geometry.without_padding()
        return cpu.depthwise_conv_act(x, self.weight, self.bias, geometry, self.activation, self.alpha,
                                      channels_last=self.memory_format == torch.channels_last)

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


class FusedSeparable(nn.Module):
    """A depthwise :class:`FusedConv` then a pointwise one, as one kernel where that is faster.

    The fused kernel computes a block of depthwise output rows into a buffer that stays in cache and feeds the
    pointwise product from there, so the hidden tensor never goes to memory (channels-last input, depth
    multiplier 1, zero padding). Whether it pays depends on the shapes: the first call with a new input shape
    times both ways and keeps the faster (unless the kernels mode is forced), as the kernels mode ``auto`` does.
    """

    def __init__(self, depthwise: FusedConv, pointwise: FusedConv):
        super().__init__()
        if depthwise.kind != "depthwise" or pointwise.kind != "pointwise":
            raise ValueError(f"FusedSeparable needs a depthwise then a pointwise FusedConv; got {depthwise.kind} "
                             f"then {pointwise.kind}")
        self.depthwise, self.pointwise = depthwise, pointwise
        self._choices: dict[tuple, bool] = {}  # input signature -> whether the fused kernel beat the two steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fusable(x) and _kernel_pays(self._choices, x, self._fused, self._unfused):
            return _in_layout(self._fused(x), self.pointwise.memory_format)
        return self._unfused(x)

    def _unfused(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))

    def _fusable(self, x: torch.Tensor) -> bool:
        dw = self.depthwise
        return (_kernels_usable(x, dw.weight, dw.bias) and x.ndim == 4 and dw.padding_mode == "zeros"
                and dw.weight.shape[0] == x.shape[1] and ops.channels_last_like(x)
                and not (torch.is_grad_enabled() and x.requires_grad))

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        dw, pw = self.depthwise, self.pointwise
        geometry = functional._geometry(x, dw.kernel_size, dw.stride, dw.padding, dw.dilation, dw.padding_mode)
        return cpu.separable_conv_act(x, dw.weight, dw.bias, geometry, dw.activation, dw.alpha, pw.weight, pw.bias,
                                      pw.activation, pw.alpha)

