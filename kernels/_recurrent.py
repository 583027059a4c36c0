"""What the recurrent kernels (GRU, Elman RNN, LSTM) share: the device helpers their persistent time loops
are written with, and the launcher plumbing around those loops.

Every whole-sequence kernel has one shape: the input projection is a torch GEMM over all T*B rows before
the launch; ONE persistent launch then walks the T steps, a program per block of 16 batch rows holding whole
hidden rows, the recurrent state (and the backward's grad h) in fp32 (fp64) registers; h_{t-1}, the left
operand of the recurrent GEMM, is also kept in memory in the tensors' dtype. Each step (`step_rows`: which t, which rows of a
PackedSequence are active) adds h_{t-1} @ W_hh^T to the precomputed input part in-kernel
(`add_hidden_projection`, its left operand re-read from memory) and ends with `commit_hidden` (output and
h_t written, inactive rows carried, the barriers the re-read needs). The backward walks the same steps last
first, writes the pre-activation gradients and re-reads them for grad h_{t-1} (`add_hidden_gradient`;
`previous_state` gives the state a step started from), and leaves the weight gradients to torch GEMMs over
all T*B rows (`input_weight_gradients`, `recurrent_weight_gradient`). What differs between the ops (the
cell math, the gate layout, the workspace) stays in kernels/<op>.py.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from seqkern._checks import DTypeError, ShapeError

from ._launch import dot_operand_dtype
# The counter-based hash of attention dropout draws the zoneout masks too (one definition of the bits:
# seqkern/reference/flash_attention.py's dropout_bits; seqkern/reference/_scan.py's zoneout_keep).
from ._hash import _head_key, _kept

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# tl.dot needs every dimension >= 16: the batch block is padded (masked) up to it, so batch 1 works.
MIN_DOT_SIZE = 16


# ==================================================================================================
# Device helpers. Tiles are float32 (float64 for float64 tensors).
# ==================================================================================================
@triton.jit
def sigmoid(x):
    # exp of a non-positive argument only: no overflow to inf for large |x|.
    z = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1 / (1 + z), z / (1 + z))


@triton.jit
def tanh(x):
    # tl has no tanh of its own (only the backends' libdevice); this needs tl.exp alone and saturates cleanly.
    z = tl.exp(-2 * tl.abs(x))
    magnitude = (1 - z) / (1 + z)
    return tl.where(x >= 0, magnitude, -magnitude)


@triton.jit
def store(ptrs, values, mask):
    """Stores float32/float64 `values` in the pointers' dtype, rounding to nearest even.

    To bfloat16 the rounding is done by hand: the triton 3.9 interpreter truncates float32 -> bfloat16
    (a GPU rounds to nearest), which biases sums of many stored values, e.g. bias gradients by ~2x torch's
    error. Values already rounded convert exactly, so a GPU pays a few integer ops per stored element.
    """
    dtype = ptrs.dtype.element_ty
    if dtype == tl.bfloat16:
        bits = values.to(tl.float32).to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        values = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
    tl.store(ptrs, values.to(dtype), mask=mask)


@triton.jit
def time_index(step, T, REVERSE: tl.constexpr):
    """The time index processed at `step` (0 = first step run by the forward)."""
    if REVERSE:
        return T - 1 - step
    return step


@triton.jit
def active_rows(t, rows, B, batch_sizes_ptr, lengths_ptr, HAS_BATCH_SIZES: tl.constexpr, USE_LENGTHS: tl.constexpr):
    """Rows taking part in time step t: those below batch_sizes[t] (a PackedSequence in sorted order) and,
    with lengths, those with t < lengths[row]."""
    if HAS_BATCH_SIZES:
        active = rows < tl.load(batch_sizes_ptr + t)
    else:
        active = rows < B
    if USE_LENGTHS:
        active = active & (t < tl.load(lengths_ptr + rows, mask=rows < B, other=0))
    return active


@triton.jit
def reset_rows(t, rows, B, resets_ptr, USE_RESETS: tl.constexpr):
    """Rows whose state entering time step t is the initial state again (resets[t, row]); none without resets."""
    if USE_RESETS:
        return tl.load(resets_ptr + t * B + rows, mask=rows < B, other=0) != 0
    return rows < 0


@triton.jit
def restart_hidden(h_ptr, h0_ptr, rows, cols, col_mask, width, reset):
    """Before a forward step: the rows in `reset` of h_{t-1} (B,width) in memory, the recurrent GEMM's operand,
    become h0's again. Returns h0's tile (for the register state)."""
    offsets = rows[:, None] * width + cols[None, :]
    h0 = tl.load(h0_ptr + offsets, mask=reset[:, None] & col_mask[None, :], other=0)
    tl.store(h_ptr + offsets, h0, mask=reset[:, None] & col_mask[None, :])
    tl.debug_barrier()  # the restarted rows are visible to every thread before the GEMM reads them
    return h0


@triton.jit
def restart_gradient(grad, grad_initial, reset):
    """Backward of a reset at step t: for the rows in `reset`, the gradient reaching the state that entered t
    belongs to the initial state (accumulated in grad_initial), not to the state step t-1 left."""
    return tl.where(reset[:, None], 0, grad), grad_initial + tl.where(reset[:, None], grad, 0)


@triton.jit
def zoneout_weight(seed_ptr, state_index, t, rows, cols, width, zoneout_hi, zoneout_lo, threshold, keep_all,
                   ZONEOUT_MASK: tl.constexpr, ACC: tl.constexpr):
    """The weight of the previous value in a zoned-out state (B-tile, width-tile), as ACC: the training mask
    keep(t, row, col) of state `state_index` (1 where kept, else 0: seqkern/reference/_scan.py's zoneout_keep,
    i.e. the dropout bits < threshold, or every element when keep_all) or, without a mask, zoneout itself.
    zoneout comes as two float32 halves (a float kernel argument is float32): their sum in float64 is
    zoneout to ~1e-15, where float32 alone would cost float64 layers ~1e-8."""
    if ZONEOUT_MASK:
        head_key = _head_key(seed_ptr, tl.full((), state_index, tl.int32))
        dropped = _kept(head_key, t, rows[:, None] * width + cols[None, :], threshold)  # bits >= threshold
        return tl.where(dropped & (keep_all == 0), 0.0, 1.0).to(ACC)
    return (tl.zeros((rows.shape[0], cols.shape[0]), ACC) + zoneout_hi) + zoneout_lo


@triton.jit
def zoneout_blend(new, old, weight, ZONEOUT_MASK: tl.constexpr):
    """The state after zoneout: the kept elements' old value (a selection, so an Inf elsewhere stays put), or
    weight * old + (1 - weight) * new (evaluation)."""
    if ZONEOUT_MASK:
        return tl.where(weight != 0, old, new)
    return weight * old + (1 - weight) * new


@triton.jit
def sequence_tile(B, H, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """The tile of a persistent sequence program: its batch rows, the hidden columns (a program holds whole
    hidden rows), and the mask and offsets of its part of a (B, H) state."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    hid = tl.arange(0, BLOCK_H)
    hid_mask = hid < H
    state_mask = (rows < B)[:, None] & hid_mask[None, :]
    state_offsets = rows[:, None] * H + hid[None, :]
    return rows, hid, hid_mask, state_mask, state_offsets


@triton.jit
def step_rows(step, T, rows, B, batch_sizes_ptr, lengths_ptr, HAS_BATCH_SIZES: tl.constexpr,
              USE_LENGTHS: tl.constexpr, REVERSE: tl.constexpr):
    """The time index processed at `step` and the rows active at it."""
    t = time_index(step, T, REVERSE)
    return t, active_rows(t, rows, B, batch_sizes_ptr, lengths_ptr, HAS_BATCH_SIZES, USE_LENGTHS)


@triton.jit
def continues_previous_step(step, T, rows, B, batch_sizes_ptr, lengths_ptr, resets_ptr, HAS_BATCH_SIZES: tl.constexpr,
                            USE_LENGTHS: tl.constexpr, USE_RESETS: tl.constexpr, REVERSE: tl.constexpr):
    """Rows whose state entering `step` is the one the step run before left: active then and not reset now;
    none at the first step.

    The others start from the initial state: in the reverse direction a shorter sequence joins at its own last
    element, and a reset row starts again.
    """
    # A row count, not `mask & has_previous`: the interpreter turns a block mask & a scalar into int32.
    has_previous = step > 0
    t_previous = time_index(tl.maximum(step - 1, 0), T, REVERSE)
    count = tl.where(has_previous, B, 0)
    if HAS_BATCH_SIZES:
        count = tl.minimum(count, tl.load(batch_sizes_ptr + t_previous))
    continues = rows < count
    if USE_LENGTHS:
        continues = continues & (t_previous < tl.load(lengths_ptr + rows, mask=rows < B, other=0))
    return continues & ~reset_rows(time_index(step, T, REVERSE), rows, B, resets_ptr, USE_RESETS)


@triton.jit
def previous_state(states_ptr, initial_ptr, step, T, rows, B, cols, col_mask, width, batch_sizes_ptr, lengths_ptr,
                   resets_ptr, HAS_BATCH_SIZES: tl.constexpr, USE_LENGTHS: tl.constexpr, USE_RESETS: tl.constexpr,
                   REVERSE: tl.constexpr):
    """The state each row entered `step` with, as the backward needs it: states (T,B,width) recorded by the
    forward at the step run before, or initial (B,width) for rows that start there (continues_previous_step)."""
    from_states = continues_previous_step(step, T, rows, B, batch_sizes_ptr, lengths_ptr, resets_ptr,
                                          HAS_BATCH_SIZES, USE_LENGTHS, USE_RESETS, REVERSE)
    t_previous = time_index(step - 1, T, REVERSE)
    recorded = tl.load(states_ptr + (t_previous * B + rows)[:, None] * width + cols[None, :],
                       mask=from_states[:, None] & col_mask[None, :], other=0)
    initial = tl.load(initial_ptr + rows[:, None] * width + cols[None, :],
                      mask=(rows < B)[:, None] & col_mask[None, :], other=0)
    return tl.where(from_states[:, None], recorded, initial)


@triton.jit
def accumulate_matmul(acc, a_ptr, a_row_stride, rows, row_mask, w_ptr, w_stride_k, w_stride_n, cols, col_mask,
                      K, DOT: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc (BLOCK_B, BLOCK_N) + A[rows, :K] @ W[:K, cols]; W is addressed through strides (W or W^T alike).
    The operands enter tl.dot as DOT (see _launch.dot_operand_dtype).

    A comes from global memory in BLOCK_K-wide slices, because a register tile cannot be sliced: the
    sequence kernels write the left operand of a recurrent GEMM to memory and re-read it here.
    """
    for k_start in range(0, K, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(a_ptr + rows[:, None] * a_row_stride + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                    other=0)
        w = tl.load(w_ptr + ks[:, None] * w_stride_k + cols[None, :] * w_stride_n,
                    mask=k_mask[:, None] & col_mask[None, :], other=0)
        # "ieee", not the GPU's TF32 default: on a GPU float32 tl.dot defaults to TF32 (10-bit mantissa),
        # whose ~1e-3 relative error breaks DESIGN.md's "at most 2x torch's own error" (under the
        # interpreter tl.dot is exact numpy arithmetic either way, so only a GPU run shows the difference).
        acc = tl.dot(a.to(DOT), w.to(DOT), acc, input_precision="ieee")
    return acc


@triton.jit
def add_hidden_projection(acc, h_ptr, rows, active, w_gate_ptr, cols, col_mask, P, DOT: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    """acc + h_{t-1} @ W^T on the active rows, W (N,P) the block of W_hh (row-major, P columns) of one gate.
    h_{t-1} (B,P) is read from memory at h_ptr."""
    return accumulate_matmul(acc, h_ptr, P, rows, active, w_gate_ptr, 1, P, cols, col_mask, P, DOT, BLOCK_K)


@triton.jit
def add_hidden_gradient(acc, grad_gate_ptr, grad_row_stride, rows, active, w_gate_ptr, cols, col_mask, H, P,
                        DOT: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + G @ W on the active rows: one gate's share of grad h_{t-1} (columns `cols` of P), G (B,H) that
    gate's pre-activation gradient read from memory (rows `grad_row_stride` apart), W (H,P) its block of W_hh."""
    return accumulate_matmul(acc, grad_gate_ptr, grad_row_stride, rows, active, w_gate_ptr, P, 1, cols, col_mask, H,
                             DOT, BLOCK_K)


@triton.jit
def commit_hidden(h_new, output_ptr, h_ptr, t, rows, B, cols, col_mask, active, P):
    """Ends a forward step: h_t (B,P) goes to output[t] (zeros on inactive rows) and over h_{t-1} in h_ptr,
    the GEMM operand of the next step, on active rows only (inactive rows carry their state)."""
    tl.debug_barrier()  # every thread has read h_{t-1} before h_t overwrites it
    keep = active[:, None] & col_mask[None, :]
    store(output_ptr + (t * B + rows)[:, None] * P + cols[None, :], tl.where(keep, h_new, 0),
          (rows < B)[:, None] & col_mask[None, :])
    store(h_ptr + rows[:, None] * P + cols[None, :], h_new, keep)
    tl.debug_barrier()  # h_t is visible to every thread before the next step reads it


@triton.jit
def zoneout_gradients(grad, weight, ZONEOUT_MASK: tl.constexpr):
    """Backward of zoneout_blend: the gradient of the state after zoneout -> (that of the step's new value,
    that of the previous value)."""
    if ZONEOUT_MASK:
        kept = weight != 0
        return tl.where(kept, 0, grad), tl.where(kept, grad, 0)
    return (1 - weight) * grad, weight * grad


@triton.jit
def grid_barrier(arrivals_ptr, target):
    """Waits until every program of a barrier group has finished the step: `arrivals_ptr` (int32, zero at launch)
    counts arrivals over the whole launch and is never reset, so the wait after the k-th step of a group of P
    programs is for target = k * P (generation-based: reusable every step with no reset race).

    Memory order (compiled, checked in the PTX: thread 0 does the atomics, bar.sync around them): the CTA
    barrier gathers the program's stores of h_t, thread 0's `red.release.gpu` publishes them with its arrival;
    the spin reads the counter with volatile loads (ld.volatile: not cached in L1, no ordering), and once the
    target is seen thread 0's acquire read (`ld.acquire.gpu`, an atomic add of 0) orders the loads of the next
    step after the other programs' releases; the closing CTA barrier extends that to every thread.
    Only for launches whose programs are all co-resident (kernels/_recurrent_split.py): otherwise it waits
    for ever.
    """
    tl.debug_barrier()  # every thread of this program has stored its part of h_t
    tl.atomic_add(arrivals_ptr, 1, sem="release")
    while tl.load(arrivals_ptr, volatile=True) < target:
        pass
    tl.atomic_add(arrivals_ptr, 0, sem="acquire")
    tl.debug_barrier()  # no thread reads h_t before the acquire above


# ==================================================================================================
# Launcher plumbing: dtypes, block sizes, argument checks, and the torch GEMMs around the launches.
# ==================================================================================================
def accumulator_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def kernel_dtypes(like: Tensor) -> dict:
    """The ACC (math, accumulation) and DOT (tl.dot operand) dtypes of the sequence kernels."""
    return {"ACC": accumulator_dtype(like.dtype), "DOT": dot_operand_dtype(like.dtype, like.device)}


def pow2_at_least(n: int, minimum: int) -> int:
    return max(minimum, triton.next_power_of_2(n))


def sequence_blocks(hidden: int, dtype: torch.dtype | None = None) -> dict:
    """Tiles and warps of a sequence kernel: whole hidden rows per program, so that the state stays in
    registers; 16 batch rows and 16-wide K slices, the smallest tl.dot tiles.

    Measured with ptxas -v for sm_80 on the LSTM kernels (forward / backward, no GPU needed): at hidden 64,
    4 warps and 32-wide K slices spill 592 / 168 bytes in float32 and none in bfloat16 at 8 warps; at hidden
    128, 8 warps and 16-wide slices spill 32 / 136 bytes (float32) and none (bfloat16). Beyond hidden 256
    spills grow. The GRU and RNN kernels (same tiles) spill nothing at hidden 64 and 128 in float32 and
    bfloat16; at hidden 256 (float32) the GRU forward / backward spill 740 / 200 bytes, the RNN forward 68.
    """
    block_h = pow2_at_least(hidden, MIN_DOT_SIZE)
    num_warps = 4 if block_h <= 32 else 8
    blocks = {"BLOCK_B": MIN_DOT_SIZE, "BLOCK_H": block_h, "BLOCK_K": MIN_DOT_SIZE, "num_warps": num_warps}
    if dtype is not None:
        # Pipeline stages by dtype: with triton's default 3 the float32 GRU and RNN forwards spilled 16 bytes at
        # hidden 64 on sm_80, with 1 the bfloat16 GRU at 128 did (ptxas settled on 64-128 registers); so every
        # forward the rule keeps here (hidden 64 and 128, all flags) compiles clean on sm_80 and sm_90
        # (tests/test_gpu_compile.py). Without a dtype (the LayerNorm kernels) triton's default.
        blocks["num_stages"] = 3 if torch.empty((), dtype=dtype).element_size() == 2 else 1
    return blocks


# ==================================================================================================
# Launch modes for the forward on a GPU (issue 17): which kernel walks the time loop for a given shape.
# ==================================================================================================
# "rows": the persistent row-block kernels above (a program per 16 batch rows, all hidden units).
# "persistent": kernels/_recurrent_split.py, hidden units split over co-resident programs, a grid barrier per step.
# "per_step": kernels/_recurrent_split.py, one launch per time step, no waiting between programs.
MODES = ("rows", "persistent", "per_step")
# The widths of a program's unit slice and the warps of a program of that width (BLOCK_B = 16 rows, all gates of
# the units), chosen with ptxas (tests/test_gpu_compile.py, sm_80 and sm_90, every cell, hidden 128-1024; one
# pipeline stage: two spilled 16-48 bytes in several LSTM / GRU configs). A (16 x BLOCK_U) tile spread over more
# warps than it fills is replicated per warp (register cost, no speed), hence few warps for narrow slices.
# 16 units only in 16-bit dtypes: float32's tf32x3 products keep two halves of each operand and its LSTM spilled
# (48-184 bytes at 2 to 8 warps). The counts differ by dtype because ptxas picked 96-128 registers (and
# spilled 16 bytes) for some of the others: the bfloat16 LSTM at 32 units / 4 warps on sm_90, the float32 GRU
# at 32 units / 8 warps on sm_80.
UNIT_WARPS = {2: {16: 2, 32: 8, 64: 8}, 4: {32: 4, 64: 8}}  # element size -> BLOCK_U -> num_warps
NUM_STAGES = 1
# Hidden sizes (padded) up to which the row-block kernel is kept when the batch already fills the GPU: its
# register tile grows with H (ptxas: spills from H=256 in float32; kernels/_recurrent.py sequence_blocks).
ROWS_MAX_HIDDEN = 128
# Bytes of W_hh slice a persistent program loads once, before the time loop (RESIDENT), 16-bit dtypes only: ptxas
# spilled the LSTM's resident slices at 64 KB (bfloat16) and every float32 one from 16 KB (tf32x3 splits the
# slice in two halves). Above it, or in float32, the program re-reads its slice every step (from L1/L2: its
# slice, not all of W_hh).
RESIDENT_BYTES = 32 * 1024
# ... and only up to this hidden size: the h_{t-1} operand (16 x H) is then loaded whole too (the RNN's 32 KB
# slice at H = 1024 spilled).
RESIDENT_MAX_HIDDEN = 512
# The per-step mode's tile, (batch rows, units) per program by element size, 8 warps. Every program reads its
# units' W_hh slice each step, so W_hh crosses L2 once per `rows` batch rows: 64 rows (not 16) cut that traffic
# 4x at large batch in 16-bit dtypes. float32 stays at 16 rows x 64 units: its LSTM spilled 192-552 bytes with
# 32 or 64 rows at 4 or 8 warps (tf32x3 holds two halves of each operand).
PER_STEP_TILE = {2: (64, 32), 4: (16, 64)}
# ... but the backward's tile takes at most 32 rows: its cell backward holds more tiles (workspace, cells, gradients)
# and the bfloat16 LSTM's 64 x 32 tile spilled 72 bytes at 255 registers on sm_80 (32 x 32: 190-195 registers, clean;
# 64 x 16 was clean too but doubles the d_gates reads, which the backward's K = 4H makes the larger operand: per
# step at b512 h1024 ~330 MB from L2 against ~260 MB with 32 x 32 and ~200 MB with 64 x 32).
PER_STEP_BACKWARD_ROWS = 32
# The register cap ptxas gets for every split launch (triton's `maxnreg`: the PTX's .maxnreg). Without it ptxas
# settled on 128 registers and spilled 16-48 bytes in 15 float32 configs with tf32 products (allow_tf32): the LSTM
# at 32 units / 4 warps on sm_80 and 64 / 8 on sm_90, the GRU at 64 / 8 on sm_90 (persistent and per step), every
# hidden size; with 255 they use 154-162 and spill nothing. 255 x 256 threads (8 warps, the most a split program
# has) still fits an SM's 64K registers, so the persistent grid's one program per SM stays co-resident.
SPLIT_MAXNREG = 255
_forced: dict | None = None


def unit_blocks(dtype: torch.dtype) -> tuple[int, ...]:
    """The unit-slice widths the rule may use for `dtype` (narrowest first)."""
    return (16, 32, 64) if torch.empty((), dtype=dtype).element_size() == 2 else (32, 64)


def recurrent_mode(batch: int, hidden: int, gates: int, dtype: torch.dtype, sm_count: int) -> dict:
    """The launch mode of a recurrent layer's forward and backward and their tiles, by shape: batch B, hidden H
    (max(H, P) for an LSTM with a projection of size P: the split grid covers both), `gates` blocks of H columns in
    W_hh (LSTM 4, GRU 3, RNN 1), dtype, and the number of SMs (0 without a GPU: the interpreter). The split kernels
    implement every feature of the layers (lengths, resets, zoneout, the projection), so only the shape decides.

    -> {"mode": "rows"} or {"mode": "persistent" | "per_step", "BLOCK_B": batch rows and "BLOCK_U": units per program,
       "RESIDENT": W_hh slice loaded once before the time loop (persistent only), "num_warps", "num_stages",
       "maxnreg" (ptxas's register cap, SPLIT_MAXNREG)}

    The rule, in order:
      * rows without a GPU, for H <= 64 (the whole W_hh of such a layer is at most
        64 KB: one program holds it, and a split would only add barriers), and while the row blocks alone
        fill half the SMs at H <= ROWS_MAX_HIDDEN (then every SM is busy and there is no barrier);
      * persistent with the narrowest unit slice (`unit_blocks`) for which batch blocks x unit blocks <= SMs:
        one program per SM, all co-resident (a cooperative launch), each keeping its slice resident when
        gates x BLOCK_U x H fits RESIDENT_BYTES in a 16-bit dtype at H <= RESIDENT_MAX_HIDDEN;
      * per_step otherwise (more programs than SMs: a grid barrier would deadlock), PER_STEP_TILE tiles.
    A test can force a mode with `forced_mode`.
    """
    if _forced is not None:
        return dict(_forced)
    batch_blocks = triton.cdiv(batch, MIN_DOT_SIZE)
    padded = pow2_at_least(hidden, MIN_DOT_SIZE)
    if (sm_count == 0 or padded <= 64
            or (padded <= ROWS_MAX_HIDDEN and 2 * batch_blocks >= sm_count)):
        return {"mode": "rows"}
    element = torch.empty((), dtype=dtype).element_size()
    for block_u in unit_blocks(dtype):
        if batch_blocks * triton.cdiv(hidden, block_u) <= sm_count:
            resident = (element == 2 and padded <= RESIDENT_MAX_HIDDEN
                        and gates * block_u * padded * element <= RESIDENT_BYTES)
            return _split_mode("persistent", block_u, resident, dtype)
    rows, units = PER_STEP_TILE.get(element, PER_STEP_TILE[4])
    return _split_mode("per_step", units, False, dtype, min(rows, pow2_at_least(batch, MIN_DOT_SIZE)))


def backward_mode(mode: dict) -> dict:
    """The split backward's tiles for the forward's `mode` (recurrent_mode's result): the same, but at most
    PER_STEP_BACKWARD_ROWS batch rows per program."""
    if mode["mode"] == "rows" or mode["BLOCK_B"] <= PER_STEP_BACKWARD_ROWS:
        return mode
    return dict(mode, BLOCK_B=PER_STEP_BACKWARD_ROWS)


def _split_mode(mode: str, block_u: int, resident: bool, dtype: torch.dtype, block_b: int = MIN_DOT_SIZE) -> dict:
    warps = UNIT_WARPS.get(torch.empty((), dtype=dtype).element_size(), UNIT_WARPS[4]).get(block_u, 8)
    if mode == "per_step":  # PER_STEP_TILE
        warps = 8
    return {"mode": mode, "BLOCK_B": block_b, "BLOCK_U": block_u, "RESIDENT": resident, "num_warps": warps,
            "num_stages": NUM_STAGES, "maxnreg": SPLIT_MAXNREG}


@contextlib.contextmanager
def forced_mode(mode: str, block_u: int = 16, resident: bool = False, block_b: int = MIN_DOT_SIZE):
    """Within the block every recurrent forward and backward uses `mode` ("rows" | "persistent" | "per_step") with
    BLOCK_U units and BLOCK_B batch rows per program: how the tests reach the split kernels without a GPU. Under the
    interpreter programs run one after another, so "persistent" needs BLOCK_U >= max(H, P) (one program per barrier
    group) or it would wait for ever (kernels/_recurrent_split.py refuses that launch). Warps and stages are
    the rule's for float32."""
    global _forced
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    before, _forced = _forced, _split_mode(mode, block_u, resident, torch.float32, block_b)
    try:
        yield
    finally:
        _forced = before


def forced():
    """The mode forced_mode set (a copy), or None: how other launchers' rules (kernels/_layernorm_split.py) follow it."""
    return None if _forced is None else dict(_forced)


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 0 elsewhere (the interpreter)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


def sequence_grid(batch: int) -> tuple[int]:
    """One program per block of MIN_DOT_SIZE batch rows."""
    return (triton.cdiv(batch, MIN_DOT_SIZE),)


def cell_blocks(batch: int, hidden: int) -> dict:
    return {"BLOCK_B": min(16, triton.next_power_of_2(batch)), "BLOCK_H": min(128, triton.next_power_of_2(hidden))}


def check(name: str, tensor: Tensor, shape: tuple, like: Tensor) -> None:
    """`tensor` has `shape` and the dtype and device of `like` (the op's first tensor)."""
    if tensor.dtype != like.dtype:
        raise DTypeError(f"{name}: expected dtype {like.dtype} (as the other tensors), got {tensor.dtype}")
    if tensor.device != like.device:
        raise DTypeError(f"{name}: expected a tensor on {like.device} (as the other tensors), got {tensor.device}")
    if tuple(tensor.shape) != tuple(shape):
        raise ShapeError(f"{name}: expected shape {tuple(shape)}, got {tuple(tensor.shape)}")


def check_dtype(name: str, tensor: Tensor, op: str) -> None:
    if tensor.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise DTypeError(f"{name}: the Triton {op} kernels support {names}; got {tensor.dtype}")


def check_state(name: str, tensor: Tensor, op: str) -> tuple[int, int]:
    """A supported (B,H) state tensor -> (B, H)."""
    check_dtype(name, tensor, op)
    if tensor.dim() != 2:
        raise ShapeError(f"{name}: expected a (B,H) tensor, got shape {tuple(tensor.shape)}")
    return tensor.shape[0], tensor.shape[1]


def check_biases(b_ih: Tensor | None, b_hh: Tensor | None, size: int, like: Tensor) -> None:
    if (b_ih is None) != (b_hh is None):
        raise ShapeError("b_ih, b_hh: expected both or neither")
    if b_ih is not None:
        check("b_ih", b_ih, (size,), like)
        check("b_hh", b_hh, (size,), like)


def check_batch_sizes(batch_sizes: Tensor | None, seq_len: int, batch: int) -> None:
    if batch_sizes is None:
        return
    if batch_sizes.dtype != torch.int64 or tuple(batch_sizes.shape) != (seq_len,):
        raise ShapeError(f"batch_sizes: expected an int64 tensor of shape ({seq_len},), "
                         f"got {batch_sizes.dtype} of shape {tuple(batch_sizes.shape)}")
    if seq_len and (int(batch_sizes.max()) > batch or int(batch_sizes.min()) < 0
                    or bool((batch_sizes[1:] > batch_sizes[:-1]).any())):
        raise ShapeError(f"batch_sizes: expected non-increasing values in [0, {batch}], got {batch_sizes.tolist()}")


def state_flags(input: Tensor, batch_sizes: Tensor | None, lengths: Tensor | None, resets: Tensor | None,
                reverse: bool, zoneout: float = 0.0, zoneout_seed: Tensor | None = None) -> dict:
    """Checks lengths, resets, zoneout and zoneout_seed (seqkern/ops/_schemas.py) and returns the sequence
    kernels' arguments for them: lengths_ptr, resets_ptr, seed_ptr (None where unused), zoneout, threshold,
    keep_all (zoneout as zoneout_hi, zoneout_lo), and the constexpr flags USE_LENGTHS, USE_RESETS, ZONEOUT, ZONEOUT_MASK."""
    seq_len, batch = input.shape[0], input.shape[1]
    if lengths is not None:
        if batch_sizes is not None:
            raise ShapeError("lengths, batch_sizes: cannot be given together (a PackedSequence's batch_sizes "
                             "already say which rows are active)")
        if lengths.dtype != torch.int64:
            raise DTypeError(f"lengths: expected int64, got {lengths.dtype}")
        check("lengths", lengths, (batch,), lengths)
        _check_device("lengths", lengths, input)
        if batch and not bool(((lengths >= 0) & (lengths <= seq_len)).all()):
            raise ShapeError(f"lengths: expected values in [0, {seq_len}], got {lengths.tolist()}")
    if resets is not None:
        if reverse:
            raise ShapeError("resets: cannot be given with reverse=True (an episode boundary is defined in the "
                             "forward direction only)")
        if resets.dtype != torch.bool:
            raise DTypeError(f"resets: expected bool, got {resets.dtype}")
        check("resets", resets, (seq_len, batch), resets)
        _check_device("resets", resets, input)
    if not 0.0 <= zoneout <= 1.0:
        raise ShapeError(f"zoneout: expected a probability in [0, 1], got {zoneout}")
    masked = zoneout > 0 and zoneout_seed is not None
    if zoneout_seed is not None:
        if zoneout_seed.dtype != torch.int64 or zoneout_seed.dim() != 0:
            raise DTypeError(f"zoneout_seed: expected an int64 tensor of shape (), got {zoneout_seed.dtype} of shape "
                             f"{tuple(zoneout_seed.shape)}")
        _check_device("zoneout_seed", zoneout_seed, input)
    threshold = int(zoneout * 2**32)  # keep iff bits < threshold (seqkern/reference/_scan.py zoneout_threshold)
    return dict(
        lengths_ptr=lengths.contiguous() if lengths is not None else None,
        resets_ptr=resets.contiguous().view(torch.uint8) if resets is not None else None,
        seed_ptr=zoneout_seed if masked else None, **_float32_halves(zoneout),
        # 2^32 does not fit the kernels' uint32 bits: keep_all stands for it (zoneout = 1 keeps everything).
        threshold=min(threshold, 2**32 - 1), keep_all=int(threshold >= 2**32),
        USE_LENGTHS=lengths is not None, USE_RESETS=resets is not None, ZONEOUT=zoneout > 0, ZONEOUT_MASK=masked,
    )


def _float32_halves(zoneout: float) -> dict:
    """zoneout_hi + zoneout_lo == zoneout to float64's precision, each a float32 (zoneout_weight)."""
    hi = float(torch.tensor(zoneout, dtype=torch.float32))
    return {"zoneout_hi": hi, "zoneout_lo": zoneout - hi}


def _check_device(name: str, tensor: Tensor, like: Tensor) -> None:
    if tensor.device != like.device:
        raise DTypeError(f"{name}: expected a tensor on {like.device} (as the input), got {tensor.device}")


def check_layer(input: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, batch_sizes: Tensor | None, gates: int,
                op: str) -> tuple[int, int, int, int]:
    """Checks the arguments a GRU or RNN layer's forward and backward share (`gates` weight blocks of H rows)
    -> (T, B, I, H)."""
    check_dtype("input", input, op)
    if input.dim() != 3 or h0.dim() != 2:
        raise ShapeError(f"input, h0: expected (T,B,I) and (B,H), got {tuple(input.shape)} and {tuple(h0.shape)}")
    seq_len, batch, input_size = input.shape
    hidden = h0.shape[1]
    check("h0", h0, (batch, hidden), input)
    check("w_ih", w_ih, (gates * hidden, input_size), input)
    check("w_hh", w_hh, (gates * hidden, hidden), input)
    check_batch_sizes(batch_sizes, seq_len, batch)
    return seq_len, batch, input_size, hidden


def linear(rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """rows (N,K), weight (M,K), bias (M,) or None -> rows @ weight^T + bias (N,M)."""
    if bias is None:
        return rows @ weight.t()
    return torch.addmm(bias, rows, weight.t())


def column_sums(rows: Tensor) -> Tensor:
    """(N,M) -> (M,), accumulated in float32 at least (bfloat16 sums of many rows lose digits)."""
    accumulate = torch.float64 if rows.dtype == torch.float64 else torch.float32
    return rows.sum(0, dtype=accumulate).to(rows.dtype)


def active_mask(seq_len: int, batch: int, batch_sizes: Tensor | None, lengths: Tensor | None,
                device: torch.device) -> Tensor:
    """(T,B) bool: which rows take part in each time step (seqkern/ops/_schemas.py)."""
    steps = torch.arange(seq_len, device=device)[:, None]
    active = torch.ones(seq_len, batch, dtype=torch.bool, device=device)
    if batch_sizes is not None:
        active &= torch.arange(batch, device=device)[None, :] < batch_sizes.to(device)[:, None]
    if lengths is not None:
        active &= steps < lengths[None, :]
    return active


def previous_hidden(output: Tensor, h0: Tensor, batch_sizes: Tensor | None, reverse: bool,
                    lengths: Tensor | None = None, resets: Tensor | None = None) -> Tensor:
    """(T,B,H): the h_{t-1} each step t multiplied by W_hh, on the rows active at t.

    It is the output of the step run before, or h0 for a row that was not active then (every row at
    the first step; in the reverse direction, a shorter sequence at its own last element) or is reset at t.
    """
    seq_len, batch = output.shape[0], output.shape[1]
    active = active_mask(seq_len, batch, batch_sizes, lengths, output.device)
    none = active.new_zeros(1, batch)
    if reverse:
        shifted = torch.cat([output, h0.unsqueeze(0)])[1:]
        active_before = torch.cat([active, none])[1:]
    else:
        shifted = torch.cat([h0.unsqueeze(0), output])[:seq_len]
        active_before = torch.cat([none, active])[:seq_len]
    from_h0 = ~active_before if resets is None else ~active_before | resets
    return torch.where(from_h0[..., None], h0.unsqueeze(0), shifted)


def input_weight_gradients(grad_pre_x: Tensor, input: Tensor, w_ih: Tensor) -> tuple[Tensor, Tensor]:
    """grad_pre_x (T,B,G) gradient of input @ w_ih^T, input (T,B,I), w_ih (G,I) -> grad_input, grad_w_ih.
    One GEMM each over all T*B rows (rows inactive at a step have zero gradient)."""
    seq_len, batch, input_size = input.shape
    rows = grad_pre_x.reshape(seq_len * batch, grad_pre_x.shape[-1])
    return (rows @ w_ih).view(seq_len, batch, input_size), rows.t() @ input.reshape(seq_len * batch, input_size)


def recurrent_weight_gradient(grad_pre_h: Tensor, output: Tensor, h0: Tensor, batch_sizes: Tensor | None,
                              reverse: bool, lengths: Tensor | None = None, resets: Tensor | None = None) -> Tensor:
    """grad_pre_h (T,B,G) gradient of h_{t-1} @ w_hh^T -> grad_w_hh (G,H), one GEMM over all T*B rows."""
    seq_len, batch, hidden = output.shape
    h_prev = previous_hidden(output, h0, batch_sizes, reverse, lengths, resets).reshape(seq_len * batch, hidden)
    return grad_pre_h.reshape(seq_len * batch, grad_pre_h.shape[-1]).t() @ h_prev


def contiguous_or_none(tensor: Tensor | None) -> Tensor | None:
    return tensor.contiguous() if tensor is not None else None


def on_device(batch_sizes: Tensor | None, like: Tensor) -> Tensor | None:
    """batch_sizes lives on the CPU (seqkern/ops/_schemas.py); the kernel reads it on the tensors' device."""
    return batch_sizes.to(like.device).contiguous() if batch_sizes is not None else None
