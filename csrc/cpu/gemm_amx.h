// The recurrent loops' bf16 GEMM on AMX tiles (Intel Sapphire/Emerald Rapids): C (fp32) = A (bf16) @ W with W
// in gemm_bf16.h's PackedPairs panel layout, which is AMX's B-tile layout as it is: in a panel of `columns`
// columns, pair row q holds (W[2q][j], W[2q+1][j]) for j = 0..columns-1, so the 16 pair rows x 16 columns of
// one B tile are 16 runs of 64 bytes, columns * 4 bytes apart (a TILELOADD stride). The pair rows are padded
// to a multiple of 16 with zeros (PackedPairs::pair_rows), A to the same depth, so every tile is whole in k.
//
// Rows are handled without padding C: the tile configuration gives the last row group's C and A tiles only
// the rows that exist (a batch of 5 uses 5-row tiles), so C can be the caller's tightly sized scratch.
//
// Tile state: AMX computes with whatever configuration the thread last loaded (LDTILECFG, which also zeroes
// every tile). A recurrent step calls this once per thread per step with the same row count, so the
// configuration is loaded only when the thread's current one differs, read back with STTILECFG, which also
// catches oneDNN or the attention kernels having configured this thread their own way in between. Measured
// (Intel Xeon, Sapphire Rapids): LDTILECFG ~230 ns, STTILECFG ~7 ns, against a b32 h256 GRU step's product of
// ~7-14 us per thread. It is not released after the call (the next step would pay the load again): a
// configured thread only makes the OS save 8 KB more when it is switched out.
//
// Compiled with function-level target attributes (the build's -march may be any x86-64 level): call only
// after has_amx_bf16() said yes.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace seqkern::cpu {

/// AMX tile geometry: a tile row is 64 bytes (32 bf16 of k, or 16 fp32 / 16 bf16 pairs of columns), at most
/// 16 rows.
constexpr int kAmxTileRows = 16;
constexpr int kAmxPairRows = 16;  // k pairs per B tile (32 values of k)
constexpr int kAmxTileCols = 16;  // fp32 columns per C tile

#if defined(__x86_64__) || defined(_M_X64)
#define SEQKERN_TARGET_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))

/// The 64-byte LDTILECFG operand (palette 1). Tiles: 0-1 the C tiles of the first row group, 2-3 of the
/// second, 4-5 the A tiles of the two row groups, 6-7 two B tiles; `rows0` / `rows1` (1..16, 0 = unused) are
/// the row counts of the two row groups.
struct alignas(64) AmxTileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};

  AmxTileConfig(int rows0, int rows1) {
    const int tile_rows[8] = {rows0, rows0, rows1, rows1, rows0, rows1, kAmxPairRows, kAmxPairRows};
    for (int t = 0; t < 8; ++t) {
      rows[t] = static_cast<uint8_t>(tile_rows[t]);
      bytes_per_row[t] = tile_rows[t] ? 64 : 0;
    }
  }
};
static_assert(sizeof(AmxTileConfig) == 64, "LDTILECFG reads 64 bytes");

/// Makes `wanted` this thread's tile configuration unless it already is (see the top of the file).
SEQKERN_TARGET_AMX inline void use_tile_config(const AmxTileConfig& wanted) {
  alignas(64) AmxTileConfig current(0, 0);
  _tile_storeconfig(&current);  // all zeros when the thread holds no tile state
  if (std::memcmp(&current, &wanted, sizeof(wanted)) != 0) _tile_loadconfig(&wanted);
}

/// C[0:r0+r1, 0:columns) = A @ panel for one group of one or two row blocks (r0 rows, then r1 rows at
/// a + 16 lda; r1 = 0: none), tiles configured as AmxTileConfig(r0, r1). Two C column tiles at a time
/// (2 x 2 tiles when r1 > 0): each loaded B tile feeds every row block, each A tile two column tiles.
/// a: bf16 bits, lda elements per row (>= 32 * k_tiles); panel: `columns` columns (a multiple of 16) of
/// k_tiles * 16 pair rows; c: ldc floats per row.
SEQKERN_TARGET_AMX inline void amx_row_group(const uint16_t* a, int64_t lda, bool two_blocks, const uint16_t* panel,
                                             int64_t columns, int64_t k_tiles, float* c, int64_t ldc) {
  const int64_t sa = lda * 2, sb = columns * 4, sc = ldc * 4;  // strides in bytes
  const uint16_t* a1 = a + kAmxTileRows * lda;
  float* c1 = c + kAmxTileRows * ldc;
  for (int64_t col = 0; col < columns; col += 2 * kAmxTileCols) {
    const bool two_cols = col + kAmxTileCols < columns;
    // Tiles 2, 3, 5 are unconfigured (0 rows) without a second block: touching them would fault.
    _tile_zero(0);
    _tile_zero(1);
    if (two_blocks) {
      _tile_zero(2);
      _tile_zero(3);
    }
    for (int64_t kt = 0; kt < k_tiles; ++kt) {
      const uint16_t* b = panel + (kt * kAmxPairRows * columns + col) * 2;
      _tile_loadd(4, a + kt * 32, sa);
      _tile_loadd(6, b, sb);
      _tile_dpbf16ps(0, 4, 6);
      if (two_cols) {
        _tile_loadd(7, b + 2 * kAmxTileCols, sb);
        _tile_dpbf16ps(1, 4, 7);
      }
      if (two_blocks) {
        _tile_loadd(5, a1 + kt * 32, sa);
        _tile_dpbf16ps(2, 5, 6);
        if (two_cols) _tile_dpbf16ps(3, 5, 7);
      }
    }
    _tile_stored(0, c + col, sc);
    if (two_cols) _tile_stored(1, c + col + kAmxTileCols, sc);
    if (two_blocks) {
      _tile_stored(2, c1 + col, sc);
      if (two_cols) _tile_stored(3, c1 + col + kAmxTileCols, sc);
    }
  }
}

/// C (rows x width fp32, ldc) = A (rows x 32 k_tiles bf16 bits, lda) @ W, W as panels of panel_width
/// columns (the last one narrower) of k_tiles * 16 pair rows each (PackedPairs). Rows go
/// in groups of 32 (two 16-row tile blocks), each group through every panel while its A tiles (32 rows x
/// depth, 16 KB at depth 256) stay in L1 and each B tile read from L2 feeds both row blocks (panel-major
/// order, a panel of 32 KB kept for all groups, ran 3200 x 256 x 768 at ~550 against ~890 GFLOP/s for
/// 32 rows). The groups of 32 full rows run under one tile configuration, the last partial group under its
/// own, so a call loads at most two (one when rows is constant from step to step).
SEQKERN_TARGET_AMX inline void gemm_amx_panels(const uint16_t* a, int64_t lda, int64_t rows, const uint16_t* panels,
                                               int64_t width, int64_t panel_width, int64_t k_tiles, float* c,
                                               int64_t ldc) {
  constexpr int64_t kGroupRows = 2 * kAmxTileRows;
  const int64_t full_groups = rows / kGroupRows, tail = rows % kGroupRows;
  const int64_t panel_stride = k_tiles * kAmxPairRows * 2 * panel_width;
  auto group = [&](int64_t row, bool two_blocks) {
    for (int64_t p = 0; p * panel_width < width; ++p) {
      const int64_t col = p * panel_width;
      amx_row_group(a + row * lda, lda, two_blocks, panels + p * panel_stride, std::min(panel_width, width - col),
                    k_tiles, c + row * ldc + col, ldc);
    }
  };
  if (full_groups > 0) {
    use_tile_config(AmxTileConfig(kAmxTileRows, kAmxTileRows));
    for (int64_t g = 0; g < full_groups; ++g) group(g * kGroupRows, true);
  }
  if (tail > 0) {
    const int rows0 = static_cast<int>(std::min<int64_t>(tail, kAmxTileRows));
    const int rows1 = static_cast<int>(tail - rows0);
    use_tile_config(AmxTileConfig(rows0, rows1));
    group(full_groups * kGroupRows, rows1 > 0);
  }
}
#undef SEQKERN_TARGET_AMX
#else
inline void gemm_amx_panels(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, int64_t, int64_t, float*,
                            int64_t, const float*) {}  // never called: no AMX off x86
#endif

}  // namespace seqkern::cpu
