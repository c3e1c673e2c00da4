"""Closed-form decompositions: exact at full rank, optimal (Eckart-Young) truncations, honest reports."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sepconv
from sepconv.conversion import materialize
from sepconv.decomposition import KINDS, Factorization, decompose


def random_conv(rank, in_per_group, out_per_group, groups, kernel, stride, dilation, padding, padding_mode, bias):
    conv_cls = {1: sepconv.Conv1d, 2: sepconv.Conv2d, 3: sepconv.Conv3d}[rank]
    conv = conv_cls(in_per_group * groups, out_per_group * groups, kernel, stride, padding, dilation, groups, bias,
                    padding_mode).double()
    with torch.no_grad():
        for p in conv.parameters():
            p.normal_()
    return conv


@st.composite
def conv_cases(draw, ranks=(1, 2, 3)):
    rank = draw(st.sampled_from(ranks))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    return dict(rank=rank, in_per_group=draw(st.integers(1, 3)), out_per_group=draw(st.integers(1, 3)),
                groups=draw(st.integers(1, 2)), kernel=kernel, stride=draw(st.integers(1, 2)),
                dilation=draw(st.integers(1, 2)), padding=draw(st.sampled_from([0, 1, "same", "valid", "causal"])),
                padding_mode=draw(st.sampled_from(["zeros", "reflect", "circular"])), bias=draw(st.booleans()))


def relative_weight_error(module, conv):
    dense = materialize(module).weight.detach()
    original = materialize(conv).weight.detach()
    return float((dense - original).norm() / original.norm())


@given(case=conv_cases(), kind=st.sampled_from(KINDS))
def test_full_rank_reconstructs_exactly(case, kind):
    if kind == "spatial":
        case["rank"], case["kernel"] = 2, (case["kernel"] + (2, 3))[:2]
    conv = random_conv(**case)
    module, report = decompose(conv, kind)
    size = {1: (11,), 2: (7, 8), 3: (5, 5, 6)}[case["rank"]]
    x = torch.randn(2, conv.in_channels, *size, dtype=torch.float64)
    torch.testing.assert_close(module(x), conv(x), atol=1e-10, rtol=1e-9)
    assert report.relative_error < 1e-7 and report.rank == report.full_rank
    assert relative_weight_error(module, conv) < 1e-10
    assert report.params_after == sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_error_decreases_with_rank_and_equals_discarded_energy(kind):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, (3, 5), padding=1, groups=2).double()
    errors = []
    factorization = Factorization(conv, kind)
    for rank in range(1, factorization.full_rank + 1):
        module, report = decompose(conv, kind, rank=rank)
        measured = relative_weight_error(module, conv)
        singular = factorization.S
        discarded = float((singular[:, rank:] ** 2).sum() / (singular ** 2).sum())
        assert report.relative_error == pytest.approx(math.sqrt(discarded), abs=1e-9)
        assert measured == pytest.approx(report.relative_error, abs=1e-9)
        assert report.retained_energy == pytest.approx(1 - discarded, abs=1e-12)
        errors.append(measured)
    assert all(later <= earlier + 1e-12 for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < 1e-9 and errors[0] > 0.1


def test_truncation_is_optimal_against_random_factorizations():
    """Eckart-Young: no depth-multiplier-M factorization beats the truncated SVD in Frobenius norm."""
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 8, 3, bias=False).double()
    module, report = decompose(conv, rank=2)
    best = relative_weight_error(module, conv)
    for _ in range(20):
        other = sepconv.SeparableConv2d(4, 8, 3, depth_multiplier=2, bias=False).double()
        # fit the pointwise step by least squares for random depthwise filters: still no better
        dw = other.depthwise_weight.detach().reshape(4, 2, 9)
        target = conv.weight.detach().reshape(8, 4, 9)
        pw = torch.stack([torch.linalg.lstsq(dw[c].T, target[:, c].T).solution.T for c in range(4)], 1)  # (8, 4, 2)
        with torch.no_grad():
            other.pointwise_weight.copy_(pw.reshape(8, 8, 1, 1))
        assert relative_weight_error(other, conv) >= best - 1e-12


@pytest.mark.parametrize("kernel", ["sobel", "gaussian", "outer"])
def test_rank_one_kernels_factor_exactly_at_rank_one(kernel):
    torch.manual_seed(2)
    if kernel == "sobel":
        vertical, horizontal = torch.tensor([1.0, 2.0, 1.0]), torch.tensor([-1.0, 0.0, 1.0])
    elif kernel == "gaussian":
        g = torch.exp(-torch.arange(-3.0, 4.0) ** 2 / 4)
        vertical, horizontal = g, g
    else:
        vertical, horizontal = torch.randn(5), torch.randn(3)
    conv = nn.Conv2d(3, 3, (len(vertical), len(horizontal)), padding="same", groups=3, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.outer(vertical, horizontal).expand(3, 1, -1, -1) * torch.tensor([1.0, -2.0, 0.5])
                          .reshape(3, 1, 1, 1))
    module, report = decompose(conv, "spatial", rank=1)
    assert report.relative_error < 1e-7 and report.ranks_per_channel == [1, 1, 1]
    x = torch.randn(1, 3, 12, 12, dtype=torch.float64)
    torch.testing.assert_close(module(x), conv(x))
    full = nn.Conv2d(1, 4, 3, bias=False).double()  # one input channel: every kernel an outer product
    with torch.no_grad():
        full.weight.copy_(torch.einsum("o,y,x->oyx", torch.randn(4), torch.randn(3), torch.randn(3)).unsqueeze(1))
    assert decompose(full, "spatial", rank=1)[1].relative_error < 1e-7


def test_energy_and_max_error_choose_the_smallest_sufficient_rank():
    torch.manual_seed(3)
    conv = nn.Conv2d(8, 16, 3).double()
    f = Factorization(conv)
    for energy in (0.3, 0.6, 0.9, 0.99, 1.0):
        _, report = decompose(conv, energy=energy)
        assert report.retained_energy >= energy - 1e-12
        if report.rank > 1:
            assert f.retained_energy(report.rank - 1) < energy
    _, report = decompose(conv, max_error=0.2)
    assert report.relative_error <= 0.2 and f.relative_error(report.rank - 1) > 0.2


def test_report_counts_macs_with_the_shared_geometry():
    conv = nn.Conv2d(32, 64, 3, stride=2, padding=1)
    module, report = decompose(conv, rank=1, input_size=(56, 56))
    assert report.macs_before == 32 * 64 * 9 * 28 * 28
    assert report.macs_after == (32 * 9 + 32 * 64) * 28 * 28  # depthwise + pointwise at the output size
    assert report.params_after == 32 * 9 + 32 * 64 + 64
    assert "rank 1/9" in str(report) and "MACs 14,450,688 -> " in str(report)


def test_pointwise_depthwise_runs_the_1x1_at_input_resolution():
    conv = nn.Conv2d(8, 4, 3, stride=2, padding=1, bias=False)
    module, report = decompose(conv, "pointwise_depthwise", rank=2, input_size=(10, 10))
    assert [type(m).__name__ for m in module] == ["PointwiseConv2d", "Conv2d"]
    assert report.macs_after == 4 * 2 * 8 * 100 + 4 * 2 * 9 * 25


@pytest.mark.parametrize("call, error, message", [
    (lambda: decompose(nn.Linear(3, 4)), TypeError, r"conv must be a torch.nn.Conv1d/2d/3d .*; got Linear"),
    (lambda: decompose(nn.Conv2d(3, 4, 3), kind="cp"), ValueError, r"kind must be one of .*; got 'cp'"),
    (lambda: decompose(nn.Conv1d(3, 4, 3), kind="spatial"), ValueError, r"kind='spatial' factors 2-D kernels"),
    (lambda: decompose(nn.Conv2d(3, 4, 3), rank=0), ValueError, r"rank must be a positive int; got 0"),
    (lambda: decompose(nn.Conv2d(3, 4, 3), energy=1.5), ValueError, r"energy must be in \(0, 1\]; got 1.5"),
    (lambda: decompose(nn.Conv2d(3, 4, 3), max_error=-0.1), ValueError, r"max_error must be in \[0, 1\]; got -0.1"),
    (lambda: decompose(nn.Conv2d(3, 4, 3), rank=2, energy=0.9), ValueError,
     r"give at most one of rank, energy, max_error; got rank, energy"),
])
def test_decompose_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_keeps_dtype_device_and_training_settings():
    conv = sepconv.Conv1d(4, 6, 5, stride=2, padding="causal", dilation=2, padding_mode="replicate")
    module, _ = decompose(conv, rank=3)
    assert isinstance(module, sepconv.SeparableConv1d)
    assert module.depthwise_weight.dtype == torch.float32
    assert (module.stride, module.padding, module.dilation, module.padding_mode) == (
        (2,), ("causal",), (2,), "replicate")
