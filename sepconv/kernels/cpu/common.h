// What the C++ kernels share: the vector unit's capability (ATen's Vectorized picks its implementation from
// CPU_CAPABILITY, so it must be set before vec.h), and the activations that kernels apply in their epilogue.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CPU_CAPABILITY_AVX512 1
#define CPU_CAPABILITY AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2 1
#define CPU_CAPABILITY AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>

namespace sepconv_cpu {

using at::vec::Vectorized;

// Codes shared with sepconv/kernels/ops.py (ACTIVATIONS); `alpha` is ELU's alpha or LeakyReLU's slope.
enum class Act : int64_t { None = 0, ReLU, ReLU6, ELU, SiLU, Hardswish, GELU, LeakyReLU };

struct Activation {
  Act kind = Act::None;
  double alpha = 1.0;
  bool any() const { return kind != Act::None; }
};

inline Activation read_activation(int64_t code, double alpha) {
  TORCH_CHECK(code >= 0 && code <= static_cast<int64_t>(Act::LeakyReLU), "sepconv: unknown activation code ", code);
  return {static_cast<Act>(code), alpha};
}

template <typename T>
inline Vectorized<T> activate(const Vectorized<T>& x, Act kind, T alpha) {
  using V = Vectorized<T>;
  const V zero(T(0));
  switch (kind) {
    case Act::ReLU: return at::vec::maximum(x, zero);
    case Act::ReLU6: return at::vec::minimum(at::vec::maximum(x, zero), V(T(6)));
    // alpha * expm1(min(x, 0)) is 0 wherever x > 0, so no select is needed
    case Act::ELU: return at::vec::maximum(x, zero) + V(alpha) * at::vec::minimum(x, zero).expm1();
    case Act::SiLU: return x / (V(T(1)) + x.neg().exp());
    case Act::Hardswish:
      return x * at::vec::minimum(at::vec::maximum(x + V(T(3)), zero), V(T(6))) * V(T(1.0 / 6.0));
    case Act::GELU: return V(T(0.5)) * x * (V(T(1)) + (x * V(T(M_SQRT1_2))).erf());
    case Act::LeakyReLU: return at::vec::maximum(x, zero) + V(alpha) * at::vec::minimum(x, zero);
    default: return x;
  }
}

// p[0, n) = act(p[0, n) + bias[0, n)) in place (bias may be null), while the values are still in cache.
template <typename T>
void activate_inplace(T* p, int64_t n, const T* bias, const Activation& a) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const T alpha = static_cast<T>(a.alpha);
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    V v = V::loadu(p + i);
    if (bias) v = v + V::loadu(bias + i);
    activate(v, a.kind, alpha).store(p + i);
  }
  if (i < n) {
    V v = V::loadu(p + i, n - i);
    if (bias) v = v + V::loadu(bias + i, n - i);
    activate(v, a.kind, alpha).store(p + i, n - i);
  }
}

// p[0, n) = act(p[0, n) + b) for one scalar bias b (a planar row of one channel).
template <typename T>
void activate_inplace(T* p, int64_t n, T b, const Activation& a) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const T alpha = static_cast<T>(a.alpha);
  const V bv(b);
  int64_t i = 0;
  for (; i + L <= n; i += L) activate(V::loadu(p + i) + bv, a.kind, alpha).store(p + i);
  if (i < n) activate(V::loadu(p + i, n - i) + bv, a.kind, alpha).store(p + i, n - i);
}

// Pointwise (1x1) convolution with its bias and activation in the epilogue (pointwise.cpp).
at::Tensor pointwise(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     int64_t activation, double alpha);

}  // namespace sepconv_cpu
