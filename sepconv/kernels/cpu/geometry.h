// A depthwise convolution's geometry, resolved by the caller (sepconv/kernels/cpu/__init__.py, _kernel_args), and
// the index arithmetic that both kernel families (planar and channels-last) derive from it. 1-D is 2-D with one row.
#pragma once

#include "vectors.h"  // first: it sets the vector capability before any ATen header

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace sepconv_cpu {

// Zero padding only: other padding modes are applied by the caller. The flipped padding is the input gradient's
// padding of grad_out when it runs as a forward with the flipped kernel.
struct Geometry {
  int64_t kernel_h, kernel_w, out_h, out_w, stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w,
      flip_pad_top, flip_pad_left;
};

// The 12 integers of the Python side, in the struct's order.
inline Geometry read_geometry(at::IntArrayRef g) {
  TORCH_CHECK(g.size() == 12, "sepconv: geometry must hold 12 integers; got ", g.size());
  return {g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], g[10], g[11]};
}

inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
inline int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }

// A half-open range [first, second) of output pixels.
using Bounds = std::pair<int64_t, int64_t>;

// Output pixels [lo, hi) of a row for which every tap column out * stride - pad + k * dilation (k < taps) lies in
// [0, n).
inline Bounds interior(int64_t n, int64_t out, int64_t taps, int64_t stride, int64_t pad, int64_t dilation) {
  const int64_t lo = std::max<int64_t>(0, ceil_div(pad, stride));
  const int64_t hi = std::min<int64_t>(out, floor_div(n - 1 - (taps - 1) * dilation + pad, stride) + 1);
  return {std::min(lo, out), std::max(hi, std::min(lo, out))};
}

// A kernel tap and the output index it pairs with.
using TapPair = std::pair<int64_t, int64_t>;

// For each input row ih: the kernel rows i and grad_out rows oh with oh * stride_h - pad_top + i * dilation_h = ih,
// worked out once per call (the divisibility test costs a division per kernel row and input row otherwise).
inline std::vector<std::vector<TapPair>> input_row_taps(int64_t H, const Geometry& g) {
  std::vector<std::vector<TapPair>> taps(H);
  for (int64_t oh = 0; oh < g.out_h; ++oh)
    for (int64_t i = 0; i < g.kernel_h; ++i) {
      const int64_t ih = oh * g.stride_h - g.pad_top + i * g.dilation_h;
      if (ih >= 0 && ih < H) taps[ih].push_back({i, oh});
    }
  return taps;
}

// For each column phase b of the input (columns b, b + stride_w, ...): the kernel columns k that reach it, and the
// shift of their grad_out column (the phase's j-th column reads grad_out column j + shift).
inline std::vector<std::vector<TapPair>> input_column_taps(const Geometry& g) {
  std::vector<std::vector<TapPair>> taps(g.stride_w);
  for (int64_t b = 0; b < g.stride_w; ++b)
    for (int64_t k = 0; k < g.kernel_w; ++k) {
      const int64_t u = b + g.pad_left - k * g.dilation_w;
      if (floor_div(u, g.stride_w) * g.stride_w == u) taps[b].push_back({k, floor_div(u, g.stride_w)});
    }
  return taps;
}

}  // namespace sepconv_cpu
