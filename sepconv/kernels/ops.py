"""sepconv's operators in PyTorch's dispatcher: ``torch.ops.sepconv.*``.

Three ops make a depthwise convolution (zero padding; ``padding`` is the flat ``(before_0, after_0, ...)``
list of :attr:`sepconv.geometry.ConvGeometry.flat_padding`; inputs ``(N, C, *spatial)`` with 1 or 2 spatial
dims; weight ``(C * M, 1, *kernel_size)``):

* ``depthwise_conv(x, weight, bias, stride, padding, dilation)``;
* ``depthwise_conv_input_grad(grad_out, weight, input_size, stride, padding, dilation)``;
* ``depthwise_conv_weight_grad(x, grad_out, weight_size, stride, padding, dilation)``.

Each has a fake implementation (shapes only, so ``torch.compile``/``torch.export`` trace them as one node)
and registered autograd written with the three ops themselves, so gradients of any order stay on them. The
backends register the device implementations (the C++ CPU backend: :mod:`sepconv.kernels.cpu`); vmap runs
an op once per batch entry.
"""

from __future__ import annotations

import torch

from .. import geometry

_LIBRARY = torch.library.Library("sepconv", "DEF")  # noqa: the library must live as long as the ops
_ARGS = "SymInt[] stride, SymInt[] padding, SymInt[] dilation"
_LIBRARY.define(f"depthwise_conv(Tensor x, Tensor weight, Tensor? bias, {_ARGS}) -> Tensor")
_LIBRARY.define(f"depthwise_conv_input_grad(Tensor grad_out, Tensor weight, SymInt[] input_size, {_ARGS}) -> Tensor")
_LIBRARY.define(f"depthwise_conv_weight_grad(Tensor x, Tensor grad_out, SymInt[] weight_size, {_ARGS}) -> Tensor")

depthwise_conv = torch.ops.sepconv.depthwise_conv.default
depthwise_conv_input_grad = torch.ops.sepconv.depthwise_conv_input_grad.default
depthwise_conv_weight_grad = torch.ops.sepconv.depthwise_conv_weight_grad.default
NAMES = ("sepconv::depthwise_conv", "sepconv::depthwise_conv_input_grad", "sepconv::depthwise_conv_weight_grad")


def resolve(input_size, kernel_size, stride, padding, dilation) -> geometry.ConvGeometry:
    """The :class:`~sepconv.geometry.ConvGeometry` of an op call (its flat padding back into pairs)."""
    pairs = tuple((padding[2 * i], padding[2 * i + 1]) for i in range(len(stride)))
    return geometry.conv_geometry(input_size, kernel_size, stride, pairs, dilation)


# --- shapes ----------------------------------------------------------------------------------------

@torch.library.register_fake("sepconv::depthwise_conv")
def _(x, weight, bias, stride, padding, dilation):
    g = resolve(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    return torch.empty((x.shape[0], weight.shape[0], *g.output_size), dtype=x.dtype, device=x.device,
                       memory_format=_layout(x, weight))


@torch.library.register_fake("sepconv::depthwise_conv_input_grad")
def _(grad_out, weight, input_size, stride, padding, dilation):
    return torch.empty(input_size, dtype=grad_out.dtype, device=grad_out.device, memory_format=_layout(grad_out, weight))


@torch.library.register_fake("sepconv::depthwise_conv_weight_grad")
def _(x, grad_out, weight_size, stride, padding, dilation):
    return x.new_empty(weight_size)


def _layout(t: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """PyTorch's convolutions answer a channels-last 2-D input or weight with a channels-last output."""
    if t.ndim == 4 and (channels_last_like(t) or channels_last_like(weight)):
        return torch.channels_last
    return torch.contiguous_format


def channels_last_like(t: torch.Tensor) -> bool:
    """Whether ``t``'s strides order its dims as N, H, W, C (PyTorch's ``suggest_memory_format``)."""
    smallest = 0
    if t.stride(1) == 0:
        return False
    for dim in (1, 3, 2, 0):
        if t.shape[dim] == 0 or t.stride(dim) < smallest or (dim == 0 and smallest == t.stride(1)):
            return False
        smallest = t.stride(dim) * (t.shape[dim] if t.shape[dim] > 1 else 1)
    return True


# --- gradients: each op is linear in each input, so the adjoints are the other two ops -----------------------
# The backward formulas call the ops through autograd.Functions (below), which torch.func transforms accept
# (``grad``, and ``vmap`` of it), so gradients of any order work under them too.

def _save(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:2])
    ctx.args = inputs[2:]


def _depthwise_conv_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    bias, stride, padding, dilation = ctx.args
    dx = InputGrad.apply(grad, weight, x.shape, stride, padding, dilation) if ctx.needs_input_grad[0] else None
    dw = WeightGrad.apply(x, grad, weight.shape, stride, padding, dilation) if ctx.needs_input_grad[1] else None
    db = grad.sum(dim=[0, *range(2, grad.ndim)]) if bias is not None and ctx.needs_input_grad[2] else None
    return dx, dw, db, None, None, None


def _input_grad_backward(ctx, grad):
    grad_out, weight = ctx.saved_tensors
    _, stride, padding, dilation = ctx.args
    d_grad_out = DepthwiseConv.apply(grad, weight, None, stride, padding, dilation) if ctx.needs_input_grad[0] else None
    dw = WeightGrad.apply(grad, grad_out, weight.shape, stride, padding, dilation) if ctx.needs_input_grad[1] else None
    return d_grad_out, dw, None, None, None, None


def _weight_grad_backward(ctx, grad):
    x, grad_out = ctx.saved_tensors
    _, stride, padding, dilation = ctx.args
    dx = InputGrad.apply(grad_out, grad, x.shape, stride, padding, dilation) if ctx.needs_input_grad[0] else None
    d_grad_out = DepthwiseConv.apply(x, grad, None, stride, padding, dilation) if ctx.needs_input_grad[1] else None
    return dx, d_grad_out, None, None, None, None


def _function(op, backward):
    """``op`` with ``backward`` as an autograd.Function (vmap through the op's own rule)."""
    def forward(*args):
        return op(*args)

    return type(op.name().split("::")[1], (torch.autograd.Function,), {
        "generate_vmap_rule": True,
        "forward": staticmethod(forward),
        "setup_context": staticmethod(_save),
        "backward": staticmethod(backward)})


DepthwiseConv = _function(depthwise_conv, _depthwise_conv_backward)
InputGrad = _function(depthwise_conv_input_grad, _input_grad_backward)
WeightGrad = _function(depthwise_conv_weight_grad, _weight_grad_backward)

torch.library.register_autograd("sepconv::depthwise_conv", _depthwise_conv_backward, setup_context=_save)
torch.library.register_autograd("sepconv::depthwise_conv_input_grad", _input_grad_backward, setup_context=_save)
torch.library.register_autograd("sepconv::depthwise_conv_weight_grad", _weight_grad_backward, setup_context=_save)


# --- vmap: one call per batch entry (the kernels take a batch dimension of their own) -------------------------

def _vmap_by_loop(op):
    def rule(info, in_dims, *args):
        outputs = []
        for i in range(info.batch_size):
            call = [a.select(d, i) if isinstance(a, torch.Tensor) and d is not None else a for a, d in zip(args, in_dims)]
            outputs.append(op(*call))
        return torch.stack(outputs), 0
    return rule


for _name, _op in zip(NAMES, (depthwise_conv, depthwise_conv_input_grad, depthwise_conv_weight_grad)):
    torch.library.register_vmap(_name, _vmap_by_loop(_op))
