"""What each twin costs and how fast it runs.

Costs are counted by :func:`sepconv.profile` on one input (parameters; forward MACs per input, FLOPs = 2 x
MACs; per counted op). Times are measured with :class:`torch.utils.benchmark.Timer` on this machine, with
PyTorch's current number of threads: the inference time (eval mode, no gradients) of a batch as large as the
run's validation batches (:func:`~sepconv.experiment.train.evaluation_batch_size`), of the model as trained
(eager) and of its copy optimised for inference (:func:`sepconv.optimize_for_inference`: batch norm folded into
the convolutions, activations fused, layout chosen once); and the time of one training step on a training batch
(forward, cross-entropy, backward, Adam step, constraints; on a copy, so the trained weights are untouched;
sepconv's default kernels). Where this CPU computes bf16 natively (:func:`native_bf16`), each twin's bf16 copy
(``optimize_for_inference(model, batch, dtype=torch.bfloat16)``: weights stored in bf16, float32 in and out) is
timed the same way, and its top-1 accuracy, top-1 agreement with the float32 model and largest logit error
(relative to the float32 logits' largest magnitude) are taken on the whole validation set. The twins are measured
in interleaved rounds, so that a change in the machine's load
affects both alike; the median and the interquartile range are over every timed block of every round.

:func:`profile_layers` times each counted op of each twin (eager, eval mode) with ``sepconv.profile`` and sets
it against its roofline time on this machine's roofs (:func:`~sepconv.profiling.timing.measure_machine`,
probed once per run): ``max(bytes / bandwidth, FLOPs / peak)``.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager

import torch
from torch import nn

from ..kernels.cpu.build import cpu_flags
from ..profiling import profile
from ..profiling.timing import Machine, median_and_iqr
from .train import evaluation_batch_size, train_step

__all__ = ["count_costs", "measure_times", "profile_layers", "machine_metrics", "optimizer_for_inference",
           "native_bf16", "TIMING_METHOD", "OPTIMIZED_METHOD", "BF16_METHOD", "BF16_NOT_NATIVE"]

ROUNDS = 3
MIN_RUN_SECONDS = 0.2  # per round, model and kind of measurement
TIMING_METHOD = (f"torch.utils.benchmark.Timer.blocked_autorange (at least {MIN_RUN_SECONDS} s per block set) in "
                 f"{ROUNDS} rounds alternating the twins; median and interquartile range of the per-call times "
                 "of every block")
OPTIMIZED_METHOD = ("sepconv.optimize_for_inference(model, batch): an eval-only copy with batch norm folded into "
                    "the convolutions, activations fused into the kernels and the memory layout chosen once")
BF16_METHOD = ("sepconv.optimize_for_inference(model, batch, dtype=torch.bfloat16): the optimised copy with its "
               "weights stored in bf16 (computed in float32 inside the fused kernels, rounded once per output); "
               "float32 input and output")
BF16_NOT_NATIVE = "bf16: not measured (this CPU has no native bf16: AVX512-BF16 or AMX)"
LAYER_REPEATS = 10  # sepconv.profile's repeats per op for the per-layer table
# The optimised copy must compute what the model computes; beyond float32 rounding its time would not be a
# speed-up of the same model.
OPTIMIZED_RTOL, OPTIMIZED_ATOL = 1e-3, 1e-4


@contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode inside (batch norm reads, not updates, its running statistics), the previous mode after."""
    training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(training)


def count_costs(model: nn.Module, input_shape) -> dict:
    """Parameters, forward MACs and FLOPs for one input of ``input_shape`` (no batch dim), and per counted op."""
    with _eval_mode(model):
        counted = profile(model, (1, *input_shape))
    return {"params": counted.total_params, "macs": counted.total_macs, "flops": counted.total_flops,
            "layers": [{"name": row.name, "kind": row.kind, "params": row.params, "macs": row.macs}
                       for row in counted.rows]}


def _batch(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """The first ``size`` items, repeated if there are fewer."""
    repeats = -(-size // len(tensor))
    return tensor.repeat(repeats, *(1,) * (tensor.ndim - 1))[:size] if repeats > 1 else tensor[:size]


def optimizer_for_inference():
    """:func:`sepconv.optimize_for_inference`, or ``None`` in a sepconv that has none."""
    import sepconv
    return getattr(sepconv, "optimize_for_inference", None)


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively, so that a bf16 inference time means something: PyTorch runs its
    AVX512 kernels (``torch.backends.cpu.get_cpu_capability()``, which ``ATEN_CPU_CAPABILITY`` can lower) and
    the CPU has AVX512-BF16 or AMX-BF16 (flags ``avx512_bf16``, ``amx_bf16`` of Linux's ``/proc/cpuinfo``).
    ``False`` elsewhere (other systems, other architectures): bf16 emulated in float32 would only be slower."""
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return False
    return capability.upper().startswith("AVX512") and bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def _bf16_copy(model: nn.Module, batch: torch.Tensor) -> tuple[nn.Module | None, dict]:
    """The bf16 copy of eval-mode ``model`` (float32 in, float32 out) and a note: ``{"precision": "bf16",
    "method"}``, or ``{"precision": "bf16", "method": None, "reason"}`` when there is none to measure."""
    def failed(reason):
        return None, {"precision": "bf16", "method": None, "reason": reason}

    if batch.device.type != "cpu":
        return failed(f"bf16: not measured (measured on the CPU only; the models are on {batch.device})")
    if not native_bf16():
        return failed(BF16_NOT_NATIVE)
    optimize = optimizer_for_inference()
    if optimize is None:
        return failed("bf16: not measured (this sepconv has no optimize_for_inference)")
    try:
        optimized = optimize(copy.deepcopy(model), batch, dtype=torch.bfloat16)
        with torch.no_grad():
            expected, got = model(batch), optimized(batch)
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as error:
        return failed(f"bf16: not measured (optimize_for_inference(dtype=torch.bfloat16) failed: "
                      f"{type(error).__name__}: {' '.join(str(error).split())})")
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape or got.dtype != expected.dtype:
        return failed("bf16: not measured (the bf16 copy's output is not shaped and typed like the model's)")
    if not torch.isfinite(expected).all():
        return failed("bf16: not measured (the model's own outputs are not finite)")
    return optimized, {"precision": "bf16", "method": BF16_METHOD}


def _bf16_accuracy(model: nn.Module, bf16_model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                   batch_size: int) -> dict:
    """Top-1 accuracy of the float32 ``model`` and of its ``bf16_model`` on ``inputs`` (in batches of
    ``batch_size``), their top-1 agreement, and the largest logit difference relative to the largest float32
    logit magnitude."""
    device = next(model.parameters()).device
    fp32_logits, bf16_logits = [], []
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            batch = inputs[start:start + batch_size].to(device)
            fp32_logits.append(model(batch).float().cpu())
            bf16_logits.append(bf16_model(batch).float().cpu())
    fp32, bf16 = torch.cat(fp32_logits), torch.cat(bf16_logits)
    labels = labels.cpu()
    fp32_top1, bf16_top1 = fp32.argmax(1), bf16.argmax(1)
    scale = fp32.abs().max().item()
    error = (bf16 - fp32).abs().max().item()
    return {"validation_size": len(labels),
            "fp32_validation_accuracy": (fp32_top1 == labels).double().mean().item(),
            "validation_accuracy": (bf16_top1 == labels).double().mean().item(),
            "top1_agreement": (bf16_top1 == fp32_top1).double().mean().item(),
            "max_abs_logit_error": error,
            "max_logit_error": _relative_error(error, scale)}


def _relative_error(error: float, scale: float) -> float:
    """``error / scale``; 0 for no error at scale 0, inf for an error at scale 0, nan for non-finite logits."""
    if not (math.isfinite(error) and math.isfinite(scale)):
        return math.nan
    if scale == 0:
        return 0.0 if error == 0 else math.inf
    return error / scale


def _optimized(model: nn.Module, batch: torch.Tensor) -> tuple[nn.Module | None, dict]:
    """The optimised copy of eval-mode ``model`` and how it was made: ``{"method", "max_abs_difference"}`` from
    the model's outputs on ``batch``, or ``{"method": None, "reason"}`` when there is no usable copy."""
    optimize = optimizer_for_inference()
    if optimize is None:
        return None, {"method": None, "reason": "this sepconv has no optimize_for_inference"}
    try:
        optimized = optimize(copy.deepcopy(model), batch)
        with torch.no_grad():
            expected, got = model(batch), optimized(batch)
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as error:
        return None, {"method": None, "reason": f"optimize_for_inference failed: {type(error).__name__}: "
                                                + " ".join(str(error).split())}
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        return None, {"method": None, "reason": "the optimised copy's output is not shaped like the model's; not timed"}
    difference = (got - expected).abs().max().item()
    if not torch.allclose(got, expected, rtol=OPTIMIZED_RTOL, atol=OPTIMIZED_ATOL):
        return None, {"method": None, "reason": f"the optimised copy's outputs differ from the model's (max "
                                                f"|difference| {difference:.3g}); not timed"}
    return optimized, {"method": OPTIMIZED_METHOD, "max_abs_difference": difference}


def measure_times(models: dict[str, nn.Module], inputs: torch.Tensor, labels: torch.Tensor, batch_size: int,
                  learning_rate: float, *, validation: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> dict[str, dict]:
    """Training-step times of each model on a batch of ``batch_size`` and inference times on the batch the run's
    validation uses (:func:`~sepconv.experiment.train.evaluation_batch_size`), in milliseconds.

    Returns, per model label, ``{"inference_ms": timing, "optimized_inference_ms": timing or None,
    "optimized_inference": how the optimised copy was made (``"precision": "fp32"``), "train_step_ms": timing}``, each timing
    ``{"median": ms, "iqr": ms, "calls": timed calls, "batch_size": inputs per call}``. ``inference_ms`` is the
    model as trained, in eval mode (eager); ``optimized_inference_ms`` its copy from
    :func:`sepconv.optimize_for_inference` (``None`` where there is none, with the reason in
    ``optimized_inference``).

    bf16, where this CPU computes it natively (:func:`native_bf16`): ``"bf16_inference_ms"``, the time of the copy
    from ``optimize_for_inference(model, batch, dtype=torch.bfloat16)`` in the same conditions (``None`` where
    not measured), and ``"bf16_inference"``: ``{"precision": "bf16", "method"}`` with, when ``validation``
    (inputs, labels) is given, ``validation_size``, ``fp32_validation_accuracy`` (the float32 model's),
    ``validation_accuracy`` (the bf16 copy's), ``top1_agreement`` (fraction of inputs whose top-1 class is the
    float32 model's), ``max_abs_logit_error`` and ``max_logit_error`` (that divided by the float32 logits' largest
    magnitude); or ``{"precision": "bf16", "method": None, "reason"}`` (:data:`BF16_NOT_NATIVE` on other CPUs).
    """
    from torch.utils import benchmark

    timers, notes = {}, {}
    # Inference at the training batch would mostly time per-call overhead for small inputs (8x8 digits); the
    # run's own inference, its validation, runs on larger batches.
    sizes = {"inference_ms": evaluation_batch_size(batch_size), "optimized_inference_ms":
             evaluation_batch_size(batch_size), "bf16_inference_ms": evaluation_batch_size(batch_size),
             "train_step_ms": batch_size}
    bf16_notes = {}
    for label, model in models.items():
        device = next(model.parameters()).device
        batch, batch_labels = _batch(inputs, batch_size).to(device), _batch(labels, batch_size).to(device)
        inference_batch = _batch(inputs, sizes["inference_ms"]).to(device)
        inference_model = copy.deepcopy(model).eval()
        optimized_model, note = _optimized(inference_model, inference_batch)
        notes[label] = {"precision": "fp32", **note}
        bf16_model, bf16_notes[label] = _bf16_copy(inference_model, inference_batch)
        if bf16_model is not None and validation is not None:
            bf16_notes[label].update(_bf16_accuracy(inference_model, bf16_model, *validation, sizes["inference_ms"]))
        training_model = copy.deepcopy(model).train()
        optimizer = torch.optim.Adam(training_model.parameters(), lr=learning_rate)

        def infer(model=inference_model, batch=inference_batch):
            with torch.no_grad():
                model(batch)

        def infer_optimized(model=optimized_model, batch=inference_batch):
            with torch.no_grad():
                model(batch)

        def infer_bf16(model=bf16_model, batch=inference_batch):
            with torch.no_grad():
                model(batch)

        def step(model=training_model, optimizer=optimizer, batch=batch, batch_labels=batch_labels):
            train_step(model, optimizer, batch, batch_labels)

        runs = [("inference_ms", infer), ("train_step_ms", step)]
        if optimized_model is not None:
            runs.insert(1, ("optimized_inference_ms", infer_optimized))
        if bf16_model is not None:
            runs.insert(-1, ("bf16_inference_ms", infer_bf16))
        for kind, run in runs:
            timers[label, kind] = benchmark.Timer("run()", globals={"run": run}, num_threads=torch.get_num_threads())
    seconds = {key: [] for key in timers}
    calls = dict.fromkeys(timers, 0)
    for _ in range(ROUNDS):
        for key, timer in timers.items():
            measurement = timer.blocked_autorange(min_run_time=MIN_RUN_SECONDS)
            seconds[key] += measurement.times
            calls[key] += len(measurement.times) * measurement.number_per_run
    results = {label: {"optimized_inference_ms": None, "optimized_inference": notes[label], "bf16_inference_ms": None,
                       "bf16_inference": bf16_notes[label]} for label in models}
    for (label, kind), samples in seconds.items():
        median, spread = median_and_iqr(samples)
        results[label][kind] = {"median": 1e3 * median, "iqr": 1e3 * spread, "calls": calls[label, kind],
                                "batch_size": sizes[kind]}
    return results


def machine_metrics(machine: Machine) -> dict:
    """The roofs of :func:`~sepconv.profiling.timing.measure_machine` as metrics (bytes/s, FLOP/s)."""
    return {"memory_bandwidth_bytes_per_second": machine.memory_bandwidth, "peak_flops_per_second": machine.peak_flops,
            "ridge_flop_per_byte": machine.ridge_intensity, "threads": machine.threads,
            "method": machine.description}


def profile_layers(models: dict[str, nn.Module], inputs: torch.Tensor, batch_size: int,
                   machine: Machine) -> dict[str, dict]:
    """Per counted op of each model (eval mode, eager, on the inference batch of training batch ``batch_size``, as
    :func:`measure_times`): measured forward time against the roofline time on ``machine``'s roofs.

    Returns, per model label, ``{"batch_size", "repeats", "model_ms", "model_iqr_ms", "measured_ms",
    "roofline_ms", "roofline_share", "uncounted_ms", "layers": [...]}``: the whole model's time (every op,
    uncounted ones such as norms, activations and pooling too), the sums over the counted ops, the difference
    of the two (what the uncounted ops and the Python between them take; approximate, as the counted ops are
    timed one by one), and per op ``name``, ``kind``,
    ``macs``, ``flops``, ``bytes``, ``measured_ms`` (median), ``measured_iqr_ms``, ``roofline_ms``
    (``max(bytes / bandwidth, FLOPs / peak)``), ``roofline_share`` (roofline / measured: 1 is at the roof) and
    ``bound`` (``"memory"`` or ``"compute"``: the larger of the two roofline terms).
    """
    results = {}
    for label, model in models.items():
        device = next(model.parameters()).device
        batch = _batch(inputs, evaluation_batch_size(batch_size)).to(device)
        with _eval_mode(model):
            measured = profile(model, batch, measure=True, repeats=LAYER_REPEATS, machine=machine)
        layers = [{"name": row.name, "kind": row.kind, "macs": row.macs, "flops": row.flops, "bytes": row.bytes,
                   "measured_ms": row.forward_ms, "measured_iqr_ms": row.forward_iqr_ms,
                   "roofline_ms": row.predicted_ms, "roofline_share": _share(row.predicted_ms, row.forward_ms),
                   "bound": _bound(row.flops, row.bytes, machine)}
                  for row in measured.rows]
        measured_ms = sum(layer["measured_ms"] for layer in layers)
        roofline_ms = sum(layer["roofline_ms"] for layer in layers)
        results[label] = {"batch_size": len(batch), "repeats": LAYER_REPEATS, "model_ms": measured.model_ms,
                          "model_iqr_ms": measured.model_iqr_ms, "measured_ms": measured_ms,
                          "roofline_ms": roofline_ms, "roofline_share": _share(roofline_ms, measured_ms),
                          "uncounted_ms": measured.model_ms - measured_ms, "layers": layers}
    return results


def _share(roofline_ms: float, measured_ms: float) -> float:
    return roofline_ms / measured_ms if measured_ms > 0 else math.nan


def _bound(flops: int, moved_bytes: int, machine: Machine) -> str:
    return "memory" if moved_bytes / machine.memory_bandwidth >= flops / machine.peak_flops else "compute"
