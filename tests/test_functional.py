"""Every functional op equals the dense convolution with its materialised weight (forward and gradients).

The reference here is independent of sepconv: padding amounts follow the formulas of the project's shared
reference, REFERENCE.md (``helpers.reference_pairs``; 'same': out = ceil(n/s), total = max((out-1)*s + k_eff - n,
0), extra after; 'causal': k_eff - 1 before), the input is padded with ``torch.nn.functional.pad`` and convolved
with ``torch.nn.functional.convNd`` (groups=1) using a dense kernel built by explicit loops / einsum.
"""

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given
from hypothesis import strategies as st

import sepconv.functional as F
from helpers import geometry_case, reference_pairs

TORCH_CONV = {1: TF.conv1d, 2: TF.conv2d, 3: TF.conv3d}
TORCH_PAD_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


# --- independent reference ------------------------------------------------------------------------

def reference_conv(x, dense_weight, bias, stride, padding, dilation, padding_mode):
    rank = dense_weight.ndim - 2
    kernel = dense_weight.shape[2:]
    pairs = reference_pairs(padding, x.shape[2:], kernel, stride, dilation)
    flat = [v for pair in reversed(pairs) for v in pair]
    x = TF.pad(x, flat, mode=TORCH_PAD_MODE[padding_mode]) if any(flat) else x
    return TORCH_CONV[rank](x, dense_weight, bias, stride, 0, dilation)


def dense_depthwise(weight, channels):
    multiplier = weight.shape[0] // channels
    dense = weight.new_zeros(weight.shape[0], channels, *weight.shape[2:])
    for c in range(channels):
        for m in range(multiplier):
            dense[c * multiplier + m, c] = weight[c * multiplier + m, 0]
    return dense


def dense_grouped(weight, groups):
    out, per_group = weight.shape[:2]
    dense = weight.new_zeros(out, per_group * groups, *weight.shape[2:])
    for o in range(out):
        g = o // (out // groups)
        dense[o, g * per_group:(g + 1) * per_group] = weight[o]
    return dense


def dense_spatial(factors, in_channels):
    dense, channels = [], in_channels
    for f in factors:
        dense.append(dense_grouped(f, channels // f.shape[1]))
        channels = f.shape[0]
    if len(dense) == 1:
        return dense[0]
    if len(dense) == 2:
        return torch.einsum("omx,miy->oiyx", dense[1], dense[0])
    return torch.einsum("oqx,qpy,piz->oizyx", dense[2], dense[1], dense[0])


# --- inputs and checks (the geometry strategy is helpers.geometry_case) -----------------------------

def leaf(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def assert_same_outputs_and_grads(out, ref, tensors, atol=1e-10):
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=atol, rtol=1e-9)
    seed = torch.randn_like(out)
    grads = torch.autograd.grad((out * seed).sum(), tensors, allow_unused=True)
    ref_grads = torch.autograd.grad((ref * seed).sum(), tensors, allow_unused=True)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=atol, rtol=1e-9)


# --- property tests --------------------------------------------------------------------------------

@given(case=geometry_case(), channels=st.integers(1, 3), multiplier=st.integers(1, 3), bias=st.booleans())
def test_depthwise_equals_dense(case, channels, multiplier, bias):
    x = leaf(2, channels, *case["size"])
    w = leaf(channels * multiplier, 1, *case["kernel"])
    b = leaf(channels * multiplier) if bias else None
    out = F.depthwise_conv(x, w, b, case["stride"], case["padding"], case["dilation"], case["padding_mode"])
    ref = reference_conv(x, dense_depthwise(w, channels), b, case["stride"], case["padding"], case["dilation"],
                         case["padding_mode"])
    assert_same_outputs_and_grads(out, ref, [x, w] + ([b] if bias else []))


@given(case=geometry_case(), channels=st.integers(1, 3), multiplier=st.integers(1, 2), out_channels=st.integers(1, 4),
       bias=st.booleans(), depthwise_bias=st.booleans(), flat_pointwise=st.booleans())
def test_separable_equals_dense(case, channels, multiplier, out_channels, bias, depthwise_bias, flat_pointwise):
    rank = len(case["size"])
    x = leaf(2, channels, *case["size"])
    dw = leaf(channels * multiplier, 1, *case["kernel"])
    pw = leaf(out_channels, channels * multiplier, *(() if flat_pointwise else (1,) * rank))
    b = leaf(out_channels) if bias else None
    db = leaf(channels * multiplier) if depthwise_bias else None
    out = F.separable_conv(x, dw, pw, b, db, case["stride"], case["padding"], case["dilation"], case["padding_mode"])
    # Reference: dense kernel W[o, c] = sum_j pw[o, j] * depthwise_dense[j, c]; a depthwise bias is carried
    # through the pointwise step (pw @ db), which is exact whatever the padding mode.
    pw2 = pw.reshape(out_channels, -1)
    dense = torch.einsum("oj,jc...->oc...", pw2, dense_depthwise(dw, channels))
    ref_bias = b
    if db is not None:
        ref_bias = pw2 @ db if b is None else b + pw2 @ db
    ref = reference_conv(x, dense, ref_bias, case["stride"], case["padding"], case["dilation"], case["padding_mode"])
    assert_same_outputs_and_grads(out, ref, [t for t in (x, dw, pw, b, db) if t is not None])


@given(data=st.data(), rank=st.integers(1, 3), channels=st.integers(1, 3), depthwise=st.booleans(), bias=st.booleans())
def test_spatial_separable_equals_dense(data, rank, channels, depthwise, bias):
    case = data.draw(geometry_case(rank=rank))
    widths, per_group, c = [], [], channels
    for axis in range(rank):
        if depthwise:
            width = c * data.draw(st.integers(1, 2)) if axis == 0 else c
            per_group.append(1)
        else:
            width = data.draw(st.integers(1, 3))
            per_group.append(c)
        widths.append(width)
        c = width
    x = leaf(2, channels, *case["size"])
    factors = [leaf(w, g, k) for w, g, k in zip(widths, per_group, case["kernel"])]
    b = leaf(widths[-1]) if bias else None
    out = F.spatial_separable_conv(x, factors, b, case["stride"], case["padding"], case["dilation"],
                                   case["padding_mode"])
    ref = reference_conv(x, dense_spatial(factors, channels), b, case["stride"], case["padding"], case["dilation"],
                         case["padding_mode"])
    assert_same_outputs_and_grads(out, ref, [x, *factors] + ([b] if bias else []))


@given(case=geometry_case(), in_groups=st.integers(1, 2), groups=st.integers(1, 3), out_per_group=st.integers(1, 2))
def test_conv_grouped_equals_dense(case, in_groups, groups, out_per_group):
    x = leaf(1, in_groups * groups, *case["size"])
    w = leaf(out_per_group * groups, in_groups, *case["kernel"])
    out = F.conv(x, w, None, case["stride"], case["padding"], case["dilation"], groups, case["padding_mode"])
    ref = reference_conv(x, dense_grouped(w, groups), None, case["stride"], case["padding"], case["dilation"],
                         case["padding_mode"])
    assert_same_outputs_and_grads(out, ref, [x, w])


@given(rank=st.integers(1, 3), cin=st.integers(1, 5), cout=st.integers(1, 5), flat=st.booleans())
def test_pointwise_equals_matmul(rank, cin, cout, flat):
    x = leaf(2, cin, *(3,) * rank)
    w = leaf(cout, cin, *(() if flat else (1,) * rank))
    b = leaf(cout)
    out = F.pointwise_conv(x, w, b)
    ref = torch.einsum("oc,nc...->no...", w.reshape(cout, cin), x) + b.reshape(cout, *(1,) * rank)
    assert_same_outputs_and_grads(out, ref, [x, w, b])


# --- specific semantics ----------------------------------------------------------------------------

def test_depthwise_output_channel_order_is_c_times_m_plus_m():
    channels, multiplier = 3, 2
    x = torch.randn(1, channels, 7, 7, dtype=torch.float64)
    w = torch.randn(channels * multiplier, 1, 3, 3, dtype=torch.float64)
    out = F.depthwise_conv(x, w)
    for c in range(channels):
        for m in range(multiplier):
            single = TF.conv2d(x[:, c:c + 1], w[c * multiplier + m:c * multiplier + m + 1])
            torch.testing.assert_close(out[:, c * multiplier + m:c * multiplier + m + 1], single)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_causal_output_ignores_the_future(rank):
    size = (5,) * (rank - 1) + (12,)
    x = torch.randn(1, 2, *size, dtype=torch.float64)
    w = torch.randn(2, 1, *(3,) * rank, dtype=torch.float64)
    out = F.depthwise_conv(x, w, padding="causal", dilation=2)
    assert out.shape == x.shape
    t = 6
    changed = x.clone()
    changed[..., t + 1:] += 100.0
    torch.testing.assert_close(F.depthwise_conv(changed, w, padding="causal", dilation=2)[..., :t + 1], out[..., :t + 1])
    assert not torch.allclose(F.depthwise_conv(changed, w, padding="causal", dilation=2)[..., t + 1:], out[..., t + 1:])


@pytest.mark.parametrize("op", ["depthwise", "separable", "spatial", "pointwise"])
def test_unbatched_input_equals_batched(op):
    x = torch.randn(3, 4, 9, 10)
    dw = torch.randn(8, 1, 3, 2)
    pw = torch.randn(5, 8)
    run = {
        "depthwise": lambda t: F.depthwise_conv(t, dw, stride=2, padding="same"),
        "separable": lambda t: F.separable_conv(t, dw, pw, stride=2, padding="same"),
        "spatial": lambda t: F.spatial_separable_conv(t, [torch.randn(6, 4, 3), torch.randn(2, 6, 3)], padding=1),
        "pointwise": lambda t: F.pointwise_conv(t, pw[:, :4].reshape(5, 4, 1, 1)),
    }[op]
    torch.manual_seed(0)
    batched = run(x)
    torch.manual_seed(0)
    single = run(x[1])
    torch.testing.assert_close(single, batched[1])


def test_spatial_separable_axes_order():
    x = torch.randn(1, 2, 8, 9, dtype=torch.float64)
    horizontal = torch.randn(2, 1, 5, dtype=torch.float64)   # 1 x 5, applied first
    vertical = torch.randn(2, 1, 3, dtype=torch.float64)     # 3 x 1, applied second
    out = F.spatial_separable_conv(x, [horizontal, vertical], padding="same", axes=(1, 0))
    dense = (vertical[:, :, :, None] * horizontal[:, :, None, :])  # (2, 1, 3, 5)
    torch.testing.assert_close(out, F.depthwise_conv(x, dense, padding="same"))


@pytest.mark.parametrize("padding", [1, "same", ((0, 1), (0, 1))])
def test_channels_last_preserved(padding):
    x = torch.randn(2, 8, 12, 12)
    dw, pw = torch.randn(8, 1, 3, 3), torch.randn(16, 8, 1, 1)
    out = F.separable_conv(x.to(memory_format=torch.channels_last), dw, pw, stride=2, padding=padding)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, F.separable_conv(x, dw, pw, stride=2, padding=padding))


def test_float32_matches_dense_within_float_tolerance():
    torch.manual_seed(1)
    x = torch.randn(4, 16, 20, 20)
    dw, pw = torch.randn(32, 1, 5, 5), torch.randn(24, 32)
    out = F.separable_conv(x, dw, pw, stride=2, padding="same", dilation=1)
    dense = torch.einsum("oj,jc...->oc...", pw, dense_depthwise(dw, 16))
    ref = reference_conv(x, dense, None, (2, 2), "same", (1, 1), "zeros")
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-4)


# --- gradcheck in float64 --------------------------------------------------------------------------

@pytest.mark.parametrize("padding, padding_mode", [("same", "zeros"), ("causal", "reflect"), (((1, 2), 0), "circular")])
def test_gradcheck_all_ops(padding, padding_mode):
    torch.manual_seed(0)
    x = leaf(1, 2, 6, 7)
    dw, pw, b, db = leaf(4, 1, 3, 2), leaf(3, 4), leaf(3), leaf(4)
    kwargs = dict(stride=(2, 1), padding=padding, dilation=(1, 2), padding_mode=padding_mode)
    assert torch.autograd.gradcheck(lambda *t: F.depthwise_conv(t[0], t[1], t[2], **kwargs), (x, dw, db))
    assert torch.autograd.gradcheck(lambda *t: F.separable_conv(*t, **kwargs), (x, dw, pw, b, db))
    assert torch.autograd.gradcheck(lambda *t: F.pointwise_conv(*t), (x, leaf(3, 2, 1, 1), b))
    factors = (leaf(3, 2, 3), leaf(3, 1, 2))
    assert torch.autograd.gradcheck(lambda *t: F.spatial_separable_conv(t[0], t[1:3], t[3], **kwargs),
                                    (x, *factors, b))
