// The LSTM on CPU: a whole layer over a whole sequence (lstm_forward / lstm_backward) and the fused
// pointwise cell step (lstm_cell_forward / lstm_cell_backward). Contracts in csrc/ops.cpp; oracle in
// seqkern/reference/lstm.py.
//
// Storage dtype S (float, double, bfloat16); every sum and every activation runs in A = opmath(S)
// (float for bf16), and results are rounded to S once when stored.
//
// Layer forward: everything runs inside ONE OpenMP team ("persistent RNN"). Thread k owns a slice of
// hidden units, i.e. the 4 gate rows of W_ih and W_hh for those units:
//   1. it packs both row sets for the micro-kernel and computes its gate columns of x W_ih^T for all T*B
//      rows at once (one GEMM per thread, no synchronisation: only thread k ever reads those columns);
//   2. per step it computes its gate columns of h_{t-1} W_hh^T with its W_hh slice hot in its own L2 for
//      all T steps, then the fused pointwise update of its units (bias, gates, c, h) - thread-local,
//      since it owns all 4 gates of each of its units. One barrier per step publishes h_t. With a
//      projection a second phase follows (thread k owns output columns p: h_t[:, p] = r_t W_hr[p]^T)
//      behind a second barrier.
// Layer backward: the same team, walking the steps in reverse processing order: fused pointwise
//   dgates for the thread's units, barrier, dh_prev = dgates @ W_hh for the thread's columns (W_hh
//   column-slice packed and hot). The weight gradients are then a few GEMMs over all T*B rows.
//
// The checks, schedule, slices and weight-gradient sums are recurrence_layer.h's, shared with the GRU and
// RNN; the time loops stay here, as its cell engine has no c state and no projection.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/recurrence_layer.h"

namespace seqkern::cpu {
namespace {

constexpr ArgChecker kCheck{"lstm"};

// ================================================================================================
// Pointwise math of one cell on SIMD vectors of units (shared by the layer and the cell ops).
// ================================================================================================
template <typename A>
struct Gates {
  Simd<A> i, f, g, o;
};

/// The 4 gate vectors at units [u, u+n) of a row laid out [i | f | g | o], each `hidden` long
/// (full vectors by default: rows padded to whole vectors, as the thread-local gate buffers are).
template <typename A, typename Src>
inline Gates<A> load_gates(const Src* row, int64_t hidden, int64_t u, int n = kLanes<A>) {
  return {load<A>(row + u, n), load<A>(row + hidden + u, n), load<A>(row + 2 * hidden + u, n),
          load<A>(row + 3 * hidden + u, n)};
}

template <typename Dst, typename A>
inline void store_gates(Dst* row, int64_t hidden, int64_t u, const Gates<A>& gates, int n) {
  store(row + u, gates.i, n);
  store(row + hidden + u, gates.f, n);
  store(row + 2 * hidden + u, gates.g, n);
  store(row + 3 * hidden + u, gates.o, n);
}

template <typename A>
inline Gates<A> operator+(const Gates<A>& x, const Gates<A>& y) {
  return {x.i + y.i, x.f + y.f, x.g + y.g, x.o + y.o};
}

template <typename A>
struct CellForward {
  Gates<A> act;     // sigmoid i, sigmoid f, tanh g, sigmoid o
  Simd<A> c;        // f c_prev + i g
  Simd<A> hidden;   // o tanh(c) (before any projection)
};

template <typename A>
inline CellForward<A> lstm_cell_math(const Gates<A>& pre, Simd<A> c_prev) {
  const Gates<A> act{sigmoid_simd<A>(pre.i), sigmoid_simd<A>(pre.f), tanh_simd<A>(pre.g),
                     sigmoid_simd<A>(pre.o)};
  const Simd<A> c = fmadd(act.f, c_prev, act.i * act.g);
  return {act, c, act.o * tanh_simd<A>(c)};
}

template <typename A>
struct CellBackward {
  Gates<A> d_pre;     // gradient of the 4 pre-activations
  Simd<A> d_c_prev;   // gradient of c_prev
  Simd<A> hidden;     // o tanh(c), recomputed for the projection's weight gradient
};

/// act: activated gates; d_hidden: gradient of o tanh(c); d_c: gradient of c from later steps.
template <typename A>
inline CellBackward<A> lstm_cell_grad(const Gates<A>& act, Simd<A> c_prev, Simd<A> c, Simd<A> d_hidden,
                                      Simd<A> d_c) {
  const A one = 1;
  const Simd<A> tanh_c = tanh_simd<A>(c);
  const Simd<A> d_c_total = d_c + d_hidden * act.o * (one - tanh_c * tanh_c);
  const Gates<A> d_pre{d_c_total * act.g * act.i * (one - act.i),
                       d_c_total * c_prev * act.f * (one - act.f),
                       d_c_total * act.i * (one - act.g * act.g),
                       d_hidden * tanh_c * act.o * (one - act.o)};
  return {d_pre, d_c_total * act.f, act.o * tanh_c};
}

// ================================================================================================
// Argument checks (a direct op call must never read or write out of bounds).
// ================================================================================================
/// Sizes of one layer: LayerShape's, plus P = proj_size (with a projection) or H outputs.
struct LayerDims : LayerShape {
  int64_t out_size;
  bool has_proj;
};

/// Checks the tensors every layer op shares and returns the dimensions they imply.
LayerDims check_layer(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                      const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr) {
  const LayerShape shape = check_layer_args(kCheck, 4, input, h0, w_ih, w_hh, w_hr);
  kCheck.tensor(c0, input, {shape.batch, shape.hidden}, "c0");
  return {shape, w_hr.has_value() ? w_hr->size(0) : shape.hidden, w_hr.has_value()};
}

// ================================================================================================
// Layer forward.
// ================================================================================================
template <typename S>
class ForwardLoop {
 public:
  using A = Acc<S>;

  struct Buffers {
    const A* input;     // (T, B, I)
    const A* w_ih;      // (4H, I)
    const A* bias;      // (4H,) b_ih + b_hh, or null
    const A* w_hh;      // (4H, P)
    const A* w_hr;      // (P, H) or null
    S* output;          // (T, B, P)
    S* gates_ws;        // (T, B, 4H) activated gates, or null
    S* cells_ws;        // (T, B, H), or null
    A* h_state;         // (2, B, P): h_{t-1} and h_t, alternating; [1] holds h0 on entry
    A* c_state;         // (B, H): c0 on entry, c_n on exit
    A* hidden_buf;      // (B, H) o tanh(c) before the projection, or null
  };

  ForwardLoop(const LayerDims& d, const Schedule& sched, const Buffers& buf, int threads)
      : bf16_units_(use_bf16_units(c10::CppTypeToScalarType<S>::value)), d_(d), sched_(sched), buf_(buf), threads_(threads),
        // Same split as cell_slices_; the scratch of a slice holds its gate columns for all T*B rows.
        input_slices_(d.hidden, threads, 4, d.input_size, d.seq_len * d.batch, bf16_units_),
        cell_slices_(d.hidden, threads, 4, d.out_size, d.batch, bf16_units_),
        proj_slices_(d.has_proj ? d.out_size : 0, threads, 1, d.hidden, d.batch, bf16_units_) {}

  void run() {
    run_persistent(threads_, [&](int first, int stride, SpinBarrier& barrier) {
      for (size_t s = first; s < input_slices_.slices.size(); s += stride) project_inputs(input_slices_.slices[s]);
      for (size_t s = first; s < cell_slices_.slices.size(); s += stride)
        cell_slices_.slices[s].pack_rows(buf_.w_hh, d_.hidden);
      // One group: column j of a projection slice <- row p0 + j of W_hr.
      for (size_t s = first; s < proj_slices_.slices.size(); s += stride)
        proj_slices_.slices[s].pack_rows(buf_.w_hr, d_.out_size);
      for (int64_t step = 0; step < d_.seq_len; ++step) {
        for (size_t s = first; s < cell_slices_.slices.size(); s += stride)
          cell_phase(cell_slices_.slices[s], input_slices_.slices[s], step);
        if (d_.has_proj) {
          barrier.arrive_and_wait();
          for (size_t s = first; s < proj_slices_.slices.size(); s += stride)
            projection_phase(proj_slices_.slices[s], step);
        }
        barrier.arrive_and_wait();
      }
    });
  }

 private:
  const A* h_prev(int64_t step) const { return buf_.h_state + ((step + 1) & 1) * d_.batch * d_.out_size; }
  A* h_cur(int64_t step) const { return buf_.h_state + (step & 1) * d_.batch * d_.out_size; }

  /// The slice's gate columns of x W_ih^T for all T*B rows, into its scratch ((T*B) x 4*padded).
  /// Our micro-kernel rather than MKL (at::addmm over all rows, then each thread reading its columns):
  /// single-thread 105 vs 90 GFLOP/s at 512 x 256 x 512, and the result lands in the layout the
  /// pointwise pass reads, contiguous per thread.
  void project_inputs(Slice<A>& s) const {
    s.pack_rows(buf_.w_ih, d_.hidden);
    s.multiply(buf_.input, d_.input_size, d_.seq_len * d_.batch, s.scratch, s.w.width);
  }

  /// Gate columns of the slice's units (`x` holds their input part), then their fused pointwise update.
  void cell_phase(const Slice<A>& s, const Slice<A>& x, int64_t step) const {
    const int64_t t = sched_.time(step), active = sched_.active(t);
    const int64_t B = d_.batch, H = d_.hidden, P = d_.out_size, u0 = s.cols.begin;
    s.multiply(h_prev(step), P, active, s.scratch, s.w.width);
    for (int64_t b = 0; b < active; ++b) {
      const int64_t row = t * B + b;
      const A* gates_h = s.scratch + b * s.w.width;
      const A* gates_x = x.scratch + row * x.w.width;
      A* c_state = buf_.c_state + b * H + u0;
      for_each_chunk<A>(s.cols.size(), [&](int64_t u, int n) {
        Gates<A> pre = load_gates<A>(gates_h, s.padded, u) + load_gates<A>(gates_x, s.padded, u);
        if (buf_.bias) pre = pre + load_gates<A>(buf_.bias + u0, H, u, n);
        const auto res = lstm_cell_math<A>(pre, load<A>(c_state + u, n));
        store(c_state + u, res.c, n);
        if (buf_.gates_ws) store_gates(buf_.gates_ws + row * 4 * H + u0, H, u, res.act, n);
        if (buf_.cells_ws) store(buf_.cells_ws + row * H + u0 + u, res.c, n);
        if (d_.has_proj) {
          store(buf_.hidden_buf + b * H + u0 + u, res.hidden, n);
        } else {
          emit_hidden(step, b, u0 + u, res.hidden, n);
        }
      });
    }
    for (int64_t b = active; b < B; ++b) {
      const int64_t row = t * B + b;
      if (buf_.gates_ws)
        for (int gate = 0; gate < 4; ++gate) fill_zero(buf_.gates_ws + row * 4 * H + gate * H + u0, s.cols.size());
      if (buf_.cells_ws) fill_zero(buf_.cells_ws + row * H + u0, s.cols.size());
    }
    if (!d_.has_proj) carry_inactive_rows(s.cols, step, active);
  }

  /// h_t[:, slice] = hidden @ W_hr[slice]^T for the active rows.
  void projection_phase(const Slice<A>& s, int64_t step) const {
    const int64_t active = sched_.active(sched_.time(step));
    s.multiply(buf_.hidden_buf, d_.hidden, active, s.scratch, s.w.width);
    for (int64_t b = 0; b < active; ++b)
      for_each_chunk<A>(s.cols.size(), [&](int64_t u, int n) {
        emit_hidden(step, b, s.cols.begin + u, load<A>(s.scratch + b * s.w.width + u), n);
      });
    carry_inactive_rows(s.cols, step, active);
  }

  /// Row b's new hidden state at columns [p, p+n): into the recurrent state and the output.
  void emit_hidden(int64_t step, int64_t b, int64_t p, Simd<A> h, int n) const {
    const int64_t t = sched_.time(step), P = d_.out_size;
    store(h_cur(step) + b * P + p, h, n);
    store(buf_.output + (t * d_.batch + b) * P + p, h, n);
  }

  /// Inactive rows keep their hidden state and output zeros.
  void carry_inactive_rows(Range cols, int64_t step, int64_t active) const {
    const int64_t t = sched_.time(step), P = d_.out_size;
    for (int64_t b = active; b < d_.batch; ++b) {
      std::copy(h_prev(step) + b * P + cols.begin, h_prev(step) + b * P + cols.end, h_cur(step) + b * P + cols.begin);
      fill_zero(buf_.output + (t * d_.batch + b) * P + cols.begin, cols.size());
    }
  }

  const bool bf16_units_;  // the GEMMs on vdpbf16ps (bfloat16 storage on a CPU with AVX512-BF16)
  LayerDims d_;
  Schedule sched_;
  Buffers buf_;
  int threads_;
  SliceSet<A> input_slices_;
  SliceSet<A> cell_slices_;
  SliceSet<A> proj_slices_;
};

at::Tensor empty_like_dtype(const at::Tensor& like, at::IntArrayRef shape) {
  return at::empty(shape, like.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_forward_cpu(
    const at::Tensor& input_, const at::Tensor& h0_, const at::Tensor& c0_, const at::Tensor& w_ih_,
    const at::Tensor& w_hh_, const std::optional<at::Tensor>& b_ih_, const std::optional<at::Tensor>& b_hh_,
    const std::optional<at::Tensor>& w_hr_, const std::optional<at::Tensor>& batch_sizes_,
    const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& resets, double zoneout,
    const std::optional<at::Tensor>& /*zoneout_seed*/, bool reverse, bool save_workspace) {
  refuse_state_flags(kCheck, lengths, resets, zoneout);
  const LayerDims d = check_layer(input_, h0_, c0_, w_ih_, w_hh_, w_hr_);
  kCheck.biases(b_ih_, b_hh_, 4 * d.hidden, input_);
  const at::Tensor sizes = kCheck.batch_sizes(batch_sizes_, d.seq_len, d.batch);
  const int64_t T = d.seq_len, B = d.batch, H = d.hidden, P = d.out_size;

  at::Tensor output = empty_like_dtype(input_, {T, B, P});
  // Without save_workspace the workspace is never allocated: (0,)-shaped placeholders.
  at::Tensor gates = save_workspace ? empty_like_dtype(input_, {T, B, 4 * H}) : empty_like_dtype(input_, {0});
  at::Tensor cells = save_workspace ? empty_like_dtype(input_, {T, B, H}) : empty_like_dtype(input_, {0});
  if (T == 0 || B == 0) return {output, h0_.clone(), c0_.clone(), gates, cells};

  const auto acc = at::toOpMathType(input_.scalar_type());
  const auto acc_options = input_.options().dtype(acc);
  const at::Tensor x_acc = input_.to(acc).contiguous();
  const at::Tensor w_ih_acc = w_ih_.to(acc).contiguous(), w_hh_acc = w_hh_.to(acc).contiguous();
  const at::Tensor w_hr_acc = d.has_proj ? w_hr_->to(acc).contiguous() : at::Tensor();
  const at::Tensor bias = b_ih_.has_value() ? (b_ih_->to(acc) + b_hh_->to(acc)).contiguous() : at::Tensor();
  at::Tensor h_state = at::empty({2, B, P}, acc_options);
  h_state.select(0, 1).copy_(h0_);
  at::Tensor c_state = c0_.to(acc).contiguous().clone();
  at::Tensor hidden_buf = d.has_proj ? at::empty({B, H}, acc_options) : at::Tensor();

  const Schedule sched = make_schedule(d, sizes, reverse);
  const int64_t macs_per_step = B * 4 * H * (d.input_size + P) + (d.has_proj ? B * H * P : 0);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input_.scalar_type(), "seqkern_lstm_forward", [&] {
    using A = Acc<scalar_t>;
    typename ForwardLoop<scalar_t>::Buffers buf{
        x_acc.data_ptr<A>(), w_ih_acc.data_ptr<A>(), bias.defined() ? bias.data_ptr<A>() : nullptr,
        w_hh_acc.data_ptr<A>(), d.has_proj ? w_hr_acc.data_ptr<A>() : nullptr,
        output.data_ptr<scalar_t>(), save_workspace ? gates.data_ptr<scalar_t>() : nullptr,
        save_workspace ? cells.data_ptr<scalar_t>() : nullptr, h_state.data_ptr<A>(), c_state.data_ptr<A>(),
        d.has_proj ? hidden_buf.data_ptr<A>() : nullptr};
    ForwardLoop<scalar_t>(d, sched, buf, loop_threads(macs_per_step, H, kLanes<A>)).run();
  });
  const at::Tensor h_n = h_state.select(0, (T - 1) & 1).to(input_.scalar_type(), false, /*copy=*/true);
  return {output, h_n, c_state.to(input_.scalar_type(), false, /*copy=*/true), gates, cells};
}

// ================================================================================================
// Layer backward.
// ================================================================================================
template <typename S>
class BackwardLoop {
 public:
  using A = Acc<S>;

  struct Buffers {
    const S* grad_output;  // (T, B, P)
    const S* gates_ws;     // (T, B, 4H) activated gates from the forward
    const S* cells_ws;     // (T, B, H)
    const S* c0;           // (B, H)
    const A* w_hh;         // (4H, P)
    const A* w_hr;         // (P, H) or null
    A* d_gates;            // (T, B, 4H) out: gradient of the pre-activations (zero on inactive rows)
    A* d_h_all;            // (T, B, P) out (projection only): gradient of h_t, zero on inactive rows
    A* hidden_all;         // (T, B, H) out (projection only): o tanh(c_t), zero on inactive rows
    A* d_h_state;          // (B, P): gradient of h at the current step; grad_h0 on exit
    A* d_c_state;          // (B, H): gradient of c; grad_c0 on exit
  };

  BackwardLoop(const LayerDims& d, const Schedule& sched, const Buffers& buf, int threads)
      : bf16_units_(use_bf16_units(c10::CppTypeToScalarType<S>::value)), d_(d), sched_(sched), buf_(buf), threads_(threads),
        // Without a projection P == H and both sets split the same columns the same way, so a thread
        // reads in the cell phase exactly the d_h columns it wrote in the recurrent phase: no barrier there.
        unit_slices_(d.hidden, threads, 1, d.has_proj ? d.out_size : 0, d.batch, bf16_units_),
        col_slices_(d.out_size, threads, 1, 4 * d.hidden, d.batch, bf16_units_) {}

  void run() {
    run_persistent(threads_, [&](int first, int stride, SpinBarrier& barrier) {
      // d_hidden[:, units] = d_h @ W_hr[:, units] (depth P); d_h_prev[:, cols] = d_gates @ W_hh[:, cols] (depth 4H).
      for (size_t s = first; s < unit_slices_.slices.size(); s += stride)
        if (d_.has_proj) unit_slices_.slices[s].pack_columns(buf_.w_hr, d_.hidden);
      for (size_t s = first; s < col_slices_.slices.size(); s += stride)
        col_slices_.slices[s].pack_columns(buf_.w_hh, d_.out_size);
      for (int64_t step = 0; step < d_.seq_len; ++step) {
        const int64_t t = sched_.backward_time(step);
        for (size_t s = first; s < unit_slices_.slices.size(); s += stride) cell_grad_phase(unit_slices_.slices[s], t);
        barrier.arrive_and_wait();
        for (size_t s = first; s < col_slices_.slices.size(); s += stride) recurrent_phase(col_slices_.slices[s], step);
        if (d_.has_proj) barrier.arrive_and_wait();
      }
    });
  }

 private:
  /// Fused pointwise gradient of the slice's units at time t.
  void cell_grad_phase(const Slice<A>& s, int64_t t) const {
    const int64_t active = sched_.active(t), B = d_.batch, H = d_.hidden, P = d_.out_size, u0 = s.cols.begin;
    if (d_.has_proj) s.multiply(buf_.d_h_state, P, active, s.scratch, s.w.width);
    for (int64_t b = 0; b < active; ++b) {
      const int64_t row = t * B + b;
      const S* c_prev = sched_.previous_row(buf_.cells_ws, buf_.c0, t, b, H) + u0;  // c_{t-1} as the forward read it
      A* d_c_state = buf_.d_c_state + b * H + u0;
      const A* d_hidden = d_.has_proj ? s.scratch + b * s.w.width : buf_.d_h_state + b * P + u0;
      for_each_chunk<A>(s.cols.size(), [&](int64_t u, int n) {
        const auto grad = lstm_cell_grad<A>(load_gates<A>(buf_.gates_ws + row * 4 * H + u0, H, u, n),
                                            load<A>(c_prev + u, n), load<A>(buf_.cells_ws + row * H + u0 + u, n),
                                            load<A>(d_hidden + u, n), load<A>(d_c_state + u, n));
        store_gates(buf_.d_gates + row * 4 * H + u0, H, u, grad.d_pre, n);
        store(d_c_state + u, grad.d_c_prev, n);
        if (d_.has_proj) store(buf_.hidden_all + row * H + u0 + u, grad.hidden, n);
      });
    }
    for (int64_t b = active; b < B; ++b) {
      const int64_t row = t * B + b;
      for (int gate = 0; gate < 4; ++gate) fill_zero(buf_.d_gates + row * 4 * H + gate * H + u0, s.cols.size());
      if (d_.has_proj) fill_zero(buf_.hidden_all + row * H + u0, s.cols.size());
    }
  }

  /// d_h for the next backward step at the slice's columns: d_gates_t @ W_hh on the rows active at t
  /// (inactive rows carry theirs), plus grad_output of the next step's time on its active rows.
  void recurrent_phase(const Slice<A>& s, int64_t step) const {
    const int64_t t = sched_.backward_time(step), active = sched_.active(t);
    const int64_t B = d_.batch, H = d_.hidden, P = d_.out_size;
    const bool has_next = step + 1 < d_.seq_len;
    const int64_t next_t = has_next ? sched_.backward_time(step + 1) : 0;
    const int64_t next_active = has_next ? sched_.active(next_t) : 0;
    s.multiply(buf_.d_gates + t * B * 4 * H, 4 * H, active, s.scratch, s.w.width);
    for (int64_t b = 0; b < B; ++b) {
      A* d_h = buf_.d_h_state + b * P + s.cols.begin;
      for_each_chunk<A>(s.cols.size(), [&](int64_t u, int n) {
        Simd<A> v = b < active ? load<A>(s.scratch + b * s.w.width + u) : load<A>(d_h + u, n);
        if (b < next_active) v += load<A>(buf_.grad_output + (next_t * B + b) * P + s.cols.begin + u, n);
        store(d_h + u, v, n);
        if (d_.has_proj && has_next)
          store(buf_.d_h_all + (next_t * B + b) * P + s.cols.begin + u, b < next_active ? v : Simd<A>{}, n);
      });
    }
  }

  const bool bf16_units_;  // as ForwardLoop's
  LayerDims d_;
  Schedule sched_;
  Buffers buf_;
  int threads_;
  SliceSet<A> unit_slices_;
  SliceSet<A> col_slices_;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_backward_cpu(
    const at::Tensor& grad_output_, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n, const at::Tensor& input_,
    const at::Tensor& h0_, const at::Tensor& c0_, const at::Tensor& w_ih_, const at::Tensor& w_hh_,
    const std::optional<at::Tensor>& w_hr_, const at::Tensor& output_, const at::Tensor& gates_,
    const at::Tensor& cells_, const std::optional<at::Tensor>& batch_sizes_, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& resets, double zoneout, const std::optional<at::Tensor>& /*zoneout_seed*/,
    bool reverse, bool has_bias) {
  refuse_state_flags(kCheck, lengths, resets, zoneout);
  const LayerDims d = check_layer(input_, h0_, c0_, w_ih_, w_hh_, w_hr_);
  const int64_t T = d.seq_len, B = d.batch, I = d.input_size, H = d.hidden, P = d.out_size;
  kCheck.tensor(grad_output_, input_, {T, B, P}, "grad_output");
  kCheck.tensor(grad_h_n, input_, {B, P}, "grad_h_n");
  kCheck.tensor(grad_c_n, input_, {B, H}, "grad_c_n");
  kCheck.tensor(output_, input_, {T, B, P}, "output");
  kCheck.tensor(gates_, input_, {T, B, 4 * H}, "gates (the forward's workspace; was save_workspace false?)");
  kCheck.tensor(cells_, input_, {T, B, H}, "cells");
  const at::Tensor sizes = kCheck.batch_sizes(batch_sizes_, T, B);
  const auto acc = at::toOpMathType(input_.scalar_type());
  const auto acc_options = input_.options().dtype(acc);
  const Schedule sched = make_schedule(d, sizes, reverse);

  at::Tensor d_gates = at::empty({T, B, 4 * H}, acc_options);
  at::Tensor d_h_all = d.has_proj ? at::empty({T, B, P}, acc_options) : at::Tensor();
  at::Tensor hidden_all = d.has_proj ? at::empty({T, B, H}, acc_options) : at::Tensor();
  at::Tensor d_h_state = grad_h_n.to(acc).contiguous().clone();
  at::Tensor d_c_state = grad_c_n.to(acc).contiguous().clone();
  const at::Tensor grad_output = grad_output_.contiguous();
  if (T > 0 && B > 0) {
    // Seed d_h for the first backward step: grad_h_n plus that step's grad_output on its active rows.
    const int64_t first_t = sched.time(T - 1), first_active = sched.active(first_t);
    d_h_state.narrow(0, 0, first_active).add_(grad_output.select(0, first_t).narrow(0, 0, first_active));
    if (d.has_proj) {
      d_h_all.select(0, first_t).zero_();
      d_h_all.select(0, first_t).narrow(0, 0, first_active).copy_(d_h_state.narrow(0, 0, first_active));
    }
    const at::Tensor gates = gates_.contiguous(), cells = cells_.contiguous(), c0 = c0_.contiguous();
    const at::Tensor w_hh_acc = w_hh_.to(acc).contiguous();
    const at::Tensor w_hr_acc = d.has_proj ? w_hr_->to(acc).contiguous() : at::Tensor();
    const int64_t macs_per_step = B * 4 * H * P + (d.has_proj ? B * H * P : 0);
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input_.scalar_type(), "seqkern_lstm_backward", [&] {
      using A = Acc<scalar_t>;
      typename BackwardLoop<scalar_t>::Buffers buf{
          grad_output.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(), cells.data_ptr<scalar_t>(),
          c0.data_ptr<scalar_t>(), w_hh_acc.data_ptr<A>(), d.has_proj ? w_hr_acc.data_ptr<A>() : nullptr,
          d_gates.data_ptr<A>(), d.has_proj ? d_h_all.data_ptr<A>() : nullptr,
          d.has_proj ? hidden_all.data_ptr<A>() : nullptr, d_h_state.data_ptr<A>(), d_c_state.data_ptr<A>()};
      BackwardLoop<scalar_t>(d, sched, buf, loop_threads(macs_per_step, H, kLanes<A>)).run();
    });
  } else {
    d_gates.zero_();
    if (d.has_proj) d_h_all.zero_(), hidden_all.zero_();
  }

  // Weight and input gradients: a few GEMMs over all T*B rows at once.
  const auto dtype = input_.scalar_type();
  const at::Tensor d_gates_rows = d_gates.view({T * B, 4 * H});
  const at::Tensor x_rows = input_.reshape({T * B, I}).to(acc).contiguous();
  const at::Tensor grad_input = input_gradient(d_gates_rows, w_ih_, dtype).view({T, B, I});
  const at::Tensor grad_w_ih = weight_gradient(d_gates_rows, x_rows, dtype);
  const at::Tensor grad_w_hh = weight_gradient(d_gates_rows, previous_hidden(output_, h0_, sched, acc), dtype);
  const at::Tensor grad_bias = has_bias ? d_gates_rows.sum(0).to(dtype) : empty_like_dtype(input_, {0});
  const at::Tensor grad_w_hr =
      d.has_proj ? weight_gradient(d_h_all.view({T * B, P}), hidden_all.view({T * B, H}), dtype)
                 : empty_like_dtype(input_, {0});
  return {grad_input, d_h_state.to(dtype, false, /*copy=*/true), d_c_state.to(dtype, false, /*copy=*/true),
          grad_w_ih, grad_w_hh, grad_bias, grad_w_hr};
}

// ================================================================================================
// Cell ops: the fused pointwise step on (B, 4H) gate rows, rows in parallel.
// ================================================================================================
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_forward_cpu(
    const at::Tensor& gates_x_, const at::Tensor& gates_h_, const at::Tensor& cx_,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh) {
  kCheck.supported_dtype(cx_, "cx");
  TORCH_CHECK(cx_.dim() == 2, "seqkern lstm_cell (CPU): cx must be (B, hidden), got ", cx_.sizes());
  const int64_t B = cx_.size(0), H = cx_.size(1);
  kCheck.tensor(gates_x_, cx_, {B, 4 * H}, "gates_x");
  kCheck.tensor(gates_h_, cx_, {B, 4 * H}, "gates_h");
  kCheck.biases(b_ih, b_hh, 4 * H, cx_);
  const auto acc = at::toOpMathType(cx_.scalar_type());
  const at::Tensor bias = b_ih.has_value() ? (b_ih->to(acc) + b_hh->to(acc)).contiguous() : at::Tensor();
  const at::Tensor gates_x = gates_x_.contiguous(), gates_h = gates_h_.contiguous(), cx = cx_.contiguous();
  at::Tensor hy = at::empty({B, H}, cx.options()), cy = at::empty({B, H}, cx.options());
  at::Tensor workspace = at::empty({B, 4 * H}, cx.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, cx.scalar_type(), "seqkern_lstm_cell_forward", [&] {
    using A = Acc<scalar_t>;
    const scalar_t *gx = gates_x.data_ptr<scalar_t>(), *gh = gates_h.data_ptr<scalar_t>(), *c = cx.data_ptr<scalar_t>();
    const A* bias_data = bias.defined() ? bias.data_ptr<A>() : nullptr;
    scalar_t *hy_data = hy.data_ptr<scalar_t>(), *cy_data = cy.data_ptr<scalar_t>(), *ws = workspace.data_ptr<scalar_t>();
    at::parallel_for(0, B, cell_grain(H), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        for_each_chunk<A>(H, [&](int64_t u, int n) {
          Gates<A> pre = load_gates<A>(gx + b * 4 * H, H, u, n) + load_gates<A>(gh + b * 4 * H, H, u, n);
          if (bias_data) pre = pre + load_gates<A>(bias_data, H, u, n);
          const auto res = lstm_cell_math<A>(pre, load<A>(c + b * H + u, n));
          store(hy_data + b * H + u, res.hidden, n);
          store(cy_data + b * H + u, res.c, n);
          store_gates(ws + b * 4 * H, H, u, res.act, n);
        });
    });
  });
  return {hy, cy, workspace};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_backward_cpu(
    const at::Tensor& grad_hy_, const at::Tensor& grad_cy_, const at::Tensor& cx_, const at::Tensor& cy_,
    const at::Tensor& workspace_, bool has_bias) {
  kCheck.supported_dtype(cx_, "cx");
  TORCH_CHECK(cx_.dim() == 2, "seqkern lstm_cell (CPU): cx must be (B, hidden), got ", cx_.sizes());
  const int64_t B = cx_.size(0), H = cx_.size(1);
  kCheck.tensor(grad_hy_, cx_, {B, H}, "grad_hy");
  kCheck.tensor(grad_cy_, cx_, {B, H}, "grad_cy");
  kCheck.tensor(cy_, cx_, {B, H}, "cy");
  kCheck.tensor(workspace_, cx_, {B, 4 * H}, "workspace");
  const at::Tensor grad_hy = grad_hy_.contiguous(), grad_cy = grad_cy_.contiguous(), cx = cx_.contiguous(),
                   cy = cy_.contiguous(), workspace = workspace_.contiguous();
  const auto acc = at::toOpMathType(cx.scalar_type());
  // The gate gradients are kept in the accumulation dtype until the bias gradient has summed them.
  at::Tensor grad_gates = at::empty({B, 4 * H}, cx.options().dtype(acc));
  at::Tensor grad_cx = at::empty({B, H}, cx.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, cx.scalar_type(), "seqkern_lstm_cell_backward", [&] {
    using A = Acc<scalar_t>;
    const scalar_t *dh = grad_hy.data_ptr<scalar_t>(), *dc = grad_cy.data_ptr<scalar_t>(),
                   *c_prev = cx.data_ptr<scalar_t>(), *c = cy.data_ptr<scalar_t>(), *ws = workspace.data_ptr<scalar_t>();
    A* d_gates = grad_gates.data_ptr<A>();
    scalar_t* d_cx = grad_cx.data_ptr<scalar_t>();
    at::parallel_for(0, B, cell_grain(H), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        for_each_chunk<A>(H, [&](int64_t u, int n) {
          const int64_t idx = b * H + u;
          const auto grad = lstm_cell_grad<A>(load_gates<A>(ws + b * 4 * H, H, u, n), load<A>(c_prev + idx, n),
                                              load<A>(c + idx, n), load<A>(dh + idx, n), load<A>(dc + idx, n));
          store_gates(d_gates + b * 4 * H, H, u, grad.d_pre, n);
          store(d_cx + idx, grad.d_c_prev, n);
        });
    });
  });
  const auto dtype = cx.scalar_type();
  const at::Tensor grad_bias = has_bias ? grad_gates.sum(0).to(dtype) : at::empty({0}, cx.options());
  return {grad_gates.to(dtype), grad_cx, grad_bias};
}

}  // namespace
}  // namespace seqkern::cpu

TORCH_LIBRARY_IMPL(seqkern, CPU, m) {
  m.impl("lstm_forward", &seqkern::cpu::lstm_forward_cpu);
  m.impl("lstm_backward", &seqkern::cpu::lstm_backward_cpu);
  m.impl("lstm_cell_forward", &seqkern::cpu::lstm_cell_forward_cpu);
  m.impl("lstm_cell_backward", &seqkern::cpu::lstm_cell_backward_cpu);
}
