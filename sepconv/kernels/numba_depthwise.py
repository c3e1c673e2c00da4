"""Depthwise convolution kernels in Numba: channels-last, channels as the vector dimension.

Layout: the kernels see ``x`` as ``(N, H, W, C)`` and the weight as ``(KH, KW, C)``, both C-contiguous,
and write ``(N, OH, OW, C)``; 1-D runs as 2-D with ``H = KH = 1``. Every inner loop runs over ``C``
with unit stride (over ``T`` neighbouring pixels' channels at stride 1, see ``_forward``), so LLVM
vectorises it (AVX-512 where the CPU has it); taps go four at a time per pass. Zero padding is not
materialised: each output row and column clips its tap range to the input (``_tap_range``); other
padding modes are padded once by ``F.pad`` before the kernel (autograd then folds the padded border's
gradient back). For the common kernel sizes at stride 1 (:mod:`sepconv.kernels.unroll`), the forward and
weight-gradient interiors go through generated blocks with every tap unrolled and the sums in
registers; on small maps, where many windows cross the padding, the input is zero-padded once into a
temporary so the blocks cover every pixel (:data:`PAD_BORDER_SHARE`, large kernels only). A depth
multiplier ``M > 1`` repeats the input's channels ``M`` times first (``repeat_interleave``, output order
``c*M + m``), so the kernels only ever see ``M = 1``: two compiled specialisations per kernel (float32,
float64).

The three kernels (forward, input gradient, weight gradient) are wrapped in one
``torch.autograd.Function`` (:class:`DepthwiseConv`), which also changes layouts (NCHW <-> NHWC through
a Numba transpose, into temporaries reused from call to call); padding modes other than zeros and the
multiplier expansion are ordinary PyTorch ops before it, so autograd differentiates them.
:func:`depthwise_conv` has the signature of :func:`sepconv.kernels.depthwise_conv` and returns its
output in the layout the reference would give in 2-D (channels_last when PyTorch's convolution would
pick it) and in its input's layout in 1-D.

Compilation options are :data:`sepconv.kernels._jit.OPTIONS`: FMA contraction only, so sums run in a fixed
order and results are deterministic for a given thread count.
"""

from __future__ import annotations

import math
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

from . import _unrolled
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

    With ``unrolled > 0`` (a kind of :mod:`sepconv.kernels._unrolled`: this kernel size, horizontal
    stride 1, no dilation, ``w`` untiled), runs of :data:`~sepconv.kernels._unrolled.PIXELS` pixels
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
        # Unrolled blocks cover the run of pixels whose taps are all inside (stride 1: w0 = ow - pw); the
        # run's last block overlaps the one before instead of leaving a remainder to the loop below.
        fast_lo, fast_hi = max(ow_start, pw), min(ow_end, wd - span_w + pw)
        fast = full_rows and fast_hi - fast_lo >= block
        ow = ow_start
        while ow < ow_end:
            if fast and fast_lo <= ow < fast_hi:
                at = min(ow, fast_hi - block)
                _unrolled.block(unrolled, xf, wf, start_values, of, numba.uint64(((n * oh_size + oh) * ow_size + at) * c),
                                numba.uint64(((n * h + h0) * wd + at - pw) * c), uc, urow, ucb)
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
        ow_lo = max(col_lo, -(shift // sw)) if shift < 0 else col_lo
        last = wd - 1 - shift
        ow_hi = min(col_hi, last // sw + 1) if last >= 0 else 0
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
    width, horizontal stride 1, no horizontal dilation), each kernel row's columns whose taps are all
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
            # Columns the blocks take (stride 1: every tap inside from pw to wd - kw_size + 1 + pw).
            fast_lo, fast_hi = max(col_lo, pw), min(col_hi, wd - kw_size + 1 + pw)
            fast_hi = fast_lo + max(0, fast_hi - fast_lo) // columns * columns if unrolled > 0 else fast_lo
            for kh in range(kh_lo, kh_hi):
                xrow = (n * h + h0 + kh * dh) * wd
                for ow in range(fast_lo, fast_hi, columns):
                    _unrolled.wgrad_block(unrolled, xf, gf, acc, numba.uint64((row * ow_size + ow) * c),
                                          numba.uint64((xrow + ow - pw) * c), numba.uint64(kh * kw_size * c), uc, ucb)
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


# Values (output pixels x channels) per inner loop at stride 1: long vector loops even with few channels.
# Measured, two threads, float32: 256 -> 1024 gave 26 -> 27 GMAC/s at k3 C32, 27 -> 37 at k7 C96,
# 27 -> 31 at k5 C480 and 29 -> 31 at k31; 2048 and more were slower (the tiled weight leaves L1/L2).
TILE_VALUES = 1024


def _tiled(weight: torch.Tensor, stride_w: int) -> torch.Tensor:
    """``(KH, KW, C)`` -> ``(KH, KW, T*C)``, ``T`` copies side by side (``T = 1`` when strided)."""
    tile = max(1, TILE_VALUES // weight.shape[2]) if stride_w == 1 else 1
    return weight.repeat(1, 1, tile) if tile > 1 else weight.contiguous()


# Bytes of the input, weight and output streams one channel block of an unrolled block keeps in L1 (32 KiB
# here). Without blocks, 3x3 over 1024 channels ran at 8 GMAC/s: 31 streams of 4 KiB each.
L1_BUDGET = 16384


def _forward_plan(weight: torch.Tensor, stride_w: int, dilation) -> tuple[torch.Tensor, int, int]:
    """The weight as :func:`_forward` takes it, the unrolled block kind (0: none) and its channel block."""
    kh, kw, _ = weight.shape
    if stride_w == 1 and tuple(dilation) == (1, 1) and (kh, kw) in _unrolled.SIZES:
        streams = kh * (_unrolled.PIXELS + kw - 1) + kh * kw + _unrolled.PIXELS  # input, weight, output
        return weight.contiguous(), _unrolled.SIZES.index((kh, kw)) + 1, _channel_block(streams, weight)
    return _tiled(weight, stride_w), 0, 1


def _weight_grad_plan(weight: torch.Tensor, stride_w: int, dilation_w: int) -> tuple[int, int]:
    """The weight-gradient block kind for :func:`_weight_grad` (0: none) and its channel block."""
    kw = weight.shape[1]
    if stride_w != 1 or dilation_w != 1 or kw not in _unrolled.WIDTHS:
        return 0, 1
    streams = 2 * _unrolled.COLUMNS + kw - 1 + 2 * kw  # output gradient, input, accumulators (load, store)
    return _unrolled.WIDTHS.index(kw) + 1, _channel_block(streams, weight)


def _channel_block(streams: int, like: torch.Tensor) -> int:
    """Channels per block when ``streams`` rows of them must fit :data:`L1_BUDGET`: a multiple of 16, at least 16."""
    return max(16, L1_BUDGET // (like.element_size() * streams) // 16 * 16)


# Pad the input once (into a temporary) when more than this share of output pixels would miss the unrolled
# blocks because their windows cross the zero padding (7x7 maps at k7, padding 3: all of them), and the
# kernel has at least PAD_MIN_TAPS taps. Measured, one thread, float32, padded vs not: k7 96x56x56 493 vs
# 562 us, k7 384x14x14 159 vs 178 us; but k5 480x14x14 125 vs 119 us and k3 512x14x14 87 vs 61 us (the
# copy costs more than the few taps of the border pixels it saves).
PAD_BORDER_SHARE = 0.1
PAD_MIN_TAPS = 49


def _border_share(in_size, out_size, kernel, stride_h, pad) -> float:
    """The share of output pixels whose windows cross the padding (stride 1 along the width)."""
    (h, w), (oh, ow), (kh, kw), (ph, pw) = in_size, out_size, kernel, pad
    rows = max(0, min(oh - 1, (h - kh + ph) // stride_h) - -(-ph // stride_h) + 1)
    columns = max(0, min(ow, w - kw + 1 + pw) - min(pw, ow))
    return 1 - rows * columns / (oh * ow)


def _run_forward(xl, weight, bias, out, stride, pad, dilation, threads) -> None:
    """:func:`_forward` of channels-last ``xl`` into ``out`` with its plan (:func:`_forward_plan`), the bias
    (or zeros) as start values, and the input padded first where :data:`PAD_BORDER_SHARE` and
    :data:`PAD_MIN_TAPS` say so."""
    kernel_weight, unrolled, block = _forward_plan(weight, stride[1], dilation)
    values = kernel_weight.shape[2]
    start = torch.zeros(values, dtype=xl.dtype) if bias is None else bias.repeat(values // len(bias))
    n, h, w, c = xl.shape
    out_hw, kernel = out.shape[1:3], weight.shape[:2]
    if (unrolled and min(pad) >= 0 and any(pad) and kernel[0] * kernel[1] >= PAD_MIN_TAPS
            and _border_share((h, w), out_hw, kernel, stride[0], pad) > PAD_BORDER_SHARE):
        after = [max(0, (o - 1) * s + k - p - size)
                 for o, s, k, p, size in zip(out_hw, stride, kernel, pad, (h, w))]
        padded = _temporary("padded", (n, h + pad[0] + after[0], w + pad[1] + after[1], c), xl.dtype)
        view = _np(padded)  # numpy: the temporary may have been made under inference_mode
        view[:, :pad[0]] = view[:, pad[0] + h:] = view[:, :, :pad[1]] = view[:, :, pad[1] + w:] = 0
        view[:, pad[0]:pad[0] + h, pad[1]:pad[1] + w] = _np(xl)
        xl, pad = padded, (0, 0)
    chunks = _col_chunks(out.shape[0] * out.shape[1], out.shape[2], threads)
    _forward(_np(xl), _np(kernel_weight), _np(start), _np(out), *stride, *pad, *dilation, chunks, unrolled, block)


# Column ranges per row: enough tasks to keep every thread busy (and balanced) when rows are few,
# but ranges no narrower than MIN_CHUNK_COLUMNS, so the vector loops stay long.
TASKS_PER_THREAD = 4
MIN_CHUNK_COLUMNS = 16


def _col_chunks(rows: int, columns: int, threads: int) -> int:
    if threads == 1 or rows >= TASKS_PER_THREAD * threads:
        return 1
    wanted = -(-TASKS_PER_THREAD * threads // rows)
    return max(1, min(wanted, columns // MIN_CHUNK_COLUMNS))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


_scratch: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def _temporary(role: str, shape, dtype) -> torch.Tensor:
    """An uninitialised tensor for a temporary that never leaves a launch, taken from one buffer kept
    per role and dtype (the largest asked for so far; only used while holding :data:`_LOCK`).

    Fresh multi-megabyte tensors cost page faults on every call (glibc maps large blocks anew each
    time): measured at 32x32x112x112 3x3, forward from a contiguous input, 57 -> 33 ms per call.
    """
    numel = math.prod(shape)
    buffer = _scratch.get((role, dtype))
    if buffer is None or buffer.numel() < numel:
        buffer = _scratch[role, dtype] = torch.empty(numel, dtype=dtype)
    return buffer[:numel].view(shape)


def _to_channels_last(t: torch.Tensor, role: str) -> torch.Tensor:
    """``(N, C, H, W)`` -> its ``(N, H, W, C)`` permutation, contiguous, for reading only: a view when ``t``
    already is channels_last, else a temporary (:func:`_temporary`) filled by the Numba transpose
    (PyTorch's permuted copy took 1.1-3x as long, measured)."""
    view = t.permute(0, 2, 3, 1)
    if view.is_contiguous():
        return view
    n, c, h, w = t.shape
    out = _temporary(role, view.shape, t.dtype)
    if t.is_contiguous():
        _transpose(_np(t).reshape(n, c, h * w), _np(out).reshape(n, h * w, c))
    else:
        _np(out)[...] = _np(view)  # numpy: the temporary may have been made under inference_mode
    return out


def _to_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``(N, H, W, C)`` contiguous -> ``(N, C, H, W)``: channels_last strides (a view) or contiguous."""
    if channels_last:
        return t.permute(0, 3, 1, 2)
    n, h, w, c = t.shape
    out = t.new_empty(n, c, h, w)
    _transpose(_np(t).reshape(n, h * w, c), _np(out).reshape(n, c, h * w))
    return out


class DepthwiseConv(torch.autograd.Function):
    """``(N, C, H, W)`` input of any layout, ``(KH, KW, C)`` weight, optional ``(C,)`` bias ->
    ``(N, C, OH, OW)``, channels_last strides or contiguous as asked; zero padding ``(ph, pw)`` before.

    The kernels run on channels-last data; layout changes happen in here (forward and backward),
    through :func:`_transpose` where a transposing copy is needed, and a gradient leaves in its
    input's layout.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, out_size, stride, pad, dilation, channels_last_out):
        out_shape = (x.shape[0], out_size[0], out_size[1], x.shape[1])
        with _LOCK:
            threads = _threads()  # first: it starts Numba's thread pool the way it must be started
            xl = _to_channels_last(x, "input")
            # The result itself when it leaves as a channels_last view, else a temporary transposed out.
            out = x.new_empty(out_shape) if channels_last_out else _temporary("output", out_shape, x.dtype)
            _run_forward(xl, weight, bias, out, stride, pad, dilation, threads)
            result = _to_layout(out, channels_last_out)
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, pad, dilation)
        return result

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, pad, dilation = ctx.geometry
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        none = (None,) * 5
        if torch.is_grad_enabled():
            # create_graph=True (double backward, e.g. a gradient penalty): the Numba kernels are not
            # differentiable, so this rare path takes the gradient of the PyTorch twin instead.
            grads = _reference_grads(x, weight, grad_out, stride, pad, dilation, (needs_x, needs_w))
            return (*grads, grad_out.sum((0, 2, 3)) if needs_b else None, *none)
        grad_x = grad_w = grad_b = None
        with _LOCK:
            threads = _threads()
            gl = _to_channels_last(grad_out, "grad_output")
            if needs_x:
                x_channels_last = x.permute(0, 2, 3, 1).is_contiguous()
                shape = (x.shape[0], x.shape[2], x.shape[3], x.shape[1])
                grad_xl = x.new_empty(shape) if x_channels_last else _temporary("output", shape, x.dtype)
                if stride == (1, 1):
                    # The transposed convolution at stride 1 is a convolution of grad_out with the flipped
                    # kernel, padded by k_eff - 1 - pad before: the fast forward kernel does it.
                    before = tuple((k - 1) * d - p for k, d, p in zip(weight.shape[:2], dilation, pad))
                    _run_forward(gl, weight.flip(0, 1), None, grad_xl, stride, before, dilation, threads)
                else:
                    chunks = _col_chunks(grad_xl.shape[0] * grad_xl.shape[1], grad_xl.shape[2], threads)
                    _input_grad(_np(gl), _np(weight.contiguous()), _np(grad_xl), *stride, *pad, *dilation, chunks)
                grad_x = _to_layout(grad_xl, x_channels_last)
            if needs_w:
                xl = _to_channels_last(x, "input")
                rows = gl.shape[0] * gl.shape[1]
                col_chunks = _col_chunks(rows, gl.shape[2], threads)
                chunks = max(1, min(threads, rows * col_chunks))
                partial = x.new_empty(chunks, *weight.shape)
                unrolled, block = _weight_grad_plan(weight, stride[1], dilation[1])
                _weight_grad(_np(xl), _np(gl), _np(partial), *stride, *pad, *dilation, col_chunks, unrolled, block)
                grad_w = partial[0] if chunks == 1 else partial.sum(0)
            if needs_b:
                grad_b = gl.sum((0, 1, 2))
        return grad_x, grad_w, grad_b, *none


def _reference_grads(x, weight, grad_out, stride, pad, dilation, needs):
    """Gradients of the same convolution through PyTorch (differentiable, for double backward)."""
    with torch.enable_grad():
        after = [(o - 1) * s + (k - 1) * d + 1 - n - b
                 for o, s, k, d, n, b in zip(grad_out.shape[2:], stride, weight.shape[:2], dilation, x.shape[2:], pad)]
        xs = F.pad(x, [pad[1], after[1], pad[0], after[0]])  # negative "after" crops unused rows/columns
        ws = weight.permute(2, 0, 1).unsqueeze(1)
        out = F.conv2d(xs, ws, None, stride, 0, dilation, xs.shape[1])
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


def _channels_last_1d(t: torch.Tensor) -> bool:
    """An ``(N, C, L)`` tensor backed by ``(N, L, C)`` memory: PyTorch's 1-D channels-last."""
    return t.shape[1] > 1 and t.shape[2] > 1 and t.permute(0, 2, 1).is_contiguous()


def depthwise_conv(x, weight, bias, stride, padding, dilation, padding_mode):
    """Same contract and values as ``reference.conv(..., groups=C, ...)`` for 1-D/2-D float32/float64.

    The output's layout is the reference's in 2-D (channels_last when PyTorch's convolution would pick
    it). In 1-D, an ``(N, L, C)``-backed input gives an ``(N, L, C)``-backed output, where PyTorch would
    return a contiguous one: transposing it back would take several times the convolution's own time,
    and a block of 1-D layers can then stay channels-last.
    """
    rank = weight.ndim - 2
    channels = x.shape[1]
    multiplier = weight.shape[0] // channels
    if rank == 1:
        channels_last = _channels_last_1d(x)
        x = x.unsqueeze(2)
        weight = weight.unsqueeze(2)
        stride, dilation, padding = (1, *stride), (1, *dilation), ((0, 0), *padding)
    else:
        # PyTorch's CPU convolution returns channels_last when its input or weight suggests it; its
        # circular F.pad returns a contiguous tensor, so the reference's output is contiguous then.
        input_channels_last = _suggests_channels_last(x) and not (
            padding_mode == "circular" and any(b or a for b, a in padding))
        channels_last = input_channels_last or _suggests_channels_last(weight)
    if padding_mode != "zeros" and any(b or a for b, a in padding):
        x = F.pad(x, [v for pair in reversed(padding) for v in pair], mode=_PAD_MODE[padding_mode])
        padding = ((0, 0), (0, 0))
    if multiplier > 1:
        # Repeated in the (N, H, W, C) view: the copy comes out channels-last, so the layout change
        # rides along with the repeat instead of costing a transpose of its own.
        x = x.permute(0, 2, 3, 1).repeat_interleave(multiplier, dim=3).permute(0, 3, 1, 2)
    wl = weight[:, 0].permute(1, 2, 0)  # (KH, KW, C*M)
    out_size = tuple((n + b + a - (k - 1) * d - 1) // s + 1
                     for n, (b, a), k, s, d in zip(x.shape[2:], padding, wl.shape[:2], stride, dilation))
    out = DepthwiseConv.apply(x, wl, bias, out_size, tuple(stride), tuple(b for b, _ in padding),
                              tuple(dilation), channels_last)
    return out.squeeze(2) if rank == 1 else out


def compile_all() -> float:
    """Compile (or load from Numba's cache) every specialisation; returns the seconds it took."""
    start = time.perf_counter()
    for dtype in DTYPES:
        x = torch.randn(1, 2, 3, 3, dtype=dtype, requires_grad=True)
        w = torch.randn(2, 1, 2, 2, dtype=dtype, requires_grad=True)
        for stride in ((1, 1), (2, 2)):  # stride 1 takes its input gradient from the forward kernel
            depthwise_conv(x, w, None, stride, ((0, 0), (0, 0)), (1, 1), "zeros").sum().backward()
    return time.perf_counter() - start

