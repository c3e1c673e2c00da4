"""Dispatch-level counting: every convolution and matrix product as it runs, with its module and time.

:class:`OpCounter` is a ``TorchDispatchMode``: it sees the ATen ops a model actually runs, below
``nn.Module`` and autograd, so a convolution called functionally (``F.conv2d`` inside ``forward``), a
grouped or depthwise one, a matrix product and their backward ops are all counted from their real
argument shapes — nothing is guessed from class names.

Counted ops and their mult-adds (MACs; FLOPs are 2 x MACs), see :func:`sepconv.cost.conv_mult_adds`:

* ``convolution`` (and ``conv1d/2d/3d``, ``conv_transpose1d/2d/3d``, which reach the mode un-decomposed
  under ``torch.inference_mode``): ``numel(output) * C_in / groups * prod(k)``; transposed:
  ``numel(input) * C_out / groups * prod(k)``.
* ``convolution_backward``: the same count again for the input gradient and again for the weight
  gradient, each when requested. Both are dot products over ``C_in / groups * prod(k)`` (input gradient)
  or ``N * prod(out)`` (weight gradient) terms for each of their outputs; PyTorch's own
  ``FlopCounterMode`` leaves ``groups`` out of the weight gradient and so over-counts a grouped
  convolution's weight gradient ``groups`` times (a depthwise one ``C`` times).
* ``mm``, ``addmm``, ``bmm``, ``baddbmm``, ``linear``, ``matmul``: ``numel(output) * inner size``.

Bias additions (and ``convolution_backward``'s bias gradient, a sum) are not counted. Each op is
attributed to the innermost module running it: forward through module hooks, backward through
gradient hooks on each module's inputs and outputs (the scheme of ``torch.utils.module_tracker``, kept
as a stack so that the most recently entered module wins).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.graph import register_multi_grad_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .. import kernels
from ..cost import FULLY_CONNECTED, MATMUL, POINTWISE, SEPARABLE, conv_kind, conv_mult_adds

__all__ = ["OpCounter", "OpRecord"]

aten = torch.ops.aten


@dataclass(frozen=True)
class OpRecord:
    """One counted op as it ran.

    Attributes:
        module: qualified name of the innermost module running it (``""``: the model itself).
        op: the ATen op, e.g. ``"convolution"``, ``"convolution_backward"``, ``"addmm"``.
        backward: whether it ran in the backward pass.
        kind: as in :mod:`sepconv.cost` (``"depthwise conv"``, ``"fully connected"``, ...).
        input_shape, output_shape: of the op (a convolution's input as the op received it, padded if a
            padding mode needed a separate pad).
        kernel_size, groups: of a convolution; ``None`` for matrix products.
        macs: multiply-adds.
        bytes: bytes of every tensor read and written, once each.
        parameters: ``{data pointer: elements}`` of the model's parameters the op reads directly.
        tensors: data pointers of its tensor arguments, which pair a backward op with its forward op.
        seconds: wall time of the op.
    """

    module: str
    op: str
    backward: bool
    kind: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    kernel_size: tuple[int, ...] | None
    groups: int | None
    macs: int
    bytes: int
    parameters: dict[int, int]
    tensors: frozenset[int]
    seconds: float


def _named_arguments(func, args, kwargs) -> dict:
    """The op's arguments by schema name, defaults filled in."""
    named = {}
    for position, argument in enumerate(func._schema.arguments):
        if position < len(args):
            named[argument.name] = args[position]
        elif argument.name in kwargs:
            named[argument.name] = kwargs[argument.name]
        elif argument.has_default_value():
            named[argument.name] = argument.default_value
    return named


def _convolution(func, named, output):
    """(kind, input_shape, output_shape, kernel_size, groups, macs) of a forward or backward convolution."""
    x, weight = named["input"], named["weight"]
    transposed = named.get("transposed", func.overloadpacket in _TRANSPOSED)
    groups = named["groups"]
    kernel_size = tuple(weight.shape[2:])
    in_channels = x.shape[-len(kernel_size) - 1]  # inputs may be unbatched under inference_mode
    if "output_mask" in named:  # convolution_backward: the input gradient and the weight gradient
        result_shape = named["grad_output"].shape
        products = sum(named["output_mask"][:2])
    else:
        result_shape, products = output.shape, 1
    macs = products * conv_mult_adds(weight.shape, x.shape if transposed else result_shape)
    return (conv_kind(in_channels, groups, kernel_size, transposed), tuple(x.shape), tuple(result_shape),
            kernel_size, groups, macs)


def _sepconv_depthwise(func, named, output):
    """sepconv's own depthwise ops (the C++ backend's ``torch.ops.sepconv.*``), counted like ``convolution``."""
    name = func.overloadpacket.__name__
    if name in ("depthwise_conv", "depthwise_conv_act"):
        x, weight, result = named["x"], named["weight"], output
    elif name == "depthwise_conv_input_grad":
        x, weight, result = output, named["weight"], named["grad_out"]
    else:  # depthwise_conv_weight_grad
        x, weight, result = named["x"], output, named["grad_out"]
    kernel_size, channels = tuple(weight.shape[2:]), x.shape[1]
    return (conv_kind(channels, channels, kernel_size, False), tuple(x.shape), tuple(result.shape), kernel_size,
            channels, conv_mult_adds(weight.shape, result.shape))


def _sepconv_fused(func, named, output):
    """sepconv's fused inference ops: a pointwise convolution, or a whole depthwise separable one."""
    x, weight = named["x"], named["weight"]
    if func.overloadpacket.__name__ == "pointwise_conv_act":
        return (POINTWISE, tuple(x.shape), tuple(output.shape), tuple(weight.shape[2:]), 1,
                conv_mult_adds(weight.shape, output.shape))
    hidden_shape = (output.shape[0], weight.shape[0], *output.shape[2:])
    macs = conv_mult_adds(weight.shape, hidden_shape) + conv_mult_adds(named["pw_weight"].shape, output.shape)
    return SEPARABLE, tuple(x.shape), tuple(output.shape), tuple(weight.shape[2:]), x.shape[1], macs


def _matrix_product(left_operand: str):
    def count(func, named, output):
        left = named[left_operand]
        return MATMUL, tuple(left.shape), tuple(output.shape), None, None, output.numel() * left.shape[-1]
    return count


_TRANSPOSED = {aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d}
_FORMULAS = {
    **{op: _convolution for op in (aten.convolution, aten._convolution, aten.convolution_backward, aten.conv1d,
                                   aten.conv2d, aten.conv3d, *_TRANSPOSED)},
    aten.mm: _matrix_product("self"), aten.matmul: _matrix_product("self"), aten.bmm: _matrix_product("self"),
    aten.addmm: _matrix_product("mat1"), aten.baddbmm: _matrix_product("batch1"), aten.linear: _matrix_product("input"),
    **{op: _sepconv_depthwise for op in (torch.ops.sepconv.depthwise_conv, torch.ops.sepconv.depthwise_conv_input_grad,
                                         torch.ops.sepconv.depthwise_conv_weight_grad,
                                         torch.ops.sepconv.depthwise_conv_act)},
    torch.ops.sepconv.pointwise_conv_act: _sepconv_fused, torch.ops.sepconv.separable_conv_act: _sepconv_fused,
}


def _tensors(values) -> list[torch.Tensor]:
    return [value for value in tree_flatten(values)[0] if isinstance(value, torch.Tensor)]


def synchronize(tensors) -> None:
    """Wait for an accelerator to finish, so that wall time measures the work (a no-op on the CPU)."""
    for tensor in tensors:
        if tensor.device.type != "cpu":
            torch.accelerator.synchronize(tensor.device)
            return


class _ModuleStack:
    """Which module is running: forward through module hooks, backward through gradient hooks.

    In backward a module is entered when the gradients of its outputs are ready and left when those of
    its inputs are; a module whose inputs need no gradient (the first layer) is never left, so the
    most recently entered module, the end of the list, is the one running.
    """

    def __init__(self, model: nn.Module):
        self.active: list[str] = []
        self._handles = []
        for name, module in model.named_modules():
            self._handles.append(module.register_forward_pre_hook(functools.partial(self._enter_forward, name)))
            self._handles.append(module.register_forward_hook(functools.partial(self._exit_forward, name)))

    @property
    def current(self) -> str:
        return self.active[-1] if self.active else ""

    def _enter_forward(self, name, module, args) -> None:
        self.active.append(name)
        self._when_gradients(args, functools.partial(self._leave, name))

    def _exit_forward(self, name, module, args, output) -> None:
        self._leave(name)
        self._when_gradients(output, functools.partial(self.active.append, name))

    def _when_gradients(self, values, callback) -> None:
        needing = [tensor for tensor in _tensors(values) if tensor.requires_grad]
        if needing:
            self._handles.append(register_multi_grad_hook(needing, lambda gradients: callback()))

    def _leave(self, name: str) -> None:
        if name in self.active:
            del self.active[len(self.active) - 1 - self.active[::-1].index(name)]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class OpCounter(TorchDispatchMode):
    """Record every convolution and matrix product that runs inside the ``with`` block.

    >>> import torch, sepconv
    >>> layer = sepconv.SeparableConv2d(8, 16, 3, padding=1, bias=False)
    >>> with sepconv.kernels.use_kernels("reference"), OpCounter(layer) as counter:
    ...     layer(torch.randn(2, 8, 5, 5)).sum().backward()
    >>> for record in counter.records:
    ...     print(record.op, record.kind, record.macs, "backward" if record.backward else "forward")
    convolution depthwise conv 3600 forward
    convolution pointwise conv 6400 forward
    convolution_backward pointwise conv 12800 backward
    convolution_backward depthwise conv 3600 backward

    The last backward step needs no input gradient (the input does not require one): one product. On the C++
    backend the depthwise steps are ``depthwise_conv`` and ``depthwise_conv_weight_grad``, with the same counts.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.records: list[OpRecord] = []
        self._parameters = {parameter.data_ptr(): parameter.numel() for parameter in model.parameters()}
        self._modules: _ModuleStack | None = None

    def __enter__(self):
        self._modules = _ModuleStack(self.model)
        self._no_timing = kernels.registry.measuring_suspended()  # kernels="auto" would time calls this mode sees
        self._no_timing.__enter__()
        return super().__enter__()

    def __exit__(self, *exc_info):
        try:
            return super().__exit__(*exc_info)
        finally:
            self._no_timing.__exit__(*exc_info)
            self._modules.close()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        formula = _FORMULAS.get(func.overloadpacket)
        if formula is None:
            return func(*args, **kwargs)
        inputs = _tensors((args, kwargs))
        synchronize(inputs)
        start = time.perf_counter()
        output = func(*args, **kwargs)
        synchronize(inputs)
        seconds = time.perf_counter() - start
        kind, input_shape, output_shape, kernel_size, groups, macs = formula(func, _named_arguments(func, args, kwargs),
                                                                             output)
        parameters = {t.data_ptr(): t.numel() for t in inputs if self._parameters.get(t.data_ptr()) == t.numel()}
        if kind == MATMUL and parameters:
            kind = FULLY_CONNECTED
        # ModuleTracker.is_bw reads the same flag: whether the autograd engine is running a backward pass.
        backward = torch._C._current_graph_task_id() != -1
        moved = sum(t.numel() * t.element_size() for t in inputs + _tensors(output))
        self.records.append(OpRecord(self._modules.current, func.overloadpacket.__name__, backward, kind, input_shape,
                                     output_shape, kernel_size, groups, macs, moved, parameters,
                                     frozenset(t.data_ptr() for t in inputs), seconds))
        return output
