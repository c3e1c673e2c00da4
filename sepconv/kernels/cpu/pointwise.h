// The pointwise (1x1) convolution's register-blocked product, shared by pointwise.cpp and the fused separable
// kernel in separable.cpp: Y = act(X W^T + b) for channels-last X (pixels, C) and W^T rows (C, C_out).
#pragma once

#include "common.h"
#include "width.h"

#include <algorithm>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <unordered_map>
#include <vector>

namespace sepconv_cpu {

inline constexpr int64_t kPixels = 8;  // pixels per register block
// output vectors per register block: 24 accumulators, 3 weight rows and 1 broadcast in 32 registers
inline constexpr int64_t kVectors = 3;
inline constexpr int64_t kPixelTask = 64;  // pixels per task: their input rows stay in L2 across the channel blocks
inline constexpr int64_t kDepth = 128;  // input channels per pass: a block of W^T's rows (128 x 48) stays in L1

// Where a register block's sums go: Y (in T, through the activation) after the last pass over the input
// channels, or the partial sums (in the accumulator type, so that bf16 does not round them) before it.
template <typename T>
struct BlockOut {
  T* y;
  int64_t ldy;
  acc_t<T>* partial;  // (pixels, ldp) sums of the passes so far, or nullptr with a single pass
  int64_t ldp;
  bool first, last;  // the first pass starts from the bias, the last one applies the activation and writes Y
  const T* residual;  // added before the activation (a residual block's shortcut), laid out as Y; or nullptr
};

// The block's accumulators: the bias on the first pass, else the partial sums so far.
template <typename T, int R, int NV, bool FULL>
inline void start_block(Vectorized<acc_t<T>> (&acc)[R][NV], const T* bias, const BlockOut<T>& o, int64_t tail) {
  using V = Vectorized<acc_t<T>>;
  constexpr int64_t L = V::size();
#pragma GCC unroll 4
  for (int j = 0; j < NV; ++j) {
    const bool part = !FULL && j == NV - 1;
    const V b = bias ? (part ? load_vec(bias + j * L, tail) : load_vec(bias + j * L)) : V(acc_t<T>(0));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const acc_t<T>* p = o.partial + r * o.ldp + j * L;
      acc[r][j] = o.first ? b : part ? load_vec(p, tail) : load_vec(p);
    }
  }
}

template <typename T, int R, int NV, bool FULL>
inline void finish_block(Vectorized<acc_t<T>> (&acc)[R][NV], const BlockOut<T>& o, int64_t tail, Act act,
                         acc_t<T> alpha) {
  using V = Vectorized<acc_t<T>>;
  constexpr int64_t L = V::size();
  if (o.last && o.residual) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) {
        const T* res = o.residual + r * o.ldy + j * L;
        acc[r][j] = acc[r][j] + (!FULL && j == NV - 1 ? load_vec(res, tail) : load_vec(res));
      }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      const bool part = !FULL && j == NV - 1;
      if (o.last) {
        const V v = act == Act::None ? acc[r][j] : activate(acc[r][j], act, alpha);
        if (part) store_vec(v, o.y + r * o.ldy + j * L, tail);
        else store_vec(v, o.y + r * o.ldy + j * L);
      } else {
        acc_t<T>* p = o.partial + r * o.ldp + j * L;
        if (part) store_vec(acc[r][j], p, tail);
        else store_vec(acc[r][j], p);
      }
    }
  }
}

// Y[r, 0:n) = act(b + sum_k X[r, k] * Wt[k, 0:n)) for R pixels and NV vectors of outputs (the last holds `tail`).
// X may be stored in the accumulator type (the fused separable's hidden block) rather than in T.
template <typename T, typename In, int R, int NV, bool FULL>
void pointwise_block(const In* x, int64_t ldx, const T* wt, int64_t ldw, int64_t K, const T* bias,
                     const BlockOut<T>& out, int64_t tail, Act act, acc_t<T> alpha) {
  using V = Vectorized<acc_t<T>>;
  constexpr int64_t L = V::size();
  V acc[R][NV];
  start_block<T, R, NV, FULL>(acc, bias, out, tail);
  for (int64_t k = 0; k < K; ++k) {
    V w[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) w[j] = load_vec(wt + k * ldw + j * L);  // whole vectors: see weight_columns
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const V a(to_acc(x[r * ldx + k]));
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[r][j] = at::vec::fmadd(a, w[j], acc[r][j]);
    }
  }
  finish_block<T, R, NV, FULL>(acc, out, tail, act, alpha);
}

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
#define SEPCONV_BF16_PAIRS 1

// bf16 on a CPU with AVX512-BF16: vdpbf16ps multiplies two input channels per instruction, twice float32's FMA
// rate. W^T then comes as pairs of rows (pair_columns): word o of pair row j holds (W[o, 2j], W[o, 2j + 1]).
template <int R, int NV, bool FULL>
void pointwise_block_pairs(const c10::BFloat16* x, int64_t ldx, const int32_t* wp, int64_t ldw, int64_t K,
                           const c10::BFloat16* bias, const BlockOut<c10::BFloat16>& out, int64_t tail, Act act,
                           float alpha) {
  using V = Vectorized<float>;
  V acc[R][NV];
  start_block<c10::BFloat16, R, NV, FULL>(acc, bias, out, tail);
  __m512 s[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) s[r][j] = acc[r][j];
  // pair rows are padded to whole vectors with zeros, so every weight load is full
  const auto step = [&](const int32_t* w_row, auto&& x_word) {
    __m512i w[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) w[j] = _mm512_loadu_si512(w_row + j * 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_set1_epi32(x_word(r)));
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) s[r][j] = _mm512_dpbf16_ps(s[r][j], xv, reinterpret_cast<__m512bh>(w[j]));
    }
  };
  int64_t k = 0;
  for (; k + 2 <= K; k += 2) {
    step(wp + (k / 2) * ldw, [&](int r) {
      int32_t word;
      std::memcpy(&word, x + r * ldx + k, sizeof(word));
      return word;
    });
  }
  if (k < K) {  // an odd last channel: its pair's second weight is zero, so the second input must be too (not NaN)
    step(wp + (k / 2) * ldw, [&](int r) {
      uint16_t bits;
      std::memcpy(&bits, x + r * ldx + k, sizeof(bits));
      return static_cast<int32_t>(bits);
    });
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[r][j] = V(s[r][j]);
  finish_block<c10::BFloat16, R, NV, FULL>(acc, out, tail, act, alpha);
}

// W^T (K, O) of bf16 as pair rows of 32-bit words, rows a whole number of vectors apart (zeros past O): the
// packed tensor and its leading dimension in words. An odd K's last pair ends in a zero.
inline std::pair<at::Tensor, int64_t> pair_columns(const at::Tensor& wt) {
  const int64_t K = wt.size(0), O = wt.size(1), pairs = (K + 1) / 2;
  int64_t ld = (O + 15) / 16 * 16;
  if ((ld * 4) % 512 == 0) ld += 16;  // rows 512 bytes apart share L1 sets (see padded_rows)
  auto packed = at::zeros({pairs, ld, 2}, wt.options());
  auto used = packed.narrow(1, 0, O);
  used.select(2, 0).copy_(wt.slice(0, 0, K, 2));
  used.select(2, 1).narrow(0, 0, K / 2).copy_(wt.slice(0, 1, K, 2));
  return {packed, ld};
}

// pair_columns of a weight, kept while the weight lives and is not written to: inference calls the same weights
// again and again, and packing them every call cost about 1 ms of MobileNetV2's 7 ms at batch 1. A weak reference
// keys each entry (the TensorImpl's memory is not reused while it is held), with the weight's version and data.
class PairCache {
 public:
  std::pair<at::Tensor, int64_t> get(const at::Tensor& weight, const at::Tensor& columns) {
    if (weight.is_inference()) return pair_columns(columns);  // no version counter to tell a write
    c10::TensorImpl* impl = weight.unsafeGetTensorImpl();
    const auto version = impl->version_counter().current_version();
    std::lock_guard<std::mutex> guard(mutex_);
    const auto found = entries_.find(impl);
    if (found != entries_.end() && !found->second.owner.expired() && found->second.version == version &&
        found->second.data == weight.data_ptr())
      return {found->second.packed, found->second.ld};
    sweep();  // on a miss only: frees the packed copies of weights that are gone
    auto [packed, ld] = pair_columns(columns);
    entries_.insert_or_assign(impl, Entry{c10::weak_intrusive_ptr<c10::TensorImpl>(weight.getIntrusivePtr()),
                                          version, weight.data_ptr(), packed, ld});
    return {packed, ld};
  }

 private:
  static constexpr size_t kMaxEntries = 1024;
  struct Entry {
    c10::weak_intrusive_ptr<c10::TensorImpl> owner;
    uint32_t version;
    const void* data;
    at::Tensor packed;
    int64_t ld;
  };
  // drops the entries of weights that are gone, and every entry if that frees nothing
  void sweep() {
    for (auto it = entries_.begin(); it != entries_.end();) it = it->second.owner.expired() ? entries_.erase(it) : ++it;
    if (entries_.size() >= kMaxEntries) entries_.clear();
  }
  std::mutex mutex_;
  std::unordered_map<const c10::TensorImpl*, Entry> entries_;
};

inline PairCache& pair_cache() {
  static PairCache cache;
  return cache;
}
#endif

// How a register block reads W^T: rows of T, or (Wt = int32_t) bf16 pair rows.
template <typename T, typename In, typename Wt, int R>
using Block = void (*)(const In*, int64_t, const Wt*, int64_t, int64_t, const T*, const BlockOut<T>&, int64_t, Act,
                       acc_t<T>);

// The block for this many vectors of outputs (1 to kVectors), the last one full or not.
template <typename T, typename In, typename Wt, int R>
Block<T, In, Wt, R> pick(int64_t vectors, bool full) {
  Block<T, In, Wt, R> block = nullptr;
  with_width<kVectors>(vectors, [&](auto width) {
    constexpr int NV = decltype(width)::value;
#ifdef SEPCONV_BF16_PAIRS
    if constexpr (std::is_same_v<Wt, int32_t>) {
      block = full ? pointwise_block_pairs<R, NV, true> : pointwise_block_pairs<R, NV, false>;
      return;
    }
#endif
    if constexpr (std::is_same_v<Wt, T>)
      block = full ? pointwise_block<T, In, R, NV, true> : pointwise_block<T, In, R, NV, false>;
  });
  return block;
}

// Rows [p0, p1) of Y (rows `ldy` apart), output channels [o_begin, o_end), on the calling thread. W^T's rows
// are `ldw` apart (pair rows for Wt = int32_t, each two input channels). `residual` (laid out as Y, or nullptr)
// is added before the activation.
template <typename T, typename In, typename Wt = T>
void pointwise_rows(const In* x, const Wt* wt, int64_t ldw, const T* bias, T* y, int64_t ldy, int64_t p0, int64_t p1,
                    int64_t o_begin, int64_t o_end, int64_t K, const Activation& a, const T* residual = nullptr) {
  constexpr int64_t rows_per_channel = std::is_same_v<Wt, int32_t> ? 2 : 1;
  constexpr int64_t L = Vectorized<acc_t<T>>::size();
  const int64_t chunk = kVectors * L;
  const acc_t<T> alpha = static_cast<acc_t<T>>(a.alpha);
  // passes over kDepth input channels at a time: partial sums wait in `partial` (in cache, in the accumulator
  // type), the last pass applies the activation and writes Y
  std::vector<acc_t<T>> partial(K > kDepth ? (p1 - p0) * chunk : 0);
  for (int64_t o = o_begin; o < o_end; o += chunk) {
    const int64_t n = std::min(chunk, o_end - o), vectors = (n + L - 1) / L, tail = n - (vectors - 1) * L;
    const auto block8 = pick<T, In, Wt, kPixels>(vectors, tail == L);
    const auto block4 = pick<T, In, Wt, kPixels / 2>(vectors, tail == L);  // leftovers: one pixel per block is
    const auto block1 = pick<T, In, Wt, 1>(vectors, tail == L);            // load-bound (a weight load per FMA)
    const T* b = bias ? bias + o : nullptr;
    for (int64_t k0 = 0; k0 < K; k0 += kDepth) {
      const int64_t depth = std::min(kDepth, K - k0);
      const bool last = k0 + depth == K;
      const Wt* w = wt + k0 / rows_per_channel * ldw + o;  // kDepth is even: a pass starts on a pair
      const auto out = [&](int64_t p) {
        acc_t<T>* sums = partial.empty() ? nullptr : partial.data() + (p - p0) * chunk;
        return BlockOut<T>{y + p * ldy + o, ldy, sums, chunk, k0 == 0, last, residual ? residual + p * ldy + o : nullptr};
      };
      int64_t p = p0;
      for (; p + kPixels <= p1; p += kPixels)
        block8(x + p * K + k0, K, w, ldw, depth, b, out(p), tail, last ? a.kind : Act::None, alpha);
      for (; p + kPixels / 2 <= p1; p += kPixels / 2)
        block4(x + p * K + k0, K, w, ldw, depth, b, out(p), tail, last ? a.kind : Act::None, alpha);
      for (; p < p1; ++p) block1(x + p * K + k0, K, w, ldw, depth, b, out(p), tail, last ? a.kind : Act::None, alpha);
    }
  }
}

// A leading dimension for rows of n values that is not a multiple of 512 bytes: rows that far apart fall into the
// same few L1 sets and evict each other (C_out = 512 or 1024 would otherwise).
inline int64_t padded_rows(int64_t n, int64_t element_size) {
  return (n * element_size) % 512 == 0 ? n + 64 / element_size : n;
}

// n values rounded up to whole 64-byte vectors: the register blocks read W^T's rows in whole vectors, the lanes
// past C_out unused, since a masked load in their inner loop cost 2-4x here (C_out = 24 ran at 59 GFLOP/s, 16 at 153).
inline int64_t whole_vectors(int64_t n, int64_t element_size) {
  const int64_t per = 64 / element_size;
  return (n + per - 1) / per * per;
}

// W^T of a (C_out, C, 1, 1) weight as a (C, C_out) matrix with unit column stride, and its leading dimension,
// each row readable up to whole_vectors(C_out): a view of the weight when it is stored so (sepconv.inference
// does), else a zero-padded copy.
inline std::pair<at::Tensor, int64_t> weight_columns(const at::Tensor& weight) {
  const int64_t O = weight.size(0), C = weight.size(1), size = weight.element_size();
  const int64_t row = whole_vectors(O, size);
  const auto w = weight.reshape({O, C});
  const int64_t ld = C == 1 ? row : w.stride(1);
  const int64_t readable = static_cast<int64_t>(w.storage().nbytes()) / size - w.storage_offset();
  if (w.stride(0) == 1 && ld >= row && (C - 1) * ld + row <= readable) return {w.t(), ld};
  auto columns = at::zeros({C, padded_rows(row, size)}, weight.options());
  columns.narrow(1, 0, O).copy_(w.t());
  return {columns.narrow(1, 0, O), columns.size(1)};
}

// Runs the pointwise product over W^T of `weight` as its kernel reads it: f(pointer, leading dimension) with rows
// of T, or for bf16 where the CPU has AVX512-BF16, pair rows of 32-bit words (Wt = int32_t).
template <typename T, typename F>
void with_columns(const at::Tensor& weight, F&& f) {
  const auto [columns, ld] = weight_columns(weight);
#ifdef SEPCONV_BF16_PAIRS
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const auto [pairs, pair_ld] = pair_cache().get(weight, columns);
    f(static_cast<const int32_t*>(pairs.data_ptr()), pair_ld);
    return;
  }
#endif
  f(columns.template data_ptr<T>(), ld);
}

// What the product reads its input from where the caller chooses (the fused separable's hidden block): the
// accumulator type, or bf16 itself where the pair rows need bf16 pairs of inputs.
template <typename T>
#ifdef SEPCONV_BF16_PAIRS
using product_input_t = std::conditional_t<std::is_same_v<T, c10::BFloat16>, T, acc_t<T>>;
#else
using product_input_t = acc_t<T>;
#endif

}  // namespace sepconv_cpu
