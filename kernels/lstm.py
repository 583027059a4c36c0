"""Triton kernels for the LSTM ops (contracts in seqkern/ops/_schemas.py, oracle in seqkern/reference/lstm.py).

Two kernel families share the pointwise cell math:
  * the cell step (`lstm_cell_forward` / `lstm_cell_backward`): the pointwise part on top of the two GEMMs
    the caller ran (bias, gate activations, cell and hidden update; backward: pre-activation gradients,
    grad c_prev, and the bias gradient as an in-kernel reduction over the batch);
  * the whole sequence (`lstm_forward` / `lstm_backward`): the input projection is one torch GEMM over all
    T*B rows (biases folded in), then ONE persistent launch walks all T steps, a program per block of 16
    batch rows holding whole hidden rows, so the cell state (and in the backward grad h, grad c) stays in
    fp32 registers. The recurrent GEMM runs in-kernel with tl.dot over K slices of W_hh read from global
    memory; its left operand (h_{t-1}; in the backward, the pre-activation gradients) is written to memory
    and re-read slice by slice, with tl.debug_barrier() between the write and the reads. The weight
    gradients are torch GEMMs over all T*B rows after the backward launch.
The time loop's device helpers and the launcher plumbing are shared with the GRU and the RNN
(kernels/_recurrent.py); this file holds the LSTM's cell math, its four kernels and their launchers.

Optional features are tl.constexpr flags set by the launchers (HAS_PROJ, HAS_BATCH_SIZES, REVERSE,
SAVE_WORKSPACE, HAS_BIAS), not through triton.heuristics: torch.library.wrap_triton (torch 2.13) refuses a
Heuristics object. T is do_not_specialize, so a new sequence length does not recompile.

Precision: gate math, states and every accumulation run in float32 (float64 for float64 tensors).
tl.dot is called with input_precision="ieee": on a GPU float32 tl.dot defaults to TF32 (10-bit mantissa),
whose ~1e-3 relative error breaks DESIGN.md's rule "at most 2x torch's own error" (under the interpreter
tl.dot is exact numpy arithmetic either way, so only a GPU run can show the difference).

Supported dtypes: float32, float64, bfloat16, float16 (math in float32); anything else gets a TypeError before any
launch. The launchers take CPU tensors too: kernels/_launch.py runs the kernels under the interpreter then.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from seqkern._checks import ShapeError

from . import _recurrent_split
from ._launch import launch
from ._recurrent import (
    MIN_DOT_SIZE,
    accumulate_matmul,
    accumulator_dtype,
    add_hidden_gradient,
    add_hidden_projection,
    cell_blocks,
    check,
    check_batch_sizes,
    check_biases,
    check_dtype,
    check_state,
    column_sums,
    commit_hidden,
    contiguous_or_none,
    input_weight_gradients,
    kernel_dtypes,
    linear,
    on_device,
    pow2_at_least,
    previous_state,
    recurrent_weight_gradient,
    previous_hidden,
    recurrent_mode,
    reset_rows,
    restart_gradient,
    restart_hidden,
    state_flags,
    zoneout_blend,
    zoneout_gradients,
    zoneout_weight,
    sequence_blocks,
    sequence_grid,
    sequence_tile,
    sigmoid,
    sm_count,
    step_rows,
    store,
    tanh,
)


# ==================================================================================================
# Pointwise cell math, shared by the cell and the sequence kernels. Tiles are float32 (or float64).
# ==================================================================================================
@triton.jit
def _cell_forward_math(pre_i, pre_f, pre_g, pre_o, c_prev):
    """Pre-activations and c_{t-1} -> activated gates i, f, g, o, c_t, and o * tanh(c_t)."""
    i = sigmoid(pre_i)
    f = sigmoid(pre_f)
    g = tanh(pre_g)
    o = sigmoid(pre_o)
    c = f * c_prev + i * g
    return i, f, g, o, c, o * tanh(c)


@triton.jit
def _cell_backward_math(grad_r, grad_c, i, f, g, o, c_prev, c):
    """Gradients reaching r = o * tanh(c_t) and c_t -> gradients of the four pre-activations and of c_{t-1}."""
    tanh_c = tanh(c)
    grad_c = grad_c + grad_r * o * (1 - tanh_c * tanh_c)
    grad_pre_i = grad_c * g * i * (1 - i)
    grad_pre_f = grad_c * c_prev * f * (1 - f)
    grad_pre_g = grad_c * i * (1 - g * g)
    grad_pre_o = grad_r * tanh_c * o * (1 - o)
    return grad_pre_i, grad_pre_f, grad_pre_g, grad_pre_o, grad_c * f


@triton.jit
def split_cell(x_i, x_f, x_g, x_o, h_i, h_f, h_g, h_o, c_prev):
    """The cell of the split kernels (kernels/_recurrent_split.py): input and hidden parts of the four gates,
    c_{t-1} -> h_t, c_t and the workspace tiles (activated i, f, g, o)."""
    i, f, g, o, c, h = _cell_forward_math(x_i + h_i, x_f + h_f, x_g + h_g, x_o + h_o, c_prev)
    return h, c, i, f, g, o


@triton.jit
def split_cell_backward(grad_h, grad_c, i, f, g, o, c_prev, c):
    """The cell backward of the split kernels: gradients reaching h_t and c_t, the workspace, c_{t-1}, c_t ->
    the four pre-activation gradients, the share of grad h_{t-1} that bypasses W_hh (none), grad c_{t-1}."""
    d_i, d_f, d_g, d_o, grad_c_prev = _cell_backward_math(grad_h, grad_c, i, f, g, o, c_prev, c)
    return d_i, d_f, d_g, d_o, tl.zeros(grad_h.shape, grad_h.dtype), grad_c_prev


@triton.jit
def _load_gates(ptr, offsets, mask, H, ACC: tl.constexpr):
    """The four gate tiles [i, f, g, o] at `offsets` (into the first H columns of a 4H-wide layout), as ACC."""
    i = tl.load(ptr + offsets, mask=mask, other=0).to(ACC)
    f = tl.load(ptr + offsets + H, mask=mask, other=0).to(ACC)
    g = tl.load(ptr + offsets + 2 * H, mask=mask, other=0).to(ACC)
    o = tl.load(ptr + offsets + 3 * H, mask=mask, other=0).to(ACC)
    return i, f, g, o


@triton.jit
def _store_gates(ptr, offsets, mask, keep, H, i, f, g, o):
    """Stores the four gate tiles at `offsets` (as _load_gates), zeros where `keep` is false."""
    store(ptr + offsets, tl.where(keep, i, 0), mask)
    store(ptr + offsets + H, tl.where(keep, f, 0), mask)
    store(ptr + offsets + 2 * H, tl.where(keep, g, 0), mask)
    store(ptr + offsets + 3 * H, tl.where(keep, o, 0), mask)


# ==================================================================================================
# Cell step kernels. Grid: forward (batch blocks, hidden blocks); backward (hidden blocks,) so that one
# program owns whole columns of the bias gradient and sums them without atomics (deterministic).
# ==================================================================================================
@triton.jit
def _lstm_cell_forward_kernel(
    gates_x_ptr, gates_h_ptr, cx_ptr, b_ih_ptr, b_hh_ptr,  # (B,4H), (B,4H), (B,H), (4H,), (4H,)
    hy_ptr, cy_ptr, workspace_ptr,  # out: (B,H), (B,H), (B,4H) activated gates
    B, H,
    HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows[:, None] < B) & (cols[None, :] < H)
    gate_offsets = rows[:, None] * 4 * H + cols[None, :]
    state_offsets = rows[:, None] * H + cols[None, :]

    pre_i, pre_f, pre_g, pre_o = _load_gates(gates_x_ptr, gate_offsets, mask, H, ACC)
    h_i, h_f, h_g, h_o = _load_gates(gates_h_ptr, gate_offsets, mask, H, ACC)
    pre_i, pre_f, pre_g, pre_o = pre_i + h_i, pre_f + h_f, pre_g + h_g, pre_o + h_o
    if HAS_BIAS:
        bias_offsets = cols[None, :] + 0 * rows[:, None]  # the same bias columns on every row
        b_i, b_f, b_g, b_o = _load_gates(b_ih_ptr, bias_offsets, mask, H, ACC)
        pre_i, pre_f, pre_g, pre_o = pre_i + b_i, pre_f + b_f, pre_g + b_g, pre_o + b_o
        b_i, b_f, b_g, b_o = _load_gates(b_hh_ptr, bias_offsets, mask, H, ACC)
        pre_i, pre_f, pre_g, pre_o = pre_i + b_i, pre_f + b_f, pre_g + b_g, pre_o + b_o

    c_prev = tl.load(cx_ptr + state_offsets, mask=mask, other=0).to(ACC)
    i, f, g, o, c, h = _cell_forward_math(pre_i, pre_f, pre_g, pre_o, c_prev)
    store(hy_ptr + state_offsets, h, mask)
    store(cy_ptr + state_offsets, c, mask)
    _store_gates(workspace_ptr, gate_offsets, mask, mask, H, i, f, g, o)


@triton.jit
def _lstm_cell_backward_kernel(
    grad_hy_ptr, grad_cy_ptr, cx_ptr, cy_ptr, workspace_ptr,  # (B,H) x4, (B,4H) activated gates
    grad_gates_ptr, grad_cx_ptr, grad_bias_ptr,  # out: (B,4H), (B,H), (4H,)
    B, H,
    HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_mask = cols < H
    bias_i = tl.zeros((BLOCK_H,), ACC)
    bias_f = tl.zeros((BLOCK_H,), ACC)
    bias_g = tl.zeros((BLOCK_H,), ACC)
    bias_o = tl.zeros((BLOCK_H,), ACC)
    for first_row in range(0, B, BLOCK_B):
        rows = first_row + tl.arange(0, BLOCK_B)
        mask = (rows[:, None] < B) & col_mask[None, :]
        gate_offsets = rows[:, None] * 4 * H + cols[None, :]
        state_offsets = rows[:, None] * H + cols[None, :]
        i, f, g, o = _load_gates(workspace_ptr, gate_offsets, mask, H, ACC)
        grad_hy = tl.load(grad_hy_ptr + state_offsets, mask=mask, other=0).to(ACC)
        grad_cy = tl.load(grad_cy_ptr + state_offsets, mask=mask, other=0).to(ACC)
        cx = tl.load(cx_ptr + state_offsets, mask=mask, other=0).to(ACC)
        cy = tl.load(cy_ptr + state_offsets, mask=mask, other=0).to(ACC)
        # Masked-out rows load zeros everywhere, so their gradients are exactly zero in the sums below.
        d_i, d_f, d_g, d_o, grad_cx = _cell_backward_math(grad_hy, grad_cy, i, f, g, o, cx, cy)
        _store_gates(grad_gates_ptr, gate_offsets, mask, mask, H, d_i, d_f, d_g, d_o)
        store(grad_cx_ptr + state_offsets, grad_cx, mask)
        if HAS_BIAS:
            bias_i += tl.sum(d_i, axis=0)
            bias_f += tl.sum(d_f, axis=0)
            bias_g += tl.sum(d_g, axis=0)
            bias_o += tl.sum(d_o, axis=0)
    if HAS_BIAS:
        _store_gates(grad_bias_ptr, cols, col_mask, col_mask, H, bias_i, bias_f, bias_g, bias_o)


# ==================================================================================================
# Whole-sequence kernels. Grid: (batch blocks,); each program runs every time step for its rows.
# ==================================================================================================
@triton.jit(do_not_specialize=["T"])
def _lstm_sequence_forward_kernel(
    gates_x_ptr,  # (T,B,4H) input @ w_ih^T + b_ih + b_hh
    c0_ptr, w_hh_ptr, w_hr_ptr, batch_sizes_ptr,  # (B,H), (4H,P), (P,H) if HAS_PROJ, (T,) if HAS_BATCH_SIZES
    lengths_ptr, resets_ptr, h0_ptr, seed_ptr,  # (B,), (T,B) and the (B,P) initial h, () if ZONEOUT_MASK
    output_ptr,  # out (T,B,P)
    h_ptr,  # (B,P): h0 on entry, h_n on exit; the hidden state, re-read every step as the GEMM operand
    c_n_ptr,  # out (B,H)
    proj_in_ptr,  # scratch (B,H) for o * tanh(c_t), the projection's operand, if HAS_PROJ
    gates_ptr, cells_ptr,  # out (T,B,4H), (T,B,H) if SAVE_WORKSPACE
    T, B, H, P, zoneout_hi, zoneout_lo, threshold, keep_all,
    HAS_PROJ: tl.constexpr, HAS_BATCH_SIZES: tl.constexpr, USE_LENGTHS: tl.constexpr, USE_RESETS: tl.constexpr,
    ZONEOUT: tl.constexpr, ZONEOUT_MASK: tl.constexpr, REVERSE: tl.constexpr, SAVE_WORKSPACE: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, hid, hid_mask, cell_mask, cell_offsets = sequence_tile(B, H, BLOCK_B, BLOCK_H)
    out_cols = tl.arange(0, BLOCK_P)
    out_mask = out_cols < P
    c = tl.load(c0_ptr + cell_offsets, mask=cell_mask, other=0).to(ACC)

    for step in range(T):
        t, active = step_rows(step, T, rows, B, batch_sizes_ptr, lengths_ptr, HAS_BATCH_SIZES, USE_LENGTHS, REVERSE)
        if USE_RESETS:
            reset = reset_rows(t, rows, B, resets_ptr, USE_RESETS)
            restart_hidden(h_ptr, h0_ptr, rows, out_cols, out_mask, P, reset)
            c = tl.where(reset[:, None], tl.load(c0_ptr + cell_offsets, mask=cell_mask, other=0).to(ACC), c)
        keep_gate = active[:, None] & hid_mask[None, :]
        gate_offsets = (t * B + rows)[:, None] * 4 * H + hid[None, :]

        # Pre-activations: the precomputed input part plus h_{t-1} @ W_hh^T, one gate's columns at a time.
        pre_i, pre_f, pre_g, pre_o = _load_gates(gates_x_ptr, gate_offsets, keep_gate, H, ACC)
        pre_i = add_hidden_projection(pre_i, h_ptr, rows, active, w_hh_ptr, hid, hid_mask, P, DOT, BLOCK_K)
        pre_f = add_hidden_projection(pre_f, h_ptr, rows, active, w_hh_ptr + H * P, hid, hid_mask, P, DOT, BLOCK_K)
        pre_g = add_hidden_projection(pre_g, h_ptr, rows, active, w_hh_ptr + 2 * H * P, hid, hid_mask, P, DOT,
                                      BLOCK_K)
        pre_o = add_hidden_projection(pre_o, h_ptr, rows, active, w_hh_ptr + 3 * H * P, hid, hid_mask, P, DOT,
                                      BLOCK_K)
        i, f, g, o, c_new, h_new = _cell_forward_math(pre_i, pre_f, pre_g, pre_o, c)

        if HAS_PROJ:
            store(proj_in_ptr + cell_offsets, h_new, cell_mask)
            tl.debug_barrier()  # the whole row of o * tanh(c_t) is visible to every thread before the re-read
            # h_t = r @ W_hr^T, W_hr (P,H) read transposed.
            h_new = accumulate_matmul(tl.zeros((BLOCK_B, BLOCK_P), ACC), proj_in_ptr, H, rows, active,
                                      w_hr_ptr, 1, H, out_cols, out_mask, H, DOT, BLOCK_K)
        if ZONEOUT:  # h (state 0) and c (state 1) keep their values from before the step
            h_old = tl.load(h_ptr + rows[:, None] * P + out_cols[None, :],
                            mask=(rows < B)[:, None] & out_mask[None, :], other=0).to(ACC)
            h_new = zoneout_blend(h_new, h_old, zoneout_weight(seed_ptr, 0, t, rows, out_cols, P, zoneout_hi,
                                                               zoneout_lo, threshold, keep_all, ZONEOUT_MASK, ACC),
                                  ZONEOUT_MASK)
            c_new = zoneout_blend(c_new, c, zoneout_weight(seed_ptr, 1, t, rows, hid, H, zoneout_hi, zoneout_lo,
                                                           threshold, keep_all, ZONEOUT_MASK, ACC), ZONEOUT_MASK)

        commit_hidden(h_new, output_ptr, h_ptr, t, rows, B, out_cols, out_mask, active, P)
        if SAVE_WORKSPACE:
            _store_gates(gates_ptr, gate_offsets, cell_mask, keep_gate, H, i, f, g, o)
            store(cells_ptr + (t * B + rows)[:, None] * H + hid[None, :], tl.where(keep_gate, c_new, 0), cell_mask)
        c = tl.where(keep_gate, c_new, c)

    store(c_n_ptr + cell_offsets, c, cell_mask)


@triton.jit(do_not_specialize=["T"])
def _lstm_sequence_backward_kernel(
    grad_output_ptr, grad_h_n_ptr, grad_c_n_ptr,  # (T,B,P), (B,P), (B,H)
    c0_ptr, w_hh_ptr, w_hr_ptr, batch_sizes_ptr,  # (B,H), (4H,P), (P,H) if HAS_PROJ, (T,) if HAS_BATCH_SIZES
    lengths_ptr, resets_ptr, seed_ptr,  # (B,) if USE_LENGTHS, (T,B) if USE_RESETS, () if ZONEOUT_MASK
    gates_ptr, cells_ptr,  # the forward's workspace: (T,B,4H) activated gates, (T,B,H) c_t (after zoneout)
    grad_gates_ptr,  # out (T,B,4H) gradient of the pre-activations, re-read as the recurrent GEMM operand
    grad_h_all_ptr,  # out (T,B,P) gradient reaching each step's projected h_t (for grad_w_hr), if HAS_PROJ
    grad_h0_ptr, grad_c0_ptr,  # out (B,P), (B,H)
    T, B, H, P, zoneout_hi, zoneout_lo, threshold, keep_all,
    HAS_PROJ: tl.constexpr, HAS_BATCH_SIZES: tl.constexpr, USE_LENGTHS: tl.constexpr, USE_RESETS: tl.constexpr,
    ZONEOUT: tl.constexpr, ZONEOUT_MASK: tl.constexpr, REVERSE: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, hid, hid_mask, cell_mask, cell_offsets = sequence_tile(B, H, BLOCK_B, BLOCK_H)
    out_cols = tl.arange(0, BLOCK_P)
    out_mask = out_cols < P
    hidden_mask = (rows < B)[:, None] & out_mask[None, :]
    hidden_offsets = rows[:, None] * P + out_cols[None, :]
    grad_h = tl.load(grad_h_n_ptr + hidden_offsets, mask=hidden_mask, other=0).to(ACC)
    grad_c = tl.load(grad_c_n_ptr + cell_offsets, mask=cell_mask, other=0).to(ACC)
    grad_h0 = tl.zeros((BLOCK_B, BLOCK_P), ACC)  # what reset steps hand back to h0 and c0
    grad_c0 = tl.zeros((BLOCK_B, BLOCK_H), ACC)

    for reverse_step in range(T):
        step = T - 1 - reverse_step  # the forward's step, undone last-first
        t, active = step_rows(step, T, rows, B, batch_sizes_ptr, lengths_ptr, HAS_BATCH_SIZES, USE_LENGTHS, REVERSE)
        keep_gate = active[:, None] & hid_mask[None, :]
        keep_out = active[:, None] & out_mask[None, :]
        out_offsets = (t * B + rows)[:, None] * P + out_cols[None, :]
        grad_h += tl.load(grad_output_ptr + out_offsets, mask=keep_out, other=0).to(ACC)
        grad_h_new = grad_h  # the gradients of the step's new h and c (before zoneout)
        grad_c_new = grad_c
        if ZONEOUT:
            grad_h_new, grad_h_kept = zoneout_gradients(
                grad_h, zoneout_weight(seed_ptr, 0, t, rows, out_cols, P, zoneout_hi, zoneout_lo, threshold,
                                       keep_all, ZONEOUT_MASK, ACC), ZONEOUT_MASK)
            grad_c_new, grad_c_kept = zoneout_gradients(
                grad_c, zoneout_weight(seed_ptr, 1, t, rows, hid, H, zoneout_hi, zoneout_lo, threshold, keep_all,
                                       ZONEOUT_MASK, ACC), ZONEOUT_MASK)

        if HAS_PROJ:
            store(grad_h_all_ptr + out_offsets, tl.where(keep_out, grad_h_new, 0), hidden_mask)
            tl.debug_barrier()  # the whole row of grad h_t is visible to every thread before the re-read
            # grad r = grad h_t @ W_hr, W_hr (P,H) read as is.
            grad_r = accumulate_matmul(tl.zeros((BLOCK_B, BLOCK_H), ACC), grad_h_all_ptr + t * B * P, P, rows,
                                       active, w_hr_ptr, H, 1, hid, hid_mask, P, DOT, BLOCK_K)
        else:
            grad_r = grad_h_new

        gate_offsets = (t * B + rows)[:, None] * 4 * H + hid[None, :]
        i, f, g, o = _load_gates(gates_ptr, gate_offsets, keep_gate, H, ACC)
        c_prev = previous_state(cells_ptr, c0_ptr, step, T, rows, B, hid, hid_mask, H, batch_sizes_ptr, lengths_ptr,
                                resets_ptr, HAS_BATCH_SIZES, USE_LENGTHS, USE_RESETS, REVERSE).to(ACC)
        if ZONEOUT:  # the recorded c_t is after zoneout; the cell's own c_t is recomputed
            c = f * c_prev + i * g
        else:
            c = tl.load(cells_ptr + (t * B + rows)[:, None] * H + hid[None, :], mask=keep_gate, other=0).to(ACC)
        d_i, d_f, d_g, d_o, grad_c_prev = _cell_backward_math(grad_r, grad_c_new, i, f, g, o, c_prev, c)
        _store_gates(grad_gates_ptr, gate_offsets, cell_mask, keep_gate, H, d_i, d_f, d_g, d_o)
        tl.debug_barrier()  # the whole row of grad gates is visible to every thread before the re-read

        # grad h_{t-1} = grad_gates @ W_hh, one gate's rows of W_hh at a time.
        grad_h_prev = tl.zeros((BLOCK_B, BLOCK_P), ACC)
        row_gates_ptr = grad_gates_ptr + t * B * 4 * H
        for gate in tl.static_range(4):
            grad_h_prev = add_hidden_gradient(grad_h_prev, row_gates_ptr + gate * H, 4 * H, rows, active,
                                              w_hh_ptr + gate * H * P, out_cols, out_mask, H, P, DOT, BLOCK_K)
        if ZONEOUT:
            grad_h_prev += grad_h_kept
            grad_c_prev += grad_c_kept
        grad_h = tl.where(keep_out, grad_h_prev, grad_h)
        grad_c = tl.where(keep_gate, grad_c_prev, grad_c)
        if USE_RESETS:
            reset = reset_rows(t, rows, B, resets_ptr, USE_RESETS)
            grad_h, grad_h0 = restart_gradient(grad_h, grad_h0, reset)
            grad_c, grad_c0 = restart_gradient(grad_c, grad_c0, reset)

    store(grad_h0_ptr + hidden_offsets, grad_h + grad_h0, hidden_mask)
    store(grad_c0_ptr + cell_offsets, grad_c + grad_c0, cell_mask)


# ==================================================================================================
# Launchers: the op signatures of seqkern/ops/_schemas.py. They check arguments, reshape, pick blocks and launch.
# ==================================================================================================
def _sequence_blocks(hidden: int, out_size: int, dtype: torch.dtype) -> dict:
    """The shared sequence tiles (kernels/_recurrent.py) plus the width of the projected rows."""
    return dict(sequence_blocks(hidden, dtype), BLOCK_P=pow2_at_least(out_size, MIN_DOT_SIZE))


def _check_layer(input, h0, c0, w_ih, w_hh, w_hr, batch_sizes) -> tuple[int, int, int, int, int]:
    """Checks the arguments shared by lstm_forward and lstm_backward -> (T, B, I, H, P)."""
    check_dtype("input", input, "LSTM")
    if input.dim() != 3 or c0.dim() != 2:
        raise ShapeError(f"input, c0: expected (T,B,I) and (B,H), got {tuple(input.shape)} and {tuple(c0.shape)}")
    seq_len, batch, input_size = input.shape
    hidden = c0.shape[1]
    out_size = w_hr.shape[0] if w_hr is not None else hidden
    check("c0", c0, (batch, hidden), input)
    check("h0", h0, (batch, out_size), input)
    check("w_ih", w_ih, (4 * hidden, input_size), input)
    check("w_hh", w_hh, (4 * hidden, out_size), input)
    if w_hr is not None:
        check("w_hr", w_hr, (out_size, hidden), input)
    check_batch_sizes(batch_sizes, seq_len, batch)
    return seq_len, batch, input_size, hidden, out_size


def lstm_cell_forward(gates_x: Tensor, gates_h: Tensor, cx: Tensor, b_ih: Tensor | None,
                      b_hh: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """gates_x, gates_h (B,4H), cx (B,H), b_ih, b_hh (4H,) or None -> hy (B,H), cy (B,H), workspace (B,4H)."""
    batch, hidden = check_state("cx", cx, "LSTM")
    check("gates_x", gates_x, (batch, 4 * hidden), cx)
    check("gates_h", gates_h, (batch, 4 * hidden), cx)
    check_biases(b_ih, b_hh, 4 * hidden, cx)
    # new_empty, not empty_like: the kernels write row-major buffers whatever the inputs' strides.
    hy, cy, workspace = cx.new_empty(cx.shape), cx.new_empty(cx.shape), cx.new_empty(gates_x.shape)
    if hy.numel() == 0:
        return hy, cy, workspace
    blocks = cell_blocks(batch, hidden)
    grid = (triton.cdiv(batch, blocks["BLOCK_B"]), triton.cdiv(hidden, blocks["BLOCK_H"]))
    launch(_lstm_cell_forward_kernel, grid, cx.device)(
        gates_x.contiguous(), gates_h.contiguous(), cx.contiguous(), contiguous_or_none(b_ih),
        contiguous_or_none(b_hh), hy, cy, workspace, batch, hidden,
        HAS_BIAS=b_ih is not None, ACC=accumulator_dtype(cx.dtype), **blocks,
    )
    return hy, cy, workspace


def lstm_cell_backward(grad_hy: Tensor, grad_cy: Tensor, cx: Tensor, cy: Tensor, workspace: Tensor,
                       has_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """grad_hy, grad_cy, cx, cy (B,H), workspace (B,4H) activated gates
    -> grad_gates (B,4H), grad_cx (B,H), grad_bias (4H,) (empty if not has_bias)."""
    batch, hidden = check_state("cx", cx, "LSTM")
    for name, tensor in [("grad_hy", grad_hy), ("grad_cy", grad_cy), ("cy", cy)]:
        check(name, tensor, (batch, hidden), cx)
    check("workspace", workspace, (batch, 4 * hidden), cx)
    grad_gates, grad_cx = cx.new_empty(workspace.shape), cx.new_empty(cx.shape)
    grad_bias = cx.new_zeros(4 * hidden) if has_bias else cx.new_empty(0)
    if hidden == 0 or batch == 0:
        return grad_gates, grad_cx, grad_bias
    blocks = cell_blocks(batch, hidden)
    launch(_lstm_cell_backward_kernel, (triton.cdiv(hidden, blocks["BLOCK_H"]),), cx.device)(
        grad_hy.contiguous(), grad_cy.contiguous(), cx.contiguous(), cy.contiguous(), workspace.contiguous(),
        grad_gates, grad_cx, grad_bias if has_bias else None, batch, hidden,
        HAS_BIAS=has_bias, ACC=accumulator_dtype(cx.dtype), **blocks,
    )
    return grad_gates, grad_cx, grad_bias


def lstm_forward(input: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
                 b_hh: Tensor | None, w_hr: Tensor | None, batch_sizes: Tensor | None, lengths: Tensor | None,
                 resets: Tensor | None, zoneout: float, zoneout_seed: Tensor | None, reverse: bool,
                 save_workspace: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One layer, one direction. input (T,B,I), h0 (B,P), c0 (B,H) -> output (T,B,P), h_n (B,P), c_n (B,H),
    gates (T,B,4H), cells (T,B,H) (both empty (0,) unless save_workspace)."""
    seq_len, batch, input_size, hidden, out_size = _check_layer(input, h0, c0, w_ih, w_hh, w_hr, batch_sizes)
    check_biases(b_ih, b_hh, 4 * hidden, input)
    flags = state_flags(input, batch_sizes, lengths, resets, reverse, zoneout, zoneout_seed)
    output = input.new_empty(seq_len, batch, out_size)
    h_n, c_n = h0.clone(memory_format=torch.contiguous_format), c0.new_empty(c0.shape)
    workspace_shape = (seq_len, batch) if save_workspace else (0,)
    gates = input.new_empty(*workspace_shape, 4 * hidden) if save_workspace else input.new_empty(0)
    cells = input.new_empty(*workspace_shape, hidden) if save_workspace else input.new_empty(0)
    if seq_len == 0 or batch == 0:
        c_n.copy_(c0)
        return output.zero_(), h_n, c_n, gates.zero_(), cells.zero_()

    # The input projection of every step at once: one GEMM over T*B rows, biases folded in.
    bias = b_ih + b_hh if b_ih is not None else None
    gates_x = linear(input.reshape(seq_len * batch, input_size), w_ih, bias).view(seq_len, batch, 4 * hidden)
    # The split kernels' grid covers max(H, P): a program's units and the same block of h's columns.
    mode = recurrent_mode(batch, max(hidden, out_size), 4, input.dtype, sm_count(input.device))
    if mode["mode"] != "rows":
        output, h_n, c_n, split_gates, split_cells = _recurrent_split.split_forward(
            _recurrent_split.LSTM, mode, gates_x, w_hh, None, h0, c0, on_device(batch_sizes, input), flags,
            reverse, save_workspace, w_hr)
        if save_workspace:
            gates, cells = split_gates, split_cells
        return output, h_n, c_n.to(input.dtype), gates, cells
    blocks = _sequence_blocks(hidden, out_size, input.dtype)
    launch(_lstm_sequence_forward_kernel, sequence_grid(batch), input.device)(
        gates_x, c0.contiguous(), w_hh.contiguous(), contiguous_or_none(w_hr), on_device(batch_sizes, input),
        h0_ptr=h0.contiguous(), output_ptr=output, h_ptr=h_n, c_n_ptr=c_n,
        proj_in_ptr=input.new_empty(batch, hidden) if w_hr is not None else None,
        gates_ptr=gates if save_workspace else None, cells_ptr=cells if save_workspace else None,
        T=seq_len, B=batch, H=hidden, P=out_size, **flags,
        HAS_PROJ=w_hr is not None, HAS_BATCH_SIZES=batch_sizes is not None, REVERSE=bool(reverse),
        SAVE_WORKSPACE=bool(save_workspace), **kernel_dtypes(input), **blocks,
    )
    return output, h_n, c_n, gates, cells


def lstm_backward(grad_output: Tensor, grad_h_n: Tensor, grad_c_n: Tensor, input: Tensor, h0: Tensor, c0: Tensor,
                  w_ih: Tensor, w_hh: Tensor, w_hr: Tensor | None, output: Tensor, gates: Tensor, cells: Tensor,
                  batch_sizes: Tensor | None, lengths: Tensor | None, resets: Tensor | None, zoneout: float,
                  zoneout_seed: Tensor | None, reverse: bool, has_bias: bool
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of lstm_forward, from its saved output, gates (T,B,4H) and cells (T,B,H)
    -> grad_input (T,B,I), grad_h0 (B,P), grad_c0 (B,H), grad_w_ih (4H,I), grad_w_hh (4H,P),
       grad_bias (4H,) (empty unless has_bias), grad_w_hr (P,H) (empty without projection)."""
    seq_len, batch, input_size, hidden, out_size = _check_layer(input, h0, c0, w_ih, w_hh, w_hr, batch_sizes)
    flags = state_flags(input, batch_sizes, lengths, resets, reverse, zoneout, zoneout_seed)
    check("grad_output", grad_output, (seq_len, batch, out_size), input)
    check("output", output, (seq_len, batch, out_size), input)
    check("grad_h_n", grad_h_n, (batch, out_size), input)
    check("grad_c_n", grad_c_n, (batch, hidden), input)
    check("gates", gates, (seq_len, batch, 4 * hidden), input)
    check("cells", cells, (seq_len, batch, hidden), input)

    grad_gates = input.new_empty(seq_len, batch, 4 * hidden)
    grad_h_all = input.new_empty(seq_len, batch, out_size) if w_hr is not None else None
    # Cloned rather than empty: with no time step (or no row) the gradients pass straight through.
    grad_h0 = grad_h_n.clone(memory_format=torch.contiguous_format)
    grad_c0 = grad_c_n.clone(memory_format=torch.contiguous_format)
    mode = recurrent_mode(batch, max(hidden, out_size), 4, input.dtype, sm_count(input.device))
    if seq_len and batch and mode["mode"] != "rows":
        grad_gates, grad_h0, grad_c0, grad_h_all = _recurrent_split.split_backward(
            _recurrent_split.LSTM, mode, grad_output, grad_h_n, grad_c_n, output, gates.contiguous(),
            cells.contiguous(), h0, c0.contiguous(), w_hh, on_device(batch_sizes, input), flags, reverse, w_hr)
    elif seq_len and batch:
        blocks = _sequence_blocks(hidden, out_size, input.dtype)
        launch(_lstm_sequence_backward_kernel, sequence_grid(batch), input.device)(
            grad_output.contiguous(), grad_h_n.contiguous(), grad_c_n.contiguous(), c0.contiguous(),
            w_hh.contiguous(), contiguous_or_none(w_hr), on_device(batch_sizes, input),
            gates_ptr=gates.contiguous(), cells_ptr=cells.contiguous(), grad_gates_ptr=grad_gates,
            grad_h_all_ptr=grad_h_all, grad_h0_ptr=grad_h0, grad_c0_ptr=grad_c0,
            T=seq_len, B=batch, H=hidden, P=out_size, **flags,
            HAS_PROJ=w_hr is not None, HAS_BATCH_SIZES=batch_sizes is not None, REVERSE=bool(reverse),
            **kernel_dtypes(input), **blocks,
        )

    # Weight gradients: GEMMs over all T*B rows at once (rows inactive at a step have zero grad_gates).
    grad_input, grad_w_ih = input_weight_gradients(grad_gates, input, w_ih)
    grad_w_hh = recurrent_weight_gradient(grad_gates, output, h0, batch_sizes, reverse, lengths, resets)
    grad_bias = column_sums(grad_gates.view(seq_len * batch, 4 * hidden)) if has_bias else input.new_empty(0)
    grad_w_hr = input.new_empty(0)
    if w_hr is not None:
        # The projection's input o * tanh(c_t), rebuilt from the workspace (zero on inactive rows); with
        # zoneout the cell's own c_t = f c_{t-1} + i g (cells holds c_t after zoneout).
        cell = cells
        if zoneout:
            c_prev = previous_hidden(cells, c0, batch_sizes, reverse, lengths, resets)
            cell = gates[..., hidden: 2 * hidden] * c_prev + gates[..., :hidden] * gates[..., 2 * hidden: 3 * hidden]
        proj_in = gates[..., 3 * hidden:] * torch.tanh(cell)
        grad_w_hr = grad_h_all.view(seq_len * batch, out_size).t() @ proj_in.reshape(seq_len * batch, hidden)
    return grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr
