"""The recurrent forward with the hidden units split across programs (issue 17 item 1): one kernel for the LSTM,
the GRU and the Elman RNN, the cell a compile-time plug-in (CELL: each op's `split_cell` in kernels/<op>.py).

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
  * "per_step": one launch per time step (step_begin = s, step_end = s + 1) over any number of programs, no
    waiting between programs: the kernel boundary is the barrier (CUDA-graph friendly: T identical launches
    but for two integers).
The running state of each unit (the LSTM's c, the GRU's h in float32; `state` (B,H) in ACC) stays in
registers across the steps of a launch and in `state_ptr` between launches. Rows inactive at a step (batch
sizes, lengths) carry h and the state; reset rows restart from h0 and the initial state, as the row-block
kernels do. The LSTM's projection and zoneout are not implemented here: the rule keeps those on the row-block
kernels. The backward is the row-block kernel's (the weight gradients are torch GEMMs either way).
Under the interpreter (no GPU) programs run one at a time: "per_step" runs as on a GPU; "persistent" runs
only with one program per barrier group (BLOCK_U >= H), which still walks the loop, the double buffer and
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
    grid_barrier,
    pow2_at_least,
    reset_rows,
    step_rows,
    store,
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
def _gate_weights(w_hh_ptr, gate, units, unit_mask, ks, k_mask, H):
    """The (K-slice, BLOCK_U) block of W_hh^T of one gate: W_hh[gate * H + units, ks] transposed."""
    return tl.load(w_hh_ptr + (gate * H + units)[None, :] * H + ks[:, None], mask=k_mask[:, None] & unit_mask[None, :],
                   other=0)


@triton.jit
def _previous_hidden(read_ptr, h0_ptr, rows, cols, col_mask, reset, B, H):
    """h_{t-1}[rows, cols] in the tensors' dtype: the read buffer's, or h0's on reset rows."""
    offsets = rows[:, None] * H + cols[None, :]
    in_rows = (rows < B)[:, None] & col_mask[None, :]
    restarted = tl.load(h0_ptr + offsets, mask=in_rows & reset[:, None], other=0)
    # .cg: straight from L2, never a stale L1 line (another SM wrote it; the barrier's acquire orders it).
    carried = tl.load(read_ptr + offsets, mask=in_rows & ~reset[:, None], other=0, cache_modifier=".cg")
    return tl.where(reset[:, None], restarted, carried)


@triton.jit
def _resident_weights(w_hh_ptr, units, unit_mask, H, GATES: tl.constexpr, RESIDENT: tl.constexpr,
                      ACC: tl.constexpr, BLOCK_HK: tl.constexpr):
    """With RESIDENT the whole (BLOCK_HK, BLOCK_U) W_hh^T slice of each gate, in the tensors' dtype (a (1,1)
    placeholder for a gate the cell does not have, and for all four without RESIDENT)."""
    w_0 = tl.zeros((1, 1), ACC)
    w_1 = w_0
    w_2 = w_0
    w_3 = w_0
    if RESIDENT:
        ks = tl.arange(0, BLOCK_HK)
        w_0 = _gate_weights(w_hh_ptr, 0, units, unit_mask, ks, ks < H, H)
        if GATES > 1:
            w_1 = _gate_weights(w_hh_ptr, 1, units, unit_mask, ks, ks < H, H)
            w_2 = _gate_weights(w_hh_ptr, 2, units, unit_mask, ks, ks < H, H)
        if GATES > 3:
            w_3 = _gate_weights(w_hh_ptr, 3, units, unit_mask, ks, ks < H, H)
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
def _hidden_parts(read_ptr, h0_ptr, w_hh_ptr, w_0, w_1, w_2, w_3, rows, reset, active, units, unit_mask, B, H,
                  GATES: tl.constexpr, RESIDENT: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                  PRECISION: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_HK: tl.constexpr):
    """h_{t-1} @ W_hh^T for this program's units, one (BLOCK_B, BLOCK_U) tile per gate (zeros past GATES),
    on the active rows: from the resident slices w_g, or streaming the slices in BLOCK_K-wide pieces."""
    hh_0 = tl.zeros((rows.shape[0], BLOCK_U), ACC)
    hh_1 = hh_0
    hh_2 = hh_0
    hh_3 = hh_0
    if RESIDENT:
        ks = tl.arange(0, BLOCK_HK)
        a = _previous_hidden(read_ptr, h0_ptr, rows, ks, ks < H, reset, B, H)
        a = tl.where(active[:, None], a, 0).to(DOT)
        hh_0 = tl.dot(a, w_0.to(DOT), hh_0, input_precision=PRECISION)
        if GATES > 1:
            hh_1 = tl.dot(a, w_1.to(DOT), hh_1, input_precision=PRECISION)
            hh_2 = tl.dot(a, w_2.to(DOT), hh_2, input_precision=PRECISION)
        if GATES > 3:
            hh_3 = tl.dot(a, w_3.to(DOT), hh_3, input_precision=PRECISION)
    else:
        for k_start in range(0, H, BLOCK_K):
            ks = k_start + tl.arange(0, BLOCK_K)
            k_mask = ks < H
            a = _previous_hidden(read_ptr, h0_ptr, rows, ks, k_mask, reset, B, H)
            a = tl.where(active[:, None], a, 0).to(DOT)
            hh_0 = tl.dot(a, _gate_weights(w_hh_ptr, 0, units, unit_mask, ks, k_mask, H).to(DOT), hh_0,
                          input_precision=PRECISION)
            if GATES > 1:
                hh_1 = tl.dot(a, _gate_weights(w_hh_ptr, 1, units, unit_mask, ks, k_mask, H).to(DOT), hh_1,
                              input_precision=PRECISION)
                hh_2 = tl.dot(a, _gate_weights(w_hh_ptr, 2, units, unit_mask, ks, k_mask, H).to(DOT), hh_2,
                              input_precision=PRECISION)
            if GATES > 3:
                hh_3 = tl.dot(a, _gate_weights(w_hh_ptr, 3, units, unit_mask, ks, k_mask, H).to(DOT), hh_3,
                              input_precision=PRECISION)
    return hh_0, hh_1, hh_2, hh_3


@triton.jit
def _gate_tile(ptr, gate, row_offsets, units, mask, H, ACC: tl.constexpr):
    """Columns gate * H + units of the rows at `row_offsets` (element offsets of the rows' starts), as ACC."""
    return tl.load(ptr + row_offsets[:, None] + gate * H + units[None, :], mask=mask, other=0).to(ACC)


@triton.jit(do_not_specialize=["T", "step_begin", "step_end"])
def _split_forward_kernel(
    gates_x_ptr,  # (T,B,GATES*H) the input projection (with the biases the op folds into it)
    w_hh_ptr, b_hh_ptr,  # (GATES*H,H), (GATES*H,) if HAS_HH_BIAS (the GRU's: r scales the n part of it)
    batch_sizes_ptr, lengths_ptr, resets_ptr,  # (T,) if HAS_BATCH_SIZES, (B,) if USE_LENGTHS, (T,B) if USE_RESETS
    h0_ptr, state0_ptr,  # (B,H) the initial h; (B,H) the initial state if HAS_STATE (c0 / h0)
    output_ptr,  # out (T,B,H)
    h_buffers_ptr,  # (2,B,H): h_{t-1} of every unit; [0] = h0 before the first step
    state_ptr,  # (B,H) ACC: the running state if HAS_STATE, read at the launch's start, written at its end
    workspace_ptr,  # out (T,B,4H) the cell's four workspace tiles per step, if SAVE_WORKSPACE
    states_ptr,  # out (T,B,H) the state after each step (the LSTM's cells), if SAVE_STATES
    arrivals_ptr,  # (batch blocks,) int32 zeros: the grid barrier's counters, if PERSISTENT
    T, B, H, step_begin, step_end,  # this launch runs steps [step_begin, step_end)
    CELL: tl.constexpr, GATES: tl.constexpr, HAS_STATE: tl.constexpr, HAS_HH_BIAS: tl.constexpr,
    SAVE_WORKSPACE: tl.constexpr, SAVE_STATES: tl.constexpr, HAS_BATCH_SIZES: tl.constexpr,
    USE_LENGTHS: tl.constexpr, USE_RESETS: tl.constexpr, REVERSE: tl.constexpr, PERSISTENT: tl.constexpr,
    RESIDENT: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_HK: tl.constexpr,
):
    units = tl.program_id(0) * BLOCK_U + tl.arange(0, BLOCK_U)
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    unit_mask = units < H
    in_rows = (rows < B)[:, None] & unit_mask[None, :]
    unit_offsets = rows[:, None] * H + units[None, :]

    # Loaded once per launch: the resident W_hh slices, the b_hh columns of the units, the running state.
    w_0, w_1, w_2, w_3 = _resident_weights(w_hh_ptr, units, unit_mask, H, GATES, RESIDENT, ACC, BLOCK_HK)
    b_0, b_1, b_2, b_3 = _bias_columns(b_hh_ptr, units, unit_mask, H, GATES, HAS_HH_BIAS, ACC)
    state = tl.zeros((BLOCK_B, BLOCK_U), ACC)
    if HAS_STATE:
        state = tl.load(state_ptr + unit_offsets, mask=in_rows, other=0)

    for step in range(step_begin, step_end):
        t, active = step_rows(step, T, rows, B, batch_sizes_ptr, lengths_ptr, HAS_BATCH_SIZES, USE_LENGTHS, REVERSE)
        reset = reset_rows(t, rows, B, resets_ptr, USE_RESETS)
        read_ptr = h_buffers_ptr + (step % 2) * B * H
        keep = active[:, None] & unit_mask[None, :]
        if USE_RESETS and HAS_STATE:
            state0 = tl.load(state0_ptr + unit_offsets, mask=in_rows & reset[:, None], other=0).to(ACC)
            state = tl.where(reset[:, None], state0, state)

        hh_0, hh_1, hh_2, hh_3 = _hidden_parts(read_ptr, h0_ptr, w_hh_ptr, w_0, w_1, w_2, w_3, rows, reset, active,
                                               units, unit_mask, B, H, GATES, RESIDENT, ACC, DOT, PRECISION,
                                               BLOCK_U, BLOCK_K, BLOCK_HK)
        x_row_offsets = (t * B + rows) * (GATES * H)
        x_0, x_1, x_2, x_3 = _input_parts(gates_x_ptr, x_row_offsets, units, keep, H, GATES, ACC)
        h_new, state_new, w_a, w_b, w_c, w_d = _cell(CELL, x_0, x_1, x_2, x_3, hh_0 + b_0[None, :],
                                                    hh_1 + b_1[None, :], hh_2 + b_2[None, :], hh_3 + b_3[None, :],
                                                    state)

        # Commit: output (zeros on inactive rows), h_t into the other buffer (inactive rows carry h_{t-1}).
        h_prev = _previous_hidden(read_ptr, h0_ptr, rows, units, unit_mask, reset, B, H)
        store(output_ptr + t * B * H + unit_offsets, tl.where(keep, h_new, 0), in_rows)
        store(h_buffers_ptr + ((step + 1) % 2) * B * H + unit_offsets, tl.where(keep, h_new, h_prev.to(ACC)),
              in_rows)
        if SAVE_WORKSPACE:
            wide_offsets = (t * B + rows)[:, None] * 4 * H + units[None, :]
            store(workspace_ptr + wide_offsets, tl.where(keep, w_a, 0), in_rows)
            store(workspace_ptr + wide_offsets + H, tl.where(keep, w_b, 0), in_rows)
            store(workspace_ptr + wide_offsets + 2 * H, tl.where(keep, w_c, 0), in_rows)
            store(workspace_ptr + wide_offsets + 3 * H, tl.where(keep, w_d, 0), in_rows)
        if SAVE_STATES:
            store(states_ptr + t * B * H + unit_offsets, tl.where(keep, state_new, 0), in_rows)
        state = tl.where(keep, state_new, state)
        if PERSISTENT:
            grid_barrier(arrivals_ptr + tl.program_id(1), (step - step_begin + 1) * tl.num_programs(0))

    if HAS_STATE:
        tl.store(state_ptr + unit_offsets, state, mask=in_rows)


# ==================================================================================================
# Launcher.
# ==================================================================================================
def split_forward(cell: int, mode: dict, gates_x: Tensor, w_hh: Tensor, b_hh: Tensor | None, h0: Tensor,
                  state0: Tensor | None, batch_sizes: Tensor | None, flags: dict, reverse: bool,
                  save_workspace: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """One layer, one direction, in `mode` ("persistent" | "per_step", from kernels/_recurrent.py
    recurrent_mode). gates_x (T,B,G*H), w_hh (G*H,H), b_hh (G*H,) added to the hidden parts (the GRU's) or None,
    h0 (B,H), state0 (B,H) the initial running state (c0, or h0 for the GRU) or None (the RNN), batch_sizes on
    the tensors' device, flags from state_flags (lengths and resets; no zoneout)
    -> output (T,B,H), h_n (B,H), the final state (B,H) or None, the workspace (T,B,4H) and the states
    (T,B,H) (the LSTM's cells) if save_workspace (else None)."""
    seq_len, batch, _ = gates_x.shape
    hidden = h0.shape[1]
    device = gates_x.device
    block_u = mode["BLOCK_U"]
    grid = (triton.cdiv(hidden, block_u), triton.cdiv(batch, mode["BLOCK_B"]))
    persistent = mode["mode"] == "persistent"
    if persistent and device.type != "cuda" and grid[0] > 1:
        raise ShapeError(f"the persistent split mode under the interpreter needs one program per batch block "
                         f"(BLOCK_U {block_u} >= hidden {hidden}): programs run one after another there")
    output = gates_x.new_empty(seq_len, batch, hidden)
    h_buffers = gates_x.new_empty(2, batch, hidden)
    h_buffers[0] = h0
    acc = torch.float64 if gates_x.dtype == torch.float64 else torch.float32
    state = state0.to(acc, copy=True) if state0 is not None else None
    # The backward's workspace: the LSTM's and GRU's four tiles per step (the RNN's backward needs only the output).
    workspace = gates_x.new_empty(seq_len, batch, 4 * hidden) if save_workspace and GATES[cell] > 1 else None
    states = gates_x.new_empty(seq_len, batch, hidden) if save_workspace and cell == LSTM else None
    arguments = dict(
        gates_x_ptr=gates_x, w_hh_ptr=w_hh.contiguous(), b_hh_ptr=b_hh.contiguous() if b_hh is not None else None,
        batch_sizes_ptr=batch_sizes, lengths_ptr=flags["lengths_ptr"], resets_ptr=flags["resets_ptr"],
        h0_ptr=h0.contiguous(), state0_ptr=state0.contiguous() if state0 is not None else None,
        output_ptr=output, h_buffers_ptr=h_buffers, state_ptr=state, workspace_ptr=workspace, states_ptr=states,
        arrivals_ptr=torch.zeros(grid[1], dtype=torch.int32, device=device) if persistent else None,
        T=seq_len, B=batch, H=hidden,
        CELL=cell, GATES=GATES[cell], HAS_STATE=state0 is not None, HAS_HH_BIAS=b_hh is not None,
        SAVE_WORKSPACE=workspace is not None, SAVE_STATES=states is not None,
        HAS_BATCH_SIZES=batch_sizes is not None, USE_LENGTHS=flags["USE_LENGTHS"], USE_RESETS=flags["USE_RESETS"],
        REVERSE=bool(reverse), PERSISTENT=persistent, **split_tiles(mode, hidden, gates_x.dtype, device),
    )
    if persistent:
        _launch_persistent(grid, device)(step_begin=0, step_end=seq_len, **arguments)
    else:
        run = launch(_split_forward_kernel, grid, device)
        for step in range(seq_len):
            run(step_begin=step, step_end=step + 1, **arguments)
    return output, h_buffers[seq_len % 2].clone(), state, workspace, states


def split_tiles(mode: dict, hidden: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The constexprs and launch options of a split launch in `mode` (dtypes, precision, tiles, warps, the register
    cap)."""
    return dict(ACC=accumulator_dtype(dtype), DOT=dot_operand_dtype(dtype, device),
                PRECISION=dot_precision(dtype, device), RESIDENT=bool(mode["RESIDENT"]), BLOCK_B=mode["BLOCK_B"],
                BLOCK_U=mode["BLOCK_U"], BLOCK_K=BLOCK_K, BLOCK_HK=pow2_at_least(hidden, MIN_DOT_SIZE),
                num_warps=mode["num_warps"], num_stages=mode["num_stages"], maxnreg=mode["maxnreg"])


def _launch_persistent(grid: tuple, device: torch.device):
    """The persistent launch: cooperative (all programs co-resident, or the launch fails rather than hanging at the
    first barrier); the interpreter drops the keyword (the launcher allows one program per barrier group there)."""
    return functools.partial(launch(_split_forward_kernel, grid, device), launch_cooperative_grid=True)
