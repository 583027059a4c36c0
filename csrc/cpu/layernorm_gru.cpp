// The LayerNorm GRU on CPU (issue 16; definition in seqkern/reference/layernorm_gru.py, contract in
// seqkern/ops/_schemas.py): one layer, one direction, whole sequence, on the row-split loop of
// layernorm_recurrence.h with LnGruCell plugged in.
//
//   gx = LN(x W_ih^T; ln_ih) + b_ih,   gh = LN(h W_hh^T; ln_hh) + b_hh
//   r = sigmoid(gx_r + gh_r),  z = sigmoid(gx_z + gh_z),  n = tanh(gx_n + r gh_n),  h' = (1 - z) n + z h
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/layernorm_recurrence.h"

namespace seqkern::cpu::layernorm {
namespace {

constexpr ArgChecker kCheck{"layernorm_gru"};

/// The GRU's pointwise step after the two LayerNorms. Workspace row (10H + 2):
///   [0, 3H) r, z, n | [3H, 4H) gh_n | [4H, 7H) normalized x side | [7H, 10H) normalized h side |
///   10H + {0, 1}: rstd of x, h.
template <typename A>
struct LnGruCell {
  static constexpr int kGates = 3, kStates = 1, kExtra = 0;
  static constexpr bool kSamePost = false;  // d(gx_n) = d_n, d(gh_n) = d_n r
  static constexpr int64_t workspace_width(int64_t H) { return 10 * H + 2; }
  static constexpr int64_t xhat(int64_t H) { return 4 * H; }
  static constexpr int64_t hhat(int64_t H) { return 7 * H; }
  static constexpr int64_t state_record(int64_t) { return -1; }
  static constexpr int64_t rstd(int64_t H) { return 10 * H; }

  LnGruCell(const std::vector<at::Tensor>&, A) {}

  void forward(int64_t H, const A* gx, const A* gh, const A* const* prev, A* const* next, A* ws) const {
    chunks<A>(H, [&](int64_t u, int n) {
      const Simd<A> r = sigmoid_simd<A>(load<A>(gx + u, n) + load<A>(gh + u, n));
      const Simd<A> z = sigmoid_simd<A>(load<A>(gx + H + u, n) + load<A>(gh + H + u, n));
      const Simd<A> gh_n = load<A>(gh + 2 * H + u, n);
      const Simd<A> cand = tanh_accurate(fmadd(r, gh_n, load<A>(gx + 2 * H + u, n)));
      store(ws + u, r, n);
      store(ws + H + u, z, n);
      store(ws + 2 * H + u, cand, n);
      store(ws + 3 * H + u, gh_n, n);
      store(next[0] + u, fmadd(z, load<A>(prev[0] + u, n) - cand, cand), n);
    });
  }

  void backward(int64_t H, const A* const* d_new, const A* const* prev, const A* ws, A* post_x, A* post_h,
                A* const* direct, A*) const {
    const A one = 1;
    chunks<A>(H, [&](int64_t u, int n) {
      const Simd<A> r = load<A>(ws + u, n), z = load<A>(ws + H + u, n), cand = load<A>(ws + 2 * H + u, n),
                    gh_n = load<A>(ws + 3 * H + u, n), d_h = load<A>(d_new[0] + u, n);
      const Simd<A> d_n = d_h * (one - z) * (one - cand * cand);
      const Simd<A> d_z = d_h * (load<A>(prev[0] + u, n) - cand) * z * (one - z);
      const Simd<A> d_r = d_n * gh_n * r * (one - r);
      store(post_x + u, d_r, n);
      store(post_x + H + u, d_z, n);
      store(post_x + 2 * H + u, d_n, n);
      store(post_h + u, d_r, n);
      store(post_h + H + u, d_z, n);
      store(post_h + 2 * H + u, d_n * r, n);
      store(direct[0] + u, d_h * z, n);
    });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_gru_forward_cpu(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh, const at::Tensor& ln_ih_weight,
    const at::Tensor& ln_ih_bias, const at::Tensor& ln_hh_weight, const at::Tensor& ln_hh_bias, double eps,
    const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& resets, double zoneout,
    const std::optional<at::Tensor>& zoneout_seed, bool reverse, bool save_workspace) {
  const int64_t H = check_layer(kCheck, 3, input, w_ih, w_hh, {{&h0, "h0"}},
                                {{&ln_ih_weight, "ln_ih_weight"}, {&ln_ih_bias, "ln_ih_bias"},
                                 {&ln_hh_weight, "ln_hh_weight"}, {&ln_hh_bias, "ln_hh_bias"}});
  kCheck.biases(b_ih, b_hh, 3 * H, input);
  std::vector<at::Tensor> keep;
  const Options opt = make_options(kCheck, input.size(0), input.size(1), lengths, resets, zoneout, zoneout_seed,
                                   reverse, keep);
  const LayerWeights lw{acc_copy(w_hh), acc_copy(ln_ih_weight), acc_copy(ln_ih_bias), acc_copy(ln_hh_weight),
                        acc_copy(ln_hh_bias), acc_copy(b_ih), acc_copy(b_hh)};
  const auto [output, finals, workspace] =
      layer_forward<LnGruCell>({}, eps, input.contiguous(), {h0}, w_ih, lw, opt, save_workspace);
  return {output, finals[0], workspace};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
layernorm_gru_backward_cpu(const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& input,
                           const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                           const at::Tensor& ln_ih_weight, const at::Tensor& ln_hh_weight, const at::Tensor& output,
                           const at::Tensor& workspace, const std::optional<at::Tensor>& lengths,
                           const std::optional<at::Tensor>& resets, double zoneout,
                           const std::optional<at::Tensor>& zoneout_seed, bool reverse) {
  const int64_t H = check_layer(kCheck, 3, input, w_ih, w_hh, {{&h0, "h0"}, {&grad_h_n, "grad_h_n"}},
                                {{&ln_ih_weight, "ln_ih_weight"}, {&ln_hh_weight, "ln_hh_weight"}});
  const int64_t T = input.size(0), B = input.size(1);
  kCheck.tensor(grad_output, input, {T, B, H}, "grad_output");
  kCheck.tensor(output, input, {T, B, H}, "output");
  kCheck.shape(workspace, {T, B, LnGruCell<float>::workspace_width(H)}, "workspace (from the forward with save_workspace)");
  TORCH_CHECK(workspace.scalar_type() == at::toOpMathType(input.scalar_type()) && workspace.device().is_cpu(),
              "seqkern layernorm_gru (CPU): workspace must be a CPU tensor of the accumulation dtype");
  std::vector<at::Tensor> keep;
  const Options opt = make_options(kCheck, T, B, lengths, resets, zoneout, zoneout_seed, reverse, keep);
  const LayerWeights lw{acc_copy(w_hh), acc_copy(ln_ih_weight), {}, acc_copy(ln_hh_weight), {}, {}, {}};
  const LayerGradients g =
      layer_backward<LnGruCell>({}, grad_output, {grad_h_n}, input, {h0}, w_ih, lw, output, workspace, opt);
  const auto dtype = input.scalar_type();
  const at::Tensor ws = workspace.contiguous();
  using C = LnGruCell<float>;
  return {g.input.to(dtype),
          g.initial[0].to(dtype),
          g.w_ih.to(dtype),
          g.w_hh.to(dtype),
          g.d_post_x.sum(0).to(dtype),
          g.d_post_h.sum(0).to(dtype),
          weighted_column_sum(g.d_post_x, ws, C::xhat(H)).to(dtype),
          weighted_column_sum(g.d_post_h, ws, C::hhat(H)).to(dtype)};
}

}  // namespace
}  // namespace seqkern::cpu::layernorm

TORCH_LIBRARY_IMPL(seqkern, CPU, m) {
  m.impl("layernorm_gru_forward", &seqkern::cpu::layernorm::layernorm_gru_forward_cpu);
  m.impl("layernorm_gru_backward", &seqkern::cpu::layernorm::layernorm_gru_backward_cpu);
}
