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


def measure(fns: dict, min_run_time: float, min_rounds: int, max_row_time: float) -> dict:
    """Per-call times (seconds) of each candidate over interleaved rounds."""
    block_s = min(max(min_run_time / 20, 0.005), 0.05)
    names = list(fns)
    numbers = {name: calibrate(fns[name], block_s) for name in names}  # also the warm-up call
    times = {name: [] for name in names}
    shuffler = random.Random(0)
    faults = dict.fromkeys(names, 0)  # minor page faults: fresh large buffers the allocator gave back to the OS
    spent = dict.fromkeys(names, 0.0)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        rounds = 0
        while True:
            order = shuffler.sample(names, len(names))
            for name in order:
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                elapsed = block(fns[name], numbers[name])
                faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
                times[name].append(elapsed / numbers[name])
                spent[name] += elapsed
            rounds += 1
            if rounds >= min_rounds and min(spent.values()) >= min_run_time:
                break
            if rounds >= 3 and time.perf_counter() - start >= max_row_time:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "rounds": len(t),
                   "page_faults_per_call": faults[name] / (numbers[name] * len(t)),
                   "iqr_s": (statistics.quantiles(t, n=4)[2] - statistics.quantiles(t, n=4)[0]) if len(t) > 1 else 0.0}
            for name, t in times.items()}
