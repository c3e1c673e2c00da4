#!/usr/bin/env python
"""Does fusing a separable layer's two steps pay on this CPU? (issue 7's fused separable forward; not a test)

A fused forward computes the depthwise result one tile (a band of output rows, all channels) at a time and
feeds it to the pointwise GEMM while it is still in cache, so the intermediate never travels through
memory. Here the tile loop is in Python: the depthwise step of a band through sepconv's op (its C++ kernels
or PyTorch, ``--depthwise``), then ``torch.mm`` of the band's ``(rows*W, C)`` values with the pointwise
weight, written in place into the channels_last output (a contiguous block of rows). Against:

* ``unfused``: PyTorch eager, depthwise then 1x1 convolution, channels_last (the fastest PyTorch path);
* ``fused_rR``: the tile loop with ``R`` output rows per band, for the whole image (one tile: the GEMM and
  the per-call work only), a band of about 512 KiB and one of about 128 KiB of depthwise output (L2 and
  L1-ish sizes on this machine).

Interleaved rounds in a shuffled order (``_common.measure``, as in ``bench_kernels.py``); each candidate's
output is checked against ``unfused``.
Only "same" stride-1 layers (MobileNetV1's separable layers, batch 1 and ``--batch``).

Measured on the 2-core machine (Zen 4, float32, 2 threads, no page faults in any candidate; one run each):
every fused variant was slower than ``unfused``. With one tile per image, 1.07-1.37x at batch 1 and
1.19-1.67x at batch 8 (the Numba depthwise kernels sepconv had then), 1.12-1.33x and 1.27-1.49x with PyTorch's depthwise in the loop:
``torch.mm`` (MKL) is itself slower than oneDNN's 1x1 convolution on these shapes, before any tiling.
Bands of 512 KiB and 128 KiB were slower still (1.2-3.8x): each band's GEMM is smaller and each costs a
round trip through Python. The intermediate of a batch-1 MobileNet layer (0.4-1.6 MB) stays in L2/L3
unfused anyway. So sepconv does not fuse; ``separable_conv`` runs its two steps.

Usage::

    .venv/bin/python benchmarks/bench_fusion.py                 # ~1 minute
    .venv/bin/python benchmarks/bench_fusion.py --batch 8 --depthwise reference --out /tmp/fusion.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

from _common import loadavg, measure, print_table  # benchmarks/ is on sys.path as the script's folder

import sepconv.functional as SF
from sepconv._io import atomic_write_text
from sepconv import kernels

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_fusion.json")
LAYERS = (("sep.mnv1.1", 32, 64, 112), ("sep.mnv1.3", 128, 128, 56), ("sep.mnv1.5", 256, 256, 28),
          ("sep.mnv1.7", 512, 512, 14))
BAND_BYTES = (512 * 1024, 128 * 1024)


def fused(x, dw, pw_t, rows: int, mode: str):
    """Depthwise 3x3 ("same", stride 1) then pointwise, one band of ``rows`` output rows at a time."""
    n, c, h, w = x.shape
    out = x.new_empty(n, h, w, pw_t.shape[1])  # channels_last storage
    with kernels.use_kernels(mode):
        for image in range(n):
            for r0 in range(0, h, rows):
                r1 = min(h, r0 + rows)
                i0, i1 = max(0, r0 - 1), min(h, r1 + 1)  # input rows the band reads; the rest is padding
                band = x[image:image + 1, :, i0:i1]
                hidden = SF.depthwise_conv(band, dw, None, 1, ((1 - (r0 - i0), 1 - (i1 - r1)), (1, 1)))
                torch.mm(hidden.permute(0, 2, 3, 1).reshape(-1, c), pw_t, out=out[image, r0:r1].view(-1, pw_t.shape[1]))
    return out.permute(0, 3, 1, 2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="the second batch size (besides 1)")
    parser.add_argument("--depthwise", choices=("cpu", "reference"), default="cpu",
                        help="kernels of the fused variants' depthwise step")
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds per candidate per row")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    rows_out, lines = [], []
    start_load = loadavg()
    for n in sorted({1, args.batch}):
        for name, c, o, size in LAYERS:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(n, c, size, size, generator=g).contiguous(memory_format=torch.channels_last)
            dw = torch.randn(c, 1, 3, 3, generator=g).contiguous(memory_format=torch.channels_last) / 3
            pw = torch.randn(o, c, 1, 1, generator=g) / c ** 0.5
            pw_t = pw.reshape(o, c).t().contiguous()
            bands = sorted({size, *(max(1, min(size, b // (size * c * 4))) for b in BAND_BYTES)}, reverse=True)
            fns = {"unfused": lambda: F.conv2d(F.conv2d(x, dw, None, 1, 1, 1, c), pw)}
            for rows in bands:
                fns[f"fused_r{rows}"] = lambda rows=rows: fused(x, dw, pw_t, rows, args.depthwise)
            with torch.inference_mode():
                want = fns["unfused"]()
                for key, fn in fns.items():
                    torch.testing.assert_close(fn(), want, rtol=1e-4, atol=1e-4, msg=lambda m, key=key: f"{key}: {m}")
                stats = measure(fns, args.min_run_time, 5, max_row_time=60.0)
            times = {k: v["median_s"] for k, v in stats.items()}
            faults = {k: v["page_faults_per_call"] for k, v in stats.items()}
            base = times["unfused"]
            rows_out.append({"name": name, "n": n, "c": c, "out": o, "size": size, "times_s": times,
                             "page_faults_per_call": faults,
                             "fused_over_unfused": {k: t / base for k, t in times.items() if k != "unfused"}})
            cells = "  ".join(f"{k} {t * 1e3:.3f} ({t / base:.2f}x, {faults[k]:.0f})" for k, t in times.items()
                              if k != "unfused")
            lines.append(f"{name:<11} {n:>3} {f'{c}x{size}x{size}->{o}':<17} {base * 1e3:9.3f} {faults['unfused']:6.0f}  "
                         f"{cells}")
            print(lines[-1], file=sys.stderr, flush=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "depthwise": args.depthwise,
            "loadavg_start": start_load, "loadavg_end": loadavg()}
    atomic_write_text(json.dumps({"meta": meta, "rows": rows_out}, indent=2) + "\n", args.out)
    print(f"fused separable forward (bands of R output rows, depthwise: {args.depthwise}) vs unfused PyTorch "
          f"(channels_last), ms; (x, faults) = fused / unfused, minor page faults per call\n")
    print_table(f"{'layer':<11} {'N':>3} {'shape':<17} {'unfused':>9} {'faults':>6}  fused variants", lines)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
