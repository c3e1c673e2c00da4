// The pool behind empty_output (see common.h): large output blocks that stay mapped between calls.

#include "common.h"

#include <c10/core/CPUAllocator.h>
#include <c10/util/strides.h>

#include <cstdlib>
#include <map>
#include <mutex>

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

// The pool as an allocator, so that its storages are resizable like PyTorch's: resize_, out= and set_ reach it.
struct PoolAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    if (n >= kPoolFrom) {
      const size_t bytes = (n + kHeader + kHuge - 1) / kHuge * kHuge;
      if (char* block = static_cast<char*>(pool().take(bytes))) {
        *reinterpret_cast<size_t*>(block) = bytes;
        return {block + kHeader, block + kHeader, &give_back, c10::Device(c10::DeviceType::CPU)};
      }
    }
    return c10::GetCPUAllocator()->allocate(n);
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

PoolAllocator& allocator() {
  static PoolAllocator* instance = new PoolAllocator();  // never destroyed, as the pool
  return *instance;
}

}  // namespace

at::Tensor empty_output(at::IntArrayRef size, const at::TensorOptions& options) {
  const auto format = options.memory_format_opt().value_or(at::MemoryFormat::Contiguous);
  int64_t elements = 1;
  for (const auto n : size) elements *= n;
  const size_t data_bytes = static_cast<size_t>(elements) * options.dtype().itemsize();
  if (data_bytes < kPoolFrom) return at::empty(size, options);
  c10::Storage storage(c10::Storage::use_byte_size_t(), data_bytes, &allocator(), /*resizable=*/true);
  c10::DimVector strides = c10::contiguous_strides(size);
  if (format == at::MemoryFormat::ChannelsLast && size.size() == 4) {
    const auto cl = c10::get_channels_last_strides_2d(size);
    strides.assign(cl.begin(), cl.end());
  }
  if (format == at::MemoryFormat::ChannelsLast3d && size.size() == 5) {
    const auto cl = c10::get_channels_last_strides_3d(size);
    strides.assign(cl.begin(), cl.end());
  }
  return at::empty({0}, options.memory_format(c10::nullopt)).set_(storage, 0, size, strides);
}

int64_t release_pool() { return pool().release(); }

}  // namespace sepconv_cpu
