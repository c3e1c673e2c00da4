"""Dispatch-level profiler: counts against the cost model and hand formulas, attribution, formats, timing."""

import csv
import io
import json
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import sepconv
from sepconv.cost import closed_form_reduction, layer_cost
from sepconv.profiling import Machine, OpCounter, measure_machine, plot_roofline, profile

FAKE_MACHINE = Machine(memory_bandwidth=1e10, peak_flops=1e11, threads=1, description="made up for tests")
CONTRACT = ("name", "kind", "input_shape", "output_shape", "params", "macs", "flops", "bytes")


# --- counts agree with the analytic cost model ----------------------------------------------------

@st.composite
def layers(draw):
    """A random sepconv layer (any kind, 1-3 spatial dims, stride, dilation, padding form) and a fitting input."""
    kind = draw(st.sampled_from(["conv", "depthwise", "pointwise", "separable", "spatial"]))
    rank = draw(st.integers(2 if kind == "spatial" else 1, 3))
    channels, out_channels = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    kernel = tuple(draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank)))
    stride = tuple(draw(st.lists(st.integers(1, 2), min_size=rank, max_size=rank)))
    dilation = tuple(draw(st.lists(st.integers(1, 2), min_size=rank, max_size=rank)))
    padding = draw(st.sampled_from(["same", "valid", "causal", 1, tuple(((0, 1),) * rank)]))
    bias, multiplier = draw(st.booleans()), draw(st.integers(1, 3))
    spatial = tuple(draw(st.integers((k - 1) * d + 1, (k - 1) * d + 4)) for k, d in zip(kernel, dilation))
    geometry = {"stride": stride, "padding": padding, "dilation": dilation}
    if kind == "conv":
        groups = draw(st.sampled_from([g for g in (1, 2) if channels % g == 0 and out_channels % g == 0]))
        layer = getattr(sepconv, f"Conv{rank}d")(channels, out_channels, kernel, groups=groups, bias=bias, **geometry)
    elif kind == "depthwise":
        layer = getattr(sepconv, f"DepthwiseConv{rank}d")(channels, kernel, depth_multiplier=multiplier, bias=bias,
                                                          **geometry)
    elif kind == "pointwise":
        layer = getattr(sepconv, f"PointwiseConv{rank}d")(channels, out_channels, bias=bias)
    elif kind == "separable":
        layer = getattr(sepconv, f"SeparableConv{rank}d")(channels, out_channels, kernel, depth_multiplier=multiplier,
                                                          bias=bias, depthwise_bias=draw(st.booleans()), **geometry)
    else:
        depthwise = draw(st.booleans())
        layer = getattr(sepconv, f"SpatialSeparableConv{rank}d")(
            channels, channels * multiplier if depthwise else out_channels, kernel, bias=bias, depthwise=depthwise,
            mid_channels=None if depthwise else draw(st.integers(1, 4)), **geometry)
    return layer, (draw(st.integers(1, 2)), channels, *spatial)


@given(layers())
def test_dispatch_counts_equal_the_cost_model(case):
    """Each counted op is one step of the analytic cost: same kind, shapes, params, MACs, bytes, backward MACs."""
    layer, shape = case
    cost = layer_cost(layer, shape)
    steps = cost.steps or (cost,)
    result = profile(layer, shape, backward=True)
    assert len(result.rows) == len(steps)
    assert result.total_macs == cost.macs and result.total_params == cost.params == result.counted_params
    for index, (row, step) in enumerate(zip(result.rows, steps)):
        assert (row.kind, row.output_shape, row.params, row.macs) == (step.kind, step.output_shape, step.params,
                                                                      step.macs)
        # A padding the convolution cannot take itself (asymmetric) is a separate copy: the op reads it.
        padded_elements = math.prod(row.input_shape) - math.prod(step.input_shape)
        assert row.bytes == step.bytes + 4 * padded_elements
        # The first op's input needs no gradient: the weight gradient only; later ops both gradients.
        assert row.backward_macs == step.macs * (1 if index == 0 else 2)


def test_counted_reduction_of_a_layer_and_its_dense_twin_is_the_closed_form():
    """Separable against standard as they run: M / C_out + M / prod(k) with M = 2 and a 3x5 kernel."""
    layer = sepconv.SeparableConv2d(16, 32, (3, 5), stride=2, padding="same", depth_multiplier=2, bias=False)
    separable, dense = profile(layer, (1, 16, 11, 12)), profile(layer.to_dense(), (1, 16, 11, 12))
    assert dense.rows[0].kind == "conv" and dense.total_params == 32 * 16 * 15
    closed_form = closed_form_reduction(32, (3, 5), depth_multiplier=2)
    assert Fraction(separable.total_macs, dense.total_macs) == closed_form
    assert Fraction(separable.total_params, dense.total_params) == closed_form


# --- backward: grouped weight gradient -----------------------------------------------------------

@pytest.mark.parametrize("groups", [4, 8])  # 8 = in_channels: depthwise
def test_grouped_weight_gradient_is_right_where_flop_counter_mode_is_not(groups):
    conv = nn.Conv2d(8, 16, 3, groups=groups, bias=False)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    one_product = 2 * 16 * 4 * 4 * (8 // groups) * 3 * 3  # N * C_out * H_out * W_out * C_in/groups * k * k
    with OpCounter(conv) as counter:
        conv(x).sum().backward()
    backward = [r for r in counter.records if r.backward]
    assert [(r.op, r.macs) for r in backward] == [("convolution_backward", 2 * one_product)]  # input + weight grads

    with FlopCounterMode(display=False) as theirs:
        conv(x).sum().backward()
    their_backward = theirs.get_flop_counts()["Global"][torch.ops.aten.convolution_backward]
    assert their_backward == 2 * (one_product + groups * one_product)  # weight gradient counted `groups` times

    # Independent count: the same convolution as `groups` separate groups=1 convolutions, where
    # FlopCounterMode's formula holds; FLOPs = 2 x MACs.
    pieces = [nn.Conv2d(8 // groups, 16 // groups, 3, bias=False) for _ in range(groups)]
    with FlopCounterMode(display=False) as split:
        torch.cat([piece(part) for piece, part in zip(pieces, x.chunk(groups, dim=1))], dim=1).sum().backward()
    assert split.get_flop_counts()["Global"][torch.ops.aten.convolution_backward] == 2 * backward[0].macs


# --- what runs is what is counted ----------------------------------------------------------------

class Functional(nn.Module):
    """Convolutions and products called functionally inside forward, no conv modules."""

    def __init__(self):
        super().__init__()
        self.depthwise_weight = nn.Parameter(torch.randn(6, 1, 3, 3))  # 3 channels, depth multiplier 2
        self.pointwise_weight = nn.Parameter(torch.randn(4, 6))
        self.projection = nn.Parameter(torch.randn(5, 4))

    def forward(self, x):
        y = F.conv2d(x, self.depthwise_weight, padding=1, groups=3)
        y = sepconv.functional.pointwise_conv(y, self.pointwise_weight)
        tokens = y.flatten(2).transpose(1, 2)  # (N, H*W, 4)
        attention = torch.bmm(tokens, tokens.transpose(1, 2))  # (N, H*W, H*W): no parameter, a plain matmul
        return torch.bmm(attention, tokens) @ self.projection.t()


def test_functional_calls_grouped_and_matmuls_are_counted():
    result = profile(Functional(), (2, 3, 4, 5))
    positions = 4 * 5
    assert [(r.kind, r.op, r.macs, r.params) for r in result.rows] == [
        ("depthwise conv", "convolution", 2 * 6 * positions * 9, 54),
        ("pointwise conv", "convolution", 2 * 4 * positions * 6, 24),
        ("matmul", "bmm", 2 * positions * positions * 4, 0),
        ("matmul", "bmm", 2 * positions * 4 * positions, 0),
        ("fully connected", "mm", 2 * positions * 5 * 4, 20),
    ]
    assert all(r.name.startswith("Functional[") for r in result.rows)  # the model's own ops: its class name


def test_inference_mode_counts_the_same():
    """Under inference_mode conv2d, conv_transpose2d and linear reach the mode without being decomposed."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, groups=1), nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2),
                          nn.Flatten(), nn.Linear(6 * 11 * 11, 7))
    plain = profile(model, (1, 3, 5, 5))
    with torch.inference_mode():
        inference = profile(model, (1, 3, 5, 5))
    assert [(r.kind, r.macs, r.params) for r in inference.rows] == [(r.kind, r.macs, r.params) for r in plain.rows]
    assert [r.kind for r in plain.rows] == ["conv", "transposed conv", "fully connected"]
    assert plain.rows[1].macs == 4 * 5 * 5 * (6 // 2) * 9  # every input element through C_out/groups * k*k weights
    assert plain.rows[2].macs == 6 * 11 * 11 * 7


class TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.left = nn.Conv2d(3, 4, 3, padding=1)
        self.right = nn.Sequential(sepconv.SeparableConv2d(3, 4, 5, padding=2), nn.BatchNorm2d(4))
        self.head = nn.Conv2d(8, 2, 1)
        self.fc = nn.Linear(2 * 6 * 6, 3)

    def forward(self, x):
        y = self.head(torch.cat([self.left(x), self.right(x)], dim=1))
        return self.fc(y.flatten(1))


def test_attribution_to_modules_forward_and_backward():
    model = TwoBranches()
    result = profile(model, (2, 3, 6, 6), backward=True)
    names = [r.name for r in result.rows]
    assert names == ["left", "right.0[0]", "right.0[1]", "head", "fc"]
    backward = {r.name: r.backward_macs // r.macs for r in result.rows}
    # Both branches read the input, which needs no gradient: their first ops compute the weight gradient only.
    assert backward == {"left": 1, "right.0[0]": 1, "right.0[1]": 2, "head": 2, "fc": 2}
    assert all(p.grad is None for p in model.parameters())  # profile leaves no gradients behind
    bn = sum(p.numel() for p in model.right[1].parameters())
    assert result.total_params == sum(p.numel() for p in model.parameters())
    assert result.counted_params == result.total_params - bn
    assert result.breakdown()[-1] == {"kind": "other parameters (e.g. batch norm)", "ops": 0, "macs": 0,
                                      "macs_share": 0.0, "params": bn, "params_share": bn / result.total_params}


def test_shared_module_runs_twice_params_once():
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
    model = nn.Sequential(conv, nn.ReLU(inplace=True), conv)
    result = profile(model, (1, 4, 5, 5), backward=True)
    assert [r.name for r in result.rows] == ["0[0]", "0[1]"]
    assert [r.params for r in result.rows] == [144, 144] and result.total_params == result.counted_params == 144
    assert [r.backward_macs // r.macs for r in result.rows] == [1, 2]


# --- output formats ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def measured():
    torch.manual_seed(0)
    model = nn.Sequential(sepconv.SeparableConv2d(3, 8, 3, padding="same", norm="batch", activation="relu"),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    return profile(model, (2, 3, 8, 8), measure=True, backward=True, warmup=1, repeats=3, machine=FAKE_MACHINE)


def test_profile_contract_and_totals(measured):
    for row in measured.rows:
        for name in CONTRACT:
            assert hasattr(row, name)
        assert row.flops == 2 * row.macs and row.intensity == row.flops / row.bytes
    assert measured.total_flops == 2 * measured.total_macs == 2 * sum(r.macs for r in measured.rows)
    assert sum(r.macs_share for r in measured.rows) == pytest.approx(1)


def test_measured_times_and_roofline_prediction(measured):
    """Structure only: the figures exist, are finite and consistent; speed is never asserted."""
    assert measured.repeats == 3 and measured.model_ms > 0 and measured.model_iqr_ms >= 0
    for row in measured.rows:
        assert row.forward_ms >= 0 and row.forward_iqr_ms >= 0 and row.backward_ms >= 0 and row.backward_iqr_ms >= 0
        assert row.predicted_ms == pytest.approx(1e3 * max(row.flops / 1e11, row.bytes / 1e10))
    assert measured.machine is FAKE_MACHINE


def test_table_names_every_unit(measured):
    text = str(measured)
    for header in ("params", "MACs", "% MACs", "bytes", "FLOP/byte", "backward MACs", "forward ms (median ± IQR)",
                   "predicted ms (roofline)", "backward ms (median ± IQR)"):
        assert header in text
    assert "FLOPs = 2 x MACs" in text and "By kind (MobileNets Table 2 layout)" in text
    assert f"forward {measured.total_macs:,} MACs = {measured.total_flops:,} FLOPs" in text
    assert "GB/s" in text and "GFLOP/s" in text


def test_json_csv_markdown(measured):
    document = json.loads(measured.to_json())
    assert document["totals"]["macs"] == measured.total_macs and document["totals"]["params"] == measured.total_params
    assert [row["name"] for row in document["rows"]] == [row.name for row in measured.rows]
    first = document["rows"][0]
    assert first["input_shape"] == [2, 3, 8, 8] and first["intensity_flop_per_byte"] == measured.rows[0].intensity
    assert document["units"]["intensity_flop_per_byte"] == "FLOPs per byte moved"
    assert document["machine"]["peak_flops_per_s"] == 1e11 and document["model_time"]["repeats"] == 3
    assert [entry["kind"] for entry in document["breakdown"]][:2] == ["pointwise conv", "depthwise conv"]

    records = list(csv.DictReader(io.StringIO(measured.to_csv())))
    assert len(records) == len(measured.rows) and set(CONTRACT) <= set(records[0])
    assert records[0]["input_shape"] == "2x3x8x8" and int(records[0]["macs"]) == measured.rows[0].macs

    markdown = measured.to_markdown()
    assert markdown.startswith("### Sequential on input 2x3x8x8 (float32)")
    assert "| layer | kind | kernel | input | output | params | MACs |" in markdown
    assert "| --- | --- | --- | --- | --- | ---: |" in markdown


def test_roofline_png_is_written_atomically(measured, tmp_path):
    path = tmp_path / "plots" / "roofline.png"
    plot_roofline(measured, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["roofline.png"]  # no temporary file left behind
    with pytest.raises(ValueError, match="a roofline needs measured op times"):
        plot_roofline(profile(nn.Conv2d(1, 1, 1), (1, 1, 2, 2)), tmp_path / "unmeasured.png")


def test_machine_probes_run():
    machine = measure_machine(copy_mib=1, matmul_size=32, repeats=2)
    assert machine.memory_bandwidth > 0 and machine.peak_flops > 0 and machine.threads >= 1
    assert machine.ridge_intensity == machine.peak_flops / machine.memory_bandwidth
    assert "GB/s" in str(machine) and "GFLOP/s" in str(machine) and "FLOP/byte" in str(machine)


# --- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, error, message", [
    (lambda: profile(nn.Conv2d(3, 4, 3), (1, 4, 8, 8)), ValueError,
     "input 1x4x8x8 does not fit Conv2d: RuntimeError: Given groups=1, weight of size [4, 3, 3, 3]"),
    (lambda: profile(nn.Conv2d(3, 4, 3), "1x3x8x8"), ValueError,
     "input_or_shape must be a tensor, a sequence of tensors or a shape of positive ints"),
    (lambda: profile(lambda x: x, (1, 3)), TypeError, "model must be a torch.nn.Module; got function"),
    (lambda: profile(nn.Conv2d(3, 4, 3).requires_grad_(False), (1, 3, 8, 8), backward=True), ValueError,
     "backward=True needs a model output that requires a gradient"),
    (lambda: profile(nn.Conv2d(3, 4, 3), (1, 3, 8, 8), measure=True, repeats=0), ValueError,
     "repeats must be an int >= 1; got 0"),
])
def test_errors(call, error, message):
    with pytest.raises(error) as info:
        call()
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_profile_leaves_model_state_and_randomness_untouched():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Dropout(0.5)).train()
    before = {name: b.clone() for name, b in model.named_buffers()}
    rng = torch.random.get_rng_state()
    sepconv.profile(model, (2, 3, 8, 8), backward=True)
    assert all(torch.equal(before[name], b) for name, b in model.named_buffers())
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert model.training
