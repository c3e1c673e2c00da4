#!/usr/bin/env python
"""Benchmark sepconv's Numba depthwise kernels against every PyTorch eager path (not a test).

Each row times, interleaved in one loop (every round runs a block of calls of each candidate, the
order rotating from round to round, so drift on a shared machine hits all alike):

* ``numba_cl``   sepconv's depthwise op forced to the Numba kernels, channels_last input (their layout);
* ``numba_nchw`` the same on a contiguous NCHW input (so it pays the layout conversions);
* ``torch_nchw`` ``F.conv2d(..., groups=C)`` (``F.conv1d`` for 1-D) on a contiguous input;
* ``torch_cl``   the same with a channels_last input and weight (1-D: an ``(N, L, C)`` tensor viewed as
  ``(N, C, L)``);
* ``auto_cl``, ``auto_nchw``: sepconv's op in ``SEPCONV_KERNELS=auto`` mode (the dispatcher's measured
  choice per signature; its one-off measurement happens in the agreement check, before timing);
* ``copy``       ``dst.copy_(x)`` of the input's bytes: the memory-bound floor (forward rows only).

PyTorch spells padding the way plain PyTorch code does: inside the convolution when symmetric, an
``F.pad`` first otherwise. Passes: ``forward`` (inference mode), ``fwd+bwd`` (``autograd.grad`` of the
output w.r.t. input and weight with a fixed random output gradient) and, for kernels >= 5, ``fwd+wgrad``
(weight gradient only). Before timing, each row checks that all candidates agree (values and gradients).
Times are medians of the per-call times over the rounds; ratios are taken between medians of the
same run, never against other runs.

Usage::

    .venv/bin/python benchmarks/bench_kernels.py                # full suite, ~10 minutes on 2 cores
    .venv/bin/python benchmarks/bench_kernels.py --quick        # batch 1 only, shorter timing
    .venv/bin/python benchmarks/bench_kernels.py --filter k31 --threads 1 --out /tmp/k31.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from _common import block, calibrate, geomean, loadavg, print_table  # benchmarks/ is on sys.path as the script's folder

import sepconv
import sepconv.functional as SF
from sepconv._io import atomic_write_text
from sepconv.kernels import dispatch, numba_depthwise

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_kernels.json")
CANDIDATES = ("numba_cl", "numba_nchw", "auto_cl", "auto_nchw", "torch_nchw", "torch_cl", "copy")


@dataclass(frozen=True)
class Shape:
    name: str
    n: int
    c: int
    spatial: tuple[int, ...]
    kernel: tuple[int, ...]
    stride: int
    padding: tuple[tuple[int, int], ...]  # (before, after) per axis
    multiplier: int = 1

    def describe(self) -> str:
        size = "x".join(map(str, (self.n, self.c, *self.spatial)))
        pad = ",".join(f"{b}{'' if a == b else '/' + str(a)}" for b, a in self.padding)
        mult = f" M{self.multiplier}" if self.multiplier > 1 else ""
        return f"{size} k{'x'.join(map(str, self.kernel))} s{self.stride} p{pad}{mult}"


def suite(batches) -> list[Shape]:
    layers = [
        # name, C, spatial, kernel, stride, padding pairs, multiplier
        ("mnv1.1", 32, (112, 112), (3, 3), 1, ((1, 1), (1, 1)), 1),
        ("mnv1.2", 64, (112, 112), (3, 3), 2, ((0, 1), (0, 1)), 1),  # Keras: explicit (0,1) then valid
        ("mnv1.7", 512, (14, 14), (3, 3), 1, ((1, 1), (1, 1)), 1),
        ("mnv2.s", 144, (56, 56), (3, 3), 2, ((0, 1), (0, 1)), 1),
        ("mnv2.l", 960, (7, 7), (3, 3), 1, ((1, 1), (1, 1)), 1),
        ("effnet.k5", 240, (28, 28), (5, 5), 2, ((1, 2), (1, 2)), 1),
        ("effnet.k5s1", 480, (14, 14), (5, 5), 1, ((2, 2), (2, 2)), 1),
        ("convnext.k7", 96, (56, 56), (7, 7), 1, ((3, 3), (3, 3)), 1),
        ("replknet.k31", 128, (56, 56), (31, 31), 1, ((15, 15), (15, 15)), 1),
        ("eeg.temporal", 8, (64, 128), (1, 64), 1, ((0, 0), (31, 32)), 1),
        ("eeg.spatial", 8, (64, 128), (64, 1), 1, ((0, 0), (0, 0)), 2),
        ("causal1d.k4", 1536, (2048,), (4,), 1, ((3, 0),), 1),
    ]
    shapes = []
    for n in batches:
        for name, c, spatial, kernel, stride, padding, multiplier in layers:
            # Batch 32 of a 31x31 layer in NCHW would take seconds per call, and of the long 1-D sequence
            # ~10 GB for the seven candidates' tensors: batch 8 there.
            n_here = min(n, 8) if name in ("replknet.k31", "causal1d.k4") else n
            shapes.append(Shape(name, n_here, c, spatial, kernel, stride, padding, multiplier))
    return shapes


# --- the candidates --------------------------------------------------------------------------------

def _tensors(shape: Shape, fmt: str, seed=0):
    g = torch.Generator().manual_seed(seed)
    rank = len(shape.spatial)
    x = torch.randn(shape.n, shape.c, *shape.spatial, generator=g)  # the same values in every layout
    if fmt == "cl" and rank == 1:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    w = torch.randn(shape.c * shape.multiplier, 1, *shape.kernel, generator=g) / math.prod(shape.kernel) ** 0.5
    if fmt == "cl" and rank == 2:
        x, w = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
    return x, w


def _torch_op(shape: Shape):
    conv = F.conv1d if len(shape.spatial) == 1 else F.conv2d
    symmetric = all(b == a for b, a in shape.padding)
    inside = tuple(b for b, _ in shape.padding) if symmetric else 0
    flat = None if symmetric else [v for pair in reversed(shape.padding) for v in pair]

    def op(x, w):
        if flat is not None:
            x = F.pad(x, flat)
        return conv(x, w, None, shape.stride, inside, 1, shape.c)
    return op


def _sepconv_op(shape: Shape, mode: str):
    def op(x, w):
        with dispatch.use_kernels(mode):
            return SF.depthwise_conv(x, w, None, shape.stride, shape.padding)
    return op


def make_callables(shape: Shape, pass_: str):
    """name -> zero-argument callable, and a string saying whether the candidates agree."""
    specs = {"numba_cl": (_sepconv_op(shape, "numba"), "cl"), "numba_nchw": (_sepconv_op(shape, "numba"), "nchw"),
             "auto_cl": (_sepconv_op(shape, "auto"), "cl"), "auto_nchw": (_sepconv_op(shape, "auto"), "nchw"),
             "torch_nchw": (_torch_op(shape), "nchw"), "torch_cl": (_torch_op(shape), "cl")}
    fns, results = {}, {}
    grad = None
    for name, (op, fmt) in specs.items():
        x, w = _tensors(shape, fmt)
        if pass_ == "forward":
            fns[name] = (lambda op=op, x=x, w=w: op(x, w))
            with torch.inference_mode():
                results[name] = (op(x, w),)
            continue
        leaves = (x.requires_grad_(), w.requires_grad_()) if pass_ == "fwd+bwd" else (w.requires_grad_(),)
        if grad is None:
            with torch.no_grad():
                grad = torch.randn(op(x, w).shape, generator=torch.Generator().manual_seed(1))
        g = grad.contiguous(memory_format=torch.channels_last) if fmt == "cl" and grad.ndim == 4 else grad
        fns[name] = (lambda op=op, x=x, w=w, leaves=leaves, g=g: torch.autograd.grad(op(x, w), leaves, g))
        out = op(x, w)
        results[name] = (out.detach(), *torch.autograd.grad(out, leaves, g))
    if pass_ == "forward":
        x, _ = _tensors(shape, "nchw")
        dst = torch.empty_like(x)
        fns["copy"] = lambda: dst.copy_(x)
    problems = []
    want = results["torch_nchw"]
    for name, got in results.items():
        for label, a, b in zip(("out", "grad_first", "grad_second"), got, want):
            scale = max(1.0, b.abs().max().item())
            if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-3, atol=1e-3 * scale):
                problems.append(f"{name} {label}")
    return fns, ("ok" if not problems else "MISMATCH: " + ", ".join(problems))


# --- timing ----------------------------------------------------------------------------------------





def measure(fns: dict, min_run_time: float, min_rounds: int, max_row_time: float) -> dict:
    """Per-call times (seconds) of each candidate over interleaved rounds."""
    block_s = min(max(min_run_time / 20, 0.005), 0.05)
    names = list(fns)
    numbers = {name: calibrate(fns[name], block_s) for name in names}  # also the warm-up call
    times = {name: [] for name in names}
    spent = dict.fromkeys(names, 0.0)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        rounds = 0
        while True:
            order = names[rounds % len(names):] + names[:rounds % len(names)]
            for name in order:
                elapsed = block(fns[name], numbers[name])
                times[name].append(elapsed / numbers[name])
                spent[name] += elapsed
            rounds += 1
            if rounds >= min_rounds and min(spent.values()) >= min_run_time:
                break
            if rounds >= 3 and time.perf_counter() - start >= max_row_time:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "rounds": len(t),
                   "iqr_s": (statistics.quantiles(t, n=4)[2] - statistics.quantiles(t, n=4)[0]) if len(t) > 1 else 0.0}
            for name, t in times.items()}


# --- report ----------------------------------------------------------------------------------------



def ratios(row: dict) -> dict:
    t = {name: stats["median_s"] for name, stats in row["times"].items()}
    best_torch = min(t["torch_nchw"], t["torch_cl"])
    out = {"speedup_vs_nchw": t["torch_nchw"] / t["numba_nchw"],  # same (NCHW) input on both sides
           "speedup_vs_cl": t["torch_cl"] / t["numba_cl"],        # same (channels_last) input on both sides
           "speedup_vs_best": best_torch / min(t["numba_cl"], t["numba_nchw"]),
           "cl_speedup_vs_nchw": t["torch_nchw"] / t["numba_cl"],  # a channels_last model vs PyTorch's default
           "auto_vs_nchw": t["torch_nchw"] / t["auto_nchw"],       # the dispatcher, same input as PyTorch
           "auto_vs_cl": t["torch_cl"] / t["auto_cl"],
           "auto_vs_best": best_torch / min(t["auto_cl"], t["auto_nchw"])}
    if "copy" in t:
        out["numba_cl_over_copy"] = t["numba_cl"] / t["copy"]
        out["torch_best_over_copy"] = best_torch / t["copy"]
    return out


def summarize(rows: list[dict]) -> list[dict]:
    summary = []
    for pass_ in ("forward", "fwd+bwd", "fwd+wgrad"):
        members = [r for r in rows if r["pass"] == pass_ and r["check"] == "ok"]
        if not members:
            continue
        entry = {"pass": pass_, "rows": len(members)}
        for key in ("speedup_vs_nchw", "speedup_vs_cl", "speedup_vs_best", "cl_speedup_vs_nchw", "auto_vs_nchw",
                    "auto_vs_cl", "auto_vs_best"):
            entry[f"geomean_{key}"] = geomean(r["ratios"][key] for r in members)
        worst = min(members, key=lambda r: r["ratios"]["speedup_vs_best"])
        entry["worst_vs_best"] = worst["ratios"]["speedup_vs_best"]
        entry["worst_row"] = f"{worst['name']} {worst['shape']}"
        entry["rows_more_than_10pct_slower"] = sum(r["ratios"]["speedup_vs_best"] < 1 / 1.1 for r in members)
        entry["auto_worst_vs_best"] = min(r["ratios"]["auto_vs_best"] for r in members)
        entry["auto_rows_more_than_10pct_slower"] = sum(r["ratios"]["auto_vs_best"] < 1 / 1.1 for r in members)
        summary.append(entry)
    return summary


def _row_line(r: dict) -> str:
    t = {k: v["median_s"] * 1e3 for k, v in r["times"].items()}
    q = r["ratios"]
    copy = f"{t['copy']:8.3f}" if "copy" in t else " " * 8
    over_copy = f"{q['numba_cl_over_copy']:6.1f}" if "numba_cl_over_copy" in q else " " * 6
    flag = "" if r["check"] == "ok" else "  " + r["check"]
    return (f"{r['name']:<13} {r['shape']:<34} {r['pass']:<9} {t['numba_cl']:9.3f} {t['numba_nchw']:10.3f} "
            f"{t['torch_nchw']:10.3f} {t['torch_cl']:9.3f} {copy} {q['speedup_vs_nchw']:7.2f} "
            f"{q['speedup_vs_cl']:6.2f} {q['speedup_vs_best']:7.2f} {over_copy} {q['auto_vs_nchw']:9.2f} "
            f"{q['auto_vs_cl']:5.2f} {q['auto_vs_best']:5.2f}{flag}")


def print_report(meta: dict, rows: list[dict], summary: list[dict], out_path: str) -> None:
    print(f"sepconv {meta['sepconv']} Numba depthwise kernels vs PyTorch {meta['torch']} eager -- "
          f"{meta['threads']} threads (torch.set_num_threads; Numba follows it), {meta['cpu_count']} CPUs")
    print(f"load average at start / end: {meta['loadavg_start']} / {meta['loadavg_end']}")
    print("times: median ms per call over interleaved rounds; speed-ups are PyTorch time / sepconv time "
          "(> 1: sepconv faster) from medians of the same run:\n"
          "  vs_nchw = torch_nchw / numba_nchw (both given NCHW input); vs_cl = torch_cl / numba_cl (both "
          "channels_last);\n  vs_best = min(torch_nchw, torch_cl) / min(numba_cl, numba_nchw); /copy = numba_cl "
          "time / copy_ time of the input's bytes;\n  auto: the same speed-ups for the op in 'auto' mode (the dispatcher's choice)\n")
    header = (f"{'layer':<13} {'shape':<34} {'pass':<9} {'numba_cl':>9} {'numba_nchw':>10} {'torch_nchw':>10} "
              f"{'torch_cl':>9} {'copy':>8} {'vs_nchw':>7} {'vs_cl':>6} {'vs_best':>7} {'/copy':>6} {'auto:nchw':>9} {'cl':>5} {'best':>5}")
    print_table(header, map(_row_line, rows))
    print("\nsummary (geometric means of the speed-ups over the rows of each pass; worst = lowest vs_best)")
    header = (f"{'pass':<9} {'rows':>4} {'vs_nchw':>8} {'vs_cl':>7} {'vs_best':>8} {'worst':>7} {'>10% slower':>11} "
              f"{'auto:nchw':>9} {'cl':>5} {'best':>5} {'worst':>5} {'>10%':>4}  worst row (numba)")
    print_table(header, (
        f"{s['pass']:<9} {s['rows']:>4} {s['geomean_speedup_vs_nchw']:8.2f} {s['geomean_speedup_vs_cl']:7.2f} "
        f"{s['geomean_speedup_vs_best']:8.2f} {s['worst_vs_best']:7.2f} {s['rows_more_than_10pct_slower']:>11} "
        f"{s['geomean_auto_vs_nchw']:9.2f} {s['geomean_auto_vs_cl']:5.2f} {s['geomean_auto_vs_best']:5.2f} "
        f"{s['auto_worst_vs_best']:5.2f} {s['auto_rows_more_than_10pct_slower']:>4}  {s['worst_row']}"
        for s in summary))
    print(f"\nwrote {out_path}")


# --- main ------------------------------------------------------------------------------------------



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 only, shorter timing")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,32; --quick: 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--min-run-time", type=float, default=None, help="seconds per candidate per row")
    parser.add_argument("--max-row-time", type=float, default=20.0, help="seconds after which a slow row stops")
    parser.add_argument("--filter", default=None, help="only rows whose 'name shape pass' contains TEXT")
    parser.add_argument("--passes", default="forward,fwd+bwd,fwd+wgrad")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    batches = [int(b) for b in (args.batches or ("1" if args.quick else "1,32")).split(",")]
    min_run_time = args.min_run_time or (0.1 if args.quick else 0.3)
    passes = args.passes.split(",")
    compile_s = numba_depthwise.compile_all()
    plan = [(shape, p) for shape in suite(batches) for p in passes
            if p != "fwd+wgrad" or max(shape.kernel) >= 5]
    if args.filter:
        plan = [(s, p) for s, p in plan if args.filter in f"{s.name} {s.describe()} {p}"]
    meta = {"sepconv": getattr(sepconv, "__version__", "?"), "torch": torch.__version__, "threads": threads,
            "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "min_run_time": min_run_time, "argv": sys.argv[1:], "numba_compile_or_cache_load_s": compile_s,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "loadavg_start": loadavg()}
    print(f"bench_kernels: {len(plan)} rows, {threads} threads; Numba compile/cache load {compile_s:.1f} s",
          file=sys.stderr)
    rows = []
    t0 = time.perf_counter()
    for i, (shape, pass_) in enumerate(plan, 1):
        print(f"[{i}/{len(plan)}] {shape.name} {shape.describe()} {pass_} ...", end="", file=sys.stderr, flush=True)
        fns, check = make_callables(shape, pass_)
        if pass_ == "forward":
            with torch.inference_mode():
                times = measure(fns, min_run_time, 5, args.max_row_time)
        else:
            times = measure(fns, min_run_time, 5, args.max_row_time)
        row = {"name": shape.name, "shape": shape.describe(), "pass": pass_, "check": check, "times": times,
               "spec": asdict(shape)}
        row["ratios"] = ratios(row)
        rows.append(row)
        print(f" vs_nchw {row['ratios']['speedup_vs_nchw']:.2f} vs_cl {row['ratios']['speedup_vs_cl']:.2f}"
              f"{'' if check == 'ok' else ' ' + check}", file=sys.stderr, flush=True)
    meta["elapsed_s"] = time.perf_counter() - t0
    meta["loadavg_end"] = loadavg()
    summary = summarize(rows)
    atomic_write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=2) + "\n", args.out)
    print_report(meta, rows, summary, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
