// The LayerNorm LSTM on CPU (issue 16; definition in seqkern/reference/layernorm_lstm.py, contract in
// seqkern/ops/_schemas.py): one layer, one direction, whole sequence, on the row-split loop of
// layernorm_recurrence.h with LnLstmCell plugged in.
//
//   gates = LN(x W_ih^T; ln_ih) + LN(h W_hh^T; ln_hh) + b_ih + b_hh   (b_ih + b_hh folded into the x side)
//   c' = sigmoid(f) c + sigmoid(i) tanh(g),   h' = sigmoid(o) tanh(LN(c'; ln_cell))
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/layernorm_recurrence.h"

namespace seqkern::cpu::layernorm {
namespace {

constexpr ArgChecker kCheck{"layernorm_lstm"};

/// The LSTM's pointwise step after the two LayerNorms, and LN(c'). Workspace row (14H + 3):
///   [0, 4H) activated gates i, f, g, o | [4H, 8H) normalized x side | [8H, 12H) normalized h side |
///   [12H, 13H) normalized c' | [13H, 14H) c after the step (and zoneout) | 14H + {0, 1, 2}: rstd of x, h, c'.
template <typename A>
struct LnLstmCell {
  static constexpr int kGates = 4, kStates = 2, kExtra = 1;
  static constexpr bool kSamePost = true;
  static constexpr int64_t workspace_width(int64_t H) { return 14 * H + 3; }
  static constexpr int64_t xhat(int64_t H) { return 4 * H; }
  static constexpr int64_t hhat(int64_t H) { return 8 * H; }
  static constexpr int64_t chat(int64_t H) { return 12 * H; }
  static constexpr int64_t state_record(int64_t H) { return 13 * H; }
  static constexpr int64_t rstd(int64_t H) { return 14 * H; }

  const A *ln_w, *ln_b;  // ln_cell (H,)
  A eps;

  LnLstmCell(const std::vector<at::Tensor>& params, A eps_)
      : ln_w(params[0].data_ptr<A>()), ln_b(params[1].data_ptr<A>()), eps(eps_) {}

  void forward(int64_t H, const A* gx, const A* gh, const A* const* prev, A* const* next, A* ws) const {
    chunks<A>(H, [&](int64_t u, int n) {
      auto pre = [&](int gate) { return load<A>(gx + gate * H + u, n) + load<A>(gh + gate * H + u, n); };
      const Simd<A> i = sigmoid_simd<A>(pre(0)), f = sigmoid_simd<A>(pre(1)), g = tanh_accurate(pre(2)),
                    o = sigmoid_simd<A>(pre(3));
      store(ws + u, i, n);
      store(ws + H + u, f, n);
      store(ws + 2 * H + u, g, n);
      store(ws + 3 * H + u, o, n);
      store(next[1] + u, fmadd(f, load<A>(prev[1] + u, n), i * g), n);
    });
    // LN(c') into next[0] for now; h' = o tanh(LN(c')) in place.
    ws[rstd(H) + 2] = layer_norm_row<A>(next[1], H, eps, ln_w, ln_b, nullptr, next[0], ws + chat(H));
    chunks<A>(H, [&](int64_t u, int n) {
      store(next[0] + u, load<A>(ws + 3 * H + u, n) * tanh_accurate(load<A>(next[0] + u, n)), n);
    });
  }

  /// d_new: gradients of h', c' (before zoneout); post: of the pre-activations (both normalized sides);
  /// direct: of h (none: h reaches h' only through W_hh) and c; extra: of LN(c') (for ln_cell's gradients).
  void backward(int64_t H, const A* const* d_new, const A* const* prev, const A* ws, A* post, A* /*post_h*/,
                A* const* direct, A* extra) const {
    const A one = 1;
    chunks<A>(H, [&](int64_t u, int n) {
      const Simd<A> o = load<A>(ws + 3 * H + u, n), d_h = load<A>(d_new[0] + u, n);
      const Simd<A> tn = tanh_accurate(fmadd(load<A>(ws + chat(H) + u, n), load<A>(ln_w + u, n), load<A>(ln_b + u, n)));
      store(post + 3 * H + u, d_h * tn * o * (one - o), n);
      store(extra + u, d_h * o * (one - tn * tn), n);
    });
    layer_norm_row_backward<A>(extra, ws + chat(H), ws[rstd(H) + 2], ln_w, H, direct[1]);
    chunks<A>(H, [&](int64_t u, int n) {
      const Simd<A> i = load<A>(ws + u, n), f = load<A>(ws + H + u, n), g = load<A>(ws + 2 * H + u, n);
      const Simd<A> d_c = load<A>(direct[1] + u, n) + load<A>(d_new[1] + u, n);
      store(post + u, d_c * g * i * (one - i), n);
      store(post + H + u, d_c * load<A>(prev[1] + u, n) * f * (one - f), n);
      store(post + 2 * H + u, d_c * i * (one - g * g), n);
      store(direct[1] + u, d_c * f, n);
      store(direct[0] + u, Simd<A>{}, n);
    });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layernorm_lstm_forward_cpu(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh, const at::Tensor& ln_ih_weight,
    const at::Tensor& ln_ih_bias, const at::Tensor& ln_hh_weight, const at::Tensor& ln_hh_bias,
    const at::Tensor& ln_cell_weight, const at::Tensor& ln_cell_bias, double eps,
    const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& resets, double zoneout,
    const std::optional<at::Tensor>& zoneout_seed, bool reverse, bool save_workspace) {
  const int64_t H = check_layer(kCheck, 4, input, w_ih, w_hh, {{&h0, "h0"}, {&c0, "c0"}},
                                {{&ln_ih_weight, "ln_ih_weight"}, {&ln_ih_bias, "ln_ih_bias"},
                                 {&ln_hh_weight, "ln_hh_weight"}, {&ln_hh_bias, "ln_hh_bias"}},
                                {{&ln_cell_weight, "ln_cell_weight"}, {&ln_cell_bias, "ln_cell_bias"}});
  kCheck.biases(b_ih, b_hh, 4 * H, input);
  std::vector<at::Tensor> keep;
  const Options opt = make_options(kCheck, input.size(0), input.size(1), lengths, resets, zoneout, zoneout_seed,
                                   reverse, keep);
  LayerWeights lw{acc_copy(w_hh), acc_copy(ln_ih_weight), acc_copy(ln_ih_bias), acc_copy(ln_hh_weight),
                  acc_copy(ln_hh_bias), {}, {}};
  if (b_ih.has_value()) lw.bias_x = at::add(acc_copy(b_ih), acc_copy(b_hh));  // a new tensor: never b_ih itself
  const auto [output, finals, workspace] = layer_forward<LnLstmCell>(
      {acc_copy(ln_cell_weight), acc_copy(ln_cell_bias)}, eps, input.contiguous(), {h0, c0}, w_ih, lw, opt,
      save_workspace);
  return {output, finals[0], finals[1], workspace};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
layernorm_lstm_backward_cpu(const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                            const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                            const at::Tensor& w_hh, const at::Tensor& ln_ih_weight, const at::Tensor& ln_hh_weight,
                            const at::Tensor& ln_cell_weight, const at::Tensor& ln_cell_bias, const at::Tensor& output,
                            const at::Tensor& workspace, const std::optional<at::Tensor>& lengths,
                            const std::optional<at::Tensor>& resets, double zoneout,
                            const std::optional<at::Tensor>& zoneout_seed, bool reverse) {
  const int64_t H = check_layer(kCheck, 4, input, w_ih, w_hh,
                                {{&h0, "h0"}, {&c0, "c0"}, {&grad_h_n, "grad_h_n"}, {&grad_c_n, "grad_c_n"}},
                                {{&ln_ih_weight, "ln_ih_weight"}, {&ln_hh_weight, "ln_hh_weight"}},
                                {{&ln_cell_weight, "ln_cell_weight"}, {&ln_cell_bias, "ln_cell_bias"}});
  const int64_t T = input.size(0), B = input.size(1);
  kCheck.tensor(grad_output, input, {T, B, H}, "grad_output");
  kCheck.tensor(output, input, {T, B, H}, "output");
  kCheck.shape(workspace, {T, B, LnLstmCell<float>::workspace_width(H)}, "workspace (from the forward with save_workspace)");
  TORCH_CHECK(workspace.scalar_type() == at::toOpMathType(input.scalar_type()) && workspace.device().is_cpu(),
              "seqkern layernorm_lstm (CPU): workspace must be a CPU tensor of the accumulation dtype");
  std::vector<at::Tensor> keep;
  const Options opt = make_options(kCheck, T, B, lengths, resets, zoneout, zoneout_seed, reverse, keep);
  const LayerWeights lw{acc_copy(w_hh), acc_copy(ln_ih_weight), {}, acc_copy(ln_hh_weight), {}, {}, {}};
  const LayerGradients g = layer_backward<LnLstmCell>({acc_copy(ln_cell_weight), acc_copy(ln_cell_bias)}, grad_output,
                                                      {grad_h_n, grad_c_n}, input, {h0, c0}, w_ih, lw, output,
                                                      workspace, opt);
  const auto dtype = input.scalar_type();
  const at::Tensor ws = workspace.contiguous();
  using C = LnLstmCell<float>;
  return {g.input.to(dtype),
          g.initial[0].to(dtype),
          g.initial[1].to(dtype),
          g.w_ih.to(dtype),
          g.w_hh.to(dtype),
          g.d_post_x.sum(0).to(dtype),
          weighted_column_sum(g.d_post_x, ws, C::xhat(H)).to(dtype),
          weighted_column_sum(g.d_post_x, ws, C::hhat(H)).to(dtype),
          weighted_column_sum(g.extra, ws, C::chat(H)).to(dtype),
          g.extra.sum(0).to(dtype)};
}

}  // namespace
}  // namespace seqkern::cpu::layernorm

TORCH_LIBRARY_IMPL(seqkern, CPU, m) {
  m.impl("layernorm_lstm_forward", &seqkern::cpu::layernorm::layernorm_lstm_forward_cpu);
  m.impl("layernorm_lstm_backward", &seqkern::cpu::layernorm::layernorm_lstm_backward_cpu);
}
