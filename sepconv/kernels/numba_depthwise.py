"""Depthwise convolution kernels in Numba: channels-last, channels as the vector dimension.

Layout: the kernels see ``x`` as ``(N, H, W, C)`` and the weight as ``(KH, KW, C)``, both C-contiguous,
and write ``(N, OH, OW, C)``; 1-D runs as 2-D with ``H = KH = 1``. Every inner loop runs over ``C``
with unit stride (over ``T`` neighbouring pixels' channels at stride 1, see ``_forward``), so LLVM
vectorises it (AVX-512 where the CPU has it); taps go four at a time per pass. Zero padding is not materialised: each output row and column
clips its tap range to the input (``_tap_range``); other padding modes are padded once by ``F.pad``
before the kernel (autograd then folds the padded border's gradient back). A depth multiplier ``M > 1``
repeats the input's channels ``M`` times first (``repeat_interleave``, output order ``c*M + m``), so the
kernels only ever see ``M = 1``: two compiled specialisations per kernel (float32, float64).

The three kernels (forward, input gradient, weight gradient) are wrapped in one
``torch.autograd.Function`` (:class:`DepthwiseChannelsLast`); layout changes, padding and the
multiplier expansion are ordinary PyTorch ops around it, so autograd differentiates them.
:func:`depthwise_conv` has the signature of :func:`sepconv.kernels.depthwise_conv` and returns its
output in the layout the reference would give (channels_last when PyTorch's convolution would pick it).

``fastmath={"contract"}`` only lets LLVM fuse ``a * b + c`` into one FMA (one rounding instead of two):
no reassociation, so sums still run in a fixed order and results are deterministic for a given thread
count; NaN/Inf semantics are unchanged.
"""

from __future__ import annotations

import os
import threading
import time

import numba
import numpy as np
import torch
import torch.nn.functional as F

try:
    from torch._prims_common import suggest_memory_format
except ImportError:  # a private module: fall back to the plain stride test
    def suggest_memory_format(t):
        channels_last = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
        return torch.channels_last if channels_last else torch.contiguous_format

_PAD_MODE = {"reflect": "reflect", "replicate": "replicate", "circular": "circular"}
_JIT = {"cache": True, "parallel": True, "nogil": True, "fastmath": {"contract"}}
DTYPES = (torch.float32, torch.float64)
# One kernel launch at a time: Numba's thread pools are not all safe to enter from several threads.
_LOCK = threading.Lock()


# --- the kernels -----------------------------------------------------------------------------------

@numba.njit(cache=True, inline="always")
def _tap_range(o, stride, pad, dilation, k, size):
    """Taps ``[lo, hi)`` of output position ``o`` whose input position ``o*stride - pad + t*dilation`` is inside."""
    start = o * stride - pad
    lo = 0
    if start < 0:
        lo = (-start + dilation - 1) // dilation
    hi = k
    last = size - 1 - start  # largest t*dilation still inside
    if last < 0:
        hi = 0
    elif (k - 1) * dilation > last:
        hi = last // dilation + 1
    hi = max(hi, lo)
    return start, lo, hi


@numba.njit(**_JIT)
def _forward(x, w, out, sh, sw, ph, pw, dh, dw):
    """Each output pixel's taps go four at a time through the channel loop: one store per four taps.

    ``w`` is ``(KH, KW, T*C)``: the weight tiled ``T`` times along its last axis. At stride 1 the ``T``
    output pixels ``ow..ow+T-1`` of the interior (all taps inside) read ``T*C`` consecutive input values
    per tap, so one loop of ``T*C`` covers them: long vector loops even for few channels. Borders and
    strided columns go one pixel (``C`` values) at a time.
    """
    n_batch, h, wd, c = x.shape
    kh_size, kw_size, tc = w.shape
    tile = tc // c
    oh_size, ow_size = out.shape[1], out.shape[2]
    xf, wf, of = x.ravel(), w.ravel(), out.ravel()
    span_w = (kw_size - 1) * dw
    for row in numba.prange(n_batch * oh_size):
        n = row // oh_size
        oh = row % oh_size
        h0, kh_lo, kh_hi = _tap_range(oh, sh, ph, dh, kh_size, h)
        ow = 0
        while ow < ow_size:
            w0, kw_lo, kw_hi = _tap_range(ow, sw, pw, dw, kw_size, wd)
            pixels = 1
            if sw == 1 and tile > 1 and w0 >= 0:  # as many interior pixels as the tile holds
                pixels = max(1, min(tile, ow_size - ow, wd - span_w - w0))
            length = pixels * c
            start = ((n * oh_size + oh) * ow_size + ow) * c
            ow += pixels
            of[start:start + length] = 0
            ob, ulength = numba.uint64(start), numba.uint64(length)
            if kw_hi <= kw_lo:
                continue
            taps = (kh_hi - kh_lo) * (kw_hi - kw_lo)
            kh, kw = kh_lo, kw_lo
            done = 0
            while done < taps:
                group = min(4, taps - done)
                a0 = ((n * h + h0 + kh * dh) * wd + w0 + kw * dw) * c
                b0 = (kh * kw_size + kw) * tc
                a1, b1, a2, b2, a3, b3 = a0, b0, a0, b0, a0, b0
                kw += 1
                if kw == kw_hi:
                    kw, kh = kw_lo, kh + 1
                if group > 1:
                    a1 = ((n * h + h0 + kh * dh) * wd + w0 + kw * dw) * c
                    b1 = (kh * kw_size + kw) * tc
                    kw += 1
                    if kw == kw_hi:
                        kw, kh = kw_lo, kh + 1
                if group > 2:
                    a2 = ((n * h + h0 + kh * dh) * wd + w0 + kw * dw) * c
                    b2 = (kh * kw_size + kw) * tc
                    kw += 1
                    if kw == kw_hi:
                        kw, kh = kw_lo, kh + 1
                if group > 3:
                    a3 = ((n * h + h0 + kh * dh) * wd + w0 + kw * dw) * c
                    b3 = (kh * kw_size + kw) * tc
                    kw += 1
                    if kw == kw_hi:
                        kw, kh = kw_lo, kh + 1
                # Unsigned offsets: with signed ones Numba tests every index for negative wraparound,
                # which stops LLVM vectorising the loop (measured: 8.8 -> 15.8 GMAC/s at 32 channels).
                a0, a1, a2, a3 = numba.uint64(a0), numba.uint64(a1), numba.uint64(a2), numba.uint64(a3)
                b0, b1, b2, b3 = numba.uint64(b0), numba.uint64(b1), numba.uint64(b2), numba.uint64(b3)
                if group == 4:
                    for ci in range(ulength):
                        of[ob + ci] += (xf[a0 + ci] * wf[b0 + ci] + xf[a1 + ci] * wf[b1 + ci]
                                        + xf[a2 + ci] * wf[b2 + ci] + xf[a3 + ci] * wf[b3 + ci])
                elif group == 3:
                    for ci in range(ulength):
                        of[ob + ci] += xf[a0 + ci] * wf[b0 + ci] + xf[a1 + ci] * wf[b1 + ci] + xf[a2 + ci] * wf[b2 + ci]
                elif group == 2:
                    for ci in range(ulength):
                        of[ob + ci] += xf[a0 + ci] * wf[b0 + ci] + xf[a1 + ci] * wf[b1 + ci]
                else:
                    for ci in range(ulength):
                        of[ob + ci] += xf[a0 + ci] * wf[b0 + ci]
                done += group


@numba.njit(**_JIT)
def _input_grad(gy, w, gx, sh, sw, ph, pw, dh, dw):
    """Gather form (race-free): each input pixel sums the output pixels whose taps reach it."""
    n_batch, h, wd, c = gx.shape
    kh_size, kw_size = w.shape[0], w.shape[1]
    oh_size, ow_size = gy.shape[1], gy.shape[2]
    for row in numba.prange(n_batch * h):
        n = row // h
        ih = row % h
        for iw in range(wd):
            acc = gx[n, ih, iw]
            for ci in range(c):
                acc[ci] = 0
            for kh in range(kh_size):
                t = ih + ph - kh * dh
                if t < 0 or t % sh != 0:
                    continue
                oh = t // sh
                if oh >= oh_size:
                    continue
                gyrow = gy[n, oh]
                wrow = w[kh]
                for kw in range(kw_size):
                    u = iw + pw - kw * dw
                    if u < 0 or u % sw != 0:
                        continue
                    ow = u // sw
                    if ow >= ow_size:
                        continue
                    gv = gyrow[ow]
                    wv = wrow[kw]
                    for ci in range(c):
                        acc[ci] += gv[ci] * wv[ci]


@numba.njit(**_JIT)
def _weight_grad(x, gy, partial, sh, sw, ph, pw, dh, dw):
    """``partial[t]``: chunk ``t``'s sum over its output rows; the caller adds the chunks (one reduction).

    Taps are the outer loop, so each tap's accumulator row takes four output columns per load/store.
    """
    n_batch, h, wd, c = x.shape
    kh_size, kw_size = partial.shape[1], partial.shape[2]
    oh_size, ow_size = gy.shape[1], gy.shape[2]
    chunks = partial.shape[0]
    rows = n_batch * oh_size
    xf, gf = x.ravel(), gy.ravel()
    for t in numba.prange(chunks):
        acc = partial[t].ravel()
        acc[:] = 0
        for row in range(t * rows // chunks, (t + 1) * rows // chunks):
            n = row // oh_size
            oh = row % oh_size
            h0, kh_lo, kh_hi = _tap_range(oh, sh, ph, dh, kh_size, h)
            for kh in range(kh_lo, kh_hi):
                xrow = (n * h + h0 + kh * dh) * wd
                for kw in range(kw_size):
                    shift = kw * dw - pw  # input column of output column ow: ow * sw + shift
                    ow_lo = max(0, -((shift) // sw)) if shift < 0 else 0
                    last = wd - 1 - shift
                    ow_hi = min(ow_size, last // sw + 1) if last >= 0 else 0
                    b = (kh * kw_size + kw) * c
                    ow = ow_lo
                    while ow + 4 <= ow_hi:
                        g0 = (row * ow_size + ow) * c
                        a0 = (xrow + ow * sw + shift) * c
                        g1, a1 = g0 + c, a0 + sw * c
                        g2, a2 = g1 + c, a1 + sw * c
                        g3, a3 = g2 + c, a2 + sw * c
                        av = acc[b:b + c]
                        y0, y1, y2, y3 = gf[g0:g0 + c], gf[g1:g1 + c], gf[g2:g2 + c], gf[g3:g3 + c]
                        x0, x1, x2, x3 = xf[a0:a0 + c], xf[a1:a1 + c], xf[a2:a2 + c], xf[a3:a3 + c]
                        for ci in range(c):
                            av[ci] += y0[ci] * x0[ci] + y1[ci] * x1[ci] + y2[ci] * x2[ci] + y3[ci] * x3[ci]
                        ow += 4
                    while ow < ow_hi:
                        g0 = (row * ow_size + ow) * c
                        a0 = (xrow + ow * sw + shift) * c
                        av, y0, x0 = acc[b:b + c], gf[g0:g0 + c], xf[a0:a0 + c]
                        for ci in range(c):
                            av[ci] += y0[ci] * x0[ci]
                        ow += 1


# --- launchers -------------------------------------------------------------------------------------

_launched = False


def _launch_threads() -> None:
    """Start Numba's thread pool with OpenMP's passive wait policy (idle workers sleep, not spin).

    Numba's "omp" layer loads its own libgomp, apart from the one PyTorch bundles. With both pools
    spinning after each parallel region, two pools on the same cores starve each other: measured on
    the 2-core machine, a 2x48x300 1-D depthwise convolution in PyTorch went from ~1 ms to ~750 ms
    once a Numba kernel had run. libgomp reads ``OMP_WAIT_POLICY`` when it loads, so it is set only
    while Numba starts its pool (PyTorch's pool has long started and keeps its own policy), unless the
    user chose a policy.
    """
    global _launched
    if _launched:
        return
    from numba.np.ufunc import parallel

    chosen = "OMP_WAIT_POLICY" in os.environ
    if not chosen:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    torch_threads = torch.get_num_threads()
    try:
        parallel._launch_threads()
    finally:
        if not chosen:
            del os.environ["OMP_WAIT_POLICY"]
        # Starting the pool calls omp_set_num_threads(NUMBA_NUM_THREADS), which reaches PyTorch's OpenMP
        # too (measured: torch.get_num_threads() went from 1 to 2): give PyTorch its setting back.
        torch.set_num_threads(torch_threads)
    _launched = True


def _threads() -> int:
    """Numba's thread count follows torch.set_num_threads, so both paths run on the same cores."""
    _launch_threads()
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)
    return threads


# Output pixels per inner loop at stride 1: enough for a few AVX-512 vectors per loop even with few
# channels; the tiled weight stays small (KH * KW * TILE_VALUES values).
TILE_VALUES = 256


def _tiled(weight: torch.Tensor, stride_w: int) -> torch.Tensor:
    """``(KH, KW, C)`` -> ``(KH, KW, T*C)``, ``T`` copies side by side (``T = 1`` when strided)."""
    tile = max(1, TILE_VALUES // weight.shape[2]) if stride_w == 1 else 1
    return weight.repeat(1, 1, tile) if tile > 1 else weight.contiguous()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


class DepthwiseChannelsLast(torch.autograd.Function):
    """``(N, H, W, C)`` input, ``(KH, KW, C)`` weight -> ``(N, OH, OW, C)``; zero padding ``(ph, pw)`` before."""

    @staticmethod
    def forward(ctx, x, weight, out_size, stride, pad, dilation):
        xc, wc = x.contiguous(), weight.contiguous()
        out = xc.new_empty(xc.shape[0], out_size[0], out_size[1], xc.shape[3])
        with _LOCK:
            _threads()
            _forward(_np(xc), _np(_tiled(wc, stride[1])), _np(out), *stride, *pad, *dilation)
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, pad, dilation)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, pad, dilation = ctx.geometry
        if torch.is_grad_enabled():
            # create_graph=True (double backward, e.g. a gradient penalty): the Numba kernels are not
            # differentiable, so this rare path takes the gradient of the PyTorch twin instead.
            return (*_reference_grads(x, weight, grad_out, stride, pad, dilation, ctx.needs_input_grad[:2]),
                    None, None, None, None)
        x, weight, grad_out = x.contiguous(), weight.contiguous(), grad_out.contiguous()
        grad_x = grad_w = None
        with _LOCK:
            threads = _threads()
            if ctx.needs_input_grad[0]:
                grad_x = torch.empty_like(x)
                if stride == (1, 1):
                    # The transposed convolution at stride 1 is a convolution of grad_out with the flipped
                    # kernel, padded by k_eff - 1 - pad before: the fast forward kernel does it.
                    flipped = _tiled(weight.flip(0, 1), 1)
                    before = tuple((k - 1) * d - p for k, d, p in zip(weight.shape[:2], dilation, pad))
                    _forward(_np(grad_out), _np(flipped), _np(grad_x), 1, 1, *before, *dilation)
                else:
                    _input_grad(_np(grad_out), _np(weight), _np(grad_x), *stride, *pad, *dilation)
            if ctx.needs_input_grad[1]:
                rows = grad_out.shape[0] * grad_out.shape[1]
                chunks = max(1, min(threads, rows))
                partial = x.new_empty(chunks, *weight.shape)
                _weight_grad(_np(x), _np(grad_out), _np(partial), *stride, *pad, *dilation)
                grad_w = partial[0] if chunks == 1 else partial.sum(0)
        return grad_x, grad_w, None, None, None, None


def _reference_grads(x, weight, grad_out, stride, pad, dilation, needs):
    """Gradients of the same convolution through PyTorch (differentiable, for double backward)."""
    with torch.enable_grad():
        xs = x.permute(0, 3, 1, 2)
        after = [(o - 1) * s + (k - 1) * d + 1 - n - b
                 for o, s, k, d, n, b in zip(grad_out.shape[1:3], stride, weight.shape[:2], dilation, xs.shape[2:], pad)]
        xs = F.pad(xs, [pad[1], after[1], pad[0], after[0]])  # negative "after" crops unused rows/columns
        ws = weight.permute(2, 0, 1).unsqueeze(1)
        out = F.conv2d(xs, ws, None, stride, 0, dilation, xs.shape[1]).permute(0, 2, 3, 1)
        inputs = [t for t, need in zip((x, weight), needs) if need]
        grads = iter(torch.autograd.grad(out, inputs, grad_out, create_graph=True))
    return tuple(next(grads) if need else None for need in needs)


# --- the entry point -------------------------------------------------------------------------------

def supports(x, weight) -> bool:
    """What these kernels cover: 1-D and 2-D, float32/float64 on the CPU, non-empty dense tensors."""
    return (x.ndim in (3, 4) and weight.ndim == x.ndim and x.dtype in DTYPES and weight.dtype == x.dtype
            and x.device.type == "cpu" and weight.device.type == "cpu"
            and x.layout == torch.strided and weight.layout == torch.strided
            and not (x.is_neg() or weight.is_neg()) and x.numel() > 0 and weight.numel() > 0)


def _suggests_channels_last(t: torch.Tensor) -> bool:
    """``Tensor.suggest_memory_format()`` (C++ only; ``_prims_common`` has its Python twin) is channels_last."""
    return t.ndim == 4 and suggest_memory_format(t) == torch.channels_last


def depthwise_conv(x, weight, bias, stride, padding, dilation, padding_mode):
    """Same contract and result as ``reference.conv(..., groups=C, ...)`` for 1-D/2-D float32/float64."""
    rank = weight.ndim - 2
    channels = x.shape[1]
    multiplier = weight.shape[0] // channels
    # The output layout PyTorch's CPU convolution picks (channels_last when its input or weight suggests it;
    # 2-D only), so that the result is the reference's in strides as well as values.
    input_channels_last = _suggests_channels_last(x)
    channels_last = _suggests_channels_last(weight)
    if rank == 1:
        x = x.unsqueeze(2)
        weight = weight.unsqueeze(2)
        stride, dilation, padding = (1, *stride), (1, *dilation), ((0, 0), *padding)
    xl = x.permute(0, 2, 3, 1)  # (N, H, W, C): a view if x is channels_last, copied by the kernel otherwise
    if padding_mode != "zeros" and any(b or a for b, a in padding):
        # The reference pads explicitly too, and PyTorch's circular F.pad returns a contiguous tensor,
        # so the reference's output is contiguous then.
        input_channels_last = input_channels_last and padding_mode != "circular"
        xl = F.pad(xl.permute(0, 3, 1, 2), [v for pair in reversed(padding) for v in pair],
                   mode=_PAD_MODE[padding_mode]).permute(0, 2, 3, 1)
        padding = ((0, 0), (0, 0))
    channels_last = channels_last or input_channels_last
    if multiplier > 1:
        xl = xl.repeat_interleave(multiplier, dim=3)
    wl = weight[:, 0].permute(1, 2, 0)  # (KH, KW, C*M)
    size = (xl.shape[1], xl.shape[2])
    out_size = tuple((n + b + a - (k - 1) * d - 1) // s + 1
                     for n, (b, a), k, s, d in zip(size, padding, wl.shape[:2], stride, dilation))
    out = DepthwiseChannelsLast.apply(xl, wl, out_size, tuple(stride), tuple(b for b, _ in padding),
                                      tuple(dilation))
    if bias is not None:
        out = out + bias
    out = out.permute(0, 3, 1, 2)  # (N, C*M, OH, OW), channels_last strides
    if rank == 1:
        out = out.squeeze(2)
    return out if channels_last else out.contiguous()


def compile_all() -> float:
    """Compile (or load from Numba's cache) every specialisation; returns the seconds it took."""
    start = time.perf_counter()
    for dtype in DTYPES:
        x = torch.randn(1, 2, 3, 3, dtype=dtype, requires_grad=True)
        w = torch.randn(2, 1, 2, 2, dtype=dtype, requires_grad=True)
        for stride in ((1, 1), (2, 2)):  # stride 1 takes its input gradient from the forward kernel
            depthwise_conv(x, w, None, stride, ((0, 0), (0, 0)), (1, 1), "zeros").sum().backward()
    return time.perf_counter() - start

