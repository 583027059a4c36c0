"""The counter-based hash behind every random mask of seqkern's Triton kernels (attention dropout, recurrent
zoneout): seqkern/reference/flash_attention.py's dropout_bits bit for bit, so that every implementation draws the
same mask from the same seed and a backward redraws it instead of storing it."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _mix(x):
    """lowbias32 on uint32 (wrapping multiplies): seqkern.reference.flash_attention._mix bit for bit.
    The multipliers are built as uint32 explicitly: as plain literals they would not fit int32 and make the
    products int64, which does not wrap at 2^32."""
    x = x ^ (x >> 16)
    x = x * tl.full((), 0x21F0AAAD, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full((), 0xD35A2D97, tl.uint32)
    return x ^ (x >> 15)


@triton.jit
def _head_key(seed_ptr, head):
    """mix(mix(seed_lo ^ head) ^ seed_hi) of the int64 seed at seed_ptr; head = sequence * Hq + query head."""
    seed = tl.load(seed_ptr)
    seed_lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    seed_hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return _mix(_mix(seed_lo ^ head.to(tl.uint32)) ^ seed_hi)


@triton.jit
def _kept(head_key, ii, jj, threshold):
    """Which probabilities (ii, jj) survive dropout: dropout_bits >= threshold. ii, jj broadcast to the tile
    ((M,1) and (1,N), or transposed); the row key is mixed once per row, the column term once per column."""
    row_key = _mix(head_key ^ ii.to(tl.uint32))
    column = jj.to(tl.uint32) * tl.full((), 0x9E3779B1, tl.uint32)
    return _mix(row_key ^ column) >= threshold
