// The pool behind empty_output (see common.h): large output blocks that stay mapped between calls.

#include "common.h"

#include <cstdlib>
#include <map>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace sepconv_cpu {

namespace {

constexpr size_t kHuge = size_t(2) << 20;  // the pool's unit, and a huge page
constexpr size_t kPoolFrom = size_t(4) << 20;  // smaller outputs: PyTorch's allocator
constexpr size_t kPoolBytes = size_t(1) << 30;  // free blocks kept at most

struct Pool {
  std::mutex mutex;
  std::multimap<size_t, void*> free;  // size -> block
  size_t free_bytes = 0;

  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      // the smallest free block that fits, if it wastes at most a quarter of itself
      auto it = free.lower_bound(bytes);
      if (it != free.end() && it->first <= bytes + bytes / 4) {
        void* block = it->second;
        free_bytes -= it->first;
        free.erase(it);
        return block;
      }
    }
    void* block = nullptr;
    if (posix_memalign(&block, kHuge, bytes) != 0) return nullptr;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(block, bytes, MADV_HUGEPAGE);  // advice: one fault per 2 MiB where transparent huge pages allow
#endif
    return block;
  }

  void give(void* block, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      if (free_bytes + bytes <= kPoolBytes) {
        free.emplace(bytes, block);
        free_bytes += bytes;
        return;
      }
    }
    std::free(block);
  }

  int64_t release() {
    std::lock_guard<std::mutex> lock(mutex);
    for (auto& entry : free) std::free(entry.second);
    const auto freed = static_cast<int64_t>(free_bytes);
    free.clear();
    free_bytes = 0;
    return freed;
  }
};

Pool& pool() {
  static Pool* instance = new Pool();  // never destroyed: tensors may outlive static destruction
  return *instance;
}

// A block starts with a 64-byte header holding its size; the tensor's data follows.
constexpr size_t kHeader = 64;

void give_back(void* data) {
  char* block = static_cast<char*>(data) - kHeader;
  pool().give(block, *reinterpret_cast<size_t*>(block));
}

}  // namespace

at::Tensor empty_output(at::IntArrayRef size, const at::TensorOptions& options) {
  const bool channels_last = size.size() == 4 &&
                             options.memory_format_opt().value_or(at::MemoryFormat::Contiguous) ==
                                 at::MemoryFormat::ChannelsLast;
  int64_t elements = 1;
  for (const auto n : size) elements *= n;
  const size_t data_bytes = static_cast<size_t>(elements) * options.dtype().itemsize();
  if (data_bytes < kPoolFrom) return at::empty(size, options);
  const size_t bytes = (data_bytes + kHeader + kHuge - 1) / kHuge * kHuge;
  char* block = static_cast<char*>(pool().take(bytes));
  if (block == nullptr) return at::empty(size, options);
  *reinterpret_cast<size_t*>(block) = bytes;
  std::vector<int64_t> strides(size.size());
  if (channels_last) {
    strides = c10::get_channels_last_strides_2d(size);
  } else {
    int64_t stride = 1;
    for (int64_t d = static_cast<int64_t>(size.size()) - 1; d >= 0; --d) {
      strides[d] = stride;
      stride *= std::max<int64_t>(size[d], 1);
    }
  }
  return at::from_blob(block + kHeader, size, strides, &give_back, options.memory_format(c10::nullopt));
}

int64_t release_pool() { return pool().release(); }

}  // namespace sepconv_cpu
