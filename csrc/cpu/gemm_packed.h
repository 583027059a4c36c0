// The packed GEMM micro-kernel of the recurrent loops: W packed once into panels that a thread keeps hot
// in its own L2 across all time steps, and a register-blocked C(M x N) = A(M x K) @ W(K x N).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>

#include "cpu/simd.h"

namespace seqkern::cpu {

// ------------------------------------------------------------------------------------------------
// Packed GEMM micro-kernel.
// ------------------------------------------------------------------------------------------------
/// W (depth x width) re-laid as panels of up to kPanelVectors SIMD vectors of columns; panel p holds
/// W[0:depth, p*panel_width : p*panel_width + its width] row after row, so the micro-kernel reads one
/// contiguous stream. width is a multiple of the lane count (padding columns are zero).
template <typename T>
struct PackedPanels {
  static constexpr int kPanelVectors = 4;
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
  /// for a padding column. Per panel the 64-ish column sources are looked up once; blocks of 64 k keep
  /// the lines read and written in L1 whichever way the source runs. The loop order follows the source:
  /// along k when columns are contiguous rows of W (W_hh rows: 57 us per 512 KB slice), along j when they
  /// are columns of W (backward; that order measured 200 us the other way round).
  template <typename ColumnSource>
  void pack(const ColumnSource& column) {
    constexpr int64_t kDepthBlock = 64;
    std::pair<const T*, int64_t> sources[kPanelWidth];
    for (int64_t p = 0; p < panel_count(); ++p) {
      const int64_t columns = panel_vectors(p) * kLanes<T>;
      T* dst = data + p * depth * kPanelWidth;
      bool contiguous_along_k = true;
      for (int64_t j = 0; j < columns; ++j) {
        const auto [src, stride] = column(p * kPanelWidth + j);
        sources[j] = {src, stride};
        contiguous_along_k &= src == nullptr || stride == 1;
      }
      for (int64_t k0 = 0; k0 < depth; k0 += kDepthBlock) {
        const int64_t k1 = std::min(depth, k0 + kDepthBlock);
        if (contiguous_along_k) {
          for (int64_t j = 0; j < columns; ++j)
            for (int64_t k = k0; k < k1; ++k) dst[k * columns + j] = sources[j].first ? sources[j].first[k] : T(0);
        } else {
          for (int64_t k = k0; k < k1; ++k)
            for (int64_t j = 0; j < columns; ++j)
              dst[k * columns + j] = sources[j].first ? sources[j].first[k * sources[j].second] : T(0);
        }
      }
    }
  }
};

/// C[0:MR, 0:NV*lanes) = A[0:MR, 0:depth) @ panel; MR x NV accumulators stay in registers
/// (MR=6, NV=4: 24 of the 32 zmm registers). One thread, best of runs, against at::mm (MKL) on the same
/// product: 32 x 256 x 512 (a batch-32 step) 72.7 vs 95.7 us; 64 x 512 x 1024 577 vs 728 us;
/// 1 x 256 x 512 (batch 1: bound by L2 bandwidth, ~110 GB/s) 4.9 vs 11.1 us. So the persistent loop
/// uses it at every batch size rather than calling at::mm per step.
template <typename T, int MR, int NV>
void micro_kernel(const T* a, int64_t lda, const T* panel, int64_t depth, T* c, int64_t ldc) {
  using V = Simd<T>;
  constexpr int L = kLanes<T>;
  V acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = V{};
  for (int64_t k = 0; k < depth; ++k) {
    V w[NV];
    for (int v = 0; v < NV; ++v) std::memcpy(&w[v], panel + (k * NV + v) * L, sizeof(V));
    for (int m = 0; m < MR; ++m) {
      const V a_mk = broadcast(a[m * lda + k]);
      for (int v = 0; v < NV; ++v) acc[m][v] = fmadd(a_mk, w[v], acc[m][v]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) std::memcpy(c + m * ldc + v * L, &acc[m][v], sizeof(V));
}

template <typename T, int NV>
void micro_kernel_rows(int rows, const T* a, int64_t lda, const T* panel, int64_t depth, T* c, int64_t ldc) {
  switch (rows) {
    case 1: return micro_kernel<T, 1, NV>(a, lda, panel, depth, c, ldc);
    case 2: return micro_kernel<T, 2, NV>(a, lda, panel, depth, c, ldc);
    case 3: return micro_kernel<T, 3, NV>(a, lda, panel, depth, c, ldc);
    case 4: return micro_kernel<T, 4, NV>(a, lda, panel, depth, c, ldc);
    case 5: return micro_kernel<T, 5, NV>(a, lda, panel, depth, c, ldc);
    default: return micro_kernel<T, 6, NV>(a, lda, panel, depth, c, ldc);
  }
}

constexpr int kMaxMicroRows = 6;

/// C (rows x w.width) = A (rows x w.depth) @ W for at most kGemmRowBlock rows (A stays in L2 while
/// every panel of W streams past it). Rows are cut into balanced micro-blocks of at most 6
/// (32 rows -> 6,6,5,5,5,5 rather than 6x5 + a 2-row straggler).
template <typename T>
void gemm_packed_row_block(const T* a, int64_t lda, int64_t rows, const PackedPanels<T>& w, T* c, int64_t ldc) {
  const int64_t blocks = (rows + kMaxMicroRows - 1) / kMaxMicroRows;
  for (int64_t p = 0; p < w.panel_count(); ++p) {
    const T* panel = w.panel(p);
    const int64_t col = p * PackedPanels<T>::kPanelWidth;
    int64_t row = 0;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int block_rows = static_cast<int>((rows - row) / (blocks - blk) +
                                              ((rows - row) % (blocks - blk) != 0));
      const T* a_blk = a + row * lda;
      T* c_blk = c + row * ldc + col;
      switch (w.panel_vectors(p)) {
        case 1: micro_kernel_rows<T, 1>(block_rows, a_blk, lda, panel, w.depth, c_blk, ldc); break;
        case 2: micro_kernel_rows<T, 2>(block_rows, a_blk, lda, panel, w.depth, c_blk, ldc); break;
        case 3: micro_kernel_rows<T, 3>(block_rows, a_blk, lda, panel, w.depth, c_blk, ldc); break;
        default: micro_kernel_rows<T, 4>(block_rows, a_blk, lda, panel, w.depth, c_blk, ldc); break;
      }
      row += block_rows;
    }
  }
}

/// C (rows x w.width, leading dim ldc) = A (rows x w.depth, leading dim lda) @ W. Row blocks of 192 keep
/// A in L2 across the panels: at 3200 x 256 x 512 (one thread) 64 GFLOP/s, against 48 GFLOP/s when all
/// of A streamed past each panel (both measured on a loaded machine; MKL: 33-36).
template <typename T>
void gemm_packed(const T* a, int64_t lda, int64_t rows, const PackedPanels<T>& w, T* c, int64_t ldc) {
  constexpr int64_t kGemmRowBlock = 192;
  for (int64_t row = 0; row < rows; row += kGemmRowBlock)
    gemm_packed_row_block(a + row * lda, lda, std::min(kGemmRowBlock, rows - row), w, c + row * ldc, ldc);
}

}  // namespace seqkern::cpu
