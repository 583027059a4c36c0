// The counter-based random bits of seqkern/reference/flash_attention.py's dropout_bits, bit for bit: a pure
// function of (seed, head, row, column), so a backward redraws a mask instead of storing it. Drawn by the
// attention dropout (flash_attention.cpp: head, query, key) and by zoneout (state_flags.h: state index, time
// step, row * width + unit; seqkern/reference/_scan.py's zoneout_keep).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu/simd.h"

namespace seqkern::cpu {

/// uint32 lanes matching the lane count of T (16 for float, 8 for double).
template <typename T>
struct HashLanes {
  typedef uint32_t type __attribute__((vector_size(4 * kLanes<T>)));
};

/// seqkern/reference/flash_attention.py's dropout_bits, on uint32 (the reference's int64 arithmetic
/// reduced mod 2^32, identical while the head index stays below 2^32):
///   head_key = mix(mix(seed_lo ^ head) ^ seed_hi), row_key = mix(head_key ^ i),
///   bits = mix(row_key ^ (j * 0x9E3779B1)); kept iff bits >= threshold = min(floor(p 2^32), 2^32 - 1).
struct DropoutHash {
  uint32_t seed_lo = 0, seed_hi = 0, threshold = 0;

  DropoutHash() = default;
  DropoutHash(int64_t seed, double p)
      : seed_lo(static_cast<uint32_t>(static_cast<uint64_t>(seed))),
        seed_hi(static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32)),
        threshold(static_cast<uint32_t>(std::min<double>(std::floor(p * 4294967296.0), 4294967295.0))) {}

  template <typename U>
  static U mix(U x) {  // lowbias32, on a scalar or a vector of uint32
    x ^= x >> 16;
    x *= 0x21F0AAADu;
    x ^= x >> 15;
    x *= 0xD35A2D97u;
    return x ^ (x >> 15);
  }
  uint32_t head_key(int64_t head) const {
    return mix(mix(seed_lo ^ static_cast<uint32_t>(head)) ^ seed_hi);
  }
  static uint32_t row_key(uint32_t head_key, int64_t i) { return mix(head_key ^ static_cast<uint32_t>(i)); }

  /// row_key of rows i0 + l for the lanes l of T.
  template <typename T>
  static typename HashLanes<T>::type row_keys(uint32_t head_key, int64_t i0) {
    using U = typename HashLanes<T>::type;
    U i{};
    for (int l = 0; l < kLanes<T>; ++l) i[l] = static_cast<uint32_t>(i0 + l);
    return mix<U>((U{} + head_key) ^ i);
  }

  /// The bits of (row_key, columns j0 + l) for the lanes l of T.
  template <typename T>
  static typename HashLanes<T>::type row_bits(uint32_t row_key, int64_t j0) {
    using U = typename HashLanes<T>::type;
    U j{};
    for (int l = 0; l < kLanes<T>; ++l) j[l] = static_cast<uint32_t>(j0 + l);
    return mix<U>((U{} + row_key) ^ (j * 0x9E3779B1u));
  }

  /// Lanes l of (row_key[l], column j) kept? as a lane mask usable with Simd<T> selects.
  template <typename T>
  typename SimdTraits<T>::bits keep(typename HashLanes<T>::type row_keys, uint32_t j) const {
    using U = typename HashLanes<T>::type;
    const U bits = mix<U>(row_keys ^ (U{} + j * 0x9E3779B1u));
    return __builtin_convertvector(bits >= (U{} + threshold), typename SimdTraits<T>::bits);
  }
  /// Lanes l of (row i, columns j0 + l) kept?
  template <typename T>
  typename SimdTraits<T>::bits keep_row(uint32_t row_key, int64_t j0) const {
    using U = typename HashLanes<T>::type;
    return __builtin_convertvector(row_bits<T>(row_key, j0) >= (U{} + threshold), typename SimdTraits<T>::bits);
  }
};

}  // namespace seqkern::cpu
