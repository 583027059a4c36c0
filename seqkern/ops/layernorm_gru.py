"""The LayerNorm GRU ops: fake implementations, autograd formula, Triton registration, and the functional API.

torch.ops.seqkern.layernorm_gru_forward / _backward run one layer in one direction over a whole sequence, with
lengths, resets and zoneout (contracts in seqkern/ops/_schemas.py, definition in
seqkern/reference/layernorm_gru.py). `layernorm_gru_layer` is what seqkern.nn.LayerNormGRU calls.
"""
from __future__ import annotations

import torch
from torch import Tensor

from seqkern import backends, reference
from seqkern.ops._contract import Contract
from seqkern.ops._registry import (
    Autograd, empty, kernel_scope, needs_grad, register_ops, run_op, save_inputs, saved_inputs, zeros_if_none,
)
from seqkern.ops.layernorm_lstm import (
    GRU_WORKSPACE, SUPPORTED_DTYPES, accumulation_dtype, check_layer_norms, check_options, workspace_width,
)


def _check_layer(contract, input, h0, w_ih, w_hh, ln_ih_weight, ln_hh_weight, lengths, resets, zoneout,
                 zoneout_seed, reverse):
    seq_len, batch, _, hidden, _ = contract.layer(3, input, h0, w_ih, w_hh)
    check_layer_norms(contract, input, ln_ih_weight=(ln_ih_weight, 3 * hidden), ln_hh_weight=(ln_hh_weight, 3 * hidden))
    check_options(contract, seq_len, batch, input, lengths, resets, zoneout, zoneout_seed, reverse)
    return seq_len, batch, hidden


def _forward_fake(input, h0, w_ih, w_hh, b_ih, b_hh, ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias, eps,
                  lengths, resets, zoneout, zoneout_seed, reverse, save_workspace):
    contract = Contract("layernorm_gru_forward")
    seq_len, batch, hidden = _check_layer(contract, input, h0, w_ih, w_hh, ln_ih_weight, ln_hh_weight, lengths,
                                          resets, zoneout, zoneout_seed, reverse)
    contract.biases(b_ih, b_hh, 3 * hidden, input)
    check_layer_norms(contract, input, ln_ih_bias=(ln_ih_bias, 3 * hidden), ln_hh_bias=(ln_hh_bias, 3 * hidden))
    workspace = (input.new_empty(seq_len, batch, workspace_width(GRU_WORKSPACE, hidden),
                                 dtype=accumulation_dtype(input.dtype)) if save_workspace else empty(input))
    return input.new_empty(seq_len, batch, hidden), h0.new_empty(h0.shape), workspace


def _backward_fake(grad_output, grad_h_n, input, h0, w_ih, w_hh, ln_ih_weight, ln_hh_weight, output, workspace,
                   lengths, resets, zoneout, zoneout_seed, reverse):
    contract = Contract("layernorm_gru_backward")
    seq_len, batch, hidden = _check_layer(contract, input, h0, w_ih, w_hh, ln_ih_weight, ln_hh_weight, lengths,
                                          resets, zoneout, zoneout_seed, reverse)
    contract.tensor(grad_output, input, (seq_len, batch, hidden), "grad_output")
    contract.tensor(grad_h_n, input, (batch, hidden), "grad_h_n")
    contract.tensor(output, input, (seq_len, batch, hidden), "output")
    contract.tensor(workspace, input, (seq_len, batch, workspace_width(GRU_WORKSPACE, hidden)),
                    "workspace (the forward's)", dtype=accumulation_dtype(input.dtype))
    gates = 3 * hidden
    return (input.new_empty(input.shape), h0.new_empty(h0.shape), w_ih.new_empty(w_ih.shape),
            w_hh.new_empty(w_hh.shape), *(input.new_empty(gates) for _ in range(4)))


def _setup_context(ctx, inputs, output):
    ctx.has_bias, ctx.saved_workspace = inputs[4] is not None, inputs[-1]
    save_inputs(ctx, inputs, output[0], output[2])


def _backward(ctx, grad_output, grad_h_n, _grad_workspace):
    inputs, (out, workspace) = saved_inputs(ctx)
    (input, h0, w_ih, w_hh, _, _, ln_ih_weight, _, ln_hh_weight, _, _, lengths, resets, zoneout, zoneout_seed,
     reverse, _) = inputs
    if not ctx.saved_workspace:
        raise RuntimeError(
            "seqkern.layernorm_gru_forward was called with save_workspace=False: it cannot be differentiated")
    with kernel_scope(_impl(input), input.device):
        grads = torch.ops.seqkern.layernorm_gru_backward(
            zeros_if_none(grad_output, out), zeros_if_none(grad_h_n, h0), input, h0, w_ih, w_hh, ln_ih_weight,
            ln_hh_weight, out, workspace, lengths, resets, zoneout, zoneout_seed, reverse)
    grad_input, grad_h0, grad_w_ih, grad_w_hh, grad_bias_x, grad_bias_h, grad_ln_ih_w, grad_ln_hh_w = grads
    b_ih, b_hh = (grad_bias_x, grad_bias_h) if ctx.has_bias else (None, None)
    return (grad_input, grad_h0, grad_w_ih, grad_w_hh, b_ih, b_hh, grad_ln_ih_w, grad_bias_x, grad_ln_hh_w,
            grad_bias_h, None, None, None, None, None, None, None)


def _impl(like: Tensor) -> str:
    return backends.resolve("layernorm_gru", like.device, like.dtype, SUPPORTED_DTYPES, kernel="layernorm_gru_forward")


register_ops(
    fakes={"layernorm_gru_forward": _forward_fake, "layernorm_gru_backward": _backward_fake},
    autograd={"layernorm_gru_forward": Autograd(_backward, _setup_context, reference.layernorm_gru_forward, (0, 1))},
    triton_module="seqkern.kernels.layernorm_gru",
)


def layernorm_gru_layer(
    input: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
    ln_ih_weight: Tensor, ln_ih_bias: Tensor, ln_hh_weight: Tensor, ln_hh_bias: Tensor, eps: float = 1e-5,
    lengths: Tensor | None = None, resets: Tensor | None = None, zoneout: float = 0.0,
    zoneout_seed: Tensor | None = None, reverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """One LayerNorm GRU layer in one direction: input (T,B,I), h0 (B,H) -> output (T,B,H), h_n (B,H).
    Differentiable with respect to every tensor argument."""
    impl = _impl(input)
    params = (input, h0, w_ih, w_hh, b_ih, b_hh, ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias)
    args = (*params, eps, lengths, resets, zoneout, zoneout_seed, reverse)
    if impl == "reference":
        return reference.layernorm_gru_forward(*args, False)[:2]
    with kernel_scope(impl, input.device):
        return run_op("layernorm_gru_forward", *args, needs_grad(*params))[:2]
