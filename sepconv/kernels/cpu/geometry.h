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
//
// 3-D adds a depth axis in front. The channels-last kernels see an image as rows of pixels: in 3-D its rows are the
// (depth, row) pairs (a channels_last_3d (N, C, D, H, W) tensor is an (N, C, D * H, W) channels-last one), and a
// kernel's rows its (depth, row) taps; `input_row` maps the one to the other.
struct Geometry {
  int64_t kernel_h, kernel_w, out_h, out_w, stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w,
      flip_pad_top, flip_pad_left;
  int64_t kernel_d = 1, out_d = 1, stride_d = 1, pad_front = 0, dilation_d = 1, flip_pad_front = 0, in_d = 1;

  int64_t kernel_rows() const { return kernel_d * kernel_h; }
  int64_t out_rows() const { return out_d * out_h; }
  // Which of an image's in_d * H input rows output row r reads through kernel row t; -1 in the padding.
  int64_t input_row(int64_t r, int64_t t, int64_t H) const {
    const int64_t id = (r / out_h) * stride_d - pad_front + (t / kernel_h) * dilation_d;
    const int64_t ih = (r % out_h) * stride_h - pad_top + (t % kernel_h) * dilation_h;
    return id < 0 || id >= in_d || ih < 0 || ih >= H ? -1 : id * H + ih;
  }
};

// The integers of the Python side: the struct's 12 (2-D), then its 7 depth ones (3-D).
inline Geometry read_geometry(at::IntArrayRef g) {
  TORCH_CHECK(g.size() == 12 || g.size() == 19, "sepconv: geometry must hold 12 or 19 integers; got ", g.size());
  Geometry r{g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], g[10], g[11]};
  if (g.size() == 19) {
    r.kernel_d = g[12], r.out_d = g[13], r.stride_d = g[14], r.pad_front = g[15], r.dilation_d = g[16];
    r.flip_pad_front = g[17], r.in_d = g[18];
  }
  return r;
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

// For each of an image's in_d * H input rows: the kernel rows and grad_out rows that reach it, worked out once per
// call (the divisibility test costs a division per kernel row and input row otherwise).
inline std::vector<std::vector<TapPair>> input_row_taps(int64_t H, const Geometry& g) {
  std::vector<std::vector<TapPair>> taps(g.in_d * H);
  for (int64_t r = 0; r < g.out_rows(); ++r)
    for (int64_t t = 0; t < g.kernel_rows(); ++t) {
      const int64_t row = g.input_row(r, t, H);
      if (row >= 0) taps[row].push_back({t, r});
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
