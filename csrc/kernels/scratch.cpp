#include "kt/scratch.h"

#include <cstdlib>
#include <new>

namespace kt {
namespace {

struct ThreadScratch {
  void* data[static_cast<int>(Scratch::kCount)] = {};
  int64_t size[static_cast<int>(Scratch::kCount)] = {};
  ~ThreadScratch() {
    for (void* p : data) std::free(p);
  }
};

}  // namespace

void* scratch_bytes(Scratch slot, int64_t bytes) {
  thread_local ThreadScratch buffers;
  const int i = static_cast<int>(slot);
  if (bytes > buffers.size[i]) {
    std::free(buffers.data[i]);
    buffers.data[i] = nullptr;
    buffers.size[i] = 0;
    const int64_t rounded = (bytes + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, rounded);
    if (p == nullptr) throw std::bad_alloc();
    buffers.data[i] = p;
    buffers.size[i] = rounded;
  }
  return buffers.data[i];
}

}  // namespace kt
