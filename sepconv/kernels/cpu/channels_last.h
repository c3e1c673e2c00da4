// The channels-last (NHWC, depth multiplier 1) kernel family: its entry points (channels_last.cpp, separable.cpp)
// and the forward's row kernels, which the fused separable forward shares.
//
// Vectors run along channels; weights are (KH, KW, C) rows. The interior of each output row is register-blocked
// over output pixels, the border clips the taps. An output row's input rows are gathered by KernelRows (through
// PaddedRows where wide kernels would otherwise spend most pixels in the border).
#pragma once

#include "common.h"
#include "geometry.h"
#include "width.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace sepconv_cpu::channels_last {

// Entry points on channels-last (N, C, H, W) tensors into outputs the caller allocated; `weight` is (C, 1, KH, KW).
// 3-D tensors arrive as (N, C, D * H, W) ones with a 3-D geometry, and weights (C, 1, KD, KH, KW).
void forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, at::Tensor& y, const Geometry& g,
             const Activation& act);
void input_grad(const at::Tensor& grad_out, const at::Tensor& weight, at::Tensor& dinput, const Geometry& g);
// The weight gradient as (KH, KW, C) rows.
void weight_grad(const at::Tensor& x, const at::Tensor& grad_out, at::Tensor& dweight_rows, const Geometry& g);

// One input channel into M outputs (EEGNet's temporal layer, a spatially separable stem): contiguous x (N, 1, H, W),
// weight (M, 1, KH, KW), channels-last y (N, M, OH, OW).
void broadcast_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, at::Tensor& y,
                       const Geometry& g, const Activation& act);
// Taps up to which the broadcast kernel runs; wider kernels go to the planar kernels, blocked over output columns.
inline constexpr int64_t kBroadcastMaxTaps = 25;

// Depthwise (with its activation) then pointwise (with its own, after adding `residual` where defined: laid out
// as y) in one pass, channels-last x and y; rows must not need PaddedRows (see reads_padded_rows). separable.cpp.
void separable_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                       const Activation& dw_act, const at::Tensor& pw_weight, const at::Tensor& pw_bias,
                       at::Tensor& y, const Geometry& g, const Activation& act, const at::Tensor& residual);

// Whether the forward reads input rows of width W through PaddedRows: wide kernels whose output rows would be mostly
// border.
bool reads_padded_rows(const Geometry& g, int64_t W);

// (C * M, 1, KH, KW) -> (KH, KW, C * M) rows (3-D: (KD, KH, KW, C)), flipped in every spatial axis where `flip`.
at::Tensor weight_rows(const at::Tensor& weight, bool flip);

// Taps of a kernel row per register block: their weights (forward) or sums (weight gradient) stay in registers.
inline constexpr int kTapChunk = 8;
// Output pixels per register block in the forward's interior; then halving blocks down to one.
inline constexpr int kPixelBlock = 8;

// A large output written with ordinary stores is first read into the cache (read for ownership): a third of
// the memory traffic of a bandwidth-bound layer. Non-temporal stores skip that where the vector is aligned.
template <bool FULL, typename Out>
inline void store_output(const Vectorized<acc_t<Out>>& v, Out* p, int64_t n, bool stream) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (FULL && std::is_same_v<Out, float>) {
    if (stream && (reinterpret_cast<uintptr_t>(p) & 63) == 0) {
      _mm512_stream_ps(p, static_cast<__m512>(v));
      return;
    }
  }
#endif
  store_lanes<FULL>(v, p, n);
}

// The forward's activation on a finished vector of outputs.
template <typename A>
inline Vectorized<A> finish(const Vectorized<A>& v, const Epilogue& e) {
  return e.act.kind == Act::None ? v : activate(v, e.act.kind, static_cast<A>(e.act.alpha));
}

// P output pixels of one row, channels [c, c + n) (a full vector when FULL): acc[p] = bias + sum over taps.
// `rows[i]` is the input row of kernel row i (nullptr in the padding); pixel p reads column
// (ow + p) * stride_w - pad_left + k * dilation_w, checked against the row's ends only when CLIP.
template <typename T, int P, bool CLIP, bool FULL, typename Out>
void nhwc_pixels(const T* const* rows, const T* wt, const T* bias, Out* out, int64_t ow, int64_t c, int64_t n,
                 int64_t C, int64_t W, const Geometry& g, const Epilogue& e) {
  using V = Vectorized<acc_t<T>>;
  V acc[P];
  const V init = bias ? load_lanes<FULL>(bias + c, n) : V(acc_t<T>(0));
  for (int p = 0; p < P; ++p) acc[p] = init;
  const int64_t kw = g.kernel_w, step = g.stride_w * C, tap_step = g.dilation_w * C;
  const int64_t col0 = ow * g.stride_w - g.pad_left;
  for (int64_t i = 0; i < g.kernel_rows(); ++i) {
    if (!rows[i]) continue;
    const T* wp = wt + i * kw * C + c;
    const T* xp = rows[i] + col0 * C + c;
    for (int64_t k = 0; k < kw; ++k, wp += C, xp += tap_step) {
      const V wv = load_lanes<FULL>(wp, n);
      for (int p = 0; p < P; ++p) {
        if constexpr (CLIP) {
          const int64_t col = col0 + k * g.dilation_w + p * g.stride_w;
          if (col < 0 || col >= W) continue;
        }
        acc[p] = at::vec::fmadd(wv, load_lanes<FULL>(xp + p * step, n), acc[p]);
      }
    }
  }
  for (int p = 0; p < P; ++p) store_lanes<FULL>(finish(acc[p], e), out + (ow + p) * C + c, n);
}

// Register-blocked interior: P pixels of one row at unit dilation and column stride SW, where neighbouring
// pixels share input columns; each input vector is loaded once per kernel row and feeds every tap that reads
// it (input column j serves pixel p through tap j - SW * p). The NK taps of a kernel row start at xp / wp.
template <typename T, int P, int SW, int NK, bool FULL>
inline void nhwc_taps(const T* xp, const T* wp, int64_t C, int64_t n, Vectorized<acc_t<T>>* acc) {
  using V = Vectorized<acc_t<T>>;
  V w[NK];
#pragma GCC unroll 16
  for (int k = 0; k < NK; ++k) w[k] = load_lanes<FULL>(wp + k * C, n);
  constexpr int J = SW * (P - 1) + NK;
#pragma GCC unroll 32
  for (int j = 0; j < J; ++j) {
    const V xv = load_lanes<FULL>(xp + j * C, n);
#pragma GCC unroll 16
    for (int k = 0; k < NK; ++k) {
      const int d = j - k;
      if (d >= 0 && d % SW == 0 && d / SW < P) acc[d / SW] = at::vec::fmadd(w[k], xv, acc[d / SW]);
    }
  }
}

// The kernel's width KW known at compile time (the common 3, 5, 7): accumulators stay in registers throughout.
template <typename T, typename Out, int P, int SW, int KW, bool FULL>
void nhwc_block_fixed(const T* const* rows, const T* const* wrows, int64_t taps_rows, const T* bias, Out* out,
                      int64_t ow, int64_t c, int64_t n, int64_t C, const Geometry& g, const Epilogue& e) {
  using V = Vectorized<acc_t<T>>;
  V acc[P];
  const V init = bias ? load_lanes<FULL>(bias + c, n) : V(acc_t<T>(0));
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) acc[p] = init;
  const int64_t col0 = (ow * SW - g.pad_left) * C + c;
  for (int64_t r = 0; r < taps_rows; ++r) nhwc_taps<T, P, SW, KW, FULL>(rows[r] + col0, wrows[r] + c, C, n, acc);
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) store_output<FULL>(finish(acc[p], e), out + (ow + p) * C + c, n, e.stream);
}

// Any width: chunks of up to kTapChunk taps, accumulating in registers.
template <typename T, typename Out, int P, int SW, bool FULL>
void nhwc_block_chunked(const T* const* rows, const T* const* wrows, int64_t taps_rows, const T* bias, Out* out,
                        int64_t ow, int64_t c, int64_t n, int64_t C, const Geometry& g, const Epilogue& e) {
  using V = Vectorized<acc_t<T>>;
  V acc[P];
  const V init = bias ? load_lanes<FULL>(bias + c, n) : V(acc_t<T>(0));
  for (int p = 0; p < P; ++p) acc[p] = init;
  const int64_t col0 = (ow * SW - g.pad_left) * C + c;
  for (int64_t r = 0; r < taps_rows; ++r) {
    in_chunks<kTapChunk>(g.kernel_w, [&](int64_t k, auto width) {
      nhwc_taps<T, P, SW, decltype(width)::value, FULL>(rows[r] + col0 + k * C, wrows[r] + k * C + c, C, n, acc);
    });
  }
  for (int p = 0; p < P; ++p) store_output<FULL>(finish(acc[p], e), out + (ow + p) * C + c, n, e.stream);
}

template <typename T, typename Out, int P, bool FULL>
using BlockKernel = void (*)(const T* const*, const T* const*, int64_t, const T*, Out*, int64_t, int64_t, int64_t,
                             int64_t, const Geometry&, const Epilogue&);

template <typename T, typename Out, int P, bool FULL, int SW>
BlockKernel<T, Out, P, FULL> pick_block_stride(int64_t kw) {
  switch (kw) {
    case 3: return nhwc_block_fixed<T, Out, P, SW, 3, FULL>;
    case 5: return nhwc_block_fixed<T, Out, P, SW, 5, FULL>;
    case 7: return nhwc_block_fixed<T, Out, P, SW, 7, FULL>;
    default: return nhwc_block_chunked<T, Out, P, SW, FULL>;
  }
}

// The register-blocked kernel for this geometry, or nullptr (dilated or wider strides: the generic loop).
template <typename T, typename Out, int P, bool FULL>
BlockKernel<T, Out, P, FULL> pick_block(const Geometry& g) {
  if (g.dilation_w != 1) return nullptr;
  if (g.stride_w == 1) return pick_block_stride<T, Out, P, FULL, 1>(g.kernel_w);
  if (g.stride_w == 2) return pick_block_stride<T, Out, P, FULL, 2>(g.kernel_w);
  return nullptr;
}

// The input rows that one output row reads, and how the row kernels reach them.
template <typename T>
struct RowTaps {
  const T* const* rows;  // rows[i]: input row of kernel row i, nullptr in the padding (the generic loop)
  const T* const* taps_x;  // the rows inside the input, packed, for the register-blocked kernels
  const T* const* taps_w;  // their weight rows
  int64_t taps_rows;
};

// Channels [0, C) of pixels [ow, ow + P) through the register-blocked kernels: full vectors, then the partial one.
template <typename T, typename Out, int P>
inline void nhwc_block_all_channels(BlockKernel<T, Out, P, true> full, BlockKernel<T, Out, P, false> partial,
                                    const RowTaps<T>& taps, const T* bias, Out* out, int64_t ow, int64_t C,
                                    const Geometry& g, const Epilogue& e) {
  constexpr int64_t L = Vectorized<acc_t<T>>::size();
  const T* const* xs = taps.taps_x;
  const T* const* ws = taps.taps_w;
  const int64_t n_rows = taps.taps_rows;
  int64_t c = 0;
  for (; c + L <= C; c += L) full(xs, ws, n_rows, bias, out, ow, c, L, C, g, e);
  if (c < C) partial(xs, ws, n_rows, bias, out, ow, c, C - c, C, g, e);
}

template <typename T, int P, bool CLIP, typename Out>
inline void nhwc_pixels_all_channels(const T* const* rows, const T* wt, const T* bias, Out* out, int64_t ow,
                                     int64_t C, int64_t W, const Geometry& g, const Epilogue& e) {
  constexpr int64_t L = Vectorized<acc_t<T>>::size();
  int64_t c = 0;
  for (; c + L <= C; c += L) nhwc_pixels<T, P, CLIP, true>(rows, wt, bias, out, ow, c, L, C, W, g, e);
  if (c < C) nhwc_pixels<T, P, CLIP, false>(rows, wt, bias, out, ow, c, C - c, C, W, g, e);
}

// One output row, pixel blocks outermost so a block's input columns stay in L1 across the channel vectors. The
// interior [lo, hi) goes through the register-blocked kernels in blocks of kPixelBlock pixels, then halving ones.
template <typename T, typename Out>
void nhwc_row(const RowTaps<T>& taps, const T* wt, const T* bias, Out* out, int64_t C, int64_t W, Bounds inside,
              const Geometry& g, const Epilogue& e) {
  const int64_t lo = inside.first, hi = inside.second;
  int64_t ow = 0;
  for (; ow < lo; ++ow) nhwc_pixels_all_channels<T, 1, true>(taps.rows, wt, bias, out, ow, C, W, g, e);
  if (pick_block<T, Out, kPixelBlock, true>(g)) {
    halving_widths<kPixelBlock>([&](auto width) {
      constexpr int P = decltype(width)::value;
      const auto full = pick_block<T, Out, P, true>(g);
      const auto partial = pick_block<T, Out, P, false>(g);
      for (; ow + P <= hi; ow += P) nhwc_block_all_channels<T, Out, P>(full, partial, taps, bias, out, ow, C, g, e);
    });
  } else {
    for (; ow + kPixelBlock <= hi; ow += kPixelBlock)
      nhwc_pixels_all_channels<T, kPixelBlock, false>(taps.rows, wt, bias, out, ow, C, W, g, e);
    for (; ow < hi; ++ow) nhwc_pixels_all_channels<T, 1, false>(taps.rows, wt, bias, out, ow, C, W, g, e);
  }
  for (; ow < g.out_w; ++ow) nhwc_pixels_all_channels<T, 1, true>(taps.rows, wt, bias, out, ow, C, W, g, e);
}

// Wide kernels on narrow rows would spend most pixels in the clipped border loop. Then each thread copies the
// input rows it needs once into a small ring of zero-padded rows (`right` zero columns after each row, `left`
// before), so that every pixel is interior, without a padded copy of the whole input.
template <typename T>
struct PaddedRows {
  int64_t width, C, slots;
  std::vector<T> buffer;
  std::vector<int64_t> held;  // which (image, row) each slot holds, -1 for none

  PaddedRows(int64_t W, int64_t left, int64_t right, int64_t C, const Geometry& g)
      : width(left + W + right), C(C), slots((g.kernel_h - 1) * g.dilation_h + g.stride_h),
        buffer(slots * width * C, T(0)), held(slots, -1) {}

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

  explicit KernelRows(const Geometry& g) : rows(g.kernel_rows()), taps_x(g.kernel_rows()), taps_w(g.kernel_rows()) {}

  // Output row `r` of `image` (of its g.in_d * H rows); wide kernels read their rows through `padded` (else nullptr).
  void gather(const T* x, const T* wt, int64_t image, int64_t r, int64_t H, int64_t W, int64_t C, const Geometry& g,
              PaddedRows<T>* padded) {
    taps = 0;
    const int64_t first = image * g.in_d * H;
    for (int64_t i = 0; i < g.kernel_rows(); ++i) {
      const int64_t row = g.input_row(r, i, H);
      if (row < 0) {
        rows[i] = nullptr;
        continue;
      }
      rows[i] = padded ? padded->row(x, first + row, W, g.pad_left) : x + (first + row) * W * C;
      taps_x[taps] = rows[i];
      taps_w[taps++] = wt + i * g.kernel_w * C;
    }
  }

  // That output row into `out`, rows of `width` pixels with interior `inside`.
  template <typename Out>
  void row(const T* wt, const T* bias, Out* out, int64_t C, int64_t width, Bounds inside, const Geometry& g,
           const Epilogue& e) const {
    nhwc_row<T, Out>({rows.data(), taps_x.data(), taps_w.data(), taps}, wt, bias, out, C, width, inside, g, e);
  }
};

}  // namespace sepconv_cpu::channels_last
