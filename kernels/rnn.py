"""Triton kernels for the Elman RNN ops (contracts in seqkern/ops/_schemas.py, oracle in seqkern/reference/rnn.py).

    h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh),  act = relu if RELU else tanh (one tl.constexpr flag).

Two kernel families share the activation and its derivative, which is read off the output (tanh' = 1 - y^2,
relu' = [not y <= 0], which passes a NaN output's gradient as torch does), so no workspace is saved:
  * the cell step (`rnn_cell_forward` / `rnn_cell_backward`): bias and activation on top of the two GEMMs
    the caller ran; the backward also sums the bias gradient over the batch in-kernel;
  * the whole sequence (`rnn_forward` / `rnn_backward`): the persistent time loop of kernels/_recurrent.py
    (input projection with both biases as one torch GEMM, then one launch over all T steps with
    h_{t-1} @ W_hh^T in-kernel; the weight gradients as torch GEMMs after the backward launch).

Supported dtypes: float32, float64, bfloat16, float16 (math in float32). The launchers take CPU tensors too:
kernels/_launch.py runs the kernels under the Triton interpreter then.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _recurrent_split
from ._launch import launch
from ._recurrent import (
    accumulator_dtype,
    add_hidden_gradient,
    add_hidden_projection,
    cell_blocks,
    check,
    check_biases,
    check_layer,
    check_state,
    column_sums,
    commit_hidden,
    contiguous_or_none,
    input_weight_gradients,
    kernel_dtypes,
    linear,
    on_device,
    recurrent_mode,
    recurrent_weight_gradient,
    reset_rows,
    restart_gradient,
    restart_hidden,
    state_flags,
    sequence_blocks,
    sequence_grid,
    sequence_tile,
    sm_count,
    step_rows,
    store,
    tanh,
)


# ==================================================================================================
# Activation, shared by the cell and the sequence kernels. Tiles are float32 (or float64).
# ==================================================================================================
@triton.jit
def _activate(preact, RELU: tl.constexpr):
    if RELU:  # a select, not tl.maximum (which may drop a NaN on a GPU): NaN stays NaN, as torch.relu
        return tl.where(preact < 0, 0, preact)
    return tanh(preact)


@triton.jit
def _preact_gradient(grad_hy, hy, RELU: tl.constexpr):
    """Gradient of the pre-activation from the output's gradient and the output itself."""
    if RELU:  # as torch's threshold_backward: only hy <= 0 blocks, so a NaN output passes the gradient
        return tl.where(hy <= 0, 0, grad_hy)
    return grad_hy * (1 - hy * hy)


@triton.jit
def split_cell(x, hh, state, RELU: tl.constexpr):
    """The cell of the split kernels (kernels/_recurrent_split.py): input and hidden parts of the one gate
    -> h_t, the (unused) state, and h_t four times for the workspace slots (the RNN saves none)."""
    h = _activate(x + hh, RELU)
    return h, state, h, h, h, h


@triton.jit
def split_cell_backward(grad_h, hy, RELU: tl.constexpr):
    """The cell backward of the split kernels: the gradient reaching h_t and h_t -> the pre-activation gradient
    (in the first of the four slots; the RNN stores one), no bypass of W_hh, no cell gradient."""
    grad_pre = _preact_gradient(grad_h, hy, RELU)
    zeros = tl.zeros(grad_h.shape, grad_h.dtype)
    return grad_pre, grad_pre, grad_pre, grad_pre, zeros, zeros


# ==================================================================================================
# Cell step kernels. Grid: forward (batch blocks, hidden blocks); backward (hidden blocks,) so that one
# program owns whole columns of the bias gradient and sums them without atomics (deterministic).
# ==================================================================================================
@triton.jit
def _rnn_cell_forward_kernel(
    gates_x_ptr, gates_h_ptr, b_ih_ptr, b_hh_ptr,  # (B,H), (B,H), (H,), (H,)
    hy_ptr,  # out (B,H)
    B, H,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_mask = cols < H
    mask = (rows[:, None] < B) & col_mask[None, :]
    offsets = rows[:, None] * H + cols[None, :]
    preact = tl.load(gates_x_ptr + offsets, mask=mask, other=0).to(ACC)
    preact += tl.load(gates_h_ptr + offsets, mask=mask, other=0).to(ACC)
    if HAS_BIAS:
        preact += tl.load(b_ih_ptr + cols, mask=col_mask, other=0).to(ACC)[None, :]
        preact += tl.load(b_hh_ptr + cols, mask=col_mask, other=0).to(ACC)[None, :]
    store(hy_ptr + offsets, _activate(preact, RELU), mask)


@triton.jit
def _rnn_cell_backward_kernel(
    grad_hy_ptr, hy_ptr,  # (B,H), (B,H)
    grad_preact_ptr, grad_bias_ptr,  # out (B,H), (H,)
    B, H,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_mask = cols < H
    grad_bias = tl.zeros((BLOCK_H,), ACC)
    for first_row in range(0, B, BLOCK_B):
        rows = first_row + tl.arange(0, BLOCK_B)
        mask = (rows[:, None] < B) & col_mask[None, :]
        offsets = rows[:, None] * H + cols[None, :]
        grad_hy = tl.load(grad_hy_ptr + offsets, mask=mask, other=0).to(ACC)
        hy = tl.load(hy_ptr + offsets, mask=mask, other=0).to(ACC)
        # Masked-out rows load zeros, so their gradients are exactly zero in the sum below.
        grad_preact = _preact_gradient(grad_hy, hy, RELU)
        store(grad_preact_ptr + offsets, grad_preact, mask)
        if HAS_BIAS:
            grad_bias += tl.sum(grad_preact, axis=0)
    if HAS_BIAS:
        store(grad_bias_ptr + cols, grad_bias, col_mask)


# ==================================================================================================
# Whole-sequence kernels. Grid: (batch blocks,); each program runs every time step for its rows.
# ==================================================================================================
@triton.jit(do_not_specialize=["T"])
def _rnn_sequence_forward_kernel(
    gates_x_ptr,  # (T,B,H) input @ w_ih^T + b_ih + b_hh
    w_hh_ptr, batch_sizes_ptr,  # (H,H), (T,) if HAS_BATCH_SIZES
    lengths_ptr, resets_ptr, h0_ptr,  # (B,) if USE_LENGTHS; (T,B) and the (B,H) initial state if USE_RESETS
    output_ptr,  # out (T,B,H)
    h_ptr,  # (B,H): h0 on entry, h_n on exit; the hidden state, re-read every step as the GEMM operand
    T, B, H,
    HAS_BATCH_SIZES: tl.constexpr, USE_LENGTHS: tl.constexpr, USE_RESETS: tl.constexpr, REVERSE: tl.constexpr,
    RELU: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, hid, hid_mask, _, _ = sequence_tile(B, H, BLOCK_B, BLOCK_H)

    # No register state: h_t is all the state, and as the next step's GEMM operand it lives in h_ptr in the
    # tensors' dtype (rounded each step, as torch.nn.RNN's is).
    for step in range(T):
        t, active = step_rows(step, T, rows, B, batch_sizes_ptr, lengths_ptr, HAS_BATCH_SIZES, USE_LENGTHS, REVERSE)
        if USE_RESETS:
            restart_hidden(h_ptr, h0_ptr, rows, hid, hid_mask, H, reset_rows(t, rows, B, resets_ptr, USE_RESETS))
        preact = tl.load(gates_x_ptr + (t * B + rows)[:, None] * H + hid[None, :],
                         mask=active[:, None] & hid_mask[None, :], other=0).to(ACC)
        preact = add_hidden_projection(preact, h_ptr, rows, active, w_hh_ptr, hid, hid_mask, H, DOT, BLOCK_K)
        commit_hidden(_activate(preact, RELU), output_ptr, h_ptr, t, rows, B, hid, hid_mask, active, H)


@triton.jit(do_not_specialize=["T"])
def _rnn_sequence_backward_kernel(
    grad_output_ptr, grad_h_n_ptr, output_ptr,  # (T,B,H), (B,H), (T,B,H)
    w_hh_ptr, batch_sizes_ptr,  # (H,H), (T,) if HAS_BATCH_SIZES
    lengths_ptr, resets_ptr,  # (B,) if USE_LENGTHS, (T,B) if USE_RESETS
    grad_preact_ptr,  # out (T,B,H) gradient of the pre-activations, re-read as the recurrent GEMM operand
    grad_h0_ptr,  # out (B,H)
    T, B, H,
    HAS_BATCH_SIZES: tl.constexpr, USE_LENGTHS: tl.constexpr, USE_RESETS: tl.constexpr, REVERSE: tl.constexpr,
    RELU: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, hid, hid_mask, state_mask, state_offsets = sequence_tile(B, H, BLOCK_B, BLOCK_H)
    grad_h = tl.load(grad_h_n_ptr + state_offsets, mask=state_mask, other=0).to(ACC)
    grad_h0 = tl.zeros((BLOCK_B, BLOCK_H), ACC)  # what reset steps hand back to h0

    for reverse_step in range(T):
        step = T - 1 - reverse_step  # the forward's step, undone last-first
        t, active = step_rows(step, T, rows, B, batch_sizes_ptr, lengths_ptr, HAS_BATCH_SIZES, USE_LENGTHS, REVERSE)
        keep = active[:, None] & hid_mask[None, :]
        offsets = (t * B + rows)[:, None] * H + hid[None, :]
        grad_h += tl.load(grad_output_ptr + offsets, mask=keep, other=0).to(ACC)
        hy = tl.load(output_ptr + offsets, mask=keep, other=0).to(ACC)
        store(grad_preact_ptr + offsets, tl.where(keep, _preact_gradient(grad_h, hy, RELU), 0), state_mask)
        tl.debug_barrier()  # the whole row of grad_preact is visible to every thread before the re-read

        grad_h_prev = add_hidden_gradient(tl.zeros((BLOCK_B, BLOCK_H), ACC), grad_preact_ptr + t * B * H, H, rows,
                                          active, w_hh_ptr, hid, hid_mask, H, H, DOT, BLOCK_K)
        grad_h = tl.where(keep, grad_h_prev, grad_h)
        if USE_RESETS:
            grad_h, grad_h0 = restart_gradient(grad_h, grad_h0, reset_rows(t, rows, B, resets_ptr, USE_RESETS))

    store(grad_h0_ptr + state_offsets, grad_h + grad_h0, state_mask)


# ==================================================================================================
# Launchers: the op signatures of seqkern/ops/_schemas.py. They check arguments, reshape, pick blocks and launch.
# ==================================================================================================
def rnn_cell_forward(gates_x: Tensor, gates_h: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
                     relu: bool) -> Tensor:
    """gates_x = x W_ih^T, gates_h = h W_hh^T (B,H), b_ih, b_hh (H,) or None -> hy (B,H)."""
    batch, hidden = check_state("gates_x", gates_x, "RNN")
    check("gates_h", gates_h, (batch, hidden), gates_x)
    check_biases(b_ih, b_hh, hidden, gates_x)
    # new_empty, not empty_like: the kernels write row-major buffers whatever the inputs' strides.
    hy = gates_x.new_empty(batch, hidden)
    if hy.numel() == 0:
        return hy
    blocks = cell_blocks(batch, hidden)
    grid = (triton.cdiv(batch, blocks["BLOCK_B"]), triton.cdiv(hidden, blocks["BLOCK_H"]))
    launch(_rnn_cell_forward_kernel, grid, gates_x.device)(
        gates_x.contiguous(), gates_h.contiguous(), contiguous_or_none(b_ih), contiguous_or_none(b_hh), hy, batch, hidden,
        HAS_BIAS=b_ih is not None, RELU=bool(relu), ACC=accumulator_dtype(gates_x.dtype), **blocks,
    )
    return hy


def rnn_cell_backward(grad_hy: Tensor, hy: Tensor, relu: bool, has_bias: bool) -> tuple[Tensor, Tensor]:
    """grad_hy, hy (B,H) -> grad_preact (B,H) (of gates_x and gates_h alike), grad_bias (H,) (of b_ih and b_hh
    alike; empty (0,) unless has_bias)."""
    batch, hidden = check_state("hy", hy, "RNN")
    check("grad_hy", grad_hy, (batch, hidden), hy)
    grad_preact = hy.new_empty(batch, hidden)
    grad_bias = hy.new_zeros(hidden) if has_bias else hy.new_empty(0)
    if grad_preact.numel() == 0:
        return grad_preact, grad_bias
    blocks = cell_blocks(batch, hidden)
    launch(_rnn_cell_backward_kernel, (triton.cdiv(hidden, blocks["BLOCK_H"]),), hy.device)(
        grad_hy.contiguous(), hy.contiguous(), grad_preact, grad_bias if has_bias else None, batch, hidden,
        HAS_BIAS=bool(has_bias), RELU=bool(relu), ACC=accumulator_dtype(hy.dtype), **blocks,
    )
    return grad_preact, grad_bias


def rnn_forward(input: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
                batch_sizes: Tensor | None, lengths: Tensor | None, resets: Tensor | None, reverse: bool,
                relu: bool) -> tuple[Tensor, Tensor]:
    """One layer, one direction. input (T,B,I), h0 (B,H), w_ih (H,I), w_hh (H,H), b_ih, b_hh (H,) or None
    -> output (T,B,H), h_n (B,H)."""
    seq_len, batch, input_size, hidden = check_layer(input, h0, w_ih, w_hh, batch_sizes, 1, "RNN")
    check_biases(b_ih, b_hh, hidden, input)
    flags = state_flags(input, batch_sizes, lengths, resets, reverse)
    output = input.new_empty(seq_len, batch, hidden)
    h_n = h0.clone(memory_format=torch.contiguous_format)
    if seq_len == 0 or batch == 0:
        return output, h_n

    # The input projection of every step at once: one GEMM over T*B rows, both biases folded in.
    bias = b_ih + b_hh if b_ih is not None else None
    gates_x = linear(input.reshape(seq_len * batch, input_size), w_ih, bias).view(seq_len, batch, hidden)
    mode = recurrent_mode(batch, hidden, 1, input.dtype, sm_count(input.device))
    if mode["mode"] != "rows":
        cell = _recurrent_split.RNN_RELU if relu else _recurrent_split.RNN_TANH
        output, h_n, *_ = _recurrent_split.split_forward(cell, mode, gates_x, w_hh, None, h0, None,
                                                        on_device(batch_sizes, input), flags, reverse, False)
        return output, h_n
    launch(_rnn_sequence_forward_kernel, sequence_grid(batch), input.device)(
        gates_x, w_hh.contiguous(), on_device(batch_sizes, input), flags["lengths_ptr"], flags["resets_ptr"],
        h0.contiguous(), output, h_n, seq_len, batch, hidden,
        HAS_BATCH_SIZES=batch_sizes is not None, USE_LENGTHS=flags["USE_LENGTHS"], USE_RESETS=flags["USE_RESETS"],
        REVERSE=bool(reverse), RELU=bool(relu),
        **kernel_dtypes(input), **sequence_blocks(hidden, input.dtype),
    )
    return output, h_n


def rnn_backward(grad_output: Tensor, grad_h_n: Tensor, input: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor,
                 output: Tensor, batch_sizes: Tensor | None, lengths: Tensor | None, resets: Tensor | None,
                 reverse: bool, relu: bool, has_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of rnn_forward from its output (T,B,H) -> grad_input (T,B,I), grad_h0 (B,H), grad_w_ih (H,I),
    grad_w_hh (H,H), grad_bias (H,) (of b_ih and b_hh alike; empty (0,) unless has_bias)."""
    seq_len, batch, _, hidden = check_layer(input, h0, w_ih, w_hh, batch_sizes, 1, "RNN")
    flags = state_flags(input, batch_sizes, lengths, resets, reverse)
    check("grad_output", grad_output, (seq_len, batch, hidden), input)
    check("output", output, (seq_len, batch, hidden), input)
    check("grad_h_n", grad_h_n, (batch, hidden), input)

    grad_preact = input.new_empty(seq_len, batch, hidden)
    # Cloned rather than empty: with no time step (or no row) the gradient passes straight through.
    grad_h0 = grad_h_n.clone(memory_format=torch.contiguous_format)
    mode = recurrent_mode(batch, hidden, 1, input.dtype, sm_count(input.device))
    if seq_len and batch and mode["mode"] != "rows":
        cell = _recurrent_split.RNN_RELU if relu else _recurrent_split.RNN_TANH
        grad_preact, grad_h0, *_ = _recurrent_split.split_backward(
            cell, mode, grad_output, grad_h_n, None, output, None, None, h0, None, w_hh, on_device(batch_sizes, input),
            flags, reverse)
    elif seq_len and batch:
        launch(_rnn_sequence_backward_kernel, sequence_grid(batch), input.device)(
            grad_output.contiguous(), grad_h_n.contiguous(), output.contiguous(), w_hh.contiguous(),
            on_device(batch_sizes, input), flags["lengths_ptr"], flags["resets_ptr"], grad_preact, grad_h0,
            seq_len, batch, hidden,
            HAS_BATCH_SIZES=batch_sizes is not None, USE_LENGTHS=flags["USE_LENGTHS"], USE_RESETS=flags["USE_RESETS"],
            REVERSE=bool(reverse), RELU=bool(relu),
            **kernel_dtypes(input), **sequence_blocks(hidden, input.dtype),
        )

    grad_input, grad_w_ih = input_weight_gradients(grad_preact, input, w_ih)
    grad_w_hh = recurrent_weight_gradient(grad_preact, output, h0, batch_sizes, reverse, lengths, resets)
    grad_bias = column_sums(grad_preact.view(seq_len * batch, hidden)) if has_bias else input.new_empty(0)
    return grad_input, grad_h0, grad_w_ih, grad_w_hh, grad_bias
