"""The LayerNorm LSTM ops: fake implementations, autograd formula, Triton registration, and the functional API.

torch.ops.seqkern.layernorm_lstm_forward / _backward run one layer in one direction over a whole sequence, with
lengths, resets and zoneout (contracts in seqkern/ops/_schemas.py, definition in
seqkern/reference/layernorm_lstm.py). `layernorm_lstm_layer` picks the implementation (seqkern.backend) and is
what seqkern.nn.LayerNormLSTM calls. The option checks here are shared with seqkern/ops/layernorm_gru.py.
"""
from __future__ import annotations

import torch
from torch import Tensor

from seqkern import backends, reference
from seqkern.ops._contract import Contract
from seqkern.ops._registry import (
    Autograd, empty, kernel_scope, needs_grad, register_ops, run_op, save_inputs, saved_inputs, zeros_if_none,
)

SUPPORTED_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16),
    "triton": (torch.float32, torch.float64, torch.bfloat16, torch.float16),  # math in float32
}
# Workspace columns per (t, b) row: csrc/cpu/layernorm_recurrence.h documents the layout.
LSTM_WORKSPACE = (14, 3)  # 14H + 3
GRU_WORKSPACE = (10, 2)  # 10H + 2


def workspace_width(layout: tuple[int, int], hidden) -> int:
    return layout[0] * hidden + layout[1]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


# --------------------------------------------------------------------------------------------------
# Contract checks shared by the LayerNorm LSTM and GRU ops.
# --------------------------------------------------------------------------------------------------
def check_layer_norms(contract: Contract, like: Tensor, **params: tuple[Tensor, int]) -> None:
    """Each LayerNorm parameter name=(tensor, size) is (size,) like `like`."""
    for name, (t, size) in params.items():
        contract.tensor(t, like, (size,), name)


def check_options(contract: Contract, seq_len, batch, like: Tensor, lengths: Tensor | None, resets: Tensor | None,
                  zoneout: float, zoneout_seed: Tensor | None, reverse: bool) -> None:
    """lengths (B,) int64, resets (T,B) bool (not with reverse), zoneout in [0, 1], zoneout_seed int64 ().
    The values of lengths are data: the kernels check them."""
    if lengths is not None:
        contract.check(lengths.dtype == torch.int64, f"lengths must be int64, got {lengths.dtype}")
        contract.shape(lengths, (batch,), "lengths")
    if resets is not None:
        contract.check(resets.dtype == torch.bool, f"resets must be bool, got {resets.dtype}")
        contract.shape(resets, (seq_len, batch), "resets")
        contract.check(resets.device == like.device, f"resets must be on {like.device}, got {resets.device}")
        contract.check(not reverse, "resets are not supported with reverse=True (a bidirectional layer)")
    contract.check(0.0 <= zoneout <= 1.0, f"zoneout must be in [0, 1], got {zoneout}")
    if zoneout_seed is not None:
        contract.check(zoneout_seed.dtype == torch.int64, f"zoneout_seed must be int64, got {zoneout_seed.dtype}")
        contract.shape(zoneout_seed, (), "zoneout_seed")


# --------------------------------------------------------------------------------------------------
# Fake implementations.
# --------------------------------------------------------------------------------------------------
def _check_layer(contract, input, h0, c0, w_ih, w_hh, ln_ih_weight, ln_hh_weight, ln_cell_weight, lengths, resets,
                 zoneout, zoneout_seed, reverse):
    seq_len, batch, _, hidden, _ = contract.layer(4, input, h0, w_ih, w_hh)
    contract.tensor(c0, input, (batch, hidden), "c0")
    check_layer_norms(contract, input, ln_ih_weight=(ln_ih_weight, 4 * hidden), ln_hh_weight=(ln_hh_weight, 4 * hidden),
                      ln_cell_weight=(ln_cell_weight, hidden))
    check_options(contract, seq_len, batch, input, lengths, resets, zoneout, zoneout_seed, reverse)
    return seq_len, batch, hidden


def _forward_fake(input, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias,
                  ln_cell_weight, ln_cell_bias, eps, lengths, resets, zoneout, zoneout_seed, reverse, save_workspace):
    contract = Contract("layernorm_lstm_forward")
    seq_len, batch, hidden = _check_layer(contract, input, h0, c0, w_ih, w_hh, ln_ih_weight, ln_hh_weight,
                                          ln_cell_weight, lengths, resets, zoneout, zoneout_seed, reverse)
    contract.biases(b_ih, b_hh, 4 * hidden, input)
    check_layer_norms(contract, input, ln_ih_bias=(ln_ih_bias, 4 * hidden), ln_hh_bias=(ln_hh_bias, 4 * hidden),
                      ln_cell_bias=(ln_cell_bias, hidden))
    workspace = (input.new_empty(seq_len, batch, workspace_width(LSTM_WORKSPACE, hidden),
                                 dtype=accumulation_dtype(input.dtype)) if save_workspace else empty(input))
    return input.new_empty(seq_len, batch, hidden), h0.new_empty(h0.shape), c0.new_empty(c0.shape), workspace


def _backward_fake(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, ln_ih_weight, ln_hh_weight,
                   ln_cell_weight, ln_cell_bias, output, workspace, lengths, resets, zoneout, zoneout_seed, reverse):
    contract = Contract("layernorm_lstm_backward")
    seq_len, batch, hidden = _check_layer(contract, input, h0, c0, w_ih, w_hh, ln_ih_weight, ln_hh_weight,
                                          ln_cell_weight, lengths, resets, zoneout, zoneout_seed, reverse)
    contract.tensor(ln_cell_bias, input, (hidden,), "ln_cell_bias")
    contract.tensor(grad_output, input, (seq_len, batch, hidden), "grad_output")
    contract.tensor(grad_h_n, input, (batch, hidden), "grad_h_n")
    contract.tensor(grad_c_n, input, (batch, hidden), "grad_c_n")
    contract.tensor(output, input, (seq_len, batch, hidden), "output")
    contract.tensor(workspace, input, (seq_len, batch, workspace_width(LSTM_WORKSPACE, hidden)),
                    "workspace (the forward's)", dtype=accumulation_dtype(input.dtype))
    return (input.new_empty(input.shape), h0.new_empty(h0.shape), c0.new_empty(c0.shape), w_ih.new_empty(w_ih.shape),
            w_hh.new_empty(w_hh.shape), input.new_empty(4 * hidden), input.new_empty(4 * hidden),
            input.new_empty(4 * hidden), input.new_empty(hidden), input.new_empty(hidden))


# --------------------------------------------------------------------------------------------------
# Autograd.
# --------------------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    ctx.has_bias, ctx.saved_workspace = inputs[5] is not None, inputs[-1]
    save_inputs(ctx, inputs, output[0], output[3])


def _backward(ctx, grad_output, grad_h_n, grad_c_n, _grad_workspace):
    inputs, (out, workspace) = saved_inputs(ctx)
    (input, h0, c0, w_ih, w_hh, _, _, ln_ih_weight, _, ln_hh_weight, _, ln_cell_weight, ln_cell_bias, _, lengths, resets,
     zoneout, zoneout_seed, reverse, _) = inputs
    if not ctx.saved_workspace:
        raise RuntimeError(
            "seqkern.layernorm_lstm_forward was called with save_workspace=False: it cannot be differentiated")
    with kernel_scope(_impl(input), input.device):
        grads = torch.ops.seqkern.layernorm_lstm_backward(
            zeros_if_none(grad_output, out), zeros_if_none(grad_h_n, h0), zeros_if_none(grad_c_n, c0), input, h0, c0,
            w_ih, w_hh, ln_ih_weight, ln_hh_weight, ln_cell_weight, ln_cell_bias, out, workspace, lengths, resets, zoneout,
            zoneout_seed, reverse)
    grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_ln_ih_w, grad_ln_hh_w, grad_ln_c_w, grad_ln_c_b = grads
    bias = grad_bias if ctx.has_bias else None
    return (grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, bias, bias, grad_ln_ih_w, grad_bias, grad_ln_hh_w,
            grad_bias, grad_ln_c_w, grad_ln_c_b, None, None, None, None, None, None, None)


def _impl(like: Tensor) -> str:
    return backends.resolve("layernorm_lstm", like.device, like.dtype, SUPPORTED_DTYPES, kernel="layernorm_lstm_forward")


register_ops(
    fakes={"layernorm_lstm_forward": _forward_fake, "layernorm_lstm_backward": _backward_fake},
    autograd={"layernorm_lstm_forward": Autograd(_backward, _setup_context, reference.layernorm_lstm_forward,
                                                 (0, 1, 2))},
    triton_module="seqkern.kernels.layernorm_lstm",
)


# --------------------------------------------------------------------------------------------------
# Functional API (what seqkern.nn calls).
# --------------------------------------------------------------------------------------------------
def layernorm_lstm_layer(
    input: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
    ln_ih_weight: Tensor, ln_ih_bias: Tensor, ln_hh_weight: Tensor, ln_hh_bias: Tensor, ln_cell_weight: Tensor,
    ln_cell_bias: Tensor, eps: float = 1e-5, lengths: Tensor | None = None, resets: Tensor | None = None,
    zoneout: float = 0.0, zoneout_seed: Tensor | None = None, reverse: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """One LayerNorm LSTM layer in one direction: input (T,B,I), h0, c0 (B,H) -> output (T,B,H), h_n, c_n.

    Differentiable with respect to every tensor argument. Arguments are not validated here beyond the ops'
    contract: seqkern.nn.LayerNormLSTM does that with messages in its own terms.
    """
    impl = _impl(input)
    params = (input, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias,
              ln_cell_weight, ln_cell_bias)
    args = (*params, eps, lengths, resets, zoneout, zoneout_seed, reverse)
    if impl == "reference":
        return reference.layernorm_lstm_forward(*args, False)[:3]
    with kernel_scope(impl, input.device):
        return run_op("layernorm_lstm_forward", *args, needs_grad(*params))[:3]
