// Weight gradients as sums of outer products over all T*B (time, row) pairs, in an order as accurate as
// torch.nn's (shared by the layer engine, recurrence_layer.h, and the LayerNorm loop, layernorm_recurrence.h).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace seqkern::cpu {

/// lhs^T @ rhs over K rows, (N x M): a weight gradient summed over all T*B (time, row) pairs.
/// One GEMM keeps one running fp32 sum per element over up to K products, torch.nn one per step (T sums of
/// B-row products). One GEMM gave the GRU's grad_w_hh 3.4x torch.nn's error at T=12, B=32, H=256, and
/// chunks of K/8 rows still 4x at T=33, B=64, H=9 (3 layers): both fail the 2x rule. So the rows go in
/// chunks of `chunk_rows`, each chunk's product accumulated into the sum by the GEMM itself (addmm_,
/// beta = 1), as torch.nn accumulates its steps. With weight_gradient_chunk_rows, N=768, M=256 random rows
/// vs fp64, max abs error, this / torch.nn's per-step order / one GEMM:
///   K = 448 (B 32): 2.0e-5 / 1.8e-5 / 4.8e-5;   K = 3200 (B 32): 8.4e-5 / 1.1e-4 / 1.3e-4;
///   K = 16384 (B 64): 2.3e-4 / 4.0e-4 / 2.4e-4;  K = 512 (B 1): 2.3e-5 / 8.7e-5 / 6.4e-5.
/// Adding 64-row chunk products pairwise (the engine's previous scheme) halved that error again but cost a
/// separate pass over the (N x M) sums per chunk: at K = 3200, N=1024, one thread, 21.0 ms against 17.3 ms
/// here (13.5 ms for one GEMM; 2026-12-05, Intel Xeon, loaded machine, medians of 7). fp64: one GEMM.
/// The pieces' (lhs, rhs) rows are summed in turn, as one matrix of all of them would be: the rows of one
/// weight gradient that live in different tensors (the recurrent engine's h_{t-1} rows are h0's and then the
/// output's) need no copy into one matrix first.
inline at::Tensor sum_of_outer_products(const std::vector<std::pair<at::Tensor, at::Tensor>>& pieces,
                                        int64_t chunk_rows) {
  at::Tensor total;
  for (const auto& [lhs, rhs] : pieces) {
    const int64_t rows = lhs.size(0);
    const int64_t step = lhs.scalar_type() == at::kDouble ? std::max<int64_t>(rows, 1) : chunk_rows;
    for (int64_t start = 0; start < rows; start += step) {
      const int64_t n = std::min(step, rows - start);
      const at::Tensor a = lhs.narrow(0, start, n).t(), b = rhs.narrow(0, start, n);
      if (total.defined()) {
        total.addmm_(a, b);
      } else {
        total = at::mm(a, b);
      }
    }
  }
  // No rows at all: the zero (N x M) product of the first (empty) piece.
  return total.defined() ? total : at::mm(pieces.front().first.t(), pieces.front().second);
}

/// One (lhs, rhs) pair of K rows.
inline at::Tensor sum_of_outer_products(const at::Tensor& lhs, const at::Tensor& rhs, int64_t chunk_rows) {
  return sum_of_outer_products({{lhs, rhs}}, chunk_rows);
}

/// At most 64 chunks of at least 64 rows: the errors above.
inline int64_t weight_gradient_chunk_rows(int64_t rows) {
  constexpr int64_t kMinChunkRows = 64, kMaxChunks = 64;
  return std::max(kMinChunkRows, (rows + kMaxChunks - 1) / kMaxChunks);
}

}  // namespace seqkern::cpu
