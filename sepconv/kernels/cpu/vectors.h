// The vector unit, and how kernels reach it from memory.
//
// ATen's Vectorized picks its implementation from CPU_CAPABILITY, so that is set here, before vec.h. Kernels are
// templates on a storage type T (what tensors hold) and compute in acc_t<T> (what registers hold and sums run in),
// touching memory only through load_vec / store_vec and to_acc / to_storage. float and double compute in
// themselves; bf16 computes in float (Storage<c10::BFloat16>: loads that widen, stores that round), so the kernels
// are the same source for every dtype and the dispatch (SEPCONV_DISPATCH in common.h) lists the dtypes.
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

// ATen only: torch/extension.h (autograd, nn, pybind11) is for bindings.cpp, and would double the build time
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

namespace sepconv_cpu {

using at::vec::Vectorized;

// Storage type T in memory, acc in registers. This primary template covers types that compute in themselves.
template <typename T>
struct Storage {
  using acc = T;
  using V = Vectorized<acc>;
  static V load(const T* p) { return V::loadu(p); }
  static V load(const T* p, int64_t n) { return V::loadu(p, n); }  // lanes past n are zero
  static void store(const V& v, T* p) { v.store(p); }
  static void store(const V& v, T* p, int64_t n) { v.store(p, n); }
  static acc widen(T v) { return v; }
  static T narrow(acc v) { return v; }
};

// bf16 in memory, float in registers: loads widen (a bf16 is a float's upper half), stores round to nearest even
// (vcvtneps2bf16 where the CPU has AVX512-BF16).
template <>
struct Storage<c10::BFloat16> {
  using T = c10::BFloat16;
  using acc = float;
  using V = Vectorized<float>;
  static constexpr int64_t L = V::size();
#if defined(CPU_CAPABILITY_AVX512)
  static V widen16(__m256i h) { return V(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))); }
  static __m256i round16(const V& v) {
#if defined(__AVX512BF16__)
    return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(static_cast<__m512>(v)));
#else
    const __m512i u = _mm512_castps_si512(static_cast<__m512>(v));
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(static_cast<__m512>(v), static_cast<__m512>(v), _CMP_UNORD_Q);
    r = _mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(0x7fc0));
    return _mm512_cvtepi32_epi16(r);
#endif
  }
  static __mmask16 mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }
  static V load(const T* p) { return widen16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static V load(const T* p, int64_t n) { return widen16(_mm256_maskz_loadu_epi16(mask(n), p)); }
  static void store(const V& v, T* p) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), round16(v)); }
  static void store(const V& v, T* p, int64_t n) { _mm256_mask_storeu_epi16(p, mask(n), round16(v)); }
#else
  // elsewhere through a float buffer: correct, not tuned (the portable build's bf16 is not a fast path)
  static V load(const T* p, int64_t n = L) {
    float buffer[L] = {};
    for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<float>(p[i]);
    return V::loadu(buffer);
  }
  static void store(const V& v, T* p, int64_t n = L) {
    float buffer[L];
    v.store(buffer);
    for (int64_t i = 0; i < n; ++i) p[i] = T(buffer[i]);
  }
#endif
  static acc widen(T v) { return static_cast<float>(v); }
  static T narrow(acc v) { return T(v); }
};

template <typename T>
using acc_t = typename Storage<T>::acc;

// V::size() values of T from p, in the accumulator's vector.
template <typename T>
inline Vectorized<acc_t<T>> load_vec(const T* p) { return Storage<T>::load(p); }

// The first n (< V::size()) values of T from p; the other lanes are zero.
template <typename T>
inline Vectorized<acc_t<T>> load_vec(const T* p, int64_t n) { return Storage<T>::load(p, n); }

template <typename T>
inline void store_vec(const Vectorized<acc_t<T>>& v, T* p) { Storage<T>::store(v, p); }

template <typename T>
inline void store_vec(const Vectorized<acc_t<T>>& v, T* p, int64_t n) { Storage<T>::store(v, p, n); }

// A full vector when FULL (n unused), else the first n lanes: one kernel body serves both cases.
template <bool FULL, typename T>
inline Vectorized<acc_t<T>> load_lanes(const T* p, int64_t n) {
  if constexpr (FULL) return load_vec(p);
  else return load_vec(p, n);
}

template <bool FULL, typename T>
inline void store_lanes(const Vectorized<acc_t<T>>& v, T* p, int64_t n) {
  if constexpr (FULL) store_vec(v, p);
  else store_vec(v, p, n);
}

template <typename T>
inline acc_t<T> to_acc(T v) { return Storage<T>::widen(v); }

template <typename T>
inline T to_storage(acc_t<T> v) { return Storage<T>::narrow(v); }

}  // namespace sepconv_cpu
