// Tensors of the recurrent engine (its op-internal temporaries: gates_x, d_gates, packed weights; and its large
// results: the output, the saved workspaces, grad_input) from blocks cached across calls, so that steady-state
// training does not map, fault in and zero fresh pages for them on every call (issue 14 item 2). c10's CPU
// allocator does not cache: glibc serves blocks this large by mmap or from a heap top it trims, and a call then
// pays page faults, memory-cgroup charging and the kernel's zeroing of each page again.
//
// A pooled tensor owns its block through its storage's deleter, which hands the block back to the pool when the
// last reference dies (a result saved for backward, or kept by the user, keeps its block until then): a block is
// never handed out while any tensor still points into it. Blocks are reported to the profiler as allocated while
// a tensor holds them and freed when it lets go, so the benchmarks' peak memory counts them as if they came from
// c10's allocator; the pool's idle blocks stay resident (at most kMaxCachedBytes) and, like glibc's reused heap
// pages, add no RSS to a call.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstddef>
#include <mutex>
#include <vector>

namespace seqkern::cpu {

class WorkspacePool {
 public:
  /// Idle blocks kept at most (bytes): a few layers' worth at the benchmark shapes (a GRU training step at b32
  /// t100 h256 cycles ~55 MB of blocks); a block that would push the idle total past it goes back to the system.
  static constexpr size_t kMaxCachedBytes = size_t{128} << 20;
  /// Requests below this size go to c10's allocator: glibc serves them from its heap without faults.
  static constexpr size_t kMinPooledBytes = size_t{256} << 10;

  static WorkspacePool& instance() {
    static WorkspacePool* pool = new WorkspacePool();  // never destroyed: tensors may return blocks at exit
    return *pool;
  }

  /// An uninitialized contiguous tensor of `sizes` and `options` (CPU) whose memory comes from the pool.
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
    if (bytes < kMinPooledBytes) return at::empty(sizes, options);
    const Block block = acquire(bytes);
    return at::from_blob(
        block.data, sizes, [this, block](void*) { release(block); }, options.device(at::kCPU));
  }

  /// Idle bytes held (for tests and reports).
  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_bytes_;
  }

 private:
  struct Block {
    void* data;
    size_t bytes;
  };

  /// The smallest idle block of at least `bytes` and at most twice that (a larger one would hold memory the
  /// call does not use), else a new one.
  Block acquire(size_t bytes) {
    Block block{nullptr, 0};
    {
      std::lock_guard<std::mutex> lock(mutex_);
      size_t best = idle_.size();
      for (size_t i = 0; i < idle_.size(); ++i)
        if (idle_[i].bytes >= bytes && idle_[i].bytes <= 2 * bytes && (best == idle_.size() || idle_[i].bytes < idle_[best].bytes))
          best = i;
      if (best < idle_.size()) {
        block = idle_[best];
        idle_.erase(idle_.begin() + static_cast<std::ptrdiff_t>(best));
        cached_bytes_ -= block.bytes;
      }
    }
    if (!block.data) block = {c10::alloc_cpu(bytes), bytes};
    report(block, true);
    return block;
  }

  void release(const Block& block) {
    report(block, false);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_bytes_ + block.bytes <= kMaxCachedBytes) {
        idle_.push_back(block);
        cached_bytes_ += block.bytes;
        return;
      }
    }
    c10::free_cpu(block.data);
  }

  /// Tells the profiler (profile_memory=True) that the block became live or was freed.
  static void report(const Block& block, bool allocated) {
    const int64_t bytes = static_cast<int64_t>(block.bytes);
    c10::reportMemoryUsageToProfiler(block.data, allocated ? bytes : -bytes, 0, 0, c10::Device(c10::DeviceType::CPU));
  }

  std::mutex mutex_;
  std::vector<Block> idle_;
  size_t cached_bytes_ = 0;
};

/// An uninitialized contiguous tensor from WorkspacePool.
inline at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return WorkspacePool::instance().empty(sizes, options);
}

}  // namespace seqkern::cpu
