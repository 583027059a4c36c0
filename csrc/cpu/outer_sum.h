// Weight gradients as sums of outer products over all T*B (time, row) pairs, in an order as accurate as
// torch.nn's (shared by the layer engine, recurrence_layer.h, and the LayerNorm loop, layernorm_recurrence.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace seqkern::cpu {

using OuterPieces = std::vector<std::pair<at::Tensor, at::Tensor>>;

/// out (n x M) = rows [first, first + n) of sum_of_outer_products(pieces) (below): the pieces' chunk products of
/// lhs columns [first, first + n), each accumulated into `out` by the GEMM.
inline void accumulate_outer_products(const OuterPieces& pieces, int64_t chunk_rows, int64_t first, at::Tensor out) {
  // A kernel below the op's autograd (grad mode is per thread, and on in a parallel worker): mm_out refuses
  // operands that require grad (double backward passes such) under grad mode.
  at::NoGradGuard no_grad;
  bool written = false;
  at::Tensor chunk_sum;  // a chunk's product, summed from zero before it is added to out
  for (const auto& [lhs, rhs] : pieces) {
    const int64_t rows = lhs.size(0);
    const int64_t step = lhs.scalar_type() == at::kDouble ? std::max<int64_t>(rows, 1) : chunk_rows;
    for (int64_t start = 0; start < rows; start += step) {
      const int64_t n = std::min(step, rows - start);
      const at::Tensor a = lhs.narrow(0, start, n).narrow(1, first, out.size(0)).t(), b = rhs.narrow(0, start, n);
      if (!written) {
        at::mm_out(out, a, b);
        written = true;
        continue;
      }
      if (!chunk_sum.defined()) chunk_sum = at::empty_like(out);
      at::mm_out(chunk_sum, a, b);
      out.add_(chunk_sum);
    }
  }
  if (!written) out.zero_();  // no rows at all
}

/// lhs^T @ rhs over K rows, (N x M): a weight gradient summed over all T*B (time, row) pairs.
/// One GEMM keeps one running fp32 sum per element over up to K products, torch.nn one per step (T sums of
/// B-row products). One GEMM gave the GRU's grad_w_hh 3.4x torch.nn's error at T=12, B=32, H=256, and
/// chunks of K/8 rows still 4x at T=33, B=64, H=9 (3 layers): both fail the 2x rule. So the rows go in
/// chunks of `chunk_rows`, each chunk's product summed from zero and then added to the sum, as torch.nn
/// accumulates its steps. Not by the GEMM itself (addmm_, beta = 1): how a BLAS orders that sum is its own
/// choice, and MKL's small-matrix path on an AMD EPYC (Zen 1, AVX2) starts each chunk's chains from C, one
/// chain over all K: the LSTM above at H=9 had 17x torch.nn's grad_w_hh error (2026-12-07). The separate add
/// costs ~11% of the weight-gradient products (K = 3200, N = 512, M = 256, one thread, same machine).
/// With weight_gradient_chunk_rows, N=768, M=256 random rows
/// vs fp64, max abs error, this / torch.nn's per-step order / one GEMM:
///   K = 448 (B 32): 2.0e-5 / 1.8e-5 / 4.8e-5;   K = 3200 (B 32): 8.4e-5 / 1.1e-4 / 1.3e-4;
///   K = 16384 (B 64): 2.3e-4 / 4.0e-4 / 2.4e-4;  K = 512 (B 1): 2.3e-5 / 8.7e-5 / 6.4e-5.
/// Adding 64-row chunk products pairwise (the engine's previous scheme) halved that error again but cost a
/// separate pass over the (N x M) sums per chunk: at K = 3200, N=1024, one thread, 21.0 ms against 17.3 ms
/// here (13.5 ms for one GEMM; 2026-12-05, Intel Xeon, loaded machine, medians of 7). fp64: one GEMM.
/// The pieces' (lhs, rhs) rows are summed in turn, as one matrix of all of them would be: the rows of one
/// weight gradient that live in different tensors (the recurrent engine's h_{t-1} rows are h0's and then the
/// output's) need no copy into one matrix first.
inline at::Tensor sum_of_outer_products(const OuterPieces& pieces, int64_t chunk_rows) {
  const auto& [lhs, rhs] = pieces.front();
  at::Tensor total = at::empty({lhs.size(1), rhs.size(1)}, lhs.options());
  accumulate_outer_products(pieces, chunk_rows, 0, total);
  return total;
}

/// Row boundaries of `parts` runs of about equal work over the concatenated output rows of several gradients
/// (gradient g: rows[g] rows of cost[g] each), on multiples of 16 rows within a gradient. Run p is
/// [bound[p], bound[p + 1]) in the concatenation.
inline std::vector<int64_t> balanced_row_bounds(const std::vector<int64_t>& rows, const std::vector<int64_t>& cost,
                                                int parts) {
  int64_t total_work = 0, total_rows = 0;
  for (size_t g = 0; g < rows.size(); ++g) total_work += rows[g] * cost[g], total_rows += rows[g];
  std::vector<int64_t> bounds{0};
  for (int p = 1; p < parts; ++p) {
    int64_t work = total_work * p / parts, offset = 0;
    size_t g = 0;
    while (g + 1 < rows.size() && work >= rows[g] * cost[g]) work -= rows[g] * cost[g], offset += rows[g++];
    const int64_t row = std::min(rows[g], (work / std::max<int64_t>(cost[g], 1) + 8) / 16 * 16);
    bounds.push_back(std::max(bounds.back(), offset + row));
  }
  bounds.push_back(total_rows);
  return bounds;
}

/// Several weight gradients, each sum_of_outer_products(gradients[g]), computed side by side: their output rows
/// are cut into one run of equal work per thread (balanced_row_bounds), each run summed by single-threaded
/// products inside one parallel region; the order of every element's sum is sum_of_outer_products'. One after
/// another, each of a gradient's ~50 chunk products forked and joined the whole team around ~20-40 us of work:
/// grad_w_ih and grad_w_hh of an Elman layer at b32 t100 h256 took 3.17 ms that way, 2.73 ms side by side (2
/// threads; GRU's 8.1 -> 7.8 ms, the LSTM's level at ~10.4 ms; Intel Xeon model 207, 2026-12-06).
inline std::vector<at::Tensor> sums_of_outer_products(const std::vector<OuterPieces>& gradients, int64_t chunk_rows) {
  std::vector<at::Tensor> totals;
  std::vector<int64_t> rows, cost;
  for (const OuterPieces& pieces : gradients) {
    const auto& [lhs, rhs] = pieces.front();
    totals.push_back(at::empty({lhs.size(1), rhs.size(1)}, lhs.options()));
    rows.push_back(lhs.size(1));
    cost.push_back(rhs.size(1));
  }
  const int threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (threads < 2) {
    for (size_t g = 0; g < gradients.size(); ++g) accumulate_outer_products(gradients[g], chunk_rows, 0, totals[g]);
    return totals;
  }
  const std::vector<int64_t> bounds = balanced_row_bounds(rows, cost, threads);
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      int64_t offset = 0;  // of gradient g's rows in the concatenation
      for (size_t g = 0; g < gradients.size(); offset += rows[g++]) {
        const int64_t first = std::max(bounds[part], offset) - offset;
        const int64_t last = std::min(bounds[part + 1], offset + rows[g]) - offset;
        if (last > first)
          accumulate_outer_products(gradients[g], chunk_rows, first, totals[g].narrow(0, first, last - first));
      }
    }
  });
  return totals;
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
