// std::vector whose storage starts on a 64-byte cache line, for kernel scratch that AMX tiles and AVX-512 vectors
// read and write in 64-byte rows. From malloc (16-byte aligned) every such row of a scratch buffer straddles two
// cache lines, and how many did varied from process to process with the heap's layout: the bf16 attention
// forward's tile products took 13-19% of its samples depending on the run (L 1024, d64, one thread).
#pragma once

#include <cstddef>
#include <new>
#include <utility>
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

/// CacheLineAllocator whose construct() without arguments default-initializes (leaves floats unwritten) instead of
/// value-initializing them to zero.
template <typename T>
struct UninitializedCacheLineAllocator : CacheLineAllocator<T> {
  template <typename U>
  struct rebind {
    using other = UninitializedCacheLineAllocator<U>;
  };
  UninitializedCacheLineAllocator() = default;
  template <typename U>
  UninitializedCacheLineAllocator(const UninitializedCacheLineAllocator<U>&) {}  // NOLINT: rebinding
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};

/// An AlignedVector whose `ScratchVector<T> v(n)` leaves its n elements unwritten: for scratch every element of
/// which is written before it is read. Zeroing the attention kernels' per-worker tiles at every call (~300 KB a
/// worker for a forward and backward) took ~4% of a short-sequence training call (b32 h4 L17; NOTES.md "Round 19").
template <typename T>
using ScratchVector = std::vector<T, UninitializedCacheLineAllocator<T>>;

}  // namespace seqkern::cpu
