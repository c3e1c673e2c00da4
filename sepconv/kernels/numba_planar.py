"""Depthwise convolution kernels in Numba for planar (contiguous NCHW) data: each channel a plane.

Channels-last kernels (:mod:`sepconv.kernels.numba_depthwise`) vectorise over channels; PyTorch's
default layout would make them pay a transposing copy on the way in and another on the way out, each
costing more than the convolution (measured, 32x112x112: 60-200 us a transpose against 20 us for a plain
copy). These kernels work on the planes where they lie and vectorise along the rows instead.

**The phase grid.** A task takes one input plane and a band of output rows. It first copies the input
rows the band reads into a small zero-padded buffer (in L1/L2), split into ``sh x sw`` phases (phase
``(a, b)`` holds the padded input's rows ``a, a + sh, ...`` and columns ``b, b + sw, ...``). Output pixel
``(y, x)``'s tap ``(i, j)`` then reads phase ``((i*dh) % sh, (j*dw) % sw)`` at row ``y + (i*dh)//sh`` and
column ``x + (j*dw)//sw``. Laid out flat with ``uw`` columns per row, that is the output's flat index
``q = y*uw + x`` plus one offset per tap: every tap is one long, unit-stride loop over the whole band
(:func:`_accumulate`), whatever the stride, dilation, padding or plane width. The price is
``uw - OW`` columns of discarded results per row (``(KW - 1) * dw // sw``), and zeros multiplied at the
side borders; each kernel row's taps skip the rows where they would read the top or bottom padding.

* Forward: the taps accumulated over the input's phase grid, started from the bias.
* Input gradient: the transposed convolution, as the same loop per phase of the input gradient (each
  phase is a stride-1 correlation of ``grad_out`` with the taps that land on it), then the phases are
  written back interleaved.
* Weight gradient: per tap, the dot product of ``grad_out`` (on the forward's grid, zeros in the
  discarded columns) with the phase grid; tasks are channels, so no reduction across threads is needed.

A depth multiplier ``M`` (output channel ``c*M + m`` reads input channel ``c``) loops inside a task, so
the input plane is gathered once for its ``M`` outputs. All three kernels are deterministic for any
thread count (a task owns its outputs).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba
import numpy as np

from ._jit import OPTIONS

_JIT = {**OPTIONS, "parallel": True}
# The weight gradient's sums are dot products: LLVM vectorises them only when it may reassociate the
# additions (several partial sums, added at the end). The order is fixed by the compiled code, so results
# are still the same from run to run.
_JIT_DOT = {**_JIT, "fastmath": {"contract", "reassoc"}}

# Values of one band's phase grid (the output band, and about as many input values): small enough to stay
# in L1/L2 while every tap streams over it.
BAND_VALUES = 4096
TASKS_PER_THREAD = 4
# Tasks go to the threads in this many chunks per thread, each allocating its buffers once: on small
# planes (960 channels of 7x7) one allocation per task cost as much as the task.
CHUNKS_PER_THREAD = 8


class Geometry(NamedTuple):
    """One signature's geometry, in the order the kernels take it."""
    sh: int
    sw: int
    ph: int  # zero padding before (top, left)
    pw: int
    dh: int
    dw: int
    kh: int
    kw: int
    rows_per_band: int  # forward and weight gradient: output rows per task
    grad_rows_per_band: int  # input gradient: phase rows per task
    threads: int


def plan(n: int, c: int, in_hw, out_hw, kernel, stride, pad, dilation, threads: int) -> Geometry:
    """Bands sized to :data:`BAND_VALUES`, cut finer when there would be fewer than
    :data:`TASKS_PER_THREAD` tasks per thread."""
    (h, w), (oh, ow), (kh, kw), (sh, sw), (ph, pw), (dh, dw) = in_hw, out_hw, kernel, stride, pad, dilation

    def rows(total, width):
        band = max(1, min(total, BAND_VALUES // width))
        wanted = TASKS_PER_THREAD * threads
        if n * c * math.ceil(total / band) < wanted:
            band = max(1, math.ceil(total / math.ceil(wanted / (n * c))))
        return band

    uw = ow + (kw - 1) * dw // sw
    grad_cols = max(-(-(pw + w) // sw), ow) + (kw - 1) * dw // sw
    return Geometry(sh, sw, ph, pw, dh, dw, kh, kw, rows(oh, uw), rows(-(-(ph + h) // sh), grad_cols * sh * sw), threads)


# --- building blocks -------------------------------------------------------------------------------

@numba.njit(**OPTIONS, inline="always")
def _accumulate(out, src, bases, weights, first, last, start, length):
    """``out[start:start + length] += sum(weights[t] * src[bases[t] + start:...] for t in range(first, last))``
    (``length`` values each), four taps per pass over ``out`` (one load and store per four multiply-adds)."""
    o = out[start:start + length]
    s = src[start:]
    ulength = numba.uint64(length)
    t = first
    while t + 4 <= last:
        b0, b1, b2, b3 = bases[t], bases[t + 1], bases[t + 2], bases[t + 3]
        w0, w1, w2, w3 = weights[t], weights[t + 1], weights[t + 2], weights[t + 3]
        for q in range(ulength):
            o[q] += w0 * s[b0 + q] + w1 * s[b1 + q] + w2 * s[b2 + q] + w3 * s[b3 + q]
        t += 4
    left = last - t
    if left == 3:
        b0, b1, b2 = bases[t], bases[t + 1], bases[t + 2]
        w0, w1, w2 = weights[t], weights[t + 1], weights[t + 2]
        for q in range(ulength):
            o[q] += w0 * s[b0 + q] + w1 * s[b1 + q] + w2 * s[b2 + q]
    elif left == 2:
        b0, b1, w0, w1 = bases[t], bases[t + 1], weights[t], weights[t + 1]
        for q in range(ulength):
            o[q] += w0 * s[b0 + q] + w1 * s[b1 + q]
    elif left == 1:
        b0, w0 = bases[t], weights[t]
        for q in range(ulength):
            o[q] += w0 * s[b0 + q]


@numba.njit(**OPTIONS, inline="always")
def inside(first, last, stride, pad, offset, size):
    """Output positions ``[lo, hi)`` of ``[first, last)`` whose read ``o*stride - pad + offset`` is in ``[0, size)``
    (here a kernel row's taps run only over the rows where they read data; the channels-last weight
    gradient clips each tap's columns with it too)."""
    lo = max(first, -((offset - pad) // stride))
    hi = min(last, (size - 1 + pad - offset) // stride + 1)
    return lo, max(lo, hi)


@numba.njit(**OPTIONS, inline="always")
def interior(first, last, stride, pad, span, size):
    """Output positions ``[lo, hi)`` of ``[first, last)`` whose whole window (reads ``o*stride - pad`` up to
    ``span`` further) is in ``[0, size)``: the first tap's :func:`inside` range cut by the last tap's."""
    lo, _ = inside(first, last, stride, pad, 0, size)
    _, hi = inside(first, last, stride, pad, span, size)
    return lo, max(lo, hi)


@numba.njit(**OPTIONS, inline="always")
def _fill_phases(plane, buf, first_row, rows, uw, sh, sw, ph, pw):
    """Phase grid of ``plane`` ``(H, W)``: phase ``(a, b)``'s row ``r`` (of ``rows``), column ``u`` (of
    ``uw``) is ``plane[(first_row + r)*sh + a - ph, u*sw + b - pw]``, zero outside the plane.

    Index loops, not slice assignments: on small planes (7x7) the per-row cost of slices (array
    views, overlap checks) was most of the kernel's time."""
    h, w = plane.shape
    src = plane.ravel()
    for a in range(sh):
        for b in range(sw):
            phase = (a * sw + b) * rows * uw
            # Columns u with 0 <= u*sw + b - pw < w.
            lo = min(uw, max(0, -((b - pw) // sw)))
            hi = max(lo, min(uw, (w - 1 - b + pw) // sw + 1))
            ulo, uhi, uuw = numba.uint64(lo), numba.uint64(hi), numba.uint64(uw)
            for r in range(rows):
                start = numba.uint64(phase + r * uw)  # unsigned: no negative-index checks in the loops
                y = (first_row + r) * sh + a - ph
                if y < 0 or y >= h:
                    for u in range(uuw):
                        buf[start + u] = 0
                    continue
                for u in range(ulo):
                    buf[start + u] = 0
                line = numba.uint64(y * w + b - pw + lo * sw) - ulo * numba.uint64(sw)
                if sw == 1:
                    for u in range(ulo, uhi):
                        buf[start + u] = src[line + u]
                else:
                    for u in range(ulo, uhi):
                        buf[start + u] = src[line + u * numba.uint64(sw)]
                for u in range(uhi, uuw):
                    buf[start + u] = 0


@numba.njit(**OPTIONS, inline="always")
def _grid_bases(kh, kw, sh, sw, dh, dw, size, uw):
    """Where each tap ``i*kw + j`` reads in a phase grid of ``size`` values per phase, ``uw`` per row."""
    bases = np.empty(kh * kw, np.uint64)
    for i in range(kh):
        for j in range(kw):
            bases[i * kw + j] = ((i * dh) % sh * sw + (j * dw) % sw) * size + (i * dh) // sh * uw + (j * dw) // sw
    return bases


@numba.njit(**OPTIONS, inline="always")
def _forward_grid(g, oh, ow):
    """The forward's phase grid (shared by the weight gradient): columns per row, rows per phase (one spare:
    the band's last discarded columns read past it), values per phase, each tap's offset, bands."""
    sh, sw, _, _, dh, dw, kh, kw, band_rows, _, _ = g
    uw = ow + (kw - 1) * dw // sw
    rows = band_rows + (kh - 1) * dh // sh + 1
    size = rows * uw
    return uw, rows, size, _grid_bases(kh, kw, sh, sw, dh, dw, size, uw), -(-oh // band_rows)


# --- the kernels -----------------------------------------------------------------------------------

@numba.njit(**_JIT)
def forward(x, w, bias, out, g):
    """``x`` ``(N, C, H, W)``, ``w`` ``(C*M, KH*KW)``, ``bias`` ``(C*M,)`` or empty -> ``out`` ``(N, C*M, OH, OW)``."""
    sh, sw, ph, pw, dh, dw, kh, kw, band_rows, _, _ = g
    n_batch, c, h, wd = x.shape
    cm, oh, ow = out.shape[1], out.shape[2], out.shape[3]
    m = cm // c
    uw, rows, size, bases, bands = _forward_grid(g, oh, ow)
    tasks = n_batch * c * bands
    chunks = min(tasks, CHUNKS_PER_THREAD * g.threads)
    for chunk in numba.prange(chunks):
        buf = np.empty(sh * sw * size, x.dtype)
        whole = np.empty(band_rows * uw, x.dtype)
        for task in range(chunk * tasks // chunks, (chunk + 1) * tasks // chunks):
            band, plane = task % bands, task // bands
            n, ci = plane // c, plane % c
            y0 = band * band_rows
            y1 = min(y0 + band_rows, oh)
            acc = whole[:(y1 - y0) * uw]
            _fill_phases(x[n, ci], buf, y0, rows, uw, sh, sw, ph, pw)
            for mi in range(m):
                o = ci * m + mi
                acc[:] = bias[o] if bias.shape[0] else 0
                for i in range(kh):
                    lo, hi = inside(y0, y1, sh, ph, i * dh, h)
                    _accumulate(acc, buf, bases, w[o], i * kw, (i + 1) * kw, (lo - y0) * uw, (hi - lo) * uw)
                target = out[n, o].ravel()
                for y in range(y0, y1):
                    t0, a0 = numba.uint64(y * ow), numba.uint64((y - y0) * uw)
                    for col in range(numba.uint64(ow)):
                        target[t0 + col] = acc[a0 + col]


@numba.njit(**_JIT)
def input_grad(gy, w, gx, g):
    """``gy`` ``(N, C*M, OH, OW)``, ``w`` ``(C*M, KH*KW)`` -> ``gx`` ``(N, C, H, W)``.

    Input gradient phase ``(a, b)``'s value at phase row ``r``, column ``u`` (input pixel
    ``(r*sh + a - ph, u*sw + b - pw)``) sums ``w[i, j] * gy[r - (i*dh)//sh, u - (j*dw)//sw]`` over the taps
    with ``(i*dh) % sh == a`` and ``(j*dw) % sw == b``: a correlation of ``gy``, zero-padded by the largest
    of those offsets before, with each tap at a fixed offset.
    """
    sh, sw, ph, pw, dh, dw, kh, kw, _, band_rows, _ = g
    n_batch, cm, oh, ow = gy.shape
    c, h, wd = gx.shape[1], gx.shape[2], gx.shape[3]
    m = cm // c
    taps = kh * kw
    mr, mc = (kh - 1) * dh // sh, (kw - 1) * dw // sw
    phase_rows, phase_cols = -(-(ph + h) // sh), -(-(pw + wd) // sw)
    ug = max(phase_cols, ow) + mc
    grid_rows = band_rows + mr + 1
    # Taps sorted by phase: phase p's are order[starts[p]:starts[p + 1]].
    phases = sh * sw
    order = np.empty(taps, np.int64)
    starts = np.zeros(phases + 1, np.int64)
    bases = np.empty(taps, np.uint64)
    k = 0
    for p in range(phases):
        starts[p] = k
        for i in range(kh):
            for j in range(kw):
                if (i * dh) % sh * sw + (j * dw) % sw == p:
                    order[k] = i * kw + j
                    bases[k] = (mr - (i * dh) // sh) * ug + mc - (j * dw) // sw
                    k += 1
    starts[phases] = k
    bands = -(-phase_rows // band_rows)
    tasks = n_batch * c * bands
    chunks = min(tasks, CHUNKS_PER_THREAD * g.threads)
    for chunk in numba.prange(chunks):
        grid = np.empty(grid_rows * ug, gy.dtype)
        whole = np.empty(phases * band_rows * ug, gy.dtype)
        weights = np.empty(taps, gy.dtype)
        for task in range(chunk * tasks // chunks, (chunk + 1) * tasks // chunks):
            band, plane = task % bands, task // bands
            n, ci = plane // c, plane % c
            r0 = band * band_rows
            r1 = min(r0 + band_rows, phase_rows)
            length = (r1 - r0) * ug
            acc = whole[:phases * length]
            acc[:] = 0
            for mi in range(m):
                o = ci * m + mi
                for t in range(taps):
                    weights[t] = w[o, order[t]]
                # Grid row r, column v holds gy[r0 + r - mr, v - mc]: a phase grid of stride 1, padded by (mr, mc).
                _fill_phases(gy[n, o], grid, r0, grid_rows, ug, 1, 1, mr, mc)
                for p in range(phases):  # each kernel row's run of taps over the rows where it reads grad_out
                    t = starts[p]
                    while t < starts[p + 1]:
                        i, end = order[t] // kw, t + 1
                        while end < starts[p + 1] and order[end] // kw == i:
                            end += 1
                        lo, hi = inside(r0, r1, 1, (i * dh) // sh, 0, oh)
                        _accumulate(acc[p * length:(p + 1) * length], grid, bases, weights, t, end, (lo - r0) * ug,
                                    (hi - lo) * ug)
                        t = end
            target = gx[n, ci].ravel()
            for p in range(phases):
                a, b = p // sw, p % sw
                lo = max(0, -((b - pw) // sw))  # columns u with 0 <= u*sw + b - pw < wd
                hi = min(ug, (wd - 1 - b + pw) // sw + 1)
                ulo, uhi, usw = numba.uint64(lo), numba.uint64(max(lo, hi)), numba.uint64(sw)
                for r in range(r0, r1):
                    y = r * sh + a - ph
                    if y < 0 or y >= h:
                        continue
                    row = numba.uint64(p * length + (r - r0) * ug)
                    line = numba.uint64(y * wd + b - pw + lo * sw) - ulo * usw
                    if sw == 1:
                        for u in range(ulo, uhi):
                            target[line + u] = acc[row + u]
                    else:
                        for u in range(ulo, uhi):
                            target[line + u * usw] = acc[row + u]


@numba.njit(**_JIT_DOT)
def weight_grad(x, gy, gw, g):
    """``x`` ``(N, C, H, W)``, ``gy`` ``(N, C*M, OH, OW)`` -> ``gw`` ``(C*M, KH*KW)``: per tap, ``gy`` on the
    forward's grid (zeros in its discarded columns) dotted with the tap's slice of the phase grid."""
    sh, sw, ph, pw, dh, dw, kh, kw, band_rows, _, _ = g
    n_batch, c, h = x.shape[0], x.shape[1], x.shape[2]
    cm, oh, ow = gy.shape[1], gy.shape[2], gy.shape[3]
    m = cm // c
    taps = kh * kw
    uw, rows, size, bases, bands = _forward_grid(g, oh, ow)
    for ci in numba.prange(c):
        buf = np.empty(sh * sw * size, x.dtype)
        wide = np.zeros(band_rows * uw, x.dtype)
        sums = np.zeros((m, taps), x.dtype)
        zero = sums[0, 0]  # a zero of the data's type: float32 sums stay float32
        for n in range(n_batch):
            for band in range(bands):
                y0 = band * band_rows
                y1 = min(y0 + band_rows, oh)
                _fill_phases(x[n, ci], buf, y0, rows, uw, sh, sw, ph, pw)
                for mi in range(m):
                    source = gy[n, ci * m + mi].ravel()
                    for y in range(y0, y1):  # the discarded columns stay zero
                        w0, s0 = numba.uint64((y - y0) * uw), numba.uint64(y * ow)
                        for col in range(numba.uint64(ow)):
                            wide[w0 + col] = source[s0 + col]
                    total = sums[mi]
                    for i in range(kh):  # the kernel row's taps, four per pass, over the rows where they read x
                        lo, hi = inside(y0, y1, sh, ph, i * dh, h)
                        start, length = numba.uint64((lo - y0) * uw), numba.uint64((hi - lo) * uw)
                        last = (i + 1) * kw
                        for t in range(i * kw, last, 4):
                            b0 = bases[t] + start
                            b1 = bases[min(t + 1, last - 1)] + start
                            b2 = bases[min(t + 2, last - 1)] + start
                            b3 = bases[min(t + 3, last - 1)] + start
                            s0 = s1 = s2 = s3 = zero
                            for q in range(length):
                                v = wide[start + q]
                                s0 += v * buf[b0 + q]
                                s1 += v * buf[b1 + q]
                                s2 += v * buf[b2 + q]
                                s3 += v * buf[b3 + q]
                            total[t] += s0
                            if t + 1 < last:
                                total[t + 1] += s1
                            if t + 2 < last:
                                total[t + 2] += s2
                            if t + 3 < last:
                                total[t + 3] += s3
        for mi in range(m):
            gw[ci * m + mi, :] = sums[mi]
