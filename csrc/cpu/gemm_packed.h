// The packed GEMM micro-kernel of the recurrent loops: W packed once into panels that a thread keeps hot
// in its own L2 across all time steps, and a register-blocked C(M x N) = A(M x K) @ W(K x N).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include <c10/util/Exception.h>

#include "cpu/simd.h"  // also <immintrin.h> on x86

namespace seqkern::cpu {

// ------------------------------------------------------------------------------------------------
// Packed GEMM micro-kernel.
// ------------------------------------------------------------------------------------------------
// Register blocks of the micro-kernel: MR rows x NV vectors of accumulators, NV the panel width.
#if defined(__AVX512F__)
// 8 x 3 (24 of 32 zmm registers): a 3-vector fp32 panel at depth 256 is 48 KB, about L1, so the row blocks after
// the first read it from L1 where 6 x 4 (64 KB panels) streamed it from L2 for every 6 rows. Microbenchmark, one
// thread, C = A (M x 256) @ W (256 x 768), flop per TSC cycle: M = 32 78-82 vs 67-72 (6 x 4), M = 8 76-81 vs 55-57,
// M = 1 and 4 equal within noise (NOTES.md "Round 6").
template <typename T>
constexpr int kMicroVectorsOf = 3;
constexpr int kMaxMicroRows = 8;
#elif defined(SEQKERN_SIMD_YMM)
// float: panels of 8 ymm vectors (64 floats), which micro_kernel_ymm re-blocks into its own register blocks (1 x 8
// at batch 1); double: the generic micro_kernel's 6 x 4 (an 8-vector block would be 48 accumulators).
template <typename T>
constexpr int kMicroVectorsOf = std::is_same_v<T, float> ? 8 : 4;
constexpr int kMaxMicroRows = 6;
#else
// The default level's vectors are emulated 64-byte ones.
template <typename T>
constexpr int kMicroVectorsOf = 4;
constexpr int kMaxMicroRows = 6;
#endif

/// W (depth x width) re-laid as panels of up to kPanelVectors SIMD vectors of columns; panel p holds
/// W[0:depth, p*panel_width : p*panel_width + its width] row after row, so the micro-kernel reads one
/// contiguous stream. width is a multiple of the lane count (padding columns are zero).
template <typename T>
struct PackedPanels {
  static constexpr int kPanelVectors = kMicroVectorsOf<T>;
  static constexpr int64_t kPanelWidth = kPanelVectors * kLanes<T>;
  int64_t depth = 0;
  int64_t width = 0;
  T* data = nullptr;  // depth * width elements, 64-byte aligned

  static int64_t padded_width(int64_t columns) {
    return (columns + kLanes<T> - 1) / kLanes<T> * kLanes<T>;
  }
  int64_t panel_count() const { return (width + kPanelWidth - 1) / kPanelWidth; }
  int panel_vectors(int64_t panel) const {
    return static_cast<int>(std::min<int64_t>(kPanelWidth, width - panel * kPanelWidth) / kLanes<T>);
  }
  const T* panel(int64_t p) const { return data + p * depth * kPanelWidth; }

  /// Fills data from column(j) -> {pointer to element (0, j), stride between consecutive k}, pointer null
  /// for a padding column. Per panel the 64-ish column sources are looked up once. A panel's real columns are
  /// either rows of W (stride 1: the forward's W_hh / W_ih / W_hr rows), transposed 16 x 16 in registers in
  /// blocks of 64 k that keep the lines read and written in L1 (26 us per 512 KB slice of W_hh), or consecutive
  /// elements of W's rows (the backward's W_hh / W_ih / W_hr columns, grad_input's W_ih), copied row by row;
  /// padding columns follow the real ones. Any other layout is refused.
  template <typename ColumnSource>
  void pack(const ColumnSource& column) {
    for (int64_t p = 0; p < panel_count(); ++p) pack_panel(p, column);
  }

  /// pack()'s work on panel p alone (the panels are independent: a caller may pack them in parallel).
  template <typename ColumnSource>
  void pack_panel(int64_t p, const ColumnSource& column) {
    constexpr int64_t kDepthBlock = 64;
    std::pair<const T*, int64_t> sources[kPanelWidth];
    const int64_t columns = panel_vectors(p) * kLanes<T>;
    T* dst = data + p * depth * kPanelWidth;
    bool contiguous_along_k = true;
    for (int64_t j = 0; j < columns; ++j) {
      const auto [src, stride] = column(p * kPanelWidth + j);
      sources[j] = {src, stride};
      contiguous_along_k &= src == nullptr || stride == 1;
    }
    const int64_t run = leading_run(sources, columns);
    if (run > 0) return copy_rows(sources[0].first, sources[0].second, run, columns, dst);
    TORCH_INTERNAL_ASSERT(contiguous_along_k, "PackedPanels: a panel's columns must be rows of W or consecutive "
                                              "elements of W's rows");
    for (int64_t k0 = 0; k0 < depth; k0 += kDepthBlock) {
      const int64_t k1 = std::min(depth, k0 + kDepthBlock);
      for (int64_t j = 0; j < columns; j += kLanes<T>) transpose_rows(sources + j, k0, k1, dst + j, columns);
    }
  }

 private:
  /// How many leading columns are consecutive elements of one row of the source (column j at column 0's pointer
  /// + j, the same stride, not 1), the others all padding; 0 if the panel is not laid out so. Such a panel (the
  /// backward's W_hh columns) is a copy of `run` elements per k: packed element by element, as it was, the
  /// one-step backward op of a GRU(128, 128) took 81 us instead of 66.
  static int64_t leading_run(const std::pair<const T*, int64_t>* sources, int64_t columns) {
    if (sources[0].first == nullptr || sources[0].second == 1) return 0;
    int64_t run = 0;
    while (run < columns && sources[run].first == sources[0].first + run && sources[run].second == sources[0].second)
      ++run;
    for (int64_t j = run; j < columns; ++j)
      if (sources[j].first != nullptr) return 0;
    return run;
  }

  /// dst[k * columns + j] = first[k * stride + j] for j < run, 0 for the padding columns after it.
  void copy_rows(const T* first, int64_t stride, int64_t run, int64_t columns, T* dst) const {
    for (int64_t k = 0; k < depth; ++k) {
      std::memcpy(dst + k * columns, first + k * stride, run * sizeof(T));
      std::fill(dst + k * columns + run, dst + (k + 1) * columns, T(0));
    }
  }

  /// dst[k * ld + j] = rows[j][k] (0 for a null row) for the kLanes<T> rows j and k in [k0, k1): one vector
  /// of a panel's columns, from rows of W.
  static void transpose_rows(const std::pair<const T*, int64_t>* rows, int64_t k0, int64_t k1, T* dst, int64_t ld) {
    int64_t k = k0;
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float>) {
      bool whole = true;
      for (int j = 0; j < 16; ++j) whole &= rows[j].first != nullptr;
      if (whole) {
        const float* starts[16];
        for (int j = 0; j < 16; ++j) starts[j] = rows[j].first;
        for (; k + 16 <= k1; k += 16) transpose_block(starts, k, dst + k * ld, ld);
      }
    }
#endif
    for (int64_t j = 0; j < kLanes<T>; ++j)
      for (int64_t kk = k; kk < k1; ++kk) dst[kk * ld + j] = rows[j].first ? rows[j].first[kk] : T(0);
  }

#if defined(__AVX512F__)
  /// dst[i * ld + j] = rows[j][k + i] for i, j < 16 (simd.h's transpose_16x16). The scalar loop wrote one float
  /// per store with a 192-byte stride: 57 us per 512 KB slice of W_hh, 5% of the LSTM's batch-1 inference samples
  /// with W_ih's packing.
  static void transpose_block(const float* const* rows, int64_t k, float* dst, int64_t ld) {
    __m512 r[16];
    for (int j = 0; j < 16; ++j) r[j] = _mm512_loadu_ps(rows[j] + k);
    cpu::transpose_16x16(r);
    for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ld, r[i]);
  }
#endif
};

/// C[0:MR, 0:NV*lanes) = A[0:MR, 0:depth) @ panel (+= with accumulate), depth >= 1 (gemm_packed returns before an
/// empty depth range); MR x NV accumulators stay in registers (MR=8, NV=3 at avx512: 24 of the 32 zmm registers). Figures below are from its 6 x 4 days. One thread, best
/// of runs, against at::mm (MKL) on the same product: 32 x 256 x 512 (a batch-32 step) 72.7 vs 95.7 us; 64 x 512 x 1024 577 vs 728 us;
/// 1 x 256 x 512 (batch 1: bound by L2 bandwidth, ~110 GB/s) 4.9 vs 11.1 us. So the persistent loop
/// uses it at every batch size rather than calling at::mm per step.
template <typename T, int MR, int NV>
void micro_kernel(const T* a, int64_t lda, const T* panel, int64_t depth, T* c, int64_t ldc, bool accumulate) {
  using V = Simd<T>;
  constexpr int L = kLanes<T>;
  TORCH_INTERNAL_ASSERT(depth > 0, "micro_kernel: an empty depth range");
  V acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = V{};
  // A loop that runs at least once: for a loop with a zero-trip path GCC kept acc in memory, zeroing 24 vectors on
  // the stack and storing and reloading them around the loop on every call (attention.h's tile_kernel, the same
  // register block on unpacked operands, avoids it with unroll pragmas). In registers, gemm_packed at 32 x 256 x 528
  // runs 115 GFLOP/s a core (the FMA units' peak) rather than 109, and the recurrent layers 1.5-5.5% faster
  // (NOTES.md "Round 24").
  int64_t k = 0;
  do {
    V w[NV];
    for (int v = 0; v < NV; ++v) std::memcpy(&w[v], panel + (k * NV + v) * L, sizeof(V));
    for (int m = 0; m < MR; ++m) {
      const V a_mk = broadcast(a[m * lda + k]);
      for (int v = 0; v < NV; ++v) acc[m][v] = fmadd(a_mk, w[v], acc[m][v]);
    }
  } while (++k < depth);
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) {
      if (accumulate) {
        V sum;
        std::memcpy(&sum, c + m * ldc + v * L, sizeof(V));
        acc[m][v] += sum;
      }
      std::memcpy(c + m * ldc + v * L, &acc[m][v], sizeof(V));
    }
}

template <typename T, int NV>
void micro_kernel_rows(int rows, const T* a, int64_t lda, const T* panel, int64_t depth, T* c, int64_t ldc,
                       bool accumulate) {
  switch (rows) {
    case 1: return micro_kernel<T, 1, NV>(a, lda, panel, depth, c, ldc, accumulate);
    case 2: return micro_kernel<T, 2, NV>(a, lda, panel, depth, c, ldc, accumulate);
    case 3: return micro_kernel<T, 3, NV>(a, lda, panel, depth, c, ldc, accumulate);
    case 4: return micro_kernel<T, 4, NV>(a, lda, panel, depth, c, ldc, accumulate);
    case 5: return micro_kernel<T, 5, NV>(a, lda, panel, depth, c, ldc, accumulate);
    case 6: return micro_kernel<T, 6, NV>(a, lda, panel, depth, c, ldc, accumulate);
  }
  if constexpr (kMaxMicroRows == 8) {
    if (rows == 7) return micro_kernel<T, 7, NV>(a, lda, panel, depth, c, ldc, accumulate);
    return micro_kernel<T, 8, NV>(a, lda, panel, depth, c, ldc, accumulate);
  }
}

#if defined(SEQKERN_SIMD_YMM)
// ------------------------------------------------------------------------------------------------
// The avx2 level's fp32 micro-kernel on ymm vectors. The generic micro_kernel's 6 x 4 block of 64-byte vectors was
// 48 ymm accumulators for 16 registers, and it spilled (GRU b1 at 0.8x torch.nn.GRU), when a Simd was 64 bytes at
// this level. Same panels, same interface; the blocks are sized
// for 16 ymm registers: MR rows x NY ymm columns of accumulators, MR * NY <= 12 and at least 8 of them where
// the rows allow (an FMA's latency is 4-5 cycles on two ports: fewer independent sums leave the ports idle,
// which is what a GEMV at batch 1 otherwise hits).
// ------------------------------------------------------------------------------------------------
/// ymm columns of accumulators per row block of MR rows: 1 x 8, 2 x 6, 3 x 4, 4 x 3, 5-6 x 2 (8-12
/// accumulators; measured at 256 x 768, one thread: 2 x 4 and 4 x 2, 8 accumulators, ran ~30 and ~45
/// GFLOP/s where 12 accumulators run 55-70).
constexpr int ymm_block_columns(int rows) { return rows == 1 ? 8 : rows == 2 ? 6 : rows == 3 ? 4 : rows == 4 ? 3 : 2; }

/// C[0:MR, 0:8 NY) = A[0:MR, 0:depth) @ panel[:, 0:8 NY), panel rows `panel_width` floats apart. W's vectors
/// are loaded once per k into registers when MR * NY + NY + 1 fit in 16 (6 x 2, 1 x 8, 4 x 3), else read by
/// each FMA from L1 as a memory operand (3 x 4, 2 x 6: 12 accumulators + the broadcasts).
template <int MR, int NY>
inline void micro_kernel_ymm(const float* a, int64_t lda, const float* panel, int64_t panel_width, int64_t depth,
                             float* c, int64_t ldc, bool accumulate) {
  constexpr bool kWInRegisters = MR * NY + NY + 1 <= 16;
  __m256 acc[MR][NY];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < NY; ++v) acc[m][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < depth; ++k) {
    const float* w_k = panel + k * panel_width;
    if constexpr (kWInRegisters) {
      __m256 w[NY];
#pragma GCC unroll 8
      for (int v = 0; v < NY; ++v) w[v] = _mm256_loadu_ps(w_k + 8 * v);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const __m256 a_mk = _mm256_broadcast_ss(a + m * lda + k);
#pragma GCC unroll 8
        for (int v = 0; v < NY; ++v) acc[m][v] = _mm256_fmadd_ps(a_mk, w[v], acc[m][v]);
      }
    } else {
      __m256 a_k[MR];
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) a_k[m] = _mm256_broadcast_ss(a + m * lda + k);
#pragma GCC unroll 8
      for (int v = 0; v < NY; ++v)
#pragma GCC unroll 8
        for (int m = 0; m < MR; ++m) acc[m][v] = _mm256_fmadd_ps(a_k[m], _mm256_loadu_ps(w_k + 8 * v), acc[m][v]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < NY; ++v)
      _mm256_storeu_ps(c + m * ldc + 8 * v,
                       accumulate ? _mm256_add_ps(acc[m][v], _mm256_loadu_ps(c + m * ldc + 8 * v)) : acc[m][v]);
}

/// C[0:MR, 0:8 ymm) = A @ panel for a panel of `ymm` (2..8) ymm columns: blocks of ymm_block_columns(MR)
/// columns, the last one narrower (an 8-vector panel at MR = 2: 6 + 2).
template <int MR>
inline void panel_block_ymm(const float* a, int64_t lda, const float* panel, int ymm, int64_t depth, float* c,
                            int64_t ldc, bool accumulate) {
  constexpr int kNY = ymm_block_columns(MR);
  const int64_t panel_width = 8 * ymm;
  for (int y = 0; y < ymm; y += kNY) {
    const float* p = panel + 8 * y;
    float* c_y = c + 8 * y;
    // Widths above kNY never occur: std::min keeps them from being instantiated.
    switch (std::min(kNY, ymm - y)) {
      case 1: micro_kernel_ymm<MR, 1>(a, lda, p, panel_width, depth, c_y, ldc, accumulate); break;
      case 2: micro_kernel_ymm<MR, std::min(kNY, 2)>(a, lda, p, panel_width, depth, c_y, ldc, accumulate); break;
      case 3: micro_kernel_ymm<MR, std::min(kNY, 3)>(a, lda, p, panel_width, depth, c_y, ldc, accumulate); break;
      case 4: micro_kernel_ymm<MR, std::min(kNY, 4)>(a, lda, p, panel_width, depth, c_y, ldc, accumulate); break;
      case 5: micro_kernel_ymm<MR, std::min(kNY, 5)>(a, lda, p, panel_width, depth, c_y, ldc, accumulate); break;
      case 6: micro_kernel_ymm<MR, std::min(kNY, 6)>(a, lda, p, panel_width, depth, c_y, ldc, accumulate); break;
      case 7: micro_kernel_ymm<MR, std::min(kNY, 7)>(a, lda, p, panel_width, depth, c_y, ldc, accumulate); break;
      default: micro_kernel_ymm<MR, std::min(kNY, 8)>(a, lda, p, panel_width, depth, c_y, ldc, accumulate); break;
    }
  }
}
#endif

/// C[0:rows, 0:panel_vectors * lanes) = A[0:rows, 0:depth) @ panel (+= with accumulate) for rows <= kMaxMicroRows.
template <typename T>
inline void panel_block(int rows, const T* a, int64_t lda, const T* panel, int panel_vectors, int64_t depth, T* c,
                        int64_t ldc, bool accumulate) {
#if defined(SEQKERN_SIMD_YMM)
  if constexpr (std::is_same_v<T, float>) {
    const int ymm = panel_vectors * kLanes<float> / 8;
    switch (rows) {
      case 1: return panel_block_ymm<1>(a, lda, panel, ymm, depth, c, ldc, accumulate);
      case 2: return panel_block_ymm<2>(a, lda, panel, ymm, depth, c, ldc, accumulate);
      case 3: return panel_block_ymm<3>(a, lda, panel, ymm, depth, c, ldc, accumulate);
      case 4: return panel_block_ymm<4>(a, lda, panel, ymm, depth, c, ldc, accumulate);
      case 5: return panel_block_ymm<5>(a, lda, panel, ymm, depth, c, ldc, accumulate);
      default: return panel_block_ymm<6>(a, lda, panel, ymm, depth, c, ldc, accumulate);
    }
  }
#endif
  constexpr int kWidest = PackedPanels<T>::kPanelVectors;
  switch (panel_vectors) {
    case 1: return micro_kernel_rows<T, 1>(rows, a, lda, panel, depth, c, ldc, accumulate);
    case 2: return micro_kernel_rows<T, 2>(rows, a, lda, panel, depth, c, ldc, accumulate);
    case 3: return micro_kernel_rows<T, std::min(3, kWidest)>(rows, a, lda, panel, depth, c, ldc, accumulate);
    case 4: return micro_kernel_rows<T, std::min(4, kWidest)>(rows, a, lda, panel, depth, c, ldc, accumulate);
    case 5: return micro_kernel_rows<T, std::min(5, kWidest)>(rows, a, lda, panel, depth, c, ldc, accumulate);
    case 6: return micro_kernel_rows<T, std::min(6, kWidest)>(rows, a, lda, panel, depth, c, ldc, accumulate);
    case 7: return micro_kernel_rows<T, std::min(7, kWidest)>(rows, a, lda, panel, depth, c, ldc, accumulate);
    default: return micro_kernel_rows<T, kWidest>(rows, a, lda, panel, depth, c, ldc, accumulate);
  }
}

/// C (rows x w.width) = A[:, k_begin:k_end) @ W[k_begin:k_end, :) (+= C with `accumulate`) for at most
/// kGemmRowBlock rows (A stays in L2 while every panel of W streams past it); a's columns are W's depth indices.
/// Rows are cut into balanced micro-blocks of at most kMaxMicroRows (with 6: 32 rows -> 6,6,5,5,5,5 rather than
/// 6x5 + a 2-row straggler).
/// Each output sums blocks of kDepthBlock products in registers and adds the blocks in C: a sum's rounding error
/// grows with the length of its chain, and one chain over all of a long depth lost to MKL's blocked sums under
/// the correctness rule (an Elman layer with 2100 inputs: grad_w_ih 5.4e-5 against torch's 1.2e-5). 128 is MKL's
/// own depth block on an AMD Zen 4 (its sgemm's error at depth 256 is that of two 128-long chains); with blocks of
/// 256 the step product at hidden 256 had 1.4x MKL's RMS error there and a LayerNorm LSTM's grad_input broke the
/// rule. Blocks of 128 cost 0-4% of a recurrent layer's time, blocks of 64 2-11% (NOTES.md, "Round 23").
template <typename T>
void gemm_packed_row_block(const T* a, int64_t lda, int64_t rows, const PackedPanels<T>& w, int64_t k_begin,
                           int64_t k_end, T* c, int64_t ldc, bool accumulate) {
  constexpr int64_t kDepthBlock = 128;
  const int64_t blocks = (rows + kMaxMicroRows - 1) / kMaxMicroRows;
  for (int64_t p = 0; p < w.panel_count(); ++p) {
    const int vectors = w.panel_vectors(p);
    const int64_t col = p * PackedPanels<T>::kPanelWidth;
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kDepthBlock) {
      const T* panel = w.panel(p) + k0 * vectors * kLanes<T>;
      const int64_t depth = std::min(kDepthBlock, k_end - k0);
      int64_t row = 0;
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int block_rows = static_cast<int>((rows - row) / (blocks - blk) +
                                                ((rows - row) % (blocks - blk) != 0));
        panel_block(block_rows, a + row * lda + k0, lda, panel, vectors, depth, c + row * ldc + col, ldc,
                    accumulate || k0 > k_begin);
        row += block_rows;
      }
    }
  }
}

/// C (rows x w.width, leading dim ldc) = A[:, k_begin:k_end) @ W[k_begin:k_end, :) (+= C with `accumulate`), A
/// (rows x w.depth) with leading dim lda; by default the whole depth. Row blocks of 192 keep A in L2 across the
/// panels: at 3200 x 256 x 512 (one thread) 64 GFLOP/s, against 48 GFLOP/s when all of A streamed past each panel
/// (both measured on a loaded machine; MKL: 33-36). A depth range lets a recurrent step start on the columns of
/// h_{t-1} its own thread wrote before the others' are there (recurrence_layer.h's split products).
template <typename T>
void gemm_packed(const T* a, int64_t lda, int64_t rows, const PackedPanels<T>& w, T* c, int64_t ldc,
                 int64_t k_begin = 0, int64_t k_end = -1, bool accumulate = false) {
  constexpr int64_t kGemmRowBlock = 192;
  if (k_end < 0) k_end = w.depth;
  if (k_end <= k_begin) return;
  for (int64_t row = 0; row < rows; row += kGemmRowBlock)
    gemm_packed_row_block(a + row * lda, lda, std::min(kGemmRowBlock, rows - row), w, k_begin, k_end,
                          c + row * ldc, ldc, accumulate);
}

}  // namespace seqkern::cpu
