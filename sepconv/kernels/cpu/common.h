// What the C++ kernels share: the vector unit (vectors.h), the activations that kernels apply in their epilogue,
// the output pool, and the entry points of the sources other than the depthwise ones.
#pragma once

#include "vectors.h"

#include <cmath>
#include <vector>

namespace sepconv_cpu {

// The kernels' dtypes: bf16 is stored as bf16 and computed in float (vectors.h).
#define SEPCONV_DISPATCH(TYPE, NAME, ...) AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, TYPE, NAME, __VA_ARGS__)

inline bool kernel_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kDouble || t == at::kBFloat16; }

// Parallel tasks per thread where work is split on purpose: enough that uneven tasks still balance.
inline constexpr int64_t kTasksPerThread = 4;

// Codes shared with sepconv/activations.py (FUSED, index = code); `alpha` is ELU's alpha or LeakyReLU's slope.
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

// What a forward kernel does to each finished vector of outputs on its way to memory.
struct Epilogue {
  Activation act;
  bool stream = false;  // outputs far larger than the caches: store around them (see store_output)
};

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

// p[0, n) = act(p[0, n) + bias[0, n)) in place (bias may be null, then the constant b), while the values are still
// in cache. The activation is chosen once per call, outside the loop.
template <typename T, Act KIND>
void activate_loop(T* p, int64_t n, const T* bias, acc_t<T> b, acc_t<T> alpha) {
  using V = Vectorized<acc_t<T>>;
  constexpr int64_t L = V::size();
  const V bv(b);
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    const V v = load_vec(p + i) + (bias ? load_vec(bias + i) : bv);
    store_vec(activate(v, KIND, alpha), p + i);
  }
  if (i < n) {
    const V v = load_vec(p + i, n - i) + (bias ? load_vec(bias + i, n - i) : bv);
    store_vec(activate(v, KIND, alpha), p + i, n - i);
  }
}

template <typename T>
void activate_inplace(T* p, int64_t n, const T* bias, const Activation& a, acc_t<T> b = acc_t<T>(0)) {
  const acc_t<T> alpha = static_cast<acc_t<T>>(a.alpha);
  switch (a.kind) {
    case Act::ReLU: return activate_loop<T, Act::ReLU>(p, n, bias, b, alpha);
    case Act::ReLU6: return activate_loop<T, Act::ReLU6>(p, n, bias, b, alpha);
    case Act::ELU: return activate_loop<T, Act::ELU>(p, n, bias, b, alpha);
    case Act::SiLU: return activate_loop<T, Act::SiLU>(p, n, bias, b, alpha);
    case Act::Hardswish: return activate_loop<T, Act::Hardswish>(p, n, bias, b, alpha);
    case Act::GELU: return activate_loop<T, Act::GELU>(p, n, bias, b, alpha);
    case Act::LeakyReLU: return activate_loop<T, Act::LeakyReLU>(p, n, bias, b, alpha);
    default: return activate_loop<T, Act::None>(p, n, bias, b, alpha);
  }
}

// A tensor's data, or nullptr for an undefined tensor (no bias).
template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// An empty output tensor. glibc maps a large block afresh on every call and returns it on free, so filling a
// large output took a page fault every 4 KiB and the kernel's zeroing of each page: more than some kernels'
// own time. Large outputs therefore come from a pool of blocks that stay mapped (huge pages where the kernel
// offers them on request): a block goes back to the pool when the last tensor using it dies, and the pool keeps
// at most kPoolBytes of free blocks. Small outputs come from PyTorch's allocator.
at::Tensor empty_output(at::IntArrayRef size, const at::TensorOptions& options);

// Frees the pool's free blocks (release_memory in Python); returns the bytes freed.
int64_t release_pool();

// Batch norm with the batch's statistics and an activation after it, channels-last float32 (norm.cpp).
std::vector<at::Tensor> batch_norm_act_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                               double eps, int64_t activation);
std::vector<at::Tensor> batch_norm_act_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                                const at::Tensor& bias, const at::Tensor& mean,
                                                const at::Tensor& invstd, int64_t activation);

// Pointwise (1x1) convolution with its bias, a residual (added before the activation) and the activation in the
// epilogue (pointwise.cpp).
at::Tensor pointwise(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     int64_t activation, double alpha, const std::optional<at::Tensor>& residual = std::nullopt);

// A residual for an output of `size` in `format`: checked (one line naming both shapes) and laid out as the output.
at::Tensor residual_like(const std::optional<at::Tensor>& residual, at::IntArrayRef size, at::ScalarType dtype,
                         at::MemoryFormat format);

}  // namespace sepconv_cpu
