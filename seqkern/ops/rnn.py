"""The Elman RNN ops: fake implementations, autograd formulas, Triton registration, and the functional API.

torch.ops.seqkern.rnn_forward / rnn_backward run one layer in one direction over a whole sequence;
rnn_cell_forward / rnn_cell_backward are the fused bias + activation of one cell step (seqkern/ops/_schemas.py has
the contracts). `rnn_layer` and `rnn_cell` pick the implementation (seqkern.backend).
"""
from __future__ import annotations

import torch
from torch import Tensor

from seqkern import backends, reference
from seqkern.ops._contract import Contract
from seqkern.ops._registry import (
    Autograd, empty, kernel_scope, lengths_as_batch_sizes, register_ops, run_op, save_inputs, saved_inputs,
    state_flag_route, zeros_if_none,
)

SUPPORTED_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16),
    "triton": (torch.float32, torch.float64, torch.bfloat16, torch.float16),  # math in float32
}
# The backends whose kernels implement lengths and resets; elsewhere a call using them runs the reference.
STATE_FLAG_BACKENDS = ("triton", "cpu")
# Where lengths alone run as the rows sorted by length through batch_sizes: see seqkern/ops/lstm.py.
SORTED_LENGTHS_BACKENDS = ("cpu",)


# Fake implementations: the ops' contract (shapes, dtypes; see _contract.py) and their result shapes.
def _check_layer(contract: Contract, input, h0, w_ih, w_hh, batch_sizes, lengths, resets, reverse):
    """The arguments both layer ops share -> (T, B, I, H, H)."""
    sizes = contract.layer(1, input, h0, w_ih, w_hh)
    contract.batch_sizes(batch_sizes, sizes[0])
    contract.state_flags(input, batch_sizes, lengths, resets, reverse)
    return sizes


def _rnn_forward_fake(input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, lengths, resets, reverse, relu):
    contract = Contract("rnn_forward")
    seq_len, batch, _, hidden, _ = _check_layer(contract, input, h0, w_ih, w_hh, batch_sizes, lengths, resets,
                                                reverse)
    contract.biases(b_ih, b_hh, hidden, input)
    return input.new_empty(seq_len, batch, hidden), h0.new_empty(h0.shape)


def _rnn_backward_fake(grad_output, grad_h_n, input, h0, w_ih, w_hh, output, batch_sizes, lengths, resets, reverse,
                       relu, has_bias):
    contract = Contract("rnn_backward")
    seq_len, batch, _, hidden, _ = _check_layer(contract, input, h0, w_ih, w_hh, batch_sizes, lengths, resets,
                                                reverse)
    contract.tensor(grad_output, input, (seq_len, batch, hidden), "grad_output")
    contract.tensor(grad_h_n, input, (batch, hidden), "grad_h_n")
    contract.tensor(output, input, (seq_len, batch, hidden), "output")
    bias = w_ih.new_empty(w_ih.shape[0]) if has_bias else empty(w_ih)
    return input.new_empty(input.shape), h0.new_empty(h0.shape), w_ih.new_empty(w_ih.shape), w_hh.new_empty(w_hh.shape), bias


def _rnn_cell_forward_fake(gates_x, gates_h, b_ih, b_hh, relu):
    contract = Contract("rnn_cell_forward")
    batch, hidden = contract.cell_state(gates_x, "gates_x")
    contract.tensor(gates_h, gates_x, (batch, hidden), "gates_h")
    contract.biases(b_ih, b_hh, hidden, gates_x)
    return gates_x.new_empty(gates_x.shape)


def _rnn_cell_backward_fake(grad_hy, hy, relu, has_bias):
    contract = Contract("rnn_cell_backward")
    batch, hidden = contract.cell_state(hy, "hy")
    contract.tensor(grad_hy, hy, (batch, hidden), "grad_hy")
    return hy.new_empty(hy.shape), hy.new_empty(hidden) if has_bias else empty(hy)


def _rnn_setup_context(ctx, inputs, output):
    _, _, _, _, b_ih, *_, reverse, relu = inputs
    ctx.reverse, ctx.relu, ctx.has_bias = reverse, relu, b_ih is not None
    save_inputs(ctx, inputs, output[0])


def _rnn_backward(ctx, grad_output, grad_h_n):
    (input, h0, w_ih, w_hh, _, _, batch_sizes, lengths, resets, _, _), (out,) = saved_inputs(ctx)
    with kernel_scope(_impl(input), input.device):
        grad_input, grad_h0, grad_w_ih, grad_w_hh, grad_bias = torch.ops.seqkern.rnn_backward(
            zeros_if_none(grad_output, out), zeros_if_none(grad_h_n, h0), input, h0, w_ih, w_hh, out, batch_sizes,
            lengths, resets, ctx.reverse, ctx.relu, ctx.has_bias,
        )
    bias = grad_bias if ctx.has_bias else None
    # No gradient for batch_sizes, lengths, resets, reverse, relu.
    return (grad_input, grad_h0, grad_w_ih, grad_w_hh, bias, bias) + (None,) * 5


def _rnn_cell_setup_context(ctx, inputs, output):
    ctx.relu, ctx.has_bias = inputs[4], inputs[2] is not None
    # gates_x and gates_h are saved only for a double backward's recompute: references, no copies.
    save_inputs(ctx, inputs, output)


def _rnn_cell_backward(ctx, grad_hy):
    _, (hy,) = saved_inputs(ctx)
    with kernel_scope(_impl(hy), hy.device):
        grad_preact, grad_bias = torch.ops.seqkern.rnn_cell_backward(zeros_if_none(grad_hy, hy), hy, ctx.relu,
                                                                     ctx.has_bias)
    bias = grad_bias if ctx.has_bias else None
    return grad_preact, grad_preact, bias, bias, None


def _impl(like: Tensor) -> str:
    return backends.resolve("rnn", like.device, like.dtype, SUPPORTED_DTYPES)


register_ops(
    fakes={
        "rnn_forward": _rnn_forward_fake,
        "rnn_backward": _rnn_backward_fake,
        "rnn_cell_forward": _rnn_cell_forward_fake,
        "rnn_cell_backward": _rnn_cell_backward_fake,
    },
    autograd={
        "rnn_forward": Autograd(_rnn_backward, _rnn_setup_context, reference.rnn_forward, (0, 1)),
        "rnn_cell_forward": Autograd(_rnn_cell_backward, _rnn_cell_setup_context, reference.rnn_cell_forward, (0,)),
    },
    triton_module="seqkern.kernels.rnn",
)


def rnn_layer(
    input: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
    batch_sizes: Tensor | None = None, reverse: bool = False, relu: bool = False, *,
    lengths: Tensor | None = None, resets: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One Elman RNN layer in one direction: input (T,B,I), h0 (B,H) -> output (T,B,H), h_n (B,H).
    lengths (B,) int64, resets (T,B) bool: seqkern/ops/_schemas.py."""
    impl = _impl(input)
    route = state_flag_route(impl, STATE_FLAG_BACKENDS, lengths, resets, sorted_lengths=SORTED_LENGTHS_BACKENDS)
    if route == "sorted":
        order, inverse, sizes = lengths_as_batch_sizes(lengths, input.shape[0])
        output, h_n = rnn_layer(input.index_select(1, order), h0.index_select(0, order), w_ih, w_hh, b_ih, b_hh,
                                sizes, reverse, relu)
        return output.index_select(1, inverse), h_n.index_select(0, inverse)
    args = (input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, lengths, resets, reverse, relu)
    if route == "reference":
        return reference.rnn_forward(*args)
    with kernel_scope(impl, input.device):
        return run_op("rnn_forward", *args)


def rnn_cell(gates_x: Tensor, gates_h: Tensor, b_ih: Tensor | None, b_hh: Tensor | None, relu: bool) -> Tensor:
    """Bias and activation of an Elman step: gates_x, gates_h (B,H) -> hy (B,H)."""
    impl = _impl(gates_x)
    if impl == "reference":
        return reference.rnn_cell_forward(gates_x, gates_h, b_ih, b_hh, relu)
    with kernel_scope(impl, gates_x.device):
        return run_op("rnn_cell_forward", gates_x, gates_h, b_ih, b_hh, relu)
