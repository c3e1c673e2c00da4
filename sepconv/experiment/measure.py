"""What each twin costs and how fast it runs.

Costs are counted by :func:`sepconv.profile` on one input (parameters; forward MACs per input, FLOPs = 2 x
MACs; per counted op). Times are measured with :class:`torch.utils.benchmark.Timer` on this machine, with
PyTorch's current number of threads: the inference time of a batch (eval mode, no gradients) and the time of
one training step on a batch (forward, cross-entropy, backward, Adam step, constraints; on a copy, so the
trained weights are untouched). The twins are measured in interleaved rounds, so that a change in the
machine's load affects both alike; the median and the interquartile range are over every timed block of
every round.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import nn

from ..profiling import profile
from ..profiling.timing import median_and_iqr
from .train import train_step

__all__ = ["count_costs", "measure_times", "TIMING_METHOD"]

ROUNDS = 3
MIN_RUN_SECONDS = 0.2  # per round, model and kind of measurement
TIMING_METHOD = (f"torch.utils.benchmark.Timer.blocked_autorange (at least {MIN_RUN_SECONDS} s per block set) in "
                 f"{ROUNDS} rounds alternating the twins; median and interquartile range of the per-call times "
                 "of every block")


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


def measure_times(models: dict[str, nn.Module], inputs: torch.Tensor, labels: torch.Tensor, batch_size: int,
                  learning_rate: float) -> dict[str, dict]:
    """Inference and training-step times of each model on a batch of ``batch_size``, in milliseconds.

    Returns, per model label, ``{"inference_ms": timing, "train_step_ms": timing}``, each timing
    ``{"median": ms, "iqr": ms, "calls": timed calls, "batch_size": batch_size}``.
    """
    from torch.utils import benchmark

    timers = {}
    for label, model in models.items():
        device = next(model.parameters()).device
        batch, batch_labels = _batch(inputs, batch_size).to(device), _batch(labels, batch_size).to(device)
        inference_model = copy.deepcopy(model).eval()
        training_model = copy.deepcopy(model).train()
        optimizer = torch.optim.Adam(training_model.parameters(), lr=learning_rate)

        def infer(model=inference_model, batch=batch):
            with torch.no_grad():
                model(batch)

        def step(model=training_model, optimizer=optimizer, batch=batch, batch_labels=batch_labels):
            train_step(model, optimizer, batch, batch_labels)

        for kind, run in (("inference_ms", infer), ("train_step_ms", step)):
            timers[label, kind] = benchmark.Timer("run()", globals={"run": run}, num_threads=torch.get_num_threads())
    seconds = {key: [] for key in timers}
    calls = dict.fromkeys(timers, 0)
    for _ in range(ROUNDS):
        for key, timer in timers.items():
            measurement = timer.blocked_autorange(min_run_time=MIN_RUN_SECONDS)
            seconds[key] += measurement.times
            calls[key] += len(measurement.times) * measurement.number_per_run
    results = {label: {} for label in models}
    for (label, kind), samples in seconds.items():
        median, spread = median_and_iqr(samples)
        results[label][kind] = {"median": 1e3 * median, "iqr": 1e3 * spread, "calls": calls[label, kind],
                                "batch_size": batch_size}
    return results
