// SIMD vectors and the vectorized math every CPU kernel shares (recurrent cells, attention softmax):
//   * Simd<T>: one vector of the level's register width (a zmm at avx512, a ymm at avx2; 64 bytes emulated at the
//     default level) through GCC vector extensions, with loads/stores that convert from/to the storage dtype
//     (bf16 storage, fp32 arithmetic);
//   * Acc<S>: the accumulation dtype of storage dtype S (float for bfloat16);
//   * vectorized exp / sigmoid / tanh (tanh_accurate: ~1 ulp relative, the only tanh: see its comment).
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

namespace seqkern::cpu {

// The vector math below is called per SIMD chunk from the cells' inner loops; GCC left exp_simd and store out of
// line in the engine's LSTM cell (perf: exp_simd 13% of a bf16 layer as its own symbol), and an out-of-line call
// passes every 64-byte vector through the stack.
#define SEQKERN_SIMD_INLINE inline __attribute__((always_inline))

/// The dtype sums and activations run in for storage dtype S.
template <typename S>
using Acc = at::opmath_type<S>;

// ------------------------------------------------------------------------------------------------
// SIMD vectors of the level's register width.
// ------------------------------------------------------------------------------------------------
// 64 bytes (a zmm) at avx512, 32 (a ymm) at avx2. GCC has no machine mode for a 64-byte vector below AVX-512: when
// Simd was 64 bytes at avx2 too, each value of it was a memory object operated on piecewise, its halves moved through
// the stack and general registers (perf on an AMD EPYC Zen 1, 2026-12-07: stack stores and reloads were the top
// instructions of the attention softmax, and a GEMM tile's accumulators lived on the stack). The default level keeps
// 64-byte vectors that GCC emulates (SSE2, NEON: the portable path, not tuned).
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define SEQKERN_SIMD_YMM 1
constexpr int kSimdBytes = 32;
#else
constexpr int kSimdBytes = 64;
#endif
template <typename T>
struct SimdTraits;
template <>
struct SimdTraits<float> {
  typedef float type __attribute__((vector_size(kSimdBytes)));
  typedef int32_t bits __attribute__((vector_size(kSimdBytes)));
};
template <>
struct SimdTraits<double> {
  typedef double type __attribute__((vector_size(kSimdBytes)));
  typedef int64_t bits __attribute__((vector_size(kSimdBytes)));
};

template <typename T>
using Simd = typename SimdTraits<T>::type;
template <typename T>
constexpr int kLanes = kSimdBytes / sizeof(T);

template <typename T>
inline Simd<T> broadcast(T value) {
#if defined(__AVX512F__)
  // One vbroadcastss/sd, from memory when the value is a load (or the FMA's embedded {1to16} operand).
  // `Simd{} + value` compiled to a vaddss and a register vbroadcastss: two uops on the FMA ports per
  // broadcast, which made the recurrent GEMM micro-kernel issue 30 uops on ports 0/5 per k for 20 FMAs
  // (perf annotate, micro_kernel<float, 5, 4>, 2026-12-05).
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_set1_ps(value);
  } else if constexpr (std::is_same_v<T, double>) {
    return _mm512_set1_pd(value);
  } else {
    return Simd<T>{} + value;
  }
#else
  return Simd<T>{} + value;
#endif
}

// bfloat16 <-> float on whole vectors, bit for bit as c10::BFloat16 (widening: the 16 bits on top of a zero
// mantissa tail; narrowing: round to nearest even, NaN -> 0x7FC0). Lane by lane through c10::BFloat16 the
// conversions cost more than the math in the bf16 recurrent loops: the GRU's inference step stored its bf16
// output at ~3 cycles a value (perf: the cell phase ~35% of a b32 h256 layer, as much as the AMX products).
typedef uint16_t Bf16Bits __attribute__((vector_size(kSimdBytes / 2)));
typedef uint32_t Fp32Bits __attribute__((vector_size(kSimdBytes)));

SEQKERN_SIMD_INLINE Simd<float> widen_bf16(const c10::BFloat16* src) {
  Bf16Bits half;
  std::memcpy(&half, src, sizeof(half));
  const Fp32Bits bits = __builtin_convertvector(half, Fp32Bits) << 16;
  Simd<float> v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

SEQKERN_SIMD_INLINE void narrow_to_bf16(c10::BFloat16* dst, Simd<float> v) {
  Fp32Bits bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits = (bits + (((bits >> 16) & 1u) + 0x7FFFu)) >> 16;
  bits = v != v ? Fp32Bits{} + 0x7FC0u : bits;  // NaN lanes (v != v): the canonical quiet NaN, as c10
  const Bf16Bits half = __builtin_convertvector(bits, Bf16Bits);
  std::memcpy(dst, &half, sizeof(half));
}

/// The first n (<= lanes) elements of src converted to Acc; the other lanes are zero.
template <typename Acc, typename Src>
SEQKERN_SIMD_INLINE Simd<Acc> load(const Src* src, int n = kLanes<Acc>) {
  Simd<Acc> v{};
  if constexpr (std::is_same_v<Acc, float> && std::is_same_v<Src, c10::BFloat16>) {
    if (n == kLanes<Acc>) return widen_bf16(src);
  }
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
SEQKERN_SIMD_INLINE void store(Dst* dst, V v, int n = kLanes<SimdElement<V>>) {
  using Acc = SimdElement<V>;
  if constexpr (std::is_same_v<Acc, float> && std::is_same_v<Dst, c10::BFloat16>) {
    if (n == kLanes<Acc>) return narrow_to_bf16(dst, v);
  }
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
#elif defined(SEQKERN_SIMD_YMM)
  return _mm256_fmadd_ps(a, b, c);
#else
  return a * b + c;
#endif
}
inline Simd<double> fmadd(Simd<double> a, Simd<double> b, Simd<double> c) {
#if defined(__AVX512F__)
  return _mm512_fmadd_pd(a, b, c);
#elif defined(SEQKERN_SIMD_YMM)
  return _mm256_fmadd_pd(a, b, c);
#else
  return a * b + c;
#endif
}

// ------------------------------------------------------------------------------------------------
// Activations.
// ------------------------------------------------------------------------------------------------
/// n = round(x / ln2) to the nearest integer, as fp32 lanes (the reduction step of exp and expm1).
SEQKERN_SIMD_INLINE Simd<float> nearest_log2_multiple(Simd<float> x) {
#if defined(__AVX512F__)
  return _mm512_roundscale_ps(x * 1.44269504088896341f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#elif defined(SEQKERN_SIMD_YMM)
  return _mm256_round_ps(x * 1.44269504088896341f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  Simd<float> n;
  for (int l = 0; l < kLanes<float>; ++l) n[l] = std::nearbyint(x[l] * 1.44269504088896341f);
  return n;
#endif
}

/// p * 2^n for integer-valued fp32 lanes n (vscalefps with AVX-512: exact, flushes to 0 / +inf past the
/// exponent range without a select).
SEQKERN_SIMD_INLINE Simd<float> times_pow2(Simd<float> p, Simd<float> n) {
#if defined(__AVX512F__)
  return _mm512_scalef_ps(p, n);
#else
  for (int l = 0; l < kLanes<float>; ++l) p[l] = std::ldexp(p[l], static_cast<int>(n[l]));
  return p;
#endif
}

/// 2^n for integer-valued fp32 lanes n in [-126, 127].
SEQKERN_SIMD_INLINE Simd<float> pow2(Simd<float> n) {
#if defined(__AVX512F__)
  return times_pow2(broadcast(1.0f), n);
#else
  using Bits = SimdTraits<float>::bits;
  const Bits exponent = (__builtin_convertvector(n, Bits) + 127) << 23;
  Simd<float> v;
  std::memcpy(&v, &exponent, sizeof(v));
  return v;
#endif
}

/// e^r - 1 for fp32 lanes, r = x - n ln2 with n = round(x / ln2) (|r| <= ln2 / 2). Full accuracy: Cody-Waite
/// reduction with a two-part ln2, then r + r^2 P(r) with Cephes expf's degree-6 polynomial P (~1 ulp, no
/// cancellation near r = 0). kBf16 (a result stored in bfloat16, 2^-9 relative): one-part ln2 (<= 3e-6 relative
/// at |n| = 150) and r P(r) with a degree-4 P fitted for relative error (5.8e-7 max on |r| <= ln2 / 2): 4
/// instructions fewer per exp, 5 exps per LSTM unit. Callers scale by 2^n: exp_reduced below, tanh_quotient.
template <bool kBf16 = false>
SEQKERN_SIMD_INLINE Simd<float> expm1_reduced(Simd<float> x, Simd<float> n) {
  using V = Simd<float>;
  if constexpr (kBf16) {
    const V r = fmadd(n, broadcast(-0.693147180559945f), x);
    V p = broadcast(8.333317004144192e-3f);
    p = fmadd(p, r, broadcast(4.187510162591934e-2f));
    p = fmadd(p, r, broadcast(1.666693538427353e-1f));
    p = fmadd(p, r, broadcast(4.999937713146210e-1f));
    p = fmadd(p, r, broadcast(9.999999403953552e-1f));
    return p * r;
  } else {
    V r = fmadd(n, broadcast(-0.693359375f), x);
    r = fmadd(n, broadcast(2.12194440e-4f), r);
    V p = broadcast(1.9875691500e-4f);
    p = fmadd(p, r, broadcast(1.3981999507e-3f));
    p = fmadd(p, r, broadcast(8.3334519073e-3f));
    p = fmadd(p, r, broadcast(4.1665795894e-2f));
    p = fmadd(p, r, broadcast(1.6666665459e-1f));
    p = fmadd(p, r, broadcast(5.0000001201e-1f));
    return fmadd(p, r * r, r);
  }
}

/// e^(x - n ln2) for fp32 lanes (see expm1_reduced). Callers scale the result by 2^n.
template <bool kBf16 = false>
SEQKERN_SIMD_INLINE Simd<float> exp_reduced(Simd<float> x, Simd<float> n) {
  return expm1_reduced<kBf16>(x, n) + 1.0f;
}

/// exp for fp32 lanes (Cephes expf: Cody-Waite reduction, degree-6 polynomial, ~1 ulp). The vector
/// version matters at batch 1: 512 sigmoids (one thread's gates at H = 256) took 1650 ns through scalar
/// std::exp, 200 ns here, beside a ~5 us step.
/// Above ln(FLT_MAX) exp is +inf, as std::exp: then sigmoid(-inf) = 1 / (1 + inf) is exactly 0, as torch's, and
/// so is its slope s (1 - s) (a clamped exp(88) left 6e-39 there, and 6e-39 * inf = inf where torch has
/// 0 * inf = NaN in the weight gradient of an infinite input). Exactly 0 below -87 (-inf included; e^-87 is
/// 1.6e-38, just above the smallest normal fp32), so that a masked attention score, -inf minus the row maximum,
/// weighs exactly 0; no result is ever denormal. NaN stays NaN.
/// kBf16: the bfloat16-result accuracy of expm1_reduced.
template <bool kBf16 = false>
SEQKERN_SIMD_INLINE Simd<float> exp_simd(Simd<float> x) {
  using V = Simd<float>;
#if defined(__AVX512F__)
  // x clamped to [-87, 89] keeps n = round(x / ln2) in [-126, 128], where vscalefps gives normal results or +inf
  // (the attention kernels' exp had this form; the cells' had the form below): 18 instructions against 24. The
  // lanes below -87 are zeroed after, not left to vscalefps: a result that underflows (denormal, or rounded to
  // 0) costs a microcode assist per instruction, and a causal attention backward at L 64 (its diagonal tiles
  // half masked) spent 60% of its time in them (2026-12-07, Intel Xeon model 167). vminps / vmaxps return their
  // second operand when one is NaN: x goes second; a NaN lane is kept (the comparison is unordered-true).
  const __mmask16 kept = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_NLT_UQ);
  x = _mm512_max_ps(_mm512_set1_ps(-87.0f), _mm512_min_ps(_mm512_set1_ps(89.0f), x));
  const V n = nearest_log2_multiple(x);
  return _mm512_maskz_mov_ps(kept, times_pow2(exp_reduced<kBf16>(x, n), n));
#else
  const auto overflow = x > 88.72284f, underflow = x < -87.33654f;
  // Written so that a NaN lane fails both comparisons and stays NaN (`x < 88 ? x : 88` would turn it into 88).
  x = x > 88.0f ? broadcast(88.0f) : x;
  x = x < -87.0f ? broadcast(-87.0f) : x;
  const V round_magic = broadcast(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  V n = (x * 1.44269504088896341f + round_magic) - round_magic;
  const V p = exp_reduced<kBf16>(x, n);
  const V result = overflow ? broadcast(std::numeric_limits<float>::infinity()) : p * pow2(n);
  return underflow ? V{} : result;
#endif
}

/// exp for fp64 lanes: libm per lane (the float64 path is for accuracy, not speed).
SEQKERN_SIMD_INLINE Simd<double> exp_simd(Simd<double> x) {
  for (int l = 0; l < kLanes<double>; ++l) x[l] = std::exp(x[l]);
  return x;
}

/// 1 / x for fp32 lanes: the division (correctly rounded), or with kApprox one vrcp14ps (~2^-14 relative; exact
/// at powers of 2, 0 at inf, NaN at NaN) at avx512 (the division elsewhere). vrcp14ps + one Newton step for the
/// fp32 cells (within 0.53 ulp) measured no faster than the division (LSTM inference b32, one thread, 2026-12-05).
template <bool kApprox>
SEQKERN_SIMD_INLINE Simd<float> reciprocal(Simd<float> x) {
#if defined(__AVX512F__)
  if constexpr (kApprox) return _mm512_rcp14_ps(x);
#endif
  return 1.0f / x;
}

template <typename T>
SEQKERN_SIMD_INLINE Simd<T> sigmoid_simd(Simd<T> x) {
  return T(1) / (T(1) + exp_simd(-x));
}

/// num / den, kept apart so that a product of activations costs one division (the LSTM's i tanh(g) and
/// o tanh(c): 3 divisions per 16 units instead of 5).
template <typename A>
struct Quotient {
  Simd<A> num, den;
};

template <typename A>
SEQKERN_SIMD_INLINE Quotient<A> operator*(const Quotient<A>& a, const Quotient<A>& b) {
  return {a.num * b.num, a.den * b.den};
}

/// num / den rounded once, or with kApproxReciprocal num times one vrcp14ps of den (~2^-14 relative).
template <bool kApproxReciprocal, typename A>
SEQKERN_SIMD_INLINE Simd<A> value(const Quotient<A>& q) {
  if constexpr (kApproxReciprocal) {
    return q.num * reciprocal<true>(q.den);
  } else {
    return q.num / q.den;
  }
}

/// tanh(x) as a quotient for fp32 lanes (tanh_accurate divides it: small *relative* error everywhere, small |x|
/// included, one exp-like evaluation and one division, or with kApproxReciprocal one vrcp14ps, ~2^-14 relative,
/// for bfloat16 storage). With a = min(|x|, 9.1) (tanh(9.1) rounds to 1 in fp32) and e = expm1(2a) >= 0,
///   tanh(x) = sign(x) e / (e + 2),
/// no cancellation anywhere: 2a = n ln2 + r (Cody-Waite), e = 2^n (e^r - 1) + (2^n - 1), e^r - 1 = expm1_reduced,
/// 2^n - 1 exact. Against float64 tanh on every 7th fp32 in [-12, 12]: max 2.4 ulp, max abs error 8.9e-8, mean
/// 0.09 ulp (torch.tanh fp32: 3.1e-8 abs). Why these properties (issue 13): 2 sigmoid(2x) - 1 has ~1 ulp of 1
/// *absolute* error everywhere (1.5e-7 at small |x| where torch's is ~1e-9), and the gradients amplify it where
/// tanh saturates (1 - t^2 from a t a few ulps off): the Elman RNN missed the 2x rule on fp32 gradients with it,
/// and the LSTM ran at median 2.3x torch.nn's float32 output error on small saturated samples.
/// Cost: the Cephes form it replaces (odd polynomial below 0.625, else 1 - 2 / (exp(2|x|) + 1), both evaluated
/// and one selected) took ~95 cycles per 16 LSTM units with three sigmoids, this one ~75 (cell microbenchmark,
/// one thread, data in L1; NOTES.md "Round 6"). Additive attention's tanh is this one too (it was expm1(-2a),
/// e in (-1, 0]: 1.5e-7 abs error, the quotient doubling e's relative error near |x| = 1..3).
template <bool kBf16 = false>
SEQKERN_SIMD_INLINE Quotient<float> tanh_quotient(Simd<float> x) {
  using V = Simd<float>;
  using Bits = SimdTraits<float>::bits;
  const Bits sign_mask = Bits{} + static_cast<int32_t>(0x80000000u);
  Bits x_bits;
  std::memcpy(&x_bits, &x, sizeof(x));
  const Bits abs_bits = x_bits & ~sign_mask;
  V a;
  std::memcpy(&a, &abs_bits, sizeof(a));
  a = a > 9.1f ? broadcast(9.1f) : a;  // NaN fails the test and passes through to a NaN result
  const V y = a + a;
  const V n = nearest_log2_multiple(y);
  const V two_n = pow2(n);
  const V e = fmadd(two_n, expm1_reduced<kBf16>(y, n), two_n - 1.0f);
  Bits e_bits;
  std::memcpy(&e_bits, &e, sizeof(e));
  e_bits |= x_bits & sign_mask;  // e >= 0: x's sign by one OR
  V signed_e;
  std::memcpy(&signed_e, &e_bits, sizeof(signed_e));
  return {signed_e, e + 2.0f};
}

/// fp64 lanes: libm per lane (the float64 path is for accuracy, not speed), over 1.
SEQKERN_SIMD_INLINE Quotient<double> tanh_quotient(Simd<double> x) {
  for (int l = 0; l < kLanes<double>; ++l) x[l] = std::tanh(x[l]);
  return {x, broadcast(1.0)};
}

/// kBf16: for a result stored in bfloat16 (expm1_reduced's polynomial, vrcp14ps instead of the division).
template <bool kBf16 = false>
SEQKERN_SIMD_INLINE Simd<float> tanh_accurate(Simd<float> x) {
  return value<kBf16>(tanh_quotient<kBf16>(x));
}

/// fp64 lanes: libm per lane (tanh_quotient's numerator, over 1).
SEQKERN_SIMD_INLINE Simd<double> tanh_accurate(Simd<double> x) {
  return tanh_quotient(x).num;
}

/// sigmoid and tanh of a recurrent cell whose results are stored in dtype S. float / double storage: the forms
/// above (the correctness rule holds them to torch's float32 error). bfloat16 storage rounds every result to
/// 2^-9 relative, so there the exps take expm1_reduced's shorter polynomial (5.8e-7 relative) and one vrcp14ps
/// (2^-14) replaces each division (an LSTM unit has three: its products i tanh(g) and o tanh(c) are formed as
/// quotients, lstm.cpp's lstm_cell_math). Why: perf of a bf16 LSTM inference layer (b32 t100 h256, one thread,
/// 2026-12-05) had the cell at 28% of the samples against 15% for its AMX products.
template <typename S>
struct CellActivations {
  static constexpr bool kApprox = std::is_same_v<S, c10::BFloat16>;

  template <typename A>
  static SEQKERN_SIMD_INLINE Quotient<A> sigmoid_quotient(Simd<A> x) {
    if constexpr (std::is_same_v<A, float>) {
      return {broadcast(1.0f), 1.0f + exp_simd<kApprox>(-x)};
    } else {
      return {broadcast(A(1)), A(1) + exp_simd(-x)};
    }
  }

  template <typename A>
  static SEQKERN_SIMD_INLINE Quotient<A> tanh_quotient(Simd<A> x) {
    if constexpr (std::is_same_v<A, float>) {
      return seqkern::cpu::tanh_quotient<kApprox>(x);
    } else {
      return seqkern::cpu::tanh_quotient(x);
    }
  }

  template <typename A>
  static SEQKERN_SIMD_INLINE Simd<A> value(const Quotient<A>& q) {
    return seqkern::cpu::value<kApprox>(q);
  }

  template <typename A>
  static SEQKERN_SIMD_INLINE Simd<A> sigmoid(Simd<A> x) {
    return value(sigmoid_quotient<A>(x));
  }

  template <typename A>
  static SEQKERN_SIMD_INLINE Simd<A> tanh(Simd<A> x) {
    return value(tanh_quotient<A>(x));
  }
};

#if defined(__x86_64__) || defined(_M_X64)
/// The mask of the first n lanes of a 16-lane vector (none for n <= 0, all for n >= 16): masked loads and stores of
/// a row's ragged end.
inline __mmask16 lane_mask(int64_t n) {
  return n <= 0 ? __mmask16(0) : n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1);
}

// ------------------------------------------------------------------------------------------------
// 16 x 16 transposes of 32-bit elements (packing GEMM operands).
// ------------------------------------------------------------------------------------------------
/// r[i] lane j <- r[j] lane i: a 16 x 16 block of 32-bit elements (floats, or bf16 pairs) transposed in registers
/// (unpack pairs, then pairs of pairs, then 128-bit lanes twice). Compiled for AVX-512 whatever the build level:
/// call it only from AVX-512 code (the avx512 level, or functions targeting it).
inline __attribute__((always_inline, target("avx512f"))) void transpose_16x16(__m512 r[16]) {
  __m512 t[16];
  for (int j = 0; j < 16; j += 2) {
    t[j] = _mm512_unpacklo_ps(r[j], r[j + 1]);
    t[j + 1] = _mm512_unpackhi_ps(r[j], r[j + 1]);
  }
  for (int j = 0; j < 16; j += 4)
    for (int h = 0; h < 2; ++h) {
      const __m512d a = _mm512_castps_pd(t[j + h]), b = _mm512_castps_pd(t[j + h + 2]);
      r[j + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      r[j + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    }
  for (int j = 0; j < 16; j += 8)
    for (int q = 0; q < 4; ++q) {
      t[j + q] = _mm512_shuffle_f32x4(r[j + q], r[j + q + 4], 0x88);
      t[j + q + 4] = _mm512_shuffle_f32x4(r[j + q], r[j + q + 4], 0xdd);
    }
  for (int q = 0; q < 8; ++q) {
    r[q] = _mm512_shuffle_f32x4(t[q], t[q + 8], 0x88);
    r[q + 8] = _mm512_shuffle_f32x4(t[q], t[q + 8], 0xdd);
  }
}
#endif

}  // namespace seqkern::cpu
