// The planar (NCHW) kernels: forward, input gradient and weight gradient, any depth multiplier.
//
// Each task owns one (image, input channel) plane and lays it out once as a zero-padded "phase grid" (every row
// split into stride phases), so that each tap is one unit-stride loop over an output row whatever the stride,
// dilation or padding. The row primitives take such rows as `src[t]` (one pointer per tap); vectors run along
// output columns and are register-blocked over them, or over the output channels of a depth multiplier.

#include "planar.h"
#include "width.h"

#include <algorithm>
#include <vector>

namespace sepconv_cpu::planar {

namespace {

// The widest blocks of output channels (of one input plane) that the primitives keep in registers.
inline constexpr int kOutputBlock = 8;  // forward: 8 x 2 accumulators
inline constexpr int kDotBlock = 4;  // weight gradient: 4 output channels x 4 taps
// Taps per block of the weight gradient's single-output dots: 8 accumulators and the loads feeding them.
inline constexpr int kTapBlock = 8;

// out[j] = init + sum_t w[t] * src[t][j] for j < len; four vectors of output columns stay in registers.
template <typename T>
void correlate_row(T* out, int64_t len, const T* const* src, const acc_t<T>* w, int64_t taps, acc_t<T> init) {
  using V = Vectorized<acc_t<T>>;
  constexpr int64_t L = V::size();
  int64_t j = 0;
  for (; j + 4 * L <= len; j += 4 * L) {
    V a0(init), a1(init), a2(init), a3(init);
    for (int64_t t = 0; t < taps; ++t) {
      const T* s = src[t] + j;
      const V wt(w[t]);
      a0 = at::vec::fmadd(wt, load_vec(s), a0);
      a1 = at::vec::fmadd(wt, load_vec(s + L), a1);
      a2 = at::vec::fmadd(wt, load_vec(s + 2 * L), a2);
      a3 = at::vec::fmadd(wt, load_vec(s + 3 * L), a3);
    }
    store_vec(a0, out + j);
    store_vec(a1, out + j + L);
    store_vec(a2, out + j + 2 * L);
    store_vec(a3, out + j + 3 * L);
  }
  for (; j < len; j += L) {
    const int64_t n = std::min<int64_t>(L, len - j);
    V a(init);
    for (int64_t t = 0; t < taps; ++t) a = at::vec::fmadd(V(w[t]), load_vec(src[t] + j, n), a);
    store_vec(a, out + j, n);
  }
}

// The MB outputs of one input plane (a depth multiplier) at once: out[m][j] = init[m] + sum_t w[m][t] * src[t][j].
// Each input vector is loaded once for all MB weights, so the loads no longer bound the FMAs.
template <typename T, int MB>
void correlate_row_multi(T* const* out, int64_t len, const T* const* src, const acc_t<T>* w, int64_t taps,
                         const acc_t<T>* init) {
  using V = Vectorized<acc_t<T>>;
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
      for (int v = 0; v < NV; ++v) xv[v] = load_vec(src[t] + j + v * L);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) {
        const V wm(w[m * taps + t]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) a[m][v] = at::vec::fmadd(wm, xv[v], a[m][v]);
      }
    }
    for (int m = 0; m < MB; ++m)
      for (int v = 0; v < NV; ++v) store_vec(a[m][v], out[m] + j + v * L);
  }
  for (; j < len; j += L) {
    const int64_t n = std::min<int64_t>(L, len - j);
    V a[MB];
    for (int m = 0; m < MB; ++m) a[m] = V(init[m]);
    for (int64_t t = 0; t < taps; ++t) {
      const V xv = load_vec(src[t] + j, n);
      for (int m = 0; m < MB; ++m) a[m] = at::vec::fmadd(V(w[m * taps + t]), xv, a[m]);
    }
    for (int m = 0; m < MB; ++m) store_vec(a[m], out[m] + j, n);
  }
}

// Rows of mb (<= kOutputBlock) output channels of one input plane; weights hold mb rows of `taps` values.
template <typename T>
void correlate_outputs(T* const* out, int64_t mb, int64_t len, const T* const* src, const acc_t<T>* w, int64_t taps,
                       const acc_t<T>* init) {
  with_width<kOutputBlock>(mb, [&](auto width) {
    constexpr int MB = decltype(width)::value;
    if constexpr (MB == 1) correlate_row(out[0], len, src, w, taps, init[0]);
    else correlate_row_multi<T, MB>(out, len, src, w, taps, init);
  });
}

// acc[t] (one vector per tap) += d[j] * src[t][j] over j < len, NT taps at a time so d is loaded once per NT.
// Each tap's sum is a chain of dependent FMAs: with few taps, U vectors of columns go to separate accumulators
// so that enough chains are in flight to keep the FMA units busy.
template <typename T, int NT>
void dot_taps_block(const T* d, int64_t len, const T* const* src, Vectorized<acc_t<T>>* acc) {
  using V = Vectorized<acc_t<T>>;
  constexpr int64_t L = V::size();
  constexpr int U = NT >= 6 ? 1 : (NT >= 3 ? 2 : 4);
  V a[U][NT];
  for (int i = 0; i < NT; ++i) {
    a[0][i] = acc[i];
    for (int u = 1; u < U; ++u) a[u][i] = V(acc_t<T>(0));
  }
  int64_t j = 0;
  for (; j + U * L <= len; j += U * L) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const V dv = load_vec(d + j + u * L);
#pragma GCC unroll 8
      for (int i = 0; i < NT; ++i) a[u][i] = at::vec::fmadd(dv, load_vec(src[i] + j + u * L), a[u][i]);
    }
  }
  for (; j < len; j += L) {
    const int64_t n = std::min<int64_t>(L, len - j);
    const V dv = load_vec(d + j, n);  // the lanes past n load as zeros
    for (int i = 0; i < NT; ++i) a[0][i] = at::vec::fmadd(dv, load_vec(src[i] + j, n), a[0][i]);
  }
  for (int i = 0; i < NT; ++i) {
    for (int u = 1; u < U; ++u) a[0][i] = a[0][i] + a[u][i];
    acc[i] = a[0][i];
  }
}

template <typename T>
void dot_taps(const T* d, int64_t len, const T* const* src, int64_t taps, Vectorized<acc_t<T>>* acc) {
  in_chunks<kTapBlock>(taps, [&](int64_t t, auto width) {
    dot_taps_block<T, decltype(width)::value>(d, len, src + t, acc + t);
  });
}

// The weight gradient's dots for MB output channels of one input plane (a depth multiplier) and NT taps:
// acc[m * stride + t] += sum_j d[m][j] * src[t][j]; each vector of src and of d is loaded once for the block.
template <typename T, int MB, int NT>
void dot_multi_block(const T* const* d, int64_t len, const T* const* src, Vectorized<acc_t<T>>* acc,
                     int64_t stride) {
  using V = Vectorized<acc_t<T>>;
  constexpr int64_t L = V::size();
  V a[MB][NT];
  for (int m = 0; m < MB; ++m)
    for (int t = 0; t < NT; ++t) a[m][t] = acc[m * stride + t];
  int64_t j = 0;
  for (; j + L <= len; j += L) {
    V xv[NT];
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) xv[t] = load_vec(src[t] + j);
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) {
      const V dv = load_vec(d[m] + j);
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) a[m][t] = at::vec::fmadd(dv, xv[t], a[m][t]);
    }
  }
  if (j < len) {  // the lanes past the row's end load as zeros
    const int64_t n = len - j;
    V xv[NT];
    for (int t = 0; t < NT; ++t) xv[t] = load_vec(src[t] + j, n);
    for (int m = 0; m < MB; ++m) {
      const V dv = load_vec(d[m] + j, n);
      for (int t = 0; t < NT; ++t) a[m][t] = at::vec::fmadd(dv, xv[t], a[m][t]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int t = 0; t < NT; ++t) acc[m * stride + t] = a[m][t];
}

template <typename T, int MB>
void dot_multi(const T* const* d, int64_t len, const T* const* src, int64_t taps, Vectorized<acc_t<T>>* acc,
               int64_t stride) {
  in_chunks<kDotBlock>(taps, [&](int64_t t, auto width) {
    dot_multi_block<T, MB, decltype(width)::value>(d, len, src + t, acc + t, stride);
  });
}

// The dots of mb (<= kDotBlock) output channels of one input plane with all `taps` taps, accumulators `taps` apart.
template <typename T>
void dot_outputs(const T* const* d, int64_t mb, int64_t len, const T* const* src, int64_t taps,
                 Vectorized<acc_t<T>>* acc) {
  with_width<kDotBlock>(mb, [&](auto width) {
    constexpr int MB = decltype(width)::value;
    if constexpr (MB == 1) dot_taps(d[0], len, src, taps, acc);
    else dot_multi<T, MB>(d, len, src, taps, acc, taps);
  });
}

template <typename A>
A horizontal_sum(const Vectorized<A>& v) {
  __at_align__ A lanes[Vectorized<A>::size()];
  v.store(lanes);
  A sum = 0;
  for (int64_t i = 0; i < Vectorized<A>::size(); ++i) sum += lanes[i];
  return sum;
}

// The zero-padded phase grid of one H x W plane: padded row r (input row r - pad_top), phase p holds the padded
// columns p, p + stride_w, p + 2 stride_w, ...; q entries per phase. Rows wholly in the padding are left
// unwritten: the kernels skip their taps.
struct PhaseGrid {
  int64_t rows, q;
  explicit PhaseGrid(const Geometry& g)
      : rows((g.out_h - 1) * g.stride_h + (g.kernel_h - 1) * g.dilation_h + 1),
        q(g.out_w + ((g.kernel_w - 1) * g.dilation_w) / g.stride_w) {}
  int64_t size(const Geometry& g) const { return rows * g.stride_w * q; }
  bool row_inside(int64_t r, int64_t H, const Geometry& g) const { return r - g.pad_top >= 0 && r - g.pad_top < H; }

  template <typename T>
  void fill(const T* plane, int64_t H, int64_t W, const Geometry& g, T* grid) const {
    const int64_t sw = g.stride_w, pl = g.pad_left;
    for (int64_t r = 0; r < rows; ++r) {
      if (!row_inside(r, H, g)) continue;
      const T* row = plane + (r - g.pad_top) * W;
      for (int64_t p = 0; p < sw; ++p) {
        T* dst = grid + (r * sw + p) * q;
        if (sw == 1) {
          // columns j - pad_left inside [0, W) are a plain copy; the rest is padding
          const int64_t lo = std::clamp<int64_t>(pl, 0, q), hi = std::clamp<int64_t>(W + pl, lo, q);
          std::fill(dst, dst + lo, T(0));
          std::copy(row + lo - pl, row + hi - pl, dst + lo);
          std::fill(dst + hi, dst + q, T(0));
        } else {
          for (int64_t j = 0; j < q; ++j) {
            const int64_t col = p + sw * j - pl;
            dst[j] = (col >= 0 && col < W) ? row[col] : T(0);
          }
        }
      }
    }
  }

  // Where tap (i, k) starts inside the grid rows of kernel row i: its phase and column, worked out once per call.
  std::vector<int64_t> tap_columns(const Geometry& g) const {
    std::vector<int64_t> columns(g.kernel_w);
    for (int64_t k = 0; k < g.kernel_w; ++k)
      columns[k] = ((k * g.dilation_w) % g.stride_w) * q + (k * g.dilation_w) / g.stride_w;
    return columns;
  }

  // Pointers to the taps of output row oh that touch input rows, and (where `tap_weights`) their weights
  // weight[i * kernel_w + k]; returns how many.
  template <typename T>
  int64_t taps(const T* grid, int64_t oh, int64_t H, const Geometry& g, const int64_t* columns, const T* weight,
               const T** src, acc_t<T>* tap_weights) const {
    int64_t n = 0;
    for (int64_t i = 0; i < g.kernel_h; ++i) {
      const int64_t r = oh * g.stride_h + i * g.dilation_h;
      if (!row_inside(r, H, g)) continue;
      const T* row = grid + r * g.stride_w * q;
      for (int64_t k = 0; k < g.kernel_w; ++k) {
        src[n] = row + columns[k];
        if (tap_weights) tap_weights[n] = to_acc(weight[i * g.kernel_w + k]);
        ++n;
      }
    }
    return n;
  }
};

template <typename T>
void forward_kernel(const T* x, const T* weight, const T* bias, T* y, int64_t N, int64_t C, int64_t M, int64_t H,
                    int64_t W, const Geometry& g, const Activation& act) {
  using A = acc_t<T>;
  const PhaseGrid grid_shape(g);
  const int64_t K = g.kernel_h * g.kernel_w, out_plane = g.out_h * g.out_w;
  const auto columns = grid_shape.tap_columns(g);
  at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> grid(grid_shape.size(g));
    std::vector<A> weights(kOutputBlock * K), inits(kOutputBlock);
    std::vector<const T*> src(K);
    std::vector<T*> outs(kOutputBlock);
    for (int64_t task = begin; task < end; ++task) {
      grid_shape.fill(x + task * H * W, H, W, g, grid.data());
      const int64_t c0 = (task % C) * M;  // the plane's first output channel
      T* planes = y + ((task / C) * C * M + c0) * out_plane;
      for (int64_t m0 = 0; m0 < M; m0 += kOutputBlock) {
        const int64_t mb = std::min<int64_t>(kOutputBlock, M - m0);
        for (int64_t oh = 0; oh < g.out_h; ++oh) {
          // the taps' weights of each output channel of the block, in rows of n
          int64_t n = 0;
          for (int64_t m = 0; m < mb; ++m)
            n = grid_shape.taps(grid.data(), oh, H, g, columns.data(), weight + (c0 + m0 + m) * K, src.data(),
                                weights.data() + m * K);
          for (int64_t m = 0; m < mb; ++m) {
            outs[m] = planes + (m0 + m) * out_plane + oh * g.out_w;
            inits[m] = bias ? to_acc(bias[c0 + m0 + m]) : A(0);
            if (n < K) std::copy(weights.data() + m * K, weights.data() + m * K + n, weights.data() + m * n);
          }
          correlate_outputs(outs.data(), mb, g.out_w, src.data(), weights.data(), n, inits.data());
          if (act.any())
            for (int64_t m = 0; m < mb; ++m) activate_inplace<T>(outs[m], g.out_w, nullptr, act);
        }
      }
    }
  });
}

// Input gradient, per input plane: each (row, column phase) of the input gathers the taps that land on it;
// a stride-1 correlation over a zero-padded copy of grad_out, scattered back with the column stride.
template <typename T>
void input_grad_kernel(const T* grad_out, const T* weight, T* dinput, int64_t N, int64_t C, int64_t M, int64_t H,
                       int64_t W, const Geometry& g) {
  const int64_t K = g.kernel_h * g.kernel_w, sw = g.stride_w, ow = g.out_w;
  const int64_t left = ((g.kernel_w - 1) * g.dilation_w) / sw + 1;  // columns of zeros before each grad_out row
  const int64_t padded = left + std::max(ow, (g.pad_left + W) / sw + 1) + 1;
  const int64_t columns = (W + sw - 1) / sw;
  const auto phase_taps = input_column_taps(g);
  const auto row_taps = input_row_taps(H, g);
  at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> rows(M * g.out_h * padded), scratch(columns);
    std::vector<acc_t<T>> weights(M * K);
    std::vector<const T*> src(M * K);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task % C;
      const T* grad_planes = grad_out + ((task / C) * C * M + c * M) * g.out_h * ow;
      for (int64_t r = 0; r < M * g.out_h; ++r) {
        T* dst = rows.data() + r * padded;
        std::fill(dst, dst + left, T(0));
        std::copy(grad_planes + r * ow, grad_planes + (r + 1) * ow, dst + left);
        std::fill(dst + left + ow, dst + padded, T(0));
      }
      T* plane = dinput + task * H * W;
      for (int64_t ih = 0; ih < H; ++ih) {
        for (int64_t b = 0; b < std::min(sw, W); ++b) {
          int64_t n = 0;
          for (int64_t m = 0; m < M; ++m) {
            for (const auto& [i, oh] : row_taps[ih]) {
              const T* row = rows.data() + (m * g.out_h + oh) * padded + left;
              const T* weight_row = weight + (c * M + m) * K + i * g.kernel_w;
              for (const auto& [k, shift] : phase_taps[b]) {
                src[n] = row + shift;
                weights[n] = to_acc(weight_row[k]);
                ++n;
              }
            }
          }
          const int64_t len = (W - b + sw - 1) / sw;
          T* row = plane + ih * W;
          if (sw == 1) {
            correlate_row(row, len, src.data(), weights.data(), n, acc_t<T>(0));
          } else {
            correlate_row(scratch.data(), len, src.data(), weights.data(), n, acc_t<T>(0));
            for (int64_t j = 0; j < len; ++j) row[b + sw * j] = scratch[j];
          }
        }
      }
    }
  });
}

// The weight gradient's dots of output row oh of one plane (grad_out rows of its M outputs from d0, out_plane
// apart) into acc (M rows of K tap vectors).
template <typename T>
void weight_grad_row(const PhaseGrid& grid_shape, const T* grid, const int64_t* columns, const T* d0, int64_t oh,
                     int64_t M, int64_t H, const Geometry& g, const T** src, Vectorized<acc_t<T>>* acc) {
  const int64_t K = g.kernel_h * g.kernel_w, out_plane = g.out_h * g.out_w;
  // the taps of rows in the padding are zero: dropping them drops their columns of acc too
  int64_t used = 0;
  for (int64_t i = 0; i < g.kernel_h; ++i) used += grid_shape.row_inside(oh * g.stride_h + i * g.dilation_h, H, g);
  if (used == 0) return;
  const int64_t taps = grid_shape.taps(grid, oh, H, g, columns, static_cast<const T*>(nullptr), src,
                                       static_cast<acc_t<T>*>(nullptr));
  if (taps == K && M > 1) {  // the output channels of this plane in blocks of up to kDotBlock
    for (int64_t m0 = 0; m0 < M; m0 += kDotBlock) {
      const T* d[kDotBlock];
      const int64_t mb = std::min<int64_t>(kDotBlock, M - m0);
      for (int64_t m = 0; m < mb; ++m) d[m] = d0 + (m0 + m) * out_plane;
      dot_outputs(d, mb, g.out_w, src, K, acc + m0 * K);
    }
    return;
  }
  for (int64_t m = 0; m < M; ++m) {
    const T* d = d0 + m * out_plane;
    if (taps == K) {
      dot_taps(d, g.out_w, src, K, acc + m * K);
    } else {  // some kernel rows fall in the padding: accumulate the others in place
      Vectorized<acc_t<T>>* a = acc + m * K;
      int64_t t = 0;
      for (int64_t i = 0; i < g.kernel_h; ++i) {
        if (!grid_shape.row_inside(oh * g.stride_h + i * g.dilation_h, H, g)) continue;
        dot_taps(d, g.out_w, src + t, g.kernel_w, a + i * g.kernel_w);
        t += g.kernel_w;
      }
    }
  }
}

// Weight gradient: grad_out rows dotted with the phase grid's tap rows. Tasks are (channel, slice of the
// batch) with partial sums per slice, so a single channel (EEGNet's first layer) still uses every thread.
template <typename T>
void weight_grad_kernel(const T* x, const T* grad_out, T* dweight, int64_t N, int64_t C, int64_t M, int64_t H,
                        int64_t W, const Geometry& g) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  const PhaseGrid grid_shape(g);
  const int64_t K = g.kernel_h * g.kernel_w, out_plane = g.out_h * g.out_w;
  const int64_t slices = std::min<int64_t>(N, ceil_div(kTasksPerThread * at::get_num_threads(), C));
  std::vector<A> partial(slices * C * M * K, A(0));
  const auto columns = grid_shape.tap_columns(g);
  at::parallel_for(0, C * slices, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> grid(grid_shape.size(g));
    std::vector<const T*> src(K);
    std::vector<V> acc(M * K);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task / slices, slice = task % slices;
      std::fill(acc.begin(), acc.end(), V(A(0)));
      for (int64_t n = slice * N / slices; n < (slice + 1) * N / slices; ++n) {
        grid_shape.fill(x + (n * C + c) * H * W, H, W, g, grid.data());
        const T* d0 = grad_out + (n * C * M + c * M) * out_plane;
        for (int64_t oh = 0; oh < g.out_h; ++oh)
          weight_grad_row(grid_shape, grid.data(), columns.data(), d0 + oh * g.out_w, oh, M, H, g, src.data(),
                          acc.data());
      }
      A* out = partial.data() + (slice * C + c) * M * K;
      for (int64_t i = 0; i < M * K; ++i) out[i] = horizontal_sum(acc[i]);
    }
  });
  for (int64_t c = 0; c < C; ++c)
    for (int64_t i = 0; i < M * K; ++i) {
      A sum = 0;
      for (int64_t s = 0; s < slices; ++s) sum += partial[(s * C + c) * M * K + i];
      dweight[c * M * K + i] = to_storage<T>(sum);
    }
}

}  // namespace

void forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, at::Tensor& y, const Geometry& g,
             const Activation& act) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), M = weight.size(0) / C;
  SEPCONV_DISPATCH(x.scalar_type(), "sepconv_forward_planar", [&] {
    forward_kernel<scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), data_or_null<scalar_t>(bias),
                             y.data_ptr<scalar_t>(), N, C, M, H, W, g, act);
  });
}

void input_grad(const at::Tensor& grad_out, const at::Tensor& weight, at::Tensor& dinput, const Geometry& g) {
  const int64_t N = dinput.size(0), C = dinput.size(1), H = dinput.size(2), W = dinput.size(3);
  const int64_t M = weight.size(0) / C;
  SEPCONV_DISPATCH(grad_out.scalar_type(), "sepconv_input_grad_planar", [&] {
    input_grad_kernel<scalar_t>(grad_out.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                dinput.data_ptr<scalar_t>(), N, C, M, H, W, g);
  });
}

void weight_grad(const at::Tensor& x, const at::Tensor& grad_out, at::Tensor& dweight, const Geometry& g) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), M = dweight.size(0) / C;
  SEPCONV_DISPATCH(x.scalar_type(), "sepconv_weight_grad_planar", [&] {
    weight_grad_kernel<scalar_t>(x.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(), dweight.data_ptr<scalar_t>(),
                                 N, C, M, H, W, g);
  });
}

}  // namespace sepconv_cpu::planar
