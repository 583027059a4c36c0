// The persistent team of the recurrent time loops: a fixed partition of the work (split_range) over one
// OpenMP team that lives for the whole loop (run_persistent), synchronized by a spin barrier per phase.
#pragma once

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace seqkern::cpu {

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
/// 2.2-7.6 us, this one 0.12-0.2 us - against a batch-1 step of ~5 us.
/// After kSpinBudget of spinning a waiter sleeps on a futex until the last arrival wakes it. Spinning alone
/// (yielding after ~2^20 spins) broke down when another process shared the cores: two team threads that
/// the scheduler queued on one core handed the core over only at the scheduler tick, so every step cost
/// one tick (LSTM b32 t100 inference at 2 threads beside one nice-19 job: 410-420 ms per call instead of
/// ~20). A sleeping waiter gives its core to the thread it waits for at once. On a quiet machine no wait
/// reaches the budget (a b32 step is ~100 us, its imbalance a few us) and the last arrival pays one relaxed
/// load of the sleeper count.
/// Release/acquire on the generation counter make every write before arrive_and_wait() visible to
/// every thread after it. Split phase: arrive() then wait(ticket), with work between the two that needs
/// nothing the others write before the barrier; it fills the time a thread would spin for the last arrival.
class SpinBarrier {
 public:
  void reset(int threads) { threads_ = threads; }

  void arrive_and_wait() { wait(arrive()); }

  /// This thread's arrival; the ticket to pass to wait().
  int arrive() {
    const int generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == threads_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.store(generation + 1, std::memory_order_seq_cst);
      if (sleepers_.load(std::memory_order_seq_cst) > 0) wake_all(generation_);
    }
    return generation;
  }

  /// Returns once every thread has arrived in the round whose ticket (arrive()'s) is `generation`.
  void wait(int generation) {
    if (generation_.load(std::memory_order_acquire) != generation) return;
    if (spin_while_equal(generation)) return;
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    while (generation_.load(std::memory_order_seq_cst) == generation) sleep_while_equal(generation_, generation);
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
  }

 private:
  /// How long a waiter spins before it sleeps: far above a step's imbalance on a quiet machine, far below
  /// the scheduler tick (4 ms) that spinning alone cost per step on a shared one.
  static constexpr std::chrono::microseconds kSpinBudget{200};

  /// Spins until the generation moves on (true) or the budget is spent (false); the clock is read once
  /// per 64 pauses.
  bool spin_while_equal(int generation) const {
    const auto deadline = std::chrono::steady_clock::now() + kSpinBudget;
    for (int spins = 1;; ++spins) {
      if (generation_.load(std::memory_order_acquire) != generation) return true;
      pause();
      if (spins % 64 == 0 && std::chrono::steady_clock::now() > deadline) return false;
    }
  }

  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }

  /// Blocks while *word == value (returns at once if it differs; may return spuriously).
  static void sleep_while_equal(std::atomic<int>& word, int value) {
#if defined(__linux__)
    syscall(SYS_futex, reinterpret_cast<int*>(&word), FUTEX_WAIT_PRIVATE, value, nullptr, nullptr, 0);
#else
    if (word.load(std::memory_order_acquire) == value) std::this_thread::yield();
#endif
  }

  static void wake_all(std::atomic<int>& word) {
#if defined(__linux__)
    syscall(SYS_futex, reinterpret_cast<int*>(&word), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
#else
    (void)word;
#endif
  }

  alignas(64) std::atomic<int> arrived_{0};
  alignas(64) std::atomic<int> generation_{0};
  alignas(64) std::atomic<int> sleepers_{0};
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
