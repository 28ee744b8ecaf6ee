// The AMX tile units for the C++ CPU kernels (cpu_flash_prefill.cpp, cpu_paged_decode.cpp): whether
// the build targets them, the one tile configuration the kernels use, and Linux's permission.
#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define TOKENMILL_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace tokenmill_cpu {

// Eight tiles of 16 rows x 64 bytes (16 x 32 bf16, 16 x 16 float32, or 16 VNNI pair rows).
struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline void configure_tiles() {
  TileConfig config;
  for (int i = 0; i < 8; ++i) config.colsb[i] = 64, config.rows[i] = 16;
  _tile_loadconfig(&config);
}

// Linux hands out the tile registers' state only to processes that ask (once; oneDNN asks the same).
inline bool tiles_granted() {
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  static const bool granted = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return granted;
}

}  // namespace tokenmill_cpu
#endif
