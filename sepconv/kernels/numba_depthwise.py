"""Depthwise convolution kernels in Numba: channels-last, channels as the vector dimension.

Layout: the kernels see ``x`` as ``(N, H, W, C)`` and the weight as ``(KH, KW, C)``, both C-contiguous,
and write ``(N, OH, OW, C)``; 1-D runs as 2-D with ``H = KH = 1``. Every inner loop runs over ``C``
with unit stride (over ``T`` neighbouring pixels' channels at stride 1, see ``_forward``), so LLVM
vectorises it (AVX-512 where the CPU has it); taps go four at a time per pass. Zero padding is not
materialised: each output row and column clips its tap range to the input (``_tap_range``); other
padding modes are padded once by ``F.pad`` before the kernel (autograd then folds the padded border's
gradient back). For the common kernel sizes at horizontal stride 1 or 2 (:mod:`sepconv.kernels.unroll`),
the forward and weight-gradient interiors go through generated blocks with every tap unrolled and the sums in
registers; on small maps, where many windows cross the padding, the input is zero-padded once into a
temporary so that every pixel takes the fast path (:data:`PAD_BORDER_SHARE`, large kernels only). A depth
multiplier ``M > 1`` repeats the input's channels ``M`` times into a temporary first (output order
``c*M + m``; the input gradient sums each group back), so the kernels only ever see ``M = 1``: two
compiled specialisations per kernel (float32, float64).

The three kernels (forward, input gradient, weight gradient) are wrapped in one
``torch.autograd.Function`` (:class:`DepthwiseConv`). Contiguous NCHW inputs with a contiguous output go
to the planar kernels (:mod:`sepconv.kernels.numba_planar`) instead, with no layout change, unless their
output planes are small (:data:`PLANAR_MIN_OUTPUT_PIXELS`); other layouts
are changed in here (NCHW <-> NHWC through a Numba transpose, into temporaries reused from call to call); padding modes other than zeros are an
ordinary ``F.pad`` before it, so autograd differentiates them. Everything a call's signature decides
(layouts, geometry, block kinds, task split) is worked out once per signature (:func:`_plan`), and a call
that wants no gradient runs the forward without the autograd Function: for small layers the Python side
otherwise costs more than the kernels.
:func:`depthwise_conv` has the signature of :func:`sepconv.kernels.depthwise_conv` and returns its
output in the layout the reference would give in 2-D (channels_last when PyTorch's convolution would
pick it) and in its input's layout in 1-D.

Compilation options are :data:`sepconv.kernels._jit.OPTIONS`: FMA contraction only, so sums run in a fixed
order and results are deterministic for a given thread count.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import time
from typing import NamedTuple

import numba
import numpy as np
import torch
import torch.nn.functional as F

try:
    from torch._prims_common import are_strides_like_channels_last_or_false
except ImportError:  # a private module: fall back to the plain stride test
    def are_strides_like_channels_last_or_false(shape, strides):
        nhwc = [0, 2, 3, 1]
        return (len(shape) == 4 and not _is_contiguous(shape, strides)
                and _is_contiguous([shape[i] for i in nhwc], [strides[i] for i in nhwc]))

from ..geometry import effective_kernel_size, output_shape
from . import _unrolled, numba_planar, unroll
from ._jit import OPTIONS

_PAD_MODE = {"reflect": "reflect", "replicate": "replicate", "circular": "circular"}
_JIT = {**OPTIONS, "parallel": True}
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


@numba.njit(cache=True, inline="always")
def _tap_offsets(kh, kw, row0, w0, wd, c, dh, dw, kw_size, tc, kw_lo, kw_hi):
    """Where tap ``(kh, kw)`` reads: its first input value (pixel row ``row0 + kh*dh``, column
    ``w0 + kw*dw``) and its weight row; then the next tap, row by row over columns ``[kw_lo, kw_hi)``.

    Unsigned offsets: with signed ones Numba tests every index for negative wraparound, which stops
    LLVM vectorising the loop (measured: 8.8 -> 15.8 GMAC/s at 32 channels).
    """
    a = numba.uint64(((row0 + kh * dh) * wd + w0 + kw * dw) * c)
    b = numba.uint64((kh * kw_size + kw) * tc)
    kw += 1
    if kw == kw_hi:
        kw, kh = kw_lo, kh + 1
    return a, b, kh, kw


@numba.njit(**_JIT)
def _forward(x, w, start_values, out, sh, sw, ph, pw, dh, dw, col_chunks, unrolled, channel_block):
    """Each output pixel's taps go four at a time through the channel loop: one store per four taps.

    With ``unrolled > 0`` (a kind of :mod:`sepconv.kernels._unrolled`: this kernel size and horizontal
    stride, no dilation, ``w`` untiled), runs of :data:`~sepconv.kernels._unrolled.PIXELS` pixels
    whose taps are all inside go through that generated block instead (every tap unrolled, the sums in
    registers, channels in blocks of ``channel_block``); the loop below then only does the borders.

    ``w`` is ``(KH, KW, T*C)``: the weight tiled ``T`` times along its last axis. At stride 1 the ``T``
    output pixels ``ow..ow+T-1`` of the interior (all taps inside) read ``T*C`` consecutive input values
    per tap, so one loop of ``T*C`` covers them: long vector loops even for few channels. Borders and
    strided columns go one pixel (``C`` values) at a time. Each output starts from ``start_values``
    (``T*C``: the bias, tiled like the weight, or zeros), so a bias costs no extra pass. Tasks are
    output rows cut into ``col_chunks`` column ranges, so few rows (1-D, batch 1) still spread over
    the threads.
    """
    n_batch, h, wd, c = x.shape
    kh_size, kw_size, tc = w.shape
    tile = tc // c
    oh_size, ow_size = out.shape[1], out.shape[2]
    xf, wf, of = x.ravel(), w.ravel(), out.ravel()
    span_w = (kw_size - 1) * dw
    uc, urow, ucb = numba.uint64(c), numba.uint64(wd * c), numba.uint64(channel_block)
    block = _unrolled.PIXELS
    for task in numba.prange(n_batch * oh_size * col_chunks):
        row, part = task // col_chunks, task % col_chunks
        n = row // oh_size
        oh = row % oh_size
        h0, kh_lo, kh_hi = _tap_range(oh, sh, ph, dh, kh_size, h)
        full_rows = unrolled > 0 and kh_lo == 0 and kh_hi == kh_size
        ow_start, ow_end = part * ow_size // col_chunks, (part + 1) * ow_size // col_chunks
        # Unrolled blocks cover the run of pixels whose taps are all inside (input column ow*sw - pw); the
        # run's last block overlaps the one before instead of leaving a remainder to the loop below.
        fast_lo, fast_hi = numba_planar.interior(ow_start, ow_end, sw, pw, span_w, wd)
        fast = full_rows and fast_hi - fast_lo >= block
        ow = ow_start
        while ow < ow_end:
            if fast and fast_lo <= ow < fast_hi:
                at = min(ow, fast_hi - block)
                _unrolled.block(unrolled, xf, wf, start_values, of, numba.uint64(((n * oh_size + oh) * ow_size + at) * c),
                                numba.uint64(((n * h + h0) * wd + at * sw - pw) * c), uc, urow, ucb)
                ow = at + block
                continue
            w0, kw_lo, kw_hi = _tap_range(ow, sw, pw, dw, kw_size, wd)
            pixels = 1
            if sw == 1 and tile > 1 and w0 >= 0:  # as many interior pixels as the tile holds
                pixels = max(1, min(tile, ow_end - ow, wd - span_w - w0))
            length = pixels * c
            start = ((n * oh_size + oh) * ow_size + ow) * c
            ow += pixels
            of[start:start + length] = start_values[:length]
            ob, ulength = numba.uint64(start), numba.uint64(length)
            if kw_hi <= kw_lo:
                continue
            taps = (kh_hi - kh_lo) * (kw_hi - kw_lo)
            kh, kw = kh_lo, kw_lo
            row0 = n * h + h0
            done = 0
            while done < taps:
                group = min(4, taps - done)
                a0, b0, kh, kw = _tap_offsets(kh, kw, row0, w0, wd, c, dh, dw, kw_size, tc, kw_lo, kw_hi)
                a1, b1, a2, b2, a3, b3 = a0, b0, a0, b0, a0, b0
                if group > 1:
                    a1, b1, kh, kw = _tap_offsets(kh, kw, row0, w0, wd, c, dh, dw, kw_size, tc, kw_lo, kw_hi)
                if group > 2:
                    a2, b2, kh, kw = _tap_offsets(kh, kw, row0, w0, wd, c, dh, dw, kw_size, tc, kw_lo, kw_hi)
                if group > 3:
                    a3, b3, kh, kw = _tap_offsets(kh, kw, row0, w0, wd, c, dh, dw, kw_size, tc, kw_lo, kw_hi)
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


@numba.njit(cache=True, inline="always")
def _reading_output(i, tap, stride, pad, dilation, size):
    """The output position whose tap ``tap`` reads input position ``i`` along one axis, or -1 if none."""
    t = i + pad - tap * dilation
    if t < 0 or t % stride != 0 or t // stride >= size:
        return -1
    return t // stride


@numba.njit(**_JIT)
def _input_grad(gy, w, gx, sh, sw, ph, pw, dh, dw, col_chunks):
    """Gather form (race-free): each input pixel sums the output pixels whose taps reach it."""
    n_batch, h, wd, c = gx.shape
    kh_size, kw_size = w.shape[0], w.shape[1]
    oh_size, ow_size = gy.shape[1], gy.shape[2]
    for task in numba.prange(n_batch * h * col_chunks):
        row, part = task // col_chunks, task % col_chunks
        n = row // h
        ih = row % h
        for iw in range(part * wd // col_chunks, (part + 1) * wd // col_chunks):
            acc = gx[n, ih, iw]
            for ci in range(c):
                acc[ci] = 0
            for kh in range(kh_size):
                oh = _reading_output(ih, kh, sh, ph, dh, oh_size)
                if oh < 0:
                    continue
                gyrow = gy[n, oh]
                wrow = w[kh]
                for kw in range(kw_size):
                    ow = _reading_output(iw, kw, sw, pw, dw, ow_size)
                    if ow < 0:
                        continue
                    gv = gyrow[ow]
                    wv = wrow[kw]
                    for ci in range(c):
                        acc[ci] += gv[ci] * wv[ci]


@numba.njit(cache=True, inline="always")
def _weight_grad_columns(acc, xf, gf, row, xrow, kh, col_lo, col_hi, kw_size, sw, pw, dw, wd, ow_size, c):
    """One kernel row's taps over output columns ``[col_lo, col_hi)`` of output row ``row`` (input row
    starting at ``xf[xrow * C]``). Taps are the outer loop, so each tap's accumulator row takes four
    output columns per load/store."""
    for kw in range(kw_size):
        shift = kw * dw - pw  # input column of output column ow: ow * sw + shift
        ow_lo, ow_hi = numba_planar.inside(col_lo, col_hi, sw, pw, kw * dw, wd)
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


@numba.njit(**_JIT)
def _weight_grad(x, gy, partial, sh, sw, ph, pw, dh, dw, col_chunks, unrolled, channel_block):
    """``partial[t]``: chunk ``t``'s sum over its work; the caller adds the chunks (one reduction).

    Work items are output rows cut into ``col_chunks`` column ranges, dealt to the chunks in order.
    With ``unrolled > 0`` (a weight-gradient kind of :mod:`sepconv.kernels._unrolled`: this kernel
    width and horizontal stride, no horizontal dilation), each kernel row's columns whose taps are all
    inside go :data:`~sepconv.kernels._unrolled.COLUMNS` at a time through that generated block.
    """
    n_batch, h, wd, c = x.shape
    kh_size, kw_size = partial.shape[1], partial.shape[2]
    oh_size, ow_size = gy.shape[1], gy.shape[2]
    chunks = partial.shape[0]
    items = n_batch * oh_size * col_chunks
    xf, gf = x.ravel(), gy.ravel()
    uc, ucb, columns = numba.uint64(c), numba.uint64(channel_block), _unrolled.COLUMNS
    for t in numba.prange(chunks):
        acc = partial[t].ravel()
        acc[:] = 0
        for item in range(t * items // chunks, (t + 1) * items // chunks):
            row, part = item // col_chunks, item % col_chunks
            col_lo, col_hi = part * ow_size // col_chunks, (part + 1) * ow_size // col_chunks
            n = row // oh_size
            oh = row % oh_size
            h0, kh_lo, kh_hi = _tap_range(oh, sh, ph, dh, kh_size, h)
            # Columns the blocks take: every tap inside (input columns ow*sw - pw .. ow*sw - pw + kw_size - 1).
            fast_lo, fast_hi = numba_planar.interior(col_lo, col_hi, sw, pw, kw_size - 1, wd)
            fast_hi = fast_lo + max(0, fast_hi - fast_lo) // columns * columns if unrolled > 0 else fast_lo
            for kh in range(kh_lo, kh_hi):
                xrow = (n * h + h0 + kh * dh) * wd
                for ow in range(fast_lo, fast_hi, columns):
                    _unrolled.wgrad_block(unrolled, xf, gf, acc, numba.uint64((row * ow_size + ow) * c),
                                          numba.uint64((xrow + ow * sw - pw) * c), numba.uint64(kh * kw_size * c), uc,
                                          ucb)
                _weight_grad_columns(acc, xf, gf, row, xrow, kh, col_lo, min(col_hi, fast_lo), kw_size, sw, pw, dw, wd,
                                     ow_size, c)
                _weight_grad_columns(acc, xf, gf, row, xrow, kh, max(col_lo, fast_hi), col_hi, kw_size, sw, pw, dw, wd,
                                     ow_size, c)


@numba.njit(**_JIT)
def _transpose(src, dst):
    """``(B, R, S)`` -> ``(B, S, R)`` (NCHW <-> NHWC with ``HW`` as one axis), in 16 x 16 tiles that
    stay in L1 while their rows are read and their columns written."""
    b_size, r_size, s_size = src.shape
    sf, df = src.ravel(), dst.ravel()
    r_tiles = (r_size + 15) // 16
    for task in numba.prange(b_size * r_tiles):
        b = task // r_tiles
        r0 = (task % r_tiles) * 16
        r1 = min(r0 + 16, r_size)
        base = numba.uint64(b * r_size * s_size)
        ur0, ur1, ur, us = numba.uint64(r0), numba.uint64(r1), numba.uint64(r_size), numba.uint64(s_size)
        for s0 in range(0, s_size, 16):
            for s in range(numba.uint64(s0), numba.uint64(min(s0 + 16, s_size))):
                for r in range(ur0, ur1):
                    df[base + s * ur + r] = sf[base + r * us + s]


@numba.njit(**OPTIONS)
def _prepare_weight(weight, bias, flip, out, start):
    """``weight`` ``(C, T)`` (PyTorch's layout, taps flattened) -> ``out`` ``(T, tile*C)``: one row per tap
    (in reverse order when ``flip``: the input gradient's kernel), its channels repeated ``tile`` times;
    ``start`` ``(tile*C,)``: the bias repeated alike, or zeros when ``bias`` is empty. One small pass
    instead of PyTorch's permute, copy, flip and repeat (measured: 960 channels, 3x3: 8 us -> 2 us)."""
    c, taps = weight.shape
    values = out.shape[1]
    for t in range(taps):
        src = taps - 1 - t if flip else t
        for ci in range(c):
            out[t, ci] = weight[ci, src]
        for copy in range(1, values // c):
            for ci in range(c):
                out[t, copy * c + ci] = out[t, ci]
    for v in range(values):
        start[v] = bias[v % c] if bias.shape[0] else 0


@numba.njit(**OPTIONS)
def _reduce_partials(partial, out):
    """``partial`` ``(chunks, T, C)`` -> ``out`` ``(C, T)``: the chunks' sums added in order, in the weight's layout.

    A tap's sums are added in a row first (vector loops), then scattered: measured, 480 channels, 5x5, two
    chunks, 17 -> 8 us (adding while scattering ran scalar)."""
    chunks, taps, c = partial.shape
    row = np.empty(c, partial.dtype)
    for t in range(taps):
        for ci in range(c):
            row[ci] = partial[0, t, ci]
        for k in range(1, chunks):
            for ci in range(c):
                row[ci] += partial[k, t, ci]
        for ci in range(c):
            out[ci, t] = row[ci]


@numba.njit(**_JIT)
def _pad_into(src, dst, top, left):
    """``src`` ``(N, H, W, C)`` into ``dst`` at rows ``top..``, columns ``left..``, zeros around it; rows
    in parallel, so the forward's threads find most of their rows in their own caches (one thread with
    NumPy: 40 us of a 7x7 layer's 290 us at 96x56x56)."""
    n_batch, h, w, c = src.shape
    rows, row_values = dst.shape[1], dst.shape[2] * c
    sf, df = src.ravel(), dst.ravel()
    head, body = left * c, w * c
    for task in numba.prange(n_batch * rows):
        n, row = task // rows, task % rows
        out = df[task * row_values:(task + 1) * row_values]
        if row < top or row >= top + h:
            out[:] = 0
            continue
        start = (n * h + row - top) * body
        out[:head] = 0
        out[head:head + body] = sf[start:start + body]
        out[head + body:] = 0


@numba.njit(**_JIT)
def _repeat_channels(src, dst):
    """``src`` ``(P, C)`` -> ``dst`` ``(P, C*M)``: each channel ``M`` times (the depth multiplier's input).
    PyTorch's ``repeat_interleave`` took 80 us for 65 k values (an inner copy loop of length ``M``)."""
    pixels, c = src.shape
    m = dst.shape[1] // c
    for p in numba.prange(pixels):
        for ci in range(c):
            value = src[p, ci]
            for k in range(m):
                dst[p, ci * m + k] = value


@numba.njit(**_JIT)
def _sum_groups(src, dst):
    """``src`` ``(P, C*M)`` -> ``dst`` ``(P, C)``: each group of ``M`` channels summed (the gradient of
    :func:`_repeat_channels`)."""
    pixels, c = dst.shape
    m = src.shape[1] // c
    for p in numba.prange(pixels):
        for ci in range(c):
            total = src[p, ci * m]
            for k in range(1, m):
                total += src[p, ci * m + k]
            dst[p, ci] = total


# --- plans -----------------------------------------------------------------------------------------

def _threads() -> int:
    """Numba's thread count follows torch.set_num_threads, so both paths run on the same cores.

    Numba's count is per calling thread, so what was set is remembered per thread: the check costs a
    dictionary lookup, not Numba's own (measured ~3 us a call with the pool test it makes).
    """
    wanted = torch.get_num_threads()
    if getattr(_thread_state, "wanted", None) != wanted:
        _launch_threads()
        threads = max(1, min(wanted, numba.config.NUMBA_NUM_THREADS))
        numba.set_num_threads(threads)
        _thread_state.wanted, _thread_state.threads = wanted, threads
    return _thread_state.threads


_thread_state = threading.local()


# Values (output pixels x channels) per inner loop at stride 1: long vector loops even with few channels.
# Measured, two threads, float32: 256 -> 1024 gave 26 -> 27 GMAC/s at k3 C32, 27 -> 37 at k7 C96,
# 27 -> 31 at k5 C480 and 29 -> 31 at k31; 2048 and more were slower (the tiled weight leaves L1/L2).
TILE_VALUES = 1024

# Bytes of the input, weight and output streams one channel block of an unrolled block keeps in L1 (32 KiB
# here). Without blocks, 3x3 over 1024 channels ran at 8 GMAC/s: 31 streams of 4 KiB each.
L1_BUDGET = 16384

# Pad the input once (into a temporary) when more than this share of output pixels would miss the unrolled
# blocks because their windows cross the zero padding (7x7 maps at k7, padding 3: all of them), and the
# kernel has at least PAD_MIN_TAPS taps. Measured, one thread, float32, padded vs not: k7 96x56x56 493 vs
# 562 us, k7 384x14x14 159 vs 178 us; but k5 480x14x14 125 vs 119 us and k3 512x14x14 87 vs 61 us (the
# copy costs more than the few taps of the border pixels it saves).
PAD_BORDER_SHARE = 0.1
PAD_MIN_TAPS = 49
# Fewer than FEW_CHANNELS channels make a border pixel's loop (C values) short for the vector unit, so
# padding pays from PAD_MIN_TAPS_FEW_CHANNELS taps, and it is the only case where the tiled loop pads.
# Measured, two threads, float32, padded vs not: 5x5 over 32 channels at 56x56 71 vs 102 us (over 96
# channels: 192 vs 193; 3x3 over 32 channels at 112x112: 143 vs 140); 1-D k64 over 8 channels (EEGNet)
# 0.22 vs 0.62 ms; but k31 over 128 channels at 56x56 17.5 vs 15.8 ms (55 % more taps, on zeros).
FEW_CHANNELS = 64
PAD_MIN_TAPS_FEW_CHANNELS = 25

# Channels-last inputs with at most this many channels go to the planar kernels through a transpose in
# and out: a few channels make short vectors for the channels-last loops but leave the planar rows long.
# Measured, two threads, float32, forward / fwd+bwd (us), channels-last kernels vs transposes + planar:
# EEGNet 8x64x128 1x64 216/1375 vs 199/643, 64x1 M2 113/421 vs 64/245; 112x112 3x3 over 4 channels
# 127/466 vs 77/276, over 8 162/551 vs 124/387, but over 16 121/465 vs 227/857.
FEW_CHANNELS_PLANAR = 8

# Contiguous inputs whose output planes have fewer pixels than this go to the channels-last kernels through
# transposes instead (with more than FEW_CHANNELS_PLANAR channels): a small plane is a short task for the
# planar loops, a row of many channels a long one for the channels-last loops. Measured, two threads,
# float32, fwd+bwd, transposes + channels-last as a share of planar: 960x7x7 3x3 0.70 (batch 4: 0.40,
# batch 32: 0.58), 1024x7x7 0.73, 512x14x14 s2 (7x7 out) 0.83, 672x14x14 5x5 s2 0.66; at 14x14 out mixed
# (512 3x3: 0.85, batch 8: 1.49; 480 5x5: 0.82), from 24x24 out slower (256 3x3: 1.17, 128x56x56: 1.71).
PLANAR_MIN_OUTPUT_PIXELS = 100

# Column ranges per row: enough tasks to keep every thread busy (and balanced) when rows are few,
# but ranges no narrower than MIN_CHUNK_COLUMNS, so the vector loops stay long.
TASKS_PER_THREAD = 4
MIN_CHUNK_COLUMNS = 16


def _col_chunks(rows: int, columns: int, threads: int) -> int:
    if threads == 1 or rows >= TASKS_PER_THREAD * threads:
        return 1
    wanted = -(-TASKS_PER_THREAD * threads // rows)
    return max(1, min(wanted, columns // MIN_CHUNK_COLUMNS))


def _channel_block(streams: int, itemsize: int) -> int:
    """Channels per block when ``streams`` rows of them must fit :data:`L1_BUDGET`: a multiple of 16, at least 16."""
    return max(16, L1_BUDGET // (itemsize * streams) // 16 * 16)


def _border_share(in_size, out_size, kernel, stride, pad, rows=True) -> float:
    """The share of output pixels whose windows (``kernel``: their spans) cross the padding; with
    ``rows=False``, only the side borders count."""
    (h, w), (oh, ow), (kh, kw), (sh, sw), (ph, pw) = in_size, out_size, kernel, stride, pad
    lo, hi = numba_planar.interior(0, oh, sh, ph, kh - 1, h) if rows else (0, oh)
    left, right = numba_planar.interior(0, ow, sw, pw, kw - 1, w)
    return 1 - (hi - lo) * (right - left) / (oh * ow)


class _Pass(NamedTuple):
    """How :func:`_forward` runs for one signature (the forward, or the stride-1 input gradient)."""
    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int]  # zero padding before, clipped by the kernel ((0, 0) once padded)
    dilation: tuple[int, int]
    padded: tuple | None  # the once-padded input's NHWC shape, or None
    unrolled: int  # the :mod:`~sepconv.kernels._unrolled` kind, 0: none
    channel_block: int
    tile: int  # copies of the weight side by side (see _forward)
    col_chunks: int


def _forward_pass(in_shape, out_hw, kernel, stride, pad, dilation, threads, itemsize) -> _Pass:
    """The plan of one :func:`_forward` run of ``in_shape`` (NHWC) into ``out_hw``: unrolled block or tiled
    weight, and whether to pad first (:data:`PAD_BORDER_SHARE`, :data:`PAD_MIN_TAPS`)."""
    n, h, w, c = in_shape
    kh, kw = kernel
    unrolled, block, tile = 0, 1, 1
    kind = unroll.block_kind(kernel, stride[1]) if dilation == (1, 1) else 0
    if kind and out_hw[1] >= unroll.PIXELS:
        unrolled = kind
        pixels = unroll.PIXELS
        streams = kh * unroll.input_columns(pixels, kw, stride[1]) + kh * kw + pixels  # input, weight, output
        block = _channel_block(streams, itemsize)
    elif stride[1] == 1:
        # Laying out the tiled weight costs taps x tile x C writes per call against taps x pixels x C
        # multiply-adds: keep it at 1/8 of them (measured: 64x1 taps over 16 channels and 128 output pixels,
        # weight 35 us at tile 64, kernel 10 us at tile 64 or 8).
        tile = max(1, min(TILE_VALUES // c, n * out_hw[0] * out_hw[1] // 8))
    # The blocks need every tap inside, so they pad both axes; the tiled loop clips rows for free and only
    # suffers at the side borders (one pixel's C values per loop), so it pads the width alone.
    padded = None
    span = tuple(map(effective_kernel_size, kernel, dilation))
    axes = (0, 1) if unrolled else (1,)
    few = c < FEW_CHANNELS
    if ((unrolled or few) and min(pad) >= 0 and any(pad[a] for a in axes)
            and kh * kw >= (min(PAD_MIN_TAPS, PAD_MIN_TAPS_FEW_CHANNELS) if few else PAD_MIN_TAPS)
            and _border_share((h, w), out_hw, span, stride, pad, rows=bool(unrolled)) > PAD_BORDER_SHARE):
        after = [max(0, (o - 1) * s + k - p - size) if a in axes else 0
                 for a, o, s, k, p, size in zip((0, 1), out_hw, stride, span, pad, (h, w))]
        before = tuple(p if a in axes else 0 for a, p in enumerate(pad))
        padded = ((n, before[0] + h + after[0], before[1] + w + after[1], c), before)
        pad = tuple(p - b for p, b in zip(pad, before))
    return _Pass(kernel, stride, pad, dilation, padded, unrolled, block, tile, _col_chunks(n * out_hw[0], out_hw[1], threads))


def _weight_grad_plan(kernel_w, stride_w, dilation_w, itemsize) -> tuple[int, int]:
    """The weight-gradient block kind for :func:`_weight_grad` (0: none) and its channel block."""
    kind = unroll.wgrad_kind(kernel_w, stride_w) if dilation_w == 1 else 0
    if not kind:
        return 0, 1
    columns = unroll.COLUMNS
    streams = columns + unroll.input_columns(columns, kernel_w, stride_w) + 2 * kernel_w  # output gradient, input, sums
    return kind, _channel_block(streams, itemsize)


class _Plan(NamedTuple):
    """Everything about a call that its signature decides (:func:`_plan`), worked out once."""
    rank: int
    channels_last: bool  # the output's layout: see depthwise_conv
    pad_mode: tuple | None  # F.pad's (pad, mode) for padding modes other than zeros
    multiplier: int  # the input's channels are repeated M times inside (_repeated)
    forward_in_shape: tuple  # (N, H, W, C*M): what the forward kernel reads (after F.pad, repeated)
    out_shape: tuple  # (N, OH, OW, C*M): what the kernels write
    stride: tuple[int, int]
    pad: tuple[int, int]  # zero padding before
    dilation: tuple[int, int]
    forward: _Pass
    input_grad: _Pass | None  # stride 1: the forward kernel with the flipped weight
    gather_chunks: int  # column chunks of _input_grad (strided: the gather kernel)
    weight_grad: tuple[int, int, int, int]  # unrolled kind, channel block, column chunks, partial sums
    planar: numba_planar.Geometry | None  # the planar kernels: contiguous NCHW, or transposed with few channels


def _is_contiguous(shape, strides) -> bool:
    """``Tensor.is_contiguous()`` from sizes and strides (size-1 dimensions have any stride)."""
    expected = 1
    for size, stride in zip(reversed(shape), reversed(strides)):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


@functools.lru_cache(maxsize=1024)
def _plan(x_shape, x_strides, w_shape, w_strides, padding, stride, dilation, padding_mode, threads, itemsize) -> _Plan:
    """The plan for one call signature: the Python side of a call costs as much as a small layer's
    kernels otherwise (measured: 960x7x7 3x3 forward, 100 us a call around a 17 us kernel)."""
    rank = len(w_shape) - 2
    channels = x_shape[1]
    contiguous = _is_contiguous(x_shape, x_strides)
    if rank == 1:
        n, _, length = x_shape
        channels_last = channels > 1 and length > 1 and _is_contiguous((n, length, channels), (
            x_strides[0], x_strides[2], x_strides[1]))
        x_shape, w_shape = (n, channels, 1, length), (w_shape[0], 1, 1, w_shape[2])
        stride, dilation, padding = (1, *stride), (1, *dilation), ((0, 0), *padding)
    padded_any = any(b or a for b, a in padding)
    if rank == 2:
        # PyTorch's CPU convolution returns channels_last when its input or weight suggests it; its
        # circular F.pad returns a contiguous tensor, so the reference's output is contiguous then.
        channels_last = (are_strides_like_channels_last_or_false(x_shape, x_strides)
                         and not (padding_mode == "circular" and padded_any)) or \
            are_strides_like_channels_last_or_false(w_shape, w_strides)
    pad_mode = None
    if padding_mode != "zeros" and padded_any:
        pad_mode = ([v for pair in reversed(padding) for v in pair], _PAD_MODE[padding_mode])
        x_shape = (*x_shape[:2], *(n + b + a for n, (b, a) in zip(x_shape[2:], padding)))
        padding = ((0, 0), (0, 0))
    kernel = tuple(w_shape[2:])
    before = tuple(b for b, _ in padding)
    out_hw = output_shape(x_shape[2:], kernel, stride, padding, dilation)
    in_shape = (x_shape[0], *x_shape[2:], w_shape[0])
    forward = _forward_pass(in_shape, out_hw, kernel, stride, before, dilation, threads, itemsize)
    input_grad = None
    if stride == (1, 1):
        # The transposed convolution at stride 1 is a convolution of grad_out with the flipped kernel,
        # padded by k_eff - 1 - pad before: the fast forward kernel does it.
        flipped_pad = tuple(effective_kernel_size(k, d) - 1 - p for k, d, p in zip(kernel, dilation, before))
        input_grad = _forward_pass((x_shape[0], *out_hw, w_shape[0]), in_shape[1:3], kernel, stride, flipped_pad,
                                   dilation, threads, itemsize)
    rows = x_shape[0] * out_hw[0]
    col_chunks = _col_chunks(rows, out_hw[1], threads)
    weight_grad = (*_weight_grad_plan(kernel[1], stride[1], dilation[1], itemsize), col_chunks,
                   max(1, min(threads, rows * col_chunks)))
    gather_chunks = _col_chunks(x_shape[0] * x_shape[2], x_shape[3], threads)
    planar = None
    # Contiguous in and out: no transposes (unless planes are small). Channels-last in or out: transposes,
    # worth it with few channels.
    if (contiguous and not channels_last and out_hw[0] * out_hw[1] >= PLANAR_MIN_OUTPUT_PIXELS) \
            or channels <= FEW_CHANNELS_PLANAR:
        planar = numba_planar.plan(x_shape[0], channels, x_shape[2:], out_hw, kernel, stride, before, dilation, threads)
    return _Plan(rank, channels_last, pad_mode, w_shape[0] // channels, in_shape, (x_shape[0], *out_hw, w_shape[0]),
                 stride, before, dilation, forward, input_grad, gather_chunks, weight_grad, planar)


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
    with _LAUNCH_LOCK:
        if not _launched:
            _start_pool()
            _launched = True


_LAUNCH_LOCK = threading.Lock()


def _start_pool() -> None:
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


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


_scratch: dict[tuple[str, torch.dtype], np.ndarray] = {}
_NUMPY_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}
_TORCH_DTYPE = {v: k for k, v in _NUMPY_DTYPE.items()}


def _temporary(role: str, shape, dtype) -> np.ndarray:
    """An uninitialised array for a temporary that never leaves a launch, taken from one buffer kept
    per role and dtype (the largest asked for so far; only used while holding :data:`_LOCK`).

    Fresh multi-megabyte tensors cost page faults on every call (glibc maps large blocks anew each
    time): measured at 32x32x112x112 3x3, forward from a contiguous input, 57 -> 33 ms per call.
    NumPy, not PyTorch: a slice and reshape cost 0.4 us against 4 us for a tensor and its NumPy view.
    """
    numel = math.prod(shape)
    buffer = _scratch.get((role, dtype))
    if buffer is None or buffer.size < numel:
        buffer = _scratch[role, dtype] = np.empty(numel, _NUMPY_DTYPE[dtype])
    return buffer[:numel].reshape(shape)


_NO_BIAS = {torch.float32: np.empty(0, np.float32), torch.float64: np.empty(0, np.float64)}


def _weights(weight: torch.Tensor, bias, kernel, tile: int, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's ``(C, 1, *kernel)`` weight as the kernels take it, ``(KH, KW, tile*C)`` (flipped for the
    input gradient), and the start values ``(tile*C,)`` (the bias or zeros), in temporaries."""
    c, taps, values = weight.shape[0], kernel[0] * kernel[1], tile * weight.shape[0]
    out = _temporary("weight", (taps, values), weight.dtype)
    start = _temporary("start", (values,), weight.dtype)
    source = np.ascontiguousarray(_np(weight).reshape(c, taps))
    _prepare_weight(source, _NO_BIAS[weight.dtype] if bias is None else _np(bias), flip, out, start)
    return out.reshape(*kernel, values), start


def _taps(weight: torch.Tensor) -> np.ndarray:
    """PyTorch's ``(C, 1, *kernel)`` weight as ``(C, taps)``, C-contiguous (a view when it already is)."""
    return np.ascontiguousarray(_np(weight).reshape(weight.shape[0], -1))


def _run(p: _Pass, xl: np.ndarray, weight: torch.Tensor, bias, flip: bool, out: np.ndarray) -> None:
    """:func:`_forward` of channels-last ``xl`` into ``out`` as ``p`` plans it (padding ``xl`` first if so)."""
    w, start = _weights(weight, bias, p.kernel, p.tile, flip)
    if p.padded is not None:
        padded = _temporary("padded", p.padded[0], weight.dtype)
        _pad_into(xl, padded, *p.padded[1])
        xl = padded
    _forward(xl, w, start, out, *p.stride, *p.pad, *p.dilation, p.col_chunks, p.unrolled, p.channel_block)


def _channels_last(t: torch.Tensor, role: str) -> np.ndarray:
    """``(N, C, H, W)`` -> its ``(N, H, W, C)`` permutation, C-contiguous, for reading only: a view when
    ``t`` already is channels_last, else a temporary (:func:`_temporary`) filled by the Numba transpose
    (PyTorch's permuted copy took 1.1-3x as long, measured)."""
    view = t.permute(0, 2, 3, 1)
    if view.is_contiguous():
        return _np(view)
    n, c, h, w = t.shape
    out = _temporary(role, view.shape, t.dtype)
    if t.is_contiguous():
        _transpose(_np(t).reshape(n, c, h * w), out.reshape(n, h * w, c))
    else:
        out[...] = _np(view)
    return out


def _repeated(xl: np.ndarray, multiplier: int) -> np.ndarray:
    """``(N, H, W, C)`` -> ``(N, H, W, C*M)``, each channel ``M`` times (in a temporary), for ``M > 1``."""
    if multiplier == 1:
        return xl
    c = xl.shape[3]
    out = _temporary("repeated", (*xl.shape[:3], c * multiplier), _TORCH_DTYPE[xl.dtype.type])
    _repeat_channels(xl.reshape(-1, c), out.reshape(-1, c * multiplier))
    return out


def _from_channels_last(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """``(N, H, W, C)`` C-contiguous values -> a new contiguous ``(N, C, H, W)`` tensor."""
    n, h, w, c = values.shape
    out = like.new_empty(n, c, h, w)
    _transpose(values.reshape(n, h * w, c), _np(out).reshape(n, c, h * w))
    return out


def _planar_output(t: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """A planar kernel's contiguous result in the layout ``plan`` wants (a transposed copy for channels_last;
    PyTorch's copy measured as fast as :func:`_transpose` here, which has one task per image at 8 channels)."""
    return t.contiguous(memory_format=torch.channels_last) if plan.channels_last else t


def _forward_call(x: torch.Tensor, weight: torch.Tensor, bias, plan: _Plan) -> torch.Tensor:
    """The forward of ``(N, C, H, W)`` ``x`` as ``plan`` says, in the output layout it says."""
    if plan.planar is not None:
        n, oh, ow, cm = plan.out_shape
        out = x.new_empty(n, cm, oh, ow)
        with _LOCK:
            numba_planar.forward(_np(x.contiguous()), _taps(weight), _NO_BIAS[x.dtype] if bias is None else _np(bias),
                                 _np(out), plan.planar)
        return _planar_output(out, plan)
    with _LOCK:
        xl = _repeated(_channels_last(x, "input"), plan.multiplier)
        if plan.channels_last:  # the kernel writes the result itself, returned as a channels_last view
            result = x.new_empty(plan.out_shape)
            _run(plan.forward, xl, weight, bias, False, _np(result))
            return result.permute(0, 3, 1, 2)
        out = _temporary("output", plan.out_shape, x.dtype)
        _run(plan.forward, xl, weight, bias, False, out)
        return _from_channels_last(out, x)


class DepthwiseConv(torch.autograd.Function):
    """``(N, C, H, W)`` input of any layout, PyTorch's ``(C, 1, *kernel)`` weight, optional ``(C,)`` bias ->
    ``(N, C, OH, OW)`` as :class:`_Plan` ``plan`` says (geometry, output layout).

    The kernels run on channels-last data; layout changes happen in here (forward and backward),
    through :func:`_transpose` where a transposing copy is needed, and a gradient leaves in its
    input's layout. Calls that need no gradient skip this Function (:func:`depthwise_conv`).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, plan):
        ctx.save_for_backward(x, weight)
        ctx.plan = plan
        return _forward_call(x, weight, bias, plan)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        plan = ctx.plan
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            # create_graph=True (double backward, e.g. a gradient penalty): the Numba kernels are not
            # differentiable, so this rare path takes the gradient of the PyTorch twin instead.
            grads = _reference_grads(x, weight, grad_out, plan, (needs_x, needs_w))
            return *grads, grad_out.sum((0, 2, 3)) if needs_b else None, None
        _threads()  # the backward may run on another thread than the forward
        if plan.planar is not None:
            grad_x, grad_w = _planar_grads(x, weight, grad_out, plan.planar, needs_x, needs_w)
            if grad_x is not None and not x.is_contiguous():
                grad_x = _planar_output(grad_x, plan)  # the input's layout (then the output's too)
            return grad_x, grad_w, grad_out.sum((0, 2, 3)) if needs_b else None, None
        grad_x = grad_w = grad_b = None
        with _LOCK:
            gl = _channels_last(grad_out, "grad_output")
            if needs_x:
                shape = (x.shape[0], x.shape[2], x.shape[3], x.shape[1])
                if x.permute(0, 2, 3, 1).is_contiguous():  # the gradient leaves in the input's layout
                    grad_x = x.new_empty(shape)
                    grad_xl = _np(grad_x)
                    grad_x = grad_x.permute(0, 3, 1, 2)
                else:
                    grad_xl = _temporary("output", shape, x.dtype)
                # With a depth multiplier: the repeated input's gradient, then each group of M summed.
                full = grad_xl if plan.multiplier == 1 else _temporary("grad_repeated", plan.forward_in_shape, x.dtype)
                if plan.input_grad is not None:
                    _run(plan.input_grad, gl, weight, None, True, full)
                else:
                    w, _ = _weights(weight, None, plan.forward.kernel, 1, False)
                    _input_grad(gl, w, full, *plan.stride, *plan.pad, *plan.dilation, plan.gather_chunks)
                if plan.multiplier > 1:
                    _sum_groups(full.reshape(-1, full.shape[3]), grad_xl.reshape(-1, shape[3]))
                if grad_x is None:
                    grad_x = _from_channels_last(grad_xl, x)
            if needs_w:
                xl = _repeated(_channels_last(x, "input"), plan.multiplier)
                unrolled, block, col_chunks, chunks = plan.weight_grad
                taps, c = plan.forward.kernel[0] * plan.forward.kernel[1], weight.shape[0]
                partial = _temporary("partial", (chunks, *plan.forward.kernel, c), x.dtype)
                _weight_grad(xl, gl, partial, *plan.stride, *plan.pad, *plan.dilation, col_chunks, unrolled, block)
                grad_w = weight.new_empty(weight.shape)
                _reduce_partials(partial.reshape(chunks, taps, c), _np(grad_w).reshape(c, taps))
            if needs_b:
                grad_b = torch.from_numpy(gl).sum((0, 1, 2))
        return grad_x, grad_w, grad_b, None


def _planar_grads(x, weight, grad_out, geometry, needs_x: bool, needs_w: bool):
    """Input and weight gradients through :mod:`~sepconv.kernels.numba_planar` (contiguous results)."""
    gy = _np(grad_out.contiguous())
    taps = _taps(weight)
    grad_x = grad_w = None
    with _LOCK:
        if needs_x:
            grad_x = x.new_empty(x.shape)
            numba_planar.input_grad(gy, taps, _np(grad_x), geometry)
        if needs_w:
            grad_w = weight.new_empty(weight.shape)
            numba_planar.weight_grad(_np(x.contiguous()), gy, _np(grad_w).reshape(taps.shape), geometry)
    return grad_x, grad_w


def _reference_grads(x, weight, grad_out, plan: _Plan, needs):
    """Gradients of the same convolution through PyTorch (differentiable, for double backward)."""
    stride, pad, dilation, kernel = plan.stride, plan.pad, plan.dilation, plan.forward.kernel
    with torch.enable_grad():
        after = [(o - 1) * s + effective_kernel_size(k, d) - n - b
                 for o, s, k, d, n, b in zip(grad_out.shape[2:], stride, kernel, dilation, x.shape[2:], pad)]
        xs = F.pad(x, [pad[1], after[1], pad[0], after[0]])  # negative "after" crops unused rows/columns
        out = F.conv2d(xs, weight.reshape(weight.shape[0], 1, *kernel), None, stride, 0, dilation, xs.shape[1])
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


def depthwise_conv(x, weight, bias, stride, padding, dilation, padding_mode):
    """Same contract and values as ``reference.conv(..., groups=C, ...)`` for 1-D/2-D float32/float64.

    The output's layout is the reference's in 2-D (channels_last when PyTorch's convolution would pick
    it). In 1-D, an ``(N, L, C)``-backed input gives an ``(N, L, C)``-backed output, where PyTorch would
    return a contiguous one: transposing it back would take several times the convolution's own time,
    and a block of 1-D layers can then stay channels-last.
    """
    threads = _threads()
    plan = _plan(x.shape, x.stride(), weight.shape, weight.stride(), tuple(map(tuple, padding)), tuple(stride),
                 tuple(dilation), padding_mode, threads, x.element_size())
    if plan.rank == 1:
        x = x.unsqueeze(2)
    if plan.pad_mode is not None:
        x = F.pad(x, *plan.pad_mode)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        out = DepthwiseConv.apply(x, weight, bias, plan)
    else:
        out = _forward_call(x, weight, bias, plan)
    return out.squeeze(2) if plan.rank == 1 else out


def compile_all() -> float:
    """Compile (or load from Numba's cache) every specialisation; returns the seconds it took."""
    start = time.perf_counter()
    for dtype, channels_last in ((d, c) for d in DTYPES for c in (False, True)):  # planar and channels-last kernels
        x = torch.randn(1, 2, 3, 3, dtype=dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        x.requires_grad_()
        w = torch.randn(2, 1, 2, 2, dtype=dtype, requires_grad=True)
        for stride in ((1, 1), (2, 2)):  # stride 1 takes its input gradient from the forward kernel
            depthwise_conv(x, w, None, stride, ((0, 0), (0, 0)), (1, 1), "zeros").sum().backward()
        with torch.no_grad():
            depthwise_conv(x, w, torch.randn(2, dtype=dtype), (1, 1), ((0, 0), (0, 0)), (1, 1), "zeros")
    return time.perf_counter() - start
