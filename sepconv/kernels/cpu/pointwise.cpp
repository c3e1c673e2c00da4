// Pointwise (1x1) convolution for inference, with its bias and activation in the epilogue.
//
// Channels-last, the input is a (pixels, C) matrix X and the output a (pixels, C_out) one: Y = act(X W^T + b).
// A register-blocked product computes R = 8 pixels times up to 3 vectors of output channels at once: each step
// over C broadcasts one input value per pixel and multiplies it with a row of W^T (C_out contiguous, which is
// how sepconv.inference stores the weight; any other weight is transposed once per call, see weight_columns).
// The accumulators start at the bias and go through the activation on their way to memory, so the output is written once.
// Tasks are blocks of pixels times blocks of output channels, so that small images with wide layers (7x7 with
// 1280 channels) still give every thread work. Contiguous (NCHW) inputs are W times each image's (C, pixels)
// matrix (BLAS), then one pass adds the bias and applies the activation per output plane.

#include "pointwise.h"

namespace sepconv_cpu {

namespace {

constexpr int64_t kBlasFrom = 512;  // input and output channels from which BLAS's packed product beats the blocks

template <typename T, typename Wt>
void pointwise_nhwc(const T* x, const Wt* wt, int64_t ldw, const T* bias, T* y, int64_t P, int64_t K, int64_t O,
                    const Activation& a, const T* residual) {
  constexpr int64_t L = Vectorized<acc_t<T>>::size();
  const int64_t chunk = kVectors * L;  // output channels per register block
  const int64_t pixel_tasks = (P + kPixelTask - 1) / kPixelTask;
  // enough channel blocks per pixel block that every thread has a few tasks
  const int64_t chunks = (O + chunk - 1) / chunk;
  const int64_t want = std::max<int64_t>(1, kTasksPerThread * at::get_num_threads() / pixel_tasks);
  const int64_t chunks_per_task = std::max<int64_t>(1, chunks / std::min(chunks, want));
  const int64_t channel_tasks = (chunks + chunks_per_task - 1) / chunks_per_task;
  at::parallel_for(0, pixel_tasks * channel_tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t p0 = (task / channel_tasks) * kPixelTask, p1 = std::min(P, p0 + kPixelTask);
      const int64_t o_begin = (task % channel_tasks) * chunks_per_task * chunk;
      const int64_t o_end = std::min(O, o_begin + chunks_per_task * chunk);
      pointwise_rows(x, wt, ldw, bias, y, O, p0, p1, o_begin, o_end, K, a, residual);
    }
  });
}

}  // namespace

at::Tensor residual_like(const std::optional<at::Tensor>& residual, at::IntArrayRef size, at::ScalarType dtype,
                         at::MemoryFormat format) {
  if (!residual.has_value()) return at::Tensor();
  TORCH_CHECK(residual->sizes() == size && residual->scalar_type() == dtype && residual->device().is_cpu(),
              "sepconv cpu kernels: residual must be a ", dtype, " CPU tensor of the output's shape ", size, "; got ",
              residual->sizes(), " ", residual->scalar_type());
  return residual->contiguous(format);
}

at::Tensor pointwise(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     int64_t activation, double alpha, const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu() && kernel_dtype(x.scalar_type()),
              "sepconv cpu pointwise: x must be a 4-D float32/float64/bfloat16 CPU tensor; got ", x.sizes(), " ",
              x.scalar_type());
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1) && weight.size(2) == 1 && weight.size(3) == 1 &&
                  weight.scalar_type() == x.scalar_type(),
              "sepconv cpu pointwise: weight must be (C_out, ", x.size(1), ", 1, 1) of x's dtype; got ",
              weight.sizes());
  const Activation act = read_activation(activation, alpha);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Co = weight.size(0);
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();

  if (x.suggest_memory_format() == at::MemoryFormat::ChannelsLast) {
    const auto xc = x.contiguous(at::MemoryFormat::ChannelsLast);
    auto y = empty_output({N, Co, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
    const auto r = residual_like(residual, y.sizes(), y.scalar_type(), at::MemoryFormat::ChannelsLast);
    if (C >= kBlasFrom && Co >= kBlasFrom) {
      // wide layers: BLAS's packed product is faster than the register blocks; the epilogue is one pass after
      auto rows = y.permute({0, 2, 3, 1}).view({N * H * W, Co});
      const auto inputs = xc.permute({0, 2, 3, 1}).reshape({N * H * W, C});
      const auto wt = weight_columns(weight).first;
      if (b.defined()) at::addmm_out(rows, b, inputs, wt);
      else at::mm_out(rows, inputs, wt);
      if (r.defined()) y.add_(r);
      if (act.any()) {
        SEPCONV_DISPATCH(y.scalar_type(), "sepconv_pointwise_blas_epilogue", [&] {
          scalar_t* data = y.data_ptr<scalar_t>();
          at::parallel_for(0, N * H * W, 64, [&](int64_t begin, int64_t end) {
            activate_inplace<scalar_t>(data + begin * Co, (end - begin) * Co, nullptr, act);
          });
        });
      }
      return y;
    }
    SEPCONV_DISPATCH(x.scalar_type(), "sepconv_pointwise_nhwc", [&] {
      with_columns<scalar_t>(weight, [&](const auto* wt, int64_t ldw) {
        pointwise_nhwc(xc.data_ptr<scalar_t>(), wt, ldw, b.defined() ? b.data_ptr<scalar_t>() : nullptr,
                       y.data_ptr<scalar_t>(), N * H * W, C, Co, act, r.defined() ? r.data_ptr<scalar_t>() : nullptr);
      });
    });
    return y;
  }

  auto y = at::matmul(weight.reshape({Co, C}), x.contiguous().view({N, C, H * W})).view({N, Co, H, W});
  if (residual.has_value()) y.add_(residual_like(residual, y.sizes(), y.scalar_type(), at::MemoryFormat::Contiguous));
  if (b.defined() || act.any()) {
    SEPCONV_DISPATCH(y.scalar_type(), "sepconv_pointwise_epilogue_planar", [&] {
      scalar_t* data = y.data_ptr<scalar_t>();
      const scalar_t* bias_data = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, N * Co, 1, [&](int64_t begin, int64_t end) {
        for (int64_t plane = begin; plane < end; ++plane)
          activate_inplace<scalar_t>(data + plane * H * W, H * W, nullptr, act,
                                     bias_data ? bias_data[plane % Co] : scalar_t(0));
      });
    });
  }
  return y;
}

}  // namespace sepconv_cpu
