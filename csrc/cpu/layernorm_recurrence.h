// The row-split persistent loop of the recurrent cells that need whole rows at every step: the LayerNorm
// LSTM and GRU (layernorm_lstm.cpp, layernorm_gru.cpp plug in LnLstmCell and LnGruCell). Their step
// normalizes all G*H gate columns of h W_hh^T (and the LSTM all H units of c'), so a thread that owned a slice
// of units, as in recurrence_layer.h, would need a reduction across threads and two more barriers per step.
// Here a thread owns whole batch rows instead and runs them through all T steps alone: per step a GEMM of its
// rows of h_{t-1} against all of W_hh (packed once, shared read-only, gemm_packed.h's micro-kernel), then
// the fused LayerNorm + cell pointwise update row by row. No barrier at all inside the time loop.
//
// Where it loses: with B below the thread count, threads sit idle (B = 1 runs on one core) and every thread
// streams all of W_hh each step (4H x H: 1 MB at H = 256 fp32, which still fits a core's L2 here). The fix
// for small batches is the unit split of recurrence_layer.h with the row statistics reduced across threads
// (one partial-sum exchange + barrier after the GEMM, one after the cell's c' for the LSTM): worth it only
// when B < threads and H is large enough to amortize the extra barriers.
//
// Options (seqkern/reference/_scan.py defines them; flags of the loop, not copies of it): lengths, resets and
// zoneout as state_flags.h defines them for both loops (its predicate, its zoneout weights, blend and backward).
//
// Workspace: one row of width Cell::workspace_width(H) per (t, b), in the accumulation dtype, holding what the
// backward reads (the cells document their layout); the LayerNorm statistics are stored as 1/sqrt(var + eps).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <optional>
#include <vector>

#include "cpu/aligned_vector.h"
#include "cpu/arg_checks.h"
#include "cpu/gemm_packed.h"
#include "cpu/outer_sum.h"
#include "cpu/simd.h"
#include "cpu/workspace_pool.h"
#include "cpu/state_flags.h"
#include "cpu/team.h"

namespace seqkern::cpu::layernorm {

/// Calls body(u, n) for the SIMD chunks [u, u+n) of [0, units).
template <typename A, typename Body>
inline void chunks(int64_t units, const Body& body) {
  for (int64_t u = 0; u < units; u += kLanes<A>) body(u, static_cast<int>(std::min<int64_t>(kLanes<A>, units - u)));
}

template <typename A>
inline A lane_sum(Simd<A> v) {
  A s = 0;
  for (int l = 0; l < kLanes<A>; ++l) s += v[l];
  return s;
}

/// sum_u a[u] (b ? * b[u]) over n elements.
template <typename A>
inline A row_sum(const A* a, const A* b, int64_t n) {
  Simd<A> acc{};
  chunks<A>(n, [&](int64_t u, int m) { acc += b ? load<A>(a + u, m) * load<A>(b + u, m) : load<A>(a + u, m); });
  return lane_sum<A>(acc);
}

/// y = LN(v) * w + b (+ bias if not null) over n elements, hat = (v - mean) * rstd; returns rstd. Two passes
/// (mean, then the variance about it) as torch's CPU layer_norm. y may alias v; hat may alias neither.
template <typename A>
inline A layer_norm_row(const A* v, int64_t n, A eps, const A* w, const A* b, const A* bias, A* y, A* hat) {
  const A mean = row_sum<A>(v, nullptr, n) / A(n);
  Simd<A> sq{};
  chunks<A>(n, [&](int64_t u, int m) {
    Simd<A> d = load<A>(v + u, m) - mean;
    for (int l = m; l < kLanes<A>; ++l) d[l] = 0;  // the lanes past the row
    sq += d * d;
  });
  const A rstd = A(1) / std::sqrt(lane_sum<A>(sq) / A(n) + eps);
  chunks<A>(n, [&](int64_t u, int m) {
    const Simd<A> h = (load<A>(v + u, m) - mean) * rstd;
    store(hat + u, h, m);
    Simd<A> out = fmadd(h, load<A>(w + u, m), load<A>(b + u, m));
    if (bias) out += load<A>(bias + u, m);
    store(y + u, out, m);
  });
  return rstd;
}

/// The gradient of v in y = LN(v) * w + b from dy: rstd (g - mean(g) - hat mean(g hat)), g = dy w, into dv.
template <typename A>
inline void layer_norm_row_backward(const A* dy, const A* hat, A rstd, const A* w, int64_t n, A* dv) {
  Simd<A> sum_g{}, sum_gh{};
  chunks<A>(n, [&](int64_t u, int m) {
    const Simd<A> g = load<A>(dy + u, m) * load<A>(w + u, m);
    sum_g += g;
    sum_gh += g * load<A>(hat + u, m);
  });
  const A mean_g = lane_sum<A>(sum_g) / A(n), mean_gh = lane_sum<A>(sum_gh) / A(n);
  chunks<A>(n, [&](int64_t u, int m) {
    const Simd<A> g = load<A>(dy + u, m) * load<A>(w + u, m);
    store(dv + u, (g - mean_g - load<A>(hat + u, m) * mean_gh) * rstd, m);
  });
}

/// Checks input (T,B,I), w_ih (G*H, I), w_hh (G*H, H), the states (B,H) and the LayerNorm parameters
/// ((G*H,) or (H,) as named) of a layer op; returns H.
inline int64_t check_layer(const ArgChecker& check, int gates, const at::Tensor& input, const at::Tensor& w_ih,
                           const at::Tensor& w_hh, std::initializer_list<std::pair<const at::Tensor*, const char*>> states,
                           std::initializer_list<std::pair<const at::Tensor*, const char*>> gate_params,
                           std::initializer_list<std::pair<const at::Tensor*, const char*>> unit_params = {}) {
  check.supported_dtype(input, "input");
  TORCH_CHECK(input.dim() == 3, "seqkern ", check.op, " (CPU): input must be (T, B, input_size), got ", input.sizes());
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) % gates == 0, "seqkern ", check.op, " (CPU): w_ih must be (", gates,
              "*hidden, input_size), got ", w_ih.sizes());
  const int64_t B = input.size(1), H = w_ih.size(0) / gates;
  check.tensor(w_ih, input, {gates * H, input.size(2)}, "w_ih");
  check.tensor(w_hh, input, {gates * H, H}, "w_hh");
  for (const auto& [t, name] : states) check.tensor(*t, input, {B, H}, name);
  for (const auto& [t, name] : gate_params) check.tensor(*t, input, {gates * H}, name);
  for (const auto& [t, name] : unit_params) check.tensor(*t, input, {H}, name);
  return H;
}

// ================================================================================================
// Options: lengths, resets, zoneout (state_flags.h, shared with recurrence_layer.h), direction.
// ================================================================================================
struct Options : StateFlags {
  int64_t seq_len = 0;
  bool reverse = false;

  int64_t time(int64_t step) const { return reverse ? seq_len - 1 - step : step; }
  bool active(int64_t t, int64_t b) const { return within_length(t, b); }
  /// Whether the state entering step t of row b is the one the layer recorded at the step before (else the
  /// initial state): the previous processing step was active for b and no reset at t.
  bool continues(int64_t t, int64_t b) const {
    const int64_t prev = previous_time(t);
    return prev >= 0 && prev < seq_len && active(prev, b) && !reset(t, b);
  }
  int64_t previous_time(int64_t t) const { return reverse ? t + 1 : t - 1; }
};

/// The checked options of a layer op (check_state_flags); `keep` holds the contiguous copies alive.
inline Options make_options(const ArgChecker& check, int64_t T, int64_t B, const std::optional<at::Tensor>& lengths,
                            const std::optional<at::Tensor>& resets, double zoneout,
                            const std::optional<at::Tensor>& seed, bool reverse, std::vector<at::Tensor>& keep) {
  Options o;
  static_cast<StateFlags&>(o) = check_state_flags(check, T, B, lengths, resets, zoneout, seed, reverse,
                                                  /*has_batch_sizes=*/false, keep);
  o.seq_len = T;
  o.reverse = reverse;
  return o;
}

// ================================================================================================
// Cell interface. A Cell<A> (A = accumulation dtype) provides
//   kGates, kStates             gate blocks of H; states (LSTM: h, c; GRU: h), state 0 being h, the output;
//   kSamePost                   the gradients of the two normalized sides are equal (LSTM: both are added to
//                               the same pre-activations), so one buffer serves both;
//   kExtra                      H-wide blocks of per-row gradients the cell keeps for its own parameter
//                               gradients (LSTM: d of LN(c'), for ln_cell);
//   workspace_width(H), xhat(H), hhat(H), rstd(H): the workspace row and where the engine puts the normalized
//                               x side, h side and their two 1/sqrt(var + eps) (at rstd, rstd + 1);
//   state_record(H)             where the state k >= 1 after the step is recorded (LSTM: c), or -1;
//   forward(H, gx, gh, prev, next, ws): gx, gh the two sides after LN, affine and bias -> next states;
//   backward(H, d_new, prev, ws, d_post_x, d_post_h, d_direct, extra): from the gradients of the new states,
//                               those of the two normalized sides and the direct paths into the old states.
// ================================================================================================
/// Weights shared by the loops, all in the accumulation dtype and contiguous (undefined: absent).
struct LayerWeights {
  at::Tensor w_hh, ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias, bias_x, bias_h;
};

template <typename A>
inline const A* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<A>() : nullptr;
}

/// W_hh (G*H, H) packed as the right operand of h @ W_hh^T (forward: depth H) or of d @ W_hh (backward: depth G*H).
template <typename A>
struct PackedRecurrentWeight {
  PackedPanels<A> panels;
  at::Tensor storage;

  PackedRecurrentWeight(const at::Tensor& w_hh, bool transposed_for_backward) {
    const int64_t rows = w_hh.size(0), cols = w_hh.size(1);
    const A* w = w_hh.data_ptr<A>();
    panels.depth = transposed_for_backward ? rows : cols;
    panels.width = PackedPanels<A>::padded_width(transposed_for_backward ? cols : rows);
    storage = at::empty({std::max<int64_t>(1, panels.depth * panels.width)}, w_hh.options());
    panels.data = storage.data_ptr<A>();
    if (transposed_for_backward) {
      panels.pack([&](int64_t j) { return std::pair<const A*, int64_t>{j < cols ? w + j : nullptr, cols}; });
    } else {
      panels.pack([&](int64_t j) { return std::pair<const A*, int64_t>{j < rows ? w + j * cols : nullptr, 1}; });
    }
  }
};

/// Threads for a loop of `macs_per_step` multiply-adds per step over B rows: each thread at least one row
/// and ~32K multiply-adds per step (below that the team's start-up costs more than it saves).
inline int row_threads(int64_t macs_per_step, int64_t batch) {
  return persistent_thread_count(macs_per_step, 32 * 1024, batch);
}

/// The row ranges of the team, one per thread.
inline std::vector<Range> row_slices(int64_t batch, int threads) { return split_range(batch, threads, 1); }

// ================================================================================================
// Forward.
// ================================================================================================
/// gx (T*B, G*H) in place: x W_ih^T -> LN(x W_ih^T) ln_ih_weight + ln_ih_bias + bias_x, the normalized values
/// and their rstd into the workspace rows if ws is not null. Rows in parallel (no recurrence on this side).
template <typename Cell, typename A>
void normalize_input_side(A* gx, int64_t rows, int64_t H, A eps, const LayerWeights& lw, A* ws) {
  const int64_t GH = Cell::kGates * H, W = Cell::workspace_width(H);
  const A *w = lw.ln_ih_weight.data_ptr<A>(), *b = lw.ln_ih_bias.data_ptr<A>(), *bias = ptr_or_null<A>(lw.bias_x);
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / GH), [&](int64_t r0, int64_t r1) {
    AlignedVector<A> hat(ws ? 0 : GH);
    for (int64_t r = r0; r < r1; ++r) {
      A* row_ws = ws ? ws + r * W : nullptr;
      const A rstd = layer_norm_row<A>(gx + r * GH, GH, eps, w, b, bias, gx + r * GH,
                                       row_ws ? row_ws + Cell::xhat(H) : hat.data());
      if (row_ws) row_ws[Cell::rstd(H)] = rstd;
    }
  });
}

template <typename Cell, typename S>
struct ForwardLoop {
  using A = Acc<S>;
  static constexpr int G = Cell::kGates, K = Cell::kStates;
  const Cell& cell;
  const Options& opt;
  int64_t H;
  A eps;
  const A* gx;                  // (T*B, G*H) x side, finished
  const LayerWeights& lw;
  const PackedPanels<A>& w_hh;  // depth H
  A* state[K];                  // (B, H) each: the current states; initial on entry, final on exit
  const A* initial[K];          // (B, H) each
  S* output;                    // (T, B, H)
  A* ws;                        // (T*B, W) or null

  void run(int threads) {
    const std::vector<Range> slices = row_slices(opt.batch, threads);
    run_persistent(threads, [&](int first, int stride, SpinBarrier&) {
      for (size_t s = first; s < slices.size(); s += stride) run_rows(slices[s]);
    });
  }

  /// All T steps of rows [rows.begin, rows.end).
  void run_rows(Range rows) const {
    if (rows.size() == 0) return;
    const int64_t B = opt.batch, GH = G * H, W = Cell::workspace_width(H), ldc = w_hh.width;
    AlignedVector<A> gh(rows.size() * ldc), temp_ws(W), next(K * H);
    for (int64_t step = 0; step < opt.seq_len; ++step) {
      const int64_t t = opt.time(step);
      for (int64_t b = rows.begin; b < rows.end; ++b)
        if (opt.reset(t, b))
          for (int k = 0; k < K; ++k) std::copy(initial[k] + b * H, initial[k] + (b + 1) * H, state[k] + b * H);
      gemm_packed(state[0] + rows.begin * H, H, rows.size(), w_hh, gh.data(), ldc);
      for (int64_t b = rows.begin; b < rows.end; ++b) {
        const int64_t row = t * B + b;
        A* row_ws = ws ? ws + row * W : temp_ws.data();
        if (!opt.active(t, b)) {
          fill_zero(output + row * H, H);
          if (ws) fill_zero(row_ws, W);
          continue;
        }
        A* gh_row = gh.data() + (b - rows.begin) * ldc;
        row_ws[Cell::rstd(H) + 1] =
            layer_norm_row<A>(gh_row, GH, eps, lw.ln_hh_weight.data_ptr<A>(), lw.ln_hh_bias.data_ptr<A>(),
                              ptr_or_null<A>(lw.bias_h), gh_row, row_ws + Cell::hhat(H));
        const A* prev[K];
        A* out[K];
        for (int k = 0; k < K; ++k) {
          prev[k] = state[k] + b * H;
          out[k] = next.data() + k * H;
        }
        cell.forward(H, gx + row * GH, gh_row, prev, out, row_ws);
        for (int k = 0; k < K; ++k) {
          A* s = state[k] + b * H;
          if (!opt.zoneout.on()) {
            std::copy(out[k], out[k] + H, s);
          } else {
            chunks<A>(H, [&](int64_t u, int n) {
              const Simd<A> w = opt.zoneout.weight<A>(k, t, b, H, u);
              store(s + u, opt.zoneout.blend(w, load<A>(s + u, n), load<A>(out[k] + u, n)), n);
            });
          }
          if (k > 0 && Cell::state_record(H) >= 0) std::copy(s, s + H, row_ws + Cell::state_record(H));
        }
        store_row(output + row * H, state[0] + b * H, H);
      }
    }
  }

  static void store_row(S* dst, const A* src, int64_t n) {
    chunks<A>(n, [&](int64_t u, int m) { store(dst + u, load<A>(src + u, m), m); });
  }
};

/// The layer forward: input (T,B,I), states0[k] (B,H), w_ih (G*H, I) in the storage dtype; lw in the
/// accumulation dtype -> output (T,B,H), final states (B,H) each, workspace (T,B,W) (empty unless save).
template <template <typename> class CellT>
std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> layer_forward(
    const std::vector<at::Tensor>& cell_params, double eps, const at::Tensor& input,
    const std::vector<at::Tensor>& states0, const at::Tensor& w_ih, const LayerWeights& lw, const Options& opt,
    bool save_workspace) {
  const int64_t T = input.size(0), B = input.size(1), H = states0[0].size(1);
  const auto dtype = input.scalar_type(), acc = at::toOpMathType(dtype);
  constexpr int G = CellT<float>::kGates, K = CellT<float>::kStates;
  // Large tensors from the workspace pool (workspace_pool.h): fresh ~13 MB blocks per call were 13.5% of a
  // training step's samples in page faults and memory-cgroup charging (NOTES, round 5).
  at::Tensor output = pooled_empty({T, B, H}, input.options());
  at::Tensor workspace = save_workspace ? pooled_empty({T, B, CellT<float>::workspace_width(H)}, input.options().dtype(acc))
                                        : at::empty({0}, input.options().dtype(acc));
  std::vector<at::Tensor> state, initial;
  for (const at::Tensor& s : states0) {
    initial.push_back(s.to(acc).contiguous());
    state.push_back(initial.back().clone());
  }
  if (T > 0 && B > 0) {
    at::Tensor gx = pooled_empty({T * B, w_ih.size(0)}, input.options().dtype(acc));
    at::mm_out(gx, input.reshape({T * B, input.size(2)}).to(acc), w_ih.to(acc).t());
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "seqkern_layernorm_forward", [&] {
      using A = Acc<scalar_t>;
      const CellT<A> cell(cell_params, static_cast<A>(eps));
      A* ws = save_workspace ? workspace.data_ptr<A>() : nullptr;
      normalize_input_side<CellT<A>, A>(gx.data_ptr<A>(), T * B, H, static_cast<A>(eps), lw, ws);
      const PackedRecurrentWeight<A> w(lw.w_hh, /*transposed_for_backward=*/false);
      ForwardLoop<CellT<A>, scalar_t> loop{cell, opt, H, static_cast<A>(eps), gx.data_ptr<A>(), lw, w.panels,
                                          {}, {}, output.data_ptr<scalar_t>(), ws};
      for (int k = 0; k < K; ++k) {
        loop.state[k] = state[k].data_ptr<A>();
        loop.initial[k] = initial[k].data_ptr<A>();
      }
      loop.run(row_threads(B * G * H * H, B));
    });
  }
  for (at::Tensor& s : state) s = s.to(dtype);
  return {output, state, workspace};
}

// ================================================================================================
// Backward.
// ================================================================================================
template <typename Cell, typename S>
struct BackwardLoop {
  using A = Acc<S>;
  static constexpr int G = Cell::kGates, K = Cell::kStates;
  const Cell& cell;
  const Options& opt;
  int64_t H;
  const LayerWeights& lw;
  const PackedPanels<A>& w_hh;  // depth G*H (d @ W_hh)
  const S* grad_output;         // (T, B, H)
  const S* output;              // (T, B, H)
  const A* ws;                  // (T*B, W)
  const A* initial[K];          // (B, H)
  A* d_state[K];                // (B, H): seeded with the final states' gradients
  A* d_initial[K];              // (B, H) out
  A* d_post_x;                  // (T*B, G*H) out, gradient of the normalized x side (zero on inactive rows)
  A* d_post_h;                  // (T*B, G*H) out (== d_post_x if kSamePost)
  A* d_gx;                      // (T*B, G*H) out, gradient of x W_ih^T
  A* d_gh;                      // (T*B, G*H) out, gradient of h W_hh^T
  A* extra;                     // (T*B, kExtra*H) out
  A* h_prev;                    // (T*B, H) out: the h each step read (zero on inactive rows)

  void run(int threads) {
    const std::vector<Range> slices = row_slices(opt.batch, threads);
    run_persistent(threads, [&](int first, int stride, SpinBarrier&) {
      for (size_t s = first; s < slices.size(); s += stride) run_rows(slices[s]);
    });
  }

  void run_rows(Range rows) const {
    if (rows.size() == 0) return;
    const int64_t B = opt.batch, GH = G * H, W = Cell::workspace_width(H), ldc = w_hh.width;
    const int64_t E = Cell::kExtra * H;
    AlignedVector<A> rec(rows.size() * ldc), d_new(K * H), d_direct(K * H), prev_buf(K * H);
    for (int64_t step = 0; step < opt.seq_len; ++step) {
      const int64_t t = opt.time(opt.seq_len - 1 - step);
      for (int64_t b = rows.begin; b < rows.end; ++b) {
        const int64_t row = t * B + b;
        if (!opt.active(t, b)) {
          fill_zero(d_post_x + row * GH, GH);
          if (!Cell::kSamePost) fill_zero(d_post_h + row * GH, GH);
          fill_zero(d_gx + row * GH, GH);
          fill_zero(d_gh + row * GH, GH);
          if (E) fill_zero(extra + row * E, E);
          fill_zero(h_prev + row * H, H);
          continue;
        }
        step_row(t, b, d_new.data(), d_direct.data(), prev_buf.data());
      }
      gemm_packed(d_gh + (t * B + rows.begin) * GH, GH, rows.size(), w_hh, rec.data(), ldc);
      for (int64_t b = rows.begin; b < rows.end; ++b) {
        if (opt.active(t, b)) {
          A* d = d_state[0] + b * H;
          const A* r = rec.data() + (b - rows.begin) * ldc;
          chunks<A>(H, [&](int64_t u, int n) { store(d + u, load<A>(d + u, n) + load<A>(r + u, n), n); });
        }
        if (opt.reset(t, b))  // the state entering t was the initial one: its gradient goes there
          for (int k = 0; k < K; ++k) {
            A *d = d_state[k] + b * H, *d0 = d_initial[k] + b * H;
            for (int64_t u = 0; u < H; ++u) d0[u] += d[u];
            fill_zero(d, H);
          }
      }
    }
  }

  /// One active row at time t: d_state (the gradients of the states after step t) -> the gradients of the
  /// states before it, but for the recurrent GEMM's part, plus every per-row gradient buffer.
  void step_row(int64_t t, int64_t b, A* d_new, A* d_direct, A* prev_buf) const {
    const int64_t B = opt.batch, GH = G * H, W = Cell::workspace_width(H), row = t * B + b;
    const A* row_ws = ws + row * W;
    const bool continues = opt.continues(t, b);
    const int64_t prev_row = continues ? opt.previous_time(t) * B + b : -1;
    // The states this step read: recorded ones (h: the output, c: the workspace's record), or the initial.
    const A* prev[K];
    for (int k = 0; k < K; ++k) {
      A* p = prev_buf + k * H;
      if (!continues) {
        std::copy(initial[k] + b * H, initial[k] + (b + 1) * H, p);
      } else if (k == 0) {
        chunks<A>(H, [&](int64_t u, int n) { store(p + u, load<A>(output + prev_row * H + u, n), n); });
      } else {
        const A* rec_state = ws + prev_row * W + Cell::state_record(H);
        std::copy(rec_state, rec_state + H, p);
      }
      prev[k] = p;
    }
    std::copy(prev[0], prev[0] + H, h_prev + row * H);
    const S* go = grad_output + row * H;
    A* dn[K];
    for (int k = 0; k < K; ++k) {
      A* d = d_state[k] + b * H;
      if (k == 0) chunks<A>(H, [&](int64_t u, int n) { store(d + u, load<A>(d + u, n) + load<A>(go + u, n), n); });
      dn[k] = d_new + k * H;
      if (!opt.zoneout.on()) {
        std::copy(d, d + H, dn[k]);
        fill_zero(d, H);
      } else {
        chunks<A>(H, [&](int64_t u, int n) {
          const Simd<A> w = opt.zoneout.weight<A>(k, t, b, H, u);
          const auto [to_new, to_previous] = opt.zoneout.split(w, load<A>(d + u, n));
          store(dn[k] + u, to_new, n);
          store(d + u, to_previous, n);
        });
      }
    }
    A* direct[K];
    for (int k = 0; k < K; ++k) direct[k] = d_direct + k * H;
    A* px = d_post_x + row * GH;
    A* ph = Cell::kSamePost ? px : d_post_h + row * GH;
    cell.backward(H, const_cast<const A* const*>(dn), prev, row_ws, px, ph, direct,
                  Cell::kExtra ? extra + row * Cell::kExtra * H : nullptr);
    for (int k = 0; k < K; ++k) {
      A* d = d_state[k] + b * H;
      chunks<A>(H, [&](int64_t u, int n) { store(d + u, load<A>(d + u, n) + load<A>(direct[k] + u, n), n); });
    }
    layer_norm_row_backward<A>(px, row_ws + Cell::xhat(H), row_ws[Cell::rstd(H)], lw.ln_ih_weight.data_ptr<A>(), GH,
                               d_gx + row * GH);
    layer_norm_row_backward<A>(ph, row_ws + Cell::hhat(H), row_ws[Cell::rstd(H) + 1], lw.ln_hh_weight.data_ptr<A>(),
                               GH, d_gh + row * GH);
  }
};

/// Gradients of one layer in the accumulation dtype (the op casts), per-row buffers for the parameter sums.
struct LayerGradients {
  at::Tensor input, w_ih, w_hh;
  std::vector<at::Tensor> initial;  // per state
  at::Tensor d_post_x, d_post_h, extra;  // (T*B, .) for the LayerNorm and bias gradients
};

// Weight gradients: outer_sum.h's sum_of_outer_products, in 8 chunks of at least 64 rows rather than the
// engine's up to 64: chunks of 64 rows (100 GEMMs at T = 100, B = 32) cost 4.8 s of a 5.5 s training step on
// this machine at load 17, each small parallel ATen call waiting on a descheduled thread.
template <template <typename> class CellT>
LayerGradients layer_backward(const std::vector<at::Tensor>& cell_params, const at::Tensor& grad_output,
                              const std::vector<at::Tensor>& grad_finals, const at::Tensor& input,
                              const std::vector<at::Tensor>& states0, const at::Tensor& w_ih, const LayerWeights& lw,
                              const at::Tensor& output_, const at::Tensor& workspace_, const Options& opt) {
  using C = CellT<float>;
  constexpr int G = C::kGates, K = C::kStates;
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2), H = states0[0].size(1), GH = G * H;
  const auto dtype = input.scalar_type(), acc = at::toOpMathType(dtype);
  const auto opts = input.options().dtype(acc);
  LayerGradients g;
  g.d_post_x = pooled_empty({T * B, GH}, opts);
  g.d_post_h = C::kSamePost ? g.d_post_x : pooled_empty({T * B, GH}, opts);
  g.extra = pooled_empty({T * B, C::kExtra * H}, opts);
  at::Tensor d_gx = pooled_empty({T * B, GH}, opts), d_gh = pooled_empty({T * B, GH}, opts);
  at::Tensor h_prev = pooled_empty({T * B, H}, opts);
  std::vector<at::Tensor> d_state, initial;
  for (int k = 0; k < K; ++k) {
    d_state.push_back(grad_finals[k].to(acc).contiguous().clone());
    g.initial.push_back(at::zeros({B, H}, opts));
    initial.push_back(states0[k].to(acc).contiguous());
  }
  if (T > 0 && B > 0) {
    const at::Tensor grad_out = grad_output.contiguous(), output = output_.contiguous(), ws = workspace_.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "seqkern_layernorm_backward", [&] {
      using A = Acc<scalar_t>;
      const CellT<A> cell(cell_params, A(0));
      const PackedRecurrentWeight<A> w(lw.w_hh, /*transposed_for_backward=*/true);
      BackwardLoop<CellT<A>, scalar_t> loop{cell, opt, H, lw, w.panels, grad_out.data_ptr<scalar_t>(),
                                           output.data_ptr<scalar_t>(), ws.data_ptr<A>(), {}, {}, {},
                                           g.d_post_x.data_ptr<A>(), g.d_post_h.data_ptr<A>(), d_gx.data_ptr<A>(),
                                           d_gh.data_ptr<A>(), g.extra.data_ptr<A>(), h_prev.data_ptr<A>()};
      for (int k = 0; k < K; ++k) {
        loop.initial[k] = initial[k].data_ptr<A>();
        loop.d_state[k] = d_state[k].data_ptr<A>();
        loop.d_initial[k] = g.initial[k].data_ptr<A>();
      }
      loop.run(row_threads(B * G * H * H, B));
    });
  }
  for (int k = 0; k < K; ++k) g.initial[k].add_(d_state[k]);
  const int64_t chunk_rows = std::max<int64_t>(64, (T * B + 7) / 8);
  g.input = pooled_empty({T, B, I}, opts);
  at::Tensor input_rows = g.input.view({T * B, I});
  at::mm_out(input_rows, d_gx, w_ih.to(acc));
  const std::vector<at::Tensor> weights =
      sums_of_outer_products({{{d_gx, input.reshape({T * B, I}).to(acc)}}, {{d_gh, h_prev}}}, chunk_rows);
  g.w_ih = weights[0];
  g.w_hh = weights[1];
  return g;
}

/// sum over rows of a (T*B, n) * the workspace columns [offset, offset + n) (a LayerNorm weight's gradient).
/// The products go into a pooled block: a fresh (T*B, n) temporary per call was where the training step's page
/// faults were left after the loops' own tensors were pooled (8% of its samples in the kernel, one thread).
inline at::Tensor weighted_column_sum(const at::Tensor& grads, const at::Tensor& workspace, int64_t offset) {
  const int64_t n = grads.size(1);
  at::Tensor products = pooled_empty(grads.sizes(), grads.options());
  at::mul_out(products, grads, workspace.reshape({-1, workspace.size(-1)}).narrow(1, offset, n));
  return products.sum(0);
}

/// Weights in the accumulation dtype, contiguous.
inline at::Tensor acc_copy(const at::Tensor& t) { return t.to(at::toOpMathType(t.scalar_type())).contiguous(); }
inline at::Tensor acc_copy(const std::optional<at::Tensor>& t) { return t.has_value() ? acc_copy(*t) : at::Tensor(); }

}  // namespace seqkern::cpu::layernorm
