// Scratch buffers recycled across calls. A large buffer allocated fresh on every step is
// page-faulted and zeroed by the kernel each time (a fifth of a training step when it was
// measured); recycling keeps the pages. Each thread owns its buffers, and each named slot
// grows to the largest size asked of it, so the memory kept is one call's working set per
// thread. The contents are never read before being written: results do not depend on it.
#pragma once

#include <cstdint>

namespace kt {

// Slots: buffers alive at the same time in one thread need different slots. The expert driver
// names what each slot holds in one place (csrc/kernels/workspace.h).
enum class Scratch : int {
  kRowsA, kRowsB, kRowsC, kRowsD, kRowsE, kRowsF, kRowsG,  // per-call, expert-sorted rows
  kRowsOut,                                        // per-call, fp32 GEMM outputs in expert-sorted rows
  kRowsInt8, kRowsInt8Scales,                      // per-call, W8A8's quantized rows and their scales
  kLoraA, kLoraB, kLoraC, kLoraD,                  // per-call packed LoRA operands
  kTaskAcc, kTaskWeights, kTaskDecoded, kTaskDense,  // per work item, in worker threads
  kCount
};

// At least `bytes` bytes, 64-byte aligned, for the calling thread's `slot`.
void* scratch_bytes(Scratch slot, int64_t bytes);

template <typename T>
T* scratch(Scratch slot, int64_t count) {
  return static_cast<T*>(scratch_bytes(slot, count * static_cast<int64_t>(sizeof(T))));
}

}  // namespace kt
