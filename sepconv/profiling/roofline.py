"""Roofline plot of a measured profile: where each op sits against this machine's roofs.

The left panel places every counted forward op at its arithmetic intensity (FLOP/byte) and the
throughput it reached (GFLOP/s, from its measured median time); the roof is
``min(peak, bandwidth x intensity)`` from :func:`~sepconv.profiling.timing.measure_machine`. Hollow
markers show where the roofline model predicts each op. The right panel compares predicted and
measured times. Depthwise convolutions sit far left (few FLOPs per byte) and far below even the memory
roof: they are bound neither by arithmetic nor by bandwidth but by how PyTorch's kernels walk memory.

Needs matplotlib (drawn off-screen with the Agg canvas; no display, no global pyplot state).
"""

from __future__ import annotations

from .._extras import require
from .._io import atomic_path
from ..cost import format_shape
from .report import Profile, kind_order
from .timing import Machine

__all__ = ["plot_roofline"]


def plot_roofline(result: Profile, path, machine: Machine | None = None) -> None:
    """Draw ``result`` (measured: ``profile(..., measure=True)``) on the roofline and save a PNG at ``path``."""
    machine = machine or result.machine
    rows = [row for row in result.rows if row.forward_ms and row.bytes and row.macs]
    if machine is None or not rows:
        raise ValueError("a roofline needs measured op times and the machine's roofs: use profile(model, input, "
                         "measure=True)")
    require("matplotlib", "experiment", "the roofline plot")
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 5.5), layout="constrained")
    FigureCanvasAgg(figure)
    roof_axes, time_axes = figure.subplots(1, 2)
    intensities = [row.intensity for row in rows]
    span = np.geomspace(min(min(intensities), machine.ridge_intensity) / 4,
                        max(max(intensities), machine.ridge_intensity) * 4, 200)
    roof_axes.plot(span, np.minimum(machine.peak_flops, machine.memory_bandwidth * span) / 1e9, color="black",
                   label=f"roof: {machine.memory_bandwidth / 1e9:.1f} GB/s, {machine.peak_flops / 1e9:.0f} GFLOP/s")
    for index, kind in enumerate(sorted({row.kind for row in rows}, key=kind_order)):
        of_kind = [row for row in rows if row.kind == kind]
        color = f"C{index}"
        x = [row.intensity for row in of_kind]
        roof_axes.scatter(x, [row.flops / row.forward_ms / 1e6 for row in of_kind], color=color,
                          label=f"{kind} (measured)")
        roof_axes.scatter(x, [row.flops / row.predicted_ms / 1e6 for row in of_kind], facecolors="none",
                          edgecolors=color)
        time_axes.scatter([row.predicted_ms for row in of_kind], [row.forward_ms for row in of_kind], color=color,
                          label=kind)
    roof_axes.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP/byte, FLOPs = 2 x MACs)",
                  ylabel="attained GFLOP/s (forward, median time)",
                  title=f"{result.model} on {format_shape(result.input_shape)}: filled measured, hollow predicted")
    roof_axes.legend(fontsize="small")
    times = [row.predicted_ms for row in rows] + [row.forward_ms for row in rows]
    bounds = [min(times) / 2, max(times) * 2]
    time_axes.plot(bounds, bounds, color="black", linewidth=0.8, label="measured = predicted")
    time_axes.set(xscale="log", yscale="log", xlabel="roofline time (ms): max(FLOPs / peak, bytes / bandwidth)",
                  ylabel="measured forward time (ms, median)", title="predicted vs measured time per op")
    time_axes.legend(fontsize="small")
    with atomic_path(path) as temporary:  # a temporary file beside path, renamed over it once complete
        figure.savefig(temporary, format="png", dpi=110)
