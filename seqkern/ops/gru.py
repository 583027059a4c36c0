"""The GRU ops: fake implementations, autograd formulas, Triton registration, and the functional API.

torch.ops.seqkern.gru_forward / gru_backward run one layer in one direction over a whole sequence;
gru_cell_forward / gru_cell_backward are the fused pointwise part of one cell step (seqkern/ops/_schemas.py has the
contracts). `gru_layer` and `gru_cell` pick the implementation (seqkern.backend); the modules call them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from seqkern import backends, reference
from seqkern.ops._contract import Contract
from seqkern.ops._registry import (
    Autograd, empty, kernel_scope, lengths_as_batch_sizes, needs_grad, register_ops, run_op, save_inputs,
    saved_inputs, state_flag_route, zeros_if_none,
)

SUPPORTED_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16),
    "triton": (torch.float32, torch.float64, torch.bfloat16, torch.float16),  # math in float32
}
# The backends whose kernels implement lengths, resets and zoneout; elsewhere a call using them runs the reference.
STATE_FLAG_BACKENDS = ("triton", "cpu")
# Where lengths alone run as the rows sorted by length through batch_sizes: see seqkern/ops/lstm.py.
SORTED_LENGTHS_BACKENDS = ("cpu",)


# Fake implementations: the ops' contract (shapes, dtypes; see _contract.py) and their result shapes.
def _check_layer(contract: Contract, input, h0, w_ih, w_hh, batch_sizes, lengths, resets, zoneout, zoneout_seed,
                 reverse):
    """The arguments both layer ops share -> (T, B, I, H, H)."""
    sizes = contract.layer(3, input, h0, w_ih, w_hh)
    contract.batch_sizes(batch_sizes, sizes[0])
    contract.state_flags(input, batch_sizes, lengths, resets, reverse, zoneout, zoneout_seed)
    return sizes


def _gru_forward_fake(input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, lengths, resets, zoneout, zoneout_seed,
                      reverse, save_workspace):
    contract = Contract("gru_forward")
    seq_len, batch, _, hidden, _ = _check_layer(contract, input, h0, w_ih, w_hh, batch_sizes, lengths, resets,
                                                zoneout, zoneout_seed, reverse)
    contract.biases(b_ih, b_hh, 3 * hidden, input)
    workspace = input.new_empty(seq_len, batch, 4 * hidden) if save_workspace else empty(input)
    return input.new_empty(seq_len, batch, hidden), h0.new_empty(h0.shape), workspace


def _gru_backward_fake(grad_output, grad_h_n, input, h0, w_ih, w_hh, output, workspace, batch_sizes, lengths,
                       resets, zoneout, zoneout_seed, reverse, has_bias):
    contract = Contract("gru_backward")
    seq_len, batch, _, hidden, _ = _check_layer(contract, input, h0, w_ih, w_hh, batch_sizes, lengths, resets,
                                                zoneout, zoneout_seed, reverse)
    contract.tensor(grad_output, input, (seq_len, batch, hidden), "grad_output")
    contract.tensor(grad_h_n, input, (batch, hidden), "grad_h_n")
    contract.tensor(output, input, (seq_len, batch, hidden), "output")
    contract.tensor(workspace, input, (seq_len, batch, 4 * hidden), "workspace (the forward's)")
    bias = w_ih.new_empty(w_ih.shape[0]) if has_bias else empty(w_ih)
    return (input.new_empty(input.shape), h0.new_empty(h0.shape), w_ih.new_empty(w_ih.shape),
            w_hh.new_empty(w_hh.shape), bias, bias.clone())


def _gru_cell_forward_fake(gates_x, gates_h, hx, b_ih, b_hh):
    contract = Contract("gru_cell_forward")
    batch, hidden = contract.cell_state(hx, "hx")
    contract.tensor(gates_x, hx, (batch, 3 * hidden), "gates_x")
    contract.tensor(gates_h, hx, (batch, 3 * hidden), "gates_h")
    contract.biases(b_ih, b_hh, 3 * hidden, hx)
    return hx.new_empty(hx.shape), hx.new_empty(batch, 4 * hidden)


def _gru_cell_backward_fake(grad_hy, hx, workspace, has_bias):
    contract = Contract("gru_cell_backward")
    batch, hidden = contract.cell_state(hx, "hx")
    contract.tensor(grad_hy, hx, (batch, hidden), "grad_hy")
    contract.tensor(workspace, hx, (batch, 4 * hidden), "workspace")
    gates = hx.new_empty(batch, 3 * hidden)
    bias = hx.new_empty(3 * hidden) if has_bias else empty(hx)
    return gates, gates.clone(), hx.new_empty(hx.shape), bias, bias.clone()


def _gru_setup_context(ctx, inputs, output):
    _, _, _, _, b_ih, *_, reverse, save_workspace = inputs
    out, _, workspace = output
    ctx.reverse, ctx.has_bias, ctx.saved_workspace = reverse, b_ih is not None, save_workspace
    # The zoneout masks are not saved: the backward redraws them from zoneout_seed (an input, saved as such).
    save_inputs(ctx, inputs, out, workspace)


def _gru_backward(ctx, grad_output, grad_h_n, _grad_workspace):
    (input, h0, w_ih, w_hh, _, _, *flags, _, _), (out, workspace) = saved_inputs(ctx)
    if not ctx.saved_workspace:
        raise RuntimeError("seqkern.gru_forward was called with save_workspace=False: it cannot be differentiated")
    with kernel_scope(_impl(input), input.device):
        grads = torch.ops.seqkern.gru_backward(
            zeros_if_none(grad_output, out), zeros_if_none(grad_h_n, h0), input, h0, w_ih, w_hh, out, workspace,
            *flags, ctx.reverse, ctx.has_bias,
        )
    grad_input, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh = grads
    if not ctx.has_bias:
        grad_b_ih = grad_b_hh = None
    # No gradient for batch_sizes, lengths, resets, zoneout, zoneout_seed, reverse, save_workspace.
    return (grad_input, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh) + (None,) * 7


def _gru_cell_setup_context(ctx, inputs, output):
    ctx.has_bias = inputs[3] is not None
    # gates_x and gates_h are saved only for a double backward's recompute (as torch's own fused GRU cell does).
    save_inputs(ctx, inputs, output[1])


def _gru_cell_backward(ctx, grad_hy, _grad_workspace):
    (_, _, hx, _, _), (workspace,) = saved_inputs(ctx)
    with kernel_scope(_impl(hx), hx.device):
        grad_gates_x, grad_gates_h, grad_hx, grad_b_ih, grad_b_hh = torch.ops.seqkern.gru_cell_backward(
            zeros_if_none(grad_hy, hx), hx, workspace, ctx.has_bias
        )
    if not ctx.has_bias:
        grad_b_ih = grad_b_hh = None
    return grad_gates_x, grad_gates_h, grad_hx, grad_b_ih, grad_b_hh


def _impl(like: Tensor) -> str:
    return backends.resolve("gru", like.device, like.dtype, SUPPORTED_DTYPES)


register_ops(
    fakes={
        "gru_forward": _gru_forward_fake,
        "gru_backward": _gru_backward_fake,
        "gru_cell_forward": _gru_cell_forward_fake,
        "gru_cell_backward": _gru_cell_backward_fake,
    },
    autograd={
        "gru_forward": Autograd(_gru_backward, _gru_setup_context, reference.gru_forward, (0, 1)),
        "gru_cell_forward": Autograd(_gru_cell_backward, _gru_cell_setup_context, reference.gru_cell_forward, (0,)),
    },
    triton_module="seqkern.kernels.gru",
)


def gru_layer(
    input: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
    batch_sizes: Tensor | None = None, reverse: bool = False, *, lengths: Tensor | None = None,
    resets: Tensor | None = None, zoneout: float = 0.0, zoneout_seed: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One GRU layer in one direction: input (T,B,I), h0 (B,H) -> output (T,B,H), h_n (B,H). Differentiable.
    lengths (B,) int64, resets (T,B) bool, zoneout, zoneout_seed: seqkern/ops/_schemas.py."""
    impl = _impl(input)
    route = state_flag_route(impl, STATE_FLAG_BACKENDS, lengths, resets, zoneout, SORTED_LENGTHS_BACKENDS)
    if route == "sorted":
        order, inverse, sizes = lengths_as_batch_sizes(lengths, input.shape[0])
        output, h_n = gru_layer(input.index_select(1, order), h0.index_select(0, order), w_ih, w_hh, b_ih, b_hh,
                                sizes, reverse)
        return output.index_select(1, inverse), h_n.index_select(0, inverse)
    save_workspace = needs_grad(input, h0, w_ih, w_hh, b_ih, b_hh)
    args = (input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, lengths, resets, zoneout, zoneout_seed, reverse)
    if route == "reference":
        return reference.gru_forward(*args, False)[:2]
    with kernel_scope(impl, input.device):
        return run_op("gru_forward", *args, save_workspace)[:2]


def gru_cell(gates_x: Tensor, gates_h: Tensor, hx: Tensor, b_ih: Tensor | None, b_hh: Tensor | None) -> Tensor:
    """The fused pointwise part of a GRU step: gates_x, gates_h (B,3H), hx (B,H) -> hy (B,H)."""
    impl = _impl(hx)
    if impl == "reference":
        return reference.gru_cell_forward(gates_x, gates_h, hx, b_ih, b_hh)[0]
    with kernel_scope(impl, hx.device):
        return run_op("gru_cell_forward", gates_x, gates_h, hx, b_ih, b_hh)[0]
