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

import torch
import triton
import triton.language as tl
from torch import Tensor

from seqkern._checks import DTypeError, ShapeError

from ._launch import dot_operand_dtype

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
def active_rows(t, rows, B, batch_sizes_ptr, HAS_BATCH_SIZES: tl.constexpr):
    """Rows taking part in time step t: those below batch_sizes[t] (a PackedSequence in sorted order)."""
    if HAS_BATCH_SIZES:
        return rows < tl.load(batch_sizes_ptr + t)
    return rows < B


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
def step_rows(step, T, rows, B, batch_sizes_ptr, HAS_BATCH_SIZES: tl.constexpr, REVERSE: tl.constexpr):
    """The time index processed at `step` and the rows active at it."""
    t = time_index(step, T, REVERSE)
    return t, active_rows(t, rows, B, batch_sizes_ptr, HAS_BATCH_SIZES)


@triton.jit
def rows_active_at_previous_step(step, T, rows, B, batch_sizes_ptr, HAS_BATCH_SIZES: tl.constexpr,
                                 REVERSE: tl.constexpr):
    """Rows that were active at the step run before `step`; none at the first step.

    A row active now but not then starts from the initial state: in the reverse direction a shorter
    sequence joins at its own last element.
    """
    # A row count, not `mask & has_previous`: the interpreter turns a block mask & a scalar into int32.
    has_previous = step > 0
    if HAS_BATCH_SIZES:
        count = tl.load(batch_sizes_ptr + time_index(step - 1, T, REVERSE), mask=has_previous, other=0)
    else:
        count = tl.where(has_previous, B, 0)
    return rows < count


@triton.jit
def previous_state(states_ptr, initial_ptr, step, T, rows, B, cols, col_mask, width, batch_sizes_ptr,
                   HAS_BATCH_SIZES: tl.constexpr, REVERSE: tl.constexpr):
    """The state each row entered `step` with, as the backward needs it: states (T,B,width) recorded by the
    forward at the step run before, or initial (B,width) for rows that were not active then."""
    from_states = rows_active_at_previous_step(step, T, rows, B, batch_sizes_ptr, HAS_BATCH_SIZES, REVERSE)
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


def sequence_blocks(hidden: int) -> dict:
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
    return {"BLOCK_B": MIN_DOT_SIZE, "BLOCK_H": block_h, "BLOCK_K": MIN_DOT_SIZE, "num_warps": num_warps}


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


def previous_hidden(output: Tensor, h0: Tensor, batch_sizes: Tensor | None, reverse: bool) -> Tensor:
    """(T,B,H): the h_{t-1} each step t multiplied by W_hh, on the rows active at t.

    It is the output of the step run before, or h0 for a row that was not active then (every row at
    the first step; in the reverse direction, a shorter sequence at its own last element).
    """
    seq_len, batch = output.shape[0], output.shape[1]
    # The (T,B) row mask is built on the host, where batch_sizes lives, and copied over once.
    counts = batch_sizes.cpu() if batch_sizes is not None else torch.full((seq_len,), batch, dtype=torch.int64)
    none = counts.new_zeros(1)
    if reverse:
        shifted = torch.cat([output, h0.unsqueeze(0)])[1:]
        counts_before = torch.cat([counts, none])[1:]
    else:
        shifted = torch.cat([h0.unsqueeze(0), output])[:seq_len]
        counts_before = torch.cat([none, counts])[:seq_len]
    from_h0 = torch.arange(batch)[None, :] >= counts_before[:, None]
    return torch.where(from_h0[..., None].to(output.device), h0.unsqueeze(0), shifted)


def input_weight_gradients(grad_pre_x: Tensor, input: Tensor, w_ih: Tensor) -> tuple[Tensor, Tensor]:
    """grad_pre_x (T,B,G) gradient of input @ w_ih^T, input (T,B,I), w_ih (G,I) -> grad_input, grad_w_ih.
    One GEMM each over all T*B rows (rows inactive at a step have zero gradient)."""
    seq_len, batch, input_size = input.shape
    rows = grad_pre_x.reshape(seq_len * batch, grad_pre_x.shape[-1])
    return (rows @ w_ih).view(seq_len, batch, input_size), rows.t() @ input.reshape(seq_len * batch, input_size)


def recurrent_weight_gradient(grad_pre_h: Tensor, output: Tensor, h0: Tensor, batch_sizes: Tensor | None,
                              reverse: bool) -> Tensor:
    """grad_pre_h (T,B,G) gradient of h_{t-1} @ w_hh^T -> grad_w_hh (G,H), one GEMM over all T*B rows."""
    seq_len, batch, hidden = output.shape
    h_prev = previous_hidden(output, h0, batch_sizes, reverse).reshape(seq_len * batch, hidden)
    return grad_pre_h.reshape(seq_len * batch, grad_pre_h.shape[-1]).t() @ h_prev


def contiguous_or_none(tensor: Tensor | None) -> Tensor | None:
    return tensor.contiguous() if tensor is not None else None


def on_device(batch_sizes: Tensor | None, like: Tensor) -> Tensor | None:
    """batch_sizes lives on the CPU (seqkern/ops/_schemas.py); the kernel reads it on the tensors' device."""
    return batch_sizes.to(like.device).contiguous() if batch_sizes is not None else None
