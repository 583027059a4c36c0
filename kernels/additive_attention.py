"""Triton kernels for additive_attention_forward / additive_attention_backward (contracts in seqkern/ops/_schemas.py, oracle
in seqkern/reference/additive_attention.py).

Additive (Bahdanau) attention, flash style: score(i, j) = v . tanh(query_proj_i + key_proj_j) is built a
(BLOCK_M queries, BLOCK_N keys) tile at a time as a sum over chunks of BLOCK_H hidden units of a
(BLOCK_M, BLOCK_N, BLOCK_H) broadcast, so neither the (B,Lq,Lk,H) tanh tensor nor (without return_weights)
the (B,Lq,Lk) scores reach memory. Unlike dot-product attention the score is not a GEMM: its cost is
Lq*Lk*H tanh evaluations, which dominate every kernel here.
  * forward, a program per (query block, batch): the key blocks are swept once with an online softmax (running
    max m, running sum l, output accumulator in fp32 or fp64); out = acc / l, lse = m + log l. With
    return_weights the raw scores are stored into `weights` during the sweep and, once lse is known, the same
    program rereads its rows and writes exp(score - lse) over them: B*Lq*Lk extra reads and writes instead of
    a second sweep of Lq*Lk*H tanh evaluations.
  * backward, four launches, no atomics, so the result is deterministic:
      1. a program per (query block, batch) computes delta_i = dO_i . O_i + sum_j p(i, j) gW(i, j) and writes
         dS(i, j) = p(i, j) (dO_i . values_j + gW(i, j) - delta_i) to a (B,Lq,Lk) buffer (p are the saved
         weights, the scores are not recomputed);
      2. a program per (query block, chunk of hidden units, batch): grad_query_proj = v * sum_j dS (1 - t^2);
      3. a program per (key block, chunk of hidden units, batch): grad_key_proj = v * sum_i dS (1 - t^2), and
         this key block's part of grad_v = sum_ij dS t, the parts summed afterwards in a fixed order;
      4. a program per (key block, chunk of value dims, batch): grad_values = P^T dO.
    Kernels 2 and 3 each recompute t = tanh(query_proj_i + key_proj_j) once; dS is read, not recomputed, so
    the hidden units can be split across programs. The dS buffer costs B*Lq*Lk floats, as the saved weights.

tanh: triton.language has no tanh of its own (only the backends' libdevice), so it is written with tl.exp and
a short series near 0 (_SERIES_BELOW says why); 1 - tanh^2 is computed without cancellation (_tanh_and_slope).
Supported dtypes: float32, float64, bfloat16, float16 (math, lse and weights in float32; float64 for float64). The
launchers take CPU tensors too: kernels/_launch.py runs the kernels under the Triton interpreter then.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from seqkern._checks import DTypeError, ShapeError

from ._launch import dot_operand_dtype, dot_precision, launch, launch_tuned
from ._recurrent import accumulator_dtype, store

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# tl.dot needs every dimension >= 16: query and key blocks and the padded value dim are at least this.
MIN_DOT_SIZE = 16

# Below this |x|, tanh is an odd Taylor polynomial: (1 - z) / (1 + z) with z = exp(-2|x|) cancels there
# (relative error ~eps / |x|, 2^23 ulps near 0 in float32), while its error stays <= 5 ulps above it. Measured
# without the series (float32, projections ~1e-3, v ~1e3): out 1.2e-4 from float64 against the composed
# version's 1.0e-6, grad_key_proj 0.34 against 3.0e-3; with it, within 1.1x of the composed version.
_SERIES_BELOW = tl.constexpr(0.125)


# ==================================================================================================
# Device helpers.
# ==================================================================================================
@triton.jit
def _tanh_series(x):
    """tanh(x) for |x| < _SERIES_BELOW: the odd Taylor series up to the first term below an ulp of the dtype
    at 0.125 (x^7 for float32, x^13 for float64). Coefficients are made in x's dtype: a bare float literal
    would be a float32 constant."""
    x2 = x * x
    if x.dtype == tl.float64:
        series = tl.full((), 21844 / 6081075, x.dtype)
        series = series * x2 + tl.full((), -1382 / 155925, x.dtype)
        series = series * x2 + tl.full((), 62 / 2835, x.dtype)
        series = series * x2 + tl.full((), -17 / 315, x.dtype)
    else:
        series = tl.full((), -17 / 315, x.dtype)
    series = series * x2 + tl.full((), 2 / 15, x.dtype)
    series = series * x2 + tl.full((), -1 / 3, x.dtype)
    return x + x * x2 * series


@triton.jit
def _tanh_from(x, z):
    """tanh(x) given z = exp(-2|x|) (in (0, 1]: no overflow for any x)."""
    magnitude = (1 - z) / (1 + z)
    return tl.where(tl.abs(x) < _SERIES_BELOW, _tanh_series(x), tl.where(x >= 0, magnitude, -magnitude))


@triton.jit
def _tanh(x):
    """tanh(x) to a few ulps everywhere (float32 or float64 x)."""
    return _tanh_from(x, tl.exp(-2 * tl.abs(x)))


@triton.jit
def _tanh_hardware(x):
    """tanh.approx.f32 (sm_75+): one MUFU instruction, ~2^-11 relative error -- within a 16-bit dtype's own
    rounding, so used for bfloat16 / float16 on a GPU only (FAST_TANH); never under the interpreter, which
    cannot run PTX."""
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def _tanh_any(x, FAST_TANH: tl.constexpr):
    """tanh(x): the hardware's approximation with FAST_TANH (float32 x), else _tanh."""
    if FAST_TANH:
        t = _tanh_hardware(x)
    else:
        t = _tanh(x)
    return t


@triton.jit
def _tanh_and_slope(x, FAST_TANH: tl.constexpr):
    """tanh(x) and its derivative 1 - tanh(x)^2, the latter as 4z / (1 + z)^2: no cancellation where tanh
    saturates (1 - t^2 computed from a rounded t loses every digit there). With FAST_TANH (16-bit dtypes on a
    GPU) the hardware's tanh and 1 - t^2: the lost digits are below the dtype's rounding of the gradients."""
    if FAST_TANH:
        t = _tanh_hardware(x)
        slope = 1 - t * t
    else:
        z = tl.exp(-2 * tl.abs(x))
        one_plus_z = 1 + z
        t = _tanh_from(x, z)
        slope = 4 * z / (one_plus_z * one_plus_z)
    return t, slope


@triton.jit
def _load_rows(base, rows, row_mask, row_stride, cols, col_count, ACC: tl.constexpr):
    """base[rows, cols] of a matrix with rows `row_stride` apart (unit column stride) as (rows, cols) in ACC,
    zeros outside the masks."""
    tile = tl.load(base + rows[:, None] * row_stride + cols[None, :],
                   mask=row_mask[:, None] & (cols < col_count)[None, :], other=0)
    return tile.to(ACC)


@triton.jit
def _batch_base(ptr, batch, stride_b):
    """&tensor[batch], in int64: a large batch of long sequences passes 2^31 elements."""
    return ptr + tl.cast(batch, tl.int64) * stride_b


@triton.jit
def _square_ptrs(ptr, batch, rows, cols, Lq, Lk):
    """&tensor[batch, rows, cols] of a contiguous (B,Lq,Lk) tensor (weights, grad_weights, dS) as a (rows, cols)
    tile, offsets in int64: B*Lq*Lk passes 2^31 elements long before the inputs do."""
    return ptr + (tl.cast(batch, tl.int64) * Lq + rows)[:, None] * Lk + cols[None, :]


@triton.jit
def _load_square(ptr, batch, rows, row_mask, cols, Lq, Lk, ACC: tl.constexpr):
    """tensor[batch, rows, cols] of a contiguous (B,Lq,Lk) tensor in ACC, zeros outside the masks."""
    return tl.load(_square_ptrs(ptr, batch, rows, cols, Lq, Lk), mask=row_mask[:, None] & (cols < Lk)[None, :],
                   other=0).to(ACC)


@triton.jit
def _pre_activation(query_proj_base, key_proj_base, rows, row_mask, cols, col_mask, hidden, stride_ql, stride_kl,
                    H, ACC: tl.constexpr):
    """query_proj[rows, hidden] + key_proj[cols, hidden] as a (rows, cols, hidden) tile in ACC."""
    query_proj = _load_rows(query_proj_base, rows, row_mask, stride_ql, hidden, H, ACC)
    key_proj = _load_rows(key_proj_base, cols, col_mask, stride_kl, hidden, H, ACC)
    return query_proj[:, None, :] + key_proj[None, :, :]


@triton.jit
def _scores(query_proj_base, key_proj_base, v_ptr, mask_base, rows, row_mask, cols, col_mask, stride_ql, stride_kl,
            H, HAS_MASK: tl.constexpr, FAST_TANH: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    """(BLOCK_M, BLOCK_N) scores v . tanh(query_proj_i + key_proj_j) in ACC, summed BLOCK_H hidden units at a
    time; -inf at padding keys and past the last key."""
    scores = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for first_hidden in range(0, H, BLOCK_H):
        hidden = first_hidden + tl.arange(0, BLOCK_H)
        v = tl.load(v_ptr + hidden, mask=hidden < H, other=0).to(ACC)  # 0 past H: padded units add nothing
        t = _tanh_any(_pre_activation(query_proj_base, key_proj_base, rows, row_mask, cols, col_mask, hidden,
                                  stride_ql, stride_kl, H, ACC), FAST_TANH)
        scores += tl.sum(t * v[None, None, :], 2)
    visible = col_mask
    if HAS_MASK:
        visible &= tl.load(mask_base + cols, mask=col_mask, other=1) == 0
    return tl.where(visible[None, :], scores, float("-inf"))


# ==================================================================================================
# Forward. Grid: (query blocks, B).
# ==================================================================================================
@triton.jit(do_not_specialize=["Lq", "Lk"])
def _forward_kernel(
    query_proj_ptr, key_proj_ptr, values_ptr, v_ptr, mask_ptr,  # (B,Lq,H), (B,Lk,H), (B,Lk,Dv), (H,), (B,Lk)
    out_ptr, lse_ptr, weights_ptr,  # out (B,Lq,Dv), (B,Lq), (B,Lq,Lk) if WEIGHTS
    stride_qb, stride_ql, stride_kb, stride_kl, stride_vb, stride_vl,
    Lq, Lk, H, Dv,
    HAS_MASK: tl.constexpr, WEIGHTS: tl.constexpr, FAST_TANH: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """out, lse (and weights) of a block of BLOCK_M queries: one sweep over the keys, BLOCK_N at a time."""
    batch = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < Lq
    value_dims = tl.arange(0, BLOCK_DV)
    query_proj_base = _batch_base(query_proj_ptr, batch, stride_qb)
    key_proj_base = _batch_base(key_proj_ptr, batch, stride_kb)
    values_base = _batch_base(values_ptr, batch, stride_vb)
    mask_base = _batch_base(mask_ptr, batch, Lk) if HAS_MASK else mask_ptr
    out_rows = tl.cast(batch, tl.int64) * Lq + rows  # into out and lse

    m = tl.full((BLOCK_M,), float("-inf"), ACC)  # running max of the scores
    l = tl.zeros((BLOCK_M,), ACC)  # running sum of exp(score - m)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), ACC)
    for first_col in range(0, Lk, BLOCK_N):
        cols = first_col + tl.arange(0, BLOCK_N)
        col_mask = cols < Lk
        s = _scores(query_proj_base, key_proj_base, v_ptr, mask_base, rows, row_mask, cols, col_mask, stride_ql,
                    stride_kl, H, HAS_MASK, FAST_TANH, ACC, BLOCK_M, BLOCK_N, BLOCK_H)
        if WEIGHTS:  # raw scores for now, normalized below
            tl.store(_square_ptrs(weights_ptr, batch, rows, cols, Lq, Lk), s,
                     mask=row_mask[:, None] & col_mask[None, :])
        m_new = tl.maximum(m, tl.max(s, 1))
        # A row that has seen only -inf so far subtracts 0 instead of -inf: exp(-inf - 0) = 0, no NaN.
        m_ref = tl.where(m_new == float("-inf"), 0, m_new)
        p = tl.exp(s - m_ref[:, None])
        alpha = tl.exp(m - m_ref)
        l = l * alpha + tl.sum(p, 1)
        values = _load_rows(values_base, cols, col_mask, stride_vl, value_dims, Dv, DOT)
        acc = tl.dot(p.to(DOT), values, acc * alpha[:, None], input_precision=PRECISION, out_dtype=ACC)
        m = m_new

    # false for a row whose keys are all padding (or Lk == 0); true for a NaN sum (NaN scores), which passes on
    seen = l != 0
    lse = tl.where(seen, m + tl.log(tl.where(seen, l, 1)), float("-inf"))
    store(out_ptr + out_rows[:, None] * Dv + value_dims[None, :], acc / tl.where(seen, l, 1)[:, None],
          row_mask[:, None] & (value_dims < Dv)[None, :])
    tl.store(lse_ptr + out_rows, lse, mask=row_mask)
    if WEIGHTS:
        tl.debug_barrier()  # the raw scores above may have been stored by other threads of the program
        lse_ref = tl.where(seen, lse, float("inf"))  # exp(-inf - inf) = 0 on rows without keys
        for first_col in range(0, Lk, BLOCK_N):
            cols = first_col + tl.arange(0, BLOCK_N)
            ptrs = _square_ptrs(weights_ptr, batch, rows, cols, Lq, Lk)
            tile_mask = row_mask[:, None] & (cols < Lk)[None, :]
            raw = tl.load(ptrs, mask=tile_mask, other=0)
            # A padding key (score -inf) has weight 0 also in a NaN row, where exp(-inf - NaN) would be NaN.
            tl.store(ptrs, tl.where(raw == float("-inf"), 0, tl.exp(raw - lse_ref[:, None])), mask=tile_mask)


# ==================================================================================================
# Backward. dS: grid (query blocks, B); grad_query_proj: (query blocks, hidden chunks, B); grad_key_proj and
# the parts of grad_v: (key blocks, hidden chunks, B); grad_values: (key blocks, value chunks, B).
# ==================================================================================================
@triton.jit(do_not_specialize=["Lq", "Lk"])
def _grad_scores_kernel(
    grad_out_ptr, grad_weights_ptr, values_ptr, out_ptr, weights_ptr,  # (B,Lq,Dv), (B,Lq,Lk) or None, ...
    grad_scores_ptr,  # out (B,Lq,Lk) in ACC
    stride_gb, stride_gl, stride_vb, stride_vl, stride_ob, stride_ol,
    Lq, Lk, Dv,
    HAS_GRAD_WEIGHTS: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dS(i, j) = p(i, j) (dO_i . values_j + gW(i, j) - delta_i), delta_i = dO_i . O_i + sum_j p(i, j) gW(i, j).
    The value dim is swept BLOCK_DV at a time, so any Dv fits the registers and shared memory."""
    batch = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < Lq
    grad_out_base = _batch_base(grad_out_ptr, batch, stride_gb)
    out_base = _batch_base(out_ptr, batch, stride_ob)
    values_base = _batch_base(values_ptr, batch, stride_vb)

    delta = tl.zeros((BLOCK_M,), ACC)
    for first_dim in range(0, Dv, BLOCK_DV):
        value_dims = first_dim + tl.arange(0, BLOCK_DV)
        grad_out = _load_rows(grad_out_base, rows, row_mask, stride_gl, value_dims, Dv, ACC)
        delta += tl.sum(grad_out * _load_rows(out_base, rows, row_mask, stride_ol, value_dims, Dv, ACC), 1)
    if HAS_GRAD_WEIGHTS:
        for first_col in range(0, Lk, BLOCK_N):
            cols = first_col + tl.arange(0, BLOCK_N)
            p = _load_square(weights_ptr, batch, rows, row_mask, cols, Lq, Lk, ACC)
            delta += tl.sum(p * _load_square(grad_weights_ptr, batch, rows, row_mask, cols, Lq, Lk, ACC), 1)

    for first_col in range(0, Lk, BLOCK_N):
        cols = first_col + tl.arange(0, BLOCK_N)
        col_mask = cols < Lk
        dp = tl.zeros((BLOCK_M, BLOCK_N), ACC)
        for first_dim in range(0, Dv, BLOCK_DV):
            value_dims = first_dim + tl.arange(0, BLOCK_DV)
            grad_out = _load_rows(grad_out_base, rows, row_mask, stride_gl, value_dims, Dv, DOT)
            values = _load_rows(values_base, cols, col_mask, stride_vl, value_dims, Dv, DOT)
            dp = tl.dot(grad_out, tl.trans(values), dp, input_precision=PRECISION, out_dtype=ACC)
        if HAS_GRAD_WEIGHTS:
            dp += _load_square(grad_weights_ptr, batch, rows, row_mask, cols, Lq, Lk, ACC)
        p = _load_square(weights_ptr, batch, rows, row_mask, cols, Lq, Lk, ACC)
        # p = 0 (a padding key) gives dS = 0 also in a NaN row (not 0 * NaN), as the CPU kernel's score_grads.
        ds = tl.where(p == 0, 0, p * (dp - delta[:, None]))
        tl.store(_square_ptrs(grad_scores_ptr, batch, rows, cols, Lq, Lk), ds,
                 mask=row_mask[:, None] & col_mask[None, :])


@triton.jit(do_not_specialize=["Lq", "Lk"])
def _query_proj_gradient_kernel(
    query_proj_ptr, key_proj_ptr, v_ptr, grad_scores_ptr,  # (B,Lq,H), (B,Lk,H), (H,), (B,Lq,Lk) in ACC
    grad_query_proj_ptr,  # out (B,Lq,H)
    stride_qb, stride_ql, stride_kb, stride_kl,
    Lq, Lk, H,
    FAST_TANH: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """grad_query_proj(i, h) = v_h sum_j dS(i, j) (1 - t(i, j, h)^2) for a block of rows and of hidden units."""
    batch = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < Lq
    hidden = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    query_proj_base = _batch_base(query_proj_ptr, batch, stride_qb)
    key_proj_base = _batch_base(key_proj_ptr, batch, stride_kb)

    grad = tl.zeros((BLOCK_M, BLOCK_H), ACC)
    for first_col in range(0, Lk, BLOCK_N):
        cols = first_col + tl.arange(0, BLOCK_N)
        col_mask = cols < Lk
        grad_scores = _load_square(grad_scores_ptr, batch, rows, row_mask, cols, Lq, Lk, ACC)  # 0 outside
        _, slope = _tanh_and_slope(_pre_activation(query_proj_base, key_proj_base, rows, row_mask, cols, col_mask,
                                                   hidden, stride_ql, stride_kl, H, ACC), FAST_TANH)
        grad += tl.sum(grad_scores[:, :, None] * slope, 1)

    v = tl.load(v_ptr + hidden, mask=hidden < H, other=0).to(ACC)
    out_rows = tl.cast(batch, tl.int64) * Lq + rows
    store(grad_query_proj_ptr + out_rows[:, None] * H + hidden[None, :], grad * v[None, :],
          row_mask[:, None] & (hidden < H)[None, :])


@triton.jit(do_not_specialize=["Lq", "Lk"])
def _key_proj_gradient_kernel(
    query_proj_ptr, key_proj_ptr, v_ptr, grad_scores_ptr,  # (B,Lq,H), (B,Lk,H), (H,), (B,Lq,Lk) in ACC
    grad_key_proj_ptr, grad_v_parts_ptr,  # out (B,Lk,H), (B * key blocks, H) in ACC
    stride_qb, stride_ql, stride_kb, stride_kl,
    Lq, Lk, H,
    FAST_TANH: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """grad_key_proj(j, h) = v_h sum_i dS(i, j) (1 - t(i, j, h)^2) for a block of keys and of hidden units, and
    the block's part of grad_v(h) = sum_ij dS(i, j) t(i, j, h)."""
    batch = tl.program_id(2)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < Lk
    hidden = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    query_proj_base = _batch_base(query_proj_ptr, batch, stride_qb)
    key_proj_base = _batch_base(key_proj_ptr, batch, stride_kb)

    grad = tl.zeros((BLOCK_N, BLOCK_H), ACC)
    grad_v = tl.zeros((BLOCK_H,), ACC)
    for first_row in range(0, Lq, BLOCK_M):
        rows = first_row + tl.arange(0, BLOCK_M)
        row_mask = rows < Lq
        grad_scores = _load_square(grad_scores_ptr, batch, rows, row_mask, cols, Lq, Lk, ACC)[:, :, None]
        t, slope = _tanh_and_slope(_pre_activation(query_proj_base, key_proj_base, rows, row_mask, cols, col_mask,
                                                   hidden, stride_ql, stride_kl, H, ACC), FAST_TANH)
        grad += tl.sum(grad_scores * slope, 0)
        grad_v += tl.sum(tl.sum(grad_scores * t, 0), 0)

    v = tl.load(v_ptr + hidden, mask=hidden < H, other=0).to(ACC)
    out_cols = tl.cast(batch, tl.int64) * Lk + cols
    store(grad_key_proj_ptr + out_cols[:, None] * H + hidden[None, :], grad * v[None, :],
          col_mask[:, None] & (hidden < H)[None, :])
    part = tl.cast(batch, tl.int64) * tl.num_programs(0) + tl.program_id(0)
    tl.store(grad_v_parts_ptr + part * H + hidden, grad_v, mask=hidden < H)


@triton.jit(do_not_specialize=["Lq", "Lk"])
def _values_gradient_kernel(
    grad_out_ptr, weights_ptr,  # (B,Lq,Dv), (B,Lq,Lk) in ACC
    grad_values_ptr,  # out (B,Lk,Dv)
    stride_gb, stride_gl,
    Lq, Lk, Dv,
    ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """grad_values = P^T dO for a block of keys and of value dims. The product runs in ACC: the probabilities
    are not rounded to bfloat16 (the composed version's product is float32 too)."""
    batch = tl.program_id(2)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < Lk
    value_dims = tl.program_id(1) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    grad_out_base = _batch_base(grad_out_ptr, batch, stride_gb)

    grad = tl.zeros((BLOCK_N, BLOCK_DV), ACC)
    for first_row in range(0, Lq, BLOCK_M):
        rows = first_row + tl.arange(0, BLOCK_M)
        row_mask = rows < Lq
        p = _load_square(weights_ptr, batch, rows, row_mask, cols, Lq, Lk, ACC)
        grad_out = _load_rows(grad_out_base, rows, row_mask, stride_gl, value_dims, Dv, ACC)
        grad = tl.dot(tl.trans(p), grad_out, grad, input_precision=PRECISION, out_dtype=ACC)

    out_cols = tl.cast(batch, tl.int64) * Lk + cols
    store(grad_values_ptr + out_cols[:, None] * Dv + value_dims[None, :], grad,
          col_mask[:, None] & (value_dims < Dv)[None, :])


# ==================================================================================================
# Launchers: argument checks, block sizes, grids.
# ==================================================================================================
# (BLOCK_M, BLOCK_N, BLOCK_H, num_warps) on a GPU and under the interpreter. A block is also never larger
# than its dimension padded to a power of two (>= MIN_DOT_SIZE for queries and keys).
# GPU: BLOCK_M * BLOCK_N * BLOCK_H bounds the (queries, keys, hidden) broadcast each thread holds in registers.
# Chosen with ptxas -v for sm_80 (no GPU here to time them): with 32 x 32 x 4 on 4 warps no kernel spills at
# H=256 and value dims 64, 256, 512 in any dtype (the float32 forward takes 242 registers, bfloat16 166, its
# float32 P @ values product running on FMA units); 64 x 64 x 2 on 8 warps spills 808 bytes in the float32
# forward. Interpreter: it runs each program in Python, so the fewest, largest tiles are fastest: forward +
# backward of B=2, Lq=17, Lk=33, H=40 take 0.15 s with its tiles, 1.7 s with the GPU ones.
_TILES = {"gpu": (32, 32, 4, 4), "interpreter": (64, 64, 64, 4)}
# FLOAT64_FORWARD: the float64 forward (twice the warps already) spilled on sm_90 with 32 x 32 x 4 at d64 (64 bytes
# at 255 registers) and in the doubled config at every value dim (64 x 32 / 16 warps at d64: 1.0-1.3 KB; 32 x 16 / 16
# warps at d128 / d256: 16-344; ptxas gives 16 warps at most 128 registers): it takes no doubled config, and at
# value dims up to 64 (32 x 32 tiles) half the hidden units per broadcast (32 x 32 x 2: 202-206 registers, no spill
# on sm_80 / sm_90; past 64 the tiles shrink instead, and 16 x 16 x 2 at d256 spilled on sm_90 where x 4 did not).
# ptxas's register cap (triton's maxnreg; an interpreted launch drops it, _launch.COMPILE_OPTIONS), every kernel:
# uncapped, ptxas settled on 128 registers in the float32 forward with tf32 at d64 (32 bytes spilled on sm_90) and
# on 64 in the bfloat16 key_proj_gradient kernel (20 bytes on sm_90): an occupancy choice, not the tiles' need.
MAXNREG = 255
# The backward's dO . values products sweep the value dim this many at a time (ptxas, sm_80, the float32 dS
# kernel: chunks of 64 spill 112 bytes at 255 registers, chunks of 32 none at 192).
_VALUE_CHUNK = 32


def _padded(size: int) -> int:
    return max(MIN_DOT_SIZE, triton.next_power_of_2(size))


def blocks(kernel: str, dtype: torch.dtype, device: torch.device, len_q: int, len_k: int, hidden: int,
           value_dim: int) -> dict:
    """Tile sizes and warps of the "forward" or the "backward" kernels for tensors of `dtype` on `device` and
    these sizes (the backward's on a GPU; the forward's first config there, see forward_configs).

    The backward sweeps the value dim in chunks of at most _VALUE_CHUNK. The forward holds whole output rows:
    past a value dim of 64 its query and key blocks shrink in proportion (down to MIN_DOT_SIZE), so that the
    output accumulator and the values tile stay the size they are at 64. Float64 (registers twice as wide),
    and the forward past a value dim of 256, take twice the warps."""
    block_m, block_n, block_h, num_warps = _TILES["gpu" if device.type == "cuda" else "interpreter"]
    block_dv = _padded(value_dim)
    if device.type == "cuda" and kernel == "forward" and dtype == torch.float64 and block_dv <= 64:
        block_h //= 2  # FLOAT64_FORWARD
    shrink = max(block_dv // 64, 1) if kernel == "forward" else 1
    wide = dtype == torch.float64 or shrink > 4
    return {"BLOCK_M": min(max(MIN_DOT_SIZE, block_m // shrink), _padded(len_q)),
            "BLOCK_N": min(max(MIN_DOT_SIZE, block_n // shrink), _padded(len_k)),
            "BLOCK_H": min(block_h, triton.next_power_of_2(max(hidden, 1))),
            "BLOCK_DV": block_dv if kernel == "forward" else min(block_dv, _VALUE_CHUNK),
            "num_warps": 2 * num_warps if wide else num_warps, "num_stages": 2 if device.type == "cuda" else 1,
            "maxnreg": MAXNREG}


def forward_configs(dtype: torch.dtype, device: torch.device, len_q: int, len_k: int, hidden: int,
                    value_dim: int) -> list[dict]:
    """The forward's configs ({"BLOCK_M", "BLOCK_N", "BLOCK_H", "num_warps", "num_stages"}): on CUDA an
    autotune list, `blocks`' tiles and the same broadcast per thread over twice the query rows and warps
    (more reuse of each key tile, fewer programs); under the interpreter `blocks`' tiles alone. (The
    backward is not tuned: grad_v's partial sums are per key block, so its BLOCK_N sizes a buffer.)"""
    base = blocks("forward", dtype, device, len_q, len_k, hidden, value_dim)
    del base["BLOCK_DV"]
    if device.type != "cuda" or base["BLOCK_M"] >= _padded(len_q) or dtype == torch.float64:  # FLOAT64_FORWARD
        return [base]
    return [base, dict(base, BLOCK_M=2 * base["BLOCK_M"], num_warps=2 * base["num_warps"])]


def _fast_tanh(dtype: torch.dtype, device: torch.device) -> bool:
    """The hardware tanh (tanh.approx.f32): 16-bit dtypes on a GPU only."""
    return device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)


def _rows(tensor: Tensor) -> Tensor:
    """`tensor` with stride(-1) == 1, as the kernels address it (a copy only if it is not)."""
    return tensor if tensor.stride(-1) == 1 or tensor.shape[-1] <= 1 else tensor.contiguous()


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(name: str, tensor: Tensor, shape: tuple, dtype: torch.dtype, like: Tensor) -> None:
    if tensor.dtype != dtype or tensor.device != like.device:
        raise DTypeError(f"{name}: expected {dtype} on {like.device}, got {tensor.dtype} on {tensor.device}")
    if tuple(tensor.shape) != tuple(shape):
        raise ShapeError(f"{name}: expected shape {tuple(shape)}, got {tuple(tensor.shape)}")


def _check_inputs(query_proj: Tensor, key_proj: Tensor, values: Tensor, v: Tensor) -> None:
    """query_proj (B,Lq,H), key_proj (B,Lk,H), values (B,Lk,Dv), v (H,), one supported dtype and device."""
    if query_proj.dtype not in SUPPORTED_DTYPES:
        raise DTypeError(f"query_proj: the Triton additive attention kernels support float32, float64, bfloat16; "
                         f"got {query_proj.dtype}")
    if query_proj.dim() != 3 or key_proj.dim() != 3 or values.dim() != 3:
        raise ShapeError(f"query_proj, key_proj, values: expected 3-D tensors, got shapes {tuple(query_proj.shape)}, "
                         f"{tuple(key_proj.shape)}, {tuple(values.shape)}")
    batch, _, hidden = query_proj.shape
    len_k = key_proj.shape[1]
    _check("key_proj", key_proj, (batch, len_k, hidden), query_proj.dtype, query_proj)
    _check("values", values, (batch, len_k, values.shape[2]), query_proj.dtype, query_proj)
    _check("v", v, (hidden,), query_proj.dtype, query_proj)


def additive_attention_forward(query_proj: Tensor, key_proj: Tensor, values: Tensor, v: Tensor,
                               key_padding_mask: Tensor | None, return_weights: bool) -> tuple[Tensor, Tensor, Tensor]:
    """query_proj (B,Lq,H), key_proj (B,Lk,H), values (B,Lk,Dv), v (H,), key_padding_mask (B,Lk) bool or None
    -> out (B,Lq,Dv), lse (B,Lq), weights (B,Lq,Lk) or empty (seqkern/ops/_schemas.py)."""
    _check_inputs(query_proj, key_proj, values, v)
    batch, len_q, hidden = query_proj.shape
    len_k, value_dim = values.shape[1:]
    if key_padding_mask is not None:
        _check("key_padding_mask", key_padding_mask, (batch, len_k), torch.bool, query_proj)
        key_padding_mask = key_padding_mask.contiguous()
    query_proj, key_proj, values, v = _rows(query_proj), _rows(key_proj), _rows(values), v.contiguous()
    stats = _stats_dtype(query_proj.dtype)
    out = query_proj.new_empty(batch, len_q, value_dim)
    lse = query_proj.new_empty(batch, len_q, dtype=stats)
    weights = query_proj.new_empty(batch, len_q, len_k, dtype=stats) if return_weights else query_proj.new_empty(0)
    device = query_proj.device
    choices = forward_configs(query_proj.dtype, device, len_q, len_k, hidden, value_dim)
    if len_q and batch:
        grid = lambda meta: (triton.cdiv(len_q, meta["BLOCK_M"]), batch)  # noqa: E731
        launch_tuned(_forward_kernel, choices, choices[0], grid, device, ("H", "Dv"))(
            query_proj, key_proj, values, v, key_padding_mask, out, lse, weights if return_weights else None,
            query_proj.stride(0), query_proj.stride(1), key_proj.stride(0), key_proj.stride(1), values.stride(0),
            values.stride(1), len_q, len_k, hidden, value_dim,
            HAS_MASK=key_padding_mask is not None, WEIGHTS=bool(return_weights),
            FAST_TANH=_fast_tanh(out.dtype, device), ACC=accumulator_dtype(out.dtype),
            DOT=dot_operand_dtype(out.dtype, device), PRECISION=dot_precision(out.dtype, device),
            BLOCK_DV=_padded(value_dim),
        )
    return out, lse, weights


def additive_attention_backward(grad_out: Tensor, grad_weights: Tensor | None, query_proj: Tensor, key_proj: Tensor,
                                values: Tensor, v: Tensor, out: Tensor,
                                weights: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of additive_attention_forward from grad_out (B,Lq,Dv), grad_weights (B,Lq,Lk) or None and the
    forward's out and weights -> grad_query_proj (B,Lq,H), grad_key_proj (B,Lk,H), grad_values (B,Lk,Dv),
    grad_v (H,) (seqkern/ops/_schemas.py)."""
    _check_inputs(query_proj, key_proj, values, v)
    batch, len_q, hidden = query_proj.shape
    len_k, value_dim = values.shape[1:]
    stats = _stats_dtype(query_proj.dtype)
    for name, tensor in (("grad_out", grad_out), ("out", out)):
        _check(name, tensor, (batch, len_q, value_dim), query_proj.dtype, query_proj)
    _check("weights", weights, (batch, len_q, len_k), stats, query_proj)
    if grad_weights is not None:
        _check("grad_weights", grad_weights, (batch, len_q, len_k), stats, query_proj)
        grad_weights = grad_weights.contiguous()
    query_proj, key_proj, values, v = _rows(query_proj), _rows(key_proj), _rows(values), v.contiguous()
    grad_out, out, weights = _rows(grad_out), _rows(out), weights.contiguous()
    device = query_proj.device
    acc = accumulator_dtype(query_proj.dtype)
    tiles = blocks("backward", query_proj.dtype, device, len_q, len_k, hidden, value_dim)
    fast_tanh, precision = _fast_tanh(query_proj.dtype, device), dot_precision(query_proj.dtype, device)
    query_blocks, key_blocks = triton.cdiv(len_q, tiles["BLOCK_M"]), triton.cdiv(len_k, tiles["BLOCK_N"])
    hidden_blocks, value_blocks = triton.cdiv(hidden, tiles["BLOCK_H"]), triton.cdiv(value_dim, tiles["BLOCK_DV"])
    options = {name: tiles[name] for name in ("num_warps", "num_stages", "maxnreg")}
    proj_tiles = {**{name: tiles[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_H")}, **options}
    value_tiles = {**{name: tiles[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_DV")}, **options}

    grad_scores = query_proj.new_empty(batch, len_q, len_k, dtype=stats)
    grad_query_proj = query_proj.new_empty(batch, len_q, hidden)
    grad_key_proj = key_proj.new_empty(batch, len_k, hidden)
    grad_values = values.new_empty(batch, len_k, value_dim)
    grad_v_parts = query_proj.new_zeros(batch * key_blocks, hidden, dtype=stats)
    if batch and len_q:
        launch(_grad_scores_kernel, (query_blocks, batch), device)(
            grad_out, grad_weights, values, out, weights, grad_scores, grad_out.stride(0), grad_out.stride(1),
            values.stride(0), values.stride(1), out.stride(0), out.stride(1), len_q, len_k, value_dim,
            HAS_GRAD_WEIGHTS=grad_weights is not None, ACC=acc, DOT=dot_operand_dtype(query_proj.dtype, device),
            PRECISION=precision, **value_tiles,
        )
    projections = (query_proj, key_proj, v, grad_scores)
    strides = (query_proj.stride(0), query_proj.stride(1), key_proj.stride(0), key_proj.stride(1))
    if batch and len_q and hidden:
        launch(_query_proj_gradient_kernel, (query_blocks, hidden_blocks, batch), device)(
            *projections, grad_query_proj, *strides, len_q, len_k, hidden, FAST_TANH=fast_tanh, ACC=acc,
            **proj_tiles)
    if batch and len_k:
        if hidden:
            launch(_key_proj_gradient_kernel, (key_blocks, hidden_blocks, batch), device)(
                *projections, grad_key_proj, grad_v_parts, *strides, len_q, len_k, hidden, FAST_TANH=fast_tanh,
                ACC=acc, **proj_tiles)
        if value_dim:
            launch(_values_gradient_kernel, (key_blocks, value_blocks, batch), device)(
                grad_out, weights, grad_values, grad_out.stride(0), grad_out.stride(1), len_q, len_k, value_dim,
                ACC=acc, PRECISION=precision, **value_tiles)
    return grad_query_proj, grad_key_proj, grad_values, grad_v_parts.sum(0).to(query_proj.dtype)
