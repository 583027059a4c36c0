// Run-time CPU feature checks for the code paths that use instructions beyond the capability level the
// file was compiled for (AVX512-BF16 dot products, AMX tiles). Such code is compiled with a function-level
// __attribute__((target(...))) and must only be called after the matching check below returned true:
// the Intel Xeons here have both, AMD Zen 4 has AVX512-BF16 and no AMX, older AVX-512 CPUs have neither.
#pragma once

#include "cpu/simd.h"  // SEQKERN_SIMD_YMM

// Whether this level compiles the bf16 units' code (AVX512-BF16 dot products, AMX tiles). It is written for
// 64-byte Simd vectors: compiled at the avx512 and default levels, not at avx2, whose Simd is one ymm vector
// (simd.h's SEQKERN_SIMD_YMM). A CPU with the units runs the avx512 level unless forced lower; at avx2 bf16
// computes at fp32 speed.
#if (defined(__x86_64__) || defined(_M_X64)) && !defined(SEQKERN_SIMD_YMM)
#define SEQKERN_BF16_UNITS 1
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace seqkern::cpu {

#if defined(SEQKERN_BF16_UNITS)
namespace detail {

/// cpuid leaf 7 sub-leaf `sub`: registers {eax, ebx, ecx, edx}, zeros where the leaf does not exist.
inline void cpuid7(unsigned sub, unsigned regs[4]) {
  regs[0] = regs[1] = regs[2] = regs[3] = 0;
  if (__get_cpuid_max(0, nullptr) >= 7) __cpuid_count(7, sub, regs[0], regs[1], regs[2], regs[3]);
}

/// Whether the OS saves the ZMM (AVX-512) state: XCR0 bits 1, 2, 5, 6, 7.
inline bool os_saves_zmm() {
  unsigned a, b, c, d;
  __cpuid(1, a, b, c, d);
  if (!(c & (1u << 27))) return false;  // OSXSAVE
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (lo & 0xE6u) == 0xE6u;
}

/// Linux hands out the AMX tile-data state only to a process that asks for it (arch_prctl
/// ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 18); without it the first tile instruction faults.
inline bool request_amx_permission() {
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

inline bool detect_avx512bf16() {
  unsigned leaf0[4], leaf1[4];
  cpuid7(0, leaf0);
  cpuid7(1, leaf1);
  const bool avx512f = leaf0[1] & (1u << 16);
  return avx512f && (leaf1[0] & (1u << 5)) && os_saves_zmm();
}

inline bool detect_amx_bf16() {
  unsigned leaf0[4];
  cpuid7(0, leaf0);
  const bool amx_bf16 = leaf0[3] & (1u << 22), amx_tile = leaf0[3] & (1u << 24);
  return amx_bf16 && amx_tile && request_amx_permission();
}

}  // namespace detail

/// The CPU (and OS) can run AVX512-BF16 instructions (vdpbf16ps, vcvtne2ps2bf16).
inline bool has_avx512bf16() {
  static const bool value = detail::detect_avx512bf16();
  return value;
}

/// The CPU can run AMX-BF16 tile instructions and this process has the kernel's permission to.
inline bool has_amx_bf16() {
  static const bool value = detail::detect_amx_bf16();
  return value;
}
#else
inline bool has_avx512bf16() { return false; }
inline bool has_amx_bf16() { return false; }
#endif

}  // namespace seqkern::cpu
