// The AMX tile configuration of every AMX code path here (the GEMM, and the ceiling benchmark
// in benchmarks/): eight tiles of 16 rows x 64 bytes, i.e. fp32 16x16 for C and bf16 16x32 for
// A and B (16 pair-rows of 16 columns).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace kt {

struct alignas(64) AmxTileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

__attribute__((target("amx-tile"))) inline void configure_amx_tiles() {
  AmxTileConfig cfg = {};
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  // GCC's ldtilecfg builtin does not tell the optimiser that it reads all 64 bytes: once
  // inlined, GCC 12 dropped the stores above as dead and the tiles stayed unconfigured.
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

}  // namespace kt
