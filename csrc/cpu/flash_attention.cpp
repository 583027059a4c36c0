// Flash attention on CPU: flash_attention_forward and flash_attention_backward (contracts in csrc/ops.cpp,
// oracle in seqkern/reference/flash_attention.py).
//
// Tiling. A sequence's queries are cut into tiles of kQueryTile rows and its keys into tiles of kKeyTile.
// Before the main loop every operand is re-laid once, in the accumulation dtype (fp32 for bf16 storage),
// into zero-padded tiles whose rows are contiguous and a whole number of SIMD vectors wide, so that every
// product below is a tile_gemm (attention.h) over plain row-major tiles:
//   keys    K^T tiles (D x kKeyTile), K tiles (kKeyTile x D), V tiles (kKeyTile x Dv_pad)  [per kv head; which of
//           them a pass reads: KeyUse]
//   queries (backward only) Q^T, Q, dO^T, dO tiles and per row lse (float64, as two halves) and Delta  [per head]
// (rows that need neither a conversion nor padding are read where they lie: RowTiles). These copies are linear in
// the sequence lengths; the (Lq, Lk) scores exist one tile at a time only. bf16 storage
// on a CPU with bf16 units instead keeps the operands in bf16 (copied, not rounded), in the layouts of
// tile_gemm_bf16.h (KeyTilesBf16 for the forward, BackwardTilesBf16 for the backward), and every tile product runs
// there with fp32 accumulation; the softmax, its sums and Delta stay fp32 / float64.
//
// Forward (FlashAttention-2): one work item = (sequence, query head, query tile). The item keeps its
// output rows O, running max m and running sum l, and streams the visible key tiles:
//   s = (scale Q) K^T (tile_gemm) + mask, -inf where hidden,
//   online softmax (attention.h: online_softmax_update) -> P = exp(s - m'), O = alpha O + (P * keep) V,
// and finally out = O / l / (1 - dropout_p), lse = m + log l (float64). Key tiles no query of the item sees are
// skipped, which halves causal work; the diagonal tile computes only the columns its rows see. Without a mask that
// differs from query to query (off the bf16 units) the item works key-major instead (forward_key_major):
// S^T = K (scale Q)^T with K read in place, each query's online softmax down a column, 16 queries to a vector, then
// O = alpha O + P V reading P^T transposed; no K^T tiles are packed.
//
// Backward: one work item = (sequence, kv head, key tile), which owns its rows of dK and dV. It loops
// over the query heads sharing the kv head and over the query tiles that see the key tile, working on
// transposed score tiles so that every product reads its operands in their stored order:
//   S^T = K (scale Q)^T, P^T = exp(S^T + mask - lse), dP^T = V dO^T (times keep / (1 - p) with dropout),
//   dS^T = P^T * (dP^T - Delta), dV += (P^T * keep) dO, dK += scale dS^T Q, dQ^T += scale K^T dS^T
// (grad_scores = dS). Delta_i = sum_j P dP / sum_j P (dropout included) comes from a first pass over the same
// items that computes S^T and dP^T only (see backward()).
// dQ rows are shared by all key tiles, so each worker accumulates dQ^T in its own buffer and the buffers
// are summed at the end in worker order (no atomics). The backward deals its key tiles to the workers in a
// fixed pattern (for_each_worker_strided), so the summation order, hence grad_q, is the same on every run.
//
// Work is spread over at::parallel_for's threads: the forward's items are pulled from counters, each worker's
// own first (for_each_worker_homed, attention.h: the items whose keys it packed), so the unequal items of causal
// attention balance themselves; the backward's are dealt round-robin from the same decreasing-cost order. K, V (and in
// the backward Q, dO) are packed into tiles first, in a parallel region of their own; where each tile has one reader
// (one tile per sequence: the backward always, the forward without grouped heads), each item packs its own instead.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "cpu/aligned_vector.h"
#include "cpu/attention.h"
#include "cpu/tile_gemm_bf16.h"
#include "cpu/workspace_pool.h"

namespace seqkern::cpu {
namespace {

using namespace attention;

template <typename S>
using Acc = at::opmath_type<S>;

// 128 x 128 tiles: a score tile is 64 KB of fp32 (L2-resident), the PV and dK/dV/dQ products have depth
// 128, and the per-row softmax bookkeeping is paid once per 128 keys. Against 64-row query tiles (with
// 128-key tiles), L = 1024, D = 64, 8 heads, one thread, best run side by side: forward 1.05x -> 1.14x SDPA,
// forward + backward 1.24x -> 1.52x SDPA.
constexpr int64_t kQueryTile = 128;
constexpr int64_t kKeyTile = 128;
constexpr int64_t kRowGroup = 32;  // rows of a diagonal (ragged) tile that share one column range
// The bf16 forward widens to fp32 (key-major) where no sequence has more keys than this: AMX against widened, forward
// op b32 h4, 2 threads (Intel Xeon model 207): L17 d32 / d64 / d128 0.68x / 0.68x / 0.75x, L32 d32 / d64 0.80x /
// 0.84x, L48 d32 / d64 1.01x / 1.19x (NOTES.md "Round 21").
constexpr int64_t kWidenedKeys = 32;

// ================================================================================================
// Arguments.
// ================================================================================================
/// One attention sequence: rows [q_begin, q_begin + len_q) of batch entry `batch` against keys
/// [k_begin, k_begin + len_k); its tiles are numbered from q_tile_base / k_tile_base in the packed buffers.
struct Sequence {
  int64_t batch, q_begin, len_q, k_begin, len_k, q_tile_base, k_tile_base;
};

/// Everything both directions read off the arguments.
struct Problem {
  int64_t batch = 0, heads = 0, kv_heads = 0, group = 1, len_q = 0, len_k = 0, dim = 0, dim_v = 0;
  double scale = 1;
  int64_t window_left = -1, window_right = -1;
  bool bottom_right = false;
  bool dropout = false;
  double dropout_p = 0;
  DropoutHash hash;
  std::vector<Sequence> sequences;
  int64_t q_tiles = 0, k_tiles = 0;  // over all sequences
  int64_t covered_q = 0, covered_k = 0;  // rows of q and of k/v inside a sequence (the rest get zeros)

  Visibility visibility(const Sequence& s) const {
    return Visibility(s.len_q, s.len_k, window_left, window_right, bottom_right);
  }
  int64_t tiles(int64_t length, int64_t tile) const { return (length + tile - 1) / tile; }
};

#define FA_CHECK(cond, ...) TORCH_CHECK(cond, "seqkern flash_attention (CPU): ", __VA_ARGS__)

void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  FA_CHECK(t.dim() == 0 || t.numel() == 0 || t.stride(-1) == 1 || t.size(-1) <= 1, name, " must have stride(-1) == 1, got strides ",
           t.strides());
}

void check_tensor(const at::Tensor& t, const at::Tensor& like, at::IntArrayRef shape, const char* name) {
  FA_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  FA_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  FA_CHECK(t.scalar_type() == like.scalar_type(), name, " must have dtype ", like.scalar_type(), ", got ",
           t.scalar_type());
  check_last_dim_contiguous(t, name);
}

/// float64 whatever the inputs: exp(s - lse) of a row's largest score, near 1 in a saturated softmax, needs lse to
/// ~1e-7 absolute, and a float32 lse of magnitude 200 is only within 8e-6 (8e-6 relative error in those P, in dV).
at::ScalarType lse_dtype(const at::Tensor&) { return at::kDouble; }

/// cu_seqlens (N+1,) int32 on the CPU, 0 first, non-decreasing, last <= length; returned as int64 bounds.
std::vector<int64_t> read_cu_seqlens(const at::Tensor& cu, int64_t length, const char* name) {
  FA_CHECK(cu.device().is_cpu(), name, " must be a CPU tensor, got ", cu.device());
  FA_CHECK(cu.scalar_type() == at::kInt, name, " must be int32, got ", cu.scalar_type());
  FA_CHECK(cu.dim() == 1 && cu.size(0) >= 1, name, " must be (N+1,), got shape ", cu.sizes());
  const at::Tensor c = cu.contiguous();
  const int32_t* data = c.data_ptr<int32_t>();
  std::vector<int64_t> bounds(data, data + c.size(0));
  FA_CHECK(bounds[0] == 0, name, "[0] must be 0, got ", bounds[0]);
  for (size_t n = 1; n < bounds.size(); ++n)
    FA_CHECK(bounds[n] >= bounds[n - 1], name, " must be non-decreasing, got ", name, "[", n, "] = ", bounds[n],
             " < ", bounds[n - 1]);
  FA_CHECK(bounds.back() <= length, name, "[-1] = ", bounds.back(), " exceeds the ", length,
           " rows of the packed tensor");
  return bounds;
}

/// Checks q, k, v and the mask; sets the sizes.
void read_shapes(Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& attn_mask) {
  const auto dtype = q.scalar_type();
  FA_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
           "q must be float32, float64, bfloat16 or float16, got ", dtype);
  FA_CHECK(q.device().is_cpu(), "q must be a CPU tensor, got ", q.device());
  FA_CHECK(q.dim() == 4, "q must be (B, Hq, Lq, D), got shape ", q.sizes());
  FA_CHECK(k.dim() == 4, "k must be (B, Hkv, Lk, D), got shape ", k.sizes());
  FA_CHECK(v.dim() == 4, "v must be (B, Hkv, Lk, Dv), got shape ", v.sizes());
  p.batch = q.size(0);
  p.heads = q.size(1);
  p.len_q = q.size(2);
  p.dim = q.size(3);
  p.kv_heads = k.size(1);
  p.len_k = k.size(2);
  p.dim_v = v.size(3);
  check_last_dim_contiguous(q, "q");
  check_tensor(k, q, {p.batch, p.kv_heads, p.len_k, p.dim}, "k");
  check_tensor(v, q, {p.batch, p.kv_heads, p.len_k, p.dim_v}, "v");
  FA_CHECK(p.kv_heads > 0 ? p.heads % p.kv_heads == 0 : p.heads == 0, "the ", p.heads,
           " query heads must be a multiple of the ", p.kv_heads, " kv heads");
  p.group = p.kv_heads > 0 ? p.heads / p.kv_heads : 1;
  if (attn_mask.has_value()) check_tensor(*attn_mask, q, {p.batch, p.heads, p.len_q, p.len_k}, "attn_mask");
}

/// Checks dropout_p and the seed; sets the dropout hash.
void read_dropout(Problem& p, double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  FA_CHECK(dropout_p >= 0 && dropout_p < 1, "dropout_p must be in [0, 1), got ", dropout_p);
  p.dropout_p = dropout_p;
  p.dropout = dropout_p > 0;
  if (!p.dropout) return;
  FA_CHECK(dropout_seed.has_value(), "dropout_p > 0 needs a dropout_seed");
  const at::Tensor& seed = *dropout_seed;
  FA_CHECK(seed.device().is_cpu() && seed.scalar_type() == at::kLong && seed.numel() == 1,
           "dropout_seed must be an int64 CPU tensor with one element, got ", seed.scalar_type(), " ", seed.sizes(),
           " on ", seed.device());
  p.hash = DropoutHash(seed.item<int64_t>(), dropout_p);
}

/// The sequences: the B batch entries, or with cu_seqlens the packed sequences of batch entry 0; numbers
/// their tiles.
void read_sequences(Problem& p, const std::optional<at::Tensor>& cu_seqlens_q,
                    const std::optional<at::Tensor>& cu_seqlens_k, bool has_mask) {
  FA_CHECK(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(),
           "cu_seqlens_q and cu_seqlens_k must be given together");
  if (cu_seqlens_q.has_value()) {
    FA_CHECK(p.batch == 1, "variable lengths (cu_seqlens) need B == 1, got B = ", p.batch);
    FA_CHECK(!has_mask, "attn_mask must be None with cu_seqlens");
    const auto bounds_q = read_cu_seqlens(*cu_seqlens_q, p.len_q, "cu_seqlens_q");
    const auto bounds_k = read_cu_seqlens(*cu_seqlens_k, p.len_k, "cu_seqlens_k");
    FA_CHECK(bounds_q.size() == bounds_k.size(), "cu_seqlens_q and cu_seqlens_k must have the same length, got ",
             bounds_q.size(), " and ", bounds_k.size());
    for (size_t n = 0; n + 1 < bounds_q.size(); ++n)
      p.sequences.push_back(
          {0, bounds_q[n], bounds_q[n + 1] - bounds_q[n], bounds_k[n], bounds_k[n + 1] - bounds_k[n], 0, 0});
    p.covered_q = bounds_q.back();
    p.covered_k = bounds_k.back();
  } else {
    for (int64_t b = 0; b < p.batch; ++b) p.sequences.push_back({b, 0, p.len_q, 0, p.len_k, 0, 0});
    p.covered_q = p.len_q;
    p.covered_k = p.len_k;
  }
  for (Sequence& s : p.sequences) {
    s.q_tile_base = p.q_tiles;
    s.k_tile_base = p.k_tiles;
    p.q_tiles += p.tiles(s.len_q, kQueryTile);
    p.k_tiles += p.tiles(s.len_k, kKeyTile);
  }
}

/// Checks every argument the two ops share (before any kernel runs); returns the problem they define.
Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& cu_seqlens_q,
                     const std::optional<at::Tensor>& cu_seqlens_k, double scale, int64_t window_left,
                     int64_t window_right, bool bottom_right, double dropout_p,
                     const std::optional<at::Tensor>& dropout_seed) {
  Problem p;
  read_shapes(p, q, k, v, attn_mask);
  FA_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  p.scale = scale;
  p.window_left = window_left;
  p.window_right = window_right;
  p.bottom_right = bottom_right;
  read_dropout(p, dropout_p, dropout_seed);
  read_sequences(p, cu_seqlens_q, cu_seqlens_k, attn_mask.has_value());
  return p;
}

/// Rows of a (B, H, L, X) tensor with stride(-1) == 1 (any other strides).
template <typename T>
struct Rows {
  T* data;
  int64_t s0, s1, s2;
  explicit Rows(const at::Tensor& t)
      : data(t.data_ptr<std::remove_const_t<T>>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)) {}
  T* operator()(int64_t b, int64_t h, int64_t i) const { return data + b * s0 + h * s1 + i * s2; }
};

/// The most keys (or queries) any one sequence has.
int64_t longest(const Problem& p, bool keys) {
  int64_t most = 0;
  for (const Sequence& s : p.sequences) most = std::max(most, keys ? s.len_k : s.len_q);
  return most;
}

/// The most tiles (of keys, or of queries) any one sequence has: the longest one's.
int64_t most_tiles(const Problem& p, bool keys) {
  return p.tiles(longest(p, keys), keys ? kKeyTile : kQueryTile);
}

/// For each global tile index of a sequence family, the sequence it belongs to and its index in it.
std::vector<std::pair<int64_t, int64_t>> tile_owners(const Problem& p, bool keys) {
  std::vector<std::pair<int64_t, int64_t>> owners;
  for (size_t n = 0; n < p.sequences.size(); ++n) {
    const Sequence& s = p.sequences[n];
    const int64_t count = keys ? p.tiles(s.len_k, kKeyTile) : p.tiles(s.len_q, kQueryTile);
    for (int64_t t = 0; t < count; ++t) owners.emplace_back(static_cast<int64_t>(n), t);
  }
  return owners;
}

/// Tiles of tile_size elements, one per (head, global tile index), uninitialized until packed (the
/// packing writes every element, padding included, inside the parallel loop).
template <typename A>
struct TileArray {
  int64_t tiles = 0, tile_size = 0;
  // From the workspace pool: with new[] the packed K and V (4 MB each at L 1024, d128, 8 heads) were fresh pages
  // at every call (glibc returns blocks that large to the OS), and their page faults and memory-cgroup charging
  // took ~5% of the samples of an fp32 L1024 d128 forward at 2 threads.
  at::Tensor storage;
  A* data = nullptr;

  TileArray() = default;
  TileArray(int64_t heads, int64_t tiles_, int64_t tile_size_)
      : tiles(tiles_), tile_size(tile_size_),
        storage(pooled_empty({heads * tiles_ * tile_size_ * static_cast<int64_t>(sizeof(A))},
                             at::TensorOptions().dtype(at::kByte))),
        data(reinterpret_cast<A*>(storage.data_ptr())) {}
  A* operator()(int64_t h, int64_t g) const { return data + (h * tiles + g) * tile_size; }
};

/// How far past its last row a product may read a tile's rows (transposed: its columns): the fp32 / fp64 products
/// round a tile's extent up to their lane count (column_end, pad_lanes), the bf16 units to kDepthGranule (32).
constexpr int64_t kPadGranule = 32;

/// The padded extent of a tile of `rows` rows along that dimension, `capacity` at most.
int64_t padded_extent(int64_t rows, int64_t capacity) { return std::min(capacity, bf16::round_up(rows, kPadGranule)); }

#if defined(__AVX512F__)
/// dst[c * ld + r] = factor * src_row(r)[c] for c < cols and r < rows, and with zero_to_lanes 0 for r up to
/// pad_lanes(rows) (else nothing more is written): 16 x 16 blocks transposed in registers (simd.h). Element by
/// element, packing K^T took 12% of the samples of a one-thread b32 h4 L17 d32 forward, as much as its Q K^T
/// products.
template <typename RowPtr>
void transpose_rows(float* dst, int64_t ld, int64_t rows, int64_t cols, const RowPtr& src_row, float factor,
                    bool zero_to_lanes) {
  const __m512 scale = _mm512_set1_ps(factor);
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const float* src[16];
    for (int i = 0; i < 16; ++i) src[i] = r0 + i < rows ? src_row(r0 + i) : nullptr;
    const __mmask16 written = zero_to_lanes ? lane_mask(16) : lane_mask(rows - r0);
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      const __mmask16 lanes = lane_mask(cols - c0);
      __m512 r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = src[i] ? _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, src[i] + c0), scale) : _mm512_setzero_ps();
      transpose_16x16(r);
      for (int64_t c = c0; c < std::min(cols, c0 + 16); ++c)
        _mm512_mask_storeu_ps(dst + c * ld + r0, written, r[c - c0]);
    }
  }
}
#endif

/// dst[r * ld + c] = 0 for r < rows, c < cols. A short sequence's tiles have a few elements of padding on each of
/// many rows: as the memset call per row that GCC makes of a fill loop (tree-loop-distribute-patterns), zeroing them
/// took 8% of a b32 h4 L17 backward's samples.
template <typename A>
__attribute__((optimize("no-tree-loop-distribute-patterns"))) void zero_rows(A* dst, int64_t rows, int64_t cols,
                                                                            int64_t ld) {
  if (rows <= 0 || cols <= 0) return;
  if (cols == ld) {
    std::fill(dst, dst + rows * ld, A(0));
    return;
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[r * ld + c] = A(0);
}

/// dst[c * ld + r] = factor * src_row(r)[c] converted to A for r < rows, c < cols -> the columns of each of those
/// rows written (fp32 by register blocks: rows rounded up to the lanes, the extra ones 0; else by 16 source rows at
/// a time: rows).
template <typename A, typename S, typename RowPtr>
int64_t transpose_copy(A* dst, int64_t ld, int64_t rows, int64_t cols, const RowPtr& src_row, A factor) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<A, float> && std::is_same_v<S, float>) {
    transpose_rows(dst, ld, rows, cols, src_row, factor, /*zero_to_lanes=*/true);
    return pad_lanes<A>(rows);
  }
#endif
  constexpr int64_t kRowBlock = 64 / sizeof(A);
  const S* src[kRowBlock];
  for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
    const int64_t n = std::min(kRowBlock, rows - r0);
    for (int64_t i = 0; i < n; ++i) src[i] = src_row(r0 + i);
    for (int64_t c = 0; c < cols; ++c) {
      A* out = dst + c * ld + r0;
      for (int64_t i = 0; i < n; ++i) out[i] = factor * static_cast<A>(src[i][c]);
    }
  }
  return rows;
}

/// The tile of `size` elements at dst: dst[r * ld + c] = factor * src_row(r)[c] for r < rows, c < cols,
/// converted to A, and 0 in the padding a product may read: columns [cols, ld) of those rows and the rows up to
/// padded_extent(rows); transpose: dst[c * ld + r] instead, the padding columns [rows, padded_extent(rows)) of
/// every row and the rows past cols up to padded_extent. The rest of the tile is left as it was: zeroing the whole
/// 128-row tile for a sequence of 17 keys took ~10% of a b32 h4 L17 forward's samples (NOTES.md "Round 19"). The
/// transpose of fp32 goes by register blocks (transpose_rows), of other dtypes 16 source rows at a time, so that
/// each destination row receives one whole 64-byte line per pass instead of one element (packing K and V took 2.7%
/// of the samples of a one-thread fp32 forward at L 1024, d128 run beside SDPA, 1.5% since; the tile products: 27%).
template <typename A, typename S, typename RowPtr>
void copy_tile(A* dst, int64_t size, int64_t ld, int64_t rows, int64_t cols, const RowPtr& src_row, bool transpose,
               A factor = A(1)) {
  const int64_t tile_rows = size / ld;
  if (!transpose) {
    for (int64_t r = 0; r < rows; ++r) {
      const S* src = src_row(r);
      A* out = dst + r * ld;
      for (int64_t c = 0; c < cols; ++c) out[c] = factor * static_cast<A>(src[c]);
    }
    zero_rows(dst + cols, rows, ld - cols, ld);
    zero_rows(dst + rows * ld, padded_extent(rows, tile_rows) - rows, ld, ld);
    return;
  }
  const int64_t written = transpose_copy<A, S>(dst, ld, rows, cols, src_row, factor);
  const int64_t extent = padded_extent(rows, ld);
  zero_rows(dst + written, cols, extent - written, ld);
  zero_rows(dst + cols * ld, tile_rows - cols, extent, ld);
}

/// Row tiles of one operand (K, V, Q or dO rows) for each (head, tile): packed (a TileArray, rows `ld` apart), or
/// read where the input lies when the product needs neither a conversion nor padding (`first`: each tile's first
/// row; rows `ld` apart, the input's row stride). A product reads exactly the rows and columns it is given: K and
/// V rows as its A operand (broadcast element by element, depth D / Dv), Q and dO rows as its B (whole vectors:
/// in place only when D / Dv is a multiple of the lanes). Copying them took ~10% of a b32 h4 L17 backward.
template <typename A>
struct RowTiles {
  int64_t tiles = 0, ld = 0;
  TileArray<A> packed;          // empty when in place
  std::vector<const A*> first;  // empty when packed

  RowTiles() = default;
  /// `heads` x `tiles` tiles of tile_rows rows `ld` apart: packed, or with in_place of rows `stride` apart.
  RowTiles(int64_t heads, int64_t tiles_, int64_t tile_rows, int64_t packed_ld, bool in_place, int64_t stride)
      : tiles(tiles_), ld(in_place ? stride : packed_ld) {
    if (in_place) {
      first.resize(heads * tiles_);
    } else {
      packed = TileArray<A>(heads, tiles_, tile_rows * packed_ld);
    }
  }
  bool in_place() const { return packed.data == nullptr; }
  /// Tile g of head h: its first row.
  const A* operator()(int64_t h, int64_t g) const { return in_place() ? first[h * tiles + g] : packed(h, g); }
  /// Tile g of head h from its `rows` source rows src_row(r) (cols elements each): their address in place, else a
  /// zero-padded copy.
  template <typename S, typename RowPtr>
  void fill(int64_t h, int64_t g, int64_t rows, int64_t cols, const RowPtr& src_row) {
    if (in_place()) {
      first[h * tiles + g] = reinterpret_cast<const A*>(src_row(0));
    } else {
      copy_tile<A, S>(packed(h, g), packed.tile_size, ld, rows, cols, src_row, /*transpose=*/false);
    }
  }
};

/// A work item: one tile (of queries in the forward, of keys in the backward) of one head of one sequence.
struct Item {
  int64_t n, head, tile;
};

/// The items over `heads` heads and the query tiles (or, with key_tiles, the key tiles) of every sequence,
/// for for_each_worker_homed / _strided. Head-major, so that workers running consecutive items share that
/// head's packed operands in cache; within a head the tiles in decreasing cost(vis, first_row, end_row)
/// order (the number of tiles of the other side they see), so the cheap ones come last and the workers
/// finish together.
template <typename Cost>
std::vector<Item> make_items(const Problem& p, int64_t heads, bool key_tiles, const Cost& cost) {
  const int64_t tile = key_tiles ? kKeyTile : kQueryTile;
  std::vector<Item> items;
  for (size_t n = 0; n < p.sequences.size(); ++n) {
    const Sequence& s = p.sequences[n];
    const Visibility vis = p.visibility(s);
    const int64_t length = key_tiles ? s.len_k : s.len_q;
    std::vector<int64_t> costs(p.tiles(length, tile));
    for (int64_t t = 0; t < static_cast<int64_t>(costs.size()); ++t)
      costs[t] = cost(vis, t * tile, std::min(length, (t + 1) * tile));
    const std::vector<int64_t> order = by_decreasing_cost(costs);
    for (int64_t h = 0; h < heads; ++h)
      for (const int64_t t : order) items.push_back({static_cast<int64_t>(n), h, t});
  }
  return items;
}

// ================================================================================================
// Packed keys (both directions).
// ================================================================================================
/// K^T (D x kKeyTile), K rows (kKeyTile x D; backward only) and V rows (kKeyTile x Dv_pad) of every kv head and
/// key tile, zero-padded, in the accumulation dtype; the rows read in place where they need neither conversion nor
/// padding (RowTiles).
template <typename A>
struct KeyTiles {
  int64_t dim_v_pad;
  TileArray<A> kt;
  RowTiles<A> k, v;
};

/// How for_each_key_tile deals the packing of the (kv head, key tile) pairs, numbered h * k_tiles + g, to the
/// workers: one contiguous run each (the forward homes its items by it).
Runs packing_runs(const Problem& p) {
  const int64_t count = p.kv_heads * p.k_tiles;
  return Runs{count, worker_count(count)};
}

/// Calls fill(h, g, width, k_row, v_row) for kv head h and key tile t of sequence s (g = s.k_tile_base + t, its
/// global index): the tile's `width` keys and k_row(r) / v_row(r), the source rows of its r-th key.
template <typename S, typename Fill>
void key_tile(const Sequence& s, int64_t h, int64_t t, const Rows<const S>& k_src, const Rows<const S>& v_src,
              const Fill& fill) {
  const int64_t j0 = t * kKeyTile, width = std::min(kKeyTile, s.len_k - j0);
  const auto k_row = [&](int64_t r) { return k_src(s.batch, h, s.k_begin + j0 + r); };
  const auto v_row = [&](int64_t r) { return v_src(s.batch, h, s.k_begin + j0 + r); };
  fill(h, s.k_tile_base + t, width, k_row, v_row);
}

/// key_tile's fill for every (kv head h, key tile g), in parallel (worker w packs run w of packing_runs). What
/// pack_keys and pack_keys_bf16 share.
template <typename S, typename Fill>
void for_each_key_tile(const Problem& p, const at::Tensor& k, const at::Tensor& v, const Fill& fill) {
  const auto owners = tile_owners(p, /*keys=*/true);
  const Rows<const S> k_src(k), v_src(v);
  const Runs runs = packing_runs(p);
  at::parallel_for(0, runs.parts, 1, [&](int64_t first_worker, int64_t end_worker) {
    for (int64_t item = runs.begin(first_worker); item < runs.begin(end_worker); ++item) {
      const int64_t h = item / p.k_tiles, g = item % p.k_tiles;
      key_tile(p.sequences[owners[g].first], h, owners[g].second, k_src, v_src, fill);
    }
  });
}

/// Which key operands a pass reads, hence what KeyTiles holds:
///   kForward: K^T tiles (the B of S = (scale Q) K^T) and V as the B of P V;
///   kForwardKeyMajor: K rows (the A of S^T = K (scale Q)^T, forward_key_major) and V as the B of P V;
///   kBackward: K^T tiles (the A of dQ^T += K^T dS^T), K rows, and V rows as the A of dP^T = V dO^T.
enum class KeyUse { kForward, kForwardKeyMajor, kBackward };

/// KeyTiles for k and v, allocated and not filled (fill_key_tile fills them), holding what `use` reads.
template <typename S, typename A = Acc<S>>
KeyTiles<A> key_tiles(const Problem& p, const at::Tensor& k, const at::Tensor& v, KeyUse use) {
  const int64_t dim_v_pad = pad_lanes<A>(p.dim_v);
  // V in place for the forward's P V product (its B: Dv must need no padding) and the backward's dP^T = V dO^T (its
  // A), K for S^T = K Q^T: only a conversion needs a copy. Packing K^T and V took 3.8% of the samples of an fp32
  // L1024 d128 forward; V was half of it.
  const bool same_dtype = std::is_same_v<S, A>;
  const bool k_in_place = same_dtype && k.stride(3) == 1;
  const bool v_in_place = same_dtype && v.stride(3) == 1 && (use == KeyUse::kBackward || dim_v_pad == p.dim_v);
  KeyTiles<A> t{dim_v_pad, TileArray<A>(), RowTiles<A>(),
                RowTiles<A>(p.kv_heads, p.k_tiles, kKeyTile, dim_v_pad, v_in_place, v.stride(2))};
  if (use != KeyUse::kForwardKeyMajor) t.kt = TileArray<A>(p.kv_heads, p.k_tiles, p.dim * kKeyTile);
  if (use != KeyUse::kForward) t.k = RowTiles<A>(p.kv_heads, p.k_tiles, kKeyTile, p.dim, k_in_place, k.stride(2));
  return t;
}

/// key_tile's fill of KeyTiles: key tile g of kv head h, `width` keys.
template <typename S, typename A, typename KRow, typename VRow>
void fill_key_tile(const Problem& p, KeyTiles<A>& t, int64_t h, int64_t g, int64_t width, const KRow& k_row,
                   const VRow& v_row) {
  if (t.kt.tiles > 0) copy_tile<A, S>(t.kt(h, g), t.kt.tile_size, kKeyTile, width, p.dim, k_row, /*transpose=*/true);
  t.v.template fill<S>(h, g, width, p.dim_v, v_row);
  if (t.k.tiles > 0) t.k.template fill<S>(h, g, width, p.dim, k_row);
}

template <typename S, typename A = Acc<S>>
KeyTiles<A> pack_keys(const Problem& p, const at::Tensor& k, const at::Tensor& v, KeyUse use) {
  KeyTiles<A> t = key_tiles<S>(p, k, v, use);
  for_each_key_tile<S>(p, k, v, [&](int64_t h, int64_t g, int64_t width, const auto& k_row, const auto& v_row) {
    fill_key_tile<S>(p, t, h, g, width, k_row, v_row);
  });
  return t;
}

/// bf16 storage on the bf16 units (tile_gemm_bf16.h): the forward's K^T and V tiles of every kv head and key
/// tile in bf16, VNNI layout, zero-padded: K^T (D rounded up to 32 deep, kKeyTile columns), V (kKeyTile deep,
/// Dv_pad columns). Half the bytes of the fp32 tiles, and no conversion: the values are copied, not rounded.
struct KeyTilesBf16 {
  bf16::Path path;
  int64_t dim_pad;  // D rounded up to bf16::kDepthGranule
  TileArray<bf16::bf16_t> kt, v;
};

#if SEQKERN_BF16_X86
/// The first n (<= 32, may be <= 0) bf16 of src, zeros after: one 64-byte vector (a masked load reads nothing
/// past n; a null src gives zeros).
SEQKERN_TARGET_BF16 inline __m512i load_bf16_zero_padded(const bf16::bf16_t* src, int64_t n) {
  if (src == nullptr || n <= 0) return _mm512_setzero_si512();
  const __mmask32 mask = n >= 32 ? ~__mmask32(0) : (__mmask32(1) << n) - 1;
  return _mm512_maskz_loadu_epi16(mask, src);
}

/// K^T tile in the VNNI layout: dst[p * 2 * cols + 2 n + e] = K[n][2p + e] for the keys n < keys (row src_row(n),
/// dim elements), zeros for n >= keys and 2p + e >= dim; cols (keys per tile) a multiple of 16, pair_rows of 16.
/// A key's pair (2p, 2p + 1) is one 32-bit element, so each 16-key x 16-pair block is a 16 x 16 transpose of
/// 32-bit elements in registers (simd.h). Writes every element of the tile (no fill first).
/// Element by element (32-bit moves with a stride of 2 cols) after a fill of the tile, packing K and V took
/// 0.36 ms of a 5.8 ms bf16 forward at L 1024, d64, 8 heads (one thread).
template <typename RowPtr>
SEQKERN_TARGET_BF16 void pack_kt_vnni(bf16::bf16_t* dst, int64_t cols, int64_t pair_rows, int64_t keys, int64_t dim,
                                      const RowPtr& src_row) {
  for (int64_t n0 = 0; n0 < cols; n0 += 16) {
    const bf16::bf16_t* rows[16];
    for (int j = 0; j < 16; ++j) rows[j] = n0 + j < keys ? src_row(n0 + j) : nullptr;
    for (int64_t p0 = 0; p0 < pair_rows; p0 += 16) {
      __m512 r[16];
      for (int j = 0; j < 16; ++j) {
        const bf16::bf16_t* src = rows[j] ? rows[j] + 2 * p0 : nullptr;
        r[j] = _mm512_castsi512_ps(load_bf16_zero_padded(src, dim - 2 * p0));
      }
      transpose_16x16(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_ps(reinterpret_cast<float*>(dst + (p0 + i) * 2 * cols + 2 * n0), r[i]);
    }
  }
}

/// V tile in the VNNI layout: dst[p * 2 * cols + 2 c + e] = V[2p + e][c] for the keys 2p + e < keys (row
/// src_row(key), dim elements), zeros past them and for c >= dim; cols (padded Dv) a multiple of 16, pair_rows
/// any. Each 16 columns of a key pair interleave in one permute.
template <typename RowPtr>
SEQKERN_TARGET_BF16 void pack_v_vnni(bf16::bf16_t* dst, int64_t cols, int64_t pair_rows, int64_t keys, int64_t dim,
                                     const RowPtr& src_row) {
  alignas(64) static constexpr uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                           8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i interleave = _mm512_load_si512(kInterleave);
  for (int64_t p = 0; p < pair_rows; ++p) {
    const bf16::bf16_t* even = 2 * p < keys ? src_row(2 * p) : nullptr;
    const bf16::bf16_t* odd = 2 * p + 1 < keys ? src_row(2 * p + 1) : nullptr;
    bf16::bf16_t* out = dst + p * 2 * cols;
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      const int64_t n = std::min<int64_t>(16, dim - c0);
      const __m512i e = load_bf16_zero_padded(even ? even + c0 : nullptr, n);
      const __m512i o = load_bf16_zero_padded(odd ? odd + c0 : nullptr, n);
      const __m512i both = _mm512_inserti64x4(e, _mm512_castsi512_si256(o), 1);  // e's first 16, then o's
      _mm512_storeu_si512(out + 2 * c0, _mm512_permutexvar_epi16(interleave, both));
    }
  }
}
#endif

/// KeyTilesBf16 allocated, not filled (fill_key_tile_bf16 fills it).
KeyTilesBf16 key_tiles_bf16(const Problem& p, bf16::Path path, int64_t dim_v_pad) {
  const int64_t dim_pad = bf16::round_up(std::max<int64_t>(p.dim, 1), bf16::kDepthGranule);
  return KeyTilesBf16{path, dim_pad, TileArray<bf16::bf16_t>(p.kv_heads, p.k_tiles, dim_pad * kKeyTile),
                      TileArray<bf16::bf16_t>(p.kv_heads, p.k_tiles, kKeyTile * dim_v_pad)};
}

/// key_tile's fill of KeyTilesBf16: K^T and V of key tile g of kv head h, `width` keys.
template <typename KRow, typename VRow>
void fill_key_tile_bf16(const Problem& p, KeyTilesBf16& t, int64_t h, int64_t g, int64_t width, const KRow& k_row,
                        const VRow& v_row) {
#if SEQKERN_BF16_X86  // elsewhere the path is always kFp32: never called
  pack_kt_vnni(t.kt(h, g), kKeyTile, t.dim_pad / 2, width, p.dim, k_row);
  pack_v_vnni(t.v(h, g), t.v.tile_size / kKeyTile, kKeyTile / 2, width, p.dim_v, v_row);
#endif
}

KeyTilesBf16 pack_keys_bf16(const Problem& p, const at::Tensor& k, const at::Tensor& v, bf16::Path path,
                            int64_t dim_v_pad) {
  KeyTilesBf16 t = key_tiles_bf16(p, path, dim_v_pad);
  for_each_key_tile<bf16::bf16_t>(
      p, k, v, [&](int64_t h, int64_t g, int64_t width, const auto& k_row, const auto& v_row) {
        fill_key_tile_bf16(p, t, h, g, width, k_row, v_row);
      });
  return t;
}

// ================================================================================================
// Forward.
// ================================================================================================
/// One worker's tiles: the query tile, the score/probability tile, the output accumulator and the
/// per-row softmax state; on the bf16 path the query tile (q16, rows x D padded to 32, zeros past D) and
/// the probabilities rounded to bf16 (p16) instead of q.
template <typename A>
struct ForwardScratch {
  ScratchVector<A> q, scores, out, row_max, row_sum, alpha;  // each written before it is read
  AlignedVector<bf16::bf16_t> q16, p16;
  ForwardScratch(int64_t dim, int64_t dim_v_pad, const KeyTilesBf16* keys16)
      : q(keys16 ? 0 : kQueryTile * dim), scores(kQueryTile * kKeyTile), out(kQueryTile * dim_v_pad),
        row_max(kQueryTile), row_sum(kQueryTile), alpha(keys16 ? 0 : kQueryTile),
        q16(keys16 ? kQueryTile * keys16->dim_pad : 0, bf16::bf16_t(0.0f)),
        p16(keys16 ? kQueryTile * kKeyTile : 0, bf16::bf16_t(0.0f)) {}
};

/// Rows a bf16 product on `path` computes for `rows` rows: AMX works on 16-row tiles, so it rounds up (into the
/// scratch tiles' spare rows: the products start at row 0 or a multiple of kRowGroup, and the tiles have a multiple
/// of 16 rows).
int64_t bf16_rows(bf16::Path path, int64_t rows) {
  return path == bf16::Path::kAmx ? bf16::round_up(rows, bf16::kRowGranule) : rows;
}

/// scores[r0:r1, 0:padded) = Q K^T on the bf16 units (fp32 accumulation). Unscaled: prepare_score_row applies
/// the scale in fp32 (folded into bf16 Q it would add a rounding).
void scores_bf16(const KeyTilesBf16& keys, ForwardScratch<float>& w, int64_t kv_head, int64_t g, int64_t r0,
                 int64_t r1, int64_t padded) {
  bf16::gemm(keys.path, bf16_rows(keys.path, r1 - r0), padded, keys.dim_pad, w.q16.data() + r0 * keys.dim_pad,
             keys.dim_pad, keys.kt(kv_head, g), 2 * kKeyTile, w.scores.data() + r0 * kKeyTile, kKeyTile,
             /*accumulate=*/false);
}

/// out[r0:r1] += P V on the bf16 units, P = p16[r0:r1, 0:depth) (softmax_row_bf16's).
void accumulate_pv_bf16(const KeyTilesBf16& keys, ForwardScratch<float>& w, int64_t kv_head, int64_t g, int64_t r0,
                        int64_t r1, int64_t depth, int64_t dim_v_pad) {
  bf16::gemm(keys.path, bf16_rows(keys.path, r1 - r0), dim_v_pad, depth, w.p16.data() + r0 * kKeyTile, kKeyTile,
             keys.v(kv_head, g), 2 * dim_v_pad, w.out.data() + r0 * dim_v_pad, dim_v_pad, /*accumulate=*/true);
}

template <typename S>
struct ForwardArgs {
  using A = Acc<S>;
  const Problem& p;
  const KeyTiles<A>& keys;
  Rows<const S> q;
  std::optional<Rows<const S>> mask;
  S* out;                                // (B, Hq, Lq, Dv) contiguous
  double* lse;                           // (B, Hq, Lq) contiguous
  const KeyTilesBf16* keys16 = nullptr;  // set: the tile products run on the bf16 units (keys.kt/v are empty)
  bool key_major = false;                // forward_key_major (keys.k and keys.v filled, keys.kt empty)
};

/// Scores of row i of the tile, s = scale S + mask (scale = 1 where S was already scaled through Q), -inf
/// outside the visible keys [first, last] (local indices) and on the padding past `width`; returns the row's
/// maximum. A row that needs neither scale, mask nor hiding is only read. (The bf16 path scales here: folded
/// into the max pass, the scale costs no pass of its own over the score tile.)
template <typename A, typename S>
A prepare_score_row(A* s, int64_t width, int64_t first, int64_t last, const S* mask_row, A scale) {
  using V = Simd<A>;
  constexpr int L = kLanes<A>;
  const int64_t padded = pad_lanes<A>(width);
  const bool partial = first > 0 || last < padded - 1;
  const V minus_inf = broadcast(-std::numeric_limits<A>::infinity());
  V row_max = minus_inf;
  if (!partial && !mask_row && scale == A(1)) {
    for (int64_t c = 0; c < padded; c += L) {
      const V x = load_vector(s + c);
      row_max = x > row_max ? x : row_max;
    }
    return reduce_max(row_max);
  }
  for (int64_t c = 0; c < padded; c += L) {
    V x = load_vector(s + c);
    if (scale != A(1)) x *= scale;
    if (mask_row) x += load<A>(mask_row + c, static_cast<int>(std::min<int64_t>(L, width - c)));
    if (partial) x = lanes_in_range<A>(c, first, last) ? x : minus_inf;
    store_vector(s + c, x);
    row_max = x > row_max ? x : row_max;
  }
  return reduce_max(row_max);
}

/// p[c] = 0 for the dropped probabilities of row key `row_key` (columns j0 + c).
template <typename A>
void drop_row(A* p, int64_t padded, const DropoutHash& hash, uint32_t row_key, int64_t j0) {
  using V = Simd<A>;
  for (int64_t c = 0; c < padded; c += kLanes<A>) {
    const V x = load_vector(p + c);
    store_vector(p + c, hash.keep_row<A>(row_key, j0 + c) ? x : V{});
  }
}

/// o[0:dim_v_pad) *= alpha (a row's output accumulator, when its running maximum moved).
template <typename A>
void rescale_row(A* o, int64_t dim_v_pad, A alpha) {
  for (int64_t c = 0; c < dim_v_pad; c += kLanes<A>) store_vector(o + c, load_vector(o + c) * alpha);
}

#if SEQKERN_BF16_X86
/// 2^x for x <= kMaxRiseKept / ln 2 (or NaN, kept) with 5.3e-6 relative error at most, exactly 0 for x < -125 (-inf
/// too; zeroed after, never left to vscalefps to underflow: see simd.h's exp_simd): for P that is rounded to bf16 next (2^-9 relative), and its fp32 row sum, whose 5e-6 vanishes in the bf16
/// output's rounding (and the bf16 backward renormalizes the lse with its own sum). In base 2 the caller's one FMA
/// gives the argument (scale log2(e) s - log2(e) m'), and the reduction x = n + f is a subtraction: 9 instructions
/// per vector against attention.h's exp_attention's 17 and the 12 of the natural-base form this replaced, in the
/// pass that dominates the bf16 forward. f in [-1/2, 1/2], 2^f by a degree-4 polynomial fitted for relative
/// error (Chebyshev-weighted least squares, reweighted). Lanes far above the bound (hidden keys, which the caller
/// zeroes) may come out inf.
SEQKERN_TARGET_BF16 inline __m512 exp2_bf16(__m512 x) {
  const __mmask16 kept = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-125.0f), _CMP_NLT_UQ);  // x >= -125, or NaN
  x = _mm512_max_ps(_mm512_set1_ps(-125.0f), x);  // vmaxps returns its second operand, x, when x is NaN
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.00962711963802576f), f, _mm512_set1_ps(0.05598687008023262f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2402331829071045f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.693108856678009f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(kept, _mm512_scalef_ps(p, n));  // times 2^n, a normal result
}

/// The bf16 path's step of the online softmax for rows [r0, r1) of the worker's score tile, fused into two
/// passes over each row's fp32 scores (the generic path makes four: scale and max, exp and sum, dropout,
/// rounding to bf16):
///   1. tile_max = scale * max of the raw scores s = q . k over the visible keys [first, last] (read only), the
///      row's m' = max(m, tile_max) or m where tile_max <= m + kMaxRiseKept (attention.h); then every row's
///      alpha = exp(m - m') at once, in vectors (one libm exp per row cost ~10% of the pass);
///   2. p = exp(scale s - m') = 2^(scale log2(e) s - log2(e) m') (one FMA, then exp2_bf16), 0 outside [first, last]
///      and on the padding past width,
///      summed into l in fp32, dropped entries set to 0, stored rounded to bf16 into p16 (zeros from
///      pad_lanes(width) up to `depth`, P V's depth), and the row's output accumulator rescaled by alpha.
/// Needs scale > 0 (so max(scale s) = scale max(s)) and no mask. A row that has seen only hidden or NaN scores
/// so far (m' = -inf) is left untouched and reported in `cold` (true) for the caller's generic steps.
/// Rounding: exp's argument is (scale log2 e) s - (log2 e) m' with one rounding (the generic path rounds scale * s
/// first); the rounding of (log2 e) m' shifts a whole row's p by one factor, which its normalization cancels.
/// keys(i) gives the visible key range [first, last] of row i (tile-local columns, last < width).
template <typename KeysOf>
SEQKERN_TARGET_BF16 void softmax_rows_bf16(ForwardScratch<float>& w, int64_t r0, int64_t r1, int64_t width,
                                           int64_t depth, int64_t dim_v_pad, float scale, const KeysOf& keys,
                                           const DropoutHash* hash, uint32_t head_key, int64_t i0, int64_t j0,
                                           bool* cold) {
  using V = Simd<float>;
  constexpr int L = kLanes<float>;
  constexpr float kMinusInf = -std::numeric_limits<float>::infinity();
  const int64_t padded = pad_lanes<float>(width);
  const V minus_inf = broadcast(kMinusInf);
  alignas(64) float new_max[kQueryTile], alpha[kQueryTile];
  for (int64_t r = r0; r < r1; ++r) {
    const auto [first, last] = keys(i0 + r);
    const bool partial = first > 0 || last < padded - 1;
    const float* s = w.scores.data() + r * kKeyTile;
    V vmax = minus_inf;
    for (int64_t c = 0; c < padded; c += L) {
      V x = load_vector(s + c);
      if (partial) x = lanes_in_range<float>(c, first, last) ? x : minus_inf;
      vmax = x > vmax ? x : vmax;  // skips NaN, as reduce_max
    }
    // A kept maximum gives alpha = exp(0) = 1 below: the output is not rescaled.
    new_max[r] = next_row_max(w.row_max[r], reduce_max(vmax) * scale);
    cold[r] = new_max[r] == kMinusInf;
  }
  for (int64_t r = r0; r < r1; r += L) {  // exp(-inf) = 0 on the first visible tile; cold rows: unused
    const int n = static_cast<int>(std::min<int64_t>(L, r1 - r));
    store(alpha + r, exp_attention(load<float>(w.row_max.data() + r, n) - load<float>(new_max + r, n)), n);
  }
  constexpr float kLog2e = 1.44269504088896341f;
  const V factor = broadcast(scale * kLog2e);
  for (int64_t r = r0; r < r1; ++r) {
    if (cold[r]) continue;
    const auto [first, last] = keys(i0 + r);
    const bool partial = first > 0 || last < padded - 1;
    const float* s = w.scores.data() + r * kKeyTile;
    bf16::bf16_t* p16 = w.p16.data() + r * kKeyTile;
    const uint32_t row_key = hash ? DropoutHash::row_key(head_key, i0 + r) : 0;
    const V shift = broadcast(-new_max[r] * kLog2e);
    V sum{};
    const auto probabilities = [&](int64_t c) {  // p at columns [c, c + L), summed, then dropped
      const V x = fmadd(load_vector(s + c), factor, shift);  // log2(e) (scale s - m')
      V p = reinterpret_cast<V>(exp2_bf16(reinterpret_cast<__m512>(x)));
      if (partial) p = lanes_in_range<float>(c, first, last) ? p : V{};
      sum += p;
      if (hash) p = hash->keep_row<float>(row_key, j0 + c) ? p : V{};
      return reinterpret_cast<__m512>(p);
    };
    // Two vectors rounded by one VCVTNE2PS2BF16 and stored as one 64-byte line.
    int64_t c = 0;
    for (; c + 2 * L <= padded; c += 2 * L) {
      const __m512 low = probabilities(c), high = probabilities(c + L);
      const __m512bh rounded = _mm512_cvtne2ps_pbh(high, low);
      std::memcpy(p16 + c, &rounded, sizeof(rounded));
    }
    if (c < padded) {
      const __m256bh rounded = _mm512_cvtneps_pbh(probabilities(c));
      std::memcpy(p16 + c, &rounded, sizeof(rounded));
    }
    std::memset(p16 + padded, 0, (depth - padded) * sizeof(bf16::bf16_t));
    w.row_max[r] = new_max[r];
    w.row_sum[r] = w.row_sum[r] * alpha[r] + reduce_sum(sum);
    if (alpha[r] != 1.0f) rescale_row(w.out.data() + r * dim_v_pad, dim_v_pad, alpha[r]);
  }
}

/// Rows [r0, r1) of the query tile (rows i0..) against columns [0, width) of key tile kt on the bf16 units:
/// S = Q K^T, the online softmax of each row writing bf16 P (softmax_rows_bf16; with a mask, a scale <= 0 or
/// on the cold path the generic steps, then P rounded to bf16), O = alpha O + P V.
void forward_rows_bf16(const ForwardArgs<c10::BFloat16>& args, ForwardScratch<float>& w, const Sequence& s,
                       int64_t n, int64_t h, int64_t i0, int64_t r0, int64_t r1, int64_t kt, int64_t width) {
  const Problem& p = args.p;
  const KeyTilesBf16& keys = *args.keys16;
  const Visibility vis = p.visibility(s);
  const int64_t j0 = kt * kKeyTile, g = s.k_tile_base + kt, kv_head = h / p.group;
  const int64_t padded = pad_lanes<float>(width), dim_v_pad = args.keys.dim_v_pad;
  const int64_t depth = bf16::round_up(padded, bf16::kDepthGranule);
  const float scale = static_cast<float>(p.scale);
  scores_bf16(keys, w, kv_head, g, r0, r1, padded);
  const uint32_t head_key = p.hash.head_key(n * p.heads + h);
  const auto keys_of = [&](int64_t i) {
    return std::pair<int64_t, int64_t>(vis.first_key(i) - j0, std::min(vis.last_key(i) - j0, width - 1));
  };
  bool generic[kQueryTile];
  const bool fused = !args.mask && scale > 0;
  if (fused) {
    softmax_rows_bf16(w, r0, r1, width, depth, dim_v_pad, scale, keys_of, p.dropout ? &p.hash : nullptr, head_key,
                      i0, j0, generic);
  } else {
    std::fill(generic + r0, generic + r1, true);
  }
  for (int64_t r = r0; r < r1; ++r) {
    if (!generic[r]) continue;
    const int64_t i = i0 + r;
    float* row = w.scores.data() + r * kKeyTile;
    const c10::BFloat16* mask_row = args.mask ? (*args.mask)(s.batch, h, s.q_begin + i) + s.k_begin + j0 : nullptr;
    const auto [first, last] = keys_of(i);
    const float tile_max = prepare_score_row<float, c10::BFloat16>(row, width, first, last, mask_row, scale);
    const float alpha = online_softmax_update(row, padded, tile_max, w.row_max[r], w.row_sum[r]);
    if (p.dropout) drop_row(row, padded, p.hash, DropoutHash::row_key(head_key, i), j0);
    bf16::round_to_bf16(row, padded, w.p16.data() + r * kKeyTile, depth);
    if (alpha != 1.0f) rescale_row(w.out.data() + r * dim_v_pad, dim_v_pad, alpha);
  }
  accumulate_pv_bf16(keys, w, kv_head, g, r0, r1, depth, dim_v_pad);
}
#endif

/// Rows [r0, r1) of query tile rows i0.. against columns [0, width) of key tile kt: S = (scale Q) K^T, the
/// online softmax of each row, O = alpha O + (P * keep) V.
template <typename S>
void forward_rows(const ForwardArgs<S>& args, ForwardScratch<Acc<S>>& w, const Sequence& s, int64_t n, int64_t h,
                  int64_t i0, int64_t r0, int64_t r1, int64_t kt, int64_t width) {
  using A = Acc<S>;
  const Problem& p = args.p;
  const Visibility vis = p.visibility(s);
  const int64_t j0 = kt * kKeyTile, g = s.k_tile_base + kt, kv_head = h / p.group;
  const int64_t padded = pad_lanes<A>(width), dim_v_pad = args.keys.dim_v_pad;
#if SEQKERN_BF16_X86
  if constexpr (std::is_same_v<S, c10::BFloat16>) {
    if (args.keys16) return forward_rows_bf16(args, w, s, n, h, i0, r0, r1, kt, width);
  }
#endif
  A* scores = w.scores.data() + r0 * kKeyTile;
  tile_gemm<A, false>(r1 - r0, padded, p.dim, w.q.data() + r0 * p.dim, p.dim, args.keys.kt(kv_head, g), kKeyTile,
                      scores, kKeyTile);
  const uint32_t head_key = p.hash.head_key(n * p.heads + h);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t i = i0 + r;
    A* row = w.scores.data() + r * kKeyTile;
    const S* mask_row = args.mask ? (*args.mask)(s.batch, h, s.q_begin + i) + s.k_begin + j0 : nullptr;
    // scale 1: the scores come out of the product scaled (Q was)
    const A tile_max = prepare_score_row<A, S>(row, width, vis.first_key(i) - j0,
                                               std::min(vis.last_key(i) - j0, width - 1), mask_row, A(1));
    const A alpha = online_softmax_update(row, padded, tile_max, w.row_max[r], w.row_sum[r]);
    if (p.dropout) drop_row(row, padded, p.hash, DropoutHash::row_key(head_key, i), j0);
    if (alpha != A(1)) rescale_row(w.out.data() + r * dim_v_pad, dim_v_pad, alpha);
  }
  tile_gemm<A, true>(r1 - r0, dim_v_pad, width, scores, kKeyTile, args.keys.v(kv_head, g), args.keys.v.ld,
                     w.out.data() + r0 * dim_v_pad, dim_v_pad);
}

/// Rows [0, rows) of query tile i0.. of head h in sequence s (q_row(r): the source row of row r) through the visible
/// key tiles, streamed through the online softmax: w.out = the unnormalized O, w.row_max, w.row_sum.
template <typename S, typename QRow>
void stream_key_tiles(const ForwardArgs<S>& args, ForwardScratch<Acc<S>>& w, int64_t n, int64_t h, int64_t i0,
                      int64_t rows, const QRow& q_row) {
  using A = Acc<S>;
  const Problem& p = args.p;
  const Sequence& s = p.sequences[n];
  const Visibility vis = p.visibility(s);
  const int64_t dim_v_pad = args.keys.dim_v_pad;
  if constexpr (std::is_same_v<S, c10::BFloat16>) {
    if (args.keys16) {  // bf16 Q rows as they are (scaled in the score GEMM); the padding columns stay 0
      const int64_t dim_pad = args.keys16->dim_pad;
      for (int64_t r = 0; r < rows; ++r) std::copy(q_row(r), q_row(r) + p.dim, w.q16.data() + r * dim_pad);
    }
  }
  // Q times scale: the scores come out of the GEMM scaled (one rounding of q instead of a multiply per score).
  if (!args.keys16) copy_tile<A, S>(w.q.data(), rows * p.dim, p.dim, rows, p.dim, q_row, false, A(p.scale));
  // The rows the products may touch (the AMX products go by 16-row tiles), not the whole 128-row tile: a
  // sequence of 17 queries zeroed 8x the output rows it has.
  const int64_t touched = padded_extent(rows, kQueryTile);
  std::fill(w.out.begin(), w.out.begin() + touched * dim_v_pad, A(0));
  std::fill(w.row_max.begin(), w.row_max.begin() + touched, -std::numeric_limits<A>::infinity());
  std::fill(w.row_sum.begin(), w.row_sum.begin() + touched, A(0));

  const bf16::TileScope amx_tiles(args.keys16 ? args.keys16->path : bf16::Path::kFp32);
  // Rows [r0, r1) against key tile kt, up to the last key their last row sees.
  const auto visit = [&](int64_t r0, int64_t r1, int64_t kt) {
    const int64_t j0 = kt * kKeyTile, width = std::min(kKeyTile, s.len_k - j0);
    const int64_t columns = std::min(width, vis.last_key(i0 + r1 - 1) - j0 + 1);
    if (columns > 0) forward_rows<S>(args, w, s, n, h, i0, r0, r1, kt, columns);  // else: no key seen here
  };
  // Calls f(kt) for every key tile holding a key that some row of [r0, r1) sees.
  const auto for_each_seen_tile = [&](int64_t r0, int64_t r1, const auto& f) {
    const int64_t first_key = vis.first_key(i0 + r0), last_key = vis.last_key(i0 + r1 - 1);
    for (int64_t kt = first_key / kKeyTile; first_key <= last_key && kt <= last_key / kKeyTile; ++kt) f(kt);
  };
  if (args.keys16) {
    // The bf16 path goes by kRowGroup rows: its products take so little time that the passes over the score tile
    // (max, then exp + sum + rounding to bf16) weigh as much, and a 32-row slice of scores (16 KB) stays in L1
    // through them where the whole 128-row tile (64 KB) does not (64 and 128 measured no better). Each group
    // walks all its key tiles before the next group starts, so its scores, P and output rows stay in L1 from tile
    // to tile while K and V stream from L2 (one-thread CPU time, L 1024, d64, 8 heads: 5.40 -> 5.22 ms).
    for (int64_t r0 = 0; r0 < rows; r0 += kRowGroup) {
      const int64_t r1 = std::min(rows, r0 + kRowGroup);
      for_each_seen_tile(r0, r1, [&](int64_t kt) { visit(r0, r1, kt); });
    }
  } else {
    for_each_seen_tile(0, rows, [&](int64_t kt) {
      // A tile whose right end the first rows do not see (the diagonal tile of causal attention) goes by
      // groups of kRowGroup rows, each computing only the columns up to the last key its last row sees:
      // 3/8 of the diagonal tile's products, 8% of the causal forward's GEMM work at L = 1024 (counted; the
      // timing difference was inside this shared machine's noise).
      const int64_t j0 = kt * kKeyTile, width = std::min(kKeyTile, s.len_k - j0);
      const bool ragged = vis.last_key(i0) - j0 + 1 < width;
      const int64_t group = ragged ? kRowGroup : rows;
      for (int64_t r0 = 0; r0 < rows; r0 += group) visit(r0, std::min(rows, r0 + group), kt);
    });
  }
}

/// Rows [r0, r1) of query tile i0.. of head h in sequence s against keys [key0, key0 + keys) of key tile kt, one step
/// of the online softmax done key-major: S^T = K (scale Q)^T (w.q holds (scale Q)^T), so that a query's scores run
/// down a column of the tile and one vector holds 16 queries' maxima, sums and rescale factors. The row-major step
/// (forward_rows) reduces each row across its vector twice (a max, a sum: shuffle chains) and updates its sums one
/// row at a time. Then O = alpha O + P V, P^T read transposed; with `first` (no earlier step of these rows) O = P V.
/// With dropout, P V takes the kept probabilities (the sums all of them, as online_softmax_update then drop_row);
/// head_key is the head's DropoutHash key.
template <typename S>
void key_major_step(const ForwardArgs<S>& args, ForwardScratch<Acc<S>>& w, const Sequence& s, int64_t h, int64_t i0,
                    int64_t r0, int64_t r1, int64_t kt, int64_t key0, int64_t keys, bool first, uint32_t head_key) {
  using A = Acc<S>;
  using V = Simd<A>;
  constexpr int L = kLanes<A>;
  const Problem& p = args.p;
  const Visibility vis = p.visibility(s);
  const int64_t kv_head = h / p.group, g = s.k_tile_base + kt, local0 = key0 - kt * kKeyTile;
  const int64_t dim_v_pad = args.keys.dim_v_pad, lanes_end = r0 + pad_lanes<A>(r1 - r0);
  A* const scores = w.scores.data() + r0;  // S^T[j - key0][r - r0] at scores[(j - key0) * kQueryTile + r - r0]
  tile_gemm<A, false>(keys, lanes_end - r0, p.dim, args.keys.k(kv_head, g) + local0 * args.keys.k.ld,
                      args.keys.k.ld, w.q.data() + r0, kQueryTile, scores, kQueryTile);
  const V minus_inf = broadcast(-std::numeric_limits<A>::infinity()), one = broadcast(A(1));
  // A mask is one row for all queries (forward() routes other masks to stream_key_tiles): its value at key j.
  const S* mask_row = args.mask ? (*args.mask)(s.batch, h, s.q_begin) + s.k_begin + key0 : nullptr;
  for (int64_t c = 0; c < lanes_end - r0; c += L) {
    const int64_t first_query = i0 + r0 + c;
    V tile_max = minus_inf;
    for (int64_t j = 0; j < keys; ++j) {  // add the mask, hide the keys a lane's query does not see; the maxima
      A* x_at = scores + j * kQueryTile + c;
      V x = load_vector(x_at);
      if (mask_row) x += static_cast<A>(mask_row[j]);
      const int64_t seen_from = vis.first_query(key0 + j), seen_to = vis.last_query(key0 + j);
      if (seen_from > first_query || seen_to < first_query + L - 1) {
        x = lanes_in_range<A>(first_query, seen_from, seen_to) ? x : minus_inf;
        store_vector(x_at, x);
      } else if (mask_row) {
        store_vector(x_at, x);
      }
      tile_max = x > tile_max ? x : tile_max;  // a NaN score is passed over here and reaches the sum below
    }
    // online_softmax_update, lane by lane.
    const V row_max = load_vector(w.row_max.data() + r0 + c);
    const V new_max = next_row_max<V, A>(row_max, tile_max);
    // A query that has seen no key keeps max -inf and gets p = exp(-inf - 0) = 0, never exp(-inf - -inf) = NaN; its
    // O and sum are 0, so its factor is 1 (no pass over its row).
    const V shift = new_max == minus_inf ? V{} : new_max;
    const V alpha = (new_max == row_max) | (row_max == minus_inf) ? one : exp_attention(row_max - new_max);
    using Keys = typename HashLanes<A>::type;
    const Keys row_keys = p.dropout ? DropoutHash::row_keys<A>(head_key, first_query) : Keys{};
    V tile_sum{};
    for (int64_t j = 0; j < keys; ++j) {
      A* x_at = scores + j * kQueryTile + c;
      const V e = exp_attention(load_vector(x_at) - shift);
      tile_sum += e;
      store_vector(x_at, p.dropout && !p.hash.keep<A>(row_keys, static_cast<uint32_t>(key0 + j)) ? V{} : e);
    }
    store_vector(w.row_max.data() + r0 + c, new_max);
    store_vector(w.row_sum.data() + r0 + c, load_vector(w.row_sum.data() + r0 + c) * alpha + tile_sum);
    store_vector(w.alpha.data() + r0 + c, alpha);
  }
  const A* v_rows = args.keys.v(kv_head, g) + local0 * args.keys.v.ld;
  A* out = w.out.data() + r0 * dim_v_pad;
  if (first) {
    tile_gemm<A, false, /*kTransposedA=*/true>(r1 - r0, dim_v_pad, keys, scores, kQueryTile, v_rows, args.keys.v.ld,
                                                out, dim_v_pad);
    return;
  }
  for (int64_t r = r0; r < r1; ++r)
    if (w.alpha[r] != A(1)) rescale_row(w.out.data() + r * dim_v_pad, dim_v_pad, w.alpha[r]);
  tile_gemm<A, true, /*kTransposedA=*/true>(r1 - r0, dim_v_pad, keys, scores, kQueryTile, v_rows, args.keys.v.ld, out,
                                             dim_v_pad);
}

/// Rows [0, rows) of query tile i0.. of head h in sequence n through the key tiles they see, key-major
/// (key_major_step; a mask that differs from query to query goes to stream_key_tiles instead: forward()). A key tile
/// whose part the rows see differs from row to row (the diagonal tile of causal attention, windows) goes by groups of
/// kRowGroup rows, each over the keys its rows see, as stream_key_tiles does. Writes what stream_key_tiles does.
template <typename S, typename QRow>
void forward_key_major(const ForwardArgs<S>& args, ForwardScratch<Acc<S>>& w, int64_t n, int64_t h, int64_t i0,
                       int64_t rows, const QRow& q_row) {
  using A = Acc<S>;
  const Problem& p = args.p;
  const Sequence& s = p.sequences[n];
  const Visibility vis = p.visibility(s);
  const uint32_t head_key = p.dropout ? p.hash.head_key(n * p.heads + h) : 0;
  // (scale Q)^T: D x kQueryTile, its columns zero-padded to the lanes (the scores of padding queries are 0).
  copy_tile<A, S>(w.q.data(), kQueryTile * p.dim, kQueryTile, rows, p.dim, q_row, /*transpose=*/true, A(p.scale));
  const int64_t lanes_end = pad_lanes<A>(rows), dim_v_pad = args.keys.dim_v_pad;
  std::fill(w.row_max.begin(), w.row_max.begin() + lanes_end, -std::numeric_limits<A>::infinity());
  std::fill(w.row_sum.begin(), w.row_sum.begin() + lanes_end, A(0));
  // Which groups of kRowGroup rows have O rows yet: a step whose rows have none writes O (no zeroing pass first).
  bool started[kQueryTile / kRowGroup] = {};
  const auto zero_unstarted = [&](int64_t r0, int64_t r1) {  // O = 0 on the rows of [r0, r1) not started
    for (int64_t r = r0; r < r1; r += kRowGroup)
      if (!started[r / kRowGroup]) {
        std::fill(w.out.begin() + r * dim_v_pad, w.out.begin() + std::min(r1, r + kRowGroup) * dim_v_pad, A(0));
        started[r / kRowGroup] = true;
      }
  };
  const auto begin_step = [&](int64_t r0, int64_t r1) {  // whether the step over rows [r0, r1) starts them all
    bool none = true;
    for (int64_t r = r0; r < r1; r += kRowGroup) none = none && !started[r / kRowGroup];
    if (none) {
      for (int64_t r = r0; r < r1; r += kRowGroup) started[r / kRowGroup] = true;
      return true;
    }
    zero_unstarted(r0, r1);
    return false;
  };
  // The keys rows [r0, r1) see: [first_key(first row), last_key(last row)] (both bounds non-decreasing in the query),
  // cut to key tile kt.
  const auto seen_in_tile = [&](int64_t r0, int64_t r1, int64_t kt) {
    const int64_t begin = std::max(vis.first_key(i0 + r0), kt * kKeyTile);
    const int64_t end = std::min({vis.last_key(i0 + r1 - 1) + 1, kt * kKeyTile + kKeyTile, s.len_k});
    return std::pair<int64_t, int64_t>{begin, end};
  };
  const int64_t first_key = vis.first_key(i0), last_key = std::min(vis.last_key(i0 + rows - 1), s.len_k - 1);
  for (int64_t kt = first_key / kKeyTile; first_key <= last_key && kt <= last_key / kKeyTile; ++kt) {
    const auto [begin, end] = seen_in_tile(0, rows, kt);
    const bool ragged = seen_in_tile(rows - 1, rows, kt).first > begin || seen_in_tile(0, 1, kt).second < end;
    const int64_t group = ragged ? kRowGroup : rows;
    for (int64_t r0 = 0; r0 < rows; r0 += group) {
      const int64_t r1 = std::min(rows, r0 + group);
      const auto [key0, key_end] = seen_in_tile(r0, r1, kt);
      if (key_end > key0)
        key_major_step<S>(args, w, s, h, i0, r0, r1, kt, key0, key_end - key0, begin_step(r0, r1), head_key);
    }
  }
  zero_unstarted(0, rows);  // rows that see no key
}

/// Query tile `tile` of head h in sequence n: O, the row maxima and sums (forward_key_major or stream_key_tiles),
/// then out = O / l / (1 - dropout_p) and lse = m + log l.
template <typename S>
void forward_tile(const ForwardArgs<S>& args, ForwardScratch<Acc<S>>& w, int64_t n, int64_t h, int64_t tile) {
  using A = Acc<S>;
  const Problem& p = args.p;
  const Sequence& s = p.sequences[n];
  const int64_t i0 = tile * kQueryTile, rows = std::min(kQueryTile, s.len_q - i0);
  const int64_t dim_v_pad = args.keys.dim_v_pad;
  const auto q_row = [&](int64_t r) { return args.q(s.batch, h, s.q_begin + i0 + r); };
  if (args.key_major) {
    forward_key_major<S>(args, w, n, h, i0, rows, q_row);
  } else {
    stream_key_tiles<S>(args, w, n, h, i0, rows, q_row);
  }

  const A keep_scale = p.dropout ? A(1.0 / (1.0 - p.dropout_p)) : A(1);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row_index = (s.batch * p.heads + h) * p.len_q + s.q_begin + i0 + r;
    S* out = args.out + row_index * p.dim_v;
    const A sum = w.row_sum[r];  // 0: the row saw no key (NaN: NaN scores, passed on)
    const A inv = sum == 0 ? A(0) : keep_scale / sum;
    for (int64_t c = 0; c < p.dim_v; c += kLanes<A>)  // rounded once to S here
      store_rounded(out + c, load_vector(w.out.data() + r * dim_v_pad + c) * inv,
            static_cast<int>(std::min<int64_t>(kLanes<A>, p.dim_v - c)));
    args.lse[row_index] = sum == 0 ? -std::numeric_limits<double>::infinity()
                                   : static_cast<double>(w.row_max[r]) + std::log(static_cast<double>(sum));
  }
}

template <typename S>
void forward(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
             const std::optional<at::Tensor>& mask, at::Tensor& out, at::Tensor& lse) {
  using A = Acc<S>;
  // bf16 storage: the tile products on AMX / AVX512-BF16 where the CPU has them (4-5x the fp32 products'
  // rate on AMX), else widened to fp32 as the other dtypes. Also widened where no sequence has more than
  // kWidenedKeys keys: there the VNNI packing of K^T and V and the row-major softmax cost more than the products save,
  // and the fp32 key-major path (forward_key_major) on the widened operands is faster. float16 stays on the fp32
  // path: AVX512-FP16 multiplies and accumulates in fp16 (no fp16 x fp16 -> fp32 dot product before AMX-FP16), and
  // fp16 accumulation would break the correctness rule.
  const bool units = std::is_same_v<S, c10::BFloat16> && longest(p, /*keys=*/true) > kWidenedKeys;
  const bf16::Path path = units ? bf16::gemm_path() : bf16::Path::kFp32;
  // One query tile and one key tile per sequence and one query head per kv head: each key tile has one reader, the
  // item of its head, which packs the tile itself inside the items' parallel region (one region instead of two).
  const bool items_pack = p.group == 1 && most_tiles(p, /*keys=*/false) <= 1 && most_tiles(p, /*keys=*/true) <= 1;
  std::optional<KeyTilesBf16> keys16;
  if (path != bf16::Path::kFp32)
    keys16.emplace(items_pack ? key_tiles_bf16(p, path, pad_lanes<A>(p.dim_v))
                              : pack_keys_bf16(p, k, v, path, pad_lanes<A>(p.dim_v)));
  // The key-major softmax (forward_key_major) off the bf16 units, with no mask or one that is a row per batch and
  // head, the same for every query (a key-padding mask: stride 0 along the queries; a general mask's column would be
  // a gather).
  const bool key_major = !keys16 && (!mask || mask->size(2) == 1 || mask->stride(2) == 0);
  const KeyUse use = key_major ? KeyUse::kForwardKeyMajor : KeyUse::kForward;
  KeyTiles<A> keys = keys16       ? KeyTiles<A>{pad_lanes<A>(p.dim_v), {}, {}, {}}
                     : items_pack ? key_tiles<S>(p, k, v, use)
                                  : pack_keys<S>(p, k, v, use);
  const Rows<const S> k_src(k), v_src(v);
  const auto pack_item = [&](const Item& it) {
    const Sequence& s = p.sequences[it.n];
    if (s.len_k == 0) return;  // no key tile
    key_tile<S>(s, it.head, /*t=*/0, k_src, v_src,
                [&](int64_t h, int64_t g, int64_t width, const auto& k_row, const auto& v_row) {
                  if constexpr (std::is_same_v<S, c10::BFloat16>) {
                    if (keys16) return fill_key_tile_bf16(p, *keys16, h, g, width, k_row, v_row);
                  }
                  fill_key_tile<S>(p, keys, h, g, width, k_row, v_row);
                });
  };
  ForwardArgs<S> args{p, keys, Rows<const S>(q), std::nullopt, out.data_ptr<S>(), lse.data_ptr<double>(),
                      keys16 ? &*keys16 : nullptr, key_major};
  if (mask) args.mask.emplace(*mask);

  const auto key_tiles_seen = [](const Visibility& vis, int64_t i0, int64_t i1) {
    const int64_t first = vis.first_key(i0), last = vis.last_key(i1 - 1);
    return first <= last ? last / kKeyTile - first / kKeyTile + 1 : int64_t(0);
  };
  const std::vector<Item> items = make_items(p, p.heads, /*key_tiles=*/false, key_tiles_seen);
  const int64_t workers = worker_count(static_cast<int64_t>(items.size()));
  std::vector<std::unique_ptr<ForwardScratch<A>>> scratch(workers);
  const auto body = [&](int64_t worker, int64_t index) {
    if (!scratch[worker]) scratch[worker] = std::make_unique<ForwardScratch<A>>(p.dim, keys.dim_v_pad, args.keys16);
    const Item& it = items[index];
    if (items_pack) pack_item(it);
    forward_tile<S>(args, *scratch[worker], it.n, it.head, it.tile);
  };
  // An item's home is the worker that packed its head's first key tile of its sequence, whose cache holds the
  // packed tiles: with items dealt from one shared counter, half the K / V reads of a 2-thread bf16 forward (L 1024,
  // d64, 8 heads) came from the other core's cache and its Q K^T products took 1.7x their one-thread time. Items
  // are still claimed from counters, so a worker that finishes its own takes the others' (a thread descheduled on
  // a shared machine holds nothing back), and each item computes its rows from scratch: the result does not depend
  // on which worker runs it (the backward needs a fixed deal for its dQ sums; the forward does not).
  const Runs packed = packing_runs(p);
  const auto home_of = [&](int64_t index) {
    const Item& it = items[index];
    return std::min(workers - 1, packed.of((it.head / p.group) * p.k_tiles + p.sequences[it.n].k_tile_base));
  };
  for_each_worker_homed(static_cast<int64_t>(items.size()), home_of, body);
}

std::tuple<at::Tensor, at::Tensor> flash_attention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, int64_t window_left, int64_t window_right,
    bool bottom_right, double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  (void)max_seqlen_q;  // the CPU kernel reads the lengths off cu_seqlens itself
  (void)max_seqlen_k;
  const Problem p = make_problem(q, k, v, attn_mask, cu_seqlens_q, cu_seqlens_k, scale, window_left, window_right,
                                 bottom_right, dropout_p, dropout_seed);
  // Every row inside a sequence is written by the kernel; rows past the last sequence see no key.
  at::Tensor out = at::empty({p.batch, p.heads, p.len_q, p.dim_v}, q.options());
  at::Tensor lse = at::empty({p.batch, p.heads, p.len_q}, q.options().dtype(lse_dtype(q)));
  out.narrow(2, p.covered_q, p.len_q - p.covered_q).zero_();
  lse.narrow(2, p.covered_q, p.len_q - p.covered_q).fill_(-std::numeric_limits<double>::infinity());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "flash_attention_forward", [&] {
    forward<scalar_t>(p, q, k, v, attn_mask, out, lse);
  });
  return {out, lse};
}

// ================================================================================================
// Backward.
// ================================================================================================
/// Q^T (D x kQueryTile), Q rows (kQueryTile x D_pad), dO^T (Dv x kQueryTile), dO rows (kQueryTile x Dv_pad; the
/// rows in place where they need neither conversion nor padding: RowTiles) of every head and query tile, and per
/// row lse = lse_hi + lse_lo (the float64 lse split into two A's, so that exp((s - lse_hi) - lse_lo) in A keeps its
/// precision; lse_hi = +inf on rows that see nothing, so the probabilities are 0); zero-padded, in the accumulation
/// dtype. delta = delta_hi + delta_lo (sum_j P dP / sum_j P per row, summed in float64) is filled by the backward's
/// first pass, which for bf16 also adds log(sum_j P) to the lse (reduce_delta). On the bf16 units the four operand
/// tiles are BackwardTilesBf16's instead (these stay empty).
template <typename A>
struct QueryTiles {
  int64_t dim_pad, dim_v_pad;
  TileArray<A> qt;
  RowTiles<A> q;
  TileArray<A> dot;
  RowTiles<A> dout;
  TileArray<A> lse, lse_lo, delta, delta_lo;
};

/// The backward's operands for the bf16 units (bf16 storage, gemm_path() not kFp32), copied from the inputs (no
/// rounding), zero-padded:
///   per kv head and key tile: K and V rows (kKeyTile x D / Dv padded to 32 deep: the A of S^T = K Q^T and
///   dP^T = V dO^T) and K^T (D padded to 16 rows x kKeyTile: the A of dQ^T += K^T dS^T);
///   per head and query tile, in the VNNI layout (tile_gemm_bf16.h): Q^T and dO^T (pairs along D / Dv, kQueryTile
///   columns: the B of S^T and dP^T) and Q and dO (pairs of query rows, D / Dv padded to 16 columns: the B of
///   dK += dS^T Q and dV += P^T dO).
/// With P^T and dS^T rounded to bf16 for the last three products (BackwardScratch::p16, g16), as SDPA's bf16
/// backward does, the products run at the bf16 units' rate; their errors against float64 stayed at 0.35-1.0x
/// SDPA's bf16 error in an emulation (L 128-512, D 32-128, inputs of magnitude 1-8, causal or not).
struct BackwardTilesBf16 {
  bf16::Path path;
  int64_t depth, depth_v;        // D, Dv rounded up to bf16::kDepthGranule
  int64_t dim_rows;              // D rounded up to bf16::kRowGranule
  int64_t dim_cols, dim_v_cols;  // D, Dv rounded up to bf16::kColGranule (pad_lanes<float>: the dK, dV rows)
  TileArray<bf16::bf16_t> k, v, kt, qt, dot, q, dout;
};

/// BackwardTilesBf16 allocated, not filled (fill_backward_key_tile_bf16, fill_query_tile fill it).
BackwardTilesBf16 backward_tiles_bf16(const Problem& p, bf16::Path path) {
  using bf16::round_up;
  const int64_t depth = round_up(std::max<int64_t>(p.dim, 1), bf16::kDepthGranule);
  const int64_t depth_v = round_up(std::max<int64_t>(p.dim_v, 1), bf16::kDepthGranule);
  const int64_t dim_rows = round_up(std::max<int64_t>(p.dim, 1), bf16::kRowGranule);
  const int64_t dim_cols = pad_lanes<float>(p.dim), dim_v_cols = pad_lanes<float>(p.dim_v);
  using Tiles = TileArray<bf16::bf16_t>;
  BackwardTilesBf16 t{path,
                      depth,
                      depth_v,
                      dim_rows,
                      dim_cols,
                      dim_v_cols,
                      Tiles(p.kv_heads, p.k_tiles, kKeyTile * depth),
                      Tiles(p.kv_heads, p.k_tiles, kKeyTile * depth_v),
                      Tiles(p.kv_heads, p.k_tiles, dim_rows * kKeyTile),
                      Tiles(p.heads, p.q_tiles, depth * kQueryTile),
                      Tiles(p.heads, p.q_tiles, depth_v * kQueryTile),
                      Tiles(p.heads, p.q_tiles, kQueryTile * dim_cols),
                      Tiles(p.heads, p.q_tiles, kQueryTile * dim_v_cols)};
  return t;
}

/// key_tile's fill of BackwardTilesBf16: the K, V and K^T tiles of key tile g of kv head h. Plain copies as 16-bit
/// patterns (copy_tile in c10::BFloat16 would round-trip every value through float).
template <typename KRow, typename VRow>
void fill_backward_key_tile_bf16(const Problem& p, BackwardTilesBf16& t, int64_t h, int64_t g, int64_t width,
                                 const KRow& k_row, const VRow& v_row) {
  const auto k_bits = [&](int64_t r) { return reinterpret_cast<const uint16_t*>(k_row(r)); };
  const auto v_bits = [&](int64_t r) { return reinterpret_cast<const uint16_t*>(v_row(r)); };
  copy_tile<uint16_t, uint16_t>(reinterpret_cast<uint16_t*>(t.k(h, g)), t.k.tile_size, t.depth, width, p.dim, k_bits,
                                /*transpose=*/false);
  copy_tile<uint16_t, uint16_t>(reinterpret_cast<uint16_t*>(t.v(h, g)), t.v.tile_size, t.depth_v, width, p.dim_v,
                                v_bits, /*transpose=*/false);
  copy_tile<uint16_t, uint16_t>(reinterpret_cast<uint16_t*>(t.kt(h, g)), t.kt.tile_size, kKeyTile, width, p.dim,
                                k_bits, /*transpose=*/true);
}

/// The key side of BackwardTilesBf16 packed, its query side allocated (pack_queries fills it).
BackwardTilesBf16 pack_backward_keys_bf16(const Problem& p, const at::Tensor& k, const at::Tensor& v, bf16::Path path) {
  BackwardTilesBf16 t = backward_tiles_bf16(p, path);
  for_each_key_tile<bf16::bf16_t>(
      p, k, v, [&](int64_t h, int64_t g, int64_t width, const auto& k_row, const auto& v_row) {
        fill_backward_key_tile_bf16(p, t, h, g, width, k_row, v_row);
      });
  return t;
}

/// delta of a query tile's rows, dO . O (FlashAttention-2's), for the fp32 / fp64 products: out_t and dot are the
/// tile's O^T and dO^T (dim_v x kQueryTile), over the tile's `columns` (its padded queries). Summed with the very
/// arithmetic of the dP^T tile product (tile_gemm of V rows by dO^T: per kTileDepthBlock-deep block one FMA chain
/// from zero, the blocks' sums added in order), so a saturated row, whose output is exactly one value row v_j, gets
/// delta = dP_ij bit for bit and dS = P (dP - delta) = 0 there, as the first pass's sum of P dP gave it. That pass
/// recomputed S^T and dP^T for every key tile: 2 of the backward's 7 tile products.
template <typename A>
void output_delta(const A* out_t, const A* dot, int64_t dim_v, int64_t columns, A* delta) {
  constexpr int L = kLanes<A>;
  for (int64_t c = 0; c < columns; c += L) {
    Simd<A> total{};
    for (int64_t k0 = 0; k0 < dim_v; k0 += kTileDepthBlock) {
      Simd<A> acc{};
      for (int64_t k = k0; k < std::min(dim_v, k0 + kTileDepthBlock); ++k)
        acc = fmadd(load_vector(out_t + k * kQueryTile + c), load_vector(dot + k * kQueryTile + c), acc);
      total = k0 == 0 ? acc : acc + total;
    }
    store_vector(delta + c, total);
  }
}

/// The query side allocated, not filled (fill_query_tile fills it): QueryTiles, whose fp32 operand tiles stay empty
/// with `t16` (its bf16 ones take their place).
template <typename S, typename A = Acc<S>>
QueryTiles<A> query_tiles(const Problem& p, const at::Tensor& q, const at::Tensor& grad_out, bool t16) {
  const int64_t dim_pad = pad_lanes<A>(p.dim), dim_v_pad = pad_lanes<A>(p.dim_v), heads = p.heads, tiles = p.q_tiles;
  const auto operand = [&](int64_t size) { return t16 ? TileArray<A>() : TileArray<A>(heads, tiles, size); };
  // The rows as the dK += dS^T Q and dV += P^T dO products read them (their B): in place without a conversion or
  // padding of D / Dv.
  const auto row_tiles = [&](const at::Tensor& x, int64_t dim, int64_t dim_pad) {
    const bool in_place = std::is_same_v<S, A> && x.stride(3) == 1 && dim_pad == dim;
    return t16 ? RowTiles<A>() : RowTiles<A>(heads, tiles, kQueryTile, dim_pad, in_place, x.stride(2));
  };
  return QueryTiles<A>{dim_pad,
                       dim_v_pad,
                       operand(p.dim * kQueryTile),
                       row_tiles(q, p.dim, dim_pad),
                       operand(p.dim_v * kQueryTile),
                       row_tiles(grad_out, p.dim_v, dim_v_pad),
                       TileArray<A>(heads, tiles, kQueryTile),
                       TileArray<A>(heads, tiles, kQueryTile),
                       TileArray<A>(heads, tiles, kQueryTile),
                       TileArray<A>(heads, tiles, kQueryTile)};
}

/// What fill_query_tile reads: Q, dO, the forward's lse and, for output_delta, its output.
template <typename S>
struct QuerySources {
  Rows<const S> q, dout;
  std::optional<Rows<const S>> out;
  const double* lse;
  int64_t lse_s0, lse_s1, lse_s2;

  QuerySources(const at::Tensor& q_, const at::Tensor& grad_out, const at::Tensor& lse_, const at::Tensor* out_)
      : q(q_), dout(grad_out), out(out_ ? std::optional<Rows<const S>>(*out_) : std::nullopt),
        lse(lse_.data_ptr<double>()), lse_s0(lse_.stride(0)), lse_s1(lse_.stride(1)), lse_s2(lse_.stride(2)) {}
};

/// Query tile t of sequence s for head h (g = s.q_tile_base + t): Q^T, dO^T and the Q / dO rows (with `t16` its
/// bf16 operand tiles instead), the lse halves and, with src.out, delta (output_delta's; out_t: a worker's
/// dim_v x kQueryTile scratch).
template <typename S, typename A>
void fill_query_tile(const Problem& p, QueryTiles<A>& t, BackwardTilesBf16* t16, const QuerySources<S>& src,
                     const Sequence& s, int64_t h, int64_t tile, A* out_t) {
  const int64_t g = s.q_tile_base + tile;
  const int64_t i0 = tile * kQueryTile, rows = std::min(kQueryTile, s.len_q - i0);
  const auto q_row = [&](int64_t r) { return src.q(s.batch, h, s.q_begin + i0 + r); };
  const auto do_row = [&](int64_t r) { return src.dout(s.batch, h, s.q_begin + i0 + r); };
  if (t16 == nullptr) {
    // Q^T times scale, as the forward scales Q: S^T comes out of the GEMM with the forward's rounding.
    copy_tile<A, S>(t.qt(h, g), t.qt.tile_size, kQueryTile, rows, p.dim, q_row, /*transpose=*/true, A(p.scale));
    t.q.template fill<S>(h, g, rows, p.dim, q_row);
    copy_tile<A, S>(t.dot(h, g), t.dot.tile_size, kQueryTile, rows, p.dim_v, do_row, /*transpose=*/true);
    t.dout.template fill<S>(h, g, rows, p.dim_v, do_row);
    if (src.out) {
      copy_tile<A, S>(out_t, p.dim_v * kQueryTile, kQueryTile, rows, p.dim_v,
                      [&](int64_t r) { return (*src.out)(s.batch, h, s.q_begin + i0 + r); }, /*transpose=*/true);
      output_delta(out_t, t.dot(h, g), p.dim_v, padded_extent(rows, kQueryTile), t.delta(h, g));
      std::fill(t.delta_lo(h, g), t.delta_lo(h, g) + kQueryTile, A(0));
    }
  } else {
#if SEQKERN_BF16_X86  // elsewhere the path is always kFp32: t16 is null
    if constexpr (std::is_same_v<S, c10::BFloat16>) {
      pack_kt_vnni(t16->qt(h, g), kQueryTile, t16->depth / 2, rows, p.dim, q_row);
      pack_kt_vnni(t16->dot(h, g), kQueryTile, t16->depth_v / 2, rows, p.dim_v, do_row);
      pack_v_vnni(t16->q(h, g), t16->dim_cols, kQueryTile / 2, rows, p.dim, q_row);
      pack_v_vnni(t16->dout(h, g), t16->dim_v_cols, kQueryTile / 2, rows, p.dim_v, do_row);
    }
#endif
  }
  A* row_lse = t.lse(h, g);
  A* row_lse_lo = t.lse_lo(h, g);
  for (int64_t r = 0; r < kQueryTile; ++r) {
    row_lse[r] = std::numeric_limits<A>::infinity();
    row_lse_lo[r] = 0;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = s.q_begin + i0 + r;
    const double value = src.lse[s.batch * src.lse_s0 + h * src.lse_s1 + i * src.lse_s2];
    if (value != -std::numeric_limits<double>::infinity()) {  // NaN passes on through lse_hi
      row_lse[r] = static_cast<A>(value);
      row_lse_lo[r] = std::isfinite(value) ? static_cast<A>(value - static_cast<double>(row_lse[r])) : A(0);
    }
  }
}

/// The query side (QueryTiles; with `t16` its bf16 operand tiles instead of the fp32 ones), every (head, query tile)
/// in parallel. With `out` (fp32 / fp64 products only) also each row's delta, output_delta's.
template <typename S, typename A = Acc<S>>
QueryTiles<A> pack_queries(const Problem& p, const at::Tensor& q, const at::Tensor& grad_out, const at::Tensor& lse,
                           BackwardTilesBf16* t16, const at::Tensor* out) {
  QueryTiles<A> t = query_tiles<S>(p, q, grad_out, t16 != nullptr);
  const auto owners = tile_owners(p, /*keys=*/false);
  const QuerySources<S> src(q, grad_out, lse, out);
  at::parallel_for(0, p.heads * p.q_tiles, 1, [&](int64_t begin, int64_t end) {
    ScratchVector<A> out_t(out ? p.dim_v * kQueryTile : 0);  // a tile's O^T, for output_delta
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / p.q_tiles, g = item % p.q_tiles;
      fill_query_tile(p, t, t16, src, p.sequences[owners[g].first], h, owners[g].second, out_t.data());
    }
  });
  return t;
}

/// One worker's tiles: S^T / P^T and dP^T / dS^T (kKeyTile x kQueryTile), the key tile's dK and dV rows,
/// the dropout row keys of a query tile, the worker's dQ^T accumulator over all heads and query tiles
/// (dq_t_size elements, zeroed by the worker thread that creates it), and its partial sums of P dP and of P per
/// query row (the first pass's). On the bf16 units also P^T and dS^T rounded to bf16 (p16, g16: the A of dV and
/// dK) and dS^T in the VNNI layout (g16_pairs: the B of dQ^T).
template <typename A>
struct BackwardScratch {
  ScratchVector<A> probs, grads, dk, dv;  // each written before it is read (dk, dv zeroed per key tile)
  AlignedVector<A> dq_t;
  std::vector<double> delta_sum, mass;
  std::vector<uint32_t> row_keys;
  AlignedVector<bf16::bf16_t> p16, g16, g16_pairs;
  BackwardScratch(int64_t dim_pad, int64_t dim_v_pad, int64_t dq_t_size, int64_t rows_size, bool bf16_units)
      : probs(kKeyTile * kQueryTile), grads(kKeyTile * kQueryTile), dk(kKeyTile * dim_pad),
        dv(kKeyTile * dim_v_pad), dq_t(dq_t_size), delta_sum(rows_size), mass(rows_size), row_keys(kQueryTile),
        p16(bf16_units ? kKeyTile * kQueryTile : 0), g16(bf16_units ? kKeyTile * kQueryTile : 0),
        g16_pairs(bf16_units ? kKeyTile * kQueryTile : 0) {}
};

template <typename S>
struct BackwardArgs {
  using A = Acc<S>;
  const Problem& p;
  const KeyTiles<A>& keys;
  const QueryTiles<A>& queries;
  std::optional<Rows<const S>> mask;
  S* grad_k;         // (B, Hkv, Lk, D) contiguous
  S* grad_v;         // (B, Hkv, Lk, Dv) contiguous
  S* grad_scores;    // (B, Hq, Lq, Lk) contiguous, or null
  const BackwardTilesBf16* t16 = nullptr;  // set: the tile products run on the bf16 units (keys' tiles are empty)
  /// > 0 when no sequence has more than one key tile (dq_in_items): the query tiles of the longest sequence. Each
  /// query tile's dQ then comes from one item alone, which writes it to grad_q (B, Hq, Lq, D) itself; a worker's
  /// dq_t holds that item's tiles only.
  int64_t item_query_tiles = 0;
  S* grad_q = nullptr;

  /// Rows of a dQ^T tile: D (D padded to whole AMX tiles on the bf16 units).
  int64_t dq_rows() const { return t16 ? t16->dim_rows : p.dim; }
  /// Head h's query tile gq (of sequence s) among a worker's dQ^T tiles and delta sums: one per (head, query
  /// tile) of the problem, or with item_query_tiles one per (head of the kv group, query tile of the sequence).
  int64_t dq_tile(int64_t h, int64_t gq, const Sequence& s) const {
    return item_query_tiles ? (h % p.group) * item_query_tiles + (gq - s.q_tile_base) : h * p.q_tiles + gq;
  }
  /// Query columns of a ragged group start at a multiple of this: a vector (a bf16 product's depth on the units).
  int64_t column_granule() const { return t16 ? bf16::kDepthGranule : kLanes<A>; }
  /// The end of a query tile's columns that the products and the row passes cover: its `queries` rounded up to
  /// the granule. A sequence shorter than the tile (L 64: half of it) would otherwise pay for the whole tile's
  /// S^T, dP^T and dQ^T columns and their exps.
  int64_t column_end(int64_t queries) const {
    return std::min(kQueryTile, (queries + column_granule() - 1) / column_granule() * column_granule());
  }
};

/// Row r (key j) of the transposed tiles, query columns [c0, column_end(queries)), from the scores S^T (scaled through
/// Q^T on the fp32 products, here on the bf16 units) in probs and dP^T in grads; queries [first, last]
/// (tile-local) see key j. Calls body(c, P^T before dropout, P^T after it, dP^T after it, seen) for each vector of
/// columns (after dropout: times keep / (1 - p)); `seen` marks the lanes whose query sees key j: a hidden pair
/// takes no part (its P, dP and dS count as 0), also in a NaN row (NaN lse) and when key j's own values are NaN.
template <typename S, typename Body>
void score_row(const BackwardArgs<S>& args, BackwardScratch<Acc<S>>& w, const Sequence& s, int64_t h, int64_t g,
               int64_t i0, int64_t queries, int64_t j, int64_t first, int64_t last, int64_t r, int64_t c0,
               const Body& body) {
  using A = Acc<S>;
  using V = Simd<A>;
  using Keys = typename HashLanes<A>::type;
  constexpr int L = kLanes<A>;
  const Problem& p = args.p;
  const A keep_scale = p.dropout ? A(1.0 / (1.0 - p.dropout_p)) : A(1);
  const int64_t end = args.column_end(queries);
  const bool partial = first > c0 || last < end - 1;
  const V minus_inf = broadcast(-std::numeric_limits<A>::infinity());
  const A* prob_row = w.probs.data() + r * kQueryTile;
  const A* grad_row = w.grads.data() + r * kQueryTile;
  const A* lse = args.queries.lse(h, g);
  const A* lse_lo = args.queries.lse_lo(h, g);
  const V score_scale = broadcast(args.t16 ? A(p.scale) : A(1));  // bf16 Q^T is not scaled (a rounding)
  for (int64_t c = c0; c < end; c += L) {
    V x = load_vector(prob_row + c) * score_scale, dp = load_vector(grad_row + c);
    if (args.mask) {  // a column of the mask: strided, read lane by lane
      for (int l = 0; l < L && c + l < queries; ++l)
        x[l] += static_cast<A>((*args.mask)(s.batch, h, s.q_begin + i0 + c + l)[s.k_begin + j]);
    }
    const auto seen = partial ? lanes_in_range<A>(c, first, last) : ~typename SimdTraits<A>::bits{};
    if (partial) x = seen ? x : minus_inf;
    // (s - lse_hi) is exact near the row's maximum (Sterbenz), so lse_lo's bits reach the exponent.
    const V prob = exp_attention((x - load_vector(lse + c)) - load_vector(lse_lo + c));
    V kept = prob;
    if (p.dropout) {
      Keys keys;
      std::memcpy(&keys, w.row_keys.data() + c, sizeof(Keys));
      const auto keep = p.hash.keep<A>(keys, static_cast<uint32_t>(j));
      kept = keep ? prob * keep_scale : V{};
      dp = keep ? dp * keep_scale : V{};
    }
    body(c, prob, kept, dp, seen);
  }
}

/// The second pass's row: probs = P^T (times keep / (1 - p)), grads = dS^T = P^T * (dP^T - delta).
template <typename S>
void score_grad_row(const BackwardArgs<S>& args, BackwardScratch<Acc<S>>& w, const Sequence& s, int64_t h,
                    int64_t g, int64_t i0, int64_t queries, int64_t j, int64_t first, int64_t last, int64_t r,
                    int64_t c0) {
  using A = Acc<S>;
  using V = Simd<A>;
  A* prob_row = w.probs.data() + r * kQueryTile;
  A* grad_row = w.grads.data() + r * kQueryTile;
  const A* delta = args.queries.delta(h, g);
  const A* delta_lo = args.queries.delta_lo(h, g);
  score_row<S>(args, w, s, h, g, i0, queries, j, first, last, r, c0, [&](int64_t c, V prob, V kept, V dp, auto seen) {
    store_vector(prob_row + c, seen ? kept : V{});
    // dp - delta_hi is exact where they are close (the row's dominant keys), so delta_lo's bits count there.
    const V grad = prob * ((dp - load_vector(delta + c)) - load_vector(delta_lo + c));
    store_vector(grad_row + c, seen ? grad : V{});
  });
}

/// Lanes [H kHalf, H kHalf + H) of x widened to float64, H = kLanes<double> (half of a float vector's lanes; for
/// double, x itself: kHalf 0).
typedef float HalfSimdFloat __attribute__((vector_size(kSimdBytes / 2)));
template <int kHalf>
inline Simd<double> widened(Simd<float> x) {
  constexpr int H = kLanes<double>;
  static_assert(kLanes<float> == 2 * H && (H == 8 || H == 4));
  HalfSimdFloat part;
  if constexpr (H == 8) {
    part = __builtin_shufflevector(x, x, 8 * kHalf, 8 * kHalf + 1, 8 * kHalf + 2, 8 * kHalf + 3, 8 * kHalf + 4,
                                   8 * kHalf + 5, 8 * kHalf + 6, 8 * kHalf + 7);
  } else {
    part = __builtin_shufflevector(x, x, 4 * kHalf, 4 * kHalf + 1, 4 * kHalf + 2, 4 * kHalf + 3);
  }
  return __builtin_convertvector(part, Simd<double>);
}
template <int kHalf>
inline Simd<double> widened(Simd<double> x) {
  return x;
}

/// sum[l] += p[l] d[l], mass[l] += p[l] in float64 for the lanes of half kHalf of p and d (kLanes<double> lanes).
template <int kHalf, typename V>
inline void accumulate_delta_half(V p, V d, double* sum, double* mass) {
  const Simd<double> wide_p = widened<kHalf>(p);
  store_vector(sum, load_vector(sum) + wide_p * widened<kHalf>(d));
  store_vector(mass, load_vector(mass) + wide_p);
}

/// The first pass's row: per query column, float64 sums of P dP (dropout included) and of P into the worker's
/// buffers (products of two floats are exact in float64). By 8-lane halves: as one 16-lane float64 vector (a
/// 128-byte GCC vector type) the sums made a round trip through the stack, whose reload alone took 11% of
/// backward_rows' samples in a b32 h4 L17 backward.
template <typename S>
void delta_row(const BackwardArgs<S>& args, BackwardScratch<Acc<S>>& w, const Sequence& s, int64_t h, int64_t g,
               int64_t i0, int64_t queries, int64_t j, int64_t first, int64_t last, int64_t r, int64_t c0) {
  using A = Acc<S>;
  using V = Simd<A>;
  double* sum = w.delta_sum.data() + args.dq_tile(h, g, s) * kQueryTile;
  double* mass = w.mass.data() + args.dq_tile(h, g, s) * kQueryTile;
  score_row<S>(args, w, s, h, g, i0, queries, j, first, last, r, c0, [&](int64_t c, V prob, V, V dp, auto seen) {
    const V p = seen ? prob : V{}, d = seen ? dp : V{};
    accumulate_delta_half<0>(p, d, sum + c, mass + c);
    if constexpr (kLanes<A> == 2 * kLanes<double>)
      accumulate_delta_half<1>(p, d, sum + c + kLanes<double>, mass + c + kLanes<double>);
  });
}

/// S^T (probs) and dP^T (grads), key rows [r0, r0 + rows) x query columns [c0, c0 + columns), on the bf16 units.
void score_products_bf16(const BackwardTilesBf16& t, BackwardScratch<float>& w, int64_t kv_head, int64_t gk,
                         int64_t h, int64_t gq, int64_t r0, int64_t rows, int64_t c0, int64_t columns) {
  const int64_t m = bf16_rows(t.path, rows);
  bf16::gemm(t.path, m, columns, t.depth, t.k(kv_head, gk) + r0 * t.depth, t.depth, t.qt(h, gq) + 2 * c0,
             2 * kQueryTile, w.probs.data() + r0 * kQueryTile + c0, kQueryTile, /*accumulate=*/false);
  bf16::gemm(t.path, m, columns, t.depth_v, t.v(kv_head, gk) + r0 * t.depth_v, t.depth_v, t.dot(h, gq) + 2 * c0,
             2 * kQueryTile, w.grads.data() + r0 * kQueryTile + c0, kQueryTile, /*accumulate=*/false);
}

/// dV += P^T dO, dK += dS^T Q (key rows [r0, r1)) and dQ^T += K^T dS^T (query columns [c0, c0 + columns), into
/// `dq_t`, the query tile's D_rows x kQueryTile accumulator) on the bf16 units, from the fp32 P^T and dS^T rows
/// rounded to bf16. c0 and c0 + columns are multiples of bf16::kDepthGranule, so the query depth rounded up to it
/// stays inside them (the columns past the last query are zeros: score_grad_row writes them).
void gradient_products_bf16(const BackwardTilesBf16& t, BackwardScratch<float>& w, int64_t kv_head, int64_t gk,
                            int64_t h, int64_t gq, int64_t r0, int64_t r1, int64_t c0, int64_t columns,
                            int64_t queries, float* dq_t) {
#if SEQKERN_BF16_X86  // elsewhere the path is always kFp32: never called
  const int64_t rows = r1 - r0, m = bf16_rows(t.path, rows);
  const int64_t query_depth = bf16::round_up(queries - c0, bf16::kDepthGranule);
  const int64_t key_depth = bf16::round_up(rows, bf16::kDepthGranule);  // r0 + key_depth <= kKeyTile
  for (int64_t r = r0; r < r0 + key_depth; ++r) {
    bf16::bf16_t* p16 = w.p16.data() + r * kQueryTile + c0;
    bf16::bf16_t* g16 = w.g16.data() + r * kQueryTile + c0;
    if (r < r1) {
      bf16::round_to_bf16(w.probs.data() + r * kQueryTile + c0, columns, p16, columns);
      bf16::round_to_bf16(w.grads.data() + r * kQueryTile + c0, columns, g16, columns);
    } else {  // the padding rows AMX's 16-row tiles read: finite
      std::fill(p16, p16 + columns, bf16::bf16_t(0.0f));
      std::fill(g16, g16 + columns, bf16::bf16_t(0.0f));
    }
  }
  const bf16::bf16_t* p16 = w.p16.data() + r0 * kQueryTile + c0;
  const bf16::bf16_t* g16 = w.g16.data() + r0 * kQueryTile + c0;
  // Pair row c0 / 2 of the VNNI tiles starts c0 * columns elements in.
  bf16::gemm(t.path, m, t.dim_v_cols, query_depth, p16, kQueryTile, t.dout(h, gq) + c0 * t.dim_v_cols,
             2 * t.dim_v_cols, w.dv.data() + r0 * t.dim_v_cols, t.dim_v_cols, /*accumulate=*/true);
  bf16::gemm(t.path, m, t.dim_cols, query_depth, g16, kQueryTile, t.q(h, gq) + c0 * t.dim_cols, 2 * t.dim_cols,
             w.dk.data() + r0 * t.dim_cols, t.dim_cols, /*accumulate=*/true);
  pack_v_vnni(w.g16_pairs.data(), columns, key_depth / 2, rows, columns,
              [&](int64_t i) { return g16 + i * kQueryTile; });
  bf16::gemm(t.path, t.dim_rows, columns, key_depth, t.kt(kv_head, gk) + r0, kKeyTile, w.g16_pairs.data(),
             2 * columns, dq_t + c0, kQueryTile, /*accumulate=*/true);
#else
  (void)t, (void)w, (void)kv_head, (void)gk, (void)h, (void)gq, (void)r0, (void)r1, (void)c0, (void)columns,
      (void)queries, (void)dq_t;
#endif
}

/// Key rows [r0, r1) of key tile gk against query columns [c0, column_end(queries)) of query tile gq (rows i0..,
/// `queries` of them) of head h: recomputes P^T and dP^T (unless scores_ready: the worker's tiles hold them from
/// this tile's delta pass); in the delta pass adds their row sums to the worker's, else forms dS^T, then dV, dK
/// (rows r0..r1) and dQ^T (columns c0..) += their products.
template <typename S>
void backward_rows(const BackwardArgs<S>& args, BackwardScratch<Acc<S>>& w, const Sequence& s, int64_t h,
                   int64_t kv_head, int64_t gk, int64_t j0, int64_t gq, int64_t i0, int64_t queries, int64_t r0,
                   int64_t r1, int64_t c0, bool delta_pass, bool scores_ready) {
  using A = Acc<S>;
  const Problem& p = args.p;
  const KeyTiles<A>& keys = args.keys;
  const QueryTiles<A>& qs = args.queries;
  const Visibility vis = p.visibility(s);
  const int64_t rows = r1 - r0, columns = args.column_end(queries) - c0, depth = queries - c0;
  const int64_t dim_pad = qs.dim_pad, dim_v_pad = keys.dim_v_pad;
  A* probs = w.probs.data() + r0 * kQueryTile + c0;
  A* grads = w.grads.data() + r0 * kQueryTile + c0;
  A* dq_t = w.dq_t.data() + args.dq_tile(h, gq, s) * args.dq_rows() * kQueryTile;
  const bool units = args.t16 != nullptr;  // set only for bf16 storage, whose accumulation dtype is float
  if (!scores_ready && units) {
    if constexpr (std::is_same_v<A, float>)
      score_products_bf16(*args.t16, w, kv_head, gk, h, gq, r0, rows, c0, columns);
  } else if (!scores_ready) {
    tile_gemm<A, false>(rows, columns, p.dim, keys.k(kv_head, gk) + r0 * keys.k.ld, keys.k.ld, qs.qt(h, gq) + c0,
                        kQueryTile, probs, kQueryTile);
    tile_gemm<A, false>(rows, columns, p.dim_v, keys.v(kv_head, gk) + r0 * keys.v.ld, keys.v.ld, qs.dot(h, gq) + c0,
                        kQueryTile, grads, kQueryTile);
  }
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t j = j0 + r;
    const int64_t first = vis.first_query(j) - i0, last = std::min(vis.last_query(j) - i0, queries - 1);
    if (delta_pass) {
      delta_row<S>(args, w, s, h, gq, i0, queries, j, first, last, r, c0);
    } else {
      score_grad_row<S>(args, w, s, h, gq, i0, queries, j, first, last, r, c0);
    }
  }
  if (delta_pass) return;
  if (args.t16) {
    if constexpr (std::is_same_v<A, float>)
      gradient_products_bf16(*args.t16, w, kv_head, gk, h, gq, r0, r1, c0, columns, queries, dq_t);
  } else {
    tile_gemm<A, true>(rows, dim_v_pad, depth, probs, kQueryTile, qs.dout(h, gq) + c0 * qs.dout.ld, qs.dout.ld,
                       w.dv.data() + r0 * dim_v_pad, dim_v_pad);
    tile_gemm<A, true>(rows, dim_pad, depth, grads, kQueryTile, qs.q(h, gq) + c0 * qs.q.ld, qs.q.ld,
                       w.dk.data() + r0 * dim_pad, dim_pad);
    tile_gemm<A, true>(p.dim, columns, rows, keys.kt(kv_head, gk) + r0, kKeyTile, grads, kQueryTile, dq_t + c0,
                       kQueryTile);
  }
  if (args.grad_scores) {
    for (int64_t c = c0; c < queries; ++c) {
      S* dst = args.grad_scores + ((s.batch * p.heads + h) * p.len_q + s.q_begin + i0 + c) * p.len_k + s.k_begin + j0;
      for (int64_t r = r0; r < r1; ++r) dst[r] = static_cast<S>(w.grads[r * kQueryTile + c]);
    }
  }
}

/// queries.delta + delta_lo of head h's query tile g, row c = sum / mass (the row's sums of P dP and of P over the
/// keys it sees, float64; 0 where it sees none). With `renormalize` the saved lse also takes
/// log(sum of P): the second pass's P = exp(s - lse) is then the softmax of the scores as this backward
/// recomputes them, rows summing to 1. For bf16, whose forward may form the scores on AMX / AVX512-BF16 with a
/// different rounding (a score of 3e6 by up to ~1: a saturated row's dV was 100x SDPA's error without it). The
/// other dtypes' forward forms them exactly as the backward does; there the correction would only add rounding.
template <typename A>
void settle_delta(const QueryTiles<A>& queries, int64_t h, int64_t g, int64_t c, double sum, double mass,
                  bool renormalize) {
  A& delta = queries.delta(h, g)[c];
  A& lse_hi = queries.lse(h, g)[c];
  A& lse_lo = queries.lse_lo(h, g)[c];
  const double value = mass == 0 ? 0.0 : sum / mass;  // NaN stays NaN
  delta = static_cast<A>(value);
  queries.delta_lo(h, g)[c] = std::isfinite(value) ? static_cast<A>(value - static_cast<double>(delta)) : A(0);
  if (renormalize && mass > 0 && std::isfinite(mass)) {
    const double lse = static_cast<double>(lse_hi) + static_cast<double>(lse_lo) + std::log(mass);
    lse_hi = static_cast<A>(lse);
    lse_lo = static_cast<A>(lse - static_cast<double>(lse_hi));
  }
}

/// settle_delta of every query row of head h's query tile g from the sums of one worker, the only one that has
/// any (see backward_tile), at `at` in its buffers.
template <typename A>
void settle_tile_deltas(const BackwardScratch<A>& w, const QueryTiles<A>& queries, int64_t h, int64_t g, int64_t at,
                        bool renormalize) {
  for (int64_t c = 0; c < kQueryTile; ++c)
    settle_delta(queries, h, g, c, w.delta_sum[at + c], w.mass[at + c], renormalize);
}

/// grad_q rows [i0, i0 + kQueryTile) of head h in sequence s (those that exist) = scale * dq_t^T, dq_t a dQ^T tile
/// (dq_rows x kQueryTile).
template <typename S, typename A>
void store_grad_q_tile(const Problem& p, const Sequence& s, int64_t h, int64_t i0, const A* dq_t, S* grad_q) {
  const int64_t rows = std::min(kQueryTile, s.len_q - i0);
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<S, float> && std::is_same_v<A, float>) {  // by registers: a dq_t column is strided
    S* first = grad_q + ((s.batch * p.heads + h) * p.len_q + s.q_begin + i0) * p.dim;
    return transpose_rows(first, p.dim, p.dim, rows, [&](int64_t c) { return dq_t + c * kQueryTile; }, float(p.scale),
                          /*zero_to_lanes=*/false);
  }
#endif
  for (int64_t r = 0; r < rows; ++r) {
    S* dst = grad_q + ((s.batch * p.heads + h) * p.len_q + s.q_begin + i0 + r) * p.dim;
    for (int64_t c = 0; c < p.dim; ++c) dst[c] = static_cast<S>(dq_t[c * kQueryTile + r] * A(p.scale));
  }
}

/// Key tile `tile` of kv head h in sequence n: dK, dV of its rows, and its dQ^T contributions (in the delta
/// pass: its contributions to the row sums of P dP and P only). With item_query_tiles, the sequence's only key
/// tile, there is no separate delta pass: each query tile's delta comes from this item's own S^T and dP^T tiles,
/// which its gradient phase then reuses (5 tile products instead of 7), and dQ of the sequence's query tiles is
/// complete at the end, and written.
template <typename S>
void backward_tile(const BackwardArgs<S>& args, BackwardScratch<Acc<S>>& w, int64_t n, int64_t kv_head, int64_t tile,
                   bool delta_pass) {
  using A = Acc<S>;
  const Problem& p = args.p;
  const KeyTiles<A>& keys = args.keys;
  const QueryTiles<A>& qs = args.queries;
  const Sequence& s = p.sequences[n];
  const Visibility vis = p.visibility(s);
  const int64_t j0 = tile * kKeyTile, width = std::min(kKeyTile, s.len_k - j0);
  const int64_t gk = s.k_tile_base + tile;
  const bf16::TileScope amx_tiles(args.t16 ? args.t16->path : bf16::Path::kFp32);
  const int64_t touched = padded_extent(width, kKeyTile);  // the key rows the products may touch (as the forward's)
  std::fill(w.dk.begin(), w.dk.begin() + touched * qs.dim_pad, A(0));
  std::fill(w.dv.begin(), w.dv.begin() + touched * keys.dim_v_pad, A(0));
  const int64_t dq_tile_size = args.dq_rows() * kQueryTile, query_tiles = p.tiles(s.len_q, kQueryTile);
  if (args.item_query_tiles && !delta_pass) {  // the item's own dQ^T tiles (the columns its queries may touch)
    const int64_t tiles = p.group * args.item_query_tiles;  // and delta sums
    for (int64_t h = kv_head * p.group; h < (kv_head + 1) * p.group; ++h)
      for (int64_t qt = 0; qt < query_tiles; ++qt) {
        A* dq_t = w.dq_t.data() + args.dq_tile(h, s.q_tile_base + qt, s) * dq_tile_size;
        const int64_t columns = padded_extent(std::min(kQueryTile, s.len_q - qt * kQueryTile), kQueryTile);
        zero_rows(dq_t, args.dq_rows(), columns, kQueryTile);
      }
    std::fill(w.delta_sum.begin(), w.delta_sum.begin() + tiles * kQueryTile, 0.0);
    std::fill(w.mass.begin(), w.mass.begin() + tiles * kQueryTile, 0.0);
  }

  const int64_t first_query = vis.first_query(j0), last_query = vis.last_query(j0 + width - 1);
  for (int64_t h = kv_head * p.group; h < (kv_head + 1) * p.group; ++h) {
    const uint32_t head_key = p.hash.head_key(n * p.heads + h);
    for (int64_t qt = first_query / kQueryTile; first_query <= last_query && qt <= last_query / kQueryTile; ++qt) {
      const int64_t i0 = qt * kQueryTile, queries = std::min(kQueryTile, s.len_q - i0);
      if (p.dropout)
        for (int64_t c = 0; c < queries; ++c) w.row_keys[c] = DropoutHash::row_key(head_key, i0 + c);
      // A query tile whose left part the last keys do not see (the diagonal of causal attention) goes by
      // groups of kRowGroup key rows, each starting at the vector holding the first query its first row
      // sees: as in the forward, 3/8 of the diagonal tile's products (counted).
      const bool ragged = vis.first_query(j0 + width - 1) - i0 >= kLanes<A>;
      const int64_t group = ragged ? kRowGroup : width, gq = s.q_tile_base + qt;
      const auto row_groups = [&](bool delta, bool scores_ready) {
        for (int64_t r0 = 0; r0 < width; r0 += group) {
          const int64_t first = std::max<int64_t>(0, vis.first_query(j0 + r0) - i0);
          const int64_t c0 = ragged ? first / args.column_granule() * args.column_granule() : 0;
          if (c0 < queries)  // else no query of the tile sees these keys
            backward_rows<S>(args, w, s, h, kv_head, gk, j0, gq, i0, queries, r0, std::min(width, r0 + group), c0,
                             delta, scores_ready);
        }
      };
      if (args.item_query_tiles) {
        row_groups(/*delta=*/true, /*scores_ready=*/false);
        settle_tile_deltas(w, qs, h, gq, args.dq_tile(h, gq, s) * kQueryTile,
                           /*renormalize=*/std::is_same_v<S, c10::BFloat16>);
        row_groups(/*delta=*/false, /*scores_ready=*/true);
      } else {
        row_groups(delta_pass, /*scores_ready=*/false);
      }
    }
  }
  if (delta_pass) return;
  for (int64_t r = 0; r < width; ++r) {
    const int64_t row = (s.batch * p.kv_heads + kv_head) * p.len_k + s.k_begin + j0 + r;
    for (int64_t c = 0; c < p.dim; ++c)
      args.grad_k[row * p.dim + c] = static_cast<S>(w.dk[r * qs.dim_pad + c] * A(p.scale));
    for (int64_t c = 0; c < p.dim_v; ++c) args.grad_v[row * p.dim_v + c] = static_cast<S>(w.dv[r * keys.dim_v_pad + c]);
  }
  if (args.item_query_tiles)  // every query tile of the sequence, seen or not (zeros)
    for (int64_t h = kv_head * p.group; h < (kv_head + 1) * p.group; ++h)
      for (int64_t qt = 0; qt < query_tiles; ++qt)
        store_grad_q_tile(p, s, h, qt * kQueryTile,
                          w.dq_t.data() + args.dq_tile(h, s.q_tile_base + qt, s) * dq_tile_size, args.grad_q);
}

/// grad_q rows = scale * (sum over the workers' dQ^T tiles, `dq_rows` x kQueryTile each)^T.
template <typename S, typename A = Acc<S>>
void reduce_grad_q(const Problem& p, const std::vector<const A*>& dq_t, int64_t dq_rows, at::Tensor& grad_q) {
  const auto owners = tile_owners(p, /*keys=*/false);
  const int64_t tile_size = dq_rows * kQueryTile;
  S* out = grad_q.data_ptr<S>();
  at::parallel_for(0, p.heads * p.q_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> sum(tile_size);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / p.q_tiles, g = item % p.q_tiles;
      std::fill(sum.begin(), sum.end(), A(0));
      for (const A* part : dq_t)
        for (int64_t e = 0; e < tile_size; ++e) sum[e] += part[item * tile_size + e];
      store_grad_q_tile(p, p.sequences[owners[g].first], h, owners[g].second * kQueryTile, sum.data(), out);
    }
  });
}

/// settle_delta of every query row from the sums of all workers, added in worker order in float64.
template <typename A>
void reduce_delta(const Problem& p, const std::vector<std::unique_ptr<BackwardScratch<A>>>& scratch,
                  QueryTiles<A>& queries, bool renormalize) {
  at::parallel_for(0, p.heads * p.q_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item)
      for (int64_t c = 0; c < kQueryTile; ++c) {
        double sum = 0, mass = 0;
        for (const auto& w : scratch) {
          if (!w) continue;
          sum += w->delta_sum[item * kQueryTile + c];
          mass += w->mass[item * kQueryTile + c];
        }
        settle_delta(queries, item / p.q_tiles, item % p.q_tiles, c, sum, mass, renormalize);
      }
  });
}

/// Whether no sequence has more than one key tile: the items then write dQ themselves (BackwardArgs::
/// item_query_tiles), where otherwise every worker keeps a dQ^T accumulator of every (head, query tile), zeroed,
/// then summed across workers: at b32 h4 L64 d32 (fp32, one thread) the zeroing and the sum were 20% of the
/// backward's samples.
bool dq_in_items(const Problem& p) { return most_tiles(p, /*keys=*/true) <= 1; }

/// With dq_in_items, grad_q rows of the sequences that have no key at all (no item writes them): zeros.
template <typename S>
void zero_grad_q_without_keys(const Problem& p, at::Tensor& grad_q) {
  for (const Sequence& s : p.sequences)
    if (s.len_k == 0)
      for (int64_t b_h = s.batch * p.heads; b_h < (s.batch + 1) * p.heads; ++b_h)
        std::fill_n(grad_q.data_ptr<S>() + (b_h * p.len_q + s.q_begin) * p.dim, s.len_q * p.dim, S(0));
}

template <typename S>
void backward(const Problem& p, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
              const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& mask,
              at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v, at::Tensor& grad_scores) {
  using A = Acc<S>;
  // bf16 storage: the five tile products on AMX / AVX512-BF16 where the CPU has them, as the forward's.
  const bf16::Path path = std::is_same_v<S, c10::BFloat16> ? bf16::gemm_path() : bf16::Path::kFp32;
  // One key tile per sequence (dq_in_items): an item's operands (its kv head's key tile, the query tiles of the heads
  // of its group) are read by that item alone, so it packs them itself, inside the items' parallel region, right
  // before its products read them. Else three regions: the keys, the queries, the items.
  const bool items_pack = dq_in_items(p);
  std::optional<BackwardTilesBf16> t16;
  if (path != bf16::Path::kFp32)
    t16.emplace(items_pack ? backward_tiles_bf16(p, path) : pack_backward_keys_bf16(p, k, v, path));
  KeyTiles<A> keys = t16          ? KeyTiles<A>{pad_lanes<A>(p.dim_v), {}, {}, {}}
                     : items_pack ? key_tiles<S>(p, k, v, KeyUse::kBackward)
                                  : pack_keys<S>(p, k, v, KeyUse::kBackward);
  // delta: on the bf16 units a first pass's sums of P dP (their products' rounding is not tile_gemm's, so
  // output_delta would not match dP bit for bit); with one key tile per sequence from the item's own tiles
  // (backward_tile); else dO . O as it is packed (output_delta).
  const bool items_settle_delta = items_pack, delta_from_output = !t16 && !items_settle_delta;
  QueryTiles<A> queries =
      items_pack ? query_tiles<S>(p, q, grad_out, t16.has_value())
                 : pack_queries<S>(p, q, grad_out, lse, t16 ? &*t16 : nullptr, delta_from_output ? &out : nullptr);
  const Rows<const S> k_src(k), v_src(v);
  const QuerySources<S> query_src(q, grad_out, lse, nullptr);
  const auto pack_item = [&](const Item& it) {
    const Sequence& s = p.sequences[it.n];
    key_tile<S>(s, it.head, it.tile, k_src, v_src,
                [&](int64_t h, int64_t g, int64_t width, const auto& k_row, const auto& v_row) {
                  if constexpr (std::is_same_v<S, c10::BFloat16>) {
                    if (t16) return fill_backward_key_tile_bf16(p, *t16, h, g, width, k_row, v_row);
                  }
                  fill_key_tile<S>(p, keys, h, g, width, k_row, v_row);
                });
    for (int64_t h = it.head * p.group; h < (it.head + 1) * p.group; ++h)
      for (int64_t t = 0; t < p.tiles(s.len_q, kQueryTile); ++t)
        fill_query_tile<S, A>(p, queries, t16 ? &*t16 : nullptr, query_src, s, h, t, nullptr);
  };
  BackwardArgs<S> args{p,
                       keys,
                       queries,
                       std::nullopt,
                       grad_k.data_ptr<S>(),
                       grad_v.data_ptr<S>(),
                       grad_scores.numel() > 0 ? grad_scores.data_ptr<S>() : nullptr,
                       t16 ? &*t16 : nullptr};
  if (mask) args.mask.emplace(*mask);
  if (items_settle_delta) {
    args.grad_q = grad_q.data_ptr<S>();
    args.item_query_tiles = most_tiles(p, /*keys=*/false);
    zero_grad_q_without_keys<S>(p, grad_q);
  }

  const auto query_tiles_seen = [](const Visibility& vis, int64_t j0, int64_t j1) {
    const int64_t first = vis.first_query(j0), last = vis.last_query(j1 - 1);
    return first <= last ? last / kQueryTile - first / kQueryTile + 1 : int64_t(0);
  };
  const std::vector<Item> items = make_items(p, p.kv_heads, /*key_tiles=*/true, query_tiles_seen);
  const int64_t workers = worker_count(static_cast<int64_t>(items.size()));
  std::vector<std::unique_ptr<BackwardScratch<A>>> scratch(workers);
  // A worker's dQ^T tiles and delta sums: the items' own (dq_in_items) or one per head and query tile.
  const int64_t worker_tiles = args.item_query_tiles ? p.group * args.item_query_tiles : p.heads * p.q_tiles;
  const auto run_pass = [&](bool delta_pass) {
    for_each_worker_strided(static_cast<int64_t>(items.size()), [&](int64_t worker, int64_t index) {
      if (!scratch[worker])
        scratch[worker] = std::make_unique<BackwardScratch<A>>(
            queries.dim_pad, keys.dim_v_pad, worker_tiles * args.dq_rows() * kQueryTile,
            delta_from_output ? 0 : worker_tiles * kQueryTile, t16.has_value());  // the sums of P dP and P
      const Item& it = items[index];
      if (items_pack) pack_item(it);
      backward_tile<S>(args, *scratch[worker], it.n, it.head, it.tile, delta_pass);
    });
  };
  // Pass 1 (the bf16 units with several key tiles): delta_i = sum_j P_ij dP_ij / sum_j P_ij, an average of the
  // very dP^T values that pass 2 subtracts it from, so dP_ij - delta_i = sum_k w_k (dP_ij - dP_ik) keeps only
  // relative errors: 0 on a one-hot row, near-exact on a near-one-hot one (the sums run in float64). The items'
  // own settling (one key tile) is this average too. output_delta's dO . O (FlashAttention-2's, and SDPA's)
  // carries the rounding of out, ~1 ulp of |dO| |v|, into every dS; summed in tile_gemm's order it still gives 0 on
  // an exactly one-hot row (a plain rowsum gave 16-33x SDPA's float32 error on dq in PyTorch's saturated SDPA
  // samples). Against SDPA's float32 error, float64 oracle, 64 samples of 200-520 keys (saturated to diffuse,
  // causal or not): gradients at most 1.89x (pass 1's average: 1.57x), median 1.0x. It saves the pass's two products
  // of seven: fp32 backward at L 1024 d64 0.77x -> 1.05x SDPA, causal 0.92x -> 1.31x (NOTES.md "Round 18").
  if (!items_settle_delta && !delta_from_output) {
    run_pass(/*delta_pass=*/true);
    reduce_delta(p, scratch, queries, /*renormalize=*/std::is_same_v<S, c10::BFloat16>);
  }
  run_pass(/*delta_pass=*/false);
  if (args.item_query_tiles) return;  // the items wrote grad_q
  std::vector<const A*> dq_t;
  for (const auto& w : scratch)
    if (w) dq_t.push_back(w->dq_t.data());
  reduce_grad_q<S>(p, dq_t, args.dq_rows(), grad_q);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> flash_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    int64_t window_left, int64_t window_right, bool bottom_right, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed, bool want_grad_scores) {
  (void)max_seqlen_q;  // the CPU kernel reads the lengths off cu_seqlens itself
  (void)max_seqlen_k;
  const Problem p = make_problem(q, k, v, attn_mask, cu_seqlens_q, cu_seqlens_k, scale, window_left, window_right,
                                 bottom_right, dropout_p, dropout_seed);
  check_tensor(grad_out, q, {p.batch, p.heads, p.len_q, p.dim_v}, "grad_out");
  check_tensor(out, q, {p.batch, p.heads, p.len_q, p.dim_v}, "out");
  FA_CHECK(lse.device().is_cpu(), "lse must be a CPU tensor, got ", lse.device());
  FA_CHECK(lse.sizes() == at::IntArrayRef({p.batch, p.heads, p.len_q}), "lse must have shape ",
           at::IntArrayRef({p.batch, p.heads, p.len_q}), ", got ", lse.sizes());
  FA_CHECK(lse.scalar_type() == lse_dtype(q), "lse must have dtype ", lse_dtype(q), ", got ", lse.scalar_type());
  // Every row inside a sequence is written by the kernel; rows past the last sequence get zeros.
  at::Tensor grad_q = at::empty({p.batch, p.heads, p.len_q, p.dim}, q.options());
  at::Tensor grad_k = at::empty({p.batch, p.kv_heads, p.len_k, p.dim}, q.options());
  at::Tensor grad_v = at::empty({p.batch, p.kv_heads, p.len_k, p.dim_v}, q.options());
  grad_q.narrow(2, p.covered_q, p.len_q - p.covered_q).zero_();
  grad_k.narrow(2, p.covered_k, p.len_k - p.covered_k).zero_();
  grad_v.narrow(2, p.covered_k, p.len_k - p.covered_k).zero_();
  at::Tensor grad_scores = want_grad_scores ? at::zeros({p.batch, p.heads, p.len_q, p.len_k}, q.options())
                                            : at::empty({0}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "flash_attention_backward", [&] {
    backward<scalar_t>(p, grad_out, q, k, v, out, lse, attn_mask, grad_q, grad_k, grad_v, grad_scores);
  });
  return {grad_q, grad_k, grad_v, grad_scores};
}

}  // namespace
}  // namespace seqkern::cpu

TORCH_LIBRARY_IMPL(seqkern, CPU, m) {
  m.impl("flash_attention_forward", &seqkern::cpu::flash_attention_forward_cpu);
  m.impl("flash_attention_backward", &seqkern::cpu::flash_attention_backward_cpu);
}
