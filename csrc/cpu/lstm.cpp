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
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "cpu/recurrence.h"

namespace seqkern::cpu {
namespace {

template <typename S>
using Acc = at::opmath_type<S>;

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

/// Calls body(u, n) for the SIMD chunks [u, u+n) of [0, units).
template <typename A, typename Body>
inline void for_each_chunk(int64_t units, const Body& body) {
  for (int64_t u = 0; u < units; u += kLanes<A>) body(u, static_cast<int>(std::min<int64_t>(kLanes<A>, units - u)));
}

// ================================================================================================
// Argument checks (a direct op call must never read or write out of bounds).
// ================================================================================================
void check_dtype_device(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "seqkern lstm (CPU): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "seqkern lstm (CPU): ", name, " must have dtype ",
              like.scalar_type(), ", got ", t.scalar_type());
}

using NamedTensor = std::pair<const at::Tensor*, const char*>;

void check_shape(const at::Tensor& t, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(t.sizes() == shape, "seqkern lstm (CPU): ", name, " must have shape ", shape, ", got ",
              t.sizes());
}

void check_supported_dtype(const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16,
              "seqkern lstm (CPU): dtype must be float32, float64 or bfloat16, got ", dtype);
}

/// batch_sizes (T,) int64 CPU, non-increasing, each in [0, batch]; returned contiguous (or undefined).
at::Tensor checked_batch_sizes(const std::optional<at::Tensor>& batch_sizes, int64_t seq_len, int64_t batch) {
  if (!batch_sizes.has_value()) return {};
  const at::Tensor sizes = batch_sizes->contiguous();
  TORCH_CHECK(sizes.device().is_cpu() && sizes.scalar_type() == at::kLong,
              "seqkern lstm (CPU): batch_sizes must be an int64 CPU tensor");
  check_shape(sizes, {seq_len}, "batch_sizes");
  const int64_t* data = sizes.data_ptr<int64_t>();
  for (int64_t t = 0; t < seq_len; ++t) {
    TORCH_CHECK(data[t] >= 0 && data[t] <= batch, "seqkern lstm (CPU): batch_sizes[", t, "] = ", data[t],
                " is outside [0, ", batch, "]");
    TORCH_CHECK(t == 0 || data[t] <= data[t - 1], "seqkern lstm (CPU): batch_sizes must be non-increasing");
  }
  return sizes;
}

/// Sizes of one layer: T steps, B rows, I inputs, H hidden units, P = proj_size or H outputs.
struct LayerDims {
  int64_t seq_len, batch, input_size, hidden, out_size;
  bool has_proj;
};

/// Checks the tensors every layer op shares and returns the dimensions they imply.
LayerDims check_layer(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                      const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr) {
  check_supported_dtype(input);
  TORCH_CHECK(input.dim() == 3, "seqkern lstm (CPU): input must be (T, B, input_size), got ", input.sizes());
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) % 4 == 0,
              "seqkern lstm (CPU): w_ih must be (4*hidden, input_size), got ", w_ih.sizes());
  LayerDims d{input.size(0), input.size(1), input.size(2), w_ih.size(0) / 4, 0, w_hr.has_value()};
  d.out_size = d.has_proj ? w_hr->size(0) : d.hidden;
  check_shape(w_ih, {4 * d.hidden, d.input_size}, "w_ih");
  check_shape(w_hh, {4 * d.hidden, d.out_size}, "w_hh");
  check_shape(h0, {d.batch, d.out_size}, "h0");
  check_shape(c0, {d.batch, d.hidden}, "c0");
  if (d.has_proj) check_shape(*w_hr, {d.out_size, d.hidden}, "w_hr");
  for (const NamedTensor& t : {NamedTensor{&h0, "h0"}, {&c0, "c0"}, {&w_ih, "w_ih"}, {&w_hh, "w_hh"}})
    check_dtype_device(*t.first, input, t.second);
  check_dtype_device(input, input, "input");
  if (d.has_proj) check_dtype_device(*w_hr, input, "w_hr");
  return d;
}

// ================================================================================================
// The persistent time loop: slices, schedule.
// ================================================================================================
/// Which time index a processing step touches and how many rows are active there.
struct Schedule {
  int64_t seq_len, batch;
  const int64_t* batch_sizes;  // null: every row active at every step
  bool reverse;

  /// The time index of forward-processing step `step` (T-1-step in the reverse direction).
  int64_t time(int64_t step) const { return reverse ? seq_len - 1 - step : step; }
  int64_t active(int64_t t) const { return batch_sizes ? batch_sizes[t] : batch; }
};

/// One thread's share of a recurrent GEMM: output columns `cols` (each repeated in `groups` gate blocks
/// padded to `padded` columns), their packed weights, and a (batch x w.width) scratch for the product.
template <typename A>
struct Slice {
  Range cols;
  int64_t padded = 0;
  PackedPanels<A> w;
  A* scratch = nullptr;
};

/// Where packed column j comes from: element k is data[k * stride] (data null: a zero padding column).
template <typename A>
struct ColumnSource {
  const A* data;
  int64_t stride;
};

/// The slices of `columns` columns for `parts` threads, in one allocation (`storage` keeps it alive).
template <typename A>
struct SliceSet {
  std::vector<Slice<A>> slices;
  at::Tensor storage;

  SliceSet(int64_t columns, int parts, int groups, int64_t depth, int64_t rows) {
    int64_t total = 0;
    for (const Range& r : split_range(columns, parts, kLanes<A>)) {
      Slice<A> s;
      s.cols = r;
      s.padded = PackedPanels<A>::padded_width(r.size());
      s.w.depth = depth;
      s.w.width = groups * s.padded;
      total += (depth + rows) * s.w.width;
      slices.push_back(s);
    }
    storage = at::empty({std::max<int64_t>(total, 1)}, at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value));
    A* next = storage.data_ptr<A>();
    for (Slice<A>& s : slices) {
      s.w.data = next;
      s.scratch = next + depth * s.w.width;
      next += (depth + rows) * s.w.width;
    }
  }
};

/// Threads for a loop doing `macs_per_step` multiply-adds per step over `hidden` units.
/// 32K multiply-adds is ~0.6 us of one core at the micro-kernel's ~110 GFLOP/s, the order of what a
/// step's synchronisation costs.
int loop_threads(int64_t macs_per_step, int64_t hidden, int64_t lanes) {
  constexpr int64_t kMinMacsPerThreadStep = 32 * 1024;
  return persistent_thread_count(macs_per_step, kMinMacsPerThreadStep, (hidden + lanes - 1) / lanes);
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
      : d_(d), sched_(sched), buf_(buf), threads_(threads),
        // Same split as cell_slices_; the scratch of a slice holds its gate columns for all T*B rows.
        input_slices_(d.hidden, threads, 4, d.input_size, d.seq_len * d.batch),
        cell_slices_(d.hidden, threads, 4, d.out_size, d.batch),
        proj_slices_(d.has_proj ? d.out_size : 0, threads, 1, d.hidden, d.batch) {}

  void run() {
    run_persistent(threads_, [&](int first, int stride, SpinBarrier& barrier) {
      for (size_t s = first; s < input_slices_.slices.size(); s += stride) project_inputs(input_slices_.slices[s]);
      for (size_t s = first; s < cell_slices_.slices.size(); s += stride) pack_cell_slice(cell_slices_.slices[s]);
      for (size_t s = first; s < proj_slices_.slices.size(); s += stride) pack_proj_slice(proj_slices_.slices[s]);
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

  /// Columns [gate block | unit] of the slice <- rows gate*H + unit of w (4H x depth): W_ih or W_hh.
  void pack_gate_rows(Slice<A>& s, const A* w) const {
    s.w.pack([&](int64_t j) {
      const int64_t gate = j / s.padded, u = j % s.padded;
      return ColumnSource<A>{u < s.cols.size() ? w + (gate * d_.hidden + s.cols.begin + u) * s.w.depth : nullptr, 1};
    });
  }

  void pack_cell_slice(Slice<A>& s) const { pack_gate_rows(s, buf_.w_hh); }

  /// The slice's gate columns of x W_ih^T for all T*B rows, into its scratch ((T*B) x 4*padded).
  /// Our micro-kernel rather than MKL (at::addmm over all rows, then each thread reading its columns):
  /// single-thread 105 vs 90 GFLOP/s at 512 x 256 x 512, and the result lands in the layout the
  /// pointwise pass reads, contiguous per thread.
  void project_inputs(Slice<A>& s) const {
    pack_gate_rows(s, buf_.w_ih);
    gemm_packed(buf_.input, d_.input_size, d_.seq_len * d_.batch, s.w, s.scratch, s.w.width);
  }

  /// Column j of the slice <- row p0 + j of W_hr (depth: the H hidden units).
  void pack_proj_slice(Slice<A>& s) const {
    s.w.pack([&](int64_t j) {
      return ColumnSource<A>{j < s.cols.size() ? buf_.w_hr + (s.cols.begin + j) * d_.hidden : nullptr, 1};
    });
  }

  /// Gate columns of the slice's units (`x` holds their input part), then their fused pointwise update.
  void cell_phase(const Slice<A>& s, const Slice<A>& x, int64_t step) const {
    const int64_t t = sched_.time(step), active = sched_.active(t);
    const int64_t B = d_.batch, H = d_.hidden, P = d_.out_size, u0 = s.cols.begin;
    gemm_packed(h_prev(step), P, active, s.w, s.scratch, s.w.width);
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
    gemm_packed(buf_.hidden_buf, d_.hidden, active, s.w, s.scratch, s.w.width);
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
    const std::optional<at::Tensor>& w_hr_, const std::optional<at::Tensor>& batch_sizes_, bool reverse,
    bool save_workspace) {
  const LayerDims d = check_layer(input_, h0_, c0_, w_ih_, w_hh_, w_hr_);
  TORCH_CHECK(b_ih_.has_value() == b_hh_.has_value(), "seqkern lstm (CPU): b_ih and b_hh must be given together");
  for (const auto* b : {&b_ih_, &b_hh_})
    if (b->has_value()) {
      check_shape(**b, {4 * d.hidden}, "b_ih/b_hh");
      check_dtype_device(**b, input_, "b_ih/b_hh");
    }
  const at::Tensor sizes = checked_batch_sizes(batch_sizes_, d.seq_len, d.batch);
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

  const Schedule sched{T, B, sizes.defined() ? sizes.data_ptr<int64_t>() : nullptr, reverse};
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
      : d_(d), sched_(sched), buf_(buf), threads_(threads),
        // Without a projection P == H and both sets split the same columns the same way, so a thread
        // reads in the cell phase exactly the d_h columns it wrote in the recurrent phase: no barrier there.
        unit_slices_(d.hidden, threads, 1, d.has_proj ? d.out_size : 0, d.batch),
        col_slices_(d.out_size, threads, 1, 4 * d.hidden, d.batch) {}

  void run() {
    run_persistent(threads_, [&](int first, int stride, SpinBarrier& barrier) {
      for (size_t s = first; s < unit_slices_.slices.size(); s += stride)
        if (d_.has_proj) pack_hidden_grad_slice(unit_slices_.slices[s]);
      for (size_t s = first; s < col_slices_.slices.size(); s += stride) pack_recurrent_slice(col_slices_.slices[s]);
      for (int64_t step = 0; step < d_.seq_len; ++step) {
        const int64_t t = time_of(step);
        for (size_t s = first; s < unit_slices_.slices.size(); s += stride) cell_grad_phase(unit_slices_.slices[s], t);
        barrier.arrive_and_wait();
        for (size_t s = first; s < col_slices_.slices.size(); s += stride) recurrent_phase(col_slices_.slices[s], step);
        if (d_.has_proj) barrier.arrive_and_wait();
      }
    });
  }

  /// The time index of backward step `step` (the forward's steps in reverse).
  int64_t time_of(int64_t step) const { return sched_.time(d_.seq_len - 1 - step); }

 private:
  /// Column j <- column u0 + j of W_hr (depth P): d_hidden[:, slice] = d_h @ W_hr[:, slice].
  void pack_hidden_grad_slice(Slice<A>& s) const {
    s.w.pack([&](int64_t j) {
      return ColumnSource<A>{j < s.cols.size() ? buf_.w_hr + s.cols.begin + j : nullptr, d_.hidden};
    });
  }

  /// Column j <- column p0 + j of W_hh (depth 4H): d_h_prev[:, slice] = d_gates @ W_hh[:, slice].
  void pack_recurrent_slice(Slice<A>& s) const {
    s.w.pack([&](int64_t j) {
      return ColumnSource<A>{j < s.cols.size() ? buf_.w_hh + s.cols.begin + j : nullptr, d_.out_size};
    });
  }

  /// c_{t-1} of row b as the forward saw it: the previous step's cell, or c0 for a row starting at t.
  const S* prev_cell_row(int64_t t, int64_t b) const {
    const int64_t B = d_.batch, H = d_.hidden;
    const int64_t prev_t = sched_.reverse ? t + 1 : t - 1;
    const bool started = prev_t >= 0 && prev_t < d_.seq_len && b < sched_.active(prev_t);
    return started ? buf_.cells_ws + (prev_t * B + b) * H : buf_.c0 + b * H;
  }

  /// Fused pointwise gradient of the slice's units at time t.
  void cell_grad_phase(const Slice<A>& s, int64_t t) const {
    const int64_t active = sched_.active(t), B = d_.batch, H = d_.hidden, P = d_.out_size, u0 = s.cols.begin;
    if (d_.has_proj) gemm_packed(buf_.d_h_state, P, active, s.w, s.scratch, s.w.width);
    for (int64_t b = 0; b < active; ++b) {
      const int64_t row = t * B + b;
      const S* c_prev = prev_cell_row(t, b) + u0;
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
    const int64_t t = time_of(step), active = sched_.active(t), B = d_.batch, H = d_.hidden, P = d_.out_size;
    const bool has_next = step + 1 < d_.seq_len;
    const int64_t next_t = has_next ? time_of(step + 1) : 0, next_active = has_next ? sched_.active(next_t) : 0;
    gemm_packed(buf_.d_gates + t * B * 4 * H, 4 * H, active, s.w, s.scratch, s.w.width);
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

  LayerDims d_;
  Schedule sched_;
  Buffers buf_;
  int threads_;
  SliceSet<A> unit_slices_;
  SliceSet<A> col_slices_;
};

/// The hidden state each step read, (T*B, P) in dtype `acc`: h0 at the first step, the previous step's
/// output after it, and h0 again for rows that start late (reverse direction with batch_sizes).
at::Tensor previous_hidden(const at::Tensor& output, const at::Tensor& h0, const Schedule& sched, at::ScalarType acc) {
  const int64_t T = sched.seq_len;
  at::Tensor prev = at::empty(output.sizes(), output.options().dtype(acc));
  if (T == 0) return prev.view({0, prev.size(2)});
  const int64_t first = sched.time(0);
  prev.select(0, first).copy_(h0);
  if (T > 1) prev.narrow(0, sched.reverse ? 0 : 1, T - 1).copy_(output.narrow(0, sched.reverse ? 1 : 0, T - 1));
  if (sched.reverse && sched.batch_sizes)
    for (int64_t t = 0; t + 1 < T; ++t) {
      const int64_t lo = sched.batch_sizes[t + 1], hi = sched.batch_sizes[t];
      if (hi > lo) prev.select(0, t).narrow(0, lo, hi - lo).copy_(h0.narrow(0, lo, hi - lo));
    }
  return prev.view({-1, prev.size(2)});
}

/// lhs^T @ rhs over K rows (both contiguous), (N x M): a weight gradient summed over all T*B (time, row)
/// pairs. One GEMM keeps one running fp32 sum per element over all K products; its error grows ~K:
/// measured 3.4x the reference's grad_w_hh (which adds up per-step products) at T*B = 448, and 4x
/// torch.nn.LSTM's grad_w_ih at T*B = 2112. Here the rows are cut into at most 16 chunks of >= 64 rows
/// whose products (one batched GEMM) are rounded on their own, then summed. Chunks of 64 added pairwise
/// were as accurate but cost 2-3x a single GEMM at K = 3200 (50 small GEMMs and adds); 16 chunks in
/// one bmm cost about one GEMM plus one pass over 16 partial results. fp64 keeps the single GEMM.
at::Tensor sum_of_outer_products(const at::Tensor& lhs, const at::Tensor& rhs) {
  constexpr int64_t kMinChunkRows = 64, kMaxChunks = 16;
  const int64_t rows = lhs.size(0), n = lhs.size(1), m = rhs.size(1);
  if (lhs.scalar_type() == at::kDouble || rows < 2 * kMinChunkRows) return at::mm(lhs.t(), rhs);
  const int64_t chunk_rows = std::max(kMinChunkRows, (rows + kMaxChunks - 1) / kMaxChunks);
  const int64_t chunks = rows / chunk_rows, covered = chunks * chunk_rows;
  const at::Tensor lhs_chunks = lhs.narrow(0, 0, covered).view({chunks, chunk_rows, n});
  const at::Tensor rhs_chunks = rhs.narrow(0, 0, covered).view({chunks, chunk_rows, m});
  at::Tensor total = at::bmm(lhs_chunks.transpose(1, 2), rhs_chunks).sum(0);
  if (covered < rows) total.add_(at::mm(lhs.narrow(0, covered, rows - covered).t(), rhs.narrow(0, covered, rows - covered)));
  return total;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_backward_cpu(
    const at::Tensor& grad_output_, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n, const at::Tensor& input_,
    const at::Tensor& h0_, const at::Tensor& c0_, const at::Tensor& w_ih_, const at::Tensor& w_hh_,
    const std::optional<at::Tensor>& w_hr_, const at::Tensor& output_, const at::Tensor& gates_,
    const at::Tensor& cells_, const std::optional<at::Tensor>& batch_sizes_, bool reverse, bool has_bias) {
  const LayerDims d = check_layer(input_, h0_, c0_, w_ih_, w_hh_, w_hr_);
  const int64_t T = d.seq_len, B = d.batch, I = d.input_size, H = d.hidden, P = d.out_size;
  check_shape(grad_output_, {T, B, P}, "grad_output");
  check_shape(grad_h_n, {B, P}, "grad_h_n");
  check_shape(grad_c_n, {B, H}, "grad_c_n");
  check_shape(output_, {T, B, P}, "output");
  check_shape(gates_, {T, B, 4 * H}, "gates (the forward's workspace; was save_workspace false?)");
  check_shape(cells_, {T, B, H}, "cells");
  for (const NamedTensor& t : {NamedTensor{&grad_output_, "grad_output"}, {&grad_h_n, "grad_h_n"},
                               {&grad_c_n, "grad_c_n"}, {&output_, "output"}, {&gates_, "gates"}, {&cells_, "cells"}})
    check_dtype_device(*t.first, input_, t.second);
  const at::Tensor sizes = checked_batch_sizes(batch_sizes_, T, B);
  const auto acc = at::toOpMathType(input_.scalar_type());
  const auto acc_options = input_.options().dtype(acc);
  const Schedule sched{T, B, sizes.defined() ? sizes.data_ptr<int64_t>() : nullptr, reverse};

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
  const at::Tensor grad_input = at::mm(d_gates_rows, w_ih_.to(acc)).view({T, B, I}).to(dtype);
  const at::Tensor grad_w_ih = sum_of_outer_products(d_gates_rows, x_rows).to(dtype);
  const at::Tensor grad_w_hh = sum_of_outer_products(d_gates_rows, previous_hidden(output_, h0_, sched, acc)).to(dtype);
  const at::Tensor grad_bias = has_bias ? d_gates_rows.sum(0).to(dtype) : empty_like_dtype(input_, {0});
  const at::Tensor grad_w_hr =
      d.has_proj ? sum_of_outer_products(d_h_all.view({T * B, P}), hidden_all.view({T * B, H})).to(dtype)
                 : empty_like_dtype(input_, {0});
  return {grad_input, d_h_state.to(dtype, false, /*copy=*/true), d_c_state.to(dtype, false, /*copy=*/true),
          grad_w_ih, grad_w_hh, grad_bias, grad_w_hr};
}

// ================================================================================================
// Cell ops: the fused pointwise step on (B, 4H) gate rows, rows in parallel.
// ================================================================================================
/// Rows per at::parallel_for task: about 16K units of pointwise work each.
int64_t cell_grain(int64_t hidden) { return std::max<int64_t>(1, (16 * 1024) / std::max<int64_t>(1, hidden)); }

void check_cell_tensor(const at::Tensor& t, const at::Tensor& like, at::IntArrayRef shape, const char* name) {
  check_shape(t, shape, name);
  check_dtype_device(t, like, name);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_forward_cpu(
    const at::Tensor& gates_x_, const at::Tensor& gates_h_, const at::Tensor& cx_,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh) {
  check_supported_dtype(cx_);
  TORCH_CHECK(cx_.dim() == 2, "seqkern lstm_cell (CPU): cx must be (B, hidden), got ", cx_.sizes());
  const int64_t B = cx_.size(0), H = cx_.size(1);
  check_cell_tensor(gates_x_, cx_, {B, 4 * H}, "gates_x");
  check_cell_tensor(gates_h_, cx_, {B, 4 * H}, "gates_h");
  check_dtype_device(cx_, cx_, "cx");
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(), "seqkern lstm_cell (CPU): b_ih and b_hh must be given together");
  const auto acc = at::toOpMathType(cx_.scalar_type());
  at::Tensor bias;
  if (b_ih.has_value()) {
    check_cell_tensor(*b_ih, cx_, {4 * H}, "b_ih");
    check_cell_tensor(*b_hh, cx_, {4 * H}, "b_hh");
    bias = (b_ih->to(acc) + b_hh->to(acc)).contiguous();
  }
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
  check_supported_dtype(cx_);
  TORCH_CHECK(cx_.dim() == 2, "seqkern lstm_cell (CPU): cx must be (B, hidden), got ", cx_.sizes());
  const int64_t B = cx_.size(0), H = cx_.size(1);
  check_dtype_device(cx_, cx_, "cx");
  check_cell_tensor(grad_hy_, cx_, {B, H}, "grad_hy");
  check_cell_tensor(grad_cy_, cx_, {B, H}, "grad_cy");
  check_cell_tensor(cy_, cx_, {B, H}, "cy");
  check_cell_tensor(workspace_, cx_, {B, 4 * H}, "workspace");
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
