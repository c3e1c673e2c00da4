// The vector unit, and how kernels reach it from memory.
//
// ATen's Vectorized picks its implementation from CPU_CAPABILITY, so that is set here, before vec.h. Kernels are
// templates on a storage type T (what tensors hold) and compute in acc_t<T> (what registers hold and sums run in),
// touching memory only through load_vec / store_vec and to_acc / to_storage. float and double compute in
// themselves. A bf16 path specialises Storage<c10::BFloat16> (acc float; loads that widen, stores that round) and
// adds its instantiations to the dispatch: the kernels themselves do not change.
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
