// Runtime widths (taps of a kernel row, output channels of a plane, vectors of a block) as compile-time constants,
// so that the kernels' loops over them unroll and their accumulator arrays stay in registers.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

// The helpers below always inline, so that a kernel reads as if its switch were written out in place.
#if defined(__GNUC__)
#define SEPCONV_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define SEPCONV_ALWAYS_INLINE inline
#endif

namespace sepconv_cpu {

template <int N>
using Width = std::integral_constant<int, N>;

// f(Width<n>{}) for the runtime n in [1, MAX]; nothing for any other n. A generic lambda's body is instantiated
// for each width and inlined into its branch, so the call costs one branch on n.
template <int MAX, typename F>
SEPCONV_ALWAYS_INLINE void with_width(int64_t n, F&& f) {
  static_assert(MAX >= 1, "with_width: MAX must be at least 1");
  if (n == MAX) {
    f(Width<MAX>{});
  } else if constexpr (MAX > 1) {
    with_width<MAX - 1>(n, std::forward<F>(f));
  }
}

// [0, n) in chunks: f(start, Width<MAX>{}) while MAX remain, then f(start, Width<rest>{}) for the rest.
template <int MAX, typename F>
SEPCONV_ALWAYS_INLINE void in_chunks(int64_t n, F&& f) {
  int64_t start = 0;
  for (; start + MAX <= n; start += MAX) f(start, Width<MAX>{});
  if constexpr (MAX > 1) {
    if (start < n) with_width<MAX - 1>(n - start, [&](auto width) { f(start, width); });
  }
}

// f(Width<MAX>{}), f(Width<MAX / 2>{}), ..., f(Width<1>{}): blocks that halve down to one (MAX a power of two).
template <int MAX, typename F>
SEPCONV_ALWAYS_INLINE void halving_widths(F&& f) {
  static_assert(MAX >= 1 && (MAX & (MAX - 1)) == 0, "halving_widths: MAX must be a power of two");
  f(Width<MAX>{});
  if constexpr (MAX > 1) halving_widths<MAX / 2>(std::forward<F>(f));
}

}  // namespace sepconv_cpu
