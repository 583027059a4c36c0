// Tensors of the recurrent engine (its op-internal temporaries: gates_x, d_gates, packed weights; and its large
// results: the output, the saved workspaces, grad_input) from blocks cached across calls, so that steady-state
// training does not map, fault in and zero fresh pages for them on every call (issue 14 item 2). c10's CPU
// allocator does not cache: glibc serves blocks this large by mmap or from a heap top it trims, and a call then
// pays page faults, memory-cgroup charging and the kernel's zeroing of each page again.
//
// The pool is a c10::Allocator and its tensors are ordinary CPU tensors whose storage names it as allocator and
// is resizable, as at::empty's: `out.resize_()` past the block reallocates through the pool (and copies), a
// smaller size keeps the block, `set_()` and in-place ops behave as on torch.nn's outputs. A storage owns its
// block through its DataPtr, whose deleter hands the block back when the last reference dies (a result saved
// for backward, or kept by the user, keeps its block until then): a block is never handed out while any tensor
// still points into it. Blocks are reported to the profiler as allocated while a storage holds them and freed
// when it lets go, so the benchmarks' peak memory counts them as if they came from c10's allocator.
//
// Idle blocks stay resident up to a cap (bytes; $SEQKERN_WORKSPACE_CACHE_MB, default 128 MB, read once by
// seqkern/memory.py at import; 0 turns pooling off: every tensor then comes from at::empty) and are given back
// to the system by seqkern.empty_cache(). The C entry points at the end of workspace_pool.cpp are what Python
// calls (through ctypes: they are not ops, so nothing about them reaches the dispatcher or torch.compile).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/TensorOptions.h>

#include <atomic>
#include <cstddef>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace seqkern::cpu {

class WorkspacePool final : public c10::Allocator {
 public:
  /// Idle bytes kept at most unless configured: a few layers' worth at the benchmark shapes (a GRU training step
  /// at b32 t100 h256 cycles ~55 MB of blocks); a block that would push the idle total past it is freed.
  static constexpr size_t kDefaultMaxCachedBytes = size_t{128} << 20;
  /// Requests below this size go to c10's allocator: glibc serves them from its heap without faults.
  static constexpr size_t kMinPooledBytes = size_t{256} << 10;

  /// The process's pool (never destroyed: storages may hand blocks back at exit).
  static WorkspacePool& instance();

  /// An uninitialized contiguous CPU tensor of `sizes` and `options`' dtype, its storage from the pool (or from
  /// at::empty when pooling is off or the request is small).
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options);

  /// c10::Allocator: `bytes` from an idle block of at least that size (at most twice), else a fresh one; small
  /// requests and all of them with pooling off are c10's CPU allocator's. Also what a pooled storage's resize_
  /// calls.
  c10::DataPtr allocate(size_t bytes) override;
  void copy_data(void* dest, const void* src, std::size_t count) const override;

  /// Idle bytes held now.
  size_t cached_bytes();
  /// The cap on idle bytes (0: pooling off).
  size_t max_cached_bytes() const { return max_cached_bytes_.load(std::memory_order_relaxed); }
  /// Sets the cap and frees idle blocks past it.
  void set_max_cached_bytes(size_t bytes);
  /// Frees idle blocks until at most `keep` idle bytes remain; returns the bytes freed. Blocks in use are
  /// untouched (they come back to the pool, or are freed past the cap, when their storage dies).
  size_t trim(size_t keep);

 private:
  struct Block {
    void* data;
    size_t bytes;
  };

  WorkspacePool() = default;
  bool pooled(size_t bytes) const { return bytes >= kMinPooledBytes && max_cached_bytes() > 0; }
  void* acquire(size_t bytes);
  void release(void* data);
  /// The DataPtr deleter of pooled blocks.
  static void give_back(void* data) { instance().release(data); }
  /// Tells the profiler (profile_memory=True) that a block became live or was freed.
  static void report(const Block& block, bool allocated);

  std::mutex mutex_;
  std::vector<Block> idle_;
  std::unordered_map<void*, size_t> live_;  // block address -> its size, for blocks a storage holds
  size_t cached_bytes_ = 0;
  std::atomic<size_t> max_cached_bytes_{kDefaultMaxCachedBytes};
};

/// An uninitialized contiguous tensor from WorkspacePool.
inline at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return WorkspacePool::instance().empty(sizes, options);
}

}  // namespace seqkern::cpu
