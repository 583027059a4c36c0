// Flash decoding on CPU: a few queries (Lq = 1..16) against a long KV cache (flash_attention_decode).
// Contract in csrc/ops.cpp; oracle in seqkern/reference/flash_attention.py (flash_attention_decode).
//
// Decode is bound by reading the cache, so the work is cut so that every cache row is read once:
//   * a work item is (sequence b, kv head h, split s). It serves all R = G * Lq query rows that read kv
//     head h (the G = Hq / Hkv query heads of its group, Lq queries each), so K and V rows are streamed once
//     per group rather than once per query head (4x less traffic at 32 query heads over 8 kv heads);
//   * the keys a sequence's queries can see, [first visible, cache_seqlens[b]), are cut into num_splits
//     chunks, one per item, processed in parallel by at::parallel_for over (b, h, s);
//   * an item walks its chunk in blocks of kBlockKeys keys: scores (R x block) = (scale Q) K^T from register
//     tiles, the visibility mask at the block edges, an online softmax (running max m, sum l), then
//     acc (R x Dv) += P V. It leaves the partial (m, l, acc) in a buffer;
//   * a merge pass combines the partials of the splits through their log-sum-exp:
//     lse = M + log sum_s l_s e^(m_s - M),  out = sum_s e^(m_s - M) acc_s / sum_s l_s e^(m_s - M).
// float32 and bfloat16 (bf16 storage) compute in float32, float64 in float64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu/aligned_vector.h"
#include "cpu/attention.h"
#include "cpu/arg_checks.h"

namespace seqkern::cpu {
namespace {

constexpr ArgChecker kCheck{"flash_attention_decode", /*accepts_float16=*/true};

/// Keys per block of the online softmax: a block of K (then of V) rows, 64 x 128 fp32 = 32 KB, stays in
/// L1/L2 while the query tiles pass over it, and the per-row softmax bookkeeping is spread over 64 keys.
/// 16, 32, 128 and 256 measured no better (within the noise of the shared machine); 128 again no better
/// with the prefetch below (92-93 ns per row single thread, as 64).
constexpr int64_t kBlockKeys = 64;
/// num_splits = 0 aims at this many work items per thread. Threads claim items one at a time, so with ~8
/// per thread a thread slowed by a neighbour (shared machine) or a longer sequence costs at most ~1/8 of
/// the time, where 1 item per thread would wait for the slowest.
constexpr int64_t kItemsPerThread = 8;
/// ... but no chunk below this many keys: an item's fixed costs (copying R query rows, writing and merging
/// an R x Dv partial) are then a small share of streaming its chunk of K and V.
constexpr int64_t kMinChunkKeys = 256;
/// Software prefetch distance: while scoring key j, the K row of the key this many bytes of K rows ahead
/// is requested into L2, and while accumulating value row j, the V row as far ahead (Prefetch). The
/// hardware prefetchers alone do not run far enough ahead to overlap the DRAM latency with the FMAs.
/// Intel Xeon (AMX), one thread, process CPU time per call at the headline shape, interleaved with a
/// 2-thread-capable read probe (`sum` over the same bytes), loaded machine: fp32 without prefetch 0.62-0.68x
/// the probe's rate, 128 KB ahead 0.72-0.78x, 16 KB ahead 0.74-0.83x; bf16 0.49x / 0.66x / 0.69x. 4 KB and
/// 32 KB measured as 16 KB, 512 KB as none. (Earlier, on AMD: 64 KB alike, prefetcht0 no better than none.)
constexpr int64_t kPrefetchBytes = 16 * 1024;

// ------------------------------------------------------------------------------------------------
// Sizes, visibility and splits.
// ------------------------------------------------------------------------------------------------
struct DecodeShape {
  int64_t batch, q_heads, kv_heads, group, len_q, seq, head_dim, value_dim;
  int64_t rows() const { return group * len_q; }  // query rows of one work item: row r = g * Lq + i
};

/// [begin, end) of key indices.
struct KeyRange {
  int64_t begin = 0, end = 0;
  int64_t size() const { return std::max<int64_t>(0, end - begin); }
};

/// The contract's visibility rule: query i of a sequence of `length` keys sits at p = length - Lq + i and
/// sees keys [p - window_left (if window_left >= 0), p] (is_causal) of [0, length).
struct Visibility {
  int64_t len_q;
  bool causal;
  int64_t window_left;

  KeyRange keys(int64_t length, int64_t i) const {
    const int64_t p = length - len_q + i;
    const int64_t begin = window_left >= 0 ? std::max<int64_t>(0, p - window_left) : 0;
    const int64_t end = causal ? std::clamp<int64_t>(p + 1, 0, length) : length;
    return {begin, std::max(begin, end)};
  }
  /// The keys any of the Lq queries sees (both bounds grow with i).
  KeyRange union_keys(int64_t length) const {
    return {keys(length, 0).begin, keys(length, len_q - 1).end};
  }
};

/// num_splits = 0: enough items to balance the threads (kItemsPerThread), no chunk under kMinChunkKeys.
/// B=1, Hkv=8, 2 threads, S=32768 -> 2 splits (16 items); B=8, S=4096 -> 1 split (64 items).
/// num_splits > 0 is taken as given, except that more chunks than keys would only add empty ones.
int64_t choose_splits(int64_t num_splits, const DecodeShape& d, int64_t longest) {
  if (num_splits > 0) return std::max<int64_t>(1, std::min(num_splits, longest));
  const int64_t items = std::max<int64_t>(1, d.batch * d.kv_heads);
  const int64_t by_threads = (kItemsPerThread * at::get_num_threads() + items - 1) / items;
  const int64_t by_length = std::max<int64_t>(1, longest / kMinChunkKeys);
  return std::max<int64_t>(1, std::min(by_threads, by_length));
}

// ------------------------------------------------------------------------------------------------
// SIMD pieces.
// ------------------------------------------------------------------------------------------------
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
/// 16 bfloat16 bit patterns (uint16 lanes) widened to fp32: zero-extend, shift left by 16.
typedef uint16_t U16x16 __attribute__((vector_size(32)));
typedef uint32_t U32x16 __attribute__((vector_size(64)));
inline Simd<float> widen_bf16(U16x16 half) {
  const U32x16 word = __builtin_convertvector(half, U32x16) << 16;
  Simd<float> v;
  std::memcpy(&v, &word, sizeof(v));
  return v;
}
#endif

/// The first n (<= lanes) elements of a row as A, the other lanes zero. Whole vectors are plain loads
/// (bfloat16 widened by two vector instructions, where recurrence.h's load converts lane by lane), partial
/// ones masked loads: recurrence.h's memcpy of n elements made GCC keep value_panel's 16 accumulators on
/// the stack across the whole key loop (stored and reloaded every key: 2x slower at Dv = 128).
template <typename A, typename T>
inline Simd<A> load_row(const T* src, int n = kLanes<A>) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  const auto mask = static_cast<uint16_t>(n >= 16 ? 0xFFFF : (1u << n) - 1);
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return widen_bf16(reinterpret_cast<U16x16>(_mm256_maskz_loadu_epi16(mask, src)));
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, src));
  } else if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(mask, src);
  } else {
    return _mm512_maskz_loadu_pd(static_cast<uint8_t>(mask), src);
  }
#else
  return load<A>(src, n);
#endif
}


/// Index `t` of a fold at width W (see lane_sums): lanes [0, L/2) take a's sources, [L/2, L) b's; source
/// u / (W/2) of a vector sits at lanes [u/(W/2) * W, ... + W), `half` picks its low (0) or high (W/2) half.
constexpr int fold_index(int width, int lanes, int t, int half) {
  const int from_b = t >= lanes / 2 ? 1 : 0;
  const int u = t - from_b * lanes / 2;
  return from_b * lanes + (u / (width / 2)) * width + u % (width / 2) + half;
}

template <int W, typename V, size_t... I>
inline V fold_pair(V a, V b, std::index_sequence<I...>) {
  constexpr int L = sizeof...(I);
  return __builtin_shufflevector(a, b, fold_index(W, L, I, 0)...) +
         __builtin_shufflevector(a, b, fold_index(W, L, I, W / 2)...);
}

/// v[0:W) each hold L/W partial sums of W lanes; folds them into v[0:W/2) of 2L/W sums of W/2 lanes.
template <typename A, int W>
inline void fold_level(Simd<A>* v) {
#pragma GCC unroll 8
  for (int k = 0; k < W / 2; ++k) v[k] = fold_pair<W>(v[2 * k], v[2 * k + 1], std::make_index_sequence<kLanes<A>>{});
  if constexpr (W > 2) fold_level<A, W / 2>(v);
}

/// Lane i of the result = the sum of the lanes of v[i] (kLanes vectors; v is clobbered). A halving tree
/// of L - 1 folds (2 shuffles + 1 add each): 45 instructions for 16 dot products, against ~9 each for 16
/// separate horizontal sums.
template <typename A>
inline Simd<A> lane_sums(Simd<A>* v) {
  fold_level<A, kLanes<A>>(v);
  return v[0];
}


/// Requests the `bytes` bytes from `row` into L2 (prefetcht1), one request per 64-byte line. A row that
/// does not start on a line boundary leaves its last partial line to the next row's requests (contiguous
/// rows) or to the demand load.
inline void prefetch_l2(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(p + offset, 0, 2);
}

/// The value rows' prefetch, issued from the value products' key loop so that requests keep flowing while
/// the core computes P V (issued with the K rows' during the scores, the memory sat idle through P V).
/// Value row j of a block prefetches row j + ahead while that is among the `left` keys of the chunk
/// (counted from the block's first key); left = 0 turns it off (all but one pass over the block).
struct Prefetch {
  int64_t ahead = 0, left = 0, row_bytes = 0;

  template <typename T>
  void row(const T* v_row, int64_t j, int64_t v_stride) const {
    if (j + ahead < left) prefetch_l2(v_row + ahead * v_stride, row_bytes);
  }
  /// Only the first panel of a row's columns prefetches: one request per line.
  Prefetch first_panel(int64_t column) const { return column == 0 ? *this : Prefetch{}; }
};

// ------------------------------------------------------------------------------------------------
// The two products of a block.
// ------------------------------------------------------------------------------------------------
/// scores[r][j] = q_r . k_j for RT query rows and KT = L / RT keys: RT x KT vector accumulators along the
/// head dim, reduced to one vector by lane_sums.
///   q: RT rows of `dim` (zero-padded to whole vectors, read from L1 as FMA operands), leading dim q_ld;
///   keys: KT row pointers.
/// The cache rows are read one after the other, each from start to end, rather than vector d of all KT rows
/// in turn (which would keep the q vectors in registers): the hardware prefetchers follow the sequential
/// order much better. Single thread, K and V streamed from memory with trivial compute: 17 GB/s in
/// sequential order, 9-10 GB/s reading 4 rows interleaved; the kernel, same-process pairs against SDPA
/// (B=1, 32 over 8 heads, S=32768, fp32, loaded machine): 4.8-4.9x in this order, 3.8-3.9x interleaved.
template <typename A, typename T, int RT>
inline void score_tile(const A* q, int64_t q_ld, const T* const* keys, int64_t dim, A* scores, int64_t s_ld) {
  constexpr int L = kLanes<A>, KT = L / RT;
  Simd<A> acc[L];
#pragma GCC unroll 16
  for (int t = 0; t < L; ++t) acc[t] = broadcast(A(0));
#pragma GCC unroll 16
  for (int j = 0; j < KT; ++j) {
    for (int64_t d = 0; d < dim; d += L) {
      const Simd<A> kv = load_row<A>(keys[j] + d, static_cast<int>(std::min<int64_t>(L, dim - d)));
#pragma GCC unroll 4
      for (int r = 0; r < RT; ++r) acc[r * KT + j] = fmadd(load<A>(q + r * q_ld + d), kv, acc[r * KT + j]);
    }
  }
  const Simd<A> sums = lane_sums<A>(acc);
  for (int r = 0; r < RT; ++r) std::memcpy(scores + r * s_ld, reinterpret_cast<const A*>(&sums) + r * KT, KT * sizeof(A));
}

/// acc[r][0 : NV*L) += sum_j p[r][j] w_j for RT rows over `keys` value rows, w_j the NV vectors load_row_vectors
/// makes of row j (its columns in the loader's order: RowVectors in column order, the chunked loader of the
/// AVX-512 path in chunk order). RT x NV accumulators stay in registers across the keys.
template <typename A, typename T, int RT, int NV, typename LoadRowVectors>
inline void value_panel(const A* p, int64_t p_ld, const T* v, int64_t v_stride, int64_t keys, A* acc, int64_t acc_ld,
                        const Prefetch& ahead, const LoadRowVectors& load_row_vectors) {
  constexpr int L = kLanes<A>;
  Simd<A> o[RT][NV];
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r)
#pragma GCC unroll 4
    for (int x = 0; x < NV; ++x) o[r][x] = load<A>(acc + r * acc_ld + x * L);
  for (int64_t j = 0; j < keys; ++j) {
    const T* row = v + j * v_stride;
    ahead.row(row, j, v_stride);
    Simd<A> w[NV];
    load_row_vectors(row, w);
#pragma GCC unroll 4
    for (int r = 0; r < RT; ++r) {
      const Simd<A> pr = broadcast(p[r * p_ld + j]);
#pragma GCC unroll 4
      for (int x = 0; x < NV; ++x) o[r][x] = fmadd(pr, w[x], o[r][x]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r)
#pragma GCC unroll 4
    for (int x = 0; x < NV; ++x) store(acc + r * acc_ld + x * L, o[r][x]);
}

/// value_panel's row loader in column order: NV vectors, the last with `last` lanes (the head dim's tail).
template <typename A, int NV>
struct RowVectors {
  int last;
  template <typename T>
  void operator()(const T* row, Simd<A>* w) const {
    constexpr int L = kLanes<A>;
#pragma GCC unroll 4
    for (int x = 0; x < NV; ++x) w[x] = load_row<A>(row + x * L, x == NV - 1 ? last : L);
  }
};

/// acc (RT x value_dim, padded to whole vectors) += p (RT x keys) @ V (keys x value_dim), panels of 4 vectors.
template <typename A, typename T, int RT>
inline void value_tile(const A* p, int64_t p_ld, const T* v, int64_t v_stride, int64_t keys, int64_t value_dim,
                       A* acc, int64_t acc_ld, const Prefetch& ahead) {
  constexpr int L = kLanes<A>, kPanel = 4 * L;
  for (int64_t c = 0; c < value_dim; c += kPanel) {
    const int64_t width = std::min<int64_t>(kPanel, value_dim - c);
    const int vectors = static_cast<int>((width + L - 1) / L);
    const int last = static_cast<int>(width - (vectors - 1) * L);
    const T* vc = v + c;
    A* ac = acc + c;
    const Prefetch pf = ahead.first_panel(c);
    switch (vectors) {
      case 1: value_panel<A, T, RT, 1>(p, p_ld, vc, v_stride, keys, ac, acc_ld, pf, RowVectors<A, 1>{last}); break;
      case 2: value_panel<A, T, RT, 2>(p, p_ld, vc, v_stride, keys, ac, acc_ld, pf, RowVectors<A, 2>{last}); break;
      case 3: value_panel<A, T, RT, 3>(p, p_ld, vc, v_stride, keys, ac, acc_ld, pf, RowVectors<A, 3>{last}); break;
      default: value_panel<A, T, RT, 4>(p, p_ld, vc, v_stride, keys, ac, acc_ld, pf, RowVectors<A, 4>{last}); break;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// The AVX-512 products for float32 and bfloat16 caches: rows read in chunks of 32 elements.
// ------------------------------------------------------------------------------------------------
// A chunk of a cache row is loaded as two fp32 vectors. float32: columns [0, 16) and [16, 32), two plain
// loads. bfloat16: ONE 64-byte load, then the even columns (a bf16 is the high half of its fp32: shift
// left by 16) and the odd ones (mask off the low half): 2 instructions per 32 elements where widening
// in order takes 4 and two loads. The bf16 columns thus come in the order (0, 2, .., 30, 1, 3, .., 31);
// the products do not mind: q is stored in the same order (a dot product is a sum over columns), and the
// value accumulators keep it until the merge puts the output row back in column order (chunk_column).
constexpr int kChunk = 32;

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
template <typename T>
constexpr bool kChunked = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>;
#else
template <typename T>
constexpr bool kChunked = false;  // other levels and dtypes: score_tile / value_tile above
#endif

/// The column of a row held at position p (0..31) of its chunk's two vectors.
template <typename T>
constexpr int64_t chunk_column(int64_t p) {
  if constexpr (kChunked<T> && std::is_same_v<T, c10::BFloat16>) return p < 16 ? 2 * p : 2 * (p - 16) + 1;
  return p;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
/// Columns [0, 32) of src as two fp32 vectors (a, b) in chunk order; only the first n (>= 1) exist, the
/// others read as 0 (masked loads: never past the row).
inline void load_chunk(const float* src, int n, Simd<float>& a, Simd<float>& b) {
  if (n >= kChunk) {
    a = _mm512_loadu_ps(src);
    b = _mm512_loadu_ps(src + 16);
  } else {
    a = _mm512_maskz_loadu_ps(lane_mask(n), src);
    b = _mm512_maskz_loadu_ps(lane_mask(n - 16), src + 16);
  }
}
inline void load_chunk(const c10::BFloat16* src, int n, Simd<float>& a, Simd<float>& b) {
  const __m512i x = n >= kChunk ? _mm512_loadu_si512(src)
                                : _mm512_maskz_loadu_epi16(static_cast<__mmask32>((uint64_t(1) << n) - 1), src);
  a = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
  b = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

/// scores[r][j] = q_r . k_j for RT query rows and KT = 16 / RT keys, as score_tile, but q-stationary: per
/// chunk of the head dim, the RT rows' two q vectors are loaded once into registers and serve the KT keys
/// (2 RT + 2 loads per 2 RT KT FMAs; score_tile reloads q for every key: 1.25 loads per FMA, which made
/// the score loop load-bound). The KT rows are read a chunk of each in turn: the software prefetch
/// (block_scores) has them in L2 by then, so the interleaving does not reach the hardware prefetchers.
///   q: RT rows of dim_pad (chunk order, zero-padded to whole chunks), leading dim q_ld.
template <typename T, int RT>
inline void score_tile_chunked(const float* q, int64_t q_ld, const T* const* keys, int64_t dim, float* scores,
                               int64_t s_ld) {
  constexpr int L = kLanes<float>, KT = L / RT;
  Simd<float> acc[L];
#pragma GCC unroll 16
  for (int t = 0; t < L; ++t) acc[t] = broadcast(0.0f);
  for (int64_t d = 0; d < dim; d += kChunk) {
    const int n = static_cast<int>(std::min<int64_t>(kChunk, dim - d));
    Simd<float> qa[RT], qb[RT];
#pragma GCC unroll 4
    for (int r = 0; r < RT; ++r) {
      qa[r] = _mm512_loadu_ps(q + r * q_ld + d);
      qb[r] = _mm512_loadu_ps(q + r * q_ld + d + 16);
    }
#pragma GCC unroll 16
    for (int j = 0; j < KT; ++j) {
      Simd<float> ka, kb;
      load_chunk(keys[j] + d, n, ka, kb);
#pragma GCC unroll 4
      for (int r = 0; r < RT; ++r) acc[r * KT + j] = fmadd(qb[r], kb, fmadd(qa[r], ka, acc[r * KT + j]));
    }
  }
  const Simd<float> sums = lane_sums<float>(acc);
  for (int r = 0; r < RT; ++r)
    std::memcpy(scores + r * s_ld, reinterpret_cast<const float*>(&sums) + r * KT, KT * sizeof(float));
}

/// value_panel's row loader in chunk order (load_chunk): NC chunks as 2 NC vectors, the last chunk with `last`
/// columns.
template <int NC>
struct ChunkVectors {
  int last;
  template <typename T>
  void operator()(const T* row, Simd<float>* w) const {
#pragma GCC unroll 2
    for (int c = 0; c < NC; ++c) load_chunk(row + c * kChunk, c == NC - 1 ? last : kChunk, w[2 * c], w[2 * c + 1]);
  }
};

/// value_tile in chunk order: panels of 2 chunks (64 columns, 4 RT accumulators).
template <typename T, int RT>
inline void value_tile_chunked(const float* p, int64_t p_ld, const T* v, int64_t v_stride, int64_t keys,
                               int64_t value_dim, float* acc, int64_t acc_ld, const Prefetch& ahead) {
  constexpr int64_t kPanel = 2 * kChunk;
  for (int64_t c = 0; c < value_dim; c += kPanel) {
    const int64_t width = std::min<int64_t>(kPanel, value_dim - c);
    const int last = static_cast<int>(width > kChunk ? width - kChunk : width);
    const Prefetch pf = ahead.first_panel(c);
    if (width > kChunk) {
      value_panel<float, T, RT, 4>(p, p_ld, v + c, v_stride, keys, acc + c, acc_ld, pf, ChunkVectors<2>{last});
    } else {
      value_panel<float, T, RT, 2>(p, p_ld, v + c, v_stride, keys, acc + c, acc_ld, pf, ChunkVectors<1>{last});
    }
  }
}
#endif

// ------------------------------------------------------------------------------------------------
// One work item: a chunk of keys of one (sequence, kv head) for its R query rows.
// ------------------------------------------------------------------------------------------------
/// Strided views of the inputs (element strides; stride(-1) == 1).
template <typename T>
struct Inputs {
  const T* q;
  const T* k;
  const T* v;
  int64_t q_stride[3], k_stride[3], v_stride[3];
};

/// Where an item leaves its partial: running max m and sum l per row (R), unnormalized acc (R_pad x Dv_pad).
template <typename A>
struct Partial {
  A* m;
  A* l;
  A* acc;
};

/// Per-thread buffers: the item's scaled query rows (R_pad x D_pad, zero padding) and one block of
/// scores / probabilities (R_pad x kBlockKeys).
template <typename A>
struct Scratch {
  AlignedVector<A> q, scores;
};

template <typename T, int RT>
class ChunkAttention {
 public:
  using A = Acc<T>;
  static constexpr int L = kLanes<A>;
  static constexpr int KT = L / RT;
  /// q rows and acc rows are padded to whole chunks on the chunked path, to whole vectors otherwise.
  static constexpr int64_t kPad = kChunked<T> ? kChunk : L;

  ChunkAttention(const DecodeShape& d, const Inputs<T>& in, const Visibility& vis, A scale)
      : d_(d), in_(in), vis_(vis), scale_(scale), rows_pad_((d.rows() + RT - 1) / RT * RT),
        dim_pad_((d.head_dim + kPad - 1) / kPad * kPad),
        prefetch_keys_(std::max<int64_t>(KT, kPrefetchBytes / std::max<int64_t>(1, d.head_dim * int64_t(sizeof(T))))) {}

  int64_t rows_pad() const { return rows_pad_; }

  Scratch<A> scratch() const {
    return {AlignedVector<A>(rows_pad_ * dim_pad_, A(0)), AlignedVector<A>(rows_pad_ * kBlockKeys, A(0))};
  }

  /// Attends the R query rows of (b, h) to keys `chunk` of a sequence of `length` keys; leaves (m, l, acc).
  void run(int64_t b, int64_t h, int64_t length, KeyRange chunk, Scratch<A>& s, const Partial<A>& out) const {
    const int64_t R = d_.rows();
    std::fill(out.m, out.m + R, -std::numeric_limits<A>::infinity());
    std::fill(out.l, out.l + R, A(0));
    std::fill(out.acc, out.acc + rows_pad_ * acc_ld(), A(0));
    if (chunk.size() == 0) return;
    load_queries(b, h, s.q.data());
    const T* k = in_.k + b * in_.k_stride[0] + h * in_.k_stride[1];
    const T* v = in_.v + b * in_.v_stride[0] + h * in_.v_stride[1];
    for (int64_t j0 = chunk.begin; j0 < chunk.end; j0 += kBlockKeys) {
      const int64_t n = std::min(kBlockKeys, chunk.end - j0);
      block_scores(s.q.data(), k + j0 * in_.k_stride[2], n, chunk.end - j0, s.scores.data());
      for (int64_t r = 0; r < R; ++r)
        softmax_row(vis_.keys(length, r % d_.len_q), j0, n, s.scores.data() + r * kBlockKeys, out, r);
      for (int64_t r = 0; r < rows_pad_; r += RT)
        value_block(s.scores.data() + r * kBlockKeys, v + j0 * in_.v_stride[2], n, out.acc + r * acc_ld(),
                    r == 0 ? chunk.end - j0 : 0);  // the first row tile's pass prefetches
    }
  }

  int64_t acc_ld() const { return (d_.value_dim + kPad - 1) / kPad * kPad; }

 private:
  /// q rows g * Lq + i <- scale * q[b, h * G + g, i, :] in A, in chunk order (chunk_column), zero-padded
  /// (rows and head dim).
  void load_queries(int64_t b, int64_t h, A* q) const {
    for (int64_t r = 0; r < d_.rows(); ++r) {
      const T* src = in_.q + b * in_.q_stride[0] + (h * d_.group + r / d_.len_q) * in_.q_stride[1] +
                     (r % d_.len_q) * in_.q_stride[2];
      // In chunk order: in a bf16 head dim's last partial chunk, positions past head_dim hold odd columns.
      for (int64_t c = 0; c < dim_pad_; ++c) {
        const int64_t column = c / kChunk * kChunk + chunk_column<T>(c % kChunk);
        q[r * dim_pad_ + c] = column < d_.head_dim ? static_cast<A>(src[column]) * scale_ : A(0);
      }
    }
  }

  /// scores (R_pad x kBlockKeys) <- q K^T for the n keys at `k`. Key tiles outside, query tiles inside: a
  /// tile's KT cache rows are read from memory once and stay in L1 for all R / RT query tiles. Keys past n
  /// in the last tile read row 0 of the block instead (never out of bounds); their scores are unused.
  /// Each tile also prefetches the K rows prefetch_keys_ ahead (kPrefetchBytes), while they are among the
  /// `left` keys of the chunk that start at `k` (the V rows: value_block).
  void block_scores(const A* q, const T* k, int64_t n, int64_t left, A* scores) const {
    for (int64_t j = 0; j < n; j += KT) {
      for (int t = 0; t < KT && j + t + prefetch_keys_ < left; ++t) {
        prefetch_l2(k + (j + t + prefetch_keys_) * in_.k_stride[2], d_.head_dim * int64_t(sizeof(T)));
      }
      const T* keys[KT];
      for (int t = 0; t < KT; ++t) keys[t] = k + (j + t < n ? j + t : 0) * in_.k_stride[2];
      for (int64_t r = 0; r < rows_pad_; r += RT)
        score_block_tile(q + r * dim_pad_, keys, scores + r * kBlockKeys + j);
    }
  }

  /// The score tile of RT query rows (q) and KT keys into `scores` (leading dim kBlockKeys).
  void score_block_tile(const A* q, const T* const* keys, A* scores) const {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    if constexpr (kChunked<T>) {
      score_tile_chunked<T, RT>(q, dim_pad_, keys, d_.head_dim, scores, kBlockKeys);
      return;
    }
#endif
    score_tile<A, T, RT>(q, dim_pad_, keys, d_.head_dim, scores, kBlockKeys);
  }

  /// acc (RT rows, leading dim acc_ld()) += p (RT x n, leading dim kBlockKeys) @ the n value rows at v.
  /// Prefetches the V rows prefetch_keys_ ahead while they are among the `left` keys (0: none).
  void value_block(const A* p, const T* v, int64_t n, A* acc, int64_t left) const {
    const Prefetch ahead{prefetch_keys_, left, d_.value_dim * int64_t(sizeof(T))};
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    if constexpr (kChunked<T>) {
      value_tile_chunked<T, RT>(p, kBlockKeys, v, in_.v_stride[2], n, d_.value_dim, acc, acc_ld(), ahead);
      return;
    }
#endif
    value_tile<A, T, RT>(p, kBlockKeys, v, in_.v_stride[2], n, d_.value_dim, acc, acc_ld(), ahead);
  }

  /// One row's online-softmax step over the block of keys [j0, j0 + n): masks the keys the query does not
  /// see (-inf), turns scores into p = exp(s - m_new) in place (zeros past n, for value_tile's whole
  /// vectors), and rescales the row's l and acc by exp(m_old - m_new).
  void softmax_row(KeyRange seen, int64_t j0, int64_t n, A* row, const Partial<A>& out, int64_t r) const {
    constexpr A kNegInf = -std::numeric_limits<A>::infinity();
    const int64_t width = (n + L - 1) / L * L;
    if (n < width || j0 < seen.begin || j0 + n > seen.end) {  // only blocks at the edges need the mask
      for (int64_t j = 0; j < width; ++j)
        if (j >= n || j0 + j < seen.begin || j0 + j >= seen.end) row[j] = kNegInf;
    }
    Simd<A> vmax = broadcast(kNegInf);
    for (int64_t j = 0; j < width; j += L) {
      const Simd<A> x = load<A>(row + j);
      vmax = x > vmax ? x : vmax;
    }
    A m_new = out.m[r];
    for (int l = 0; l < L; ++l) m_new = std::max(m_new, vmax[l]);
    if (m_new == kNegInf) {  // nothing seen yet: p = 0 (the -inf scores must not reach exp(-inf + inf))
      // ... unless the maximum skipped NaN scores: then the row is NaN from here on (m, l and p), as torch's.
      const bool has_nan = std::any_of(row, row + width, [](A x) { return std::isnan(x); });
      std::fill(row, row + width, has_nan ? std::numeric_limits<A>::quiet_NaN() : A(0));
      if (has_nan) out.m[r] = out.l[r] = std::numeric_limits<A>::quiet_NaN();
      return;
    }
    Simd<A> vsum{};
    for (int64_t j = 0; j < width; j += L) {
      const Simd<A> p = attention::exp_attention(load<A>(row + j) - m_new);
      store(row + j, p);
      vsum += p;
    }
    A sum = 0;
    for (int l = 0; l < L; ++l) sum += vsum[l];
    const A alpha = std::exp(out.m[r] - m_new);  // 0 when m_old = -inf
    out.m[r] = m_new;
    out.l[r] = out.l[r] * alpha + sum;
    if (alpha != A(1)) {
      A* acc = out.acc + r * acc_ld();
      for (int64_t c = 0; c < acc_ld(); c += L) store(acc + c, load<A>(acc + c) * alpha);
    }
  }

  DecodeShape d_;
  Inputs<T> in_;
  Visibility vis_;
  A scale_;
  int64_t rows_pad_, dim_pad_;
  int64_t prefetch_keys_;  // kPrefetchBytes of K rows, in keys
};

// ------------------------------------------------------------------------------------------------
// Driver: split, attend in parallel, merge.
// ------------------------------------------------------------------------------------------------
/// out[b, h*G + g, i, :] and lse[...] for row r = g * Lq + i of (b, h) from the partials of its splits. The
/// scalar bookkeeping (weights, their total, the log) runs in double whatever A: it costs nothing here and
/// keeps the fp32 lse within ~0.5 ulp after many splits (500 splits in fp32 gave 1.7 ulp).
template <typename T>
void merge_splits(const DecodeShape& d, int64_t splits, int64_t acc_ld, int64_t rows_pad, const Acc<T>* m,
                  const Acc<T>* l, const Acc<T>* acc, T* out, Acc<T>* lse, int64_t b, int64_t h) {
  using A = Acc<T>;
  constexpr int L = kLanes<A>;
  constexpr double kNegInf = -std::numeric_limits<double>::infinity();
  const int64_t R = d.rows(), item0 = (b * d.kv_heads + h) * splits;
  std::vector<A> merged(acc_ld), natural(acc_ld);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t head = h * d.group + r / d.len_q, i = r % d.len_q;
    T* dst = out + ((b * d.q_heads + head) * d.len_q + i) * d.value_dim;
    A* lse_dst = lse + (b * d.q_heads + head) * d.len_q + i;
    double top = kNegInf;
    for (int64_t s = 0; s < splits; ++s) top = std::max<double>(top, m[(item0 + s) * R + r]);
    if (top == kNegInf) {  // the query sees no key: 0; or every split it saw was NaN (the max skips NaN): NaN
      bool has_nan = false;
      for (int64_t s = 0; s < splits; ++s) has_nan |= std::isnan(m[(item0 + s) * R + r]);
      const A value = has_nan ? std::numeric_limits<A>::quiet_NaN() : A(0);
      std::fill(dst, dst + d.value_dim, static_cast<T>(value));
      *lse_dst = has_nan ? value : static_cast<A>(top);
      continue;
    }
    std::fill(merged.begin(), merged.end(), A(0));
    double total = 0;
    for (int64_t s = 0; s < splits; ++s) {
      const int64_t item = item0 + s;
      // 0 for an empty split (m = -inf, acc = 0). Not skipped when 0: a split whose weight underflows may
      // hold NaN values (p = 0 times a NaN value row), which reach the output as in torch's 0 * NaN.
      const double weight = std::exp(m[item * R + r] - top);
      total += weight * l[item * R + r];
      const A* src = acc + (item * rows_pad + r) * acc_ld;
      for (int64_t c = 0; c < acc_ld; c += L)
        store(merged.data() + c, fmadd(broadcast(static_cast<A>(weight)), load<A>(src + c), load<A>(merged.data() + c)));
    }
    if constexpr (chunk_column<T>(1) != 1) {  // acc rows in chunk order (bf16): back to column order
      for (int64_t c = 0; c < acc_ld; ++c) natural[c / kChunk * kChunk + chunk_column<T>(c % kChunk)] = merged[c];
      std::swap(merged, natural);
    }
    const A inv = static_cast<A>(1 / total);
    for (int64_t c = 0; c < d.value_dim; c += L)
      store(dst + c, load<A>(merged.data() + c) * inv, static_cast<int>(std::min<int64_t>(L, d.value_dim - c)));
    *lse_dst = static_cast<A>(top + std::log(total));
  }
}

template <typename T, int RT>
void decode(const DecodeShape& d, const Inputs<T>& in, const Visibility& vis, const int32_t* seqlens, double scale,
            int64_t num_splits, at::Tensor& out, at::Tensor& lse) {
  using A = Acc<T>;
  auto length = [&](int64_t b) { return seqlens ? static_cast<int64_t>(seqlens[b]) : d.seq; };
  int64_t longest = 0;
  for (int64_t b = 0; b < d.batch; ++b) longest = std::max(longest, vis.union_keys(length(b)).size());
  const int64_t splits = choose_splits(num_splits, d, longest);
  const int64_t items = d.batch * d.kv_heads * splits, R = d.rows();

  const ChunkAttention<T, RT> attend(d, in, vis, static_cast<A>(scale));
  const int64_t rows_pad = attend.rows_pad(), acc_ld = attend.acc_ld();
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value);
  at::Tensor m = at::empty({items, R}, opts), l = at::empty({items, R}, opts);
  at::Tensor acc = at::empty({items, rows_pad, acc_ld}, opts);
  A* m_ptr = m.data_ptr<A>();
  A* l_ptr = l.data_ptr<A>();
  A* acc_ptr = acc.data_ptr<A>();

  // at::parallel_for over the items, which each thread then claims one at a time from a shared counter
  // rather than walking the fixed range it was handed: on a shared machine a thread that gets descheduled
  // would otherwise hold its half of the items hostage (headline case, same-process ratio to SDPA at load
  // average 4-6: 3.7-4.0x with fixed ranges, 4.5x claiming).
  std::atomic<int64_t> next_item{0};
  at::parallel_for(0, items, 1, [&](int64_t, int64_t) {
    Scratch<A> scratch = attend.scratch();
    for (int64_t item; (item = next_item.fetch_add(1, std::memory_order_relaxed)) < items;) {
      const int64_t s = item % splits, bh = item / splits, b = bh / d.kv_heads, h = bh % d.kv_heads;
      const KeyRange keys = vis.union_keys(length(b));
      // Chunk s of `splits` near-equal consecutive chunks of the visible keys.
      const int64_t first = keys.begin + s * keys.size() / splits, last = keys.begin + (s + 1) * keys.size() / splits;
      attend.run(b, h, length(b), {first, last}, scratch,
                 {m_ptr + item * R, l_ptr + item * R, acc_ptr + item * rows_pad * acc_ld});
    }
  });
  at::parallel_for(0, d.batch * d.kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh)
      merge_splits<T>(d, splits, acc_ld, rows_pad, m_ptr, l_ptr, acc_ptr, out.data_ptr<T>(), lse.data_ptr<A>(),
                      bh / d.kv_heads, bh % d.kv_heads);
  });
}

// ------------------------------------------------------------------------------------------------
// The op.
// ------------------------------------------------------------------------------------------------
void check_attention_tensor(const at::Tensor& t, const at::Tensor& like, const char* name, const char* layout) {
  kCheck.supported_dtype(t, name);
  kCheck.dtype_device(t, like, name);
  TORCH_CHECK(t.dim() == 4, "seqkern flash_attention_decode (CPU): ", name, " must be ", layout, ", got ", t.sizes());
  TORCH_CHECK(t.numel() == 0 || t.stride(3) == 1 || t.size(3) <= 1, "seqkern flash_attention_decode (CPU): ", name,
              " must have stride(-1) == 1, got strides ", t.strides());
}

DecodeShape check_decode_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                              const std::optional<at::Tensor>& cache_seqlens, int64_t num_splits) {
  check_attention_tensor(q, q, "q", "(B, Hq, Lq, D)");
  check_attention_tensor(k_cache, q, "k_cache", "(B, Hkv, S, D)");
  check_attention_tensor(v_cache, q, "v_cache", "(B, Hkv, S, Dv)");
  const int64_t B = q.size(0), Hq = q.size(1), Hkv = k_cache.size(1), S = k_cache.size(2);
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, "seqkern flash_attention_decode (CPU): the query heads (", Hq,
              ") must be a multiple of the kv heads (", Hkv, ")");
  kCheck.shape(k_cache, {B, Hkv, S, q.size(3)}, "k_cache");
  kCheck.shape(v_cache, {B, Hkv, S, v_cache.size(3)}, "v_cache");
  TORCH_CHECK(num_splits >= 0, "seqkern flash_attention_decode (CPU): num_splits must be >= 0, got ", num_splits);
  if (cache_seqlens.has_value()) {
    const at::Tensor& lens = *cache_seqlens;
    TORCH_CHECK(lens.device().is_cpu() && lens.scalar_type() == at::kInt,
                "seqkern flash_attention_decode (CPU): cache_seqlens must be an int32 CPU tensor, got ",
                lens.scalar_type(), " on ", lens.device());
    kCheck.shape(lens, {B}, "cache_seqlens");
    const at::Tensor c = lens.contiguous();
    const int32_t* data = c.data_ptr<int32_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(data[b] >= 0 && data[b] <= S, "seqkern flash_attention_decode (CPU): cache_seqlens[", b, "] = ",
                  data[b], " is outside [0, ", S, "] (S = k_cache.size(2))");
  }
  return {B, Hq, Hkv, Hq / Hkv, q.size(2), S, q.size(3), v_cache.size(3)};
}

template <typename T>
Inputs<T> strided_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return {q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(),
          {q.stride(0), q.stride(1), q.stride(2)},
          {k.stride(0), k.stride(1), k.stride(2)},
          {v.stride(0), v.stride(1), v.stride(2)}};
}

std::tuple<at::Tensor, at::Tensor> flash_attention_decode_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                                              const at::Tensor& v_cache,
                                                              const std::optional<at::Tensor>& cache_seqlens,
                                                              double scale, bool is_causal, int64_t window_left,
                                                              int64_t num_splits) {
  const DecodeShape d = check_decode_args(q, k_cache, v_cache, cache_seqlens, num_splits);
  at::Tensor out = at::empty({d.batch, d.q_heads, d.len_q, d.value_dim}, q.options());
  const auto lse_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor lse = at::empty({d.batch, d.q_heads, d.len_q}, q.options().dtype(lse_dtype));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  const at::Tensor lens = cache_seqlens.has_value() ? cache_seqlens->contiguous() : at::Tensor();
  const int32_t* seqlens = lens.defined() ? lens.data_ptr<int32_t>() : nullptr;
  const Visibility vis{d.len_q, is_causal, window_left};
  // Query rows per register tile: 4 (16 scores per tile in fp32) whenever an item has 4 rows or more.
  const int64_t R = d.rows();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "flash_attention_decode", [&] {
    const Inputs<scalar_t> in = strided_inputs<scalar_t>(q, k_cache, v_cache);
    if (R >= 4) {
      decode<scalar_t, 4>(d, in, vis, seqlens, scale, num_splits, out, lse);
    } else if (R >= 2) {
      decode<scalar_t, 2>(d, in, vis, seqlens, scale, num_splits, out, lse);
    } else {
      decode<scalar_t, 1>(d, in, vis, seqlens, scale, num_splits, out, lse);
    }
  });
  return {out, lse};
}

}  // namespace
}  // namespace seqkern::cpu

TORCH_LIBRARY_IMPL(seqkern, CPU, m) {
  m.impl("flash_attention_decode", &seqkern::cpu::flash_attention_decode_cpu);
}
