"""``sepconv.profile``: run a model under :class:`~sepconv.profiling.counter.OpCounter` and report it."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ..cost import format_shape
from .counter import OpCounter, OpRecord
from .report import Profile, Row
from .._timer import samples
from .timing import Machine, measure_machine, median_and_iqr

__all__ = ["profile"]

_USER_ERRORS = (RuntimeError, ValueError, TypeError, IndexError)


class _NoGradient(ValueError):
    """backward=True on a model none of whose outputs needs a gradient (not an input that does not fit)."""


def _inputs(model: nn.Module, input_or_shape) -> tuple[torch.Tensor, ...]:
    """The model's positional inputs: a tensor, a sequence of tensors, or one random input of a shape."""
    if isinstance(input_or_shape, torch.Tensor):
        return (input_or_shape,)
    if isinstance(input_or_shape, Sequence) and input_or_shape:
        if all(isinstance(item, torch.Tensor) for item in input_or_shape):
            return tuple(input_or_shape)
        if all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in input_or_shape):
            parameter = next(model.parameters(), None)
            like = {} if parameter is None else {"dtype": parameter.dtype, "device": parameter.device}
            generator = torch.Generator().manual_seed(0)  # the same input every time; the global RNG untouched
            return (torch.randn(tuple(input_or_shape), generator=generator).to(**like),)
    raise ValueError(f"input_or_shape must be a tensor, a sequence of tensors or a shape of positive ints such as "
                     f"(1, 3, 224, 224); got {input_or_shape!r}")


def _run(model: nn.Module, inputs: tuple[torch.Tensor, ...], backward: bool) -> None:
    """One forward pass, and with ``backward`` the backward pass of every output that needs a gradient."""
    if not backward:
        with torch.no_grad():
            model(*inputs)
        return
    outputs = [t for t in tree_flatten(model(*inputs))[0] if isinstance(t, torch.Tensor) and t.requires_grad]
    if not outputs:
        raise _NoGradient("backward=True needs a model output that requires a gradient; this model's outputs do not "
                         "(are its parameters frozen?)")
    torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs])


def _count(model, inputs, backward) -> list[OpRecord]:
    with OpCounter(model) as counter:
        _run(model, inputs, backward)
    return counter.records


def _affinity(forward: OpRecord | None, backward: OpRecord) -> tuple[bool, bool, int]:
    """How well a backward op matches a forward op: shares tensors at all, same module, tensors shared."""
    if forward is None:
        return False, False, 0
    shared = len(forward.tensors & backward.tensors)
    return shared > 0, forward.module == backward.module, shared


def _pair(records: list[OpRecord]) -> tuple[list[OpRecord | None], list[list[OpRecord]]]:
    """Forward records, and for each the backward records that belong to it.

    A backward op belongs to the forward op with which it shares tensors (a convolution's input and
    weight; a linear layer's weight, or its input), preferring one of the same module, then the most
    shared; one that shares none gets a slot of its own (``None`` in the first list).
    """
    forward: list[OpRecord | None] = [r for r in records if not r.backward]
    backward: list[list[OpRecord]] = [[] for _ in forward]
    for record in (r for r in records if r.backward):
        scores = [_affinity(candidate, record) for candidate in forward]
        best = max(range(len(forward)), key=scores.__getitem__, default=None)
        if best is None or not scores[best][0]:
            forward.append(None)
            backward.append([record])
        else:
            backward[best].append(record)
    return forward, backward


def _names(model: nn.Module, forward: list[OpRecord | None], backward: list[list[OpRecord]]) -> list[str]:
    """Module name per row; ``name[i]`` when a module ran several ops; the model's class name for itself."""
    modules = [(f or b[0]).module for f, b in zip(forward, backward)]
    counts = defaultdict(int)
    for module in modules:
        counts[module] += 1
    seen = defaultdict(int)
    names = []
    for module in modules:
        name = module or type(model).__name__
        if counts[module] > 1:
            name = f"{name}[{seen[module]}]"
            seen[module] += 1
        names.append(name)
    return names


def _rows(model, records: list[OpRecord], backward: bool) -> tuple[list[Row], int]:
    """Rows from one counted run, and the parameter elements the counted ops read."""
    forward, backward_records = _pair(records)
    rows, read = [], {}
    for name, op, gradients in zip(_names(model, forward, backward_records), forward, backward_records):
        source = op or gradients[0]
        read.update(source.parameters)
        rows.append(Row(name, source.kind, source.op, source.input_shape, source.output_shape, source.kernel_size,
                        source.groups, sum(op.parameters.values()) if op else 0, op.macs if op else 0,
                        op.bytes if op else 0, backward_macs=sum(r.macs for r in gradients) if backward else None))
    return rows, sum(read.values())


def _time_rows(rows: list[Row], repeats: list[list[OpRecord]], backward: bool) -> None:
    """Median and IQR of each row's forward and backward op time over the repeated counted runs."""
    forward_ms, backward_ms = [[] for _ in rows], [[] for _ in rows]
    for records in repeats:
        forward, backward = _pair(records)
        if len(forward) != len(rows):
            raise ValueError(f"the model ran {len(forward)} counted ops on a repeat but {len(rows)} the first time; "
                             "a profile needs the same ops on every call")
        for i, (op, gradients) in enumerate(zip(forward, backward)):
            forward_ms[i].append(1e3 * op.seconds if op else 0.0)
            backward_ms[i].append(1e3 * sum(r.seconds for r in gradients))
    for row, forward_samples, backward_samples in zip(rows, forward_ms, backward_ms):
        row.forward_ms, row.forward_iqr_ms = median_and_iqr(forward_samples)
        if backward:
            row.backward_ms, row.backward_iqr_ms = median_and_iqr(backward_samples)


def profile(model: nn.Module, input_or_shape, measure: bool = False, backward: bool = False, *, warmup: int = 2,
            repeats: int = 5, machine: Machine | None = None) -> Profile:
    """Count (and with ``measure`` time) every convolution and matrix product ``model`` runs on one input.

    Args:
        model: any ``nn.Module``; its train/eval mode is left as it is, and so are its buffers (batch-norm
            statistics), its parameters' gradients and the global random state.
        input_or_shape: a tensor, a sequence of tensors (positional inputs), or a shape such as
            ``(1, 3, 224, 224)`` for one random input with the model's dtype and device.
        measure: time each counted op (median and IQR over ``repeats`` runs after ``warmup`` runs), the
            whole model, and probe the machine's roofs (unless ``machine`` is given) for each op's
            roofline time ``predicted_ms``.
        backward: count (and time) the backward pass too; gradients the model had are restored after.

    Returns:
        a :class:`~sepconv.profiling.report.Profile`; ``print`` it for the table.

    Raises:
        ValueError: the input does not fit the model (the model's own error, on one line, chained).

    >>> import torch, sepconv
    >>> net = torch.nn.Sequential(sepconv.SeparableConv2d(3, 8, 3, padding=1, bias=False), torch.nn.Flatten(),
    ...                           torch.nn.Linear(8 * 4 * 4, 10))
    >>> result = profile(net, (1, 3, 4, 4))
    >>> [(row.name, row.kind, row.params, row.macs) for row in result.rows]
    [('0[0]', 'depthwise conv', 27, 432), ('0[1]', 'pointwise conv', 24, 384), ('2', 'fully connected', 1290, 1280)]
    >>> result.total_params, result.total_macs, result.total_flops
    (1341, 2096, 4192)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    for name, value in (("warmup", warmup), ("repeats", repeats)):
        if not isinstance(value, int) or value < (0 if name == "warmup" else 1):
            raise ValueError(f"{name} must be an int >= {0 if name == 'warmup' else 1}; got {value!r}")
    # Profiling must not change the model or the caller's randomness: running a model in training mode
    # updates batch-norm statistics and draws dropout masks, and a shape makes a random input.
    rng_state = torch.random.get_rng_state()
    buffers = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    inputs = _inputs(model, input_or_shape)
    parameters = list(model.parameters())
    gradients = [p.grad for p in parameters]
    try:
        try:
            records = _count(model, inputs, backward)
        except _NoGradient:
            raise
        except _USER_ERRORS as error:
            message = " ".join(str(error).split())
            raise ValueError(f"input {' and '.join(format_shape(x.shape) for x in inputs)} does not fit "
                             f"{type(model).__name__}: {type(error).__name__}: {message}") from error
        rows, counted_params = _rows(model, records, backward)
        result = Profile(type(model).__name__, tuple(inputs[0].shape), str(inputs[0].dtype).removeprefix("torch."),
                         rows, sum(p.numel() for p in parameters), counted_params, backward)
        if measure:
            model_seconds = samples(lambda: _run(model, inputs, backward), repeats, warmup)
            result.model_ms, result.model_iqr_ms = (1e3 * s for s in median_and_iqr(model_seconds))
            result.repeats = repeats
            _time_rows(rows, [_count(model, inputs, backward) for _ in range(repeats)], backward)
            result.machine = machine or measure_machine(device=inputs[0].device)
            for row in rows:
                row.predicted_ms = 1e3 * result.machine.predicted_seconds(row.flops, row.bytes)
    finally:
        for parameter, gradient in zip(parameters, gradients):
            parameter.grad = gradient
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        torch.random.set_rng_state(rng_state)
    total_macs = max(result.total_macs, 1)
    for row in rows:
        row.macs_share, row.params_share = row.macs / total_macs, row.params / max(result.total_params, 1)
    return result
