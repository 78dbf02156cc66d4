// AMX-BF16 GEMM: 32x32 output blocks held in four tile registers, A and B streamed as
// 16x32 bf16 tiles. Packed weight blocks are laid out as AMX B tiles (see packing.h).
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f")
#include <immintrin.h>

#include "amx_tiles.h"
#include "kernel_impls.h"
#include "kt/packing.h"

namespace kt {
namespace {

// One block of 16*Rows rows by 16*Cols columns of C over `blocks` blocks of depth. The second
// panel of B starts panel_stride elements after the first. Tiles 0-3 hold C, 4-5 A, 6-7 B.
template <int Rows, int Cols>
void block(int64_t blocks, const uint16_t* a, int64_t lda, const uint16_t* w, int64_t panel_stride,
           float* c, int64_t ldc, bool accumulate) {
  const int64_t a_stride = lda * 2, c_stride = ldc * 4;
  float* c1 = c + 16 * ldc;
  if (accumulate) {
    _tile_loadd(0, c, c_stride);
    if (Cols == 2) _tile_loadd(1, c + 16, c_stride);
    if (Rows == 2) _tile_loadd(2, c1, c_stride);
    if (Rows == 2 && Cols == 2) _tile_loadd(3, c1 + 16, c_stride);
  } else {
    _tile_zero(0);
    if (Cols == 2) _tile_zero(1);
    if (Rows == 2) _tile_zero(2);
    if (Rows == 2 && Cols == 2) _tile_zero(3);
  }
  // Tile registers are not renamed: a load into a register waits for the products reading
  // it. Each register is reloaded for step b + 1 right after its last reader in step b, so
  // the loads overlap the remaining products instead of stalling the next step.
  const uint16_t *a1 = a + 16 * lda, *w1 = w + panel_stride;
  _tile_loadd(4, a, a_stride);
  _tile_loadd(6, w, 64);
  if (Rows == 2) _tile_loadd(5, a1, a_stride);
  if (Cols == 2) _tile_loadd(7, w1, 64);
  for (int64_t b = 0; b < blocks; ++b) {
    const bool more = b + 1 < blocks;
    const int64_t next_a = (b + 1) * kBlockDepth, next_w = (b + 1) * kBlockElems;
    _tile_dpbf16ps(0, 4, 6);
    if (Cols == 2) _tile_dpbf16ps(1, 4, 7);
    if (Rows == 1 && more) _tile_loadd(4, a + next_a, a_stride);
    if (Rows == 2) _tile_dpbf16ps(2, 5, 6);
    if (more) _tile_loadd(6, w + next_w, 64);
    if (Rows == 2 && more) _tile_loadd(4, a + next_a, a_stride);
    if (Rows == 2 && Cols == 2) _tile_dpbf16ps(3, 5, 7);
    if (Rows == 2 && more) _tile_loadd(5, a1 + next_a, a_stride);
    if (Cols == 2 && more) _tile_loadd(7, w1 + next_w, 64);
  }
  _tile_stored(0, c, c_stride);
  if (Cols == 2) _tile_stored(1, c + 16, c_stride);
  if (Rows == 2) _tile_stored(2, c1, c_stride);
  if (Rows == 2 && Cols == 2) _tile_stored(3, c1 + 16, c_stride);
}

}  // namespace

// Each 32x32 block of C runs the whole depth and is stored once. Panel pairs are outermost: a
// pair's B (2 x 64 KiB at depth 2048) stays in L2 while every row block of A meets it. (Chunks
// of depth whose 32-row piece of A stays in L1 instead, re-reading C per chunk, were slower per
// layer on the 16-core host.)
void gemm_amx_bf16(int64_t m, int64_t kp, const uint16_t* a, int64_t lda, const uint16_t* w,
                   int64_t panels, float* c, int64_t ldc, bool accumulate) {
  const int64_t blocks = kp / kBlockDepth, panel_stride = blocks * kBlockElems;
  configure_amx_tiles();
  for (int64_t p = 0; p < panels; p += 2) {
    const uint16_t* wp = w + p * panel_stride;
    const bool two_cols = p + 2 <= panels;
    for (int64_t row = 0; row < m; row += 32) {
      const uint16_t* ap = a + row * lda;
      float* cp = c + row * ldc + p * kPanelRows;
      const bool two_rows = row + 32 <= m;
      if (two_rows && two_cols) block<2, 2>(blocks, ap, lda, wp, panel_stride, cp, ldc, accumulate);
      else if (two_rows) block<2, 1>(blocks, ap, lda, wp, panel_stride, cp, ldc, accumulate);
      else if (two_cols) block<1, 2>(blocks, ap, lda, wp, panel_stride, cp, ldc, accumulate);
      else block<1, 1>(blocks, ap, lda, wp, panel_stride, cp, ldc, accumulate);
    }
  }
  _tile_release();
}

}  // namespace kt
#pragma GCC pop_options
