"""What the benchmark scripts share: timing blocks of calls and interleaved rounds of them, geometric means, the
machine's load, tables."""

from __future__ import annotations

import gc
import math
import os
import random
import resource
import statistics
import time


def block(fn, number: int) -> float:
    """Seconds for ``number`` calls of ``fn``."""
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return time.perf_counter() - start


def calibrate(fn, block_s: float) -> int:
    """Calls per block so that one block takes about ``block_s`` (the first calls double as warm-up)."""
    number = 1
    while True:
        elapsed = block(fn, number)
        if elapsed >= block_s / 5 or number >= 1_000_000:
            return max(1, round(number * block_s / elapsed))
        number *= 10 if elapsed < block_s / 50 else 5


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def loadavg():
    """1, 5 and 15 minute load averages, or None where the OS does not say."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def print_table(header: str, lines) -> None:
    """A table as the scripts print it: the header, a rule as wide, then one line per row."""
    print(header)
    print("-" * len(header))
    for line in lines:
        print(line)


def rounds(fns: dict, min_run_time: float, min_rounds: int, max_row_time: float, shuffle: bool = True):
    """Interleaved rounds: each round times a block of calls of every candidate.

    Returns ``(times, faults, numbers)``: per-call seconds of each candidate in each round, minor page faults
    per call (fresh large buffers the allocator gave back to the OS), and calls per block. The order within
    a round is a seeded shuffle, or with ``shuffle=False`` the given order, reversed every other round.
    Stops once every candidate has ``min_run_time`` seconds over at least ``min_rounds`` rounds, or after
    3 rounds once ``max_row_time`` has passed.
    """
    block_s = min(max(min_run_time / 20, 0.005), 0.05)
    names = list(fns)
    numbers = {name: calibrate(fns[name], block_s) for name in names}  # also the warm-up call
    times = {name: [] for name in names}
    shuffler = random.Random(0)
    faults = dict.fromkeys(names, 0)
    spent = dict.fromkeys(names, 0.0)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        done = 0
        while True:
            if shuffle:
                order = shuffler.sample(names, len(names))
            else:
                order = names if done % 2 == 0 else names[::-1]
            for name in order:
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                elapsed = block(fns[name], numbers[name])
                faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
                times[name].append(elapsed / numbers[name])
                spent[name] += elapsed
            done += 1
            if done >= min_rounds and min(spent.values()) >= min_run_time:
                break
            if done >= 3 and time.perf_counter() - start >= max_row_time:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return times, {name: faults[name] / (numbers[name] * done) for name in names}, numbers


def _iqr(t: list[float]) -> float:
    if len(t) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(t, n=4)
    return q3 - q1


def measure(fns: dict, min_run_time: float, min_rounds: int, max_row_time: float) -> dict:
    """Per-call times (seconds) of each candidate over interleaved rounds (:func:`rounds`, shuffled)."""
    times, faults, _ = rounds(fns, min_run_time, min_rounds, max_row_time)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "rounds": len(t),
                   "page_faults_per_call": faults[name], "iqr_s": _iqr(t)}
            for name, t in times.items()}
