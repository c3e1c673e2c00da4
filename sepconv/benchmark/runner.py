"""Candidates (one way of running a model each) and their interleaved timing, row by row.

A row is a :class:`~sepconv.benchmark.suite.Case`: a model and an input shape. Every candidate gets its own
deep copy of the same seeded model and the same input values. PyTorch candidates run in this process; each
runtime candidate (onnxruntime, OpenVINO: :mod:`~sepconv.benchmark.runtimes`) alone in its own worker process.
Timing is interleaved: after a warm-up call (where ``torch.compile`` compiles and ``auto`` measures its kernels)
and a calibration of calls per block, each round gives the cores to one process at a time, a short pause between
them so that the previous one's threads stop spinning; in its turn a process times one block of calls of each of
its candidates. The order rotates every round, so that drift on a shared machine hits all alike. A candidate's
time is the median (and interquartile range) of its per-call times over the rounds. A candidate that fails (to
build, to compile, to answer within its time limit, to agree with PyTorch's eager output) is recorded with a
one-line reason, one whose packages are missing as skipped, and the others go on.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import _timer, kernels
from .._extras import MissingExtra
from ..profiling import profile
from ..profiling.timing import Machine, median_and_iqr
from . import runtimes
from .suite import Case

__all__ = ["CANDIDATES", "COMPILED", "INFERENCE_ONLY", "ON_REQUEST", "TRAINING_ONLY", "WAYS", "CandidateFailed",
           "RowResult", "Timing", "Way", "run", "default_candidates"]


@dataclass(frozen=True)
class Way:
    """How a PyTorch candidate runs the model (the runtime candidates are :data:`runtimes.RUNTIMES`)."""

    mode: str = "auto"  # the sepconv.kernels mode of its calls
    layout: str = "nchw"  # of model and input: "nchw", "cl", or "faster" (whichever a few calls find faster)
    compiled: bool = False  # torch.compile of the (prepared) model
    prepare: str | None = None  # "fused" (sepconv.fuse_for_training) or "optimized" (optimize_for_inference)
    precision: str = "fp32"  # "bf16": optimize_for_inference(..., dtype=torch.bfloat16)


WAYS = {"eager_nchw": Way("reference"), "eager_cl": Way("reference", "cl"), "compile": Way("reference", compiled=True),
        "sepconv": Way(layout="faster"), "sepconv_nchw": Way(), "sepconv_cl": Way(layout="cl"),
        "cpu_nchw": Way("cpu"), "cpu_cl": Way("cpu", "cl"), "sepconv_compile": Way(compiled=True),
        "fused": Way(layout="faster", prepare="fused"), "optimized": Way(prepare="optimized"),
        "optimized_compile": Way(compiled=True, prepare="optimized"),
        "optimized_bf16": Way(prepare="optimized", precision="bf16")}
CANDIDATES = (*WAYS, *runtimes.RUNTIMES)
COMPILED = frozenset(name for name, way in WAYS.items() if way.compiled)
INFERENCE_ONLY = frozenset({"optimized", "optimized_compile", "optimized_bf16", *runtimes.RUNTIMES})
TRAINING_ONLY = frozenset({"fused"})  # sepconv.fuse_for_training; inference has optimized
# One layout of sepconv's kernels, or its C++ backend forced: for kernel work, so only named with --candidates.
ON_REQUEST = frozenset({"sepconv_nchw", "sepconv_cl", "cpu_nchw", "cpu_cl"})
EAGER = ("eager_nchw", "eager_cl")  # "vs eager" compares with the faster of these
PEERS = ("compile", "onnxruntime", "openvino")  # the other columns of speed-ups: each peer as users run it
# A candidate's output may differ from PyTorch's eager NCHW output by this much, relative to its largest value
# (other kernels sum in another order; folded batch norm rounds differently); in a reduced precision (bf16
# keeps 8 bits of mantissa, rounded at every layer) by REDUCED_AGREEMENT, beyond which it is wrong, not rounded.
AGREEMENT = 1e-2
REDUCED_AGREEMENT = 0.25
SETTLE_S = 0.1  # the pause between two processes' turns: ORT's idle threads spin for tens of milliseconds
TIMEOUT_S = 300.0  # the default time limit of a runtime candidate's every step (OpenVINO compiles for minutes)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LEARNING_RATE = 1e-4  # small, so that thousands of timed steps on random labels stay finite


class CandidateFailed(Exception):
    """A candidate cannot run this row; the message is one line."""


def one_line(error: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``, at most ``limit`` characters (compile errors run to pages)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if not isinstance(error, (CandidateFailed, runtimes.RuntimeFailed, MissingExtra)):  # their messages say it all
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def default_candidates(train: bool, compile: bool = True) -> list[str]:
    """Every candidate that applies but those of :data:`ON_REQUEST`: inference-only ones left out with ``train``,
    compiled ones without ``compile``. A runtime that is not installed stays, to be reported as skipped."""
    return [name for name in CANDIDATES if name not in ON_REQUEST and not (train and name in INFERENCE_ONLY)
            and not (not train and name in TRAINING_ONLY) and (compile or name not in COMPILED)]


@dataclass
class Timing:
    """One candidate on one row: per-call seconds (median, IQR) over interleaved rounds, or why it failed or
    was skipped."""

    candidate: str
    median_s: float | None = None
    iqr_s: float | None = None
    rounds: int = 0
    calls_per_block: int = 0
    warmup_s: float | None = None  # the first call: compiling, auto's kernel measurements; a runtime's loading too
    max_error: float | None = None  # largest |output - eager_nchw's| / largest |eager_nchw output| (inference)
    top1: float | None = None  # share of the batch whose top class is eager_nchw's (inference, 2-D outputs)
    precision: str | None = "fp32"  # what it computes in; None: not known (a runtime that failed to load)
    pid: int | None = None  # the process that timed it
    error: str | None = None
    skipped: str | None = None  # why it could not run here (a missing package)

    @property
    def ok(self) -> bool:
        return self.error is None and self.skipped is None and self.median_s is not None


@dataclass
class RowResult:
    """One row: what ran, each candidate's :class:`Timing`, and the model's roofline time on this machine."""

    name: str
    input_shape: tuple[int, ...]
    train: bool
    timings: dict[str, Timing]
    flops: int | None = None
    bytes: int | None = None
    roofline_s: float | None = None
    notes: list[str] = field(default_factory=list)

    def best(self, names: Iterable[str]) -> float | None:
        times = [self.timings[n].median_s for n in names if n in self.timings and self.timings[n].ok]
        return min(times) if times else None

    def speedups(self) -> dict[str, dict[str, float | None]]:
        """Per candidate: peer time / its time (> 1: faster) against the best eager layout, compile,
        onnxruntime and OpenVINO at its default precision; ``None`` where either failed or was not run."""
        peers = {"eager": self.best(EAGER), **{peer: self.best([peer]) for peer in PEERS}}
        return {name: {peer: (None if t is None or not timing.ok else t / timing.median_s) for peer, t in peers.items()}
                for name, timing in self.timings.items()}

    def roofline_share(self, candidate: str) -> float | None:
        timing = self.timings.get(candidate)
        if self.roofline_s is None or timing is None or not timing.ok:
            return None
        return self.roofline_s / timing.median_s

    def as_dict(self) -> dict:
        speedups = self.speedups()
        return {"name": self.name, "input_shape": list(self.input_shape), "pass": "train" if self.train else "infer",
                "flops": self.flops, "bytes": self.bytes, "roofline_ms": _ms(self.roofline_s), "notes": self.notes,
                "candidates": {name: {"median_ms": _ms(t.median_s), "iqr_ms": _ms(t.iqr_s), "rounds": t.rounds,
                                      "calls_per_block": t.calls_per_block, "warmup_s": t.warmup_s,
                                      "max_error": t.max_error, "top1": t.top1, "precision": t.precision,
                                      "pid": t.pid, "error": t.error, "skipped": t.skipped,
                                      "speedup_vs": speedups[name], "roofline_share": self.roofline_share(name)}
                               for name, t in self.timings.items()}}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


# --- building the candidates ---------------------------------------------------------------------

def channels_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` with channels innermost in memory, same shape and values (3-D: ``(N, L, C)`` storage)."""
    if t.ndim == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if t.ndim == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    if t.ndim == 3:
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    return t


def _model_channels_last(model: nn.Module) -> nn.Module:
    """Convolution weights channels-last in their rank (PyTorch's module conversion takes one rank at a time)."""
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.ndim in (4, 5):
                tensor.data = channels_last(tensor.data)
    return model


def _loss(output: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    if labels is not None:
        return F.cross_entropy(output, labels)
    return output.sum()


def _compiled(model: nn.Module) -> nn.Module:
    return torch.compile(model, dynamic=False)


def build_candidate(name: str, model: nn.Module, x: torch.Tensor, *, train: bool,
                    labels: torch.Tensor | None) -> Callable[[], object]:
    """A no-argument callable that runs ``model`` once the PyTorch candidate's way: a forward pass (inference)
    or a training step (which also computes the input's gradient where ``x`` requires it). ``model`` is this
    candidate's own copy. Raises :class:`CandidateFailed` when it cannot."""
    if name not in WAYS:
        raise CandidateFailed(f"unknown candidate {name!r}" if name not in runtimes.RUNTIMES
                              else f"{name} runs in its own process")
    if train and name in INFERENCE_ONLY:
        raise CandidateFailed(f"{name} times inference only")
    if not train and name in TRAINING_ONLY:
        raise CandidateFailed(f"{name} times training only")
    return _build_way(WAYS[name], model, x, train=train, labels=labels)


def _build_way(way: Way, model: nn.Module, x: torch.Tensor, *, train: bool,
               labels: torch.Tensor | None) -> Callable[[], object]:
    if way.prepare == "fused":
        from ..training import fuse_for_training
        model = fuse_for_training(model)
    if way.layout == "faster":  # sepconv at its best: the faster of the two layouts on this machine
        layouts = {layout: _build_way(Way(way.mode, layout, way.compiled), copy.deepcopy(model), x, train=train,
                                      labels=labels) for layout in ("nchw", "cl")}
        # A call of the large rows takes seconds: one warm-up and three rounds tell two layouts apart.
        return layouts[_timer.fastest(layouts, rounds=3, warmup=1)]
    if way.layout == "cl":
        model, x = _model_channels_last(model), channels_last(x)
    if way.prepare == "optimized":
        model = _optimized(model, x, way.mode, DTYPES[way.precision])
    if way.compiled:
        model = _compiled(model)
    return _training_step(model, x, way.mode, labels) if train else _forward(model, x, way.mode)


def _optimized(model: nn.Module, x: torch.Tensor, mode: str, dtype: torch.dtype) -> nn.Module:
    from .. import optimize_for_inference

    with kernels.use_kernels(mode), torch.no_grad():
        return optimize_for_inference(model.eval(), x, dtype=dtype)


def _forward(model: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], object]:
    model.eval()

    def forward():
        with kernels.use_kernels(mode), torch.inference_mode():
            return model(x)
    return forward


def _training_step(model: nn.Module, x: torch.Tensor, mode: str,
                   labels: torch.Tensor | None) -> Callable[[], object]:
    model.train()
    x = x.detach().requires_grad_(x.requires_grad)  # a leaf of this candidate's layout, so its gradient is too
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.9)

    def step():
        with kernels.use_kernels(mode):
            optimizer.zero_grad(set_to_none=True)
            x.grad = None  # a fresh input gradient each step, as the layer before would receive it
            output = model(x)
            loss = _loss(output, labels if output.ndim == 2 else None)
            loss.backward()
            optimizer.step()
        return output
    return step


def _check_output(timing: Timing, output, reference: torch.Tensor) -> None:
    """Record ``output``'s largest error against eager_nchw's (relative to the latter's largest value) and, for
    a batch of class scores, its top-1 agreement; raise :class:`CandidateFailed` past the precision's limit."""
    output = torch.as_tensor(output).float()
    if output.shape != reference.shape:
        raise CandidateFailed(f"output shape {tuple(output.shape)} differs from eager_nchw's "
                              f"{tuple(reference.shape)}")
    error = (output - reference).abs().max().item() / (reference.abs().max().item() or 1.0)
    limit = AGREEMENT if timing.precision == "fp32" else REDUCED_AGREEMENT
    if not error <= limit:  # nan too
        raise CandidateFailed(f"output ({timing.precision}) differs from eager_nchw's by {error:.2g} of its "
                              "largest value")
    timing.max_error = error
    if output.ndim == 2:
        timing.top1 = (output.argmax(1) == reference.argmax(1)).float().mean().item()


# --- timing -----------------------------------------------------------------------------------------

HERE = "this process"  # the group of the PyTorch candidates in the rounds


def _time_rounds(fns: dict[str, Callable[[], object]], workers: dict[str, runtimes.Worker],
                 timings: dict[str, Timing], rounds: int, advance: Callable[[], None]) -> None:
    """Fill ``timings`` (calls per block already set) from ``rounds`` rounds. A round gives each process its turn
    (this one's PyTorch candidates, interleaved, then each worker), pausing :data:`SETTLE_S` before each turn when
    there is more than one process; the order rotates every round. A candidate that raises leaves the rounds."""
    numbers = {name: timings[name].calls_per_block for name in [*fns, *workers]}
    groups = ([HERE] if fns else []) + list(workers)
    samples: dict[str, list[float]] = {name: [] for name in numbers}
    failed: dict[str, BaseException] = {}
    for index in range(rounds):
        shift = index % len(groups) if groups else 0
        for group in groups[shift:] + groups[:shift]:
            if len(groups) > 1:
                time.sleep(SETTLE_S)
            if group == HERE:
                live = {name: fn for name, fn in fns.items() if name not in failed}
                got, errors = _timer.interleaved(live, 1, numbers, start=index)
                failed.update(errors)
                for name, values in got.items():
                    samples[name] += values
            elif group not in failed:
                try:
                    samples[group].append(workers[group].block(numbers[group]))
                except runtimes.RuntimeFailed as error:
                    failed[group] = error
        advance()
    for name, error in failed.items():
        timings[name].error = one_line(error)
    for name, values in samples.items():
        if values and name not in failed:
            timings[name].median_s, timings[name].iqr_s = median_and_iqr(values)
            timings[name].rounds = len(values)


def roofline(model: nn.Module, shape: tuple[int, ...], machine: Machine, train: bool):
    """``(FLOPs, bytes, seconds)``: the sum over the model's counted ops of max(bytes / copy bandwidth, FLOPs /
    matmul peak) (:meth:`Machine.predicted_seconds`). A training step counts the backward FLOPs too and three
    times the forward bytes (the two gradients each move at least what the forward moved)."""
    with kernels.use_kernels("reference"):
        result = profile(model, shape, backward=train)
    flops = moved = seconds = 0
    for row in result.rows:
        row_flops = row.flops + ((row.backward_flops or 0) if train else 0)
        row_bytes = row.bytes * (3 if train else 1)
        flops, moved = flops + row_flops, moved + row_bytes
        seconds += machine.predicted_seconds(row_flops, row_bytes)
    return flops, moved, seconds


def run_case(case: Case, candidates: list[str], *, train: bool, threads: int, rounds: int, block_s: float,
             machine: Machine | None, seed: int = 0, advance: Callable[[], None] = lambda: None,
             timeout_s: float = TIMEOUT_S, runtime_options: dict | None = None) -> RowResult:
    """Build every candidate on this row, warm each up, check it against eager NCHW, time them in rounds.
    Runtime candidates run in worker processes, each step of theirs within ``timeout_s``; ``runtime_options``
    go to their loaders (``spinning``: False turns ORT's spinning threads off)."""
    torch.manual_seed(seed)
    dtype = DTYPES[case.precision]
    model = case.build().to(dtype)
    model.train(train)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(case.input_shape, generator=generator).to(dtype).requires_grad_(train and case.input_grad)
    result = RowResult(case.name, tuple(case.input_shape), train, {name: Timing(name) for name in candidates})
    if machine is not None:
        try:
            result.flops, result.bytes, result.roofline_s = roofline(copy.deepcopy(model), case.input_shape, machine,
                                                                     train)
        except Exception as error:  # noqa: BLE001 -- the timings still mean something
            result.notes.append(f"roofline: {one_line(error)}")
    labels = None
    if train:
        with torch.no_grad(), kernels.use_kernels("reference"):
            out = copy.deepcopy(model).eval()(x)
        if out.ndim == 2:
            labels = torch.randint(out.shape[1], (out.shape[0],), generator=generator)
    reference = None
    if not train:  # in float32 whatever the row's precision: the error of bf16 rows is part of what they show
        with torch.inference_mode(), kernels.use_kernels("reference"):
            reference = copy.deepcopy(model).float().eval()(x.float())
    if any(name in COMPILED for name in candidates):
        torch._dynamo.reset()  # each row compiles afresh, away from the previous rows' recompile limits
    fns = {}
    for name in (name for name in candidates if name not in runtimes.RUNTIMES):
        timing = result.timings[name]
        try:
            if name in WAYS:
                timing.precision = case.precision if WAYS[name].precision == "fp32" else WAYS[name].precision
            fn = build_candidate(name, copy.deepcopy(model), x.clone(), train=train, labels=labels)
            start = time.perf_counter()
            output = fn()
            timing.warmup_s = time.perf_counter() - start
            if reference is not None:
                _check_output(timing, output, reference)
            timing.calls_per_block = _timer.calibrate(fn, block_s)
            timing.pid = os.getpid()
        except Exception as error:  # noqa: BLE001 -- recorded, the other candidates go on
            timing.error = one_line(error)
            continue
        fns[name] = fn
    with tempfile.TemporaryDirectory(prefix="sepconv-bench-") as folder:
        workers = _start_workers(model, x, result.timings, reference, Path(folder), train=train, threads=threads,
                                 block_s=block_s, timeout_s=timeout_s, options=runtime_options or {})
        try:  # with no candidate left, the rounds still advance the bar
            _time_rounds(fns, workers, result.timings, rounds, advance)
        finally:
            for worker in workers.values():
                worker.close()
    return result


def _start_workers(model: nn.Module, x: torch.Tensor, timings: dict[str, Timing], reference: torch.Tensor | None,
                   folder: Path, *, train: bool, threads: int, block_s: float, timeout_s: float,
                   options: dict) -> dict[str, runtimes.Worker]:
    """A loaded, checked and calibrated worker per runtime candidate of ``timings`` that can run here; the
    others' timings say why not. The model is exported to ONNX once, for all of them."""
    names = [name for name in timings if name in runtimes.RUNTIMES]
    if train:
        for name in names:
            timings[name].error = f"{name} times inference only"
        return {}
    for name in names:
        timings[name].skipped = runtimes.missing(name)
        timings[name].precision = None  # the runtime says, once loaded
    names = [name for name in names if timings[name].skipped is None]
    if not names:
        return {}
    try:
        # float32 whatever the row's precision: each runtime computes in its own
        model_path = runtimes.export_onnx(copy.deepcopy(model).float(), x.detach().float(), folder / "model.onnx")
    except Exception as error:  # noqa: BLE001 -- a model the exporter cannot trace fails every runtime alike
        for name in names:
            timings[name].error = f"ONNX export: {one_line(error)}"
        return {}
    input_path = folder / "input.npy"
    np.save(input_path, x.detach().float().contiguous().numpy())
    workers = {}
    for name in names:
        timing, worker = timings[name], runtimes.Worker(name, timeout_s)
        try:
            reply = worker.load(model_path, input_path, folder / f"{name}.npy", threads, options)
            timing.pid, timing.precision, timing.warmup_s = reply["pid"], reply["precision"], reply["warmup_s"]
            _check_output(timing, np.load(folder / f"{name}.npy"), reference)
            timing.calls_per_block = worker.calibrate(block_s)
        except (runtimes.RuntimeFailed, CandidateFailed) as error:
            timing.error = one_line(error)
            worker.close()
            continue
        except BaseException:
            worker.close()
            for started in workers.values():
                started.close()
            raise
        workers[name] = worker
    return workers


def run(cases: list[Case], candidates: list[str], *, train: bool, threads: int, rounds: int, block_s: float,
        machine: Machine | None, advance: Callable[[], None] = lambda: None, **runtime) -> Iterator[RowResult]:
    """:func:`run_case` for each row in turn, yielding each finished row (so that an interrupt keeps them);
    ``runtime``: its ``timeout_s`` and ``runtime_options``."""
    for case in cases:
        yield run_case(case, candidates, train=train, threads=threads, rounds=rounds, block_s=block_s,
                       machine=machine, advance=advance, **runtime)
