"""Scaled-dot-product attention in plain PyTorch: the oracle of the flash attention kernels.

It materializes the (Lq, Lk) scores, which the kernels never do. Signatures and results are those of
torch.ops.seqkern.flash_attention_forward / _backward / _decode (seqkern/ops/_schemas.py has the contracts):

    score(i, j) = scale * q_i . k_j + attn_mask[i, j]      over the keys visible to query i
    p(i, j) = exp(score(i, j) - lse_i),   lse_i = log sum_j exp(score(i, j))
    out_i = sum_j p(i, j) keep(i, j) / (1 - dropout_p) v_j

The dropout mask is a counter-based hash of (seed, head, i, j): every implementation draws the same mask
for the same seed without storing it, and the backward redraws it. `dropout_bits` is its definition.
"""
from __future__ import annotations

import torch
from torch import Tensor

_U32 = 0xFFFFFFFF
# Multipliers of the "lowbias32" integer hash (C. Wellons, hash-prospector): full avalanche in 2 rounds.
_MIX_1, _MIX_2 = 0x21F0AAAD, 0xD35A2D97
_GOLDEN = 0x9E3779B1


def _mul_u32(x: Tensor, constant: int) -> Tensor:
    """(x * constant) mod 2^32 for uint32 values held in int64, without int64 overflow (16-bit halves)."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _U32


def _mix(x: Tensor) -> Tensor:
    """lowbias32: x ^= x >> 16; x *= 0x21F0AAAD; x ^= x >> 15; x *= 0xD35A2D97; x ^= x >> 15 (all mod 2^32)."""
    x = x ^ (x >> 16)
    x = _mul_u32(x, _MIX_1)
    x = x ^ (x >> 15)
    x = _mul_u32(x, _MIX_2)
    return x ^ (x >> 15)


def dropout_bits(seed: Tensor | int, head: Tensor | int, i: Tensor, j: Tensor) -> Tensor:
    """The 32 random bits (int64 in [0, 2^32)) that decide whether probability (i, j) of `head` is kept.

    head = sequence * Hq + query head; i, j are query and key indices inside the sequence. Broadcasts.
        seed_lo, seed_hi = the low and high 32 bits of the int64 seed (two's complement)
        head_key = mix(mix(seed_lo ^ head) ^ seed_hi)
        row_key  = mix(head_key ^ i)
        bits     = mix(row_key ^ (j * 0x9E3779B1 mod 2^32))
    """
    seed = torch.as_tensor(seed, dtype=torch.int64, device=i.device)
    head = torch.as_tensor(head, dtype=torch.int64, device=i.device)
    seed_lo, seed_hi = seed & _U32, (seed >> 32) & _U32
    head_key = _mix(_mix(seed_lo ^ head) ^ seed_hi)
    row_key = _mix(head_key ^ i.to(torch.int64))
    return _mix(row_key ^ _mul_u32(j.to(torch.int64), _GOLDEN))


def dropout_threshold(dropout_p: float) -> int:
    """A probability is kept iff its bits >= this: floor(p * 2^32), kept with probability 1 - p."""
    return min(int(dropout_p * 2**32), _U32)


def apply_dropout(probs: Tensor, seed: Tensor, dropout_p: float, first_sequence: int = 0) -> Tensor:
    """probs (B,H,Lq,Lk) of sequences first_sequence.. -> the kept ones scaled by 1 / (1 - p), the others 0:
    the mask every implementation draws for this seed."""
    batch, heads, len_q, len_k = probs.shape
    device = probs.device
    head = (torch.arange(batch, device=device)[:, None] + first_sequence) * heads + torch.arange(heads, device=device)
    bits = dropout_bits(seed, head[:, :, None, None], torch.arange(len_q, device=device)[:, None],
                        torch.arange(len_k, device=device)[None, :])
    return probs * (bits >= dropout_threshold(dropout_p)).to(probs.dtype) / (1 - dropout_p)


def visible(
    len_q: int, len_k: int, window_left: int, window_right: int, bottom_right: bool, device=None
) -> Tensor:
    """(len_q, len_k) bool: which keys each query sees (seqkern/ops/_schemas.py: the visibility rule)."""
    i = torch.arange(len_q, device=device)[:, None]
    j = torch.arange(len_k, device=device)[None, :]
    diagonal = i + (len_k - len_q if bottom_right else 0)
    seen = torch.ones(len_q, len_k, dtype=torch.bool, device=device)
    if window_left >= 0:
        seen &= j >= diagonal - window_left
    if window_right >= 0:
        seen &= j <= diagonal + window_right
    return seen


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """flash_attention_decode's lse dtype (flash_attention_forward's is float64 for every input: csrc/ops.cpp)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dense(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float, window_left: int, window_right: int,
    bottom_right: bool, dropout_p: float, dropout_seed: Tensor | None, first_sequence: int,
    lse_dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """Attention over B equal-length sequences numbered first_sequence.. (for the dropout heads).

    q (B,Hq,Lq,D), k (B,Hkv,Lk,D), v (B,Hkv,Lk,Dv), attn_mask broadcastable to (B,Hq,Lq,Lk)
    -> out (B,Hq,Lq,Dv) in q's dtype, lse (B,Hq,Lq) in lse_dtype (from float64 scores when it is float64).
    """
    heads, len_q = q.shape[1:3]
    len_k = k.shape[2]
    compute = _compute_dtype(q.dtype)
    group = heads // k.shape[1]
    qc = q.to(compute)
    kc = k.to(compute).repeat_interleave(group, dim=1)
    vc = v.to(compute).repeat_interleave(group, dim=1)
    scores = scale * (qc @ kc.transpose(-1, -2))
    if attn_mask is not None:
        scores = scores + attn_mask.to(compute)
    hidden = ~visible(len_q, len_k, window_left, window_right, bottom_right, q.device)
    scores = scores.masked_fill(hidden, float("-inf"))
    # A row whose keys are all hidden (by the window or a -inf mask): out 0, lse -inf, no NaN either way (the
    # softmax of a finite stand-in). Scores that are -inf because of the data (an infinite query or key) are not
    # hidden: a row of them is NaN, as in the composed softmax. A -inf mask entry is a score like any other
    # otherwise: probability 0, and its gradient 0 * (dP - delta), NaN in a NaN row as in torch.
    masked_out = hidden if attn_mask is None else hidden | (attn_mask == float("-inf"))
    dead = masked_out.all(dim=-1, keepdim=True)
    scores = scores.masked_fill(dead, 0.0)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    # softmax, not exp(scores - lse): in a row with a +inf score it is NaN throughout, as the composed softmax
    # (exp(scores - lse) would be NaN only at the +inf score and 0 beside it).
    probs = torch.softmax(scores, dim=-1).masked_fill(dead, 0.0)
    if lse_dtype == torch.float64:  # the op's lse: as precise as the rounded scores allow (csrc/ops.cpp)
        lse = torch.logsumexp(scores.detach().double(), dim=-1, keepdim=True)
    if dropout_p > 0:
        probs = apply_dropout(probs, dropout_seed, dropout_p, first_sequence)
    out = (probs @ vc).to(q.dtype)
    return out, lse.squeeze(-1).masked_fill(dead.squeeze(-1), float("-inf")).to(lse_dtype)


def flash_attention_forward(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None, max_seqlen_q: int, max_seqlen_k: int, scale: float, window_left: int,
    window_right: int, bottom_right: bool, dropout_p: float, dropout_seed: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """-> out (B,Hq,Lq,Dv), lse (B,Hq,Lq). Variable lengths run sequence by sequence."""
    flags = (scale, window_left, window_right, bottom_right, dropout_p, dropout_seed)
    if cu_seqlens_q is None:
        return _dense(q, k, v, attn_mask, *flags, first_sequence=0)
    batch, heads = q.shape[:2]
    outs = [q.new_empty(batch, heads, 0, v.shape[-1])]
    lses = [q.new_empty(batch, heads, 0, dtype=torch.float64)]
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for n in range(len(bounds_q) - 1):
        rows, keys = slice(bounds_q[n], bounds_q[n + 1]), slice(bounds_k[n], bounds_k[n + 1])
        out, lse = _dense(q[:, :, rows], k[:, :, keys], v[:, :, keys], None, *flags, first_sequence=n)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def flash_attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, attn_mask: Tensor | None,
    cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None, max_seqlen_q: int, max_seqlen_k: int, scale: float,
    window_left: int, window_right: int, bottom_right: bool, dropout_p: float, dropout_seed: Tensor | None,
    want_grad_scores: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> grad_q, grad_k, grad_v, grad_scores (B,Hq,Lq,Lk) or empty: by autograd through the forward above."""
    if want_grad_scores and attn_mask is None:
        raise ValueError("want_grad_scores needs an attn_mask (the reference reads dL/dscore off the mask)")
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    mask = None
    if attn_mask is not None:
        mask = attn_mask.detach().expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2]).clone()
        mask.requires_grad_(want_grad_scores)
    with torch.enable_grad():
        result, _ = flash_attention_forward(
            q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
            window_right, bottom_right, dropout_p, dropout_seed,
        )
        inputs = (q, k, v) + ((mask,) if want_grad_scores else ())
        grads = torch.autograd.grad(result, inputs, grad_out, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]
    grad_scores = grads[3] if want_grad_scores else q.new_empty(0)
    return grads[0], grads[1], grads[2], grad_scores


def flash_attention_decode(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor | None, scale: float, is_causal: bool,
    window_left: int, num_splits: int,
) -> tuple[Tensor, Tensor]:
    """-> out (B,Hq,Lq,Dv), lse (B,Hq,Lq): each sequence's queries are the last Lq of its cache_seqlens[b] keys."""
    lengths = [k_cache.shape[2]] * q.shape[0] if cache_seqlens is None else cache_seqlens.tolist()
    outs, lses = [], []
    for b, length in enumerate(lengths):
        keys = slice(0, length)
        out, lse = _dense(
            q[b : b + 1], k_cache[b : b + 1, :, keys], v_cache[b : b + 1, :, keys], None, scale, window_left,
            0 if is_causal else -1, True, 0.0, None, first_sequence=b, lse_dtype=_lse_dtype(q.dtype),
        )
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)
