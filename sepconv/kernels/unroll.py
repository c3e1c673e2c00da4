"""Writes :mod:`sepconv.kernels._unrolled`: depthwise forward blocks with every tap unrolled.

Run ``python -m sepconv.kernels.unroll`` after changing this file (a test checks the module is current).
It also clears Numba's on-disk cache of the kernels: a cached function is only recompiled when its own
source file changes, not when a function it calls from another file (these blocks) does.

Each generated ``_block_KHxKWsS`` computes ``PIXELS`` neighbouring output pixels of one row, horizontal
stride S, dilation 1, all taps inside the input, over every channel: the vector loop runs over channels and its
body holds the ``PIXELS`` sums in registers through all ``KH*KW`` taps, so an input value loaded once
serves every pixel whose window covers it, and each output is stored once. Per output value that is
``KH*(PIXELS+KW-1)/PIXELS + KH*KW/PIXELS + 1`` memory operations instead of ``~2.5*KH*KW/4`` in the
tap-group loop of :func:`sepconv.kernels.numba_depthwise._forward`: measured on one core, float32,
3x3 over 32 channels at 112x112: 258 -> 149 us; 7x7 over 96 channels at 56x56: 29 GMAC/s.
Numba offers no way to unroll a loop whose trip count is a compile-time constant before LLVM
vectorises the loop around it, hence generated source.

Each generated ``_wgrad_block_KWsS`` adds one kernel row's weight gradient over ``COLUMNS`` neighbouring
output columns (horizontal stride S, dilation 1, all taps inside): the ``COLUMNS`` output gradients and the
``S*(COLUMNS-1)+KW`` input values they meet are loaded once and each of the ``KW`` accumulators is loaded
and stored once, instead of once per four columns per tap.

Offsets are ``uint64`` built by additions only (``numba.uint64 * int`` would be computed in float64).
"""

from __future__ import annotations

import pathlib

# Output pixels per block: their sums stay in registers while each input value loaded serves every pixel
# whose window covers it. Measured, channels-last forward, two threads, float32 (us, 4 -> 8 -> 12 pixels):
# 3x3 over 32 channels at 112x112 211-283 -> 128-150 -> 167-240, over 512 at 14x14 94-99 -> 58-60 -> 60-96,
# 7x7 over 96 at 56x56 318-386 -> 236-266 -> 271-354, 5x5 over 480 at 14x14 103-106 -> 100-101 -> 138-147
# (12: more sums and loads than the 32 vector registers hold). Rows shorter than this take the tap loop.
PIXELS = 8
SIZES = ((3, 3), (5, 5), (7, 7), (1, 3), (1, 4), (1, 5), (1, 7))  # (KH, KW) the fast path covers
COLUMNS = 8  # weight gradient: output columns per block
WIDTHS = (3, 4, 5, 7)  # KW the weight-gradient blocks cover (any KH: they work one kernel row at a time)
STRIDES = (1, 2)  # horizontal strides the forward and weight-gradient blocks cover
TARGET = pathlib.Path(__file__).with_name("_unrolled.py")


def input_columns(outputs: int, kernel_w: int, stride: int) -> int:
    """Input columns per kernel row that ``outputs`` neighbouring output columns read (dilation 1)."""
    return stride * (outputs - 1) + kernel_w


def block_kind(kernel: tuple[int, int], stride: int) -> int:
    """The forward block's kind for ``(KH, KW)`` at horizontal ``stride`` (dilation 1); 0: none."""
    return _kinds().index((*kernel, stride)) + 1 if stride in STRIDES and kernel in SIZES else 0


def wgrad_kind(kernel_w: int, stride: int) -> int:
    """The weight-gradient block's kind for kernel width ``kernel_w`` at horizontal ``stride``; 0: none."""
    return _wgrad_kinds().index((kernel_w, stride)) + 1 if stride in STRIDES and kernel_w in WIDTHS else 0


def _block(kh: int, kw: int, stride: int) -> list[str]:
    p = PIXELS
    inputs = input_columns(p, kw, stride)
    lines = [
        "@njit_noalias",
        f"def _block_{kh}x{kw}s{stride}(xf, wf, zf, of, o0, a0_0, uc, ur, cb):",
        f'    """Output pixels at ``of[o0 + i*C]``, i < {p}; their {kh}x{kw} windows start at ``xf[a0_0 + {stride}*i*C]``,',
        '    rows ``ur`` values apart; weight ``(KH, KW, C)``, start values ``zf`` (bias or zeros)."""',
    ]
    lines += [f"    o{i} = o{i - 1} + uc" for i in range(1, p)]
    for r in range(kh):
        if r:
            lines.append(f"    a{r}_0 = a{r - 1}_0 + ur")
        lines += [f"    a{r}_{j} = a{r}_{j - 1} + uc" for j in range(1, inputs)]
    lines.append("    b0 = numba.uint64(0)")
    lines += [f"    b{t} = b{t - 1} + uc" for t in range(1, kh * kw)]
    lines += ["    for c0 in range(numba.uint64(0), uc, cb):  # channel blocks keep every stream in L1",
              "        for ci in range(c0, min(c0 + cb, uc)):"]
    body = [f"w{t} = wf[b{t} + ci]" for t in range(kh * kw)]
    body += [f"s{i} = zf[ci]" for i in range(p)]
    for r in range(kh):
        body += [f"x{j} = xf[a{r}_{j} + ci]" for j in range(inputs)]
        body += [f"s{i} += " + " + ".join(f"x{stride * i + q} * w{r * kw + q}" for q in range(kw)) for i in range(p)]
    body += [f"of[o{i} + ci] = s{i}" for i in range(p)]
    return lines + ["            " + line for line in body]


def _wgrad_block(kw: int, stride: int) -> list[str]:
    q = COLUMNS
    inputs = input_columns(q, kw, stride)  # the input columns the block's output columns meet
    lines = [
        "@njit_noalias",
        f"def _wgrad_block_{kw}s{stride}(xf, gf, af, g0, a0, b0, uc, cb):",
        f'    """``af[b0 + t*C]`` (t < {kw}: one kernel row\'s accumulators) += the products of the output',
        f'    gradients at ``gf[g0 + i*C]`` (i < {q}) with the inputs at ``xf[a0 + ({stride}*i + t)*C]``."""',
    ]
    lines += [f"    g{i} = g{i - 1} + uc" for i in range(1, q)]
    lines += [f"    a{j} = a{j - 1} + uc" for j in range(1, inputs)]
    lines += [f"    b{t} = b{t - 1} + uc" for t in range(1, kw)]
    lines += ["    for c0 in range(numba.uint64(0), uc, cb):",
              "        for ci in range(c0, min(c0 + cb, uc)):"]
    body = [f"y{i} = gf[g{i} + ci]" for i in range(q)]
    body += [f"x{j} = xf[a{j} + ci]" for j in range(inputs)]
    body += [f"af[b{t} + ci] += " + " + ".join(f"y{i} * x{stride * i + t}" for i in range(q)) for t in range(kw)]
    return lines + ["            " + line for line in body]


def _kinds() -> list[tuple[int, int, int]]:
    return [(kh, kw, stride) for stride in STRIDES for kh, kw in SIZES]


def _wgrad_kinds() -> list[tuple[int, int]]:
    return [(kw, stride) for stride in STRIDES for kw in WIDTHS]


def source() -> str:
    kinds = "\n".join(f"    {i + 1}: {kh}x{kw} stride {stride}" for i, (kh, kw, stride) in enumerate(_kinds()))
    parts = [
        '"""Generated by ``python -m sepconv.kernels.unroll``: do not edit (see that module).',
        "",
        "Kinds (``block`` argument of :func:`block`), 0 meaning none:",
        kinds,
        "",
        "Weight-gradient kinds (:func:`wgrad_block`): " + ", ".join(
            f"{i + 1}: 1x{kw} stride {stride}" for i, (kw, stride) in enumerate(_wgrad_kinds())),
        '"""',
        "",
        "import numba",
        "",
        "from ._jit import njit_noalias",
        "",
        f"PIXELS = {PIXELS}",
        f"SIZES = {SIZES!r}",
        f"COLUMNS = {COLUMNS}",
        f"WIDTHS = {WIDTHS!r}",
        f"STRIDES = {STRIDES!r}",
    ]
    for kh, kw, stride in _kinds():
        parts += ["", ""] + _block(kh, kw, stride)
    parts += ["", "", "@numba.njit(cache=True, nogil=True)",
              "def block(kind, xf, wf, zf, of, o0, a0, uc, ur, cb):",
              '    """Run the block of kind ``kind`` (1 + the index of (KH, KW, stride) in'
              ' ``[(*k, s) for s in STRIDES for k in SIZES]``)."""']
    for i, (kh, kw, stride) in enumerate(_kinds()):
        parts.append(f"    {'if' if i == 0 else 'elif'} kind == {i + 1}:")
        parts.append(f"        _block_{kh}x{kw}s{stride}(xf, wf, zf, of, o0, a0, uc, ur, cb)")
    for kw, stride in _wgrad_kinds():
        parts += ["", ""] + _wgrad_block(kw, stride)
    parts += ["", "", "@numba.njit(cache=True, nogil=True)",
              "def wgrad_block(kind, xf, gf, af, g0, a0, b0, uc, cb):",
              '    """Run the weight-gradient block of kind ``kind`` (1 + the index of (KW, stride) in'
              ' ``[(w, s) for s in STRIDES for w in WIDTHS]``)."""']
    for i, (kw, stride) in enumerate(_wgrad_kinds()):
        parts.append(f"    {'if' if i == 0 else 'elif'} kind == {i + 1}:")
        parts.append(f"        _wgrad_block_{kw}s{stride}(xf, gf, af, g0, a0, b0, uc, cb)")
    return "\n".join(parts) + "\n"


def main() -> None:
    TARGET.write_text(source())
    stale = [*TARGET.parent.glob("__pycache__/*.nbi"), *TARGET.parent.glob("__pycache__/*.nbc")]
    for path in stale:
        path.unlink()
    print(f"wrote {TARGET}; removed {len(stale)} Numba cache files")


if __name__ == "__main__":
    main()
