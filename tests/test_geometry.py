"""Geometry: padding amounts and output sizes (TF/Keras 'same' examples from REFERENCE.md, the project's shared
reference: kept outside this repository, its numbers written out here)."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sepconv import geometry as g


@pytest.mark.parametrize("n, k, s, d, expected", [
    (224, 3, 2, 1, (0, 1)),   # REFERENCE.md: n=224,k=3,s=2 -> (0,1)
    (225, 3, 2, 1, (1, 1)),   # n=225 -> (1,1)
    (10, 4, 1, 1, (1, 2)),    # k=4,s=1 -> (1,2): the extra element goes after
    (128, 64, 1, 1, (31, 32)),  # k=64,s=1 -> (31,32) (EEGNet's temporal conv)
    (7, 3, 3, 1, (1, 1)),
    (6, 3, 3, 1, (0, 0)),
    (9, 3, 2, 2, (2, 2)),     # dilation: k_eff = 5
    (10, 3, 2, 2, (1, 2)),
    (1, 5, 4, 1, (2, 2)),
])
def test_same_padding_reference_examples(n, k, s, d, expected):
    assert g.same_padding(n, k, s, d) == expected


@given(n=st.integers(1, 300), k=st.integers(1, 70), s=st.integers(1, 6), d=st.integers(1, 4))
def test_same_gives_ceil_n_over_s(n, k, s, d):
    before, after = g.same_padding(n, k, s, d)
    assert 0 <= after - before <= 1
    assert g.output_size(n, k, s, (before, after), d) == math.ceil(n / s)


@given(n=st.integers(1, 300), k=st.integers(1, 40), s=st.integers(1, 6), d=st.integers(1, 4))
def test_valid_and_causal_sizes(n, k, s, d):
    k_eff = (k - 1) * d + 1
    if n >= k_eff:
        assert g.conv_output_shape((n,), k, s, "valid", d) == ((n - k_eff) // s + 1,)
    assert g.resolve_padding("causal", (k,), (s,), (d,)) == ((k_eff - 1, 0),)
    assert g.conv_output_shape((n,), k, s, "causal", d) == (math.ceil(n / s),)


def test_normalize_padding_forms():
    assert g.normalize_padding(2, 3) == ((2, 2),) * 3
    assert g.normalize_padding((1, (0, 3)), 2) == ((1, 1), (0, 3))
    assert g.normalize_padding("valid", 1) == ("valid",)
    assert g.normalize_padding("causal", 1) == ("causal",)
    assert g.normalize_padding("causal", 3) == ("same", "same", "causal")
    assert g.normalize_padding(("valid", "causal"), 2) == ("valid", "causal")
    assert g.normalize_padding([[1, 2], [3, 4]], 2) == ((1, 2), (3, 4))


def test_resolve_padding_mixed_axes():
    pairs = g.resolve_padding(("same", (0, 2), "causal"), (3, 3, 4), (2, 1, 1), (1, 1, 2), (224, 5, 9))
    assert pairs == ((0, 1), (0, 2), (6, 0))


def test_same_with_stride_needs_input_size():
    with pytest.raises(ValueError, match=r"padding='same' with stride 2 on spatial axis 0 depends on the input size"):
        g.resolve_padding("same", (3,), (2,))
    assert g.resolve_padding("same", (4,), (1,)) == ((1, 2),)  # stride 1: independent of n


@pytest.mark.parametrize("padding, stride, static", [
    ("same", (1, 1), True), ("same", (1, 2), False), ("valid", (2, 2), True), (((0, 1), 1), (2, 2), True),
    ("causal", (1, 2), True),   # 'same' on axis 0 at stride 1, causal on the time axis at any stride
    ("causal", (2, 1), False),  # 'same' on axis 0 at stride 2 depends on the input size
])
def test_is_static(padding, stride, static):
    assert g.is_static(g.normalize_padding(padding, 2), stride) is static


@pytest.mark.parametrize("value, message", [
    (0, r"kernel_size must be an int or a tuple of 2 ints, each >= 1; got 0"),
    ((3,), r"kernel_size must be an int or a tuple of 2 ints, each >= 1; got \(3,\)"),
    ((3, -1), r"kernel_size must be an int or a tuple of 2 ints, each >= 1; got \(3, -1\)"),
    ((3, 2.5), r"kernel_size must be an int or a tuple of 2 ints, each >= 1; got \(3, 2.5\)"),
])
def test_to_tuple_errors(value, message):
    with pytest.raises(ValueError, match=message):
        g.to_tuple(value, 2, "kernel_size")


def test_to_tuple_type_error():
    with pytest.raises(TypeError, match=r"stride must be an int or a tuple of 2 ints, each >= 1; got 1.5 of type float"):
        g.to_tuple(1.5, 2, "stride")
    with pytest.raises(TypeError, match="got True of type bool"):
        g.to_tuple(True, 2, "stride")


@pytest.mark.parametrize("padding, message", [
    ("full", r"padding must be one of \('same', 'valid', 'causal'\), an int or a per-axis tuple; got 'full'"),
    (-1, r"padding must be non-negative; got -1"),
    ((1, 2, 3), r"padding must have one entry per spatial axis \(2\); got \(1, 2, 3\)"),
    ((1, (1, 2, 3)), r"padding\[1\] must be an int, a \(before, after\) pair of ints or one of"),
    ((1, (0, -2)), r"padding\[1\] must be non-negative; got \(0, -2\)"),
    (("same", "SAME"), r"padding\[1\] must be one of \('same', 'valid', 'causal'\)"),
])
def test_normalize_padding_errors(padding, message):
    with pytest.raises(ValueError, match=message):
        g.normalize_padding(padding, 2)


def test_check_fits_errors():
    with pytest.raises(ValueError, match=r"input size 4 on spatial axis 1 \(padded to 4\) is smaller than the "
                                         r"effective kernel size 5 \(kernel_size=3, dilation=2\)"):
        g.check_fits((9, 4), (3, 3), ((0, 0), (0, 0)), (1, 2))
    with pytest.raises(ValueError, match=r"padding \(4, 4\) on spatial axis 0 must be smaller than the input size 4 "
                                         r"for padding_mode='reflect'"):
        g.check_fits((4,), (3,), ((4, 4),), (1,), "reflect")
    with pytest.raises(ValueError, match=r"must not exceed the input size 4 for padding_mode='circular'"):
        g.check_fits((4,), (3,), ((5, 0),), (1,), "circular")
    g.check_fits((4,), (3,), ((4, 4),), (1,), "circular")
    g.check_fits((4,), (3,), ((3, 3),), (1,), "reflect")
    with pytest.raises(ValueError, match=r"padding_mode must be one of \('zeros', 'reflect', 'replicate', "
                                         r"'circular'\); got 'constant'"):
        g.check_padding_mode("constant")
