#!/usr/bin/env python
"""Whole-model training steps: sepconv's kernels (default ``auto``) against PyTorch's own convolutions (not a test).

One step = forward, cross-entropy, backward and an SGD update, on sepconv's reference models. Candidates, timed
in interleaved rounds (``_common.measure``: every round runs a block of steps of each, in a shuffled order):

* ``torch_nchw`` / ``torch_cl``: ``SEPCONV_KERNELS=reference`` (PyTorch eager, NCHW or channels_last model and input);
* ``sepconv_nchw`` / ``sepconv_cl``: the default mode ``auto`` (each depthwise layer on the faster of the C++
  kernels and PyTorch, as measured on its first call).

Each candidate has its own copy of the model; the mode is set as its step starts. Times are medians per step;
speed-ups are ratios of medians of the same run.

Usage::

    .venv/bin/python benchmarks/bench_steps.py                 # EEGNet, MobileNetV1-0.5, MobileNetV2: ~3 minutes
    .venv/bin/python benchmarks/bench_steps.py --filter eegnet --threads 1
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys

import torch

from _common import loadavg, measure, print_table  # benchmarks/ is on sys.path as the script's folder

import sepconv
from sepconv import kernels
from sepconv._io import atomic_write_text

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_steps.json")
# name, registry model, its arguments, input shape (N, C, H, W), classes
MODELS = [
    ("eegnet 22x1125 b32", "eegnet", {"channels": 22, "samples": 1125, "num_classes": 4}, (32, 1, 22, 1125), 4),
    ("mobilenet_v1_050@128 b16", "mobilenet_v1_050", {"num_classes": 10}, (16, 3, 128, 128), 10),
    ("mobilenet_v2@96 b16", "mobilenet_v2", {"num_classes": 10}, (16, 3, 96, 96), 10),
]


def make_step(model, x, y, mode):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        kernels.set_kernels(mode)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()
    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per candidate per model")
    parser.add_argument("--max-row-time", type=float, default=120.0)
    parser.add_argument("--filter", default=None, help="only models whose name contains TEXT")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kernels.cpu.load()
    rows = []
    for name, model_name, kwargs, shape, classes in MODELS:
        if args.filter and args.filter not in name:
            continue
        print(f"{name} ...", end="", file=sys.stderr, flush=True)
        torch.manual_seed(0)
        base = sepconv.models.create_model(model_name, **kwargs).train()
        x = torch.randn(shape)
        y = torch.randint(0, classes, (shape[0],))
        fns = {}
        for mode, label in (("reference", "torch"), ("auto", "sepconv")):
            for fmt in ("nchw", "cl"):
                memory_format = torch.channels_last if fmt == "cl" else torch.contiguous_format
                model = copy.deepcopy(base).to(memory_format=memory_format)
                fns[f"{label}_{fmt}"] = make_step(model, x.contiguous(memory_format=memory_format), y, mode)
        for fn in fns.values():  # warm-up: auto measures each depthwise signature here, once
            fn()
        times = measure(fns, args.min_run_time, 5, args.max_row_time)
        kernels.set_kernels(None)
        t = {k: v["median_s"] for k, v in times.items()}
        best_torch = min(t["torch_nchw"], t["torch_cl"])
        ratios = {"vs_torch_nchw": t["torch_nchw"] / t["sepconv_nchw"],
                  "vs_torch_cl": t["torch_cl"] / t["sepconv_cl"],
                  "vs_best": best_torch / min(t["sepconv_nchw"], t["sepconv_cl"])}
        rows.append({"name": name, "times": times, "ratios": ratios})
        print(f" vs best eager {ratios['vs_best']:.2f}", file=sys.stderr, flush=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "loadavg": loadavg(),
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    atomic_write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n", args.out)
    print(f"training steps, {meta['threads']} threads: median ms per step; speed-up = PyTorch / sepconv (same run)")
    header = (f"{'model':<26} {'torch_nchw':>10} {'torch_cl':>9} {'sep_nchw':>9} {'sep_cl':>9} {'vs_nchw':>7} "
              f"{'vs_cl':>6} {'vs_best':>7}")
    print_table(header, (
        f"{r['name']:<26} " + " ".join(f"{r['times'][k]['median_s'] * 1e3:{w}.1f}" for k, w in
                                       (("torch_nchw", 10), ("torch_cl", 9), ("sepconv_nchw", 9), ("sepconv_cl", 9)))
        + f" {r['ratios']['vs_torch_nchw']:7.2f} {r['ratios']['vs_torch_cl']:6.2f} {r['ratios']['vs_best']:7.2f}"
        for r in rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
