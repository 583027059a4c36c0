// The LSTM on CPU: a whole layer over a whole sequence (lstm_forward / lstm_backward) and the fused
// pointwise cell step (lstm_cell_forward / lstm_cell_backward). Contracts in seqkern/ops/_schemas.py; oracle
// in seqkern/reference/lstm.py.
//
//   i, f, g, o = sigmoid, sigmoid, tanh, sigmoid of x W_ih^T + b_ih + h W_hh^T + b_hh (gate order i, f, g, o)
//   c' = f c + i g,   h' = o tanh(c')   (h' = (o tanh(c')) W_hr^T with a projection, proj_size wide)
//
// Storage dtype S (float, double, bfloat16); every sum and every activation runs in A = opmath(S)
// (float for bf16), and results are rounded to S once when stored.
//
// Everything but the cell's pointwise math (LstmCell: two states h and c, the activated gates as workspace)
// is the shared layer engine of recurrence_layer.h: the input projection, the persistent forward loop (a
// thread owns hidden units and their 4 gate rows of W_hh, and their c; the projection is a second phase
// behind its own barrier), the backward loop, the weight gradients and the cell ops' row loops.
#include <ATen/ATen.h>
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
SEQKERN_SIMD_INLINE Gates<A> load_gates(const Src* row, int64_t hidden, int64_t u, int n = kLanes<A>) {
  return {load<A>(row + u, n), load<A>(row + hidden + u, n), load<A>(row + 2 * hidden + u, n),
          load<A>(row + 3 * hidden + u, n)};
}

template <typename Dst, typename A>
SEQKERN_SIMD_INLINE void store_gates(Dst* row, int64_t hidden, int64_t u, const Gates<A>& gates, int n) {
  store(row + u, gates.i, n);
  store(row + hidden + u, gates.f, n);
  store(row + 2 * hidden + u, gates.g, n);
  store(row + 3 * hidden + u, gates.o, n);
}

template <typename A>
SEQKERN_SIMD_INLINE Gates<A> operator+(const Gates<A>& x, const Gates<A>& y) {
  return {x.i + y.i, x.f + y.f, x.g + y.g, x.o + y.o};
}

template <typename A>
struct CellForward {
  Gates<A> act;     // sigmoid i, sigmoid f, tanh g, sigmoid o
  Simd<A> c;        // f c_prev + i g
  Simd<A> hidden;   // o tanh(c) (before any projection)
};

/// S: the storage dtype, which picks the activations' precision (simd.h's CellActivations). i g and o tanh(c) are
/// each formed as one quotient (3 divisions per 16 units instead of 5); the separate i, g, o exist only for a
/// saved workspace (dead code otherwise).
template <typename A, typename S>
SEQKERN_SIMD_INLINE CellForward<A> lstm_cell_math(const Gates<A>& pre, Simd<A> c_prev) {
  using F = CellActivations<S>;
  const Quotient<A> i = F::template sigmoid_quotient<A>(pre.i), g = F::template tanh_quotient<A>(pre.g),
                    o = F::template sigmoid_quotient<A>(pre.o);
  const Simd<A> f = F::template sigmoid<A>(pre.f);
  const Simd<A> c = fmadd(f, c_prev, F::value(i * g));
  return {{F::value(i), f, F::value(g), F::value(o)}, c, F::value(o * F::template tanh_quotient<A>(c))};
}

template <typename A>
struct CellBackward {
  Gates<A> d_pre;     // gradient of the 4 pre-activations
  Simd<A> d_c_prev;   // gradient of c_prev
  Simd<A> hidden;     // o tanh(c), recomputed for the projection's weight gradient
};

/// act: activated gates; d_hidden: gradient of o tanh(c); d_c: gradient of c from later steps.
template <typename A, typename S>
SEQKERN_SIMD_INLINE CellBackward<A> lstm_cell_grad(const Gates<A>& act, Simd<A> c_prev, Simd<A> c,
                                                   Simd<A> d_hidden, Simd<A> d_c) {
  const A one = 1;
  const Simd<A> tanh_c = CellActivations<S>::template tanh<A>(c);
  const Simd<A> d_c_total = d_c + d_hidden * act.o * (one - tanh_c * tanh_c);
  const Gates<A> d_pre{d_c_total * act.g * act.i * (one - act.i),
                       d_c_total * c_prev * act.f * (one - act.f),
                       d_c_total * act.i * (one - act.g * act.g),
                       d_hidden * tanh_c * act.o * (one - act.o)};
  return {d_pre, d_c_total * act.f, act.o * tanh_c};
}

/// The LSTM's pointwise math on SIMD chunks of units, plugged into the layer engine (see "Cell interface").
struct LstmCell {
  static constexpr int kGates = 4;               // i, f, g, o
  static constexpr int kStates = 2;              // h (before any projection), c
  static constexpr int kWorkspaceBlocks = 4;     // the activated gates: ops' `gates` layout
  static constexpr bool kSameGateGrads = true;   // both GEMMs see i + f + g + o pre-activations alike
  static constexpr bool kDirectPath = false;
  static constexpr bool kProjectable = true;
  bool bf16_state_ok() const { return true; }

  template <typename A>
  struct Grad {
    Gates<A> d_pre;        // gradient of the 4 pre-activations
    States<A, 2> d_prev;   // [1]: of c_{t-1} ([0]: no direct path)
    Simd<A> output;        // o tanh(c), recomputed for the projection's weight gradient
  };

  template <typename A, typename In, typename Ws>
  SEQKERN_SIMD_INLINE States<A, 2> forward(const StepIn<A, In, Ws>& in, const States<A, 2>& prev) const {
    Gates<A> pre = load_gates<A>(in.gates_x, in.x_stride, 0, in.n) + load_gates<A>(in.gates_h, in.h_stride, 0, in.n);
    if (in.bias_x) pre = pre + load_gates<A>(in.bias_x, in.stride, 0, in.n);
    const CellForward<A> res = lstm_cell_math<A, Ws>(pre, prev[1]);
    if (in.workspace) store_gates(in.workspace, in.stride, 0, res.act, in.n);
    return {res.hidden, res.c};
  }

  /// d[0]: gradient of o tanh(c) (the cell's output), d[1]: of c from later steps. c is the recorded one, or
  /// under zoneout (cur[1] null: the record is the blended state) f c_prev + i g again from the saved gates.
  template <typename A, typename S>
  SEQKERN_SIMD_INLINE Grad<A> grad(const GradIn<S, 2>& in, const States<A, 2>& d) const {
    const Gates<A> act = load_gates<A>(in.workspace, in.stride, 0, in.n);
    const Simd<A> c_prev = load<A>(in.prev[1], in.n);
    const Simd<A> c = in.cur[1] ? load<A>(in.cur[1], in.n) : fmadd(act.f, c_prev, act.i * act.g);
    const CellBackward<A> g = lstm_cell_grad<A, S>(act, c_prev, c, d[0], d[1]);
    return {g.d_pre, {Simd<A>{}, g.d_c_prev}, g.hidden};
  }

  template <typename A>
  SEQKERN_SIMD_INLINE static void store_grad(A* d_x, A* /*d_h*/, int64_t hidden, const Grad<A>& g, int n) {
    store_gates(d_x, hidden, 0, g.d_pre, n);
  }
};

/// Checks the tensors every layer op shares and returns the dimensions they imply.
LayerShape check_layer(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                       const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr) {
  const LayerShape d = check_layer_args(kCheck, LstmCell::kGates, input, h0, w_ih, w_hh, w_hr);
  kCheck.tensor(c0, input, {d.batch, d.hidden}, "c0");
  return d;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_forward_cpu(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& batch_sizes,
    const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& resets, double zoneout,
    const std::optional<at::Tensor>& zoneout_seed, bool reverse, bool save_workspace) {
  const LayerShape d = check_layer(input, h0, c0, w_ih, w_hh, w_hr);
  kCheck.biases(b_ih, b_hh, 4 * d.hidden, input);
  std::vector<at::Tensor> keep;
  const Schedule sched = layer_schedule(kCheck, d, batch_sizes, lengths, resets, zoneout, zoneout_seed, reverse, keep);
  // Without save_workspace the workspace is never allocated: (0,)-shaped placeholders.
  const at::Tensor no_workspace = at::empty({0}, input.options());
  at::Tensor gates = save_workspace ? pooled_empty({d.seq_len, d.batch, 4 * d.hidden}, input.options()) : no_workspace;
  const auto out = layer_forward(LstmCell{}, d, input, {h0.contiguous(), c0.contiguous()},
                                 {w_ih, w_hh, w_hr.value_or(at::Tensor()), summed_bias(b_ih, b_hh), {}},
                                 sched, save_workspace, gates);
  return {out.output, out.last[0], out.last[1], gates, save_workspace ? out.sequence[1] : no_workspace.clone()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n, const at::Tensor& input,
    const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& w_hr, const at::Tensor& output, const at::Tensor& gates,
    const at::Tensor& cells, const std::optional<at::Tensor>& batch_sizes, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& resets, double zoneout, const std::optional<at::Tensor>& zoneout_seed,
    bool reverse, bool has_bias) {
  const LayerShape d = check_layer(input, h0, c0, w_ih, w_hh, w_hr);
  const int64_t T = d.seq_len, B = d.batch, H = d.hidden, P = d.state_size;
  kCheck.tensor(grad_output, input, {T, B, P}, "grad_output");
  kCheck.tensor(grad_h_n, input, {B, P}, "grad_h_n");
  kCheck.tensor(grad_c_n, input, {B, H}, "grad_c_n");
  kCheck.tensor(output, input, {T, B, P}, "output");
  kCheck.tensor(gates, input, {T, B, 4 * H}, "gates (the forward's workspace; was save_workspace false?)");
  kCheck.tensor(cells, input, {T, B, H}, "cells");
  std::vector<at::Tensor> keep;
  const Schedule sched = layer_schedule(kCheck, d, batch_sizes, lengths, resets, zoneout, zoneout_seed, reverse, keep);
  const LayerGrads g = layer_backward(LstmCell{}, d, grad_output, {grad_h_n, grad_c_n}, input, {h0, c0}, w_ih, w_hh,
                                      w_hr.value_or(at::Tensor()), output, gates, {at::Tensor(), cells},
                                      sched, has_bias);
  const at::Tensor none = at::empty({0}, input.options());
  return {g.input, g.initial[0], g.initial[1], g.w_ih, g.w_hh, has_bias ? g.b_ih : none,
          w_hr.has_value() ? g.w_hr : none.clone()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_forward_cpu(
    const at::Tensor& gates_x, const at::Tensor& gates_h, const at::Tensor& cx,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh) {
  kCheck.supported_dtype(cx, "cx");
  TORCH_CHECK(cx.dim() == 2, "seqkern lstm_cell (CPU): cx must be (B, hidden), got ", cx.sizes());
  const int64_t B = cx.size(0), H = cx.size(1);
  kCheck.tensor(gates_x, cx, {B, 4 * H}, "gates_x");
  kCheck.tensor(gates_h, cx, {B, 4 * H}, "gates_h");
  kCheck.biases(b_ih, b_hh, 4 * H, cx);
  at::Tensor workspace = at::empty({B, LstmCell::kWorkspaceBlocks * H}, cx.options());
  const auto next = cell_forward(LstmCell{}, gates_x.contiguous(), gates_h.contiguous(), {at::Tensor(), cx.contiguous()},
                                 summed_bias(b_ih, b_hh), at::Tensor(), workspace);
  return {next[0], next[1], workspace};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_backward_cpu(
    const at::Tensor& grad_hy, const at::Tensor& grad_cy, const at::Tensor& cx, const at::Tensor& cy,
    const at::Tensor& workspace, bool has_bias) {
  kCheck.supported_dtype(cx, "cx");
  TORCH_CHECK(cx.dim() == 2, "seqkern lstm_cell (CPU): cx must be (B, hidden), got ", cx.sizes());
  const int64_t B = cx.size(0), H = cx.size(1);
  kCheck.tensor(grad_hy, cx, {B, H}, "grad_hy");
  kCheck.tensor(grad_cy, cx, {B, H}, "grad_cy");
  kCheck.tensor(cy, cx, {B, H}, "cy");
  kCheck.tensor(workspace, cx, {B, 4 * H}, "workspace");
  // The gate gradients stay in the accumulation dtype until the bias gradient has summed them.
  const auto g = cell_backward(LstmCell{}, {grad_hy.contiguous(), grad_cy.contiguous()}, workspace.contiguous(),
                               {at::Tensor(), cx.contiguous()}, {at::Tensor(), cy.contiguous()});
  const auto dtype = cx.scalar_type();
  return {g.d_gates_x.to(dtype), g.d_prev[1], has_bias ? g.d_gates_x.sum(0).to(dtype) : at::empty({0}, cx.options())};
}

}  // namespace
}  // namespace seqkern::cpu

TORCH_LIBRARY_IMPL(seqkern, CPU, m) {
  m.impl("lstm_forward", &seqkern::cpu::lstm_forward_cpu);
  m.impl("lstm_backward", &seqkern::cpu::lstm_backward_cpu);
  m.impl("lstm_cell_forward", &seqkern::cpu::lstm_cell_forward_cpu);
  m.impl("lstm_cell_backward", &seqkern::cpu::lstm_cell_backward_cpu);
}
