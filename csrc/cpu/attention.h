// Tile machinery shared by the CPU attention kernels (flash_attention.cpp; reusable by the decode kernel):
//   * tile_gemm: C (+)= A @ B on row-major tiles (A possibly given transposed) through a register-blocked
//     micro-kernel (zmm at avx512, ymm at avx2);
//   * exp_attention: exp with exact 0 far below the row maximum (masked scores must weigh exactly 0);
//   * online_softmax_update: one key tile's step of the streaming softmax of a score row;
//   * store_rounded: output rows to the storage dtype (bf16 by vector round-to-nearest-even);
//   * (the dropout mask, DropoutHash, is counter_hash.h: zoneout draws from it too);
//   * Visibility: which keys a query sees (window / causal / bottom-right), as index ranges;
//   * for_each_worker_homed / _strided: scheduling of unequal work items over at::parallel_for's threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <numeric>
#include <vector>

#include <c10/util/BFloat16.h>

#include "cpu/counter_hash.h"
#include "cpu/simd.h"

namespace seqkern::cpu::attention {

// ------------------------------------------------------------------------------------------------
// Tile GEMM.
// ------------------------------------------------------------------------------------------------
/// One full vector from / to memory (unaligned).
template <typename T>
inline Simd<T> load_vector(const T* p) {
  Simd<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline void store_vector(T* p, Simd<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

/// Register blocks of tile_kernel: at most kTileRows rows x kTileVectors vectors of accumulators.
#if defined(SEQKERN_SIMD_YMM)
// 12 ymm accumulators, B's two vectors of the row and the broadcast: 15 of 16 registers.
constexpr int kTileRows = 6, kTileVectors = 2;
#else
constexpr int kTileRows = 6, kTileVectors = 4;  // 24 of 32 zmm
#endif

/// C[0:MR, 0:NV*L) = A[0:MR, 0:depth) @ B[0:depth, 0:NV*L), or C += that product when kAccumulate.
/// A and B row-major with leading dims lda, ldb (kTransposedA: A stored as its transpose, A[m, k] at a[k * lda + m]);
/// MR x NV accumulators live in registers, B's row is loaded once per k and each A element is broadcast once. The
/// product is summed from zero and added to C at the end, so C, when it accumulates over many tiles (dK, dV over all
/// queries), sums tile partials (two-level summation) rather than one long fp32 chain.
template <typename T, int MR, int NV, bool kAccumulate, bool kTransposedA = false>
inline void tile_kernel(const T* a, int64_t lda, const T* b, int64_t ldb, int64_t depth, T* c, int64_t ldc) {
  using V = Simd<T>;
  constexpr int L = kLanes<T>;
  // Fully unrolled loops let GCC keep acc in registers end to end; without the pragmas it kept a stack
  // copy (zeroed on entry, spilled and reloaded on exit): 6x64x64 fp32 block 457 -> 428 ns best-of-9.
  V acc[MR][NV];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[m][v] = V{};
  for (int64_t k = 0; k < depth; ++k) {
    V w[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) w[v] = load_vector(b + k * ldb + v * L);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const V a_mk = broadcast(kTransposedA ? a[k * lda + m] : a[m * lda + k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[m][v] = fmadd(a_mk, w[v], acc[m][v]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      T* dst = c + m * ldc + v * L;
      store_vector(dst, kAccumulate ? acc[m][v] + load_vector(dst) : acc[m][v]);
    }
}

template <typename T, int NV, bool kAccumulate, bool kTransposedA>
inline void tile_kernel_rows(int rows, const T* a, int64_t lda, const T* b, int64_t ldb, int64_t depth, T* c,
                             int64_t ldc) {
  static_assert(kTileRows == 6);
  switch (rows) {
    case 1: return tile_kernel<T, 1, NV, kAccumulate, kTransposedA>(a, lda, b, ldb, depth, c, ldc);
    case 2: return tile_kernel<T, 2, NV, kAccumulate, kTransposedA>(a, lda, b, ldb, depth, c, ldc);
    case 3: return tile_kernel<T, 3, NV, kAccumulate, kTransposedA>(a, lda, b, ldb, depth, c, ldc);
    case 4: return tile_kernel<T, 4, NV, kAccumulate, kTransposedA>(a, lda, b, ldb, depth, c, ldc);
    case 5: return tile_kernel<T, 5, NV, kAccumulate, kTransposedA>(a, lda, b, ldb, depth, c, ldc);
    default: return tile_kernel<T, 6, NV, kAccumulate, kTransposedA>(a, lda, b, ldb, depth, c, ldc);
  }
}

/// C[:, 0:vectors*L) (+)= A (rows x depth) @ B[:, 0:vectors*L) for vectors <= kTileVectors, cut into balanced row
/// blocks of at most kTileRows (128 rows -> 18 x 6 + 4 x 5 rather than 21 x 6 + a 2-row straggler).
template <typename T, bool kAccumulate, bool kTransposedA>
void tile_gemm_columns(int64_t rows, int vectors, int64_t depth, const T* a, int64_t lda, const T* b, int64_t ldb,
                       T* c, int64_t ldc) {
  const int64_t blocks = (rows + kTileRows - 1) / kTileRows;
  int64_t row = 0;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int block_rows = static_cast<int>((rows - row + (blocks - blk) - 1) / (blocks - blk));
    const T* a_blk = kTransposedA ? a + row : a + row * lda;
    T* c_blk = c + row * ldc;
    // Widths above kTileVectors never occur: std::min keeps them from being instantiated.
    switch (vectors) {
      case 1:
        tile_kernel_rows<T, 1, kAccumulate, kTransposedA>(block_rows, a_blk, lda, b, ldb, depth, c_blk, ldc);
        break;
      case 2:
        tile_kernel_rows<T, std::min(2, kTileVectors), kAccumulate, kTransposedA>(block_rows, a_blk, lda, b, ldb, depth,
                                                                              c_blk, ldc);
        break;
      case 3:
        tile_kernel_rows<T, std::min(3, kTileVectors), kAccumulate, kTransposedA>(block_rows, a_blk, lda, b, ldb, depth,
                                                                              c_blk, ldc);
        break;
      default:
        tile_kernel_rows<T, kTileVectors, kAccumulate, kTransposedA>(block_rows, a_blk, lda, b, ldb, depth, c_blk, ldc);
        break;
    }
    row += block_rows;
  }
}

/// tile_gemm's depth block: every element of its C is the sum, in order, of one FMA chain from zero per block
/// (flash_attention.cpp's output_delta repeats that arithmetic).
constexpr int64_t kTileDepthBlock = 64;

/// C (rows x cols) (+)= A (rows x depth) @ B (depth x cols), all row-major (kTransposedA: A given as its transpose,
/// depth x rows with leading dim lda); cols a multiple of the lane count (callers zero-pad their tiles to it).
/// Column chunks of kTileVectors vectors, then depth blocks of 64, outer; row blocks inner: the B block (64 x 4
/// zmm = 16 KB at avx512) stays in L1 while A's rows stream past it.
/// Depth blocking, forward at L = 1024, 8 heads, one thread (CPU time, best of 10): D = 128 49.8 -> 45.5 ms,
/// D = 64 25.9 -> 24.4 ms (PV has depth kKeyTile = 128).
template <typename T, bool kAccumulate, bool kTransposedA = false>
void tile_gemm(int64_t rows, int64_t cols, int64_t depth, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
               int64_t ldc) {
  constexpr int L = kLanes<T>;
  constexpr int64_t kDepthBlock = kTileDepthBlock;
  for (int64_t col = 0; col < cols; col += kTileVectors * L) {
    const int vectors = static_cast<int>(std::min<int64_t>(kTileVectors, (cols - col) / L));
    for (int64_t k0 = 0; k0 < std::max<int64_t>(depth, 1); k0 += kDepthBlock) {
      const int64_t k1 = std::min(depth, k0 + kDepthBlock);
      const T* a_k0 = kTransposedA ? a + k0 * lda : a + k0;
      if (k0 == 0 && !kAccumulate) {
        tile_gemm_columns<T, false, kTransposedA>(rows, vectors, k1 - k0, a_k0, lda, b + k0 * ldb + col, ldb, c + col,
                                                  ldc);
      } else {
        tile_gemm_columns<T, true, kTransposedA>(rows, vectors, k1 - k0, a_k0, lda, b + k0 * ldb + col, ldb, c + col,
                                                 ldc);
      }
    }
  }
}

/// The first n lanes of v stored to dst in S, rounded once. bfloat16 by vector integer arithmetic, bit for bit
/// c10::BFloat16's round-to-nearest-even (NaN -> 0x7FC0): simd.h's store converts lane by lane, which cost the
/// bf16 forward ~10% of its time writing the output rows.
template <typename S, typename V>
inline void store_rounded(S* dst, V v, int n) {
  if constexpr (std::is_same_v<S, c10::BFloat16> && std::is_same_v<SimdElement<V>, float>) {
    using Bits = SimdTraits<float>::bits;
    typedef uint32_t U32 __attribute__((vector_size(sizeof(Bits))));
    typedef uint16_t U16 __attribute__((vector_size(sizeof(Bits) / 2)));
    U32 x;
    std::memcpy(&x, &v, sizeof(x));
    const U32 rounded = (x + ((x >> 16) & 1u) + 0x7FFFu) >> 16;
    const U32 bits = v != v ? U32{} + 0x7FC0u : rounded;
    const U16 half = __builtin_convertvector(bits, U16);
    std::memcpy(dst, &half, n * sizeof(uint16_t));
  } else {
    store(dst, v, n);
  }
}

/// n rounded up to a multiple of the lane count of T (the padded width of a tile row).
template <typename T>
constexpr int64_t pad_lanes(int64_t n) {
  return (n + kLanes<T> - 1) / kLanes<T> * kLanes<T>;
}

// ------------------------------------------------------------------------------------------------
// exp and the online softmax.
// ------------------------------------------------------------------------------------------------
/// exp of a score minus its row maximum: simd.h's exp_simd, which is exactly 0 for x < -87 (-inf, a masked
/// score, included), so masked keys weigh exactly 0; fp64 lanes: libm.
inline Simd<float> exp_attention(Simd<float> x) { return exp_simd(x); }
inline Simd<double> exp_attention(Simd<double> x) { return exp_simd(x); }

/// Horizontal max / sum of a vector (the AVX-512 reductions: a few shuffles instead of 16 scalar steps).
inline float reduce_max(Simd<float> v) {
#if defined(__AVX512F__)
  return _mm512_reduce_max_ps(v);
#else
  float m = v[0];
  for (int l = 1; l < kLanes<float>; ++l) m = std::max(m, v[l]);
  return m;
#endif
}
inline double reduce_max(Simd<double> v) {
  double m = v[0];
  for (int l = 1; l < kLanes<double>; ++l) m = std::max(m, v[l]);
  return m;
}
inline float reduce_sum(Simd<float> v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(v);
#else
  float s = 0;
  for (int l = 0; l < kLanes<float>; ++l) s += v[l];
  return s;
#endif
}
inline double reduce_sum(Simd<double> v) {
  double s = 0;
  for (int l = 0; l < kLanes<double>; ++l) s += v[l];
  return s;
}

/// The streaming softmax of one query row, advanced by one key tile.
///
/// Over the tiles seen so far the row keeps row_max m = max_j s_j and row_sum l = sum_j exp(s_j - m), and
/// its output accumulator holds sum_j exp(s_j - m) v_j. A new tile's scores s[0:width) (already scaled and
/// masked; -inf where a key is hidden, tile_max their maximum) move the maximum to m' = max(m, tile_max) (unless
/// tile_max <= m + kMaxRiseKept: then m' = m and alpha = 1, see kMaxRiseKept; m is then a bound, not the maximum);
/// the old sums are then off by exp(m - m'), so l' = l exp(m - m') + sum_tile exp(s_j - m'). s is
/// overwritten with exp(s_j - m') and the returned factor alpha = exp(m - m') must rescale the row's output
/// accumulator before the tile's P V is added. A row that has seen only -inf keeps m = -inf, l = 0, and
/// gets p = 0 (never exp(-inf - -inf) = NaN). NaN scores make m, l and alpha NaN (as the reference's out
/// and lse are), also when the maximum, which skips NaN, came out -inf.
/// The running maximum moves only where a tile's maximum rises more than kMaxRiseKept above it. Below that the
/// row keeps its maximum: p reaches e^8 ~ 3000 at most (far from overflow in the fp32 sums and in bf16 P), m + log l
/// is the same log-sum-exp, and the row's sum and output need no rescaling, which in fp32 at L 1024 d128 was a
/// pass over the row's 128 outputs and a libm exp per row and tile (~3% of the forward's samples together).
constexpr float kMaxRiseKept = 8.0f;

/// A row's running maximum after a tile whose maximum is tile_max (kMaxRiseKept): the old one unless the tile rose
/// more than kMaxRiseKept above it, or the row has none yet (-inf). NaN once row_max is NaN. V is a scalar T, or a
/// Simd<T> of rows lane by lane (the key-major forward's next_row_max<Simd<A>, A>).
template <typename V, typename T = V>
inline V next_row_max(V row_max, V tile_max) {
  const auto keep = (row_max != -std::numeric_limits<T>::infinity()) & (tile_max <= row_max + T(kMaxRiseKept));
  return keep ? row_max : (tile_max > row_max ? tile_max : row_max);  // std::max(row_max, tile_max), NaN kept
}

template <typename T>
inline T online_softmax_update(T* s, int64_t width, T tile_max, T& row_max, T& row_sum) {
  using V = Simd<T>;
  const T new_max = next_row_max(row_max, tile_max);
  if (new_max == -std::numeric_limits<T>::infinity()) {
    const bool has_nan = std::any_of(s, s + width, [](T x) { return std::isnan(x); });
    const T value = has_nan ? std::numeric_limits<T>::quiet_NaN() : T(0);
    std::fill(s, s + width, value);
    if (has_nan) row_max = row_sum = value;
    return has_nan ? value : T(1);
  }
  // exp(-inf) = 0 on the first visible tile; a NaN maximum gives a NaN alpha (NaN != NaN).
  const T alpha = new_max == row_max ? T(1) : std::exp(row_max - new_max);
  const V shift = broadcast(new_max);
  V sum{};
  for (int64_t c = 0; c < width; c += kLanes<T>) {
    const V p = exp_attention(load_vector(s + c) - shift);
    sum += p;
    store_vector(s + c, p);
  }
  row_max = new_max;
  row_sum = row_sum * alpha + reduce_sum(sum);
  return alpha;
}

// ------------------------------------------------------------------------------------------------
// Visibility.
// ------------------------------------------------------------------------------------------------
/// csrc/ops.cpp's rule for one sequence of len_q queries and len_k keys: query i sees keys
/// [first_key(i), last_key(i)] (empty when first > last), both non-decreasing in i; and conversely
/// key j is seen by queries [first_query(j), last_query(j)].
struct Visibility {
  int64_t len_q = 0, len_k = 0, shift = 0, window_left = -1, window_right = -1;

  /// Windows wider than len_q + len_k see everything already; they are narrowed to that so that no index
  /// arithmetic below can overflow.
  Visibility(int64_t len_q_, int64_t len_k_, int64_t window_left_, int64_t window_right_, bool bottom_right)
      : len_q(len_q_), len_k(len_k_), shift(bottom_right ? len_k_ - len_q_ : 0),
        window_left(std::min(window_left_, len_q_ + len_k_)), window_right(std::min(window_right_, len_q_ + len_k_)) {}

  int64_t first_key(int64_t i) const { return window_left < 0 ? 0 : std::max<int64_t>(0, i + shift - window_left); }
  int64_t last_key(int64_t i) const {
    return window_right < 0 ? len_k - 1 : std::min<int64_t>(len_k - 1, i + shift + window_right);
  }
  int64_t first_query(int64_t j) const {
    return window_right < 0 ? 0 : std::max<int64_t>(0, j - shift - window_right);
  }
  int64_t last_query(int64_t j) const {
    return window_left < 0 ? len_q - 1 : std::min<int64_t>(len_q - 1, j - shift + window_left);
  }
};

/// Lanes of `index0 + lane` inside [first, last], as a select mask for Simd<T>.
template <typename T>
inline typename SimdTraits<T>::bits lanes_in_range(int64_t index0, int64_t first, int64_t last) {
  using Bits = typename SimdTraits<T>::bits;
  using Lane = SimdElement<Bits>;
  Bits idx{};
  for (int l = 0; l < kLanes<T>; ++l) idx[l] = static_cast<Lane>(l);
  // Clamp the bounds into the lane window so they fit the lane type whatever the sequence length.
  const Lane lo = static_cast<Lane>(std::clamp<int64_t>(first - index0, -1, kLanes<T>));
  const Lane hi = static_cast<Lane>(std::clamp<int64_t>(last - index0, -1, kLanes<T>));
  return (idx >= (Bits{} + lo)) & (idx <= (Bits{} + hi));
}

// ------------------------------------------------------------------------------------------------
// Scheduling.
// ------------------------------------------------------------------------------------------------
/// Workers for `count` items: at most one per thread of at::parallel_for. A worker index < worker_count(count)
/// identifies per-worker scratch: it is used by one thread at a time.
inline int64_t worker_count(int64_t count) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), count));
}

/// [0, count) cut into `parts` contiguous runs, run w = [begin(w), begin(w + 1)), sizes within 1 of each other.
struct Runs {
  int64_t count, parts;
  int64_t begin(int64_t w) const { return w * count / parts; }
  /// The run holding x (0 when count is 0).
  int64_t of(int64_t x) const { return count == 0 ? 0 : ((x + 1) * parts - 1) / count; }
};

/// A per-home item counter of for_each_worker_homed, alone on its cache line: with the workers' counters side by side
/// in one line, every claim moved that line between the cores (forward op b32 h4 L17-32 d32, 2 threads: 1.04x fp32,
/// 1.02-1.03x bf16 once apart; NOTES.md "Round 21").
struct alignas(64) ClaimCounter {
  std::atomic<int64_t> value{0};
};

/// Runs body(worker, item) for items [0, count) over at::parallel_for's threads. Each item has a home worker,
/// home_of(item) < worker_count(count), where its data are hot (the worker packed them). Each worker runs its own
/// items in order, then helps with the others', claiming items from per-home counters: every item runs once,
/// items of unequal cost (the rows of causal attention) balance themselves, and none waits on a descheduled
/// thread. A caller that puts cheap items last lets the workers finish together.
template <typename Home, typename Body>
void for_each_worker_homed(int64_t count, const Home& home_of, const Body& body) {
  if (count <= 0) return;
  const int64_t workers = worker_count(count);
  std::vector<std::vector<int64_t>> own(workers);
  for (int64_t item = 0; item < count; ++item) own[home_of(item)].push_back(item);
  std::unique_ptr<ClaimCounter[]> next(new ClaimCounter[workers]);
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t worker = begin; worker < end; ++worker)
      for (int64_t i = 0; i < workers; ++i) {
        const int64_t home = (worker + i) % workers;
        const int64_t size = static_cast<int64_t>(own[home].size());
        std::atomic<int64_t>& claimed = next[home].value;
        for (int64_t at = claimed.fetch_add(1); at < size; at = claimed.fetch_add(1)) body(worker, own[home][at]);
      }
  });
}

/// As for_each_worker_homed without homes, but worker w runs the fixed items w, w + W, w + 2W, ... (W = worker_count(count)):
/// what a worker accumulates, and in which order, does not depend on timing, so sums over per-worker
/// buffers are reproducible run to run (for a given thread count). Dealt out this way, items sorted by
/// decreasing cost within each head still give every worker a near-equal share.
template <typename Body>
void for_each_worker_strided(int64_t count, const Body& body) {
  if (count <= 0) return;
  const int64_t workers = worker_count(count);
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t worker = begin; worker < end; ++worker)
      for (int64_t item = worker; item < count; item += workers) body(worker, item);
  });
}

/// Indices [0, costs.size()) ordered by decreasing cost (longest-processing-time-first scheduling).
inline std::vector<int64_t> by_decreasing_cost(const std::vector<int64_t>& costs) {
  std::vector<int64_t> order(costs.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return costs[x] > costs[y]; });
  return order;
}

}  // namespace seqkern::cpu::attention
