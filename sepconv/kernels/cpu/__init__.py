"""The C++ CPU backend: depthwise, pointwise, fused separable and batch-norm kernels compiled on the user's machine.

The sources of this folder are built on first use or by ``sepconv build`` (:mod:`.build`: ``-O3`` for the host's
instruction set, said on stderr, cached per CPU, so later processes load them in well under a second) and registered
as the CPU implementation of the ``torch.ops.sepconv`` ops (:mod:`..ops`). Its threads are PyTorch's own
(``at::parallel_for``). Where the build fails (no compiler, no ninja), sepconv warns once, naming the cause and the
fix, and every call takes the reference.

Covered (:func:`supports`): 1-D and 2-D depthwise convolutions, float32, float64 and bfloat16 (stored in bf16,
computed in float32, as under ``torch.autocast``), any kernel size, stride, dilation and depth multiplier, any
padding mode (others than zeros padded first), contiguous and channels-last inputs on CPU, with gradients; the fused
inference ops in the same dtypes; 3-D depthwise convolutions (on the channels-last kernels, an NCDHW input through
a copy, a depth multiplier M through the input with each channel repeated M times) and 3-D pointwise ones;
``batch_norm_act`` on channels-last (2-D or 3-D) float32.
"""

from __future__ import annotations

import contextlib
import glob
import os
import threading
import warnings

import torch

from ..._memo import memoised
from ... import activations
from .. import ops, reference, registry
from . import build

NAME = "cpu"
_FOLDER = os.path.dirname(os.path.abspath(__file__))
KERNELS = build.Extension("sepconv_cpu", tuple(sorted(glob.glob(os.path.join(_FOLDER, "*.cpp")))),
                          tuple(sorted(glob.glob(os.path.join(_FOLDER, "*.h")))))
_lock = threading.Lock()
_module = None
_failure: str | None = None


def _build():
    return build.load_or_build(KERNELS)


def load():
    """The compiled extension (built on the first call of the process), or None if it cannot be built."""
    global _module, _failure
    if _module is not None or _failure is not None:
        return _module
    with _lock:
        if _module is None and _failure is None:
            try:
                _module = _build()
                _register()
            except Exception as error:  # a compiler error, no ninja, no headers: all end on the reference
                _failure = build.cause(error)
                warnings.warn(f"sepconv: the C++ CPU kernels could not be built ({_failure}); depthwise "
                              "convolutions run on PyTorch's own kernels. Install a C++ compiler (g++ or clang) and "
                              "ninja (`pip install ninja`), or set SEPCONV_KERNELS=reference to silence this.",
                              RuntimeWarning, stacklevel=3)
    return _module


@torch.compiler.assume_constant_result
def _loaded_outside_the_graph() -> bool:
    """Dynamo runs this as plain Python and keeps the answer: a first build or load inside a compiled region."""
    return load() is not None


@contextlib.contextmanager
def simulated_build(build):
    """For tests: inside the block the backend is as after a first build by ``build()`` (which returns the
    extension or raises, as a failed compiler does); afterwards it is as before."""
    global _module, _failure, _build
    saved = _module, _failure, _build
    _module, _failure, _build = None, None, build
    registry.changed()
    try:
        yield
    finally:
        _module, _failure, _build = saved
        registry.changed()


def available() -> bool:
    if torch.compiler.is_compiling():  # dynamo must neither trace the load nor guard on the module
        return _loaded_outside_the_graph()
    return load() is not None


def failure() -> str | None:
    """Why the build failed, if it did."""
    return _failure


def release_memory() -> int:
    """Free the blocks the kernels keep for large outputs between calls (up to 1 GiB); returns the bytes freed."""
    return load().release_memory() if available() else 0


def kernel_calls() -> int:
    """How many times a C++ kernel has run in this process (tests use it to see the fast path ran)."""
    return load().kernel_calls() if available() else 0


FLOATING = (torch.float32, torch.float64)
DTYPES = (*FLOATING, torch.bfloat16)  # the depthwise and fused kernels store bf16 and compute in float32


def _covered(*tensors, dtypes=FLOATING) -> bool:
    first = tensors[0]
    return all(t is None or (t.device.type == "cpu" and t.dtype == first.dtype) for t in tensors) \
        and first.dtype in dtypes


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def supports(op: str, *args) -> bool:
    """Whether the kernels cover this call of ``op`` (the face's arguments)."""
    x, weight, bias = args[:3]
    if op == "batch_norm_act":
        return (args[4] in activations.TRAINABLE and weight is not None and bias is not None and x.ndim in (4, 5)
                and x.dtype == torch.float32 and _covered(x, weight, bias) and x.shape[1] > 1 and x.numel() > x.shape[1]
                and x.is_contiguous(memory_format=ops.CHANNELS_LAST[x.ndim]) and not torch.compiler.is_compiling())
    if not (x.ndim in (3, 4, 5) and _covered(x, weight, bias, dtypes=DTYPES)):
        return False
    if op == "depthwise_conv":
        return True
    if op == "depthwise_conv_act":
        return not _wants_grad(x, weight, bias)  # forward-only kernels
    if op == "pointwise_conv_act":
        residual = args[5] if len(args) > 5 else None
        return (_fits(residual, (x.shape[0], weight.shape[0], *x.shape[2:]), x.dtype)
                and not _wants_grad(x, weight, bias, residual))
    if op == "separable_conv_act":
        pw_weight, pw_bias = args[7:9]
        residual = args[11] if len(args) > 11 else None
        return (x.ndim > 3 and weight.shape[0] == x.shape[1] and args[4] == "zeros" and ops.channels_last_like(x)
                and _covered(x, pw_weight, pw_bias, dtypes=DTYPES)
                and _fits(residual, (x.shape[0], pw_weight.shape[0], *args[3].output_size), x.dtype)
                and not _wants_grad(x, weight, bias, pw_weight, pw_bias, residual))
    return False


def _fits(residual, shape, dtype) -> bool:
    """A residual the kernels add in their epilogue: none, or a CPU tensor of the output's shape and dtype."""
    return residual is None or (residual.device.type == "cpu" and residual.dtype == dtype
                                and tuple(residual.shape) == tuple(shape))


def _zero_padded(x, geometry, padding_mode):
    """The kernels pad with zeros: other padding modes are applied first."""
    if padding_mode != "zeros" and geometry.padded:
        return reference.pad(x, geometry.padding, padding_mode), geometry.without_padding()
    return x, geometry


def depthwise_conv(x, weight, bias, geometry, padding_mode):
    """The depthwise convolution on the kernels, with gradients."""
    x, geometry = _zero_padded(x, geometry, padding_mode)
    args = (x, weight, bias, geometry.stride, geometry.flat_padding, geometry.dilation)
    if torch.compiler.is_compiling() or registry.dispatch_visible():
        return ops.depthwise_conv(*args)  # the op itself: one node in compiled graphs, seen by dispatch modes
    if _wants_grad(x, weight, bias) or not (_has_storage(x) and _has_storage(weight)):
        # the kernels with their gradients, without the dispatcher's round trips; functorch's wrappers (which
        # have no storage of their own) go this way too, since the Functions are what its transforms accept
        return _eager.conv.apply(*args)
    return _forward(*args)


def _has_storage(t: torch.Tensor) -> bool:
    try:
        t.data_ptr()
    except RuntimeError:
        return False
    return True


# --- the CPU implementations of the ops -----------------------------------------------------------------------
# Kernels take 4-D tensors (5-D for 3-D); a 1-D call is a 2-D one with a single row (an (N, L, C)-backed input stays
# channels-last through the view).

@memoised
def _kernel_args(input_size, kernel_size, stride, padding, dilation) -> list[int]:
    """The kernels' geometry integers (see geometry.h) for an op call's arguments: 12 for the last two axes (1-D: a
    single row), and for 3-D 7 more for depth."""
    if len(kernel_size) == 1:
        input_size, kernel_size, stride, padding, dilation = \
            (1, *input_size), (1, *kernel_size), (1, *stride), (0, 0, *padding), (1, *dilation)
    g = ops.resolve(input_size, kernel_size, stride, padding, dilation)
    (kh, kw), (oh, ow), (sh, sw), (dh, dw) = (v[-2:] for v in (g.kernel_size, g.output_size, g.stride, g.dilation))
    (pt, _), (pl, _) = g.padding[-2:]
    (fpt, _), (fpl, _) = g.flipped_padding[-2:]
    plane = [kh, kw, oh, ow, sh, sw, pt, pl, dh, dw, fpt, fpl]
    if len(kernel_size) == 2:
        return plane
    return [*plane, g.kernel_size[0], g.output_size[0], g.stride[0], g.padding[0][0], g.dilation[0],
            g.flipped_padding[0][0], g.input_size[0]]


def _planes(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(2) if t.ndim == 3 else t


def _back(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A kernel's 4-D result in ``like``'s rank: 1-D results are contiguous, as the ops' fake implementations say."""
    return t.squeeze(2).contiguous() if like.ndim == 3 else t


def _repeated(x: torch.Tensor, multiplier: int) -> torch.Tensor:
    """A 3-D input with each channel repeated ``multiplier`` times (channel c * M + m is channel c), in its layout: a
    depthwise convolution with a multiplier is one without on it, which is what the 3-D kernels compute."""
    if multiplier == 1:
        return x
    n, c, *spatial = x.shape
    out = torch.empty((n, c * multiplier, *spatial), dtype=x.dtype, memory_format=ops.output_layout(x, x))
    out.view(n, c, multiplier, *spatial).copy_(x.unsqueeze(2))
    return out


def _multiplier(weight_channels: int, channels: int, ndim: int) -> int:
    return weight_channels // channels if ndim == 5 else 1


def _forward(x, weight, bias, stride, padding, dilation):
    x = _repeated(x, _multiplier(weight.shape[0], x.shape[1], x.ndim))
    args = _kernel_args(x.shape[2:], weight.shape[2:], tuple(stride), tuple(padding), tuple(dilation))
    out = _module.forward(_planes(x), _planes(weight), bias, args)
    return _back(out, x)


def _input_grad(grad_out, weight, input_size, stride, padding, dilation):
    args = _kernel_args(tuple(input_size[2:]), weight.shape[2:], tuple(stride), tuple(padding), tuple(dilation))
    size = list(input_size) if len(input_size) != 3 else [input_size[0], input_size[1], 1, input_size[2]]
    multiplier = _multiplier(weight.shape[0], input_size[1], len(input_size))
    if multiplier > 1:  # the repeated input's gradient, summed over each channel's copies
        n, c, *spatial = input_size
        grad = _module.input_grad(grad_out, weight, [n, c * multiplier, *spatial], args)
        return grad.unflatten(1, (c, multiplier)).sum(2).contiguous(memory_format=ops.output_layout(grad, grad))
    return _back(_module.input_grad(_planes(grad_out), _planes(weight), size, args), grad_out)


def _weight_grad(x, grad_out, weight_size, stride, padding, dilation):
    x = _repeated(x, _multiplier(weight_size[0], x.shape[1], x.ndim))
    args = _kernel_args(x.shape[2:], tuple(weight_size[2:]), tuple(stride), tuple(padding), tuple(dilation))
    size = list(weight_size) if len(weight_size) != 3 else [weight_size[0], 1, 1, weight_size[2]]
    return _module.weight_grad(_planes(x), _planes(grad_out), size, args).reshape(weight_size)


def _depthwise_conv_act(x, weight, bias, stride, padding, dilation, activation, alpha, channels_last=False):
    x = _repeated(x, _multiplier(weight.shape[0], x.shape[1], x.ndim))
    args = _kernel_args(x.shape[2:], weight.shape[2:], tuple(stride), tuple(padding), tuple(dilation))
    code = activations.code(activation)
    return _back(_module.forward(_planes(x), _planes(weight), bias, args, code, alpha, channels_last and x.ndim == 4),
                 x)


def _depth_rows(t: torch.Tensor) -> torch.Tensor:
    """A 5-D tensor as a 4-D one whose rows are its (depth, row) pairs, in the same layout: a view where depth and
    height are one axis in memory (both layouts). ``flatten(2, 3)`` would give a batch of one the stride of a row,
    which reads as neither layout, and the kernel then took its planar path through two copies."""
    n, c, d, h, w = t.shape
    if not (d == 1 or h == 1 or t.stride(2) == h * t.stride(3)):
        t = t.contiguous(memory_format=ops.output_layout(t, t))
    return t.as_strided((n, c, d * h, w), (t.stride(0), t.stride(1), t.stride(3) if h > 1 else t.stride(2),
                                           t.stride(4)), t.storage_offset())


def _pointwise_conv_act(x, weight, bias, activation, alpha, residual=None):
    code = activations.code(activation)
    if x.ndim == 5:
        residual = None if residual is None else _depth_rows(residual)
        out = _module.pointwise(_depth_rows(x), weight.flatten(2, 3), bias, code, alpha, residual)
        return out.unflatten(2, x.shape[2:4])
    residual = None if residual is None else _planes(residual)
    return _back(_module.pointwise(_planes(x), _planes(weight), bias, code, alpha, residual), x)


def _separable_conv_act(x, weight, bias, stride, padding, dilation, activation, alpha, pw_weight, pw_bias,
                        pw_activation, pw_alpha, residual=None):
    args = _kernel_args(x.shape[2:], weight.shape[2:], tuple(stride), tuple(padding), tuple(dilation))
    codes = activations.code(activation), activations.code(pw_activation)
    out = _module.separable(_planes(x), _planes(weight), bias, args, codes[0], alpha, _planes(pw_weight), pw_bias,
                            codes[1], pw_alpha, None if residual is None else _planes(residual))
    return _back(out, x)


def _register() -> None:
    for name, function in zip(ops.NAMES + ops.INFERENCE_NAMES,
                              (_forward, _input_grad, _weight_grad, _depthwise_conv_act, _pointwise_conv_act,
                               _separable_conv_act)):
        torch.library.impl(name, "CPU", func=function)


# --- inference: the bias and activation in the kernels' epilogue (no gradients) --------------------------------

def _op_or_kernel(op, kernel, *args, **kernel_options):
    """The op itself where a compiled graph or a dispatch mode must see it, else the kernel without the
    dispatcher's round trip."""
    if torch.compiler.is_compiling() or registry.dispatch_visible():
        return op(*args)
    return kernel(*args, **kernel_options)


def depthwise_conv_act(x, weight, bias, geometry, padding_mode, activation, alpha=1.0, prefer_channels_last=False):
    x, geometry = _zero_padded(x, geometry, padding_mode)
    return _op_or_kernel(ops.depthwise_conv_act, _depthwise_conv_act, x, weight, bias, geometry.stride,
                         geometry.flat_padding, geometry.dilation, activation, alpha,
                         channels_last=prefer_channels_last)


def separable_conv_act(x, weight, bias, geometry, padding_mode, activation, alpha, pw_weight, pw_bias, pw_activation,
                       pw_alpha, residual=None):
    return _op_or_kernel(ops.separable_conv_act, _separable_conv_act, x, weight, bias, geometry.stride,
                         geometry.flat_padding, geometry.dilation, activation, alpha, pw_weight, pw_bias,
                         pw_activation, pw_alpha, residual)


def pointwise_conv_act(x, weight, bias, activation, alpha=1.0, residual=None):
    return _op_or_kernel(ops.pointwise_conv_act, _pointwise_conv_act, x, weight, bias, activation, alpha, residual)


_eager = ops.Gradients(_forward, _input_grad, _weight_grad)


# --- training: batch norm with the batch's statistics and the activation after it ------------------------------

class _BatchNormAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, code):
        y, mean, invstd = _module.batch_norm_act_forward(x, weight, bias, eps, code)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.code = code
        ctx.mark_non_differentiable(mean, invstd)
        return y, mean, invstd

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _mean, _invstd):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        dx, dweight, dbias = _module.batch_norm_act_backward(grad, x, weight, bias, mean, invstd, ctx.code)
        return dx, dweight, dbias, None, None


def batch_norm_act(x, weight, bias, eps: float, activation: str):
    """Forward and backward each in two passes over memory (see norm.cpp)."""
    return _BatchNormAct.apply(x, weight, bias, eps, activations.code(activation))
