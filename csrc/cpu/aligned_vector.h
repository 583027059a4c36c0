// std::vector whose storage starts on a 64-byte cache line, for kernel scratch that AMX tiles and AVX-512 vectors
// read and write in 64-byte rows. From malloc (16-byte aligned) every such row of a scratch buffer straddles two
// cache lines, and how many did varied from process to process with the heap's layout: the bf16 attention
// forward's tile products took 13-19% of its samples depending on the run (L 1024, d64, one thread).
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace seqkern::cpu {

constexpr std::size_t kCacheLine = 64;

template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}  // NOLINT: rebinding, as std::allocator
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(kCacheLine)));
  }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(kCacheLine)); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};

/// A std::vector on cache-line-aligned storage.
template <typename T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

}  // namespace seqkern::cpu
