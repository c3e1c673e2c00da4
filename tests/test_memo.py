"""Memoised geometry: same answers with and without the cache, errors never cached."""

import pytest
import torch

import sepconv.functional as F
from sepconv._memo import memoised


def test_memoised_matches_uncached_and_handles_unhashable_arguments():
    calls = []

    @memoised
    def add(a, b):
        calls.append((a, b))
        return tuple(a) + tuple(b)

    assert add((1,), (2,)) == (1, 2) and add((1,), (2,)) == (1, 2)
    assert len(calls) == 1  # second call hit the cache
    assert add([1], [2]) == (1, 2) and add([1], [2]) == (1, 2)
    assert len(calls) == 3  # lists are unhashable: computed every time


def test_errors_are_raised_on_every_call_not_cached():
    x = torch.randn(1, 2, 5)
    w = torch.randn(2, 1, 3)
    for _ in range(2):
        with pytest.raises(ValueError, match="stride must be"):
            F.depthwise_conv(x, w, stride=0)
        with pytest.raises(TypeError, match=r"stride must be an int or a tuple of 1 ints, each >= 1; got 1.5"):
            F.depthwise_conv(x, w, stride=1.5)
    # A cached valid call with stride 1 must not make stride=True acceptable.
    F.depthwise_conv(x, w, stride=1)
    with pytest.raises(TypeError, match="got True of type bool"):
        F.depthwise_conv(x, w, stride=True)


def test_list_arguments_give_the_same_result():
    x = torch.randn(1, 2, 9, 9)
    w = torch.randn(4, 1, 3, 3)
    torch.testing.assert_close(F.depthwise_conv(x, w, stride=[2, 1], padding=[[0, 1], 1]),
                               F.depthwise_conv(x, w, stride=(2, 1), padding=((0, 1), 1)))
