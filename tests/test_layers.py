"""Layers: dense twins, initialisation, reprs, constraints, parameter counts (REFERENCE.md, the project's shared
reference: kept outside this repository, its numbers written out here)."""

import math
import os

import numpy as np
import pytest
import torch
from torch import nn

import sepconv
import sepconv.functional as F

LAYER_CASES = [
    ("dw1d-causal", lambda: sepconv.DepthwiseConv1d(3, 4, padding="causal", dilation=2, depth_multiplier=2), (2, 3, 17)),
    ("dw2d-same-s2", lambda: sepconv.DepthwiseConv2d(3, 3, stride=2, padding="same"), (2, 3, 10, 9)),
    ("dw2d-sym", lambda: sepconv.DepthwiseConv2d(3, (3, 5), padding=(1, 2), padding_mode="reflect"), (2, 3, 8, 9)),
    ("dw3d", lambda: sepconv.DepthwiseConv3d(2, 3, padding="same", depth_multiplier=3, padding_mode="replicate"), (1, 2, 5, 6, 4)),
    ("pw1d", lambda: sepconv.PointwiseConv1d(3, 5), (2, 3, 7)),
    ("pw2d", lambda: sepconv.PointwiseConv2d(3, 5, bias=False), (2, 3, 4, 4)),
    ("pw3d", lambda: sepconv.PointwiseConv3d(3, 5), (2, 3, 2, 3, 4)),
    ("sep1d", lambda: sepconv.SeparableConv1d(3, 6, 5, stride=2, padding="same", depth_multiplier=2), (2, 3, 20)),
    ("sep2d-asym", lambda: sepconv.SeparableConv2d(4, 6, 3, stride=2, padding=((0, 1), (0, 1)), depthwise_bias=True), (2, 4, 11, 11)),
    ("sep2d-circular", lambda: sepconv.SeparableConv2d(4, 6, 4, padding="same", dilation=(1, 2), padding_mode="circular"), (2, 4, 9, 12)),
    ("sep3d", lambda: sepconv.SeparableConv3d(2, 4, 3, stride=(1, 2, 2), padding="causal"), (1, 2, 4, 6, 6)),
    ("spatial2d", lambda: sepconv.SpatialSeparableConv2d(3, 5, (3, 5), mid_channels=4, padding="same", stride=2), (2, 3, 9, 11)),
    ("spatial2d-dw", lambda: sepconv.SpatialSeparableConv2d(3, 6, 5, depthwise=True, padding=2, padding_mode="reflect"), (2, 3, 9, 9)),
    ("spatial3d", lambda: sepconv.SpatialSeparableConv3d(2, 3, (3, 1, 2), padding="same", dilation=(2, 1, 1)), (1, 2, 6, 5, 4)),
    ("conv2d-same-s2", lambda: sepconv.Conv2d(3, 4, 3, stride=2, padding="same"), (2, 3, 10, 11)),
]


@pytest.mark.parametrize("name, make, shape", LAYER_CASES, ids=[c[0] for c in LAYER_CASES])
def test_to_dense_agrees(name, make, shape):
    torch.manual_seed(0)
    layer = make().double()
    with torch.no_grad():
        for p in layer.parameters():  # non-zero biases too
            p.normal_()
    dense = layer.to_dense()
    assert isinstance(dense, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    assert dense.groups == 1
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(dense(x), layer(x))
    torch.testing.assert_close(dense(x[0]), layer(x[0]))


def test_to_dense_returns_plain_torch_conv_when_expressible():
    plain = sepconv.SeparableConv2d(4, 8, 3, padding=1, padding_mode="reflect").to_dense()
    assert type(plain) is nn.Conv2d and plain.padding == (1, 1) and plain.padding_mode == "reflect"
    assert type(sepconv.DepthwiseConv2d(4, 3, padding="same").to_dense()) is nn.Conv2d  # stride 1, odd kernel
    extended = sepconv.DepthwiseConv2d(4, 3, stride=2, padding="same").to_dense()
    assert type(extended) is sepconv.Conv2d and isinstance(extended, nn.Conv2d)
    assert type(sepconv.DepthwiseConv2d(4, 4, padding="same").to_dense()) is sepconv.Conv2d  # even kernel: (1, 2)


def test_dense_weight_of_separable_layer():
    layer = sepconv.SeparableConv2d(2, 3, 3, depth_multiplier=2, bias=False)
    dense = layer.to_dense().weight
    dw, pw = layer.depthwise_weight, layer.pointwise_weight[..., 0, 0]
    for o in range(3):
        for c in range(2):
            want = sum(pw[o, c * 2 + m] * dw[c * 2 + m, 0] for m in range(2))
            torch.testing.assert_close(dense[o, c], want)


def test_sobel_is_exactly_rank_one():
    layer = sepconv.SpatialSeparableConv2d(1, 1, 3, depthwise=True, bias=False, padding=1)
    with torch.no_grad():
        layer.factors[0].copy_(torch.tensor([[[1.0, 2.0, 1.0]]]))   # vertical smoothing (3 x 1)
        layer.factors[1].copy_(torch.tensor([[[-1.0, 0.0, 1.0]]]))  # horizontal derivative (1 x 3)
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    torch.testing.assert_close(layer.to_dense().weight[0, 0], sobel_x)
    image = torch.zeros(1, 1, 5, 5)
    image[..., 3:] = 1.0  # vertical edge
    edges = layer(image)[0, 0]
    torch.testing.assert_close(edges, torch.nn.functional.conv2d(image, sobel_x[None, None], padding=1)[0, 0])
    assert edges[2, 2] == 4.0 and edges[2, 0] == 0.0


def test_separable_batchnorm_is_folded_in_eval():
    layer = sepconv.SeparableConv2d(3, 5, 3, stride=2, padding="same", norm="batch", depthwise_bias=True)
    layer.train()
    for _ in range(3):
        layer(torch.randn(8, 3, 9, 9) * 3 + 1)
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 2)
        layer.norm.bias.normal_()
    layer.eval()
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(layer.to_dense()(x), layer(x), atol=1e-5, rtol=1e-5)
    layer.train()
    with pytest.raises(ValueError, match=r"fold only an eval-mode batch norm .* call .eval\(\) first"):
        layer.to_dense()
    relu = sepconv.SeparableConv2d(3, 5, 3, activation="relu")
    with pytest.raises(ValueError, match=r"to_dense\(\) needs a linear layer; this one has activation=ReLU\(\)"):
        relu.to_dense()


def test_norm_and_activation_between_the_steps():
    layer = sepconv.SeparableConv2d(3, 5, 3, padding=1, norm="batch", activation="relu6").eval()
    x = torch.randn(2, 3, 7, 7)
    hidden = F.depthwise_conv(x, layer.depthwise_weight, None, padding=1)
    want = F.pointwise_conv(torch.clamp(layer.norm(hidden), 0, 6), layer.pointwise_weight, layer.bias)
    torch.testing.assert_close(layer(x), want)
    spatial = sepconv.SpatialSeparableConv2d(3, 5, 3, padding="same", stride=2, norm=nn.BatchNorm2d,
                                             activation=nn.ELU).eval()
    step = F.conv(x, spatial.factors[0][:, :, :, None], None, (2, 1), ("same", 0))
    want = F.conv(nn.functional.elu(spatial.norms[0](step)), spatial.factors[1][:, :, None, :], spatial.bias,
                  (1, 2), (0, "same"))
    torch.testing.assert_close(spatial(x), want)


@pytest.mark.parametrize("ours, theirs", [
    (lambda: sepconv.DepthwiseConv2d(4, 3, depth_multiplier=2), lambda: nn.Conv2d(4, 8, 3, groups=4)),
    (lambda: sepconv.PointwiseConv1d(4, 6), lambda: nn.Conv1d(4, 6, 1)),
    (lambda: sepconv.Conv3d(4, 6, 3, padding="same"), lambda: nn.Conv3d(4, 6, 3)),
])
def test_torch_init_matches_pytorch_default(ours, theirs):
    torch.manual_seed(3)
    a = ours()
    torch.manual_seed(3)
    b = theirs()
    torch.testing.assert_close(a.weight, b.weight)
    torch.testing.assert_close(a.bias, b.bias)


def test_keras_init_uses_keras_fans():
    torch.manual_seed(0)
    layer = sepconv.SeparableConv2d(64, 128, 3, depth_multiplier=2, init="keras")
    dw_limit = math.sqrt(6 / (64 * 9 + 2 * 9))   # depthwise kernel (3, 3, 64, 2)
    pw_limit = math.sqrt(6 / (128 + 128))        # pointwise kernel (1, 1, 128, 128)
    for weight, limit in ((layer.depthwise_weight, dw_limit), (layer.pointwise_weight, pw_limit)):
        assert weight.abs().max() <= limit
        assert weight.std().item() == pytest.approx(limit / math.sqrt(3), rel=0.05)
    assert torch.count_nonzero(layer.bias) == 0
    conv = sepconv.Conv2d(16, 32, 3, init="keras")
    assert conv.weight.std().item() == pytest.approx(math.sqrt(6 / (9 * 16 + 9 * 32)) / math.sqrt(3), rel=0.05)


def test_parameter_counts_reference_tutorial():
    # REFERENCE.md, tutorial example: 3x3 conv 3->64 with bias = 1,792 params; depthwise(+bias) then
    # pointwise(+bias) = 30 + 256 = 286; Keras SeparableConv2D(64, 3) on 3 channels = 283 (one bias).
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(sepconv.Conv2d(3, 64, 3)) == 1792
    assert count(sepconv.DepthwiseConv2d(3, 3)) + count(sepconv.PointwiseConv2d(3, 64)) == 286
    assert count(sepconv.SeparableConv2d(3, 64, 3)) == 283


def test_extra_repr_shows_only_non_defaults():
    assert repr(sepconv.DepthwiseConv2d(8, 3)) == "DepthwiseConv2d(8, kernel_size=(3, 3))"
    assert repr(sepconv.DepthwiseConv1d(8, 5, padding="causal", depth_multiplier=2, bias=False, max_norm=1)) == (
        "DepthwiseConv1d(8, kernel_size=(5,), depth_multiplier=2, padding='causal', bias=False, max_norm=1.0)")
    assert repr(sepconv.SeparableConv2d(8, 16, 3, stride=2, padding=((0, 1), (0, 1)))) == (
        "SeparableConv2d(8, 16, kernel_size=(3, 3), stride=(2, 2), padding=((0, 1), (0, 1)))")
    assert repr(sepconv.PointwiseConv2d(8, 16, init="keras")) == "PointwiseConv2d(8, 16, init='keras')"
    assert repr(sepconv.Conv2d(3, 8, 3, stride=2, padding="same")) == (
        "Conv2d(3, 8, kernel_size=(3, 3), stride=(2, 2), padding='same')")


def test_max_norm_matches_keras_maxnorm():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras
    torch.manual_seed(0)
    layer = sepconv.DepthwiseConv2d(3, (4, 1), depth_multiplier=2, max_norm=1.0)  # EEGNet's (C, 1) spatial filter
    with torch.no_grad():
        layer.weight.mul_(5)
        layer.weight[0].mul_(0.01)  # one filter stays inside the ball and must not move
    keras_kernel = layer.to_keras_weights()[0]                     # (4, 1, 3, 2)
    expected = keras.ops.convert_to_numpy(keras.constraints.MaxNorm(1.0, axis=0)(keras_kernel))
    before = layer.weight[0].clone()
    sepconv.apply_constraints(layer)
    np.testing.assert_allclose(layer.to_keras_weights()[0], expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(layer.weight[0], before)
    assert torch.linalg.vector_norm(layer.weight, dim=2).max() <= 1.0 + 1e-6


def test_attach_constraints_projects_after_each_step():
    model = nn.Sequential(sepconv.DepthwiseConv2d(2, 3, max_norm=0.5), nn.Flatten())
    optimizer = torch.optim.SGD(model.parameters(), lr=10.0)
    handle = sepconv.attach_constraints(optimizer, model)
    model(torch.randn(4, 2, 5, 5)).pow(2).sum().neg().backward()  # a huge step away from the ball
    optimizer.step()
    assert torch.linalg.vector_norm(model[0].weight, dim=2).max() <= 0.5 + 1e-6
    handle.remove()
    optimizer.zero_grad()
    model(torch.randn(4, 2, 5, 5)).pow(2).sum().neg().backward()
    optimizer.step()
    assert torch.linalg.vector_norm(model[0].weight, dim=2).max() > 0.5


def test_state_dict_dtype_and_training_step():
    layer = sepconv.SeparableConv2d(4, 8, 3, padding="same", dtype=torch.float64)
    assert set(layer.state_dict()) == {"depthwise_weight", "pointwise_weight", "bias"}
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    clone = sepconv.SeparableConv2d(4, 8, 3, padding="same", dtype=torch.float64)
    clone.load_state_dict(layer.state_dict())
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(clone(x), layer(x))
    layer(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_numpy_integers_are_accepted_as_sizes():
    layer = sepconv.DepthwiseConv2d(np.int64(8), np.int32(3), stride=(np.int64(2), 1), padding=np.int64(1))
    assert layer.in_channels == 8 and type(layer.in_channels) is int and layer.stride == (2, 1)
    assert layer(torch.randn(1, 8, 9, 9)).shape == (1, 8, 5, 9)
    with pytest.raises(ValueError, match=r"in_channels must be a positive int; got np.True_|got True"):
        sepconv.DepthwiseConv2d(np.True_, 3)


def test_conv_repr_shows_init_and_compact_padding():
    assert repr(sepconv.Conv2d(3, 8, 3, init="keras")) == "Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1), init='keras')"
    with pytest.raises(ValueError, match=r"dense_max_norm must be None or a positive number; got 0"):
        sepconv.constraints.check_max_norm(0, "dense_max_norm")
