"""The result of :func:`sepconv.profile`: per-op rows, totals, a breakdown by kind, four output formats.

Every figure names its unit: ``params`` are parameter elements, ``macs`` multiply-adds, ``flops``
floating-point operations (2 x MACs), ``bytes`` the minimum traffic (every tensor the op reads or
writes, once), ``intensity`` FLOPs per byte (``intensity_flop_per_byte`` in CSV and JSON), ``*_ms``
milliseconds, ``*_share`` a fraction of the model's total. The JSON output carries these units in its
``units`` entry.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Callable
from dataclasses import dataclass

from ..cost import CONV, DEPTHWISE, FULLY_CONNECTED, GROUPED, MATMUL, POINTWISE, TRANSPOSED, format_shape
from .timing import Machine

__all__ = ["Row", "Profile", "UNITS"]

UNITS = {
    "params": "parameter elements the op reads (the model's parameters, read directly)",
    "macs": "multiply-adds (MACs)",
    "flops": "floating-point operations, 2 x MACs",
    "bytes": "bytes, the minimum traffic: every tensor the op reads or writes, once",
    "intensity_flop_per_byte": "FLOPs per byte moved",
    "macs_share": "fraction of the model's forward MACs",
    "params_share": "fraction of the model's parameters",
    "backward_macs": "multiply-adds of the input and weight gradients",
    "backward_flops": "floating-point operations of the input and weight gradients, 2 x MACs",
    "forward_ms": "milliseconds, median over the repeats",
    "forward_iqr_ms": "milliseconds, interquartile range over the repeats",
    "backward_ms": "milliseconds, median over the repeats",
    "backward_iqr_ms": "milliseconds, interquartile range over the repeats",
    "predicted_ms": "milliseconds, roofline time max(FLOPs / peak, bytes / bandwidth)",
}
CONVENTIONS = ("MACs: multiply-adds (padding positions included; bias adds, norms, activations and pooling not "
               "counted); FLOPs = 2 x MACs; bytes: minimum traffic, each tensor read or written once")
# MobileNets' Table 2 first (conv 1x1, depthwise, full conv, FC), then the other kinds.
KIND_ORDER = (POINTWISE, DEPTHWISE, CONV, FULLY_CONNECTED, GROUPED, TRANSPOSED, MATMUL)
OTHER_PARAMETERS = "other parameters (e.g. batch norm)"


def kind_order(kind: str) -> tuple[int, str]:
    """Sort key of a kind: Table 2's kinds in the paper's order, then the others by name."""
    return (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)), kind


@dataclass
class Row:
    """One counted forward op (a layer, or one step of a multi-step layer), with its backward and times."""

    name: str
    kind: str
    op: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    kernel_size: tuple[int, ...] | None
    groups: int | None
    params: int
    macs: int
    bytes: int
    macs_share: float = 0.0
    params_share: float = 0.0
    backward_macs: int | None = None
    forward_ms: float | None = None
    forward_iqr_ms: float | None = None
    backward_ms: float | None = None
    backward_iqr_ms: float | None = None
    predicted_ms: float | None = None

    @property
    def flops(self) -> int:
        """2 x MACs."""
        return 2 * self.macs

    @property
    def backward_flops(self) -> int | None:
        return None if self.backward_macs is None else 2 * self.backward_macs

    @property
    def intensity(self) -> float:
        """FLOPs per byte."""
        return self.flops / self.bytes if self.bytes else 0.0

    def as_dict(self) -> dict:
        """Every field and derived figure, in table order; ``intensity`` as ``intensity_flop_per_byte``."""
        values = dataclasses.asdict(self)
        values.update(flops=self.flops, backward_flops=self.backward_flops, intensity_flop_per_byte=self.intensity)
        order = ["name", "kind", "op", "input_shape", "output_shape", "kernel_size", "groups", "params", "macs",
                 "flops", "bytes", "intensity_flop_per_byte", "macs_share", "params_share", "backward_macs",
                 "backward_flops", "forward_ms", "forward_iqr_ms", "backward_ms", "backward_iqr_ms", "predicted_ms"]
        return {key: values[key] for key in order}


def _milliseconds(median: float | None, spread: float | None) -> str:
    if median is None:
        return "-"
    return f"{median:.3f}" if spread is None else f"{median:.3f} ± {spread:.3f}"


def _aligned(header: list[str], body: list[list[str]], left: int) -> str:
    """A plain-text table; the first ``left`` columns are text (left-aligned), the others figures."""
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def render(line):
        return "  ".join(cell.ljust(w) if i < left else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
    return "\n".join([render(header), "  ".join("-" * w for w in widths), *map(render, body)])


def _markdown(header: list[str], body: list[list[str]], left: int) -> str:
    rule = ["---" if i < left else "---:" for i in range(len(header))]
    return "\n".join("| " + " | ".join(line) + " |" for line in [header, rule, *body])


@dataclass
class Profile:
    """What a model costs on one input: one :class:`Row` per counted forward op, totals, breakdown.

    Attributes:
        model: the model's class name.
        input_shape, dtype: of the (first) input.
        rows: the counted forward ops in the order they ran.
        total_params: the model's parameter elements (``nn.Parameter``s; buffers such as batch-norm
            running statistics are not parameters).
        counted_params: those read by the counted ops; the rest (batch norm, ...) is listed apart.
        backward: whether the backward pass was counted (rows then have ``backward_macs``).
        machine: the roofline probes, when measured.
        model_ms, model_iqr_ms, repeats: the whole model's time (forward, or forward + backward),
            median and interquartile range over ``repeats`` runs without the counter, when measured.
    """

    model: str
    input_shape: tuple[int, ...]
    dtype: str
    rows: list[Row]
    total_params: int
    counted_params: int
    backward: bool = False
    machine: Machine | None = None
    model_ms: float | None = None
    model_iqr_ms: float | None = None
    repeats: int | None = None

    @property
    def total_macs(self) -> int:
        """Forward multiply-adds of the counted ops."""
        return sum(row.macs for row in self.rows)

    @property
    def total_flops(self) -> int:
        """2 x :attr:`total_macs`."""
        return 2 * self.total_macs

    @property
    def total_bytes(self) -> int:
        """Sum of the rows' minimum traffic (intermediate tensors count once written and once read)."""
        return sum(row.bytes for row in self.rows)

    @property
    def total_backward_macs(self) -> int | None:
        return sum(row.backward_macs or 0 for row in self.rows) if self.backward else None

    @property
    def measured(self) -> bool:
        return self.model_ms is not None

    def breakdown(self) -> list[dict]:
        """Shares by kind of op, MobileNets' Table 2 layout: kind, ops, MACs, share, params, share."""
        entries = []
        for kind in sorted({row.kind for row in self.rows}, key=kind_order):
            rows = [row for row in self.rows if row.kind == kind]
            macs, params = sum(r.macs for r in rows), sum(r.params for r in rows)
            entries.append({"kind": kind, "ops": len(rows), "macs": macs, "macs_share": macs / max(self.total_macs, 1),
                            "params": params, "params_share": params / max(self.total_params, 1)})
        other = self.total_params - self.counted_params
        if other:
            entries.append({"kind": OTHER_PARAMETERS, "ops": 0, "macs": 0, "macs_share": 0.0, "params": other,
                            "params_share": other / self.total_params})
        return entries

    # --- formats --------------------------------------------------------------------------------

    def _total_row(self) -> Row:
        def total(field):
            values = [getattr(row, field) for row in self.rows]
            return None if None in values else sum(values)
        return Row("total", "", "", (), (), None, None, self.total_params, self.total_macs, self.total_bytes, 1.0, 1.0,
                   self.total_backward_macs, total("forward_ms"), None, total("backward_ms"), None,
                   total("predicted_ms"))

    def _columns(self) -> list[tuple[str, Callable[[Row], str]]]:
        columns = [
            ("layer", lambda r: r.name), ("kind", lambda r: r.kind),
            ("kernel", lambda r: format_shape(r.kernel_size) if r.kernel_size else ""),
            ("input", lambda r: format_shape(r.input_shape)), ("output", lambda r: format_shape(r.output_shape)),
            ("params", lambda r: f"{r.params:,}"), ("MACs", lambda r: f"{r.macs:,}"),
            ("% MACs", lambda r: f"{100 * r.macs_share:.2f}"), ("bytes", lambda r: f"{r.bytes:,}"),
            ("FLOP/byte", lambda r: f"{r.intensity:.2f}"),
        ]
        if self.backward:
            columns.append(("backward MACs", lambda r: f"{r.backward_macs:,}"))
        if self.measured:
            columns += [("forward ms (median ± IQR)", lambda r: _milliseconds(r.forward_ms, r.forward_iqr_ms)),
                        ("predicted ms (roofline)", lambda r: _milliseconds(r.predicted_ms, None))]
            if self.backward:
                columns.append(("backward ms (median ± IQR)",
                                lambda r: _milliseconds(r.backward_ms, r.backward_iqr_ms)))
        return columns

    def _tables(self, render) -> list[str]:
        columns = self._columns()
        body = [[cell(row) for _, cell in columns] for row in [*self.rows, self._total_row()]]
        breakdown = [[entry["kind"], str(entry["ops"]), f"{entry['macs']:,}", f"{100 * entry['macs_share']:.2f}",
                      f"{entry['params']:,}", f"{100 * entry['params_share']:.2f}"] for entry in self.breakdown()]
        return [render([name for name, _ in columns], body, 5),
                render(["kind", "ops", "MACs", "% MACs", "params", "% params"], breakdown, 1)]

    def _title(self) -> str:
        return (f"{self.model} on input {format_shape(self.input_shape)} ({self.dtype}): "
                f"{len(self.rows)} counted ops{' with backward' if self.backward else ''}")

    def _summary(self) -> list[str]:
        lines = [f"total: {self.total_params:,} params ({self.counted_params:,} read by the counted ops); forward "
                 f"{self.total_macs:,} MACs = {self.total_flops:,} FLOPs; {self.total_bytes:,} bytes moved at least"]
        if self.backward:
            lines.append(f"backward: {self.total_backward_macs:,} MACs = {2 * self.total_backward_macs:,} FLOPs "
                         "(input and weight gradients)")
        if self.measured:
            what = "forward + backward" if self.backward else "forward"
            lines.append(f"whole model, {what}: {self.model_ms:.3f} ms median (IQR {self.model_iqr_ms:.3f} ms) over "
                         f"{self.repeats} runs; the table times each counted op alone, under the counter")
        if self.machine is not None:
            lines.append(f"roofline probes: {self.machine}")
        return lines

    def __str__(self) -> str:
        table, breakdown = self._tables(_aligned)
        return "\n".join([self._title(), CONVENTIONS, "", table, "", "By kind (MobileNets Table 2 layout):",
                          breakdown, "", *self._summary()])

    def to_markdown(self) -> str:
        table, breakdown = self._tables(_markdown)
        return "\n".join([f"### {self._title()}", "", CONVENTIONS + ".", "", table, "",
                          "By kind (MobileNets Table 2 layout):", "", breakdown, "",
                          *(f"- {line}" for line in self._summary())]) + "\n"

    def to_dict(self) -> dict:
        return {
            "model": self.model, "input_shape": list(self.input_shape), "dtype": self.dtype, "units": UNITS,
            "conventions": CONVENTIONS,
            "totals": {"params": self.total_params, "counted_params": self.counted_params, "macs": self.total_macs,
                       "flops": self.total_flops, "bytes": self.total_bytes, "backward_macs": self.total_backward_macs},
            "rows": [row.as_dict() for row in self.rows],
            "breakdown": self.breakdown(),
            "model_time": None if not self.measured else {
                "what": "forward + backward" if self.backward else "forward", "median_ms": self.model_ms,
                "iqr_ms": self.model_iqr_ms, "repeats": self.repeats},
            "machine": None if self.machine is None else {
                "memory_bandwidth_bytes_per_s": self.machine.memory_bandwidth,
                "peak_flops_per_s": self.machine.peak_flops, "threads": self.machine.threads,
                "description": self.machine.description},
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_csv(self) -> str:
        """One line per row; shapes as ``1x3x224x224``; empty cells for figures not measured."""
        buffer = io.StringIO()
        records = [row.as_dict() for row in self.rows]
        writer = csv.DictWriter(buffer, fieldnames=list(records[0]) if records else ["name"], lineterminator="\n")
        writer.writeheader()
        for record in records:
            writer.writerow({key: format_shape(value) if isinstance(value, tuple) else value
                             for key, value in record.items()})
        return buffer.getvalue()
