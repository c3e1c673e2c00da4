"""Geometry of strided, dilated, padded convolutions — the single source of truth.

Layers, functional ops, the cost model and kernels all ask this module for
argument normalisation, padding amounts and output sizes, so they cannot disagree.

Padding is described per spatial axis. A user may write it as

* an ``int`` ``p`` (``p`` before and after on every axis),
* a tuple with one entry per axis, each an ``int`` or a ``(before, after)`` pair,
  or a per-axis string (e.g. ``("same", "causal")``),
* ``"valid"`` (no padding), ``"same"`` (TensorFlow/Keras semantics for any stride
  and dilation: ``out = ceil(n / s)``, the odd element goes after),
* ``"causal"``: the last spatial axis (time) is padded only before, by
  ``k_eff - 1``, so no output looks into the future; the other axes use ``"same"``.

:func:`normalize_padding` turns any of these into a canonical per-axis tuple whose
entries are ``(before, after)`` pairs or the strings ``"same"``, ``"valid"``, ``"causal"``;
:func:`resolve_padding` turns that into integer pairs once the input size is known.

>>> same_padding(224, kernel_size=3, stride=2)
(0, 1)
>>> resolve_padding("same", kernel_size=(3, 3), stride=2, input_size=(224, 225))
((0, 1), (1, 1))
>>> output_size(224, kernel_size=3, stride=2, padding=(0, 1))
112
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import NamedTuple, Union

import numpy as np
import torch

PaddingString = str
AxisPadding = Union[tuple[int, int], PaddingString]
CanonicalPadding = tuple[AxisPadding, ...]

PADDING_STRINGS = ("same", "valid", "causal")
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
MAX_SIZE = 2**31 - 1  # larger strides, dilations and paddings overflow PyTorch's C++ size arithmetic


def _is_int(value) -> bool:
    # Integral: numpy integers too; SymInt: sizes are symbolic under torch.export / torch.compile.
    return isinstance(value, (numbers.Integral, torch.SymInt)) and not isinstance(value, (bool, np.bool_))


def _as_int(value):
    return value if isinstance(value, (int, torch.SymInt)) else int(value)


def check_positive_int(value, name: str) -> int:
    """A positive int (numpy integers accepted and returned as int; bools refused).

    >>> check_positive_int(True, "groups")
    Traceback (most recent call last):
    ...
    ValueError: groups must be a positive int; got True
    """
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return _as_int(value)


def _check_at_most(values, name: str, given) -> None:
    if any(isinstance(v, int) and v > MAX_SIZE for v in values):  # SymInts (export): a guard
        raise ValueError(f"{name} must be at most {MAX_SIZE} on every axis; got {given!r}")


def to_tuple(value, rank: int, name: str, *, minimum: int = 1) -> tuple[int, ...]:
    """Expand an int or check a sequence of ``rank`` ints, each ``>= minimum``.

    >>> to_tuple(3, 2, "kernel_size")
    (3, 3)
    >>> to_tuple((1, 0), 2, "stride")
    Traceback (most recent call last):
    ...
    ValueError: stride must be an int or a tuple of 2 ints, each >= 1; got (1, 0)
    """
    rule = f"an int or a tuple of {rank} ints, each >= {minimum}"
    if _is_int(value):
        values = (_as_int(value),) * rank
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray)):
        values = tuple(_as_int(v) if _is_int(v) else v for v in value)
        if len(values) != rank or not all(_is_int(v) for v in values):
            raise ValueError(f"{name} must be {rule}; got {value!r}")
    else:
        raise TypeError(f"{name} must be {rule}; got {value!r} of type {type(value).__name__}")
    if any(v < minimum for v in values):
        raise ValueError(f"{name} must be {rule}; got {value!r}")
    _check_at_most(values, name, value)
    return values


def _axis_padding(entry, name: str) -> AxisPadding:
    if isinstance(entry, str):
        if entry not in PADDING_STRINGS:
            raise ValueError(f"{name} must be one of {PADDING_STRINGS}, an int or a (before, after) pair; got {entry!r}")
        return entry
    if _is_int(entry):
        pair = (_as_int(entry),) * 2
    elif isinstance(entry, Sequence) and len(entry) == 2 and all(_is_int(v) for v in entry):
        pair = (_as_int(entry[0]), _as_int(entry[1]))
    else:
        raise ValueError(f"{name} must be an int, a (before, after) pair of ints or one of {PADDING_STRINGS}; got {entry!r}")
    if min(pair) < 0:
        raise ValueError(f"{name} must be non-negative; got {entry!r}")
    _check_at_most(pair, name, entry)
    return pair


def normalize_padding(padding, rank: int, name: str = "padding") -> CanonicalPadding:
    """Canonical per-axis padding: a tuple of ``(before, after)`` pairs or padding strings.

    >>> normalize_padding(1, 2)
    ((1, 1), (1, 1))
    >>> normalize_padding(((0, 1), 2), 2)
    ((0, 1), (2, 2))
    >>> normalize_padding("causal", 2)
    ('same', 'causal')
    """
    if isinstance(padding, str):
        if padding not in PADDING_STRINGS:
            raise ValueError(f"{name} must be one of {PADDING_STRINGS}, an int or a per-axis tuple; got {padding!r}")
        if padding == "causal":
            return ("same",) * (rank - 1) + ("causal",)
        return (padding,) * rank
    if _is_int(padding):
        return (_axis_padding(padding, name),) * rank
    if isinstance(padding, Sequence) and not isinstance(padding, (bytes, bytearray)):
        if len(padding) != rank:
            raise ValueError(f"{name} must have one entry per spatial axis ({rank}); got {padding!r}")
        return tuple(_axis_padding(entry, f"{name}[{axis}]") for axis, entry in enumerate(padding))
    raise TypeError(f"{name} must be a str, an int or a tuple; got {padding!r} of type {type(padding).__name__}")


def effective_kernel_size(kernel_size: int, dilation: int = 1) -> int:
    """Span of a dilated kernel: ``(k - 1) * d + 1``."""
    return (kernel_size - 1) * dilation + 1


def same_padding(input_size: int, kernel_size: int, stride: int = 1, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow/Keras ``'same'`` padding of one axis: ``out = ceil(n / s)``, extra element after."""
    out = -(-input_size // stride)  # ceil(n / s) in integers, which symbolic sizes support
    total = max((out - 1) * stride + effective_kernel_size(kernel_size, dilation) - input_size, 0)
    return total // 2, total - total // 2


def causal_padding(kernel_size: int, dilation: int = 1) -> tuple[int, int]:
    """Keras ``'causal'`` padding: ``k_eff - 1`` before, nothing after."""
    return effective_kernel_size(kernel_size, dilation) - 1, 0


def is_static(padding: CanonicalPadding, stride: Sequence[int]) -> bool:
    """Whether the padding amounts do not depend on the input size."""
    return all(not isinstance(p, str) or p in ("valid", "causal") or (p == "same" and s == 1) for p, s in zip(padding, stride))


def _rank_of(*values) -> int:
    for value in values:
        if isinstance(value, Sequence) and not isinstance(value, str):
            return len(value)
    return 1


def resolve_padding(padding, kernel_size, stride=1, dilation=1, input_size=None) -> tuple[tuple[int, int], ...]:
    """Integer ``(before, after)`` amounts per axis.

    ``input_size`` is needed only for ``'same'`` with stride > 1 (otherwise the amounts do not
    depend on it). ``padding`` may be in any user form or already canonical.
    """
    rank = _rank_of(kernel_size, stride, dilation, input_size, padding)
    kernel_size = to_tuple(kernel_size, rank, "kernel_size")
    stride = to_tuple(stride, rank, "stride")
    dilation = to_tuple(dilation, rank, "dilation")
    canonical = normalize_padding(padding, rank)
    if input_size is not None:
        input_size = to_tuple(input_size, rank, "input_size", minimum=0)
    pairs = []
    for axis, (p, k, s, d) in enumerate(zip(canonical, kernel_size, stride, dilation)):
        if p == "valid":
            pairs.append((0, 0))
        elif p == "causal":
            pairs.append(causal_padding(k, d))
        elif p == "same":
            if s > 1 and input_size is None:
                raise ValueError(f"padding='same' with stride {s} on spatial axis {axis} depends on the input size; "
                                 "pass input_size")
            # With stride 1 the amounts are k_eff - 1 split in two, whatever the input size: leave the
            # size out so that traced and exported graphs get constants.
            pairs.append(same_padding(input_size[axis] if s > 1 else 1, k, s, d))
        else:
            pairs.append(p)
    return tuple(pairs)


def output_size(input_size: int, kernel_size: int, stride: int = 1, padding: tuple[int, int] = (0, 0),
                dilation: int = 1) -> int:
    """Output length of one axis: ``floor((n + before + after - k_eff) / s) + 1``."""
    before, after = padding
    return (input_size + before + after - effective_kernel_size(kernel_size, dilation)) // stride + 1


def output_shape(input_size: Sequence[int], kernel_size: Sequence[int], stride: Sequence[int],
                 padding: Sequence[tuple[int, int]], dilation: Sequence[int]) -> tuple[int, ...]:
    """Spatial output shape for resolved integer padding."""
    return tuple(output_size(n, k, s, p, d) for n, k, s, p, d in zip(input_size, kernel_size, stride, padding, dilation))


class ConvGeometry(NamedTuple):
    """A convolution's geometry resolved for one input size: the value every kernel receives.

    ``padding`` holds integer ``(before, after)`` pairs per spatial axis. Hashable, so backends key their
    plans and choices on it.

    >>> g = conv_geometry((7, 8), (3, 3), (2, 2), ((1, 1), (0, 1)), (1, 1))
    >>> g.output_size, g.flipped_padding
    ((4, 4), ((1, 1), (2, 1)))
    """
    input_size: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    dilation: tuple[int, ...]
    output_size: tuple[int, ...]

    @property
    def flipped_padding(self) -> tuple[tuple[int, int], ...]:
        """Padding of the input gradient seen as a convolution of grad_out (zero-stuffed by the stride) with the
        flipped kernel: ``k_eff - 1 - before`` before, and after ``k_eff - 1 - after`` plus the input rows the
        forward's last stride step never reached."""
        pairs = []
        for n, k, s, (before, after), d in zip(self.input_size, self.kernel_size, self.stride, self.padding,
                                               self.dilation):
            k_eff = effective_kernel_size(k, d)
            pairs.append((k_eff - 1 - before, k_eff - 1 - after + (n + before + after - k_eff) % s))
        return tuple(pairs)

    @property
    def flat_padding(self) -> tuple[int, ...]:
        """``(before_0, after_0, before_1, after_1, ...)``: the padding as one list of ints (op schemas)."""
        return tuple(amount for pair in self.padding for amount in pair)

    @property
    def padded(self) -> bool:
        """Whether any axis has padding on either side."""
        return any(before or after for before, after in self.padding)

    def without_padding(self) -> "ConvGeometry":
        """The same convolution on an input already padded by ``padding``."""
        padded = tuple(n + before + after for n, (before, after) in zip(self.input_size, self.padding))
        return self._replace(input_size=padded, padding=((0, 0),) * len(padded))


def conv_geometry(input_size: Sequence[int], kernel_size: Sequence[int], stride: Sequence[int],
                  padding: Sequence[tuple[int, int]], dilation: Sequence[int]) -> ConvGeometry:
    """:class:`ConvGeometry` from normalised tuples and integer padding pairs."""
    input_size, kernel_size, stride, dilation = (tuple(v) for v in (input_size, kernel_size, stride, dilation))
    padding = tuple(tuple(pair) for pair in padding)
    return ConvGeometry(input_size, kernel_size, stride, padding, dilation,
                        output_shape(input_size, kernel_size, stride, padding, dilation))


def conv_output_shape(input_size: Sequence[int], kernel_size, stride=1, padding=0, dilation=1) -> tuple[int, ...]:
    """Spatial output shape for any padding form.

    >>> conv_output_shape((224, 224), 3, stride=2, padding="same")
    (112, 112)
    >>> conv_output_shape((100,), 4, dilation=2, padding="causal")
    (100,)
    """
    rank = len(input_size)
    kernel_size = to_tuple(kernel_size, rank, "kernel_size")
    stride = to_tuple(stride, rank, "stride")
    dilation = to_tuple(dilation, rank, "dilation")
    pairs = resolve_padding(padding, kernel_size, stride, dilation, input_size)
    return output_shape(input_size, kernel_size, stride, pairs, dilation)


def check_padding_mode(padding_mode: str) -> str:
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}; got {padding_mode!r}")
    return padding_mode


def check_fits(input_size: Sequence[int], kernel_size: Sequence[int], padding: Sequence[tuple[int, int]],
               dilation: Sequence[int], padding_mode: str = "zeros") -> None:
    """Raise ``ValueError`` if padding exceeds what the mode allows or the kernel overhangs the input."""
    for axis, (n, k, (before, after), d) in enumerate(zip(input_size, kernel_size, padding, dilation)):
        if padding_mode == "reflect" and max(before, after) >= n:
            raise ValueError(f"padding ({before}, {after}) on spatial axis {axis} must be smaller than the input "
                             f"size {n} for padding_mode='reflect'")
        if padding_mode == "circular" and max(before, after) > n:
            raise ValueError(f"padding ({before}, {after}) on spatial axis {axis} must not exceed the input "
                             f"size {n} for padding_mode='circular'")
        k_eff = effective_kernel_size(k, d)
        if n + before + after < k_eff:
            raise ValueError(f"input size {n} on spatial axis {axis} (padded to {n + before + after}) is smaller "
                             f"than the effective kernel size {k_eff} (kernel_size={k}, dilation={d})")
