// lengths, resets and zoneout of the recurrent loops (seqkern/ops/_schemas.py; seqkern/reference/_scan.py defines
// them bit for bit), shared by the unit-split engine (recurrence_layer.h) and the row-split LayerNorm loop
// (layernorm_recurrence.h), so that both read the same predicate and draw the same zoneout masks:
//   * lengths (B,): row b is active at time t iff t < lengths[b]; an inactive row keeps its states and records
//     zeros (so a reverse direction starts each row at its own last valid step);
//   * resets (T, B): the state entering step t of row b is its initial state again (forward direction only);
//   * zoneout p: an active row's new state s is blended with the one it entered the step with, s_prev:
//     training (a seed): s_prev where keep(k, t, b, u) = bits(seed, state k, t, b * width + u) < floor(p 2^32)
//     (counter_hash.h), else s; evaluation: p s_prev + (1 - p) s. Backward: d s -> d new = (1 - m) d s,
//     d s_prev += m d s, the masks redrawn from the seed, never stored.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <utility>
#include <vector>

#include "cpu/arg_checks.h"
#include "cpu/counter_hash.h"
#include "cpu/simd.h"

namespace seqkern::cpu {

/// Zoneout's weights, blend and its backward on SIMD chunks of one state row.
struct Zoneout {
  double p = 0;
  bool masks = false;     // training (a seed was given): 0/1 masks; else the evaluation blend
  bool keep_all = false;  // masks at p = 1: floor(p 2^32) = 2^32 does not fit the uint32 bits
  uint32_t keep_below = 0;
  DropoutHash hash;  // the seed's halves (its dropout threshold is unused: zoneout keeps *below*)

  bool on() const { return p > 0; }

  /// The weight of the previous value of state k at (time t, row b), units [u0, u0 + kLanes) of a state
  /// `width` wide: 1 where kept and 0 elsewhere with masks, p everywhere without.
  template <typename A>
  Simd<A> weight(int k, int64_t t, int64_t b, int64_t width, int64_t u0) const {
    if (!masks) return broadcast<A>(static_cast<A>(p));
    if (keep_all) return broadcast<A>(A(1));
    using U = typename HashLanes<A>::type;
    const U bits = DropoutHash::row_bits<A>(DropoutHash::row_key(hash.head_key(k), t), b * width + u0);
    const auto kept = __builtin_convertvector(bits < (U{} + keep_below), typename SimdTraits<A>::bits);
    return kept ? broadcast<A>(A(1)) : Simd<A>{};
  }

  /// The state after zoneout from the step's new value and the previous one. With masks a selection, not
  /// w old + (1 - w) new: an Inf or NaN in the value not kept must not leak into the kept one.
  template <typename V>
  V blend(V w, V old_value, V new_value) const {
    using A = SimdElement<V>;
    if (masks) return w != A(0) ? old_value : new_value;
    return fmadd(w, old_value, (A(1) - w) * new_value);
  }

  /// blend's backward: the gradient g of the state after zoneout -> {that of the new value, that of the previous}.
  template <typename V>
  std::pair<V, V> split(V w, V g) const {
    using A = SimdElement<V>;
    if (masks) return {w != A(0) ? V{} : g, w != A(0) ? g : V{}};
    return {(A(1) - w) * g, w * g};
  }
};

/// The per-row predicate of lengths and resets, and zoneout.
struct StateFlags {
  int64_t batch = 0;
  const int64_t* lengths = nullptr;  // (B,) or null: every row runs all T steps
  const bool* resets = nullptr;      // (T, B) or null
  Zoneout zoneout;

  bool any() const { return lengths || resets || zoneout.on(); }
  bool within_length(int64_t t, int64_t b) const { return !lengths || t < lengths[b]; }
  bool reset(int64_t t, int64_t b) const { return resets && resets[t * batch + b]; }
};

/// Checks lengths ((B,) int64 CPU, values in [0, T], not with batch_sizes), resets ((T, B) bool CPU, not with
/// reverse), zoneout (in [0, 1]) and zoneout_seed (int64, shape ()) and returns them as flags; `keep` holds
/// the contiguous copies the flags point into.
inline StateFlags check_state_flags(const ArgChecker& check, int64_t T, int64_t B,
                                    const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& resets,
                                    double zoneout, const std::optional<at::Tensor>& seed, bool reverse,
                                    bool has_batch_sizes, std::vector<at::Tensor>& keep) {
  StateFlags f;
  f.batch = B;
  if (lengths.has_value()) {
    TORCH_CHECK(!has_batch_sizes, "seqkern ", check.op, " (CPU): lengths and batch_sizes cannot be given "
                      "together (a PackedSequence's batch_sizes already say which rows are active)");
    TORCH_CHECK(lengths->device().is_cpu() && lengths->scalar_type() == at::kLong, "seqkern ", check.op,
                " (CPU): lengths must be an int64 CPU tensor, got ", lengths->scalar_type(), " on ", lengths->device());
    check.shape(*lengths, {B}, "lengths");
    keep.push_back(lengths->contiguous());
    f.lengths = keep.back().data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(f.lengths[b] >= 0 && f.lengths[b] <= T, "seqkern ", check.op, " (CPU): lengths[", b, "] = ",
                        f.lengths[b], " is outside [0, ", T, "]");
  }
  if (resets.has_value()) {
    TORCH_CHECK(!reverse, "seqkern ", check.op, " (CPU): resets cannot be given with reverse=True (an episode "
                      "boundary is defined in the forward direction only)");
    TORCH_CHECK(resets->device().is_cpu() && resets->scalar_type() == at::kBool, "seqkern ", check.op,
                " (CPU): resets must be a bool CPU tensor, got ", resets->scalar_type(), " on ", resets->device());
    check.shape(*resets, {T, B}, "resets");
    keep.push_back(resets->contiguous());
    f.resets = keep.back().data_ptr<bool>();
  }
  TORCH_CHECK(zoneout >= 0 && zoneout <= 1, "seqkern ", check.op, " (CPU): zoneout must be in [0, 1], got ", zoneout);
  f.zoneout.p = zoneout;
  if (seed.has_value()) {
    TORCH_CHECK(seed->scalar_type() == at::kLong && seed->dim() == 0, "seqkern ", check.op,
                " (CPU): zoneout_seed must be an int64 tensor of shape (), got ", seed->scalar_type(), " of shape ",
                seed->sizes());
    f.zoneout.masks = true;
    f.zoneout.hash = DropoutHash(seed->item<int64_t>(), 0.0);
    const double below = zoneout * 4294967296.0;  // floor(p 2^32): keep iff bits < it (_scan.py zoneout_threshold)
    f.zoneout.keep_all = below >= 4294967296.0;
    f.zoneout.keep_below = f.zoneout.keep_all ? 0 : static_cast<uint32_t>(below);
  }
  return f;
}

}  // namespace seqkern::cpu
