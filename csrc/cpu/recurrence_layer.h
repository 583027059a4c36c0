// The layer engine every recurrent cell shares: the time schedule (batch_sizes, reverse), the per-thread
// slices of the recurrent GEMMs, the persistent forward and backward time loops, the weight gradients and
// the cell ops' row loops. It is parameterized by a Cell (see "Cell interface" below): csrc/cpu/lstm.cpp,
// gru.cpp and rnn.cpp plug in LstmCell, GruCell and ElmanCell, which hold only their pointwise math.
// Options are compile-time flags of the loops (LoopOptions: bias, saved workspace, projection, state flags),
// chosen from the call's runtime bools by flag_switch, so an absent option costs no branch in the inner loops.
// Built on simd.h (vectors, activations), gemm_packed.h / gemm_bf16.h (micro-kernels, through
// Slice::multiply), outer_sum.h (weight gradients), team.h (persistent team, barrier), state_flags.h,
// arg_checks.h and workspace_pool.h (large tensors from blocks cached across calls).
//
// lengths, resets and zoneout (state_flags.h; one place each, for every cell):
//   * lengths and resets are Schedule's per-row predicate: active(t, b) (also batch_sizes' b < rows(t)) and
//     started_before(t, b) (the state entering step t is the one the row left its previous step with, else
//     its initial one). With lengths every row goes through the step GEMM and the loops skip the inactive
//     ones (they keep their states and record zeros). A reset at time t is applied where the state is
//     written before t: h by the step before (emit_hidden / carry writes the initial h into h_{t-1}'s buffer
//     for a row that restarts at the next step, so the GEMM reads it with no extra barrier), the private
//     states at the start of the step (restart_private_states). The backward hands the gradient reaching a
//     restarting step's entering state to the initial state's (d_initial) and zeroes it.
//   * zoneout is one hook after the cell's update on every state (CellForwardLoop::cell_phase; state 0 behind
//     a projection in projection_phase), and its backward on the state gradients (CellBackwardLoop::
//     cell_grad_phase; state 0 behind a projection in recurrent_phase, which writes d_h_all already split).
//   All of it is one compile-time flag (LoopOptions::kStateFlags): loops without it are the plain layer.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <array>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/arg_checks.h"
#include "cpu/gemm_bf16.h"
#include "cpu/gemm_packed.h"
#include "cpu/outer_sum.h"
#include "cpu/simd.h"
#include "cpu/state_flags.h"
#include "cpu/team.h"
#include "cpu/workspace_pool.h"

namespace seqkern::cpu {

/// Calls body(u, n) for the SIMD chunks [u, u+n) of [0, units).
template <typename A, typename Body>
inline void for_each_chunk(int64_t units, const Body& body) {
  for (int64_t u = 0; u < units; u += kLanes<A>) body(u, static_cast<int>(std::min<int64_t>(kLanes<A>, units - u)));
}

/// Sizes of one layer: T steps, B rows, I inputs, H hidden units, P = state_size the width of h (the
/// LSTM's proj_size with a projection, else H).
struct LayerShape {
  int64_t seq_len, batch, input_size, hidden, state_size;
};

/// Checks input (T,B,I), w_ih (gates*H, I), w_hh (gates*H, P), h0 (B,P) and, if given, the projection
/// w_hr (P,H); returns the sizes they imply.
inline LayerShape check_layer_args(const ArgChecker& check, int gates, const at::Tensor& input, const at::Tensor& h0,
                                   const at::Tensor& w_ih, const at::Tensor& w_hh,
                                   const std::optional<at::Tensor>& w_hr = std::nullopt) {
  check.supported_dtype(input, "input");
  TORCH_CHECK(input.dim() == 3, "seqkern ", check.op, " (CPU): input must be (T, B, input_size), got ", input.sizes());
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) % gates == 0, "seqkern ", check.op, " (CPU): w_ih must be (", gates,
              "*hidden, input_size), got ", w_ih.sizes());
  const int64_t hidden = w_ih.size(0) / gates;
  const int64_t state_size = w_hr.has_value() ? w_hr->size(0) : hidden;
  const LayerShape d{input.size(0), input.size(1), input.size(2), hidden, state_size};
  check.tensor(w_ih, input, {gates * d.hidden, d.input_size}, "w_ih");
  check.tensor(w_hh, input, {gates * d.hidden, state_size}, "w_hh");
  check.tensor(h0, input, {d.batch, state_size}, "h0");
  if (w_hr.has_value()) check.tensor(*w_hr, input, {state_size, d.hidden}, "w_hr");
  return d;
}

// ================================================================================================
// Schedule and slices of the persistent time loop.
// ================================================================================================
/// Which time index a processing step touches and which rows are active there.
struct Schedule {
  int64_t seq_len, batch;
  const int64_t* batch_sizes;  // null: every row active at every step
  bool reverse;
  StateFlags flags;  // lengths, resets, zoneout (none: the plain layer)

  /// The time index of forward-processing step `step` (T-1-step in the reverse direction).
  int64_t time(int64_t step) const { return reverse ? seq_len - 1 - step : step; }
  /// The leading rows the step GEMM covers at time t: batch_sizes[t] (the active rows of a sorted batch), or all.
  int64_t rows(int64_t t) const { return batch_sizes ? batch_sizes[t] : batch; }
  /// Whether row b is active at time t: among rows(t) and within its length.
  bool active(int64_t t, int64_t b) const { return b < rows(t) && flags.within_length(t, b); }
  bool reset(int64_t t, int64_t b) const { return flags.reset(t, b); }
  /// The time index of backward step `step` (the forward's steps in reverse).
  int64_t backward_time(int64_t step) const { return time(seq_len - 1 - step); }
  int64_t previous_time(int64_t t) const { return reverse ? t + 1 : t - 1; }
  /// Whether the states row b enters time t with are those it left the previous processing step with (it was
  /// active there and does not reset at t); else its initial states. One predicate for every cell and both loops.
  bool started_before(int64_t t, int64_t b) const {
    const int64_t prev_t = previous_time(t);
    return prev_t >= 0 && prev_t < seq_len && active(prev_t, b) && !reset(t, b);
  }
  /// The state row b read at time t, `width` wide: row b of the step before in `sequence` (T, B, width),
  /// or of `initial` (B, width) for a row that starts at t.
  template <typename T>
  const T* previous_row(const T* sequence, const T* initial, int64_t t, int64_t b, int64_t width) const {
    return started_before(t, b) ? sequence + (previous_time(t) * batch + b) * width : initial + b * width;
  }
};

/// The schedule of a layer of shape d; sizes is ArgChecker::batch_sizes' result (undefined: all rows active),
/// flags check_state_flags' (their tensors kept alive by the caller).
inline Schedule make_schedule(const LayerShape& d, const at::Tensor& sizes, bool reverse, const StateFlags& flags) {
  return {d.seq_len, d.batch, sizes.defined() ? sizes.data_ptr<int64_t>() : nullptr, reverse, flags};
}

/// The checked schedule of a layer op's call: batch_sizes (ArgChecker::batch_sizes), lengths, resets, zoneout and
/// zoneout_seed (check_state_flags); `keep` holds the tensors it points into alive.
inline Schedule layer_schedule(const ArgChecker& check, const LayerShape& d,
                               const std::optional<at::Tensor>& batch_sizes,
                               const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& resets,
                               double zoneout, const std::optional<at::Tensor>& zoneout_seed, bool reverse,
                               std::vector<at::Tensor>& keep) {
  keep.push_back(check.batch_sizes(batch_sizes, d.seq_len, d.batch));
  const StateFlags flags = check_state_flags(check, d.seq_len, d.batch, lengths, resets, zoneout, zoneout_seed, reverse,
                                             batch_sizes.has_value(), keep);
  return make_schedule(d, keep.front(), reverse, flags);
}

/// Whether a layer in storage dtype `dtype` runs its per-step GEMM and input projection on the bf16 units
/// (gemm_bf16.h: AMX or vdpbf16ps) rather than on the fp32 micro-kernel.
inline bool use_bf16_units(at::ScalarType dtype) {
  const Bf16Kernel kernel = bf16_kernel();
  return dtype == at::kBFloat16 && (kernel == Bf16Kernel::kAvx512Bf16 || kernel == Bf16Kernel::kAmx);
}

/// Whether a layer in storage dtype `dtype` runs its weight gradients and grad_input as bf16 at::mm.
inline bool use_bf16_gradients(at::ScalarType dtype) {
  return dtype == at::kBFloat16 && bf16_kernel() != Bf16Kernel::kFallback;
}

/// One thread's share of a recurrent GEMM: output columns `cols` (each repeated in `groups` gate blocks
/// padded to `padded` columns), their packed weights, and a (batch x w.width) scratch for the product.
/// With `bf16` the weights are packed as bf16 pairs (w16) and the product runs on vdpbf16ps; the
/// layout of the result in scratch is the same either way, so the cells never know.
template <typename A>
struct Slice {
  Range cols;
  int64_t padded = 0;
  PackedPanels<A> w;
  PackedPairs w16;
  bool bf16 = false;
  A* scratch = nullptr;

  /// Columns [group | unit] <- rows group * group_rows + cols.begin + unit of the row-major matrix m
  /// (rows w.depth long): the slice's gate rows of a (groups*H, depth) W with group_rows = H. m is in the
  /// accumulation dtype, or in bf16 for bf16 slices (packed as they are, no fp32 copy of W first).
  template <typename M>
  void pack_rows(const M* m, int64_t group_rows) {
    pack([&](int64_t j) {
      const int64_t group = j / padded, u = j % padded;
      const M* row = u < cols.size() ? m + (group * group_rows + cols.begin + u) * w.depth : nullptr;
      return std::pair<const M*, int64_t>{row, 1};
    });
  }
  /// Column j <- column cols.begin + j of the row-major matrix m (w.depth rows, each row_length long).
  void pack_columns(const A* m, int64_t row_length) {
    pack([&](int64_t j) {
      return std::pair<const A*, int64_t>{j < cols.size() ? m + cols.begin + j : nullptr, row_length};
    });
  }
  /// c (rows x w.width, leading dim ldc) = a (rows x w.depth, leading dim lda) @ the packed weights; a in the
  /// accumulation dtype, or in bf16 for bf16 slices.
  template <typename In>
  void multiply(const In* a, int64_t lda, int64_t rows, A* c, int64_t ldc) const {
    if constexpr (std::is_same_v<A, float>) {
      if (bf16) return gemm_bf16(a, lda, rows, w16, c, ldc);
    }
    if constexpr (std::is_same_v<In, A>) {
      gemm_packed(a, lda, rows, w, c, ldc);
    } else {
      TORCH_INTERNAL_ASSERT(false, "bf16 operands need a bf16 slice");
    }
  }
  /// multiply's product over the depth indices `k` only, added to c with `accumulate` (not for bf16 slices).
  void multiply_depth(const A* a, int64_t lda, int64_t rows, A* c, int64_t ldc, Range k, bool accumulate) const {
    TORCH_INTERNAL_ASSERT(!bf16, "a depth range of a bf16 slice");
    gemm_packed(a, lda, rows, w, c, ldc, k.begin, k.end, accumulate);
  }

 private:
  template <typename ColumnSource>
  void pack(const ColumnSource& column) {
    using M = std::remove_cv_t<std::remove_pointer_t<decltype(column(int64_t{0}).first)>>;
    if (bf16) {
      w16.pack(column);
    } else if constexpr (std::is_same_v<M, A>) {
      w.pack(column);
    } else {
      TORCH_INTERNAL_ASSERT(false, "bf16 weights need a bf16 slice");
    }
  }
};

/// The slices of `columns` columns for `parts` threads, in one allocation (`storage` keeps it alive);
/// `bf16`: weights packed for gemm_bf16 (only with A = float).
template <typename A>
struct SliceSet {
  std::vector<Slice<A>> slices;
  at::Tensor storage, storage16;

  SliceSet(int64_t columns, int parts, int groups, int64_t depth, int64_t rows, bool bf16 = false) {
    bf16 = bf16 && std::is_same_v<A, float>;
    int64_t total = 0, total16 = 0;
    for (const Range& r : split_range(columns, parts, kLanes<A>)) {
      Slice<A> s;
      s.cols = r;
      s.padded = PackedPanels<A>::padded_width(r.size());
      s.w.depth = s.w16.depth = depth;
      s.w.width = s.w16.width = groups * s.padded;
      s.bf16 = bf16;
      total += (bf16 ? rows : depth + rows) * s.w.width;
      total16 += bf16 ? PackedPairs::elements(depth, s.w.width) : 0;
      slices.push_back(s);
    }
    storage = at::empty({std::max<int64_t>(total, 1)}, at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value));
    storage16 = at::empty({std::max<int64_t>(total16, 1)}, at::TensorOptions().dtype(at::kBFloat16));
    A* next = storage.data_ptr<A>();
    uint16_t* next16 = reinterpret_cast<uint16_t*>(storage16.data_ptr<at::BFloat16>());
    for (Slice<A>& s : slices) {
      if (bf16) {
        s.w16.data = next16;
        next16 += PackedPairs::elements(depth, s.w.width);
      } else {
        s.w.data = next;
        next += depth * s.w.width;
      }
      s.scratch = next;
      next += rows * s.w.width;
    }
  }
};

/// Threads for a layer's forward or backward loop (the same count for both, so that the backward's choices made
/// from it, input_gradient_in_team, match the forward's): its step's products (the recurrent GEMM, and the
/// projection's) in multiply-adds, over its hidden units in vectors of the accumulation dtype `acc`.
/// 32K multiply-adds is ~1 us of one core at the micro-kernel's speed, the order of a barrier's cost.
inline int loop_threads(const LayerShape& d, int gates, bool projection, at::ScalarType acc) {
  constexpr int64_t kMinMacsPerThreadStep = 32 * 1024;
  const int64_t macs_per_step = d.batch * d.hidden * d.state_size * (gates + (projection ? 1 : 0));
  const int64_t lanes = 64 / static_cast<int64_t>(c10::elementSize(acc));
  return persistent_thread_count(macs_per_step, kMinMacsPerThreadStep, (d.hidden + lanes - 1) / lanes);
}

// ================================================================================================
// Compile-time options of the loops.
// ================================================================================================
/// A loop's options as compile-time flags: kBias (the layer has biases), kSaveWorkspace (the forward saves
/// what the backward reads), kProjection (the LSTM's w_hr: h = (cell output) W_hr^T, P wide), kStateFlags
/// (lengths, resets or zoneout: Schedule::flags says which; one flag for the three, so that a layer without
/// any compiles and runs the plain loops, and the flagged loops stay one instantiation per layout).
template <bool Bias, bool SaveWorkspace, bool Projection, bool Flags = false>
struct LoopOptions {
  static constexpr bool kBias = Bias, kSaveWorkspace = SaveWorkspace, kProjection = Projection, kStateFlags = Flags;
};

/// Calls f(std::true_type) if `value`, else f(std::false_type): a runtime bool made a compile-time flag
/// (FlashAttention's BOOL_SWITCH). With kPossible false only the false branch is instantiated (value
/// must then be false): a cell that cannot have an option compiles no loop for it.
template <bool kPossible = true, typename F>
void flag_switch(bool value, const F& f) {
  if constexpr (kPossible) {
    if (value) return f(std::true_type{});
  }
  TORCH_INTERNAL_ASSERT(!value || kPossible);
  f(std::false_type{});
}

// ================================================================================================
// Cell interface. A Cell (LstmCell in lstm.cpp, GruCell in gru.cpp, ElmanCell in rnn.cpp) provides,
// A = accumulation dtype:
//   kGates            blocks of H rows in W_ih and W_hh (torch.nn's gate order);
//   kStates           the states it carries from step to step, each H wide per row: state 0 is h (the
//                     cell's output, fed to the recurrent GEMM; P wide behind a projection), the others
//                     are private to the cell's units (the LSTM's c); the engine stores, carries, saves and
//                     differentiates them all alike, as States<A, kStates> arrays;
//   kWorkspaceBlocks  blocks of H the forward saves per row for the backward (0: none);
//   kSameGateGrads    whether the gradients of x W_ih^T and of h W_hh^T are equal (Elman, LSTM: yes; GRU:
//                     they differ in the n gate), so that one (T, B, kGates*H) buffer serves both;
//   kDirectPath       whether h_{t-1} reaches h_t other than through W_hh (GRU: z * h_{t-1}); the forward
//                     reads state 0 pointwise only then;
//   kProjectable      whether a projection may follow it (LSTM: yes); its Grad then has `output`, the
//                     cell output before the projection, recomputed for the projection's weight gradient;
//   bf16_state_ok()   whether, with bfloat16 storage, the recurrent GEMM may run on the bf16 units, i.e. read
//                     h_{t-1} and d_gates rounded to bf16 as torch's own bf16 layers do (Elman relu: no);
//   forward(StepIn, States prev) -> the new States on one SIMD chunk, saving the workspace if asked
//                     (prev[0] is loaded only with kDirectPath; zoneout may load it for its own blend);
//   grad(GradIn, States d) -> Grad{.., d_prev}: d holds the gradients of the new states, d_prev those of
//                     the previous ones (d_prev[0]: the direct path only; the engine adds the W_hh path);
//                     zoneout is the engine's (d is the new states' share of the gradient), but with it the
//                     recorded states k >= 1 are the blended ones: GradIn::cur[k] is then null and a cell that
//                     reads its own new private state recomputes it from the workspace (LSTM: c);
//   store_grad(d_gates_x row, d_gates_h row, H, grad, n) (the rows alias if kSameGateGrads).
// forward, grad and store_grad are SEQKERN_SIMD_INLINE: out of line (GCC's choice for the GRU's and the Elman
// cell's) each call built its StepIn / GradIn on the stack and returned the States through it (perf, RNN
// inference b32 t100 h256, 2 threads: the cell loop 21% of the samples, a third of them on the call's `ret`;
// the LSTM's forward, out of line, was 27% of a bf16 layer's samples).
// An option a loop does not have reaches the cell as a constant null pointer (the loops' flags are
// compile-time and the cell's math is inlined into them), so the cell's `if (in.bias_x)` costs nothing.
// ================================================================================================
template <typename A, int K>
using States = std::array<Simd<A>, K>;

/// What one row's forward step reads and writes at one SIMD chunk of units; every pointer is at the
/// chunk's first unit, gate block g x_stride (gates_x), h_stride (gates_h) or stride (bias_x, workspace)
/// elements further.
template <typename A, typename In, typename Ws>
struct StepIn {
  const In* gates_x;  // x W_ih^T
  const In* gates_h;  // h W_hh^T
  int64_t x_stride, h_stride;
  const A* bias_x;          // added to gates_x, or null (no bias)
  const A* recurrent_bias;  // the cell's bias on the recurrent side (GRU: b_hn), or null
  Ws* workspace;            // null: not saved
  int64_t stride;
  int n;  // units in the chunk
};

/// What one row's backward step reads at one SIMD chunk (pointers at the chunk's first unit; any a cell
/// does not need may be null): the saved workspace (gate block g at g * stride) and the states the step
/// read (prev) and wrote (cur).
template <typename S, int K>
struct GradIn {
  const S* workspace;
  std::array<const S*, K> prev, cur;
  int64_t stride;
  int n;

  /// The same row `u` units further, n units wide.
  GradIn at(int64_t u, int chunk) const {
    GradIn in = *this;
    if (in.workspace) in.workspace += u;
    for (int k = 0; k < K; ++k) {
      if (in.prev[k]) in.prev[k] += u;
      if (in.cur[k]) in.cur[k] += u;
    }
    in.n = chunk;
    return in;
  }
};

// ================================================================================================
// Layer forward: the input projection, then the persistent time loop.
// ================================================================================================
/// c (rows x w.width, contiguous) = a (rows x w.depth, contiguous) @ W, packed by the caller, on the packed
/// micro-kernels (gemm_packed; gemm_bf16 for bf16 pairs: AMX or vdpbf16ps, fp32 out). The whole layer's input
/// projection and grad_input. Needs w.width a multiple of the vector width (the kernels write whole vectors).
/// Against MKL's at::mm on the same products in a GRU training step (b32 t100 h256, one thread, perf samples):
/// the micro-kernel ran ~162 GFLOP/s in the recurrent steps, MKL ~143 on these.
/// Each thread gets one run of 16-row blocks (equal to within a block), done 96 rows at a time. The tasks of 96
/// rows they replace split unevenly: 512 rows (batch 1, t512) went 288 / 224 to two threads, and libgomp's wait
/// for the longer half was 5.5% of the LSTM b1 inference samples.
template <typename Packed, typename In, typename Out>
void packed_product(const In* a, int64_t rows, const Packed& w, Out* c) {
  constexpr int64_t kBlockRows = 16, kRowsPerCall = 96;
  at::parallel_for(0, (rows + kBlockRows - 1) / kBlockRows, 1, [&](int64_t begin, int64_t end) {
    const int64_t last = std::min(rows, end * kBlockRows);
    for (int64_t r0 = begin * kBlockRows; r0 < last; r0 += kRowsPerCall) {
      const int64_t n = std::min(kRowsPerCall, last - r0);
      if constexpr (std::is_same_v<Packed, PackedPairs>) {
        gemm_bf16(a + r0 * w.depth, w.depth, n, w, c + r0 * w.width, w.width);
      } else {
        gemm_packed(a + r0 * w.depth, w.depth, n, w, c + r0 * w.width, w.width);
      }
    }
  });
}

/// out (rows, width) = a (rows, depth) @ W, all contiguous in one dtype (float or double), W's column j starting
/// at w's element j * column_step, its consecutive k k_step apart; width a multiple of the vector width.
inline void packed_product(const at::Tensor& a, const at::Tensor& w, int64_t width, int64_t column_step,
                           int64_t k_step, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "seqkern_packed_product", [&] {
    PackedPanels<scalar_t> panels;
    panels.depth = a.size(1);
    panels.width = width;
    const at::Tensor packed = pooled_empty({panels.depth * width}, a.options());
    panels.data = packed.data_ptr<scalar_t>();
    const scalar_t* w_data = w.data_ptr<scalar_t>();
    const auto column = [&](int64_t j) { return std::pair<const scalar_t*, int64_t>{w_data + j * column_step, k_step}; };
    at::parallel_for(0, panels.panel_count(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) panels.pack_panel(p, column);
    });
    packed_product(a.data_ptr<scalar_t>(), a.size(0), panels, out.data_ptr<scalar_t>());
  });
}

/// Whether a (rows x width) product in like's dtype runs on the packed micro-kernel rather than MKL's at::mm: at
/// the avx512 level (the level it was measured at: MKL picks its own ISA whatever seqkern's level), for whole
/// vectors of columns (the kernel writes whole vectors) and for at least a register block of rows: below that the
/// packed copy of W is read once, so packing triples W's memory traffic for nothing (grad_input of a GRU(128, 128)
/// step at batch 1: its packing was 13% of the backward op's samples; at::mm runs a GEMV on W as it is).
inline bool packed_products_pay(int64_t rows, int64_t width, const at::Tensor& like) {
#if defined(__AVX512F__)
  return rows >= kMaxMicroRows && width % (64 / like.element_size()) == 0;
#else
  return false;
#endif
}

/// x W_ih^T for all T*B rows in one product, in the accumulation dtype, into `out` (T*B, gates*H): the packed
/// micro-kernels (bf16 x on the bf16 units, W_ih packed as pairs, fp32 out: unlike at::mm in bf16 the gates stay
/// fp32 until the cell), or MKL's at::mm where the width is not whole vectors.
/// One product before the loop rather than each thread projecting its own gate columns inside the team (the
/// LSTM's old way, 105 vs 90 GFLOP/s single-thread on one 512 x 256 x 512 product): the whole forward op, one
/// thread, process CPU time, interleaved medians (2026-12-05, Intel Xeon with AMX, machine at load 8), gemm vs
/// in-team, T x B x H = 512 x 1 x 256 and 100 x 32 x 256, fp32 / bf16 (default bf16 path):
///   LSTM  9.6 / 12.7 vs 11.6 / 13.8 ms,  44.7 / 45.2 vs 46.8 / 49.3 ms
///   GRU   8.1 /  9.3 vs  9.0 /  9.7 ms,  37.2 / 32.3 vs 38.5 / 34.7 ms
///   RNN   2.4 /  3.4 vs  3.1 /  3.4 ms,  10.0 / 13.0 vs 11.7 / 14.0 ms
/// (the in-team projection also packs W_ih once per thread and fills a (T*B, gates*padded) scratch). Not
/// re-measured at 2 threads: wall clock at that load measures the other jobs, not the kernels.
inline void input_projection(const at::Tensor& input, const at::Tensor& w_ih, at::Tensor& out) {
  const int64_t rows = out.size(0), depth = w_ih.size(1), width = out.size(1);
  if (use_bf16_units(input.scalar_type()) && width % PackedPairs::kLanes == 0) {
    PackedPairs w;
    w.depth = depth;
    w.width = width;
    const at::Tensor packed = pooled_empty({PackedPairs::elements(depth, width)}, w_ih.options());
    w.data = reinterpret_cast<uint16_t*>(packed.data_ptr<at::BFloat16>());
    const at::Tensor weights = w_ih.contiguous();
    const at::BFloat16* w_data = weights.data_ptr<at::BFloat16>();
    w.pack([&](int64_t j) { return std::pair<const at::BFloat16*, int64_t>{w_data + j * depth, 1}; });
    const at::Tensor x = input.reshape({rows, depth}).contiguous();
    packed_product(x.data_ptr<at::BFloat16>(), rows, w, out.data_ptr<float>());
    return;
  }
  const auto acc = out.scalar_type();
  const at::Tensor x = input.reshape({rows, depth}).to(acc).contiguous();
  const at::Tensor w = w_ih.to(acc).contiguous();
  if (packed_products_pay(rows, width, out)) {
    packed_product(x, w, width, /*column_step=*/depth, /*k_step=*/1, out);  // column j of W_ih^T: row j of W_ih
  } else {
    at::mm_out(out, x, w.t());
  }
}

/// Whether the forward loop projects the input inside the team (each thread x_t @ its W_ih rows^T, W_ih slice packed
/// beside its W_hh slice) instead of input_projection's one product before the loop. The gates then never leave the
/// thread's cache, where the product before the loop writes (T*B, gates*H) to memory and the steps read it back (13
/// MB per LSTM layer at b32 t100 h256); one thread, process CPU time, alternating processes on a loaded machine,
/// medians: LSTM / GRU / RNN inference b32 t100 h256 1.08x / 1.23x / 1.12x (NOTES.md "Round 7"). Below a register
/// block of rows it projects blocks of steps (input_block_steps). Only where the thread's W_ih slice fits in L2
/// beside its W_hh slice. In bf16 on the bf16 units too (x and W_ih packed as they are, AMX or vdpbf16ps): the
/// product before the loop wrote fp32 gates (13 MB at b32 t100 h256) that the cells read back from memory; 2 threads,
/// alternating processes, bf16 b32 t100 h256: LSTM inference 1.20-1.28x, training 1.03-1.06x, GRU inference 1.18x
/// (NOTES.md "Round 11"). bf16 storage without the units keeps the product before the loop (fp32 micro-kernel).
/// Not below a register block of rows in all (T*B): packing the W_ih slices would cost more than the product that
/// reads them once (input_projection's at::mm runs it on W_ih as it is; see packed_products_pay).
inline bool project_input_in_team(const LayerShape& d, int gates, int threads, at::ScalarType dtype) {
  constexpr int64_t kMaxInputSliceBytes = int64_t{1} << 20;
  if (d.seq_len * d.batch < kMaxMicroRows) return false;
  if (dtype == at::kBFloat16 && !use_bf16_units(dtype)) return false;  // the team's kernels take bf16 x on those only
  const at::ScalarType acc = at::toOpMathType(dtype);
  const int64_t slice_bytes = d.input_size * (gates * d.hidden / threads) * c10::elementSize(acc);
  return slice_bytes <= kMaxInputSliceBytes;
}

/// Whether the backward loop forms grad_input inside the team (CellBackwardLoop::input_grad_phase: each thread
/// d_gates_x(t) @ its W_ih columns, in the time it would spin at the step's barrier) rather than input_gradient's
/// product after the loop, which reads the (T*B, gates*H) d_gates_x back from memory. Not in bf16 (one bf16
/// at::mm, see use_bf16_gradients), not below a register block of rows (a step's product would be a GEMV reading
/// the W_ih slice from L2 at every step), and only where the W_ih column slice fits beside the W_hh one
/// (project_input_in_team's budget: the same bytes). In-process A/B, 2 threads, fp32 training b32 t100 h256 (20
/// interleaved rounds): LSTM 1.009x (faster in 14), GRU 1.003x (13), RNN 1.019x (17).
inline bool input_gradient_in_team(const LayerShape& d, int gates, int threads, at::ScalarType dtype) {
  return !use_bf16_gradients(dtype) && d.batch >= kMaxMicroRows && project_input_in_team(d, gates, threads, dtype);
}

/// How many steps the team's input projection covers at once: one at batch >= a register block of rows (the
/// step's product is then a matrix product already), else enough steps for 32 rows. At batch 1 a step's product
/// is a GEMV bound by L2 bandwidth, and projecting x_t alone would read the W_ih slice per step too, doubling it;
/// per 32 steps it adds 1/32. Against the product before the loop at b1 t512 h256 it also saves that product's
/// fork / join and the (T*B, gates*H) buffer's round trip through memory.
inline int64_t input_block_steps(int64_t batch) {
  constexpr int64_t kProjectedRows = 32;
  return batch >= kMaxMicroRows ? 1 : (kProjectedRows + batch - 1) / batch;
}

/// Asks for every cache line of a forward step's h_{t-1} rows at once: the other threads wrote their columns, so
/// those lines are in other cores' caches, and the product's broadcasts otherwise miss on them one line after
/// another. In-process A/B, 2 threads, h256: LSTM inference b1 t512 1.014x, b32 t100 1.022x (the same for the
/// backward's d_gates_h rows: training 0.996-1.014x, not kept).
template <typename A>
void prefetch_lines(const A* rows, int64_t elements) {
  for (int64_t i = 0; i < elements; i += 64 / static_cast<int64_t>(sizeof(A))) __builtin_prefetch(rows + i);
}

/// Thread k owns a slice of hidden units: the kGates rows of W_hh for those units are packed once into its
/// micro-kernel panels and stay in its L2 for all T steps; per step it computes its gate columns
/// (h_{t-1} @ W_hh-slice^T), then the cell's fused pointwise update of its units, thread-local since it
/// owns every gate of each of its units (and their private states). One barrier per step publishes h_t.
/// Without gates_x (project_input_in_team) it also keeps its W_ih rows packed and computes its gate columns of
/// x W_ih^T for a block of steps (input_block_steps) at the start of the block's first step.
/// With a projection (Options::kProjection) a second phase follows behind its own barrier: thread k owns
/// output columns p of h_t[:, p] = (cell output) W_hr[p]^T.
template <typename Cell, typename S, typename Options>
class CellForwardLoop {
 public:
  using A = Acc<S>;
  static constexpr int G = Cell::kGates, K = Cell::kStates;
  static constexpr int64_t W = Cell::kWorkspaceBlocks;
  static constexpr bool kProjection = Options::kProjection, kFlags = Options::kStateFlags;
  static_assert(!kProjection || (Cell::kProjectable && !Cell::kDirectPath), "a projection needs a projectable cell");

  struct Buffers {
    const A* gates_x;         // (T*B, G*H) x W_ih^T (input_projection), or null: projected per step from `input`
    const S* input;           // (T*B, I) the layer input, when gates_x is null
    const S* w_ih;            // (G*H, I), when gates_x is null
    const A* input_bias;      // (G*H,) added to gates_x by the cell, with kBias
    const A* recurrent_bias;  // (H,) the cell's recurrent-side bias (GRU: b_hn) with kBias, or null
    const A* w_hh;            // (G*H, P)
    const A* w_hr;            // (P, H), kProjection
    S* workspace;             // (T, B, W*H), kSaveWorkspace
    A* h_state;               // (2, B, P): state 0 at t-1 and t alternating; [1] holds h0 on entry
    std::array<A*, K> state;  // [k >= 1] (B, H): state k in place, the initial one on entry, the last on exit
    std::array<S*, K> sequence;  // [0] (T, B, P) the output; [k >= 1] (T, B, H) state k per step, kSaveWorkspace
    A* hidden;                // (B, H), kProjection: the cell output of the current step before the projection
    std::array<const A*, K> initial;  // kStateFlags: the initial states ([0] (B, P), [k] (B, H)) resets restore
  };

  CellForwardLoop(const Cell& cell, const LayerShape& d, const Schedule& sched, const Buffers& buf, int threads)
      : cell_(cell), d_(d), sched_(sched), buf_(buf), threads_(threads),
        input_block_steps_(input_block_steps(d.batch)),
        step_slices_(d.hidden, threads, G, d.state_size, d.batch,
                     use_bf16_units(c10::CppTypeToScalarType<S>::value) && cell.bf16_state_ok()),
        proj_slices_(kProjection ? d.state_size : 0, threads, 1, d.hidden, kProjection ? d.batch : 0,
                     use_bf16_units(c10::CppTypeToScalarType<S>::value)),
        input_slices_(buf.gates_x ? 0 : d.hidden, threads, G, d.input_size, input_block_steps_ * d.batch,
                      use_bf16_units(c10::CppTypeToScalarType<S>::value)) {}

  /// Runs all T steps; h_n is then h_state[(T-1) & 1], the other final states are in state[k].
  void run() {
    run_persistent(threads_, [&](int first, int stride, SpinBarrier& barrier) {
      const size_t slices = step_slices_.slices.size();
      // The split product needs the thread's columns of h to be exactly its one slice's.
      const bool split = splits_products() && static_cast<size_t>(stride) == slices;
      for (size_t s = first; s < slices; s += stride) prepare(s);
      int ticket = -1;  // the previous step's barrier, arrived at and not yet waited on
      const auto wait_for_others = [&] {
        if (ticket >= 0) barrier.wait(std::exchange(ticket, -1));
      };
      for (int64_t step = 0; step < d_.seq_len; ++step) {
        if (!split) wait_for_others();  // here, not in step_product: a thread may have no slice
        for (size_t s = first; s < slices; s += stride) cell_phase(s, step, split, wait_for_others);
        if constexpr (kProjection) {
          barrier.arrive_and_wait();
          for (size_t s = first; s < slices; s += stride) projection_phase(proj_slices_.slices[s], step);
        }
        // The next step's input projection needs no h: it runs between arrival and wait, in the time this
        // thread would otherwise spin for the others (LSTM inference b32 t100 h256 fp32, 2 threads: 1.01-1.06x).
        ticket = barrier.arrive();
        if (step + 1 < d_.seq_len)
          for (size_t s = first; s < slices; s += stride) project_input_at(s, step + 1);
      }
      wait_for_others();
    });
  }

 private:
  const A* h_prev(int64_t step) const { return buf_.h_state + ((step + 1) & 1) * d_.batch * d_.state_size; }
  A* h_cur(int64_t step) const { return buf_.h_state + (step & 1) * d_.batch * d_.state_size; }
  bool zoneout() const { return kFlags && sched_.flags.zoneout.on(); }
  bool active(int64_t t, int64_t b) const { return kFlags ? sched_.active(t, b) : b < sched_.rows(t); }

  /// Packs slice s's weights (one group for W_hr: column j <- row p0 + j) and projects the first step's input.
  void prepare(size_t s) {
    step_slices_.slices[s].pack_rows(buf_.w_hh, d_.hidden);
    if (!buf_.gates_x) input_slices_.slices[s].pack_rows(buf_.w_ih, d_.hidden);
    if constexpr (kProjection) proj_slices_.slices[s].pack_rows(buf_.w_hr, d_.state_size);
    project_input_at(s, 0);
  }

  /// Slice s's input projection for the block of steps starting at `step`, when the team projects the input
  /// and `step` starts a block.
  void project_input_at(size_t s, int64_t step) const {
    if (!buf_.gates_x && step % input_block_steps_ == 0) project_input(input_slices_.slices[s], step);
  }

  /// The states row b enters the step with at one chunk of units: state 0 (h_{t-1}, a restarting row's
  /// initial h already: see emit_hidden) only where read pointwise (the cell's direct path, or zoneout's
  /// blend without a projection).
  States<A, K> previous_states(int64_t step, int64_t b, int64_t unit, int n) const {
    States<A, K> prev{};
    if (Cell::kDirectPath || (!kProjection && zoneout()))
      prev[0] = load<A>(h_prev(step) + b * d_.state_size + unit, n);
    for (int k = 1; k < K; ++k) prev[k] = load<A>(buf_.state[k] + b * d_.hidden + unit, n);
    return prev;
  }

  /// Resets: the private states (k >= 1) of the rows that restart at time t, at the slice's units, go back to
  /// their initial values before the step reads them (active or not: an inactive row keeps the restored state).
  void restart_private_states(Range units, int64_t t) const {
    if (!sched_.flags.resets) return;
    for (int64_t b = 0; b < d_.batch; ++b)
      if (sched_.reset(t, b))
        for (int k = 1; k < K; ++k) {
          const int64_t at = b * d_.hidden + units.begin;
          std::copy(buf_.initial[k] + at, buf_.initial[k] + at + units.size(), buf_.state[k] + at);
        }
  }

  /// The lowest time index of the block of input_block_steps_ steps that `step` is in (the block's times are
  /// consecutive, falling in the reverse direction).
  int64_t first_block_time(int64_t step) const {
    const int64_t first = step - step % input_block_steps_;
    const int64_t last = std::min(d_.seq_len, first + input_block_steps_) - 1;
    return std::min(sched_.time(first), sched_.time(last));
  }

  /// x W_ih^T at slice xs's gate columns for the block of steps starting at `step`, into xs.scratch (its row
  /// (t - first_block_time) * B + b). A one-step block covers the step's GEMM rows; a longer one every row.
  void project_input(const Slice<A>& xs, int64_t step) const {
    const int64_t steps = std::min(input_block_steps_, d_.seq_len - step), t = first_block_time(step);
    const int64_t rows = input_block_steps_ == 1 ? sched_.rows(t) : steps * d_.batch;
    xs.multiply(buf_.input + t * d_.batch * d_.input_size, d_.input_size, rows, xs.scratch, xs.w.width);
  }

  /// Whether a step's product runs split (step_product): several threads, each h column written by the thread
  /// that owns the unit (no projection), fp32 / fp64 panels, and fewer rows than a register block: a product of
  /// more rows pays a second pass over its output rows for the split, what the split saves (RNN inference b32
  /// 0.98x split, LSTM 0.99x).
  bool splits_products() const {
    return threads_ > 1 && !kProjection && d_.batch < kMaxMicroRows && !step_slices_.slices.empty() &&
           !step_slices_.slices[0].bf16;
  }

  /// Slice sl's gate columns of h_{t-1} @ W_hh^T into its scratch, for `rows` rows. Not split, run() has waited for
  /// every thread's columns of h_{t-1} before the step. Split: the depth indices of the slice's own columns first
  /// (this thread wrote them), then wait_for_others(), then the others' columns; the barrier's latency and the
  /// others' late arrival fall into the first part. In-process A/B, 2 threads, h256 (NOTES.md "Round 15"): LSTM inference b1
  /// t512 1.018x (faster in 11 of 12 rounds); the backward's product split the same way measured 0.99-1.02x and
  /// was not kept.
  template <typename Wait>
  void step_product(const Slice<A>& sl, int64_t step, int64_t rows, bool split, const Wait& wait_for_others) const {
    const A* h = h_prev(step);
    const int64_t P = d_.state_size;
    if (!split) {
      prefetch_lines(h, rows * P);
      return sl.multiply(h, P, rows, sl.scratch, sl.w.width);
    }
    sl.multiply_depth(h, P, rows, sl.scratch, sl.w.width, sl.cols, false);
    wait_for_others();
    prefetch_lines(h, rows * P);
    // Each call adds to what the calls before it wrote (none when their ranges were empty).
    sl.multiply_depth(h, P, rows, sl.scratch, sl.w.width, Range{0, sl.cols.begin}, sl.cols.size() > 0);
    sl.multiply_depth(h, P, rows, sl.scratch, sl.w.width, Range{sl.cols.end, P}, sl.cols.end > 0);
  }

  /// Gate columns of slice s's units, then their fused pointwise update, for step `step` (the product split or
  /// not: step_product).
  template <typename Wait>
  void cell_phase(size_t s, int64_t step, bool split, const Wait& wait_for_others) const {
    const Slice<A>& sl = step_slices_.slices[s];
    const int64_t t = sched_.time(step), rows = sched_.rows(t);
    const int64_t B = d_.batch, H = d_.hidden, u0 = sl.cols.begin;
    if constexpr (kFlags) restart_private_states(sl.cols, t);
    const Slice<A>* xs = buf_.gates_x ? nullptr : &input_slices_.slices[s];
    const A* x_rows = xs ? xs->scratch + (t - first_block_time(step)) * B * xs->w.width : nullptr;
    step_product(sl, step, rows, split, wait_for_others);
    for (int64_t b = 0; b < rows; ++b) {
      if (!active(t, b)) {
        skip_row(sl.cols, step, b);
        continue;
      }
      const int64_t row = t * B + b;
      for_each_chunk<A>(sl.cols.size(), [&](int64_t u, int n) {
        const int64_t unit = u0 + u;
        const StepIn<A, A, S> in{xs ? x_rows + b * xs->w.width + u : buf_.gates_x + row * G * H + unit,
                                 sl.scratch + b * sl.w.width + u,
                                 xs ? xs->padded : H,
                                 sl.padded,
                                 Options::kBias ? buf_.input_bias + unit : nullptr,
                                 Options::kBias && buf_.recurrent_bias ? buf_.recurrent_bias + unit : nullptr,
                                 Options::kSaveWorkspace && W > 0 ? buf_.workspace + row * W * H + unit : nullptr,
                                 H,
                                 n};
        const States<A, K> prev = previous_states(step, b, unit, n);
        States<A, K> next = cell_.forward(in, prev);
        if (zoneout())  // every state but h behind a projection (projection_phase blends that one)
          for (int k = kProjection ? 1 : 0; k < K; ++k) {
            const Zoneout& z = sched_.flags.zoneout;
            next[k] = z.blend(z.template weight<A>(k, t, b, H, unit), prev[k], next[k]);
          }
        for (int k = 1; k < K; ++k) {
          store(buf_.state[k] + b * H + unit, next[k], n);
          if constexpr (Options::kSaveWorkspace) store(buf_.sequence[k] + row * H + unit, next[k], n);
        }
        if constexpr (kProjection) {
          store(buf_.hidden + b * H + unit, next[0], n);
        } else {
          emit_hidden(step, b, unit, next[0], n);
        }
      });
    }
    for (int64_t b = rows; b < B; ++b) skip_row(sl.cols, step, b);
  }

  /// h_t[:, slice] = (cell output) @ W_hr[slice]^T for the active rows (zoneout blends it with h_{t-1}).
  void projection_phase(const Slice<A>& sl, int64_t step) const {
    const int64_t t = sched_.time(step), rows = sched_.rows(t), P = d_.state_size;
    sl.multiply(buf_.hidden, d_.hidden, rows, sl.scratch, sl.w.width);
    for (int64_t b = 0; b < d_.batch; ++b) {
      if (!active(t, b)) {
        carry_hidden(sl.cols, step, b);
        continue;
      }
      for_each_chunk<A>(sl.cols.size(), [&](int64_t u, int n) {
        const int64_t p = sl.cols.begin + u;
        Simd<A> h = load<A>(sl.scratch + b * sl.w.width + u);
        if (zoneout()) {
          const Zoneout& z = sched_.flags.zoneout;
          h = z.blend(z.template weight<A>(0, t, b, P, p), load<A>(h_prev(step) + b * P + p, n), h);
        }
        emit_hidden(step, b, p, h, n);
      });
    }
  }

  /// Whether row b enters the step after `step` from its initial states (a reset there).
  bool restarts_next(int64_t step, int64_t b) const {
    return kFlags && sched_.flags.resets && step + 1 < d_.seq_len && sched_.reset(sched_.time(step + 1), b);
  }

  /// Row b's new h at columns [p, p+n): into the output and the recurrent state, which holds the initial h
  /// instead for a row that restarts at the next step (the state that step's GEMM must read).
  void emit_hidden(int64_t step, int64_t b, int64_t p, Simd<A> h, int n) const {
    const int64_t t = sched_.time(step), P = d_.state_size;
    store(buf_.sequence[0] + (t * d_.batch + b) * P + p, h, n);
    store(h_cur(step) + b * P + p, restarts_next(step, b) ? load<A>(buf_.initial[0] + b * P + p, n) : h, n);
  }

  /// An inactive row at time(step): it keeps its states and records zeros (output, workspace, saved states),
  /// at units `units` (the private states stay in place); h at those columns unless a projection owns h.
  void skip_row(Range units, int64_t step, int64_t b) const {
    if constexpr (Options::kSaveWorkspace) {
      const int64_t H = d_.hidden, row = sched_.time(step) * d_.batch + b;
      for (int64_t g = 0; g < W; ++g) fill_zero(buf_.workspace + (row * W + g) * H + units.begin, units.size());
      for (int k = 1; k < K; ++k) fill_zero(buf_.sequence[k] + row * H + units.begin, units.size());
    }
    if constexpr (!kProjection) carry_hidden(units, step, b);
  }

  /// Inactive row b keeps its h (or takes the initial one if it restarts at the next step) and gets zeros in
  /// the output, at columns `cols` of h.
  void carry_hidden(Range cols, int64_t step, int64_t b) const {
    const int64_t t = sched_.time(step), P = d_.state_size;
    const A* from = (restarts_next(step, b) ? buf_.initial[0] : h_prev(step)) + b * P;
    std::copy(from + cols.begin, from + cols.end, h_cur(step) + b * P + cols.begin);
    fill_zero(buf_.sequence[0] + (t * d_.batch + b) * P + cols.begin, cols.size());
  }

  const Cell& cell_;
  LayerShape d_;
  Schedule sched_;
  Buffers buf_;
  int threads_;
  const int64_t input_block_steps_;  // steps per input projection (input_block_steps), when gates_x is null
  SliceSet<A> step_slices_, proj_slices_, input_slices_;
};

/// `count` elements of a bias vector `source` from element `begin`, added into a cell's bias at element `at`.
struct BiasPiece {
  const at::Tensor& source;
  int64_t begin, count, at;
};

/// A cell's bias (n,) in the accumulation dtype of the storage dtype `dtype` (the pieces' own): the sum of `pieces`,
/// zero where none lands, added in their order. One allocation and a loop: each ATen op on these (G*H,) vectors costs
/// about half a microsecond, and building the GRU's biases with to / narrow / add_ took 4.2 us of a one-step GRU cell
/// op's 6.7 us (the LSTM's and Elman cell's b_ih + b_hh 1.1-1.2 us of 3-4; NOTES.md "Round 16").
inline at::Tensor cell_bias(int64_t n, at::ScalarType dtype, std::initializer_list<BiasPiece> pieces) {
  at::Tensor bias = at::empty({n}, at::TensorOptions().dtype(at::toOpMathType(dtype)));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "seqkern_cell_bias", [&] {
    using A = Acc<scalar_t>;
    A* out = bias.data_ptr<A>();
    std::fill(out, out + n, A(0));
    for (const BiasPiece& piece : pieces) {
      const at::Tensor source = piece.source.contiguous();
      const scalar_t* in = source.data_ptr<scalar_t>() + piece.begin;
      for (int64_t i = 0; i < piece.count; ++i) out[piece.at + i] += static_cast<A>(in[i]);
    }
  });
  return bias;
}

/// b_ih + b_hh in the accumulation dtype (undefined without biases): the LSTM's and Elman cell's gates see only
/// their sum.
inline at::Tensor summed_bias(const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh) {
  if (!b_ih.has_value()) return {};
  const int64_t n = b_ih->numel();
  return cell_bias(n, b_ih->scalar_type(), {{*b_ih, 0, n, 0}, {*b_hh, 0, n, 0}});
}

/// A layer's weights: w_ih (G*H, I), w_hh (G*H, P), w_hr (P, H) or undefined, in the storage dtype;
/// input_bias (G*H,) (added to x W_ih^T) and recurrent_bias (H,) (the cell's, GRU's b_hn) in the
/// accumulation dtype, or undefined (no biases).
struct LayerWeights {
  at::Tensor w_ih, w_hh, w_hr, input_bias, recurrent_bias;
};

/// What a layer forward returns: output (T,B,P), the last states (state 0 (B,P), the others (B,H)) and,
/// when the workspace is saved, the states k >= 1 at every step (T,B,H) (undefined otherwise).
template <int K>
struct LayerOutputs {
  at::Tensor output;
  std::array<at::Tensor, K> last, sequence;
};

/// Whether a layer call runs as one cell step on two GEMMs (single_step_forward) rather than the time loop: one
/// step in a plain schedule (all rows active, no lengths, resets or zoneout), no projection, float32 / float64. The
/// loop packs W_hh into its threads' panels to reuse them over the steps, which one step never does.
inline bool single_step(const LayerShape& d, const Schedule& sched, bool projection, at::ScalarType dtype) {
  return d.seq_len == 1 && d.batch > 0 && !projection && !sched.flags.any() &&
         (!sched.batch_sizes || sched.rows(0) == d.batch) && dtype == at::toOpMathType(dtype);
}

template <typename Cell>
std::array<at::Tensor, Cell::kStates> cell_forward(const Cell& cell, const at::Tensor& gates_x,
                                                   const at::Tensor& gates_h,
                                                   const std::array<at::Tensor, Cell::kStates>& prev,
                                                   const at::Tensor& bias_x, const at::Tensor& recurrent_bias,
                                                   at::Tensor workspace);

/// layer_forward of one step (single_step): gates x W_ih^T and h0 W_hh^T by at::mm, then cell_forward's fused
/// step over the rows (the cell op's own path), its workspace rows written in place of the loop's.
template <typename Cell>
LayerOutputs<Cell::kStates> single_step_forward(const Cell& cell, const LayerShape& d, const at::Tensor& input,
                                                const std::array<at::Tensor, Cell::kStates>& initial,
                                                const LayerWeights& wts, bool save_workspace,
                                                const at::Tensor& workspace) {
  constexpr int K = Cell::kStates;
  const int64_t B = d.batch;
  const at::Tensor gates_x = at::mm(input.reshape({B, d.input_size}), wts.w_ih.t());
  const at::Tensor gates_h = at::mm(initial[0], wts.w_hh.t());
  std::array<at::Tensor, K> prev;
  for (int k = 0; k < K; ++k) prev[k] = initial[k].contiguous();
  const std::array<at::Tensor, K> next =
      cell_forward(cell, gates_x, gates_h, prev, wts.input_bias, wts.recurrent_bias,
                   save_workspace && Cell::kWorkspaceBlocks > 0 ? workspace.view({B, -1}) : at::Tensor());
  LayerOutputs<K> out;
  out.output = next[0].view({1, B, d.state_size});
  out.last[0] = next[0].clone();  // the op's results may not alias each other
  for (int k = 1; k < K; ++k) {
    out.last[k] = next[k];
    if (save_workspace) out.sequence[k] = next[k].clone().view({1, B, d.hidden});
  }
  return out;
}

/// The whole layer forward from the initial states (state 0 (B,P), the others (B,H)); fills `workspace`
/// (T,B,kWorkspaceBlocks*H) and returns the states' sequences if save_workspace.
template <typename Cell>
LayerOutputs<Cell::kStates> layer_forward(const Cell& cell, const LayerShape& d, const at::Tensor& input,
                                          const std::array<at::Tensor, Cell::kStates>& initial,
                                          const LayerWeights& wts, const Schedule& sched, bool save_workspace,
                                          const at::Tensor& workspace) {
  constexpr int K = Cell::kStates;
  const int64_t T = d.seq_len, B = d.batch, H = d.hidden, P = d.state_size;
  const bool projection = wts.w_hr.defined(), has_bias = wts.input_bias.defined();
  if (single_step(d, sched, projection, input.scalar_type()))
    return single_step_forward(cell, d, input, initial, wts, save_workspace, workspace);
  LayerOutputs<K> out;
  out.output = pooled_empty({T, B, P}, input.options());
  for (int k = 1; k < K; ++k)
    if (save_workspace) out.sequence[k] = pooled_empty({T, B, H}, input.options());
  if (T == 0 || B == 0) {
    for (int k = 0; k < K; ++k) out.last[k] = initial[k].clone();
    return out;
  }
  const auto dtype = input.scalar_type(), acc = at::toOpMathType(dtype);
  const auto acc_options = input.options().dtype(acc);
  const int threads = loop_threads(d, Cell::kGates, projection, acc);
  const bool in_team = project_input_in_team(d, Cell::kGates, threads, dtype);
  at::Tensor gates_x, input_contiguous, w_ih_contiguous;
  if (in_team) {
    input_contiguous = input.contiguous();
    w_ih_contiguous = wts.w_ih.contiguous();
  } else {
    gates_x = pooled_empty({T * B, Cell::kGates * H}, acc_options);
    // The input bias is the cell's to add (in registers), not the GEMM's: at::addmm first copies the
    // broadcast bias into all T*B rows (1.8 ms of a 200 ms LSTM training step at b32 t100 h256, one thread).
    input_projection(input.contiguous(), wts.w_ih, gates_x);
  }
  const at::Tensor w_hh_acc = wts.w_hh.to(acc).contiguous();
  const at::Tensor w_hr_acc = projection ? wts.w_hr.to(acc).contiguous() : at::Tensor();
  at::Tensor h_state = at::empty({2, B, P}, acc_options);
  h_state.select(0, 1).copy_(initial[0]);
  std::array<at::Tensor, K> state;
  for (int k = 1; k < K; ++k) state[k] = initial[k].to(acc, false, /*copy=*/true).contiguous();
  const at::Tensor hidden = projection ? at::empty({B, H}, acc_options) : at::Tensor();
  // The initial states resets restore, in the accumulation dtype.
  std::array<at::Tensor, K> initial_acc;
  if (sched.flags.resets)
    for (int k = 0; k < K; ++k) initial_acc[k] = initial[k].to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "seqkern_layer_forward", [&] {
    using A = Acc<scalar_t>;
    flag_switch(has_bias, [&](auto bias) {
      flag_switch<(Cell::kWorkspaceBlocks > 0 || K > 1)>(save_workspace, [&](auto save) {
        flag_switch<Cell::kProjectable>(projection, [&](auto proj) {
          flag_switch(sched.flags.any(), [&](auto flags) {
            using Options = LoopOptions<decltype(bias)::value, decltype(save)::value, decltype(proj)::value,
                                        decltype(flags)::value>;
            using Loop = CellForwardLoop<Cell, scalar_t, Options>;
            typename Loop::Buffers buf{};
            buf.gates_x = in_team ? nullptr : gates_x.data_ptr<A>();
            buf.input = in_team ? input_contiguous.data_ptr<scalar_t>() : nullptr;
            buf.w_ih = in_team ? w_ih_contiguous.data_ptr<scalar_t>() : nullptr;
            buf.input_bias = has_bias ? wts.input_bias.data_ptr<A>() : nullptr;
            buf.recurrent_bias = wts.recurrent_bias.defined() ? wts.recurrent_bias.data_ptr<A>() : nullptr;
            buf.w_hh = w_hh_acc.data_ptr<A>();
            buf.w_hr = projection ? w_hr_acc.data_ptr<A>() : nullptr;
            buf.workspace = save && Cell::kWorkspaceBlocks > 0 ? workspace.data_ptr<scalar_t>() : nullptr;
            buf.h_state = h_state.data_ptr<A>();
            buf.sequence[0] = out.output.template data_ptr<scalar_t>();
            for (int k = 1; k < K; ++k) {
              buf.state[k] = state[k].template data_ptr<A>();
              buf.sequence[k] = save ? out.sequence[k].template data_ptr<scalar_t>() : nullptr;
            }
            buf.hidden = projection ? hidden.data_ptr<A>() : nullptr;
            for (int k = 0; k < K; ++k)
              buf.initial[k] = initial_acc[k].defined() ? initial_acc[k].template data_ptr<A>() : nullptr;
            Loop(cell, d, sched, buf, threads).run();
          });
        });
      });
    });
  });
  out.last[0] = h_state.select(0, (T - 1) & 1).to(dtype, false, /*copy=*/true);
  for (int k = 1; k < K; ++k) out.last[k] = state[k].to(dtype, false, /*copy=*/true);
  return out;
}

// ================================================================================================
// Layer backward: the persistent loop over the steps in reverse processing order, then batched GEMMs.
// ================================================================================================
/// Per step: the fused pointwise gradient of the thread's units (d_gates, the private states' gradients
/// and the direct path into d_h_prev), barrier, then d_h_prev[:, slice] += d_gates_h @ W_hh[:, slice] on
/// the thread's columns of h (W_hh column slice packed and hot). Without a projection unit and column
/// slices are the same split, so the next step's pointwise pass reads exactly the d_h columns this thread
/// wrote: one barrier per step. With one, the pointwise pass first forms d_hidden = d_h @ W_hr[:, units]
/// from every column of d_h: a second barrier.
/// With grad_input (input_gradient_in_team) the thread also keeps its W_ih column slice packed and forms its
/// columns of grad_input(t) = d_gates_x(t) @ W_ih between its arrival at a step's barrier and its wait there,
/// for the step before (whose d_gates_x rows every thread finished before that step's barrier).
template <typename Cell, typename S, typename Options>
class CellBackwardLoop {
 public:
  using A = Acc<S>;
  static constexpr int G = Cell::kGates, K = Cell::kStates;
  static constexpr int64_t W = Cell::kWorkspaceBlocks;
  static constexpr bool kProjection = Options::kProjection, kFlags = Options::kStateFlags;

  struct Buffers {
    const S* grad_output;              // (T, B, P)
    const S* workspace;                // (T, B, W*H) or null
    std::array<const S*, K> initial;   // [0] h0 (B, P); [k] (B, H)
    std::array<const S*, K> sequence;  // [0] the output (T, B, P); [k] (T, B, H), as the forward saved them
    const A* w_hh;                     // (G*H, P)
    const A* w_hr;                     // (P, H), kProjection
    A* d_gates_x;                      // (T, B, G*H) out: gradient of x W_ih^T, zero on inactive rows
    A* d_gates_h;                      // (T, B, G*H) out: that of h W_hh^T (may alias d_gates_x: kSameGateGrads)
    std::array<A*, K> d_state;         // [0] (B, P), [k] (B, H): gradients of the states at the current step,
                                       // seeded with those of the last states; those of the initial states on exit
    A* d_h_all;                        // (T, B, P) out, kProjection: gradient of the projection's output h_t
                                       // (zoneout's share taken out), zero on inactive rows
    A* hidden_all;                     // (T, B, H) out, kProjection: cell output before the projection
    std::array<A*, K> d_initial;       // kStateFlags with resets: (B, P) / (B, H) zeros in, the initial states'
                                       // gradient through the restarts out (added to d_state's by the caller)
    double* d_bias_x;                  // (G*H) zeros in, or null (no bias): the sum of d_gates_x's rows out
    double* d_bias_h;                  // (G*H) zeros in, or null (no bias, kSameGateGrads): d_gates_h's
    const A* w_ih;                     // (G*H, I), with grad_input
    A* grad_input;                     // (T, B, I) out, or null: formed after the loop (input_gradient)
  };

  CellBackwardLoop(const Cell& cell, const LayerShape& d, const Schedule& sched, const Buffers& buf, int threads)
      : cell_(cell), d_(d), sched_(sched), buf_(buf), threads_(threads),
        unit_slices_(d.hidden, threads, 1, kProjection ? d.state_size : 0, kProjection ? d.batch : 0, bf16()),
        col_slices_(d.state_size, threads, 1, G * d.hidden, d.batch, bf16()),
        input_slices_(buf.grad_input ? d.input_size : 0, threads, 1, G * d.hidden, d.batch) {}

  void run() {
    seed_first_step();
    run_persistent(threads_, [&](int first, int stride, SpinBarrier& barrier) {
      const size_t slices = col_slices_.slices.size();
      // Column j of a slice <- column j of its units in W_hr (depth P) / of its columns in W_hh (depth G*H).
      for (size_t s = first; s < slices; s += stride) {
        if constexpr (kProjection) unit_slices_.slices[s].pack_columns(buf_.w_hr, d_.hidden);
        col_slices_.slices[s].pack_columns(buf_.w_hh, d_.state_size);
        if (buf_.grad_input) input_slices_.slices[s].pack_columns(buf_.w_ih, d_.input_size);
      }
      for (int64_t step = 0; step < d_.seq_len; ++step) {
        for (size_t s = first; s < slices; s += stride)
          cell_grad_phase(unit_slices_.slices[s], sched_.backward_time(step));
        const int ticket = barrier.arrive();
        if (step > 0)
          for (size_t s = first; s < slices; s += stride) input_grad_phase(s, sched_.backward_time(step - 1));
        barrier.wait(ticket);
        for (size_t s = first; s < slices; s += stride) recurrent_phase(col_slices_.slices[s], step);
        if constexpr (kProjection) barrier.arrive_and_wait();
      }
      // The last step's d_gates_x rows were all written before its barrier.
      for (size_t s = first; s < slices; s += stride) input_grad_phase(s, sched_.backward_time(d_.seq_len - 1));
    });
  }

 private:
  bool bf16() const { return use_bf16_units(c10::CppTypeToScalarType<S>::value) && cell_.bf16_state_ok(); }
  bool zoneout() const { return kFlags && sched_.flags.zoneout.on(); }
  bool active(int64_t t, int64_t b) const { return kFlags ? sched_.active(t, b) : b < sched_.rows(t); }
  bool restarts(int64_t t, int64_t b) const { return kFlags && sched_.reset(t, b); }

  /// d h at the first backward step's time: grad_h_n plus that step's grad_output on its active rows, and
  /// with a projection d_h_all there (what the first cell_grad_phase multiplies by W_hr).
  void seed_first_step() const {
    const int64_t t = sched_.time(d_.seq_len - 1), P = d_.state_size;
    for (int64_t b = 0; b < d_.batch; ++b) {
      const bool on = active(t, b);
      for_each_chunk<A>(P, [&](int64_t p, int n) {
        A* d_h = buf_.d_state[0] + b * P + p;
        Simd<A> v = load<A>(d_h, n);
        if (on) v += load<A>(buf_.grad_output + (t * d_.batch + b) * P + p, n);
        store(d_h, v, n);
        if constexpr (kProjection) store(buf_.d_h_all + (t * d_.batch + b) * P + p, projected_share(v, t, b, p, on), n);
      });
    }
  }

  /// What of d h_t (row b, columns [p, p + kLanes)) reaches the projection's output: all of it, but for zoneout's
  /// share of h_{t-1}; nothing on an inactive row.
  Simd<A> projected_share(Simd<A> d_h, int64_t t, int64_t b, int64_t p, bool on) const {
    if (!on) return Simd<A>{};
    if (!zoneout()) return d_h;
    const Zoneout& z = sched_.flags.zoneout;
    return z.split(z.template weight<A>(0, t, b, d_.state_size, p), d_h).first;
  }

  /// Row b's GradIn at time t at unit u0 (state 0 only without a projection: behind one it is P wide). With
  /// zoneout the recorded states k >= 1 are the blended ones, not the cell's own: cur[k] is null (the cell
  /// recomputes it, see "Cell interface").
  GradIn<S, K> grad_in(int64_t t, int64_t b, int64_t u0) const {
    const int64_t row = t * d_.batch + b;
    GradIn<S, K> in{W > 0 ? buf_.workspace + row * W * d_.hidden + u0 : nullptr, {}, {}, d_.hidden, 0};
    for (int k = kProjection ? 1 : 0; k < K; ++k) {
      const int64_t width = k == 0 ? d_.state_size : d_.hidden;
      if (!buf_.sequence[k]) continue;
      in.prev[k] = sched_.previous_row(buf_.sequence[k], buf_.initial[k], t, b, width) + u0;
      in.cur[k] = k > 0 && zoneout() ? nullptr : buf_.sequence[k] + row * width + u0;
    }
    return in;
  }

  /// Fused pointwise gradient of the slice's units at time t. Zoneout first splits each state's gradient into
  /// the step's share and the previous state's (which goes on in d_state: without a projection state 0's
  /// share stays there for recurrent_phase to add to).
  void cell_grad_phase(const Slice<A>& s, int64_t t) const {
    const int64_t rows = sched_.rows(t), B = d_.batch, H = d_.hidden, P = d_.state_size, u0 = s.cols.begin;
    if constexpr (kProjection) s.multiply(buf_.d_h_all + t * B * P, P, rows, s.scratch, s.w.width);
    for (int64_t b = 0; b < B; ++b) {
      if (active(t, b)) {
        grad_row(s, t, b);
      } else {
        skip_row(s.cols, t, b);
      }
      if (restarts(t, b))  // the private states entering t were the initial ones: their gradient goes there
        for (int k = 1; k < K; ++k) restart_gradient(buf_.d_state[k] + b * H + u0, buf_.d_initial[k] + b * H + u0,
                                                     s.cols.size());
    }
    if (buf_.d_bias_x) accumulate_bias(s.cols, t);
  }

  /// The bias gradients at the slice's units: the step's d_gates rows (all B written, zeros on inactive rows; just
  /// written by this thread, so still in its cache) summed in fp32 and added to fp64 totals. torch.nn's order (a
  /// B-row sum per step, the steps accumulated) with a more accurate total, and no pass over the whole (T*B,
  /// G*H) d_gates after the loop (two at::sum, 2.4% of a GRU training step at b32 t100 h256, one thread).
  void accumulate_bias(Range units, int64_t t) const {
    sum_rows_into(buf_.d_gates_x + t * d_.batch * G * d_.hidden, buf_.d_bias_x, units);
    if (buf_.d_bias_h) sum_rows_into(buf_.d_gates_h + t * d_.batch * G * d_.hidden, buf_.d_bias_h, units);
  }

  /// total[g*H + u] += the sum over b of rows[b][g*H + u], for u in `units`, every gate block g.
  void sum_rows_into(const A* rows, double* total, Range units) const {
    const int64_t H = d_.hidden, width = G * H;
    for (int g = 0; g < G; ++g)
      for_each_chunk<A>(units.size(), [&](int64_t u, int n) {
        const int64_t col = g * H + units.begin + u;
        Simd<A> sum{};
        for (int64_t b = 0; b < d_.batch; ++b) sum += load<A>(rows + b * width + col, n);
        for (int i = 0; i < n; ++i) total[col + i] += sum[i];
      });
  }

  void grad_row(const Slice<A>& s, int64_t t, int64_t b) const {
    const int64_t row = t * d_.batch + b, H = d_.hidden, P = d_.state_size, u0 = s.cols.begin;
    const GradIn<S, K> in = grad_in(t, b, u0);
    for_each_chunk<A>(s.cols.size(), [&](int64_t u, int n) {
      const int64_t unit = u0 + u;
      States<A, K> d, kept{};
      d[0] = kProjection ? load<A>(s.scratch + b * s.w.width + u) : load<A>(buf_.d_state[0] + b * P + unit, n);
      for (int k = 1; k < K; ++k) d[k] = load<A>(buf_.d_state[k] + b * H + unit, n);
      if (zoneout())
        for (int k = kProjection ? 1 : 0; k < K; ++k) {
          const Zoneout& z = sched_.flags.zoneout;
          std::tie(d[k], kept[k]) = z.split(z.template weight<A>(k, t, b, H, unit), d[k]);
        }
      const auto grad = cell_.template grad<A>(in.at(u, n), d);
      cell_.store_grad(buf_.d_gates_x + row * G * H + unit, buf_.d_gates_h + row * G * H + unit, H, grad, n);
      if constexpr (!kProjection) {
        if (Cell::kDirectPath || zoneout())
          store(buf_.d_state[0] + b * P + unit, Cell::kDirectPath ? grad.d_prev[0] + kept[0] : kept[0], n);
      }
      for (int k = 1; k < K; ++k) store(buf_.d_state[k] + b * H + unit, grad.d_prev[k] + kept[k], n);
      if constexpr (kProjection) store(buf_.hidden_all + row * H + unit, grad.output, n);
    });
  }

  /// An inactive row: zero gate gradients (the weight-gradient GEMMs read every row); d_state carries over.
  void skip_row(Range units, int64_t t, int64_t b) const {
    const int64_t row = t * d_.batch + b, H = d_.hidden;
    for (int g = 0; g < G; ++g) {
      fill_zero(buf_.d_gates_x + (row * G + g) * H + units.begin, units.size());
      if (!Cell::kSameGateGrads) fill_zero(buf_.d_gates_h + (row * G + g) * H + units.begin, units.size());
    }
    if constexpr (kProjection) fill_zero(buf_.hidden_all + row * H + units.begin, units.size());
  }

  /// d_initial += d; d = 0 over n elements.
  static void restart_gradient(A* d, A* d_initial, int64_t n) {
    for (int64_t i = 0; i < n; ++i) d_initial[i] += d[i];
    fill_zero(d, n);
  }

  /// grad_input(t) at slice s's columns of the input = d_gates_x(t) @ W_ih, all B rows (d_gates_x is zero on the
  /// inactive ones), through the slice's scratch: the micro-kernel writes whole padded panels, which would reach
  /// into the next thread's columns of grad_input.
  void input_grad_phase(size_t s, int64_t t) const {
    if (!buf_.grad_input) return;
    const Slice<A>& xs = input_slices_.slices[s];
    if (xs.cols.size() == 0) return;
    const int64_t B = d_.batch, I = d_.input_size, width = G * d_.hidden;
    xs.multiply(buf_.d_gates_x + t * B * width, width, B, xs.scratch, xs.w.width);
    for (int64_t b = 0; b < B; ++b)
      std::copy(xs.scratch + b * xs.w.width, xs.scratch + b * xs.w.width + xs.cols.size(),
                buf_.grad_input + (t * B + b) * I + xs.cols.begin);
  }

  /// d h entering time t at the slice's columns: d_gates_h(t) @ W_hh, plus the direct path (the cell's and
  /// zoneout's share, left in d_state by cell_grad_phase; behind a projection zoneout's share of d h_t is taken
  /// here), on the rows active at t (inactive rows carry theirs); a restarting row hands it to d_initial; then
  /// plus grad_output of the next step's time on its active rows: d h for the next backward step.
  void recurrent_phase(const Slice<A>& s, int64_t step) const {
    const int64_t t = sched_.backward_time(step), rows = sched_.rows(t), B = d_.batch, P = d_.state_size;
    const bool has_next = step + 1 < d_.seq_len;
    const int64_t next_t = has_next ? sched_.backward_time(step + 1) : 0;
    s.multiply(buf_.d_gates_h + t * B * G * d_.hidden, G * d_.hidden, rows, s.scratch, s.w.width);
    for (int64_t b = 0; b < B; ++b) {
      A* d_h = buf_.d_state[0] + b * P + s.cols.begin;
      const bool on = active(t, b), next_on = has_next && active(next_t, b);
      for_each_chunk<A>(s.cols.size(), [&](int64_t u, int n) {
        const int64_t p = s.cols.begin + u;
        Simd<A> v = load<A>(d_h + u, n);
        if (on) {
          const Simd<A> through_w_hh = load<A>(s.scratch + b * s.w.width + u);
          if (kProjection && zoneout()) {
            const Zoneout& z = sched_.flags.zoneout;
            v = through_w_hh + z.split(z.template weight<A>(0, t, b, P, p), v).second;
          } else {
            v = Cell::kDirectPath || zoneout() ? v + through_w_hh : through_w_hh;
          }
        }
        if (restarts(t, b)) {
          A* d0 = buf_.d_initial[0] + b * P + p;
          store(d0, load<A>(d0, n) + v, n);
          v = Simd<A>{};
        }
        if (next_on) v += load<A>(buf_.grad_output + (next_t * B + b) * P + p, n);
        store(d_h + u, v, n);
        if constexpr (kProjection)
          if (has_next) store(buf_.d_h_all + (next_t * B + b) * P + p, projected_share(v, next_t, b, p, next_on), n);
      });
    }
  }

  const Cell& cell_;
  LayerShape d_;
  Schedule sched_;
  Buffers buf_;
  int threads_;
  SliceSet<A> unit_slices_, col_slices_, input_slices_;
};

/// The hidden state each step read, (T*B, P) in dtype `acc`: h0 at the first step, the previous step's
/// output after it, and h0 again for rows that start later (reverse direction with batch_sizes or lengths,
/// resets): wherever Schedule::started_before is false. (Rows inactive at a step get whatever: their gate
/// gradients are zero.)
inline at::Tensor previous_hidden(const at::Tensor& output, const at::Tensor& h0, const Schedule& sched,
                                  at::ScalarType acc) {
  const int64_t T = sched.seq_len, B = sched.batch;
  at::Tensor prev = pooled_empty(output.sizes(), output.options().dtype(acc));
  if (T == 0) return prev.view({0, prev.size(2)});
  prev.select(0, sched.time(0)).copy_(h0);
  if (T > 1) prev.narrow(0, sched.reverse ? 0 : 1, T - 1).copy_(output.narrow(0, sched.reverse ? 1 : 0, T - 1));
  if (sched.flags.lengths || sched.flags.resets) {
    at::Tensor starts = at::empty({T, B, 1}, output.options().dtype(at::kBool));
    bool* data = starts.data_ptr<bool>();
    for (int64_t t = 0; t < T; ++t)
      for (int64_t b = 0; b < B; ++b) data[t * B + b] = !sched.started_before(t, b);
    return at::where(starts, h0.to(acc).unsqueeze(0), prev).view({-1, prev.size(2)});
  }
  if (sched.reverse && sched.batch_sizes)
    for (int64_t t = 0; t + 1 < T; ++t) {
      const int64_t lo = sched.batch_sizes[t + 1], hi = sched.batch_sizes[t];
      if (hi > lo) prev.select(0, t).narrow(0, lo, hi - lo).copy_(h0.narrow(0, lo, hi - lo));
    }
  return prev.view({-1, prev.size(2)});
}

/// A bf16 layer's weight gradient lhs^T @ rhs over all rows: one at::mm of the bf16-rounded operands (oneDNN:
/// AMX where the CPU has it, fp32 accumulation over all rows, one rounding to bf16 at the end; the fp32 chunking
/// of sum_of_outer_products exists for fp32's 2x rule, while bf16's output rounding, 2^-9 relative, dwarfs the
/// fp32 sum's error).
inline at::Tensor bf16_weight_gradient(const at::Tensor& lhs, const at::Tensor& rhs) {
  return at::mm(lhs.to(at::kBFloat16).t(), rhs.to(at::kBFloat16));
}

/// grad_input = d_gates (rows, gates*H, accumulation dtype) @ w_ih (gates*H, I), in storage dtype
/// `dtype`: a bf16 at::mm (oneDNN) in bf16, else in the accumulation dtype on the packed micro-kernel (MKL's
/// at::mm where I is not whole vectors).
inline at::Tensor input_gradient(const at::Tensor& d_gates, const at::Tensor& w_ih, at::ScalarType dtype) {
  if (use_bf16_gradients(dtype)) return at::mm(d_gates.to(at::kBFloat16), w_ih);
  const at::Tensor w = w_ih.to(d_gates.scalar_type()).contiguous();
  const int64_t width = w.size(1);
  if (!packed_products_pay(d_gates.size(0), width, d_gates)) return at::mm(d_gates, w).to(dtype);
  // The packed micro-kernel, as the input projection: column j of W_ih, its rows `width` apart.
  at::Tensor out = pooled_empty({d_gates.size(0), width}, d_gates.options());
  packed_product(d_gates.contiguous(), w, width, /*column_step=*/1, /*k_step=*/width, out);
  return out.to(dtype);
}

/// The (lhs, rhs) pieces of grad_w_hh = the sum over steps of d_gates_h(t)^T h_{t-1}; output (T,B,P) and h0 (B,P)
/// contiguous. In the plain schedule (no lengths or resets, no batch_sizes in the reverse direction) the rows
/// h_{t-1} are h0's and the output's shifted by one step, and are summed from there rather than first copied
/// into one (T*B, P) matrix by previous_hidden (3.3 MB at b32 t100 h256: a page-faulting copy of 0.85 ms in a
/// 20 ms RNN training step at one thread). Otherwise (other schedules, an output stored in another dtype than
/// d_gates_h's) previous_hidden gathers them in the GEMMs' operand dtype `gemm_dtype`.
inline OuterPieces recurrent_weight_pieces(const at::Tensor& d_gates_h, const at::Tensor& output, const at::Tensor& h0,
                                           const Schedule& sched, at::ScalarType gemm_dtype) {
  const int64_t T = sched.seq_len, B = sched.batch, P = output.size(2);
  const bool shifted = !sched.flags.lengths && !sched.flags.resets && !(sched.reverse && sched.batch_sizes);
  if (!shifted || T == 0 || B == 0 || output.scalar_type() != d_gates_h.scalar_type())
    return {{d_gates_h, previous_hidden(output, h0, sched, gemm_dtype)}};
  const at::Tensor out_rows = output.view({T * B, P});
  const int64_t later = (T - 1) * B;  // the rows whose h_{t-1} is an output row
  // Time order, as previous_hidden's rows: forward, h0 comes first; reverse, last.
  const std::pair<at::Tensor, at::Tensor> initial{d_gates_h.narrow(0, sched.reverse ? later : 0, B), h0},
      outputs{d_gates_h.narrow(0, sched.reverse ? 0 : B, later), out_rows.narrow(0, sched.reverse ? B : 0, later)};
  return sched.reverse ? OuterPieces{outputs, initial} : OuterPieces{initial, outputs};
}

/// grad_w_ih, grad_w_hh and (with a projection: hidden_all defined) grad_w_hr, in the storage dtype `dtype`. In
/// bf16, bf16_weight_gradient each; else sums_of_outer_products, side by side.
inline std::vector<at::Tensor> layer_weight_gradients(const at::Tensor& d_gates_x, const at::Tensor& x_rows,
                                                      const at::Tensor& d_gates_h, const at::Tensor& output,
                                                      const at::Tensor& h0, const at::Tensor& d_h_all,
                                                      const at::Tensor& hidden_all, const Schedule& sched,
                                                      at::ScalarType dtype, at::ScalarType gemm_dtype) {
  std::vector<at::Tensor> grads;
  if (use_bf16_gradients(dtype)) {
    grads = {bf16_weight_gradient(d_gates_x, x_rows),
             bf16_weight_gradient(d_gates_h, previous_hidden(output, h0, sched, gemm_dtype))};
    if (hidden_all.defined()) grads.push_back(bf16_weight_gradient(d_h_all, hidden_all));
    return grads;
  }
  std::vector<OuterPieces> jobs{{{d_gates_x, x_rows}},
                                recurrent_weight_pieces(d_gates_h, output, h0, sched, gemm_dtype)};
  if (hidden_all.defined()) jobs.push_back({{d_h_all, hidden_all}});
  for (const at::Tensor& g : sums_of_outer_products(jobs, weight_gradient_chunk_rows(x_rows.size(0))))
    grads.push_back(g.to(dtype));
  return grads;
}

/// Gradients of one layer, in the storage dtype: of the input, of each initial state (in the cell's state
/// order), of the weights; the bias ones undefined unless has_bias, w_hr's unless there is a projection.
struct LayerGrads {
  at::Tensor input;
  std::vector<at::Tensor> initial;
  at::Tensor w_ih, w_hh, b_ih, b_hh, w_hr;
};

template <typename Cell>
struct CellGrads;
template <typename Cell>
CellGrads<Cell> cell_backward(const Cell& cell, const std::array<at::Tensor, Cell::kStates>& grad_next,
                              const at::Tensor& workspace, const std::array<at::Tensor, Cell::kStates>& prev,
                              const std::array<at::Tensor, Cell::kStates>& next);

/// layer_backward of one step (single_step, as the forward ran it): cell_backward's fused gradient over the rows,
/// grad_input and the initial h's gradient through W_ih and W_hh by at::mm, the weight gradients as the loop's path
/// sums them (layer_weight_gradients), the bias gradients as the sums of the gate gradients' rows (as the cell ops').
template <typename Cell>
LayerGrads single_step_backward(const Cell& cell, const LayerShape& d, const at::Tensor& grad_output,
                                const std::array<at::Tensor, Cell::kStates>& grad_last, const at::Tensor& input,
                                const std::array<at::Tensor, Cell::kStates>& initial, const at::Tensor& w_ih,
                                const at::Tensor& w_hh, const at::Tensor& output, const at::Tensor& workspace,
                                const std::array<at::Tensor, Cell::kStates>& sequence, const Schedule& sched,
                                bool has_bias) {
  constexpr int K = Cell::kStates;
  const int64_t B = d.batch, H = d.hidden;
  const auto dtype = input.scalar_type();
  std::array<at::Tensor, K> grad_next, prev, next;
  for (int k = 0; k < K; ++k) {
    grad_next[k] = k == 0 ? grad_output.reshape({B, H}) + grad_last[0] : grad_last[k].contiguous();
    prev[k] = initial[k].contiguous();
    next[k] = (k == 0 ? output : sequence[k]).reshape({B, H});  // the states the step produced
  }
  const CellGrads<Cell> g = cell_backward(
      cell, grad_next, Cell::kWorkspaceBlocks > 0 ? workspace.reshape({B, -1}) : at::Tensor(), prev, next);
  LayerGrads grads;
  grads.input = at::mm(g.d_gates_x, w_ih).view({1, B, d.input_size});
  at::Tensor d_h0 = at::mm(g.d_gates_h, w_hh);
  if (Cell::kDirectPath) d_h0 += g.d_prev[0];
  grads.initial.push_back(d_h0);
  for (int k = 1; k < K; ++k) grads.initial.push_back(g.d_prev[k]);
  const std::vector<at::Tensor> weights =
      layer_weight_gradients(g.d_gates_x, input.reshape({B, d.input_size}), g.d_gates_h, output.contiguous(),
                             prev[0], at::Tensor(), at::Tensor(), sched, dtype, dtype);
  grads.w_ih = weights[0];
  grads.w_hh = weights[1];
  if (has_bias) {
    grads.b_ih = g.d_gates_x.sum(0);
    grads.b_hh = Cell::kSameGateGrads ? grads.b_ih : g.d_gates_h.sum(0);
  }
  return grads;
}

/// The whole layer backward (shapes checked by the caller) from the gradients of the output and of the last
/// states: the persistent loop for d_gates, the initial states' gradients, the bias sums and (where
/// input_gradient_in_team) grad_input; then grad_input otherwise, grad_w_ih, grad_w_hh (and grad_w_hr) as GEMMs
/// over all T*B rows. `sequence` holds the forward's saved states k >= 1 (T,B,H); w_hr is undefined without a
/// projection.
template <typename Cell>
LayerGrads layer_backward(const Cell& cell, const LayerShape& d, const at::Tensor& grad_output_,
                          const std::array<at::Tensor, Cell::kStates>& grad_last, const at::Tensor& input,
                          const std::array<at::Tensor, Cell::kStates>& initial_, const at::Tensor& w_ih,
                          const at::Tensor& w_hh, const at::Tensor& w_hr, const at::Tensor& output_,
                          const at::Tensor& workspace_, const std::array<at::Tensor, Cell::kStates>& sequence_,
                          const Schedule& sched, bool has_bias) {
  if (single_step(d, sched, w_hr.defined(), input.scalar_type()))
    return single_step_backward(cell, d, grad_output_, grad_last, input, initial_, w_ih, w_hh, output_, workspace_,
                                sequence_, sched, has_bias);
  constexpr int K = Cell::kStates;
  const int64_t T = d.seq_len, B = d.batch, H = d.hidden, P = d.state_size;
  const bool projection = w_hr.defined();
  const auto dtype = input.scalar_type(), acc = at::toOpMathType(dtype);
  const auto acc_options = input.options().dtype(acc);
  // Both written in full by the loop (zeros on inactive rows).
  at::Tensor d_gates_x = pooled_empty({T * B, Cell::kGates * H}, acc_options);
  at::Tensor d_gates_h = Cell::kSameGateGrads ? d_gates_x : pooled_empty({T * B, Cell::kGates * H}, acc_options);
  at::Tensor d_h_all = projection ? pooled_empty({T, B, P}, acc_options) : at::Tensor();
  at::Tensor hidden_all = projection ? pooled_empty({T, B, H}, acc_options) : at::Tensor();
  // The bias gradients, summed by the loop (fp64 totals of per-step fp32 sums; see accumulate_bias).
  const auto bias_options = acc_options.dtype(at::kDouble);
  const at::Tensor d_bias_x = has_bias ? at::zeros({Cell::kGates * H}, bias_options) : at::Tensor();
  const at::Tensor d_bias_h = has_bias && !Cell::kSameGateGrads ? at::zeros({Cell::kGates * H}, bias_options) : at::Tensor();
  // The dtype of the gradient GEMMs' operands (see layer_weight_gradients), in which x and the previous h are
  // gathered.
  const auto gemm_dtype = use_bf16_gradients(dtype) ? at::kBFloat16 : acc;
  const at::Tensor x_rows = input.reshape({T * B, d.input_size}).to(gemm_dtype).contiguous();
  std::array<at::Tensor, K> d_state, initial, sequence;
  for (int k = 0; k < K; ++k) {
    d_state[k] = grad_last[k].to(acc, false, /*copy=*/true).contiguous();
    initial[k] = initial_[k].contiguous();
    sequence[k] = k == 0 ? output_.contiguous() : sequence_[k].contiguous();
  }
  // A gradient that is not contiguous (say, expanded: the gradient of output.sum()) is copied into a pooled block.
  const at::Tensor grad_output =
      grad_output_.is_contiguous() ? grad_output_ : pooled_empty(grad_output_.sizes(), grad_output_.options()).copy_(grad_output_);
  // With resets, the gradients of the initial states through the rows' restarts (the loop adds into them).
  std::array<at::Tensor, K> d_initial;
  if (sched.flags.resets)
    for (int k = 0; k < K; ++k) d_initial[k] = at::zeros_like(d_state[k]);
  const int threads = loop_threads(d, Cell::kGates, projection, acc);
  const bool grad_input_in_team = T > 0 && B > 0 && input_gradient_in_team(d, Cell::kGates, threads, dtype);
  const at::Tensor grad_input = grad_input_in_team ? pooled_empty({T, B, d.input_size}, acc_options) : at::Tensor();
  const at::Tensor w_ih_acc = grad_input_in_team ? w_ih.to(acc).contiguous() : at::Tensor();
  if (T > 0 && B > 0) {
    const at::Tensor workspace = workspace_.contiguous();
    const at::Tensor w_hh_acc = w_hh.to(acc).contiguous();
    const at::Tensor w_hr_acc = projection ? w_hr.to(acc).contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "seqkern_layer_backward", [&] {
      using A = Acc<scalar_t>;
      flag_switch<Cell::kProjectable>(projection, [&](auto proj) {
        flag_switch(sched.flags.any(), [&](auto flags) {
          using Loop = CellBackwardLoop<Cell, scalar_t, LoopOptions<true, true, decltype(proj)::value,
                                                                    decltype(flags)::value>>;
          typename Loop::Buffers buf{};
          buf.grad_output = grad_output.data_ptr<scalar_t>();
          buf.workspace = Cell::kWorkspaceBlocks > 0 ? workspace.data_ptr<scalar_t>() : nullptr;
          for (int k = 0; k < K; ++k) {
            buf.initial[k] = initial[k].template data_ptr<scalar_t>();
            buf.sequence[k] = sequence[k].template data_ptr<scalar_t>();
            buf.d_state[k] = d_state[k].template data_ptr<A>();
            buf.d_initial[k] = d_initial[k].defined() ? d_initial[k].template data_ptr<A>() : nullptr;
          }
          buf.w_hh = w_hh_acc.data_ptr<A>();
          buf.w_hr = projection ? w_hr_acc.data_ptr<A>() : nullptr;
          buf.d_gates_x = d_gates_x.data_ptr<A>();
          buf.d_gates_h = d_gates_h.data_ptr<A>();
          buf.d_h_all = projection ? d_h_all.data_ptr<A>() : nullptr;
          buf.hidden_all = projection ? hidden_all.data_ptr<A>() : nullptr;
          buf.d_bias_x = d_bias_x.defined() ? d_bias_x.data_ptr<double>() : nullptr;
          buf.d_bias_h = d_bias_h.defined() ? d_bias_h.data_ptr<double>() : nullptr;
          buf.w_ih = grad_input_in_team ? w_ih_acc.data_ptr<A>() : nullptr;
          buf.grad_input = grad_input_in_team ? grad_input.data_ptr<A>() : nullptr;
          Loop(cell, d, sched, buf, threads).run();
        });
      });
    });
  }
  for (int k = 0; k < K; ++k)
    if (d_initial[k].defined()) d_state[k].add_(d_initial[k]);
  // The gate gradients rounded to the GEMMs' dtype once for all three products: in bf16 each product converted
  // its own copy (three (T*B, G*H) conversions, 12% of a bf16 LSTM training step's samples at b32 h256).
  const at::Tensor d_gates_x_gemm = d_gates_x.to(gemm_dtype);
  const at::Tensor d_gates_h_gemm = Cell::kSameGateGrads ? d_gates_x_gemm : d_gates_h.to(gemm_dtype);
  LayerGrads grads;
  grads.input = grad_input_in_team ? grad_input.to(dtype)
                                    : input_gradient(d_gates_x_gemm, w_ih, dtype).view({T, B, d.input_size});
  for (int k = 0; k < K; ++k) grads.initial.push_back(d_state[k].to(dtype, false, /*copy=*/true));
  const std::vector<at::Tensor> weights = layer_weight_gradients(
      d_gates_x_gemm, x_rows, d_gates_h_gemm, sequence[0], initial[0],
      projection ? d_h_all.view({T * B, P}) : at::Tensor(), projection ? hidden_all.view({T * B, H}) : at::Tensor(),
      sched, dtype, gemm_dtype);
  grads.w_ih = weights[0];
  grads.w_hh = weights[1];
  if (has_bias) {
    grads.b_ih = d_bias_x.to(dtype);
    grads.b_hh = Cell::kSameGateGrads ? grads.b_ih : d_bias_h.to(dtype);
  }
  if (projection) grads.w_hr = weights[2];
  return grads;
}

// ================================================================================================
// Cell ops: the fused pointwise step on (B, gates*H) rows, rows in parallel.
// ================================================================================================
/// Rows per at::parallel_for task: about 16K units of pointwise work each.
inline int64_t cell_grain(int64_t hidden) { return std::max<int64_t>(1, (16 * 1024) / std::max<int64_t>(1, hidden)); }

/// The new states (B,H each) of one cell step; gates_x, gates_h (B, G*H) contiguous; prev[k] (B,H) the states
/// the step reads (state 0 only with kDirectPath; undefined otherwise); bias_x (G*H,) / recurrent_bias (H,) in
/// the accumulation dtype or undefined; workspace (B, kWorkspaceBlocks*H) filled if defined.
template <typename Cell>
std::array<at::Tensor, Cell::kStates> cell_forward(const Cell& cell, const at::Tensor& gates_x,
                                                   const at::Tensor& gates_h,
                                                   const std::array<at::Tensor, Cell::kStates>& prev,
                                                   const at::Tensor& bias_x, const at::Tensor& recurrent_bias,
                                                   at::Tensor workspace) {
  constexpr int K = Cell::kStates;
  const int64_t B = gates_x.size(0), H = gates_x.size(1) / Cell::kGates;
  std::array<at::Tensor, K> next;
  for (int k = 0; k < K; ++k) next[k] = at::empty({B, H}, gates_x.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gates_x.scalar_type(), "seqkern_cell_forward", [&] {
    using A = Acc<scalar_t>;
    constexpr int64_t G = Cell::kGates, W = Cell::kWorkspaceBlocks;
    const scalar_t *gx = gates_x.data_ptr<scalar_t>(), *gh = gates_h.data_ptr<scalar_t>();
    std::array<const scalar_t*, K> prev_data{};
    std::array<scalar_t*, K> next_data{};
    for (int k = 0; k < K; ++k) {
      prev_data[k] = prev[k].defined() ? prev[k].template data_ptr<scalar_t>() : nullptr;
      next_data[k] = next[k].template data_ptr<scalar_t>();
    }
    const A* bx = bias_x.defined() ? bias_x.data_ptr<A>() : nullptr;
    const A* bh = recurrent_bias.defined() ? recurrent_bias.data_ptr<A>() : nullptr;
    scalar_t* ws = workspace.defined() ? workspace.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, B, cell_grain(H), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        for_each_chunk<A>(H, [&](int64_t u, int n) {
          const StepIn<A, scalar_t, scalar_t> in{gx + b * G * H + u, gh + b * G * H + u, H, H,
                                                 bx ? bx + u : nullptr, bh ? bh + u : nullptr,
                                                 ws ? ws + b * W * H + u : nullptr, H, n};
          States<A, K> p{};
          for (int k = 0; k < K; ++k)
            if (prev_data[k]) p[k] = load<A>(prev_data[k] + b * H + u, n);
          const States<A, K> s = cell.forward(in, p);
          for (int k = 0; k < K; ++k) store(next_data[k] + b * H + u, s[k], n);
        });
    });
  });
  return next;
}

/// Gradients of one cell step: of gates_x and of gates_h (B, kGates*H, the same tensor if kSameGateGrads) in
/// the accumulation dtype, and of the previous states (B,H) in the storage dtype (state 0 only with
/// kDirectPath: its W_hh path is the caller's GEMM). grad_next[k] (B,H) the gradients of the new states;
/// workspace, prev and next states as GradIn wants them (undefined if the cell does not read them).
template <typename Cell>
struct CellGrads {
  at::Tensor d_gates_x, d_gates_h;
  std::array<at::Tensor, Cell::kStates> d_prev;
};

template <typename Cell>
CellGrads<Cell> cell_backward(const Cell& cell, const std::array<at::Tensor, Cell::kStates>& grad_next,
                              const at::Tensor& workspace, const std::array<at::Tensor, Cell::kStates>& prev,
                              const std::array<at::Tensor, Cell::kStates>& next) {
  constexpr int K = Cell::kStates;
  const int64_t B = grad_next[0].size(0), H = grad_next[0].size(1);
  const auto acc = at::toOpMathType(grad_next[0].scalar_type());
  CellGrads<Cell> out;
  out.d_gates_x = at::empty({B, Cell::kGates * H}, grad_next[0].options().dtype(acc));
  out.d_gates_h = Cell::kSameGateGrads ? out.d_gates_x : at::empty_like(out.d_gates_x);
  for (int k = Cell::kDirectPath ? 0 : 1; k < K; ++k) out.d_prev[k] = at::empty({B, H}, grad_next[0].options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad_next[0].scalar_type(), "seqkern_cell_backward", [&] {
    using A = Acc<scalar_t>;
    constexpr int64_t W = Cell::kWorkspaceBlocks, G = Cell::kGates;
    const auto data = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
    std::array<const scalar_t*, K> dn{}, prev_data{}, next_data{};
    std::array<scalar_t*, K> dp{};
    for (int k = 0; k < K; ++k) {
      dn[k] = data(grad_next[k]), prev_data[k] = data(prev[k]), next_data[k] = data(next[k]);
      dp[k] = data(out.d_prev[k]);
    }
    const scalar_t* ws = data(workspace);
    A *dgx = out.d_gates_x.template data_ptr<A>(), *dgh = out.d_gates_h.template data_ptr<A>();
    at::parallel_for(0, B, cell_grain(H), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        GradIn<scalar_t, K> row{ws ? ws + b * W * H : nullptr, {}, {}, H, 0};
        for (int k = 0; k < K; ++k) {
          row.prev[k] = prev_data[k] ? prev_data[k] + b * H : nullptr;
          row.cur[k] = next_data[k] ? next_data[k] + b * H : nullptr;
        }
        for_each_chunk<A>(H, [&](int64_t u, int n) {
          States<A, K> d;
          for (int k = 0; k < K; ++k) d[k] = load<A>(dn[k] + b * H + u, n);
          const auto grad = cell.template grad<A>(row.at(u, n), d);
          cell.store_grad(dgx + b * G * H + u, dgh + b * G * H + u, H, grad, n);
          for (int k = 0; k < K; ++k)
            if (dp[k]) store(dp[k] + b * H + u, grad.d_prev[k], n);
        });
      }
    });
  });
  return out;
}

}  // namespace seqkern::cpu
