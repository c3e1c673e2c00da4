// Depthwise then pointwise (inference), channels-last, a block of output rows at a time: the block's depthwise
// output, with its bias and activation, stays in a per-thread buffer in cache and feeds the pointwise product
// (pointwise.h), so the hidden tensor never goes to memory. 3-D runs unchanged on channels_last_3d memory seen as rows
// (see geometry.h): a block of output rows is a block of (depth, row) pairs.

#include "channels_last.h"
#include "pointwise.h"

namespace sepconv_cpu::channels_last {

namespace {

// Register blocks of the pointwise product per block of rows: enough pixels that few of them are partial.
constexpr int64_t kProductBlocks = 4;

// Rows per block: a few blocks per thread where the image is large; where it is small, enough pixels for the
// product's register blocks all the same, as long as every thread still gets a block (MobileNetV1's 7x7 layers
// ran one-row blocks of 7 pixels, each pixel a register block of its own, at a third of the steps' speed). The
// hidden block holds sums in the accumulator type, which the product reads as they are (bf16 pairs where the
// product multiplies bf16 pairs).
template <typename T, typename Wt>
void separable_kernel(const T* x, const T* wt, const T* bias, const Activation& dw_act, const Wt* pwt, int64_t ldw,
                      const T* pw_bias, T* y, int64_t N, int64_t C, int64_t H, int64_t W, int64_t O, const Geometry& g,
                      const Activation& act, const T* residual) {
  const Bounds inside = interior(W, g.out_w, g.kernel_w, g.stride_w, g.pad_left, g.dilation_w);
  const int64_t threads = at::get_num_threads();
  const int64_t out_rows = g.out_rows();
  const int64_t enough_pixels = (kProductBlocks * kPixels + g.out_w - 1) / g.out_w;
  const int64_t every_thread = (N * out_rows + threads - 1) / threads;
  const int64_t enough_tasks = N * out_rows / (kTasksPerThread * threads);
  const int64_t rows = std::clamp<int64_t>(std::max(enough_tasks, std::min(enough_pixels, every_thread)), 1, out_rows);
  const int64_t blocks = (out_rows + rows - 1) / rows;
  const Epilogue e{dw_act, false};
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    KernelRows<T> kernel_rows(g);
    std::vector<product_input_t<T>> hidden(rows * g.out_w * C);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t image = task / blocks, oh0 = (task % blocks) * rows, oh1 = std::min(out_rows, oh0 + rows);
      for (int64_t oh = oh0; oh < oh1; ++oh) {
        kernel_rows.gather(x, wt, image, oh, H, W, C, g, nullptr);
        kernel_rows.row(wt, bias, hidden.data() + (oh - oh0) * g.out_w * C, C, W, inside, g, e);
      }
      const int64_t first = (image * out_rows + oh0) * g.out_w * O;
      pointwise_rows(hidden.data(), pwt, ldw, pw_bias, y + first, O, 0, (oh1 - oh0) * g.out_w, 0, O, C, act,
                     residual ? residual + first : nullptr);
    }
  });
}

}  // namespace

void separable_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                       const Activation& dw_act, const at::Tensor& pw_weight, const at::Tensor& pw_bias,
                       at::Tensor& y, const Geometry& g, const Activation& act, const at::Tensor& residual) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2) / g.in_d, W = x.size(3), O = pw_weight.size(0);
  const auto wt = weight_rows(weight, false);
  SEPCONV_DISPATCH(x.scalar_type(), "sepconv_separable_nhwc", [&] {
    with_columns<scalar_t>(pw_weight, [&](const auto* pwt, int64_t ldw) {
      separable_kernel(x.data_ptr<scalar_t>(), wt.data_ptr<scalar_t>(), data_or_null<scalar_t>(bias), dw_act, pwt, ldw,
                       data_or_null<scalar_t>(pw_bias), y.data_ptr<scalar_t>(), N, C, H, W, O, g, act,
                       data_or_null<scalar_t>(residual));
    });
  });
}

}  // namespace sepconv_cpu::channels_last
