// Depthwise convolution on the CPU: forward, input gradient and weight gradient, 2-D (1-D is 2-D with one row).
//
// The geometry arrives resolved (sepconv.geometry.ConvGeometry.kernel_args): kernel, output size, stride,
// padding before each axis, dilation and the flipped padding of the input gradient. Zero padding only: other
// padding modes are applied by the caller. Two families of kernels, chosen by the input's memory layout:
//
// * planar (NCHW): each task owns one (image, input channel) plane and lays it out once as a zero-padded
//   "phase grid" (every row split into stride phases), so that each tap is one unit-stride loop over an output
//   row whatever the stride, dilation or padding; rows are register-blocked over output columns.
// * channels-last (NHWC, depth multiplier 1): vectors run along channels; the interior of each output row is
//   register-blocked over 8 output pixels, the border clips the taps.
//
// Threads come from PyTorch's own pool (at::parallel_for), so there is no second OpenMP runtime.

#include "common.h"
#include "pointwise.h"

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

using sepconv_cpu::Activation;
using sepconv_cpu::activate_inplace;
using sepconv_cpu::Vectorized;

struct Geometry {
  int64_t kh, kw, oh, ow, sh, sw, pt, pl, dh, dw, flip_pt, flip_pl;
  bool stream = false;  // outputs far larger than the caches: store around them (see store_output)
  sepconv_cpu::Act act = sepconv_cpu::Act::None;  // the forward's epilogue, applied in registers before the store
  double alpha = 1.0;
};

Geometry read_geometry(at::IntArrayRef g) {
  TORCH_CHECK(g.size() == 12, "sepconv: geometry must hold 12 integers; got ", g.size());
  return {g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], g[10], g[11]};
}

int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }

using Bounds = std::pair<int64_t, int64_t>;

// Output pixels [lo, hi) of a row for which every tap column ow * s - pad + kw * d (kw < k) lies in [0, n).
std::pair<int64_t, int64_t> interior(int64_t n, int64_t out, int64_t k, int64_t s, int64_t pad, int64_t d) {
  int64_t lo = std::max<int64_t>(0, ceil_div(pad, s));
  int64_t hi = std::min<int64_t>(out, floor_div(n - 1 - (k - 1) * d + pad, s) + 1);
  return {std::min(lo, out), std::max(hi, std::min(lo, out))};
}

// ---------------------------------------------------------------------------------------------------------
// Row primitives shared by the planar kernels.

// out[j] = init + sum_t w[t] * src[t][j] for j < len; four vectors of output columns stay in registers.
template <typename T>
void correlate_row(T* out, int64_t len, const T* const* src, const T* w, int64_t taps, T init) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  int64_t j = 0;
  for (; j + 4 * L <= len; j += 4 * L) {
    V a0(init), a1(init), a2(init), a3(init);
    for (int64_t t = 0; t < taps; ++t) {
      const T* s = src[t] + j;
      const V wt(w[t]);
      a0 = at::vec::fmadd(wt, V::loadu(s), a0);
      a1 = at::vec::fmadd(wt, V::loadu(s + L), a1);
      a2 = at::vec::fmadd(wt, V::loadu(s + 2 * L), a2);
      a3 = at::vec::fmadd(wt, V::loadu(s + 3 * L), a3);
    }
    a0.store(out + j);
    a1.store(out + j + L);
    a2.store(out + j + 2 * L);
    a3.store(out + j + 3 * L);
  }
  for (; j < len; j += L) {
    const int64_t n = std::min<int64_t>(L, len - j);
    V a(init);
    for (int64_t t = 0; t < taps; ++t) a = at::vec::fmadd(V(w[t]), V::loadu(src[t] + j, n), a);
    a.store(out + j, n);
  }
}

// The MB outputs of one input plane (a depth multiplier) at once: out[m][j] = init[m] + sum_t w[m][t] * src[t][j].
// Each input vector is loaded once for all MB weights, so the loads no longer bound the FMAs.
template <typename T, int MB>
void correlate_row_multi(T* const* out, int64_t len, const T* const* src, const T* w, int64_t taps, const T* init) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  constexpr int NV = MB > 4 ? 2 : 4;  // vectors of columns per block: MB x NV accumulators
  int64_t j = 0;
  for (; j + NV * L <= len; j += NV * L) {
    V a[MB][NV];
    for (int m = 0; m < MB; ++m)
      for (int v = 0; v < NV; ++v) a[m][v] = V(init[m]);
    for (int64_t t = 0; t < taps; ++t) {
      V xv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) xv[v] = V::loadu(src[t] + j + v * L);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) {
        const V wm(w[m * taps + t]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) a[m][v] = at::vec::fmadd(wm, xv[v], a[m][v]);
      }
    }
    for (int m = 0; m < MB; ++m)
      for (int v = 0; v < NV; ++v) a[m][v].store(out[m] + j + v * L);
  }
  for (; j < len; j += L) {
    const int64_t n = std::min<int64_t>(L, len - j);
    V a[MB];
    for (int m = 0; m < MB; ++m) a[m] = V(init[m]);
    for (int64_t t = 0; t < taps; ++t) {
      const V xv = V::loadu(src[t] + j, n);
      for (int m = 0; m < MB; ++m) a[m] = at::vec::fmadd(V(w[m * taps + t]), xv, a[m]);
    }
    for (int m = 0; m < MB; ++m) a[m].store(out[m] + j, n);
  }
}

// acc[t] (one vector per tap) += d[j] * src[t][j] over j < len, NT taps at a time so d is loaded once per NT.
// Each tap's sum is a chain of dependent FMAs: with few taps, U vectors of columns go to separate accumulators
// so that enough chains are in flight to keep the FMA units busy.
template <typename T, int NT>
void dot_taps_block(const T* d, int64_t len, const T* const* src, Vectorized<T>* acc) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  constexpr int U = NT >= 6 ? 1 : (NT >= 3 ? 2 : 4);
  V a[U][NT];
  for (int i = 0; i < NT; ++i) {
    a[0][i] = acc[i];
    for (int u = 1; u < U; ++u) a[u][i] = V(T(0));
  }
  int64_t j = 0;
  for (; j + U * L <= len; j += U * L) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const V dv = V::loadu(d + j + u * L);
#pragma GCC unroll 8
      for (int i = 0; i < NT; ++i) a[u][i] = at::vec::fmadd(dv, V::loadu(src[i] + j + u * L), a[u][i]);
    }
  }
  for (; j < len; j += L) {
    const int64_t n = std::min<int64_t>(L, len - j);
    const V dv = V::loadu(d + j, n);  // the lanes past n load as zeros
    for (int i = 0; i < NT; ++i) a[0][i] = at::vec::fmadd(dv, V::loadu(src[i] + j, n), a[0][i]);
  }
  for (int i = 0; i < NT; ++i) {
    for (int u = 1; u < U; ++u) a[0][i] = a[0][i] + a[u][i];
    acc[i] = a[0][i];
  }
}

template <typename T>
void dot_taps(const T* d, int64_t len, const T* const* src, int64_t taps, Vectorized<T>* acc) {
  int64_t t = 0;
  for (; t + 8 <= taps; t += 8) dot_taps_block<T, 8>(d, len, src + t, acc + t);
  switch (taps - t) {
    case 7: dot_taps_block<T, 7>(d, len, src + t, acc + t); break;
    case 6: dot_taps_block<T, 6>(d, len, src + t, acc + t); break;
    case 5: dot_taps_block<T, 5>(d, len, src + t, acc + t); break;
    case 4: dot_taps_block<T, 4>(d, len, src + t, acc + t); break;
    case 3: dot_taps_block<T, 3>(d, len, src + t, acc + t); break;
    case 2: dot_taps_block<T, 2>(d, len, src + t, acc + t); break;
    case 1: dot_taps_block<T, 1>(d, len, src + t, acc + t); break;
    default: break;
  }
}

// The weight gradient's dots for MB output channels of one input plane (a depth multiplier) and NT taps:
// acc[m * stride + t] += sum_j d[m][j] * src[t][j]; each vector of src and of d is loaded once for the block.
template <typename T, int MB, int NT>
void dot_multi_block(const T* const* d, int64_t len, const T* const* src, Vectorized<T>* acc, int64_t stride) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  V a[MB][NT];
  for (int m = 0; m < MB; ++m)
    for (int t = 0; t < NT; ++t) a[m][t] = acc[m * stride + t];
  int64_t j = 0;
  for (; j + L <= len; j += L) {
    V xv[NT];
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) xv[t] = V::loadu(src[t] + j);
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) {
      const V dv = V::loadu(d[m] + j);
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) a[m][t] = at::vec::fmadd(dv, xv[t], a[m][t]);
    }
  }
  if (j < len) {  // the lanes past the row's end load as zeros
    const int64_t n = len - j;
    V xv[NT];
    for (int t = 0; t < NT; ++t) xv[t] = V::loadu(src[t] + j, n);
    for (int m = 0; m < MB; ++m) {
      const V dv = V::loadu(d[m] + j, n);
      for (int t = 0; t < NT; ++t) a[m][t] = at::vec::fmadd(dv, xv[t], a[m][t]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int t = 0; t < NT; ++t) acc[m * stride + t] = a[m][t];
}

template <typename T, int MB>
void dot_multi(const T* const* d, int64_t len, const T* const* src, int64_t taps, Vectorized<T>* acc, int64_t stride) {
  int64_t t = 0;
  for (; t + 4 <= taps; t += 4) dot_multi_block<T, MB, 4>(d, len, src + t, acc + t, stride);
  switch (taps - t) {
    case 3: dot_multi_block<T, MB, 3>(d, len, src + t, acc + t, stride); break;
    case 2: dot_multi_block<T, MB, 2>(d, len, src + t, acc + t, stride); break;
    case 1: dot_multi_block<T, MB, 1>(d, len, src + t, acc + t, stride); break;
    default: break;
  }
}

template <typename T>
T horizontal_sum(const Vectorized<T>& v) {
  __at_align__ T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T sum = 0;
  for (int64_t i = 0; i < Vectorized<T>::size(); ++i) sum += lanes[i];
  return sum;
}

// ---------------------------------------------------------------------------------------------------------
// Planar kernels (NCHW).

// The zero-padded phase grid of one H x W plane: padded row r (input row r - pt), phase p holds the padded
// columns p, p + sw, p + 2 sw, ...; Q entries per phase. Rows wholly in the padding are left unwritten: the
// kernels skip their taps.
struct PhaseGrid {
  int64_t rows, q;
  PhaseGrid(const Geometry& g)
      : rows((g.oh - 1) * g.sh + (g.kh - 1) * g.dh + 1), q(g.ow + ((g.kw - 1) * g.dw) / g.sw) {}
  int64_t size(const Geometry& g) const { return rows * g.sw * q; }
  bool row_inside(int64_t r, int64_t H, const Geometry& g) const { return r - g.pt >= 0 && r - g.pt < H; }

  template <typename T>
  void fill(const T* plane, int64_t H, int64_t W, const Geometry& g, T* grid) const {
    for (int64_t r = 0; r < rows; ++r) {
      if (!row_inside(r, H, g)) continue;
      const T* row = plane + (r - g.pt) * W;
      for (int64_t p = 0; p < g.sw; ++p) {
        T* dst = grid + (r * g.sw + p) * q;
        if (g.sw == 1) {
          // columns j - pl inside [0, W) are a plain copy; the rest is padding
          const int64_t lo = std::clamp<int64_t>(g.pl, 0, q), hi = std::clamp<int64_t>(W + g.pl, lo, q);
          std::fill(dst, dst + lo, T(0));
          std::copy(row + lo - g.pl, row + hi - g.pl, dst + lo);
          std::fill(dst + hi, dst + q, T(0));
        } else {
          for (int64_t j = 0; j < q; ++j) {
            const int64_t col = p + g.sw * j - g.pl;
            dst[j] = (col >= 0 && col < W) ? row[col] : T(0);
          }
        }
      }
    }
  }

  // Where tap (i, k) starts inside the grid rows of kernel row i: its phase and column, worked out once per call.
  std::vector<int64_t> tap_columns(const Geometry& g) const {
    std::vector<int64_t> columns(g.kw);
    for (int64_t k = 0; k < g.kw; ++k) columns[k] = ((k * g.dw) % g.sw) * q + (k * g.dw) / g.sw;
    return columns;
  }

  // Pointers to the taps of output row oh that touch input rows (weights w[i * kw + k]); returns how many.
  template <typename T>
  int64_t taps(const T* grid, int64_t oh, int64_t H, const Geometry& g, const int64_t* columns, const T* w,
               const T** src, T* wt) const {
    int64_t n = 0;
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t r = oh * g.sh + i * g.dh;
      if (!row_inside(r, H, g)) continue;
      const T* row = grid + r * g.sw * q;
      for (int64_t k = 0; k < g.kw; ++k) {
        src[n] = row + columns[k];
        if (wt) wt[n] = w[i * g.kw + k];
        ++n;
      }
    }
    return n;
  }
};

// Rows of mb (<= 8) output channels of one input plane; weights hold mb rows of `taps` values.
template <typename T>
void correlate_outputs(T* const* out, int64_t mb, int64_t len, const T* const* src, const T* w, int64_t taps,
                       const T* init) {
  switch (mb) {
    case 8: correlate_row_multi<T, 8>(out, len, src, w, taps, init); break;
    case 7: correlate_row_multi<T, 7>(out, len, src, w, taps, init); break;
    case 6: correlate_row_multi<T, 6>(out, len, src, w, taps, init); break;
    case 5: correlate_row_multi<T, 5>(out, len, src, w, taps, init); break;
    case 4: correlate_row_multi<T, 4>(out, len, src, w, taps, init); break;
    case 3: correlate_row_multi<T, 3>(out, len, src, w, taps, init); break;
    case 2: correlate_row_multi<T, 2>(out, len, src, w, taps, init); break;
    default: correlate_row(out[0], len, src, w, taps, init[0]); break;
  }
}

template <typename T>
void planar_forward(const T* x, const T* w, const T* bias, T* y, int64_t N, int64_t C, int64_t M, int64_t H,
                    int64_t W, const Geometry& g, const Activation& act) {
  const PhaseGrid grid_shape(g);
  const int64_t K = g.kh * g.kw, out_plane = g.oh * g.ow;
  const auto columns = grid_shape.tap_columns(g);
  at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> grid(grid_shape.size(g)), weights(8 * K), inits(8);
    std::vector<const T*> src(K);
    std::vector<T*> outs(8);
    for (int64_t task = begin; task < end; ++task) {
      grid_shape.fill(x + task * H * W, H, W, g, grid.data());
      const int64_t c0 = (task % C) * M;  // the plane's first output channel
      T* planes = y + ((task / C) * C * M + c0) * out_plane;
      for (int64_t m0 = 0; m0 < M; m0 += 8) {
        const int64_t mb = std::min<int64_t>(8, M - m0);
        for (int64_t oh = 0; oh < g.oh; ++oh) {
          // the taps' weights of each output channel of the block, in rows of n
          int64_t n = 0;
          for (int64_t m = 0; m < mb; ++m)
            n = grid_shape.taps(grid.data(), oh, H, g, columns.data(), w + (c0 + m0 + m) * K, src.data(),
                                weights.data() + m * K);
          for (int64_t m = 0; m < mb; ++m) {
            outs[m] = planes + (m0 + m) * out_plane + oh * g.ow;
            inits[m] = bias ? bias[c0 + m0 + m] : T(0);
            if (n < K) std::copy(weights.data() + m * K, weights.data() + m * K + n, weights.data() + m * n);
          }
          correlate_outputs(outs.data(), mb, g.ow, src.data(), weights.data(), n, inits.data());
          if (act.any())
            for (int64_t m = 0; m < mb; ++m) activate_inplace<T>(outs[m], g.ow, static_cast<const T*>(nullptr), act);
        }
      }
    }
  });
}

// For each input row ih: the kernel rows i and grad_out rows oh with oh * sh - pt + i * dh = ih, worked out
// once per call (the divisibility test costs a division per kernel row and input row otherwise).
std::vector<std::vector<std::pair<int64_t, int64_t>>> input_row_taps(int64_t H, const Geometry& g) {
  std::vector<std::vector<std::pair<int64_t, int64_t>>> taps(H);
  for (int64_t oh = 0; oh < g.oh; ++oh)
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t ih = oh * g.sh - g.pt + i * g.dh;
      if (ih >= 0 && ih < H) taps[ih].push_back({i, oh});
    }
  return taps;
}

// For each column phase b of the input (columns b, b + sw, ...): the kernel columns k that reach it, and the shift
// of their grad_out column (the phase's j-th column reads grad_out column j + shift).
std::vector<std::vector<std::pair<int64_t, int64_t>>> input_column_taps(const Geometry& g) {
  std::vector<std::vector<std::pair<int64_t, int64_t>>> taps(g.sw);
  for (int64_t b = 0; b < g.sw; ++b)
    for (int64_t k = 0; k < g.kw; ++k) {
      const int64_t u = b + g.pl - k * g.dw;
      if (floor_div(u, g.sw) * g.sw == u) taps[b].push_back({k, floor_div(u, g.sw)});
    }
  return taps;
}

// Input gradient, per input plane: each (row, column phase) of the input gathers the taps that land on it;
// a stride-1 correlation over a zero-padded copy of grad_out, scattered back with the column stride.
template <typename T>
void planar_input_grad(const T* dy, const T* w, T* dx, int64_t N, int64_t C, int64_t M, int64_t H, int64_t W,
                       const Geometry& g) {
  const int64_t K = g.kh * g.kw;
  const int64_t left = ((g.kw - 1) * g.dw) / g.sw + 1;  // columns of zeros before each grad_out row
  const int64_t padded = left + std::max(g.ow, (g.pl + W) / g.sw + 1) + 1;
  const int64_t columns = (W + g.sw - 1) / g.sw;
  const auto phase_taps = input_column_taps(g);
  const auto row_taps = input_row_taps(H, g);
  at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> rows(M * g.oh * padded), weights(M * K), scratch(columns);
    std::vector<const T*> src(M * K);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task % C;
      const T* dy_planes = dy + ((task / C) * C * M + c * M) * g.oh * g.ow;
      for (int64_t r = 0; r < M * g.oh; ++r) {
        T* dst = rows.data() + r * padded;
        std::fill(dst, dst + left, T(0));
        std::copy(dy_planes + r * g.ow, dy_planes + (r + 1) * g.ow, dst + left);
        std::fill(dst + left + g.ow, dst + padded, T(0));
      }
      T* plane = dx + task * H * W;
      for (int64_t ih = 0; ih < H; ++ih) {
        for (int64_t b = 0; b < std::min(g.sw, W); ++b) {
          int64_t n = 0;
          for (int64_t m = 0; m < M; ++m) {
            for (const auto& [i, oh] : row_taps[ih]) {
              const T* row = rows.data() + (m * g.oh + oh) * padded + left;
              const T* wrow = w + (c * M + m) * K + i * g.kw;
              for (const auto& [k, shift] : phase_taps[b]) {
                src[n] = row + shift;
                weights[n] = wrow[k];
                ++n;
              }
            }
          }
          const int64_t len = (W - b + g.sw - 1) / g.sw;
          T* row = plane + ih * W;
          if (g.sw == 1) {
            correlate_row(row, len, src.data(), weights.data(), n, T(0));
          } else {
            correlate_row(scratch.data(), len, src.data(), weights.data(), n, T(0));
            for (int64_t j = 0; j < len; ++j) row[b + g.sw * j] = scratch[j];
          }
        }
      }
    }
  });
}

// Weight gradient: grad_out rows dotted with the phase grid's tap rows. Tasks are (channel, slice of the
// batch) with partial sums per slice, so a single channel (EEGNet's first layer) still uses every thread.
template <typename T>
void planar_weight_grad(const T* x, const T* dy, T* dw, int64_t N, int64_t C, int64_t M, int64_t H, int64_t W,
                        const Geometry& g) {
  using V = Vectorized<T>;
  const PhaseGrid grid_shape(g);
  const int64_t K = g.kh * g.kw, out_plane = g.oh * g.ow;
  const int64_t slices = std::min<int64_t>(N, ceil_div(4 * at::get_num_threads(), C));
  std::vector<T> partial(slices * C * M * K, T(0));
  const auto columns = grid_shape.tap_columns(g);
  at::parallel_for(0, C * slices, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> grid(grid_shape.size(g));
    std::vector<const T*> src(K);
    std::vector<V> acc(M * K);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task / slices, slice = task % slices;
      std::fill(acc.begin(), acc.end(), V(T(0)));
      for (int64_t n = slice * N / slices; n < (slice + 1) * N / slices; ++n) {
        grid_shape.fill(x + (n * C + c) * H * W, H, W, g, grid.data());
        for (int64_t oh = 0; oh < g.oh; ++oh) {
          // the taps of rows in the padding are zero: dropping them drops their columns of acc too
          int64_t used = 0;
          for (int64_t i = 0; i < g.kh; ++i) used += grid_shape.row_inside(oh * g.sh + i * g.dh, H, g);
          if (used == 0) continue;
          const int64_t taps = grid_shape.taps(grid.data(), oh, H, g, columns.data(), (const T*)nullptr, src.data(), (T*)nullptr);
          const T* d0 = dy + (n * C * M + c * M) * out_plane + oh * g.ow;
          if (taps == K && M > 1) {  // the output channels of this plane in blocks of up to 4
            for (int64_t m0 = 0; m0 < M; m0 += 4) {
              const T* d[4];
              const int64_t mb = std::min<int64_t>(4, M - m0);
              for (int64_t m = 0; m < mb; ++m) d[m] = d0 + (m0 + m) * out_plane;
              V* a = acc.data() + m0 * K;
              switch (mb) {
                case 4: dot_multi<T, 4>(d, g.ow, src.data(), K, a, K); break;
                case 3: dot_multi<T, 3>(d, g.ow, src.data(), K, a, K); break;
                case 2: dot_multi<T, 2>(d, g.ow, src.data(), K, a, K); break;
                default: dot_taps(d[0], g.ow, src.data(), K, a); break;
              }
            }
            continue;
          }
          for (int64_t m = 0; m < M; ++m) {
            const T* d = d0 + m * out_plane;
            if (taps == K) {
              dot_taps(d, g.ow, src.data(), K, acc.data() + m * K);
            } else {  // some kernel rows fall in the padding: accumulate the others in place
              V* a = acc.data() + m * K;
              int64_t t = 0;
              for (int64_t i = 0; i < g.kh; ++i) {
                if (!grid_shape.row_inside(oh * g.sh + i * g.dh, H, g)) continue;
                dot_taps(d, g.ow, src.data() + t, g.kw, a + i * g.kw);
                t += g.kw;
              }
            }
          }
        }
      }
      T* out = partial.data() + (slice * C + c) * M * K;
      for (int64_t i = 0; i < M * K; ++i) out[i] = horizontal_sum(acc[i]);
    }
  });
  for (int64_t c = 0; c < C; ++c)
    for (int64_t i = 0; i < M * K; ++i) {
      T sum = 0;
      for (int64_t s = 0; s < slices; ++s) sum += partial[(s * C + c) * M * K + i];
      dw[c * M * K + i] = sum;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Channels-last kernels (NHWC, depth multiplier 1). Weights as (KH, KW, C) rows.

template <typename T, bool FULL>
inline Vectorized<T> load(const T* p, int64_t n) {
  if constexpr (FULL) return Vectorized<T>::loadu(p);
  else return Vectorized<T>::loadu(p, n);
}

template <typename T, bool FULL>
inline void store(const Vectorized<T>& v, T* p, int64_t n) {
  if constexpr (FULL) v.store(p);
  else v.store(p, n);
}

// A large output written with ordinary stores is first read into the cache (read for ownership): a third of
// the memory traffic of a bandwidth-bound layer. Non-temporal stores skip that where the vector is aligned.
template <typename T, bool FULL>
inline void store_output(const Vectorized<T>& v, T* p, int64_t n, bool stream) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (FULL && std::is_same_v<T, float>) {
    if (stream && (reinterpret_cast<uintptr_t>(p) & 63) == 0) {
      _mm512_stream_ps(p, static_cast<__m512>(v));
      return;
    }
  }
#endif
  store<T, FULL>(v, p, n);
}

// The forward's activation on a finished vector of outputs.
template <typename T>
inline Vectorized<T> finish(const Vectorized<T>& v, const Geometry& g) {
  return g.act == sepconv_cpu::Act::None ? v : sepconv_cpu::activate(v, g.act, static_cast<T>(g.alpha));
}

// P output pixels of one row, channels [c, c + n) (a full vector when FULL): acc[p] = bias + sum over taps.
// `rows[i]` is the input row of kernel row i (nullptr in the padding); pixel p reads column
// (ow + p) * sw - pl + k * dw, checked against the row's ends only when CLIP.
template <typename T, int P, bool CLIP, bool FULL>
void nhwc_pixels(const T* const* rows, const T* wt, const T* bias, T* out, int64_t ow, int64_t c, int64_t n,
                 int64_t C, int64_t W, const Geometry& g) {
  using V = Vectorized<T>;
  V acc[P];
  const V init = bias ? load<T, FULL>(bias + c, n) : V(T(0));
  for (int p = 0; p < P; ++p) acc[p] = init;
  const int64_t kw = g.kw, step = g.sw * C, tap_step = g.dw * C;
  const int64_t col0 = ow * g.sw - g.pl;
  for (int64_t i = 0; i < g.kh; ++i) {
    if (!rows[i]) continue;
    const T* wp = wt + i * kw * C + c;
    const T* xp = rows[i] + col0 * C + c;
    for (int64_t k = 0; k < kw; ++k, wp += C, xp += tap_step) {
      const V wv = load<T, FULL>(wp, n);
      for (int p = 0; p < P; ++p) {
        if constexpr (CLIP) {
          const int64_t col = col0 + k * g.dw + p * g.sw;
          if (col < 0 || col >= W) continue;
        }
        acc[p] = at::vec::fmadd(wv, load<T, FULL>(xp + p * step, n), acc[p]);
      }
    }
  }
  for (int p = 0; p < P; ++p) store<T, FULL>(finish(acc[p], g), out + (ow + p) * C + c, n);
}

// Register-blocked interior: P pixels of one row at unit dilation and column stride SW, where neighbouring
// pixels share input columns; each input vector is loaded once per kernel row and feeds every tap that reads
// it (input column j serves pixel p through tap j - SW * p). The NK taps of a kernel row start at xp / wp.
template <typename T, int P, int SW, int NK, bool FULL>
inline void nhwc_taps(const T* xp, const T* wp, int64_t C, int64_t n, Vectorized<T>* acc) {
  using V = Vectorized<T>;
  V w[NK];
#pragma GCC unroll 16
  for (int k = 0; k < NK; ++k) w[k] = load<T, FULL>(wp + k * C, n);
  constexpr int J = SW * (P - 1) + NK;
#pragma GCC unroll 32
  for (int j = 0; j < J; ++j) {
    const V xv = load<T, FULL>(xp + j * C, n);
#pragma GCC unroll 16
    for (int k = 0; k < NK; ++k) {
      const int d = j - k;
      if (d >= 0 && d % SW == 0 && d / SW < P) acc[d / SW] = at::vec::fmadd(w[k], xv, acc[d / SW]);
    }
  }
}

// The kernel's width KW known at compile time (the common 3, 5, 7): accumulators stay in registers throughout.
template <typename T, int P, int SW, int KW, bool FULL>
void nhwc_block_fixed(const T* const* rows, const T* const* wrows, int64_t taps_rows, const T* bias, T* out,
                      int64_t ow, int64_t c, int64_t n, int64_t C, const Geometry& g) {
  using V = Vectorized<T>;
  V acc[P];
  const V init = bias ? load<T, FULL>(bias + c, n) : V(T(0));
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) acc[p] = init;
  const int64_t col0 = (ow * SW - g.pl) * C + c;
  for (int64_t r = 0; r < taps_rows; ++r) nhwc_taps<T, P, SW, KW, FULL>(rows[r] + col0, wrows[r] + c, C, n, acc);
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) store_output<T, FULL>(finish(acc[p], g), out + (ow + p) * C + c, n, g.stream);
}

// Any width: chunks of up to 8 taps, accumulating in the output.
template <typename T, int P, int SW, bool FULL>
void nhwc_block_chunked(const T* const* rows, const T* const* wrows, int64_t taps_rows, const T* bias, T* out,
                        int64_t ow, int64_t c, int64_t n, int64_t C, const Geometry& g) {
  using V = Vectorized<T>;
  V acc[P];
  const V init = bias ? load<T, FULL>(bias + c, n) : V(T(0));
  for (int p = 0; p < P; ++p) acc[p] = init;
  const int64_t col0 = (ow * SW - g.pl) * C + c;
  for (int64_t r = 0; r < taps_rows; ++r) {
    int64_t k = 0;
    for (; k + 8 <= g.kw; k += 8) nhwc_taps<T, P, SW, 8, FULL>(rows[r] + col0 + k * C, wrows[r] + k * C + c, C, n, acc);
    const T* xp = rows[r] + col0 + k * C;
    const T* wp = wrows[r] + k * C + c;
    switch (g.kw - k) {
      case 7: nhwc_taps<T, P, SW, 7, FULL>(xp, wp, C, n, acc); break;
      case 6: nhwc_taps<T, P, SW, 6, FULL>(xp, wp, C, n, acc); break;
      case 5: nhwc_taps<T, P, SW, 5, FULL>(xp, wp, C, n, acc); break;
      case 4: nhwc_taps<T, P, SW, 4, FULL>(xp, wp, C, n, acc); break;
      case 3: nhwc_taps<T, P, SW, 3, FULL>(xp, wp, C, n, acc); break;
      case 2: nhwc_taps<T, P, SW, 2, FULL>(xp, wp, C, n, acc); break;
      case 1: nhwc_taps<T, P, SW, 1, FULL>(xp, wp, C, n, acc); break;
      default: break;
    }
  }
  for (int p = 0; p < P; ++p) store_output<T, FULL>(finish(acc[p], g), out + (ow + p) * C + c, n, g.stream);
}

template <typename T, int P, bool FULL>
using BlockKernel = void (*)(const T* const*, const T* const*, int64_t, const T*, T*, int64_t, int64_t, int64_t,
                             int64_t, const Geometry&);

template <typename T, int P, bool FULL, int SW>
BlockKernel<T, P, FULL> pick_block_stride(int64_t kw) {
  switch (kw) {
    case 3: return nhwc_block_fixed<T, P, SW, 3, FULL>;
    case 5: return nhwc_block_fixed<T, P, SW, 5, FULL>;
    case 7: return nhwc_block_fixed<T, P, SW, 7, FULL>;
    default: return nhwc_block_chunked<T, P, SW, FULL>;
  }
}

// The register-blocked kernel for this geometry, or nullptr (dilated or wider strides: the generic loop).
template <typename T, int P, bool FULL>
BlockKernel<T, P, FULL> pick_block(const Geometry& g) {
  if (g.dw != 1) return nullptr;
  if (g.sw == 1) return pick_block_stride<T, P, FULL, 1>(g.kw);
  if (g.sw == 2) return pick_block_stride<T, P, FULL, 2>(g.kw);
  return nullptr;
}

// Channels [0, C) of pixels [ow, ow + P): full vectors, then the partial one.
template <typename T, int P>
inline void nhwc_block_all_channels(BlockKernel<T, P, true> full, BlockKernel<T, P, false> partial,
                                    const T* const* taps_x, const T* const* taps_w, int64_t taps_rows, const T* bias,
                                    T* out, int64_t ow, int64_t C, const Geometry& g) {
  constexpr int64_t L = Vectorized<T>::size();
  int64_t c = 0;
  for (; c + L <= C; c += L) full(taps_x, taps_w, taps_rows, bias, out, ow, c, L, C, g);
  if (c < C) partial(taps_x, taps_w, taps_rows, bias, out, ow, c, C - c, C, g);
}

template <typename T, int P, bool CLIP>
inline void nhwc_pixels_all_channels(const T* const* rows, const T* wt, const T* bias, T* out, int64_t ow, int64_t C,
                                     int64_t W, const Geometry& g) {
  constexpr int64_t L = Vectorized<T>::size();
  int64_t c = 0;
  for (; c + L <= C; c += L) nhwc_pixels<T, P, CLIP, true>(rows, wt, bias, out, ow, c, L, C, W, g);
  if (c < C) nhwc_pixels<T, P, CLIP, false>(rows, wt, bias, out, ow, c, C - c, C, W, g);
}

// One output row, pixel blocks outermost so a block's input columns stay in L1 across the channel vectors.
// The interior goes through the register-blocked kernels in blocks of 8, then 4, 2 and 1 pixels.
template <typename T>
void nhwc_row(const T* const* rows, const T* const* taps_x, const T* const* taps_w, int64_t taps_rows, const T* wt,
              const T* bias, T* out, int64_t C, int64_t W, int64_t lo, int64_t hi, const Geometry& g) {
  int64_t ow = 0;
  for (; ow < lo; ++ow) nhwc_pixels_all_channels<T, 1, true>(rows, wt, bias, out, ow, C, W, g);
  if (const auto block8 = pick_block<T, 8, true>(g)) {
    const auto block8_partial = pick_block<T, 8, false>(g);
    for (; ow + 8 <= hi; ow += 8)
      nhwc_block_all_channels<T, 8>(block8, block8_partial, taps_x, taps_w, taps_rows, bias, out, ow, C, g);
    const auto block4 = pick_block<T, 4, true>(g);
    const auto block4_partial = pick_block<T, 4, false>(g);
    for (; ow + 4 <= hi; ow += 4)
      nhwc_block_all_channels<T, 4>(block4, block4_partial, taps_x, taps_w, taps_rows, bias, out, ow, C, g);
    const auto block2 = pick_block<T, 2, true>(g);
    const auto block2_partial = pick_block<T, 2, false>(g);
    for (; ow + 2 <= hi; ow += 2)
      nhwc_block_all_channels<T, 2>(block2, block2_partial, taps_x, taps_w, taps_rows, bias, out, ow, C, g);
    const auto block1 = pick_block<T, 1, true>(g);
    const auto block1_partial = pick_block<T, 1, false>(g);
    for (; ow < hi; ++ow)
      nhwc_block_all_channels<T, 1>(block1, block1_partial, taps_x, taps_w, taps_rows, bias, out, ow, C, g);
  } else {
    for (; ow + 8 <= hi; ow += 8) nhwc_pixels_all_channels<T, 8, false>(rows, wt, bias, out, ow, C, W, g);
    for (; ow < hi; ++ow) nhwc_pixels_all_channels<T, 1, false>(rows, wt, bias, out, ow, C, W, g);
  }
  for (; ow < g.ow; ++ow) nhwc_pixels_all_channels<T, 1, true>(rows, wt, bias, out, ow, C, W, g);
}

// Wide kernels on narrow rows would spend most pixels in the clipped border loop. Then each thread copies the
// input rows it needs once into a small ring of zero-padded rows (`right` zero columns after each row, `g.pl`
// before), so that every pixel is interior, without a padded copy of the whole input.
template <typename T>
struct PaddedRows {
  int64_t width, C, slots;
  std::vector<T> buffer;
  std::vector<int64_t> held;  // which (image, row) each slot holds, -1 for none

  PaddedRows(int64_t W, int64_t left, int64_t right, int64_t C, const Geometry& g)
      : width(left + W + right), C(C), slots((g.kh - 1) * g.dh + g.sh), buffer(slots * width * C, T(0)),
        held(slots, -1) {}

  // The padded copy of input row `index` (image * H + ih); the padding columns are never written.
  const T* row(const T* x, int64_t index, int64_t W, int64_t left) {
    const int64_t slot = index % slots;
    T* dst = buffer.data() + slot * width * C;
    if (held[slot] != index) {
      std::memcpy(dst + left * C, x + index * W * C, W * C * sizeof(T));
      held[slot] = index;
    }
    return dst;
  }
};

// The input rows that one output row reads: rows[i] for kernel row i (nullptr where it falls in the padding), and
// the ones inside the input packed in front with their weight rows, for the register-blocked kernels.
template <typename T>
struct KernelRows {
  std::vector<const T*> rows, taps_x, taps_w;
  int64_t taps = 0;

  explicit KernelRows(int64_t kh) : rows(kh), taps_x(kh), taps_w(kh) {}

  // Output row `oh` of `image`; wide kernels read their rows through `padded` (else nullptr).
  void gather(const T* x, const T* wt, int64_t image, int64_t oh, int64_t H, int64_t W, int64_t C, const Geometry& g,
              PaddedRows<T>* padded) {
    taps = 0;
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t ih = oh * g.sh - g.pt + i * g.dh;
      if (ih < 0 || ih >= H) {
        rows[i] = nullptr;
        continue;
      }
      rows[i] = padded ? padded->row(x, image * H + ih, W, g.pl) : x + (image * H + ih) * W * C;
      taps_x[taps] = rows[i];
      taps_w[taps++] = wt + i * g.kw * C;
    }
  }

  // That output row into `out`.
  void row(const T* wt, const T* bias, T* out, int64_t C, int64_t width, int64_t lo, int64_t hi,
           const Geometry& g) const {
    nhwc_row<T>(rows.data(), taps_x.data(), taps_w.data(), taps, wt, bias, out, C, width, lo, hi, g);
  }
};

template <typename T>
void nhwc_forward(const T* x, const T* wt, const T* bias, T* y, int64_t N, int64_t C, int64_t H, int64_t W,
                  const Geometry& g, int64_t right) {
  // right >= 0: read the rows through PaddedRows (then the kernels see unpadded, wider rows)
  const bool pad = right >= 0;
  Geometry inner = g;
  if (pad) inner.pl = 0;
  const int64_t width = pad ? g.pl + W + right : W;
  const auto [lo, hi] = interior(width, g.ow, g.kw, g.sw, inner.pl, g.dw);
  at::parallel_for(0, N * g.oh, 1, [&](int64_t begin, int64_t end) {
    KernelRows<T> rows(g.kh);
    std::optional<PaddedRows<T>> padded;
    if (pad) padded.emplace(W, g.pl, right, C, g);
    for (int64_t task = begin; task < end; ++task) {
      rows.gather(x, wt, task / g.oh, task % g.oh, H, W, C, g, pad ? &*padded : nullptr);
      rows.row(wt, bias, y + task * g.ow * C, C, width, lo, hi, inner);
    }
#if defined(CPU_CAPABILITY_AVX512)
    if (g.stream) _mm_sfence();  // each thread completes its weakly ordered non-temporal stores
#endif
  });
}

// One input channel into M outputs (EEGNet's temporal layer, a spatially separable stem), channels-last out:
// each output pixel's M values are the taps' input values, broadcast, times the taps' weight vectors.
template <typename T>
void nhwc_broadcast_forward(const T* x, const T* wt, const T* bias, T* y, int64_t N, int64_t M, int64_t H, int64_t W,
                            const Geometry& g) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  at::parallel_for(0, N * g.oh, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t image = task / g.oh, oh = task % g.oh;
      T* row = y + task * g.ow * M;
      for (int64_t c = 0; c < M; c += L) {
        const int64_t n = std::min(L, M - c);
        const V init = bias ? V::loadu(bias + c, n) : V(T(0));
        for (int64_t ow = 0; ow < g.ow; ++ow) {
          V acc = init;
          for (int64_t i = 0; i < g.kh; ++i) {
            const int64_t ih = oh * g.sh - g.pt + i * g.dh;
            if (ih < 0 || ih >= H) continue;
            const T* xrow = x + (image * H + ih) * W;
            for (int64_t k = 0; k < g.kw; ++k) {
              const int64_t iw = ow * g.sw - g.pl + k * g.dw;
              if (iw >= 0 && iw < W) acc = at::vec::fmadd(V(xrow[iw]), V::loadu(wt + (i * g.kw + k) * M + c, n), acc);
            }
          }
          store<T, false>(finish(acc, g), row + ow * M + c, n);
        }
      }
    }
  });
}

// Depthwise then pointwise (inference), a block of output rows at a time: the block's depthwise output, with its
// bias and activation, stays in a per-thread buffer in cache and feeds the pointwise product, so the hidden tensor
// never goes to memory. Rows per block: enough pixels for the product's register blocks, enough blocks for the
// threads.
template <typename T>
void nhwc_separable_forward(const T* x, const T* wt, const T* bias, const T* pwt, int64_t ldw, const T* pw_bias, T* y,
                            int64_t N, int64_t C, int64_t H, int64_t W, int64_t O, const Geometry& g,
                            const Activation& act) {
  const auto [lo, hi] = interior(W, g.ow, g.kw, g.sw, g.pl, g.dw);
  const int64_t enough_pixels = (4 * sepconv_cpu::kPixels + g.ow - 1) / g.ow;
  const int64_t enough_tasks = std::max<int64_t>(1, N * g.oh / (4 * at::get_num_threads()));
  const int64_t rows = std::max<int64_t>(1, std::min({enough_pixels, enough_tasks, g.oh}));
  const int64_t blocks = (g.oh + rows - 1) / rows;
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    KernelRows<T> kernel_rows(g.kh);
    std::vector<T> hidden(rows * g.ow * C);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t image = task / blocks, oh0 = (task % blocks) * rows, oh1 = std::min(g.oh, oh0 + rows);
      for (int64_t oh = oh0; oh < oh1; ++oh) {
        kernel_rows.gather(x, wt, image, oh, H, W, C, g, nullptr);
        kernel_rows.row(wt, bias, hidden.data() + (oh - oh0) * g.ow * C, C, W, lo, hi, g);
      }
      sepconv_cpu::pointwise_rows<T>(hidden.data(), pwt, ldw, pw_bias, y + (image * g.oh + oh0) * g.ow * O, O, 0,
                                     (oh1 - oh0) * g.ow, 0, O, C, act);
    }
  });
}

// Input gradient for any stride. The input pixels of one row and one column phase b (iw = b, b + sw, ...) are
// reached by the same kernel taps, tap (i, k) reading grad_out column j + shift_k for the phase's j-th pixel:
// a stride-1 loop over grad_out with that subset of taps, register-blocked over P pixels where every tap's
// column is inside the row, written back every sw-th pixel.
struct StridedTap {
  const void* row;  // grad_out row of the tap's kernel row
  const void* weight;  // the tap's weights, (KH, KW, C) rows
  int64_t shift;
};

template <typename T, int P, bool CLIP, bool FULL>
void nhwc_gather_pixels(const StridedTap* taps, int64_t count, T* out, int64_t j, int64_t c, int64_t n, int64_t C,
                        int64_t out_step, int64_t OW) {
  using V = Vectorized<T>;
  V acc[P];
  for (int p = 0; p < P; ++p) acc[p] = V(T(0));
  for (int64_t t = 0; t < count; ++t) {
    const V wv = load<T, FULL>(static_cast<const T*>(taps[t].weight) + c, n);
    const int64_t col = j + taps[t].shift;
    const T* src = static_cast<const T*>(taps[t].row) + col * C + c;
    for (int p = 0; p < P; ++p) {
      if constexpr (CLIP) {
        if (col + p < 0 || col + p >= OW) continue;
      }
      acc[p] = at::vec::fmadd(wv, load<T, FULL>(src + p * C, n), acc[p]);
    }
  }
  for (int p = 0; p < P; ++p) store<T, FULL>(acc[p], out + (j + p) * out_step + c, n);
}

template <typename T, int P, bool CLIP>
void nhwc_gather_all_channels(const StridedTap* taps, int64_t count, T* out, int64_t j, int64_t C, int64_t out_step,
                              int64_t OW) {
  constexpr int64_t L = Vectorized<T>::size();
  int64_t c = 0;
  for (; c + L <= C; c += L) nhwc_gather_pixels<T, P, CLIP, true>(taps, count, out, j, c, L, C, out_step, OW);
  if (c < C) nhwc_gather_pixels<T, P, CLIP, false>(taps, count, out, j, c, C - c, C, out_step, OW);
}

template <typename T>
void nhwc_input_grad_strided(const T* dy, const T* wt, T* dx, int64_t N, int64_t C, int64_t H, int64_t W,
                             const Geometry& g) {
  constexpr int P = 4;
  const auto phase_taps = input_column_taps(g);
  const auto row_taps = input_row_taps(H, g);
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<StridedTap> taps(g.kh * g.kw);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t image = task / H, ih = task % H;
      for (int64_t b = 0; b < std::min(g.sw, W); ++b) {
        int64_t count = 0, lo = 0, hi = INT64_MAX;  // pixels [lo, hi) read every tap's column inside the row
        for (const auto& [i, oh] : row_taps[ih]) {
          const T* row = dy + (image * g.oh + oh) * g.ow * C;
          for (const auto& [k, shift] : phase_taps[b]) {
            taps[count++] = {row, wt + (i * g.kw + k) * C, shift};
            lo = std::max(lo, -shift);
            hi = std::min(hi, g.ow - shift);
          }
        }
        const int64_t pixels = (W - b + g.sw - 1) / g.sw;
        hi = std::clamp<int64_t>(hi, 0, pixels);
        lo = std::min(lo, hi);
        T* out = dx + (task * W + b) * C;
        const int64_t out_step = g.sw * C;
        int64_t j = 0;
        for (; j < lo; ++j) nhwc_gather_all_channels<T, 1, true>(taps.data(), count, out, j, C, out_step, g.ow);
        for (; j + P <= hi; j += P) nhwc_gather_all_channels<T, P, false>(taps.data(), count, out, j, C, out_step, g.ow);
        for (; j < pixels; ++j) nhwc_gather_all_channels<T, 1, true>(taps.data(), count, out, j, C, out_step, g.ow);
      }
    }
  });
}

// Weight gradient: per thread partial sums of (KH, KW, C), reduced at the end. For a kernel row and a vector of
// channels, up to 8 taps of that row accumulate in registers while grad_out is loaded once per pixel.
template <typename T, int NT, bool FULL>
void nhwc_wgrad_taps(const T* xrow, const T* dyrow, T* partial, int64_t k0, int64_t c, int64_t n, int64_t C,
                     int64_t W, const Geometry& g, const Bounds* bounds) {
  using V = Vectorized<T>;
  // U pixels in flight, each with its own accumulators: a tap's sum over pixels is a chain of dependent FMAs
  constexpr int U = NT >= 6 ? 2 : (NT >= 3 ? 3 : 6);
  V acc[U][NT];
  for (int u = 0; u < U; ++u)
    for (int t = 0; t < NT; ++t) acc[u][t] = V(T(0));
  const int64_t pad = g.pl - k0 * g.dw, tap_step = g.dw * C, step = g.sw * C;
  const auto [lo, hi] = bounds[k0];  // pixels for which all NT taps fall inside the row
  const T* d = dyrow + lo * C + c;
  const T* xp = xrow + (lo * g.sw - pad) * C + c;
  int64_t ow = lo;
  for (; ow + U <= hi; ow += U, d += U * C, xp += U * step) {
#pragma GCC unroll 6
    for (int u = 0; u < U; ++u) {
      const V dv = load<T, FULL>(d + u * C, n);
#pragma GCC unroll 8
      for (int t = 0; t < NT; ++t)
        acc[u][t] = at::vec::fmadd(dv, load<T, FULL>(xp + u * step + t * tap_step, n), acc[u][t]);
    }
  }
  for (; ow < hi; ++ow, d += C, xp += step) {
    const V dv = load<T, FULL>(d, n);
    for (int t = 0; t < NT; ++t) acc[0][t] = at::vec::fmadd(dv, load<T, FULL>(xp + t * tap_step, n), acc[0][t]);
  }
  for (int64_t ow = 0; ow < g.ow; ++ow) {
    if (ow == lo) ow = hi;
    if (ow >= g.ow) break;
    const V dv = load<T, FULL>(dyrow + ow * C + c, n);
    for (int t = 0; t < NT; ++t) {
      const int64_t col = ow * g.sw - pad + t * g.dw;
      if (col >= 0 && col < W) acc[0][t] = at::vec::fmadd(dv, load<T, FULL>(xrow + col * C + c, n), acc[0][t]);
    }
  }
  for (int t = 0; t < NT; ++t) {
    for (int u = 1; u < U; ++u) acc[0][t] = acc[0][t] + acc[u][t];
    T* p = partial + (k0 + t) * C + c;
    store<T, FULL>(load<T, FULL>(p, n) + acc[0][t], p, n);
  }
}

template <typename T, bool FULL>
void nhwc_wgrad_row(const T* xrow, const T* dyrow, T* partial, int64_t c, int64_t n, int64_t C, int64_t W,
                    const Geometry& g, const Bounds* bounds) {
  int64_t k = 0;
  for (; k + 8 <= g.kw; k += 8) nhwc_wgrad_taps<T, 8, FULL>(xrow, dyrow, partial, k, c, n, C, W, g, bounds);
  switch (g.kw - k) {
    case 7: nhwc_wgrad_taps<T, 7, FULL>(xrow, dyrow, partial, k, c, n, C, W, g, bounds); break;
    case 6: nhwc_wgrad_taps<T, 6, FULL>(xrow, dyrow, partial, k, c, n, C, W, g, bounds); break;
    case 5: nhwc_wgrad_taps<T, 5, FULL>(xrow, dyrow, partial, k, c, n, C, W, g, bounds); break;
    case 4: nhwc_wgrad_taps<T, 4, FULL>(xrow, dyrow, partial, k, c, n, C, W, g, bounds); break;
    case 3: nhwc_wgrad_taps<T, 3, FULL>(xrow, dyrow, partial, k, c, n, C, W, g, bounds); break;
    case 2: nhwc_wgrad_taps<T, 2, FULL>(xrow, dyrow, partial, k, c, n, C, W, g, bounds); break;
    case 1: nhwc_wgrad_taps<T, 1, FULL>(xrow, dyrow, partial, k, c, n, C, W, g, bounds); break;
    default: break;
  }
}

template <typename T>
void nhwc_weight_grad(const T* x, const T* dy, T* dwt, int64_t N, int64_t C, int64_t H, int64_t W,
                      const Geometry& g) {
  constexpr int64_t L = Vectorized<T>::size();
  const int64_t K = g.kh * g.kw;
  const int64_t threads = at::get_num_threads();
  std::vector<T> partial(threads * K * C, T(0));
  // the interior of each chunk of 8 taps (at its first tap k0), worked out once rather than per row and channel
  std::vector<Bounds> bounds(g.kw);
  for (int64_t k0 = 0; k0 < g.kw; k0 += 8)
    bounds[k0] = interior(W, g.ow, std::min<int64_t>(8, g.kw - k0), g.sw, g.pl - k0 * g.dw, g.dw);
  at::parallel_for(0, N * g.oh, 1, [&](int64_t begin, int64_t end) {
    const int64_t thread = at::get_thread_num();
    T* mine = partial.data() + thread * K * C;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t image = task / g.oh, oh = task % g.oh;
      const T* dyrow = dy + task * g.ow * C;
      for (int64_t i = 0; i < g.kh; ++i) {
        const int64_t ih = oh * g.sh - g.pt + i * g.dh;
        if (ih < 0 || ih >= H) continue;
        const T* xrow = x + (image * H + ih) * W * C;
        T* row_partial = mine + i * g.kw * C;
        int64_t c = 0;
        for (; c + L <= C; c += L) nhwc_wgrad_row<T, true>(xrow, dyrow, row_partial, c, L, C, W, g, bounds.data());
        if (c < C) nhwc_wgrad_row<T, false>(xrow, dyrow, row_partial, c, C - c, C, W, g, bounds.data());
      }
    }
  });
  at::parallel_for(0, K * C, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T sum = 0;
      for (int64_t t = 0; t < threads; ++t) sum += partial[t * K * C + i];
      dwt[i] = sum;
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// Entry points: tensors are 4-D (N, C, H, W); the layout decides the kernel family.

std::atomic<int64_t> kernel_calls{0};

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4 && t.device().is_cpu() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble),
              "sepconv cpu kernels: ", name, " must be a 4-D float32/float64 CPU tensor; got ", t.sizes(), " ",
              t.scalar_type());
}

// (C * M, 1, KH, KW) -> (KH, KW, C * M) rows for the channels-last kernels.
at::Tensor weight_rows(const at::Tensor& weight, bool flip) {
  auto w = flip ? weight.flip({2, 3}) : weight;
  return w.squeeze(1).permute({1, 2, 0}).contiguous();
}

// The channels-last forward on x (N, C, H, W channels-last); wide kernels whose rows are mostly border read
// them through PaddedRows.
void run_nhwc_forward(const at::Tensor& x, const at::Tensor& wt, const at::Tensor& bias, at::Tensor& y, Geometry g,
                      const Activation& act = {}) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto [lo, hi] = interior(W, g.ow, g.kw, g.sw, g.pl, g.dw);
  int64_t right = -1;
  if (g.pl >= 0 && g.kw > 3 && 4 * (hi - lo) < 3 * g.ow)
    right = std::max<int64_t>(0, (g.ow - 1) * g.sw + (g.kw - 1) * g.dw + 1 - g.pl - W);
  g.stream = y.nbytes() > (8 << 20);
  g.act = act.kind;
  g.alpha = act.alpha;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sepconv_forward_nhwc", [&] {
    nhwc_forward<scalar_t>(x.data_ptr<scalar_t>(), wt.data_ptr<scalar_t>(),
                           bias.defined() ? bias.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), N, C, H, W, g,
                           right);
  });
}

// PyTorch's convolutions answer a channels-last input or weight with a channels-last output.
bool channels_last_output(const at::Tensor& t, const at::Tensor& weight) {
  return t.suggest_memory_format() == at::MemoryFormat::ChannelsLast ||
         weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

// The channels-last kernels vectorise along channels: worth it from about half a vector of them on. They also
// take contiguous inputs whose output rows are short (the planar kernels' vectors run along rows), through a
// transposed copy in and out.
bool use_nhwc(bool channels_last, int64_t C, int64_t M, int64_t out_width) {
  return M == 1 && C >= std::max<int64_t>(4, Vectorized<float>::size() / 2) &&
         (channels_last || (C >= 2 * Vectorized<float>::size() && out_width < 2 * Vectorized<float>::size()));
}

// The planar kernels' output: NCHW, which for one channel already has PyTorch's channels-last strides.
at::Tensor planar_output(at::IntArrayRef size, const at::TensorOptions& options, bool channels_last) {
  const bool one_channel = channels_last && size[1] == 1;
  return sepconv_cpu::empty_output(
      size, options.memory_format(one_channel ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
}

at::Tensor in_layout(const at::Tensor& t, bool channels_last) {
  return channels_last ? t.contiguous(at::MemoryFormat::ChannelsLast) : t;
}

at::Tensor forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   at::IntArrayRef geometry, int64_t activation, double alpha, bool prefer_channels_last) {
  check(x, "x");
  const Activation act = sepconv_cpu::read_activation(activation, alpha);
  check(weight, "weight");
  ++kernel_calls;
  const Geometry g = read_geometry(geometry);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), CM = weight.size(0), M = CM / C;
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const bool cl = channels_last_output(x, weight);
  if (C == 1 && M >= Vectorized<float>::size() && g.kh * g.kw <= 25 && prefer_channels_last) {
    // one input channel has no layout of its own; a caller running channels-last asks for that output
    auto y = sepconv_cpu::empty_output({N, CM, g.oh, g.ow},
                                       x.options().memory_format(at::MemoryFormat::ChannelsLast));
    Geometry epilogue = g;
    epilogue.act = act.kind;
    epilogue.alpha = act.alpha;
    const auto xc = x.contiguous();
    const auto wt = weight_rows(weight, false);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sepconv_forward_broadcast", [&] {
      nhwc_broadcast_forward<scalar_t>(xc.data_ptr<scalar_t>(), wt.data_ptr<scalar_t>(),
                                       b.defined() ? b.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), N, CM,
                                       H, W, epilogue);
    });
    return y;
  }
  if (use_nhwc(cl, C, M, g.ow)) {
    const auto xc = x.contiguous(at::MemoryFormat::ChannelsLast);
    auto y = sepconv_cpu::empty_output({N, CM, g.oh, g.ow},
                                       x.options().memory_format(at::MemoryFormat::ChannelsLast));
    run_nhwc_forward(xc, weight_rows(weight, false), b, y, g, act);
    return cl ? y : y.contiguous();
  }
  const auto xc = x.contiguous();
  const auto wc = weight.contiguous();
  auto y = planar_output({N, CM, g.oh, g.ow}, x.options(), cl);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sepconv_forward_planar", [&] {
    planar_forward<scalar_t>(xc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(),
                             b.defined() ? b.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), N, C, M, H, W, g,
                             act);
  });
  return in_layout(y, cl);
}

// Depthwise (with its activation) then pointwise (with its own), fused where the depthwise kernels run
// channels-last with unpadded rows; otherwise the two kernels one after the other.
at::Tensor separable(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     at::IntArrayRef geometry, int64_t dw_activation, double dw_alpha, const at::Tensor& pw_weight,
                     const std::optional<at::Tensor>& pw_bias, int64_t activation, double alpha) {
  check(x, "x");
  check(weight, "weight");
  Geometry g = read_geometry(geometry);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), M = weight.size(0) / C;
  const int64_t O = pw_weight.size(0);
  TORCH_CHECK(pw_weight.dim() == 4 && pw_weight.size(1) == weight.size(0) && pw_weight.scalar_type() == x.scalar_type(),
              "sepconv cpu separable: pw_weight must be (C_out, ", weight.size(0), ", 1, 1); got ", pw_weight.sizes());
  const auto [lo, hi] = interior(W, g.ow, g.kw, g.sw, g.pl, g.dw);
  const bool padded_rows = g.pl >= 0 && g.kw > 3 && 4 * (hi - lo) < 3 * g.ow;  // see run_nhwc_forward
  if (!(use_nhwc(true, C, M, g.ow) && x.suggest_memory_format() == at::MemoryFormat::ChannelsLast) || padded_rows)
    return sepconv_cpu::pointwise(forward(x, weight, bias, geometry, dw_activation, dw_alpha, false), pw_weight,
                                  pw_bias, activation, alpha);
  ++kernel_calls;
  const Activation dw_act = sepconv_cpu::read_activation(dw_activation, dw_alpha);
  const Activation act = sepconv_cpu::read_activation(activation, alpha);
  g.act = dw_act.kind;
  g.alpha = dw_act.alpha;
  const auto xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const auto wt = weight_rows(weight, false);
  const auto columns = sepconv_cpu::weight_columns(pw_weight);
  const at::Tensor& pwt = columns.first;
  const int64_t ldw = columns.second;
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor pb = pw_bias.has_value() ? pw_bias->contiguous() : at::Tensor();
  auto y = sepconv_cpu::empty_output({N, O, g.oh, g.ow}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sepconv_separable_nhwc", [&] {
    nhwc_separable_forward<scalar_t>(xc.data_ptr<scalar_t>(), wt.data_ptr<scalar_t>(),
                                     b.defined() ? b.data_ptr<scalar_t>() : nullptr, pwt.data_ptr<scalar_t>(), ldw,
                                     pb.defined() ? pb.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), N, C, H,
                                     W, O, g, act);
  });
  return y;
}

at::Tensor input_grad(const at::Tensor& grad_out, const at::Tensor& weight, at::IntArrayRef input_size,
                      at::IntArrayRef geometry) {
  check(grad_out, "grad_out");
  check(weight, "weight");
  ++kernel_calls;
  const Geometry g = read_geometry(geometry);
  const int64_t N = input_size[0], C = input_size[1], H = input_size[2], W = input_size[3];
  const int64_t M = weight.size(0) / C;
  const bool cl = channels_last_output(grad_out, weight);
  if (use_nhwc(cl, C, M, W)) {
    const auto dyc = grad_out.contiguous(at::MemoryFormat::ChannelsLast);
    auto dx = sepconv_cpu::empty_output({N, C, H, W},
                                        grad_out.options().memory_format(at::MemoryFormat::ChannelsLast));
    if (g.sh == 1 && g.sw == 1) {
      // stride 1: the forward kernel with the flipped kernel and the flipped padding
      const Geometry flipped{g.kh, g.kw, H, W, 1, 1, g.flip_pt, g.flip_pl, g.dh, g.dw, g.pt, g.pl};
      run_nhwc_forward(dyc, weight_rows(weight, true), at::Tensor(), dx, flipped);
    } else {
      const auto wt = weight_rows(weight, false);
      AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "sepconv_input_grad_nhwc_strided", [&] {
        nhwc_input_grad_strided<scalar_t>(dyc.data_ptr<scalar_t>(), wt.data_ptr<scalar_t>(),
                                          dx.data_ptr<scalar_t>(), N, C, H, W, g);
      });
    }
    return cl ? dx : dx.contiguous();
  }
  const auto dyc = grad_out.contiguous();
  const auto wc = weight.contiguous();
  auto dx = planar_output({N, C, H, W}, grad_out.options(), cl);
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "sepconv_input_grad_planar", [&] {
    planar_input_grad<scalar_t>(dyc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), N, C, M,
                                H, W, g);
  });
  return in_layout(dx, cl);
}

at::Tensor weight_grad(const at::Tensor& x, const at::Tensor& grad_out, at::IntArrayRef weight_size,
                       at::IntArrayRef geometry) {
  check(x, "x");
  check(grad_out, "grad_out");
  ++kernel_calls;
  const Geometry g = read_geometry(geometry);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), CM = weight_size[0], M = CM / C;
  if (use_nhwc(x.suggest_memory_format() == at::MemoryFormat::ChannelsLast, C, M, g.ow)) {
    const auto xc = x.contiguous(at::MemoryFormat::ChannelsLast);
    const auto dyc = grad_out.contiguous(at::MemoryFormat::ChannelsLast);
    auto dwt = at::empty({g.kh, g.kw, C}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sepconv_weight_grad_nhwc", [&] {
      nhwc_weight_grad<scalar_t>(xc.data_ptr<scalar_t>(), dyc.data_ptr<scalar_t>(), dwt.data_ptr<scalar_t>(), N, C,
                                 H, W, g);
    });
    return dwt.permute({2, 0, 1}).unsqueeze(1).contiguous();
  }
  const auto xc = x.contiguous();
  const auto dyc = grad_out.contiguous();
  auto dw = at::empty({CM, 1, g.kh, g.kw}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sepconv_weight_grad_planar", [&] {
    planar_weight_grad<scalar_t>(xc.data_ptr<scalar_t>(), dyc.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>(), N, C, M,
                                 H, W, g);
  });
  return dw;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "depthwise convolution, forward, with an activation in the epilogue", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("geometry"), py::arg("activation") = 0, py::arg("alpha") = 1.0,
        py::arg("prefer_channels_last") = false);
  m.def("pointwise", &sepconv_cpu::pointwise, "pointwise convolution with bias and activation in the epilogue");
  m.def("batch_norm_act_forward", &sepconv_cpu::batch_norm_act_forward, "batch norm (batch statistics) + activation");
  m.def("batch_norm_act_backward", &sepconv_cpu::batch_norm_act_backward, "its gradients of x, weight and bias");
  m.def("release_memory", &sepconv_cpu::release_pool, "frees the output pool's free blocks; returns the bytes");
  m.def("separable", &separable, "depthwise then pointwise convolution, fused, each with bias and activation");
  m.def("input_grad", &input_grad, "depthwise convolution, gradient of the input");
  m.def("weight_grad", &weight_grad, "depthwise convolution, gradient of the weight");
  m.def("kernel_calls", [] { return kernel_calls.load(); }, "how many times a kernel ran (tests read it)");
  m.def("vector_width", [] { return (int64_t)Vectorized<float>::size(); }, "float32 lanes of the vector unit");
}
