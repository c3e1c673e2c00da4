#!/usr/bin/env python
"""Benchmark sepconv's ops against the plain PyTorch composition they replace.

The promise checked: ``sepconv.functional.separable_conv`` and ``depthwise_conv`` are never slower
than what a PyTorch user would write by hand, in either memory format:

* separable: ``F.conv2d(x, dw, None, s, p, groups=C)`` then ``F.conv2d(h, pw, bias)``;
* depthwise: ``F.conv2d(x, dw, None, s, p, groups=C)``.

The PyTorch side spells the padding the way plain PyTorch code does: an int (or per-axis ints) when
the padding is symmetric, PyTorch's own ``padding="same"`` when it is asymmetric with stride 1 (it pads
only the odd element), and ``F.pad`` then an unpadded conv when it is asymmetric with stride > 1
(TensorFlow "same", as timm's ``Conv2dSame`` does). sepconv is always called with the user-facing
padding (``1`` or ``"same"``).

Each row times the two candidates interleaved in one loop: every round runs a block of calls of one
then a block of the other, alternating which goes first, so drift on a shared machine hits both
alike. A row reports the median and interquartile range of the per-call times over the rounds and
``ratio = sepconv median / pytorch median`` (> 1 means sepconv is slower), with two cross-checks:
``paired`` (median over rounds of the per-round ratio) and ``min`` (ratio of the fastest rounds, the
least disturbed by other processes). Rows more than 5% slower are re-measured at the end (worst
first, within a time budget) and count as "confirmed" only if the recheck agrees. Before timing, each row checks that both
sides give the same values (and gradients) and the same output strides. A last table measures
sepconv's per-call Python overhead (argument checks, geometry) on a tiny tensor.

"forward" runs under ``torch.inference_mode()``; "fwd+bwd" runs the op and
``torch.autograd.grad`` of the output (with a fixed random gradient in the output's own layout)
with respect to the input and every weight. "channels_last" means a channels_last input and
weights converted as ``module.to(memory_format=torch.channels_last)`` would (``channels_last_3d``
for 3-D; for 1-D, where PyTorch has no such format, an ``(N, L, C)`` tensor viewed as
``(N, C, L)``, weights unchanged).

Usage::

    python benchmarks/bench_ops.py                 # full suite, a few minutes on 2 cores
    python benchmarks/bench_ops.py --quick         # a handful of shapes, under a minute
    python benchmarks/bench_ops.py --out results.json --min-run-time 1.0
    python benchmarks/bench_ops.py --threads 1 --filter mnv1.9   # steadier on a busy machine; some rows
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from _common import geomean, loadavg, print_table, rounds  # benchmarks/ is on sys.path as the script's folder

import sepconv
from sepconv._io import atomic_write_text
from sepconv.functional import depthwise_conv, separable_conv

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_ops.json")
SLOWER = 1.05  # rows above this ratio are flagged
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}


# --- the suite -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layer:
    name: str
    n: int
    c: int
    spatial: tuple[int, ...]
    k: int
    stride: int
    padding: int | str  # as a sepconv user writes it
    c_out: int
    quick: bool = False

    @property
    def rank(self) -> int:
        return len(self.spatial)

    def describe(self) -> str:
        shape = "x".join(str(v) for v in (self.n, self.c, *self.spatial))
        return f"{shape} k{self.k} s{self.stride} p{self.padding} ->{self.c_out}"


def _suite() -> list[Layer]:
    # MobileNetV1 (224 input) depthwise-separable blocks, channels capped at 512, plus one k5 and one k7.
    # "same" with stride 2 on an even size is TensorFlow's asymmetric (0, 1) padding; "p1" with
    # stride 2 is PyTorch's symmetric convention.
    mnv1 = [
        ("mnv1.1", 32, 112, 3, 1, 1, 64),
        ("mnv1.2", 64, 112, 3, 2, "same", 128),
        ("mnv1.3", 128, 56, 3, 1, 1, 128),
        ("mnv1.4", 128, 56, 3, 2, 1, 256),
        ("mnv1.5", 256, 28, 3, 1, "same", 256),
        ("mnv1.6", 256, 28, 3, 2, "same", 512),
        ("mnv1.7", 512, 14, 3, 1, 1, 512),
        ("mnv1.8", 512, 14, 3, 2, "same", 512),
        ("mnv1.9", 512, 7, 3, 1, 1, 512),
        ("k5", 256, 28, 5, 2, "same", 256),   # EfficientNet-style k5 stride 2, TF "same" = (1, 2)
        ("k7", 128, 56, 7, 1, 3, 128),        # ConvNeXt-style k7
    ]
    quick = {"mnv1.1", "mnv1.9"}
    layers = [Layer(name, 1, c, (hw, hw), k, s, p, co, quick=name in quick) for name, c, hw, k, s, p, co in mnv1]
    batch8 = {"mnv1.1", "mnv1.9"}
    layers += [Layer(name, 8, c, (hw, hw), k, s, p, co) for name, c, hw, k, s, p, co in mnv1 if name in batch8]
    layers += [
        # EEGNet-like temporal separable conv: even kernel, "same" = (7, 8).
        Layer("eeg1d", 16, 16, (512,), 16, 1, "same", 16, quick=True),
        Layer("vol3d", 2, 32, (8, 28, 28), 3, 1, 1, 64, quick=True),
    ]
    return layers


# --- the PyTorch side ------------------------------------------------------------------------------

def _tf_same(size: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow "same" padding of one axis (independent of sepconv.geometry on purpose)."""
    total = max((math.ceil(size / s) - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def pytorch_padding(layer: Layer):
    """(pad for F.pad or None, padding argument for F.convNd) -- how plain PyTorch code spells it."""
    if isinstance(layer.padding, int):
        return None, layer.padding
    assert layer.padding == "same"
    pairs = [_tf_same(size, layer.k, layer.stride) for size in layer.spatial]
    if all(a == b for a, b in pairs):
        return None, tuple(a for a, _ in pairs)
    if layer.stride == 1:
        return None, "same"  # PyTorch's own: pads only the odd element, the rest inside the conv
    return [v for pair in reversed(pairs) for v in pair], 0  # F.pad wants the last axis first


def make_ops(layer: Layer, op: str):
    """(sepconv callable, pytorch callable) taking (x, dw[, pw, bias])."""
    conv = _CONV[layer.rank]
    pad, conv_pad = pytorch_padding(layer)
    s, p, c = layer.stride, layer.padding, layer.c

    if op == "separable":
        def ours(x, dw, pw, b):
            return separable_conv(x, dw, pw, b, stride=s, padding=p)

        if pad is None:
            def theirs(x, dw, pw, b):
                return conv(conv(x, dw, None, s, conv_pad, 1, c), pw, b)
        else:
            def theirs(x, dw, pw, b):
                return conv(conv(F.pad(x, pad), dw, None, s, 0, 1, c), pw, b)
    else:
        def ours(x, dw):
            return depthwise_conv(x, dw, stride=s, padding=p)

        if pad is None:
            def theirs(x, dw):
                return conv(x, dw, None, s, conv_pad, 1, c)
        else:
            def theirs(x, dw):
                return conv(F.pad(x, pad), dw, None, s, 0, 1, c)
    return ours, theirs


def make_tensors(layer: Layer, op: str, fmt: str, requires_grad: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    kernel = (layer.k,) * layer.rank
    ones = (1,) * layer.rank
    if fmt == "channels_last" and layer.rank == 1:
        x = torch.randn(layer.n, *layer.spatial, layer.c, generator=g).transpose(1, 2)  # (N, L, C) viewed as (N, C, L)
    else:
        x = torch.randn(layer.n, layer.c, *layer.spatial, generator=g)
    dw = torch.randn(layer.c, 1, *kernel, generator=g) / math.prod(kernel) ** 0.5
    pw = torch.randn(layer.c_out, layer.c, *ones, generator=g) / layer.c ** 0.5
    b = torch.randn(layer.c_out, generator=g)
    if fmt == "channels_last" and layer.rank in _CHANNELS_LAST:
        mf = _CHANNELS_LAST[layer.rank]
        x, dw, pw = (t.to(memory_format=mf) for t in (x, dw, pw))
    tensors = (x, dw, pw, b) if op == "separable" else (x, dw)
    return tuple(t.requires_grad_(requires_grad) for t in tensors)


def make_callables(layer: Layer, op: str, fmt: str, pass_: str):
    """Two zero-argument callables (sepconv, pytorch) and a check of their results."""
    ours, theirs = make_ops(layer, op)
    bwd = pass_ == "fwd+bwd"
    tensors = make_tensors(layer, op, fmt, requires_grad=bwd)
    if not bwd:
        return (lambda: ours(*tensors)), (lambda: theirs(*tensors)), _check(ours, theirs, tensors, None)
    with torch.no_grad():
        grad = torch.randn_like(theirs(*tensors))  # same shape and layout as the output

    def ours_bwd():
        return torch.autograd.grad(ours(*tensors), tensors, grad)

    def theirs_bwd():
        return torch.autograd.grad(theirs(*tensors), tensors, grad)

    return ours_bwd, theirs_bwd, _check(ours, theirs, tensors, grad)


def _check(ours, theirs, tensors, grad) -> str:
    """Both sides must agree in value and output layout, else the comparison is meaningless."""
    if grad is None:
        with torch.inference_mode():
            a, b = ours(*tensors), theirs(*tensors)
        pairs = [("output", a, b)]
    else:
        ya, yb = ours(*tensors), theirs(*tensors)
        ga = torch.autograd.grad(ya, tensors, grad)
        gb = torch.autograd.grad(yb, tensors, grad)
        names = ["grad_x", "grad_dw", "grad_pw", "grad_bias"]
        pairs = [("output", ya.detach(), yb.detach())] + list(zip(names, ga, gb))
    problems = []
    for name, a, b in pairs:
        if a.shape != b.shape:
            problems.append(f"{name} shape {tuple(a.shape)} != {tuple(b.shape)}")
        elif not torch.allclose(a, b, rtol=1e-3, atol=1e-3):
            problems.append(f"{name} differs by {(a - b).abs().max().item():.3g}")
        elif name == "output" and a.stride() != b.stride():
            problems.append(f"output strides {a.stride()} != {b.stride()}")
    return "; ".join(problems) or "ok"


# --- timing ----------------------------------------------------------------------------------------





def _stats(times: list[float]) -> dict:
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else times * 3
    return {"median_s": median, "iqr_s": q3 - q1, "q1_s": q1, "q3_s": q3, "min_s": min(times)}


def compare(fa, fb, min_run_time: float, min_rounds: int, max_row_time: float | None = None,
            warmup: int = 1) -> dict:
    """Time two callables interleaved (:func:`_common.rounds`, alternating order); per-call times of each
    round's block, for each side, and the median of the per-round ratios.

    Stops once both sides have ``min_run_time`` seconds of timed calls over at least ``min_rounds``
    rounds, or, for very slow rows, after 3 rounds once ``max_row_time`` (default 4 x min_run_time)
    has passed. The callers have already run each side once (the agreement check).
    """
    for fn in (fa, fb):  # first calls create oneDNN primitives, allocate caches, ...
        for _ in range(warmup):
            fn()
    max_row_time = 4 * min_run_time if max_row_time is None else max_row_time
    times, _, numbers = rounds({"sepconv": fa, "pytorch": fb}, min_run_time, min_rounds, max_row_time, shuffle=False)
    paired = statistics.median(a / b for a, b in zip(times["sepconv"], times["pytorch"]))
    return {"sepconv": _stats(times["sepconv"]), "pytorch": _stats(times["pytorch"]), "rounds": len(times["sepconv"]),
            "calls_per_block": numbers, "paired_ratio": paired}


def _timed(pass_: str, fn):
    """Run ``fn`` under inference mode for the forward pass, with autograd for fwd+bwd."""
    if pass_ == "forward":
        with torch.inference_mode():
            return fn()
    return fn()


# --- Python overhead on a tiny tensor --------------------------------------------------------------

def measure_overhead(min_run_time: float, min_rounds: int) -> list[dict]:
    """Per-call cost of sepconv's argument checks and geometry, on tensors so small the conv is ~free."""
    cases = [
        ("separable", Layer("tiny", 1, 8, (8, 8), 3, 1, 1, 8)),
        ("separable", Layer("tiny", 1, 8, (8, 8), 3, 1, "same", 8)),
        ("separable", Layer("tiny", 1, 8, (8, 8), 3, 2, "same", 8)),
        ("depthwise", Layer("tiny", 1, 8, (8, 8), 3, 1, 1, 8)),
        ("depthwise", Layer("tiny", 1, 8, (8, 8), 3, 2, "same", 8)),
    ]
    out = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the overhead is Python; one thread keeps a busy machine's scheduling out of it
    try:
        for op, layer in cases:
            fa, fb, check = make_callables(layer, op, "contiguous", "forward")
            r = _timed("forward", lambda: compare(fa, fb, min_run_time, min_rounds))
            a, b = r["sepconv"]["median_s"], r["pytorch"]["median_s"]
            out.append({"op": op, "shape": layer.describe(), "check": check, "threads": 1,
                        "sepconv_us": a * 1e6, "pytorch_us": b * 1e6, "overhead_us": (a - b) * 1e6,
                        "overhead_min_us": (r["sepconv"]["min_s"] - r["pytorch"]["min_s"]) * 1e6,
                        "sepconv_iqr_us": r["sepconv"]["iqr_s"] * 1e6, "pytorch_iqr_us": r["pytorch"]["iqr_s"] * 1e6})
    finally:
        torch.set_num_threads(threads)
    return out


# --- reporting -------------------------------------------------------------------------------------



def _confirmed(row: dict) -> bool:
    """Slower in the first measurement and again when re-measured."""
    return row["ratio"] > SLOWER and row.get("recheck_ratio", 0.0) > SLOWER


def summarize(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["op"], row["format"], row["pass"]), []).append(row)
    groups[("all", "all", "all")] = rows
    summary = []
    for (op, fmt, pass_), members in groups.items():
        worst = max(members, key=lambda r: r["ratio"])
        summary.append({"op": op, "format": fmt, "pass": pass_, "rows": len(members),
                        "geomean_ratio": geomean(r["ratio"] for r in members), "worst_ratio": worst["ratio"],
                        "worst_row": f"{worst['layer']} {worst['shape']}",
                        "slower_rows": sum(r["ratio"] > SLOWER for r in members),
                        "rechecked_rows": sum("recheck_ratio" in r for r in members),
                        "confirmed_slower_rows": sum(_confirmed(r) for r in members)})
    return summary


def _ms(stats: dict) -> str:
    return f"{stats['median_s'] * 1e3:9.3f} ± {stats['iqr_s'] * 1e3:7.3f}"


def _row_line(r: dict) -> str:
    flag = " !" if r["ratio"] > SLOWER else ""
    recheck = f"{r['recheck_ratio']:7.3f}" if "recheck_ratio" in r else " " * 7
    check = "" if r["check"] == "ok" else f"  MISMATCH: {r['check']}"
    return (f"{r['op']:<9} {r['layer']:<7} {r['shape']:<31} {r['format']:<13} {r['pass']:<7} "
            f"{_ms(r['sepconv'])} {_ms(r['pytorch'])} {r['ratio']:6.3f} {r['paired_ratio']:6.3f} "
            f"{r['min_ratio']:6.3f} {recheck}{flag}{check}")


def print_report(meta: dict, rows: list[dict], summary: list[dict], overhead: list[dict], out_path: str) -> None:
    print(f"sepconv {meta['sepconv']} vs plain PyTorch {meta['torch']} -- {meta['threads']} threads "
          f"(torch.set_num_threads), {meta['cpu_count']} CPUs, min run time {meta['min_run_time']} s per side "
          f"per row{' (quick)' if meta['quick'] else ''}")
    print(f"load average at start / end: {meta['loadavg_start']} / {meta['loadavg_end']}")
    if meta.get("busy_warning"):
        print(f"NOTE: {meta['busy_warning']}")
    print("times: median ± IQR per call over interleaved rounds; ratio = sepconv median / pytorch median "
          f"(> 1: sepconv slower; '!' marks > {SLOWER});\n"
          "paired = median over rounds of the per-round ratio; min = ratio of the fastest rounds; "
          "recheck = ratio re-measured at the end (1.5x as long; flagged rows, worst first, within a time budget)\n")
    header = (f"{'op':<9} {'layer':<7} {'shape':<31} {'format':<13} {'pass':<7} {'sepconv ms':>19} "
              f"{'pytorch ms':>19} {'ratio':>6} {'paired':>6} {'min':>6} {'recheck':>7}")
    print_table(header, map(_row_line, rows))

    print(f"\nsummary (ratio = sepconv / pytorch; geomean over rows; slower = rows with ratio > {SLOWER}; "
          "rechecked = of those, re-measured; confirmed = slower again when re-measured)")
    header = (f"{'op':<9} {'format':<13} {'pass':<7} {'rows':>4} {'geomean':>8} {'worst':>7} {'slower':>6} "
              f"{'rechecked':>9} {'confirmed':>9}  worst row")
    print_table(header, (
        f"{s['op']:<9} {s['format']:<13} {s['pass']:<7} {s['rows']:>4} {s['geomean_ratio']:8.3f} "
        f"{s['worst_ratio']:7.3f} {s['slower_rows']:>6} {s['rechecked_rows']:>9} {s['confirmed_slower_rows']:>9}  "
        f"{s['worst_row']}" for s in summary))

    if overhead:
        print("\nPython overhead per call on a tiny tensor (forward, inference mode, contiguous, 1 thread; "
              "overhead = sepconv - pytorch, from the medians and from the minima)")
        header = (f"{'op':<9} {'shape':<31} {'sepconv us':>11} {'pytorch us':>11} {'overhead us':>12} "
                  f"{'(min-based)':>12}")
        print_table(header, (f"{o['op']:<9} {o['shape']:<31} {o['sepconv_us']:11.1f} {o['pytorch_us']:11.1f} "
                             f"{o['overhead_us']:12.1f} {o['overhead_min_us']:12.1f}" for o in overhead))
    mismatches = [r for r in rows if r["check"] != "ok"]
    if mismatches:
        print(f"\nWARNING: {len(mismatches)} rows where sepconv and PyTorch disagree (see MISMATCH above)")
    print(f"\nwrote {out_path}")


def write_json(path: str, payload: dict) -> None:
    """Write atomically (sepconv._io): never a half-written results file."""
    atomic_write_text(json.dumps(payload, indent=2) + "\n", path)


# --- main ------------------------------------------------------------------------------------------

def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number; got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0; got {text!r}")
    return value




def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few shapes and shorter timing (under a minute)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"JSON results path (default {os.path.relpath(DEFAULT_OUT)})")
    parser.add_argument("--min-run-time", type=_positive, default=None, metavar="SECONDS",
                        help="seconds of timed calls per side per row (default 0.25, or 0.06 with --quick)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads value (default: torch's default, torch.get_num_threads())")
    parser.add_argument("--filter", default=None, metavar="TEXT",
                        help="only rows whose 'op layer shape format pass' contains TEXT (e.g. 'mnv1.9')")
    parser.add_argument("--no-recheck", dest="recheck", action="store_false",
                        help="do not re-measure the rows flagged as slower")
    parser.add_argument("--no-overhead", dest="overhead", action="store_false",
                        help="skip the tiny-tensor Python overhead measurement")
    return parser


def run_row(layer: Layer, op: str, fmt: str, pass_: str, min_run_time: float, min_rounds: int) -> dict:
    fa, fb, check = make_callables(layer, op, fmt, pass_)
    r = _timed(pass_, lambda: compare(fa, fb, min_run_time, min_rounds))
    ratio = r["sepconv"]["median_s"] / r["pytorch"]["median_s"]
    min_ratio = r["sepconv"]["min_s"] / r["pytorch"]["min_s"]
    return {"op": op, "layer": layer.name, "shape": layer.describe(), "format": fmt, "pass": pass_,
            "ratio": ratio, "min_ratio": min_ratio, "check": check, **r, "spec": asdict(layer)}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1; got {args.threads}")
    # Expected: PyTorch's own padding="same" with an even kernel (the 1-D row) pads a copy; so does sepconv.
    warnings.filterwarnings("ignore", message="Using padding='same' with even kernel lengths")
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    min_run_time = args.min_run_time or (0.06 if args.quick else 0.25)
    min_rounds = 5 if args.quick else 9
    recheck_budget = 10.0 if args.quick else 60.0  # seconds, and at most half the main run's time

    layers = [layer for layer in _suite() if layer.quick or not args.quick]
    plan = [(layer, op, fmt, pass_) for layer in layers for op in ("separable", "depthwise")
            for fmt in ("contiguous", "channels_last") for pass_ in ("forward", "fwd+bwd")]
    if args.filter:
        plan = [p for p in plan if args.filter in f"{p[1]} {p[0].name} {p[0].describe()} {p[2]} {p[3]}"]
        if not plan:
            print(f"bench_ops: no row matches --filter {args.filter!r}", file=sys.stderr)
            return 2

    cpus = os.cpu_count() or 1
    meta = {"sepconv": getattr(sepconv, "__version__", "?"), "torch": torch.__version__, "threads": threads,
            "cpu_count": cpus, "platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(), "quick": args.quick,
            "min_run_time": min_run_time, "min_rounds": min_rounds, "argv": sys.argv[1:],
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "slower_threshold": SLOWER, "loadavg_start": loadavg()}
    load = (meta["loadavg_start"] or [0.0])[0]
    if load + threads > cpus + 0.5:
        meta["busy_warning"] = (f"load average {load} + {threads} thread(s) > {cpus} CPUs: other processes compete "
                                "for the cores, so timings include scheduler stalls (both sides alike, but noisily)")
        if threads > 1:
            meta["busy_warning"] += ("; with several threads each parallel region waits for its descheduled "
                                     "workers, so --threads 1 gives steadier numbers on a busy machine")
        print(f"bench_ops: {meta['busy_warning']}", file=sys.stderr)
    print(f"bench_ops: {len(plan)} rows, {threads} threads, min run time {min_run_time} s per side",
          file=sys.stderr)
    t0 = time.perf_counter()
    rows = []
    for i, (layer, op, fmt, pass_) in enumerate(plan, 1):
        print(f"[{i}/{len(plan)}] {op} {layer.name} {layer.describe()} {fmt} {pass_} ...", end="",
              file=sys.stderr, flush=True)
        row = run_row(layer, op, fmt, pass_, min_run_time, min_rounds)
        rows.append(row)
        print(f" ratio {row['ratio']:.3f}{'' if row['check'] == 'ok' else ' MISMATCH'}", file=sys.stderr, flush=True)

    if args.recheck:
        # A busy machine can make one side look slow by chance: re-measure the flagged rows, worst first,
        # half as long again, within a time budget.
        budget = min(recheck_budget, 0.5 * (time.perf_counter() - t0))
        flagged = sorted((i for i, r in enumerate(rows) if r["ratio"] > SLOWER), key=lambda i: -rows[i]["ratio"])
        start = time.perf_counter()
        for j, i in enumerate(flagged, 1):
            if time.perf_counter() - start > budget:
                print(f"bench_ops: recheck time budget ({budget:.0f} s) spent; {len(flagged) - j + 1} flagged rows "
                      "not rechecked", file=sys.stderr)
                break
            layer, op, fmt, pass_ = plan[i]
            print(f"[recheck {j}/{len(flagged)}] {op} {layer.name} {layer.describe()} {fmt} {pass_} ...", end="",
                  file=sys.stderr, flush=True)
            again = run_row(layer, op, fmt, pass_, 1.5 * min_run_time, min_rounds)
            rows[i]["recheck_ratio"] = again["ratio"]
            rows[i]["recheck"] = {k: again[k] for k in ("sepconv", "pytorch", "rounds", "paired_ratio", "min_ratio")}
            print(f" ratio {again['ratio']:.3f}", file=sys.stderr, flush=True)

    overhead = []
    if args.overhead:
        print("overhead on a tiny tensor ...", file=sys.stderr, flush=True)
        overhead = measure_overhead(max(min_run_time, 0.1), min_rounds)
    summary = summarize(rows)
    meta["elapsed_s"] = time.perf_counter() - t0
    meta["loadavg_end"] = loadavg()
    write_json(args.out, {"meta": meta, "summary": summary, "overhead": overhead, "rows": rows})
    print_report(meta, rows, summary, overhead, args.out)
    print(f"bench_ops: done in {meta['elapsed_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
