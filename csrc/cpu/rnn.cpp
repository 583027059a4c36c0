// The Elman RNN on CPU: h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh), act = tanh or relu. A whole layer
// over a whole sequence (rnn_forward / rnn_backward) and the fused bias + activation of one cell step
// (rnn_cell_forward / rnn_cell_backward). Contracts in csrc/ops.cpp; oracle in seqkern/reference/rnn.py.
//
// Everything but the activation is the shared layer engine of recurrence_layer.h (input projection with
// both biases folded in, persistent time loop, backward loop, weight gradients as GEMMs over all
// T*B rows). The backward saves no workspace: act'(pre) is read off the output (1 - h^2, or h > 0).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/recurrence_layer.h"

namespace seqkern::cpu {
namespace {

constexpr ArgChecker kCheck{"rnn"};

/// The Elman cell's pointwise math on SIMD chunks of units, plugged into the layer engine.
struct ElmanCell {
  static constexpr int kGates = 1;
  static constexpr int kWorkspaceBlocks = 0;     // act'(pre) is read off h_t
  static constexpr bool kSameGateGrads = true;   // d_pre, the gradient of x W_ih^T and of h W_hh^T alike
  static constexpr bool kDirectPath = false;
  static constexpr int kStates = 1;  // h
  static constexpr bool kProjectable = false;
  bool relu;

  /// relu's gradient jumps at 0: a bf16-rounded h_{t-1} in the recurrent GEMM moves pre-activations near 0
  /// across the kink and flips whole gradient entries, which then propagate back through time (measured:
  /// grad_input 0.39 from fp64 against the bf16 reference's 0.015, T=6 B=4 H=17 reverse with lengths).
  /// relu layers keep the fp32 recurrent GEMM in bfloat16; tanh is smooth there.
  bool bf16_state_ok() const { return !relu; }

  template <typename A>
  struct Grad {
    Simd<A> d_pre;
    States<A, 1> d_prev;  // no direct path: never read
  };

  template <typename A, typename In, typename Ws>
  SEQKERN_SIMD_INLINE States<A, 1> forward(const StepIn<A, In, Ws>& in, const States<A, 1>& /*prev*/) const {
    Simd<A> pre = load<A>(in.gates_x, in.n) + load<A>(in.gates_h, in.n);
    if (in.bias_x) pre += load<A>(in.bias_x, in.n);
    // `pre < 0 ? 0 : pre` rather than max: a NaN propagates, as torch.relu's does.
    return {relu ? (pre < A(0) ? Simd<A>{} : pre) : CellActivations<Ws>::template tanh<A>(pre)};
  }

  template <typename A, typename S>
  SEQKERN_SIMD_INLINE Grad<A> grad(const GradIn<S, 1>& in, const States<A, 1>& d) const {
    const Simd<A> h = load<A>(in.cur[0], in.n), d_h = d[0];
    // As torch's threshold_backward: only h <= 0 blocks, so a NaN output passes its gradient on.
    return {relu ? (h <= A(0) ? Simd<A>{} : d_h) : d_h * (A(1) - h * h), {}};
  }

  /// d_x and d_h are the same row (kSameGateGrads).
  template <typename A>
  SEQKERN_SIMD_INLINE static void store_grad(A* d_x, A* /*d_h*/, int64_t /*hidden*/, const Grad<A>& g, int n) {
    store(d_x, g.d_pre, n);
  }
};

std::tuple<at::Tensor, at::Tensor> rnn_forward_cpu(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& w_ih,
                                                   const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                                                   const std::optional<at::Tensor>& b_hh,
                                                   const std::optional<at::Tensor>& batch_sizes,
                                                   const std::optional<at::Tensor>& lengths,
                                                   const std::optional<at::Tensor>& resets, bool reverse, bool relu) {
  const LayerShape d = check_layer_args(kCheck, ElmanCell::kGates, input, h0, w_ih, w_hh);
  kCheck.biases(b_ih, b_hh, d.hidden, input);
  std::vector<at::Tensor> keep;
  const Schedule sched = layer_schedule(kCheck, d, batch_sizes, lengths, resets, 0.0, std::nullopt, reverse, keep);
  const auto out = layer_forward(ElmanCell{relu}, d, input, {h0.contiguous()}, {w_ih, w_hh, {}, summed_bias(b_ih, b_hh), {}},
                                 sched, false, at::Tensor());
  return {out.output, out.last[0]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& input, const at::Tensor& h0,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& output,
    const std::optional<at::Tensor>& batch_sizes, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& resets, bool reverse, bool relu, bool has_bias) {
  const LayerShape d = check_layer_args(kCheck, ElmanCell::kGates, input, h0, w_ih, w_hh);
  const int64_t T = d.seq_len, B = d.batch, H = d.hidden;
  kCheck.tensor(grad_output, input, {T, B, H}, "grad_output");
  kCheck.tensor(grad_h_n, input, {B, H}, "grad_h_n");
  kCheck.tensor(output, input, {T, B, H}, "output");
  std::vector<at::Tensor> keep;
  const Schedule sched = layer_schedule(kCheck, d, batch_sizes, lengths, resets, 0.0, std::nullopt, reverse, keep);
  const LayerGrads g = layer_backward(ElmanCell{relu}, d, grad_output, {grad_h_n}, input, {h0}, w_ih, w_hh, at::Tensor(),
                                      output, at::Tensor(), {}, sched, has_bias);
  return {g.input, g.initial[0], g.w_ih, g.w_hh, has_bias ? g.b_ih : at::empty({0}, input.options())};
}

at::Tensor rnn_cell_forward_cpu(const at::Tensor& gates_x, const at::Tensor& gates_h,
                                const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh, bool relu) {
  kCheck.supported_dtype(gates_x, "gates_x");
  TORCH_CHECK(gates_x.dim() == 2, "seqkern rnn_cell (CPU): gates_x must be (B, hidden), got ", gates_x.sizes());
  kCheck.tensor(gates_h, gates_x, gates_x.sizes(), "gates_h");
  kCheck.biases(b_ih, b_hh, gates_x.size(1), gates_x);
  return cell_forward(ElmanCell{relu}, gates_x.contiguous(), gates_h.contiguous(), {}, summed_bias(b_ih, b_hh),
                      at::Tensor(), at::Tensor())[0];
}

std::tuple<at::Tensor, at::Tensor> rnn_cell_backward_cpu(const at::Tensor& grad_hy, const at::Tensor& hy, bool relu,
                                                         bool has_bias) {
  kCheck.supported_dtype(hy, "hy");
  TORCH_CHECK(hy.dim() == 2, "seqkern rnn_cell (CPU): hy must be (B, hidden), got ", hy.sizes());
  kCheck.tensor(grad_hy, hy, hy.sizes(), "grad_hy");
  // The gradient stays in the accumulation dtype until the bias gradient has summed it.
  const at::Tensor d_pre = cell_backward(ElmanCell{relu}, {grad_hy.contiguous()}, at::Tensor(), {}, {hy.contiguous()}).d_gates_x;
  const auto dtype = hy.scalar_type();
  return {d_pre.to(dtype), has_bias ? d_pre.sum(0).to(dtype) : at::empty({0}, hy.options())};
}

}  // namespace
}  // namespace seqkern::cpu

TORCH_LIBRARY_IMPL(seqkern, CPU, m) {
  m.impl("rnn_forward", &seqkern::cpu::rnn_forward_cpu);
  m.impl("rnn_backward", &seqkern::cpu::rnn_backward_cpu);
  m.impl("rnn_cell_forward", &seqkern::cpu::rnn_cell_forward_cpu);
  m.impl("rnn_cell_backward", &seqkern::cpu::rnn_cell_backward_cpu);
}
