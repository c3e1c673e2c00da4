"""The one way sepconv times calls: blocks of calls in interleaved rounds, the least disturbed round kept.

Users: the kernels registry's ``auto`` choice (:func:`fastest` with the reference as ``baseline``),
``optimize_for_inference``'s layout choice, ``sepconv bench`` (:func:`calibrate` and :func:`interleaved`) and the
profiler's whole-model times and machine probes (:func:`samples`). ``sepconv compare`` reports times from
:mod:`torch.utils.benchmark` instead, which its report names. Interleaving matters on a shared machine: a burst of
load from another process then hits every candidate of a round, not one candidate's whole run.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

__all__ = ["MARGIN", "block", "calibrate", "fastest", "interleaved", "samples"]

MARGIN = 0.9  # a candidate replaces the baseline only below MARGIN x its time, so noise does not flip a tie
WARMUP = 2  # first calls load extensions, build oneDNN primitives and grow the allocator's pools
ROUNDS = 5
# A candidate whose first call takes OUTCLASSED x the quickest first call, and at least OUTCLASSED_S, is not timed
# further: it cannot win, and its remaining calls would cost the user seconds (PyTorch's bf16 convolutions on CPUs
# without AMX run seconds where a kernel takes milliseconds).
OUTCLASSED = 20.0
OUTCLASSED_S = 0.05


def block(fn: Callable[[], object], number: int) -> float:
    """Seconds for ``number`` calls of ``fn``."""
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return time.perf_counter() - start


def calibrate(fn: Callable[[], object], block_s: float, max_calls: int = 100_000) -> int:
    """Calls per block so that one block of ``fn`` takes about ``block_s`` seconds (the first call is a warm-up)."""
    number, elapsed = 1, block(fn, 1)
    while elapsed < block_s / 10 and number < max_calls:
        number *= 10
        elapsed = block(fn, number)
    return max(1, round(number * block_s / max(elapsed, 1e-9)))


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, numbers: dict[str, int] | None = None, *,
                after_round: Callable[[], None] | None = None,
                start: int = 0) -> tuple[dict[str, list[float]], dict[str, Exception]]:
    """Per-call seconds of each candidate in each of ``rounds`` rounds, and the candidates that raised.

    A round times one block of ``numbers[name]`` calls (1 by default) of every candidate, the starting candidate
    moving one on each round (round 0 starts at candidate ``start``) so that none always follows the same
    neighbour; the garbage collector is off meanwhile. A candidate that raises leaves the rounds (its exception is returned); the others go on.
    """
    names = list(fns)
    numbers = numbers or dict.fromkeys(names, 1)
    samples: dict[str, list[float]] = {name: [] for name in names}
    errors: dict[str, Exception] = {}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for index in range(rounds):
            shift = (start + index) % len(names) if names else 0
            for name in names[shift:] + names[:shift]:
                if name in errors:
                    continue
                try:
                    samples[name].append(block(fns[name], numbers[name]) / numbers[name])
                except Exception as error:  # noqa: BLE001 -- recorded, the other candidates go on
                    errors[name] = error
            if after_round is not None:
                after_round()
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples, errors


def samples(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (garbage collector off)."""
    for _ in range(warmup):
        fn()
    times, errors = interleaved({"fn": fn}, repeats)
    if errors:
        raise errors["fn"]
    return times["fn"]


def fastest(fns: dict[str, Callable[[], object]], baseline: str | None = None, *, margin: float = MARGIN,
            rounds: int = ROUNDS, warmup: int = WARMUP) -> str:
    """The name of the fastest of ``fns`` by its best single call over interleaved rounds (the least disturbed by
    other processes), after ``warmup`` calls each. With a ``baseline``, another candidate wins only below
    ``margin`` x the baseline's time; without, the plain minimum. A candidate outclassed on its first call (see
    ``OUTCLASSED``) loses without further calls. Exceptions propagate."""
    first = {name: block(fn, 1) for name, fn in fns.items()}
    quickest = min(first.values())
    fns = {name: fn for name, fn in fns.items() if first[name] <= max(OUTCLASSED * quickest, OUTCLASSED_S)}
    for _ in range(warmup - 1):
        for fn in fns.values():
            fn()
    samples, errors = interleaved(fns, rounds)
    if errors:
        raise next(iter(errors.values()))
    best = {name: min(values) for name, values in samples.items()}
    winner = min(best, key=best.__getitem__)
    if baseline not in best or winner == baseline or best[winner] < margin * best[baseline]:
        return winner
    return baseline
