"""Choose, per call signature, between the Numba depthwise kernels and the PyTorch reference.

Modes (environment variable ``SEPCONV_KERNELS``, or :func:`set_kernels` / :func:`use_kernels`):

* ``"reference"``: always PyTorch's own convolution (:mod:`sepconv.kernels.reference`);
* ``"numba"``: the Numba kernels wherever they apply (:func:`numba_depthwise.supports`);
* ``"auto"``: like ``torch.backends.cudnn.benchmark``: the first call with a new signature (shapes,
  strides' layout, dtype, geometry, whether gradients are wanted, thread count) times both paths a
  few times, interleaved, and every later call with that signature takes the faster one. Numba
  must be faster by :data:`MARGIN` to be chosen, so noise does not flip a tie away from the reference.

Both paths give the same values, gradients and (2-D) output layout; in 1-D the Numba path keeps an
``(N, L, C)``-backed input's layout in its output (see :func:`numba_depthwise.depthwise_conv`).
Inputs the kernels do not cover (3-D, float16/bfloat16, non-CPU, subclasses/functorch-wrapped
tensors, forward-mode AD) and everything under ``torch.compile``/``torch.export``/``torch.jit.trace`` take the reference in every mode.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import torch

from . import reference

MODES = ("reference", "numba", "auto")
# The default when SEPCONV_KERNELS is unset: see benchmarks/bench_kernels.py for the measurement that
# decides it. "reference" keeps behaviour and speed exactly those of PyTorch's own convolutions.
DEFAULT_MODE = "reference"
MARGIN = 0.9  # auto picks Numba only when its time is below MARGIN x the reference's
_WARMUP = 2  # first calls compile/load Numba's cache, build oneDNN primitives, grow the allocator's pools
_ROUNDS = 5

_lock = threading.Lock()
_choices: dict[tuple, str] = {}
_mode: str | None = None  # None: read SEPCONV_KERNELS


def _check_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(f"kernels mode must be one of {', '.join(map(repr, MODES))}; got {mode!r}")
    return mode


def get_kernels() -> str:
    """The active mode: :func:`set_kernels`' value, else ``SEPCONV_KERNELS``, else :data:`DEFAULT_MODE`."""
    if _mode is not None:
        return _mode
    value = os.environ.get("SEPCONV_KERNELS", "").strip().lower() or DEFAULT_MODE
    if value not in MODES:
        raise ValueError(f"SEPCONV_KERNELS must be one of {', '.join(MODES)}; got {value!r}")
    return value


def set_kernels(mode: str | None) -> None:
    """Force ``"reference"``, ``"numba"`` or ``"auto"``; ``None`` goes back to ``SEPCONV_KERNELS``."""
    global _mode
    _mode = None if mode is None else _check_mode(mode)


@contextlib.contextmanager
def use_kernels(mode: str):
    """``with use_kernels("numba"): ...`` -- the mode for the block, then the previous one (not thread-local)."""
    global _mode
    previous, _mode = _mode, _check_mode(mode)
    try:
        yield
    finally:
        _mode = previous


def clear_choices() -> None:
    """Forget what ``"auto"`` measured (e.g. after changing the thread count or the machine's load)."""
    with _lock:
        _choices.clear()


def choices() -> dict:
    """What ``"auto"`` chose so far: signature -> ``"numba"`` or ``"reference"``."""
    with _lock:
        return dict(_choices)


_UNLOADED = object()
_kernels = _UNLOADED


def _numba_kernels():
    """The Numba module, or None where Numba is not installed (then every mode is the reference)."""
    global _kernels
    if _kernels is _UNLOADED:
        try:
            from . import numba_depthwise
        except ImportError:
            numba_depthwise = None
        _kernels = numba_depthwise
    return _kernels


def _forward_ad_active() -> bool:
    level = getattr(torch.autograd.forward_ad, "_current_level", -1)
    return level >= 0


def _eligible(kernels, x, weight, bias) -> bool:
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    if any(type(t) is not torch.Tensor for t in (x, weight, bias) if t is not None):
        return False  # subclasses (FakeTensor, DTensor, ...) keep PyTorch's dispatch
    if _forward_ad_active() or torch._C._functorch.is_functorch_wrapped_tensor(x) \
            or torch._C._functorch.is_functorch_wrapped_tensor(weight):
        return False
    if bias is not None and (bias.dtype != x.dtype or bias.device != x.device):
        return False
    return kernels.supports(x, weight)


def _signature(x, weight, bias, stride, padding, dilation, padding_mode, wants_grad):
    return (tuple(x.shape), x.stride(), tuple(weight.shape), weight.stride(), x.dtype, bias is not None,
            tuple(stride), tuple(padding), tuple(dilation), padding_mode, wants_grad, torch.get_num_threads())


def _seconds(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def _measure(kernels, x, weight, bias, args, wants_grad) -> str:
    """Time both paths on detached copies, interleaved, best of a few rounds each.

    The fastest round is the least disturbed by other processes; a close call stays with the reference
    (:data:`MARGIN`).
    """
    groups = x.shape[1]
    leaves = [t.detach().requires_grad_(t.requires_grad and wants_grad) for t in (x, weight, bias) if t is not None]
    xs, ws, bs = leaves[0], leaves[1], (leaves[2] if bias is not None else None)
    trainable = [t for t in leaves if t.requires_grad]

    def run(path):
        def call():
            if path == "numba":
                out = kernels.depthwise_conv(xs, ws, bs, *args)
            else:
                out = reference.conv(xs, ws, bs, args[0], args[1], args[2], groups, args[3])
            if trainable:
                torch.autograd.grad(out, trainable, torch.ones_like(out))
        return call

    paths = {"numba": run("numba"), "reference": run("reference")}
    with torch.enable_grad() if wants_grad else torch.no_grad():
        for _ in range(_WARMUP):
            for call in paths.values():
                call()
        best = {name: float("inf") for name in paths}
        for i in range(_ROUNDS):
            for name in (("numba", "reference") if i % 2 == 0 else ("reference", "numba")):
                best[name] = min(best[name], _seconds(paths[name]))
    return "numba" if best["numba"] < MARGIN * best["reference"] else "reference"


def depthwise_conv(x, weight, bias, stride, padding, dilation, padding_mode):
    """The entry point :func:`sepconv.kernels.depthwise_conv` calls; same contract as the reference.

    In ``"auto"`` mode a signature already measured in favour of the reference goes straight there: the
    eligibility checks only guard the Numba path (they cost as much as 10 % of a small layer's time).
    """
    mode = get_kernels()
    kernels = None if mode == "reference" or torch.compiler.is_compiling() else _numba_kernels()
    if kernels is not None:
        args = (stride, padding, dilation, padding_mode)
        if mode == "numba":
            if _eligible(kernels, x, weight, bias):
                return kernels.depthwise_conv(x, weight, bias, *args)
        elif not torch.jit.is_tracing():
            wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
            key = _signature(x, weight, bias, stride, padding, dilation, padding_mode, wants_grad)
            choice = _choices.get(key)
            if choice != "reference" and _eligible(kernels, x, weight, bias):
                if choice is None:
                    with _lock:
                        choice = _choices.get(key)
                        if choice is None:
                            choice = _choices[key] = _measure(kernels, x, weight, bias, args, wants_grad)
                if choice == "numba":
                    return kernels.depthwise_conv(x, weight, bias, *args)
    return reference.conv(x, weight, bias, stride, padding, dilation, x.shape[1], padding_mode)
