"""``optimize_for_inference``: an eval-only copy of a model whose convolution -> batch norm -> activation chains run
as single fused kernels, in one memory layout chosen for the whole model."""

from __future__ import annotations

import copy
import threading

import torch
from torch import nn

from ..layers.conv import _ConvNd as _SepconvConv
from ..layers.depthwise import _DepthwiseConvNd
from ..layers.pointwise import _PointwiseConvNd
from ..layers.separable import _SeparableConvNd
from ..layers.spatial import _SpatialSeparableConvNd
from .._timer import fastest
from ..activations import of_module as activation_of
from ..weights import fold_batch_norm
from .modules import (MODEL_LAYOUTS, FusedConv, FusedResidual, FusedSeparable, FusedTemporalSpatial,
                      _temporal_then_spatial, memory_format)

__all__ = ["optimize_for_inference", "LAYOUTS"]

LAYOUTS = ("auto", *MODEL_LAYOUTS)
DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def optimize_for_inference(model: nn.Module, example_input: torch.Tensor | None = None, *,
                           layout: str = "auto", dtype: torch.dtype | None = None) -> nn.Module:
    """An eval-only copy of ``model`` that computes the same outputs as ``model.eval()``, faster.

    Inside every ``nn.Sequential`` (sepconv's reference models are built of them), each convolution (sepconv's
    depthwise, pointwise, separable and standard layers, PyTorch's ``nn.ConvNd``) followed by an optional
    batch norm and an optional activation (ReLU, ReLU6, ELU, SiLU, Hardswish, GELU, LeakyReLU) becomes one
    :class:`~sepconv.inference.FusedConv`: the batch norm folded into the weights and bias, the activation run
    in the kernel's epilogue. A separable layer becomes its depthwise and pointwise steps (a batch norm and
    activation between them are folded and fused the same way). Dropout, an identity in eval mode, is dropped.
    Anything else stays as it is, so models with other patterns work unchanged where they are not covered.

    ``layout``: ``"channels_last"`` (``channels_last_3d`` for 3-D models) or ``"contiguous"`` for the whole model
    (the input is converted once, on entry); ``"auto"`` times both on ``example_input`` and keeps the faster
    (channels-last without one). Outputs equal the original's to float32 rounding (folding reorders the
    arithmetic: the tests hold them to 1e-4 relative to the output's scale). The copy takes inputs of its weights'
    floating dtype (float32 for a float32 model) and refuses others in one line, naming both; for float64, optimise
    ``model.to(torch.float64)``.
    It saves whole with ``torch.save`` (load with ``weights_only=False``), and its state dict loads into another
    optimised copy of the same model. The copy composes with ``torch.compile`` and exports to ONNX as
    standard convolutions and activations. ``model`` itself is not changed.

    ``dtype``: the dtype the copy computes in, by default its weights'. ``torch.bfloat16`` (from a float32 model):
    batch norm is folded in float32, then every weight is stored in bf16 and activations flow in bf16 from one
    module to the next; the fused kernels compute in float32 and round once per output (the C++ kernels read bf16
    natively; where they do not cover a call, PyTorch's bf16 path runs it). Such a copy takes float32 or bf16
    input, converts it once on entry, and returns its output in the dtype of the input it was given. Its outputs
    differ from float32's by bf16 rounding (about 1 % of the output's scale on the reference models; see the tests).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if example_input is not None and not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a torch.Tensor or None; got {type(example_input).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    weights_dtype = _weights_dtype(model)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(str, DTYPES))}; got {dtype!r}")
    if example_input is not None and example_input.is_floating_point() and weights_dtype not in (
            None, example_input.dtype):
        raise ValueError(f"example_input is {example_input.dtype} but the model's weights are {weights_dtype}; give "
                         "both the dtype the model was trained in (dtype= sets the copy's)")
    if dtype == torch.bfloat16 and weights_dtype not in (None, torch.float32, torch.bfloat16):
        raise ValueError(f"dtype=torch.bfloat16 needs a float32 model; its weights are {weights_dtype}")
    optimised = copy.deepcopy(model).eval()
    optimised.requires_grad_(False)
    _rewrite(optimised)
    _fuse_residuals(optimised)
    if dtype is not None and dtype != weights_dtype:
        _cast(optimised, dtype)
    if layout == "auto":
        layout = _fastest_layout(optimised, example_input) if example_input is not None else "channels_last"
    _set_layout(optimised, layout)
    return optimised


# --- rewriting ---------------------------------------------------------------------------------------------

def _rewrite(module: nn.Module) -> None:
    """Fuse inside every ``nn.Sequential``, innermost first; a sequence left with one module becomes that module."""
    for name, child in module.named_children():
        _rewrite(child)
        if isinstance(child, nn.Sequential) and len(child) == 1:
            setattr(module, name, child[0])
    if isinstance(module, nn.Sequential):
        _fuse_sequence(module)


def _fuse_sequence(sequence: nn.Sequential) -> None:
    items = []
    for name, child in sequence.named_children():
        if isinstance(child, _DROPOUT):
            continue
        if isinstance(child, _SeparableConvNd):
            items.extend((f"{name}_{step}", fused) for step, fused in zip(("depthwise", "pointwise"),
                                                                           _separable_steps(child)))
            continue
        if isinstance(child, _SpatialSeparableConvNd) and (steps := _spatial_steps(child)) is not None:
            items.extend((f"{name}_axis{axis}", fused) for axis, fused in enumerate(steps))
            continue
        fused = _as_fused(child)
        items.append((name, fused if fused is not None else child))
    merged = []
    for name, child in items:
        previous = merged[-1][1] if merged else None
        if isinstance(previous, FusedConv) and previous.activation == "none":
            if _foldable_norm(child, previous.weight.shape[0]):
                previous.weight, previous.bias = fold_batch_norm(previous.weight, previous.bias, child)
                continue
            activation = activation_of(child)
            if activation is not None:
                previous.activation, previous.alpha = activation
                continue
        merged.append((name, child))
    paired = []  # a depthwise step then a pointwise one, or a temporal then a spatial one (EEGNet): one module
    for name, child in merged:
        previous = paired[-1][1] if paired else None
        if isinstance(previous, FusedConv) and isinstance(child, FusedConv) and previous.kind == "depthwise" \
                and child.kind == "pointwise":
            paired[-1] = (paired[-1][0], FusedSeparable(previous, child))
        elif _temporal_then_spatial(previous, child):
            paired[-1] = (paired[-1][0], FusedTemporalSpatial(previous, child))
        else:
            paired.append((name, child))
    for name in list(sequence._modules):
        del sequence._modules[name]
    for name, child in paired:
        sequence.add_module(name, child)


def _fuse_residuals(module: nn.Module) -> None:
    """Each residual block whose last step is a pointwise one without an activation of its own becomes a
    :class:`FusedResidual`. A block says it is one with ``residual_parts()``: ``(steps, shortcut, activation)``,
    meaning ``forward(x) == activation(shortcut(x) + steps[-1](...steps[0](x)))`` (``shortcut`` and
    ``activation`` None: identities), or None where it adds nothing (sepconv's MobileNetV2 and X3D blocks)."""
    for name, child in module.named_children():
        _fuse_residuals(child)
        fused = _as_residual(child)
        if fused is not None:
            setattr(module, name, fused)


def _as_residual(block: nn.Module) -> FusedResidual | None:
    parts = block.residual_parts() if callable(getattr(block, "residual_parts", None)) else None
    if parts is None:
        return None
    steps, shortcut, activation = parts
    activation = ("none", 1.0) if activation is None else activation_of(activation)
    main = nn.Sequential(*steps)
    parent, last = main, main[-1] if len(main) else None
    while isinstance(last, nn.Sequential) and len(last):
        parent, last = last, last[-1]
    pointwise = last.pointwise if isinstance(last, FusedSeparable) else last
    if activation is None or not (isinstance(pointwise, FusedConv) and pointwise.kind == "pointwise"
                                  and pointwise.activation == "none"):
        return None
    del parent[-1]
    pointwise.activation, pointwise.alpha = activation
    return FusedResidual(main, last, shortcut)


def _as_fused(module: nn.Module) -> FusedConv | None:
    """The :class:`FusedConv` of a convolution layer (no norm, no activation yet), or None for anything else."""
    if isinstance(module, _DepthwiseConvNd):
        return FusedConv("depthwise", module.weight, module.bias, module.stride, module.padding, module.dilation,
                         module.in_channels, module.padding_mode)
    if isinstance(module, _PointwiseConvNd):
        rank = module.weight.ndim - 2
        return FusedConv("pointwise", module.weight, module.bias, (1,) * rank, 0, (1,) * rank, 1)
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        padding = module.padding if isinstance(module, _SepconvConv) or isinstance(module.padding, str) \
            else tuple(module.padding)
        rank = module.weight.ndim - 2
        if module.groups == module.in_channels and module.weight.shape[1] == 1:
            kind = "depthwise"
        elif module.kernel_size == (1,) * rank and module.stride == (1,) * rank and module.groups == 1 \
                and padding in (0, "valid", (0,) * rank, "same") and module.dilation == (1,) * rank:
            kind = "pointwise"
        else:
            kind = "conv"
        return FusedConv(kind, module.weight, module.bias, module.stride, padding, module.dilation, module.groups,
                         module.padding_mode)
    return None


def _separable_steps(layer: _SeparableConvNd) -> tuple[FusedConv, FusedConv]:
    weight, bias = layer.depthwise_weight, layer.depthwise_bias
    if layer.norm is not None:
        if not _foldable_norm(layer.norm, weight.shape[0]):
            raise ValueError(f"optimize_for_inference folds only batch norms between a separable layer's steps; "
                             f"got norm={layer.norm!r}")
        weight, bias = fold_batch_norm(weight, bias, layer.norm)
    activation = ("none", 1.0) if layer.activation is None else activation_of(layer.activation)
    if activation is None:
        raise ValueError(f"optimize_for_inference cannot fuse the activation {layer.activation!r} of a separable "
                         "layer")
    rank = weight.ndim - 2
    depthwise = FusedConv("depthwise", weight, bias, layer.stride, layer.padding, layer.dilation, layer.in_channels,
                          layer.padding_mode, *activation)
    pointwise = FusedConv("pointwise", layer.pointwise_weight, layer.bias, (1,) * rank, 0, (1,) * rank, 1)
    return depthwise, pointwise


def _spatial_steps(layer: _SpatialSeparableConvNd) -> list[FusedConv] | None:
    """A spatially separable layer as one :class:`FusedConv` per axis (a norm and activation between the steps
    folded and fused into the step before them), or None where one of those cannot be."""
    rank = len(layer.factors)
    between = ("none", 1.0) if layer.activation is None else activation_of(layer.activation)
    if between is None or any(not _foldable_norm(norm, norm.num_features) for norm in layer.norms):
        return None
    steps, channels = [], layer.in_channels
    for axis, factor in enumerate(layer.factors):
        def only(value, rest, axis=axis):
            return tuple(value if a == axis else rest for a in range(rank))
        weight = factor.reshape(*factor.shape[:2], *only(factor.shape[2], 1))
        bias = layer.bias if axis == rank - 1 else None
        activation = ("none", 1.0)
        if axis < rank - 1:
            if len(layer.norms):
                weight, bias = fold_batch_norm(weight, bias, layer.norms[axis])
            activation = between
        groups = channels // factor.shape[1]
        kind = "depthwise" if groups == channels and factor.shape[1] == 1 else "conv"
        steps.append(FusedConv(kind, weight, bias, only(layer.stride[axis], 1), only(layer.padding[axis], (0, 0)),
                               only(layer.dilation[axis], 1), groups, layer.padding_mode, *activation))
        channels = factor.shape[0]
    return steps


def _cast(model: nn.Module, dtype: torch.dtype) -> None:
    """Every weight and buffer in ``dtype``: the fused modules keep the layouts their kernels read."""
    for module in model.modules():
        if isinstance(module, FusedConv):
            module.cast(dtype)
    model.to(dtype)


def _foldable_norm(module: nn.Module, channels: int) -> bool:
    return (isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None
            and module.num_features == channels)


# --- layout --------------------------------------------------------------------------------------------------

_calls = threading.local()  # the dtype of each thread's input, from the entry to the exit of a bf16 copy


class _Entry:
    """The copy's forward pre-hook: refuses inputs of another floating dtype than the copy takes, in one line
    before any work, and converts inputs to the copy's layout and dtype (a class, so the model still pickles).
    A bf16 copy takes float32 input too."""

    def __init__(self, layout: str, dtype: torch.dtype | None):
        self.layout, self.dtype = layout, dtype

    def accepts(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16) if self.dtype == torch.bfloat16 else (self.dtype,)

    def __call__(self, module, args):
        if not (args and isinstance(args[0], torch.Tensor)):
            return None
        x = args[0]
        if self.dtype is not None and x.is_floating_point() and x.dtype not in self.accepts():
            raise ValueError(f"this optimised copy was made for {self.dtype} input; got {x.dtype} (make one for it "
                             f"with optimize_for_inference(model.to({x.dtype}), example_input.to({x.dtype})))")
        if self.dtype == torch.bfloat16:
            _calls.dtype = x.dtype
        converted = x.to(dtype=self.dtype if x.is_floating_point() and self.dtype else x.dtype,
                         memory_format=memory_format(self.layout, x.ndim) or torch.preserve_format)
        return None if converted is x else (converted, *args[1:])


def _exit(module, args, output):
    """A bf16 copy's forward hook: its output in the dtype of the input it was given."""
    dtype = getattr(_calls, "dtype", None)
    if isinstance(output, torch.Tensor) and output.is_floating_point() and dtype is not None:
        return output.to(dtype)
    return None


def _weights_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating dtype of the copy's weights, which its inputs must have."""
    tensors = [*model.parameters(), *model.buffers()]
    return next((t.dtype for t in tensors if t.is_floating_point()), None)


def _set_layout(model: nn.Module, layout: str) -> None:
    """Weights and the input in ``layout``: every 2-D and 3-D convolution then answers in it, end to end."""
    for module in model.modules():
        if isinstance(module, FusedConv):
            module.layout = layout
            if module.kind == "conv" and (target := memory_format(layout, module.weight.ndim)) is not None:
                module.weight = module.weight.contiguous(memory_format=target)
    for hook in [h for h in model._forward_pre_hooks.values() if isinstance(h, _Entry)]:
        hook.layout = layout
        return
    dtype = _weights_dtype(model)
    model.register_forward_pre_hook(_Entry(layout, dtype))
    if dtype == torch.bfloat16:
        model.register_forward_hook(_exit)


def _fastest_layout(model: nn.Module, example_input: torch.Tensor) -> str:
    """The layout in which ``model`` runs ``example_input`` fastest."""
    if memory_format("channels_last", example_input.ndim) is None:
        return "contiguous"

    def run(layout):
        def call():
            _set_layout(model, layout)
            model(example_input)
        return call

    with torch.inference_mode():
        # a layout's first call is mostly the kernels registry measuring its ops (seconds): timed, it made MobileNetV1
        # look outclassed in channels-last and run NCHW at half the speed
        for layout in MODEL_LAYOUTS:
            run(layout)()
        return fastest({layout: run(layout) for layout in MODEL_LAYOUTS})
