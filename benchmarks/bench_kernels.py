#!/usr/bin/env python
"""Benchmark sepconv's C++ depthwise kernels against every PyTorch path (not a test).

Each row times, interleaved in one loop (every round runs a block of calls of each candidate, the
order shuffled from round to round, so drift on a shared machine hits all alike and no candidate always
follows the same one):

* ``cpu_cl``   sepconv's depthwise op forced to the C++ backend (``SEPCONV_KERNELS=cpu``), channels_last input
  (the channels-last kernels; with fewer than 8 channels, as in the EEGNet rows, the planar ones);
* ``cpu_nchw`` the same on a contiguous NCHW input (the planar kernels; small output planes of many channels
  go to the channels-last kernels through transposed copies);
* ``torch_nchw`` ``F.conv2d(..., groups=C)`` (``F.conv1d`` for 1-D) on a contiguous input;
* ``torch_cl``   the same with a channels_last input and weight (1-D: an ``(N, L, C)`` tensor viewed as
  ``(N, C, L)``);
* ``auto_cl``, ``auto_nchw``: sepconv's op in ``SEPCONV_KERNELS=auto`` mode (the dispatcher's measured
  choice per signature; its one-off measurement happens in the agreement check, before timing);
* ``compile``    ``torch_nchw``'s op under ``torch.compile`` (inductor, ``fullgraph``, static shapes), on
  NCHW input by default (``--compile-format cl`` for channels_last). Each row compiles afresh before
  timing; the seconds its first call took (compiling forward, and backward where there is one) go
  to the JSON as ``compile.compile_s``. Where compiling fails, the error goes there instead and the
  table shows n/a. Compiling costs ~1-8 s a row on 2 cores; ``--no-compile`` leaves it out;
* ``compile_sepconv`` sepconv's op (C++ backend) under ``torch.compile`` the same way: the kernels run
  inside the compiled graph as ``torch.ops.sepconv`` nodes (``cmp_sep`` in the table, ``vs_cmp`` = compile /
  compile_sepconv);
* ``copy``       ``dst.copy_(x)`` of the input's bytes: the memory-bound floor (forward rows only).

Each depthwise row also gets its roofline, ``max(bytes / copy bandwidth, FLOPs / peak)`` with the bandwidth
of a 64 MiB copy and the peak of a 1024x1024 float32 matmul measured at the start
(``sepconv.profiling.timing.measure_machine``), counting per pass the depthwise ops it runs (forward 1,
wgrad 1, fwd+wgrad 2, fwd+bwd 3), each moving at least its input and output once; ``share`` = roof / the best
``auto`` time, and the summary counts the rows of at least 1 ms that reach 60 % of their roof.

PyTorch spells padding the way plain PyTorch code does: inside the convolution when symmetric, an
``F.pad`` first otherwise. Passes: ``forward`` (inference mode), ``fwd+bwd`` (``autograd.grad`` of the
output w.r.t. input and weight with a fixed random output gradient) and, for kernels >= 5, ``fwd+wgrad``
(the forward and the weight gradient only) and ``wgrad`` (the weight gradient alone: the forward runs once
before timing and each call is ``autograd.grad(out, weight, retain_graph=True)``; issue 7's target is on
this one). Before timing, each row checks that all candidates agree (values and gradients).
Each candidate's minor page faults per call go to the JSON too: glibc hands large freed
blocks back to the OS depending on its recent history, and a call whose fresh outputs must be faulted in
again can take several times as long (measured: PyTorch's depthwise then 1x1 conv at 1x128x56x56, 600 us
without faults, 1600 us with 750 faults a call, from one run to the next). Times are medians of the per-call
times over the rounds; ratios are taken between medians of the
same run, never against other runs. ``vs_best`` compares with the best *eager* path, so runs with and
without ``--compile`` give the same column; the torch.compile ratios are separate fields.

Separable-block rows (names ``sep.*``: MobileNetV1's stride-1 layers at batch 1, a k5 and a k7 layer,
and in the full suite MobileNetV1's 56x56 layer at the largest batch) time whole depthwise-separable
layers, depthwise k x k ("same" padding) then 1x1, forward and fwd+bwd (gradients w.r.t. input and
both weights), with these candidates, each on NCHW and channels_last input (``_nchw`` / ``_cl``):

* ``cpu_*``, ``auto_*``: ``sepconv.functional.separable_conv`` with the kernels forced to C++ / auto;
* ``torch_*``: PyTorch eager ``F.conv2d(F.conv2d(x, dw, groups=C), pw)``;
* ``std_*``: the standard dense k x k ``F.conv2d`` the layer replaces, with the composed kernel
  ``pw[o, c] * dw[c]`` as its weight so that it computes the same function and is checked like the
  others (output and input gradient; its weight gradient has another shape).

Per row: ``mac_ratio`` = standard MACs / separable MACs (``sepconv.cost.separable_reduction``),
``realised_{torch,cpu,auto}`` = best standard time (of NCHW and channels_last) / that path's best
separable time, and ``efficiency_*`` = realised / mac_ratio (issue 7's target: >= 0.8 on MobileNet
shapes). The summary gives their geometric means per pass and how many MobileNet rows meet 0.8.

JSON (``--out``): ``meta``, ``summary`` and ``rows`` (depthwise; a ``compile`` record and
``compile_vs_eager`` / ``speedup_vs_compile`` / ``auto_vs_compile`` ratios when compiling), and
``separable_summary`` and ``separable_rows``.

Run times measured with the machine's load average at 3-5 from other work (the full suite took ~7
minutes at load ~1 before the compile and separable rows were added).

Usage::

    .venv/bin/python benchmarks/bench_kernels.py                # full suite: ~25 minutes on 2 cores
    .venv/bin/python benchmarks/bench_kernels.py --quick        # batch 1 only, shorter timing: ~4 minutes
    .venv/bin/python benchmarks/bench_kernels.py --filter k31 --threads 1 --out /tmp/k31.json
    .venv/bin/python benchmarks/bench_kernels.py --quick --filter sep.   # separable rows only: ~1.5 minutes
    .venv/bin/python benchmarks/bench_kernels.py --no-compile           # without the torch.compile column
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch._functorch.config as functorch_config
import torch.nn.functional as F

from _common import geomean, loadavg, measure, print_table  # benchmarks/ is on sys.path as the script's folder

import sepconv
import sepconv.functional as SF
from sepconv import cost, geometry
from sepconv._io import atomic_write_text
from sepconv import kernels
from sepconv.benchmark.suite import DepthwiseShape, depthwise_suite
from sepconv.profiling.timing import measure_machine

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_kernels.json")
CANDIDATES = ("cpu_cl", "cpu_nchw", "auto_cl", "auto_nchw", "torch_nchw", "torch_cl", "compile", "compile_sepconv",
              "copy")
COMPILE_FORMAT = "nchw"  # the layout the torch.compile candidate gets by default (--compile-format)


# The depthwise layer suite lives in the package, so that `sepconv bench --suite` times the same shapes.
Shape = DepthwiseShape
suite = depthwise_suite


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
        with kernels.use_kernels(mode):
            return SF.depthwise_conv(x, w, None, shape.stride, shape.padding)
    return op


def _compiled(op):
    """``op`` under ``torch.compile`` (inductor), compiled afresh for this row.

    ``_dynamo.reset()`` first: every row's op shares one code object, so without it dynamo would see
    recompilations of one function, make sizes dynamic, and past its recompile limit fall back to eager
    silently. ``fullgraph`` turns a graph break into an error (reported as n/a) rather than a part-eager op.
    """
    torch._dynamo.reset()
    return torch.compile(op, fullgraph=True, dynamic=False)


def _agreement(results: dict, want: str, labels) -> str:
    """"ok", or which candidates' tensors differ from ``results[want]`` (pairs compared in order)."""
    problems = []
    for name, got in results.items():
        for label, a, b in zip(labels, got, results[want]):
            scale = max(1.0, b.abs().max().item())
            if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-3, atol=1e-3 * scale):
                problems.append(f"{name} {label}")
    return "ok" if not problems else "MISMATCH: " + ", ".join(problems)


def _grad_like(grad: torch.Tensor, fmt: str) -> torch.Tensor:
    return grad.contiguous(memory_format=torch.channels_last) if fmt == "cl" and grad.ndim == 4 else grad


def make_callables(shape: Shape, pass_: str, compile_format: str | None):
    """name -> zero-argument callable, whether the candidates agree, and the torch.compile record
    (``compile_format``: the compiled candidate's input layout, None for none)."""
    specs = {"cpu_cl": (_sepconv_op(shape, "cpu"), "cl"), "cpu_nchw": (_sepconv_op(shape, "cpu"), "nchw"),
             "auto_cl": (_sepconv_op(shape, "auto"), "cl"), "auto_nchw": (_sepconv_op(shape, "auto"), "nchw"),
             "torch_nchw": (_torch_op(shape), "nchw"), "torch_cl": (_torch_op(shape), "cl")}
    compiled = None
    if compile_format:  # last, so that their first (compiling) call is the one timed below
        specs["compile"] = (_compiled(_torch_op(shape)), compile_format)
        specs["compile_sepconv"] = (_compiled(_sepconv_op(shape, "cpu")), compile_format)
        compiled = {"format": compile_format, "compile_s": None, "error": None, "sepconv_error": None}
    fns, results = {}, {}
    grad = None
    for name, (op, fmt) in specs.items():
        x, w = _tensors(shape, fmt)
        start = time.perf_counter()
        # A compiled backward that reuses ("donates") its saved buffers cannot run twice on one graph.
        reusable = functorch_config.patch(donated_buffer=False) if pass_ == "wgrad" else contextlib.nullcontext()
        try:
            if pass_ == "forward":
                fns[name] = (lambda op=op, x=x, w=w: op(x, w))
                with torch.inference_mode():
                    results[name] = (op(x, w),)
                continue
            leaves = (x.requires_grad_(), w.requires_grad_()) if pass_ == "fwd+bwd" else (w.requires_grad_(),)
            if grad is None:
                with torch.no_grad():
                    grad = torch.randn(op(x, w).shape, generator=torch.Generator().manual_seed(1))
            g = _grad_like(grad, fmt)
            with reusable:  # compiles the compile candidate
                out = op(x, w)
            if pass_ == "wgrad":  # backward alone: the graph of this one forward is kept and reused
                fns[name] = (lambda out=out, leaves=leaves, g=g: torch.autograd.grad(out, leaves, g, retain_graph=True))
            else:
                fns[name] = (lambda op=op, x=x, w=w, leaves=leaves, g=g: torch.autograd.grad(op(x, w), leaves, g))
            results[name] = (out.detach(), *torch.autograd.grad(out, leaves, g, retain_graph=pass_ == "wgrad"))
        except Exception as error:  # only torch.compile may fail here; its row shows n/a
            if not name.startswith("compile"):
                raise
            fns.pop(name, None)
            compiled["error" if name == "compile" else "sepconv_error"] = \
                f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
        finally:
            if name == "compile" and compiled["error"] is None:
                compiled["compile_s"] = time.perf_counter() - start  # the first call (forward and backward)
    if pass_ == "forward":
        x, _ = _tensors(shape, "nchw")
        dst = torch.empty_like(x)
        fns["copy"] = lambda: dst.copy_(x)
    return fns, _agreement(results, "torch_nchw", ("out", "grad_first", "grad_second")), compiled


# --- separable blocks ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SepShape:
    """A depthwise-separable layer (depthwise k x k, stride 1, "same" padding, then 1x1) and the
    standard k x k convolution it replaces."""
    name: str
    n: int
    c: int
    out: int
    size: int
    k: int

    def describe(self) -> str:
        return f"{self.n}x{self.c}x{self.size}x{self.size}->{self.out} k{self.k}"

    def mac_ratio(self) -> float:
        """Standard MACs / separable MACs, counted by the project's cost model."""
        reduction = cost.separable_reduction((self.n, self.c, self.size, self.size), self.out, self.k,
                                             padding=self.k // 2)
        return float(1 / reduction.macs_ratio)


def sep_suite(batches) -> list[SepShape]:
    # name (MobileNetV1's numbering of its separable layers, as in suite()), C_in, C_out, size, k
    layers = [("sep.mnv1.1", 32, 64, 112, 3), ("sep.mnv1.3", 128, 128, 56, 3), ("sep.mnv1.5", 256, 256, 28, 3),
              ("sep.mnv1.7", 512, 512, 14, 3), ("sep.mnv1.13", 1024, 1024, 7, 3),
              ("sep.effnet.k5", 240, 240, 28, 5), ("sep.convnext.k7", 96, 96, 56, 7)]
    shapes = [SepShape(name, 1, c, out, size, k) for name, c, out, size, k in layers]
    if any(n > 1 for n in batches):  # one large-batch row: a dense k3 conv at batch 32 costs ~0.3 s per call
        shapes.append(SepShape("sep.mnv1.3", max(batches), 128, 128, 56, 3))
    return shapes


def _sep_tensors(shape: SepShape, fmt: str, seed=0):
    """Input, depthwise and pointwise weights, and the dense weight of the composed kernel (so the
    standard conv computes the same function and can be checked against the separable candidates)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape.n, shape.c, shape.size, shape.size, generator=g)
    dw = torch.randn(shape.c, 1, shape.k, shape.k, generator=g) / shape.k
    pw = torch.randn(shape.out, shape.c, 1, 1, generator=g) / shape.c ** 0.5
    dense = pw * dw.transpose(0, 1)  # (out, c, 1, 1) * (1, c, k, k)
    if fmt == "cl":
        x, dw, pw, dense = (t.contiguous(memory_format=torch.channels_last) for t in (x, dw, pw, dense))
    return x, dw, pw, dense


def make_sep_callables(shape: SepShape, pass_: str):
    """Like :func:`make_callables` for a separable block; the standard conv's weight gradient has another
    shape, so only its output and input gradient are checked."""
    pad = shape.k // 2

    def sepconv_op(mode):
        def op(x, dw, pw, dense):
            with kernels.use_kernels(mode):
                return SF.separable_conv(x, dw, pw, padding=pad)
        return op

    def torch_sep(x, dw, pw, dense):
        return F.conv2d(F.conv2d(x, dw, None, 1, pad, 1, shape.c), pw)

    def standard(x, dw, pw, dense):
        return F.conv2d(x, dense, None, 1, pad)

    specs = {"cpu_cl": (sepconv_op("cpu"), "cl"), "cpu_nchw": (sepconv_op("cpu"), "nchw"),
             "auto_cl": (sepconv_op("auto"), "cl"), "auto_nchw": (sepconv_op("auto"), "nchw"),
             "torch_nchw": (torch_sep, "nchw"), "torch_cl": (torch_sep, "cl"),
             "std_nchw": (standard, "nchw"), "std_cl": (standard, "cl")}
    grad = torch.randn(shape.n, shape.out, shape.size, shape.size, generator=torch.Generator().manual_seed(1))
    fns, results = {}, {}
    for name, (op, fmt) in specs.items():
        x, dw, pw, dense = _sep_tensors(shape, fmt)
        if pass_ == "forward":
            fns[name] = (lambda op=op, t=(x, dw, pw, dense): op(*t))
            with torch.inference_mode():
                results[name] = (op(x, dw, pw, dense),)
            continue
        leaves = (x, dense) if name.startswith("std") else (x, dw, pw)
        for t in leaves:
            t.requires_grad_()
        g = _grad_like(grad, fmt)
        fns[name] = (lambda op=op, t=(x, dw, pw, dense), leaves=leaves, g=g:
                     torch.autograd.grad(op(*t), leaves, g))
        out = op(x, dw, pw, dense)
        results[name] = (out.detach(), *torch.autograd.grad(out, leaves, g))
    results = {k: v[:2] if k.startswith("std") else v for k, v in results.items()}  # out, grad_x
    return fns, _agreement(results, "torch_nchw", ("out", "grad_x", "grad_dw", "grad_pw"))


# --- report ----------------------------------------------------------------------------------------

def roofline_seconds(shape: Shape, pass_: str, machine) -> float:
    """The row's floor: max(bytes / copy bandwidth, FLOPs / matmul peak), counting each pass's depthwise ops
    (forward 1, weight gradient 1, fwd+wgrad 2, fwd+bwd 3), each reading and writing at least x and y once."""
    rank = len(shape.spatial)
    out = geometry.output_shape(shape.spatial, shape.kernel, (shape.stride,) * rank, shape.padding, (1,) * rank)
    x_elems = shape.n * shape.c * math.prod(shape.spatial)
    y_elems = shape.n * shape.c * shape.multiplier * math.prod(out)
    ops = {"forward": 1, "wgrad": 1, "fwd+wgrad": 2, "fwd+bwd": 3}[pass_]
    return max(4 * ops * (x_elems + y_elems) / machine.memory_bandwidth,
               2 * ops * y_elems * math.prod(shape.kernel) / machine.peak_flops)


def ratios(row: dict) -> dict:
    t = {name: stats["median_s"] for name, stats in row["times"].items()}
    best_torch = min(t["torch_nchw"], t["torch_cl"])
    out = {"speedup_vs_nchw": t["torch_nchw"] / t["cpu_nchw"],  # same (NCHW) input on both sides
           "speedup_vs_cl": t["torch_cl"] / t["cpu_cl"],        # same (channels_last) input on both sides
           "speedup_vs_best": best_torch / min(t["cpu_cl"], t["cpu_nchw"]),
           "cl_speedup_vs_nchw": t["torch_nchw"] / t["cpu_cl"],  # a channels_last model vs PyTorch's default
           "auto_vs_nchw": t["torch_nchw"] / t["auto_nchw"],       # the dispatcher, same input as PyTorch
           "auto_vs_cl": t["torch_cl"] / t["auto_cl"],
           "auto_vs_best": best_torch / min(t["auto_cl"], t["auto_nchw"])}
    if "copy" in t:
        out["cpu_cl_over_copy"] = t["cpu_cl"] / t["copy"]
        out["torch_best_over_copy"] = best_torch / t["copy"]
    out["auto_share_of_roofline"] = row["roofline_s"] / min(t["auto_cl"], t["auto_nchw"])
    if "compile_sepconv" in t:
        out["compile_sepconv_vs_compile"] = t.get("compile", float("nan")) / t["compile_sepconv"]
    if "compile" in t:  # "best" above stays eager-only, so runs with and without --compile compare
        out["compile_vs_eager"] = best_torch / t["compile"]
        out["speedup_vs_compile"] = t["compile"] / min(t["cpu_cl"], t["cpu_nchw"])
        out["auto_vs_compile"] = t["compile"] / min(t["auto_cl"], t["auto_nchw"])
    return out


def sep_ratios(row: dict, mac_ratio: float) -> dict:
    """Realised speed-ups of each separable path over the best standard conv, and their share of the MAC ratio."""
    t = {name: stats["median_s"] for name, stats in row["times"].items()}
    standard = min(t["std_nchw"], t["std_cl"])
    out = {"mac_ratio": mac_ratio}
    for path in ("torch", "cpu", "auto"):
        out[f"realised_{path}"] = standard / min(t[f"{path}_nchw"], t[f"{path}_cl"])
        out[f"efficiency_{path}"] = out[f"realised_{path}"] / mac_ratio
    return out


def summarize(rows: list[dict]) -> list[dict]:
    summary = []
    for pass_ in ("forward", "fwd+bwd", "fwd+wgrad", "wgrad"):
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
        long_rows = [r for r in members if min(r["times"]["auto_cl"]["median_s"], r["times"]["auto_nchw"]["median_s"]) >= 1e-3]
        entry["rows_over_1ms"] = len(long_rows)
        entry["rows_over_1ms_at_60pct_roofline"] = sum(r["ratios"]["auto_share_of_roofline"] >= 0.6 for r in long_rows)
        entry["auto_rows_more_than_10pct_slower"] = sum(r["ratios"]["auto_vs_best"] < 1 / 1.1 for r in members)
        compiled = [r for r in members if "compile_vs_eager" in r["ratios"]]
        if any(r.get("compile") for r in rows if r["pass"] == pass_):
            entry["compile"] = {
                "rows": len(compiled),
                "failed": sum(bool(r["compile"]["error"]) for r in rows if r["pass"] == pass_),
                "compile_s_total": sum(r["compile"]["compile_s"] or 0.0 for r in rows if r["pass"] == pass_),
                **{f"geomean_{key}": geomean(r["ratios"][key] for r in compiled) if compiled else None
                   for key in ("compile_vs_eager", "speedup_vs_compile", "auto_vs_compile")}}
        summary.append(entry)
    return summary


def sep_summarize(rows: list[dict]) -> list[dict]:
    summary = []
    for pass_ in ("forward", "fwd+bwd"):
        members = [r for r in rows if r["pass"] == pass_ and r["check"] == "ok"]
        if not members:
            continue
        entry = {"pass": pass_, "rows": len(members),
                 "geomean_mac_ratio": geomean(r["ratios"]["mac_ratio"] for r in members)}
        mobilenet = [r for r in members if r["name"].startswith("sep.mnv1")]  # where the issue sets the 0.8 target
        for path in ("torch", "cpu", "auto"):
            entry[f"geomean_realised_{path}"] = geomean(r["ratios"][f"realised_{path}"] for r in members)
            entry[f"geomean_efficiency_{path}"] = geomean(r["ratios"][f"efficiency_{path}"] for r in members)
            entry[f"min_efficiency_{path}"] = min(r["ratios"][f"efficiency_{path}"] for r in members)
            entry[f"mobilenet_rows_efficiency_ge_0.8_{path}"] = sum(r["ratios"][f"efficiency_{path}"] >= 0.8
                                                                    for r in mobilenet)
        entry["mobilenet_rows"] = len(mobilenet)
        summary.append(entry)
    return summary


def _ms(t: dict, name: str, width: int) -> str:
    if name not in t:
        return " " * width
    return f"{t[name]:{width}.3f}" if t[name] is not None else f"{'n/a':>{width}}"


def _row_line(r: dict, with_compile: bool) -> str:
    t = {k: v["median_s"] * 1e3 for k, v in r["times"].items()}
    q = r["ratios"]
    over_copy = f"{q['cpu_cl_over_copy']:6.1f}" if "cpu_cl_over_copy" in q else " " * 6
    flag = "" if r["check"] == "ok" else "  " + r["check"]
    compiled = ""
    if with_compile:
        t.setdefault("compile", None)  # compiling failed: n/a
        vs = f"{q['speedup_vs_compile']:6.2f} {q['auto_vs_compile']:5.2f}" if "speedup_vs_compile" in q else \
            f"{'n/a':>6} {'n/a':>5}"
        t.setdefault("compile_sepconv", None)
        sep = f"{q['compile_sepconv_vs_compile']:6.2f}" if "compile_sepconv_vs_compile" in q else f"{'n/a':>6}"
        compiled = f" {_ms(t, 'compile', 9)} {vs} {_ms(t, 'compile_sepconv', 9)} {sep}"
    return (f"{r['name']:<13} {r['shape']:<34} {r['pass']:<9} {t['cpu_cl']:9.3f} {t['cpu_nchw']:10.3f} "
            f"{t['torch_nchw']:10.3f} {t['torch_cl']:9.3f} {_ms(t, 'copy', 8)} {q['speedup_vs_nchw']:7.2f} "
            f"{q['speedup_vs_cl']:6.2f} {q['speedup_vs_best']:7.2f} {over_copy} {q['auto_vs_nchw']:9.2f} "
            f"{q['auto_vs_cl']:5.2f} {q['auto_vs_best']:5.2f} {r['roofline_s'] * 1e3:8.3f} "
            f"{q['auto_share_of_roofline']:5.2f}{compiled}{flag}")


def _sep_line(r: dict) -> str:
    t = {k: v["median_s"] * 1e3 for k, v in r["times"].items()}
    best = {path: min(t[f"{path}_nchw"], t[f"{path}_cl"]) for path in ("std", "torch", "cpu", "auto")}
    q = r["ratios"]
    flag = "" if r["check"] == "ok" else "  " + r["check"]
    return (f"{r['name']:<16} {r['shape']:<26} {r['pass']:<8} {best['std']:9.3f} {best['torch']:9.3f} "
            f"{best['cpu']:9.3f} {best['auto']:9.3f} {q['mac_ratio']:6.2f} {q['realised_torch']:7.2f} "
            f"{q['realised_cpu']:6.2f} {q['realised_auto']:5.2f} {q['efficiency_torch']:7.2f} "
            f"{q['efficiency_cpu']:6.2f} {q['efficiency_auto']:5.2f}{flag}")


def print_report(meta: dict, rows: list[dict], summary: list[dict], sep_rows: list[dict], sep_summary: list[dict],
                 out_path: str) -> None:
    print(f"sepconv {meta['sepconv']} C++ depthwise kernels vs PyTorch {meta['torch']} eager -- "
          f"{meta['threads']} threads (torch.set_num_threads; C++ follows it), {meta['cpu_count']} CPUs")
    print(f"load average at start / end: {meta['loadavg_start']} / {meta['loadavg_end']}")
    with_compile = meta["compile"]
    if rows:
        print("times: median ms per call over interleaved rounds; speed-ups are PyTorch time / sepconv time "
              "(> 1: sepconv faster) from medians of the same run:\n"
              "  vs_nchw = torch_nchw / cpu_nchw (both given NCHW input); vs_cl = torch_cl / cpu_cl (both "
              "channels_last);\n  vs_best = min(torch_nchw, torch_cl) / min(cpu_cl, cpu_nchw); /copy = cpu_cl "
              "time / copy_ time of the input's bytes;\n  auto: the same speed-ups for the op in 'auto' mode (the "
              "dispatcher's choice)" + (f";\n  compile: PyTorch's op under torch.compile on {meta['compile_format']} "
              "input; vs_cmp = compile / min(cpu_*), auto = compile / min(auto_*) (n/a: it did not compile)"
              if with_compile else "") + "\n")
        header = (f"{'layer':<13} {'shape':<34} {'pass':<9} {'cpu_cl':>9} {'cpu_nchw':>10} {'torch_nchw':>10} "
                  f"{'torch_cl':>9} {'copy':>8} {'vs_nchw':>7} {'vs_cl':>6} {'vs_best':>7} {'/copy':>6} "
                  f"{'auto:nchw':>9} {'cl':>5} {'best':>5} {'roof':>8} {'share':>5}"
                  + (f" {'compile':>9} {'vs_cmp':>6} {'auto':>5} {'cmp_sep':>9} {'vs_cmp':>6}" if with_compile else ""))
        print_table(header, (_row_line(r, with_compile) for r in rows))
        print(f"\nroof: max(bytes / {meta['copy_bandwidth_GBps']:.1f} GB/s copy, FLOPs / {meta['matmul_peak_GFLOPs']:.0f} "
              "GFLOP/s matmul peak), measured on this machine at the start; share = roof / best auto time")
        print("\nsummary (geometric means of the speed-ups over the rows of each pass; worst = lowest vs_best)")
        header = (f"{'pass':<9} {'rows':>4} {'vs_nchw':>8} {'vs_cl':>7} {'vs_best':>8} {'worst':>7} "
                  f"{'>10% slower':>11} {'auto:nchw':>9} {'cl':>5} {'best':>5} {'worst':>5} {'>10%':>4} "
                  f"{'>=60% roof':>7}  worst row (cpu)")
        print_table(header, (
            f"{s['pass']:<9} {s['rows']:>4} {s['geomean_speedup_vs_nchw']:8.2f} {s['geomean_speedup_vs_cl']:7.2f} "
            f"{s['geomean_speedup_vs_best']:8.2f} {s['worst_vs_best']:7.2f} {s['rows_more_than_10pct_slower']:>11} "
            f"{s['geomean_auto_vs_nchw']:9.2f} {s['geomean_auto_vs_cl']:5.2f} {s['geomean_auto_vs_best']:5.2f} "
            f"{s['auto_worst_vs_best']:5.2f} {s['auto_rows_more_than_10pct_slower']:>4} "
            f"{s['rows_over_1ms_at_60pct_roofline']:>3}/{s['rows_over_1ms']:<3}  {s['worst_row']}"
            for s in summary))
    if any("compile" in s for s in summary):
        print(f"\ntorch.compile ({meta['compile_format']} input; geometric means over the rows where it compiled): "
              "eager = best eager / compile; cpu, auto = compile / best sepconv")
        header = f"{'pass':<9} {'rows':>4} {'failed':>6} {'compile s':>9} {'eager':>6} {'cpu':>6} {'auto':>6}"
        print_table(header, (
            f"{s['pass']:<9} {c['rows']:>4} {c['failed']:>6} {c['compile_s_total']:9.1f} " + " ".join(
                "   n/a" if c[key] is None else f"{c[key]:6.2f}" for key in
                ("geomean_compile_vs_eager", "geomean_speedup_vs_compile", "geomean_auto_vs_compile"))
            for s in summary if (c := s.get("compile"))))
    if sep_rows:
        print("\nseparable blocks (depthwise k x k + 1x1) vs the standard k x k conv they replace: times are the "
              "best of NCHW and channels_last (ms);\n  MACx = standard MACs / separable MACs (sepconv.cost); "
              "realised = std time / separable time; /MAC = realised / MACx (issue 7 target >= 0.8 on MobileNet)\n")
        header = (f"{'layer':<16} {'shape':<26} {'pass':<8} {'std':>9} {'torch_sep':>9} {'cpu':>9} {'auto':>9} "
                  f"{'MACx':>6} {'r:torch':>7} {'cpu':>6} {'auto':>5} {'/MAC:t':>7} {'cpu':>6} {'auto':>5}")
        print_table(header, map(_sep_line, sep_rows))
        print("\nseparable summary (geometric means; >=0.8: MobileNet rows meeting the target, of all MobileNet rows)")
        groups = (("r:torch", "geomean_realised", "{:.2f}"), ("/MAC:t", "geomean_efficiency", "{:.2f}"),
                  ("min/MAC:t", "min_efficiency", "{:.2f}"), (">=0.8:t", "mobilenet_rows_efficiency_ge_0.8", "{}"))
        widths = {"torch": 9, "cpu": 6, "auto": 5}  # a group's first column carries its label
        header = f"{'pass':<8} {'rows':>4} {'MACx':>6} " + " ".join(
            f"{label:>9} {'cpu':>6} {'auto':>5}" for label, _, _ in groups)
        print_table(header, (
            f"{s['pass']:<8} {s['rows']:>4} {s['geomean_mac_ratio']:6.2f} " + " ".join(
                (fmt.format(s[f"{key}_{path}"]) + (f"/{s['mobilenet_rows']}" if fmt == "{}" else "")).rjust(width)
                for _, key, fmt in groups for path, width in widths.items())
            for s in sep_summary))
    print(f"\nwrote {out_path}")


# --- main ------------------------------------------------------------------------------------------



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 only, shorter timing")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,32; --quick: 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--min-run-time", type=float, default=None, help="seconds per candidate per row")
    parser.add_argument("--max-row-time", type=float, default=20.0, help="seconds after which a slow row stops")
    parser.add_argument("--filter", default=None, help="only rows whose 'name shape pass' contains TEXT "
                        "(separable rows' names start with 'sep.')")
    parser.add_argument("--passes", default="forward,fwd+bwd,fwd+wgrad,wgrad")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="time torch.compile on the depthwise rows (compiling adds ~2 s per row)")
    parser.add_argument("--compile-format", choices=("nchw", "cl"), default=COMPILE_FORMAT,
                        help=f"input layout of the torch.compile candidate (default {COMPILE_FORMAT})")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    batches = [int(b) for b in (args.batches or ("1" if args.quick else "1,32")).split(",")]
    min_run_time = args.min_run_time or (0.1 if args.quick else 0.3)
    passes = args.passes.split(",")
    start = time.perf_counter()
    kernels.cpu.load()  # builds the extension, or loads it from the cache
    compile_s = time.perf_counter() - start
    machine = measure_machine()
    plan = [(shape, p) for shape in suite(batches) for p in passes
            if p not in ("fwd+wgrad", "wgrad") or max(shape.kernel) >= 5]
    plan += [(shape, p) for shape in sep_suite(batches) for p in passes if p in ("forward", "fwd+bwd")]
    if args.filter:
        plan = [(s, p) for s, p in plan if args.filter in f"{s.name} {s.describe()} {p}"]
    meta = {"sepconv": getattr(sepconv, "__version__", "?"), "torch": torch.__version__, "threads": threads,
            "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "min_run_time": min_run_time, "argv": sys.argv[1:], "cpu_build_or_cache_load_s": compile_s,
            "copy_bandwidth_GBps": machine.memory_bandwidth / 1e9, "matmul_peak_GFLOPs": machine.peak_flops / 1e9,
            "compile": args.compile, "compile_format": args.compile_format,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "loadavg_start": loadavg()}
    print(f"bench_kernels: {len(plan)} rows, {threads} threads; C++ compile/cache load {compile_s:.1f} s",
          file=sys.stderr)
    rows, sep_rows = [], []
    t0 = time.perf_counter()
    for i, (shape, pass_) in enumerate(plan, 1):
        print(f"[{i}/{len(plan)}] {shape.name} {shape.describe()} {pass_} ...", end="", file=sys.stderr, flush=True)
        separable = isinstance(shape, SepShape)
        kernels.clear_choices()  # so that the row records the choices auto made for its own calls
        if separable:
            fns, check = make_sep_callables(shape, pass_)
            compiled = None
        else:
            fns, check, compiled = make_callables(shape, pass_, args.compile and args.compile_format)
        if pass_ == "forward":
            with torch.inference_mode():
                times = measure(fns, min_run_time, 5, args.max_row_time)
        else:
            times = measure(fns, min_run_time, 5, args.max_row_time)
        row = {"name": shape.name, "shape": shape.describe(), "pass": pass_, "check": check, "times": times,
               "spec": asdict(shape), "roofline_s": None if separable else roofline_seconds(shape, pass_, machine),
               # auto's measured choice per signature, by input layout (channels_last: x's channel stride is 1)
               "auto_choices": sorted({("cl" if key[1][1] == 1 and key[0][1] > 1 else "nchw") + ": " + choice
                                       for key, choice in kernels.choices().items()})}
        if separable:
            row["ratios"] = sep_ratios(row, shape.mac_ratio())
            sep_rows.append(row)
            q = row["ratios"]
            print(f" MACx {q['mac_ratio']:.2f} realised torch {q['realised_torch']:.2f} cpu "
                  f"{q['realised_cpu']:.2f} auto {q['realised_auto']:.2f}{'' if check == 'ok' else ' ' + check}",
                  file=sys.stderr, flush=True)
            continue
        if compiled is not None:
            row["compile"] = compiled
        row["ratios"] = ratios(row)
        rows.append(row)
        extra = ""
        if compiled is not None:
            extra = f" compile {compiled['compile_s']:.1f} s" if compiled["error"] is None else " compile n/a"
        print(f" vs_nchw {row['ratios']['speedup_vs_nchw']:.2f} vs_cl {row['ratios']['speedup_vs_cl']:.2f}{extra}"
              f"{'' if check == 'ok' else ' ' + check}", file=sys.stderr, flush=True)
    meta["elapsed_s"] = time.perf_counter() - t0
    meta["loadavg_end"] = loadavg()
    summary, sep_summary = summarize(rows), sep_summarize(sep_rows)
    atomic_write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows, "separable_summary": sep_summary,
                                  "separable_rows": sep_rows}, indent=2) + "\n", args.out)
    print_report(meta, rows, summary, sep_rows, sep_summary, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
