"""The split LayerNorm LSTM / GRU forward and backward (issue 17): the hidden units split across programs, the
LayerNorms' row statistics merged across them (kernels/_recurrent_split.py's design; the cell a constexpr plug-in:
IS_LSTM as in kernels/layernorm_lstm.py).

Why: the row-block kernel (kernels/layernorm_lstm.py) holds 16 rows x all G*H gate columns in registers and spills
from hidden 128 on sm_80 / sm_90 (tests/test_gpu_compile.py). Here a program owns BLOCK_B batch rows x BLOCK_U
units (all G gate columns of those units). The LayerNorm of a row's G*H columns of h W_hh^T (and the LSTM's
LayerNorm of c_t over H) then needs every program's columns: each program writes its partial statistics (count,
mean, M2 of its columns; Chan et al.'s pairwise merge, not sum and sum of squares, which cancel in float32) to a
(2, B, programs, 3) buffer, and after a barrier every program merges all partials in program order, so every
program gets the same mean and variance bit for bit (deterministic, no atomics).

Phases of step t, each ended by a barrier among the programs of a batch block:
  0  p = h_{t-1} W_hh[units]^T for the G gates (streams its W_hh rows), p to `scratch`, partial stats of p;
  1  merge -> mean, rstd of the row; LN, + the x side, the cell: the GRU finishes (h_t, output); the LSTM writes
     o and c' (before LayerNorm) to `scratch`, partial stats of c', c_t to the state;
  2  (LSTM) merge -> LN(c'), h_t = o * tanh(LN(c') * w + b), output.
The last phase of step t also puts the initial state back into the rows that step t + 1 resets (resets come with
no reverse), so phase 0 reads the operand it needs. A phase writes only its own units' states and scratch
columns, and what it reads of other programs (h_{t-1} in phase 0, the partials in phases 1 and 2) was written
before the last barrier and is not overwritten before the next: one state buffer suffices. Two partials buffers,
because the LSTM's phase 1 reads every program's partials of p while it writes its own of c'.
Launch modes (`layernorm_mode`): "per_step", a launch per phase (the launch boundary is the barrier; 3T launches
for the LSTM, 2T for the GRU), and "persistent", one cooperative launch over all phases with kernels/_recurrent.py's
grid_barrier (when the programs fit one per SM). Under the interpreter programs run one after another, so
"persistent" runs only with one program per batch block (the launcher refuses more).
The workspace is the row-block kernel's layout, so either backward follows either forward. The backward (below) has
the same grid and modes and four phases per step (three for the GRU): see its section.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import launch
from ._recurrent import accumulate_matmul, forced, grid_barrier, reset_rows, store, tanh
from .layernorm_lstm import (_active, _blend, _cell_backward, _cell_gates, _gate_affine, _gate_tile,
                             _hidden_gate_products, _ln_backward, _ln_backward_means, _load_gate_vecs, _load_vec,
                             _lstm_cell_sums, _masked_sum, _normalized, _split_grad, _store_blocks,
                             _workspace_layout, _zoneout_weight)

# The split tile on a GPU: 16 batch rows (tl.dot's minimum) x 32 units, 4 warps, one stage, ptxas's register cap at
# 255 (as kernels/_recurrent.py's split modes). Everything is float32 math (the launcher converts W_hh and the
# states, as for the row-block kernel), so one tile serves every storage dtype.
SPLIT_TILE = {"BLOCK_B": 16, "BLOCK_U": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1, "maxnreg": 255}
# The padded hidden size up to which the row-block kernel is kept: it compiles clean at 64, spills from 128.
ROWS_MAX_HIDDEN = 64


# ==================================================================================================
# Device helpers.
# ==================================================================================================
@triton.jit
def _store_partials(stats_ptr, rows, B, unit_block, n_blocks, tiles_sum, count, m2):
    """Writes this program's (count, mean, M2) of each row to stats[rows, unit_block, :] (stats (B, n_blocks, 3))."""
    offsets = (rows * n_blocks + unit_block) * 3
    tl.store(stats_ptr + offsets, count + rows * 0, mask=rows < B)
    tl.store(stats_ptr + offsets + 1, tiles_sum / count, mask=rows < B)
    tl.store(stats_ptr + offsets + 2, m2, mask=rows < B)


@triton.jit
def _merged_stats(stats_ptr, rows, B, n_blocks, eps, ACC: tl.constexpr, BLOCK_B: tl.constexpr):
    """(mean, 1/sqrt(var + eps)) of each row from all programs' partials, merged in program order (Chan's pairwise
    update: delta = mean_b - mean_a, mean += delta n_b / n, M2 += M2_b + delta^2 n_a n_b / n)."""
    n = tl.zeros((BLOCK_B,), ACC)
    mean = tl.zeros((BLOCK_B,), ACC)
    m2 = tl.zeros((BLOCK_B,), ACC)
    for block in range(n_blocks):
        offsets = (rows * n_blocks + block) * 3
        n_b = tl.load(stats_ptr + offsets, mask=rows < B, other=1).to(ACC)
        mean_b = tl.load(stats_ptr + offsets + 1, mask=rows < B, other=0).to(ACC)
        m2_b = tl.load(stats_ptr + offsets + 2, mask=rows < B, other=0).to(ACC)
        total = n + n_b
        delta = mean_b - mean
        mean += delta * (n_b / total)
        m2 += m2_b + delta * delta * (n * n_b / total)
        n = total
    return mean, 1 / tl.sqrt(m2 / n + eps)


@triton.jit
def _centered_sq(x, mean, col_mask):
    d = tl.where(col_mask[None, :], x - mean[:, None], 0)
    return tl.sum(d * d, 1)


@triton.jit
def _commit_h(h_new, h_old, keep, t, rows, B, T, units, umask, H, h_ptr, h0_ptr, output_ptr, resets_ptr,
              HAS_RESETS: tl.constexpr):
    """h_t of the active rows to the output (zero elsewhere) and to the state, whose rows that step t + 1 resets
    get h0 back."""
    state_mask = (rows < B)[:, None] & umask[None, :]
    offsets = rows[:, None] * H + units[None, :]
    h = tl.where(keep, h_new, h_old)
    store(output_ptr + (t * B + rows)[:, None] * H + units[None, :], tl.where(keep, h, 0), state_mask)
    h = _restart(h, h0_ptr, offsets, t, rows, B, T, state_mask, resets_ptr, HAS_RESETS)
    tl.store(h_ptr + offsets, h, mask=state_mask)


@triton.jit
def _restart(state, state0_ptr, offsets, t, rows, B, T, state_mask, resets_ptr, HAS_RESETS: tl.constexpr):
    """The state entering step t + 1: the initial state's in the rows that step resets (resets: t increasing)."""
    if HAS_RESETS:
        following = rows * 0 + t + 1  # a vector: the interpreter turns a block mask & a scalar into int32
        nxt = tl.load(resets_ptr + following * B + rows, mask=(rows < B) & (following < T), other=0) != 0
        reset = nxt[:, None] & state_mask
        state = tl.where(reset, tl.load(state0_ptr + offsets, mask=reset, other=0), state)
    return state


# ==================================================================================================
# The kernel. Grid: (cdiv(B, BLOCK_B), cdiv(H, BLOCK_U)).
# ==================================================================================================
@triton.jit
def _program_tile(H, BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr):
    """This program's batch rows and units: grid axis 0 the batch blocks, axis 1 the unit blocks (n_blocks of them)
    -> (rows, unit_block, n_blocks, units, units < H)."""
    unit_block = tl.program_id(1)
    units = unit_block * BLOCK_U + tl.arange(0, BLOCK_U)
    return tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B), unit_block, tl.num_programs(1), units, units < H


@triton.jit(do_not_specialize=["T", "phase_begin", "phase_end"])
def _layernorm_split_forward_kernel(
    gx_ptr,  # (T,B,G*H) ACC: the finished x side
    w_hh_ptr, ln_w_ptr, ln_b_ptr, bias_h_ptr,  # (G*H,H) ACC; (G*H,) LN(h W_hh^T) affine; (G*H,) after it or None
    cell_w_ptr, cell_b_ptr,  # (H,) ln_cell (LSTM)
    lengths_ptr, resets_ptr, seed_ptr,  # (B,) int64, (T,B) bool, () int64, each if its flag
    h0_ptr, c0_ptr,  # (B,H) ACC
    h_ptr, c_ptr,  # (B,H) ACC: the states (h0 / c0 before the first step, the final states after the last)
    output_ptr,  # out (T,B,H), the storage dtype
    ws_ptr,  # out (T,B,W) ACC if SAVE_WORKSPACE (kernels/layernorm_lstm.py's layout)
    scratch_ptr,  # (B,(G+1)*H) ACC: p, then the LSTM's activated gates and c' between the phases
    stats_ptr,  # (2,B,n_blocks,3) ACC: the partial statistics of p, then of c'
    arrivals_ptr,  # (batch blocks,) int32 zeros: the grid barrier's counters, if PERSISTENT
    T, B, H, eps, zoneout, keep_below, phase_begin, phase_end,
    IS_LSTM: tl.constexpr, HAS_BIAS_H: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr,
    ZONEOUT: tl.constexpr, REVERSE: tl.constexpr, SAVE_WORKSPACE: tl.constexpr, PERSISTENT: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Phases j = phase_begin .. phase_end - 1 (step j // PHASES, phase j % PHASES; PHASES = 3 for the LSTM, 2 for
    the GRU), each ended by the grid barrier of the batch block's programs (PERSISTENT: one launch for all phases)
    or by the launch's end (per step: one launch per phase)."""
    rows, unit_block, n_blocks, units, umask = _program_tile(H, BLOCK_B, BLOCK_U)
    PHASES = 3 if IS_LSTM else 2
    G = 4 if IS_LSTM else 3
    SW = (G + 1) * H  # scratch row width
    scratch = rows[:, None] * SW + units[None, :]
    state_mask = (rows < B)[:, None] & umask[None, :]
    state_offsets = rows[:, None] * H + units[None, :]
    n_units = tl.minimum(H - unit_block * BLOCK_U, BLOCK_U).to(ACC)
    for j in range(phase_begin, phase_end):
        step = j // PHASES
        phase = j % PHASES
        t = T - 1 - step if REVERSE else step
        active = _active(t, rows, B, T, lengths_ptr, HAS_LENGTHS)
        keep = active[:, None] & umask[None, :]
        if phase == 0:
            _gates_phase(w_hh_ptr, h_ptr, scratch_ptr, stats_ptr, B, H, rows, units, umask, unit_block, n_blocks,
                         n_units, active, scratch, state_mask, IS_LSTM, ACC, DOT, BLOCK_B, BLOCK_U, BLOCK_K)
        elif phase == 1:
            _cell_phase(gx_ptr, ln_w_ptr, ln_b_ptr, bias_h_ptr, resets_ptr, seed_ptr, h0_ptr, c0_ptr, h_ptr, c_ptr,
                        output_ptr, ws_ptr, scratch_ptr, stats_ptr, t, T, B, H, eps, zoneout, keep_below, rows, units,
                        umask, unit_block, n_blocks, n_units, active, keep, scratch, state_mask, state_offsets,
                        IS_LSTM, HAS_BIAS_H, HAS_RESETS, ZONEOUT, SAVE_WORKSPACE, ACC, BLOCK_B)
        else:
            _cell_norm_phase(cell_w_ptr, cell_b_ptr, resets_ptr, seed_ptr, h0_ptr, h_ptr, output_ptr, ws_ptr,
                             scratch_ptr, stats_ptr, t, T, B, H, eps, zoneout, keep_below, rows, units, umask,
                             unit_block, n_blocks, active, keep, scratch, state_mask, state_offsets, IS_LSTM,
                             HAS_RESETS, ZONEOUT, SAVE_WORKSPACE, ACC, BLOCK_B)
        if PERSISTENT:
            grid_barrier(arrivals_ptr + tl.program_id(0), (j - phase_begin + 1) * n_blocks)


@triton.jit
def _gates_phase(w_hh_ptr, h_ptr, scratch_ptr, stats_ptr, B, H, rows, units, umask, unit_block, n_blocks, n_units,
                 active, scratch, state_mask, IS_LSTM: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_K: tl.constexpr):
    """Phase 0: p = h_{t-1} W_hh^T for this program's units, one gate block of W_hh (H rows) at a time, to the
    scratch; the partial statistics of its G x BLOCK_U columns."""
    G = 4 if IS_LSTM else 3
    p0, p1, p2, p3 = _hidden_gate_products(h_ptr, w_hh_ptr, H, rows, active, units, umask, IS_LSTM, ACC, DOT, BLOCK_B,
                                           BLOCK_U, BLOCK_K)
    total = _masked_sum(p0, umask) + _masked_sum(p1, umask) + _masked_sum(p2, umask)
    if IS_LSTM:
        total += _masked_sum(p3, umask)
    count = n_units * G
    mean = total / count
    m2 = _centered_sq(p0, mean, umask) + _centered_sq(p1, mean, umask) + _centered_sq(p2, mean, umask)
    _store_blocks(scratch_ptr + scratch, H, state_mask, p0, p1, p2, p3, IS_LSTM)
    if IS_LSTM:
        m2 += _centered_sq(p3, mean, umask)
    _store_partials(stats_ptr, rows, B, unit_block, n_blocks, total, count, m2)


@triton.jit
def _cell_norm_phase(cell_w_ptr, cell_b_ptr, resets_ptr, seed_ptr, h0_ptr, h_ptr, output_ptr, ws_ptr, scratch_ptr,
                     stats_ptr, t, T, B, H, eps, zoneout, keep_below, rows, units, umask, unit_block, n_blocks, active,
                     keep, scratch, state_mask, state_offsets, IS_LSTM: tl.constexpr, HAS_RESETS: tl.constexpr,
                     ZONEOUT: tl.constexpr, SAVE_WORKSPACE: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr):
    """Phase 2 (LSTM): LN of c' over H from the merged partials, h_t = o * tanh(LN(c')), the output."""
    W, _, _, RSTD = _workspace_layout(H, IS_LSTM)
    mean, rstd_c = _merged_stats(stats_ptr + B * n_blocks * 3, rows, B, n_blocks, eps, ACC, BLOCK_B)
    c_raw = tl.load(scratch_ptr + scratch + 4 * H, mask=keep, other=0)
    o = tl.load(scratch_ptr + scratch + 3 * H, mask=keep, other=0)
    c_hat = tl.where(umask[None, :], c_raw - mean[:, None], 0) * rstd_c[:, None]
    h_new = o * tanh(c_hat * _load_vec(cell_w_ptr, units, umask, ACC)[None, :]
                     + _load_vec(cell_b_ptr, units, umask, ACC)[None, :])
    h_old = tl.load(h_ptr + state_offsets, mask=state_mask, other=0)
    h_new = _blend(h_new, h_old, _zoneout_weight(seed_ptr, 0, t, rows, units, H, zoneout, keep_below, ACC, ZONEOUT),
                   ZONEOUT)
    if SAVE_WORKSPACE:
        ws_offsets = (t * B + rows)[:, None] * W + units[None, :]
        tl.store(ws_ptr + ws_offsets + 12 * H, c_hat, mask=keep)
        tl.store(ws_ptr + (t * B + rows) * W + RSTD + 2, rstd_c, mask=active & (rows * 0 + unit_block == 0))
    _commit_h(h_new, h_old, keep, t, rows, B, T, units, umask, H, h_ptr, h0_ptr, output_ptr, resets_ptr, HAS_RESETS)


@triton.jit
def _cell_phase(gx_ptr, ln_w_ptr, ln_b_ptr, bias_h_ptr, resets_ptr, seed_ptr, h0_ptr, c0_ptr, h_ptr, c_ptr,
                output_ptr, ws_ptr, scratch_ptr, stats_ptr, t, T, B, H, eps, zoneout, keep_below, rows, units, umask,
                unit_block, n_blocks, n_units, active, keep, scratch, state_mask, state_offsets,
                IS_LSTM: tl.constexpr, HAS_BIAS_H: tl.constexpr, HAS_RESETS: tl.constexpr, ZONEOUT: tl.constexpr,
                SAVE_WORKSPACE: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr):
    """Phase 1: the gates' LayerNorm from the merged partials, the x side, the cell (see the module docstring)."""
    G = 4 if IS_LSTM else 3
    W, _, HHAT, RSTD = _workspace_layout(H, IS_LSTM)
    mean, rstd_h = _merged_stats(stats_ptr, rows, B, n_blocks, eps, ACC, BLOCK_B)
    lw0, lw1, lw2, lw3, lb0, lb1, lb2, lb3 = _gate_affine(ln_w_ptr, ln_b_ptr, bias_h_ptr, units, umask, H, ACC,
                                                          IS_LSTM, HAS_BIAS_H)
    a0 = (tl.load(scratch_ptr + scratch, mask=keep, other=0) - mean[:, None]) * rstd_h[:, None]
    a1 = (tl.load(scratch_ptr + scratch + H, mask=keep, other=0) - mean[:, None]) * rstd_h[:, None]
    a2 = (tl.load(scratch_ptr + scratch + 2 * H, mask=keep, other=0) - mean[:, None]) * rstd_h[:, None]
    a3 = a2
    if IS_LSTM:
        a3 = (tl.load(scratch_ptr + scratch + 3 * H, mask=keep, other=0) - mean[:, None]) * rstd_h[:, None]
    row_offsets = (t * B + rows)[:, None] * (G * H) + units[None, :]
    g0, g1, g2, g3 = _cell_gates(gx_ptr, row_offsets, H, keep, a0, a1, a2, a3, lw0, lw1, lw2, lw3, lb0, lb1, lb2,
                                 lb3, ACC, IS_LSTM)
    ws_offsets = (t * B + rows)[:, None] * W + units[None, :]
    h_old = tl.load(h_ptr + state_offsets, mask=state_mask, other=0)
    if IS_LSTM:
        c_old = tl.load(c_ptr + state_offsets, mask=state_mask, other=0)
        c_raw = g1 * c_old + g0 * g2  # f c + i g
        # c' (before LayerNorm and zoneout) and o for phase 2; the partial statistics of c' over these units.
        tl.store(scratch_ptr + scratch + 3 * H, g3, mask=state_mask)
        tl.store(scratch_ptr + scratch + 4 * H, c_raw, mask=state_mask)
        c_sum = _masked_sum(c_raw, umask)
        _store_partials(stats_ptr + B * n_blocks * 3, rows, B, unit_block, n_blocks, c_sum, n_units,
                        _centered_sq(c_raw, c_sum / n_units, umask))
        c_new = _blend(c_raw, c_old, _zoneout_weight(seed_ptr, 1, t, rows, units, H, zoneout, keep_below, ACC, ZONEOUT),
                       ZONEOUT)
        c = _restart(tl.where(keep, c_new, c_old), c0_ptr, state_offsets, t, rows, B, T, state_mask, resets_ptr,
                     HAS_RESETS)
        tl.store(c_ptr + state_offsets, c, mask=state_mask)
        if SAVE_WORKSPACE:
            tl.store(ws_ptr + ws_offsets + 13 * H, c_new, mask=keep)
    else:
        h_new = (1 - g1) * g2 + g1 * h_old  # (1 - z) n + z h
        h_new = _blend(h_new, h_old, _zoneout_weight(seed_ptr, 0, t, rows, units, H, zoneout, keep_below, ACC,
                                                     ZONEOUT), ZONEOUT)
        _commit_h(h_new, h_old, keep, t, rows, B, T, units, umask, H, h_ptr, h0_ptr, output_ptr, resets_ptr,
                  HAS_RESETS)
    if SAVE_WORKSPACE:
        _store_blocks(ws_ptr + ws_offsets, H, keep, g0, g1, g2, g3, True)
        _store_blocks(ws_ptr + ws_offsets + HHAT, H, keep, a0, a1, a2, a3, IS_LSTM)
        tl.store(ws_ptr + (t * B + rows) * W + RSTD + 1, rstd_h, mask=active & (rows * 0 + unit_block == 0))


# ==================================================================================================
# The rule and the launcher.
# ==================================================================================================
def layernorm_mode(batch: int, hidden: int, sm_count: int) -> dict:
    """The forward's launch mode: {"mode": "rows"} (kernels/layernorm_lstm.py's row-block kernel) without a GPU
    (sm_count 0: the interpreter, where the split's extra launches only cost time) and at padded hidden <=
    ROWS_MAX_HIDDEN (where it compiles clean); above (where it spills: tests/test_gpu_compile.py NO_FIT) the split
    kernel, SPLIT_TILE, "persistent" (one cooperative launch, a grid barrier after each phase) when its programs
    fit one per SM, else "per_step" (a launch per phase). A test forces a mode with kernels/_recurrent.py's
    forced_mode (its BLOCK_U and BLOCK_B)."""
    forced_now = forced()
    if forced_now is not None:
        if forced_now["mode"] == "rows":
            return forced_now
        return {**SPLIT_TILE, "mode": forced_now["mode"], "BLOCK_B": forced_now["BLOCK_B"],
                "BLOCK_U": forced_now["BLOCK_U"], "BLOCK_K": 16}
    if sm_count == 0 or max(16, triton.next_power_of_2(hidden)) <= ROWS_MAX_HIDDEN:
        return {"mode": "rows"}
    programs = triton.cdiv(batch, SPLIT_TILE["BLOCK_B"]) * triton.cdiv(hidden, SPLIT_TILE["BLOCK_U"])
    return {"mode": "persistent" if programs <= sm_count else "per_step", **SPLIT_TILE}


def split_forward(tensors: tuple, scalars: tuple, flags: dict, mode: dict, gates: int, like: Tensor) -> None:
    """Runs the T steps of (3 if LSTM else 2) phases over (batch blocks, unit blocks) programs: one cooperative
    launch (persistent) or a launch per phase. tensors: the kernel's pointer arguments from gx_ptr to ws_ptr
    (kernels/layernorm_lstm.py sequence_forward); scalars: (T, B, H, eps, zoneout, keep_below); flags: its
    constexprs but the tiles and PERSISTENT; mode: layernorm_mode's; like: an ACC tensor on the device."""
    seq_len, batch, hidden = scalars[:3]
    tile, grid = _split_grid(mode, batch, hidden, like)
    scratch = like.new_empty(batch, (gates + 1) * hidden)
    stats = like.new_empty(2, batch, grid[1], 3)
    _run_phases(_layernorm_split_forward_kernel, grid, mode, tile, like, (*tensors, scratch, stats), scalars,
                (3 if gates == 4 else 2) * seq_len, flags)


def _split_grid(mode: dict, batch: int, hidden: int, like: Tensor) -> tuple:
    """(the tile constexprs, the grid (batch blocks, unit blocks)) of a split launch in `mode`. Under the
    interpreter programs run one after another, so a persistent launch needs one program per batch block."""
    tile = {name: value for name, value in mode.items() if name != "mode"}
    grid = (triton.cdiv(batch, tile["BLOCK_B"]), triton.cdiv(hidden, tile["BLOCK_U"]))
    if mode["mode"] == "persistent" and like.device.type != "cuda" and grid[1] > 1:
        raise ValueError(f"the persistent LayerNorm split under the interpreter needs one program per batch block "
                         f"(BLOCK_U {tile['BLOCK_U']} >= hidden {hidden}): programs run one after another there")
    return tile, grid


def _run_phases(function, grid: tuple, mode: dict, tile: dict, like: Tensor, pointers: tuple, scalars: tuple,
                phases: int, flags: dict) -> None:
    """All `phases` of a split kernel: one cooperative launch (persistent: the grid barrier's counters between the
    pointers and the scalars) or one launch per phase."""
    persistent = mode["mode"] == "persistent"
    arrivals = torch.zeros(grid[0], dtype=torch.int32, device=like.device) if persistent else None
    kernel = launch(function, grid, like.device)
    arguments = (*pointers, arrivals, *scalars)
    if persistent:
        kernel(*arguments, 0, phases, PERSISTENT=True, **flags, **tile, launch_cooperative_grid=True)
        return
    for phase in range(phases):
        kernel(*arguments, phase, phase + 1, PERSISTENT=False, **flags, **tile)


# ==================================================================================================
# The split backward. Grid: (cdiv(B, BLOCK_B), cdiv(H, BLOCK_U)); reverse time, per step the phases
#   A  (LSTM) grad_output joins grad h (to its state buffer); h_{t-1} of its units to h_prev; the gradient of
#      LN(c') (d_nc, to `extra`) and the partial sums of d_nc w and d_nc w c_hat over its units;
#   B  (the GRU's first phase does A's part too) merge -> LN(c')'s backward, the cell backward: the gradients of
#      the two normalized gate sides (d_post_x, d_post_h), grad c_{t-1}; the partial sums of the gates'
#      LayerNorm backwards (x side and h side: dy w and dy w xhat over its G x BLOCK_U columns);
#   C  merge -> d_gx, d_gh of its columns;
#   D  grad h_{t-1}[its units] = the unit-local part + d_gh_t (every program's columns) @ W_hh[:, its units], then
#      the step's resets (their share of grad h0 / c0 to `d_init`).
# Partial sums, not means, in a (B, unit blocks, 6) buffer (2 for A's sums, 4 for B's), summed in program order.
# ==================================================================================================
@triton.jit
def _store_sums(sums_ptr, rows, B, unit_block, n_blocks, column, a, b):
    offsets = (rows * n_blocks + unit_block) * 6 + column
    tl.store(sums_ptr + offsets, a, mask=rows < B)
    tl.store(sums_ptr + offsets + 1, b, mask=rows < B)


@triton.jit
def _merged_sums(sums_ptr, rows, B, n_blocks, column, ACC: tl.constexpr, BLOCK_B: tl.constexpr):
    """The sums of two partial columns over all programs, in program order."""
    a = tl.zeros((BLOCK_B,), ACC)
    b = tl.zeros((BLOCK_B,), ACC)
    for block in range(n_blocks):
        offsets = (rows * n_blocks + block) * 6 + column
        a += tl.load(sums_ptr + offsets, mask=rows < B, other=0)
        b += tl.load(sums_ptr + offsets + 1, mask=rows < B, other=0)
    return a, b


@triton.jit
def _step_rows(t, T, rows, B, lengths_ptr, resets_ptr, REVERSE: tl.constexpr, HAS_LENGTHS: tl.constexpr,
               HAS_RESETS: tl.constexpr):
    """(active at t, reset before t, continues from t_prev: state entering t is the one step t_prev left)."""
    t_prev = t + 1 if REVERSE else t - 1
    active = _active(t, rows, B, T, lengths_ptr, HAS_LENGTHS)
    reset = reset_rows(t, rows, B, resets_ptr, HAS_RESETS)
    continues = _active(t_prev, rows, B, T, lengths_ptr, HAS_LENGTHS) & (reset == 0) & active
    return active, reset, continues, t_prev


@triton.jit(do_not_specialize=["T", "phase_begin", "phase_end"])
def _layernorm_split_backward_kernel(
    grad_output_ptr,  # (T,B,H)
    output_ptr, ws_ptr,  # the forward's (T,B,H) output and (T,B,W) ACC workspace
    w_hh_ptr, ln_ih_w_ptr, ln_hh_w_ptr, cell_w_ptr, cell_b_ptr,
    lengths_ptr, resets_ptr, seed_ptr,
    h0_ptr, c0_ptr,  # (B,H) ACC
    d_h_ptr, d_c_ptr,  # (B,H) ACC: grad_h_n / grad_c_n on entry, the carried grad h / grad c on exit
    d_post_x_ptr, d_post_h_ptr,  # out (T,B,G*H) ACC: gradients of the two normalized sides (zero when inactive)
    d_gx_ptr, d_gh_ptr,  # out (T,B,G*H) ACC: gradients of x W_ih^T and h W_hh^T; d_gh re-read by phase D
    extra_ptr,  # out (T,B,H) ACC: the LSTM's gradient of LN(c')
    h_prev_ptr,  # out (T,B,H) ACC: the h each step read (zero when inactive)
    d_init_ptr,  # (2,B,H) ACC zeros: the resets' shares of grad h0 / grad c0
    sums_ptr,  # (B,n_blocks,6) ACC: the partial sums
    arrivals_ptr,  # (batch blocks,) int32 zeros: the grid barrier's counters, if PERSISTENT
    T, B, H, zoneout, keep_below, phase_begin, phase_end,
    IS_LSTM: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr, ZONEOUT: tl.constexpr,
    REVERSE: tl.constexpr, PERSISTENT: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_U: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Phases j = phase_begin .. phase_end - 1 (reverse step j // PHASES, phase j % PHASES; PHASES = 4 for the
    LSTM: A B C D, 3 for the GRU: B C D), each ended by the grid barrier (PERSISTENT) or the launch's end."""
    rows, unit_block, n_blocks, units, umask = _program_tile(H, BLOCK_B, BLOCK_U)
    PHASES = 4 if IS_LSTM else 3
    G = 4 if IS_LSTM else 3
    W, XHAT, HHAT, RSTD = _workspace_layout(H, IS_LSTM)
    state_mask = (rows < B)[:, None] & umask[None, :]
    state_offsets = rows[:, None] * H + units[None, :]
    for j in range(phase_begin, phase_end):
        step = T - 1 - j // PHASES
        phase = j % PHASES + (0 if IS_LSTM else 1)  # the GRU has no phase A
        t = T - 1 - step if REVERSE else step
        active, reset, continues, t_prev = _step_rows(t, T, rows, B, lengths_ptr, resets_ptr, REVERSE, HAS_LENGTHS,
                                                      HAS_RESETS)
        keep = active[:, None] & umask[None, :]
        wide = (t * B + rows)[:, None] * (G * H) + units[None, :]
        d_h = tl.load(d_h_ptr + state_offsets, mask=state_mask, other=0)
        if phase == 0:
            d_h += tl.load(grad_output_ptr + (t * B + rows)[:, None] * H + units[None, :], mask=keep,
                           other=0).to(ACC)
            tl.store(d_h_ptr + state_offsets, d_h, mask=state_mask)
            s_g, s_gh = _lstm_cell_sums(ws_ptr, cell_w_ptr, cell_b_ptr, seed_ptr, d_h, t, B, H, zoneout, keep_below,
                                        rows, units, umask, keep, ZONEOUT, ACC)
            _store_sums(sums_ptr, rows, B, unit_block, n_blocks, 0, s_g, s_gh)
        elif phase == 1:
            if not IS_LSTM:
                d_h += tl.load(grad_output_ptr + (t * B + rows)[:, None] * H + units[None, :], mask=keep,
                               other=0).to(ACC)
                tl.store(d_h_ptr + state_offsets, d_h, mask=state_mask)
            s_g, s_gh = _merged_sums(sums_ptr, rows, B, n_blocks, 0, ACC, BLOCK_B)
            d_c = tl.load(d_c_ptr + state_offsets, mask=state_mask, other=0)
            px0, px1, px2, px3, ph0, ph1, ph2, ph3, d_c, d_nc, _, h_prev = _cell_backward(
                ws_ptr, output_ptr, h0_ptr, c0_ptr, cell_w_ptr, cell_b_ptr, seed_ptr, d_h, d_c, t, t_prev, B, H,
                zoneout, keep_below, rows, units, umask, continues, active, keep, (s_g / H, s_gh / H), IS_LSTM,
                ZONEOUT, ACC)
            tl.store(h_prev_ptr + (t * B + rows)[:, None] * H + units[None, :], h_prev, mask=state_mask)
            _store_blocks(d_post_x_ptr + wide, H, state_mask, px0, px1, px2, px3, IS_LSTM)
            _store_blocks(d_post_h_ptr + wide, H, state_mask, ph0, ph1, ph2, ph3, IS_LSTM)
            if IS_LSTM:
                tl.store(extra_ptr + (t * B + rows)[:, None] * H + units[None, :], d_nc, mask=state_mask)
                tl.store(d_c_ptr + state_offsets, d_c, mask=state_mask)
            wx0, wx1, wx2, wx3 = _load_gate_vecs(ln_ih_w_ptr, units, umask, H, ACC, IS_LSTM)
            wh0, wh1, wh2, wh3 = _load_gate_vecs(ln_hh_w_ptr, units, umask, H, ACC, IS_LSTM)
            ws_offsets = (t * B + rows)[:, None] * W + units[None, :]
            x0, x1, x2, x3 = _normalized(ws_ptr, ws_offsets + XHAT, H, keep, ACC, IS_LSTM)
            y0, y1, y2, y3 = _normalized(ws_ptr, ws_offsets + HHAT, H, keep, ACC, IS_LSTM)
            mg, mgh = _ln_backward_means(px0, px1, px2, px3, x0, x1, x2, x3, wx0, wx1, wx2, wx3, umask, 1, IS_LSTM)
            ng, ngh = _ln_backward_means(ph0, ph1, ph2, ph3, y0, y1, y2, y3, wh0, wh1, wh2, wh3, umask, 1, IS_LSTM)
            _store_sums(sums_ptr, rows, B, unit_block, n_blocks, 2, mg, mgh)
            _store_sums(sums_ptr, rows, B, unit_block, n_blocks, 4, ng, ngh)
        elif phase == 2:
            mg, mgh = _merged_sums(sums_ptr, rows, B, n_blocks, 2, ACC, BLOCK_B)
            ng, ngh = _merged_sums(sums_ptr, rows, B, n_blocks, 4, ACC, BLOCK_B)
            rstd_x = tl.load(ws_ptr + (t * B + rows) * W + RSTD, mask=active, other=0)
            rstd_y = tl.load(ws_ptr + (t * B + rows) * W + RSTD + 1, mask=active, other=0)
            ws_offsets = (t * B + rows)[:, None] * W + units[None, :]
            _ln_backward_side(d_post_x_ptr, d_gx_ptr, ln_ih_w_ptr, ws_ptr, ws_offsets + XHAT, wide, units, umask, H,
                              keep, state_mask, mg / (G * H), mgh / (G * H), rstd_x, ACC, IS_LSTM)
            _ln_backward_side(d_post_h_ptr, d_gh_ptr, ln_hh_w_ptr, ws_ptr, ws_offsets + HHAT, wide, units, umask, H,
                              keep, state_mask, ng / (G * H), ngh / (G * H), rstd_y, ACC, IS_LSTM)
        else:
            # grad h_{t-1} of its units: the unit-local part + d_gh_t (every program's columns) @ W_hh[:, units].
            d_c = tl.load(d_c_ptr + state_offsets, mask=state_mask, other=0)
            _, _, _, _, _, _, _, _, _, _, direct_h, _ = _cell_backward(
                ws_ptr, output_ptr, h0_ptr, c0_ptr, cell_w_ptr, cell_b_ptr, seed_ptr, d_h, d_c, t, t_prev, B, H,
                zoneout, keep_below, rows, units, umask, continues, active, keep,
                (tl.zeros((BLOCK_B,), ACC), tl.zeros((BLOCK_B,), ACC)), IS_LSTM, ZONEOUT, ACC)
            rec = direct_h
            for gate in range(G):
                rec = accumulate_matmul(rec, d_gh_ptr + t * B * G * H + gate * H, G * H, rows, active,
                                        w_hh_ptr + gate * H * H, H, 1, units, umask, H, DOT, BLOCK_K)
            d_h = tl.where(keep, rec, d_h)
            reset_mask = reset[:, None] & state_mask
            d_init = d_init_ptr + state_offsets
            tl.store(d_init, tl.load(d_init, mask=state_mask, other=0) + tl.where(reset_mask, d_h, 0),
                     mask=state_mask)
            tl.store(d_init + B * H, tl.load(d_init + B * H, mask=state_mask, other=0) + tl.where(reset_mask, d_c, 0),
                     mask=state_mask)
            tl.store(d_h_ptr + state_offsets, tl.where(reset_mask, 0, d_h), mask=state_mask)
            tl.store(d_c_ptr + state_offsets, tl.where(reset_mask, 0, d_c), mask=state_mask)
        if PERSISTENT:
            grid_barrier(arrivals_ptr + tl.program_id(0), (j - phase_begin + 1) * n_blocks)


@triton.jit
def _ln_backward_side(d_post_ptr, d_out_ptr, ln_w_ptr, ws_ptr, hat_offsets, wide, units, umask, H, keep, state_mask,
                      mean_g, mean_gh, rstd, ACC: tl.constexpr, IS_LSTM: tl.constexpr):
    """Phase C, one side: d_out[its columns] = the LayerNorm backward of d_post with the merged row means."""
    G = 4 if IS_LSTM else 3
    for gate in range(G):
        w = _load_vec(ln_w_ptr + gate * H, units, umask, ACC)
        dy = tl.load(d_post_ptr + wide + gate * H, mask=state_mask, other=0)
        hat = _gate_tile(ws_ptr, hat_offsets, gate, H, keep, ACC)
        tl.store(d_out_ptr + wide + gate * H, _ln_backward(dy, hat, w, mean_g, mean_gh, rstd), mask=state_mask)


def split_backward(tensors: tuple, scalars: tuple, flags: dict, mode: dict, gates: int, like: Tensor) -> Tensor:
    """The backward's T steps of (4 if LSTM else 3) phases, as split_forward. tensors: the kernel's pointer
    arguments from grad_output_ptr to h_prev_ptr (kernels/layernorm_lstm.py sequence_backward); scalars: (T, B, H,
    zoneout, keep_below). -> d_init (2, B, H): the resets' shares of grad h0 / grad c0, to add to the carried ones."""
    seq_len, batch, hidden = scalars[:3]
    tile, grid = _split_grid(mode, batch, hidden, like)
    d_init = like.new_zeros(2, batch, hidden)
    sums = like.new_empty(batch, grid[1], 6)
    _run_phases(_layernorm_split_backward_kernel, grid, mode, tile, like, (*tensors, d_init, sums), scalars,
                (4 if gates == 4 else 3) * seq_len, flags)
    return d_init
