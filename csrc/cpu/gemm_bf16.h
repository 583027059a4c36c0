// bfloat16 GEMMs of the recurrent loops on the CPU's bf16 units, fp32 accumulation:
//   * Bf16Kernel / bf16_kernel(): which path serves bfloat16 layers, chosen at run time from the CPU's
//     features (cpu_features.h) and forcible with SEQKERN_BF16_KERNEL (tests cover each path on one machine):
//       fallback    everything upcast to fp32 (the fp32 kernels; a CPU without AVX512-BF16 gets this);
//       gradients   the big GEMMs of the backward (weight gradients, grad_input) as one bf16 at::mm each
//                   (oneDNN), the per-step GEMM and the input projection on the fp32 micro-kernel;
//       avx512bf16  as gradients, plus the per-step GEMM and the input projection on vdpbf16ps (the default
//                   with AVX512-BF16 and no AMX: AMD Zen 4);
//       amx         as avx512bf16, but products of 2 rows or more on AMX tiles (gemm_amx.h; the default
//                   where the CPU has AMX-BF16: Intel Sapphire/Emerald Rapids).
//     The layer reads h_{t-1} and d_gates rounded to bf16 on the last two, as torch's bf16 layers do.
//   * PackedPairs + gemm_bf16: the bf16 twin of gemm_packed.h's PackedPanels + gemm_packed, C (fp32) =
//     A @ W with W packed as k-pairs, the layout of both vdpbf16ps (32 bf16 multiply-adds into 16 fp32 lanes)
//     and AMX's B tiles. Compiled with function-level target attributes, so the file still builds for
//     x86-64-v4 / v3 / baseline and the code runs only after has_avx512bf16() (has_amx_bf16()) said yes.
//
// Measured (Intel Xeon, Sapphire Rapids, one thread, best of 2000, machine shared; tmp microbenchmark of the
// three kernels on the same packed weights, A fp32 converted inside), depth 256, width 384 (a GRU h256 slice
// of one of 2 threads) in us:
//   rows        1     2     3     4     8    16    32    3200
//   fp32     5.86  8.67  10.9  7.07  13.6  26.9  53.8   6941
//   vdpbf16  2.98  4.65  6.72  8.92  18.5  35.6  71.3  18448
//   amx      4.43  4.41  4.53  4.69  5.17  6.79  10.2   1340
// Other widths (256 .. 1024) rank the same: AMX from 2 rows (a tie at 2, a win from 3), vdpbf16ps at 1 row,
// where a GEMV is bound by reading W and bf16 halves the bytes (AMX's 16-row tile runs 1 useful row).
// Loading the tile configuration costs ~230 ns (LDTILECFG), reading it back ~7 ns: see gemm_amx.h.
#pragma once

#include <c10/util/BFloat16.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/aligned_vector.h"
#include "cpu/cpu_features.h"
#include "cpu/gemm_amx.h"
#include "cpu/simd.h"

namespace seqkern::cpu {

enum class Bf16Kernel { kFallback, kBf16Gradients, kAvx512Bf16, kAmx };

/// The path for bfloat16 layers (see the top of this file): the best this CPU has (kAmx with AMX-BF16,
/// kAvx512Bf16 with only AVX512-BF16, kFallback with neither), or SEQKERN_BF16_KERNEL=fallback|gradients|
/// avx512bf16|amx capped at what the CPU can run (amx on Zen 4 gives avx512bf16). Read at every call (a
/// getenv, ~100 ns against a layer's milliseconds) so a test can switch.
inline Bf16Kernel bf16_kernel() {
  if (!has_avx512bf16()) return Bf16Kernel::kFallback;
  const Bf16Kernel best = has_amx_bf16() ? Bf16Kernel::kAmx : Bf16Kernel::kAvx512Bf16;
  const char* forced = std::getenv("SEQKERN_BF16_KERNEL");
  if (forced == nullptr || *forced == '\0') return best;
  if (std::strcmp(forced, "fallback") == 0) return Bf16Kernel::kFallback;
  if (std::strcmp(forced, "gradients") == 0) return Bf16Kernel::kBf16Gradients;
  if (std::strcmp(forced, "avx512bf16") == 0) return Bf16Kernel::kAvx512Bf16;
  return best;
}

/// W (depth x width) for vdpbf16ps and AMX: panels of kPanelWidth columns; within a panel, k-pair q holds
/// (W[2q][j], W[2q+1][j]) for each column j in turn, so one 64-byte load gives 16 columns' pairs, and 16
/// pair rows x 16 columns are one AMX B tile (gemm_amx.h). depth is rounded up to whole B tiles (32 k: zero
/// rows), width to whole vectors (zero columns), as PackedPanels.
struct PackedPairs {
  static constexpr int kLanes = 16;  // fp32 accumulators per vector
  static constexpr int kPanelVectors = 4;
  static constexpr int64_t kPanelWidth = kPanelVectors * kLanes;
  static constexpr int64_t kPairRowGranule = kAmxPairRows;
  int64_t depth = 0;  // the true depth (A's columns)
  int64_t width = 0;
  uint16_t* data = nullptr;  // pair_rows() * 2 * width bf16 bit patterns
  /// The kernel chosen when the weights were set up: kAmx runs gemm_bf16 on AMX tiles (rows permitting),
  /// anything else on vdpbf16ps.
  Bf16Kernel kernel = bf16_kernel();

  int64_t pairs() const { return (depth + 1) / 2; }
  int64_t pair_rows() const { return padded_pairs(depth); }
  static int64_t padded_pairs(int64_t depth) {
    return ((depth + 1) / 2 + kPairRowGranule - 1) / kPairRowGranule * kPairRowGranule;
  }
  static int64_t elements(int64_t depth, int64_t width) { return padded_pairs(depth) * 2 * width; }
  int64_t panel_count() const { return (width + kPanelWidth - 1) / kPanelWidth; }
  int panel_vectors(int64_t p) const {
    return static_cast<int>(std::min<int64_t>(kPanelWidth, width - p * kPanelWidth) / kLanes);
  }
  const uint16_t* panel(int64_t p) const { return data + p * pair_rows() * 2 * kPanelWidth; }

  /// Fills data from column(j) -> {pointer to W(0, j), stride between consecutive k} (null: padding
  /// column), as PackedPanels::pack; values are rounded to bf16 (exact for weights that were bf16).
  /// A pair is one 32-bit word: pair q of column j at word q * columns + j of the panel. Columns that run
  /// along k (W's rows: the forward) go 16 k at a time through one vector conversion: value by value, W_ih and
  /// W_hh of a b32 h256 GRU took ~0.4 ms each per call (~8% of the layer).
  template <typename ColumnSource>
  void pack(const ColumnSource& column) {
    for (int64_t p = 0; p < panel_count(); ++p) {
      const int64_t columns = panel_vectors(p) * kLanes;
      uint32_t* dst = reinterpret_cast<uint32_t*>(data + p * pair_rows() * 2 * kPanelWidth);
      for (int64_t j = 0; j < columns; ++j) {
        const auto [src, stride] = column(p * kPanelWidth + j);
        int64_t q = 0;
        if (src && stride == 1) {
          for (; 2 * q + 16 <= depth; q += 8) {
            uint32_t pairs[8];
            narrow_to_bf16(reinterpret_cast<c10::BFloat16*>(pairs), load<float>(src + 2 * q));
            for (int i = 0; i < 8; ++i) dst[(q + i) * columns + j] = pairs[i];
          }
        }
        const auto bits = [&](int64_t k) {
          return static_cast<uint32_t>(c10::BFloat16(src && k < depth ? static_cast<float>(src[k * stride]) : 0.0f).x);
        };
        for (int64_t k = 2 * q; k < 2 * pair_rows(); k += 2) dst[k / 2 * columns + j] = bits(k) | bits(k + 1) << 16;
      }
    }
  }
};

#if defined(SEQKERN_BF16_UNITS)
#define SEQKERN_TARGET_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

/// C[0:MR, 0:NV*16) = A[0:MR, 0:2*pairs) @ panel with MR x NV fp32 accumulators in registers (MR=6,
/// NV=4: 24 of 32 zmm, as gemm_packed.h's micro_kernel); a holds bf16 bit patterns, rows lda apart.
template <int MR, int NV>
SEQKERN_TARGET_BF16 inline void micro_kernel_bf16(const uint16_t* a, int64_t lda, const uint16_t* panel,
                                                  int64_t pairs, float* c, int64_t ldc) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_ps();
  for (int64_t q = 0; q < pairs; ++q) {
    __m512bh w[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) w[v] = (__m512bh)_mm512_loadu_si512(panel + (q * NV + v) * 32);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      int32_t pair;
      std::memcpy(&pair, a + m * lda + 2 * q, sizeof(pair));
      const __m512bh a_mq = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], a_mq, w[v]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + m * ldc + v * 16, acc[m][v]);
}

template <int NV>
SEQKERN_TARGET_BF16 inline void micro_kernel_bf16_rows(int rows, const uint16_t* a, int64_t lda,
                                                       const uint16_t* panel, int64_t pairs, float* c, int64_t ldc) {
  switch (rows) {
    case 1: return micro_kernel_bf16<1, NV>(a, lda, panel, pairs, c, ldc);
    case 2: return micro_kernel_bf16<2, NV>(a, lda, panel, pairs, c, ldc);
    case 3: return micro_kernel_bf16<3, NV>(a, lda, panel, pairs, c, ldc);
    case 4: return micro_kernel_bf16<4, NV>(a, lda, panel, pairs, c, ldc);
    case 5: return micro_kernel_bf16<5, NV>(a, lda, panel, pairs, c, ldc);
    default: return micro_kernel_bf16<6, NV>(a, lda, panel, pairs, c, ldc);
  }
}

/// dst[r, 0:2*pairs) = bf16(src[r, 0:depth)) for `rows` rows (zero in the padding column of an odd
/// depth), round to nearest even (vcvtneps2bf16; a NaN stays NaN).
template <typename In>
SEQKERN_TARGET_BF16 inline void to_bf16_rows(const In* src, int64_t lds, int64_t rows, int64_t depth, uint16_t* dst,
                                             int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r) {
    const In* s = src + r * lds;
    uint16_t* d = dst + r * ldd;
    int64_t k = 0;
    if constexpr (std::is_same_v<In, c10::BFloat16>) {
      std::memcpy(d, s, depth * sizeof(uint16_t));  // already bf16: the bit patterns as they are
      k = depth;
    } else if constexpr (std::is_same_v<In, float>) {
      for (; k + 16 <= depth; k += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + k), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(s + k)));
    }
    for (; k < depth; ++k) d[k] = c10::BFloat16(static_cast<float>(s[k])).x;
    for (; k < ldd; ++k) d[k] = 0;
  }
}

/// C (rows x w.width fp32, ldc) = A16 (rows x 2 w.pairs() bf16 bits, ld16) @ W on vdpbf16ps.
SEQKERN_TARGET_BF16 inline void gemm_avx512bf16(const uint16_t* a16, int64_t ld16, int64_t rows, const PackedPairs& w,
                                                float* c, int64_t ldc) {
  constexpr int kMaxMicroRows = 6;
  // Balanced micro-blocks of at most 6 rows (32 rows -> 6,6,5,5,5,5), as gemm_packed_row_block.
  const int64_t blocks = (rows + kMaxMicroRows - 1) / kMaxMicroRows;
  for (int64_t p = 0; p < w.panel_count(); ++p) {
    const uint16_t* panel = w.panel(p);
    float* c_panel = c + p * PackedPairs::kPanelWidth;
    int64_t row = 0;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int n = static_cast<int>((rows - row) / (blocks - blk) + ((rows - row) % (blocks - blk) != 0));
      const uint16_t* a_blk = a16 + row * ld16;
      float* c_blk = c_panel + row * ldc;
      switch (w.panel_vectors(p)) {
        case 1: micro_kernel_bf16_rows<1>(n, a_blk, ld16, panel, w.pairs(), c_blk, ldc); break;
        case 2: micro_kernel_bf16_rows<2>(n, a_blk, ld16, panel, w.pairs(), c_blk, ldc); break;
        case 3: micro_kernel_bf16_rows<3>(n, a_blk, ld16, panel, w.pairs(), c_blk, ldc); break;
        default: micro_kernel_bf16_rows<4>(n, a_blk, ld16, panel, w.pairs(), c_blk, ldc); break;
      }
      row += n;
    }
  }
}

/// Fewest rows for which AMX beats vdpbf16ps (measured below).
constexpr int64_t kAmxMinRows = 2;

/// Whether a product of `rows` rows runs on AMX tiles rather than vdpbf16ps when w.kernel is kAmx.
inline bool amx_pays_off(int64_t rows) { return rows >= kAmxMinRows; }

/// C (rows x w.width fp32, leading dim ldc) = A (rows x w.depth, fp32 or bf16, leading dim lda) @ W
/// on AMX tiles (w.kernel == kAmx and amx_pays_off(rows)) or vdpbf16ps. A is
/// rounded to bf16 in blocks of 96
/// rows (3 AMX row groups) into a per-thread buffer kept across calls (B x depth conversions per step
/// against B x depth x width multiply-adds: ~1/width of the work), zero-padded to whole B tiles in k.
/// Call only when has_avx512bf16() (and, for kAmx, has_amx_bf16(): bf16_kernel() checked both).
template <typename In>
SEQKERN_TARGET_BF16 void gemm_bf16(const In* a, int64_t lda, int64_t rows, const PackedPairs& w, float* c,
                                   int64_t ldc) {
  constexpr int64_t kRowBlock = 96;
  thread_local AlignedVector<uint16_t> a16;
  const int64_t ld16 = 2 * w.pair_rows();
  const bool amx = w.kernel == Bf16Kernel::kAmx && amx_pays_off(rows);
  a16.resize(std::max<size_t>(a16.size(), static_cast<size_t>(std::min(kRowBlock, rows) * ld16)));
  for (int64_t row0 = 0; row0 < rows; row0 += kRowBlock) {
    const int64_t block = std::min(kRowBlock, rows - row0);
    to_bf16_rows(a + row0 * lda, lda, block, w.depth, a16.data(), ld16);
    if (amx) {
      gemm_amx_panels(a16.data(), ld16, block, w.data, w.width, PackedPairs::kPanelWidth,
                      w.pair_rows() / kAmxPairRows, c + row0 * ldc, ldc);
    } else {
      gemm_avx512bf16(a16.data(), ld16, block, w, c + row0 * ldc, ldc);
    }
  }
}
#undef SEQKERN_TARGET_BF16
#else
template <typename In>
void gemm_bf16(const In*, int64_t, int64_t, const PackedPairs&, float*, int64_t) {}  // never called: no AVX512-BF16
#endif

}  // namespace seqkern::cpu
