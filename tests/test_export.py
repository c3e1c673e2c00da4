"""Compilation and export paths: ``torch.compile``, ``torch.jit.trace``, ``torch.jit.script``, ONNX.

What holds today (torch 2.13, CPU):

* ``torch.compile(..., fullgraph=True)`` captures the layers in one graph, with no graph break, for
  input-dependent ("same", stride 2) and causal padding; forward and backward equal eager. With
  new input sizes dynamo recompiles once to a dynamic-shape graph that computes the TF "same"
  amounts symbolically, and specialises only on the parity of each padded axis (symmetric padding
  goes into the convolution, asymmetric padding through ``F.pad``), so it stays correct.
* The ONNX exporter (the default ``dynamo=True`` one) emits plain ``Conv`` nodes: depthwise with
  ``group == C_in``, pointwise with ``group == 1``; onnxruntime matches PyTorch. A dynamic batch
  dimension works.
* ``torch.jit.script`` cannot compile the layers (pinned below, with the reason).

* ``torch.jit.trace`` works and records the padding amounts of the traced input as constants
  (sizes are tensors while tracing; the ops convert them), so the legacy ONNX exporter
  (``dynamo=False``) works too. ``torch.export`` accepts a dynamic spatial dimension (sizes are
  ``torch.SymInt`` there, which the geometry accepts).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import sepconv
from sepconv import geometry

@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test starts and ends with an empty dynamo cache (no compiled code shared between tests)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def forward_backward(fn, module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor):
    """Output, input gradient and parameter gradients of ``fn(x)`` (``fn`` runs ``module``'s parameters)."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    y.backward(grad_out)
    grads = {name: p.grad.detach().clone() for name, p in module.named_parameters()}
    return y.detach(), x.grad.detach(), grads


def assert_compiled_matches_eager(module: nn.Module, compiled, x: torch.Tensor, out_shape: tuple) -> None:
    grad_out = torch.randn(out_shape)
    y, gx, grads = forward_backward(module, module, x, grad_out)
    assert y.shape == out_shape
    cy, cgx, cgrads = forward_backward(compiled, module, x, grad_out)
    torch.testing.assert_close(cy, y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cgx, gx, rtol=1e-5, atol=1e-5)
    assert cgrads.keys() == grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(cgrads[name], grads[name], rtol=1e-5, atol=1e-5, msg=name)


def single_graph_with_pad(module: nn.Module, x: torch.Tensor):
    """Dynamo's view of ``module(x)``: exactly one graph, no break, and the asymmetric padding in it: an explicit
    pad op (reference backend) or the amounts handed to the ``sepconv::depthwise_conv`` op (C++ backend)."""
    explanation = torch._dynamo.explain(module)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    (graph,) = explanation.graphs
    targets = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
    assert any("pad" in target or "sepconv.depthwise_conv" in target for target in targets), targets
    torch._dynamo.reset()


# --- torch.compile -----------------------------------------------------------------------------------

def test_compile_separable_same_stride2_fullgraph_forward_and_backward():
    """TF 'same' with stride 2 on a 9 x 10 input: (1, 1) on H (inside the conv), (0, 1) on W (F.pad)."""
    torch.manual_seed(0)
    layer = sepconv.SeparableConv2d(8, 16, 3, stride=2, padding="same")
    x = torch.randn(2, 8, 9, 10)
    single_graph_with_pad(layer, x)

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    assert_compiled_matches_eager(layer, compiled, x, (2, 16, 5, 5))
    assert counter.frame_count == 1  # one graph, compiled once (forward and backward)


def test_compile_depthwise_causal_fullgraph_forward_and_backward():
    torch.manual_seed(0)
    layer = sepconv.DepthwiseConv1d(4, 3, padding="causal", dilation=2, depth_multiplier=2)
    x = torch.randn(2, 4, 12)
    single_graph_with_pad(layer, x)  # causal: (4, 0) before the time axis

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    assert_compiled_matches_eager(layer, compiled, x, (2, 8, 12))
    assert counter.frame_count == 1


def test_compile_same_stride2_stays_correct_across_input_sizes():
    """Input-dependent padding is not frozen by compilation (unlike tracing).

    After the first size dynamo recompiles to a dynamic-shape graph; the padding is computed from the
    symbolic size, and the graph is re-specialised only on the parity of each axis (which decides
    symmetric-in-conv vs ``F.pad``): at most 1 + 2 ** 2 graphs for any number of 2-D sizes. The cheap
    ``aot_eager`` backend is enough here; inductor is exercised above.
    """
    torch.manual_seed(0)
    layer = sepconv.SeparableConv2d(8, 16, 3, stride=2, padding="same")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    sizes = [(9, 10), (10, 9), (12, 11), (11, 12), (7, 7), (8, 8), (13, 14), (14, 13), (15, 15), (6, 6)]
    with torch.no_grad():
        for size in sizes:
            x = torch.randn(2, 8, *size)
            expected = layer(x)
            assert expected.shape[2:] == tuple(-(-n // 2) for n in size)
            torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5, msg=str(size))
    assert counter.frame_count <= 5, counter.frame_count  # one graph per size would be 8 (the recompile limit)


# --- torch.jit.trace ---------------------------------------------------------------------------------

def _trace(module: nn.Module, x: torch.Tensor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(module, x)


@pytest.mark.parametrize("make", [
    lambda: sepconv.SeparableConv2d(4, 8, 3, padding=1, depth_multiplier=2),
    lambda: sepconv.SpatialSeparableConv2d(4, 8, 3, padding="same"),
], ids=["separable", "spatial_separable"])
def test_trace_matches_eager(make):
    """Stride 1: the padding amounts do not depend on the input size, so the trace is valid for any size."""
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(2, 4, 9, 10)
    traced = _trace(layer, x)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), layer(x), rtol=1e-6, atol=1e-6)
        other = torch.randn(3, 4, 12, 7)
        torch.testing.assert_close(traced(other), layer(other), rtol=1e-6, atol=1e-6)


def test_trace_freezes_same_padding_for_stride2():
    """A traced stride-s 'same' layer is valid exactly for sizes congruent (mod s, per axis) to the traced one.

    TF 'same' pads ``total = max(0, k_eff - 1 - (n - 1) % s)`` on an axis of size ``n``: it depends on
    ``n`` only through ``n % s``, and tracing records the amounts for the traced size as constants.
    Traced on 9 x 10 (pads (1, 1) and (0, 1)): any (odd, even) size is right; (even, even) keeps the
    output shape but is silently wrong (one-row shift); (odd, odd) gives the wrong output width.
    """
    torch.manual_seed(0)
    layer = sepconv.SeparableConv2d(8, 16, 3, stride=2, padding="same")
    traced = _trace(layer, torch.randn(2, 8, 9, 10))
    with torch.no_grad():
        for size in [(9, 10), (11, 12), (13, 8), (5, 14)]:
            x = torch.randn(3, 8, *size)
            torch.testing.assert_close(traced(x), layer(x), rtol=1e-6, atol=1e-6, msg=str(size))
        x = torch.randn(2, 8, 8, 10)
        wrong, right = traced(x), layer(x)
        assert wrong.shape == right.shape and not torch.allclose(wrong, right)
        x = torch.randn(2, 8, 9, 11)
        assert traced(x).shape == (2, 16, 5, 5) and layer(x).shape == (2, 16, 5, 6)


# --- torch.jit.script --------------------------------------------------------------------------------

@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.script.*deprecated:DeprecationWarning")
@pytest.mark.parametrize("make, error", [
    (lambda: sepconv.SeparableConv2d(8, 16, 3, stride=2, padding="same"), RuntimeError),
    (lambda: sepconv.DepthwiseConv1d(4, 3, padding="causal"), RuntimeError),
    (lambda: sepconv.SpatialSeparableConv2d(4, 8, 3, padding="same"), RuntimeError),
], ids=["separable", "depthwise", "spatial_separable"])
def test_script_is_not_supported(make, error):
    """``torch.jit.script`` cannot compile sepconv layers; use ``torch.compile``, ``torch.export`` or ONNX.

    Scripting compiles ``forward`` and, recursively, the functional ops, geometry and kernels, which
    are dynamic Python that TorchScript's static subset does not accept. The first construct it meets
    is an error message: ``tuple(x.shape)`` inside an f-string in the layers' channel check
    (``layers._common.check_input_channels``: "cannot statically infer the expected size of a list in this
    context", a ``RuntimeError``). Behind it: the same in ``functional._check_weight``, an f-string with a ``!r``
    conversion in ``spatial_separable_conv`` ("Don't support conversion in JoinedStr"), padding and stride as
    untyped arguments that take an int, a string or a tuple of ``(before, after)`` pairs and strings (unions
    TorchScript cannot type), ``isinstance`` checks against ``collections.abc.Sequence``, keyword-only arguments with
    defaults (``geometry.to_tuple``), a dict of functions and nested generators in
    ``kernels.reference.conv`` (see ``test_script_geometry_is_not_supported``).
    """
    with pytest.raises(error, match=r"_common\.py"):
        torch.jit.script(make())


@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.script.*deprecated:DeprecationWarning")
def test_script_geometry_is_not_supported():
    """The padding logic itself is not scriptable: ``to_tuple`` has a keyword-only argument with a default."""
    with pytest.raises(torch.jit.frontend.NotSupportedError, match="keyword-only arguments"):
        torch.jit.script(geometry.to_tuple)


# --- ONNX --------------------------------------------------------------------------------------------

STANDARD_OPS = {"Conv", "Pad", "Relu"}


def export_onnx(model: nn.Module, x: torch.Tensor, path, **kwargs):
    """Export with the dynamo-based exporter (the default in torch 2.13); load and check the graph."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False, **kwargs)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert {opset.domain for opset in proto.opset_import} <= {"", "ai.onnx"}  # no custom op domains
    assert not proto.functions
    assert all(node.domain in ("", "ai.onnx") for node in proto.graph.node)
    op_types = [node.op_type for node in proto.graph.node]
    assert set(op_types) <= STANDARD_OPS, op_types
    return proto


def conv_nodes(proto):
    """``(group, weight shape, strides)`` of each ``Conv`` node, in graph order."""
    import onnx

    shapes = {init.name: tuple(init.dims) for init in proto.graph.initializer}
    found = []
    for node in proto.graph.node:
        if node.op_type == "Conv":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            found.append((attrs.get("group", 1), shapes[node.input[1]], tuple(attrs.get("strides", ()))))
    return found


def run_onnxruntime(path, x: torch.Tensor) -> torch.Tensor:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(output)


def test_onnx_2d_separable_and_depthwise_are_standard_convs(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(sepconv.SeparableConv2d(4, 8, 3, padding=1, depth_multiplier=2),
                          sepconv.DepthwiseConv2d(8, 3, stride=2, padding="same")).eval()
    x = torch.randn(2, 4, 9, 10)  # "same", stride 2 on 9 x 10: asymmetric (0, 1) on W
    path = tmp_path / "model2d.onnx"
    proto = export_onnx(model, x, path)
    assert conv_nodes(proto) == [
        (4, (8, 1, 3, 3), (1, 1)),  # depthwise step of the separable layer: group == C_in, M = 2
        (1, (8, 8, 1, 1), (1, 1)),  # its pointwise step
        (8, (8, 1, 3, 3), (2, 2)),  # the depthwise layer
    ]
    with torch.no_grad():
        expected = model(x)
    assert expected.shape == (2, 8, 5, 5)
    torch.testing.assert_close(run_onnxruntime(path, x), expected, rtol=0, atol=1e-5)


def test_onnx_1d_separable_model_with_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        sepconv.SeparableConv1d(3, 6, 5, padding="causal", dilation=2, depth_multiplier=2), nn.ReLU(),
        sepconv.SeparableConv1d(6, 4, 3, stride=2, padding="same", depthwise_bias=True)).eval()
    x = torch.randn(2, 3, 21)
    path = tmp_path / "model1d.onnx"
    proto = export_onnx(model, x, path, dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert conv_nodes(proto) == [(3, (6, 1, 5), (1,)), (1, (6, 6, 1), (1,)),
                                 (6, (6, 1, 3), (2,)), (1, (4, 6, 1), (1,))]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    with torch.no_grad():
        for batch in (2, 5):
            xb = torch.randn(batch, 3, 21)
            expected = model(xb)
            assert expected.shape == (batch, 4, 11)
            torch.testing.assert_close(run_onnxruntime(path, xb), expected, rtol=0, atol=1e-5)


def test_onnx_legacy_torchscript_exporter(tmp_path):
    """``dynamo=False`` traces the model with ``torch.jit.trace``."""
    pytest.importorskip("onnx")
    torch.manual_seed(0)
    model = nn.Sequential(sepconv.SeparableConv2d(4, 8, 3, padding=1, depth_multiplier=2)).eval()
    x = torch.randn(2, 4, 9, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(tmp_path / "legacy.onnx"), dynamo=False)
    with torch.no_grad():
        torch.testing.assert_close(run_onnxruntime(tmp_path / "legacy.onnx", x), model(x), rtol=0, atol=1e-5)


def test_export_nonstrict_with_dynamic_length():
    """``torch.export`` (non-strict, the default and the ONNX exporter's first try) with a dynamic time axis.

    Causal padding does not depend on the length, so one exported program serves every length.
    """
    torch.manual_seed(0)
    layer = sepconv.DepthwiseConv1d(4, 3, padding="causal", dilation=2)
    program = torch.export.export(layer, (torch.randn(2, 4, 12),),
                                  dynamic_shapes=({0: torch.export.Dim("batch"), 2: torch.export.Dim("time")},),
                                  strict=False)
    with torch.no_grad():
        for shape in [(2, 4, 12), (3, 4, 20)]:
            x = torch.randn(shape)
            torch.testing.assert_close(program.module()(x), layer(x), rtol=1e-6, atol=1e-6)
