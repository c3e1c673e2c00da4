"""Bad input gets a ValueError/TypeError that names the argument and the value it got."""

import numpy as np
import pytest
import torch

import sepconv
import sepconv.functional as F

x2 = torch.randn(2, 4, 9, 9)
dw = torch.randn(8, 1, 3, 3)
pw = torch.randn(6, 8)


@pytest.mark.parametrize("call, error, message", [
    # wrong input rank
    (lambda: F.depthwise_conv(torch.randn(2, 4, 9, 9, 9), dw), ValueError,
     r"x must have shape \(N, C, \*spatial\) or \(C, \*spatial\) with 2 spatial dims \(4 or 3 dims\); "
     r"got shape \(2, 4, 9, 9, 9\)"),
    (lambda: F.depthwise_conv(torch.randn(3, 4, 9), dw), ValueError,  # read as unbatched (C=3, H=4, W=9)
     r"x has 3 channels, which do not divide the 8 output channels \(C \* depth_multiplier\) of the depthwise "
     r"weight of shape \(8, 1, 3, 3\)"),
    (lambda: F.depthwise_conv(x2, torch.randn(8, 1, 3, 3, 3, 3)), ValueError,
     r"weight must have shape \(C_out, C_in / groups, \*kernel_size\) with 1, 2 or 3 spatial dims; got shape"),
    (lambda: F.pointwise_conv(torch.randn(4, 9), torch.randn(3, 4)), ValueError,
     r"x must have shape \(N, C, \*spatial\) with 1, 2 or 3 spatial dims; got shape \(4, 9\)"),
    # channel count mismatch
    (lambda: F.depthwise_conv(x2, torch.randn(6, 1, 3, 3)), ValueError,
     r"x has 4 channels, which do not divide the 6 output channels \(C \* depth_multiplier\) of the depthwise "
     r"weight of shape \(6, 1, 3, 3\)"),
    (lambda: F.depthwise_conv(x2, torch.randn(8, 2, 3, 3)), ValueError, r"with C = 4 input channels; got shape \(8, 2, 3, 3\)"),
    (lambda: F.pointwise_conv(x2, torch.randn(6, 5)), ValueError,
     r"x has 4 channels but the pointwise weight of shape \(6, 5, 1, 1\) expects 5"),
    (lambda: F.separable_conv(x2, dw, torch.randn(6, 7)), ValueError,
     r"pointwise_weight must have shape \(C_out, 8\) or \(C_out, 8, 1, 1\) to follow the depthwise step; got shape \(6, 7\)"),
    (lambda: F.conv(x2, torch.randn(6, 3, 3, 3)), ValueError,
     r"x has 4 channels but weight of shape \(6, 3, 3, 3\) with groups=1 expects 3"),
    (lambda: F.conv(x2, torch.randn(6, 2, 3, 3), groups=2, padding=1).shape and F.conv(x2, torch.randn(5, 2, 3, 3), groups=2),
     ValueError, r"weight's C_out = 5 must be divisible by groups = 2"),
    (lambda: F.spatial_separable_conv(x2, [torch.randn(6, 3, 3), torch.randn(6, 6, 3)]), ValueError,
     r"weights\[0\] of shape \(6, 3, 3\) does not fit an input with 4 channels"),
    (lambda: F.depthwise_conv(x2, dw, torch.randn(4)), ValueError, r"bias must have shape \(8,\); got shape \(4,\)"),
    # bad padding strings and values
    (lambda: F.depthwise_conv(x2, dw, padding="full"), ValueError,
     r"padding must be one of \('same', 'valid', 'causal'\), an int or a per-axis tuple; got 'full'"),
    (lambda: F.depthwise_conv(x2, dw, padding=-1), ValueError, r"padding must be non-negative; got -1"),
    (lambda: F.depthwise_conv(x2, dw, padding=1.5), TypeError, r"padding must be a str, an int or a tuple; got 1.5"),
    (lambda: F.depthwise_conv(x2, dw, padding_mode="mirror"), ValueError,
     r"padding_mode must be one of \('zeros', 'reflect', 'replicate', 'circular'\); got 'mirror'"),
    # padding larger than allowed
    (lambda: F.depthwise_conv(x2, dw, padding=9, padding_mode="reflect"), ValueError,
     r"padding \(9, 9\) on spatial axis 0 must be smaller than the input size 9 for padding_mode='reflect'"),
    (lambda: F.depthwise_conv(x2, dw, padding=((0, 10), 0), padding_mode="circular"), ValueError,
     r"padding \(0, 10\) on spatial axis 0 must not exceed the input size 9 for padding_mode='circular'"),
    # non-positive sizes
    (lambda: F.depthwise_conv(x2, dw, stride=0), ValueError, r"stride must be an int or a tuple of 2 ints, each >= 1; got 0"),
    (lambda: F.depthwise_conv(x2, dw, dilation=(1, -2)), ValueError,
     r"dilation must be an int or a tuple of 2 ints, each >= 1; got \(1, -2\)"),
    (lambda: F.depthwise_conv(torch.randn(2, 4, 0, 9), dw), ValueError,
     r"x must have non-zero channel and spatial sizes; got shape \(2, 4, 0, 9\)"),
    (lambda: F.depthwise_conv(x2, torch.randn(8, 1, 0, 3)), ValueError, r"weight must have non-zero sizes; got shape \(8, 1, 0, 3\)"),
    (lambda: F.conv(x2, torch.randn(6, 4, 3, 3), groups=0), ValueError, r"groups must be a positive int; got 0"),
    # input smaller than the effective kernel
    (lambda: F.depthwise_conv(x2, dw, dilation=5), ValueError,
     r"input size 9 on spatial axis 0 \(padded to 9\) is smaller than the effective kernel size 11 \(kernel_size=3, dilation=5\)"),
    # integer dtypes and non-tensors
    (lambda: F.depthwise_conv(x2.long(), dw), TypeError, r"x must be a floating-point tensor; got dtype torch.int64"),
    (lambda: F.depthwise_conv(x2, dw.int()), TypeError, r"weight must be a floating-point tensor; got dtype torch.int32"),
    (lambda: F.depthwise_conv(x2.double(), dw), TypeError, r"x dtype torch.float64 does not match the weight dtype torch.float32"),
    (lambda: F.depthwise_conv(x2.numpy(), dw), TypeError, r"x must be a torch.Tensor; got ndarray"),
    (lambda: F.spatial_separable_conv(x2, torch.randn(4, 1, 3)), TypeError,
     r"weights must be a non-empty sequence of 1-D factors \(C_out, C_in / groups, k\); got Tensor"),
    (lambda: F.spatial_separable_conv(x2, [torch.randn(4, 1, 3)] * 2, axes=(0, 0)), ValueError,
     r"axes must be a permutation of \(0, 1\); got \(0, 0\)"),
])
def test_functional_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("make, error, message", [
    (lambda: sepconv.DepthwiseConv2d(0, 3), ValueError, r"in_channels must be a positive int; got 0"),
    (lambda: sepconv.DepthwiseConv2d(4, 3, depth_multiplier=0), ValueError, r"depth_multiplier must be a positive int; got 0"),
    (lambda: sepconv.DepthwiseConv2d(4, (3, 0)), ValueError, r"kernel_size must be an int or a tuple of 2 ints, each >= 1; got \(3, 0\)"),
    (lambda: sepconv.DepthwiseConv1d(4, 3, padding="causual"), ValueError, r"padding must be one of .*; got 'causual'"),
    (lambda: sepconv.DepthwiseConv2d(4, 3, max_norm=-1), ValueError, r"max_norm must be None or a positive number; got -1"),
    (lambda: sepconv.SeparableConv2d(4, 8, 3, init="he"), ValueError, r"init must be one of \('torch', 'keras'\); got 'he'"),
    (lambda: sepconv.SeparableConv2d(4, 8, 3, norm="layer"), ValueError,
     r"norm must be None, one of \('batch',\) or a callable taking the channel count; got 'layer'"),
    (lambda: sepconv.SeparableConv2d(4, 8, 3, activation="swishy"), ValueError,
     r"activation must be None, one of \(.*\), an nn.Module or a factory; got 'swishy'"),
    (lambda: sepconv.PointwiseConv2d(4, -8), ValueError, r"out_channels must be a positive int; got -8"),
    (lambda: sepconv.SpatialSeparableConv2d(4, 6, 3, depthwise=True), ValueError,
     r"out_channels \(=6\) must be a multiple of in_channels \(=4\) with depthwise=True"),
    (lambda: sepconv.SpatialSeparableConv2d(4, 8, 3, mid_channels=5, depthwise=True), ValueError,
     r"mid_channels must be None with depthwise=True; got 5"),
    (lambda: sepconv.Conv2d(4, 6, 3, groups=4), ValueError,
     r"in_channels \(=4\) and out_channels \(=6\) must be divisible by groups \(=4\)"),
])
def test_layer_argument_errors(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_layer_forward_errors_name_the_input():
    layer = sepconv.SeparableConv2d(4, 8, 3)
    with pytest.raises(ValueError, match=r"x has 3 channels but the layer has in_channels = 4; got shape \(1, 3, 9, 9\)"):
        layer(torch.randn(1, 3, 9, 9))
    for wrong in (sepconv.DepthwiseConv2d(4, 3), sepconv.SpatialSeparableConv2d(4, 4, 3, depthwise=True)):
        with pytest.raises(ValueError, match=r"x has 2 channels but the layer has in_channels = 4"):
            wrong(torch.randn(2, 9, 9))  # unbatched; 2 divides 4: the ops alone would infer other groups
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor; got dtype torch.uint8"):
        layer(torch.zeros(1, 4, 9, 9, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"input size 2 on spatial axis 1 \(padded to 2\) is smaller than the effective"):
        layer(torch.randn(1, 4, 9, 2))


# --- issue 18: errors that came from deep inside PyTorch, or named the wrong thing -----------------------------

@pytest.mark.parametrize("call, error, message", [
    (lambda: F.spatial_separable_conv(x2, [torch.randn(4, 1, 3), torch.randn(4, 1, 3, dtype=torch.float64)]),
     TypeError, r"weights\[1\] dtype torch.float64 does not match the weights\[0\] dtype torch.float32"),
    (lambda: F.conv(x2, torch.randn(6, 4, 3, 3), groups=True), ValueError, r"groups must be a positive int; got True"),
    (lambda: F.depthwise_conv(x2, dw, stride=2**70), ValueError,
     r"stride must be at most 2147483647 on every axis; got 1180591620717411303424"),
    (lambda: F.depthwise_conv(x2, dw, padding=2**70), ValueError, r"padding must be at most 2147483647 on every axis"),
    (lambda: F.depthwise_conv(x2, dw, dilation=(1, 2**62)), ValueError, r"dilation must be at most 2147483647"),
    (lambda: F.depthwise_conv(x2.to_sparse(), dw), TypeError,
     r"x must be a dense \(strided\) tensor; got layout torch.sparse_coo"),
    (lambda: F.spatial_separable_conv(x2, [torch.randn(4, 1, 3)] * 2, axes=1), TypeError,
     r"axes must be None or a sequence of spatial axes; got 1"),
    (lambda: sepconv.convert("model"), TypeError, r"model must be a torch.nn.Module; got str"),
    (lambda: sepconv.attach_constraints("opt", torch.nn.Linear(2, 2)), TypeError,
     r"optimizer must be a torch.optim.Optimizer; got str"),
    (lambda: sepconv.SeparableConv2d(4, 8, 3, activation=torch.relu), TypeError,
     r"activation must be an nn.Module or a factory called with no arguments; got <built-in method relu"),
    (lambda: sepconv.SeparableConv2d(4, 8, 3, norm=lambda channels: "batch"), TypeError,
     r"norm must be a factory taking the channel count and returning an nn.Module; got .*, which returned a str"),
    (lambda: sepconv.DepthwiseConv2d(4, 3, dtype=torch.int32), TypeError,
     r"dtype must be None or a floating-point torch.dtype; got torch.int32"),
    (lambda: sepconv.Conv2d(4, 4, 3, dtype=torch.int64), TypeError, r"dtype must be None or a floating-point"),
    # misleading messages
    (lambda: F.spatial_separable_conv(x2, [torch.randn(8, 8, 3), torch.randn(8, 8, 3)]), ValueError,
     r"weights\[0\] of shape \(8, 8, 3\) does not fit an input with 4 channels: C_in / groups = 8 must divide 4$"),
    (lambda: F.depthwise_conv(x2, dw, padding=b"same"), TypeError,
     r"padding must be a str, an int or a tuple; got b'same'"),
    (lambda: sepconv.DepthwiseConv2d(4, b"\x03\x03"), TypeError, r"kernel_size must be an int or a tuple of 2 ints"),
])
def test_issue_18_api_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_numpy_groups_work_in_layers_and_ops_alike():
    layer = sepconv.Conv2d(4, 6, 3, groups=np.int64(2))
    assert type(layer.groups) is int
    torch.testing.assert_close(layer(x2), F.conv(x2, layer.weight, layer.bias, groups=np.int64(2)))


@pytest.mark.parametrize("make, sizing, shape", [
    (lambda: sepconv.DepthwiseConv2d(8, kernel_size=10**6), "in_channels=8, depth_multiplier=1, "
     "kernel_size=(1000000, 1000000)", "8 x 1 x 1000000 x 1000000 float32"),
    (lambda: sepconv.DepthwiseConv1d(8, kernel_size=2 * 10**9, dtype=torch.float64), "kernel_size=(2000000000,)",
     "8 x 1 x 2000000000 float64"),
    (lambda: sepconv.PointwiseConv2d(10**6, 10**6), "in_channels=1000000, out_channels=1000000",
     "1000000 x 1000000 x 1 x 1 float32"),
    (lambda: sepconv.SeparableConv3d(8, 10**12, 3), "out_channels=1000000000000", "1000000000000 x 8 x 1 x 1 x 1"),
    (lambda: sepconv.SpatialSeparableConv2d(8, 8, (10**6, 3), mid_channels=10**6), "kernel_size=(1000000, 3)",
     "1000000 x 8 x 1000000 float32"),
    (lambda: sepconv.Conv2d(8, 8, 10**6), "kernel_size=(1000000, 1000000)", "8 x 8 x 1000000 x 1000000 float32"),
])
def test_a_weight_larger_than_the_machine_is_refused_in_one_line_before_allocating(make, sizing, shape):
    """Defect: DepthwiseConv2d(8, kernel_size=10**6) tried to allocate 32 TB ("can't allocate memory")."""
    with pytest.raises(ValueError) as error:
        make()
    message = str(error.value)
    assert "\n" not in message and sizing in message and shape in message
    assert "GiB, more than this machine's" in message


def test_a_weight_on_the_meta_device_is_not_checked_against_this_machine():
    layer = sepconv.DepthwiseConv2d(8, kernel_size=10**5, device="meta")
    assert layer.weight.shape == (8, 1, 10**5, 10**5)
