"""Analytic cost model (sepconv.cost) against the published figures and hand formulas.

The figures are written out here, as quoted in the project's shared reference, REFERENCE.md (kept outside this
repository; nothing here reads it).

MobileNetV1 is built here as in the paper (Table 1, weights only: no bias, no batch norm, the FC layer
included; the last depthwise layer has stride 1, the paper's "s2" there being a typo) and counted both
analytically (layer by layer with sepconv.cost) and as it runs (sepconv.profiling.profile).
"""

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sepconv
from sepconv.cost import (LayerCost, closed_form_reduction, conv_cost, depthwise_cost, layer_cost, linear_cost,
                          pointwise_cost, separable_cost, separable_reduction, spatial_separable_cost)
from sepconv.profiling import profile

# Table 1: (pointwise width, depthwise stride) of the 13 depthwise separable layers.
MOBILENET_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), *[(512, 1)] * 5, (1024, 2), (1024, 1)]


def mobilenet_v1(alpha: float = 1.0) -> nn.Sequential:
    """The paper's MobileNetV1 with width multiplier ``alpha``: weights only, Keras' 'same' padding."""
    width = lambda channels: int(channels * alpha)  # noqa: E731
    layers = [sepconv.Conv2d(3, width(32), 3, stride=2, padding="same", bias=False)]
    channels = width(32)
    for out_channels, stride in MOBILENET_BLOCKS:
        layers.append(sepconv.SeparableConv2d(channels, width(out_channels), 3, stride, "same", bias=False))
        channels = width(out_channels)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 1000, bias=False))


def analytic_costs(model: nn.Sequential, resolution: int) -> list[LayerCost]:
    """layer_cost of every convolution and the FC layer, each fed the previous layer's output shape."""
    shape, costs = (1, 3, resolution, resolution), []
    for layer in model:
        if isinstance(layer, nn.AdaptiveAvgPool2d):
            shape = shape[:2]  # global average pool, then flatten: (N, C)
        elif not isinstance(layer, nn.Flatten):
            costs.append(layer_cost(layer, shape))
            shape = costs[-1].output_shape
    return costs


@pytest.fixture(scope="module")
def paper_mobilenet():
    torch.manual_seed(0)
    return mobilenet_v1()


@pytest.fixture(scope="module")
def paper_profile(paper_mobilenet):
    return profile(paper_mobilenet, (1, 3, 224, 224))


# --- published figures ---------------------------------------------------------------------------

def test_mobilenet_v1_totals_analytic_and_counted(paper_mobilenet, paper_profile):
    costs = analytic_costs(paper_mobilenet, 224)
    assert sum(c.params for c in costs) == 4_209_088
    assert sum(c.macs for c in costs) == 568_740_352
    assert sum(c.biases for c in costs) == 0
    counted = paper_profile
    assert counted.total_params == 4_209_088 == sum(p.numel() for p in paper_mobilenet.parameters())
    assert counted.total_macs == 568_740_352 and counted.total_flops == 2 * 568_740_352


def test_mobilenet_v1_table_2_shares(paper_profile):
    """Table 2. The paper prints 1.19% for the full 3x3 conv's mult-adds; a recount gives 1.91% (its column
    then sums to 100% instead of 99.29%): this test checks the recount."""
    shares = {entry["kind"]: entry for entry in paper_profile.breakdown()}
    paper = {"pointwise conv": (94.86, 74.59), "depthwise conv": (3.06, 1.06), "conv": (1.91, 0.02),
             "fully connected": (0.18, 24.33)}
    assert set(shares) == set(paper)
    for kind, (macs_percent, params_percent) in paper.items():
        assert round(100 * shares[kind]["macs_share"], 2) == macs_percent, kind
        assert round(100 * shares[kind]["params_share"], 2) == params_percent, kind
    assert round(100 * 10_838_016 / 568_740_352, 2) == 1.91  # the full conv, by hand: 3*3*3*32 * 112*112


@pytest.mark.parametrize("alpha, macs_millions, params_millions", [
    (1.0, 569, 4.2), (0.75, 325, 2.6), (0.5, 149, 1.3), (0.25, 41, 0.5)])
def test_mobilenet_v1_table_6_width_multiplier(alpha, macs_millions, params_millions):
    costs = analytic_costs(mobilenet_v1(alpha), 224)
    assert round(sum(c.macs for c in costs) / 1e6) == macs_millions
    assert round(sum(c.params for c in costs) / 1e6, 1) == params_millions


@pytest.mark.parametrize("resolution, macs_millions", [(224, 569), (192, 418), (160, 290), (128, 186)])
def test_mobilenet_v1_table_7_resolution(paper_mobilenet, resolution, macs_millions):
    macs = sum(c.macs for c in analytic_costs(paper_mobilenet, resolution)) / 1e6
    if resolution == 160:  # 290.68M: the paper truncates this one
        assert math.floor(macs) == macs_millions and round(macs, 2) == 290.68
    else:
        assert round(macs) == macs_millions


def test_mobilenet_v1_table_4_full_convolution(paper_mobilenet):
    """Table 4: every depthwise separable layer replaced by the standard 3x3 convolution it factors."""
    shape, standard, separable = (1, 3, 224, 224), [layer_cost(paper_mobilenet[0], (1, 3, 224, 224))], []
    shape = standard[0].output_shape
    for layer in paper_mobilenet[1:14]:
        reduction = separable_reduction(shape, layer.out_channels, 3, layer.stride, "same")
        standard.append(reduction.standard)
        separable.append(reduction.separable)
        shape = reduction.standard.output_shape
    fc = linear_cost((1, 1024), 1000)
    assert sum(c.macs for c in standard) == 4_866_269_184  # the paper's 4866M leaves out the FC's 1.02M
    assert round(sum(c.params for c in standard + [fc]) / 1e6, 1) == 29.3
    assert round((sum(c.macs for c in separable) + standard[0].macs + fc.macs) / 1e6) == 569


def test_table_3_one_14x14x512_layer():
    reduction = separable_reduction((1, 512, 14, 14), 512, 3, padding=1)
    assert (reduction.standard.macs, reduction.standard.params) == (462_422_016, 2_359_296)  # 462M, 2.36M
    assert (reduction.separable.macs, reduction.separable.params) == (52_283_392, 266_752)  # 52.3M, 0.27M
    assert round(reduction.standard.macs / 1e6) == 462 and round(reduction.separable.macs / 1e6, 1) == 52.3
    assert round(reduction.standard.params / 1e6, 2) == 2.36 and round(reduction.separable.params / 1e6, 2) == 0.27


def test_tutorial_example_1792_vs_286_params():
    standard = conv_cost((1, 3, 224, 224), 64, 3, padding=1, bias=True)
    assert (standard.weights, standard.biases, standard.params) == (1728, 64, 1792)
    separable = separable_cost((1, 3, 224, 224), 64, 3, padding=1, bias=True, depthwise_bias=True)
    assert [step.params for step in separable.steps] == [30, 256] and separable.params == 286
    keras = separable_cost((1, 3, 224, 224), 64, 3, padding="same", bias=True)  # Keras SeparableConv2D(64, 3)
    assert keras.params == 283 == layer_cost(sepconv.SeparableConv2d(3, 64, 3, padding="same"), (1, 3, 8, 8)).params


@pytest.mark.parametrize("out_channels, fewer", [(64, 7.89), (128, 8.41), (256, 8.69), (512, 8.84), (1024, 8.92)])
def test_reduction_closed_form_reference_values(out_channels, fewer):
    closed = closed_form_reduction(out_channels, (3, 3))
    assert closed == Fraction(1, out_channels) + Fraction(1, 9)
    assert round(float(1 / closed), 2) == fewer
    counted = separable_reduction((2, 32, 9, 9), out_channels, 3, padding="same")
    assert counted.params_ratio == counted.macs_ratio == closed
    assert float(1 / closed_form_reduction(10**9, (3, 3))) == pytest.approx(9, rel=1e-6)  # the limit


@given(in_channels=st.integers(1, 6), out_factor=st.integers(1, 4), multiplier=st.integers(1, 3),
       groups=st.sampled_from([1, 2]), kernel=st.lists(st.integers(1, 5), min_size=1, max_size=3),
       stride=st.integers(1, 3), size=st.integers(6, 11))
def test_reduction_closed_form_equals_counts(in_channels, out_factor, multiplier, groups, kernel, stride, size):
    """M * groups / C_out + M / prod(k), with depth multiplier, groups and non-square kernels, equals the counts."""
    in_channels *= groups
    out_channels = out_factor * groups
    rank = len(kernel)
    reduction = separable_reduction((1, in_channels, *[size] * rank), out_channels, tuple(kernel), stride, "same",
                                    depth_multiplier=multiplier, groups=groups)
    expected = Fraction(multiplier * groups, out_channels) + Fraction(multiplier, math.prod(kernel))
    assert reduction.closed_form == expected == reduction.params_ratio == reduction.macs_ratio


# --- hand formulas --------------------------------------------------------------------------------

def hand_output_size(n, k, s, before, after, d):
    return (n + before + after - d * (k - 1) - 1) // s + 1


@given(batch=st.integers(1, 3), groups=st.integers(1, 3), per_group_in=st.integers(1, 3),
       per_group_out=st.integers(1, 3), data=st.data())
def test_conv_cost_matches_hand_formulas_and_torch(batch, groups, per_group_in, per_group_out, data):
    rank = data.draw(st.integers(1, 3))
    kernel = data.draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank))
    stride = data.draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank))
    dilation = data.draw(st.lists(st.integers(1, 2), min_size=rank, max_size=rank))
    padding = data.draw(st.lists(st.integers(0, 2), min_size=rank, max_size=rank))
    spatial = [data.draw(st.integers(d * (k - 1) + 1, 9)) for k, d in zip(kernel, dilation)]
    bias = data.draw(st.booleans())
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    in_channels, out_channels = groups * per_group_in, groups * per_group_out
    shape = (batch, in_channels, *spatial)
    cost = conv_cost(shape, out_channels, tuple(kernel), tuple(stride), tuple(padding), tuple(dilation), groups, bias,
                     dtype)
    out = tuple(hand_output_size(n, k, s, p, p, d) for n, k, s, p, d in zip(spatial, kernel, stride, padding, dilation))
    weights = out_channels * per_group_in * math.prod(kernel)
    assert cost.output_shape == (batch, out_channels, *out)
    assert (cost.weights, cost.biases) == (weights, out_channels if bias else 0)
    assert cost.macs == batch * math.prod(out) * out_channels * per_group_in * math.prod(kernel)
    assert cost.flops == 2 * cost.macs
    itemsize = {torch.float32: 4, torch.float64: 8, torch.bfloat16: 2}[dtype]
    assert cost.bytes == (math.prod(shape) + batch * out_channels * math.prod(out) + cost.params) * itemsize
    assert cost.intensity == cost.flops / cost.bytes
    weight = torch.zeros(out_channels, per_group_in, *kernel)
    convolution = getattr(torch.nn.functional, f"conv{rank}d")
    y = convolution(torch.zeros(shape), weight, None, stride, padding, dilation, groups)
    assert tuple(y.shape) == cost.output_shape


def test_same_padding_uses_geometry():
    """TF/Keras 'same' for any stride: out = ceil(n / s); the extra pad element does not change the count."""
    cost = depthwise_cost((1, 32, 224, 224), 3, stride=2, padding="same")
    assert cost.output_shape == (1, 32, 112, 112) and cost.kind == "depthwise conv"
    assert cost.macs == 32 * 9 * 112 * 112
    assert conv_cost((1, 4, 100), 4, 4, dilation=2, padding="causal").output_shape == (1, 4, 100)


def test_depth_multiplier_groups_and_kinds():
    cost = separable_cost((2, 8, 10, 12), 16, (3, 5), stride=(1, 2), padding="same", depth_multiplier=2, bias=True,
                          depthwise_bias=True, groups=4)
    depthwise, pointwise = cost.steps
    assert depthwise.output_shape == (2, 16, 10, 6) and depthwise.weights == 16 * 15 and depthwise.biases == 16
    assert pointwise.kind == "grouped conv" and pointwise.weights == 16 * (16 // 4) and pointwise.biases == 16
    assert cost.macs == 2 * 10 * 6 * (16 * 15 + 16 * 4)
    assert cost.kind == "depthwise separable conv" and cost.params == depthwise.params + pointwise.params
    # A multi-step layer moves its outer input and output only; its steps count the intermediate tensor too.
    assert cost.bytes == (2 * 8 * 10 * 12 + 2 * 16 * 10 * 6 + cost.params) * 4
    intermediate_bytes = math.prod(depthwise.output_shape) * 4
    assert sum(step.bytes for step in cost.steps) == cost.bytes + 2 * intermediate_bytes  # written, then read
    assert pointwise_cost((1, 8, 3), 4).kind == "pointwise conv"
    assert conv_cost((1, 1, 9, 9), 4, 3).kind == "conv"  # one input channel: groups=1, a standard conv


def test_spatial_separable_cost():
    """7x1 then 1x7, 64 -> 64 -> 64 (the layer's doctest): 57,344 weights against 200,704."""
    cost = spatial_separable_cost((1, 64, 17, 17), 64, 7, padding="same", bias=True)
    assert cost.weights == 57_344 and cost.biases == 64 and cost.output_shape == (1, 64, 17, 17)
    assert [step.output_shape for step in cost.steps] == [(1, 64, 17, 17)] * 2
    assert cost.macs == 2 * 17 * 17 * 64 * 64 * 7
    per_channel = spatial_separable_cost((1, 3, 9, 9), 6, 5, stride=2, padding=2, depthwise=True)
    assert [step.kind for step in per_channel.steps] == ["depthwise conv"] * 2
    assert per_channel.weights == 6 * 5 + 6 * 5 and per_channel.output_shape == (1, 6, 5, 5)
    assert per_channel.steps[0].output_shape == (1, 6, 5, 9)  # stride and padding act along their own axis


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2), (2, 4, 9, 9)),
    (lambda: nn.Conv1d(4, 4, 5, padding="same", dilation=2, groups=4, bias=False), (2, 4, 20)),
    (lambda: nn.Conv3d(2, 3, (1, 2, 3), padding="valid"), (1, 2, 4, 5, 6)),
    (lambda: sepconv.Conv2d(3, 4, 4, stride=2, padding="same"), (2, 3, 11, 10)),
    (lambda: sepconv.DepthwiseConv2d(3, 3, stride=2, padding="same", depth_multiplier=2), (2, 3, 10, 9)),
    (lambda: sepconv.PointwiseConv3d(3, 5), (1, 3, 2, 3, 4)),
    (lambda: sepconv.SeparableConv1d(3, 6, 5, stride=2, padding="causal", depth_multiplier=2), (2, 3, 20)),
    (lambda: sepconv.SeparableConv2d(4, 6, 3, padding=1, norm="batch", activation="relu", depthwise_bias=True),
     (2, 4, 7, 7)),
    (lambda: sepconv.SpatialSeparableConv2d(3, 5, (3, 5), mid_channels=4, padding="same", stride=2), (2, 3, 9, 11)),
    (lambda: sepconv.SpatialSeparableConv3d(2, 4, (3, 1, 2), padding="same", depthwise=True), (1, 2, 6, 5, 4)),
    (lambda: nn.Linear(12, 5), (3, 7, 12)),
])
def test_layer_cost_from_modules(make, shape):
    """Parameters equal the module's convolution weights and biases; the output shape equals what it returns."""
    layer = make()
    cost = layer_cost(layer, shape)
    norm = getattr(layer, "norm", None)
    norm_params = 0 if norm is None else sum(p.numel() for p in norm.parameters())
    assert cost.params == sum(p.numel() for p in layer.parameters()) - norm_params
    with torch.no_grad():
        assert cost.output_shape == tuple(layer(torch.randn(shape)).shape)


@pytest.mark.parametrize("call, error, message", [
    (lambda: conv_cost((1, 3), 4, 3), ValueError,
     "input_shape must be (N, C, *spatial) with 1, 2 or 3 spatial dims, all positive ints; got (1, 3)"),
    (lambda: conv_cost("1x3x8x8", 4, 3), TypeError, "input_shape must be a tuple (N, C, *spatial)"),
    (lambda: conv_cost((1, 6, 8, 8), 4, 3, groups=4), ValueError,
     "groups (=4) must be a positive int dividing the input channels (=6) and out_channels (=4)"),
    (lambda: conv_cost((1, 3, 2, 2), 4, 3), ValueError, "smaller than the effective kernel size 3"),
    (lambda: conv_cost((1, 3, 8, 8), 4, (3, 3, 3)), ValueError, "kernel_size must be an int or a tuple of 2 ints"),
    (lambda: closed_form_reduction(64, 3), TypeError, "kernel_size must be a tuple with one size per spatial axis"),
    (lambda: layer_cost(nn.Conv2d(3, 4, 3), (1, 5, 8, 8)), ValueError,
     "input_shape has 5 channels but Conv2d expects 3"),
    (lambda: layer_cost(nn.ConvTranspose2d(3, 4, 3), (1, 3, 8, 8)), TypeError,
     "layer_cost does not model transposed convolutions"),
    (lambda: layer_cost(nn.ReLU(), (1, 3, 8, 8)), TypeError,
     "layer_cost supports sepconv's layers, torch.nn.Conv1d/2d/3d and nn.Linear; got ReLU"),
])
def test_errors_name_the_argument(call, error, message):
    with pytest.raises(error) as info:
        call()
    assert message in str(info.value)
