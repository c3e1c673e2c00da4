"""The PNG plots of a comparison: training curves, per-layer costs and times, learned filters.

Drawn off-screen with matplotlib's Agg canvas (no display, no global pyplot state) and written atomically.
Non-finite values (a diverged training) are left out of the drawing and counted in the titles; scales come
from the finite values.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._extras import require
from .._io import atomic_path
from ..layers import DepthwiseConv2d, SeparableConv2d, SpatialSeparableConv2d
from ..weights import spatial_dense_weight

__all__ = ["plot_training_curves", "plot_layer_costs", "plot_layer_times", "plot_learned_filters"]

TWIN_COLORS = {"standard": "C0", "separable": "C1"}
MAX_DEPTHWISE_KERNELS = 64
MAX_SPATIAL_FILTERS = 8
GRID_COLUMNS = 8
DPI = 110
KERNEL_COLORMAP = "RdBu_r"  # diverging: negative weights blue, positive red, zero white


def _figure(width: float, height: float):
    require("matplotlib", "experiment", "the comparison's plots")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> None:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=DPI)


def _scale(values: np.ndarray) -> float:
    """The largest finite magnitude in ``values`` (1 if there is none, or it is 0): a symmetric axis limit."""
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size and finite.max() > 0 else 1.0


def _non_finite_note(count: int, what: str) -> str:
    return f"; {count} non-finite {what} (nan or inf) not drawn" if count else ""


def plot_training_curves(histories: dict[str, list[dict]], title: str, path: Path) -> None:
    """Accuracy and loss per epoch, training (dashed) and validation (solid), one colour per twin."""
    figure = _figure(12, 4.5)
    accuracy_axes, loss_axes = figure.subplots(1, 2)
    for label, history in histories.items():
        epochs = [record["epoch"] for record in history]
        for split, style in (("train", "--"), ("validation", "-")):
            accuracy_axes.plot(epochs, [100 * r[f"{split}_accuracy"] for r in history], style, marker=".",
                               color=TWIN_COLORS[label], label=f"{label}, {split}")
            loss_axes.plot(epochs, [r[f"{split}_loss"] for r in history], style, marker=".",
                           color=TWIN_COLORS[label], label=f"{label}, {split}")
    accuracy_axes.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    loss_axes.set(xlabel="epoch", ylabel="cross-entropy (mean per input)", title="loss")
    for axes in (accuracy_axes, loss_axes):
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
        axes.xaxis.get_major_locator().set_params(integer=True)
    values = np.array([record[key] for history in histories.values() for record in history
                       for key in ("train_loss", "validation_loss", "train_accuracy", "validation_accuracy")], float)
    figure.suptitle(f"{title}\ntrain: mean over each epoch's batches in training mode; validation: after each epoch"
                    + _non_finite_note(int((~np.isfinite(values)).sum()), "values"))
    _save(figure, path)


def plot_layer_costs(costs: dict[str, dict], path: Path) -> None:
    """Per counted op, parameters and forward MACs as horizontal bars, one row of panels per twin."""
    kinds = sorted({layer["kind"] for cost in costs.values() for layer in cost["layers"]})
    colors = {kind: f"C{index}" for index, kind in enumerate(kinds)}
    counts = [max(len(cost["layers"]), 1) for cost in costs.values()]
    figure = _figure(13, 1.6 + 0.24 * sum(counts) + 0.6 * len(counts))
    grid = figure.add_gridspec(len(costs), 2, height_ratios=counts)
    first_row = {}
    for row, (label, cost) in enumerate(costs.items()):
        layers = cost["layers"][::-1]  # the first layer on top
        names = [layer["name"].removeprefix("features.") for layer in layers]
        for column, (key, unit) in enumerate((("params", "parameters"), ("macs", "forward MACs per input"))):
            axes = figure.add_subplot(grid[row, column], sharex=first_row.get(column))
            first_row.setdefault(column, axes)
            axes.barh(range(len(layers)), [layer[key] for layer in layers],
                      color=[colors[layer["kind"]] for layer in layers])
            axes.set_yticks(range(len(layers)), names, fontsize=7)
            axes.set_xlabel(unit)
            axes.set_title(f"{label} twin: {cost[key]:,} {unit}", fontsize=10)
            axes.grid(axis="x", alpha=0.3)
    from matplotlib.patches import Patch
    handles = [Patch(color=colors[kind], label=kind) for kind in kinds]
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(kinds), 5), fontsize="small")
    figure.suptitle("Cost per counted op (sepconv.profile; batch norm parameters count in the totals only)")
    _save(figure, path)


def plot_layer_times(layer_times: dict[str, dict], path: Path) -> None:
    """Per counted op, measured forward time and roofline time as paired horizontal bars (log scale), one panel
    per twin; ``layer_times[twin]`` as :func:`~sepconv.experiment.measure.profile_layers` returns it."""
    counts = [max(len(times["layers"]), 1) for times in layer_times.values()]
    figure = _figure(11, 1.8 + 0.36 * sum(counts) + 0.8 * len(counts))
    panels = figure.subplots(len(layer_times), 1, sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": counts})[:, 0]
    for axes, (label, times) in zip(panels, layer_times.items()):
        layers = times["layers"][::-1]  # the first layer on top
        positions = np.arange(len(layers))
        names = [f"{layer['name'].removeprefix('features.')} ({layer['kind']})" for layer in layers]
        axes.barh(positions + 0.2, [layer["measured_ms"] for layer in layers], height=0.4,
                  color=TWIN_COLORS.get(label, "C2"), label="measured (median)")
        axes.barh(positions - 0.2, [layer["roofline_ms"] for layer in layers], height=0.4, color="0.6",
                  label="roofline: max(bytes / bandwidth, FLOPs / peak)")
        axes.set_yticks(positions, names, fontsize=7)
        axes.set_xscale("log")
        axes.grid(axis="x", alpha=0.3)
        axes.legend(fontsize="small", loc="lower right")
        axes.set_title(f"{label} twin, batch of {times['batch_size']}: counted ops {times['measured_ms']:.3f} ms "
                       f"measured, {times['roofline_ms']:.4f} ms at the roofline; whole model "
                       f"{times['model_ms']:.3f} ms", fontsize=10)
    panels[-1].set_xlabel("forward time per batch (ms, log scale)")
    figure.suptitle("Time per counted op against its roofline (sepconv.profile(measure=True), eval mode, eager)")
    _save(figure, path)


def _file_name(prefix: str, layer_name: str) -> str:
    return f"filters_{prefix}_" + re.sub(r"[^A-Za-z0-9]+", "_", layer_name).strip("_") + ".png"


def plot_learned_filters(model: nn.Module, out_dir: Path, prefix: str) -> list[dict]:
    """One PNG per depthwise or spatially separable 2-D layer of ``model``, named ``filters_<prefix>_<layer>.png``;
    returns ``{"title", "file"}`` for each.

    Depthwise layers (the depthwise step of separable ones too) get a grid of their per-channel kernels;
    spatially separable layers their vertical and horizontal 1-D kernels and the 3-D surface of the kernel
    they compose.
    """
    plots = []
    for name, module in model.named_modules():
        if isinstance(module, SpatialSeparableConv2d):
            title = f"{name}: spatially separable {module.in_channels} -> {module.out_channels}"
            _plot_spatial_filters(module, title, out_dir / _file_name(prefix, name))
        elif isinstance(module, (DepthwiseConv2d, SeparableConv2d)):
            weight = module.weight if isinstance(module, DepthwiseConv2d) else module.depthwise_weight
            step = "depthwise" if isinstance(module, DepthwiseConv2d) else "depthwise step of a separable conv"
            title = f"{name}: {step}, {module.in_channels} channels x depth multiplier {module.depth_multiplier}"
            _plot_depthwise_filters(weight, module.depth_multiplier, title, out_dir / _file_name(prefix, name))
        else:
            continue
        plots.append({"title": title, "file": _file_name(prefix, name)})
    return plots


def _kernels(weight: torch.Tensor) -> np.ndarray:
    return weight.detach().to("cpu", torch.float32).numpy()


def _plot_depthwise_filters(weight: torch.Tensor, depth_multiplier: int, title: str, path: Path) -> None:
    """A grid of the per-channel kernels ``weight[:, 0]``: images, or curves when one side is 1 (EEGNet)."""
    kernels = _kernels(weight[:, 0])
    count, height, width = kernels.shape
    shown = kernels[:MAX_DEPTHWISE_KERNELS]
    columns = min(GRID_COLUMNS, len(shown))
    rows = math.ceil(len(shown) / columns)
    figure = _figure(1.5 * columns + 1, 1.4 * rows + 0.9)
    limit = _scale(shown)
    one_dimensional = height == 1 or width == 1
    image = None
    for index, axes in enumerate(figure.subplots(rows, columns, squeeze=False).ravel()):
        axes.set_xticks([])
        axes.set_yticks([])
        if index >= len(shown):
            axes.set_axis_off()
            continue
        channel, multiplier = divmod(index, depth_multiplier)
        axes.set_title(f"ch {channel}" + (f" m {multiplier}" if depth_multiplier > 1 else ""), fontsize=7)
        if one_dimensional:
            axes.axhline(0, color="grey", linewidth=0.5)
            axes.plot(shown[index].ravel(), marker=".", markersize=3, color="C3")
            axes.set_ylim(-limit * 1.05, limit * 1.05)
        else:
            image = axes.imshow(shown[index], cmap=KERNEL_COLORMAP, vmin=-limit, vmax=limit)
    if image is not None:
        figure.colorbar(image, ax=figure.axes, shrink=0.6, label="weight")
    drawn = f", drawn as curves along their {max(height, width)} taps" if one_dimensional else ""
    first = f"; the first {len(shown)} of {count} shown" if count > len(shown) else ""
    figure.suptitle(f"{title}\n{count} learned {height}x{width} kernels{drawn}{first}; shared scale ±{limit:.3g}"
                    + _non_finite_note(int((~np.isfinite(shown)).sum()), "weights"), fontsize=10)
    _save(figure, path)


def _plot_spatial_filters(module: SpatialSeparableConv2d, title: str, path: Path) -> None:
    """Per shown filter: the vertical (k x 1) and horizontal (1 x k) kernels and the surface of the composed
    kernel (their outer product in the per-channel form); the filters with the largest norm are shown."""
    factors = [factor.detach().to("cpu", torch.float32) for factor in module.factors]
    composed = _kernels(spatial_dense_weight(factors, module.in_channels)[:, 0])  # (C_out, kh, kw), input 0
    norms = np.linalg.norm(composed.reshape(len(composed), -1), axis=1)
    order = np.argsort(-np.nan_to_num(norms, nan=-1.0))[:MAX_SPATIAL_FILTERS]  # non-finite ones last
    one_dimensional_rows = module.depthwise  # the mixing form's composed kernel is a sum of outer products
    rows = 3 if one_dimensional_rows else 1
    figure = _figure(1.9 * len(order) + 0.6, 2.0 * rows + 2.0)
    grid = figure.add_gridspec(rows, len(order), height_ratios=[1, 1, 1.6] if one_dimensional_rows else [1])
    limit = _scale(composed[order])
    kernel_height, kernel_width = composed.shape[1:]
    positions_y, positions_x = np.meshgrid(np.arange(kernel_height), np.arange(kernel_width), indexing="ij")
    for column, channel in enumerate(order):
        if one_dimensional_rows:
            vertical, horizontal = _kernels(factors[0][channel, 0]), _kernels(factors[1][channel, 0])
            axes = figure.add_subplot(grid[0, column])
            axes.plot(vertical, np.arange(kernel_height), marker="o", color="C2")
            axes.set(yticks=range(kernel_height), ylabel="y" if column == 0 else None)
            axes.invert_yaxis()
            axes.axvline(0, color="grey", linewidth=0.5)
            axes.set_title(f"filter {channel}: vertical {kernel_height}x1", fontsize=8)
            axes = figure.add_subplot(grid[1, column])
            axes.plot(np.arange(kernel_width), horizontal, marker="o", color="C4")
            axes.set(xticks=range(kernel_width), xlabel="x")
            axes.axhline(0, color="grey", linewidth=0.5)
            axes.set_title(f"horizontal 1x{kernel_width}", fontsize=8)
        axes = figure.add_subplot(grid[rows - 1, column], projection="3d")
        axes.plot_surface(positions_x, positions_y, composed[channel], cmap=KERNEL_COLORMAP, vmin=-limit,
                          vmax=limit, edgecolor="black", linewidth=0.3)
        axes.set_zlim(-limit, limit)
        axes.set(xlabel="x", ylabel="y", xticks=range(kernel_width), yticks=range(kernel_height))
        axes.tick_params(labelsize=6)
        axes.set_box_aspect(None, zoom=1.2)
        axes.set_title("outer product" if one_dimensional_rows else f"filter {channel}, input 0", fontsize=8)
    what = "vertical and horizontal 1-D kernels and the 3-D surface of their outer product" if one_dimensional_rows \
        else "surface of the composed kernel (input channel 0)"
    figure.suptitle(f"{title}\n{what}; the {len(order)} of {len(composed)} filters with the largest norm"
                    + _non_finite_note(int((~np.isfinite(composed[order])).sum()), "kernel values"), fontsize=10)
    _save(figure, path)
