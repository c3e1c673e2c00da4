"""sepconv._timer on a fake clock: which candidate wins, and which calls are made."""

import pytest

from sepconv import _timer


@pytest.fixture
def clock(monkeypatch):
    """A clock that only the candidates advance: each call adds its cost."""
    class Clock:
        now = 0.0

        def perf_counter(self):
            return self.now

    fake = Clock()
    monkeypatch.setattr(_timer.time, "perf_counter", fake.perf_counter)
    return fake


def candidate(clock, seconds, calls):
    def call():
        calls.append(seconds)
        clock.now += seconds
    return call


def test_the_quickest_wins_and_the_baseline_keeps_a_near_tie(clock):
    calls = []
    fns = {"reference": candidate(clock, 0.010, calls), "fast": candidate(clock, 0.005, calls)}
    assert _timer.fastest(fns, baseline="reference") == "fast"
    near = {"reference": candidate(clock, 0.010, calls), "close": candidate(clock, 0.0095, calls)}
    assert _timer.fastest(near, baseline="reference") == "reference"  # within the margin


def test_an_outclassed_candidate_is_called_once(clock):
    slow, fast = [], []
    fns = {"reference": candidate(clock, 2.0, slow), "kernel": candidate(clock, 0.002, fast)}
    assert _timer.fastest(fns, baseline="reference") == "kernel"
    assert len(slow) == 1
    assert len(fast) == _timer.WARMUP + _timer.ROUNDS


def test_short_calls_are_all_timed_however_far_apart(clock):
    # below OUTCLASSED_S a first call may be mostly one-off work (a primitive built, memory mapped)
    slow, fast = [], []
    fns = {"reference": candidate(clock, 0.04, slow), "kernel": candidate(clock, 0.0001, fast)}
    assert _timer.fastest(fns, baseline="reference") == "kernel"
    assert len(slow) == len(fast) == _timer.WARMUP + _timer.ROUNDS
