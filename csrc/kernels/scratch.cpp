#include "kt/scratch.h"

#include <sys/mman.h>

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

constexpr int64_t kHugePage = int64_t{2} << 20;

// Large buffers are 2 MiB aligned and ask for transparent huge pages: the GEMMs read rows of
// A 4 KiB apart, so with 4 KiB pages every row of a tile is its own TLB entry.
void* allocate(int64_t bytes) {
  if (bytes < kHugePage) return std::aligned_alloc(64, (bytes + 63) / 64 * 64);
  const int64_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  void* p = std::aligned_alloc(kHugePage, rounded);
  if (p != nullptr) madvise(p, rounded, MADV_HUGEPAGE);
  return p;
}

}  // namespace

void* scratch_bytes(Scratch slot, int64_t bytes) {
  thread_local ThreadScratch buffers;
  const int i = static_cast<int>(slot);
  if (bytes > buffers.size[i]) {
    std::free(buffers.data[i]);
    buffers.data[i] = nullptr;
    buffers.size[i] = 0;
    void* p = allocate(bytes);
    if (p == nullptr) throw std::bad_alloc();
    buffers.data[i] = p;
    buffers.size[i] = bytes;
  }
  return buffers.data[i];
}

}  // namespace kt
