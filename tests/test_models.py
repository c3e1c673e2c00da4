"""Reference models (``sepconv.models``): registry, parameter counts, forward/backward, constraints, compile,
ONNX and argument errors. Keras itself is the oracle in ``test_models_keras.py``.

Numbers checked here come from REFERENCE.md, the project's shared reference (kept outside this repository;
nothing here reads it, the numbers are written out in the tests): the Keras counts (BN moving statistics count
in Keras' total, not in its trainable count; here they are buffers, so ``parameters()`` gives the trainable
count), the MobileNetV1 paper's parameter counts (Table 4, Table 6 and the 4,209,088 weights of the paper
network) and mult-adds (Tables 1, 4, 6 and 7, counted by ``sepconv.profile``). Other counts are written out
as per-layer formulas.

Counting builds the large models on the meta device: no memory, no initialisation cost.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import sepconv
from sepconv.models import (EEGNet, MobileNetV1, MobileNetV2, VGGCifar, Xception, create_model, list_models,
                            register_model, unregister_model)
from helpers import count_parameters

# --- helpers -----------------------------------------------------------------------------------------


def weights_only(model: nn.Module) -> int:
    """Convolution and classifier weights, without biases and BN: what the MobileNet paper counts."""
    return sum(p.numel() for m in model.modules() if not isinstance(m, nn.BatchNorm2d)
               for name, p in m.named_parameters(recurse=False) if name != "bias")


def on_meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, **kwargs)


def randomise_and_calibrate_(model: nn.Module, x: torch.Tensor, generator: torch.Generator) -> None:
    """Random BN affine parameters and biases; BN running statistics set to those of ``x`` (as after training).

    Fresh Glorot weights with identity BN statistics make the outputs of deep models nearly independent of
    their input; calibrated statistics keep every layer's output normalised, so that an eval-mode comparison
    depends on every parameter.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5, generator=generator)
            elif parameter.ndim == 1:
                parameter.normal_(0, 0.1, generator=generator)
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: after one batch, that batch's statistics
        model.train()(x)
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
    model.eval()


# --- registry ----------------------------------------------------------------------------------------

def test_registry_lists_every_architecture_and_variant():
    names = list_models()
    assert names == sorted(names)
    assert {"eegnet", "mobilenet_v1", "mobilenet_v1_025", "mobilenet_v1_050", "mobilenet_v1_075", "mobilenet_v1_100",
            "mobilenet_v2", "vgg_cifar", "xception", "convnext_k7", "replknet_k31"} <= set(names)
    assert list_models("mobilenet_v1_0*") == ["mobilenet_v1_025", "mobilenet_v1_050", "mobilenet_v1_075"]
    assert list_models("resnet*") == []


@pytest.mark.parametrize("name, cls, alpha", [
    ("mobilenet_v1", MobileNetV1, 1.0), ("mobilenet_v1_100", MobileNetV1, 1.0),
    ("mobilenet_v1_075", MobileNetV1, 0.75), ("mobilenet_v1_050", MobileNetV1, 0.5),
    ("mobilenet_v1_025", MobileNetV1, 0.25), ("mobilenet_v2", MobileNetV2, 1.0)])
def test_create_model_builds_the_registered_class(name, cls, alpha):
    model = on_meta(name, num_classes=10)
    assert type(model) is cls and model.alpha == alpha and model.separable
    assert model.eval()(torch.empty(1, 3, 32, 32, device="meta")).shape == (1, 10)  # shapes only, on meta


def test_contract_names_and_arguments():
    assert isinstance(on_meta("mobilenet_v1", alpha=1.0, num_classes=1000, separable=True), MobileNetV1)
    assert isinstance(on_meta("xception", separable=False), Xception)
    assert isinstance(on_meta("vgg_cifar", num_classes=10), VGGCifar)
    assert on_meta("eegnet", num_classes=2, channels=64, samples=128).input_shape == (1, 64, 128)


def test_variant_refuses_another_value_of_what_it_fixes():
    assert on_meta("mobilenet_v1_075", alpha=0.75).alpha == 0.75  # the same value is allowed
    with pytest.raises(ValueError, match=r"model 'mobilenet_v1_075' fixes alpha=0\.75; got alpha=0\.5"):
        create_model("mobilenet_v1_075", alpha=0.5)


def test_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match=r"unknown model name 'mobilenet_v3'; close matches: 'mobilenet_v2', "
                                         r"'mobilenet_v1', 'mobilenet_v1_100' \(list_models\(\) lists all \d+\)"):
        create_model("mobilenet_v3")
    with pytest.raises(ValueError, match=r"unknown model name 'resnet50'; no close match"):
        create_model("resnet50")
    with pytest.raises(TypeError, match=r"name must be a str; got None"):
        create_model(None)


@pytest.fixture
def registry_names():
    """The names a test registers (it appends them); each is unregistered afterwards, even when the test fails."""
    names = []
    yield names
    for name in names:
        if name in list_models():
            unregister_model(name)


def test_register_model(registry_names):
    registry_names += ["tiny_net", "tiny_net_5"]

    @register_model
    def tiny_net(num_classes=3):
        return nn.Linear(4, num_classes)

    register_model("tiny_net_5", num_classes=5)(tiny_net)
    assert create_model("tiny_net").out_features == 3
    assert create_model("tiny_net_5").out_features == 5
    assert "tiny_net" in list_models("tiny*")
    with pytest.raises(ValueError, match=r"a model named 'tiny_net' is already registered"):
        register_model("tiny_net")(tiny_net)
    with pytest.raises(TypeError, match=r"name must be a non-empty str; got ''"):
        register_model("")


def test_unregister_model(registry_names):
    registry_names.append("tiny_net")
    before = list_models()

    @register_model
    def tiny_net(num_classes=3):
        return nn.Linear(4, num_classes)

    unregister_model("tiny_net")
    assert list_models() == before
    with pytest.raises(ValueError, match=r"^unknown model name 'tiny_net'"):
        create_model("tiny_net")
    register_model(tiny_net)  # the name is free again
    assert create_model("tiny_net").out_features == 3
    with pytest.raises(ValueError, match=r"^no model named 'tiny_net_7' is registered$"):
        unregister_model("tiny_net_7")
    with pytest.raises(TypeError, match=r"^name must be a str; got None$"):
        unregister_model(None)


# --- parameter counts --------------------------------------------------------------------------------

@pytest.mark.parametrize("name, kwargs, trainable, total", [
    ("mobilenet_v1", {}, 4_231_976, 4_253_864),
    ("mobilenet_v1_075", {}, None, 2_601_976),
    ("mobilenet_v1_050", {}, None, 1_342_536),
    ("mobilenet_v1_025", {}, None, 475_544),
    ("mobilenet_v2", {}, 3_504_872, 3_538_984),
    ("xception", {}, 22_855_952, 22_910_480),
    ("eegnet", {"num_classes": 2, "channels": 64, "samples": 128}, 2_258, 2_338),
])
def test_parameter_counts_equal_reference(name, kwargs, trainable, total):
    """REFERENCE.md: Keras' counts (trainable; total with BN moving statistics)."""
    got_trainable, got_total = count_parameters(on_meta(name, **kwargs))
    assert got_total == total
    if trainable is not None:
        assert got_trainable == trainable


def test_mobilenet_v1_weights_equal_the_paper():
    """REFERENCE.md, MobileNetV1: 4,209,088 weights (no bias, no BN, FC included); Table 4 "Conv MobileNet"
    29.3M; Table 6: 4.2 / 2.6 / 1.3 / 0.5 M at alpha 1 / 0.75 / 0.5 / 0.25."""
    assert weights_only(on_meta("mobilenet_v1")) == 4_209_088
    pairs = [(32, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 512), *[(512, 512)] * 5, (512, 1024),
             (1024, 1024)]
    full_conv = 3 * 3 * 3 * 32 + sum(9 * c_in * c_out for c_in, c_out in pairs) + 1024 * 1000
    assert full_conv == 29_281_120
    assert weights_only(on_meta("mobilenet_v1", separable=False)) == full_conv
    for alpha, millions in ((1.0, 4.2), (0.75, 2.6), (0.5, 1.3), (0.25, 0.5)):
        assert round(weights_only(on_meta("mobilenet_v1", alpha=alpha)) / 1e6, 1) == millions


def test_eegnet_counts_by_formula():
    """REFERENCE.md: total 2,208 + 65 N (N classes), 80 of them BN moving statistics; the twin by hand."""
    for classes in (2, 4):
        assert count_parameters(on_meta("eegnet", num_classes=classes)) == (2_128 + 65 * classes, 2_208 + 65 * classes)
    F1, D, F2, C, T, N = 8, 2, 16, 64, 128, 3
    twin = (64 * F1 + 2 * F1            # temporal conv (1, 64), BN
            + C * F1 * F1 * D + 2 * F1 * D  # standard (C, 1) conv F1 -> F1 * D, BN
            + 16 * F1 * D * F2 + 2 * F2     # standard (1, 16) conv F1 * D -> F2, BN
            + F2 * (T // 32) * N + N)       # dense
    assert count_parameters(on_meta("eegnet", num_classes=N, separable=False))[0] == twin


def test_xception_twin_count_by_formula():
    """Each separable 3x3 conv (9 C_in + C_in C_out weights) becomes a standard one (9 C_in C_out)."""
    pairs = [(64, 128), (128, 128), (128, 256), (256, 256), (256, 728), (728, 728), *[(728, 728)] * 24, (728, 728),
             (728, 1024), (1024, 1536), (1536, 2048)]
    separable = sum(9 * c_in + c_in * c_out for c_in, c_out in pairs)
    standard = sum(9 * c_in * c_out for c_in, c_out in pairs)
    assert count_parameters(on_meta("xception", separable=False))[0] == 22_855_952 - separable + standard


@pytest.mark.parametrize("separable, batch_norm, expected", [(False, False, 1_186_378), (True, False, 174_821),
                                                              (True, True, 175_717)])
def test_vgg_cifar_counts_by_formula(separable, batch_norm, expected):
    """Keras SeparableConv2D: 9 C_in + C_in C_out + C_out (one bias); Conv2D: 9 C_in C_out + C_out; with BN no
    conv bias and 2 C_out trainable BN parameters. Dense: 256 * 4 * 4 * 10 + 10."""
    pairs = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256)]
    weights = sum(9 * c_in + c_in * c_out if separable else 9 * c_in * c_out for c_in, c_out in pairs)
    per_channel = sum(2 * c_out if batch_norm else c_out for _, c_out in pairs)
    assert weights + per_channel + 256 * 4 * 4 * 10 + 10 == expected
    model = on_meta("vgg_cifar", num_classes=10, separable=separable, batch_norm=batch_norm)
    assert count_parameters(model)[0] == expected


# --- structure -----------------------------------------------------------------------------------------

def test_mobilenet_v1_layout_as_keras_builds_it():
    model = on_meta("mobilenet_v1")
    depthwise = [m for m in model.modules() if isinstance(m, sepconv.DepthwiseConv2d)]
    assert [m.stride[0] for m in depthwise] == [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1]
    assert all(m.padding == (((0, 1), (0, 1)) if m.stride[0] == 2 else ("same", "same")) for m in depthwise)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 27 and all(m.eps == 1e-3 and m.momentum == 0.01 for m in norms)
    assert sum(isinstance(m, nn.ReLU6) for m in model.modules()) == 27
    biases = [name for name, _ in model.named_parameters() if name.endswith("bias") and ".norm." not in name]
    assert biases == ["head.classifier.bias"]


def test_mobilenet_v2_batch_norm_and_residuals_as_keras():
    model = on_meta("mobilenet_v2")
    assert all(m.eps == 1e-3 and m.momentum == 0.001 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    residual = [block.residual for block in model.features if hasattr(block, "residual")]
    assert residual == [False, False, True, False, True, True, False, True, True, True, False, True, True, False,
                        True, True, False]


def test_mobilenet_v1_accepts_odd_and_non_square_sizes():
    model = create_model("mobilenet_v1_025", num_classes=3, input_size=(33, 47)).eval()
    assert model.input_shape == (3, 33, 47)
    assert model(torch.randn(1, *model.input_shape)).shape == (1, 3)


# --- mult-adds (the cost model of sepconv.profile) ------------------------------------------------------

def mult_adds(name: str, resolution: int = 224, **kwargs) -> int:
    model = create_model(name, init="torch", **kwargs).eval()
    return sepconv.profile(model, (1, 3, resolution, resolution)).total_macs


def test_mobilenet_v1_mult_adds_equal_the_paper():
    """REFERENCE.md, MobileNetV1: 568,740,352 mult-adds (Table 1, FC included); Table 6 (alpha 1 / 0.75 / 0.5 /
    0.25: 569 / 325 / 149 / 41 M); Table 7 (resolution 192 / 160 / 128: 418 / 290 / 186 M; the paper rounds,
    except 290.68, which it truncates, hence "within 1M"); Table 4 "Conv MobileNet": 4,866,269,184 without
    the FC's 1,024,000."""
    assert mult_adds("mobilenet_v1") == 568_740_352
    for alpha, millions in ((0.75, 325), (0.5, 149), (0.25, 41)):
        assert abs(mult_adds("mobilenet_v1", alpha=alpha) / 1e6 - millions) < 1, alpha
    for resolution, millions in ((192, 418), (160, 290), (128, 186)):
        assert abs(mult_adds("mobilenet_v1", resolution) / 1e6 - millions) < 1, resolution
    assert mult_adds("mobilenet_v1", separable=False) == 4_866_269_184 + 1024 * 1000


# --- forward and backward ------------------------------------------------------------------------------

ARCHITECTURES = [  # the smallest inputs each accepts, narrow widths where the architecture has a multiplier
    ("mobilenet_v1", {"alpha": 0.25}, (3, 32, 32)),
    ("mobilenet_v2", {"alpha": 0.35}, (3, 32, 32)),
    ("xception", {}, (3, 71, 71)),
    ("eegnet", {"channels": 8, "samples": 64}, (1, 8, 64)),
    ("vgg_cifar", {"batch_norm": True, "dropout": 0.2}, (3, 32, 32)),
    ("convnext_k7", {"widths": (8, 16), "depths": (1, 1)}, (3, 8, 8)),
    ("replknet_k31", {"widths": (8, 16), "depths": (1, 1)}, (3, 8, 8)),
]


@pytest.mark.parametrize("separable", [True, False], ids=["separable", "twin"])
@pytest.mark.parametrize("name, kwargs, shape", ARCHITECTURES, ids=[a[0] for a in ARCHITECTURES])
def test_forward_and_backward(name, kwargs, shape, separable):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, separable=separable, **kwargs)
    x = torch.randn(2, *shape, requires_grad=True)
    y = model(x)
    assert y.shape == (2, 5) and torch.isfinite(y).all()
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for parameter_name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), parameter_name


def test_twin_replaces_every_separable_convolution():
    for name, kwargs, _ in ARCHITECTURES:
        model = on_meta(name, separable=False, **kwargs)
        separable_layers = (sepconv.DepthwiseConv2d, sepconv.SeparableConv2d)
        assert not any(isinstance(m, separable_layers) for m in model.modules()), name


# --- constraints ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("separable", [True, False], ids=["separable", "twin"])
def test_eegnet_max_norms(separable):
    """Depthwise (or its twin): norm over the electrode axis <= 1; dense: each unit's incoming weights <= 0.25."""
    torch.manual_seed(0)
    model = EEGNet(num_classes=3, separable=separable)
    spatial = model.features.block1.spatial.conv
    dense = model.head.classifier
    with torch.no_grad():
        spatial.weight.mul_(10)
        dense.weight.mul_(10)
    sepconv.apply_constraints(model)
    assert torch.linalg.vector_norm(spatial.weight, dim=2).max() <= 1 + 1e-6
    assert torch.linalg.vector_norm(dense.weight, dim=1).max() <= 0.25 + 1e-6
    assert torch.linalg.vector_norm(dense.weight, dim=1).min() > 0.25 - 1e-6  # all were above: all projected
    unconstrained = EEGNet(num_classes=3, separable=separable, depthwise_max_norm=None, dense_max_norm=None)
    assert unconstrained.head.classifier.max_norm is None
    assert unconstrained.features.block1.spatial.conv.max_norm is None


# --- compilation and export ------------------------------------------------------------------------------

def test_torch_compile_eegnet():
    """aot_eager: dynamo captures the whole model in one graph, forward and backward equal eager. (Inductor also
    compiles it, but costs ~23 s on 2 cores; aot_eager ~3 s.)"""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = EEGNet(num_classes=3, channels=16, samples=64, dropout=0.0)
    x = torch.randn(4, 1, 16, 64)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    y_eager = model(x)
    y_eager.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    y_compiled = compiled(x)
    y_compiled.sum().backward()
    torch.testing.assert_close(y_compiled, y_eager)
    for compiled_grad, eager_grad in zip((p.grad for p in model.parameters()), eager_grads):
        torch.testing.assert_close(compiled_grad, eager_grad)
    torch._dynamo.reset()


def test_jit_trace_xception():
    """Tracing records the 'same' max-pool padding of the traced size: (0, 1) at 74x74 (an even size)."""
    torch.manual_seed(0)
    model = Xception(num_classes=3).eval()
    x = torch.randn(1, 3, 74, 74)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings (the shape checks become constants); trace is deprecated
        traced = torch.jit.trace(model, x)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")  # raised inside torch.onnx
def test_onnx_export_runs_in_onnxruntime():
    """MobileNetV1 (alpha 0.25) in eval mode: depthwise, pointwise, asymmetric ((0, 1), (0, 1)) padding, ReLU6."""
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = create_model("mobilenet_v1_025", num_classes=7).eval()
    randomise_and_calibrate_(model, torch.randn(8, 3, 64, 64), torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 64, 64)
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    buffer = io.BytesIO(program.model_proto.SerializeToString())
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(expected[0] - expected[1]).max() > 0.1  # the output depends on the input
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


# --- errors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, kwargs, error, match", [
    ("mobilenet_v1", {"alpha": 0}, ValueError, r"alpha must be a positive finite number; got 0"),
    ("mobilenet_v1", {"alpha": -0.5}, ValueError, r"alpha must be a positive finite number; got -0\.5"),
    ("mobilenet_v1", {"alpha": 0.02}, ValueError, r"alpha must be at least 1/32 .*; got 0\.02"),
    ("mobilenet_v2", {"alpha": float("inf")}, ValueError, r"alpha must be a positive finite number; got inf"),
    ("mobilenet_v1", {"input_size": 31}, ValueError,
     r"input_size must be an int or a tuple of 2 ints, each >= 32; got 31"),
    ("mobilenet_v2", {"input_size": (224, 16)}, ValueError, r"input_size .* each >= 32; got \(224, 16\)"),
    ("xception", {"input_size": 70}, ValueError, r"input_size must be .* each >= 71; got 70"),
    ("vgg_cifar", {"input_size": 4}, ValueError, r"input_size must be .* each >= 8; got 4"),
    ("mobilenet_v1", {"dropout": 1.0}, ValueError, r"dropout must be a number in \[0, 1\); got 1\.0"),
    ("mobilenet_v1", {"num_classes": 0}, ValueError, r"num_classes must be a positive int; got 0"),
    ("xception", {"in_channels": 2.0}, ValueError, r"in_channels must be a positive int; got 2\.0"),
    ("mobilenet_v1", {"depth_multiplier": 0}, ValueError, r"depth_multiplier must be a positive int; got 0"),
    ("vgg_cifar", {"separable": "yes"}, TypeError, r"separable must be True or False; got 'yes'"),
    ("vgg_cifar", {"batch_norm": 1}, TypeError, r"batch_norm must be True or False; got 1"),
    ("xception", {"init": "he"}, ValueError, r"init must be one of \('torch', 'keras'\); got 'he'"),
    ("eegnet", {"samples": 31}, ValueError, r"samples must be at least 32 .*; got 31"),
    ("eegnet", {"F1": 0}, ValueError, r"F1 must be a positive int; got 0"),
    ("eegnet", {"dropout_type": "alpha"}, ValueError,
     r"dropout_type must be one of \('dropout', 'spatial'\); got 'alpha'"),
    ("eegnet", {"dense_max_norm": -1}, ValueError, r"dense_max_norm must be a positive finite number; got -1"),
    ("convnext_k7", {"widths": (8, 16), "depths": (1,)}, ValueError,
     r"widths and depths must have one entry per stage; got 2 widths \(8, 16\) and 1 depths \(1,\)"),
    ("replknet_k31", {"depths": (1, 0)}, ValueError,
     r"depths must be a non-empty sequence of positive ints; got \(1, 0\)"),
    ("convnext_k7", {"input_size": 15}, ValueError, r"input_size must be .* each >= 16; got 15"),
    ("mobilenet_v1", {"resolution": 224}, TypeError, r"unexpected keyword argument 'resolution'"),
])
def test_argument_errors(name, kwargs, error, match):
    with pytest.raises(error, match=match):
        on_meta(name, **kwargs)


@pytest.mark.parametrize("name, kwargs, shape, match", [
    ("mobilenet_v1_025", {}, (1, 3, 31, 64), r"MobileNetV1 needs input of at least 32x32; got shape \(1, 3, 31, 64\)"),
    ("xception", {}, (1, 3, 70, 70), r"Xception needs input of at least 71x71; got shape \(1, 3, 70, 70\)"),
    ("mobilenet_v2", {}, (1, 1, 64, 64), r"MobileNetV2 needs input of shape \(N, 3, H, W\); got \(1, 1, 64, 64\)"),
    ("mobilenet_v2", {}, (3, 64, 64), r"MobileNetV2 needs input of shape \(N, 3, H, W\); got \(3, 64, 64\)"),
    ("eegnet", {"channels": 8, "samples": 64}, (1, 1, 8, 65),
     r"EEGNet was built for input of shape \(N, 1, 8, 64\) .*; got \(1, 1, 8, 65\)"),
    ("vgg_cifar", {}, (1, 3, 64, 64), r"VGGCifar was built for input of shape \(N, 3, 32, 32\)"),
])
def test_input_errors(name, kwargs, shape, match):
    model = create_model(name, **kwargs)
    with pytest.raises(ValueError, match=match):
        model(torch.randn(shape))
