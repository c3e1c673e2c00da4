"""X3D (``sepconv.models.x3d``): registry, parameter and multiply-add counts against the published ones, the standard
twin's structure, forward/backward, determinism and argument errors.

The published figures are SlowFast's, the X3D authors' release (facebookresearch/SlowFast, MODEL_ZOO.md, "X3D
models"): X3D-XS (4 frames) 3.8M parameters, 0.60 GFLOPs; X3D-S (13 frames) 3.8M, 1.96 GFLOPs; both at 160x160
(configs/Kinetics/X3D_XS.yaml, X3D_S.yaml: TRAIN_CROP_SIZE 160). Their FLOPs count multiply-adds (fvcore's
convention): the counts below, in MACs, land on them.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sepconv
from sepconv.layers import Conv3d, DepthwiseConv3d
from sepconv.models import X3D, create_model, list_models
from sepconv.models.x3d import X3DBlock, SqueezeExcitation

SMALL = (3, 2, 32, 32)  # 2 frames of 32x32: the smallest frames the model takes


def on_meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def blocks(model: X3D) -> list[X3DBlock]:
    return [m for m in model.modules() if isinstance(m, X3DBlock)]


# --- registry and published counts -------------------------------------------------------------------

def test_registry_builds_x3d_xs_and_x3d_s_for_their_clips():
    assert list_models("x3d*") == ["x3d_s", "x3d_xs"]
    xs, s = on_meta("x3d_xs"), on_meta("x3d_s")
    assert type(xs) is X3D and type(s) is X3D and xs.separable
    assert xs.input_shape == (3, 4, 160, 160) and s.input_shape == (3, 13, 160, 160)
    assert count_parameters(xs) == count_parameters(s)  # one network, two clip lengths
    assert on_meta("x3d_s", num_frames=8, input_size=(32, 48)).input_shape == (3, 8, 32, 48)


def test_layout_follows_slowfast_x3d():
    model = on_meta("x3d_xs")
    stages = [getattr(model.features, f"res{index}") for index in range(2, 6)]
    assert [len(stage) for stage in stages] == [3, 5, 11, 7]  # ceil(2.2 * (1, 2, 5, 3))
    assert [stage[0].main.project.conv.out_channels for stage in stages] == [24, 48, 96, 192]
    assert [stage[0].main.expand.conv.out_channels for stage in stages] == [54, 108, 216, 432]  # 2.25x
    for stage in stages:
        assert stage[0].main.spatiotemporal.conv.stride == (1, 2, 2) and stage[0].shortcut is not None
        assert all(block.main.spatiotemporal.conv.stride == (1, 1, 1) and block.shortcut is None
                   for block in stage[1:])
        assert [hasattr(block.main.spatiotemporal, "squeeze") for block in stage] == [i % 2 == 0
                                                                                      for i in range(len(stage))]
    squeezed = [block.main.spatiotemporal.squeeze.gate.reduce.out_channels for block in blocks(model)
                if isinstance(getattr(block.main.spatiotemporal, "squeeze", None), SqueezeExcitation)]
    assert sorted(set(squeezed)) == [8, 16, 32]  # make_divisible(hidden / 16, 8): 54, 108 -> 8; 216 -> 16; 432 -> 32
    stem = model.features.stem
    assert stem.spatial.kernel_size == (1, 3, 3) and stem.spatial.stride == (1, 2, 2)
    assert isinstance(stem.temporal.conv, DepthwiseConv3d) and stem.temporal.conv.kernel_size == (5, 1, 1)
    assert model.features.conv5.conv.out_channels == 432 and model.head.fc.conv.out_channels == 2048
    assert not hasattr(model.head.fc, "norm")  # SlowFast's head: no BN after the 2048-wide layer


def test_parameters_equal_slowfast_model_zoo():
    """MODEL_ZOO.md: 3.8M for X3D-XS and -S (rounded to 0.1M); the exact count pins the build."""
    params = count_parameters(on_meta("x3d_xs"))
    assert params == 3_794_322
    assert round(params / 1e6, 1) == 3.8


def test_twin_adds_exactly_the_dense_kernels():
    """The twin differs only in its channel-wise convolutions: each C-channel kernel of k taps (C * k weights)
    becomes a dense one (C * C * k): the blocks' 3x3x3 and the stem's 5x1x1."""
    separable, standard = on_meta("x3d_xs"), on_meta("x3d_xs", separable=False)
    hidden = [block.main.expand.conv.out_channels for block in blocks(separable)]
    added = sum(c * (c - 1) * 27 for c in hidden) + 24 * 23 * 5
    assert count_parameters(standard) - count_parameters(separable) == added


@pytest.mark.parametrize("name, frames, published_gflops", [("x3d_xs", 4, 0.60), ("x3d_s", 13, 1.96)])
def test_multiply_adds_equal_slowfast_model_zoo(name, frames, published_gflops):
    """One clip of ``frames`` x 160x160, classifier included, counted by ``sepconv.profile``: 605.3 M (X3D-XS) and
    1,962.9 M (X3D-S). Tolerance 1%: the zoo rounds to 10 M (0.8% of X3D-XS's figure), and counters differ on
    small things such as the 1x1x1 layers after the global pool (1.7 M here)."""
    model = create_model(name).eval()
    macs = sepconv.profile(model, (1, 3, frames, 160, 160)).total_macs
    assert macs == pytest.approx(published_gflops * 1e9, rel=0.01)


# --- the standard twin -------------------------------------------------------------------------------

def test_twin_has_the_same_structure_with_dense_channelwise_convolutions():
    separable = dict(on_meta("x3d_xs", num_classes=7).named_modules())
    standard = dict(create_model("x3d_xs", num_classes=7, separable=False).named_modules())
    assert separable.keys() == standard.keys()
    replaced = 0
    for name, module in separable.items():
        twin = standard[name]
        if isinstance(module, DepthwiseConv3d):
            replaced += 1
            assert type(twin) is Conv3d and twin.groups == 1
            assert (twin.in_channels, twin.out_channels) == (module.in_channels, module.out_channels)
            assert (twin.kernel_size, twin.stride, twin.padding) == (module.kernel_size, module.stride,
                                                                     module.padding)
        else:
            assert type(twin) is type(module), name
    assert replaced == 26 + 1  # every block's 3x3x3 and the stem's 5x1x1
    assert not any(isinstance(m, DepthwiseConv3d) for m in standard.values())


# --- running -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("separable", [True, False], ids=["separable", "twin"])
def test_forward_and_backward_on_a_small_clip(separable):
    torch.manual_seed(0)
    model = X3D(num_classes=5, num_frames=2, input_size=32, separable=separable)
    x = torch.randn(2, *SMALL, requires_grad=True)
    y = model(x)
    assert y.shape == (2, 5) and torch.isfinite(y).all()
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    # each block's branch starts switched off (its last BN's scale is zero, as SlowFast initialises it)...
    assert all(block.main.project.norm.weight.abs().sum() == 0 for block in blocks(model))
    # ...and learns: the scale's gradient reaches it
    assert all(block.main.project.norm.weight.grad.abs().sum() > 0 for block in blocks(model))


def test_input_longer_and_larger_than_nominal_is_accepted():
    model = X3D(num_classes=3, num_frames=2, input_size=32).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 5, 40, 36)).shape == (1, 3)


def test_eval_mode_is_deterministic_and_the_seed_fixes_the_weights():
    torch.manual_seed(1)
    first = X3D(num_classes=4, num_frames=2, input_size=32).eval()
    torch.manual_seed(1)
    second = X3D(num_classes=4, num_frames=2, input_size=32).eval()
    x = torch.randn(3, *SMALL)
    with torch.no_grad():
        assert torch.equal(first(x), first(x))
        assert torch.equal(first(x), second(x))


def test_create_model_builds_the_twin():
    model = create_model("x3d_xs", num_classes=4, num_frames=2, input_size=32, separable=False)
    assert isinstance(model, X3D) and not model.separable
    with torch.no_grad():
        assert model.eval()(torch.randn(1, *SMALL)).shape == (1, 4)


def test_expansion_factors_scale_widths_and_depths():
    model = on_meta("x3d_xs", width_factor=1.0, depth_factor=1.0)
    stages = [getattr(model.features, f"res{index}") for index in range(2, 6)]
    assert [len(stage) for stage in stages] == [1, 2, 5, 3]
    assert [stage[0].main.project.conv.out_channels for stage in stages] == [12, 24, 48, 96]
    assert model.features.stem.spatial.out_channels == 12 and model.features.conv5.conv.out_channels == 216


# --- errors ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, message", [
    ({"num_classes": 0}, ValueError, "num_classes must be a positive int; got 0"),
    ({"num_frames": 0}, ValueError, "num_frames must be a positive int; got 0"),
    ({"input_size": 16}, ValueError, r"input_size must be an int or a tuple of 2 ints, each >= 32; got 16"),
    ({"in_channels": 1.5}, ValueError, r"in_channels must be a positive int; got 1.5"),
    ({"width_factor": -1.0}, ValueError, r"width_factor must be a positive finite number; got -1.0"),
    ({"depth_factor": float("inf")}, ValueError, r"depth_factor must be a positive finite number; got inf"),
    ({"dropout": 1.0}, ValueError, r"dropout must be a number in \[0, 1\); got 1.0"),
    ({"separable": "no"}, TypeError, r"separable must be True or False; got 'no'"),
])
def test_argument_errors_name_the_argument_and_the_value(kwargs, error, message):
    with pytest.raises(error, match=f"^{message}$"):
        create_model("x3d_xs", **kwargs)


def test_input_errors_say_what_the_model_takes():
    model = X3D(num_classes=2, num_frames=2, input_size=32)
    with pytest.raises(ValueError, match=r"^X3D needs input of shape \(N, 3, T, H, W\); got \(2, 3, 32, 32\)$"):
        model(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"^X3D needs input of at least 1x32x32; got shape \(1, 3, 2, 16, 32\)$"):
        model(torch.randn(1, 3, 2, 16, 32))
