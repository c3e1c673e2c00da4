// The extension's Python interface: the depthwise entry points, which choose the kernel family (planar.h or
// channels_last.h) by the tensors' memory layout, and the one PYBIND11_MODULE of all the sources.
//
// Tensors are 4-D (N, C, H, W); 1-D calls arrive as 2-D ones with one row, 3-D ones as 5-D tensors. The geometry
// arrives as the 12 (or 19, 3-D) integers of read_geometry (geometry.h). Threads come from PyTorch's own pool (at::parallel_for), so there is no second
// OpenMP runtime.

#include "channels_last.h"
#include "common.h"
#include "geometry.h"
#include "planar.h"

#include <torch/extension.h>

#include <atomic>
#include <optional>

namespace sepconv_cpu {

namespace {

std::atomic<int64_t> kernel_calls{0};

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK((t.dim() == 4 || t.dim() == 5) && t.device().is_cpu() && kernel_dtype(t.scalar_type()),
              "sepconv cpu kernels: ", name, " must be a 4-D or 5-D float32/float64/bfloat16 CPU tensor; got ",
              t.sizes(), " ", t.scalar_type());
}

// 3-D (5-D tensors) runs on the channels-last kernels only, one channel per group, on channels_last_3d memory seen
// as (N, C, D * H, W) channels-last (see geometry.h).
constexpr auto kChannelsLast3d = at::MemoryFormat::ChannelsLast3d;

// A contiguous channels_last_3d (N, C, D, H, W) tensor as the (N, C, D * H, W) channels-last one of its rows, and
// back. As strides, not flatten: a batch of one would get a row's batch stride and read as neither layout.
at::Tensor depth_rows(const at::Tensor& t) {
  const int64_t N = t.size(0), C = t.size(1), D = t.size(2), H = t.size(3), W = t.size(4);
  return t.as_strided({N, C, D * H, W}, {C * D * H * W, 1, W * C, C});
}

at::Tensor volume(const at::Tensor& rows, int64_t D, int64_t H) {
  const int64_t N = rows.size(0), C = rows.size(1), W = rows.size(3);
  return rows.as_strided({N, C, D, H, W}, {C * D * H * W, 1, H * W * C, W * C, C});
}

bool channels_last_3d(const at::Tensor& t, const at::Tensor& weight) {
  return t.suggest_memory_format() == kChannelsLast3d || weight.suggest_memory_format() == kChannelsLast3d;
}

at::Tensor forward_3d(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const Geometry& g,
                      const Activation& act) {
  const int64_t N = x.size(0), C = x.size(1);
  TORCH_CHECK(weight.size(0) == C, "sepconv cpu kernels: 3-D takes one output channel per input channel; got weight ",
              weight.sizes(), " for ", C, " channels");
  auto y = empty_output({N, C, g.out_d, g.out_h, g.out_w}, x.options().memory_format(kChannelsLast3d));
  auto y_rows = depth_rows(y);
  channels_last::forward(depth_rows(x.contiguous(kChannelsLast3d)), weight, bias, y_rows, g, act);
  return channels_last_3d(x, weight) ? y : y.contiguous();
}

// Every entry point's first step: its two tensors checked (same dtype), its geometry read.
Geometry checked_geometry(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                          at::IntArrayRef geometry) {
  check(a, a_name);
  check(b, b_name);
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "sepconv cpu kernels: ", a_name, " is ", a.scalar_type(), " but ",
              b_name, " is ", b.scalar_type());
  return read_geometry(geometry);
}

// float32 lanes of a vector: the layout choices below count channels and columns in vectors.
constexpr int64_t kLanes = Vectorized<float>::size();

// PyTorch's convolutions answer a channels-last input or weight with a channels-last output.
bool channels_last_output(const at::Tensor& t, const at::Tensor& weight) {
  return t.suggest_memory_format() == at::MemoryFormat::ChannelsLast ||
         weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

// The channels-last kernels vectorise along channels: worth it from about half a vector of them on. They also
// take contiguous inputs whose output rows are short (the planar kernels' vectors run along rows), through a
// transposed copy in and out.
bool use_channels_last(bool cl, int64_t C, int64_t M, int64_t out_width) {
  return M == 1 && C >= std::max<int64_t>(4, kLanes / 2) && (cl || (C >= 2 * kLanes && out_width < 2 * kLanes));
}

// The planar kernels' output: NCHW, which for one channel already has PyTorch's channels-last strides.
at::Tensor planar_output(at::IntArrayRef size, const at::TensorOptions& options, bool cl) {
  const bool one_channel = cl && size[1] == 1;
  return empty_output(size,
                      options.memory_format(one_channel ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
}

at::Tensor empty_channels_last(at::IntArrayRef size, const at::TensorOptions& options) {
  return empty_output(size, options.memory_format(at::MemoryFormat::ChannelsLast));
}

at::Tensor in_layout(const at::Tensor& t, bool cl) {
  return cl ? t.contiguous(at::MemoryFormat::ChannelsLast) : t;
}

at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

at::Tensor forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   at::IntArrayRef geometry, int64_t activation, double alpha, bool prefer_channels_last) {
  const Geometry g = checked_geometry(x, "x", weight, "weight", geometry);
  const Activation act = read_activation(activation, alpha);
  ++kernel_calls;
  const int64_t N = x.size(0), C = x.size(1), CM = weight.size(0), M = CM / C;
  const at::Tensor b = contiguous_or_undefined(bias);
  if (x.dim() == 5) return forward_3d(x, weight, b, g, act);
  const bool cl = channels_last_output(x, weight);
  if (C == 1 && M >= kLanes && g.kernel_h * g.kernel_w <= channels_last::kBroadcastMaxTaps && prefer_channels_last) {
    // one input channel has no layout of its own; a caller running channels-last asks for that output
    auto y = empty_channels_last({N, CM, g.out_h, g.out_w}, x.options());
    channels_last::broadcast_forward(x.contiguous(), weight, b, y, g, act);
    return y;
  }
  if (use_channels_last(cl, C, M, g.out_w)) {
    auto y = empty_channels_last({N, CM, g.out_h, g.out_w}, x.options());
    channels_last::forward(x.contiguous(at::MemoryFormat::ChannelsLast), weight, b, y, g, act);
    return cl ? y : y.contiguous();
  }
  auto y = planar_output({N, CM, g.out_h, g.out_w}, x.options(), cl);
  planar::forward(x.contiguous(), weight.contiguous(), b, y, g, act);
  return in_layout(y, cl);
}

// Depthwise (with its activation) then pointwise (with its own), fused where the depthwise kernels run
// channels-last with unpadded rows (3-D: channels_last_3d, seen as rows); otherwise the two kernels one after the
// other.
at::Tensor separable(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     at::IntArrayRef geometry, int64_t dw_activation, double dw_alpha, const at::Tensor& pw_weight,
                     const std::optional<at::Tensor>& pw_bias, int64_t activation, double alpha,
                     const std::optional<at::Tensor>& residual) {
  const Geometry g = checked_geometry(x, "x", weight, "weight", geometry);
  const bool three_d = x.dim() == 5;
  const int64_t N = x.size(0), C = x.size(1), W = x.size(-1), M = weight.size(0) / C, O = pw_weight.size(0);
  TORCH_CHECK(pw_weight.dim() == x.dim() && pw_weight.size(1) == weight.size(0) &&
                  pw_weight.scalar_type() == x.scalar_type(),
              "sepconv cpu separable: pw_weight must be (C_out, ", weight.size(0), ", 1, 1", three_d ? ", 1" : "",
              "); got ", pw_weight.sizes());
  const auto layout = three_d ? kChannelsLast3d : at::MemoryFormat::ChannelsLast;
  const bool fused = use_channels_last(true, C, M, g.out_w) && x.suggest_memory_format() == layout &&
                     !channels_last::reads_padded_rows(g, W);
  if (!fused) {
    const auto hidden = forward(x, weight, bias, geometry, dw_activation, dw_alpha, false);
    if (!three_d) return pointwise(hidden, pw_weight, pw_bias, activation, alpha, residual);
    std::optional<at::Tensor> residual_rows;
    if (residual.has_value()) residual_rows = depth_rows(residual->contiguous(kChannelsLast3d));
    const auto rows = pointwise(depth_rows(hidden.contiguous(kChannelsLast3d)), pw_weight.flatten(2, 3), pw_bias,
                                activation, alpha, residual_rows);
    const auto y = volume(rows, g.out_d, g.out_h);
    return channels_last_3d(x, weight) ? y : y.contiguous();
  }
  ++kernel_calls;
  const Activation dw_act = read_activation(dw_activation, dw_alpha);
  const Activation act = read_activation(activation, alpha);
  if (three_d) {
    auto y = empty_output({N, O, g.out_d, g.out_h, g.out_w}, x.options().memory_format(kChannelsLast3d));
    auto y_rows = depth_rows(y);
    channels_last::separable_forward(depth_rows(x.contiguous(kChannelsLast3d)), weight,
                                     contiguous_or_undefined(bias), dw_act, pw_weight,
                                     contiguous_or_undefined(pw_bias), y_rows, g, act,
                                     residual_like(residual, y.sizes(), y.scalar_type(), kChannelsLast3d));
    return y;
  }
  auto y = empty_channels_last({N, O, g.out_h, g.out_w}, x.options());
  channels_last::separable_forward(x.contiguous(at::MemoryFormat::ChannelsLast), weight, contiguous_or_undefined(bias),
                                   dw_act, pw_weight, contiguous_or_undefined(pw_bias), y, g, act,
                                   residual_like(residual, y.sizes(), y.scalar_type(), at::MemoryFormat::ChannelsLast));
  return y;
}

at::Tensor input_grad(const at::Tensor& grad_out, const at::Tensor& weight, at::IntArrayRef input_size,
                      at::IntArrayRef geometry) {
  const Geometry g = checked_geometry(grad_out, "grad_out", weight, "weight", geometry);
  ++kernel_calls;
  if (grad_out.dim() == 5) {
    auto dinput = empty_output(input_size, grad_out.options().memory_format(kChannelsLast3d));
    auto dinput_rows = depth_rows(dinput);
    channels_last::input_grad(depth_rows(grad_out.contiguous(kChannelsLast3d)), weight, dinput_rows, g);
    return channels_last_3d(grad_out, weight) ? dinput : dinput.contiguous();
  }
  const int64_t N = input_size[0], C = input_size[1], H = input_size[2], W = input_size[3];
  const int64_t M = weight.size(0) / C;
  const bool cl = channels_last_output(grad_out, weight);
  if (use_channels_last(cl, C, M, W)) {
    auto dinput = empty_channels_last({N, C, H, W}, grad_out.options());
    channels_last::input_grad(grad_out.contiguous(at::MemoryFormat::ChannelsLast), weight, dinput, g);
    return cl ? dinput : dinput.contiguous();
  }
  auto dinput = planar_output({N, C, H, W}, grad_out.options(), cl);
  planar::input_grad(grad_out.contiguous(), weight.contiguous(), dinput, g);
  return in_layout(dinput, cl);
}

at::Tensor weight_grad(const at::Tensor& x, const at::Tensor& grad_out, at::IntArrayRef weight_size,
                       at::IntArrayRef geometry) {
  const Geometry g = checked_geometry(x, "x", grad_out, "grad_out", geometry);
  ++kernel_calls;
  const int64_t C = x.size(1), CM = weight_size[0], M = CM / C;
  if (x.dim() == 5) {
    auto dweight_rows = at::empty({g.kernel_d * g.kernel_h, g.kernel_w, C}, x.options());
    channels_last::weight_grad(depth_rows(x.contiguous(kChannelsLast3d)), depth_rows(grad_out.contiguous(kChannelsLast3d)),
                               dweight_rows, g);
    return dweight_rows.view({g.kernel_d, g.kernel_h, g.kernel_w, C}).permute({3, 0, 1, 2}).unsqueeze(1).contiguous();
  }
  if (use_channels_last(x.suggest_memory_format() == at::MemoryFormat::ChannelsLast, C, M, g.out_w)) {
    auto dweight_rows = at::empty({g.kernel_h, g.kernel_w, C}, x.options());
    channels_last::weight_grad(x.contiguous(at::MemoryFormat::ChannelsLast),
                               grad_out.contiguous(at::MemoryFormat::ChannelsLast), dweight_rows, g);
    return dweight_rows.permute({2, 0, 1}).unsqueeze(1).contiguous();
  }
  auto dweight = at::empty({CM, 1, g.kernel_h, g.kernel_w}, x.options());
  planar::weight_grad(x.contiguous(), grad_out.contiguous(), dweight, g);
  return dweight;
}

}  // namespace

}  // namespace sepconv_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace sepconv_cpu;
  m.def("forward", &forward, "depthwise convolution, forward, with an activation in the epilogue", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("geometry"), py::arg("activation") = 0, py::arg("alpha") = 1.0,
        py::arg("prefer_channels_last") = false);
  m.def("pointwise", &pointwise, "pointwise convolution with bias, residual and activation in the epilogue",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("activation"), py::arg("alpha"),
        py::arg("residual") = py::none());
  m.def("batch_norm_act_forward", &batch_norm_act_forward, "batch norm (batch statistics) + activation");
  m.def("batch_norm_act_backward", &batch_norm_act_backward, "its gradients of x, weight and bias");
  m.def("release_memory", &release_pool, "frees the output pool's free blocks; returns the bytes");
  m.def("separable", &separable, "depthwise then pointwise convolution, fused, each with bias and activation",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("geometry"), py::arg("dw_activation"),
        py::arg("dw_alpha"), py::arg("pw_weight"), py::arg("pw_bias"), py::arg("activation"), py::arg("alpha"),
        py::arg("residual") = py::none());
  m.def("input_grad", &input_grad, "depthwise convolution, gradient of the input");
  m.def("weight_grad", &weight_grad, "depthwise convolution, gradient of the weight");
  m.def("kernel_calls", [] { return kernel_calls.load(); }, "how many times a kernel ran (tests read it)");
}
