"""What the benchmark scripts share: timing blocks of calls, geometric means, the machine's load, tables."""

from __future__ import annotations

import math
import os
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
