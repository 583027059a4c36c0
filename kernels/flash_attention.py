"""Triton kernels for flash_attention_forward / flash_attention_backward (contracts in seqkern/ops/_schemas.py, oracle in
seqkern/reference/flash_attention.py).

FlashAttention-2: the (Lq, Lk) scores never reach memory.
  * forward, a program per (query block, sequence * query head): the key blocks the block can see are swept
    once with an online softmax (running max m, running sum l and the output accumulator, fp32 or fp64);
    out = acc / l, lse = m + log l (float64) is saved for the backward.
  * backward, two launches and no atomics, so the result is deterministic:
      1. a program per (query block, sequence * query head) sweeps its visible key blocks twice: first for
         delta_i = sum_j P_ij dP_ij / sum_j P_ij (dropout included; stored), then to accumulate dQ and write
         dS = dL/dscore when asked (grad_scores);
      2. a program per (key block, sequence * kv head) accumulates dK and dV over the query blocks that see
         its keys, for every query head of its kv group in turn (grouped-query attention needs no atomics).
    The probabilities are recomputed from the saved float64 lse: P = exp(score - lse), dS = P * (dP - delta).

Shared conventions of the kernels:
  * rows (queries) i and columns (keys) j are indices inside a sequence; with cu_seqlens (VARLEN) sequence n
    owns rows cu_seqlens[n].. of batch 0, otherwise sequence n is batch n. Programs past a sequence's end exit.
  * visibility: window_left / window_right arrive as non-negative ints, "no window" as a width no sequence
    reaches (every key within it), so the kernels need no flag for it; the sweeps visit only the key (query)
    blocks that intersect the visible band, split into three ranges (_key_ranges / _query_ranges): the blocks
    every row of the tile sees entirely run with no per-element test; the others (the diagonal, window edges,
    a sequence's last partial block) apply the band and the lengths per element. The additive mask is added
    everywhere.
  * the softmax scale (and the dropout scale) are runtime arguments (float32 halves, see _launch.float_halves);
    the forward's online softmax runs in base 2 (exp2, see _forward_sweep).
  * tile sizes come from `configs`: an autotune list per operand unit and head dim on CUDA, one config under
    the interpreter; tests/test_gpu_compile.py compiles every listed config for sm_80 / sm_90.
  * a score that is -inf everywhere on a row (no visible key) gives out 0 and lse -inf; the backward reads
    such an lse as +inf so that P = exp(score - lse) is 0, not NaN.
  * dropout redraws the reference's counter-based hash (lowbias32 on uint32) per (head, i, j) in every kernel.
  * head dims D, Dv are padded to powers of two >= 16 (tl.dot's minimum) with masked loads.

Supported dtypes: float32, float64, bfloat16, float16 (math in float32, float64 for float64; lse in float64). The launchers take
CPU tensors too: kernels/_launch.py runs the kernels under the Triton interpreter then.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

from seqkern._checks import DTypeError, ShapeError
from seqkern.reference import flash_attention as reference

from ._hash import _head_key, _kept
from ._launch import dot_operand_dtype, dot_precision, float_halves, launch_tuned, runtime_float
from ._recurrent import accumulator_dtype, store

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# tl.dot needs every dimension >= 16: blocks and padded head dims are at least this.
MIN_DOT_SIZE = 16
# The forward's softmax runs in base 2 (exp2 of the scores times log2(e), see _forward_sweep).
LOG2E = tl.constexpr(1.4426950408889634)


# ==================================================================================================
# Device helpers.
# ==================================================================================================
@triton.jit
def _sequence(cu_seqlens_q_ptr, cu_seqlens_k_ptr, n, rows_q, rows_k, bottom_right, VARLEN: tl.constexpr):
    """Sequence n -> its batch index, first row of q and of k/v, query and key counts, and the diagonal's
    shift (Lk_n - Lq_n with bottom_right, else 0)."""
    if VARLEN:
        start_q = tl.load(cu_seqlens_q_ptr + n)
        start_k = tl.load(cu_seqlens_k_ptr + n)
        len_q = tl.load(cu_seqlens_q_ptr + n + 1) - start_q
        len_k = tl.load(cu_seqlens_k_ptr + n + 1) - start_k
        batch = 0
    else:
        start_q = 0
        start_k = 0
        len_q = rows_q
        len_k = rows_k
        batch = n
    return batch, start_q, start_k, len_q, len_k, bottom_right * (len_k - len_q)


@triton.jit
def _key_range(first_row, last_row, shift, window_left, window_right, len_k, BLOCK_N: tl.constexpr):
    """[lo, hi): the key blocks (lo a multiple of BLOCK_N) holding a key visible to a row in
    [first_row, last_row]; empty if none. Key j is seen by row i iff i + shift - wl <= j <= i + shift + wr."""
    lo = tl.maximum(first_row + shift - window_left, 0)
    hi = tl.minimum(last_row + shift + window_right + 1, len_k)
    return (lo // BLOCK_N) * BLOCK_N, hi


@triton.jit
def _query_range(first_col, last_col, shift, window_left, window_right, len_q, BLOCK_M: tl.constexpr):
    """[lo, hi): the query blocks (lo a multiple of BLOCK_M) holding a row that sees a key in
    [first_col, last_col]: row i sees j iff j - shift - wr <= i <= j - shift + wl."""
    lo = tl.maximum(first_col - shift - window_right, 0)
    hi = tl.minimum(last_col - shift + window_left + 1, len_q)
    return (lo // BLOCK_M) * BLOCK_M, hi


@triton.jit
def _at(ptr, batch, head, row, stride_b, stride_h, stride_l):
    """&tensor[batch, head, row], in int64: the offsets of a large tensor (a long packed varlen batch above all)
    pass 2^31 elements."""
    return (ptr + tl.cast(batch, tl.int64) * stride_b + tl.cast(head, tl.int64) * stride_h
            + tl.cast(row, tl.int64) * stride_l)


@triton.jit
def _mask_base(mask_ptr, batch, head, stride_mb, stride_mh, HAS_MASK: tl.constexpr):
    """attn_mask[batch, head]; 0 without a mask (never read then: a None could not be returned in a tuple, which
    the compiler refuses -- the interpreter does not)."""
    if HAS_MASK:
        base = _at(mask_ptr, batch, head, 0, stride_mb, stride_mh, 0)
    else:
        base = 0
    return base


@triton.jit
def _visible(ii, jj, len_q, len_k, shift, window_left, window_right):
    """Query ii sees key jj: inside the band and both inside the sequence."""
    return (ii < len_q) & (jj < len_k) & (jj >= ii + shift - window_left) & (jj <= ii + shift + window_right)


@triton.jit
def _scores(qk, mask_base, stride_mi, stride_mj, ii, jj, len_q, len_k, shift, window_left, window_right, qk_scale,
            mask_scale, HAS_MASK: tl.constexpr, MASKED: tl.constexpr):
    """qk_scale * qk + mask_scale * attn_mask; with MASKED, -inf where (ii, jj) is not visible (out of the band
    or past a sequence's end). Without MASKED the caller knows the whole tile is visible (_key_ranges): no
    per-element test, and the mask is read under the row bound only. ii, jj broadcast to qk's shape, in either
    orientation."""
    scores = qk * qk_scale
    if MASKED:
        visible = _visible(ii, jj, len_q, len_k, shift, window_left, window_right)
        if HAS_MASK:
            mask = tl.load(mask_base + ii * stride_mi + jj * stride_mj, mask=visible, other=0)
            scores += mask.to(qk.dtype) * mask_scale
        scores = tl.where(visible, scores, float("-inf"))
    elif HAS_MASK:
        scores += tl.load(mask_base + ii * stride_mi + jj * stride_mj, mask=(ii < len_q) & (jj < len_k),
                          other=0).to(qk.dtype) * mask_scale
    return scores


@triton.jit
def _tile(ptr, rows, row_mask, row_stride, cols, col_count, COLS_FIRST: tl.constexpr):
    """Loads rows x cols of a row-major matrix (rows `row_stride` apart), zeros outside the masks; as
    (len(rows), len(cols)), or transposed with COLS_FIRST (the K^T / V^T operands of the score products)."""
    if COLS_FIRST:
        tile = tl.load(ptr + rows[None, :] * row_stride + cols[:, None],
                       mask=row_mask[None, :] & (cols < col_count)[:, None], other=0)
    else:
        tile = tl.load(ptr + rows[:, None] * row_stride + cols[None, :],
                       mask=row_mask[:, None] & (cols < col_count)[None, :], other=0)
    return tile


@triton.jit
def _scaled_q(tile, q_scale, PRESCALE: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr):
    """A q tile as a tl.dot operand, times q_scale with PRESCALE (the launcher's choice: see _arguments)."""
    if PRESCALE:
        tile = tile.to(ACC) * q_scale
    return tile.to(DOT)


@triton.jit
def _scales(scale_hi, scale_lo, PRESCALE: tl.constexpr, ACC: tl.constexpr):
    """(scale, q_scale, qk_scale): the softmax scale, and its two placements -- on q before the product
    (PRESCALE) or on the product -- as the launcher chose (see _arguments); the other is 1."""
    scale = runtime_float(scale_hi, scale_lo, ACC)
    if PRESCALE:
        q_scale = scale
        qk_scale = tl.full((), 1, ACC)
    else:
        q_scale = tl.full((), 1, ACC)
        qk_scale = scale
    return scale, q_scale, qk_scale


@triton.jit
def _head_dims(BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """The head-dim columns a program outputs: all BLOCK of them, or with CHUNK (the chunked backward) the chunk of
    CHUNK columns its grid index on axis 2 names."""
    if CHUNK:
        dims = tl.program_id(2) * CHUNK + tl.arange(0, CHUNK)
    else:
        dims = tl.arange(0, BLOCK)
    return dims


@triton.jit
def _first_chunk(CHUNK: tl.constexpr):
    """Whether this program stores what every chunk's program computes alike (the dQ kernel's delta and dS): the
    first chunk's with CHUNK, a constant True without (no branch then)."""
    if CHUNK:
        first = tl.program_id(2) == 0
    else:
        first = True
    return first


@triton.jit
def _query_block(q_ptr, k_ptr, v_ptr, mask_ptr, batch, head, group, start_q, start_k, first_row, len_q, D,
                 stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
                 stride_mb, stride_mh, q_scale, PRESCALE: tl.constexpr, HAS_MASK: tl.constexpr, ACC: tl.constexpr,
                 DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                 CHUNK: tl.constexpr):
    """What a program over the query block starting at first_row of (sequence, head) loads first, in the
    forward and in the dQ kernel: its rows and their mask, the head-dim ranges it outputs (_head_dims), the bases
    of its q, of its kv head's K and V and of its mask, and its q tile (BLOCK_M, BLOCK_D) times q_scale
    (PRESCALE) as a tl.dot operand -- 0 with CHUNK, whose products load q a chunk at a time (_chunked_product)."""
    rows = first_row + tl.arange(0, BLOCK_M)
    row_mask = rows < len_q
    dims = _head_dims(BLOCK_D, CHUNK)
    value_dims = _head_dims(BLOCK_DV, CHUNK)
    q_base = _at(q_ptr, batch, head, start_q, stride_qb, stride_qh, stride_ql)
    k_base = _at(k_ptr, batch, head // group, start_k, stride_kb, stride_kh, stride_kl)
    v_base = _at(v_ptr, batch, head // group, start_k, stride_vb, stride_vh, stride_vl)
    mask_base = _mask_base(mask_ptr, batch, head, stride_mb, stride_mh, HAS_MASK)
    if CHUNK:
        q = 0
    else:
        q = _scaled_q(_tile(q_base, rows, row_mask, stride_ql, dims, D, False), q_scale, PRESCALE, ACC, DOT)
    return rows, row_mask, dims, value_dims, q_base, k_base, v_base, mask_base, q


@triton.jit
def _chunked_product(a_base, a_rows, a_mask, a_stride, a_scale, b_base, b_rows, b_mask, b_stride, b_scale, count,
                     PRESCALE: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                     CHUNK: tl.constexpr):
    """A B^T, (len(a_rows), len(b_rows)) in ACC, for row-major A (a_rows x count) and B (b_rows x count) `a_stride`
    / `b_stride` apart, over the `count` columns CHUNK at a time: the chunked backward's score products, which hold
    no operand across the whole head dim. With PRESCALE the operands are times a_scale / b_scale (q's scale, or 1).
    The sum enters each tl.dot as its accumulator: a GPU's FMA or MMA chain then runs the columns in the order of
    the unchunked product."""
    product = tl.zeros((a_rows.shape[0], b_rows.shape[0]), ACC)
    for first in range(0, count, CHUNK):
        cols = first + tl.arange(0, CHUNK)
        a = _scaled_q(_tile(a_base, a_rows, a_mask, a_stride, cols, count, False), a_scale, PRESCALE, ACC, DOT)
        b_t = _scaled_q(_tile(b_base, b_rows, b_mask, b_stride, cols, count, True), b_scale, PRESCALE, ACC, DOT)
        product = tl.dot(a, b_t, product, input_precision=PRECISION, out_dtype=ACC)
    return product


@triton.jit
def _saved_lse(lse_ptr, rows, row_mask, ACC: tl.constexpr):
    """The forward's float64 lse of `rows` as lse_hi + lse_lo in ACC: P = exp((score - lse_hi) - lse_lo) keeps
    the float64 precision, since score - lse_hi is exact near the row's maximum (an ACC lse alone puts up to
    half its ulp, 8e-6 at |lse| = 200, into the largest P of a saturated row). lse_hi is +inf where the lse is
    -inf (no visible key) or past the end, so that P is 0 there rather than NaN."""
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=float("inf"))
    return _split(tl.where(lse == float("-inf"), float("inf"), lse), ACC)


@triton.jit
def _split(x, ACC: tl.constexpr):
    """float64 x -> (hi, lo) in ACC with hi + lo = x to ~2x ACC's precision (lo = 0 where x is not finite)."""
    hi = x.to(ACC)
    finite = (hi == hi) & (tl.abs(hi) != float("inf"))
    lo = tl.where(finite, x - tl.where(finite, hi, 0).to(tl.float64), 0.0).to(ACC)
    return hi, lo


# ==================================================================================================
# Forward. Grid: (query blocks of the longest sequence, sequences * Hq).
# ==================================================================================================
@triton.jit
def _key_ranges(first_row, last_row, shift, window_left, window_right, len_k, BLOCK_N: tl.constexpr):
    """_key_range's [lo, hi) cut at two multiples of BLOCK_N, lo <= mid_lo <= mid_hi: the key blocks in
    [mid_lo, mid_hi) are visible to every row in [first_row, last_row] (inside the band of the last row on the
    left, of the first row on the right, and inside the sequence), so they need no per-element mask; those in
    [lo, mid_lo) and [mid_hi, hi) (the diagonal, the window edges, the last partial block) do. Without a window
    the middle is everything but the last partial block; causal, everything left of the diagonal's blocks."""
    lo, hi = _key_range(first_row, last_row, shift, window_left, window_right, len_k, BLOCK_N)
    end = tl.cdiv(hi, BLOCK_N) * BLOCK_N
    mid_lo = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(last_row + shift - window_left, 0), BLOCK_N) * BLOCK_N, lo),
                        tl.maximum(end, lo))
    mid_hi = tl.maximum(mid_lo, (tl.minimum(first_row + shift + window_right + 1, len_k) // BLOCK_N) * BLOCK_N)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _query_ranges(first_col, last_col, shift, window_left, window_right, len_q, len_k, BLOCK_M: tl.constexpr):
    """_query_range's [lo, hi) cut like _key_ranges': the query blocks in [mid_lo, mid_hi) see every key in
    [first_col, last_col] (inside the band and both inside the sequence: a key block past the end leaves the
    middle empty), those in [lo, mid_lo) and [mid_hi, hi) need the per-element mask."""
    lo, hi = _query_range(first_col, last_col, shift, window_left, window_right, len_q, BLOCK_M)
    end = tl.cdiv(hi, BLOCK_M) * BLOCK_M
    mid_lo = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(last_col - shift - window_right, 0), BLOCK_M) * BLOCK_M, lo),
                        tl.maximum(end, lo))
    mid_hi = tl.maximum(mid_lo, (tl.minimum(first_col - shift + window_left + 1, len_q) // BLOCK_M) * BLOCK_M)
    return lo, mid_lo, tl.where(last_col < len_k, mid_hi, mid_lo), hi


@triton.jit
def _forward_sweep(m, l, acc, q, k_base, v_base, mask_base, rows, dims, value_dims, col_lo, col_hi, len_q, len_k,
                   shift, window_left, window_right, D, Dv, stride_kl, stride_vl, stride_mi, stride_mj, qk_scale,
                   dropout_scale, head_key, threshold, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
                   MASKED: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """The online softmax over the key blocks starting in [col_lo, col_hi), in base 2: p = exp2((s - m) log2(e))
    (a GPU's exp is exp2 of x log2(e) anyway). s - m first, exact near the row's maximum (Sterbenz), then the
    product: the FMA form s log2(e) - m log2(e) rounds s log2(e) where the FMA is not fused (the interpreter), an
    error of ~|s| ulps in every P, which put dq at 2.1x SDPA's float32 error on the saturated-softmax samples
    (scores ~ 9 sigma). log2(e) is not folded into the scale either: the scores stay bit for bit those the backward recomputes, so its
    P = exp(s - lse) is exact at a row's maximum (scores times a rounded scale log2(e) moved every P of a
    row by up to |s| ulps, 7.6x SDPA's float32 error on dV at head dim 512). m is the running max, l the
    running sum, acc the output accumulator."""
    for first_col in range(col_lo, col_hi, BLOCK_N):
        cols = first_col + tl.arange(0, BLOCK_N)
        k_t = _tile(k_base, cols, cols < len_k, stride_kl, dims, D, True)
        qk = tl.dot(q, k_t.to(DOT), input_precision=PRECISION, out_dtype=ACC)
        s = _scores(qk, mask_base, stride_mi, stride_mj, rows[:, None], cols[None, :], len_q, len_k, shift,
                    window_left, window_right, qk_scale, 1.0, HAS_MASK, MASKED)
        m_new = tl.maximum(m, tl.max(s, 1))
        # A row that has seen only -inf so far subtracts 0 instead of -inf: exp2(-inf - 0) = 0, no NaN.
        m_ref = tl.where(m_new == float("-inf"), 0, m_new)
        p = tl.math.exp2((s - m_ref[:, None]) * LOG2E)
        alpha = tl.math.exp2((m - m_ref) * LOG2E)
        l = l * alpha + tl.sum(p, 1)
        if DROPOUT:  # l sums the probabilities before dropout; only the output sees it
            p = tl.where(_kept(head_key, rows[:, None], cols[None, :], threshold), p * dropout_scale, 0)
        v = _tile(v_base, cols, cols < len_k, stride_vl, value_dims, Dv, False)
        acc = tl.dot(p.to(DOT), v.to(DOT), acc * alpha[:, None], input_precision=PRECISION, out_dtype=ACC)
        m = m_new
    return m, l, acc


@triton.jit(do_not_specialize=["rows_q", "rows_k"])
def _forward_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr, seed_ptr,  # mask, cu_seqlens, seed optional
    out_ptr, lse_ptr,  # out (B,Hq,rows_q,Dv), (B,Hq,rows_q)
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
    stride_mb, stride_mh, stride_mi, stride_mj,
    Hq, group, rows_q, rows_k, D, Dv, window_left, window_right, bottom_right, dropout_threshold,
    scale_hi, scale_lo, dropout_scale_hi, dropout_scale_lo,
    PRESCALE: tl.constexpr, VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    n = tl.program_id(1) // Hq
    head = tl.program_id(1) % Hq
    batch, start_q, start_k, len_q, len_k, shift = _sequence(cu_seqlens_q_ptr, cu_seqlens_k_ptr, n, rows_q, rows_k,
                                                             bottom_right, VARLEN)
    first_row = tl.program_id(0) * BLOCK_M
    if first_row >= len_q:
        return
    _, q_scale, qk_scale = _scales(scale_hi, scale_lo, PRESCALE, ACC)
    rows, row_mask, dims, value_dims, _, k_base, v_base, mask_base, q = _query_block(
        q_ptr, k_ptr, v_ptr, mask_ptr, batch, head, group, start_q, start_k, first_row, len_q, D,
        stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
        stride_mb, stride_mh, q_scale, PRESCALE, HAS_MASK, ACC, DOT, BLOCK_M, BLOCK_D, BLOCK_DV, 0)
    dropout_scale = runtime_float(dropout_scale_hi, dropout_scale_lo, ACC)
    head_key = 0
    threshold = 0
    if DROPOUT:
        head_key = _head_key(seed_ptr, n * Hq + head)
        threshold = dropout_threshold.to(tl.uint32)

    m = tl.full((BLOCK_M,), float("-inf"), ACC)  # running max of the scores
    l = tl.zeros((BLOCK_M,), ACC)  # running sum of exp(score - m)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), ACC)
    lo, mid_lo, mid_hi, hi = _key_ranges(first_row, first_row + BLOCK_M - 1, shift, window_left, window_right, len_k,
                                         BLOCK_N)
    # Three sweeps in key order (the result does not depend on the split): masked, unmasked, masked.
    m, l, acc = _forward_sweep(m, l, acc, q, k_base, v_base, mask_base, rows, dims, value_dims, lo, mid_lo, len_q,
                               len_k, shift, window_left, window_right, D, Dv, stride_kl, stride_vl, stride_mi,
                               stride_mj, qk_scale, dropout_scale, head_key, threshold, HAS_MASK, DROPOUT,
                               True, ACC, DOT, PRECISION, BLOCK_N)
    m, l, acc = _forward_sweep(m, l, acc, q, k_base, v_base, mask_base, rows, dims, value_dims, mid_lo, mid_hi,
                               len_q, len_k, shift, window_left, window_right, D, Dv, stride_kl, stride_vl, stride_mi,
                               stride_mj, qk_scale, dropout_scale, head_key, threshold, HAS_MASK, DROPOUT,
                               False, ACC, DOT, PRECISION, BLOCK_N)
    m, l, acc = _forward_sweep(m, l, acc, q, k_base, v_base, mask_base, rows, dims, value_dims, mid_hi, hi, len_q,
                               len_k, shift, window_left, window_right, D, Dv, stride_kl, stride_vl, stride_mi,
                               stride_mj, qk_scale, dropout_scale, head_key, threshold, HAS_MASK, DROPOUT,
                               True, ACC, DOT, PRECISION, BLOCK_N)

    seen = l != 0  # false for a row that saw no key; true for a NaN sum (NaN scores), which passes on
    out_rows = tl.cast(batch * Hq + head, tl.int64) * rows_q + start_q + rows
    store(out_ptr + out_rows[:, None] * Dv + value_dims[None, :], acc / tl.where(seen, l, 1)[:, None],
          row_mask[:, None] & (value_dims < Dv)[None, :])
    # float64 lse (csrc/ops.cpp): the backward's exp(score - lse) of a row's largest score needs its low bits.
    lse = m.to(tl.float64) + tl.log(tl.where(seen, l, 1).to(tl.float64))
    tl.store(lse_ptr + out_rows, tl.where(seen, lse, float("-inf")), mask=row_mask)


# ==================================================================================================
# Backward. dQ (and delta): grid (query blocks, sequences * Hq); then dK/dV: (key blocks, sequences * Hkv).
# ==================================================================================================
@triton.jit
def _key_block_sweep(grad_k, grad_v, k, v, k_base, v_base, q_base, grad_out_base, mask_base, lse_ptr, delta_ptr,
                     row_base, cols, col_mask, dims, value_dims, head_key, threshold, row_lo, row_hi, len_q, len_k,
                     shift, window_left, window_right, D, Dv, stride_kl, stride_vl, stride_ql, stride_gl, stride_mi,
                     stride_mj, q_scale, qk_scale, dropout_scale, PRESCALE: tl.constexpr, HAS_MASK: tl.constexpr,
                     DROPOUT: tl.constexpr, MASKED: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr):
    """dK and dV of one key block (the columns `dims` / `value_dims` of them) accumulated over the query blocks
    starting in [row_lo, row_hi) of one query head, in transposed (keys, queries) tiles. Without MASKED the caller
    knows every pair is visible (_query_ranges): no per-element test. The score products S^T = K Q^T and
    dP^T = V dO^T take the held k, v tiles, or with CHUNK (k, v are 0 then) K, V, Q, dO a chunk at a time."""
    for first_row in range(row_lo, row_hi, BLOCK_M):
        rows = first_row + tl.arange(0, BLOCK_M)
        row_mask = rows < len_q
        q = _scaled_q(_tile(q_base, rows, row_mask, stride_ql, dims, D, False), q_scale, PRESCALE, ACC, DOT)
        grad_out = _tile(grad_out_base, rows, row_mask, stride_gl, value_dims, Dv, False).to(DOT)
        if CHUNK:
            qk_t = _chunked_product(k_base, cols, col_mask, stride_kl, 1.0, q_base, rows, row_mask, stride_ql, q_scale,
                                    D, PRESCALE, ACC, DOT, PRECISION, CHUNK)
        else:
            qk_t = tl.dot(k, tl.trans(q), input_precision=PRECISION, out_dtype=ACC)
        s_t = _scores(qk_t, mask_base, stride_mi, stride_mj, rows[None, :], cols[:, None], len_q, len_k, shift,
                      window_left, window_right, qk_scale, 1.0, HAS_MASK, MASKED)
        lse_hi, lse_lo = _saved_lse(lse_ptr + row_base, rows, row_mask, ACC)
        p_t = tl.exp((s_t - lse_hi[None, :]) - lse_lo[None, :])
        if MASKED:
            # A hidden pair takes no part: P = dS = 0 there even in a NaN row (exp(-inf - NaN) would be NaN).
            seen_t = _visible(rows[None, :], cols[:, None], len_q, len_k, shift, window_left, window_right)
            p_t = tl.where(seen_t, p_t, 0)
        # dP after P, as before CHUNK existed: the order of the live tiles is ptxas's register allocation
        if CHUNK:
            dp_t = _chunked_product(v_base, cols, col_mask, stride_vl, 1.0, grad_out_base, rows, row_mask, stride_gl,
                                    1.0, Dv, PRESCALE, ACC, DOT, PRECISION, CHUNK)
        else:
            dp_t = tl.dot(v, tl.trans(grad_out), input_precision=PRECISION, out_dtype=ACC)
        if DROPOUT:
            kept = _kept(head_key, rows[None, :], cols[:, None], threshold)
            dp_t = tl.where(kept, dp_t * dropout_scale, 0)
            dropped_p_t = tl.where(kept, p_t * dropout_scale, 0)
        else:
            dropped_p_t = p_t
        grad_v = tl.dot(dropped_p_t.to(DOT), grad_out, grad_v, input_precision=PRECISION, out_dtype=ACC)
        delta_hi, delta_lo = _split(tl.load(delta_ptr + row_base + rows, mask=row_mask, other=0), ACC)
        ds_t = p_t * ((dp_t - delta_hi[None, :]) - delta_lo[None, :])
        if MASKED:
            ds_t = tl.where(seen_t, ds_t, 0)
        grad_k = tl.dot(ds_t.to(DOT), q, grad_k, input_precision=PRECISION, out_dtype=ACC)
    return grad_k, grad_v


@triton.jit(do_not_specialize=["rows_q", "rows_k"])
def _key_gradients_kernel(
    q_ptr, k_ptr, v_ptr, grad_out_ptr, mask_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr, seed_ptr,
    lse_ptr, delta_ptr,  # (B,Hq,rows_q) each
    grad_k_ptr, grad_v_ptr,  # out (B,Hkv,rows_k,D), (B,Hkv,rows_k,Dv)
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
    stride_gb, stride_gh, stride_gl, stride_mb, stride_mh, stride_mi, stride_mj,
    Hq, group, rows_q, rows_k, D, Dv, window_left, window_right, bottom_right, dropout_threshold,
    scale_hi, scale_lo, dropout_scale_hi, dropout_scale_lo,
    PRESCALE: tl.constexpr, VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CHUNK: tl.constexpr,
):
    """dV_j = sum_i P~_ij dO_i and dK_j = scale sum_i dS_ij q_i over the rows i that see key j, all query heads
    of the kv group; P~ is P after dropout. Tiles are transposed, (keys, queries), so no operand needs a
    transpose in registers but q's and dO's. With CHUNK a program outputs one chunk of CHUNK head-dim columns of
    dK and dV (grid axis 2) and holds no K / V tile: see the config lists for when, NOTES.md for the cost."""
    Hkv = Hq // group
    n = tl.program_id(1) // Hkv
    kv_head = tl.program_id(1) % Hkv
    batch, start_q, start_k, len_q, len_k, shift = _sequence(cu_seqlens_q_ptr, cu_seqlens_k_ptr, n, rows_q, rows_k,
                                                             bottom_right, VARLEN)
    first_col = tl.program_id(0) * BLOCK_N
    if first_col >= len_k:
        return
    _, q_scale, qk_scale = _scales(scale_hi, scale_lo, PRESCALE, ACC)
    dropout_scale = runtime_float(dropout_scale_hi, dropout_scale_lo, ACC)
    cols = first_col + tl.arange(0, BLOCK_N)
    col_mask = cols < len_k
    dims = _head_dims(BLOCK_D, CHUNK)
    value_dims = _head_dims(BLOCK_DV, CHUNK)
    k_base = _at(k_ptr, batch, kv_head, start_k, stride_kb, stride_kh, stride_kl)
    v_base = _at(v_ptr, batch, kv_head, start_k, stride_vb, stride_vh, stride_vl)
    if CHUNK:  # the score products load K and V a chunk at a time
        k = 0
        v = 0
    else:
        k = _tile(k_base, cols, col_mask, stride_kl, dims, D, False).to(DOT)
        v = _tile(v_base, cols, col_mask, stride_vl, value_dims, Dv, False).to(DOT)
    grad_k = tl.zeros((BLOCK_N, dims.shape[0]), ACC)
    grad_v = tl.zeros((BLOCK_N, value_dims.shape[0]), ACC)
    lo, mid_lo, mid_hi, hi = _query_ranges(first_col, first_col + BLOCK_N - 1, shift, window_left, window_right, len_q,
                                           len_k, BLOCK_M)
    head_key = tl.full((), 0, tl.uint32)  # uint32 before the loop too: loop-carried types must not change
    threshold = 0
    if DROPOUT:
        threshold = dropout_threshold.to(tl.uint32)
    for head in range(kv_head * group, kv_head * group + group):
        q_base = _at(q_ptr, batch, head, start_q, stride_qb, stride_qh, stride_ql)
        grad_out_base = _at(grad_out_ptr, batch, head, start_q, stride_gb, stride_gh, stride_gl)
        mask_base = _mask_base(mask_ptr, batch, head, stride_mb, stride_mh, HAS_MASK)
        row_base = tl.cast(batch * Hq + head, tl.int64) * rows_q + start_q  # into lse and delta
        if DROPOUT:
            head_key = _head_key(seed_ptr, n * Hq + head)
        # Three sweeps in query order (masked, unmasked, masked): the sums' order is the plain loop's.
        grad_k, grad_v = _key_block_sweep(
            grad_k, grad_v, k, v, k_base, v_base, q_base, grad_out_base, mask_base, lse_ptr, delta_ptr, row_base, cols,
            col_mask, dims, value_dims, head_key, threshold, lo, mid_lo, len_q, len_k, shift, window_left, window_right,
            D, Dv, stride_kl, stride_vl, stride_ql, stride_gl, stride_mi, stride_mj, q_scale, qk_scale, dropout_scale,
            PRESCALE, HAS_MASK, DROPOUT, True, ACC, DOT, PRECISION, BLOCK_M, CHUNK)
        grad_k, grad_v = _key_block_sweep(
            grad_k, grad_v, k, v, k_base, v_base, q_base, grad_out_base, mask_base, lse_ptr, delta_ptr, row_base, cols,
            col_mask, dims, value_dims, head_key, threshold, mid_lo, mid_hi, len_q, len_k, shift, window_left,
            window_right, D, Dv, stride_kl, stride_vl, stride_ql, stride_gl, stride_mi, stride_mj, q_scale, qk_scale,
            dropout_scale, PRESCALE, HAS_MASK, DROPOUT, False, ACC, DOT, PRECISION, BLOCK_M, CHUNK)
        grad_k, grad_v = _key_block_sweep(
            grad_k, grad_v, k, v, k_base, v_base, q_base, grad_out_base, mask_base, lse_ptr, delta_ptr, row_base, cols,
            col_mask, dims, value_dims, head_key, threshold, mid_hi, hi, len_q, len_k, shift, window_left, window_right,
            D, Dv, stride_kl, stride_vl, stride_ql, stride_gl, stride_mi, stride_mj, q_scale, qk_scale, dropout_scale,
            PRESCALE, HAS_MASK, DROPOUT, True, ACC, DOT, PRECISION, BLOCK_M, CHUNK)

    out_rows = tl.cast(batch * Hkv + kv_head, tl.int64) * rows_k + start_k + cols
    # q carried q_scale already: dK = scale sum_i dS_ij q_i.
    store(grad_k_ptr + out_rows[:, None] * D + dims[None, :], grad_k * qk_scale,
          col_mask[:, None] & (dims < D)[None, :])
    store(grad_v_ptr + out_rows[:, None] * Dv + value_dims[None, :], grad_v,
          col_mask[:, None] & (value_dims < Dv)[None, :])


@triton.jit
def _row_block_gradients(q, grad_out, q_base, grad_out_base, lse_hi, lse_lo, k_base, v_base, mask_base, rows,
                         row_mask, cols, dims, value_dims, head_key, threshold, len_q, len_k, shift, window_left,
                         window_right, D, Dv, stride_ql, stride_gl, stride_kl, stride_vl, stride_mi, stride_mj, q_scale,
                         qk_scale, dropout_scale, PRESCALE: tl.constexpr, HAS_MASK: tl.constexpr,
                         DROPOUT: tl.constexpr, MASKED: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                         PRECISION: tl.constexpr, CHUNK: tl.constexpr):
    """For the query rows of q / grad_out against key columns `cols`: P (BLOCK_M, BLOCK_N), dP after dropout
    (dO . v times keep / (1 - p)) and the K^T tile (the columns `dims`, BLOCK_N) as a tl.dot operand. The score
    products take the held q, grad_out tiles, or with CHUNK (q, grad_out are 0 then) Q, K, dO, V a chunk at a time
    (_chunked_product). With MASKED a hidden pair takes no part: P = dP = 0 there, even in a NaN row or for a key
    whose values are NaN; without it the caller knows every pair is visible (_key_ranges)."""
    col_mask = cols < len_k
    k_t = _tile(k_base, cols, col_mask, stride_kl, dims, D, True).to(DOT)
    if CHUNK:
        qk = _chunked_product(q_base, rows, row_mask, stride_ql, q_scale, k_base, cols, col_mask, stride_kl, 1.0, D,
                              PRESCALE, ACC, DOT, PRECISION, CHUNK)
    else:
        v_t = _tile(v_base, cols, col_mask, stride_vl, value_dims, Dv, True).to(DOT)
        qk = tl.dot(q, k_t, input_precision=PRECISION, out_dtype=ACC)
    s = _scores(qk, mask_base, stride_mi, stride_mj, rows[:, None], cols[None, :], len_q, len_k, shift,
                window_left, window_right, qk_scale, 1.0, HAS_MASK, MASKED)
    p = tl.exp((s - lse_hi[:, None]) - lse_lo[:, None])
    if CHUNK:  # dP after P, as before CHUNK existed: the order of the live tiles is ptxas's register allocation
        dp = _chunked_product(grad_out_base, rows, row_mask, stride_gl, 1.0, v_base, cols, col_mask, stride_vl, 1.0,
                              Dv, PRESCALE, ACC, DOT, PRECISION, CHUNK)
    else:
        dp = tl.dot(grad_out, v_t, input_precision=PRECISION, out_dtype=ACC)
    if DROPOUT:
        dp = tl.where(_kept(head_key, rows[:, None], cols[None, :], threshold), dp * dropout_scale, 0)
    if MASKED:
        seen = _visible(rows[:, None], cols[None, :], len_q, len_k, shift, window_left, window_right)
        p = tl.where(seen, p, 0)
        dp = tl.where(seen, dp, 0)
    return p, dp, k_t


@triton.jit
def _delta_sweep(delta, mass, q, grad_out, q_base, grad_out_base, lse_hi, lse_lo, k_base, v_base, mask_base, rows,
                 row_mask, dims, value_dims, head_key, threshold, col_lo, col_hi, len_q, len_k, shift, window_left,
                 window_right, D, Dv, stride_ql, stride_gl, stride_kl, stride_vl, stride_mi, stride_mj, q_scale,
                 qk_scale, dropout_scale, PRESCALE: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
                 MASKED: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    """delta's float64 sums (sum_j P dP and sum_j P) over the key blocks starting in [col_lo, col_hi)."""
    for first_col in range(col_lo, col_hi, BLOCK_N):
        cols = first_col + tl.arange(0, BLOCK_N)
        p, dp, _ = _row_block_gradients(
            q, grad_out, q_base, grad_out_base, lse_hi, lse_lo, k_base, v_base, mask_base, rows, row_mask, cols, dims,
            value_dims, head_key, threshold, len_q, len_k, shift, window_left, window_right, D, Dv, stride_ql,
            stride_gl, stride_kl, stride_vl, stride_mi, stride_mj, q_scale, qk_scale, dropout_scale, PRESCALE,
            HAS_MASK, DROPOUT, MASKED, ACC, DOT, PRECISION, CHUNK)
        delta += tl.sum(p.to(tl.float64) * dp.to(tl.float64), 1)
        mass += tl.sum(p.to(tl.float64), 1)
    return delta, mass


@triton.jit
def _query_block_sweep(grad_q, q, grad_out, q_base, grad_out_base, lse_hi, lse_lo, delta_hi, delta_lo, k_base, v_base,
                       mask_base, grad_scores_ptr, out_rows, rows, row_mask, dims, value_dims, head_key, threshold,
                       col_lo, col_hi, start_k, rows_k, len_q, len_k, shift, window_left, window_right, D, Dv,
                       stride_ql, stride_gl, stride_kl, stride_vl, stride_mi, stride_mj, q_scale, qk_scale,
                       dropout_scale, PRESCALE: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
                       GRAD_SCORES: tl.constexpr, MASKED: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                       PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    """dQ (unscaled, the columns `dims`) accumulated over the key blocks starting in [col_lo, col_hi), dS written
    with GRAD_SCORES (by the first chunk's program only, with CHUNK: every chunk computes the same dS)."""
    for first_col in range(col_lo, col_hi, BLOCK_N):
        cols = first_col + tl.arange(0, BLOCK_N)
        p, dp, k_t = _row_block_gradients(
            q, grad_out, q_base, grad_out_base, lse_hi, lse_lo, k_base, v_base, mask_base, rows, row_mask, cols, dims,
            value_dims, head_key, threshold, len_q, len_k, shift, window_left, window_right, D, Dv, stride_ql,
            stride_gl, stride_kl, stride_vl, stride_mi, stride_mj, q_scale, qk_scale, dropout_scale, PRESCALE,
            HAS_MASK, DROPOUT, MASKED, ACC, DOT, PRECISION, CHUNK)
        # dp - delta_hi: exact near the row's top keys
        ds = p * ((dp - delta_hi[:, None]) - delta_lo[:, None])
        if MASKED:  # hidden pairs: dS = 0 even in a NaN row (NaN delta)
            ds = tl.where(_visible(rows[:, None], cols[None, :], len_q, len_k, shift, window_left, window_right),
                          ds, 0)
        if GRAD_SCORES:
            if _first_chunk(CHUNK):
                store(grad_scores_ptr + out_rows[:, None] * rows_k + start_k + cols[None, :], ds,
                      row_mask[:, None] & (cols < len_k)[None, :])
        grad_q = tl.dot(ds.to(DOT), tl.trans(k_t), grad_q, input_precision=PRECISION, out_dtype=ACC)
    return grad_q


@triton.jit(do_not_specialize=["rows_q", "rows_k"])
def _query_gradients_kernel(
    q_ptr, k_ptr, v_ptr, grad_out_ptr, mask_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr, seed_ptr,
    lse_ptr, delta_ptr,  # (B,Hq,rows_q) each
    grad_q_ptr, grad_scores_ptr,  # out (B,Hq,rows_q,D), (B,Hq,rows_q,rows_k) if GRAD_SCORES
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
    stride_gb, stride_gh, stride_gl, stride_mb, stride_mh, stride_mi, stride_mj,
    Hq, group, rows_q, rows_k, D, Dv, window_left, window_right, bottom_right, dropout_threshold,
    scale_hi, scale_lo, dropout_scale_hi, dropout_scale_lo,
    PRESCALE: tl.constexpr, VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    GRAD_SCORES: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CHUNK: tl.constexpr,
):
    """dQ_i = scale sum_j dS_ij k_j over the keys row i sees, dS = P * (dP - delta), dP_ij = dO_i . v_j after
    dropout, delta_i = sum_j P_ij dP_ij / sum_j P_ij (a first sweep; float64, stored for the dK/dV kernel);
    dS is grad_scores, written here where its tile lies in memory order. With CHUNK a program outputs one chunk of
    CHUNK head-dim columns of dQ (grid axis 2) and holds no Q / dO tile; each chunk's program computes the same
    delta and dS, the first one stores them (see the config lists for when, NOTES.md for the cost)."""
    n = tl.program_id(1) // Hq
    head = tl.program_id(1) % Hq
    batch, start_q, start_k, len_q, len_k, shift = _sequence(cu_seqlens_q_ptr, cu_seqlens_k_ptr, n, rows_q, rows_k,
                                                             bottom_right, VARLEN)
    first_row = tl.program_id(0) * BLOCK_M
    if first_row >= len_q:
        return
    scale, q_scale, qk_scale = _scales(scale_hi, scale_lo, PRESCALE, ACC)
    dropout_scale = runtime_float(dropout_scale_hi, dropout_scale_lo, ACC)
    rows, row_mask, dims, value_dims, q_base, k_base, v_base, mask_base, q = _query_block(
        q_ptr, k_ptr, v_ptr, mask_ptr, batch, head, group, start_q, start_k, first_row, len_q, D,
        stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
        stride_mb, stride_mh, q_scale, PRESCALE, HAS_MASK, ACC, DOT, BLOCK_M, BLOCK_D, BLOCK_DV, CHUNK)
    grad_out_base = _at(grad_out_ptr, batch, head, start_q, stride_gb, stride_gh, stride_gl)
    if CHUNK:  # the score products load dO a chunk at a time
        grad_out = 0
    else:
        grad_out = _tile(grad_out_base, rows, row_mask, stride_gl, value_dims, Dv, False).to(DOT)
    out_rows = tl.cast(batch * Hq + head, tl.int64) * rows_q + start_q + rows
    lse_hi, lse_lo = _saved_lse(lse_ptr, out_rows, row_mask, ACC)
    head_key = 0
    threshold = 0
    if DROPOUT:
        head_key = _head_key(seed_ptr, n * Hq + head)
        threshold = dropout_threshold.to(tl.uint32)

    # Key blocks in three ranges (_key_ranges), swept in order: masked, unmasked, masked.
    lo, mid_lo, mid_hi, hi = _key_ranges(first_row, first_row + BLOCK_M - 1, shift, window_left, window_right, len_k,
                                         BLOCK_N)
    # delta_i = sum_j P_ij dP_ij / sum_j P_ij: an average of the very dP values the second sweep (and the dK/dV
    # kernel, in transposed tiles) subtracts it from, so dP_ij - delta_i = sum_k w_k (dP_ij - dP_ik) keeps only
    # relative errors: 0 on a one-hot row, and near-exact on near-one-hot ones since the sums run in float64
    # (summed in ACC, delta's own rounding, 1 ulp of |dP|, is all of dP - delta's error there). rowsum(dO * O)
    # instead differs from dO . v_j by the rounding of O and of another summation, and the recomputed P sums to
    # 1 only within the ulps by which these tiles' scores differ from the forward's (other tile shapes): either
    # left ~1 ulp of |dP| in dS, 16-33x SDPA's float32 error on dq in PyTorch's saturated SDPA sample. Costs two
    # of the backward's seven tile products again, and float64 row sums (BLOCK_M x BLOCK_N products per tile).
    delta = tl.zeros((BLOCK_M,), tl.float64)
    mass = tl.zeros((BLOCK_M,), tl.float64)
    delta, mass = _delta_sweep(delta, mass, q, grad_out, q_base, grad_out_base, lse_hi, lse_lo, k_base, v_base,
                               mask_base, rows, row_mask, dims, value_dims, head_key, threshold, lo, mid_lo, len_q,
                               len_k, shift, window_left, window_right, D, Dv, stride_ql, stride_gl, stride_kl,
                               stride_vl, stride_mi, stride_mj, q_scale, qk_scale, dropout_scale, PRESCALE, HAS_MASK,
                               DROPOUT, True, ACC, DOT, PRECISION, BLOCK_N, CHUNK)
    delta, mass = _delta_sweep(delta, mass, q, grad_out, q_base, grad_out_base, lse_hi, lse_lo, k_base, v_base,
                               mask_base, rows, row_mask, dims, value_dims, head_key, threshold, mid_lo, mid_hi, len_q,
                               len_k, shift, window_left, window_right, D, Dv, stride_ql, stride_gl, stride_kl,
                               stride_vl, stride_mi, stride_mj, q_scale, qk_scale, dropout_scale, PRESCALE, HAS_MASK,
                               DROPOUT, False, ACC, DOT, PRECISION, BLOCK_N, CHUNK)
    delta, mass = _delta_sweep(delta, mass, q, grad_out, q_base, grad_out_base, lse_hi, lse_lo, k_base, v_base,
                               mask_base, rows, row_mask, dims, value_dims, head_key, threshold, mid_hi, hi, len_q,
                               len_k, shift, window_left, window_right, D, Dv, stride_ql, stride_gl, stride_kl,
                               stride_vl, stride_mi, stride_mj, q_scale, qk_scale, dropout_scale, PRESCALE, HAS_MASK,
                               DROPOUT, True, ACC, DOT, PRECISION, BLOCK_N, CHUNK)
    delta = tl.where(mass > 0, delta / tl.where(mass > 0, mass, 1), delta)  # NaN stays NaN; no key: 0
    if _first_chunk(CHUNK):
        tl.store(delta_ptr + out_rows, delta, mask=row_mask)
    delta_hi, delta_lo = _split(delta, ACC)

    grad_q = tl.zeros((BLOCK_M, dims.shape[0]), ACC)
    grad_q = _query_block_sweep(
        grad_q, q, grad_out, q_base, grad_out_base, lse_hi, lse_lo, delta_hi, delta_lo, k_base, v_base, mask_base,
        grad_scores_ptr, out_rows, rows, row_mask, dims, value_dims, head_key, threshold, lo, mid_lo, start_k, rows_k,
        len_q, len_k, shift, window_left, window_right, D, Dv, stride_ql, stride_gl, stride_kl, stride_vl, stride_mi,
        stride_mj, q_scale, qk_scale, dropout_scale, PRESCALE, HAS_MASK, DROPOUT, GRAD_SCORES, True, ACC, DOT,
        PRECISION, BLOCK_N, CHUNK)
    grad_q = _query_block_sweep(
        grad_q, q, grad_out, q_base, grad_out_base, lse_hi, lse_lo, delta_hi, delta_lo, k_base, v_base, mask_base,
        grad_scores_ptr, out_rows, rows, row_mask, dims, value_dims, head_key, threshold, mid_lo, mid_hi, start_k,
        rows_k, len_q, len_k, shift, window_left, window_right, D, Dv, stride_ql, stride_gl, stride_kl, stride_vl,
        stride_mi, stride_mj, q_scale, qk_scale, dropout_scale, PRESCALE, HAS_MASK, DROPOUT, GRAD_SCORES, False, ACC,
        DOT, PRECISION, BLOCK_N, CHUNK)
    grad_q = _query_block_sweep(
        grad_q, q, grad_out, q_base, grad_out_base, lse_hi, lse_lo, delta_hi, delta_lo, k_base, v_base, mask_base,
        grad_scores_ptr, out_rows, rows, row_mask, dims, value_dims, head_key, threshold, mid_hi, hi, start_k, rows_k,
        len_q, len_k, shift, window_left, window_right, D, Dv, stride_ql, stride_gl, stride_kl, stride_vl, stride_mi,
        stride_mj, q_scale, qk_scale, dropout_scale, PRESCALE, HAS_MASK, DROPOUT, GRAD_SCORES, True, ACC, DOT,
        PRECISION, BLOCK_N, CHUNK)

    store(grad_q_ptr + out_rows[:, None] * D + dims[None, :], grad_q * scale, row_mask[:, None] & (dims < D)[None, :])


# ==================================================================================================
# Launchers: argument checks, block sizes, grids.
# ==================================================================================================
# Tile configurations. A config is {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"} (a list entry's optional fifth
# element: "maxnreg", ptxas's register cap, where ptxas otherwise settles on too few); BLOCK_D / BLOCK_DV are the
# head dims padded to powers of two (>= MIN_DOT_SIZE, tl.dot's minimum), passed beside it.
# On CUDA each kernel is autotuned over a short list per operand unit and padded head dim (`configs`); every
# config of every list is compiled for sm_80 and sm_90 by tests/test_gpu_compile.py with all flags on (mask,
# dropout, varlen: the most registers), which asserts no register spills and shared memory within the
# target's limit, so a list holds only configs that fit. The shapes follow FlashAttention-2 and Triton's
# fused-attention tutorial (128-row query tiles, 64-128 keys, 4-8 warps, 2-4 stages), cut down where ptxas
# found spills: the mask tile's 64-bit addresses and the dropout hash come on top of the tutorial's registers.
# float32 has two units, chosen as torch chooses for its own float32 matmuls: tf32 tensor-core products where
# torch.backends.cuda.matmul.allow_tf32 allows them, else float32 FMAs (FLOAT32_PRECISION), each with its lists.
# No GPU here to time them: which config wins on an A100 / H100 is for the autotuner (and `make gpu-check`).
# A list entry is (BLOCK_M, BLOCK_N, num_warps, num_stages) and optionally a dict of options (_config): "maxnreg"
# (ptxas's register cap) and, in the backward kernels, "CHUNK": with CHUNK a program outputs CHUNK head-dim columns
# of its gradients (dQ; or dK and dV), the grid's third axis walking the chunks, and holds no operand over the whole
# head dim: the score products S = Q K^T and dP = dO V^T are summed CHUNK columns at a time from tiles loaded per
# key (query) block, so only the accumulators (16 x CHUNK) stay in registers. CHUNK >= the padded head dim is ONE
# chunk ("streamed"): nothing is recomputed, Q and dO (dQ kernel) or K and V (dK/dV kernel) are loaded per tile
# instead of held (again from L1 / L2). Narrower chunks recompute S and dP once per chunk (the cost: NOTES.md,
# "Head-dim chunks in the flash backward"). Used only where the unchunked kernel spilled at its smallest tile (16 x
# 16, capped at 255 registers): float32 at d256, float64 at d128 / d256; one chunk fits all of them (ptxas figures
# below) but the float64 dK/dV kernel at d256 without mask and dropout: two chunks there. Past head dim 256 (the
# shrink rule in `configs`) CHUNK 256 is several chunks.
_CHUNKS_OF_128 = {"CHUNK": 128, "maxnreg": 255}
_CHUNKS_OF_256 = {"CHUNK": 256, "maxnreg": 255}
_GPU_CONFIGS = {
    # unit "mma": bfloat16 / float16 operands on the tensor cores (float32 accumulators). Every bf16 config
    # here and in _LIGHT_GPU_CONFIGS compiled without spills for both sm_80 and sm_90; those that spilled on
    # either were dropped (e.g. the forward's 128 x 32 on 8 warps: 16 bytes at d64 and 144 at d128 on sm_90,
    # none on sm_80; the dQ kernel's 64 x 32 at d64: 128 bytes on sm_80, none on sm_90).
    ("forward", "mma"): {64: [(64, 32, 8, 3), (32, 32, 4, 3)],
                         128: [(64, 32, 8, 3), (32, 32, 4, 3)],
                         256: [(32, 32, 8, 2), (32, 16, 4, 2)]},
    ("query_gradients", "mma"): {64: [(64, 16, 8, 3)],
                                 128: [(32, 16, 8, 2)],
                                 256: [(16, 16, 8, 1), (16, 16, 4, 1)]},
    ("key_gradients", "mma"): {64: [(32, 32, 8, 2), (32, 32, 4, 2)],
                               128: [(32, 32, 8, 2), (16, 32, 4, 2)],
                               256: [(16, 16, 8, 1), (16, 16, 4, 1)]},
    # unit "tf32": float32 operands on the tensor cores with tf32 products (torch.backends.cuda.matmul.allow_tf32):
    # twice the bytes of a bfloat16 tile in shared memory and registers. ptxas (2026-12-05, heavy and light, sm_80
    # and sm_90): dropped 32 x 32 / 4 warps at d128 (104 bytes spilled on sm_80), the dQ kernel's 32 x 32 / 8 at
    # d64 (268 on sm_90). At d256 the backward's tiles fit the heavy variant but spill in the light one (16 x 16:
    # dQ on sm_90, dK/dV on sm_80; 16 x 32 dK/dV on both): see _LIGHT_GPU_CONFIGS.
    ("forward", "tf32"): {64: [(64, 64, 8, 2), (32, 32, 4, 2)],
                          128: [(64, 32, 8, 2), (32, 32, 8, 2)],
                          256: [(32, 32, 8, 1), (32, 16, 4, 1)]},
    ("query_gradients", "tf32"): {64: [(32, 16, 4, 1)],
                                  128: [(32, 16, 8, 1), (16, 16, 4, 1)],
                                  256: [(16, 16, 4, 1)]},
    ("key_gradients", "tf32"): {64: [(32, 32, 8, 1)],
                                128: [(32, 16, 8, 1), (16, 16, 8, 1)],
                                256: [(16, 16, 8, 1)]},
    # unit "fma32": float32 without tf32 (FLOAT32_PRECISION, "ieee"): products on the FMA units, each thread
    # holding its rows of one operand and its columns of the other over the whole reduction (the head dim for the
    # score products), so the tiles are short: 16 query rows on 8 warps. ptxas (2026-12-05, heavy and light, sm_80
    # and sm_90): the forward's 32-row tiles spilled 48-4724 bytes at d64 / d128 (32 x 32 / 4 warps, 64 x 32 / 8;
    # sm_90 worse than sm_80), 16 x 64 / 4 warps 1284-1360 at d64; the dQ kernel's 16 x 16 / 4 warps 2-2.2 KB and
    # 16 x 32 / 8 1.5-2 KB at d128 (8 warps with 16 keys fit); the dK/dV kernel spilled 8-116 bytes at most tiles
    # with ptxas settling on 64-128 registers (an allocation choice, not the tile's size). At d128 the dK/dV
    # kernel's 64 x 16 / 8 fits the heavy variant but not the light one. At d256 no dK/dV tile fits (2026-12-05,
    # dev_gpu6): 64 x 16 / 8 spilled 3.9-141 KB (ptxas settling on 32 registers on sm_90), 32 x 16 / 8 132-136 bytes,
    # 16 x 16 / 8 56-88 at 128 registers, capped at 255 still 8 bytes on sm_90 heavy, 60 light. Streamed (one
    # CHUNK, 2026-12-06): 125-142 registers, clean on both targets, heavy and light.
    ("forward", "fma32"): {64: [(16, 64, 8, 1), (16, 32, 8, 2)],
                           128: [(16, 32, 8, 2), (16, 16, 8, 1)],
                           256: [(16, 16, 8, 1)]},
    ("query_gradients", "fma32"): {64: [(16, 32, 8, 1)],
                                   128: [(16, 16, 8, 2), (16, 16, 8, 1)],
                                   256: [(16, 16, 8, 2)]},
    ("key_gradients", "fma32"): {64: [(16, 16, 8, 1)],
                                 128: [(64, 16, 8, 1)],
                                 256: [(16, 16, 8, 1, _CHUNKS_OF_256)]},
    # unit "fma": float64, on the float64 tensor cores (triton emits mma.m8n8k4.f64 on sm_80 / sm_90), operands in
    # registers. ptxas (2026-12-05, sm_80 and sm_90): the dK/dV kernel's 16 x 32 / 8 warps at d64 spilled 12 bytes
    # (heavy) and 48 (light) on sm_80, 16 x 16 fits (172-205 registers). The backward at d128 / d256 spills at the
    # smallest tile, 16 x 16 (at 255 registers, so not ptxas's choice; 4 or 16 warps spill more): dK/dV d128 heavy 44
    # bytes on sm_90, light 24 / 72; dQ d256 heavy 112 on sm_90, light 3.6 KB; dK/dV d256 452-556. The kernels held
    # K, V, dK, dV (or Q, dO, dQ) over the whole head dim. Streamed (one CHUNK, 2026-12-06, heavy and light, both
    # targets, no spill): dK/dV d128 160-180 registers, d256 250-255; dQ d256 254-255 (two chunks of 128 would take
    # 160-176, for 1.7x the backward's FLOPs).
    ("forward", "fma"): {64: [(32, 32, 8, 2)], 128: [(16, 32, 8, 1)], 256: [(16, 16, 8, 1)]},
    ("query_gradients", "fma"): {64: [(32, 16, 8, 1)], 128: [(16, 16, 8, 1)], 256: [(16, 16, 8, 1, _CHUNKS_OF_256)]},
    ("key_gradients", "fma"): {64: [(16, 16, 8, 1)], 128: [(16, 16, 8, 1, _CHUNKS_OF_128)],
                               256: [(16, 16, 8, 1, _CHUNKS_OF_256)]},
}
# The light variant (no attention mask, no dropout: the mask tile's 64-bit addresses and the dropout hash are
# gone) has registers for FlashAttention-2's tiles: 64-128 keys. Kernels and units not here use the lists above.
_LIGHT_GPU_CONFIGS = {
    ("forward", "mma"): {64: [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3)],
                         128: [(128, 32, 8, 3), (64, 64, 8, 3)],
                         256: [(64, 16, 4, 2)]},
    ("query_gradients", "mma"): {64: [(64, 32, 4, 3)],
                                 128: [(64, 32, 8, 2), (32, 16, 8, 2)],
                                 256: [(32, 32, 8, 1), (16, 16, 8, 1)]},
    ("key_gradients", "mma"): {64: [(32, 32, 8, 3), (32, 32, 4, 3)],
                               128: [(16, 16, 8, 2), (16, 16, 4, 2)],
                               256: [(16, 32, 8, 1)]},
    # float32: not larger tiles but others where the heavy variant's spilled in the light one (ptxas, sm_80 and
    # sm_90): the tf32 dQ kernel at d256 (16 x 16 / 4 warps: 20-100 bytes; 2 stages on 8 warps fit), the fma32
    # dK/dV kernel at d128 (64 x 16 / 8: spilled; 16 x 16 / 4, which spills in the heavy one, fits). The tf32 dK/dV
    # kernel at d256 spilled at every tile (16 x 16 / 8 at 255 registers: 48 bytes on sm_80; 2 stages 84, 32 x 16 36,
    # 16 x 32 120): streamed (one CHUNK) 140-158 registers, clean.
    ("query_gradients", "tf32"): {64: [(32, 16, 4, 1)],
                                  128: [(32, 16, 8, 1), (16, 16, 4, 1)],
                                  256: [(16, 16, 8, 2)]},
    ("key_gradients", "tf32"): {64: [(32, 32, 8, 1)],
                                128: [(32, 16, 8, 1), (16, 16, 8, 1)],
                                256: [(16, 16, 8, 1, _CHUNKS_OF_256)]},
    ("key_gradients", "fma32"): {64: [(16, 16, 8, 1)],
                                 128: [(16, 16, 4, 1)],
                                 256: [(16, 16, 8, 1, _CHUNKS_OF_256)]},
    # The fma32 dQ kernel at d256: 16 x 16 / 8 warps / 2 stages spilled 104-128 bytes at 128 registers (ptxas's
    # choice: with 1 stage it took 255 and spilled 1.3 KB); capped at 255 (triton's maxnreg) it takes 232-238 and
    # spills nothing.
    ("query_gradients", "fma32"): {64: [(16, 32, 8, 1)],
                                   128: [(16, 16, 8, 2), (16, 16, 8, 1)],
                                   256: [(16, 16, 8, 2, {"maxnreg": 255})]},
    # float64: the dQ kernel's 32 x 16 / 8 warps at d64 spilled 16 bytes on sm_80 and 112 on sm_90 without mask
    # and dropout (ptxas settled on 255 registers); 16 x 32 and 16 x 16 fit (188-216 registers). The dK/dV kernel
    # at d256 streamed (one chunk) spilled 44 bytes at 255 registers on sm_80 without mask and dropout (the heavy
    # variant fits): two chunks of 128 (162-174 registers), for 1.5x the dK/dV kernel's FLOPs (NOTES.md).
    ("query_gradients", "fma"): {64: [(16, 32, 8, 1), (16, 16, 8, 1)],
                                 128: [(16, 16, 8, 1)],
                                 256: [(16, 16, 8, 1, _CHUNKS_OF_256)]},
    ("key_gradients", "fma"): {64: [(16, 16, 8, 1)], 128: [(16, 16, 8, 1, _CHUNKS_OF_128)],
                               256: [(16, 16, 8, 1, _CHUNKS_OF_128)]},
}
# The kernels that take CHUNK (see the lists above; 0, none, where a config does not set it).
CHUNKED = ("query_gradients", "key_gradients")
_forced_chunk: int | None = None  # forced_chunk
# Under the interpreter one config, no autotuning: it runs each program in Python, so the fewest, largest tiles
# are fastest (forward + backward over 6 heads, 256 tokens, head dim 64, float32: 6.9 s with these, 27 s with
# the old float32 GPU tiles). Past head dim 64 both sides shrink in proportion (see configs).
_INTERPRETER_CONFIGS = {"forward": (128, 64, 4, 1), "key_gradients": (64, 64, 4, 1), "query_gradients": (64, 64, 4, 1)}
# The autotuner re-times the configs for each distinct value of these arguments (not the lengths: a decoding
# or varlen workload would re-tune at every new length).
_TUNING_KEY = ("D", "Dv")


def _padded(size: int) -> int:
    return max(MIN_DOT_SIZE, triton.next_power_of_2(size))


# float32 products without tf32 (torch.backends.cuda.matmul.allow_tf32 off): "ieee", float32 FMAs, as torch's own
# float32 matmuls. Not "tf32x3": its split operands (big and small tf32 halves of the Q, K, V, dO tiles across the
# whole head dim) spilled registers at every tile down to 16 x 16 at head dim 128 (ptxas, sm_80 and sm_90).
FLOAT32_PRECISION = "ieee"


def unit(dtype: torch.dtype, device: torch.device) -> str:
    """Which units run the tile products: "mma" (16-bit operands), "tf32" (float32 on the tensor cores, where
    torch.backends.cuda.matmul.allow_tf32 allows it), "fma32" (float32 on the FMA units, where it does not),
    "fma" (float64), or "interpreter" (CPU tensors). Follows _launch.dot_precision."""
    if device.type != "cuda":
        return "interpreter"
    if dtype == torch.float32:
        return "tf32" if dot_precision(dtype, device, FLOAT32_PRECISION) == "tf32" else "fma32"
    return {torch.float64: "fma"}.get(dtype, "mma")


def _config(block_m: int, block_n: int, num_warps: int, num_stages: int, options: dict | None = None) -> dict:
    """A list entry as a config; its optional fifth element, a dict, adds "maxnreg" (ptxas's register cap, where
    ptxas otherwise settles on fewer registers than the tile needs and spills) and / or "CHUNK" (the backward's
    head-dim chunk, CHUNKED)."""
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps, "num_stages": num_stages, **(options or {})}


def configs(kernel: str, dtype: torch.dtype, device: torch.device, head_dim: int, value_dim: int,
            light: bool = False) -> list[dict]:
    """The configs `kernel` ("forward", "query_gradients", "key_gradients") can launch with for these tensors:
    the autotune list on CUDA (`light`: a launch without attention mask and dropout, see _LIGHT_GPU_CONFIGS),
    the single interpreter config on CPU.

    Lists are given for padded head dims up to 64, 128 and 256. Past 256 (head dims of 512 or 1024 work too)
    the 256 list's tiles shrink in proportion, down to MIN_DOT_SIZE, with one stage, so that the register and
    shared-memory tiles stay the size they are at 256 (a CHUNK stays: several chunks then). The backward kernels'
    configs always hold "CHUNK" (0 where the list sets none; forced_chunk's width inside its block)."""
    width = max(_padded(head_dim), _padded(value_dim))
    where = unit(dtype, device)
    if where == "interpreter":
        block_m, block_n, num_warps, num_stages = _INTERPRETER_CONFIGS[kernel]
        shrink = max(width // 64, 1)
        chosen = [_config(max(MIN_DOT_SIZE, block_m // shrink), max(MIN_DOT_SIZE, block_n // shrink), num_warps,
                          num_stages)]
    else:
        lists = (_LIGHT_GPU_CONFIGS if light else _GPU_CONFIGS).get((kernel, where)) or _GPU_CONFIGS[kernel, where]
        if width <= 256:
            chosen = [_config(*tile) for tile in lists[max(width, 64)]]
        else:
            shrink = width // 256
            chosen = [_config(max(MIN_DOT_SIZE, block_m // shrink), max(MIN_DOT_SIZE, block_n // shrink), num_warps,
                              1, *options) for block_m, block_n, num_warps, _, *options in lists[256]]
    if kernel in CHUNKED:
        for config in chosen:
            config["CHUNK"] = config.get("CHUNK", 0) if _forced_chunk is None else _forced_chunk
    return chosen


@contextlib.contextmanager
def forced_chunk(width: int):
    """Within the block the backward kernels run head-dim chunked, `width` columns per chunk (a power of two >=
    MIN_DOT_SIZE), whatever `configs` would choose: how the tests reach the chunked kernels under the
    interpreter."""
    global _forced_chunk
    if width < MIN_DOT_SIZE or width & (width - 1):
        raise ValueError(f"width: expected a power of two >= {MIN_DOT_SIZE}, got {width}")
    before, _forced_chunk = _forced_chunk, width
    try:
        yield
    finally:
        _forced_chunk = before


def _chunks(config: dict, arguments: dict) -> int:
    """The backward grid's third axis: the head-dim chunks of a CHUNK config (1 without)."""
    if not config["CHUNK"]:
        return 1
    return triton.cdiv(max(arguments["BLOCK_D"], arguments["BLOCK_DV"]), config["CHUNK"])


def _launch_kernel(kernel, name: str, arguments: dict, grid):
    """`kernel` launched over `grid` (meta -> grid) with the configs of `name` for these arguments."""
    like = arguments["q_ptr"]
    light = not (arguments["HAS_MASK"] or arguments["DROPOUT"])
    choices = configs(name, like.dtype, like.device, arguments["D"], arguments["Dv"], light)
    return launch_tuned(kernel, choices, choices[0], grid, like.device, _TUNING_KEY)


def _head_blocks(head_dim: int, value_dim: int) -> dict:
    return {"BLOCK_D": _padded(head_dim), "BLOCK_DV": _padded(value_dim)}


def _rows(tensor: Tensor) -> Tensor:
    """`tensor` with stride(-1) == 1, as the kernels address it (a copy only if it is not)."""
    return tensor if tensor.stride(-1) == 1 or tensor.shape[-1] <= 1 else tensor.contiguous()


def _same(name: str, tensor: Tensor, like: Tensor) -> None:
    if tensor.dtype != like.dtype or tensor.device != like.device:
        raise DTypeError(f"{name}: expected {like.dtype} on {like.device} (as q), "
                         f"got {tensor.dtype} on {tensor.device}")


def _check_shape(name: str, tensor: Tensor, shape: tuple) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ShapeError(f"{name}: expected shape {tuple(shape)}, got {tuple(tensor.shape)}")


def _check_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, cu_seqlens_q: Tensor | None,
                     cu_seqlens_k: Tensor | None, dropout_p: float, dropout_seed: Tensor | None) -> Tensor | None:
    """The checks the forward and the backward share -> attn_mask expanded to (B,Hq,Lq,Lk) (zero strides
    where it broadcasts), or None."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise DTypeError(f"q: the Triton flash attention kernels support float32, float64, bfloat16, float16; "
                         f"got {q.dtype}")
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        _same(name, tensor, q)
        if tensor.dim() != 4:
            raise ShapeError(f"{name}: expected a 4-D (B,H,L,D) tensor, got shape {tuple(tensor.shape)}")
    batch, heads, rows_q, head_dim = q.shape
    kv_heads, rows_k = k.shape[1], k.shape[2]
    _check_shape("k", k, (batch, kv_heads, rows_k, head_dim))
    _check_shape("v", v, (batch, kv_heads, rows_k, v.shape[3]))
    if (kv_heads == 0 and heads) or (kv_heads and heads % kv_heads):
        raise ShapeError(f"k: expected a number of heads dividing q's {heads}, got {kv_heads}")
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ShapeError("cu_seqlens_q, cu_seqlens_k: expected both or neither")
    if cu_seqlens_q is not None:
        for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1 or cu.device != q.device:
                raise ShapeError(f"{name}: expected a 1-D int32 tensor of N+1 offsets on {q.device}, got "
                                 f"{cu.dtype} of shape {tuple(cu.shape)} on {cu.device}")
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise ShapeError(f"cu_seqlens_k: expected {cu_seqlens_q.numel()} offsets (as cu_seqlens_q), "
                             f"got {cu_seqlens_k.numel()}")
        if batch != 1 or attn_mask is not None:
            raise ShapeError(f"q, attn_mask: variable lengths need B == 1 and no attn_mask, got B == {batch}"
                             f"{' and a mask' if attn_mask is not None else ''}")
    if not 0 <= dropout_p < 1:
        raise ShapeError(f"dropout_p: expected a probability in [0, 1), got {dropout_p}")
    if dropout_p > 0 and (dropout_seed is None or dropout_seed.dtype != torch.int64 or dropout_seed.numel() != 1
                          or dropout_seed.device != q.device):
        raise DTypeError(f"dropout_seed: expected an int64 tensor of shape () on {q.device} when dropout_p > 0, got "
                         f"{None if dropout_seed is None else (dropout_seed.dtype, tuple(dropout_seed.shape))}")
    if attn_mask is None:
        return None
    _same("attn_mask", attn_mask, q)
    try:
        return attn_mask.expand(batch, heads, rows_q, rows_k)  # the kernels take any mask strides
    except RuntimeError:
        raise ShapeError(f"attn_mask: expected a shape broadcastable to {(batch, heads, rows_q, rows_k)}, "
                         f"got {tuple(attn_mask.shape)}") from None


def _sequences(cu_seqlens: Tensor | None, batch: int, rows: int, max_seqlen: int) -> tuple[int, int]:
    """(number of sequences, the longest's length): the grid's extent over sequences and over blocks."""
    if cu_seqlens is None:
        return batch, rows
    return cu_seqlens.numel() - 1, max(max_seqlen, 0)


def _arguments(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, cu_seqlens_q: Tensor | None,
               cu_seqlens_k: Tensor | None, scale: float, window_left: int, window_right: int, bottom_right: bool,
               dropout_p: float, dropout_seed: Tensor | None) -> dict:
    """The kernel arguments the forward and the two gradient kernels share, by name."""
    # "No window" becomes a width no sequence reaches (rows of q plus rows of k): the kernels' plain
    # comparisons then see every key, and int32 cannot overflow.
    unbounded = q.shape[2] + k.shape[2]
    prescale = dot_operand_dtype(q.dtype, q.device) in (tl.float32, tl.float64)
    return {
        "q_ptr": q, "k_ptr": k, "v_ptr": v, "mask_ptr": mask, "cu_seqlens_q_ptr": cu_seqlens_q,
        "cu_seqlens_k_ptr": cu_seqlens_k, "seed_ptr": dropout_seed if dropout_p > 0 else None,
        "stride_qb": q.stride(0), "stride_qh": q.stride(1), "stride_ql": q.stride(2),
        "stride_kb": k.stride(0), "stride_kh": k.stride(1), "stride_kl": k.stride(2),
        "stride_vb": v.stride(0), "stride_vh": v.stride(1), "stride_vl": v.stride(2),
        "stride_mb": mask.stride(0) if mask is not None else 0, "stride_mh": mask.stride(1) if mask is not None else 0,
        "stride_mi": mask.stride(2) if mask is not None else 0, "stride_mj": mask.stride(3) if mask is not None else 0,
        "Hq": q.shape[1], "group": q.shape[1] // max(k.shape[1], 1), "rows_q": q.shape[2], "rows_k": k.shape[2],
        "D": q.shape[3], "Dv": v.shape[3],
        "window_left": unbounded if window_left < 0 else min(window_left, unbounded),
        "window_right": unbounded if window_right < 0 else min(window_right, unbounded),
        "bottom_right": int(bool(bottom_right)), "dropout_threshold": reference.dropout_threshold(dropout_p),
        # Runtime floats (a new scale or dropout_p compiles nothing), each as two float32 halves (float_halves).
        **float_halves("scale", float(scale)), **float_halves("dropout_scale", 1 / (1 - dropout_p)),
        # Where q enters tl.dot in ACC's precision (float32, float64; bfloat16 under the interpreter), it is scaled
        # first, as the C++ kernels do: the scores are (scale q) . k with q rounded once, not q . k rounded and
        # multiplied (which left SDPA's float32 error 2.1x behind on a saturated OpInfo sample). A 16-bit
        # operand on a GPU would round scale q to 16 bits: there the product is scaled.
        "PRESCALE": prescale,
        "VARLEN": cu_seqlens_q is not None, "HAS_MASK": mask is not None, "DROPOUT": dropout_p > 0,
        "ACC": accumulator_dtype(q.dtype), "DOT": dot_operand_dtype(q.dtype, q.device),
        "PRECISION": dot_precision(q.dtype, q.device, FLOAT32_PRECISION), **_head_blocks(q.shape[3], v.shape[3]),
    }


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for every input dtype (csrc/ops.cpp): the backward splits it into two accumulator halves."""
    return torch.float64


def flash_attention_forward(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, cu_seqlens_q: Tensor | None,
                            cu_seqlens_k: Tensor | None, max_seqlen_q: int, max_seqlen_k: int, scale: float,
                            window_left: int, window_right: int, bottom_right: bool, dropout_p: float,
                            dropout_seed: Tensor | None) -> tuple[Tensor, Tensor]:
    """q (B,Hq,Lq,D), k (B,Hkv,Lk,D), v (B,Hkv,Lk,Dv) -> out (B,Hq,Lq,Dv), lse (B,Hq,Lq) (seqkern/ops/_schemas.py)."""
    mask = _check_attention(q, k, v, attn_mask, cu_seqlens_q, cu_seqlens_k, dropout_p, dropout_seed)
    q, k, v = _rows(q), _rows(k), _rows(v)
    batch, heads, rows_q, head_dim = q.shape
    out = q.new_empty(batch, heads, rows_q, v.shape[3])
    lse = q.new_empty(batch, heads, rows_q, dtype=_lse_dtype(q.dtype))
    sequences, longest_q = _sequences(cu_seqlens_q, batch, rows_q, max_seqlen_q)
    if longest_q and sequences * heads:
        arguments = _arguments(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, scale, window_left, window_right,
                               bottom_right, dropout_p, dropout_seed)
        grid = lambda meta: (triton.cdiv(longest_q, meta["BLOCK_M"]), sequences * heads)  # noqa: E731
        _launch_kernel(_forward_kernel, "forward", arguments, grid)(out_ptr=out, lse_ptr=lse, **arguments)
    return out, lse


def flash_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                             attn_mask: Tensor | None, cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None,
                             max_seqlen_q: int, max_seqlen_k: int, scale: float, window_left: int, window_right: int,
                             bottom_right: bool, dropout_p: float, dropout_seed: Tensor | None,
                             want_grad_scores: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of flash_attention_forward from grad_out (B,Hq,Lq,Dv) and its out, lse -> grad_q (B,Hq,Lq,D),
    grad_k (B,Hkv,Lk,D), grad_v (B,Hkv,Lk,Dv), grad_scores (B,Hq,Lq,Lk) or empty (seqkern/ops/_schemas.py)."""
    mask = _check_attention(q, k, v, attn_mask, cu_seqlens_q, cu_seqlens_k, dropout_p, dropout_seed)
    batch, heads, rows_q, head_dim = q.shape
    for name, tensor in (("grad_out", grad_out), ("out", out)):
        _same(name, tensor, q)
        _check_shape(name, tensor, (batch, heads, rows_q, v.shape[3]))
    _check_shape("lse", lse, (batch, heads, rows_q))
    if lse.dtype != _lse_dtype(q.dtype):
        raise DTypeError(f"lse: expected {_lse_dtype(q.dtype)} (as the forward returns it), got {lse.dtype}")
    q, k, v, grad_out, out, lse = _rows(q), _rows(k), _rows(v), _rows(grad_out), _rows(out), lse.contiguous()

    grad_q = torch.empty_like(q, memory_format=torch.contiguous_format)
    grad_k = torch.empty_like(k, memory_format=torch.contiguous_format)
    grad_v = torch.empty_like(v, memory_format=torch.contiguous_format)
    # Zeros: the kernels write dS only where it can be non-zero (visible key blocks of each sequence).
    grad_scores = q.new_zeros(batch, heads, rows_q, k.shape[2]) if want_grad_scores else q.new_empty(0)
    delta = torch.empty(lse.shape, dtype=torch.float64, device=q.device)
    arguments = _arguments(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, scale, window_left, window_right, bottom_right,
                           dropout_p, dropout_seed)
    arguments.update(grad_out_ptr=grad_out, lse_ptr=lse, delta_ptr=delta, stride_gb=grad_out.stride(0),
                     stride_gh=grad_out.stride(1), stride_gl=grad_out.stride(2))
    # The dQ kernel first: it computes delta, which the dK/dV kernel reads.
    sequences, longest_q = _sequences(cu_seqlens_q, batch, rows_q, max_seqlen_q)
    if longest_q and sequences * heads:
        grid = lambda meta: (triton.cdiv(longest_q, meta["BLOCK_M"]), sequences * heads,  # noqa: E731
                             _chunks(meta, arguments))
        _launch_kernel(_query_gradients_kernel, "query_gradients", arguments, grid)(
            grad_q_ptr=grad_q, grad_scores_ptr=grad_scores if want_grad_scores else None,
            GRAD_SCORES=bool(want_grad_scores), **arguments,
        )
    sequences, longest_k = _sequences(cu_seqlens_k, batch, k.shape[2], max_seqlen_k)
    if longest_k and sequences * k.shape[1]:
        grid = lambda meta: (triton.cdiv(longest_k, meta["BLOCK_N"]), sequences * k.shape[1],  # noqa: E731
                             _chunks(meta, arguments))
        _launch_kernel(_key_gradients_kernel, "key_gradients", arguments, grid)(
            grad_k_ptr=grad_k, grad_v_ptr=grad_v, **arguments)
    return grad_q, grad_k, grad_v, grad_scores
