// The channels-last (NHWC) kernels: forward, input gradient, weight gradient and the one-channel broadcast
// forward (see channels_last.h).

#include "channels_last.h"

#include <climits>

namespace sepconv_cpu::channels_last {

namespace {

// Outputs above this size (beyond the last-level cache) are stored around the cache (see store_output).
constexpr int64_t kStreamFromBytes = int64_t(8) << 20;
// Pixels per register block of the strided input gradient's interior.
constexpr int kGatherPixels = 4;
// Channels per task of the weight gradient's reduction over threads: enough work to be worth a task.
constexpr int64_t kReduceGrain = 256;

// right >= 0: input rows are read through PaddedRows with `right` zero columns (then the kernels see unpadded,
// wider rows); right < 0: in place.
template <typename T>
void nhwc_forward(const T* x, const T* wt, const T* bias, T* y, int64_t N, int64_t C, int64_t H, int64_t W,
                  const Geometry& g, const Epilogue& e, int64_t right) {
  const bool pad = right >= 0;
  Geometry inner = g;
  if (pad) inner.pad_left = 0;
  const int64_t width = pad ? g.pad_left + W + right : W;
  const Bounds inside = interior(width, g.out_w, g.kernel_w, g.stride_w, inner.pad_left, g.dilation_w);
  at::parallel_for(0, N * g.out_rows(), 1, [&](int64_t begin, int64_t end) {
    KernelRows<T> rows(g);
    std::optional<PaddedRows<T>> padded;
    if (pad) padded.emplace(W, g.pad_left, right, C, g);
    for (int64_t task = begin; task < end; ++task) {
      rows.gather(x, wt, task / g.out_rows(), task % g.out_rows(), H, W, C, g, pad ? &*padded : nullptr);
      rows.row(wt, bias, y + task * g.out_w * C, C, width, inside, inner, e);
    }
#if defined(CPU_CAPABILITY_AVX512)
    if (e.stream) _mm_sfence();  // each thread completes its weakly ordered non-temporal stores
#endif
  });
}

// Each output pixel's M values are the taps' input values, broadcast, times the taps' weight vectors.
template <typename T>
void broadcast_kernel(const T* x, const T* wt, const T* bias, T* y, int64_t N, int64_t M, int64_t H, int64_t W,
                      const Geometry& g, const Epilogue& e) {
  using V = Vectorized<acc_t<T>>;
  constexpr int64_t L = V::size();
  at::parallel_for(0, N * g.out_h, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t image = task / g.out_h, oh = task % g.out_h;
      T* row = y + task * g.out_w * M;
      for (int64_t c = 0; c < M; c += L) {
        const int64_t n = std::min(L, M - c);
        const V init = bias ? load_vec(bias + c, n) : V(acc_t<T>(0));
        for (int64_t ow = 0; ow < g.out_w; ++ow) {
          V acc = init;
          for (int64_t i = 0; i < g.kernel_h; ++i) {
            const int64_t ih = oh * g.stride_h - g.pad_top + i * g.dilation_h;
            if (ih < 0 || ih >= H) continue;
            const T* xrow = x + (image * H + ih) * W;
            for (int64_t k = 0; k < g.kernel_w; ++k) {
              const int64_t iw = ow * g.stride_w - g.pad_left + k * g.dilation_w;
              if (iw >= 0 && iw < W)
                acc = at::vec::fmadd(V(to_acc(xrow[iw])), load_vec(wt + (i * g.kernel_w + k) * M + c, n), acc);
            }
          }
          store_vec(finish(acc, e), row + ow * M + c, n);
        }
      }
    }
  });
}

// Input gradient for any stride. The input pixels of one row and one column phase b (iw = b, b + stride_w, ...)
// are reached by the same kernel taps, tap (i, k) reading grad_out column j + shift_k for the phase's j-th pixel:
// a stride-1 loop over grad_out with that subset of taps, register-blocked over pixels where every tap's column is
// inside the row, written back every stride_w-th pixel.
template <typename T>
struct StridedTap {
  const T* row;  // grad_out row of the tap's kernel row
  const T* weight;  // the tap's weights, (KH, KW, C) rows
  int64_t shift;
};

template <typename T, int P, bool CLIP, bool FULL>
void nhwc_gather_pixels(const StridedTap<T>* taps, int64_t count, T* out, int64_t j, int64_t c, int64_t n, int64_t C,
                        int64_t out_step, int64_t OW) {
  using V = Vectorized<acc_t<T>>;
  V acc[P];
  for (int p = 0; p < P; ++p) acc[p] = V(acc_t<T>(0));
  for (int64_t t = 0; t < count; ++t) {
    const V wv = load_lanes<FULL>(taps[t].weight + c, n);
    const int64_t col = j + taps[t].shift;
    const T* src = taps[t].row + col * C + c;
    for (int p = 0; p < P; ++p) {
      if constexpr (CLIP) {
        if (col + p < 0 || col + p >= OW) continue;
      }
      acc[p] = at::vec::fmadd(wv, load_lanes<FULL>(src + p * C, n), acc[p]);
    }
  }
  for (int p = 0; p < P; ++p) store_lanes<FULL>(acc[p], out + (j + p) * out_step + c, n);
}

template <typename T, int P, bool CLIP>
void nhwc_gather_all_channels(const StridedTap<T>* taps, int64_t count, T* out, int64_t j, int64_t C,
                              int64_t out_step, int64_t OW) {
  constexpr int64_t L = Vectorized<acc_t<T>>::size();
  int64_t c = 0;
  for (; c + L <= C; c += L) nhwc_gather_pixels<T, P, CLIP, true>(taps, count, out, j, c, L, C, out_step, OW);
  if (c < C) nhwc_gather_pixels<T, P, CLIP, false>(taps, count, out, j, c, C - c, C, out_step, OW);
}

template <typename T>
void nhwc_input_grad_strided(const T* grad_out, const T* wt, T* dinput, int64_t N, int64_t C, int64_t H, int64_t W,
                             const Geometry& g) {
  constexpr int P = kGatherPixels;
  const int64_t OW = g.out_w, sw = g.stride_w;
  const auto phase_taps = input_column_taps(g);
  const auto row_taps = input_row_taps(H, g);
  const int64_t rows = g.in_d * H;
  at::parallel_for(0, N * rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<StridedTap<T>> taps(g.kernel_rows() * g.kernel_w);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t image = task / rows, ih = task % rows;
      for (int64_t b = 0; b < std::min(sw, W); ++b) {
        int64_t count = 0, lo = 0, hi = INT64_MAX;  // pixels [lo, hi) read every tap's column inside the row
        for (const auto& [i, oh] : row_taps[ih]) {
          const T* row = grad_out + (image * g.out_rows() + oh) * OW * C;
          for (const auto& [k, shift] : phase_taps[b]) {
            taps[count++] = {row, wt + (i * g.kernel_w + k) * C, shift};
            lo = std::max(lo, -shift);
            hi = std::min(hi, OW - shift);
          }
        }
        const int64_t pixels = (W - b + sw - 1) / sw;
        hi = std::clamp<int64_t>(hi, 0, pixels);
        lo = std::min(lo, hi);
        T* out = dinput + (task * W + b) * C;
        const int64_t out_step = sw * C;
        int64_t j = 0;
        for (; j < lo; ++j) nhwc_gather_all_channels<T, 1, true>(taps.data(), count, out, j, C, out_step, OW);
        for (; j + P <= hi; j += P) nhwc_gather_all_channels<T, P, false>(taps.data(), count, out, j, C, out_step, OW);
        for (; j < pixels; ++j) nhwc_gather_all_channels<T, 1, true>(taps.data(), count, out, j, C, out_step, OW);
      }
    }
  });
}

// Weight gradient: per thread partial sums of (KH, KW, C), reduced at the end. For a kernel row and a vector of
// channels, up to kTapChunk taps of that row accumulate in registers while grad_out is loaded once per pixel.
// `partial` holds running sums in the accumulator type; `bounds[k0]` the pixels where taps k0.. are inside the row.
template <typename T, int NT, bool FULL>
void nhwc_wgrad_taps(const T* xrow, const T* grad_row, acc_t<T>* partial, int64_t k0, int64_t c, int64_t n,
                     int64_t C, int64_t W, const Geometry& g, const Bounds* bounds) {
  using V = Vectorized<acc_t<T>>;
  // U pixels in flight, each with its own accumulators: a tap's sum over pixels is a chain of dependent FMAs
  constexpr int U = NT >= 6 ? 2 : (NT >= 3 ? 3 : 6);
  V acc[U][NT];
  for (int u = 0; u < U; ++u)
    for (int t = 0; t < NT; ++t) acc[u][t] = V(acc_t<T>(0));
  const int64_t dil = g.dilation_w, pad = g.pad_left - k0 * dil, tap_step = dil * C, step = g.stride_w * C;
  const auto [lo, hi] = bounds[k0];  // pixels for which all NT taps fall inside the row
  const T* d = grad_row + lo * C + c;
  const T* xp = xrow + (lo * g.stride_w - pad) * C + c;
  int64_t ow = lo;
  for (; ow + U <= hi; ow += U, d += U * C, xp += U * step) {
#pragma GCC unroll 6
    for (int u = 0; u < U; ++u) {
      const V dv = load_lanes<FULL>(d + u * C, n);
#pragma GCC unroll 8
      for (int t = 0; t < NT; ++t)
        acc[u][t] = at::vec::fmadd(dv, load_lanes<FULL>(xp + u * step + t * tap_step, n), acc[u][t]);
    }
  }
  for (; ow < hi; ++ow, d += C, xp += step) {
    const V dv = load_lanes<FULL>(d, n);
    for (int t = 0; t < NT; ++t) acc[0][t] = at::vec::fmadd(dv, load_lanes<FULL>(xp + t * tap_step, n), acc[0][t]);
  }
  for (int64_t ow = 0; ow < g.out_w; ++ow) {
    if (ow == lo) ow = hi;
    if (ow >= g.out_w) break;
    const V dv = load_lanes<FULL>(grad_row + ow * C + c, n);
    for (int t = 0; t < NT; ++t) {
      const int64_t col = ow * g.stride_w - pad + t * dil;
      if (col >= 0 && col < W) acc[0][t] = at::vec::fmadd(dv, load_lanes<FULL>(xrow + col * C + c, n), acc[0][t]);
    }
  }
  for (int t = 0; t < NT; ++t) {
    for (int u = 1; u < U; ++u) acc[0][t] = acc[0][t] + acc[u][t];
    acc_t<T>* p = partial + (k0 + t) * C + c;
    store_lanes<FULL>(load_lanes<FULL>(p, n) + acc[0][t], p, n);
  }
}

template <typename T, bool FULL>
void nhwc_wgrad_row(const T* xrow, const T* grad_row, acc_t<T>* partial, int64_t c, int64_t n, int64_t C, int64_t W,
                    const Geometry& g, const Bounds* bounds) {
  in_chunks<kTapChunk>(g.kernel_w, [&](int64_t k, auto width) {
    nhwc_wgrad_taps<T, decltype(width)::value, FULL>(xrow, grad_row, partial, k, c, n, C, W, g, bounds);
  });
}

template <typename T>
void nhwc_weight_grad(const T* x, const T* grad_out, T* dweight_rows, int64_t N, int64_t C, int64_t H, int64_t W,
                      const Geometry& g) {
  using A = acc_t<T>;
  constexpr int64_t L = Vectorized<A>::size();
  const int64_t K = g.kernel_rows() * g.kernel_w;
  const int64_t threads = at::get_num_threads();
  std::vector<A> partial(threads * K * C, A(0));
  // the interior of each chunk of taps (at its first tap k0), worked out once rather than per row and channel
  std::vector<Bounds> bounds(g.kernel_w);
  for (int64_t k0 = 0; k0 < g.kernel_w; k0 += kTapChunk)
    bounds[k0] = interior(W, g.out_w, std::min<int64_t>(kTapChunk, g.kernel_w - k0), g.stride_w,
                          g.pad_left - k0 * g.dilation_w, g.dilation_w);
  at::parallel_for(0, N * g.out_rows(), 1, [&](int64_t begin, int64_t end) {
    A* mine = partial.data() + at::get_thread_num() * K * C;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t image = task / g.out_rows(), r = task % g.out_rows();
      const T* grad_row = grad_out + task * g.out_w * C;
      for (int64_t i = 0; i < g.kernel_rows(); ++i) {
        const int64_t row = g.input_row(r, i, H);
        if (row < 0) continue;
        const T* xrow = x + (image * g.in_d * H + row) * W * C;
        A* row_partial = mine + i * g.kernel_w * C;
        int64_t c = 0;
        for (; c + L <= C; c += L) nhwc_wgrad_row<T, true>(xrow, grad_row, row_partial, c, L, C, W, g, bounds.data());
        if (c < C) nhwc_wgrad_row<T, false>(xrow, grad_row, row_partial, c, C - c, C, W, g, bounds.data());
      }
    }
  });
  at::parallel_for(0, K * C, kReduceGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      A sum = 0;
      for (int64_t t = 0; t < threads; ++t) sum += partial[t * K * C + i];
      dweight_rows[i] = to_storage<T>(sum);
    }
  });
}

// The forward with the weight already as (KH, KW, C) rows; stores stream around the cache for large outputs.
void forward_rows(const at::Tensor& x, const at::Tensor& wt, const at::Tensor& bias, at::Tensor& y, const Geometry& g,
                  const Activation& act) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2) / g.in_d, W = x.size(3);
  int64_t right = -1;  // zero columns after each padded row, or -1 where rows are read in place
  if (reads_padded_rows(g, W))
    right = std::max<int64_t>(0, (g.out_w - 1) * g.stride_w + (g.kernel_w - 1) * g.dilation_w + 1 - g.pad_left - W);
  const Epilogue e{act, static_cast<int64_t>(y.nbytes()) > kStreamFromBytes};
  SEPCONV_DISPATCH(x.scalar_type(), "sepconv_forward_nhwc", [&] {
    nhwc_forward<scalar_t>(x.data_ptr<scalar_t>(), wt.data_ptr<scalar_t>(), data_or_null<scalar_t>(bias),
                           y.data_ptr<scalar_t>(), N, C, H, W, g, e, right);
  });
}

}  // namespace

at::Tensor weight_rows(const at::Tensor& weight, bool flip) {
  if (weight.dim() == 5) {
    auto w = flip ? weight.flip({2, 3, 4}) : weight;
    return w.squeeze(1).permute({1, 2, 3, 0}).contiguous();
  }
  auto w = flip ? weight.flip({2, 3}) : weight;
  return w.squeeze(1).permute({1, 2, 0}).contiguous();
}

bool reads_padded_rows(const Geometry& g, int64_t W) {
  const auto [lo, hi] = interior(W, g.out_w, g.kernel_w, g.stride_w, g.pad_left, g.dilation_w);
  // wider than 3 taps with less than three quarters of the row interior
  // (2-D only: the ring of padded rows follows one axis of rows)
  return g.kernel_d == 1 && g.pad_left >= 0 && g.kernel_w > 3 && 4 * (hi - lo) < 3 * g.out_w;
}

void forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, at::Tensor& y, const Geometry& g,
             const Activation& act) {
  forward_rows(x, weight_rows(weight, false), bias, y, g, act);
}

void broadcast_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, at::Tensor& y,
                       const Geometry& g, const Activation& act) {
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3), M = weight.size(0);
  const auto wt = weight_rows(weight, false);
  const Epilogue e{act, false};
  SEPCONV_DISPATCH(x.scalar_type(), "sepconv_forward_broadcast", [&] {
    broadcast_kernel<scalar_t>(x.data_ptr<scalar_t>(), wt.data_ptr<scalar_t>(), data_or_null<scalar_t>(bias),
                               y.data_ptr<scalar_t>(), N, M, H, W, g, e);
  });
}

void input_grad(const at::Tensor& grad_out, const at::Tensor& weight, at::Tensor& dinput, const Geometry& g) {
  const int64_t N = dinput.size(0), C = dinput.size(1), H = dinput.size(2) / g.in_d, W = dinput.size(3);
  if (g.stride_d == 1 && g.stride_h == 1 && g.stride_w == 1) {
    // stride 1: the forward kernel with the flipped kernel and the flipped padding
    const Geometry flipped{g.kernel_h,   g.kernel_w,   H,           W,         1,
                           1,            g.flip_pad_top, g.flip_pad_left, g.dilation_h, g.dilation_w,
                           g.pad_top,    g.pad_left,   g.kernel_d,  g.in_d,    1,
                           g.flip_pad_front, g.dilation_d, g.pad_front, g.out_d};
    forward_rows(grad_out, weight_rows(weight, true), at::Tensor(), dinput, flipped, Activation{});
    return;
  }
  const auto wt = weight_rows(weight, false);
  SEPCONV_DISPATCH(grad_out.scalar_type(), "sepconv_input_grad_nhwc_strided", [&] {
    nhwc_input_grad_strided<scalar_t>(grad_out.data_ptr<scalar_t>(), wt.data_ptr<scalar_t>(),
                                      dinput.data_ptr<scalar_t>(), N, C, H, W, g);
  });
}

void weight_grad(const at::Tensor& x, const at::Tensor& grad_out, at::Tensor& dweight_rows, const Geometry& g) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2) / g.in_d, W = x.size(3);
  SEPCONV_DISPATCH(x.scalar_type(), "sepconv_weight_grad_nhwc", [&] {
    nhwc_weight_grad<scalar_t>(x.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(),
                               dweight_rows.data_ptr<scalar_t>(), N, C, H, W, g);
  });
}

}  // namespace sepconv_cpu::channels_last
