// AMX GEMMs: 32x32 output blocks held in four tile registers, A and B streamed as tiles.
// bf16: packed weight blocks are laid out as AMX B tiles (see packing.h). int8 (W8A8): the
// packed codes are regrouped per call into the tiles TDPBSSD reads.
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,amx-int8,avx512f,avx512bw")
// gcc 12's avx512fintrin.h trips -W(maybe-)uninitialized on its own _mm*_undefined_*().
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include "amx_tiles.h"
#include "kernel_impls.h"
#include "kt/packing.h"
#include "kt/scratch.h"

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

namespace {

// int8 B tiles hold 64 reduction steps: row q of a tile is, per column n, the four codes of
// steps 4q..4q+3. Two consecutive 32-byte rows of a packed block (pair rows j and j + 1: per
// column, steps 2j, 2j + 1 and then 2j + 2, 2j + 3) are one such row after interleaving their
// 16-bit words, and the 64-byte rows of a panel's consecutive blocks are the tile rows in
// order. So a panel regroups 64 bytes at a time with one word permutation; a depth that is
// not a multiple of 64 ends in a half tile of zeros.
void regroup_int8_panel(const int8_t* packed, int64_t kp, int8_t* tiles) {
  alignas(64) static const uint16_t interleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                      8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i order = _mm512_load_si512(interleave);
  const int64_t bytes = kp * kPanelRows;
  for (int64_t i = 0; i < bytes; i += 64)
    _mm512_storeu_si512(tiles + i, _mm512_permutexvar_epi16(order, _mm512_loadu_si512(packed + i)));
  for (int64_t i = bytes; i < round_up(kp, 64) * kPanelRows; i += 64) _mm512_storeu_si512(tiles + i, _mm512_setzero_si512());
}

// int32 sums in C's place to float(sum) * a_scales[row] * w_scales[col]: 16*Rows rows, 16*Cols
// columns.
void scale_int32_block(int rows, int cols, const float* a_scales, const float* w_scales, float* c, int64_t ldc) {
  for (int r = 0; r < rows; ++r) {
    const __m512 as = _mm512_set1_ps(a_scales[r]);
    for (int col = 0; col < cols; col += 16) {
      float* p = c + r * ldc + col;
      __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(p)), as);
      if (w_scales) v = _mm512_mul_ps(v, _mm512_loadu_ps(w_scales + col));
      _mm512_storeu_ps(p, v);
    }
  }
}

// As block() for int8: `steps` tiles of 64 reduction steps; B's second panel starts
// panel_stride bytes after the first. The sums are stored as int32 in C's place.
template <int Rows, int Cols>
void int8_block(int64_t steps, const int8_t* a, int64_t lda, const int8_t* w, int64_t panel_stride, float* c,
                int64_t ldc) {
  const int64_t c_stride = ldc * 4;
  float* c1 = c + 16 * ldc;
  _tile_zero(0);
  if (Cols == 2) _tile_zero(1);
  if (Rows == 2) _tile_zero(2);
  if (Rows == 2 && Cols == 2) _tile_zero(3);
  const int8_t *a1 = a + 16 * lda, *w1 = w + panel_stride;
  _tile_loadd(4, a, lda);
  _tile_loadd(6, w, 64);
  if (Rows == 2) _tile_loadd(5, a1, lda);
  if (Cols == 2) _tile_loadd(7, w1, 64);
  for (int64_t b = 0; b < steps; ++b) {
    const bool more = b + 1 < steps;
    const int64_t next_a = (b + 1) * 64, next_w = (b + 1) * 1024;
    _tile_dpbssd(0, 4, 6);
    if (Cols == 2) _tile_dpbssd(1, 4, 7);
    if (Rows == 1 && more) _tile_loadd(4, a + next_a, lda);
    if (Rows == 2) _tile_dpbssd(2, 5, 6);
    if (more) _tile_loadd(6, w + next_w, 64);
    if (Rows == 2 && more) _tile_loadd(4, a + next_a, lda);
    if (Rows == 2 && Cols == 2) _tile_dpbssd(3, 5, 7);
    if (Rows == 2 && more) _tile_loadd(5, a1 + next_a, lda);
    if (Cols == 2 && more) _tile_loadd(7, w1 + next_w, 64);
  }
  _tile_stored(0, c, c_stride);
  if (Cols == 2) _tile_stored(1, c + 16, c_stride);
  if (Rows == 2) _tile_stored(2, c1, c_stride);
  if (Rows == 2 && Cols == 2) _tile_stored(3, c1 + 16, c_stride);
}

}  // namespace

// As gemm_amx_bf16, over the regrouped codes of each panel pair (in the calling thread's
// decode buffer: 2 x 32 KiB at depth 2048, in L2 while every row block meets them).
void int8_gemm_amx(int64_t m, int64_t kp, const int8_t* a, int64_t lda, const float* a_scales, const int8_t* w,
                   const float* w_scales, int64_t panels, float* c, int64_t ldc) {
  const int64_t steps = round_up(kp, 64) / 64, panel_stride = steps * 1024;
  int8_t* tiles = scratch<int8_t>(Scratch::kTaskDecoded, 2 * panel_stride);
  configure_amx_tiles();
  for (int64_t p = 0; p < panels; p += 2) {
    const bool two_cols = p + 2 <= panels;
    for (int64_t q = 0; q < (two_cols ? 2 : 1); ++q)
      regroup_int8_panel(w + (p + q) * kp * kPanelRows, kp, tiles + q * panel_stride);
    for (int64_t row = 0; row < m; row += 32) {
      const int8_t* ap = a + row * lda;
      float* cp = c + row * ldc + p * kPanelRows;
      const bool two_rows = row + 32 <= m;
      if (two_rows && two_cols) int8_block<2, 2>(steps, ap, lda, tiles, panel_stride, cp, ldc);
      else if (two_rows) int8_block<2, 1>(steps, ap, lda, tiles, panel_stride, cp, ldc);
      else if (two_cols) int8_block<1, 2>(steps, ap, lda, tiles, panel_stride, cp, ldc);
      else int8_block<1, 1>(steps, ap, lda, tiles, panel_stride, cp, ldc);
      scale_int32_block(two_rows ? 32 : 16, two_cols ? 32 : 16, a_scales + row,
                        w_scales ? w_scales + p * kPanelRows : nullptr, cp, ldc);
    }
  }
  _tile_release();
}

}  // namespace kt
#pragma GCC pop_options
