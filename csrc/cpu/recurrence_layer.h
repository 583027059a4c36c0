// The layer engine every recurrent cell shares: the time schedule (batch_sizes, reverse), the per-thread
// slices of the recurrent GEMM, the persistent forward and backward time loops, and the batched weight
// gradients after the loop. It is parameterized by a Cell (see "Cell interface" below); csrc/cpu/gru.cpp
// and csrc/cpu/rnn.cpp plug in GruCell and ElmanCell. Built on simd.h (vectors, activations),
// gemm_packed.h (micro-kernel), team.h (persistent team, barrier) and arg_checks.h.
//
// csrc/cpu/lstm.cpp keeps its own time loops (its c state and projection) but uses the pieces here that
// are not tied to a Cell: for_each_chunk, cell_grain, check_layer_args, Schedule, Slice (with its weight
// packing), SliceSet, loop_threads, previous_hidden and sum_of_outer_products.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/arg_checks.h"
#include "cpu/gemm_bf16.h"
#include "cpu/gemm_packed.h"
#include "cpu/simd.h"
#include "cpu/team.h"

namespace seqkern::cpu {

/// Calls body(u, n) for the SIMD chunks [u, u+n) of [0, units).
template <typename A, typename Body>
inline void for_each_chunk(int64_t units, const Body& body) {
  for (int64_t u = 0; u < units; u += kLanes<A>) body(u, static_cast<int>(std::min<int64_t>(kLanes<A>, units - u)));
}

/// Sizes of one layer: T steps, B rows, I inputs, H hidden units.
struct LayerShape {
  int64_t seq_len, batch, input_size, hidden;
};

/// Checks input (T,B,I), w_ih (gates*H, I), w_hh (gates*H, P), h0 (B,P) and returns the sizes they imply.
/// P = H, except with the LSTM's projection w_hr (P,H), which makes h P wide (lstm.cpp passes it here so
/// that one function checks every layer's shared arguments).
inline LayerShape check_layer_args(const ArgChecker& check, int gates, const at::Tensor& input, const at::Tensor& h0,
                                   const at::Tensor& w_ih, const at::Tensor& w_hh,
                                   const std::optional<at::Tensor>& w_hr = std::nullopt) {
  check.supported_dtype(input, "input");
  TORCH_CHECK(input.dim() == 3, "seqkern ", check.op, " (CPU): input must be (T, B, input_size), got ", input.sizes());
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) % gates == 0, "seqkern ", check.op, " (CPU): w_ih must be (", gates,
              "*hidden, input_size), got ", w_ih.sizes());
  const LayerShape d{input.size(0), input.size(1), input.size(2), w_ih.size(0) / gates};
  const int64_t state_size = w_hr.has_value() ? w_hr->size(0) : d.hidden;
  check.tensor(w_ih, input, {gates * d.hidden, d.input_size}, "w_ih");
  check.tensor(w_hh, input, {gates * d.hidden, state_size}, "w_hh");
  check.tensor(h0, input, {d.batch, state_size}, "h0");
  if (w_hr.has_value()) check.tensor(*w_hr, input, {state_size, d.hidden}, "w_hr");
  return d;
}

// ================================================================================================
// Schedule and slices of the persistent time loop.
// ================================================================================================
/// Which time index a processing step touches and how many rows are active there.
struct Schedule {
  int64_t seq_len, batch;
  const int64_t* batch_sizes;  // null: every row active at every step
  bool reverse;

  /// The time index of forward-processing step `step` (T-1-step in the reverse direction).
  int64_t time(int64_t step) const { return reverse ? seq_len - 1 - step : step; }
  int64_t active(int64_t t) const { return batch_sizes ? batch_sizes[t] : batch; }
  /// The time index of backward step `step` (the forward's steps in reverse).
  int64_t backward_time(int64_t step) const { return time(seq_len - 1 - step); }
  /// Whether row b had already started before time t in processing order (else it starts from h0 at t).
  bool started_before(int64_t t, int64_t b) const {
    const int64_t prev_t = reverse ? t + 1 : t - 1;
    return prev_t >= 0 && prev_t < seq_len && b < active(prev_t);
  }
  /// The state row b read at time t, `width` wide: row b of the step before in `sequence` (T, B, width),
  /// or of `initial` (B, width) for a row that starts at t.
  template <typename T>
  const T* previous_row(const T* sequence, const T* initial, int64_t t, int64_t b, int64_t width) const {
    const int64_t prev_t = reverse ? t + 1 : t - 1;
    return started_before(t, b) ? sequence + (prev_t * batch + b) * width : initial + b * width;
  }
};

/// The schedule of a layer of shape d; sizes is ArgChecker::batch_sizes' result (undefined: all rows active).
inline Schedule make_schedule(const LayerShape& d, const at::Tensor& sizes, bool reverse) {
  return {d.seq_len, d.batch, sizes.defined() ? sizes.data_ptr<int64_t>() : nullptr, reverse};
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
  /// (rows w.depth long): the slice's gate rows of a (groups*H, depth) W with group_rows = H.
  void pack_rows(const A* m, int64_t group_rows) {
    pack([&](int64_t j) {
      const int64_t group = j / padded, u = j % padded;
      const A* row = u < cols.size() ? m + (group * group_rows + cols.begin + u) * w.depth : nullptr;
      return std::pair<const A*, int64_t>{row, 1};
    });
  }
  /// Column j <- column cols.begin + j of the row-major matrix m (w.depth rows, each row_length long).
  void pack_columns(const A* m, int64_t row_length) {
    pack([&](int64_t j) {
      return std::pair<const A*, int64_t>{j < cols.size() ? m + cols.begin + j : nullptr, row_length};
    });
  }
  /// c (rows x w.width, leading dim ldc) = a (rows x w.depth, leading dim lda) @ the packed weights.
  void multiply(const A* a, int64_t lda, int64_t rows, A* c, int64_t ldc) const {
    if constexpr (std::is_same_v<A, float>) {
      if (bf16) return gemm_bf16(a, lda, rows, w16, c, ldc);
    }
    gemm_packed(a, lda, rows, w, c, ldc);
  }

 private:
  template <typename ColumnSource>
  void pack(const ColumnSource& column) {
    if (bf16) {
      w16.pack(column);
    } else {
      w.pack(column);
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

/// Threads for a loop doing `macs_per_step` multiply-adds per step over `hidden` units.
/// 32K multiply-adds is ~1 us of one core at the micro-kernel's speed, the order of a barrier's cost.
inline int loop_threads(int64_t macs_per_step, int64_t hidden, int64_t lanes) {
  constexpr int64_t kMinMacsPerThreadStep = 32 * 1024;
  return persistent_thread_count(macs_per_step, kMinMacsPerThreadStep, (hidden + lanes - 1) / lanes);
}

// ================================================================================================
// Cell interface. A Cell (GruCell in gru.cpp, ElmanCell in rnn.cpp) provides, A = accumulation dtype:
//   kGates            blocks of H rows in W_ih and W_hh (torch.nn's gate order);
//   kWorkspaceBlocks  blocks of H the forward saves per row for the backward (0: none);
//   kSameGateGrads    whether the gradients of x W_ih^T and of h W_hh^T are equal (Elman: yes; GRU: they
//                     differ in the n gate), so that one (T, B, kGates*H) buffer serves both;
//   kDirectPath       whether h_{t-1} reaches h_t other than through W_hh (GRU: z * h_{t-1});
//   bf16_state_ok()   whether, with bfloat16 storage, the recurrent GEMM may run on the bf16 units, i.e. read
//                     h_{t-1} and d_gates rounded to bf16 as torch's own bf16 layers do (Elman relu: no);
//   forward(StepIn, h_prev) -> h_t on one SIMD chunk, saving the workspace if asked;
//   grad(GradIn, d_h) -> Grad{.., d_h_prev (the direct path)}, and
//   store_grad(d_gates_x row, d_gates_h row, H, grad, n) (the rows alias if kSameGateGrads).
// ================================================================================================
/// What one row's forward step reads and writes at one SIMD chunk of units; every pointer is at the
/// chunk's first unit, gate block g `stride` elements further (x_stride for gates_x, bias_x, workspace).
template <typename A, typename In, typename Ws>
struct StepIn {
  const In* gates_x;  // x W_ih^T (the layer folds input_bias into it)
  const In* gates_h;  // h W_hh^T
  int64_t x_stride, h_stride;
  const A* bias_x;          // added to gates_x, or null
  const A* recurrent_bias;  // the cell's bias on the recurrent side (GRU: b_hn), or null
  Ws* workspace;            // null: not saved
  int n;                    // units in the chunk
};

/// What one row's backward step reads at one SIMD chunk (pointers at the chunk's first unit; any a cell
/// does not need may be null).
template <typename S>
struct GradIn {
  const S* workspace;  // what forward saved, gate block g at g * stride
  const S* h_prev;     // h_{t-1}
  const S* h;          // h_t
  int64_t stride;
  int n;
};

// ================================================================================================
// Layer forward: gates_x for all steps in one GEMM, then the persistent time loop.
// ================================================================================================
/// x W_ih^T + bias for all T*B rows of bf16 x on the bf16 units (gemm_bf16: AMX or vdpbf16ps), fp32 out
/// (T*B, w_ih rows): W_ih packed once, row blocks in parallel, the bias (fp32, or undefined) added inside
/// the kernel. Unlike at::mm in bf16 (oneDNN, bf16 out) the gates stay fp32 until the cell, as in the fp32
/// path. Needs out's width a multiple of 16 (the kernel writes whole vectors).
inline void input_projection_bf16(const at::Tensor& input, const at::Tensor& w_ih, const at::Tensor& bias,
                                  at::Tensor& out) {
  const int64_t rows = out.size(0), depth = w_ih.size(1);
  PackedPairs w;
  w.depth = depth;
  w.width = w_ih.size(0);
  at::Tensor packed = at::empty({PackedPairs::elements(depth, w.width)}, w_ih.options().dtype(at::kBFloat16));
  w.data = reinterpret_cast<uint16_t*>(packed.data_ptr<at::BFloat16>());
  const at::Tensor weights = w_ih.contiguous();
  const at::BFloat16* w_data = weights.data_ptr<at::BFloat16>();
  w.pack([&](int64_t j) { return std::pair<const at::BFloat16*, int64_t>{w_data + j * depth, 1}; });
  const at::Tensor x = input.reshape({rows, depth}).contiguous();
  const at::BFloat16* x_data = x.data_ptr<at::BFloat16>();
  float* c = out.data_ptr<float>();
  const at::Tensor b = bias.defined() ? bias.contiguous() : bias;
  const float* b_data = b.defined() ? b.data_ptr<float>() : nullptr;
  constexpr int64_t kRowsPerTask = 96;
  at::parallel_for(0, (rows + kRowsPerTask - 1) / kRowsPerTask, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * kRowsPerTask;
      gemm_bf16(x_data + r0 * depth, depth, std::min(kRowsPerTask, rows - r0), w, c + r0 * w.width, w.width, b_data);
    }
  });
}

/// x W_ih^T + bias for all T*B rows in one GEMM, in the accumulation dtype, into `out` (T*B, gates*H).
inline void input_projection(const at::Tensor& input, const at::Tensor& w_ih, const at::Tensor& bias, at::Tensor& out) {
  if (use_bf16_units(input.scalar_type()) && out.size(1) % PackedPairs::kLanes == 0) {
    input_projection_bf16(input, w_ih, bias, out);
    return;
  }
  const auto acc = out.scalar_type();
  const at::Tensor x = input.reshape({-1, input.size(2)}).to(acc);
  const at::Tensor w = w_ih.to(acc);
  if (bias.defined()) {
    at::addmm_out(out, bias, x, w.t());
  } else {
    at::mm_out(out, x, w.t());
  }
}

/// Thread k owns a slice of hidden units: the kGates rows of W_hh for those units are packed once into its
/// micro-kernel panels and stay in its L2 for all T steps; per step it computes its gate columns
/// (h_{t-1} @ W_hh-slice^T), then the cell's fused pointwise update of its units, thread-local since it
/// owns every gate of each of its units. One barrier per step publishes h_t.
template <typename Cell, typename S>
class CellForwardLoop {
 public:
  using A = Acc<S>;
  static constexpr int G = Cell::kGates;

  struct Buffers {
    const A* gates_x;         // (T, B, G*H) x W_ih^T + input_bias
    const A* w_hh;            // (G*H, H)
    const A* recurrent_bias;  // (H,) or null
    S* output;                // (T, B, H)
    S* workspace;             // (T, B, kWorkspaceBlocks*H) or null
    A* h_state;               // (2, B, H): h_{t-1} and h_t alternating; [1] holds h0 on entry
  };

  CellForwardLoop(const Cell& cell, const LayerShape& d, const Schedule& sched, const Buffers& buf, int threads)
      : cell_(cell), d_(d), sched_(sched), buf_(buf), threads_(threads),
        slices_(d.hidden, threads, G, d.hidden, d.batch,
                use_bf16_units(c10::CppTypeToScalarType<S>::value) && cell.bf16_state_ok()) {}

  /// Runs all T steps; h_n is then h_state[(T-1) & 1].
  void run() {
    run_persistent(threads_, [&](int first, int stride, SpinBarrier& barrier) {
      for (size_t s = first; s < slices_.slices.size(); s += stride) slices_.slices[s].pack_rows(buf_.w_hh, d_.hidden);
      for (int64_t step = 0; step < d_.seq_len; ++step) {
        for (size_t s = first; s < slices_.slices.size(); s += stride) step_phase(slices_.slices[s], step);
        barrier.arrive_and_wait();
      }
    });
  }

 private:
  const A* h_prev(int64_t step) const { return buf_.h_state + ((step + 1) & 1) * d_.batch * d_.hidden; }
  A* h_cur(int64_t step) const { return buf_.h_state + (step & 1) * d_.batch * d_.hidden; }

  /// Gate columns of the slice's units, then their fused pointwise update, for step `step`.
  void step_phase(const Slice<A>& s, int64_t step) const {
    const int64_t t = sched_.time(step), active = sched_.active(t);
    const int64_t B = d_.batch, H = d_.hidden, u0 = s.cols.begin;
    constexpr int64_t W = Cell::kWorkspaceBlocks;
    s.multiply(h_prev(step), H, active, s.scratch, s.w.width);
    for (int64_t b = 0; b < active; ++b) {
      const int64_t row = t * B + b, unit0 = b * H + u0;
      for_each_chunk<A>(s.cols.size(), [&](int64_t u, int n) {
        const StepIn<A, A, S> in{buf_.gates_x + row * G * H + u0 + u,
                                 s.scratch + b * s.w.width + u,
                                 H,
                                 s.padded,
                                 nullptr,
                                 buf_.recurrent_bias ? buf_.recurrent_bias + u0 + u : nullptr,
                                 buf_.workspace ? buf_.workspace + row * W * H + u0 + u : nullptr,
                                 n};
        const Simd<A> h = cell_.forward(in, load<A>(h_prev(step) + unit0 + u, n));
        store(h_cur(step) + unit0 + u, h, n);
        store(buf_.output + row * H + u0 + u, h, n);
      });
    }
    carry_inactive_rows(s.cols, step, active);
  }

  /// Inactive rows keep their hidden state and get zeros in the output and the workspace.
  void carry_inactive_rows(Range cols, int64_t step, int64_t active) const {
    const int64_t t = sched_.time(step), H = d_.hidden;
    for (int64_t b = active; b < d_.batch; ++b) {
      const int64_t row = t * d_.batch + b;
      std::copy(h_prev(step) + b * H + cols.begin, h_prev(step) + b * H + cols.end, h_cur(step) + b * H + cols.begin);
      fill_zero(buf_.output + row * H + cols.begin, cols.size());
      if (buf_.workspace)
        for (int g = 0; g < Cell::kWorkspaceBlocks; ++g)
          fill_zero(buf_.workspace + (row * Cell::kWorkspaceBlocks + g) * H + cols.begin, cols.size());
    }
  }

  const Cell& cell_;
  LayerShape d_;
  Schedule sched_;
  Buffers buf_;
  int threads_;
  SliceSet<A> slices_;
};

/// The whole layer forward: returns output (T,B,H), h_n (B,H); fills `workspace` (T,B,kWorkspaceBlocks*H)
/// if it is defined. input_bias (G*H,) and recurrent_bias (H,) in the accumulation dtype, or undefined.
template <typename Cell>
std::tuple<at::Tensor, at::Tensor> layer_forward(const Cell& cell, const LayerShape& d, const at::Tensor& input,
                                                 const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                 const at::Tensor& input_bias, const at::Tensor& recurrent_bias,
                                                 const Schedule& sched, at::Tensor workspace) {
  const int64_t T = d.seq_len, B = d.batch, H = d.hidden;
  at::Tensor output = at::empty({T, B, H}, input.options());
  if (T == 0 || B == 0) return {output, h0.clone()};
  const auto acc = at::toOpMathType(input.scalar_type());
  at::Tensor gates_x = at::empty({T * B, Cell::kGates * H}, input.options().dtype(acc));
  input_projection(input.contiguous(), w_ih, input_bias, gates_x);
  const at::Tensor w_hh_acc = w_hh.to(acc).contiguous();
  at::Tensor h_state = at::empty({2, B, H}, gates_x.options());
  h_state.select(0, 1).copy_(h0);
  const int64_t macs_per_step = B * Cell::kGates * H * H;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "seqkern_layer_forward", [&] {
    using A = Acc<scalar_t>;
    typename CellForwardLoop<Cell, scalar_t>::Buffers buf{
        gates_x.data_ptr<A>(), w_hh_acc.data_ptr<A>(),
        recurrent_bias.defined() ? recurrent_bias.data_ptr<A>() : nullptr, output.data_ptr<scalar_t>(),
        workspace.defined() ? workspace.data_ptr<scalar_t>() : nullptr, h_state.data_ptr<A>()};
    CellForwardLoop<Cell, scalar_t>(cell, d, sched, buf, loop_threads(macs_per_step, H, kLanes<A>)).run();
  });
  return {output, h_state.select(0, (T - 1) & 1).to(input.scalar_type(), false, /*copy=*/true)};
}

// ================================================================================================
// Layer backward: the persistent loop over the steps in reverse processing order, then batched GEMMs.
// ================================================================================================
/// Per step: the fused pointwise gradient of the thread's units (d_gates, and the direct path into
/// d_h_prev), barrier, then d_h_prev[:, slice] += d_gates_h @ W_hh[:, slice] on the thread's columns
/// (W_hh column slice packed and hot). Unit and column slices are the same split, so the next step's
/// pointwise pass reads exactly the d_h columns this thread wrote: one barrier per step.
template <typename Cell, typename S>
class CellBackwardLoop {
 public:
  using A = Acc<S>;
  static constexpr int G = Cell::kGates;

  struct Buffers {
    const S* grad_output;  // (T, B, H)
    const S* output;       // (T, B, H) h_t from the forward
    const S* workspace;    // (T, B, kWorkspaceBlocks*H) or null
    const S* h0;           // (B, H)
    const A* w_hh;         // (G*H, H)
    A* d_gates_x;          // (T, B, G*H) out: gradient of x W_ih^T, zero on inactive rows
    A* d_gates_h;          // (T, B, G*H) out: gradient of h W_hh^T (may alias d_gates_x, see kSameGateGrads)
    A* d_h_state;          // (B, H): gradient of h at the current step (seeded by the caller); grad_h0 on exit
  };

  CellBackwardLoop(const Cell& cell, const LayerShape& d, const Schedule& sched, const Buffers& buf, int threads)
      : cell_(cell), d_(d), sched_(sched), buf_(buf), threads_(threads),
        slices_(d.hidden, threads, 1, G * d.hidden, d.batch,
                use_bf16_units(c10::CppTypeToScalarType<S>::value) && cell.bf16_state_ok()) {}

  void run() {
    run_persistent(threads_, [&](int first, int stride, SpinBarrier& barrier) {
      // Column j of a slice <- column j of its units in W_hh (depth G*H).
      for (size_t s = first; s < slices_.slices.size(); s += stride)
        slices_.slices[s].pack_columns(buf_.w_hh, d_.hidden);
      for (int64_t step = 0; step < d_.seq_len; ++step) {
        for (size_t s = first; s < slices_.slices.size(); s += stride)
          cell_grad_phase(slices_.slices[s], sched_.backward_time(step));
        barrier.arrive_and_wait();
        for (size_t s = first; s < slices_.slices.size(); s += stride) recurrent_phase(slices_.slices[s], step);
      }
    });
  }

 private:
  /// Fused pointwise gradient of the slice's units at time t; the direct path goes into d_h_state.
  void cell_grad_phase(const Slice<A>& s, int64_t t) const {
    const int64_t active = sched_.active(t), B = d_.batch, H = d_.hidden, u0 = s.cols.begin;
    constexpr int64_t W = Cell::kWorkspaceBlocks;
    for (int64_t b = 0; b < active; ++b) {
      const int64_t row = t * B + b;
      const S* h_prev = sched_.previous_row(buf_.output, buf_.h0, t, b, H) + u0;
      A* d_h = buf_.d_h_state + b * H + u0;
      for_each_chunk<A>(s.cols.size(), [&](int64_t u, int n) {
        const GradIn<S> in{buf_.workspace ? buf_.workspace + row * W * H + u0 + u : nullptr, h_prev + u,
                           buf_.output + row * H + u0 + u, H, n};
        const auto grad = cell_.template grad<A>(in, load<A>(d_h + u, n));
        cell_.store_grad(buf_.d_gates_x + row * G * H + u0 + u, buf_.d_gates_h + row * G * H + u0 + u, H, grad, n);
        if constexpr (Cell::kDirectPath) store(d_h + u, grad.d_h_prev, n);
      });
    }
    for (int64_t b = active; b < B; ++b)
      for (int g = 0; g < G; ++g) {
        fill_zero(buf_.d_gates_x + ((t * B + b) * G + g) * H + u0, s.cols.size());
        if (!Cell::kSameGateGrads) fill_zero(buf_.d_gates_h + ((t * B + b) * G + g) * H + u0, s.cols.size());
      }
  }

  /// d_h for the next backward step at the slice's columns: d_gates_h(t) @ W_hh (+ the direct path) on the
  /// rows active at t (inactive rows carry theirs), plus grad_output of the next step's time on its active rows.
  void recurrent_phase(const Slice<A>& s, int64_t step) const {
    const int64_t t = sched_.backward_time(step), active = sched_.active(t), B = d_.batch, H = d_.hidden;
    const bool has_next = step + 1 < d_.seq_len;
    const int64_t next_t = has_next ? sched_.backward_time(step + 1) : 0;
    const int64_t next_active = has_next ? sched_.active(next_t) : 0;
    s.multiply(buf_.d_gates_h + t * B * G * H, G * H, active, s.scratch, s.w.width);
    for (int64_t b = 0; b < B; ++b) {
      A* d_h = buf_.d_h_state + b * H + s.cols.begin;
      for_each_chunk<A>(s.cols.size(), [&](int64_t u, int n) {
        Simd<A> v = load<A>(d_h + u, n);
        if (b < active) v = Cell::kDirectPath ? v + load<A>(s.scratch + b * s.w.width + u) : load<A>(s.scratch + b * s.w.width + u);
        if (b < next_active) v += load<A>(buf_.grad_output + (next_t * B + b) * H + s.cols.begin + u, n);
        store(d_h + u, v, n);
      });
    }
  }

  const Cell& cell_;
  LayerShape d_;
  Schedule sched_;
  Buffers buf_;
  int threads_;
  SliceSet<A> slices_;
};

/// The hidden state each step read, (T*B, H) in dtype `acc`: h0 at the first step, the previous step's
/// output after it, and h0 again for rows that start late (reverse direction with batch_sizes).
inline at::Tensor previous_hidden(const at::Tensor& output, const at::Tensor& h0, const Schedule& sched,
                                  at::ScalarType acc) {
  const int64_t T = sched.seq_len;
  at::Tensor prev = at::empty(output.sizes(), output.options().dtype(acc));
  if (T == 0) return prev.view({0, prev.size(2)});
  prev.select(0, sched.time(0)).copy_(h0);
  if (T > 1) prev.narrow(0, sched.reverse ? 0 : 1, T - 1).copy_(output.narrow(0, sched.reverse ? 1 : 0, T - 1));
  if (sched.reverse && sched.batch_sizes)
    for (int64_t t = 0; t + 1 < T; ++t) {
      const int64_t lo = sched.batch_sizes[t + 1], hi = sched.batch_sizes[t];
      if (hi > lo) prev.select(0, t).narrow(0, lo, hi - lo).copy_(h0.narrow(0, lo, hi - lo));
    }
  return prev.view({-1, prev.size(2)});
}

/// lhs^T @ rhs over K rows, (N x M): a weight gradient summed over all T*B (time, row) pairs.
/// One GEMM keeps one running fp32 sum per element over up to K products, torch.nn one per step. N=768,
/// M=256 random rows vs fp64, max abs error:
///   K = 448:   one GEMM 4.6e-5, per-step (32 rows) 1.9e-5, chunks of 64 added pairwise 1.9e-5, of 256 4.9e-5;
///   K = 3200:  one GEMM 8.0e-5, per-step 1.0e-4, chunks of 64 4.6e-5, of 256 6.1e-5;
///   K = 16384: one GEMM 3.1e-4, per-step 5.6e-4, chunks of 64 1.1e-4, of 256 1.2e-4.
/// In the layer: one GEMM gave the GRU's grad_w_hh 3.4x torch.nn's error at T=12, B=32, H=256, and chunks
/// of K/8 rows still 4x at T=33, B=64, H=9 (3 layers): both fail the 2x rule. So products over chunks of
/// max(64, K/64) rows are rounded on their own and added pairwise: within the per-step error at every K.
/// The price, measured at K = 3200 on this shared machine: 50 GEMMs 25.8 ms min against 16.7 ms for 8
/// chunks and 10.9 ms for one GEMM. fp64 keeps one GEMM.
/// The LSTM's weight gradients use it too. lstm.cpp had one bmm over at most 16 chunks, summed by
/// sum(0): as accurate (N=1024, M=256 vs fp64: K = 2112 6.2e-5 there, 5.5e-5 here; K = 3200 7.3e-5,
/// 7.6e-5), but it holds all 16 (N x M) partial products at once, this at most log2(64) + 1.
inline at::Tensor sum_of_outer_products(const at::Tensor& lhs, const at::Tensor& rhs) {
  constexpr int64_t kMinChunkRows = 64, kMaxChunks = 64;
  const int64_t rows = lhs.size(0);
  if (lhs.scalar_type() == at::kDouble || rows <= kMinChunkRows) return at::mm(lhs.t(), rhs);
  const int64_t chunk_rows = std::max(kMinChunkRows, (rows + kMaxChunks - 1) / kMaxChunks);
  // levels[l] holds, if defined, the sum of 2^l chunks not yet merged (a binary counter of partial sums).
  std::vector<at::Tensor> levels;
  for (int64_t start = 0; start < rows; start += chunk_rows) {
    const int64_t n = std::min(chunk_rows, rows - start);
    at::Tensor part = at::mm(lhs.narrow(0, start, n).t(), rhs.narrow(0, start, n));
    size_t level = 0;
    for (; level < levels.size() && levels[level].defined(); ++level) {
      part.add_(levels[level]);
      levels[level] = at::Tensor();
    }
    if (level == levels.size()) levels.emplace_back();
    levels[level] = part;
  }
  at::Tensor total;
  for (const at::Tensor& partial : levels)
    if (partial.defined()) total = total.defined() ? total.add_(partial) : partial;
  return total;
}

/// A weight gradient lhs^T @ rhs over all rows, in storage dtype `dtype`. In bf16: one at::mm
/// of the bf16-rounded operands (oneDNN: AMX where the CPU has it, fp32 accumulation over all rows, one
/// rounding to bf16 at the end; the fp32 chunking above exists for fp32's 2x rule, while bf16's output
/// rounding, 2^-9 relative, dwarfs the fp32 sum's error). Else sum_of_outer_products.
inline at::Tensor weight_gradient(const at::Tensor& lhs, const at::Tensor& rhs, at::ScalarType dtype) {
  if (use_bf16_gradients(dtype)) return at::mm(lhs.to(at::kBFloat16).t(), rhs.to(at::kBFloat16));
  return sum_of_outer_products(lhs, rhs).to(dtype);
}

/// grad_input = d_gates (rows, gates*H, accumulation dtype) @ w_ih (gates*H, I), in storage dtype
/// `dtype`: a bf16 at::mm (oneDNN) in bf16, else in the accumulation dtype.
inline at::Tensor input_gradient(const at::Tensor& d_gates, const at::Tensor& w_ih, at::ScalarType dtype) {
  if (use_bf16_gradients(dtype)) return at::mm(d_gates.to(at::kBFloat16), w_ih);
  return at::mm(d_gates, w_ih.to(d_gates.scalar_type())).to(dtype);
}

/// Gradients of one layer, in the storage dtype; the bias ones undefined unless has_bias.
struct LayerGrads {
  at::Tensor input, h0, w_ih, w_hh, b_ih, b_hh;
};

/// The whole layer backward (shapes checked by the caller): the persistent loop for d_gates and grad_h0,
/// then grad_input, grad_w_ih, grad_w_hh as GEMMs over all T*B rows and the biases as column sums.
template <typename Cell>
LayerGrads layer_backward(const Cell& cell, const LayerShape& d, const at::Tensor& grad_output_,
                          const at::Tensor& grad_h_n, const at::Tensor& input, const at::Tensor& h0_,
                          const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& output_,
                          const at::Tensor& workspace_, const Schedule& sched, bool has_bias) {
  const int64_t T = d.seq_len, B = d.batch, H = d.hidden;
  const auto dtype = input.scalar_type(), acc = at::toOpMathType(dtype);
  // Both written in full by the loop (zeros on inactive rows).
  at::Tensor d_gates_x = at::empty({T * B, Cell::kGates * H}, input.options().dtype(acc));
  at::Tensor d_gates_h = Cell::kSameGateGrads ? d_gates_x : at::empty_like(d_gates_x);
  at::Tensor d_h_state = grad_h_n.to(acc).contiguous().clone();
  const at::Tensor grad_output = grad_output_.contiguous(), output = output_.contiguous(), h0 = h0_.contiguous();
  if (T > 0 && B > 0) {
    // Seed d_h for the first backward step: grad_h_n plus that step's grad_output on its active rows.
    const int64_t first_t = sched.time(T - 1), first_active = sched.active(first_t);
    d_h_state.narrow(0, 0, first_active).add_(grad_output.select(0, first_t).narrow(0, 0, first_active));
    const at::Tensor workspace = workspace_.contiguous();
    const at::Tensor w_hh_acc = w_hh.to(acc).contiguous();
    const int64_t macs_per_step = B * Cell::kGates * H * H;
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "seqkern_layer_backward", [&] {
      using A = Acc<scalar_t>;
      typename CellBackwardLoop<Cell, scalar_t>::Buffers buf{
          grad_output.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(),
          Cell::kWorkspaceBlocks > 0 ? workspace.data_ptr<scalar_t>() : nullptr, h0.data_ptr<scalar_t>(),
          w_hh_acc.data_ptr<A>(), d_gates_x.data_ptr<A>(), d_gates_h.data_ptr<A>(), d_h_state.data_ptr<A>()};
      CellBackwardLoop<Cell, scalar_t>(cell, d, sched, buf, loop_threads(macs_per_step, H, kLanes<A>)).run();
    });
  }
  const at::Tensor x_rows = input.reshape({T * B, d.input_size});
  LayerGrads grads;
  grads.input = input_gradient(d_gates_x, w_ih, dtype).view({T, B, d.input_size});
  grads.h0 = d_h_state.to(dtype, false, /*copy=*/true);
  grads.w_ih = weight_gradient(d_gates_x, x_rows.to(acc), dtype);
  grads.w_hh = weight_gradient(d_gates_h, previous_hidden(output, h0, sched, acc), dtype);
  if (has_bias) {
    grads.b_ih = d_gates_x.sum(0).to(dtype);
    grads.b_hh = d_gates_h.sum(0).to(dtype);
  }
  return grads;
}

// ================================================================================================
// Cell ops: the fused pointwise step on (B, gates*H) rows, rows in parallel.
// ================================================================================================
/// Rows per at::parallel_for task: about 16K units of pointwise work each.
inline int64_t cell_grain(int64_t hidden) { return std::max<int64_t>(1, (16 * 1024) / std::max<int64_t>(1, hidden)); }

/// hy (B,H) of one cell step; gates_x, gates_h (B, G*H) contiguous, hx (B,H) or undefined (a cell without
/// kDirectPath reads none), bias_x (G*H,) / recurrent_bias (H,) in the accumulation dtype or undefined;
/// workspace (B, kWorkspaceBlocks*H) filled if defined.
template <typename Cell>
at::Tensor cell_forward(const Cell& cell, const at::Tensor& gates_x, const at::Tensor& gates_h, const at::Tensor& hx,
                        const at::Tensor& bias_x, const at::Tensor& recurrent_bias, at::Tensor workspace) {
  const int64_t B = gates_x.size(0), H = gates_x.size(1) / Cell::kGates;
  at::Tensor hy = at::empty({B, H}, gates_x.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gates_x.scalar_type(), "seqkern_cell_forward", [&] {
    using A = Acc<scalar_t>;
    constexpr int64_t G = Cell::kGates, W = Cell::kWorkspaceBlocks;
    const scalar_t *gx = gates_x.data_ptr<scalar_t>(), *gh = gates_h.data_ptr<scalar_t>();
    const scalar_t* h = hx.defined() ? hx.data_ptr<scalar_t>() : nullptr;
    const A* bx = bias_x.defined() ? bias_x.data_ptr<A>() : nullptr;
    const A* bh = recurrent_bias.defined() ? recurrent_bias.data_ptr<A>() : nullptr;
    scalar_t* ws = workspace.defined() ? workspace.data_ptr<scalar_t>() : nullptr;
    scalar_t* out = hy.data_ptr<scalar_t>();
    at::parallel_for(0, B, cell_grain(H), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        for_each_chunk<A>(H, [&](int64_t u, int n) {
          const StepIn<A, scalar_t, scalar_t> in{gx + b * G * H + u, gh + b * G * H + u, H, H,
                                                 bx ? bx + u : nullptr, bh ? bh + u : nullptr,
                                                 ws ? ws + b * W * H + u : nullptr, n};
          store(out + b * H + u, cell.forward(in, h ? load<A>(h + b * H + u, n) : Simd<A>{}), n);
        });
    });
  });
  return hy;
}

/// Gradients of one cell step: of gates_x and of gates_h (B, kGates*H, the same tensor if kSameGateGrads)
/// in the accumulation dtype and, with kDirectPath, the direct-path gradient of hx (B,H) in the storage dtype. grad_hy (B,H); workspace, hx, hy as GradIn
/// wants them (undefined if the cell does not read them).
template <typename Cell>
std::tuple<at::Tensor, at::Tensor, at::Tensor> cell_backward(const Cell& cell, const at::Tensor& grad_hy, const at::Tensor& workspace,
                                                 const at::Tensor& hx, const at::Tensor& hy) {
  const int64_t B = grad_hy.size(0), H = grad_hy.size(1);
  const auto acc = at::toOpMathType(grad_hy.scalar_type());
  at::Tensor d_gates_x = at::empty({B, Cell::kGates * H}, grad_hy.options().dtype(acc));
  at::Tensor d_gates_h = Cell::kSameGateGrads ? d_gates_x : at::empty_like(d_gates_x);
  at::Tensor grad_hx = Cell::kDirectPath ? at::empty({B, H}, grad_hy.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad_hy.scalar_type(), "seqkern_cell_backward", [&] {
    using A = Acc<scalar_t>;
    constexpr int64_t W = Cell::kWorkspaceBlocks, G = Cell::kGates;
    const scalar_t* dh = grad_hy.data_ptr<scalar_t>();
    const scalar_t* ws = workspace.defined() ? workspace.data_ptr<scalar_t>() : nullptr;
    const scalar_t* h_prev = hx.defined() ? hx.data_ptr<scalar_t>() : nullptr;
    const scalar_t* h = hy.defined() ? hy.data_ptr<scalar_t>() : nullptr;
    A *dgx = d_gates_x.data_ptr<A>(), *dgh = d_gates_h.data_ptr<A>();
    scalar_t* d_hx = grad_hx.defined() ? grad_hx.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, B, cell_grain(H), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        for_each_chunk<A>(H, [&](int64_t u, int n) {
          const int64_t idx = b * H + u;
          const GradIn<scalar_t> in{ws ? ws + b * W * H + u : nullptr, h_prev ? h_prev + idx : nullptr,
                                    h ? h + idx : nullptr, H, n};
          const auto grad = cell.template grad<A>(in, load<A>(dh + idx, n));
          cell.store_grad(dgx + b * G * H + u, dgh + b * G * H + u, H, grad, n);
          if constexpr (Cell::kDirectPath) store(d_hx + idx, grad.d_h_prev, n);
        });
    });
  });
  return {d_gates_x, d_gates_h, grad_hx};
}

}  // namespace seqkern::cpu
