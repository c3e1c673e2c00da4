"""Backends and the choice between them, per op and per call signature.

A backend is a module (or any object) with the :class:`Backend` attributes: for every op of
:mod:`sepconv.kernels` it covers, a function of that name and the face's signature, and ``supports(op, *args)``
saying per call whether it covers it. ``reference`` (PyTorch's own operations) covers everything and is the tested
twin of every other backend; a composite op (``separable_conv_act``) may name its unfused steps as the baseline
instead, each step then chosen on its own.

Modes (:func:`set_kernels` / :func:`use_kernels`, else the ``SEPCONV_KERNELS`` environment variable, read
once on first use):

* ``"reference"``: always the reference;
* ``"auto"`` (the default): like ``torch.backends.cudnn.benchmark``, the first call of an op with a new signature
  (shapes, strides, dtypes, the other arguments, whether gradients are wanted, thread count) times the eligible
  backends against the baseline, interleaved, forward and backward alike when gradients are wanted
  (:func:`sepconv._timer.fastest`: a backend must beat the baseline by its margin, so noise does not flip a tie),
  and every later call with that signature takes the winner (a covering backend wins bf16 and fp16 calls
  untimed: PyTorch's CPU convolutions take seconds per call there, see ``_UNTIMED_DTYPES``). Under
  ``torch.compile``/``torch.export`` and :func:`measuring_suspended`, where nothing may be timed, calls take the
  first backend that covers them (outside compiled graphs, a choice measured before);
* a backend's name (``"cpu"``): that backend wherever it covers the call, the baseline elsewhere.

Tracing, ONNX export, tensor subclasses and forward-mode AD always take the reference.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import threading
from collections.abc import Callable
from typing import Protocol

import torch
from torch.autograd import forward_ad

from .. import _timer
from . import reference


class Backend(Protocol):
    """What a backend provides (the ``cpu`` backend is the example to follow), besides one function per op it
    covers, named and called as the op's face in :mod:`sepconv.kernels`."""

    NAME: str

    def available(self) -> bool:
        """Whether it can run here at all (e.g. its extension built); may do the one-off build."""

    def supports(self, op: str, *args) -> bool:
        """Whether it covers this call of ``op`` (the face's arguments: device, dtype, rank, layout...)."""


_backends: dict[str, Backend] = {}
_lock = threading.RLock()  # re-entered when a composite op's baseline chooses its steps
_choices: dict[tuple, str] = {}
_mode: str | None = None  # None: not read yet
_suspended = 0  # measuring_suspended() depth
_generation = 0  # bumped whenever select may answer the same arguments differently (see reuse_key)


def changed() -> None:
    """Say that what :func:`select` answers may have changed (mode, choices, backends): plans kept under
    :func:`reuse_key` are made again."""
    global _generation
    _generation += 1


def register_backend(backend: Backend) -> None:
    """Make ``backend`` selectable by name and eligible in ``"auto"`` mode (in registration order)."""
    if backend.NAME in ("reference", "auto"):
        raise ValueError(f"backend name {backend.NAME!r} is reserved")
    _backends[backend.NAME] = backend
    changed()


def modes() -> tuple[str, ...]:
    return ("reference", "auto", *_backends)


def _check_mode(mode, name: str = "kernels mode") -> str:
    if mode not in modes():
        raise ValueError(f"{name} must be one of {', '.join(map(repr, modes()))}; got {mode!r}")
    return mode


def get_kernels() -> str:
    """The active mode: :func:`set_kernels`' value, else ``SEPCONV_KERNELS`` (read once), else ``"auto"``."""
    global _mode
    if _mode is None:
        value = os.environ.get("SEPCONV_KERNELS", "").strip().lower() or "auto"
        _mode = _check_mode(value, "the environment variable SEPCONV_KERNELS")
    return _mode


def set_kernels(mode: str | None) -> None:
    """Force ``"reference"``, ``"auto"`` or a backend's name; ``None`` reads ``SEPCONV_KERNELS`` again."""
    global _mode
    _mode = None if mode is None else _check_mode(mode)
    changed()


@contextlib.contextmanager
def use_kernels(mode: str):
    """``with use_kernels("reference"): ...`` -- the mode for the block, then the previous one (process-wide)."""
    global _mode
    previous, _mode = get_kernels(), _check_mode(mode)
    changed()
    try:
        yield
    finally:
        _mode = previous
        changed()


def clear_choices() -> None:
    """Forget what ``"auto"`` measured (e.g. after changing the machine's load)."""
    with _lock:
        _choices.clear()
    changed()


def choices() -> dict:
    """What ``"auto"`` chose so far: signature -> backend name."""
    with _lock:
        return dict(_choices)


def _plain(t) -> bool:
    # tensor subclasses keep PyTorch's dispatch; forward-mode AD has no formula in the custom ops
    return type(t) in (torch.Tensor, torch.nn.Parameter) and forward_ad.unpack_dual(t).tangent is None


def exporting() -> bool:
    """Under ``torch.jit.trace`` or ONNX export the graph must hold standard operations."""
    if torch.jit.is_tracing():
        return True
    if "torch.onnx" not in sys.modules:  # not imported: not exporting
        return False
    return (torch.onnx.is_in_onnx_export if torch.compiler.is_compiling() else _onnx_exporting())()


@functools.cache
def _onnx_exporting() -> Callable[[], bool]:
    """``torch.onnx.is_in_onnx_export``, which imports the two flags it reads on every call (1.2 us, asked on every
    op call): the flags read directly where this torch has them (not under dynamo, which may not trace them)."""
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:
        return torch.onnx.is_in_onnx_export
    return lambda: GLOBALS.in_onnx_export or _flags._is_onnx_exporting


# Mode auto in compiled graphs: depthwise convolutions of at most 9 taps (2-D or 3-D) stay PyTorch's, around which
# inductor fuses the norm and activation (the opaque sepconv op would prevent it); larger kernels and 1-D ones go
# to the backends.
_COMPILED_REFERENCE_TAPS = 9


# PyTorch's CPU convolutions in reduced precision take seconds to minutes per call where the CPU has no AMX (one
# EEGNet 1x16 depthwise call in bf16: over 45 s), and a call cannot be cut short: in auto a backend that covers
# such a call is taken without timing the baseline.
_UNTIMED_DTYPES = (torch.bfloat16, torch.float16)


def _inductor_fuses(op: str, args: tuple) -> bool:
    return op == "depthwise_conv" and len(args[3].kernel_size) > 1 \
        and math.prod(args[3].kernel_size) <= _COMPILED_REFERENCE_TAPS


def select(op: str, args: tuple, baseline: Callable | None = None) -> Callable:
    """The implementation of ``op`` (a backend's function, the ``baseline`` or the reference's) to run on ``args``,
    the face's arguments."""
    mode = get_kernels()
    if mode == "reference" or exporting():
        return getattr(reference, op)
    baseline = baseline or getattr(reference, op)
    compiling = torch.compiler.is_compiling()
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not compiling and not all(map(_plain, tensors)):
        return getattr(reference, op)
    names = tuple(_backends) if mode == "auto" else (mode,)
    if mode == "auto" and not compiling:
        wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        key = (op, wants_grad, torch.get_num_threads(),
               *((a.shape, a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a for a in args))
        choice = _choices.get(key)
        if choice is None and not _suspended:
            with _lock:
                choice = _choices.get(key)
                if choice is None:
                    eligible = [name for name in names if _covers(_backends[name], op, args)]
                    timed_baseline = None if any(t.dtype in _UNTIMED_DTYPES for t in tensors) else baseline
                    choice = _choices[key] = _measure(op, eligible, args, timed_baseline, wants_grad) \
                        if eligible else "reference"
        if choice is not None:
            return baseline if choice == "reference" else getattr(_backends[choice], op)
    if compiling and mode == "auto" and _inductor_fuses(op, args):
        return baseline
    for name in names:
        if _covers(_backends[name], op, args):
            return getattr(_backends[name], op)
    return baseline


def reuse_key(x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple | None:
    """A key under which a caller whose other arguments never change (an optimised model's fused module) may keep
    what :func:`select` answered for input ``x`` and call it again without asking (about 7 us a call): the input's
    signature (and the residual's, where one is given) and everything else select reads. None where select must be
    asked every time: compiling, tracing or exporting, a dispatch mode watching, autocast, tensor subclasses,
    forward-mode AD."""
    if (torch.compiler.is_compiling() or _suspended or exporting() or torch.is_autocast_enabled(x.device.type)
            or not _plain(x)):
        return None
    key = _generation, torch.get_num_threads(), torch.is_grad_enabled(), x.shape, x.stride(), x.dtype, x.device
    if residual is None:
        return key
    return (*key, residual.shape, residual.stride(), residual.dtype) if _plain(residual) else None


def dispatch_visible() -> bool:
    """Whether backends must run their kernels through the ``torch.ops.sepconv`` operators (inside
    :func:`measuring_suspended`, where a dispatch mode is watching) rather than call them directly."""
    return _suspended > 0


@contextlib.contextmanager
def measuring_suspended():
    """Inside, ``"auto"`` times nothing and takes a measured choice or the first backend that covers the call:
    a dispatch mode such as the profiler's counter would otherwise see every timing call."""
    global _suspended
    _suspended += 1
    try:
        yield
    finally:
        _suspended -= 1


def _covers(backend, op: str, args: tuple) -> bool:
    return hasattr(backend, op) and backend.available() and backend.supports(op, *args)


def _measure(op: str, names: list[str], args: tuple, baseline: Callable | None, wants_grad: bool) -> str:
    """The fastest of the baseline (named ``"reference"``) and each eligible backend on detached copies of ``args``,
    by :func:`sepconv._timer.fastest`; forward and backward when gradients are wanted. Without a baseline, the
    first backend is the one to beat."""
    if baseline is None and len(names) == 1:
        return names[0]
    args = tuple(a.detach().requires_grad_(a.requires_grad and wants_grad) if isinstance(a, torch.Tensor) else a
                 for a in args)
    trainable = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]

    def run(function):
        def call():
            out = function(*args)
            if trainable:
                out = out[0] if isinstance(out, tuple) else out
                torch.autograd.grad(out, trainable, torch.ones_like(out), allow_unused=True)
        return call

    paths = {name: run(getattr(_backends[name], op)) for name in names}
    if baseline is not None:
        paths = {"reference": run(baseline), **paths}
    with torch.enable_grad() if wants_grad else torch.no_grad():
        return _timer.fastest(paths, baseline=next(iter(paths)))
