// The GRU on CPU (PyTorch's reset-after form, gate order r, z, n): a whole layer over a whole sequence
// (gru_forward / gru_backward) and the fused pointwise cell step (gru_cell_forward / gru_cell_backward).
// Contracts in csrc/ops.cpp; oracle in seqkern/reference/gru.py.
//
//   r = sigmoid(x_r + h_r),  z = sigmoid(x_z + h_z),  n = tanh(x_n + r * hn),  h' = (1 - z) n + z h
// with x_* = x W_i*^T + b_i*, h_r/h_z = h W_h*^T + b_h*, hn = h W_hn^T + b_hn. b_hr and b_hz are folded into
// the input GEMM; b_hn stays in the cell (it is scaled by r).
//
// Everything but the cell's pointwise math is the shared layer engine of recurrence_layer.h: the input
// projection for all steps, the persistent time loop (a thread owns hidden units j and all
// three W_hh rows r_j, z_j, n_j, so its update is thread-local: one barrier per step), the backward loop
// and the weight gradients as GEMMs over all T*B rows.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/recurrence_layer.h"

namespace seqkern::cpu {
namespace {

constexpr ArgChecker kCheck{"gru"};

/// The GRU's pointwise math on SIMD chunks of units, plugged into the layer engine (see "Cell interface").
struct GruCell {
  static constexpr int kGates = 3;               // r, z, n
  static constexpr int kWorkspaceBlocks = 4;     // r, z, n, hn: ops.cpp's workspace layout
  static constexpr bool kSameGateGrads = false;  // d(x_n) = d_n, d(hn) = d_n * r
  static constexpr bool kDirectPath = true;      // z * h_{t-1}
  static constexpr int kStates = 1;              // h
  static constexpr bool kProjectable = false;
  bool bf16_state_ok() const { return true; }

  template <typename A>
  struct Grad {
    Simd<A> d_r, d_z, d_n, d_hn;  // gradients of the pre-activations; d_hn that of hn = h W_hn^T + b_hn
    States<A, 1> d_prev;          // of h_{t-1} through z * h_{t-1} only
  };

  template <typename A, typename In, typename Ws>
  SEQKERN_SIMD_INLINE States<A, 1> forward(const StepIn<A, In, Ws>& in, const States<A, 1>& prev) const {
    const int n = in.n;
    Simd<A> x_r = load<A>(in.gates_x, n), x_z = load<A>(in.gates_x + in.x_stride, n),
            x_n = load<A>(in.gates_x + 2 * in.x_stride, n);
    if (in.bias_x) {
      x_r += load<A>(in.bias_x, n);
      x_z += load<A>(in.bias_x + in.stride, n);
      x_n += load<A>(in.bias_x + 2 * in.stride, n);
    }
    Simd<A> hn = load<A>(in.gates_h + 2 * in.h_stride, n);
    if (in.recurrent_bias) hn += load<A>(in.recurrent_bias, n);
    using F = CellActivations<Ws>;
    const Simd<A> r = F::template sigmoid<A>(x_r + load<A>(in.gates_h, n));
    const Simd<A> z = F::template sigmoid<A>(x_z + load<A>(in.gates_h + in.h_stride, n));
    const Simd<A> cand = F::template tanh<A>(fmadd(r, hn, x_n));
    if (in.workspace) {
      store(in.workspace, r, n);
      store(in.workspace + in.stride, z, n);
      store(in.workspace + 2 * in.stride, cand, n);
      store(in.workspace + 3 * in.stride, hn, n);
    }
    return {fmadd(z, prev[0] - cand, cand)};  // (1 - z) n + z h
  }

  template <typename A, typename S>
  SEQKERN_SIMD_INLINE Grad<A> grad(const GradIn<S, 1>& in, const States<A, 1>& d) const {
    const int n = in.n;
    const A one = 1;
    const Simd<A> d_h = d[0];
    const Simd<A> r = load<A>(in.workspace, n), z = load<A>(in.workspace + in.stride, n),
                  cand = load<A>(in.workspace + 2 * in.stride, n), hn = load<A>(in.workspace + 3 * in.stride, n);
    const Simd<A> d_n = d_h * (one - z) * (one - cand * cand);
    const Simd<A> d_z = d_h * (load<A>(in.prev[0], n) - cand) * z * (one - z);
    return {d_n * hn * r * (one - r), d_z, d_n, d_n * r, {d_h * z}};
  }

  /// Rows [d_r | d_z | d_n] of the gradient of x W_ih^T and [d_r | d_z | d_hn] of that of h W_hh^T, two
  /// contiguous buffers: the weight-gradient GEMMs then read neither a strided view nor an at::cat copy.
  template <typename A>
  SEQKERN_SIMD_INLINE static void store_grad(A* d_x, A* d_h, int64_t hidden, const Grad<A>& g, int n) {
    store(d_x, g.d_r, n);
    store(d_x + hidden, g.d_z, n);
    store(d_x + 2 * hidden, g.d_n, n);
    store(d_h, g.d_r, n);
    store(d_h + hidden, g.d_z, n);
    store(d_h + 2 * hidden, g.d_hn, n);
  }
};

/// b_ih + [b_hr, b_hz, 0] (added to x W_ih^T) and b_hn (added to h W_hn^T inside the cell), in the
/// accumulation dtype; both undefined without biases.
std::tuple<at::Tensor, at::Tensor> split_biases(const std::optional<at::Tensor>& b_ih,
                                                const std::optional<at::Tensor>& b_hh, int64_t hidden) {
  if (!b_ih.has_value()) return {};
  const auto dtype = b_ih->scalar_type();
  return {cell_bias(3 * hidden, dtype, {{*b_ih, 0, 3 * hidden, 0}, {*b_hh, 0, 2 * hidden, 0}}),
          cell_bias(hidden, dtype, {{*b_hh, 2 * hidden, hidden, 0}})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_forward_cpu(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& batch_sizes, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& resets, double zoneout, const std::optional<at::Tensor>& zoneout_seed,
    bool reverse, bool save_workspace) {
  const LayerShape d = check_layer_args(kCheck, GruCell::kGates, input, h0, w_ih, w_hh);
  kCheck.biases(b_ih, b_hh, GruCell::kGates * d.hidden, input);
  std::vector<at::Tensor> keep;
  const Schedule sched = layer_schedule(kCheck, d, batch_sizes, lengths, resets, zoneout, zoneout_seed, reverse, keep);
  at::Tensor workspace = save_workspace ? pooled_empty({d.seq_len, d.batch, GruCell::kWorkspaceBlocks * d.hidden}, input.options())
                                        : at::empty({0}, input.options());
  const auto [input_bias, recurrent_bias] = split_biases(b_ih, b_hh, d.hidden);
  const auto out = layer_forward(GruCell{}, d, input, {h0.contiguous()}, {w_ih, w_hh, {}, input_bias, recurrent_bias},
                                 sched, save_workspace, workspace);
  return {out.output, out.last[0], workspace};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& input, const at::Tensor& h0,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& output, const at::Tensor& workspace,
    const std::optional<at::Tensor>& batch_sizes, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& resets, double zoneout, const std::optional<at::Tensor>& zoneout_seed,
    bool reverse, bool has_bias) {
  const LayerShape d = check_layer_args(kCheck, GruCell::kGates, input, h0, w_ih, w_hh);
  const int64_t T = d.seq_len, B = d.batch, H = d.hidden;
  kCheck.tensor(grad_output, input, {T, B, H}, "grad_output");
  kCheck.tensor(grad_h_n, input, {B, H}, "grad_h_n");
  kCheck.tensor(output, input, {T, B, H}, "output");
  kCheck.tensor(workspace, input, {T, B, GruCell::kWorkspaceBlocks * H},
                "workspace (from gru_forward with save_workspace=True)");
  std::vector<at::Tensor> keep;
  const Schedule sched = layer_schedule(kCheck, d, batch_sizes, lengths, resets, zoneout, zoneout_seed, reverse, keep);
  const LayerGrads g = layer_backward(GruCell{}, d, grad_output, {grad_h_n}, input, {h0}, w_ih, w_hh, at::Tensor(),
                                      output, workspace, {}, sched, has_bias);
  const at::Tensor no_bias = at::empty({0}, input.options());
  return {g.input, g.initial[0], g.w_ih, g.w_hh, has_bias ? g.b_ih : no_bias, has_bias ? g.b_hh : no_bias.clone()};
}

std::tuple<at::Tensor, at::Tensor> gru_cell_forward_cpu(const at::Tensor& gates_x, const at::Tensor& gates_h,
                                                        const at::Tensor& hx, const std::optional<at::Tensor>& b_ih,
                                                        const std::optional<at::Tensor>& b_hh) {
  kCheck.supported_dtype(hx, "hx");
  TORCH_CHECK(hx.dim() == 2, "seqkern gru_cell (CPU): hx must be (B, hidden), got ", hx.sizes());
  const int64_t B = hx.size(0), H = hx.size(1);
  kCheck.tensor(gates_x, hx, {B, 3 * H}, "gates_x");
  kCheck.tensor(gates_h, hx, {B, 3 * H}, "gates_h");
  kCheck.biases(b_ih, b_hh, 3 * H, hx);
  const auto [bias_x, recurrent_bias] = split_biases(b_ih, b_hh, H);
  at::Tensor workspace = at::empty({B, GruCell::kWorkspaceBlocks * H}, hx.options());
  const auto next = cell_forward(GruCell{}, gates_x.contiguous(), gates_h.contiguous(), {hx.contiguous()}, bias_x,
                                 recurrent_bias, workspace);
  return {next[0], workspace};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_cell_backward_cpu(
    const at::Tensor& grad_hy, const at::Tensor& hx, const at::Tensor& workspace, bool has_bias) {
  kCheck.supported_dtype(hx, "hx");
  TORCH_CHECK(hx.dim() == 2, "seqkern gru_cell (CPU): hx must be (B, hidden), got ", hx.sizes());
  const int64_t B = hx.size(0), H = hx.size(1);
  kCheck.tensor(grad_hy, hx, {B, H}, "grad_hy");
  kCheck.tensor(workspace, hx, {B, GruCell::kWorkspaceBlocks * H}, "workspace");
  // The gate gradients stay in the accumulation dtype until the bias gradients have summed them.
  const auto g = cell_backward(GruCell{}, {grad_hy.contiguous()}, workspace.contiguous(), {hx.contiguous()}, {});
  const auto dtype = hx.scalar_type();
  const at::Tensor no_bias = at::empty({0}, hx.options());
  return {g.d_gates_x.to(dtype), g.d_gates_h.to(dtype), g.d_prev[0], has_bias ? g.d_gates_x.sum(0).to(dtype) : no_bias,
          has_bias ? g.d_gates_h.sum(0).to(dtype) : no_bias.clone()};
}

}  // namespace
}  // namespace seqkern::cpu

TORCH_LIBRARY_IMPL(seqkern, CPU, m) {
  m.impl("gru_forward", &seqkern::cpu::gru_forward_cpu);
  m.impl("gru_backward", &seqkern::cpu::gru_backward_cpu);
  m.impl("gru_cell_forward", &seqkern::cpu::gru_cell_forward_cpu);
  m.impl("gru_cell_backward", &seqkern::cpu::gru_cell_backward_cpu);
}
