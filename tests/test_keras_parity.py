"""Parity with Keras 3: outputs, weight layouts, parameter counts, initialisation, padding.

Source checked: REFERENCE.md, the project's shared reference (kept outside this repository; nothing here reads
it), section "Semantics to match (Keras 3 / TensorFlow)":

* depthwise kernel ``(*k, C, M)``, pointwise kernel ``(*1, C * M, filters)``, output channel ``c * M + m``;
* ``SeparableConv`` has ONE bias, after the pointwise step; stride and dilation act on the depthwise step;
* ``'same'``: ``out = ceil(n / s)``, ``total = max((out - 1) * s + k_eff - n, 0)``, the odd element after;
  ``'valid'``: ``out = floor((n - k_eff) / s) + 1``; ``'causal'``: ``k_eff - 1`` before, 0 after;
* parameter counts ``k_h*k_w*C*M + C*M*F + F`` and ``k_h*k_w*C*M + C*M`` (``SeparableConv2D(64, 3)`` on 3
  channels = 283).

The oracle is Keras itself (``keras.layers.*``, run on the PyTorch backend, no TensorFlow), called on
channels-last inputs. Where Keras refuses a configuration, the test asserts the refusal (so the
limitation is documented) and checks sepconv against an independent dense reference instead:
``torch.nn.functional.convNd`` with the layer's materialised kernel (``layer.to_dense()``) and padding
computed here from the REFERENCE formulas (not from :mod:`sepconv.geometry`).

Keras limitations seen with Keras 3.15 (torch backend):

* ``Conv1D/Conv2D`` reject ``strides > 1`` together with ``dilation_rate > 1`` (checked on the maximum over
  all axes, so even ``strides=(1, 2), dilation_rate=(2, 1)`` is refused);
* ``SeparableConv1D/DepthwiseConv1D`` reject ``padding='causal'``.
* ``SeparableConv*/DepthwiseConv*`` accept ``strides > 1`` with ``dilation_rate > 1`` on this backend (the
  TensorFlow ops behind the TF backend refuse it); they are compared with Keras like every other case.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as TF  # noqa: E402

import sepconv  # noqa: E402

ATOL = 1e-5
RTOL = 1e-5
BATCH = 2
CHANNELS = 3
FILTERS = 4

SEPCONV = {("separable", 1): sepconv.SeparableConv1d, ("separable", 2): sepconv.SeparableConv2d,
           ("depthwise", 1): sepconv.DepthwiseConv1d, ("depthwise", 2): sepconv.DepthwiseConv2d}
KERAS = {("separable", 1): keras.layers.SeparableConv1D, ("separable", 2): keras.layers.SeparableConv2D,
         ("depthwise", 1): keras.layers.DepthwiseConv1D, ("depthwise", 2): keras.layers.DepthwiseConv2D}
CONV_KERAS_STRIDE_DILATION_ERROR = "`strides > 1` not supported in conjunction with `dilation_rate > 1`"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The shapes here are tiny: intra-op threads only add start-up and contention cost. Restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- helpers -----------------------------------------------------------------------------------------

def as_tuple(value, rank):
    return (value,) * rank if isinstance(value, int) else tuple(value)


def ref_same(n, k, s, d):
    """REFERENCE: 'same' per axis, any stride/dilation; the extra element goes after."""
    out = -(-n // s)
    total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
    return total // 2, total - total // 2


def ref_padding(padding, n, k, s, d):
    if padding == "valid":
        return 0, 0
    if padding == "same":
        return ref_same(n, k, s, d)
    if padding == "causal":
        return (k - 1) * d, 0
    raise AssertionError(padding)


def ref_out_size(padding, n, k, s, d):
    """REFERENCE output lengths: ceil(n / s) for 'same', floor((n - k_eff) / s) + 1 for 'valid', n for causal s=1."""
    if padding == "same":
        return -(-n // s)
    if padding == "causal":
        return (n - 1) // s + 1
    return (n - ((k - 1) * d + 1)) // s + 1


def dense_reference(weight, bias, x, padding, kernel_size, stride, dilation):
    """Independent reference: explicit zero padding from the REFERENCE formulas, then F.convNd."""
    rank = weight.ndim - 2
    pairs = [ref_padding(padding, n, k, s, d) for n, k, s, d in zip(x.shape[2:], kernel_size, stride, dilation)]
    flat = [amount for pair in reversed(pairs) for amount in pair]  # F.pad wants the last axis first
    conv = {1: TF.conv1d, 2: TF.conv2d}[rank]
    y = conv(TF.pad(x, flat), weight, bias, stride=stride, dilation=dilation)
    expected = tuple(ref_out_size(padding, n, k, s, d)
                     for n, k, s, d in zip(x.shape[2:], kernel_size, stride, dilation))
    assert tuple(y.shape[2:]) == expected
    return y


def layer_reference(layer, x, padding):
    """The dense reference for a sepconv layer: its materialised kernel, padding computed here."""
    dense = layer.to_dense()
    with torch.no_grad():
        return dense_reference(dense.weight, dense.bias, x, padding, layer.kernel_size, layer.stride, layer.dilation)


def keras_forward(keras_layer, x):
    """Run a Keras layer on a channels-first torch tensor via a channels-last numpy array; back to channels first."""
    y = keras_layer(np.ascontiguousarray(np.moveaxis(x.numpy(), 1, -1)))
    return torch.from_numpy(np.moveaxis(keras.ops.convert_to_numpy(y), -1, 1).copy())


def sepconv_forward(layer, x):
    with torch.no_grad():
        return layer(x)


def random_like_keras(keras_layer, rng, scale=0.5):
    """Random-normal arrays with the shapes of the layer's weights (not its initialiser)."""
    return [(scale * rng.standard_normal(w.shape)).astype(np.float32) for w in keras_layer.get_weights()]


def randomize_(module, generator):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=generator))


def inputs_for(rank, sizes, channels, rng):
    return [torch.from_numpy(rng.standard_normal((BATCH, channels, *size)).astype(np.float32))
            for size in sizes]


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


# Odd and even sizes on every axis; non-square 2-D inputs so a height/width mix-up shows.
SIZES = {1: [(9,), (10,)], 2: [(9, 10), (10, 9)]}


def make_pair(kind, rank, padding, kernel, strides, dilation, depth_multiplier, use_bias):
    sep_kwargs = dict(stride=strides, padding=padding, dilation=dilation, depth_multiplier=depth_multiplier,
                      bias=use_bias)
    keras_kwargs = dict(kernel_size=kernel, strides=strides, padding=padding, dilation_rate=dilation,
                        depth_multiplier=depth_multiplier, use_bias=use_bias)
    if kind == "separable":
        layer = SEPCONV[kind, rank](CHANNELS, FILTERS, kernel, **sep_kwargs)
        keras_layer = KERAS[kind, rank](FILTERS, **keras_kwargs)
    else:
        layer = SEPCONV[kind, rank](CHANNELS, kernel, **sep_kwargs)
        keras_layer = KERAS[kind, rank](**keras_kwargs)
    return layer, keras_layer


def check_parity(kind, rank, padding, kernel, strides, dilation, depth_multiplier, use_bias):
    rng = np.random.default_rng(1234)
    xs = inputs_for(rank, SIZES[rank], CHANNELS, rng)
    layer, keras_layer = make_pair(kind, rank, padding, kernel, strides, dilation, depth_multiplier, use_bias)
    keras_forward(keras_layer, xs[0])  # builds it
    keras_layer.set_weights(random_like_keras(keras_layer, rng))
    layer.load_keras_weights(keras_layer)
    for x in xs:
        expected = keras_forward(keras_layer, x)
        actual = sepconv_forward(layer, x)
        assert actual.shape == expected.shape
        assert_close(actual, expected)
        # The same output from the independent dense reference (checks to_dense() and the padding split too).
        assert_close(layer_reference(layer, x, padding), expected)


# --- 1. numerical parity: SeparableConv / DepthwiseConv, 1-D and 2-D ---------------------------------

def test_oracle_is_keras_on_the_torch_backend():
    assert keras.backend.backend() == "torch"
    assert int(keras.__version__.split(".")[0]) == 3


@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("depth_multiplier", [1, 2], ids=["M1", "M2"])
@pytest.mark.parametrize("dilation", [1, 2, (2, 1)], ids=["d1", "d2", "d21"])
@pytest.mark.parametrize("strides", [1, 2, (1, 2)], ids=["s1", "s2", "s12"])
@pytest.mark.parametrize("kernel", [3, 4, (4, 3)], ids=["k3", "k4", "k43"])
@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("kind", ["separable", "depthwise"])
def test_parity_2d(kind, padding, kernel, strides, dilation, depth_multiplier, use_bias):
    check_parity(kind, 2, padding, kernel, strides, dilation, depth_multiplier, use_bias)


@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("depth_multiplier", [1, 2], ids=["M1", "M2"])
@pytest.mark.parametrize("dilation", [1, 2], ids=["d1", "d2"])
@pytest.mark.parametrize("strides", [1, 2], ids=["s1", "s2"])
@pytest.mark.parametrize("kernel", [3, 4], ids=["k3", "k4"])
@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("kind", ["separable", "depthwise"])
def test_parity_1d(kind, padding, kernel, strides, dilation, depth_multiplier, use_bias):
    check_parity(kind, 1, padding, kernel, strides, dilation, depth_multiplier, use_bias)


@pytest.mark.parametrize("dilation", [1, 2], ids=["d1", "d2"])
@pytest.mark.parametrize("kernel", [3, 4], ids=["k3", "k4"])
@pytest.mark.parametrize("kind", ["separable", "depthwise"])
def test_causal_1d_keras_rejects_sepconv_matches_dense(kind, kernel, dilation):
    """Keras' separable/depthwise layers have no 'causal'; sepconv's must equal the dense causal conv."""
    with pytest.raises(ValueError, match=r"padding. argument must be a list/tuple or one of .*Received: causal"):
        make_pair(kind, 1, "causal", kernel, 1, dilation, 2, True)
    layer = SEPCONV[kind, 1](CHANNELS, *([FILTERS] if kind == "separable" else []), kernel, padding="causal",
                             dilation=dilation, depth_multiplier=2)
    randomize_(layer, torch.Generator().manual_seed(0))
    x = inputs_for(1, [(10,)], CHANNELS, np.random.default_rng(0))[0]
    y = sepconv_forward(layer, x)
    assert_close(y, layer_reference(layer, x, "causal"))
    # Causality: output t does not change when inputs after t change.
    x2 = x.clone()
    x2[..., 6:] += 1.0
    assert_close(sepconv_forward(layer, x2)[..., :6], y[..., :6])


def test_separable_has_one_bias_after_pointwise_and_no_activation_between():
    """REFERENCE: Keras SeparableConv = depthwise (stride, dilation) -> 1x1 pointwise -> + bias, nothing between."""
    rng = np.random.default_rng(7)
    x = inputs_for(2, [(9, 10)], CHANNELS, rng)[0]
    keras_layer = keras.layers.SeparableConv2D(FILTERS, 3, strides=2, padding="same", depth_multiplier=2)
    keras_forward(keras_layer, x)
    dw, pw, bias = random_like_keras(keras_layer, rng)
    keras_layer.set_weights([dw, pw, bias])
    assert [w.shape for w in keras_layer.get_weights()] == [(3, 3, CHANNELS, 2), (1, 1, CHANNELS * 2, FILTERS),
                                                          (FILTERS,)]
    # Compose by hand from the Keras arrays: grouped conv with channel order c*M + m, then 1x1, then bias.
    depthwise = torch.from_numpy(dw.reshape(3, 3, CHANNELS * 2)).permute(2, 0, 1).unsqueeze(1)
    pointwise = torch.from_numpy(pw).permute(3, 2, 0, 1)
    padded = TF.pad(x, [*ref_same(10, 3, 2, 1), *ref_same(9, 3, 2, 1)])
    hand = TF.conv2d(TF.conv2d(padded, depthwise, stride=2, groups=CHANNELS), pointwise, torch.from_numpy(bias))
    assert_close(keras_forward(keras_layer, x), hand)
    layer = sepconv.SeparableConv2d(CHANNELS, FILTERS, 3, stride=2, padding="same", depth_multiplier=2)
    layer.load_keras_weights(keras_layer)
    assert_close(sepconv_forward(layer, x), hand)
    assert layer.depthwise_bias is None and layer.bias.shape == (FILTERS,)


# --- 2. round trips ------------------------------------------------------------------------------------

ROUND_TRIP = [("separable", 1, 4), ("separable", 2, (3, 4)), ("depthwise", 1, 4), ("depthwise", 2, (3, 4))]


@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("depth_multiplier", [1, 2], ids=["M1", "M2"])
@pytest.mark.parametrize("kind,rank,kernel", ROUND_TRIP, ids=[f"{k}{r}d" for k, r, _ in ROUND_TRIP])
def test_to_keras_weights_runs_the_same_in_keras(kind, rank, kernel, depth_multiplier, use_bias):
    layer, keras_layer = make_pair(kind, rank, "same", kernel, 2, 1, depth_multiplier, use_bias)
    randomize_(layer, torch.Generator().manual_seed(3))
    xs = inputs_for(rank, SIZES[rank], CHANNELS, np.random.default_rng(3))
    keras_forward(keras_layer, xs[0])
    exported = layer.to_keras_weights()
    assert [a.shape for a in exported] == [w.shape for w in keras_layer.get_weights()]
    assert all(a.dtype == np.float32 for a in exported)
    keras_layer.set_weights(exported)
    for x in xs:
        assert_close(keras_forward(keras_layer, x), sepconv_forward(layer, x))


@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("depth_multiplier", [1, 2], ids=["M1", "M2"])
@pytest.mark.parametrize("kind,rank,kernel", ROUND_TRIP, ids=[f"{k}{r}d" for k, r, _ in ROUND_TRIP])
def test_load_then_export_returns_the_keras_arrays(kind, rank, kernel, depth_multiplier, use_bias):
    layer, keras_layer = make_pair(kind, rank, "valid", kernel, 1, 1, depth_multiplier, use_bias)
    keras_layer.build((None, *(12,) * rank, CHANNELS))
    originals = random_like_keras(keras_layer, np.random.default_rng(5))
    layer.load_keras_weights(originals)
    exported = layer.to_keras_weights()
    assert len(exported) == len(originals)
    for got, want in zip(exported, originals):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    # The export is a copy: changing it does not change the layer.
    exported[0][...] = 0
    np.testing.assert_array_equal(layer.to_keras_weights()[0], originals[0])


@pytest.mark.parametrize("rank,kernel,groups", [(1, 4, 1), (2, (3, 4), 1), (2, 3, 2)])
def test_conv_round_trip(rank, kernel, groups):
    conv = {1: sepconv.Conv1d, 2: sepconv.Conv2d}[rank](4, 6, kernel, stride=2, padding="same", groups=groups)
    keras_layer = {1: keras.layers.Conv1D, 2: keras.layers.Conv2D}[rank](6, kernel, strides=2, padding="same",
                                                                          groups=groups)
    randomize_(conv, torch.Generator().manual_seed(11))
    xs = inputs_for(rank, SIZES[rank], 4, np.random.default_rng(11))
    keras_forward(keras_layer, xs[0])
    keras_layer.set_weights(conv.to_keras_weights())
    for x in xs:
        assert_close(keras_forward(keras_layer, x), sepconv_forward(conv, x))
    originals = random_like_keras(keras_layer, np.random.default_rng(12))
    conv.load_keras_weights(originals)
    for got, want in zip(conv.to_keras_weights(), originals, strict=True):
        np.testing.assert_array_equal(got, want)


# --- 3. parameter counts -------------------------------------------------------------------------------

def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_reference_example_283():
    keras_layer = keras.layers.SeparableConv2D(64, 3)
    keras_layer.build((None, 32, 32, 3))
    assert keras_layer.count_params() == 283
    assert n_params(sepconv.SeparableConv2d(3, 64, 3, bias=True)) == 283


COUNTS = [
    # kind, rank, C, F, kernel, M, bias
    ("separable", 2, 3, 64, 3, 1, True),
    ("separable", 2, 3, 64, 3, 1, False),
    ("separable", 2, 5, 7, (3, 4), 3, True),
    ("separable", 1, 8, 16, 5, 2, True),
    ("separable", 1, 8, 16, 5, 2, False),
    ("depthwise", 2, 5, None, (3, 4), 3, True),
    ("depthwise", 2, 5, None, 3, 1, False),
    ("depthwise", 1, 8, None, 5, 2, True),
    ("depthwise", 1, 8, None, 5, 2, False),
]


@pytest.mark.parametrize("kind,rank,channels,filters,kernel,multiplier,use_bias", COUNTS)
def test_parameter_count_equals_keras(kind, rank, channels, filters, kernel, multiplier, use_bias):
    kwargs = dict(depth_multiplier=multiplier)
    if kind == "separable":
        layer = SEPCONV[kind, rank](channels, filters, kernel, bias=use_bias, **kwargs)
        keras_layer = KERAS[kind, rank](filters, kernel, use_bias=use_bias, **kwargs)
    else:
        layer = SEPCONV[kind, rank](channels, kernel, bias=use_bias, **kwargs)
        keras_layer = KERAS[kind, rank](kernel, use_bias=use_bias, **kwargs)
    keras_layer.build((None, *(16,) * rank, channels))
    # REFERENCE formulas: k*C*M + C*M*F + F (separable), k*C*M + C*M (depthwise), bias terms optional.
    taps = math.prod(as_tuple(kernel, rank))
    hidden = channels * multiplier
    formula = taps * hidden + (hidden * filters + filters * use_bias if kind == "separable" else hidden * use_bias)
    assert n_params(layer) == keras_layer.count_params() == formula


@pytest.mark.parametrize("rank,kernel,groups,use_bias", [(2, 3, 1, True), (2, (3, 4), 2, False), (1, 5, 1, True)])
def test_conv_parameter_count_equals_keras(rank, kernel, groups, use_bias):
    layer = {1: sepconv.Conv1d, 2: sepconv.Conv2d}[rank](4, 8, kernel, groups=groups, bias=use_bias)
    keras_layer = {1: keras.layers.Conv1D, 2: keras.layers.Conv2D}[rank](8, kernel, groups=groups, use_bias=use_bias)
    keras_layer.build((None, *(16,) * rank, 4))
    assert n_params(layer) == keras_layer.count_params()


# --- 4. Keras initialisation ---------------------------------------------------------------------------

@pytest.fixture(autouse=False)
def seeded():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


def glorot_limit(fan_in, fan_out):
    return math.sqrt(6.0 / (fan_in + fan_out))


def check_glorot(weight, limit):
    """All within +-limit, the extremes within 2% of it, std ~ limit / sqrt(3) (uniform).

    With >= 1000 samples, max |w| of U(-L, L) is below 0.98 L with probability < 0.98 ** 1000 ~ 2e-9, so
    the two bounds pin the actual limit to within 2% of the one computed from Keras' fans.
    """
    w = weight.detach().double()
    assert w.numel() >= 1000
    assert w.abs().max().item() <= limit * (1 + 1e-6)
    assert w.abs().max().item() >= 0.98 * limit
    assert w.std().item() == pytest.approx(limit / math.sqrt(3), rel=0.06)
    assert abs(w.mean().item()) < 0.05 * limit


# Large enough for a tight std estimate; C != M and C*M != F so swapped/wrong fans give other limits.
INIT_C, INIT_M, INIT_F, INIT_K = 48, 3, 20, (3, 5)


def keras_max_abs(keras_layer, index):
    return float(np.abs(keras_layer.get_weights()[index]).max())


def test_keras_init_separable_2d(seeded):
    kh, kw = INIT_K
    layer = sepconv.SeparableConv2d(INIT_C, INIT_F, INIT_K, depth_multiplier=INIT_M, bias=True, init="keras")
    # Keras kernel shapes: depthwise (kh, kw, C, M), pointwise (1, 1, C*M, F).
    dw_limit = glorot_limit(INIT_C * kh * kw, INIT_M * kh * kw)
    pw_limit = glorot_limit(INIT_C * INIT_M, INIT_F)
    check_glorot(layer.depthwise_weight, dw_limit)
    check_glorot(layer.pointwise_weight, pw_limit)
    assert torch.count_nonzero(layer.bias) == 0
    # The limits computed this way are Keras' own: its default init reaches but never exceeds them.
    keras_layer = keras.layers.SeparableConv2D(INIT_F, INIT_K, depth_multiplier=INIT_M)
    keras_layer.build((None, 16, 16, INIT_C))
    assert 0.98 * dw_limit <= keras_max_abs(keras_layer, 0) <= dw_limit * (1 + 1e-6)
    assert 0.98 * pw_limit <= keras_max_abs(keras_layer, 1) <= pw_limit * (1 + 1e-6)


def test_keras_init_separable_1d_with_depthwise_bias_zero(seeded):
    k = 7
    layer = sepconv.SeparableConv1d(INIT_C, INIT_F, k, depth_multiplier=INIT_M, depthwise_bias=True, init="keras")
    check_glorot(layer.depthwise_weight, glorot_limit(INIT_C * k, INIT_M * k))
    check_glorot(layer.pointwise_weight, glorot_limit(INIT_C * INIT_M, INIT_F))
    assert torch.count_nonzero(layer.bias) == 0 and torch.count_nonzero(layer.depthwise_bias) == 0


@pytest.mark.parametrize("rank,kernel", [(1, 7), (2, INIT_K)])
def test_keras_init_depthwise(rank, kernel, seeded):
    taps = math.prod(as_tuple(kernel, rank))
    layer = SEPCONV["depthwise", rank](INIT_C, kernel, depth_multiplier=INIT_M, init="keras")
    limit = glorot_limit(INIT_C * taps, INIT_M * taps)
    check_glorot(layer.weight, limit)
    assert torch.count_nonzero(layer.bias) == 0
    keras_layer = KERAS["depthwise", rank](kernel, depth_multiplier=INIT_M)
    keras_layer.build((None, *(16,) * rank, INIT_C))
    assert 0.98 * limit <= keras_max_abs(keras_layer, 0) <= limit * (1 + 1e-6)


def test_keras_init_conv2d(seeded):
    layer = sepconv.Conv2d(INIT_C, INIT_F, INIT_K, groups=2, init="keras")
    taps = math.prod(INIT_K)
    limit = glorot_limit(INIT_C // 2 * taps, INIT_F * taps)  # Keras kernel (kh, kw, C / groups, F)
    check_glorot(layer.weight, limit)
    assert torch.count_nonzero(layer.bias) == 0
    keras_layer = keras.layers.Conv2D(INIT_F, INIT_K, groups=2)
    keras_layer.build((None, 16, 16, INIT_C))
    assert 0.98 * limit <= keras_max_abs(keras_layer, 0) <= limit * (1 + 1e-6)


def test_torch_init_is_not_keras_init(seeded):
    """Control for the init tests: the default (PyTorch) init fails the Keras check on these shapes."""
    layer = sepconv.SeparableConv2d(INIT_C, INIT_F, INIT_K, depth_multiplier=INIT_M)
    kh, kw = INIT_K
    with pytest.raises(AssertionError):
        check_glorot(layer.depthwise_weight, glorot_limit(INIT_C * kh * kw, INIT_M * kh * kw))
    assert torch.count_nonzero(layer.bias) > 0


# --- 5. errors when loading ----------------------------------------------------------------------------

def built(keras_layer, rank, channels=CHANNELS):
    keras_layer.build((None, *(10,) * rank, channels))
    return keras_layer


def test_load_wrong_depthwise_kernel_shape():
    layer = sepconv.SeparableConv2d(CHANNELS, FILTERS, 4)
    with pytest.raises(ValueError, match=r"depthwise kernel has shape \(3, 3, 3, 1\); this layer needs \(4, 4, 3, 1\)"):
        layer.load_keras_weights(built(keras.layers.SeparableConv2D(FILTERS, 3), 2))


def test_load_wrong_depth_multiplier():
    layer = sepconv.DepthwiseConv2d(CHANNELS, 3, depth_multiplier=1)
    with pytest.raises(ValueError, match=r"depthwise kernel has shape \(3, 3, 3, 2\); this layer needs \(3, 3, 3, 1\)"):
        layer.load_keras_weights(built(keras.layers.DepthwiseConv2D(3, depth_multiplier=2), 2))


def test_load_wrong_pointwise_kernel_shape():
    layer = sepconv.SeparableConv1d(CHANNELS, FILTERS, 3)
    with pytest.raises(ValueError, match=r"pointwise kernel has shape \(1, 3, 5\); this layer needs \(1, 3, 4\)"):
        layer.load_keras_weights(built(keras.layers.SeparableConv1D(FILTERS + 1, 3), 1))


def test_load_wrong_channel_count_into_conv():
    layer = sepconv.Conv2d(CHANNELS, FILTERS, 3)
    with pytest.raises(ValueError, match=r"kernel has shape \(3, 3, 4, 4\); this layer needs \(3, 3, 3, 4\)"):
        layer.load_keras_weights(built(keras.layers.Conv2D(FILTERS, 3), 2, channels=4))


@pytest.mark.parametrize("sep_bias,keras_bias", [(False, True), (True, False)])
def test_load_bias_mismatch_separable(sep_bias, keras_bias):
    layer = sepconv.SeparableConv2d(CHANNELS, FILTERS, 3, bias=sep_bias)
    expected, got = 2 + sep_bias, 2 + keras_bias
    with pytest.raises(ValueError, match=rf"SeparableConv2d with bias={sep_bias} expects {expected} Keras weight "
                                         rf"arrays \(use_bias must match\); got {got}"):
        layer.load_keras_weights(built(keras.layers.SeparableConv2D(FILTERS, 3, use_bias=keras_bias), 2))


@pytest.mark.parametrize("sep_bias,keras_bias", [(False, True), (True, False)])
def test_load_bias_mismatch_depthwise_and_conv(sep_bias, keras_bias):
    depthwise = sepconv.DepthwiseConv1d(CHANNELS, 3, bias=sep_bias)
    with pytest.raises(ValueError, match=rf"DepthwiseConv1d with bias={sep_bias} expects {1 + sep_bias} .*"
                                         rf"use_bias must match.*got {1 + keras_bias}"):
        depthwise.load_keras_weights(built(keras.layers.DepthwiseConv1D(3, use_bias=keras_bias), 1))
    conv = sepconv.Conv1d(CHANNELS, FILTERS, 3, bias=sep_bias)
    with pytest.raises(ValueError, match=rf"Conv1d with bias={sep_bias} expects {1 + sep_bias} .*"
                                         rf"use_bias must match.*got {1 + keras_bias}"):
        conv.load_keras_weights(built(keras.layers.Conv1D(FILTERS, 3, use_bias=keras_bias), 1))


def test_load_wrong_bias_shape_from_list():
    layer = sepconv.DepthwiseConv2d(CHANNELS, 3)
    kernel = np.zeros((3, 3, CHANNELS, 1), np.float32)
    with pytest.raises(ValueError, match=r"Keras bias has shape \(4,\); this layer needs \(3,\)"):
        layer.load_keras_weights([kernel, np.zeros(4, np.float32)])


def test_load_rejects_a_non_list_source():
    with pytest.raises(TypeError, match="Keras layer or a list of arrays"):
        sepconv.DepthwiseConv2d(CHANNELS, 3).load_keras_weights(np.zeros((3, 3, CHANNELS, 1), np.float32))


def test_keras_interop_refuses_layers_keras_cannot_express():
    """A norm, activation or depthwise bias between the steps has no Keras SeparableConv equivalent."""
    keras_layer = built(keras.layers.SeparableConv2D(FILTERS, 3), 2)
    for kwargs in (dict(norm="batch"), dict(activation="relu"), dict(depthwise_bias=True)):
        layer = sepconv.SeparableConv2d(CHANNELS, FILTERS, 3, **kwargs)
        with pytest.raises(ValueError, match="no depthwise bias, norm or activation between its steps"):
            layer.load_keras_weights(keras_layer)
        with pytest.raises(ValueError, match="no depthwise bias, norm or activation between its steps"):
            layer.to_keras_weights()


# --- 6. sepconv.Conv2d / Conv1d against keras Conv2D / Conv1D -------------------------------------------

@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("strides", [2, (1, 2), 1], ids=["s2", "s12", "s1"])
@pytest.mark.parametrize("kernel", [3, 4, (4, 3)], ids=["k3", "k4", "k43"])
def test_conv2d_same_matches_keras(kernel, strides, use_bias):
    layer = sepconv.Conv2d(CHANNELS, FILTERS, kernel, stride=strides, padding="same", bias=use_bias)
    assert isinstance(layer, torch.nn.Conv2d)
    keras_layer = keras.layers.Conv2D(FILTERS, kernel, strides=strides, padding="same", use_bias=use_bias)
    rng = np.random.default_rng(21)
    xs = inputs_for(2, SIZES[2], CHANNELS, rng)
    keras_forward(keras_layer, xs[0])
    keras_layer.set_weights(random_like_keras(keras_layer, rng))
    layer.load_keras_weights(keras_layer)
    for x in xs:
        expected = keras_forward(keras_layer, x)
        assert tuple(expected.shape[2:]) == tuple(-(-n // s) for n, s in zip(x.shape[2:], as_tuple(strides, 2)))
        assert_close(sepconv_forward(layer, x), expected)
        with torch.no_grad():
            assert_close(dense_reference(layer.weight, layer.bias, x, "same", layer.kernel_size, layer.stride,
                                         layer.dilation), expected)


@pytest.mark.parametrize("strides", [1, 2], ids=["s1", "s2"])
@pytest.mark.parametrize("dilation", [1, 2], ids=["d1", "d2"])
@pytest.mark.parametrize("kernel", [3, 4], ids=["k3", "k4"])
def test_conv1d_causal_matches_keras(kernel, dilation, strides):
    layer = sepconv.Conv1d(CHANNELS, FILTERS, kernel, stride=strides, padding="causal", dilation=dilation)
    if strides > 1 and dilation > 1:
        with pytest.raises(ValueError, match=CONV_KERAS_STRIDE_DILATION_ERROR):
            keras.layers.Conv1D(FILTERS, kernel, strides=strides, padding="causal", dilation_rate=dilation)
        keras_layer = None
    else:
        keras_layer = keras.layers.Conv1D(FILTERS, kernel, strides=strides, padding="causal", dilation_rate=dilation)
    rng = np.random.default_rng(31)
    xs = inputs_for(1, SIZES[1], CHANNELS, rng)
    randomize_(layer, torch.Generator().manual_seed(31))
    if keras_layer is not None:
        keras_forward(keras_layer, xs[0])
        keras_layer.set_weights(random_like_keras(keras_layer, rng))
        layer.load_keras_weights(keras_layer)
    for x in xs:
        actual = sepconv_forward(layer, x)
        with torch.no_grad():
            assert_close(actual, dense_reference(layer.weight, layer.bias, x, "causal", layer.kernel_size,
                                                 layer.stride, layer.dilation))
        if keras_layer is not None:
            assert_close(actual, keras_forward(keras_layer, x))


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("strides,dilation", [(2, 2), ((1, 2), (2, 1)), ((2, 1), 2)], ids=["s2d2", "s12d21", "s21d2"])
def test_conv2d_stride_with_dilation_keras_rejects_sepconv_matches_dense(padding, strides, dilation):
    with pytest.raises(ValueError, match=CONV_KERAS_STRIDE_DILATION_ERROR):
        keras.layers.Conv2D(FILTERS, 3, strides=strides, padding=padding, dilation_rate=dilation)
    layer = sepconv.Conv2d(CHANNELS, FILTERS, 3, stride=strides, padding=padding, dilation=dilation)
    randomize_(layer, torch.Generator().manual_seed(41))
    for x in inputs_for(2, SIZES[2], CHANNELS, np.random.default_rng(41)):
        with torch.no_grad():
            assert_close(sepconv_forward(layer, x), dense_reference(layer.weight, layer.bias, x, padding,
                                                                    layer.kernel_size, layer.stride, layer.dilation))


def test_failed_load_leaves_the_layer_unchanged():
    layer = sepconv.SeparableConv1d(3, 4, 3)
    before = {name: p.detach().clone() for name, p in layer.named_parameters()}
    bad = [np.ones((3, 3, 1), np.float32), np.ones((1, 3, 5), np.float32), np.ones(4, np.float32)]
    with pytest.raises(ValueError, match=r"pointwise kernel has shape \(1, 3, 5\); this layer needs \(1, 3, 4\)"):
        layer.load_keras_weights(bad)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p, before[name], rtol=0, atol=0)
