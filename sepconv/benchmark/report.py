"""What ``sepconv bench`` writes: the table (stdout and ``table.txt``), ``results.json`` and the speed-up chart
``speedup.png``."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .._extras import require
from .._io import atomic_path, atomic_write_text
from ..profiling.report import _aligned
from .runner import RowResult

__all__ = ["FILES", "format_table", "to_json", "plot_speedups", "write_outputs"]

FILES = ("results.json", "table.txt", "speedup.png")
PEERS = (("eager", "x eager"), ("compile", "x compile"), ("onnxruntime", "x ort"), ("openvino", "x openvino"))


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _reduced(timing, value: float | None, form: str) -> str:
    """``value`` for a candidate that computes below fp32, where the error is the point; ``-`` otherwise."""
    return "-" if value is None or timing.precision == "fp32" else form.format(value)


def format_table(results: list[RowResult], meta: dict) -> str:
    """One line per row and candidate: precision, median ms ± IQR, speed-ups against the peers, share of the
    roofline, error and top-1 agreement below fp32; then the failures and skips, one line each, and what the
    columns mean."""
    header = ["row", "candidate", "precision", "ms (median ± IQR)", *(label for _, label in PEERS), "roof %",
              "max err", "top-1 %", "warm-up s"]
    body, failures, skips = [], [], []
    for result in results:
        speedups = result.speedups()
        for name, timing in result.timings.items():
            if not timing.ok:
                state = "skipped" if timing.skipped else "failed"
                (skips if timing.skipped else failures).append(
                    f"  {result.name} {name}: {timing.skipped or timing.error}")
                body.append([result.name, name, timing.precision or "-", state, *("-" for _ in PEERS), "-", "-", "-",
                             "-"])
                continue
            share = result.roofline_share(name)
            body.append([result.name, name, timing.precision,
                         f"{timing.median_s * 1e3:.3f} ± {timing.iqr_s * 1e3:.3f}",
                         *(_ratio(speedups[name][peer]) for peer, _ in PEERS),
                         "-" if share is None else f"{100 * share:.1f}",
                         _reduced(timing, timing.max_error, "{:.2g}"),
                         _reduced(timing, None if timing.top1 is None else 100 * timing.top1, "{:.0f}"),
                         "-" if timing.warmup_s is None else f"{timing.warmup_s:.2f}"])
    lines = [f"sepconv bench: {meta['pass']} ({meta['what']}), {meta['threads']} threads, "
             f"{meta['rounds']} rounds, each runtime in its own process; torch {meta['torch']}"
             + (" -- interrupted: the rows finished so far" if meta.get("interrupted") else "")]
    if not body:
        return "\n".join(lines + ["no rows"]) + "\n"
    lines += [_aligned(header, body, left=2), ""]
    if failures:
        lines += ["failed:", *failures, ""]
    if skips:
        lines += ["skipped:", *skips, ""]
    lines += ["ms: per-call time of one " + ("training step" if meta["pass"] == "train" else "forward pass")
              + ", median ± IQR over the rounds. Each round gives the cores to one process at a time (PyTorch's "
              "candidates, interleaved, then each runtime's worker), with a pause between them.",
              "x eager / x compile / x ort / x openvino: that peer's median / this candidate's (> 1: faster); eager "
              "is the faster of eager_nchw and eager_cl, openvino runs at its default precision.",
              "max err, top-1 %: below fp32, the largest |output - eager_nchw's| / eager_nchw's largest value, and "
              "the share of the batch whose top class agrees.",
              "roof %: the model's roofline time / this candidate's time; the roofline sums over the model's "
              "convolutions and matrix products max(bytes / copy bandwidth, FLOPs / matmul peak)"
              + (f", with {meta['machine']}" if meta.get("machine") else " (not measured)") + "."]
    return "\n".join(lines) + "\n"


def to_json(results: list[RowResult], meta: dict) -> str:
    return json.dumps({"meta": meta, "rows": [result.as_dict() for result in results]}, indent=2,
                      allow_nan=False, default=str) + "\n"


def plot_speedups(results: list[RowResult], path) -> None:
    """A grouped bar chart: per row, each candidate's speed-up against the best eager layout (log scale)."""
    require("matplotlib", "bench", "the speed-up chart")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    candidates = list(dict.fromkeys(name for result in results for name in result.timings))
    figure = Figure(figsize=(max(6.0, 0.9 * len(results) * max(1, len(candidates)) / 3 + 2), 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(candidates))
    for index, name in enumerate(candidates):
        values = [result.speedups().get(name, {}).get("eager") for result in results]
        positions = [row + (index - (len(candidates) - 1) / 2) * width for row in range(len(results))]
        failed = all(v is None for v in values)
        axes.bar(positions, [math.nan if v is None else v for v in values], width,
                 label=f"{name} (failed)" if failed else name)
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_yscale("log")
    axes.set_xticks(range(len(results)), [result.name for result in results], rotation=30, ha="right", fontsize=8)
    axes.set_ylabel("speed-up vs best eager layout (x, median times)")
    axes.set_title("sepconv bench: PyTorch eager time / candidate time (> 1: faster)")
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=110)


def write_outputs(out: Path, results: list[RowResult], meta: dict, table: str) -> list[Path]:
    """``results.json``, ``table.txt`` and (with at least one row) ``speedup.png`` in ``out``, each atomically."""
    out = Path(out)
    written = []
    atomic_write_text(to_json(results, meta), out / "results.json")
    written.append(out / "results.json")
    atomic_write_text(table, out / "table.txt")
    written.append(out / "table.txt")
    if results:
        plot_speedups(results, out / "speedup.png")
        written.append(out / "speedup.png")
    return written
