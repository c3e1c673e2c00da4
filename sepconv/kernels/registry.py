"""Backends and the choice between them.

A backend is a module (or any object) with the :class:`Backend` attributes. ``reference`` (PyTorch's own
convolutions) covers everything and is the tested twin of every other backend; fast backends register
here (:func:`register_backend`) and say per call what they cover.

Modes (:func:`set_kernels` / :func:`use_kernels`, else the ``SEPCONV_KERNELS`` environment variable, read
once on first use):

* ``"reference"``: always PyTorch's own convolution;
* ``"auto"`` (the default): like ``torch.backends.cudnn.benchmark``, the first call with a new signature
  (shapes, strides, dtype, geometry, padding mode, whether gradients are wanted, thread count) times the
  eligible backends against the reference, interleaved, forward and backward alike when gradients are wanted,
  and every later call with that signature takes the fastest. A fast backend must beat the reference by
  :data:`MARGIN`, so noise does not flip a tie. Under ``torch.compile``/``torch.export`` and
  :func:`measuring_suspended`, where nothing may be timed, calls take the first fast backend that covers them
  (outside compiled graphs, a choice measured before);
* a backend's name (``"cpu"``): that backend wherever it covers the call, the reference elsewhere.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from typing import Protocol

import torch
from torch.autograd import forward_ad

from . import reference

MARGIN = 0.9  # auto picks a fast backend only when its time is below MARGIN x the reference's
_WARMUP = 2  # first calls load the extension, build oneDNN primitives, grow the allocator's pools
_ROUNDS = 5


class Backend(Protocol):
    """What a backend provides (the ``cpu`` backend is the example to follow)."""

    NAME: str

    def available(self) -> bool:
        """Whether it can run here at all (e.g. its extension built); may do the one-off build."""

    def supports(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
        """Whether it covers this call (device, dtype, rank)."""

    def depthwise_conv(self, x, weight, bias, geometry, padding_mode) -> torch.Tensor:
        """The depthwise convolution of :func:`sepconv.kernels.depthwise_conv`, gradients included."""


_backends: dict[str, Backend] = {}
_lock = threading.Lock()
_choices: dict[tuple, str] = {}
_mode: str | None = None  # None: not read yet
_suspended = 0  # measuring_suspended() depth


def register_backend(backend: Backend) -> None:
    """Make ``backend`` selectable by name and eligible in ``"auto"`` mode (in registration order)."""
    if backend.NAME in ("reference", "auto"):
        raise ValueError(f"backend name {backend.NAME!r} is reserved")
    _backends[backend.NAME] = backend


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


@contextlib.contextmanager
def use_kernels(mode: str):
    """``with use_kernels("reference"): ...`` -- the mode for the block, then the previous one (process-wide)."""
    global _mode
    previous, _mode = get_kernels(), _check_mode(mode)
    try:
        yield
    finally:
        _mode = previous


def clear_choices() -> None:
    """Forget what ``"auto"`` measured (e.g. after changing the machine's load)."""
    with _lock:
        _choices.clear()


def choices() -> dict:
    """What ``"auto"`` chose so far: signature -> backend name."""
    with _lock:
        return dict(_choices)


def _plain(t) -> bool:
    # tensor subclasses keep PyTorch's dispatch; forward-mode AD has no formula in the custom ops
    return t is None or (type(t) in (torch.Tensor, torch.nn.Parameter) and forward_ad.unpack_dual(t).tangent is None)


def _signature(x, weight, bias, geometry, padding_mode, wants_grad):
    return (tuple(x.shape), x.stride(), tuple(weight.shape), weight.stride(), x.dtype, bias is not None,
            geometry, padding_mode, wants_grad, torch.get_num_threads())


def exporting() -> bool:
    """Under ``torch.jit.trace`` or ONNX export the graph must hold standard convolutions."""
    onnx = sys.modules.get("torch.onnx")  # not imported: not exporting
    return torch.jit.is_tracing() or (onnx is not None and onnx.is_in_onnx_export())


# Mode auto in compiled graphs: depthwise convolutions up to 3x3 stay PyTorch's, around which inductor fuses the
# norm and activation (the opaque sepconv op would prevent it); larger kernels and 1-D ones go to the backends.
_COMPILED_REFERENCE_TAPS = 9


def select(x, weight, bias, geometry, padding_mode):
    """The backend (module) to run this depthwise convolution on."""
    mode = get_kernels()
    if mode == "reference" or exporting():
        return reference
    compiling = torch.compiler.is_compiling()
    if not compiling and not (_plain(x) and _plain(weight) and _plain(bias)):
        return reference
    names = tuple(_backends) if mode == "auto" else (mode,)
    if mode == "auto" and not compiling:
        wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
        key = _signature(x, weight, bias, geometry, padding_mode, wants_grad)
        choice = _choices.get(key)
        if choice is None and not _suspended:
            eligible = [name for name in names if _covers(_backends[name], x, weight, bias)]
            with _lock:
                choice = _choices.get(key)
                if choice is None:
                    choice = _choices[key] = _measure(eligible, x, weight, bias, geometry, padding_mode, wants_grad) \
                        if eligible else "reference"
        if choice is not None:
            return _backends.get(choice, reference)
    if compiling and mode == "auto" and math.prod(geometry.kernel_size) <= _COMPILED_REFERENCE_TAPS \
            and len(geometry.kernel_size) > 1:
        return reference
    for name in names:
        if _covers(_backends[name], x, weight, bias):
            return _backends[name]
    return reference


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


def _covers(backend, x, weight, bias) -> bool:
    return backend.available() and backend.supports(x, weight, bias)


def _seconds(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def _measure(names, x, weight, bias, geometry, padding_mode, wants_grad) -> str:
    """Time the reference and each eligible backend on detached copies, interleaved, best of a few rounds.

    The fastest round is the least disturbed by other processes; a close call stays with the reference.
    """
    leaves = [t.detach().requires_grad_(t.requires_grad and wants_grad) for t in (x, weight, bias) if t is not None]
    xs, ws, bs = leaves[0], leaves[1], (leaves[2] if bias is not None else None)
    trainable = [t for t in leaves if t.requires_grad]

    def run(backend):
        def call():
            out = backend.depthwise_conv(xs, ws, bs, geometry, padding_mode)
            if trainable:
                torch.autograd.grad(out, trainable, torch.ones_like(out))
        return call

    paths = {"reference": run(reference), **{name: run(_backends[name]) for name in names}}
    with torch.enable_grad() if wants_grad else torch.no_grad():
        for _ in range(_WARMUP):
            for call in paths.values():
                call()
        best = dict.fromkeys(paths, float("inf"))
        order = list(paths)
        for _ in range(_ROUNDS):
            for name in order:
                best[name] = min(best[name], _seconds(paths[name]))
            order.reverse()
    fastest = min(names, key=best.__getitem__)
    return fastest if best[fastest] < MARGIN * best["reference"] else "reference"
