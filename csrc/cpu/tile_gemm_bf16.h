// bfloat16 tile GEMMs with fp32 accumulation on the CPU's bf16 units, chosen at run time:
//   * AMX (Intel Sapphire/Emerald Rapids): TDPBF16PS on 16 x 32 bf16 tiles, 2 x 2 output tiles in flight;
//   * AVX512-BF16 (AMD Zen 4, also the Intel Xeons): VDPBF16PS, a register-blocked micro-kernel;
//   * neither: the caller's fp32 path (bf16 widened to fp32 and tile_gemm, attention.h).
// Both bf16 kernels read B in the same "VNNI" layout, so one packing serves both: pair row p of a
// (depth x cols) matrix holds, for every column c, the two elements (2p, c) and (2p + 1, c) side by side:
//   b_vnni[p * ldb + 2 * c + e] = B[2p + e][c],   ldb >= 2 * cols (bf16 elements per pair row).
// A is plain row-major bf16, C row-major fp32. The functions are compiled with function-level target
// attributes (the build's -march may be any x86-64 level): call them only after bf16_gemm_path() chose them.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cpu/cpu_features.h"

#if defined(SEQKERN_BF16_UNITS)
#include <immintrin.h>
#define SEQKERN_BF16_X86 1
#endif

namespace seqkern::cpu::bf16 {

using bf16_t = c10::BFloat16;

/// Which unit multiplies bf16 tiles.
enum class Path { kFp32, kAvx512Bf16, kAmx };

/// The best path this CPU offers, or the one SEQKERN_BF16_GEMM asks for ("amx", "avx512bf16", "fp32"; read
/// at every call so that tests can force each path in one process), capped at what the CPU can run (asking for
/// AMX on Zen 4 gives AVX512-BF16; on a CPU with neither, fp32).
inline Path gemm_path() {
  // Both bf16 paths round P with AVX512-BF16 (every AMX CPU has it too).
  const Path best = !has_avx512bf16() ? Path::kFp32 : has_amx_bf16() ? Path::kAmx : Path::kAvx512Bf16;
  const char* env = std::getenv("SEQKERN_BF16_GEMM");
  if (env == nullptr || *env == '\0') return best;
  const std::string want(env);
  const Path asked = want == "amx" ? Path::kAmx : want == "avx512bf16" ? Path::kAvx512Bf16 : Path::kFp32;
  return static_cast<int>(asked) < static_cast<int>(best) ? asked : best;
}

/// n rounded up to a multiple of m.
constexpr int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

/// Depth granule of both kernels: an AMX A tile row is 32 bf16 (64 bytes). Callers zero-pad depth to it.
constexpr int64_t kDepthGranule = 32;
/// Row granule of the AMX kernel (16 rows per tile): callers give row counts padded to it, the pad rows of A
/// finite (they produce pad rows of C that nobody reads).
constexpr int64_t kRowGranule = 16;
/// Column granule of both kernels (16 fp32 lanes / AMX tile columns).
constexpr int64_t kColGranule = 16;

#if SEQKERN_BF16_X86
#define SEQKERN_TARGET_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define SEQKERN_TARGET_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

// ------------------------------------------------------------------------------------------------
// AVX512-BF16.
// ------------------------------------------------------------------------------------------------
/// C[0:MR, 0:16 NV) = A[0:MR, 0:2 pairs) @ B (+ C when kAccumulate). MR x NV accumulators in zmm
/// registers (6 x 4 = 24 of 32); per pair row, B's NV vectors are loaded once and each row's pair of A is
/// broadcast once (32 bits) and meets every column in one VDPBF16PS.
template <int MR, int NV, bool kAccumulate>
SEQKERN_TARGET_BF16 inline void dp_kernel(const bf16_t* a, int64_t lda, const bf16_t* b, int64_t ldb, int64_t pairs,
                                          float* c, int64_t ldc) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512i w[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) w[v] = _mm512_loadu_si512(b + p * ldb + v * 32);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      int32_t pair;
      std::memcpy(&pair, a + m * lda + 2 * p, sizeof(pair));
      const __m512i a_mp = _mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], (__m512bh)a_mp, (__m512bh)w[v]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* dst = c + m * ldc + v * 16;
      _mm512_storeu_ps(dst, kAccumulate ? _mm512_add_ps(acc[m][v], _mm512_loadu_ps(dst)) : acc[m][v]);
    }
}

template <int NV, bool kAccumulate>
SEQKERN_TARGET_BF16 inline void dp_kernel_rows(int rows, const bf16_t* a, int64_t lda, const bf16_t* b, int64_t ldb,
                                               int64_t pairs, float* c, int64_t ldc) {
  switch (rows) {
    case 1: return dp_kernel<1, NV, kAccumulate>(a, lda, b, ldb, pairs, c, ldc);
    case 2: return dp_kernel<2, NV, kAccumulate>(a, lda, b, ldb, pairs, c, ldc);
    case 3: return dp_kernel<3, NV, kAccumulate>(a, lda, b, ldb, pairs, c, ldc);
    case 4: return dp_kernel<4, NV, kAccumulate>(a, lda, b, ldb, pairs, c, ldc);
    case 5: return dp_kernel<5, NV, kAccumulate>(a, lda, b, ldb, pairs, c, ldc);
    default: return dp_kernel<6, NV, kAccumulate>(a, lda, b, ldb, pairs, c, ldc);
  }
}

template <bool kAccumulate>
SEQKERN_TARGET_BF16 void gemm_avx512bf16_impl(int64_t rows, int64_t cols, int64_t depth, const bf16_t* a, int64_t lda,
                                              const bf16_t* b, int64_t ldb, float* c, int64_t ldc) {
  constexpr int kMaxRows = 6;
  const int64_t pairs = depth / 2;
  for (int64_t col = 0; col < cols; col += 64) {
    const int vectors = static_cast<int>(std::min<int64_t>(4, (cols - col) / 16));
    const bf16_t* b_col = b + 2 * col;
    // Balanced row blocks of at most 6 (as attention.h's tile_gemm_columns).
    const int64_t blocks = (rows + kMaxRows - 1) / kMaxRows;
    int64_t row = 0;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int block_rows = static_cast<int>((rows - row + (blocks - blk) - 1) / (blocks - blk));
      const bf16_t* a_blk = a + row * lda;
      float* c_blk = c + row * ldc + col;
      switch (vectors) {
        case 1: dp_kernel_rows<1, kAccumulate>(block_rows, a_blk, lda, b_col, ldb, pairs, c_blk, ldc); break;
        case 2: dp_kernel_rows<2, kAccumulate>(block_rows, a_blk, lda, b_col, ldb, pairs, c_blk, ldc); break;
        case 3: dp_kernel_rows<3, kAccumulate>(block_rows, a_blk, lda, b_col, ldb, pairs, c_blk, ldc); break;
        default: dp_kernel_rows<4, kAccumulate>(block_rows, a_blk, lda, b_col, ldb, pairs, c_blk, ldc); break;
      }
      row += block_rows;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// AMX.
// ------------------------------------------------------------------------------------------------
/// Every tile 16 rows x 64 bytes: tmm0-3 the 2 x 2 fp32 output block, tmm4-5 two A row blocks (16 x 32 bf16),
/// tmm6-7 two B column blocks (16 pair rows x 16 columns x 2).
struct alignas(64) AmxConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

/// 16-row by 16/32-column blocks of C = A @ B (+ C): the loads of an A tile and a B tile each feed two
/// TDPBF16PS (2 x 2 blocking), so the tile loads are half the work of 1 x 1 blocking.
SEQKERN_TARGET_AMX inline void amx_configure() {
  static const AmxConfig config;
  _tile_loadconfig(&config);
}
SEQKERN_TARGET_AMX inline void amx_release() { _tile_release(); }

/// Needs the configuration of amx_configure() loaded (TileScope).
template <bool kAccumulate>
SEQKERN_TARGET_AMX void gemm_amx_impl(int64_t rows, int64_t cols, int64_t depth, const bf16_t* a, int64_t lda,
                                      const bf16_t* b, int64_t ldb, float* c, int64_t ldc) {
  const int64_t sa = lda * 2, sb = ldb * 2, sc = ldc * 4;  // strides in bytes
  for (int64_t m = 0; m < rows; m += 32) {
    const bool two_m = m + 16 < rows;
    for (int64_t n = 0; n < cols; n += 32) {
      const bool two_n = n + 16 < cols;
      float* c00 = c + m * ldc + n;
      float* c10 = c00 + 16 * ldc;
      if (kAccumulate) {
        _tile_loadd(0, c00, sc);
        if (two_n) _tile_loadd(1, c00 + 16, sc);
        if (two_m) _tile_loadd(2, c10, sc);
        if (two_m && two_n) _tile_loadd(3, c10 + 16, sc);
      } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      }
      for (int64_t k = 0; k < depth; k += 32) {
        const bf16_t* b_k = b + (k / 2) * ldb + 2 * n;
        _tile_loadd(4, a + m * lda + k, sa);
        _tile_loadd(6, b_k, sb);
        _tile_dpbf16ps(0, 4, 6);
        if (two_n) {
          _tile_loadd(7, b_k + 32, sb);
          _tile_dpbf16ps(1, 4, 7);
        }
        if (two_m) {
          _tile_loadd(5, a + (m + 16) * lda + k, sa);
          _tile_dpbf16ps(2, 5, 6);
          if (two_n) _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, c00, sc);
      if (two_n) _tile_stored(1, c00 + 16, sc);
      if (two_m) _tile_stored(2, c10, sc);
      if (two_m && two_n) _tile_stored(3, c10 + 16, sc);
    }
  }
}
#endif  // SEQKERN_BF16_X86

/// The AMX tile configuration, loaded for the lifetime of the scope when `path` is kAmx (nothing otherwise):
/// gemm() on Path::kAmx runs only inside one. Loaded once per work item, not per product: a 32-row product of
/// attention is ~16 TDPBF16PS, and LDTILECFG + TILERELEASE around each cost ~ as much as the product.
/// Released at the end, so the tile state is this scope's alone (oneDNN, or another kernel on this thread,
/// configures tiles its own way), and a thread that holds no tile state does not make the kernel save 8 KB
/// of tiles at every context switch. No other AMX code may run on the thread inside the scope.
class TileScope {
 public:
  explicit TileScope(Path path) : amx_(path == Path::kAmx) {
#if SEQKERN_BF16_X86
    if (amx_) amx_configure();
#endif
  }
  ~TileScope() {
#if SEQKERN_BF16_X86
    if (amx_) amx_release();
#endif
  }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;

 private:
  bool amx_;
};

/// C (rows x cols, fp32, row-major, ldc) = A @ B, or C += A @ B when accumulate.
/// A (rows x depth) bf16 row-major (lda), B (depth x cols) in the VNNI layout (ldb bf16 per pair row).
/// cols a multiple of kColGranule, depth of kDepthGranule (zero-padded by the caller); with Path::kAmx, rows
/// a multiple of kRowGranule and a TileScope alive. `path` is kAmx or kAvx512Bf16 (gemm_path()).
inline void gemm(Path path, int64_t rows, int64_t cols, int64_t depth, const bf16_t* a, int64_t lda, const bf16_t* b,
                 int64_t ldb, float* c, int64_t ldc, bool accumulate) {
#if SEQKERN_BF16_X86
  if (path == Path::kAmx) {
    accumulate ? gemm_amx_impl<true>(rows, cols, depth, a, lda, b, ldb, c, ldc)
               : gemm_amx_impl<false>(rows, cols, depth, a, lda, b, ldb, c, ldc);
  } else {
    accumulate ? gemm_avx512bf16_impl<true>(rows, cols, depth, a, lda, b, ldb, c, ldc)
               : gemm_avx512bf16_impl<false>(rows, cols, depth, a, lda, b, ldb, c, ldc);
  }
#else
  (void)path, (void)rows, (void)cols, (void)depth, (void)a, (void)lda, (void)b, (void)ldb, (void)c, (void)ldc,
      (void)accumulate;
#endif
}

#if SEQKERN_BF16_X86
/// dst[0:padded) = src[0:n) rounded to bf16 (nearest even; NaN stays NaN), then zeros; n and padded multiples
/// of 16. One VCVTNEPS2BF16 per 16 values: converting P lane by lane cost more than the AMX products.
SEQKERN_TARGET_BF16 inline void round_to_bf16(const float* src, int64_t n, bf16_t* dst, int64_t padded) {
  for (int64_t i = 0; i < n; i += 16) {
    const __m256bh x = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i));
    std::memcpy(dst + i, &x, sizeof(x));
  }
  std::memset(dst + n, 0, (padded - n) * sizeof(bf16_t));
}
#endif

}  // namespace seqkern::cpu::bf16
