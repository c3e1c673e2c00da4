"""The Numba depthwise kernels against their PyTorch twin, and the dispatcher between them.

``sepconv.kernels.reference.conv`` (PyTorch's own convolution) is the oracle here; it is itself checked
against an independent dense reference in test_functional.py. Compared: outputs, gradients of input,
weight and bias, and the output's memory layout, over hypothesis-drawn geometries (1-D and 2-D,
strides, dilations, every padding mode, asymmetric padding, depth multipliers), in float32 and float64.

Numba compiles the kernels on first use (about 10 s for both dtypes on 2 cores) and caches them in
``sepconv/kernels/__pycache__``; later runs load them in well under a second.
"""

import contextlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("numba")

from test_functional import geometry_case, reference_pairs

import sepconv.functional as F
from sepconv.kernels import dispatch, numba_depthwise, numba_planar, reference, unroll

# float32: gradients of the weight sum up to thousands of products, summed in a different order by each side.
TOLERANCE = {torch.float64: {"atol": 1e-10, "rtol": 1e-9}, torch.float32: {"atol": 3e-4, "rtol": 1e-3}}


@pytest.fixture(autouse=True)
def _restore_mode():
    numba_depthwise._plan.cache_clear()  # plans are cached per signature; tests patch what they read
    yield
    dispatch.set_kernels(None)
    dispatch.clear_choices()
    numba_depthwise._plan.cache_clear()


def _layout(t):
    return t.is_contiguous(), t.is_contiguous(memory_format=torch.channels_last)


def _nlc(t):
    """A 1-D ``(N, C, L)`` tensor backed by ``(N, L, C)`` memory."""
    return t.ndim == 3 and t.shape[1] > 1 and t.shape[2] > 1 and t.permute(0, 2, 1).is_contiguous()


def compare_with_reference(x, w, b, stride, pairs, dilation, mode, seed=0):
    """Outputs and gradients of the Numba kernel equal the reference's, and so does the output layout
    (2-D), or it follows the input (1-D: an (N, L, C)-backed input gives an (N, L, C)-backed output)."""
    tolerance = TOLERANCE[x.dtype]
    out = numba_depthwise.depthwise_conv(x, w, b, stride, pairs, dilation, mode)
    ref = reference.conv(x, w, b, stride, pairs, dilation, x.shape[1], mode)
    assert out.shape == ref.shape
    if x.ndim == 3:
        assert _nlc(out) == _nlc(x) or out.shape[2] == 1, (out.stride(), x.stride())
        assert out.is_contiguous() or _nlc(out)
    else:
        assert _layout(out) == _layout(ref), (out.stride(), ref.stride())
    torch.testing.assert_close(out, ref, **tolerance)
    grad = torch.randn(ref.shape, dtype=ref.dtype, generator=torch.Generator().manual_seed(seed))
    leaves = [t for t in (x, w, b) if t is not None]
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(ref, leaves, grad)
    for name, a, e in zip(("x", "weight", "bias"), got, want):
        torch.testing.assert_close(a, e, **tolerance, msg=lambda m, name=name: f"grad of {name}: {m}")


def make(shape, dtype, channels_last=False, seed=0):
    t = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    if channels_last:
        t = t.to(memory_format=torch.channels_last)
    return t.requires_grad_()


# --- the kernels against the reference -------------------------------------------------------------

@given(case=geometry_case(rank=None, max_kernel=5).filter(lambda c: len(c["size"]) < 3),
       channels=st.integers(1, 4), multiplier=st.integers(1, 3), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]), channels_last=st.booleans(),
       weight_channels_last=st.booleans(), few_channels_planar=st.booleans(), small_planes_planar=st.booleans())
def test_numba_equals_reference(case, channels, multiplier, bias, dtype, channels_last, weight_channels_last,
                                few_channels_planar, small_planes_planar):
    rank = len(case["size"])
    pairs = tuple(reference_pairs(case["padding"], case["size"], case["kernel"], case["stride"], case["dilation"]))
    # Contiguous inputs take the planar kernels (small output planes only half the time here), channels-last
    # ones (1-D: (N, L, C)-backed) the others, unless they have few channels (FEW_CHANNELS_PLANAR, off here
    # half the time: these have 1-4).
    if channels_last and rank == 1:
        x = make((2, *case["size"], channels), dtype).detach().transpose(1, 2).requires_grad_()
    else:
        x = make((2, channels, *case["size"]), dtype, channels_last)
    w = make((channels * multiplier, 1, *case["kernel"]), dtype, weight_channels_last and rank == 2, seed=1)
    b = make((channels * multiplier,), dtype, seed=2) if bias else None
    with planar_limits(numba_depthwise.FEW_CHANNELS_PLANAR if few_channels_planar else 0,
                       0 if small_planes_planar else numba_depthwise.PLANAR_MIN_OUTPUT_PIXELS):
        compare_with_reference(x, w, b, case["stride"], pairs, case["dilation"], case["padding_mode"])


@contextlib.contextmanager
def planar_limits(channels, output_pixels):
    """Inputs with at most ``channels`` channels, and contiguous ones whose output planes have at least
    ``output_pixels`` pixels, take the planar kernels (plans re-made)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(numba_depthwise, "FEW_CHANNELS_PLANAR", channels)
        patch.setattr(numba_depthwise, "PLANAR_MIN_OUTPUT_PIXELS", output_pixels)
        numba_depthwise._plan.cache_clear()
        try:
            yield
        finally:
            numba_depthwise._plan.cache_clear()


# Wide channel counts run the vectorised loops and their remainders; large kernels the tap grouping.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels, size, kernel, stride, pairs, dilation", [
    (67, (9, 11), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)),
    (40, (10, 10), (3, 3), (2, 2), ((0, 1), (0, 1)), (1, 1)),
    (33, (12, 13), (5, 5), (2, 2), ((1, 2), (1, 2)), (1, 1)),
    (20, (15, 14), (7, 7), (1, 1), ((3, 3), (3, 3)), (1, 1)),
    (16, (20, 19), (13, 11), (1, 1), ((6, 6), (5, 5)), (1, 1)),
    (16, (9, 9), (5, 5), (1, 1), ((4, 4), (4, 4)), (2, 2)),
    (8, (33, 33), (31, 31), (1, 1), ((15, 15), (15, 15)), (1, 1)),
    (24, (1, 200), (1, 64), (1, 1), ((0, 0), (31, 32)), (1, 1)),
    (24, (8, 30), (8, 1), (1, 1), ((0, 0), (0, 0)), (1, 1)),
])
def test_numba_equals_reference_wide(dtype, channels, size, kernel, stride, pairs, dilation):
    for channels_last in (False, True):
        x = make((3, channels, *size), dtype, channels_last)
        w = make((channels, 1, *kernel), dtype, seed=1)
        compare_with_reference(x, w, make((channels,), dtype, seed=2), stride, pairs, dilation, "zeros")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel, stride, pairs, mode", [
    (4, 1, ((3, 0),), "zeros"),         # causal k4
    (16, 1, ((7, 8),), "reflect"),
    (5, 2, ((2, 2),), "circular"),
    (3, 3, ((1, 1),), "replicate"),
])
def test_numba_equals_reference_1d(dtype, kernel, stride, pairs, mode):
    for transposed in (False, True):  # (N, L, C) viewed as (N, C, L): PyTorch's 1-D "channels last"
        x = make((2, 300, 48), dtype).detach().transpose(1, 2).requires_grad_() if transposed \
            else make((2, 48, 300), dtype)
        w = make((96, 1, kernel), dtype, seed=1)
        compare_with_reference(x, w, None, (stride,), pairs, (1,), mode)


def test_gradcheck_and_gradgradcheck_float64():
    x = make((1, 2, 6, 5), torch.float64)
    w = make((4, 1, 3, 2), torch.float64, seed=1)
    b = make((4,), torch.float64, seed=2)
    for mode, stride in (("zeros", (2, 1)), ("reflect", (1, 1)), ("circular", (1, 2))):
        def op(x, w, b, mode=mode, stride=stride):
            return numba_depthwise.depthwise_conv(x, w, b, stride, ((1, 2), (0, 1)), (1, 2), mode)
        assert torch.autograd.gradcheck(op, (x, w, b))
    # Double backward goes through PyTorch's twin (the Numba kernels are once differentiable).
    w = make((2, 1, 2, 2), torch.float64, seed=1)
    for channels_last in (False, True):  # channels-last with few channels: the planar kernels on a copy
        x = make((1, 2, 4, 4), torch.float64, channels_last)
        assert torch.autograd.gradgradcheck(
            lambda x, w: numba_depthwise.depthwise_conv(x, w, None, (2, 1), ((1, 0), (0, 1)), (1, 1), "zeros"), (x, w))
    x1 = make((1, 3, 9), torch.float64)
    w1 = make((3, 1, 4), torch.float64, seed=1)
    assert torch.autograd.gradcheck(
        lambda x, w: numba_depthwise.depthwise_conv(x, w, None, (1,), ((3, 0),), (2,), "zeros"), (x1, w1))


def test_more_threads_than_rows_and_unusual_inputs():
    # One output row (fewer rows than threads), an expanded (stride-0) input, a non-contiguous weight.
    x = torch.randn(1, 1, 1, 1).expand(2, 5, 3, 4).requires_grad_()
    w = torch.randn(5, 1, 5, 3).transpose(2, 3).contiguous().transpose(2, 3)[:, :, :3, :3].requires_grad_()
    compare_with_reference(x, w, None, (3, 1), ((0, 0), (1, 1)), (1, 1), "zeros")
    x = make((1, 8, 4, 4), torch.float32)
    w = make((8, 1, 4, 4), torch.float32)
    compare_with_reference(x, w, None, (1, 1), ((0, 0), (0, 0)), (1, 1), "zeros")  # 1x1 output


@pytest.mark.parametrize("chunks", [2, 5])
def test_rows_cut_into_column_ranges(monkeypatch, chunks):
    # With few rows per thread the kernels split rows into column ranges (1-D, batch 1, small outputs);
    # forced here on every kernel, whatever this machine's thread count.
    monkeypatch.setattr(numba_depthwise, "_col_chunks", lambda rows, columns, threads: chunks)
    for dtype in (torch.float32, torch.float64):
        x = make((1, 19, 3, 23), dtype, channels_last=True)
        w = make((19, 1, 3, 4), dtype, seed=1)
        compare_with_reference(x, w, make((19,), dtype, seed=2), (1, 1), ((1, 1), (2, 1)), (1, 2), "zeros")
        compare_with_reference(x, w, None, (2, 3), ((1, 0), (2, 2)), (1, 1), "zeros")
        x1 = make((1, 300, 40), dtype).detach().transpose(1, 2).requires_grad_()
        compare_with_reference(x1, make((40, 1, 4), dtype, seed=1), None, (1,), ((3, 0),), (1,), "zeros")


@pytest.mark.parametrize("pad_share", [0.0, 1.0])  # the input padded once first always / never
@pytest.mark.parametrize("kernel", unroll.SIZES)
def test_unrolled_blocks_equal_reference(monkeypatch, kernel, pad_share):
    # Every generated size: widths whose last block overlaps the one before (forward) or leaves columns
    # to the tap loop (weight gradient: blocks of 8 and the rest), more channels than one channel
    # block (16..128 channels), vertical stride 2 (the forward blocks only need stride 1 along the width),
    # horizontal stride 2 (the weight-gradient blocks of that stride), column ranges, and the input
    # gradient (the forward kernel, flipped weight).
    monkeypatch.setattr(numba_depthwise, "PAD_BORDER_SHARE", pad_share)
    monkeypatch.setattr(numba_depthwise, "PAD_MIN_TAPS", 0)
    kh, kw = kernel
    for dtype in (torch.float32, torch.float64):
        itemsize = dtype.itemsize
        assert numba_depthwise._forward_pass((1, 9, 9, 3), (9, 9), kernel, (1, 1), (0, 0), (1, 1), 1, itemsize).unrolled
        assert numba_depthwise._forward_pass((1, 9, 20, 3), (9, 9), kernel, (1, 2), (0, 0), (1, 1), 1, itemsize).unrolled
        assert numba_depthwise._weight_grad_plan(kw, 1, 1, itemsize)[0] > 0
        assert numba_depthwise._weight_grad_plan(kw, 2, 1, itemsize)[0] > 0
        w = make((150, 1, kw) if kh == 1 else (150, 1, kh, kw), dtype, seed=1)
        b = make((150,), dtype, seed=2)
        if kh == 1:  # (N, L, C)-backed: the channels-last kernels
            x = make((2, kw + 20, 150), dtype).detach().transpose(1, 2).requires_grad_()
            compare_with_reference(x, w, b, (1,), ((kw - 1, 0),), (1,), "zeros")
            compare_with_reference(x, w, None, (1,), ((1, 2),), (1,), "zeros")
            compare_with_reference(x, w, None, (2,), ((1, 2),), (1,), "zeros")
            continue
        x = make((2, 150, kh + 4, kw + 17), dtype, channels_last=True)
        compare_with_reference(x, w, b, (1, 1), ((kh // 2, kh // 2), (kw // 2, kw // 2)), (1, 1), "zeros")
        compare_with_reference(x, w, None, (2, 1), ((1, 0), (0, 2)), (1, 1), "zeros")
        compare_with_reference(x, w, b, (1, 2), ((1, 1), (1, 2)), (1, 1), "zeros")
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(numba_depthwise, "_col_chunks", lambda rows, columns, threads: 3)
            numba_depthwise._plan.cache_clear()
            compare_with_reference(x, w, b, (1, 1), ((0, 0), (1, 1)), (1, 1), "zeros")
        numba_depthwise._plan.cache_clear()


@pytest.mark.parametrize("pad_share", [0.0, 1.0])
def test_tiled_loop_padding_only_the_width_equals_reference(monkeypatch, pad_share):
    # Kernels without an unrolled block (here 3x6, dilated 2x6, 5x1) pad once along the width alone when
    # the side borders dominate and channels are few; rows stay clipped. With a depth multiplier, the
    # input is repeated inside the Function and its gradient summed back.
    monkeypatch.setattr(numba_depthwise, "PAD_BORDER_SHARE", pad_share)
    monkeypatch.setattr(numba_depthwise, "PAD_MIN_TAPS", 0)
    for dtype in (torch.float32, torch.float64):
        x = make((2, 5, 9, 13), dtype, channels_last=True)
        w = make((10, 1, 3, 6), dtype, seed=1)
        b = make((10,), dtype, seed=2)
        assert numba_depthwise._forward_pass((2, 9, 13, 10), (9, 13), (3, 6), (1, 1), (1, 2), (1, 1), 1,
                                             dtype.itemsize).padded is not None or pad_share == 1.0
        compare_with_reference(x, w, b, (1, 1), ((1, 1), (2, 3)), (1, 1), "zeros")
        compare_with_reference(x, w, None, (2, 1), ((1, 1), (5, 5)), (1, 2), "zeros")
        compare_with_reference(x, make((5, 1, 5, 1), dtype, seed=3), None, (1, 1), ((4, 0), (0, 0)), (1, 1), "zeros")


def test_weight_layout_kernel():
    # PyTorch's (C, T) weight -> (T, tile*C) rows, flipped for the input gradient; start values tiled the same.
    for dtype in (torch.float32, torch.float64):
        weight, bias = torch.randn(3, 4, dtype=dtype), torch.randn(3, dtype=dtype)
        for flip, tile, with_bias in ((False, 1, True), (True, 2, False), (False, 5, True)):
            out, start = torch.empty(4, tile * 3, dtype=dtype), torch.empty(tile * 3, dtype=dtype)
            numba_depthwise._prepare_weight(weight.numpy(), (bias if with_bias else torch.empty(0, dtype=dtype)).numpy(),
                                            flip, out.numpy(), start.numpy())
            rows = weight.t().flip(0) if flip else weight.t()
            assert torch.equal(out, rows.repeat(1, tile))
            assert torch.equal(start, bias.repeat(tile) if with_bias else torch.zeros(tile * 3, dtype=dtype))


def test_channel_repeat_and_group_sum_kernels():
    src = torch.randn(7, 3, dtype=torch.float64)
    repeated = torch.empty(7, 6, dtype=torch.float64)
    numba_depthwise._repeat_channels(src.numpy(), repeated.numpy())
    assert torch.equal(repeated, src.repeat_interleave(2, dim=1))
    summed = torch.empty(7, 3, dtype=torch.float64)
    numba_depthwise._sum_groups(repeated.numpy(), summed.numpy())
    assert torch.equal(summed, 2 * src)


def test_pad_kernel():
    src = torch.randn(2, 3, 4, 5)
    dst = torch.full((2, 6, 7, 5), float("nan"))
    numba_depthwise._pad_into(src.numpy(), dst.numpy(), 1, 2)
    assert torch.equal(dst, torch.nn.functional.pad(src, (0, 0, 2, 1, 1, 2)))


def test_plans_follow_the_thread_count():
    # A plan is cached per signature, thread count included: changing torch's thread count mid-run
    # re-plans (task split) and Numba follows.
    x, w = make((1, 6, 3, 40), torch.float64), make((6, 1, 3, 3), torch.float64, seed=1)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            compare_with_reference(x, w, None, (1, 1), ((1, 1), (1, 1)), (1, 1), "zeros")
            assert numba_depthwise._threads() == min(n, numba_depthwise.numba.config.NUMBA_NUM_THREADS)
            assert numba_depthwise.numba.get_num_threads() == numba_depthwise._threads()
    finally:
        torch.set_num_threads(threads)
    assert numba_depthwise._plan.cache_info().currsize >= 2


def test_generated_module_is_current():
    assert unroll.TARGET.read_text() == unroll.source(), "run: python -m sepconv.kernels.unroll"


# --- planar (contiguous NCHW) kernels ----------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(case=geometry_case(rank=2, max_kernel=5), channels=st.integers(1, 3), multiplier=st.integers(1, 3),
       band_values=st.sampled_from([1, 7, 4096]), threads=st.sampled_from([1, 3]))
def test_planar_kernels_equal_pytorch(case, channels, multiplier, band_values, threads):
    # The three kernels called directly, bands of one row upwards (BAND_VALUES) and tasks cut into
    # chunks for 1 and 3 threads: every phase of the strided grids, padding rows clipped per kernel row.
    pairs = reference_pairs(case["padding"], case["size"], case["kernel"], case["stride"], case["dilation"])
    x = torch.randn(2, channels, *case["size"], dtype=torch.float64)
    w = torch.randn(channels * multiplier, 1, *case["kernel"], dtype=torch.float64, requires_grad=True)
    b = torch.randn(channels * multiplier, dtype=torch.float64)
    x.requires_grad_()
    flat = [v for pair in reversed(pairs) for v in pair]
    ref = torch.nn.functional.conv2d(torch.nn.functional.pad(x, flat), w, b, case["stride"], 0, case["dilation"],
                                     channels)
    gy = torch.randn_like(ref)
    gx, gw = torch.autograd.grad(ref, (x, w), gy)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(numba_planar, "BAND_VALUES", band_values)
        g = numba_planar.plan(2, channels, case["size"], ref.shape[2:], case["kernel"], case["stride"],
                              tuple(p[0] for p in pairs), case["dilation"], threads)
    taps = w.detach().numpy().reshape(w.shape[0], -1)
    out = torch.empty_like(ref)
    numba_planar.forward(x.detach().numpy(), taps, b.numpy(), out.detach().numpy(), g)
    torch.testing.assert_close(out, ref.detach(), **TOLERANCE[torch.float64])
    got_x, got_w = torch.empty_like(x), torch.empty_like(taps := torch.from_numpy(taps))
    numba_planar.input_grad(gy.numpy(), taps.numpy(), got_x.detach().numpy(), g)
    numba_planar.weight_grad(x.detach().numpy(), gy.numpy(), got_w.numpy(), g)
    torch.testing.assert_close(got_x, gx, **TOLERANCE[torch.float64])
    torch.testing.assert_close(got_w, gw.reshape(taps.shape), **TOLERANCE[torch.float64])


def test_planar_kernels_take_contiguous_or_few_channel_inputs():
    # Contiguous 2-D and 1-D inputs go planar (no transposes) when their output planes are not small;
    # channels-last ones, (N, L, C)-backed 1-D ones and channels_last weights (the reference then returns
    # channels_last) do not, unless they have at most FEW_CHANNELS_PLANAR channels (transposed in and out).
    def planar(x, w):
        return numba_depthwise._plan(x.shape, x.stride(), w.shape, w.stride(), ((1, 1),) * (x.ndim - 2),
                                     (1,) * (x.ndim - 2), (1,) * (x.ndim - 2), "zeros", 1, 4).planar is not None

    few, pixels = numba_depthwise.FEW_CHANNELS_PLANAR, numba_depthwise.PLANAR_MIN_OUTPUT_PIXELS
    side = math.isqrt(pixels - 1) + 1  # the smallest square plane with enough pixels
    for c, few_channels in ((few + 1, False), (few, True)):
        x, w = torch.randn(2, c, side, side), torch.randn(c, 1, 3, 3)
        assert planar(x, w)
        assert planar(x.to(memory_format=torch.channels_last), w) is few_channels
        assert planar(x, w.to(memory_format=torch.channels_last)) is few_channels
        assert planar(torch.randn(2, c, side - 1, side), w) is few_channels  # a plane too small
        assert planar(torch.randn(2, c, pixels), torch.randn(c, 1, 3))
        assert planar(torch.randn(2, c, pixels - 1), torch.randn(c, 1, 3)) is few_channels
        assert planar(torch.randn(2, pixels, c).transpose(1, 2), torch.randn(c, 1, 3)) is few_channels


@pytest.mark.parametrize("rank", [1, 2])
def test_few_channel_channels_last_inputs_keep_their_layout(rank):
    # Through the planar kernels by transposes, but the output and the input gradient come back in the
    # channels-last layout the channels-last kernels (and, in 2-D, PyTorch) give.
    c = numba_depthwise.FEW_CHANNELS_PLANAR
    x = make((2, 10, 11, c) if rank == 2 else (2, 11, c), torch.float32).detach()
    x = x.permute(0, 3, 1, 2) if rank == 2 else x.transpose(1, 2)
    x.requires_grad_()
    w = make((2 * c, 1, *(3,) * rank), torch.float32, seed=1)
    with dispatch.use_kernels("numba"):
        out = numba_depthwise.depthwise_conv(x, w, None, (1,) * rank, ((1, 1),) * rank, (1,) * rank, "zeros")
    ref = reference.conv(x, w, None, (1,) * rank, ((1, 1),) * rank, (1,) * rank, c, "zeros")
    torch.testing.assert_close(out, ref)
    assert out.movedim(1, -1).is_contiguous()
    (grad_x,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert grad_x.movedim(1, -1).is_contiguous()
    torch.testing.assert_close(grad_x, torch.autograd.grad(ref, x, torch.ones_like(ref))[0])


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 5, 3), (3, 16, 16), (2, 17, 33), (1, 40, 7)])
def test_transpose_kernel(shape):
    for dtype in (torch.float32, torch.float64):
        src = torch.randn(shape, dtype=dtype)
        dst = torch.empty(shape[0], shape[2], shape[1], dtype=dtype)
        numba_depthwise._transpose(src.numpy(), dst.numpy())
        assert torch.equal(dst, src.transpose(1, 2))


def test_temporaries_never_leak_into_results():
    # Layout temporaries are reused from call to call: a chain of layers (NCHW, so every layer transposes)
    # must still give the reference's values and gradients, and an earlier result must survive later calls.
    x = make((2, 6, 9, 8), torch.float64)
    w1, w2 = make((6, 1, 3, 3), torch.float64, seed=1), make((12, 1, 2, 3), torch.float64, seed=2)
    pairs = ((1, 1), (1, 1))

    def chain(op):
        first = op(x, w1, None, (1, 1), pairs, (1, 1), "zeros")
        kept = first.detach().clone()
        op(torch.randn(2, 6, 9, 8, dtype=x.dtype), w1.detach(), None, (1, 1), pairs, (1, 1), "zeros")
        second = op(first, w2, None, (2, 1), pairs, (1, 1), "zeros")
        assert torch.equal(first, kept)
        return second, torch.autograd.grad(second.square().sum(), (x, w1, w2))

    def ref(x, w, b, stride, pairs, dilation, mode):
        return reference.conv(x, w, b, stride, pairs, dilation, x.shape[1], mode)

    (got, got_grads), (want, want_grads) = chain(numba_depthwise.depthwise_conv), chain(ref)
    torch.testing.assert_close(got, want, **TOLERANCE[torch.float64])
    for a, e in zip(got_grads, want_grads):
        torch.testing.assert_close(a, e, **TOLERANCE[torch.float64])


def test_inference_mode_and_no_grad(monkeypatch):
    # Temporaries first made under inference_mode are then reused (and written) outside it.
    monkeypatch.setattr(numba_depthwise, "_scratch", {})
    monkeypatch.setattr(numba_depthwise, "PAD_MIN_TAPS", 0)  # the padded temporary too
    x, w = torch.randn(2, 4, 8, 8), torch.randn(4, 1, 3, 3)
    ref = reference.conv(x, w, None, (1, 1), ((1, 1), (1, 1)), (1, 1), 4, "zeros")
    with torch.inference_mode():
        torch.testing.assert_close(numba_depthwise.depthwise_conv(x, w, None, (1, 1), ((1, 1), (1, 1)), (1, 1),
                                                                  "zeros"), ref)
    with torch.no_grad():
        out = numba_depthwise.depthwise_conv(x.requires_grad_(), w, None, (1, 1), ((1, 1), (1, 1)), (1, 1), "zeros")
    assert not out.requires_grad
    with torch.inference_mode():  # a transposed input: neither contiguous nor channels_last
        numba_depthwise.depthwise_conv(x.detach().transpose(2, 3), w, None, (1, 1), ((1, 1), (1, 1)), (1, 1), "zeros")
    compare_with_reference(make((2, 4, 8, 8), torch.float32), make((4, 1, 3, 3), torch.float32, seed=1), None,
                           (1, 1), ((1, 1), (1, 1)), (1, 1), "zeros")
    transposed = make((2, 4, 8, 8), torch.float32).detach().transpose(2, 3).requires_grad_()
    compare_with_reference(transposed, make((4, 1, 3, 3), torch.float32, seed=1), None, (1, 1), ((1, 1), (1, 1)),
                           (1, 1), "zeros")


# --- the dispatcher --------------------------------------------------------------------------------

@pytest.mark.parametrize("padding, padding_mode", [("same", "zeros"), (((1, 2), 0), "circular"), (1, "reflect")])
def test_dispatcher_forced_both_ways_gives_equal_results(padding, padding_mode):
    x = make((2, 6, 11, 10), torch.float64, channels_last=True)
    dw, pw, b = make((12, 1, 3, 4), torch.float64, seed=1), make((5, 12), torch.float64, seed=2), make((5,), torch.float64)
    kwargs = {"stride": (2, 1), "padding": padding, "dilation": (1, 2), "padding_mode": padding_mode}
    results = {}
    for mode in ("reference", "numba", "auto"):
        with dispatch.use_kernels(mode):
            out = F.separable_conv(x, dw, pw, b, **kwargs)
            results[mode] = (out, _layout(out), torch.autograd.grad(out.sum(), (x, dw, pw, b)))
    for mode in ("numba", "auto"):
        torch.testing.assert_close(results[mode][0], results["reference"][0])
        assert results[mode][1] == results["reference"][1]
        for got, want in zip(results[mode][2], results["reference"][2]):
            torch.testing.assert_close(got, want)


def _spy(monkeypatch):
    calls = []
    original = numba_depthwise.depthwise_conv
    monkeypatch.setattr(numba_depthwise, "depthwise_conv", lambda *a: calls.append(1) or original(*a))
    return calls


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_dispatcher_routes(monkeypatch):
    calls = _spy(monkeypatch)
    x, w = torch.randn(2, 4, 9, 9), torch.randn(4, 1, 3, 3)
    with dispatch.use_kernels("reference"):
        F.depthwise_conv(x, w, padding=1)
    assert calls == []
    with dispatch.use_kernels("numba"):
        F.depthwise_conv(x, w, padding=1)
        assert len(calls) == 1
        # Not covered: 3-D, float16/bfloat16 -> the reference, in every mode.
        F.depthwise_conv(torch.randn(1, 4, 5, 5, 5), torch.randn(4, 1, 3, 3, 3))
        F.depthwise_conv(x.to(torch.bfloat16), w.to(torch.bfloat16), padding=1)
        assert len(calls) == 1
        traced = torch.jit.trace(lambda x: F.depthwise_conv(x, w, padding=1), (x,), check_trace=False)
        assert len(calls) == 1
        torch.testing.assert_close(traced(x), F.depthwise_conv(x, w, padding=1))
    with dispatch.use_kernels("auto"):
        for _ in range(3):
            F.depthwise_conv(x, w, padding=1)
    assert len(dispatch.choices()) == 1  # measured once, then cached
    assert set(dispatch.choices().values()) <= {"numba", "reference"}


def test_dispatcher_under_torch_compile_uses_reference(monkeypatch):
    calls = _spy(monkeypatch)
    x, w = torch.randn(1, 4, 8, 8), torch.randn(4, 1, 3, 3)
    with dispatch.use_kernels("numba"):
        compiled = torch.compile(lambda x: F.depthwise_conv(x, w, padding=1), backend="eager")
        out = compiled(x)
    assert calls == []
    torch.testing.assert_close(out, reference.conv(x, w, None, (1, 1), ((1, 1), (1, 1)), (1, 1), 4, "zeros"))


def test_dispatcher_mode_errors_and_environment(monkeypatch):
    with pytest.raises(ValueError, match=r"kernels mode must be one of 'reference', 'numba', 'auto'; got 'fast'"):
        dispatch.set_kernels("fast")
    monkeypatch.setenv("SEPCONV_KERNELS", "Numba")
    assert dispatch.get_kernels() == "numba"
    monkeypatch.setenv("SEPCONV_KERNELS", "gpu")
    with pytest.raises(ValueError, match=r"SEPCONV_KERNELS must be one of reference, numba, auto; got 'gpu'"):
        dispatch.get_kernels()
    dispatch.set_kernels("reference")  # the API wins over the environment
    assert dispatch.get_kernels() == "reference"
    monkeypatch.delenv("SEPCONV_KERNELS")
    dispatch.set_kernels(None)
    assert dispatch.get_kernels() == dispatch.DEFAULT_MODE


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.func scripts helpers internally
def test_dispatcher_functorch_and_forward_ad_use_reference(monkeypatch):
    from torch.autograd import forward_ad

    calls = _spy(monkeypatch)
    x, w = torch.randn(1, 2, 5, 5), torch.randn(2, 1, 3, 3)
    with dispatch.use_kernels("numba"):
        with forward_ad.dual_level():
            out = F.depthwise_conv(forward_ad.make_dual(x, torch.ones_like(x)), w, padding=1)
            tangent = forward_ad.unpack_dual(out).tangent
        batched = torch.func.vmap(lambda x: F.depthwise_conv(x, w, padding=1))(x.unsqueeze(0))
        grad_w = torch.func.grad(lambda w: F.depthwise_conv(x, w, padding=1).sum())(w)
    assert calls == []
    torch.testing.assert_close(tangent, F.depthwise_conv(torch.ones_like(x), w, padding=1))
    torch.testing.assert_close(batched[0], F.depthwise_conv(x, w, padding=1))
    assert grad_w.shape == w.shape


def test_numba_thread_pool_leaves_torch_thread_count_alone():
    # Numba's first parallel launch calls omp_set_num_threads, which reaches PyTorch's OpenMP pool too.
    import subprocess
    import sys

    code = ("import torch; torch.set_num_threads(1)\n"
            "from sepconv.kernels import numba_depthwise as nd\n"
            "nd.compile_all(); assert torch.get_num_threads() == 1, torch.get_num_threads()\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
