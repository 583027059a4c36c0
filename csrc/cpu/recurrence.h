// Machinery shared by the CPU recurrent kernels (LSTM now; GRU and Elman RNN reuse it unchanged):
//   * Simd<T>: one 64-byte vector (a zmm register with AVX-512) through GCC vector extensions, with
//     loads/stores that convert from/to the storage dtype (bf16 storage, fp32 arithmetic);
//   * vectorized exp / sigmoid / tanh;
//   * PackedPanels + gemm_packed: a register-blocked micro-kernel for C(M x N) = A(M x K) @ W(K x N),
//     W packed once into panels that a thread keeps hot in its own L2 across all time steps;
//   * split_range / run_persistent / SpinBarrier: a fixed partition of the hidden units over one OpenMP
//     team that lives for the whole time loop, synchronized by one barrier per phase.
// A cell type plugs in by writing its pointwise math on Simd vectors and its per-step phases; nothing
// here knows about gates.
#pragma once

#include <ATen/Parallel.h>
#include <omp.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <thread>
#include <vector>

namespace seqkern::cpu {

// ------------------------------------------------------------------------------------------------
// 64-byte SIMD vectors.
// ------------------------------------------------------------------------------------------------
template <typename T>
struct SimdTraits;
template <>
struct SimdTraits<float> {
  typedef float type __attribute__((vector_size(64)));
  typedef int32_t bits __attribute__((vector_size(64)));
};
template <>
struct SimdTraits<double> {
  typedef double type __attribute__((vector_size(64)));
  typedef int64_t bits __attribute__((vector_size(64)));
};

template <typename T>
using Simd = typename SimdTraits<T>::type;
template <typename T>
constexpr int kLanes = 64 / sizeof(T);

template <typename T>
inline Simd<T> broadcast(T value) {
  return Simd<T>{} + value;
}

/// x in every lane as one vbroadcastss/sd (or the FMA's embedded {1to16} broadcast of a memory operand), where
/// broadcast() (Simd{} + x) compiles to an add and a broadcast: for the inner loops of the attention kernels.
inline Simd<float> splat(float x) {
#if defined(__AVX512F__)
  return _mm512_set1_ps(x);
#else
  return broadcast(x);
#endif
}
inline Simd<double> splat(double x) {
#if defined(__AVX512F__)
  return _mm512_set1_pd(x);
#else
  return broadcast(x);
#endif
}

/// The first n (<= lanes) elements of src converted to Acc; the other lanes are zero.
template <typename Acc, typename Src>
inline Simd<Acc> load(const Src* src, int n = kLanes<Acc>) {
  Simd<Acc> v{};
  if constexpr (std::is_same_v<Acc, Src>) {
    if (n == kLanes<Acc>) {
      std::memcpy(&v, src, sizeof(v));
    } else {
      std::memcpy(&v, src, n * sizeof(Src));
    }
  } else if (n == kLanes<Acc>) {
    for (int l = 0; l < kLanes<Acc>; ++l) v[l] = static_cast<Acc>(src[l]);
  } else {
    for (int l = 0; l < n; ++l) v[l] = static_cast<Acc>(src[l]);
  }
  return v;
}

/// The element type of a Simd vector type.
template <typename V>
using SimdElement = std::decay_t<decltype(std::declval<V>()[0])>;

/// Stores the first n lanes of v into dst, rounded once to the storage dtype Dst.
template <typename Dst, typename V>
inline void store(Dst* dst, V v, int n = kLanes<SimdElement<V>>) {
  using Acc = SimdElement<V>;
  if constexpr (std::is_same_v<Acc, Dst>) {
    if (n == kLanes<Acc>) {
      std::memcpy(dst, &v, sizeof(v));
    } else {
      std::memcpy(dst, &v, n * sizeof(Dst));
    }
  } else if (n == kLanes<Acc>) {
    for (int l = 0; l < kLanes<Acc>; ++l) dst[l] = static_cast<Dst>(v[l]);
  } else {
    for (int l = 0; l < n; ++l) dst[l] = static_cast<Dst>(v[l]);
  }
}

/// dst[0:n) = 0 in any storage dtype.
template <typename Dst>
inline void fill_zero(Dst* dst, int64_t n) {
  std::fill(dst, dst + n, Dst(0));
}

/// a * b + c with one rounding. -std=c++17 (ISO mode) turns GCC's fp-contraction off, so the fused
/// instruction is asked for explicitly.
inline Simd<float> fmadd(Simd<float> a, Simd<float> b, Simd<float> c) {
#if defined(__AVX512F__)
  return _mm512_fmadd_ps(a, b, c);
#else
  return a * b + c;
#endif
}
inline Simd<double> fmadd(Simd<double> a, Simd<double> b, Simd<double> c) {
#if defined(__AVX512F__)
  return _mm512_fmadd_pd(a, b, c);
#else
  return a * b + c;
#endif
}

// ------------------------------------------------------------------------------------------------
// Activations.
// ------------------------------------------------------------------------------------------------
/// e^(x - n ln2) for fp32 lanes, n = round(x / ln2) (|x - n ln2| <= ln2 / 2): Cody-Waite reduction with a
/// two-part ln2, then Cephes expf's degree-6 polynomial (~1 ulp). Callers scale the result by 2^n.
inline Simd<float> exp_reduced(Simd<float> x, Simd<float> n) {
  using V = Simd<float>;
  V r = fmadd(n, broadcast(-0.693359375f), x);
  r = fmadd(n, broadcast(2.12194440e-4f), r);
  V p = broadcast(1.9875691500e-4f);
  p = fmadd(p, r, broadcast(1.3981999507e-3f));
  p = fmadd(p, r, broadcast(8.3334519073e-3f));
  p = fmadd(p, r, broadcast(4.1665795894e-2f));
  p = fmadd(p, r, broadcast(1.6666665459e-1f));
  p = fmadd(p, r, broadcast(5.0000001201e-1f));
  p = fmadd(p, r * r, r + 1.0f);
  return p;
}

/// exp for fp32 lanes (Cephes expf: Cody-Waite reduction, degree-6 polynomial, ~1 ulp). The vector
/// version matters at batch 1: 512 sigmoids (one thread's gates at H = 256) took 1650 ns through scalar
/// std::exp, 200 ns here, beside a ~5 us step.
inline Simd<float> exp_simd(Simd<float> x) {
  using V = Simd<float>;
  using Bits = SimdTraits<float>::bits;
  // Above ln(FLT_MAX) exp is +inf, as std::exp: then sigmoid(-inf) = 1 / (1 + inf) is exactly 0, as torch's,
  // and so is its slope s (1 - s) (a clamped exp(88) left 6e-39 there, and 6e-39 * inf = inf where torch has
  // 0 * inf = NaN in the weight gradient of an infinite input).
  const auto overflow = x > 88.72284f;
  // Written so that a NaN lane fails both comparisons and stays NaN (`x < 88 ? x : 88` would turn it into 88).
  x = x > 88.0f ? broadcast(88.0f) : x;
  x = x < -87.0f ? broadcast(-87.0f) : x;
  const V round_magic = broadcast(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  V n = (x * 1.44269504088896341f + round_magic) - round_magic;
  const V p = exp_reduced(x, n);
  Bits exponent = (__builtin_convertvector(n, Bits) + 127) << 23;
  V scale;
  std::memcpy(&scale, &exponent, sizeof(scale));
  return overflow ? broadcast(std::numeric_limits<float>::infinity()) : p * scale;
}

/// exp for fp64 lanes: libm per lane (the float64 path is for accuracy, not speed).
inline Simd<double> exp_simd(Simd<double> x) {
  for (int l = 0; l < kLanes<double>; ++l) x[l] = std::exp(x[l]);
  return x;
}

template <typename T>
inline Simd<T> sigmoid_simd(Simd<T> x) {
  return T(1) / (T(1) + exp_simd(-x));
}

/// tanh(x) = 2 sigmoid(2x) - 1: absolute error ~1 ulp of 1, which is what the LSTM outputs are judged on.
template <typename T>
inline Simd<T> tanh_simd(Simd<T> x) {
  return T(2) / (T(1) + exp_simd(x * T(-2))) - T(1);
}

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

// ------------------------------------------------------------------------------------------------
// Persistent team.
// ------------------------------------------------------------------------------------------------
struct Range {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t size() const { return end - begin; }
};

/// [0, n) cut into `parts` consecutive ranges whose sizes are multiples of `align` (except the last
/// non-empty one), as equal as that allows. Trailing ranges may be empty.
inline std::vector<Range> split_range(int64_t n, int parts, int64_t align) {
  std::vector<Range> ranges(parts);
  const int64_t chunks = (n + align - 1) / align;
  int64_t begin = 0;
  for (int p = 0; p < parts; ++p) {
    const int64_t my_chunks = chunks / parts + (p < chunks % parts);
    const int64_t end = std::min(n, begin + my_chunks * align);
    ranges[p] = Range{begin, end};
    begin = end;
  }
  return ranges;
}

/// How many threads the persistent loop should use: all of torch's intra-op threads when each of them
/// gets at least `min_work_per_thread` multiply-adds per step and one vector of units, else fewer (a
/// step's barrier and the cross-core hand-over of h cost ~0.5 us; below that much work a second thread
/// costs more than it saves). One thread when already inside a parallel region (OpenMP would not nest).
inline int persistent_thread_count(int64_t work_per_step, int64_t min_work_per_thread, int64_t max_slices) {
  if (omp_in_parallel()) return 1;
  const int64_t by_work = std::max<int64_t>(1, work_per_step / std::max<int64_t>(1, min_work_per_thread));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({at::get_num_threads(), by_work, max_slices})));
}

/// The barrier of a persistent team, used instead of `#pragma omp barrier`: it spins (with pause) rather
/// than sleeping, so a waiting thread keeps its core and leaves ~0.1-0.2 us after the last arrival.
/// Measured with 2 threads (tmp barrier_bench, machine shared with other jobs): libgomp's barrier
/// 2.2-7.6 us, this one 0.12-0.2 us - against a batch-1 step of ~5 us. It yields only after ~2^20 spins
/// (milliseconds), as a last resort on an oversubscribed machine: yielding early is what hurts there
/// (512-step loop at load average 6: 335 ms yielding after 2^14 spins, 60 ms after 2^24).
/// Release/acquire on the generation counter make every write before arrive_and_wait() visible to
/// every thread after it.
class SpinBarrier {
 public:
  void reset(int threads) { threads_ = threads; }

  void arrive_and_wait() {
    const int generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == threads_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.store(generation + 1, std::memory_order_release);
      return;
    }
    constexpr int kSpinsBeforeYield = 1 << 20;
    for (int spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins) {
      if (spins < kSpinsBeforeYield) {
        pause();
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }
  alignas(64) std::atomic<int> arrived_{0};
  alignas(64) std::atomic<int> generation_{0};
  int threads_ = 1;
};

/// Runs body(first_slice, stride, barrier) on one OpenMP team kept for the whole call. The caller cuts
/// its work into a fixed number of slices; slice s belongs to thread s % team_size for the whole run, so
/// what a slice touches (its packed weights, its state columns) stays in that thread's cache. If OpenMP
/// grants fewer threads than planned, a thread serves several slices: body loops
/// `for (s = first_slice; s < slices; s += stride)` in each phase and calls barrier.arrive_and_wait()
/// between phases. No exception may escape body.
template <typename Body>
void run_persistent(int threads, const Body& body) {
  SpinBarrier barrier;
  if (threads <= 1) {
    body(0, 1, barrier);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
#pragma omp single
    barrier.reset(omp_get_num_threads());
    body(omp_get_thread_num(), omp_get_num_threads(), barrier);
  }
}

}  // namespace seqkern::cpu
