// Additive (Bahdanau) attention on CPU: additive_attention_forward and additive_attention_backward
// (contracts in csrc/ops.cpp, oracle in seqkern/reference/additive_attention.py).
//
// Cost. Everything but the scores is a small GEMM: P @ values, dO @ values^T and P^T @ dO go to at::bmm
// (MKL). The scores cost B*Lq*Lk*H tanh evaluations (1.3 G at B32, Lq = Lk = 400, H = 256) in the forward and
// as many again in the backward, which recomputes t = tanh(query_proj_i + key_proj_j) to form
//   grad_query_proj_i += g, grad_key_proj_j += g, grad_v += ds t,   g = ds v (1 - t^2).
// So the kernels here are tanh loops, and the fp32 tanh (simd.h's tanh_accurate) is what sets their speed.
//
// Layout. The tanh loops run along H, one SIMD vector of hidden units at a time, for one query row against a
// block of kKeyBlock keys: query_proj and key_proj rows are read in place (fp32, fp64: no copy, no transpose;
// bf16 is converted once to fp32), and a score needs one horizontal sum of its H-lane accumulator at the end.
// At H = 256 that sum (~8 instructions) comes after 16 tanh vectors of ~25 instructions each, ~2%.
// Vectorizing over keys instead would avoid it, but needs key_proj transposed into key-major panels on every
// call: a strided pass over B*Lk*H elements, which in the decoder step (Lq = 1, each key used by one query)
// is of the order of the tanh work itself. Nor is query-row register blocking needed: a tanh vector is ~25
// instructions against 1-3 loads.
//
// Forward. Work item = (batch entry, block of query rows). Each row's scores over the keys that are not
// padding go straight into the probability matrix P (B, Lq, Lk) (the weights, which autograd keeps anyway:
// memory B*Lq*Lk, never B*Lq*Lk*H), then an exact softmax of the row in place (no online rescaling needed,
// the whole row is at hand); lse = max + log(sum). Then out = P @ values.
//
// Backward. dP = dO @ values^T, delta = rowsum(dO * out) (+ rowsum(P * grad_weights)) and grad_values =
// P^T @ dO in ATen; then one tanh pass over the (i, j) pairs with ds(i, j) = p (dP + grad_weights - delta) != 0
// (padding and underflowed probabilities skipped), each worker accumulating grad_key_proj of the batch entries
// it touches and grad_v in its own buffers, summed at the end in worker order. Items are dealt to workers in a
// fixed pattern (run_items), so the gradients are the same on every run (for a thread count).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "cpu/attention.h"
#include "cpu/arg_checks.h"

namespace seqkern::cpu {
namespace {

using namespace attention;

constexpr int kKeyBlock = 8;  // keys per tanh-loop call: q and v loads shared by 8 tanh vectors
// A call below this many tanh evaluations runs on the calling thread: 2^16 of them take ~100 us on one core
// (0.7 G tanh/s measured, loaded machine), against an OpenMP fan-out of several us. (Decoder step B32, Lk 50,
// H 256 = 410 K: parallel.)
constexpr int64_t kMinWorkPerThread = 1 << 16;
constexpr int64_t kRowsPerItem = 16;  // forward: small enough to balance B = 1, large enough to amortize

// ================================================================================================
// Arguments.
// ================================================================================================
constexpr ArgChecker kForwardCheck{"additive_attention_forward", false};
constexpr ArgChecker kBackwardCheck{"additive_attention_backward", false};

/// Sizes of one call: B batch entries, Lq queries, Lk keys, H hidden units, Dv value features.
struct Sizes {
  int64_t batch, len_q, len_k, hidden, dim_v;
};

at::ScalarType stats_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_last_dim_contiguous(const ArgChecker& check, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 0 || t.stride(-1) == 1 || t.size(-1) <= 1, "seqkern ", check.op, " (CPU): ", name,
              " must have stride(-1) == 1, got strides ", t.strides());
}

/// t has `like`'s dtype, the given shape, lives on the CPU, has stride(-1) == 1 (and is contiguous if asked).
void check_operand(const ArgChecker& check, const at::Tensor& t, const at::Tensor& like, at::IntArrayRef shape,
                   const char* name, bool contiguous = false) {
  check.tensor(t, like, shape, name);
  check_last_dim_contiguous(check, t, name);
  TORCH_CHECK(!contiguous || t.is_contiguous(), "seqkern ", check.op, " (CPU): ", name, " must be contiguous");
}

/// Checks query_proj, key_proj, values and v (shared by both ops); returns the sizes they define.
Sizes check_inputs(const ArgChecker& check, const at::Tensor& query_proj, const at::Tensor& key_proj,
                   const at::Tensor& values, const at::Tensor& v) {
  check.supported_dtype(query_proj, "query_proj");
  TORCH_CHECK(query_proj.dim() == 3, "seqkern ", check.op, " (CPU): query_proj must be (B, Lq, H), got shape ",
              query_proj.sizes());
  TORCH_CHECK(key_proj.dim() == 3, "seqkern ", check.op, " (CPU): key_proj must be (B, Lk, H), got shape ",
              key_proj.sizes());
  TORCH_CHECK(values.dim() == 3, "seqkern ", check.op, " (CPU): values must be (B, Lk, Dv), got shape ",
              values.sizes());
  const Sizes d{query_proj.size(0), query_proj.size(1), key_proj.size(1), query_proj.size(2), values.size(2)};
  check_last_dim_contiguous(check, query_proj, "query_proj");
  check_operand(check, key_proj, query_proj, {d.batch, d.len_k, d.hidden}, "key_proj");
  check_operand(check, values, query_proj, {d.batch, d.len_k, d.dim_v}, "values");
  check_operand(check, v, query_proj, {d.hidden}, "v", /*contiguous=*/true);
  return d;
}

/// Rows of a (B, L, X) tensor with stride(-1) == 1, any other strides.
template <typename T>
struct Rows {
  const T* data;
  int64_t s0, s1;
  explicit Rows(const at::Tensor& t) : data(t.data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)) {}
  const T* operator()(int64_t b, int64_t i) const { return data + b * s0 + i * s1; }
};

/// t in the accumulation dtype: itself for fp32 / fp64, a converted copy for bf16.
at::Tensor in_acc_dtype(const at::Tensor& t) { return t.to(stats_dtype(t)); }

/// Whether every element of t (float or double, any strides) is finite, in one pass without temporaries: a value is
/// not finite iff its exponent bits are all ones, an integer test the compiler vectorizes. at::isfinite(t).all()
/// took four ATen passes and their bool tensors: 0.56 ms of a 1.5 ms decoder-step backward (B 32, Lk 50, H 256;
/// 2026-12-07, Intel Xeon model 167).
bool all_finite(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  const auto scan = [&c](auto exponent) {
    using Bits = decltype(exponent);
    const Bits* bits = static_cast<const Bits*>(c.data_ptr());
    Bits non_finite = 0;
    for (int64_t i = 0, n = c.numel(); i < n; ++i) non_finite |= static_cast<Bits>((bits[i] & exponent) == exponent);
    return non_finite == 0;
  };
  return c.scalar_type() == at::kDouble ? scan(uint64_t{0x7FF0000000000000ull}) : scan(uint32_t{0x7F800000u});
}

// ================================================================================================
// Scheduling.
// ================================================================================================
/// Threads for `items` work items worth `work` tanh evaluations in all: at most one per kMinWorkPerThread.
int64_t thread_count(int64_t items, int64_t work) {
  if (at::in_parallel_region()) return 1;
  return std::max<int64_t>(1, std::min({static_cast<int64_t>(at::get_num_threads()), items,
                                        work / kMinWorkPerThread}));
}

/// body(worker, item) for items [0, count) on `workers` threads, worker w taking items w, w + workers, ...
/// (a fixed deal, so per-worker sums are reproducible); on the calling thread, with no parallel region, when
/// workers == 1. attention.h's for_each_worker_strided deals the same way but always over every thread.
template <typename Body>
void run_items(int64_t count, int64_t workers, const Body& body) {
  if (workers <= 1) {
    for (int64_t item = 0; item < count; ++item) body(0, item);
    return;
  }
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t worker = begin; worker < end; ++worker)
      for (int64_t item = worker; item < count; item += workers) body(worker, item);
  });
}

/// Indices of the keys of batch entry b that are not padding.
void visible_keys(const bool* mask, int64_t b, int64_t len_k, std::vector<int64_t>& keys) {
  keys.clear();
  for (int64_t j = 0; j < len_k; ++j)
    if (!mask || !mask[b * len_k + j]) keys.push_back(j);
}

/// Calls fn(std::integral_constant<int, C>) for C = count in [1, kKeyBlock]: the tanh loops unroll over keys.
template <typename Fn>
void with_key_count(int count, const Fn& fn) {
  switch (count) {
    case 1: return fn(std::integral_constant<int, 1>());
    case 2: return fn(std::integral_constant<int, 2>());
    case 3: return fn(std::integral_constant<int, 3>());
    case 4: return fn(std::integral_constant<int, 4>());
    case 5: return fn(std::integral_constant<int, 5>());
    case 6: return fn(std::integral_constant<int, 6>());
    case 7: return fn(std::integral_constant<int, 7>());
    default: return fn(std::integral_constant<int, 8>());
  }
}

// ================================================================================================
// Forward.
// ================================================================================================
/// scores[c] = v . tanh(q + k[c]) for C keys; H-lane accumulators, summed horizontally at the end. The last
/// partial vector is read zero-padded: its padding lanes add v = 0 times tanh(0).
template <typename A, int C>
void score_block(const A* q, const A* const* k, const A* v, int64_t hidden, A* scores) {
  using V = Simd<A>;
  constexpr int L = kLanes<A>;
  V acc[C];
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) acc[c] = V{};
  for (int64_t h = 0; h < hidden; h += L) {
    const int n = static_cast<int>(std::min<int64_t>(L, hidden - h));
    const V qh = load<A>(q + h, n), vh = load<A>(v + h, n);
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[c] = fmadd(vh, tanh_accurate(qh + load<A>(k[c] + h, n)), acc[c]);
  }
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) scores[c] = reduce_sum(acc[c]);
}

/// Row p[0:len) of scores (-inf at padding) -> its softmax in place; returns lse (-inf, and p = 0, if every
/// score is -inf).
template <typename A>
A softmax_row(A* p, int64_t len) {
  using V = Simd<A>;
  constexpr int L = kLanes<A>;
  const int64_t full = len / L * L;
  const A minus_inf = -std::numeric_limits<A>::infinity();
  V vmax = broadcast(minus_inf);
  for (int64_t j = 0; j < full; j += L) {
    const V x = load_vector(p + j);
    vmax = x > vmax ? x : vmax;
  }
  A row_max = reduce_max(vmax);
  for (int64_t j = full; j < len; ++j) row_max = std::max(row_max, p[j]);
  if (row_max == minus_inf) {  // every score -inf (no key: p = 0), or the maximum skipped NaN scores (p = NaN)
    const bool has_nan = std::any_of(p, p + len, [](A x) { return std::isnan(x); });
    const A value = has_nan ? std::numeric_limits<A>::quiet_NaN() : A(0);
    std::fill(p, p + len, value);
    return has_nan ? value : minus_inf;
  }
  const V shift = broadcast(row_max);
  V vsum{};
  for (int64_t j = 0; j < full; j += L) {
    const V e = exp_attention(load_vector(p + j) - shift);
    vsum += e;
    store_vector(p + j, e);
  }
  A sum = reduce_sum(vsum);
  for (int64_t j = full; j < len; ++j) {
    p[j] = std::exp(p[j] - row_max);
    sum += p[j];
  }
  const A inv = A(1) / sum;
  for (int64_t j = 0; j < full; j += L) store_vector(p + j, load_vector(p + j) * inv);
  for (int64_t j = full; j < len; ++j) p[j] *= inv;
  return row_max + std::log(sum);
}

template <typename A>
struct ForwardArgs {
  Sizes d;
  Rows<A> qp, kp;
  const A* v;
  const bool* mask;  // (B, Lk) or null
  A* probs;          // (B, Lq, Lk) contiguous
  A* lse;            // (B, Lq) contiguous
};

/// Rows [i0, i1) of batch entry b: P rows and lse.
template <typename A>
void forward_rows(const ForwardArgs<A>& args, int64_t b, int64_t i0, int64_t i1, std::vector<int64_t>& keys) {
  const Sizes& d = args.d;
  visible_keys(args.mask, b, d.len_k, keys);
  const int64_t visible = static_cast<int64_t>(keys.size());
  const A* k_rows[kKeyBlock];
  A block_scores[kKeyBlock];
  for (int64_t i = i0; i < i1; ++i) {
    A* p = args.probs + (b * d.len_q + i) * d.len_k;
    if (visible < d.len_k) std::fill(p, p + d.len_k, -std::numeric_limits<A>::infinity());
    const A* q = args.qp(b, i);
    for (int64_t k0 = 0; k0 < visible; k0 += kKeyBlock) {
      const int count = static_cast<int>(std::min<int64_t>(kKeyBlock, visible - k0));
      for (int c = 0; c < count; ++c) k_rows[c] = args.kp(b, keys[k0 + c]);
      with_key_count(count, [&](auto C) { score_block<A, C()>(q, k_rows, args.v, d.hidden, block_scores); });
      for (int c = 0; c < count; ++c) p[keys[k0 + c]] = block_scores[c];
    }
    const A lse = softmax_row(p, d.len_k);
    args.lse[b * d.len_q + i] = lse;
    // Padding keys take no part, also in a NaN row (where 0 * NaN made their weights NaN): weight 0, and so
    // score gradient 0 in the backward.
    if (visible < d.len_k && std::isnan(lse))
      for (int64_t j = 0; j < d.len_k; ++j)
        if (args.mask[b * d.len_k + j]) p[j] = A(0);
  }
}

template <typename A>
void forward(const ForwardArgs<A>& args) {
  const Sizes& d = args.d;
  const int64_t blocks = (d.len_q + kRowsPerItem - 1) / kRowsPerItem;
  const int64_t items = d.batch * blocks;
  const int64_t workers = thread_count(items, d.batch * d.len_q * d.len_k * std::max<int64_t>(d.hidden, 1));
  std::vector<std::vector<int64_t>> keys(workers);
  run_items(items, workers, [&](int64_t worker, int64_t item) {
    const int64_t b = item / blocks, i0 = item % blocks * kRowsPerItem;
    forward_rows(args, b, i0, std::min(d.len_q, i0 + kRowsPerItem), keys[worker]);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> additive_attention_forward_cpu(
    const at::Tensor& query_proj, const at::Tensor& key_proj, const at::Tensor& values, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, bool return_weights) {
  const ArgChecker& check = kForwardCheck;
  const Sizes d = check_inputs(check, query_proj, key_proj, values, v);
  if (key_padding_mask.has_value()) {
    const at::Tensor& mask = *key_padding_mask;
    TORCH_CHECK(mask.device().is_cpu() && mask.scalar_type() == at::kBool, "seqkern ", check.op,
                " (CPU): key_padding_mask must be a bool CPU tensor, got ", mask.scalar_type(), " on ", mask.device());
    check.shape(mask, {d.batch, d.len_k}, "key_padding_mask");
    TORCH_CHECK(mask.is_contiguous(), "seqkern ", check.op, " (CPU): key_padding_mask must be contiguous");
  }
  const at::ScalarType stats = stats_dtype(query_proj);
  at::Tensor probs = at::empty({d.batch, d.len_q, d.len_k}, query_proj.options().dtype(stats));
  at::Tensor lse = at::empty({d.batch, d.len_q}, query_proj.options().dtype(stats));
  const at::Tensor qp = in_acc_dtype(query_proj), kp = in_acc_dtype(key_proj), v_acc = in_acc_dtype(v);
  AT_DISPATCH_FLOATING_TYPES(stats, "additive_attention_forward", [&] {
    forward<scalar_t>({d, Rows<scalar_t>(qp), Rows<scalar_t>(kp), v_acc.data_ptr<scalar_t>(),
                       key_padding_mask.has_value() ? key_padding_mask->data_ptr<bool>() : nullptr,
                       probs.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>()});
  });
  // Fully padded rows have P = 0, so out = 0; Lk == 0 gives a zero product too.
  at::Tensor out = at::bmm(probs, in_acc_dtype(values)).to(values.scalar_type());
  return {out, lse, return_weights ? probs : at::empty({0}, query_proj.options())};
}

// ================================================================================================
// Backward.
// ================================================================================================
/// For C keys k[c] with score gradients ds[c]: t = tanh(q + k[c]), g = ds v (1 - t^2);
/// grad_k[c] += g, grad_q += sum_c g, grad_v += sum_c ds t. One pass over H, vector by vector; the two sums
/// over c are formed in registers before they touch memory.
template <typename A, int C>
void grad_block(const A* q, const A* const* k, A* const* grad_k, const A* ds, const A* v, int64_t hidden,
                A* grad_q, A* grad_v) {
  using V = Simd<A>;
  constexpr int L = kLanes<A>;
  for (int64_t h = 0; h < hidden; h += L) {
    const int n = static_cast<int>(std::min<int64_t>(L, hidden - h));
    const V qh = load<A>(q + h, n), vh = load<A>(v + h, n);
    V gq{}, gv{};
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      const V t = tanh_accurate(qh + load<A>(k[c] + h, n));
      const V ds_c = broadcast(ds[c]);
      gv = fmadd(ds_c, t, gv);
      const V g = (ds_c * vh) * (A(1) - t * t);
      gq += g;
      store(grad_k[c] + h, load<A>(grad_k[c] + h, n) + g, n);
    }
    store(grad_q + h, load<A>(grad_q + h, n) + gq, n);
    store(grad_v + h, load<A>(grad_v + h, n) + gv, n);
  }
}

template <typename A>
struct BackwardArgs {
  Sizes d;
  Rows<A> qp, kp;
  const A* v;
  const A* probs;          // (B, Lq, Lk) contiguous
  const A* grad_weights;   // (B, Lq, Lk) contiguous, or null
  A* grad_scores;          // (B, Lq, Lk) contiguous: dO @ values^T on entry, overwritten by ds
  const A* delta;          // (B, Lq)
  A* grad_qp;              // (B, Lq, H) contiguous
  bool every_key;          // visit keys with ds = 0 too (non-finite tanh inputs or v: see the backward op)
};

/// One worker's buffers: its grad_key_proj partial of every batch entry it touches (B*Lk*H when the batch
/// entries are split over workers, else written straight into the shared result), grad_v at three levels
/// (row, item, worker: the long sum over B*Lq*Lk pairs is not one fp32 chain), and the kept-key list of a row.
template <typename A>
struct BackwardScratch {
  std::vector<A> grad_k, grad_v_row, grad_v_item, grad_v;
  std::vector<int64_t> keys;
  BackwardScratch(int64_t grad_k_size, int64_t hidden)
      : grad_k(grad_k_size), grad_v_row(hidden), grad_v_item(hidden), grad_v(hidden) {}
};

/// ds of row i (in place over dP): p (dP + grad_weights - delta); the keys where ds != 0 go to `keys`.
template <typename A>
void score_grads(const BackwardArgs<A>& args, int64_t row, std::vector<int64_t>& keys) {
  const int64_t len_k = args.d.len_k;
  const A* p = args.probs + row * len_k;
  const A* gw = args.grad_weights ? args.grad_weights + row * len_k : nullptr;
  A* ds = args.grad_scores + row * len_k;
  const A delta = args.delta[row];
  keys.clear();
  for (int64_t j = 0; j < len_k; ++j) {
    ds[j] = p[j] == A(0) ? A(0) : p[j] * (ds[j] + (gw ? gw[j] : A(0)) - delta);
    if (ds[j] != A(0) || args.every_key) keys.push_back(j);
  }
}

/// Rows [i0, i1) of batch entry b: their grad_query_proj rows, and their terms of grad_key_proj (into
/// grad_k, the (Lk, H) buffer this worker accumulates batch entry b in) and of grad_v (into w.grad_v_item).
template <typename A>
void backward_rows(const BackwardArgs<A>& args, BackwardScratch<A>& w, int64_t b, int64_t i0, int64_t i1,
                   A* grad_k) {
  const Sizes& d = args.d;
  const A* k_rows[kKeyBlock];
  A* grad_k_rows[kKeyBlock];
  A ds_block[kKeyBlock];
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t row = b * d.len_q + i;
    score_grads(args, row, w.keys);
    const A* ds = args.grad_scores + row * d.len_k;
    A* grad_q = args.grad_qp + row * d.hidden;
    std::fill(grad_q, grad_q + d.hidden, A(0));
    std::fill(w.grad_v_row.begin(), w.grad_v_row.end(), A(0));
    const int64_t kept = static_cast<int64_t>(w.keys.size());
    for (int64_t k0 = 0; k0 < kept; k0 += kKeyBlock) {
      const int count = static_cast<int>(std::min<int64_t>(kKeyBlock, kept - k0));
      for (int c = 0; c < count; ++c) {
        const int64_t j = w.keys[k0 + c];
        k_rows[c] = args.kp(b, j);
        grad_k_rows[c] = grad_k + j * d.hidden;
        ds_block[c] = ds[j];
      }
      with_key_count(count, [&](auto C) {
        grad_block<A, C()>(args.qp(b, i), k_rows, grad_k_rows, ds_block, args.v, d.hidden, grad_q,
                           w.grad_v_row.data());
      });
    }
    for (int64_t h = 0; h < d.hidden; ++h) w.grad_v_item[h] += w.grad_v_row[h];
  }
}

/// The tanh pass. Items are (batch entry, block of query rows); a batch entry is split into several blocks
/// only when there are too few entries to keep every worker busy, and then the workers accumulate
/// grad_key_proj in private (Lk, H) buffers per entry, summed in worker order.
template <typename A>
void backward(const BackwardArgs<A>& args, A* grad_kp, A* grad_v) {
  const Sizes& d = args.d;
  if (d.batch * d.len_q == 0) return;  // no pair: the zero-filled results stand
  const int64_t work = d.batch * d.len_q * d.len_k * std::max<int64_t>(d.hidden, 1);
  const int64_t max_workers = thread_count(d.batch * d.len_q, work);
  // Blocks per batch entry: 4 items per worker in all, for balance.
  const int64_t blocks = std::min(d.len_q, std::max<int64_t>(1, (4 * max_workers + d.batch - 1) / d.batch));
  const int64_t rows_per_block = (d.len_q + blocks - 1) / blocks;
  const int64_t items = d.batch * blocks;
  const int64_t workers = std::min(max_workers, std::max<int64_t>(items, 1));
  const bool private_grad_k = blocks > 1 && workers > 1;
  const int64_t entry_size = d.len_k * d.hidden;
  std::vector<std::unique_ptr<BackwardScratch<A>>> scratch(workers);
  std::vector<std::vector<char>> touched(workers, std::vector<char>(private_grad_k ? d.batch : 0, 0));
  run_items(items, workers, [&](int64_t worker, int64_t item) {
    if (!scratch[worker])
      scratch[worker] = std::make_unique<BackwardScratch<A>>(private_grad_k ? d.batch * entry_size : 0, d.hidden);
    BackwardScratch<A>& w = *scratch[worker];
    const int64_t b = item / blocks, i0 = item % blocks * rows_per_block;
    A* grad_k = private_grad_k ? w.grad_k.data() + b * entry_size : grad_kp + b * entry_size;
    if (private_grad_k) touched[worker][b] = 1;
    std::fill(w.grad_v_item.begin(), w.grad_v_item.end(), A(0));
    backward_rows(args, w, b, i0, std::min(d.len_q, i0 + rows_per_block), grad_k);
    for (int64_t h = 0; h < d.hidden; ++h) w.grad_v[h] += w.grad_v_item[h];
  });
  if (private_grad_k) {
    at::parallel_for(0, d.batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        for (int64_t worker = 0; worker < workers; ++worker)
          if (touched[worker][b]) {
            const A* part = scratch[worker]->grad_k.data() + b * entry_size;
            A* dst = grad_kp + b * entry_size;
            for (int64_t e = 0; e < entry_size; ++e) dst[e] += part[e];
          }
    });
  }
  for (const auto& w : scratch)
    if (w)
      for (int64_t h = 0; h < d.hidden; ++h) grad_v[h] += w->grad_v[h];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> additive_attention_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_weights, const at::Tensor& query_proj,
    const at::Tensor& key_proj, const at::Tensor& values, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& weights) {
  const ArgChecker& check = kBackwardCheck;
  const Sizes d = check_inputs(check, query_proj, key_proj, values, v);
  check_operand(check, grad_out, query_proj, {d.batch, d.len_q, d.dim_v}, "grad_out");
  check_operand(check, out, query_proj, {d.batch, d.len_q, d.dim_v}, "out");
  const at::ScalarType stats = stats_dtype(query_proj);
  const at::Tensor like_stats = at::empty({0}, query_proj.options().dtype(stats));
  check_operand(check, weights, like_stats, {d.batch, d.len_q, d.len_k}, "weights", /*contiguous=*/true);
  if (grad_weights.has_value())
    check_operand(check, *grad_weights, like_stats, {d.batch, d.len_q, d.len_k}, "grad_weights", true);

  // The GEMM and row-sum parts, in the accumulation dtype.
  const at::Tensor grad_out_acc = in_acc_dtype(grad_out);
  at::Tensor grad_scores = at::bmm(grad_out_acc, in_acc_dtype(values).transpose(1, 2));  // dP, then ds in place
  at::Tensor delta = (grad_out_acc * in_acc_dtype(out)).sum(-1);
  if (grad_weights.has_value()) delta += (weights * *grad_weights).sum(-1);
  at::Tensor grad_values = at::bmm(weights.transpose(1, 2), grad_out_acc).to(values.scalar_type());

  const at::Tensor qp = in_acc_dtype(query_proj), kp = in_acc_dtype(key_proj), v_acc = in_acc_dtype(v);
  at::Tensor grad_qp = at::empty({d.batch, d.len_q, d.hidden}, query_proj.options().dtype(stats));
  at::Tensor grad_kp = at::zeros({d.batch, d.len_k, d.hidden}, query_proj.options().dtype(stats));
  at::Tensor grad_v = at::zeros({d.hidden}, query_proj.options().dtype(stats));
  // Keys with ds = 0 (padding) add ds v (1 - t^2) = 0 to the tanh gradients and are skipped, unless v or t is
  // NaN (or v infinite): then they add 0 * NaN = NaN, as the composed formula does. One finiteness check of the
  // O((Lq + Lk) H) inputs decides, against the O(Lq Lk H) pass.
  const bool every_key = !(all_finite(v_acc) && all_finite(qp) && all_finite(kp));
  AT_DISPATCH_FLOATING_TYPES(stats, "additive_attention_backward", [&] {
    backward<scalar_t>({d, Rows<scalar_t>(qp), Rows<scalar_t>(kp), v_acc.data_ptr<scalar_t>(),
                        weights.data_ptr<scalar_t>(),
                        grad_weights.has_value() ? grad_weights->data_ptr<scalar_t>() : nullptr,
                        grad_scores.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(), grad_qp.data_ptr<scalar_t>(),
                        every_key},
                       grad_kp.data_ptr<scalar_t>(), grad_v.data_ptr<scalar_t>());
  });
  const at::ScalarType dtype = query_proj.scalar_type();
  return {grad_qp.to(dtype), grad_kp.to(dtype), grad_values, grad_v.to(dtype)};
}

}  // namespace
}  // namespace seqkern::cpu

TORCH_LIBRARY_IMPL(seqkern, CPU, m) {
  m.impl("additive_attention_forward", &seqkern::cpu::additive_attention_forward_cpu);
  m.impl("additive_attention_backward", &seqkern::cpu::additive_attention_backward_cpu);
}
