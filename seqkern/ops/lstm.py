"""The LSTM ops: fake implementations, autograd formulas, Triton registration, and the functional API.

torch.ops.seqkern.lstm_forward / lstm_backward run one layer in one direction over a whole sequence;
lstm_cell_forward / lstm_cell_backward are the fused pointwise part of one cell step. Their contracts
(shapes, batch_sizes, empty results) are in seqkern/ops/_schemas.py. `lstm_layer` and `lstm_cell` below pick the
implementation (seqkern.backend) and are what the modules call.
"""
from __future__ import annotations

import torch
from torch import Tensor

from seqkern import backends, reference
from seqkern.ops._contract import Contract
from seqkern.ops._registry import empty as _empty
from seqkern.ops._registry import (
    Autograd, kernel_scope, lengths_as_batch_sizes, needs_grad, register_ops, run_op, save_inputs, saved_inputs,
    state_flag_route, zeros_if_none,
)

SUPPORTED_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16),
    "triton": (torch.float32, torch.float64, torch.bfloat16, torch.float16),  # math in float32
}
# The backends whose kernels implement lengths, resets and zoneout; elsewhere a call using them runs the reference.
STATE_FLAG_BACKENDS = ("triton", "cpu")
# Where lengths alone run as the rows sorted by length through batch_sizes rather than through the kernel's own
# lengths: the C++ engine's step GEMM covers the leading batch_sizes[t] rows, the active ones of a sorted batch,
# while with unsorted lengths it covers all B rows and the cell skips the inactive ones (lengths 10..100 at T = 100:
# ~1.8x the recurrent GEMM work). Measured (b32 t100 h256 fp32, lengths 10..100, one thread, process CPU time,
# interleaved medians, Intel Xeon with AMX at load ~3), kernel lengths vs sorted rows: LSTM inference 33.4 vs
# 28.4 ms, training 118.3 vs 110.3; GRU 25.4 vs 21.0, 92.4 vs 81.8. The kernel's lengths serve lengths with resets
# or zoneout.
SORTED_LENGTHS_BACKENDS = ("cpu",)


# --------------------------------------------------------------------------------------------------
# Fake (meta) implementations: the ops' contract (shapes, dtypes; see _contract.py) and their result shapes,
# for torch.compile and opcheck.
# --------------------------------------------------------------------------------------------------
def _check_layer(contract: Contract, input, h0, c0, w_ih, w_hh, w_hr, batch_sizes, lengths, resets, zoneout,
                 zoneout_seed, reverse):
    """The arguments both layer ops share -> (T, B, I, H, P)."""
    sizes = contract.layer(4, input, h0, w_ih, w_hh, w_hr)
    seq_len, batch, _, hidden, _ = sizes
    contract.tensor(c0, input, (batch, hidden), "c0")
    contract.batch_sizes(batch_sizes, seq_len)
    contract.state_flags(input, batch_sizes, lengths, resets, reverse, zoneout, zoneout_seed)
    return sizes


def _lstm_forward_fake(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, lengths, resets, zoneout,
                       zoneout_seed, reverse, save_workspace):
    contract = Contract("lstm_forward")
    seq_len, batch, _, hidden, out_size = _check_layer(contract, input, h0, c0, w_ih, w_hh, w_hr, batch_sizes,
                                                       lengths, resets, zoneout, zoneout_seed, reverse)
    contract.biases(b_ih, b_hh, 4 * hidden, input)
    output = input.new_empty(seq_len, batch, out_size)
    if save_workspace:
        gates, cells = input.new_empty(seq_len, batch, 4 * hidden), input.new_empty(seq_len, batch, hidden)
    else:
        gates, cells = _empty(input), _empty(input)
    return output, h0.new_empty(h0.shape), c0.new_empty(c0.shape), gates, cells


def _lstm_backward_fake(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, w_hr, output, gates,
                        cells, batch_sizes, lengths, resets, zoneout, zoneout_seed, reverse, has_bias):
    contract = Contract("lstm_backward")
    seq_len, batch, _, hidden, out_size = _check_layer(contract, input, h0, c0, w_ih, w_hh, w_hr, batch_sizes,
                                                       lengths, resets, zoneout, zoneout_seed, reverse)
    contract.tensor(grad_output, input, (seq_len, batch, out_size), "grad_output")
    contract.tensor(grad_h_n, input, (batch, out_size), "grad_h_n")
    contract.tensor(grad_c_n, input, (batch, hidden), "grad_c_n")
    contract.tensor(output, input, (seq_len, batch, out_size), "output")
    contract.tensor(gates, input, (seq_len, batch, 4 * hidden), "gates (the forward's workspace)")
    contract.tensor(cells, input, (seq_len, batch, hidden), "cells (the forward's workspace)")
    grad_bias = w_ih.new_empty(w_ih.shape[0]) if has_bias else _empty(w_ih)
    grad_w_hr = w_hr.new_empty(w_hr.shape) if w_hr is not None else _empty(w_ih)
    return (input.new_empty(input.shape), h0.new_empty(h0.shape), c0.new_empty(c0.shape),
            w_ih.new_empty(w_ih.shape), w_hh.new_empty(w_hh.shape), grad_bias, grad_w_hr)


def _lstm_cell_forward_fake(gates_x, gates_h, cx, b_ih, b_hh):
    contract = Contract("lstm_cell_forward")
    batch, hidden = contract.cell_state(cx, "cx")
    contract.tensor(gates_x, cx, (batch, 4 * hidden), "gates_x")
    contract.tensor(gates_h, cx, (batch, 4 * hidden), "gates_h")
    contract.biases(b_ih, b_hh, 4 * hidden, cx)
    return cx.new_empty(cx.shape), cx.new_empty(cx.shape), gates_x.new_empty(gates_x.shape)


def _lstm_cell_backward_fake(grad_hy, grad_cy, cx, cy, workspace, has_bias):
    contract = Contract("lstm_cell_backward")
    batch, hidden = contract.cell_state(cx, "cx")
    for name, t in (("grad_hy", grad_hy), ("grad_cy", grad_cy), ("cy", cy)):
        contract.tensor(t, cx, (batch, hidden), name)
    contract.tensor(workspace, cx, (batch, 4 * hidden), "workspace")
    grad_bias = workspace.new_empty(workspace.shape[-1]) if has_bias else _empty(workspace)
    return workspace.new_empty(workspace.shape), cx.new_empty(cx.shape), grad_bias


# --------------------------------------------------------------------------------------------------
# Autograd.
# --------------------------------------------------------------------------------------------------
def _lstm_setup_context(ctx, inputs, output):
    _, _, _, _, _, b_ih, _, w_hr, *_, reverse, save_workspace = inputs
    out, _, _, gates, cells = output
    ctx.reverse, ctx.has_bias, ctx.has_proj = reverse, b_ih is not None, w_hr is not None
    ctx.saved_workspace = save_workspace
    # The zoneout masks are not saved: the backward redraws them from zoneout_seed (an input, saved as such).
    save_inputs(ctx, inputs, out, gates, cells)


def _lstm_backward(ctx, grad_output, grad_h_n, grad_c_n, _grad_gates, _grad_cells):
    (input, h0, c0, w_ih, w_hh, _, _, w_hr, *flags, _, _), (out, gates, cells) = saved_inputs(ctx)
    if not ctx.saved_workspace:
        raise RuntimeError("seqkern.lstm_forward was called with save_workspace=False: it cannot be differentiated")
    with kernel_scope(_impl_for_backward(input), input.device):
        grads = torch.ops.seqkern.lstm_backward(
            zeros_if_none(grad_output, out), zeros_if_none(grad_h_n, h0), zeros_if_none(grad_c_n, c0),
            input, h0, c0, w_ih, w_hh, w_hr, out, gates, cells, *flags, ctx.reverse, ctx.has_bias,
        )
    grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr = grads
    bias_grad = grad_bias if ctx.has_bias else None
    # No gradient for batch_sizes, lengths, resets, zoneout, zoneout_seed, reverse, save_workspace.
    return (grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, bias_grad, bias_grad,
            grad_w_hr if ctx.has_proj else None) + (None,) * 7


def _lstm_cell_setup_context(ctx, inputs, output):
    _, cy, workspace = output
    ctx.has_bias = inputs[3] is not None
    # gates_x and gates_h are saved only for a double backward's recompute (as torch's own fused LSTM cell
    # does): references that keep them alive, no copies.
    save_inputs(ctx, inputs, cy, workspace)


def _lstm_cell_backward(ctx, grad_hy, grad_cy, _grad_workspace):
    (_, _, cx, _, _), (cy, workspace) = saved_inputs(ctx)
    with kernel_scope(_impl_for_backward(cx), cx.device):
        grad_gates, grad_cx, grad_bias = torch.ops.seqkern.lstm_cell_backward(
            zeros_if_none(grad_hy, cy), zeros_if_none(grad_cy, cy), cx, cy, workspace, ctx.has_bias
        )
    bias_grad = grad_bias if ctx.has_bias else None
    return grad_gates, grad_gates, grad_cx, bias_grad, bias_grad


def _impl_for_backward(like: Tensor) -> str:
    """The backward runs on the backend in force when it runs (the forward's, inside a backend block)."""
    return backends.resolve("lstm", like.device, like.dtype, SUPPORTED_DTYPES)


register_ops(
    fakes={
        "lstm_forward": _lstm_forward_fake,
        "lstm_backward": _lstm_backward_fake,
        "lstm_cell_forward": _lstm_cell_forward_fake,
        "lstm_cell_backward": _lstm_cell_backward_fake,
    },
    autograd={
        "lstm_forward": Autograd(_lstm_backward, _lstm_setup_context, reference.lstm_forward, (0, 1, 2)),
        "lstm_cell_forward": Autograd(_lstm_cell_backward, _lstm_cell_setup_context, reference.lstm_cell_forward,
                                      (0, 1)),
    },
    triton_module="seqkern.kernels.lstm",
)


# --------------------------------------------------------------------------------------------------
# Functional API (what seqkern.nn calls).
# --------------------------------------------------------------------------------------------------
def lstm_layer(
    input: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
    b_hh: Tensor | None, w_hr: Tensor | None = None, batch_sizes: Tensor | None = None, reverse: bool = False,
    *, lengths: Tensor | None = None, resets: Tensor | None = None, zoneout: float = 0.0,
    zoneout_seed: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer in one direction: input (T,B,I), h0 (B,P), c0 (B,H) -> output (T,B,P), h_n, c_n.
    lengths (B,) int64, resets (T,B) bool, zoneout, zoneout_seed: seqkern/ops/_schemas.py.

    Differentiable with respect to every tensor argument. Arguments are not validated here: the modules
    of seqkern.nn do that with messages in their own terms (the kernels still refuse bad shapes).
    """
    impl = backends.resolve("lstm", input.device, input.dtype, SUPPORTED_DTYPES)
    route = state_flag_route(impl, STATE_FLAG_BACKENDS, lengths, resets, zoneout, SORTED_LENGTHS_BACKENDS)
    if route == "sorted":
        order, inverse, sizes = lengths_as_batch_sizes(lengths, input.shape[0])
        output, h_n, c_n = lstm_layer(input.index_select(1, order), h0.index_select(0, order),
                                      c0.index_select(0, order), w_ih, w_hh, b_ih, b_hh, w_hr, sizes, reverse)
        return output.index_select(1, inverse), h_n.index_select(0, inverse), c_n.index_select(0, inverse)
    save_workspace = needs_grad(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    args = (input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, lengths, resets, zoneout, zoneout_seed,
            reverse, save_workspace)
    if route == "reference":
        return reference.lstm_forward(*args[:-1], False)[:3]
    with kernel_scope(impl, input.device):
        return run_op("lstm_forward", *args)[:3]


def lstm_cell(
    gates_x: Tensor, gates_h: Tensor, cx: Tensor, b_ih: Tensor | None, b_hh: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The fused pointwise part of a cell step: gates_x, gates_h (B,4H), cx (B,H) -> hy, cy (B,H)."""
    impl = backends.resolve("lstm", cx.device, cx.dtype, SUPPORTED_DTYPES)
    if impl == "reference":
        return reference.lstm_cell_forward(gates_x, gates_h, cx, b_ih, b_hh)[:2]
    with kernel_scope(impl, cx.device):
        return run_op("lstm_cell_forward", gates_x, gates_h, cx, b_ih, b_hh)[:2]
