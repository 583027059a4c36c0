"""Triton kernels for the GRU ops (contracts in seqkern/ops/_schemas.py, oracle in seqkern/reference/gru.py).

PyTorch's reset-after form, gate order r, z, n:
    r = sigmoid(x W_ir^T + b_ir + h W_hr^T + b_hr),  z = sigmoid(x W_iz^T + b_iz + h W_hz^T + b_hz)
    n = tanh(x W_in^T + b_in + r * (h W_hn^T + b_hn)),   h' = (1 - z) * n + z * h
The workspace (B,4H) per step is [r, z, n, h W_hn^T + b_hn]: with h_{t-1} it is all the backward needs.

Two kernel families share the pointwise cell math:
  * the cell step (`gru_cell_forward` / `gru_cell_backward`): the pointwise part on top of the two GEMMs the
    caller ran; the backward also sums the bias gradients over the batch in-kernel;
  * the whole sequence (`gru_forward` / `gru_backward`): the persistent time loop of kernels/_recurrent.py
    (input projection with b_ih as one torch GEMM; one launch over all T steps computes h_{t-1} @ W_hh^T
    in-kernel, adds b_hh, which cannot be folded into the input GEMM because r scales the n part of it,
    and keeps h_{t-1} in fp32 registers for h' = n + z (h - n); the weight gradients as torch GEMMs after
    the backward launch).

The input and hidden sides of the n gate get different gradients (d n_pre vs d n_pre * r), so the backward
writes a (T,B,4H) buffer laid out like the workspace, [d r_pre, d z_pre, d n_pre, d n_pre * r]: its first three
H-wide blocks are the gradient of the input projection, blocks 0, 1 and 3 the gradient of the hidden one.

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
    previous_state,
    recurrent_mode,
    recurrent_weight_gradient,
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
def _cell_forward_math(pre_r, pre_z, x_n, hidden_n, h):
    """Pre-activations of r and z, the two parts of n's and h_{t-1} -> r, z, n, h_t."""
    r = sigmoid(pre_r)
    z = sigmoid(pre_z)
    n = tanh(x_n + r * hidden_n)
    return r, z, n, n + z * (h - n)


@triton.jit
def _cell_backward_math(grad_hy, r, z, n, hidden_n, h):
    """Gradient reaching h_t, the workspace and h_{t-1} -> gradients of r's and z's pre-activations, of the
    input (x_n) and hidden (hidden_n) parts of n's, and the share of grad h_{t-1} that bypasses W_hh."""
    grad_pre_n = grad_hy * (1 - z) * (1 - n * n)
    grad_pre_r = grad_pre_n * hidden_n * r * (1 - r)
    grad_pre_z = grad_hy * (h - n) * z * (1 - z)
    return grad_pre_r, grad_pre_z, grad_pre_n, grad_pre_n * r, grad_hy * z


@triton.jit
def split_cell(x_r, x_z, x_n, h_r, h_z, h_n, h):
    """The cell of the split kernels (kernels/_recurrent_split.py): input and hidden parts (b_hh included) of
    r, z, n and h_{t-1} (float32) -> h_t, h_t as the new running state, the workspace tiles r, z, n, h_n."""
    r, z, n, h_new = _cell_forward_math(x_r + h_r, x_z + h_z, x_n, h_n, h)
    return h_new, h_new, r, z, n, h_n


@triton.jit
def split_cell_backward(grad_h, r, z, n, hidden_n, h_prev):
    """The cell backward of the split kernels: the gradient reaching h_t, the workspace, h_{t-1} -> d r_pre,
    d z_pre, d n_pre, d n_pre * r (the workspace layout of grad_pre), grad_h * z (the share of grad h_{t-1}
    that bypasses W_hh) and no cell gradient."""
    d_r, d_z, d_x_n, d_h_n, bypass = _cell_backward_math(grad_h, r, z, n, hidden_n, h_prev)
    return d_r, d_z, d_x_n, d_h_n, bypass, tl.zeros(grad_h.shape, grad_h.dtype)


@triton.jit
def _load_three(ptr, offsets, mask, H, ACC: tl.constexpr):
    """The three gate tiles [r, z, n] at `offsets` (into the first H columns of a 3H-wide layout), as ACC."""
    r = tl.load(ptr + offsets, mask=mask, other=0).to(ACC)
    z = tl.load(ptr + offsets + H, mask=mask, other=0).to(ACC)
    n = tl.load(ptr + offsets + 2 * H, mask=mask, other=0).to(ACC)
    return r, z, n


@triton.jit
def _load_workspace(ptr, offsets, mask, H, ACC: tl.constexpr):
    """The workspace tiles r, z, n, h W_hn^T + b_hn at `offsets` (into the first H columns of 4H), as ACC."""
    r, z, n = _load_three(ptr, offsets, mask, H, ACC)
    return r, z, n, tl.load(ptr + offsets + 3 * H, mask=mask, other=0).to(ACC)


@triton.jit
def _store_three(ptr, offsets, mask, H, r, z, n):
    """Stores the three gate tiles [r, z, n] in a 3H-wide layout at `offsets`."""
    store(ptr + offsets, r, mask)
    store(ptr + offsets + H, z, mask)
    store(ptr + offsets + 2 * H, n, mask)


@triton.jit
def _store_four(ptr, offsets, mask, keep, H, a, b, c, d):
    """Stores four tiles in the workspace's 4H-wide layout at `offsets`, zeros where `keep` is false."""
    store(ptr + offsets, tl.where(keep, a, 0), mask)
    store(ptr + offsets + H, tl.where(keep, b, 0), mask)
    store(ptr + offsets + 2 * H, tl.where(keep, c, 0), mask)
    store(ptr + offsets + 3 * H, tl.where(keep, d, 0), mask)


# ==================================================================================================
# Cell step kernels. Grid: forward (batch blocks, hidden blocks); backward (hidden blocks,) so that one
# program owns whole columns of the bias gradients and sums them without atomics (deterministic).
# ==================================================================================================
@triton.jit
def _gru_cell_forward_kernel(
    gates_x_ptr, gates_h_ptr, hx_ptr, b_ih_ptr, b_hh_ptr,  # (B,3H), (B,3H), (B,H), (3H,), (3H,)
    hy_ptr, workspace_ptr,  # out (B,H), (B,4H)
    B, H,
    HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_mask = cols < H
    mask = (rows[:, None] < B) & col_mask[None, :]
    gate_offsets = rows[:, None] * 3 * H + cols[None, :]
    x_r, x_z, x_n = _load_three(gates_x_ptr, gate_offsets, mask, H, ACC)
    h_r, h_z, h_n = _load_three(gates_h_ptr, gate_offsets, mask, H, ACC)
    if HAS_BIAS:
        b_r, b_z, b_n = _load_three(b_ih_ptr, cols, col_mask, H, ACC)
        x_r, x_z, x_n = x_r + b_r[None, :], x_z + b_z[None, :], x_n + b_n[None, :]
        b_r, b_z, b_n = _load_three(b_hh_ptr, cols, col_mask, H, ACC)
        h_r, h_z, h_n = h_r + b_r[None, :], h_z + b_z[None, :], h_n + b_n[None, :]

    state_offsets = rows[:, None] * H + cols[None, :]
    hx = tl.load(hx_ptr + state_offsets, mask=mask, other=0).to(ACC)
    r, z, n, hy = _cell_forward_math(x_r + h_r, x_z + h_z, x_n, h_n, hx)
    store(hy_ptr + state_offsets, hy, mask)
    _store_four(workspace_ptr, rows[:, None] * 4 * H + cols[None, :], mask, mask, H, r, z, n, h_n)


@triton.jit
def _gru_cell_backward_kernel(
    grad_hy_ptr, hx_ptr, workspace_ptr,  # (B,H), (B,H), (B,4H)
    grad_gates_x_ptr, grad_gates_h_ptr, grad_hx_ptr, grad_b_ih_ptr, grad_b_hh_ptr,  # out (B,3H) x2, (B,H), (3H,) x2
    B, H,
    HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_mask = cols < H
    bias_r = tl.zeros((BLOCK_H,), ACC)
    bias_z = tl.zeros((BLOCK_H,), ACC)
    bias_x_n = tl.zeros((BLOCK_H,), ACC)
    bias_h_n = tl.zeros((BLOCK_H,), ACC)
    for first_row in range(0, B, BLOCK_B):
        rows = first_row + tl.arange(0, BLOCK_B)
        mask = (rows[:, None] < B) & col_mask[None, :]
        state_offsets = rows[:, None] * H + cols[None, :]
        gate_offsets = rows[:, None] * 3 * H + cols[None, :]
        r, z, n, hidden_n = _load_workspace(workspace_ptr, rows[:, None] * 4 * H + cols[None, :], mask, H, ACC)
        grad_hy = tl.load(grad_hy_ptr + state_offsets, mask=mask, other=0).to(ACC)
        hx = tl.load(hx_ptr + state_offsets, mask=mask, other=0).to(ACC)
        # Masked-out rows load zeros everywhere, so their gradients are exactly zero in the sums below.
        d_r, d_z, d_x_n, d_h_n, grad_hx = _cell_backward_math(grad_hy, r, z, n, hidden_n, hx)
        _store_three(grad_gates_x_ptr, gate_offsets, mask, H, d_r, d_z, d_x_n)
        _store_three(grad_gates_h_ptr, gate_offsets, mask, H, d_r, d_z, d_h_n)
        store(grad_hx_ptr + state_offsets, grad_hx, mask)
        if HAS_BIAS:
            bias_r += tl.sum(d_r, axis=0)
            bias_z += tl.sum(d_z, axis=0)
            bias_x_n += tl.sum(d_x_n, axis=0)
            bias_h_n += tl.sum(d_h_n, axis=0)
    if HAS_BIAS:
        _store_three(grad_b_ih_ptr, cols, col_mask, H, bias_r, bias_z, bias_x_n)
        _store_three(grad_b_hh_ptr, cols, col_mask, H, bias_r, bias_z, bias_h_n)


# ==================================================================================================
# Whole-sequence kernels. Grid: (batch blocks,); each program runs every time step for its rows.
# ==================================================================================================
@triton.jit(do_not_specialize=["T"])
def _gru_sequence_forward_kernel(
    gates_x_ptr,  # (T,B,3H) input @ w_ih^T + b_ih
    w_hh_ptr, b_hh_ptr, batch_sizes_ptr,  # (3H,H), (3H,) if HAS_BIAS, (T,) if HAS_BATCH_SIZES
    lengths_ptr, resets_ptr, h0_ptr, seed_ptr,  # (B,), (T,B) and the (B,H) initial state, () if ZONEOUT_MASK
    output_ptr,  # out (T,B,H)
    h_ptr,  # (B,H): h0 on entry, h_n on exit; h_{t-1}, re-read every step as the GEMM operand
    workspace_ptr,  # out (T,B,4H) if SAVE_WORKSPACE
    T, B, H, zoneout_hi, zoneout_lo, threshold, keep_all,
    HAS_BIAS: tl.constexpr, HAS_BATCH_SIZES: tl.constexpr, USE_LENGTHS: tl.constexpr, USE_RESETS: tl.constexpr,
    ZONEOUT: tl.constexpr, ZONEOUT_MASK: tl.constexpr, REVERSE: tl.constexpr, SAVE_WORKSPACE: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, hid, hid_mask, state_mask, state_offsets = sequence_tile(B, H, BLOCK_B, BLOCK_H)
    h = tl.load(h_ptr + state_offsets, mask=state_mask, other=0).to(ACC)
    if HAS_BIAS:
        b_r, b_z, b_n = _load_three(b_hh_ptr, hid, hid_mask, H, ACC)
    else:
        b_r = tl.zeros((BLOCK_H,), ACC)
        b_z = b_r
        b_n = b_r

    for step in range(T):
        t, active = step_rows(step, T, rows, B, batch_sizes_ptr, lengths_ptr, HAS_BATCH_SIZES, USE_LENGTHS, REVERSE)
        keep = active[:, None] & hid_mask[None, :]
        if USE_RESETS:
            reset = reset_rows(t, rows, B, resets_ptr, USE_RESETS)
            h = tl.where(reset[:, None], restart_hidden(h_ptr, h0_ptr, rows, hid, hid_mask, H, reset).to(ACC), h)
        x_r, x_z, x_n = _load_three(gates_x_ptr, (t * B + rows)[:, None] * 3 * H + hid[None, :], keep, H, ACC)
        pre_r = add_hidden_projection(x_r + b_r[None, :], h_ptr, rows, active, w_hh_ptr, hid, hid_mask, H, DOT,
                                      BLOCK_K)
        pre_z = add_hidden_projection(x_z + b_z[None, :], h_ptr, rows, active, w_hh_ptr + H * H, hid, hid_mask, H,
                                      DOT, BLOCK_K)
        hidden_n = add_hidden_projection(tl.zeros((BLOCK_B, BLOCK_H), ACC) + b_n[None, :], h_ptr, rows, active,
                                         w_hh_ptr + 2 * H * H, hid, hid_mask, H, DOT, BLOCK_K)
        r, z, n, h_new = _cell_forward_math(pre_r, pre_z, x_n, hidden_n, h)
        if ZONEOUT:
            weight = zoneout_weight(seed_ptr, 0, t, rows, hid, H, zoneout_hi, zoneout_lo, threshold, keep_all,
                                    ZONEOUT_MASK, ACC)
            h_new = zoneout_blend(h_new, h, weight, ZONEOUT_MASK)

        commit_hidden(h_new, output_ptr, h_ptr, t, rows, B, hid, hid_mask, active, H)
        if SAVE_WORKSPACE:
            _store_four(workspace_ptr, (t * B + rows)[:, None] * 4 * H + hid[None, :], state_mask, keep, H,
                        r, z, n, hidden_n)
        h = tl.where(keep, h_new, h)


@triton.jit(do_not_specialize=["T"])
def _gru_sequence_backward_kernel(
    grad_output_ptr, grad_h_n_ptr,  # (T,B,H), (B,H)
    h0_ptr, output_ptr, workspace_ptr,  # the forward's (B,H) h0, (T,B,H) output and (T,B,4H) workspace
    w_hh_ptr, batch_sizes_ptr,  # (3H,H), (T,) if HAS_BATCH_SIZES
    lengths_ptr, resets_ptr, seed_ptr,  # (B,) if USE_LENGTHS, (T,B) if USE_RESETS, () if ZONEOUT_MASK
    grad_pre_ptr,  # out (T,B,4H) [d r_pre, d z_pre, d n_pre, d n_pre * r], re-read as the recurrent GEMM operand
    grad_h0_ptr,  # out (B,H)
    T, B, H, zoneout_hi, zoneout_lo, threshold, keep_all,
    HAS_BATCH_SIZES: tl.constexpr, USE_LENGTHS: tl.constexpr, USE_RESETS: tl.constexpr, ZONEOUT: tl.constexpr,
    ZONEOUT_MASK: tl.constexpr, REVERSE: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, hid, hid_mask, state_mask, state_offsets = sequence_tile(B, H, BLOCK_B, BLOCK_H)
    grad_h = tl.load(grad_h_n_ptr + state_offsets, mask=state_mask, other=0).to(ACC)
    grad_h0 = tl.zeros((BLOCK_B, BLOCK_H), ACC)  # what reset steps hand back to h0

    for reverse_step in range(T):
        step = T - 1 - reverse_step  # the forward's step, undone last-first
        t, active = step_rows(step, T, rows, B, batch_sizes_ptr, lengths_ptr, HAS_BATCH_SIZES, USE_LENGTHS, REVERSE)
        keep = active[:, None] & hid_mask[None, :]
        grad_h += tl.load(grad_output_ptr + (t * B + rows)[:, None] * H + hid[None, :], mask=keep, other=0).to(ACC)
        grad_new = grad_h
        if ZONEOUT:
            weight = zoneout_weight(seed_ptr, 0, t, rows, hid, H, zoneout_hi, zoneout_lo, threshold, keep_all,
                                    ZONEOUT_MASK, ACC)
            grad_new, grad_kept = zoneout_gradients(grad_h, weight, ZONEOUT_MASK)

        wide_offsets = (t * B + rows)[:, None] * 4 * H + hid[None, :]
        r, z, n, hidden_n = _load_workspace(workspace_ptr, wide_offsets, keep, H, ACC)
        h_prev = previous_state(output_ptr, h0_ptr, step, T, rows, B, hid, hid_mask, H, batch_sizes_ptr, lengths_ptr,
                                resets_ptr, HAS_BATCH_SIZES, USE_LENGTHS, USE_RESETS, REVERSE).to(ACC)
        d_r, d_z, d_x_n, d_h_n, grad_h_prev = _cell_backward_math(grad_new, r, z, n, hidden_n, h_prev)
        if ZONEOUT:
            grad_h_prev += grad_kept
        _store_four(grad_pre_ptr, wide_offsets, state_mask, keep, H, d_r, d_z, d_x_n, d_h_n)
        tl.debug_barrier()  # the whole row of gradients is visible to every thread before the re-read

        # grad h_{t-1} += [d r_pre, d z_pre, d n_pre * r] @ W_hh, one gate's rows of W_hh at a time.
        row_ptr = grad_pre_ptr + t * B * 4 * H
        grad_h_prev = add_hidden_gradient(grad_h_prev, row_ptr, 4 * H, rows, active, w_hh_ptr, hid, hid_mask, H, H,
                                          DOT, BLOCK_K)
        grad_h_prev = add_hidden_gradient(grad_h_prev, row_ptr + H, 4 * H, rows, active, w_hh_ptr + H * H, hid,
                                          hid_mask, H, H, DOT, BLOCK_K)
        grad_h_prev = add_hidden_gradient(grad_h_prev, row_ptr + 3 * H, 4 * H, rows, active, w_hh_ptr + 2 * H * H,
                                          hid, hid_mask, H, H, DOT, BLOCK_K)
        grad_h = tl.where(keep, grad_h_prev, grad_h)
        if USE_RESETS:
            grad_h, grad_h0 = restart_gradient(grad_h, grad_h0, reset_rows(t, rows, B, resets_ptr, USE_RESETS))

    store(grad_h0_ptr + state_offsets, grad_h + grad_h0, state_mask)


# ==================================================================================================
# Launchers: the op signatures of seqkern/ops/_schemas.py. They check arguments, reshape, pick blocks and launch.
# ==================================================================================================
def gru_cell_forward(gates_x: Tensor, gates_h: Tensor, hx: Tensor, b_ih: Tensor | None,
                     b_hh: Tensor | None) -> tuple[Tensor, Tensor]:
    """gates_x = x W_ih^T, gates_h = h W_hh^T (B,3H), hx (B,H), b_ih, b_hh (3H,) or None
    -> hy (B,H), workspace (B,4H) = [r, z, n, h W_hn^T + b_hn]."""
    batch, hidden = check_state("hx", hx, "GRU")
    check("gates_x", gates_x, (batch, 3 * hidden), hx)
    check("gates_h", gates_h, (batch, 3 * hidden), hx)
    check_biases(b_ih, b_hh, 3 * hidden, hx)
    # new_empty, not empty_like: the kernels write row-major buffers whatever the inputs' strides.
    hy, workspace = hx.new_empty(batch, hidden), hx.new_empty(batch, 4 * hidden)
    if hy.numel() == 0:
        return hy, workspace
    blocks = cell_blocks(batch, hidden)
    grid = (triton.cdiv(batch, blocks["BLOCK_B"]), triton.cdiv(hidden, blocks["BLOCK_H"]))
    launch(_gru_cell_forward_kernel, grid, hx.device)(
        gates_x.contiguous(), gates_h.contiguous(), hx.contiguous(), contiguous_or_none(b_ih), contiguous_or_none(b_hh),
        hy, workspace, batch, hidden,
        HAS_BIAS=b_ih is not None, ACC=accumulator_dtype(hx.dtype), **blocks,
    )
    return hy, workspace


def gru_cell_backward(grad_hy: Tensor, hx: Tensor, workspace: Tensor,
                      has_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """grad_hy, hx (B,H), workspace (B,4H) -> grad_gates_x, grad_gates_h (B,3H) (they differ in the n gate),
    grad_hx (B,H), grad_b_ih, grad_b_hh (3H,) (empty (0,) unless has_bias)."""
    batch, hidden = check_state("hx", hx, "GRU")
    check("grad_hy", grad_hy, (batch, hidden), hx)
    check("workspace", workspace, (batch, 4 * hidden), hx)
    grad_gates_x, grad_gates_h = hx.new_empty(batch, 3 * hidden), hx.new_empty(batch, 3 * hidden)
    grad_hx = hx.new_empty(batch, hidden)
    grad_b_ih = hx.new_zeros(3 * hidden) if has_bias else hx.new_empty(0)
    grad_b_hh = hx.new_zeros(3 * hidden) if has_bias else hx.new_empty(0)
    if grad_hx.numel() == 0:
        return grad_gates_x, grad_gates_h, grad_hx, grad_b_ih, grad_b_hh
    blocks = cell_blocks(batch, hidden)
    launch(_gru_cell_backward_kernel, (triton.cdiv(hidden, blocks["BLOCK_H"]),), hx.device)(
        grad_hy.contiguous(), hx.contiguous(), workspace.contiguous(), grad_gates_x, grad_gates_h, grad_hx,
        grad_b_ih if has_bias else None, grad_b_hh if has_bias else None, batch, hidden,
        HAS_BIAS=bool(has_bias), ACC=accumulator_dtype(hx.dtype), **blocks,
    )
    return grad_gates_x, grad_gates_h, grad_hx, grad_b_ih, grad_b_hh


def gru_forward(input: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
                batch_sizes: Tensor | None, lengths: Tensor | None, resets: Tensor | None, zoneout: float,
                zoneout_seed: Tensor | None, reverse: bool, save_workspace: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One layer, one direction. input (T,B,I), h0 (B,H), w_ih (3H,I), w_hh (3H,H), b_ih, b_hh (3H,) or None
    -> output (T,B,H), h_n (B,H), workspace (T,B,4H) (empty (0,) unless save_workspace)."""
    seq_len, batch, input_size, hidden = check_layer(input, h0, w_ih, w_hh, batch_sizes, 3, "GRU")
    check_biases(b_ih, b_hh, 3 * hidden, input)
    flags = state_flags(input, batch_sizes, lengths, resets, reverse, zoneout, zoneout_seed)
    output = input.new_empty(seq_len, batch, hidden)
    h_n = h0.clone(memory_format=torch.contiguous_format)
    workspace = input.new_empty(seq_len, batch, 4 * hidden) if save_workspace else input.new_empty(0)
    if seq_len == 0 or batch == 0:
        return output, h_n, workspace

    # The input projection of every step at once: one GEMM over T*B rows, b_ih folded in.
    gates_x = linear(input.reshape(seq_len * batch, input_size), w_ih, b_ih).view(seq_len, batch, 3 * hidden)
    mode = recurrent_mode(batch, hidden, 3, input.dtype, sm_count(input.device))
    if mode["mode"] != "rows":
        output, h_n, _, split_workspace, _ = _recurrent_split.split_forward(
            _recurrent_split.GRU, mode, gates_x, w_hh, b_hh, h0, h0, on_device(batch_sizes, input), flags, reverse,
            save_workspace)
        return output, h_n, split_workspace if save_workspace else workspace
    launch(_gru_sequence_forward_kernel, sequence_grid(batch), input.device)(
        gates_x, w_hh.contiguous(), contiguous_or_none(b_hh), on_device(batch_sizes, input),
        h0_ptr=h0.contiguous(), output_ptr=output, h_ptr=h_n, workspace_ptr=workspace if save_workspace else None,
        T=seq_len, B=batch, H=hidden, **flags,
        HAS_BIAS=b_hh is not None, HAS_BATCH_SIZES=batch_sizes is not None, REVERSE=bool(reverse),
        SAVE_WORKSPACE=bool(save_workspace), **kernel_dtypes(input), **sequence_blocks(hidden, input.dtype),
    )
    return output, h_n, workspace


def gru_backward(grad_output: Tensor, grad_h_n: Tensor, input: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor,
                 output: Tensor, workspace: Tensor, batch_sizes: Tensor | None, lengths: Tensor | None,
                 resets: Tensor | None, zoneout: float, zoneout_seed: Tensor | None, reverse: bool, has_bias: bool
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of gru_forward from its output (T,B,H) and workspace (T,B,4H) -> grad_input (T,B,I),
    grad_h0 (B,H), grad_w_ih (3H,I), grad_w_hh (3H,H), grad_b_ih, grad_b_hh (3H,) (empty (0,) unless has_bias)."""
    seq_len, batch, _, hidden = check_layer(input, h0, w_ih, w_hh, batch_sizes, 3, "GRU")
    flags = state_flags(input, batch_sizes, lengths, resets, reverse, zoneout, zoneout_seed)
    check("grad_output", grad_output, (seq_len, batch, hidden), input)
    check("output", output, (seq_len, batch, hidden), input)
    check("grad_h_n", grad_h_n, (batch, hidden), input)
    check("workspace", workspace, (seq_len, batch, 4 * hidden), input)

    grad_pre = input.new_empty(seq_len, batch, 4 * hidden)
    # Cloned rather than empty: with no time step (or no row) the gradient passes straight through.
    grad_h0 = grad_h_n.clone(memory_format=torch.contiguous_format)
    mode = recurrent_mode(batch, hidden, 3, input.dtype, sm_count(input.device))
    if seq_len and batch and mode["mode"] != "rows":
        grad_pre, grad_h0, *_ = _recurrent_split.split_backward(
            _recurrent_split.GRU, mode, grad_output, grad_h_n, None, output, workspace.contiguous(), None, h0, None,
            w_hh, on_device(batch_sizes, input), flags, reverse)
    elif seq_len and batch:
        launch(_gru_sequence_backward_kernel, sequence_grid(batch), input.device)(
            grad_output.contiguous(), grad_h_n.contiguous(), h0.contiguous(), output.contiguous(),
            workspace.contiguous(), w_hh.contiguous(), on_device(batch_sizes, input),
            grad_pre_ptr=grad_pre, grad_h0_ptr=grad_h0, T=seq_len, B=batch, H=hidden, **flags,
            HAS_BATCH_SIZES=batch_sizes is not None, REVERSE=bool(reverse),
            **kernel_dtypes(input), **sequence_blocks(hidden, input.dtype),
        )

    grad_pre_x = grad_pre[..., : 3 * hidden]
    grad_pre_h = torch.cat([grad_pre[..., : 2 * hidden], grad_pre[..., 3 * hidden:]], dim=-1)
    grad_input, grad_w_ih = input_weight_gradients(grad_pre_x, input, w_ih)
    grad_w_hh = recurrent_weight_gradient(grad_pre_h, output, h0, batch_sizes, reverse, lengths, resets)
    if not has_bias:
        return grad_input, grad_h0, grad_w_ih, grad_w_hh, input.new_empty(0), input.new_empty(0)
    grad_b_ih = column_sums(grad_pre_x.reshape(seq_len * batch, 3 * hidden))
    grad_b_hh = column_sums(grad_pre_h.view(seq_len * batch, 3 * hidden))
    return grad_input, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh
