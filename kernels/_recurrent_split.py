"""The recurrent forward and backward with the hidden units split across programs (issue 17 item 1): one kernel each
for the LSTM, the GRU and the Elman RNN, the cell a compile-time plug-in (CELL: each op's `split_cell` /
`split_cell_backward` in kernels/<op>.py).

Each program owns BLOCK_U hidden units of BLOCK_B batch rows and ALL the gate columns of those units (the rows
u, H + u, 2H + u, ... of W_hh), so its cell needs nothing from another program; the programs exchange only
h_t, through a global double buffer h_buffers (2,B,H): the step run s-th reads h_buffers[s % 2] (every unit:
the left operand of its slice of the recurrent GEMM) and writes its units of h_buffers[(s + 1) % 2], so one
barrier per step is enough (no program overwrites what another may still be reading). Two launch modes share
this kernel (kernels/_recurrent.py `recurrent_mode` picks one per shape):
  * "persistent" (PERSISTENT): ONE launch walks all T steps; after each step the programs of a batch block
    meet at a grid barrier (`grid_barrier`: an arrival counter per batch block, release / acquire). It
    needs every program co-resident: the rule launches at most one program per SM (grid <= the SM count the
    device reports), and the launch is cooperative (triton 3.9's `launch_cooperative_grid=True`:
    cudaLaunchCooperativeKernel refuses a grid that cannot be co-resident instead of hanging). With RESIDENT
    the program's W_hh slice (gates x BLOCK_U x H) is loaded into registers once, before the time loop;
    otherwise it is re-read every step in BLOCK_K slices (from L1/L2: a slice, not all of W_hh, per SM).
  * "per_step": one launch per phase (step_begin = j, step_end = j + 1) over any number of programs, no
    waiting between programs: the kernel boundary is the barrier (CUDA-graph friendly: identical launches
    but for two integers).
A step is one phase (one barrier), or two with the LSTM's projection h_t = (o * tanh(c_t)) W_hr^T (P,H): the
gates and cells of a program's units, r = o * tanh(c_t) to a global buffer, barrier; then h_t for the program's
block of h's P columns (the same index block as its units; the grid covers max(H, P)) from every unit's r,
barrier. The running state of each unit (the LSTM's c, the GRU's h in float32; `state` (B,H) in ACC) stays in
registers across the steps of a launch and in `state_ptr` between launches. Rows inactive at a step (batch
sizes, lengths) carry h and the state; reset rows restart from h0 and the initial state; zoneout uses the
row-block kernels' mask bits: the same elements as there.
The backward (`_split_backward_kernel`) walks the steps last first with the same programs: a program forms the
pre-activation gradients d_gates of its units from the forward's workspace (the cell backward, local to the
units) and writes them to grad_pre[t], a fresh slice per step, for every program; after the barrier it adds
d_gates_t W_hh[:, its columns] (all programs' d_gates) to its columns of grad h_{t-1}. With the projection a
second phase per step exchanges grad h_t (grad_h_all[t]) before grad r = grad h_t W_hr[:, units]. The weight
gradients are torch GEMMs over all T*B rows of grad_pre afterwards, as after the row-block kernels.
Under the interpreter (no GPU) programs run one at a time: "per_step" runs as on a GPU; "persistent" runs
only with one program per barrier group (BLOCK_U >= max(H, P)), which still walks the loop, the buffers and
the barrier arithmetic.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from seqkern._checks import ShapeError

from . import gru, lstm, rnn
from ._launch import dot_operand_dtype, dot_precision, launch
from ._recurrent import (
    MIN_DOT_SIZE,
    accumulator_dtype,
    backward_mode,
    grid_barrier,
    pow2_at_least,
    previous_state,
    reset_rows,
    restart_gradient,
    step_rows,
    store,
    zoneout_blend,
    zoneout_gradients,
    zoneout_weight,
)

# CELL values: which op's split_cell the kernel calls, and its number of W_hh gate blocks.
LSTM, GRU, RNN_TANH, RNN_RELU = 0, 1, 2, 3
GATES = {LSTM: 4, GRU: 3, RNN_TANH: 1, RNN_RELU: 1}
BLOCK_K = 32  # K slice of the streamed W_hh (not RESIDENT)


@triton.jit
def _cell(CELL: tl.constexpr, x_0, x_1, x_2, x_3, hh_0, hh_1, hh_2, hh_3, state):
    """The op's cell on the input parts x_g and hidden parts hh_g (h_{t-1} W_hh^T (+ b_hh)) of its gates and
    its running state -> (h_t, the new state, the four workspace tiles the backward reads)."""
    if CELL == 0:
        h, new_state, w_0, w_1, w_2, w_3 = lstm.split_cell(x_0, x_1, x_2, x_3, hh_0, hh_1, hh_2, hh_3, state)
    elif CELL == 1:
        h, new_state, w_0, w_1, w_2, w_3 = gru.split_cell(x_0, x_1, x_2, hh_0, hh_1, hh_2, state)
    else:
        h, new_state, w_0, w_1, w_2, w_3 = rnn.split_cell(x_0, hh_0, state, CELL == 3)
    return h, new_state, w_0, w_1, w_2, w_3


@triton.jit
def _projected(proj_in_ptr, w_hr_ptr, rows, cols, col_mask, B, H, ACC: tl.constexpr, DOT: tl.constexpr,
               PRECISION: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_K: tl.constexpr):
    """The LSTM's projection of this program's output columns: r (B,H) @ W_hr[cols, :]^T -> (BLOCK_B, BLOCK_U), r =
    o * tanh(c_t) of every unit (every program's, from proj_in), W_hr (P,H) read in BLOCK_K-wide slices."""
    acc = tl.zeros((rows.shape[0], BLOCK_U), ACC)
    for k_start in range(0, H, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_mask = ks < H
        # .cg: straight from L2 (other SMs wrote these units; the barrier's acquire orders the read).
        a = tl.load(proj_in_ptr + rows[:, None] * H + ks[None, :], mask=(rows < B)[:, None] & k_mask[None, :],
                    other=0, cache_modifier=".cg")
        w = tl.load(w_hr_ptr + cols[None, :] * H + ks[:, None], mask=k_mask[:, None] & col_mask[None, :], other=0)
        acc = tl.dot(a.to(DOT), w.to(DOT), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _commit_hidden(h_new, h_prev, output_ptr, write_ptr, t, rows, cols, col_mask, keep, B, P):
    """h_t of this program's columns to output[t] (zeros on inactive rows) and to the write buffer (inactive rows
    carry h_{t-1})."""
    offsets = rows[:, None] * P + cols[None, :]
    in_rows = (rows < B)[:, None] & col_mask[None, :]
    store(output_ptr + t * B * P + offsets, tl.where(keep, h_new, 0), in_rows)
    store(write_ptr + offsets, tl.where(keep, h_new, h_prev.to(h_new.dtype)), in_rows)


@triton.jit
def _gate_weights(w_hh_ptr, gate, units, unit_mask, ks, k_mask, H, P):
    """The (K-slice, BLOCK_U) block of W_hh^T of one gate: W_hh[gate * H + units, ks] transposed (W_hh (G*H,P))."""
    return tl.load(w_hh_ptr + (gate * H + units)[None, :] * P + ks[:, None], mask=k_mask[:, None] & unit_mask[None, :],
                   other=0)


@triton.jit
def _previous_hidden(read_ptr, h0_ptr, rows, cols, col_mask, reset, B, P):
    """h_{t-1}[rows, cols] (h: (B,P)) in the tensors' dtype: the read buffer's, or h0's on reset rows."""
    offsets = rows[:, None] * P + cols[None, :]
    in_rows = (rows < B)[:, None] & col_mask[None, :]
    restarted = tl.load(h0_ptr + offsets, mask=in_rows & reset[:, None], other=0)
    # .cg: straight from L2, never a stale L1 line (another SM wrote it; the barrier's acquire orders it).
    carried = tl.load(read_ptr + offsets, mask=in_rows & ~reset[:, None], other=0, cache_modifier=".cg")
    return tl.where(reset[:, None], restarted, carried)


@triton.jit
def _resident_weights(w_hh_ptr, units, unit_mask, H, P, GATES: tl.constexpr, RESIDENT: tl.constexpr,
                      ACC: tl.constexpr, BLOCK_HK: tl.constexpr):
    """With RESIDENT the whole (BLOCK_HK, BLOCK_U) W_hh^T slice of each gate, in the tensors' dtype (a (1,1)
    placeholder for a gate the cell does not have, and for all four without RESIDENT)."""
    w_0 = tl.zeros((1, 1), ACC)
    w_1 = w_0
    w_2 = w_0
    w_3 = w_0
    if RESIDENT:
        ks = tl.arange(0, BLOCK_HK)
        w_0 = _gate_weights(w_hh_ptr, 0, units, unit_mask, ks, ks < P, H, P)
        if GATES > 1:
            w_1 = _gate_weights(w_hh_ptr, 1, units, unit_mask, ks, ks < P, H, P)
            w_2 = _gate_weights(w_hh_ptr, 2, units, unit_mask, ks, ks < P, H, P)
        if GATES > 3:
            w_3 = _gate_weights(w_hh_ptr, 3, units, unit_mask, ks, ks < P, H, P)
    return w_0, w_1, w_2, w_3


@triton.jit
def _bias_columns(b_hh_ptr, units, unit_mask, H, GATES: tl.constexpr, HAS_HH_BIAS: tl.constexpr, ACC: tl.constexpr):
    """b_hh[gate * H + units] of each gate with HAS_HH_BIAS, else (and past GATES) zeros: (BLOCK_U,) x4."""
    b_0 = tl.zeros(units.shape, ACC)
    b_1 = b_0
    b_2 = b_0
    b_3 = b_0
    if HAS_HH_BIAS:
        b_0 = tl.load(b_hh_ptr + units, mask=unit_mask, other=0).to(ACC)
        if GATES > 1:
            b_1 = tl.load(b_hh_ptr + H + units, mask=unit_mask, other=0).to(ACC)
            b_2 = tl.load(b_hh_ptr + 2 * H + units, mask=unit_mask, other=0).to(ACC)
        if GATES > 3:
            b_3 = tl.load(b_hh_ptr + 3 * H + units, mask=unit_mask, other=0).to(ACC)
    return b_0, b_1, b_2, b_3


@triton.jit
def _input_parts(gates_x_ptr, x_row_offsets, units, keep, H, GATES: tl.constexpr, ACC: tl.constexpr):
    """The input parts of the gates of this program's units at one step: (BLOCK_B, BLOCK_U) x4, zeros past
    GATES and on inactive rows."""
    x_0 = _gate_tile(gates_x_ptr, 0, x_row_offsets, units, keep, H, ACC)
    x_1 = tl.zeros(x_0.shape, ACC)
    x_2 = x_1
    x_3 = x_1
    if GATES > 1:
        x_1 = _gate_tile(gates_x_ptr, 1, x_row_offsets, units, keep, H, ACC)
        x_2 = _gate_tile(gates_x_ptr, 2, x_row_offsets, units, keep, H, ACC)
    if GATES > 3:
        x_3 = _gate_tile(gates_x_ptr, 3, x_row_offsets, units, keep, H, ACC)
    return x_0, x_1, x_2, x_3


@triton.jit
def _hidden_parts(read_ptr, h0_ptr, w_hh_ptr, w_0, w_1, w_2, w_3, rows, reset, active, units, unit_mask, B, H, P,
                  GATES: tl.constexpr, RESIDENT: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                  PRECISION: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_HK: tl.constexpr):
    """h_{t-1} (B,P) @ W_hh^T for this program's units, one (BLOCK_B, BLOCK_U) tile per gate (zeros past GATES),
    on the active rows: from the resident slices w_g, or streaming the slices in BLOCK_K-wide pieces."""
    hh_0 = tl.zeros((rows.shape[0], BLOCK_U), ACC)
    hh_1 = hh_0
    hh_2 = hh_0
    hh_3 = hh_0
    if RESIDENT:
        ks = tl.arange(0, BLOCK_HK)
        a = _previous_hidden(read_ptr, h0_ptr, rows, ks, ks < P, reset, B, P)
        a = tl.where(active[:, None], a, 0).to(DOT)
        hh_0 = tl.dot(a, w_0.to(DOT), hh_0, input_precision=PRECISION)
        if GATES > 1:
            hh_1 = tl.dot(a, w_1.to(DOT), hh_1, input_precision=PRECISION)
            hh_2 = tl.dot(a, w_2.to(DOT), hh_2, input_precision=PRECISION)
        if GATES > 3:
            hh_3 = tl.dot(a, w_3.to(DOT), hh_3, input_precision=PRECISION)
    else:
        for k_start in range(0, P, BLOCK_K):
            ks = k_start + tl.arange(0, BLOCK_K)
            k_mask = ks < P
            a = _previous_hidden(read_ptr, h0_ptr, rows, ks, k_mask, reset, B, P)
            a = tl.where(active[:, None], a, 0).to(DOT)
            hh_0 = tl.dot(a, _gate_weights(w_hh_ptr, 0, units, unit_mask, ks, k_mask, H, P).to(DOT), hh_0,
                          input_precision=PRECISION)
            if GATES > 1:
                hh_1 = tl.dot(a, _gate_weights(w_hh_ptr, 1, units, unit_mask, ks, k_mask, H, P).to(DOT), hh_1,
                              input_precision=PRECISION)
                hh_2 = tl.dot(a, _gate_weights(w_hh_ptr, 2, units, unit_mask, ks, k_mask, H, P).to(DOT), hh_2,
                              input_precision=PRECISION)
            if GATES > 3:
                hh_3 = tl.dot(a, _gate_weights(w_hh_ptr, 3, units, unit_mask, ks, k_mask, H, P).to(DOT), hh_3,
                              input_precision=PRECISION)
    return hh_0, hh_1, hh_2, hh_3


@triton.jit
def _gate_tile(ptr, gate, row_offsets, units, mask, H, ACC: tl.constexpr):
    """Columns gate * H + units of the rows at `row_offsets` (element offsets of the rows' starts), as ACC."""
    return tl.load(ptr + row_offsets[:, None] + gate * H + units[None, :], mask=mask, other=0).to(ACC)


@triton.jit(do_not_specialize=["T", "step_begin", "step_end"])
def _split_forward_kernel(
    gates_x_ptr,  # (T,B,GATES*H) the input projection (with the biases the op folds into it)
    w_hh_ptr, b_hh_ptr,  # (GATES*H,P), (GATES*H,) if HAS_HH_BIAS (the GRU's: r scales the n part of it)
    w_hr_ptr, proj_in_ptr,  # the LSTM's projection (P,H) and scratch (B,H) for o * tanh(c_t), if HAS_PROJ
    batch_sizes_ptr, lengths_ptr, resets_ptr,  # (T,) if HAS_BATCH_SIZES, (B,) if USE_LENGTHS, (T,B) if USE_RESETS
    seed_ptr,  # () if ZONEOUT_MASK
    h0_ptr, state0_ptr,  # (B,P) the initial h; (B,H) the initial state if HAS_STATE (c0 / h0)
    output_ptr,  # out (T,B,P)
    h_buffers_ptr,  # (2,B,P): h_{t-1} of every unit; [0] = h0 before the first step
    state_ptr,  # (B,H) ACC: the running state if HAS_STATE, read at the launch's start, written at its end
    workspace_ptr,  # out (T,B,4H) the cell's four workspace tiles per step, if SAVE_WORKSPACE
    states_ptr,  # out (T,B,H) the state after each step (the LSTM's cells), if SAVE_STATES
    arrivals_ptr,  # (batch blocks,) int32 zeros: the grid barrier's counters, if PERSISTENT
    T, B, H, P,  # P: the width of h (the projection's size with HAS_PROJ, else H)
    step_begin, step_end,  # this launch runs the phases [step_begin, step_end) (see below)
    zoneout_hi, zoneout_lo, threshold, keep_all,  # zoneout (kernels/_recurrent.py state_flags), if ZONEOUT
    CELL: tl.constexpr, GATES: tl.constexpr, HAS_STATE: tl.constexpr, HAS_HH_BIAS: tl.constexpr,
    HAS_PROJ: tl.constexpr, SAVE_WORKSPACE: tl.constexpr, SAVE_STATES: tl.constexpr, HAS_BATCH_SIZES: tl.constexpr,
    USE_LENGTHS: tl.constexpr, USE_RESETS: tl.constexpr, ZONEOUT: tl.constexpr, ZONEOUT_MASK: tl.constexpr,
    REVERSE: tl.constexpr, PERSISTENT: tl.constexpr,
    RESIDENT: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_HK: tl.constexpr,
):
    """Phase j of this loop belongs to step j (j // 2 with HAS_PROJ). A step is one phase: the gates of this
    program's units from h_{t-1} (every program's), the cell, h_t of its units committed. With HAS_PROJ it is two,
    each ended by the barrier (or the launch): (0) the gates and the cell of its units, r = o * tanh(c_t) to
    proj_in; (1) h_t = r W_hr^T for its output columns (the same index block of P's columns; every program's r),
    zoneout of h, the commit. The double buffer of h and the single r buffer are each read in the phase after the
    barrier that follows their writing, and written again only after the next barrier: nothing read is
    overwritten."""
    units = tl.program_id(0) * BLOCK_U + tl.arange(0, BLOCK_U)
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    unit_mask = units < H
    col_mask = units < P  # this program's columns of h (= its units without a projection)
    in_rows = (rows < B)[:, None] & unit_mask[None, :]
    unit_offsets = rows[:, None] * H + units[None, :]

    # Loaded once per launch: the resident W_hh slices, the b_hh columns of the units, the running state.
    w_0, w_1, w_2, w_3 = _resident_weights(w_hh_ptr, units, unit_mask, H, P, GATES, RESIDENT, ACC, BLOCK_HK)
    b_0, b_1, b_2, b_3 = _bias_columns(b_hh_ptr, units, unit_mask, H, GATES, HAS_HH_BIAS, ACC)
    state = tl.zeros((BLOCK_B, BLOCK_U), ACC)
    if HAS_STATE:
        state = tl.load(state_ptr + unit_offsets, mask=in_rows, other=0)

    for j in range(step_begin, step_end):
        step = j // (HAS_PROJ + 1)
        t, active = step_rows(step, T, rows, B, batch_sizes_ptr, lengths_ptr, HAS_BATCH_SIZES, USE_LENGTHS, REVERSE)
        reset = reset_rows(t, rows, B, resets_ptr, USE_RESETS)
        read_ptr = h_buffers_ptr + (step % 2) * B * P
        write_ptr = h_buffers_ptr + ((step + 1) % 2) * B * P
        keep = active[:, None] & unit_mask[None, :]
        if j % (HAS_PROJ + 1) == 0:
            if USE_RESETS and HAS_STATE:
                state0 = tl.load(state0_ptr + unit_offsets, mask=in_rows & reset[:, None], other=0).to(ACC)
                state = tl.where(reset[:, None], state0, state)
            hh_0, hh_1, hh_2, hh_3 = _hidden_parts(read_ptr, h0_ptr, w_hh_ptr, w_0, w_1, w_2, w_3, rows, reset,
                                                   active, units, unit_mask, B, H, P, GATES, RESIDENT, ACC, DOT,
                                                   PRECISION, BLOCK_U, BLOCK_K, BLOCK_HK)
            x_row_offsets = (t * B + rows) * (GATES * H)
            x_0, x_1, x_2, x_3 = _input_parts(gates_x_ptr, x_row_offsets, units, keep, H, GATES, ACC)
            h_new, state_new, w_a, w_b, w_c, w_d = _cell(CELL, x_0, x_1, x_2, x_3, hh_0 + b_0[None, :],
                                                        hh_1 + b_1[None, :], hh_2 + b_2[None, :],
                                                        hh_3 + b_3[None, :], state)
            # Zoneout keeps a unit's value from before the step where the mask says so (or blends, in evaluation),
            # with the row-block kernels' mask bits: element rows * width + column of state 0 (h) / 1 (c).
            if ZONEOUT and CELL == 0:
                state_new = zoneout_blend(state_new, state, zoneout_weight(
                    seed_ptr, 1, t, rows, units, H, zoneout_hi, zoneout_lo, threshold, keep_all, ZONEOUT_MASK, ACC),
                    ZONEOUT_MASK)
            if HAS_PROJ:
                store(proj_in_ptr + unit_offsets, h_new, in_rows)
            else:
                h_prev = _previous_hidden(read_ptr, h0_ptr, rows, units, unit_mask, reset, B, P)
                if ZONEOUT:  # the GRU's running state is h_{t-1} itself, in ACC
                    if CELL == 0:
                        h_old = h_prev.to(ACC)
                    else:
                        h_old = state
                    h_new = zoneout_blend(h_new, h_old, zoneout_weight(
                        seed_ptr, 0, t, rows, units, P, zoneout_hi, zoneout_lo, threshold, keep_all, ZONEOUT_MASK,
                        ACC), ZONEOUT_MASK)
                    if CELL == 1:
                        state_new = h_new
                _commit_hidden(h_new, h_prev, output_ptr, write_ptr, t, rows, units, unit_mask, keep, B, P)
            if SAVE_WORKSPACE:
                wide_offsets = (t * B + rows)[:, None] * 4 * H + units[None, :]
                store(workspace_ptr + wide_offsets, tl.where(keep, w_a, 0), in_rows)
                store(workspace_ptr + wide_offsets + H, tl.where(keep, w_b, 0), in_rows)
                store(workspace_ptr + wide_offsets + 2 * H, tl.where(keep, w_c, 0), in_rows)
                store(workspace_ptr + wide_offsets + 3 * H, tl.where(keep, w_d, 0), in_rows)
            if SAVE_STATES:
                store(states_ptr + t * B * H + unit_offsets, tl.where(keep, state_new, 0), in_rows)
            state = tl.where(keep, state_new, state)
        if HAS_PROJ:
            if j % 2 == 1:
                h_new = _projected(proj_in_ptr, w_hr_ptr, rows, units, col_mask, B, H, ACC, DOT, PRECISION, BLOCK_U,
                                   BLOCK_K)
                h_prev = _previous_hidden(read_ptr, h0_ptr, rows, units, col_mask, reset, B, P)
                if ZONEOUT:
                    h_new = zoneout_blend(h_new, h_prev.to(ACC), zoneout_weight(
                        seed_ptr, 0, t, rows, units, P, zoneout_hi, zoneout_lo, threshold, keep_all, ZONEOUT_MASK,
                        ACC), ZONEOUT_MASK)
                _commit_hidden(h_new, h_prev, output_ptr, write_ptr, t, rows, units, col_mask,
                               active[:, None] & col_mask[None, :], B, P)
        if PERSISTENT:
            grid_barrier(arrivals_ptr + tl.program_id(1), (j - step_begin + 1) * tl.num_programs(0))

    if HAS_STATE:
        tl.store(state_ptr + unit_offsets, state, mask=in_rows)


# ==================================================================================================
# The backward, split the same way (a program: BLOCK_U units x BLOCK_B rows, all gate columns of its units).
# ==================================================================================================
@triton.jit
def _cell_gradients(CELL: tl.constexpr, grad_h, grad_c, output_ptr, workspace_ptr, states_ptr, h0_ptr, state0_ptr,
                    step, t, rows, units, unit_mask, keep, B, H, T, batch_sizes_ptr, lengths_ptr, resets_ptr,
                    HAS_BATCH_SIZES: tl.constexpr, USE_LENGTHS: tl.constexpr, USE_RESETS: tl.constexpr,
                    ZONEOUT: tl.constexpr, REVERSE: tl.constexpr, ACC: tl.constexpr):
    """The op's cell backward at step `step` (time t) for this program's units, from the forward's saved tensors:
    grad_h, grad_c (BLOCK_B, BLOCK_U) the gradients reaching the step's new h and c (the LSTM's; unused else)
    -> the four pre-activation gradient tiles the op's layout stores (kernels/<op>.py split_cell_backward), the
    share of grad h_{t-1} that bypasses W_hh, and grad c_{t-1}."""
    unit_offsets = rows[:, None] * H + units[None, :]
    wide_offsets = (t * B + rows)[:, None] * 4 * H + units[None, :]
    if CELL == 0:
        i, f, g, o = lstm._load_gates(workspace_ptr, wide_offsets, keep, H, ACC)
        c_prev = previous_state(states_ptr, state0_ptr, step, T, rows, B, units, unit_mask, H, batch_sizes_ptr,
                                lengths_ptr, resets_ptr, HAS_BATCH_SIZES, USE_LENGTHS, USE_RESETS, REVERSE).to(ACC)
        if ZONEOUT:  # the recorded c_t is after zoneout; the cell's own c_t is recomputed
            c = f * c_prev + i * g
        else:
            c = tl.load(states_ptr + t * B * H + unit_offsets, mask=keep, other=0).to(ACC)
        d_0, d_1, d_2, d_3, bypass, grad_c_prev = lstm.split_cell_backward(grad_h, grad_c, i, f, g, o, c_prev, c)
    elif CELL == 1:
        r, z, n, hidden_n = gru._load_workspace(workspace_ptr, wide_offsets, keep, H, ACC)
        h_prev = previous_state(output_ptr, h0_ptr, step, T, rows, B, units, unit_mask, H, batch_sizes_ptr,
                                lengths_ptr, resets_ptr, HAS_BATCH_SIZES, USE_LENGTHS, USE_RESETS, REVERSE).to(ACC)
        d_0, d_1, d_2, d_3, bypass, grad_c_prev = gru.split_cell_backward(grad_h, r, z, n, hidden_n, h_prev)
    else:
        hy = tl.load(output_ptr + t * B * H + unit_offsets, mask=keep, other=0).to(ACC)
        d_0, d_1, d_2, d_3, bypass, grad_c_prev = rnn.split_cell_backward(grad_h, hy, CELL == 3)
    return d_0, d_1, d_2, d_3, bypass, grad_c_prev


@triton.jit
def _recurrent_gradient(grad_pre_ptr, w_hh_ptr, t, rows, cols, col_mask, B, H, P, CELL: tl.constexpr,
                        GATES: tl.constexpr, WIDTH: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                        PRECISION: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's columns of d_gates_t @ W_hh, the recurrent share of grad h_{t-1}: (BLOCK_B, BLOCK_U).
    d_gates_t is every program's: the hidden parts of the pre-activation gradients at time t, columns gate * H
    of grad_pre (T,B,WIDTH*H) (the GRU's n gate: column 3H, d n_pre * r), read in BLOCK_K-wide slices against
    the (BLOCK_K, BLOCK_U) blocks W_hh[gate * H + k, cols] (W_hh (G*H,P))."""
    acc = tl.zeros((rows.shape[0], BLOCK_U), ACC)
    row_offsets = (t * B + rows) * (WIDTH * H)
    for gate in tl.static_range(GATES):
        column = gate * H
        if CELL == 1 and gate == 2:
            column = 3 * H
        for k_start in range(0, H, BLOCK_K):
            ks = k_start + tl.arange(0, BLOCK_K)
            k_mask = ks < H
            # .cg: straight from L2 (other SMs wrote these columns; the barrier's acquire orders the read).
            a = tl.load(grad_pre_ptr + row_offsets[:, None] + column + ks[None, :],
                        mask=(rows < B)[:, None] & k_mask[None, :], other=0, cache_modifier=".cg")
            w = tl.load(w_hh_ptr + (gate * H + ks)[:, None] * P + cols[None, :],
                        mask=k_mask[:, None] & col_mask[None, :], other=0)
            acc = tl.dot(a.to(DOT), w.to(DOT), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _projection_gradient(grad_h_all_ptr, w_hr_ptr, t, rows, units, unit_mask, B, H, P, ACC: tl.constexpr,
                         DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_K: tl.constexpr):
    """The LSTM's grad r for this program's units: grad h_t (B,P) (every program's columns, from grad_h_all[t]) @
    W_hr[:, units] (W_hr (P,H)) -> (BLOCK_B, BLOCK_U)."""
    acc = tl.zeros((rows.shape[0], BLOCK_U), ACC)
    for k_start in range(0, P, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_mask = ks < P
        a = tl.load(grad_h_all_ptr + (t * B + rows)[:, None] * P + ks[None, :],
                    mask=(rows < B)[:, None] & k_mask[None, :], other=0, cache_modifier=".cg")
        w = tl.load(w_hr_ptr + ks[:, None] * H + units[None, :], mask=k_mask[:, None] & unit_mask[None, :], other=0)
        acc = tl.dot(a.to(DOT), w.to(DOT), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _cell_phase(CELL: tl.constexpr, grad_r, grad_c, grad_c0, output_ptr, workspace_ptr, states_ptr, h0_ptr,
                state0_ptr, grad_pre_ptr, seed_ptr, step, T, rows, units, unit_mask, B, H, batch_sizes_ptr,
                lengths_ptr, resets_ptr, zoneout_hi, zoneout_lo, threshold, keep_all, WIDTH: tl.constexpr,
                HAS_BATCH_SIZES: tl.constexpr, USE_LENGTHS: tl.constexpr, USE_RESETS: tl.constexpr,
                ZONEOUT: tl.constexpr, ZONEOUT_MASK: tl.constexpr, REVERSE: tl.constexpr, ACC: tl.constexpr):
    """The cell backward of `step` for this program's units: grad_r the gradient reaching the cell's h output (o *
    tanh(c_t) for the LSTM), grad_c the LSTM's grad c_t (after zoneout) -> d_gates stored to grad_pre[t] for every
    program, and (the share of grad h_{t-1} that bypasses W_hh, grad c_{t-1}, grad c0's share from resets)."""
    t, active = step_rows(step, T, rows, B, batch_sizes_ptr, lengths_ptr, HAS_BATCH_SIZES, USE_LENGTHS, REVERSE)
    keep = active[:, None] & unit_mask[None, :]
    in_rows = (rows < B)[:, None] & unit_mask[None, :]
    grad_c_new = grad_c
    grad_c_kept = tl.zeros(grad_c.shape, ACC)
    if ZONEOUT and CELL == 0:
        grad_c_new, grad_c_kept = zoneout_gradients(grad_c, zoneout_weight(
            seed_ptr, 1, t, rows, units, H, zoneout_hi, zoneout_lo, threshold, keep_all, ZONEOUT_MASK, ACC),
            ZONEOUT_MASK)
    d_0, d_1, d_2, d_3, bypass, grad_c_prev = _cell_gradients(
        CELL, grad_r, grad_c_new, output_ptr, workspace_ptr, states_ptr, h0_ptr, state0_ptr, step, t, rows, units,
        unit_mask, keep, B, H, T, batch_sizes_ptr, lengths_ptr, resets_ptr, HAS_BATCH_SIZES, USE_LENGTHS, USE_RESETS,
        ZONEOUT, REVERSE, ACC)
    pre_offsets = (t * B + rows)[:, None] * (WIDTH * H) + units[None, :]
    store(grad_pre_ptr + pre_offsets, tl.where(keep, d_0, 0), in_rows)
    if WIDTH > 1:
        store(grad_pre_ptr + pre_offsets + H, tl.where(keep, d_1, 0), in_rows)
        store(grad_pre_ptr + pre_offsets + 2 * H, tl.where(keep, d_2, 0), in_rows)
        store(grad_pre_ptr + pre_offsets + 3 * H, tl.where(keep, d_3, 0), in_rows)
    if CELL == 0:
        grad_c = tl.where(keep, grad_c_prev + grad_c_kept, grad_c)
        if USE_RESETS:
            grad_c, grad_c0 = restart_gradient(grad_c, grad_c0, reset_rows(t, rows, B, resets_ptr, USE_RESETS))
    return bypass, grad_c, grad_c0


@triton.jit(do_not_specialize=["T", "step_begin", "step_end"])
def _split_backward_kernel(
    grad_output_ptr,  # (T,B,P)
    output_ptr, workspace_ptr, states_ptr,  # the forward's (T,B,P) output, (T,B,4H) workspace, (T,B,H) cells (LSTM)
    h0_ptr, state0_ptr,  # (B,P) h0 (the GRU's state before its first step), (B,H) c0 (the LSTM's)
    w_hh_ptr, w_hr_ptr,  # (GATES*H,P); the LSTM's projection (P,H) if HAS_PROJ
    batch_sizes_ptr, lengths_ptr, resets_ptr, seed_ptr,  # as the forward's
    grad_pre_ptr,  # out (T,B,WIDTH*H) the pre-activation gradients (the op's layout), exchanged between programs
    grad_h_all_ptr,  # out (T,B,P) the gradient reaching each step's projected h_t (after zoneout), if HAS_PROJ
    carry_ptr,  # (4,B*max(H,P)) ACC: grad h (B,P), grad c (B,H), and what resets handed to h0 (B,P) and c0 (B,H),
                # each at the start of its block; read at the launch's start, written at its end
    arrivals_ptr,  # (batch blocks,) int32 zeros: the grid barrier's counters, if PERSISTENT
    T, B, H, P, step_begin, step_end,  # this launch runs the phases [step_begin, step_end) (see below)
    zoneout_hi, zoneout_lo, threshold, keep_all,
    CELL: tl.constexpr, GATES: tl.constexpr, WIDTH: tl.constexpr, HAS_PROJ: tl.constexpr,
    HAS_BATCH_SIZES: tl.constexpr, USE_LENGTHS: tl.constexpr, USE_RESETS: tl.constexpr, ZONEOUT: tl.constexpr,
    ZONEOUT_MASK: tl.constexpr, REVERSE: tl.constexpr, PERSISTENT: tl.constexpr, ACC: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Undoes the forward's steps last-first. Step s of this loop (the forward's step T - 1 - s) is phase j = s
    (j = 2 s and 2 s + 1 with HAS_PROJ), each ended by the barrier (PERSISTENT; or the launch's end):
      * phase 2s (or s) first adds the recurrent share of the step undone before, for this program's columns of h:
        grad h_{t-1} += d_gates_t @ W_hh[:, cols] (every program's d_gates_t), then that step's resets; then
        grad_output[t] joins grad h and zoneout splits it; without HAS_PROJ the cell backward of this program's
        units follows at once (grad r = grad h); with it grad h_t goes to grad_h_all[t] for every program;
      * phase 2s + 1 (HAS_PROJ): grad r = grad h_t @ W_hr[:, units], the cell backward of its units.
    The cell backward writes d_gates to grad_pre[t], a fresh slice per step (as grad_h_all[t]): nothing read is
    overwritten, one barrier per phase suffices. The last phase (2T, or T) only adds the last recurrent share.
    The persistent launch runs every phase; per step, a launch per phase."""
    units = tl.program_id(0) * BLOCK_U + tl.arange(0, BLOCK_U)
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    unit_mask = units < H
    col_mask = units < P  # this program's columns of h (= its units without a projection)
    in_rows = (rows < B)[:, None] & unit_mask[None, :]
    in_cols = (rows < B)[:, None] & col_mask[None, :]
    unit_offsets = rows[:, None] * H + units[None, :]
    col_offsets = rows[:, None] * P + units[None, :]
    block = B * tl.maximum(H, P)  # the carry's blocks
    grad_h = tl.load(carry_ptr + col_offsets, mask=in_cols, other=0)
    grad_c = tl.load(carry_ptr + block + unit_offsets, mask=in_rows, other=0)
    grad_h0 = tl.load(carry_ptr + 2 * block + col_offsets, mask=in_cols, other=0)
    grad_c0 = tl.load(carry_ptr + 3 * block + unit_offsets, mask=in_rows, other=0)

    for j in range(step_begin, step_end):
        s = j // (HAS_PROJ + 1)
        if j % (HAS_PROJ + 1) == 0:
            if s > 0:
                t, active = step_rows(T - s, T, rows, B, batch_sizes_ptr, lengths_ptr, HAS_BATCH_SIZES, USE_LENGTHS,
                                      REVERSE)
                recurrent = _recurrent_gradient(grad_pre_ptr, w_hh_ptr, t, rows, units, col_mask, B, H, P, CELL,
                                                GATES, WIDTH, ACC, DOT, PRECISION, BLOCK_U, BLOCK_K)
                grad_h += tl.where(active[:, None] & col_mask[None, :], recurrent, 0)
                if USE_RESETS:
                    grad_h, grad_h0 = restart_gradient(grad_h, grad_h0, reset_rows(t, rows, B, resets_ptr,
                                                                                   USE_RESETS))
            if s < T:
                step = T - 1 - s
                t, active = step_rows(step, T, rows, B, batch_sizes_ptr, lengths_ptr, HAS_BATCH_SIZES, USE_LENGTHS,
                                      REVERSE)
                keep = active[:, None] & col_mask[None, :]
                grad_h += tl.load(grad_output_ptr + t * B * P + col_offsets, mask=keep, other=0).to(ACC)
                grad_h_new = grad_h  # the gradient of the step's new h (before zoneout)
                grad_h_kept = tl.zeros(grad_h.shape, ACC)
                if ZONEOUT:
                    grad_h_new, grad_h_kept = zoneout_gradients(grad_h, zoneout_weight(
                        seed_ptr, 0, t, rows, units, P, zoneout_hi, zoneout_lo, threshold, keep_all, ZONEOUT_MASK,
                        ACC), ZONEOUT_MASK)
                if HAS_PROJ:
                    store(grad_h_all_ptr + t * B * P + col_offsets, tl.where(keep, grad_h_new, 0), in_cols)
                    grad_h = tl.where(keep, grad_h_kept, grad_h)
                else:
                    bypass, grad_c, grad_c0 = _cell_phase(
                        CELL, grad_h_new, grad_c, grad_c0, output_ptr, workspace_ptr, states_ptr, h0_ptr, state0_ptr,
                        grad_pre_ptr, seed_ptr, step, T, rows, units, unit_mask, B, H, batch_sizes_ptr, lengths_ptr,
                        resets_ptr, zoneout_hi, zoneout_lo, threshold, keep_all, WIDTH, HAS_BATCH_SIZES, USE_LENGTHS,
                        USE_RESETS, ZONEOUT, ZONEOUT_MASK, REVERSE, ACC)
                    # The recurrent share joins in the next phase, on the same rows (active at t).
                    grad_h = tl.where(keep, bypass + grad_h_kept, grad_h)
                if PERSISTENT:
                    grid_barrier(arrivals_ptr + tl.program_id(1), (j - step_begin + 1) * tl.num_programs(0))
        if HAS_PROJ:
            if j % 2 == 1:
                t, active = step_rows(T - 1 - s, T, rows, B, batch_sizes_ptr, lengths_ptr, HAS_BATCH_SIZES,
                                      USE_LENGTHS, REVERSE)
                grad_r = _projection_gradient(grad_h_all_ptr, w_hr_ptr, t, rows, units, unit_mask, B, H, P, ACC, DOT,
                                              PRECISION, BLOCK_U, BLOCK_K)
                # (the LSTM's bypass share is zero)
                _, grad_c, grad_c0 = _cell_phase(
                    CELL, grad_r, grad_c, grad_c0, output_ptr, workspace_ptr, states_ptr, h0_ptr, state0_ptr,
                    grad_pre_ptr, seed_ptr, T - 1 - s, T, rows, units, unit_mask, B, H, batch_sizes_ptr, lengths_ptr,
                    resets_ptr, zoneout_hi, zoneout_lo, threshold, keep_all, WIDTH, HAS_BATCH_SIZES, USE_LENGTHS,
                    USE_RESETS, ZONEOUT, ZONEOUT_MASK, REVERSE, ACC)
                if PERSISTENT:
                    grid_barrier(arrivals_ptr + tl.program_id(1), (j - step_begin + 1) * tl.num_programs(0))

    tl.store(carry_ptr + col_offsets, grad_h, mask=in_cols)
    tl.store(carry_ptr + block + unit_offsets, grad_c, mask=in_rows)
    tl.store(carry_ptr + 2 * block + col_offsets, grad_h0, mask=in_cols)
    tl.store(carry_ptr + 3 * block + unit_offsets, grad_c0, mask=in_rows)


# ==================================================================================================
# Launcher.
# ==================================================================================================
def split_forward(cell: int, mode: dict, gates_x: Tensor, w_hh: Tensor, b_hh: Tensor | None, h0: Tensor,
                  state0: Tensor | None, batch_sizes: Tensor | None, flags: dict, reverse: bool,
                  save_workspace: bool, w_hr: Tensor | None = None
                  ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """One layer, one direction, in `mode` ("persistent" | "per_step", from kernels/_recurrent.py
    recurrent_mode). gates_x (T,B,G*H), w_hh (G*H,P), b_hh (G*H,) added to the hidden parts (the GRU's) or None,
    h0 (B,P), state0 (B,H) the initial running state (c0, or h0 for the GRU) or None (the RNN), batch_sizes on
    the tensors' device, flags from state_flags (lengths, resets, zoneout), w_hr (P,H) the LSTM's projection
    or None (then P = H). The grid covers max(H, P) (a program's units and the same block of h's columns).
    -> output (T,B,P), h_n (B,P), the final state (B,H) or None, the workspace (T,B,4H) and the states
    (T,B,H) (the LSTM's cells) if save_workspace (else None)."""
    seq_len, batch, _ = gates_x.shape
    hidden, width = (state0 if state0 is not None else h0).shape[1], h0.shape[1]
    device = gates_x.device
    grid = _split_grid(mode, batch, max(hidden, width), device)
    persistent = mode["mode"] == "persistent"
    output = gates_x.new_empty(seq_len, batch, width)
    h_buffers = gates_x.new_empty(2, batch, width)
    h_buffers[0] = h0
    acc = torch.float64 if gates_x.dtype == torch.float64 else torch.float32
    state = state0.to(acc, copy=True) if state0 is not None else None
    # The backward's workspace: the LSTM's and GRU's four tiles per step (the RNN's backward needs only the output).
    workspace = gates_x.new_empty(seq_len, batch, 4 * hidden) if save_workspace and GATES[cell] > 1 else None
    states = gates_x.new_empty(seq_len, batch, hidden) if save_workspace and cell == LSTM else None
    arguments = dict(
        gates_x_ptr=gates_x, w_hh_ptr=w_hh.contiguous(), b_hh_ptr=b_hh.contiguous() if b_hh is not None else None,
        w_hr_ptr=w_hr.contiguous() if w_hr is not None else None,
        proj_in_ptr=gates_x.new_empty(batch, hidden) if w_hr is not None else None,
        batch_sizes_ptr=batch_sizes, h0_ptr=h0.contiguous(),
        state0_ptr=state0.contiguous() if state0 is not None else None,
        output_ptr=output, h_buffers_ptr=h_buffers, state_ptr=state, workspace_ptr=workspace, states_ptr=states,
        arrivals_ptr=torch.zeros(grid[1], dtype=torch.int32, device=device) if persistent else None,
        T=seq_len, B=batch, H=hidden, P=width,
        CELL=cell, GATES=GATES[cell], HAS_STATE=state0 is not None, HAS_HH_BIAS=b_hh is not None,
        HAS_PROJ=w_hr is not None, SAVE_WORKSPACE=workspace is not None, SAVE_STATES=states is not None,
        HAS_BATCH_SIZES=batch_sizes is not None, REVERSE=bool(reverse), PERSISTENT=persistent, **flags,
        **split_tiles(mode, width, gates_x.dtype, device),
    )
    _run(_split_forward_kernel, grid, device, persistent, (1 + (w_hr is not None)) * seq_len, arguments)
    return output, h_buffers[seq_len % 2].clone(), state, workspace, states


def _run(kernel, grid: tuple, device: torch.device, persistent: bool, phases: int, arguments: dict) -> None:
    """Runs `phases` phases of a split kernel: one cooperative launch over all of them (persistent), or one launch
    per phase (the kernel boundary is the barrier)."""
    if persistent:
        _launch_persistent(kernel, grid, device)(step_begin=0, step_end=phases, **arguments)
        return
    run = launch(kernel, grid, device)
    for phase in range(phases):
        run(step_begin=phase, step_end=phase + 1, **arguments)


def split_tiles(mode: dict, width: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The constexprs and launch options of a split launch in `mode` (dtypes, precision, tiles, warps, the register
    cap) for h of `width` columns (the hidden size, or the LSTM's projection size)."""
    return dict(ACC=accumulator_dtype(dtype), DOT=dot_operand_dtype(dtype, device),
                PRECISION=dot_precision(dtype, device), RESIDENT=bool(mode["RESIDENT"]), BLOCK_B=mode["BLOCK_B"],
                BLOCK_U=mode["BLOCK_U"], BLOCK_K=BLOCK_K, BLOCK_HK=pow2_at_least(width, MIN_DOT_SIZE),
                num_warps=mode["num_warps"], num_stages=mode["num_stages"], maxnreg=mode["maxnreg"])


def _launch_persistent(kernel, grid: tuple, device: torch.device):
    """The persistent launch: cooperative (all programs co-resident, or the launch fails rather than hanging at the
    first barrier); the interpreter drops the keyword (the launcher allows one program per barrier group there)."""
    return functools.partial(launch(kernel, grid, device), launch_cooperative_grid=True)


def _split_grid(mode: dict, batch: int, hidden: int, device: torch.device) -> tuple[int, int]:
    """(unit blocks, batch blocks) of a split launch over `hidden` units (max(H, P)); refuses a persistent one the
    interpreter cannot run."""
    grid = (triton.cdiv(hidden, mode["BLOCK_U"]), triton.cdiv(batch, mode["BLOCK_B"]))
    if mode["mode"] == "persistent" and device.type != "cuda" and grid[0] > 1:
        raise ShapeError(f"the persistent split mode under the interpreter needs one program per batch block "
                         f"(BLOCK_U {mode['BLOCK_U']} >= hidden {hidden}): programs run one after another there")
    return grid


def split_backward(cell: int, mode: dict, grad_output: Tensor, grad_h_n: Tensor, grad_c_n: Tensor | None,
                   output: Tensor, workspace: Tensor | None, states: Tensor | None, h0: Tensor, c0: Tensor | None,
                   w_hh: Tensor, batch_sizes: Tensor | None, flags: dict, reverse: bool, w_hr: Tensor | None = None
                   ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """The backward of one layer, one direction, through the time loop, in `mode` (as split_forward, with
    backward_mode's tiles; the forward may have run in any mode: the saved tensors are the same). grad_output,
    output (T,B,P), grad_h_n, h0 (B,P), the LSTM's grad_c_n and c0 (B,H) and cells `states` (T,B,H) (else None),
    the LSTM's / GRU's workspace (T,B,4H) (else None), w_hh (G*H,P), batch_sizes on the tensors' device, flags
    from state_flags, w_hr (P,H) the LSTM's projection or None (then P = H)
    -> grad_pre: the pre-activation gradients in the op's layout ((T,B,4H) LSTM [i, f, g, o], GRU
       [r, z, n_x, n_h]; (T,B,H) RNN), grad_h0 (B,P), grad_c0 (B,H) (LSTM, else None), grad_h_all (T,B,P) the
       gradient reaching each projected h_t (with w_hr, else None).
    The weight gradients are the callers' torch GEMMs over all T*B rows of grad_pre, as after the row-block
    kernels."""
    seq_len, batch, width = output.shape
    hidden = w_hh.shape[0] // GATES[cell]
    device = output.device
    mode = backward_mode(mode)
    grid = _split_grid(mode, batch, max(hidden, width), device)
    persistent = mode["mode"] == "persistent"
    layout = 4 if GATES[cell] > 1 else 1
    grad_pre = output.new_empty(seq_len, batch, layout * hidden)
    grad_h_all = output.new_empty(seq_len, batch, width) if w_hr is not None else None
    acc = torch.float64 if output.dtype == torch.float64 else torch.float32
    # grad h, grad c, and the resets' shares of grad h0 and grad c0, each at the start of a (B*max(H,P)) block.
    carry = torch.zeros(4, batch * max(hidden, width), dtype=acc, device=device)
    carry[0, : batch * width] = grad_h_n.reshape(-1)
    if grad_c_n is not None:
        carry[1, : batch * hidden] = grad_c_n.reshape(-1)
    tiles = split_tiles(mode, width, output.dtype, device)
    del tiles["RESIDENT"], tiles["BLOCK_HK"]  # the backward streams its W_hh columns (see NOTES.md)
    arguments = dict(
        grad_output_ptr=grad_output.contiguous(), output_ptr=output.contiguous(), workspace_ptr=workspace,
        states_ptr=states, h0_ptr=h0.contiguous(), state0_ptr=c0, w_hh_ptr=w_hh.contiguous(),
        w_hr_ptr=w_hr.contiguous() if w_hr is not None else None, batch_sizes_ptr=batch_sizes, grad_pre_ptr=grad_pre,
        grad_h_all_ptr=grad_h_all, carry_ptr=carry,
        arrivals_ptr=torch.zeros(grid[1], dtype=torch.int32, device=device) if persistent else None,
        T=seq_len, B=batch, H=hidden, P=width, CELL=cell, GATES=GATES[cell], WIDTH=layout, HAS_PROJ=w_hr is not None,
        HAS_BATCH_SIZES=batch_sizes is not None, REVERSE=bool(reverse), PERSISTENT=persistent, **flags, **tiles,
    )
    # Every step's phases (two with a projection), and the last recurrent share.
    _run(_split_backward_kernel, grid, device, persistent, (1 + (w_hr is not None)) * seq_len + 1, arguments)
    grad_h0 = (carry[0, : batch * width] + carry[2, : batch * width]).view(batch, width).to(output.dtype)
    grad_c0 = None
    if grad_c_n is not None:
        grad_c0 = (carry[1, : batch * hidden] + carry[3, : batch * hidden]).view(batch, hidden).to(output.dtype)
    return grad_pre, grad_h0, grad_c0, grad_h_all
