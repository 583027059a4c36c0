// WorkspacePool (workspace_pool.h): the allocator's bookkeeping, and the C entry points seqkern/memory.py binds.
#include "cpu/workspace_pool.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/accumulate.h>

namespace seqkern::cpu {

WorkspacePool& WorkspacePool::instance() {
  static WorkspacePool* pool = new WorkspacePool();
  return *pool;
}

at::Tensor WorkspacePool::empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (!pooled(bytes)) return at::empty(sizes, options.device(at::kCPU));
  // What at::empty does on CPU, with this allocator: a resizable storage, contiguous sizes and strides.
  return at::Tensor(at::detail::empty_generic(sizes, this, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                              options.dtype().toScalarType(), std::nullopt));
}

c10::DataPtr WorkspacePool::allocate(size_t bytes) {
  if (!pooled(bytes)) return c10::GetCPUAllocator()->allocate(bytes);
  void* data = acquire(bytes);
  // The context is the address itself, as c10's CPU allocator does (a "simple" DataPtr: copy-on-write clones
  // and anything else that wraps a CPU DataPtr accept it); give_back finds the block's size in live_.
  return {data, data, &WorkspacePool::give_back, c10::Device(c10::DeviceType::CPU)};
}

void WorkspacePool::copy_data(void* dest, const void* src, std::size_t count) const {
  default_copy_data(dest, src, count);
}

size_t WorkspacePool::cached_bytes() {
  std::lock_guard<std::mutex> lock(mutex_);
  return cached_bytes_;
}

void WorkspacePool::set_max_cached_bytes(size_t bytes) {
  max_cached_bytes_.store(bytes, std::memory_order_relaxed);
  trim(bytes);
}

size_t WorkspacePool::trim(size_t keep) {
  // Frees under the lock: rare (seqkern.empty_cache, a lower cap), and it allocates nothing that could throw.
  std::lock_guard<std::mutex> lock(mutex_);
  size_t freed = 0;
  while (cached_bytes_ > keep) {
    const Block block = idle_.back();
    idle_.pop_back();
    cached_bytes_ -= block.bytes;
    c10::free_cpu(block.data);
    freed += block.bytes;
  }
  return freed;
}

/// The smallest idle block of at least `bytes` and at most twice that (a larger one would hold memory the call
/// does not use), else a new one.
void* WorkspacePool::acquire(size_t bytes) {
  Block block{nullptr, 0};
  {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto fits = [&](const Block& b) { return b.bytes >= bytes && b.bytes <= 2 * bytes; };
    auto best = idle_.end();
    for (auto it = idle_.begin(); it != idle_.end(); ++it)
      if (fits(*it) && (best == idle_.end() || it->bytes < best->bytes)) best = it;
    if (best != idle_.end()) {
      block = *best;
      idle_.erase(best);
      cached_bytes_ -= block.bytes;
      live_.emplace(block.data, block.bytes);
    }
  }
  if (!block.data) {
    block = {c10::alloc_cpu(bytes), bytes};
    std::lock_guard<std::mutex> lock(mutex_);
    live_.emplace(block.data, block.bytes);
  }
  report(block, true);
  return block.data;
}

void WorkspacePool::release(void* data) {
  Block block{data, 0};
  {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = live_.find(data);
    TORCH_INTERNAL_ASSERT(it != live_.end(), "WorkspacePool: a block it did not hand out came back");
    block.bytes = it->second;
    live_.erase(it);
  }
  // Reported before the block is idle: once idle, another thread may take it and report it allocated again.
  report(block, false);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (cached_bytes_ + block.bytes <= max_cached_bytes()) {
      idle_.push_back(block);
      cached_bytes_ += block.bytes;
      return;
    }
  }
  c10::free_cpu(block.data);
}

void WorkspacePool::report(const Block& block, bool allocated) {
  const int64_t bytes = static_cast<int64_t>(block.bytes);
  c10::reportMemoryUsageToProfiler(block.data, allocated ? bytes : -bytes, 0, 0, c10::Device(c10::DeviceType::CPU));
}

}  // namespace seqkern::cpu

// For seqkern/memory.py (ctypes, so plain C; none of them throws).
extern "C" {
C10_EXPORT size_t seqkern_workspace_cached_bytes() {
  return seqkern::cpu::WorkspacePool::instance().cached_bytes();
}
C10_EXPORT size_t seqkern_workspace_empty_cache() {
  return seqkern::cpu::WorkspacePool::instance().trim(0);
}
C10_EXPORT size_t seqkern_workspace_max_cached_bytes() {
  return seqkern::cpu::WorkspacePool::instance().max_cached_bytes();
}
C10_EXPORT void seqkern_workspace_set_max_cached_bytes(size_t bytes) {
  seqkern::cpu::WorkspacePool::instance().set_max_cached_bytes(bytes);
}
}
