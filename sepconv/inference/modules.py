"""The fused modules an optimised model is made of: a convolution with batch norm folded into its weights, and
its bias and activation applied in the kernel's epilogue."""

from __future__ import annotations

import torch
from torch import nn

from .. import activations, functional, kernels

KINDS = ("depthwise", "pointwise", "conv")


def _as_columns(weight: torch.Tensor) -> torch.Tensor:
    """A pointwise weight ``(C_out, C_in, 1, ...)`` stored as the pointwise kernel reads it: W^T's rows (``C_out``
    values each), zero-padded to whole 64-byte vectors and their leading dimension off multiples of 512 bytes (see
    ``weight_columns`` in ``kernels/cpu/pointwise.h``); the same values, as a view."""
    out_channels, in_channels = weight.shape[:2]
    per_vector = 64 // weight.element_size()
    leading = -(-out_channels // per_vector) * per_vector
    leading += per_vector if leading % (8 * per_vector) == 0 else 0
    columns = weight.new_zeros(in_channels, leading)
    columns[:, :out_channels] = weight.reshape(out_channels, in_channels).t()
    return columns[:, :out_channels].t().reshape(weight.shape)


MODEL_LAYOUTS = ("channels_last", "contiguous")


def memory_format(layout: str | None, ndim: int) -> torch.memory_format | None:
    """The memory format a tensor of rank ``ndim`` has in ``layout`` (one of ``MODEL_LAYOUTS``): channels-last is
    ``channels_last`` in 2-D and ``channels_last_3d`` in 3-D; None where the rank has a single layout."""
    if layout is None or ndim not in kernels.ops.CHANNELS_LAST:
        return None
    return kernels.ops.CHANNELS_LAST[ndim] if layout == "channels_last" else torch.contiguous_format


def _in_layout(y: torch.Tensor, layout: str | None) -> torch.Tensor:
    """An output in the model's layout: a kernel whose output has one channel, a planar kernel, or PyTorch's
    convolution on a batch of one may answer in another, and everything after it would then run in that one."""
    target = memory_format(layout, y.ndim)
    return y if target is None else y.contiguous(memory_format=target)


class _Planned(nn.Module):
    """A fused module that keeps the implementation the kernels registry chose for its last input signature
    (``registry.reuse_key``) and calls it directly: asking again costs about as much as a small layer's kernel
    (MobileNetV2 at batch 1: 52 calls; X3D-XS: 120). Setting an attribute or moving, casting or replacing its
    tensors (``.to()``) counts as a change, which makes the plan again; copies and pickles do not carry it."""

    _changes = 0

    def _planned(self, x: torch.Tensor, make, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``make(x, residual)(x[, residual])``, where ``make`` returns the call (``kernels.bound``) for inputs like
        these."""
        inputs = (x,) if residual is None else (x, residual)
        key = kernels.registry.reuse_key(x, residual)
        if key is None:
            return make(x, residual)(*inputs)
        key = (key, self._state())
        plan = self.__dict__.get("_plan")
        if plan is None or plan[0] != key:
            plan = self.__dict__["_plan"] = (key, make(x, residual))
        return plan[1](*inputs)

    def _state(self):
        """What the plan depends on besides the input: this module's changes (and its parts', see there)."""
        return self._changes

    def __setattr__(self, name: str, value) -> None:
        self.__dict__["_changes"] = self._changes + 1
        super().__setattr__(name, value)

    def _apply(self, fn, recurse=True):
        self.__dict__["_changes"] = self._changes + 1
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_plan", None)
        return state


def _refuse_gradients(module: nn.Module, x: torch.Tensor) -> None:
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError(f"{type(module).__name__} is for inference only (a model from "
                           "sepconv.optimize_for_inference); its input must not require gradients")


class FusedConv(_Planned):
    """``activation(conv(x) + bias)`` as one kernel where sepconv has one, for inference only.

    ``kind`` says which op of :mod:`sepconv.kernels` runs it: ``"depthwise"`` (weight ``(C * M, 1, *k)``:
    ``depthwise_conv_act``), ``"pointwise"`` (1x1, stride 1: ``pointwise_conv_act``, the weight stored as W^T's
    rows) or ``"conv"`` (any other convolution: PyTorch's, then the activation); the kernels registry picks the
    backend per call, as for every op. Under tracing and ONNX export that is PyTorch's convolution and activation,
    so exported graphs hold standard nodes; ``torch.compile`` records the sepconv op.

    The weights are buffers: the module has no parameters and refuses inputs that need gradients.
    """

    def __init__(self, kind: str, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation,
                 groups: int, padding_mode: str = "zeros", activation: str = "none", alpha: float = 1.0):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
        activations.check(activation)
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
        # the model's layout, which 4-D outputs keep: its name, since torch.save cannot pickle a memory format
        self.layout: str | None = None

    def cast(self, dtype: torch.dtype) -> None:
        """Weight and bias in ``dtype``; a pointwise weight stored again as its kernel reads it."""
        weight = self.weight.to(dtype)
        self.weight = _as_columns(weight) if self.kind == "pointwise" else weight
        if self.bias is not None:
            self.bias = self.bias.to(dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``activation(conv(x) + bias)``; a pointwise one also takes ``residual`` (the output's shape), added before
        the activation (:class:`FusedResidual`)."""
        _refuse_gradients(self, x)
        if residual is not None and self.kind != "pointwise":
            raise ValueError(f"only a pointwise FusedConv adds a residual; this one is {self.kind}")
        unbatched = x.ndim == self.weight.ndim - 1
        if unbatched:
            x, residual = x.unsqueeze(0), None if residual is None else residual.unsqueeze(0)
        y = _in_layout(self._planned(x, self._bound, residual), self.layout)
        return y.squeeze(0) if unbatched else y

    def _bound(self, x: torch.Tensor, residual: torch.Tensor | None):
        if self.kind == "pointwise":
            return kernels.bound("pointwise_conv_act", x, self.weight, self.bias, self.activation, self.alpha,
                                 residual=residual)
        if self.kind == "depthwise":
            return kernels.bound("depthwise_conv_act", x, self.weight, self.bias, self.geometry(x), self.padding_mode,
                                 self.activation, self.alpha, self.layout == "channels_last")
        return kernels.bound("conv_act", x, self.weight, self.bias, self.geometry(x), self.groups, self.padding_mode,
                             self.activation, self.alpha)

    def geometry(self, x: torch.Tensor):
        """The resolved geometry of this convolution on the batched input ``x``."""
        return functional._geometry(x, self.kernel_size, self.stride, self.padding, self.dilation, self.padding_mode)

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


class FusedSeparable(_Planned):
    """A depthwise :class:`FusedConv` then a pointwise one, as one kernel where that is faster.

    ``kernels.separable_conv_act`` computes a block of depthwise output rows into a buffer that stays in cache and
    feeds the pointwise product from there, so the hidden tensor never goes to memory (the C++ backend: channels-last
    input, depth multiplier 1, zero padding). Whether that pays depends on the shapes: the kernels registry times it
    against the two steps one after the other, as for every op.
    """

    def __init__(self, depthwise: FusedConv, pointwise: FusedConv):
        super().__init__()
        if depthwise.kind != "depthwise" or pointwise.kind != "pointwise":
            raise ValueError(f"FusedSeparable needs a depthwise then a pointwise FusedConv; got {depthwise.kind} "
                             f"then {pointwise.kind}")
        self.depthwise, self.pointwise = depthwise, pointwise

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The two steps; ``residual`` (the output's shape) is added before the pointwise step's activation."""
        dw, pw = self.depthwise, self.pointwise
        if x.ndim != dw.weight.ndim:  # unbatched: the steps add the batch dimension
            return pw(dw(x), residual)
        _refuse_gradients(self, x)
        return _in_layout(self._planned(x, self._bound, residual), pw.layout)

    def _bound(self, x: torch.Tensor, residual: torch.Tensor | None):
        dw, pw = self.depthwise, self.pointwise
        return kernels.bound("separable_conv_act", x, dw.weight, dw.bias, dw.geometry(x), dw.padding_mode,
                             dw.activation, dw.alpha, pw.weight, pw.bias, pw.activation, pw.alpha, residual=residual)

    def _state(self):
        return self._changes, self.depthwise._changes, self.pointwise._changes


class FusedResidual(nn.Module):
    """A residual block, ``activation(shortcut(x) + main(x))``, with the add and the activation in the epilogue of
    the last step of ``main``: that step (``last``, a pointwise :class:`FusedConv` or a :class:`FusedSeparable`,
    whose pointwise activation is the block's) takes the shortcut's output as its residual, so the sum is written
    once instead of the step's output, the sum and the activation each in a pass of their own (MobileNetV2's
    inverted residuals, X3D's bottlenecks). ``shortcut`` None is the identity.
    """

    def __init__(self, main: nn.Module, last: nn.Module, shortcut: nn.Module | None):
        super().__init__()
        if not isinstance(last, FusedSeparable) and not (isinstance(last, FusedConv) and last.kind == "pointwise"):
            raise ValueError(f"FusedResidual's last step must be a pointwise FusedConv or a FusedSeparable; got "
                             f"{type(last).__name__}")
        self.main, self.last, self.shortcut = main, last, shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.shortcut is None else self.shortcut(x)
        return self.last(self.main(x), residual)


class FusedTemporalSpatial(nn.Module):
    """EEGNet's first block in the other order: a one-channel temporal convolution ``(F, 1, 1, K)`` (its norm
    folded) then a depthwise spatial one ``(F * D, 1, H, 1)`` over all ``H`` electrodes, for inference only.

    Both are linear and the norm between them is affine, so the spatial mix can run first: a pointwise product
    with the ``H`` rows as channels (``H -> F * D``), then each of the ``F * D`` outputs filtered by its temporal
    kernel (a depthwise ``1 x K``, the spatial step's bias, norm and activation in its epilogue). That is
    ``F * D * (H + K)`` multiply-adds per time step instead of ``F * H * K``: 8x fewer for EEGNet-8,2 on 22
    electrodes and 64 taps. Zero padding commutes with the mix, so outputs equal the two steps' up to rounding.
    Any other input (another height, padding across rows) runs the two steps as they are.
    """

    def __init__(self, temporal: FusedConv, spatial: FusedConv):
        super().__init__()
        if not _temporal_then_spatial(temporal, spatial):
            raise ValueError("FusedTemporalSpatial needs a one-channel (1, K) depthwise FusedConv without activation, "
                             "then a depthwise (H, 1) one of stride 1 without padding")
        self.temporal, self.spatial = temporal, spatial
        outputs, multiplier = spatial.weight.shape[0], spatial.weight.shape[0] // temporal.weight.shape[0]
        rows = spatial.weight.reshape(outputs, -1)  # (F * D, H): each output's weight per electrode
        self.mix = FusedConv("pointwise", rows[:, :, None, None], None, (1, 1), 0, (1, 1), 1)
        kernels_per_output = temporal.weight.repeat_interleave(multiplier, dim=0)  # filter f // D for output f
        bias = spatial.bias if spatial.bias is not None else rows.new_zeros(outputs)
        if temporal.bias is not None:  # the temporal bias passes through the mix: times each output's row weights
            bias = bias + temporal.bias.repeat_interleave(multiplier) * rows.sum(dim=1)
        self.filter = FusedConv("depthwise", kernels_per_output, bias, temporal.stride, temporal.padding,
                                temporal.dilation, outputs, "zeros", spatial.activation, spatial.alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, s = self.temporal, self.spatial
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[2] != s.kernel_size[0] or t.geometry(x).padding[0] != (0, 0):
            return s(t(x))
        _refuse_gradients(self, x)
        rows = x.reshape(x.shape[0], x.shape[2], 1, x.shape[3])  # the rows as channels: a view of one channel
        return self.filter(self.mix(rows))


def _temporal_then_spatial(temporal: nn.Module, spatial: nn.Module) -> bool:
    """Whether FusedTemporalSpatial can reorder these two (see there)."""
    return (isinstance(temporal, FusedConv) and isinstance(spatial, FusedConv)
            and temporal.kind == spatial.kind == "depthwise" and temporal.weight.ndim == spatial.weight.ndim == 4
            and temporal.groups == 1 and temporal.kernel_size[0] == 1 and temporal.stride[0] == 1
            and temporal.activation == "none" and temporal.padding_mode == spatial.padding_mode == "zeros"
            and spatial.groups == temporal.weight.shape[0] and spatial.kernel_size[1] == 1
            and spatial.weight.shape[0] % spatial.groups == 0
            and spatial.stride == (1, 1) and spatial.dilation == (1, 1)
            and spatial.padding in (0, "valid", (0, 0), ((0, 0), (0, 0)), ("valid", "valid")))
