// Pointwise (1x1) convolution for inference: a matrix product (BLAS through ATen) whose bias and activation are
// applied to each block of the output while it is still in cache, instead of in separate passes over memory.
//
// Channels-last, the input is a (pixels, C) matrix and the output a (pixels, C_out) one: each thread multiplies
// blocks of rows (a single-threaded product inside the parallel region) and finishes them at once. Contiguous
// (NCHW), each image is W (C_out, C) times its (C, pixels) matrix.

#include "common.h"

#include <algorithm>

namespace sepconv_cpu {

namespace {

// Rows per block: enough for an efficient product, few enough that the block's output stays in L2.
int64_t block_rows(int64_t pixels, int64_t out_channels) {
  const int64_t rows = std::max<int64_t>(32, (256 << 10) / (4 * std::max<int64_t>(1, out_channels)));
  const int64_t per_thread = (pixels + at::get_num_threads() - 1) / at::get_num_threads();
  return std::max<int64_t>(1, std::min(rows, per_thread));
}

}  // namespace

at::Tensor pointwise(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     int64_t activation, double alpha) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "sepconv cpu pointwise: x must be a 4-D float32/float64 CPU tensor; got ", x.sizes(), " ",
              x.scalar_type());
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1) && weight.size(2) == 1 && weight.size(3) == 1 &&
                  weight.scalar_type() == x.scalar_type(),
              "sepconv cpu pointwise: weight must be (C_out, ", x.size(1), ", 1, 1) of x's dtype; got ", weight.sizes());
  const Activation act = read_activation(activation, alpha);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Co = weight.size(0);
  const at::Tensor w = weight.reshape({Co, C});
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const bool channels_last = x.suggest_memory_format() == at::MemoryFormat::ChannelsLast;

  if (channels_last) {
    const auto xc = x.contiguous(at::MemoryFormat::ChannelsLast);
    auto y = at::empty({N, Co, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
    const auto rows_in = xc.permute({0, 2, 3, 1}).reshape({N * H * W, C});
    auto rows_out = y.permute({0, 2, 3, 1}).view({N * H * W, Co});
    const auto wt = w.t();
    const int64_t pixels = N * H * W, step = block_rows(pixels, Co);
    at::parallel_for(0, (pixels + step - 1) / step, 1, [&](int64_t begin, int64_t end) {
      c10::InferenceMode guard;  // thread-local: the pool's threads may write the caller's inference tensors
      for (int64_t block = begin; block < end; ++block) {
        const int64_t r0 = block * step, r1 = std::min(pixels, r0 + step);
        auto out = rows_out.narrow(0, r0, r1 - r0);
        if (b.defined()) at::addmm_out(out, b, rows_in.narrow(0, r0, r1 - r0), wt);
        else at::mm_out(out, rows_in.narrow(0, r0, r1 - r0), wt);
        if (act.any()) {
          AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "sepconv_pointwise_epilogue", [&] {
            activate_inplace<scalar_t>(out.data_ptr<scalar_t>(), (r1 - r0) * Co, static_cast<const scalar_t*>(nullptr),
                                       act);
          });
        }
      }
    });
    return y;
  }

  auto y = at::matmul(w, x.contiguous().view({N, C, H * W})).view({N, Co, H, W});
  if (b.defined() || act.any()) {
    AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "sepconv_pointwise_epilogue_planar", [&] {
      scalar_t* data = y.data_ptr<scalar_t>();
      const scalar_t* bias_data = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, N * Co, 1, [&](int64_t begin, int64_t end) {
        for (int64_t plane = begin; plane < end; ++plane)
          activate_inplace<scalar_t>(data + plane * H * W, H * W, bias_data ? bias_data[plane % Co] : scalar_t(0), act);
      });
    });
  }
  return y;
}

}  // namespace sepconv_cpu
