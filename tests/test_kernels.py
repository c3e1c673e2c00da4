"""The C++ CPU backend against its PyTorch twin, the ``torch.ops.sepconv`` operators, and the backend registry.

The reference backend (PyTorch's own convolution) is the oracle here; it is itself checked against an
independent dense reference in test_functional.py. Compared: outputs, gradients of input, weight and bias,
and the output's memory layout, over hypothesis-drawn geometries (1-D and 2-D, strides, dilations, every
padding mode, asymmetric padding, depth multipliers, contiguous and channels-last inputs; 3-D too), float32 and
float64; bfloat16 (and autocast) against float32 on the same values.

The extension is built once per machine (about 40 s on 2 cores) and cached in PyTorch's extensions directory;
the first test that needs it pays for the build, later modules and runs load it in well under a second.
"""

import threading
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sepconv
import sepconv.functional as F
from helpers import geometry_case
from sepconv import kernels
from sepconv.kernels import cpu, ops, reference, registry

# float32: gradients of the weight sum up to thousands of products, summed in a different order by each side.
TOLERANCE = {torch.float64: {"atol": 1e-10, "rtol": 1e-9}, torch.float32: {"atol": 3e-4, "rtol": 1e-3}}

# torch's own helpers (opcheck, torch.func) script functions internally; the deprecation is theirs
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
requires_cpu_backend = pytest.mark.skipif(not cpu.available(), reason=f"C++ backend not built: {cpu.failure()}")


@pytest.fixture(autouse=True)
def _restore_mode():
    yield
    kernels.set_kernels(None)
    kernels.clear_choices()


def _strides_like(a, b):
    """Same strides wherever a dimension has more than one element (PyTorch's notion of the same layout)."""
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def compare_backends(x, w, b, case, seed=0):
    """The functional op on the C++ backend equals it on the reference: outputs, layout, gradients."""
    tolerance = TOLERANCE[x.dtype]
    args = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"],
                padding_mode=case["padding_mode"])
    calls = cpu.kernel_calls()
    with kernels.use_kernels("cpu"):
        out = F.depthwise_conv(x, w, b, **args)
    assert cpu.kernel_calls() > calls, "the C++ kernel did not run"
    with kernels.use_kernels("reference"):
        ref = F.depthwise_conv(x, w, b, **args)
    assert out.shape == ref.shape
    if x.ndim == 4:
        assert _strides_like(out, ref), (out.stride(), ref.stride())
    torch.testing.assert_close(out, ref, **tolerance)
    grad = torch.randn(ref.shape, dtype=ref.dtype, generator=torch.Generator().manual_seed(seed))
    leaves = [t for t in (x, w, b) if t is not None]
    with kernels.use_kernels("cpu"):
        got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(ref, leaves, grad)
    for name, a, e in zip(("x", "weight", "bias"), got, want):
        allowed = dict(tolerance)
        if name != "x" and x.dtype == torch.float32:  # a sum over every output pixel, in another order than PyTorch's
            allowed["atol"] = max(allowed["atol"], 1e-7 * ref[:, :1].numel())
        torch.testing.assert_close(a, e, **allowed, msg=lambda m, name=name: f"grad of {name}: {m}")


def make(shape, dtype, channels_last=False, seed=0):
    t = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    if channels_last:
        t = t.to(memory_format=torch.channels_last) if t.ndim == 4 else t.transpose(1, 2).contiguous().transpose(1, 2)
    return t.requires_grad_()


# --- the kernels against the reference -------------------------------------------------------------

@requires_cpu_backend
@given(case=geometry_case(rank=None, max_kernel=5).filter(lambda c: len(c["size"]) < 3),
       channels=st.integers(1, 20), multiplier=st.integers(1, 3), batch=st.integers(1, 3), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]), channels_last=st.booleans())
def test_cpu_backend_equals_reference(case, channels, multiplier, batch, bias, dtype, channels_last):
    x = make((batch, channels, *case["size"]), dtype, channels_last)
    w = make((channels * multiplier, 1, *case["kernel"]), dtype, seed=1)
    b = make((channels * multiplier,), dtype, seed=2) if bias else None
    compare_backends(x, w, b, case)


@requires_cpu_backend
@given(case=geometry_case(rank=3, max_kernel=3), channels=st.integers(1, 20), multiplier=st.integers(1, 3),
       batch=st.integers(1, 2), bias=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]),
       channels_last=st.booleans())
def test_cpu_backend_equals_reference_3d(case, channels, multiplier, batch, bias, dtype, channels_last):
    x = make((batch, channels, *case["size"]), dtype)
    if channels_last:
        x = x.detach().contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    w = make((channels * multiplier, 1, *case["kernel"]), dtype, seed=1)
    b = make((channels * multiplier,), dtype, seed=2) if bias else None
    compare_backends(x, w, b, case)


@requires_cpu_backend
@pytest.mark.parametrize("channels_last", [False, True])
def test_3d_output_keeps_the_input_layout(channels_last):
    """As PyTorch's float32 convolutions do: channels_last_3d in, channels_last_3d out; NCDHW in, NCDHW out."""
    x = torch.randn(2, 16, 4, 6, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    with kernels.use_kernels("cpu"):
        out = F.depthwise_conv(x, torch.randn(16, 1, 3, 3, 3), padding=1)
    with kernels.use_kernels("reference"):
        ref = F.depthwise_conv(x, torch.randn(16, 1, 3, 3, 3), padding=1)
    assert out.is_contiguous(memory_format=torch.channels_last_3d) == channels_last
    assert _strides_like(out, ref)


BF16 = 1e-2  # bf16 results within 1 % of their scale of float32's on the same values (kernels accumulate in float)


def assert_scaled_close(got, want, relative=BF16, what="output"):
    scale = want.abs().max().clamp_min(1e-6)
    assert (got.float() - want).abs().max() <= relative * scale, f"{what}: off by more than {relative} of {scale}"


@requires_cpu_backend
@given(case=geometry_case(rank=None, max_kernel=5).filter(lambda c: len(c["size"]) < 3),
       channels=st.integers(1, 20), multiplier=st.integers(1, 2), channels_last=st.booleans())
def test_bf16_kernels_with_gradients_equal_float32_on_the_same_values(case, channels, multiplier, channels_last):
    """bf16 storage, float32 arithmetic: forward, input and weight gradients against float32 on bf16's values.
    Zero padding only: other modes pad first, and PyTorch's pad backward sums the border's gradients in bf16."""
    case = dict(case, padding_mode="zeros")
    x = make((2, channels, *case["size"]), torch.float32, channels_last).detach().bfloat16().requires_grad_()
    w = make((channels * multiplier, 1, *case["kernel"]), torch.float32, seed=1).detach().bfloat16().requires_grad_()
    args = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"],
                padding_mode=case["padding_mode"])
    wide = [t.detach().float().requires_grad_() for t in (x, w)]
    calls = cpu.kernel_calls()
    with kernels.use_kernels("cpu"):
        out = F.depthwise_conv(x, w, **args)
        grads = torch.autograd.grad(out, (x, w), torch.ones_like(out))
    assert cpu.kernel_calls() > calls and out.dtype == torch.bfloat16
    with kernels.use_kernels("reference"):
        ref = F.depthwise_conv(*wide, **args)
        ref_grads = torch.autograd.grad(ref, wide, torch.ones_like(ref))
    assert_scaled_close(out, ref)
    for name, got, want in zip(("x", "weight"), grads, ref_grads):
        assert got.dtype == torch.bfloat16
        assert_scaled_close(got, want, what=f"grad of {name}")


@requires_cpu_backend
@pytest.mark.parametrize("channels_last", [False, True])
def test_autocast_runs_the_kernels_in_bf16_with_float32_gradients(channels_last):
    layer = sepconv.layers.SeparableConv2d(24, 32, 3, padding="same", depth_multiplier=1)
    x = make((2, 24, 14, 14), torch.float32, channels_last)
    ref = layer(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), (x, layer.depthwise_weight))
    calls = cpu.kernel_calls()
    with kernels.use_kernels("cpu"), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16 and cpu.kernel_calls() > calls
    grads = torch.autograd.grad(out.float().square().sum(), (x, layer.depthwise_weight))
    assert all(g.dtype == torch.float32 for g in grads)  # the parameters' own dtype
    assert_scaled_close(out, ref, relative=2e-2)
    for name, got, want in zip(("x", "depthwise weight"), grads, ref_grads):
        assert_scaled_close(got, want, relative=3e-2, what=f"grad of {name}")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the operator itself, through the dispatcher's rule
        assert ops.depthwise_conv(x, layer.depthwise_weight, None, [1, 1], [1, 1, 1, 1], [1, 1]).dtype == torch.bfloat16


@requires_cpu_backend
def test_autocast_trains_a_whole_model_as_pytorch_does():
    """Defect: under autocast the depthwise layer after a PyTorch convolution got bf16 input with its float32 weight
    and refused it ("x dtype torch.bfloat16 does not match the weight dtype torch.float32"). The twin is PyTorch
    under autocast (bf16 moves a random network's logits by some 20 % of their scale either way)."""
    model = sepconv.models.create_model("mobilenet_v2", num_classes=10).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 64, 64).to(memory_format=torch.channels_last)
    labels = torch.arange(4)
    losses, grads = [], []
    for mode in ("cpu", "reference"):
        calls = cpu.kernel_calls()
        with kernels.use_kernels(mode), torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), labels)
        assert (cpu.kernel_calls() > calls) == (mode == "cpu")
        losses.append(loss.float())
        grads.append(torch.autograd.grad(loss, model.parameters()))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-2, atol=0)
    assert all(g.dtype == torch.float32 for g in grads[0])
    flat = [torch.cat([g.flatten() for g in gs]) for gs in grads]
    assert torch.nn.functional.cosine_similarity(flat[0], flat[1], dim=0) > 0.99


@requires_cpu_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("channels, size, kernel, stride, padding, dilation, multiplier", [
    (32, (19, 37), (3, 3), (1, 1), "same", (1, 1), 1),      # register-blocked 3-wide rows, ragged ends
    (24, (17, 40), (5, 5), (2, 2), "same", (1, 1), 1),      # stride-2 blocks, a partial channel vector
    (48, (12, 35), (7, 7), (1, 1), ((3, 3), (3, 3)), (1, 1), 1),
    (16, (9, 44), (3, 11), (1, 1), "same", (1, 1), 1),       # chunked taps (8 + 3), padded row ends
    (40, (7, 7), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 1),  # small planes: the transposed route
    (16, (13, 30), (3, 3), (1, 3), "same", (2, 2), 1),       # dilated and stride 3: the generic loops
    (3, (10, 50), (1, 9), (1, 1), "same", (1, 1), 4),        # depth multiplier on the planar kernels
    (64, (3, 70), (1, 31), (1, 1), "same", (1, 1), 1),       # a wide kernel, padded rows
    (32, (300, 300), (3, 3), (1, 1), "same", (1, 1), 1),     # an output past the caches: non-temporal stores
])
def test_cpu_backend_equals_reference_wide(dtype, channels_last, channels, size, kernel, stride, padding, dilation,
                                           multiplier):
    x = make((2, channels, *size), dtype, channels_last)
    w = make((channels * multiplier, 1, *kernel), dtype, seed=1)
    b = make((channels * multiplier,), dtype, seed=2)
    compare_backends(x, w, b, dict(stride=stride, padding=padding, dilation=dilation, padding_mode="zeros"))


@requires_cpu_backend
@pytest.mark.parametrize("nlc", [False, True])
@pytest.mark.parametrize("kernel, padding, mode", [(4, "causal", "zeros"), (64, "same", "zeros"),
                                                   (5, ((2, 3),), "reflect"), (3, 1, "circular")])
def test_cpu_backend_equals_reference_1d(nlc, kernel, padding, mode):
    x = make((3, 24, 150), torch.float32, channels_last=nlc)
    w = make((24, 1, kernel), torch.float32, seed=1)
    compare_backends(x, w, None, dict(stride=(1,), padding=padding, dilation=(1,), padding_mode=mode))


@requires_cpu_backend
def test_standard_conv_with_one_input_channel_runs_the_depthwise_kernels():
    """EEGNet's first layer, Conv2d(1, F1, (1, 64)), is a depthwise convolution with multiplier F1."""
    layer = sepconv.Conv2d(1, 8, (1, 64), padding="same", bias=False)
    x = torch.randn(4, 1, 22, 250, requires_grad=True)
    calls = cpu.kernel_calls()
    with kernels.use_kernels("cpu"):
        out = layer(x)
        out.square().sum().backward()
    assert cpu.kernel_calls() == calls + 3  # forward, input gradient, weight gradient
    x_ref = x.detach().requires_grad_()
    layer_ref = sepconv.Conv2d(1, 8, (1, 64), padding="same", bias=False)
    layer_ref.load_state_dict(layer.state_dict())
    with kernels.use_kernels("reference"):
        ref = layer_ref(x_ref)
        ref.square().sum().backward()
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.float32])
    torch.testing.assert_close(x.grad, x_ref.grad, **TOLERANCE[torch.float32])
    torch.testing.assert_close(layer.weight.grad, layer_ref.weight.grad, atol=1e-3, rtol=1e-3)


# --- the operators -------------------------------------------------------------------------------------

def _op_samples():
    """(op, args) for each operator, 1-D and 2-D, contiguous and channels-last, with and without gradients."""
    samples = []
    for channels_last, rank in ((False, 2), (True, 2), (False, 1), (True, 1), (False, 3), (True, 3)):
        size, kernel, stride, padding, dilation = {
            2: ((9, 11), (3, 2), [2, 1], [1, 0, 0, 1], [1, 2]), 1: ((13,), (4,), [2], [3, 0], [1]),
            3: ((5, 6, 7), (3, 2, 3), [2, 1, 2], [1, 0, 0, 1, 2, 1], [1, 2, 1])}[rank]
        # the channels-last kernels want channels; 3-D channels-last with a depth multiplier (2), NCDHW without
        channels = 8 if (channels_last and rank == 1) or (rank == 3 and not channels_last) else 4
        x = make((2, channels, *size), torch.float64, channels_last and rank != 3)
        if channels_last and rank == 3:
            x = x.detach().contiguous(memory_format=torch.channels_last_3d).requires_grad_()
        w = make((8, 1, *kernel), torch.float64, seed=1)
        b = make((8,), torch.float64, seed=2)
        out = ops.depthwise_conv(x.detach(), w.detach(), None, stride, padding, dilation)
        dy = make(tuple(out.shape), torch.float64, channels_last and rank != 3, seed=3)
        if channels_last and rank == 3:
            dy = dy.detach().contiguous(memory_format=torch.channels_last_3d)
        samples += [(ops.depthwise_conv, (x, w, b, stride, padding, dilation)),
                    (ops.depthwise_conv, (x.detach(), w.detach(), None, stride, padding, dilation)),
                    (ops.depthwise_conv_input_grad, (dy, w, list(x.shape), stride, padding, dilation)),
                    (ops.depthwise_conv_weight_grad, (x, dy, list(w.shape), stride, padding, dilation))]
    bf16 = [(op, tuple(t.detach().bfloat16().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
                       for t in args)) for op, args in samples[:4] + samples[8:12]]  # 2-D and 1-D, contiguous
    return samples + bf16


@requires_cpu_backend
@pytest.mark.parametrize("index", range(32))
def test_opcheck(index):
    op, args = _op_samples()[index]
    torch.library.opcheck(op, args)


@requires_cpu_backend
def test_gradcheck_and_gradgradcheck_float64():
    for op, args in _op_samples():
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if tensors[0].dtype != torch.float64 or not any(t.requires_grad for t in tensors):
            continue

        def call(*inputs, op=op, args=args):
            it = iter(inputs)
            return op(*[next(it) if isinstance(a, torch.Tensor) else a for a in args])

        assert torch.autograd.gradcheck(call, tensors)
        assert torch.autograd.gradgradcheck(call, tensors)


# --- inside compiled and exported graphs -------------------------------------------------------------------

@requires_cpu_backend
@pytest.mark.parametrize("channels_last", [False, True])
def test_compile_fullgraph_runs_the_cpu_kernels_inside_the_graph(channels_last):
    torch._dynamo.reset()
    layer = sepconv.SeparableConv2d(16, 24, 5, stride=2, padding="same")  # auto leaves 3x3 to inductor
    x = make((2, 16, 15, 15), torch.float32, channels_last)
    compiled = torch.compile(layer, fullgraph=True)
    calls = cpu.kernel_calls()
    out = compiled(x)
    out.sum().backward()
    assert cpu.kernel_calls() >= calls + 3, "forward, input and weight gradient ran on the C++ kernels"
    with kernels.use_kernels("reference"):
        ref = layer(x.detach())
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.float32])


@requires_cpu_backend
@pytest.mark.parametrize("mode, kernels_run", [("auto", False), ("cpu", True)])
def test_compiled_graphs_leave_3x3_depthwise_to_inductor_in_auto_mode(mode, kernels_run):
    torch._dynamo.reset()
    kernels.set_kernels(mode)
    layer = sepconv.DepthwiseConv2d(16, 3, padding="same")
    x = make((2, 16, 12, 12), torch.float32, True)
    calls = cpu.kernel_calls()
    out = torch.compile(layer, fullgraph=True)(x)
    assert (cpu.kernel_calls() > calls) == kernels_run
    with kernels.use_kernels("reference"):
        torch.testing.assert_close(out, layer(x), **TOLERANCE[torch.float32])


@requires_cpu_backend
def test_export_records_one_sepconv_op():
    layer = sepconv.DepthwiseConv2d(8, 5, padding="same").eval()
    with kernels.use_kernels("cpu"):
        program = torch.export.export(layer, (torch.randn(2, 8, 20, 20),))
    targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert ops.depthwise_conv in targets
    x = torch.randn(2, 8, 20, 20)
    torch.testing.assert_close(program.module()(x), layer(x), **TOLERANCE[torch.float32])


# --- the registry ------------------------------------------------------------------------------------

@requires_cpu_backend
def test_auto_measures_once_per_signature_and_keeps_its_choice():
    kernels.set_kernels("auto")
    x, w = torch.randn(2, 16, 12, 12), torch.randn(16, 1, 5, 5)
    F.depthwise_conv(x, w, padding=2)
    assert len(kernels.choices()) == 1
    [choice] = kernels.choices().values()
    assert choice in ("cpu", "reference")
    F.depthwise_conv(x, w, padding=2)
    assert len(kernels.choices()) == 1
    F.depthwise_conv(x.requires_grad_(), w, padding=2)  # wanting gradients is another signature
    assert len(kernels.choices()) == 2


def test_reference_mode_never_touches_the_backends(monkeypatch):
    monkeypatch.setattr(cpu, "depthwise_conv", lambda *args: pytest.fail("the cpu backend ran"))
    with kernels.use_kernels("reference"):
        F.depthwise_conv(torch.randn(1, 4, 8, 8), torch.randn(4, 1, 3, 3), padding=1)


@requires_cpu_backend
def test_inputs_the_backend_does_not_cover_take_the_reference(monkeypatch):
    monkeypatch.setattr(cpu, "depthwise_conv", lambda *args: pytest.fail("the cpu backend ran"))
    with kernels.use_kernels("cpu"):
        F.depthwise_conv(torch.randn(1, 4, 8, 8).half(), torch.randn(4, 1, 3, 3).half(), padding=1)
        from torch.autograd import forward_ad
        with forward_ad.dual_level():
            x = forward_ad.make_dual(torch.randn(1, 4, 8, 8), torch.ones(1, 4, 8, 8))
            out = F.depthwise_conv(x, torch.ones(4, 1, 3, 3), padding=1)
            assert forward_ad.unpack_dual(out).tangent is not None


@requires_cpu_backend
def test_functorch_transforms_go_through_the_ops():
    x, w = torch.randn(3, 2, 4, 9, 9, dtype=torch.float64), torch.randn(4, 1, 3, 3, dtype=torch.float64)
    with kernels.use_kernels("cpu"):
        batched = torch.func.vmap(lambda x: F.depthwise_conv(x, w, padding=1))(x)
        grad_w = torch.func.grad(lambda w: F.depthwise_conv(x[0], w, padding=1).square().sum())(w)
    with kernels.use_kernels("reference"):
        torch.testing.assert_close(batched, torch.stack([F.depthwise_conv(xi, w, padding=1) for xi in x]))
        w_ref = w.clone().requires_grad_()
        F.depthwise_conv(x[0], w_ref, padding=1).square().sum().backward()
    torch.testing.assert_close(grad_w, w_ref.grad)


@requires_cpu_backend
def test_two_threads_calling_at_once():
    x, w = torch.randn(2, 32, 30, 30), torch.randn(32, 1, 3, 3)
    with kernels.use_kernels("reference"):
        want = F.depthwise_conv(x, w, padding=1)
    kernels.set_kernels("auto")
    results, errors = [], []

    def work():
        try:
            for _ in range(5):
                results.append(F.depthwise_conv(x, w, padding=1))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(results) == 10 and len(kernels.choices()) == 1
    for out in results:
        torch.testing.assert_close(out, want, **TOLERANCE[torch.float32])


def test_a_failed_build_warns_once_and_falls_back_to_the_reference():
    def no_compiler():
        raise RuntimeError("Error building extension 'sepconv_cpu': c++: command not found")

    before = cpu.failure()
    kernels.set_kernels("auto")
    x, w = torch.randn(1, 4, 8, 8), torch.randn(4, 1, 3, 3)
    with cpu.simulated_build(no_compiler):
        kernels.clear_choices()  # what "auto" chose with the real build
        try:
            with pytest.warns(RuntimeWarning,
                              match=r"could not be built \(.*command not found\).*Install a C\+\+ compiler"):
                out = F.depthwise_conv(x, w, padding=1)
            assert cpu.failure() == "Error building extension 'sepconv_cpu': c++: command not found"
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                F.depthwise_conv(x, w, padding=1)  # once only
            torch.testing.assert_close(out, reference.conv(x, w, None, F._geometry(x, (3, 3), 1, 1, 1, "zeros"), 4,
                                                           "zeros"))
            assert kernels.choices() and set(kernels.choices().values()) == {"reference"}
        finally:
            kernels.clear_choices()  # made without the real build
    assert cpu.failure() == before


def test_mode_errors_name_the_value_and_the_source(monkeypatch):
    with pytest.raises(ValueError, match=r"^kernels mode must be one of 'reference', 'auto', 'cpu'; got 'numba'$"):
        kernels.set_kernels("numba")
    monkeypatch.setenv("SEPCONV_KERNELS", "bogus")
    kernels.set_kernels(None)
    with pytest.raises(ValueError, match=r"^the environment variable SEPCONV_KERNELS must be one of .*; got 'bogus'$"):
        F.depthwise_conv(torch.randn(1, 2, 5, 5), torch.randn(2, 1, 3, 3))
    monkeypatch.setenv("SEPCONV_KERNELS", "Reference ")
    kernels.set_kernels(None)
    assert kernels.get_kernels() == "reference"


def test_registering_a_backend():
    class Doubling:
        NAME = "doubling"

        @staticmethod
        def available():
            return True

        @staticmethod
        def supports(op, x, *rest):
            return op == "depthwise_conv" and x.ndim == 4

        @staticmethod
        def depthwise_conv(x, weight, bias, geometry, padding_mode):
            return 2 * reference.depthwise_conv(x, weight, bias, geometry, padding_mode)

    kernels.register_backend(Doubling)
    try:
        x, w = torch.randn(1, 3, 6, 6), torch.randn(3, 1, 3, 3)
        with kernels.use_kernels("doubling"):
            out = F.depthwise_conv(x, w)
        torch.testing.assert_close(out, 2 * F.conv(x, w, groups=3))
        with pytest.raises(ValueError, match="reserved"):
            kernels.register_backend(type("Bad", (), {"NAME": "auto"}))
    finally:
        registry._backends.pop("doubling")


def test_cli_names_a_bad_kernels_mode_before_any_work(monkeypatch, tmp_path, capsys):
    from sepconv import cli
    monkeypatch.setenv("SEPCONV_KERNELS", "bogus")
    kernels.set_kernels(None)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compare", "--epochs", "1", "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SEPCONV_KERNELS must be one of 'reference', 'auto', 'cpu'; got 'bogus'" in err[0]
    assert "does not fit" not in err[0] and not (tmp_path / "run").exists()


@requires_cpu_backend
def test_large_outputs_come_from_a_pool_that_never_hands_out_live_memory():
    cpu.release_memory()
    x = torch.randn(1, 64, 136, 128).contiguous(memory_format=torch.channels_last)  # a 4.25 MiB output
    w = torch.randn(64, 1, 3, 3)
    with kernels.use_kernels("cpu"):
        first = F.depthwise_conv(x, w, padding=1)
        kept = first.clone()
        second = F.depthwise_conv(2 * x, w, padding=1)
        assert second.data_ptr() != first.data_ptr()  # first is alive: a block of its own
        torch.testing.assert_close(first, kept)
        address = second.data_ptr()
        del second
        third = F.depthwise_conv(x, w, padding=1)
        assert third.data_ptr() == address, "the freed block came back"
        torch.testing.assert_close(third, kept)
    del first, third
    assert cpu.release_memory() >= 2 * x.nbytes
    assert cpu.release_memory() == 0


@requires_cpu_backend
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_pool_outputs_behave_like_pytorchs_in_every_way_a_user_reaches(layout, tmp_path):
    """Defect: pool outputs had storages that could not be resized (resize_, out= raised)."""
    import io
    import pickle

    x, w = torch.randn(4, 64, 112, 112), torch.randn(64, 1, 3, 3)  # a 12.25 MiB output: from the pool
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with kernels.use_kernels("cpu"):
        calls = cpu.kernel_calls()
        make = lambda: F.depthwise_conv(x, w, padding=1)  # noqa: E731
        want = make()
        assert cpu.kernel_calls() > calls
    y = make()
    y.resize_(5, 64, 112, 112)  # larger: a new block, the old values kept in memory order
    torch.testing.assert_close(y.view(-1)[:want.numel()], want.as_strided((want.numel(),), (1,)))
    y = make()
    torch.cat([want[:2], want[2:]], out=y)
    torch.testing.assert_close(y, want)
    y = make()
    torch.add(want, 1, out=y.resize_(0))  # out= resizes an emptied output back up
    torch.testing.assert_close(y, want + 1)
    other = torch.empty(0).set_(make())
    torch.testing.assert_close(other, want)
    y = make()
    y.add_(1).mul_(2)
    torch.testing.assert_close(y, (want + 1) * 2)
    y[:, :3].fill_(7.0)  # through a view
    assert y[:, :3].eq(7).all() and not y[:, 3:].eq(7).all()
    shared = make().share_memory_()
    assert shared.is_shared()
    torch.testing.assert_close(shared, want)
    torch.testing.assert_close(pickle.loads(pickle.dumps(make())), want)
    buffer = io.BytesIO()
    torch.save(make(), buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer), want)
