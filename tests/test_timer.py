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


def test_a_layouts_first_call_does_not_decide_it(clock):
    """optimize_for_inference's first call in a layout is mostly the kernels registry measuring its ops: it must
    not count as that layout's speed (MobileNetV1 ran NCHW at half the speed for it)."""
    import torch
    from sepconv.inference import optimize

    class Model(torch.nn.Module):
        first_channels_last = True

        def forward(self, x):
            channels_last = x.is_contiguous(memory_format=torch.channels_last)
            if channels_last and self.first_channels_last:
                self.first_channels_last = False
                clock.now += 3.0  # the registry measuring every op once
            clock.now += 0.001 if channels_last else 0.004
            return x

    assert optimize._fastest_layout(Model(), torch.randn(1, 3, 8, 8)) == "channels_last"
