"""sepconv's operators in PyTorch's dispatcher: ``torch.ops.sepconv.*``.

Three ops make a depthwise convolution (zero padding; ``padding`` is the flat ``(before_0, after_0, ...)``
list of :attr:`sepconv.geometry.ConvGeometry.flat_padding`; inputs ``(N, C, *spatial)`` with 1 or 2 spatial
dims; weight ``(C * M, 1, *kernel_size)``):

* ``depthwise_conv(x, weight, bias, stride, padding, dilation)``;
* ``depthwise_conv_input_grad(grad_out, weight, input_size, stride, padding, dilation)``;
* ``depthwise_conv_weight_grad(x, grad_out, weight_size, stride, padding, dilation)``.

Three more serve inference (:mod:`sepconv.inference`), forward only, with the bias and an activation (one of
:data:`sepconv.activations.FUSED`, ``alpha`` its parameter) applied in the kernel's epilogue:

* ``depthwise_conv_act(x, weight, bias, stride, padding, dilation, activation, alpha)``;
* ``pointwise_conv_act(x, weight, bias, activation, alpha, residual=None)`` (weight ``(C_out, C_in, 1, ...)``);
* ``separable_conv_act(x, weight, bias, stride, padding, dilation, activation, alpha, pw_weight, pw_bias,
  pw_activation, pw_alpha, residual=None)``: the two in one kernel, the depthwise output kept in cache.

``residual`` (a tensor of the output's shape: a residual block's shortcut) is added before the (last) activation:
``activation(conv(x) + bias + residual)``.

Their default implementation is the reference (PyTorch's convolution, then the activation).

Every op has a fake implementation (shapes only, so ``torch.compile``/``torch.export`` trace it as one node). The
three depthwise ops also have registered autograd written with themselves, so gradients of any order stay on them,
and vmap (the op once per batch entry); the fused ops have neither (inference only). The backends register the
device implementations (the C++ CPU backend: :mod:`sepconv.kernels.cpu`).
"""

from __future__ import annotations

import torch

from .. import geometry
from . import reference

_LIBRARY = torch.library.Library("sepconv", "DEF")  # noqa: the library must live as long as the ops
_ARGS = "SymInt[] stride, SymInt[] padding, SymInt[] dilation"
_LIBRARY.define(f"depthwise_conv(Tensor x, Tensor weight, Tensor? bias, {_ARGS}) -> Tensor")
_LIBRARY.define(f"depthwise_conv_input_grad(Tensor grad_out, Tensor weight, SymInt[] input_size, {_ARGS}) -> Tensor")
_LIBRARY.define(f"depthwise_conv_weight_grad(Tensor x, Tensor grad_out, SymInt[] weight_size, {_ARGS}) -> Tensor")

depthwise_conv = torch.ops.sepconv.depthwise_conv.default
depthwise_conv_input_grad = torch.ops.sepconv.depthwise_conv_input_grad.default
depthwise_conv_weight_grad = torch.ops.sepconv.depthwise_conv_weight_grad.default
NAMES = ("sepconv::depthwise_conv", "sepconv::depthwise_conv_input_grad", "sepconv::depthwise_conv_weight_grad")

_LIBRARY.define(f"depthwise_conv_act(Tensor x, Tensor weight, Tensor? bias, {_ARGS}, str activation, float alpha) "
                "-> Tensor")
_LIBRARY.define("pointwise_conv_act(Tensor x, Tensor weight, Tensor? bias, str activation, float alpha, "
                "Tensor? residual=None) -> Tensor")
_LIBRARY.define(f"separable_conv_act(Tensor x, Tensor weight, Tensor? bias, {_ARGS}, str activation, float alpha, "
                "Tensor pw_weight, Tensor? pw_bias, str pw_activation, float pw_alpha, Tensor? residual=None) "
                "-> Tensor")
depthwise_conv_act = torch.ops.sepconv.depthwise_conv_act.default
pointwise_conv_act = torch.ops.sepconv.pointwise_conv_act.default
separable_conv_act = torch.ops.sepconv.separable_conv_act.default
INFERENCE_NAMES = ("sepconv::depthwise_conv_act", "sepconv::pointwise_conv_act", "sepconv::separable_conv_act")


def resolve(input_size, kernel_size, stride, padding, dilation) -> geometry.ConvGeometry:
    """The :class:`~sepconv.geometry.ConvGeometry` of an op call (its flat padding back into pairs)."""
    pairs = tuple((padding[2 * i], padding[2 * i + 1]) for i in range(len(stride)))
    return geometry.conv_geometry(input_size, kernel_size, stride, pairs, dilation)


# --- shapes ----------------------------------------------------------------------------------------

def _conv_output(x, weight, stride, padding, dilation, out_channels: int) -> torch.Tensor:
    """The empty output of a depthwise step (and what follows it) on ``x``: shape and PyTorch's layout."""
    g = resolve(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    return torch.empty((x.shape[0], out_channels, *g.output_size), dtype=x.dtype, device=x.device,
                       memory_format=output_layout(x, weight))


@torch.library.register_fake("sepconv::depthwise_conv")
def _(x, weight, bias, stride, padding, dilation):
    return _conv_output(x, weight, stride, padding, dilation, weight.shape[0])


@torch.library.register_fake("sepconv::depthwise_conv_input_grad")
def _(grad_out, weight, input_size, stride, padding, dilation):
    return torch.empty(input_size, dtype=grad_out.dtype, device=grad_out.device,
                       memory_format=output_layout(grad_out, weight))


@torch.library.register_fake("sepconv::depthwise_conv_weight_grad")
def _(x, grad_out, weight_size, stride, padding, dilation):
    return x.new_empty(weight_size)


@torch.library.register_fake("sepconv::depthwise_conv_act")
def _(x, weight, bias, stride, padding, dilation, activation, alpha):
    return _conv_output(x, weight, stride, padding, dilation, weight.shape[0])


@torch.library.register_fake("sepconv::pointwise_conv_act")
def _(x, weight, bias, activation, alpha, residual=None):
    return torch.empty((x.shape[0], weight.shape[0], *x.shape[2:]), dtype=x.dtype, device=x.device,
                       memory_format=output_layout(x, x))


@torch.library.register_fake("sepconv::separable_conv_act")
def _(x, weight, bias, stride, padding, dilation, activation, alpha, pw_weight, pw_bias, pw_activation, pw_alpha,
      residual=None):
    return _conv_output(x, weight, stride, padding, dilation, pw_weight.shape[0])


@torch.library.impl("sepconv::depthwise_conv_act", "CompositeExplicitAutograd")
def _(x, weight, bias, stride, padding, dilation, activation, alpha):
    g = resolve(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    return reference.depthwise_conv_act(x, weight, bias, g, "zeros", activation, alpha)


@torch.library.impl("sepconv::pointwise_conv_act", "CompositeExplicitAutograd")
def _(x, weight, bias, activation, alpha, residual=None):
    return reference.pointwise_conv_act(x, weight, bias, activation, alpha, residual)


@torch.library.impl("sepconv::separable_conv_act", "CompositeExplicitAutograd")
def _(x, weight, bias, stride, padding, dilation, activation, alpha, pw_weight, pw_bias, pw_activation, pw_alpha,
      residual=None):
    g = resolve(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    return reference.separable_conv_act(x, weight, bias, g, "zeros", activation, alpha, pw_weight, pw_bias,
                                        pw_activation, pw_alpha, residual)


CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}  # the channels-last format of each rank


def output_layout(t: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """PyTorch's convolutions answer a channels-last input or weight with a channels-last output (2-D and 3-D)."""
    if t.ndim in CHANNELS_LAST and (channels_last_like(t) or channels_last_like(weight)):
        return CHANNELS_LAST[t.ndim]
    return torch.contiguous_format


def channels_last_like(t: torch.Tensor) -> bool:
    """Whether ``t``'s strides order its dims as N, (D,) H, W, C (PyTorch's ``suggest_memory_format``)."""
    smallest = 0
    if t.stride(1) == 0:
        return False
    for dim in (1, *range(t.ndim - 1, 1, -1), 0):
        if t.shape[dim] == 0 or t.stride(dim) < smallest or (dim == 0 and smallest == t.stride(1)):
            return False
        smallest = t.stride(dim) * (t.shape[dim] if t.shape[dim] > 1 else 1)
    return True


# --- gradients: each op is linear in each input, so the adjoints are the other two ops -----------------------

class Gradients:
    """The three ops over given implementations, as autograd.Functions whose backward formulas are the same three
    Functions (so gradients of any order stay on them) and which torch.func transforms accept (``grad``; ``vmap``
    runs one call per batch entry).

    ``Gradients(depthwise_conv, depthwise_conv_input_grad, depthwise_conv_weight_grad)`` over the ops is what the
    ops register as their autograd; a backend's eager path builds one over its kernels, skipping the dispatcher's
    round trips, which cost as much as a small layer's kernel.
    """

    def __init__(self, forward, input_grad, weight_grad):
        self.conv = self._function("depthwise_conv", forward, self.conv_backward)
        self.input_grad = self._function("depthwise_conv_input_grad", input_grad, self.input_grad_backward)
        self.weight_grad = self._function("depthwise_conv_weight_grad", weight_grad, self.weight_grad_backward)
        self._kernels = (forward, input_grad, weight_grad)

    def _call(self, index: int, *args):
        """An op inside a backward formula: through its Function where the result may be differentiated again."""
        function = (self.conv, self.input_grad, self.weight_grad)[index]
        return function.apply(*args) if torch.is_grad_enabled() else self._kernels[index](*args)

    def conv_backward(self, ctx, grad):
        x, weight = ctx.saved_tensors
        bias, stride, padding, dilation = ctx.args
        if ctx.needs_input_grad[0] and ctx.needs_input_grad[1]:
            # one copy for both kernels where the gradient is not laid out as they read it (a sum's is a broadcast)
            grad = grad.contiguous(memory_format=output_layout(x, weight))
        dx = self._call(1, grad, weight, x.shape, stride, padding, dilation) if ctx.needs_input_grad[0] else None
        dw = self._call(2, x, grad, weight.shape, stride, padding, dilation) if ctx.needs_input_grad[1] else None
        db = grad.sum(dim=[0, *range(2, grad.ndim)]) if bias is not None and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None

    def input_grad_backward(self, ctx, grad):
        grad_out, weight = ctx.saved_tensors
        _, stride, padding, dilation = ctx.args
        d_grad_out = self._call(0, grad, weight, None, stride, padding, dilation) if ctx.needs_input_grad[0] else None
        dw = self._call(2, grad, grad_out, weight.shape, stride, padding, dilation) if ctx.needs_input_grad[1] else None
        return d_grad_out, dw, None, None, None, None

    def weight_grad_backward(self, ctx, grad):
        x, grad_out = ctx.saved_tensors
        _, stride, padding, dilation = ctx.args
        dx = self._call(1, grad_out, grad, x.shape, stride, padding, dilation) if ctx.needs_input_grad[0] else None
        d_grad_out = self._call(0, x, grad, None, stride, padding, dilation) if ctx.needs_input_grad[1] else None
        return dx, d_grad_out, None, None, None, None

    @staticmethod
    def save(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:2])
        ctx.args = inputs[2:]

    @classmethod
    def _function(cls, name, kernel, backward):
        def forward(*args):
            return kernel(*args)

        def vmap(info, in_dims, *args):
            return _loop(function.apply, info.batch_size, in_dims, args), 0

        function = type(name, (torch.autograd.Function,), {
            "forward": staticmethod(forward), "setup_context": staticmethod(cls.save),
            "backward": staticmethod(backward), "vmap": staticmethod(vmap)})
        return function


def _loop(call, batch_size, in_dims, args):
    """``call`` once per entry of the vmapped dims, stacked."""
    outputs = []
    for i in range(batch_size):
        outputs.append(call(*[a.select(d, i) if isinstance(a, torch.Tensor) and d is not None else a
                              for a, d in zip(args, in_dims)]))
    return torch.stack(outputs)


_OPS = Gradients(depthwise_conv, depthwise_conv_input_grad, depthwise_conv_weight_grad)
for _name, _backward in zip(NAMES, (_OPS.conv_backward, _OPS.input_grad_backward, _OPS.weight_grad_backward)):
    torch.library.register_autograd(_name, _backward, setup_context=Gradients.save)

for _name, _op in zip(NAMES, (depthwise_conv, depthwise_conv_input_grad, depthwise_conv_weight_grad)):
    torch.library.register_vmap(_name, lambda info, in_dims, *args, op=_op: (_loop(op, info.batch_size, in_dims, args), 0))

# torch.autocast("cpu") runs the forward ops in bf16 (its default dtype on CPU), as it does PyTorch's convolutions;
# sepconv's faces cast the same way where they skip the dispatcher.
for _name in (NAMES[0], *INFERENCE_NAMES):
    torch.library.register_autocast(_name, "cpu", torch.bfloat16)
