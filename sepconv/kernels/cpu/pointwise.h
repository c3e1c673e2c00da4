// The pointwise (1x1) convolution's register-blocked product, shared by pointwise.cpp and the fused separable
// kernel in depthwise.cpp: Y = act(X W^T + b) for channels-last X (pixels, C) and W^T rows (C, C_out).
#pragma once

#include "common.h"

#include <algorithm>

namespace sepconv_cpu {

inline constexpr int64_t kPixels = 8;  // pixels per register block
inline constexpr int64_t kVectors = 3;  // output vectors per register block: 24 accumulators, 3 weight rows, 1 broadcast
inline constexpr int64_t kPixelTask = 64;  // pixels per task: their input rows stay in L2 across the channel blocks

// Y[r, 0:n) = act(b + sum_k X[r, k] * Wt[k, 0:n)) for R pixels and NV vectors of outputs (the last holds `tail`).
template <typename T, int R, int NV, bool FULL>
void pointwise_block(const T* x, int64_t ldx, const T* wt, int64_t ldw, int64_t K, const T* bias, T* y, int64_t ldy,
                     int64_t tail, Act act, T alpha) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  V acc[R][NV];
#pragma GCC unroll 4
  for (int j = 0; j < NV; ++j) {
    const bool part = !FULL && j == NV - 1;
    const V b = bias ? (part ? V::loadu(bias + j * L, tail) : V::loadu(bias + j * L)) : V(T(0));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r][j] = b;
  }
  for (int64_t k = 0; k < K; ++k) {
    V w[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j)
      w[j] = (!FULL && j == NV - 1) ? V::loadu(wt + k * ldw + j * L, tail) : V::loadu(wt + k * ldw + j * L);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const V a(x[r * ldx + k]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[r][j] = at::vec::fmadd(a, w[j], acc[r][j]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      const V v = act == Act::None ? acc[r][j] : activate(acc[r][j], act, alpha);
      if (!FULL && j == NV - 1) v.store(y + r * ldy + j * L, tail);
      else v.store(y + r * ldy + j * L);
    }
  }
}

template <typename T, int R>
using Block = void (*)(const T*, int64_t, const T*, int64_t, int64_t, const T*, T*, int64_t, int64_t, Act, T);

template <typename T, int R>
Block<T, R> pick(int64_t vectors, bool full) {
  switch (vectors) {
    case 3: return full ? pointwise_block<T, R, 3, true> : pointwise_block<T, R, 3, false>;
    case 2: return full ? pointwise_block<T, R, 2, true> : pointwise_block<T, R, 2, false>;
    default: return full ? pointwise_block<T, R, 1, true> : pointwise_block<T, R, 1, false>;
  }
}

// Rows [p0, p1) of Y, output channels [o_begin, o_end), on the calling thread.
template <typename T>
void pointwise_rows(const T* x, const T* wt, const T* bias, T* y, int64_t p0, int64_t p1, int64_t o_begin,
                    int64_t o_end, int64_t K, int64_t O, const Activation& a) {
  constexpr int64_t L = Vectorized<T>::size();
  const int64_t chunk = kVectors * L;
  const T alpha = static_cast<T>(a.alpha);
  for (int64_t o = o_begin; o < o_end; o += chunk) {
    const int64_t n = std::min(chunk, o_end - o), vectors = (n + L - 1) / L, tail = n - (vectors - 1) * L;
    const auto block8 = pick<T, kPixels>(vectors, tail == L);
    const auto block1 = pick<T, 1>(vectors, tail == L);
    const T* b = bias ? bias + o : nullptr;
    int64_t p = p0;
    for (; p + kPixels <= p1; p += kPixels) block8(x + p * K, K, wt + o, O, K, b, y + p * O + o, O, tail, a.kind, alpha);
    for (; p < p1; ++p) block1(x + p * K, K, wt + o, O, K, b, y + p * O + o, O, tail, a.kind, alpha);
  }
}

}  // namespace sepconv_cpu
