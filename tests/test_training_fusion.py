"""sepconv.BatchNormAct2d and sepconv.fuse_for_training: batch norm with its activation as one C++ kernel per
direction in training. Checked against ``nn.BatchNorm2d`` then the activation: outputs, gradients of the input and
of the affine parameters, running statistics; and whole models: same state dict keys, same training step."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sepconv
from sepconv import kernels
from sepconv.kernels import cpu

requires_cpu_backend = pytest.mark.skipif(not cpu.available(), reason=f"C++ backend not built: {cpu.failure()}")
ACTIVATIONS = {"none": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| in the 2-norm: robust to the odd element where the activation's kink falls between the two
    sides' roundings."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


RANKS = {2: (nn.BatchNorm2d, sepconv.BatchNormAct2d, torch.channels_last),
         3: (nn.BatchNorm3d, sepconv.BatchNormAct3d, torch.channels_last_3d)}


@requires_cpu_backend
@settings(max_examples=40, deadline=None)
@given(channels=st.integers(2, 40), batch=st.integers(1, 4), size=st.integers(2, 12),
       activation=st.sampled_from(list(ACTIVATIONS)), momentum=st.sampled_from([0.1, 0.01, None]),
       shift=st.floats(-3, 3), rank=st.sampled_from([2, 3]))
def test_batch_norm_act_trains_as_batch_norm_then_activation(channels, batch, size, activation, momentum, shift,
                                                             rank):
    generator = torch.Generator().manual_seed(channels * 13 + size)
    norm_type, fused_type, layout = RANKS[rank]
    x = (torch.randn(batch, channels, *(3,) * (rank - 2), size, size + 1, generator=generator) * 2 + shift)
    x = x.contiguous(memory_format=layout)
    norm = norm_type(channels, eps=1e-3, momentum=momentum)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=generator)
        norm.bias.normal_(0, 0.5, generator=generator)
    reference = nn.Sequential(copy.deepcopy(norm), ACTIVATIONS[activation]())
    fused = fused_type.from_batch_norm(norm, activation)
    assert cpu.supports("batch_norm_act", x, norm.weight, norm.bias, norm.eps, activation)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    grad = torch.randn(x.shape, generator=generator)
    for _ in range(2):  # twice: the running statistics after two updates
        outputs = [model(t) for model, t in zip((fused, reference), xs)]
    for out in outputs:
        out.backward(grad)
    assert relative_error(outputs[0], outputs[1]) < 1e-5
    assert outputs[0].is_contiguous(memory_format=layout)
    assert relative_error(xs[0].grad, xs[1].grad) < 1e-3
    for name in ("weight", "bias"):
        assert relative_error(getattr(fused, name).grad, getattr(reference[0], name).grad) < 1e-3
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(fused, name), getattr(reference[0], name), atol=1e-5, rtol=1e-4)
    assert int(fused.num_batches_tracked) == int(reference[0].num_batches_tracked)
    fused.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), reference(x), atol=1e-4, rtol=1e-4)  # running stats differ by rounding


def test_other_inputs_take_pytorchs_path():
    norm = sepconv.BatchNormAct2d(4, activation="relu6")
    for x in (torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5, dtype=torch.float64)):  # NCHW, float64
        assert not cpu.supports("batch_norm_act", x, norm.weight.to(x.dtype), norm.bias.to(x.dtype), norm.eps, "relu6")
        reference = nn.Sequential(nn.BatchNorm2d(4).to(x.dtype), nn.ReLU6())
        torch.testing.assert_close(norm.to(x.dtype)(x), reference(x))
    norm3d = sepconv.BatchNormAct3d(4, activation="relu")
    x = torch.randn(2, 4, 3, 5, 5)  # NCDHW
    assert not cpu.supports("batch_norm_act", x, norm3d.weight, norm3d.bias, norm3d.eps, "relu")
    torch.testing.assert_close(norm3d(x), nn.Sequential(nn.BatchNorm3d(4), nn.ReLU())(x))
    args = (torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last), norm.weight, norm.bias, 1e-5, "relu")
    with kernels.use_kernels("reference"):
        assert kernels.registry.select("batch_norm_act", args) is kernels.reference.batch_norm_act


def test_activation_errors_name_the_value():
    with pytest.raises(ValueError, match=r"^activation must be one of none, relu, relu6; got 'gelu'$"):
        sepconv.BatchNormAct2d(4, activation="gelu")
    with pytest.raises(TypeError, match=r"^model must be a torch.nn.Module; got int$"):
        sepconv.fuse_for_training(3)


@pytest.fixture
def two_threads():
    """PyTorch's single-thread depthwise weight gradient (oneDNN) rounds far worse than its threaded one (Xception at
    initialisation: 1.3e-4 against 3e-6 of the float64 gradient), which would drown the comparison."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@requires_cpu_backend
@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v1_025", "xception", "digits_cnn", "x3d_xs"])
def test_fused_models_keep_their_state_dict_and_train_the_same(name, two_threads):
    torch.manual_seed(0)
    kwargs = {"digits_cnn": {}, "xception": {"num_classes": 10, "input_size": 71},
              "x3d_xs": {"num_classes": 10, "num_frames": 2, "input_size": 32}}.get(
        name, {"num_classes": 10, "input_size": 64})
    model = sepconv.models.create_model(name, **kwargs)
    layout = torch.channels_last_3d if len(model.input_shape) == 4 else torch.channels_last
    model = model.to(memory_format=layout).train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0  # the same step on every side: no random masks
    fused = sepconv.fuse_for_training(model)
    assert fused is not model and fused.state_dict().keys() == model.state_dict().keys()
    fused_types = (sepconv.BatchNormAct2d, sepconv.BatchNormAct3d)
    assert any(isinstance(m, fused_types) for m in fused.modules())
    assert not any(isinstance(m, fused_types) for m in model.modules()), "the original is unchanged"
    x = torch.randn(4, *model.input_shape).contiguous(memory_format=layout)
    labels = torch.randint(0, 10, (4,))
    exact = copy.deepcopy(model).double()  # the truth both float32 paths approximate
    grads = []
    for candidate, inputs in ((model, x), (fused, x), (exact, x.double())):
        with kernels.use_kernels("reference" if candidate is exact else "auto"):
            nn.functional.cross_entropy(candidate(inputs), labels).backward()
        grads.append(torch.cat([p.grad.flatten() for p in candidate.parameters()]))
    # a deep network at initialisation amplifies float32 rounding; the fused layers may add no more than PyTorch's
    assert relative_error(grads[1], grads[2]) < 2 * relative_error(grads[0], grads[2]) + 1e-5
    for (key, a), b in zip(model.state_dict().items(), fused.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=key)


def test_fuse_for_training_in_place_and_compile():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
    same = sepconv.fuse_for_training(model, inplace=True)
    assert same is model and [type(m).__name__ for m in model] == ["Conv2d", "BatchNormAct2d", "Conv2d",
                                                                    "BatchNormAct2d"]
    assert [m.activation for m in model if isinstance(m, sepconv.BatchNormAct2d)] == ["relu", "none"]
    torch._dynamo.reset()
    x = torch.randn(2, 3, 9, 9).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True)
    torch.testing.assert_close(compiled(x), copy.deepcopy(model)(x), atol=1e-5, rtol=1e-4)
