// Argument checks of the CPU ops: TORCH_CHECKs that name the op and the argument, run before any kernel
// so that a direct op call never reads or writes out of bounds.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace seqkern::cpu {

// ================================================================================================
// Argument checks (a direct op call must never read or write out of bounds).
// ================================================================================================
/// TORCH_CHECKs whose messages name the op ("seqkern gru (CPU): h0 must have shape ...").
struct ArgChecker {
  const char* op;
  bool accepts_float16 = false;  // the attention kernels serve float16; the recurrent ones do not

  void shape(const at::Tensor& t, at::IntArrayRef expected, const char* name) const {
    TORCH_CHECK(t.sizes() == expected, "seqkern ", op, " (CPU): ", name, " must have shape ", expected, ", got ",
                t.sizes());
  }
  void dtype_device(const at::Tensor& t, const at::Tensor& like, const char* name) const {
    TORCH_CHECK(t.device().is_cpu(), "seqkern ", op, " (CPU): ", name, " must be a CPU tensor, got ", t.device());
    TORCH_CHECK(t.scalar_type() == like.scalar_type(), "seqkern ", op, " (CPU): ", name, " must have dtype ",
                like.scalar_type(), ", got ", t.scalar_type());
  }
  /// Shape, dtype (that of `like`) and device of t.
  void tensor(const at::Tensor& t, const at::Tensor& like, at::IntArrayRef expected, const char* name) const {
    shape(t, expected, name);
    dtype_device(t, like, name);
  }
  void supported_dtype(const at::Tensor& t, const char* name) const {
    const auto dtype = t.scalar_type();
    const bool supported = dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                           (accepts_float16 && dtype == at::kHalf);
    TORCH_CHECK(supported, "seqkern ", op, " (CPU): ", name, " must be float32, float64, bfloat16",
                accepts_float16 ? " or float16" : "", ", got ", dtype);
    dtype_device(t, t, name);
  }
  /// Both biases or neither, each (size,) like `like`.
  void biases(const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh, int64_t size,
              const at::Tensor& like) const {
    TORCH_CHECK(b_ih.has_value() == b_hh.has_value(), "seqkern ", op, " (CPU): b_ih and b_hh must be given together");
    if (!b_ih.has_value()) return;
    tensor(*b_ih, like, {size}, "b_ih");
    tensor(*b_hh, like, {size}, "b_hh");
  }
  /// batch_sizes (T,) int64 CPU, non-increasing, each in [0, batch]; returned contiguous (or undefined).
  at::Tensor batch_sizes(const std::optional<at::Tensor>& batch_sizes, int64_t seq_len, int64_t batch) const {
    if (!batch_sizes.has_value()) return {};
    TORCH_CHECK(batch_sizes->device().is_cpu() && batch_sizes->scalar_type() == at::kLong, "seqkern ", op,
                " (CPU): batch_sizes must be an int64 CPU tensor");
    shape(*batch_sizes, {seq_len}, "batch_sizes");
    const at::Tensor sizes = batch_sizes->contiguous();
    const int64_t* data = sizes.data_ptr<int64_t>();
    for (int64_t t = 0; t < seq_len; ++t) {
      TORCH_CHECK(data[t] >= 0 && data[t] <= batch, "seqkern ", op, " (CPU): batch_sizes[", t, "] = ", data[t],
                  " is outside [0, ", batch, "]");
      TORCH_CHECK(t == 0 || data[t] <= data[t - 1], "seqkern ", op, " (CPU): batch_sizes must be non-increasing");
    }
    return sizes;
  }
};

}  // namespace seqkern::cpu
