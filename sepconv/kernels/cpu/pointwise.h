// The pointwise (1x1) convolution's register-blocked product, shared by pointwise.cpp and the fused separable
// kernel in separable.cpp: Y = act(X W^T + b) for channels-last X (pixels, C) and W^T rows (C, C_out).
#pragma once

#include "common.h"
#include "width.h"

#include <algorithm>
#include <vector>

namespace sepconv_cpu {

inline constexpr int64_t kPixels = 8;  // pixels per register block
// output vectors per register block: 24 accumulators, 3 weight rows and 1 broadcast in 32 registers
inline constexpr int64_t kVectors = 3;
inline constexpr int64_t kPixelTask = 64;  // pixels per task: their input rows stay in L2 across the channel blocks
inline constexpr int64_t kDepth = 128;  // input channels per pass: a block of W^T's rows (128 x 48) stays in L1

// Y[r, 0:n) = act(b + sum_k X[r, k] * Wt[k, 0:n)) for R pixels and NV vectors of outputs (the last holds `tail`).
// X may be stored in the accumulator type (the fused separable's hidden block) rather than in T.
template <typename T, typename In, int R, int NV, bool FULL>
void pointwise_block(const In* x, int64_t ldx, const T* wt, int64_t ldw, int64_t K, const T* bias, T* y, int64_t ldy,
                     int64_t tail, bool accumulate, Act act, acc_t<T> alpha) {
  using V = Vectorized<acc_t<T>>;
  constexpr int64_t L = V::size();
  V acc[R][NV];
#pragma GCC unroll 4
  for (int j = 0; j < NV; ++j) {
    const bool part = !FULL && j == NV - 1;
    const V b = bias ? (part ? load_vec(bias + j * L, tail) : load_vec(bias + j * L)) : V(acc_t<T>(0));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
      acc[r][j] = !accumulate ? b : part ? load_vec(y + r * ldy + j * L, tail) : load_vec(y + r * ldy + j * L);
  }
  for (int64_t k = 0; k < K; ++k) {
    V w[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j)
      w[j] = (!FULL && j == NV - 1) ? load_vec(wt + k * ldw + j * L, tail) : load_vec(wt + k * ldw + j * L);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const V a(to_acc(x[r * ldx + k]));
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[r][j] = at::vec::fmadd(a, w[j], acc[r][j]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      const V v = act == Act::None ? acc[r][j] : activate(acc[r][j], act, alpha);
      if (!FULL && j == NV - 1) store_vec(v, y + r * ldy + j * L, tail);
      else store_vec(v, y + r * ldy + j * L);
    }
  }
}

template <typename T, typename In, int R>
using Block = void (*)(const In*, int64_t, const T*, int64_t, int64_t, const T*, T*, int64_t, int64_t, bool, Act,
                       acc_t<T>);

// The block for this many vectors of outputs (1 to kVectors), the last one full or not.
template <typename T, typename In, int R>
Block<T, In, R> pick(int64_t vectors, bool full) {
  Block<T, In, R> block = nullptr;
  with_width<kVectors>(vectors, [&](auto width) {
    constexpr int NV = decltype(width)::value;
    block = full ? pointwise_block<T, In, R, NV, true> : pointwise_block<T, In, R, NV, false>;
  });
  return block;
}

// Rows [p0, p1) of Y (rows `ldy` apart), output channels [o_begin, o_end), on the calling thread. W^T's rows
// are `ldw` apart.
template <typename T, typename In>
void pointwise_rows(const In* x, const T* wt, int64_t ldw, const T* bias, T* y, int64_t ldy, int64_t p0, int64_t p1,
                    int64_t o_begin, int64_t o_end, int64_t K, const Activation& a) {
  constexpr int64_t L = Vectorized<acc_t<T>>::size();
  const int64_t chunk = kVectors * L;
  const acc_t<T> alpha = static_cast<acc_t<T>>(a.alpha);
  for (int64_t o = o_begin; o < o_end; o += chunk) {
    const int64_t n = std::min(chunk, o_end - o), vectors = (n + L - 1) / L, tail = n - (vectors - 1) * L;
    const auto block8 = pick<T, In, kPixels>(vectors, tail == L);
    const auto block1 = pick<T, In, 1>(vectors, tail == L);
    const T* b = bias ? bias + o : nullptr;
    // passes over kDepth input channels at a time: partial sums wait in Y, the last pass applies the activation
    for (int64_t k0 = 0; k0 < K; k0 += kDepth) {
      const int64_t depth = std::min(kDepth, K - k0);
      const bool accumulate = k0 > 0;
      const Act act = k0 + depth == K ? a.kind : Act::None;
      const T* w = wt + k0 * ldw + o;
      int64_t p = p0;
      for (; p + kPixels <= p1; p += kPixels)
        block8(x + p * K + k0, K, w, ldw, depth, b, y + p * ldy + o, ldy, tail, accumulate, act, alpha);
      for (; p < p1; ++p)
        block1(x + p * K + k0, K, w, ldw, depth, b, y + p * ldy + o, ldy, tail, accumulate, act, alpha);
    }
  }
}

// A leading dimension for rows of n values that is not a multiple of 512 bytes: rows that far apart fall into the
// same few L1 sets and evict each other (C_out = 512 or 1024 would otherwise).
inline int64_t padded_rows(int64_t n, int64_t element_size) {
  return (n * element_size) % 512 == 0 ? n + 64 / element_size : n;
}

// W^T of a (C_out, C, 1, 1) weight as a (C, C_out) matrix with unit column stride, and its leading dimension: a
// view of the weight when it is stored so (sepconv.inference does), else a padded copy.
inline std::pair<at::Tensor, int64_t> weight_columns(const at::Tensor& weight) {
  const int64_t O = weight.size(0), C = weight.size(1);
  const auto w = weight.reshape({O, C});
  if (w.stride(0) == 1 && (C == 1 || w.stride(1) >= O)) return {w.t(), C == 1 ? O : w.stride(1)};
  const int64_t ld = padded_rows(O, weight.element_size());
  auto columns = at::empty({C, ld}, weight.options()).narrow(1, 0, O);
  columns.copy_(w.t());
  return {columns, ld};
}

}  // namespace sepconv_cpu
