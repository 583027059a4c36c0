"""Flash attention: fake implementations, autograd, Triton registration, and the functional API.

torch.ops.seqkern.flash_attention_forward / _backward / _decode have their contracts in seqkern/ops/_schemas.py. The public
functions here (`attention`, `attention_varlen`, `attention_decode`, exported as seqkern.attention, ...) check
the user's arguments, turn the SDPA-style options (bool masks, is_causal, window_size, causal_alignment,
enable_gqa) into the ops' one visibility rule, draw the dropout seed from torch's generator, and pick the
implementation (seqkern.backend).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from seqkern import backends, reference
from seqkern._checks import DTypeError, ShapeError, check_floating, check_tensor
from seqkern.reference.flash_attention import visible
from seqkern.ops._contract import ATTENTION_DTYPES, Contract
from seqkern.ops._registry import (
    Autograd, differentiated, empty, kernel_scope, register_no_autograd, register_ops, run_op, save_inputs,
    saved_inputs, zeros_if_none,
)

SUPPORTED_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
    "triton": (torch.float32, torch.float64, torch.bfloat16, torch.float16),  # math in float32
}
ALIGNMENTS = ("top_left", "bottom_right")


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the lse the public functions (and flash_attention_decode) return."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# flash_attention_forward's lse is float64 for every input dtype: the backward recomputes P = exp(s - lse), and the
# largest P of a saturated row (near 1) needs lse to ~1e-7 absolute where a float32 lse of magnitude 200 is only
# within 8e-6 (seqkern/ops/_schemas.py). The kernels split it into two accumulation-dtype halves per row.
OP_LSE_DTYPE = torch.float64


# Fake implementations: the ops' contract (shapes, dtypes; see _contract.py) and their result shapes.
def _check_forward(contract: Contract, q, k, v, attn_mask, cu_seqlens_q, cu_seqlens_k, scale, dropout_p,
                   dropout_seed) -> None:
    """The arguments flash_attention_forward and _backward share (csrc/cpu/flash_attention.cpp make_problem)."""
    contract.supported_dtype(q, "q")
    contract.dims(q, 4, "(B, Hq, Lq, D)", "q")
    contract.dims(k, 4, "(B, Hkv, Lk, D)", "k")
    contract.dims(v, 4, "(B, Hkv, Lk, Dv)", "v")
    batch, heads, len_q, dim = q.shape
    kv_heads, len_k = k.shape[1], k.shape[2]
    contract.tensor(k, q, (batch, kv_heads, len_k, dim), "k")
    contract.tensor(v, q, (batch, kv_heads, len_k, v.shape[3]), "v")
    for name, t in (("q", q), ("k", k), ("v", v)):
        contract.last_dim_contiguous(t, name)
    contract.check(heads % kv_heads == 0 if kv_heads > 0 else heads == 0,
                   f"the {heads} query heads must be a multiple of the {kv_heads} kv heads")
    if attn_mask is not None:
        contract.tensor(attn_mask, q, (batch, heads, len_q, len_k), "attn_mask")
        contract.last_dim_contiguous(attn_mask, "attn_mask")
    contract.check(math.isfinite(scale), f"scale must be finite, got {scale}")
    contract.check(0 <= dropout_p < 1, f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0:
        contract.check(dropout_seed is not None, "dropout_p > 0 needs a dropout_seed")
        contract.check(dropout_seed.dtype == torch.int64 and dropout_seed.numel() == 1,
                       f"dropout_seed must be an int64 tensor with one element, got {dropout_seed.dtype} "
                       f"{tuple(dropout_seed.shape)}")
    contract.check((cu_seqlens_q is None) == (cu_seqlens_k is None), "cu_seqlens_q and cu_seqlens_k must be given together")
    if cu_seqlens_q is not None:
        contract.check(batch == 1, f"variable lengths (cu_seqlens) need B == 1, got B = {batch}")
        contract.check(attn_mask is None, "attn_mask must be None with cu_seqlens")
        for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            contract.check(cu.dtype == torch.int32, f"{name} must be int32, got {cu.dtype}")
            contract.check(cu.dim() == 1 and cu.shape[0] >= 1, f"{name} must be (N+1,), got shape {tuple(cu.shape)}")
        contract.check(cu_seqlens_q.shape[0] == cu_seqlens_k.shape[0],
                       "cu_seqlens_q and cu_seqlens_k must have the same length")


def _forward_fake(q, k, v, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
                  window_right, bottom_right, dropout_p, dropout_seed):
    _check_forward(Contract("flash_attention_forward", ATTENTION_DTYPES), q, k, v, attn_mask, cu_seqlens_q,
                   cu_seqlens_k, scale, dropout_p, dropout_seed)
    batch, heads, len_q = q.shape[:3]
    return q.new_empty(batch, heads, len_q, v.shape[-1]), q.new_empty(batch, heads, len_q, dtype=OP_LSE_DTYPE)


def _backward_fake(grad_out, q, k, v, out, lse, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                   scale, window_left, window_right, bottom_right, dropout_p, dropout_seed, want_grad_scores):
    contract = Contract("flash_attention_backward", ATTENTION_DTYPES)
    _check_forward(contract, q, k, v, attn_mask, cu_seqlens_q, cu_seqlens_k, scale, dropout_p, dropout_seed)
    rows = (*q.shape[:3], v.shape[3])
    for name, t in (("grad_out", grad_out), ("out", out)):
        contract.tensor(t, q, rows, name)
        contract.last_dim_contiguous(t, name)
    contract.tensor(lse, q, q.shape[:3], "lse", dtype=OP_LSE_DTYPE)
    scores = q.new_empty(*q.shape[:3], k.shape[2]) if want_grad_scores else empty(q)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), scores


def _decode_fake(q, k_cache, v_cache, cache_seqlens, scale, is_causal, window_left, num_splits):
    contract = Contract("flash_attention_decode", ATTENTION_DTYPES)
    for name, t, layout in (("q", q, "(B, Hq, Lq, D)"), ("k_cache", k_cache, "(B, Hkv, S, D)"),
                            ("v_cache", v_cache, "(B, Hkv, S, Dv)")):
        contract.supported_dtype(t, name)
        contract.like(t, q, name)
        contract.dims(t, 4, layout, name)
        contract.last_dim_contiguous(t, name)
    batch, heads, _, dim = q.shape
    kv_heads, size = k_cache.shape[1], k_cache.shape[2]
    contract.check(kv_heads >= 1 and heads % kv_heads == 0,
                   f"the query heads ({heads}) must be a multiple of the kv heads ({kv_heads})")
    contract.shape(k_cache, (batch, kv_heads, size, dim), "k_cache")
    contract.shape(v_cache, (batch, kv_heads, size, v_cache.shape[3]), "v_cache")
    contract.check(num_splits >= 0, f"num_splits must be >= 0, got {num_splits}")
    if cache_seqlens is not None:
        contract.check(cache_seqlens.dtype == torch.int32, f"cache_seqlens must be int32, got {cache_seqlens.dtype}")
        contract.shape(cache_seqlens, (batch,), "cache_seqlens")
    return q.new_empty(*q.shape[:3], v_cache.shape[-1]), q.new_empty(q.shape[:3], dtype=_lse_dtype(q.dtype))


def _setup_context(ctx, inputs, output):
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.has_mask = inputs[3] is not None
    save_inputs(ctx, inputs, out, lse)


def _backward(ctx, grad_out, _grad_lse):
    inputs, (out, lse) = saved_inputs(ctx)
    q, k, v, attn_mask, cu_seqlens_q, cu_seqlens_k, *flags, dropout_seed = inputs
    max_seqlen_q, max_seqlen_k, scale, window_left, window_right, bottom_right, dropout_p = flags
    want_grad_scores = ctx.has_mask and ctx.needs_input_grad[3]
    args = (_last_dim_contiguous(zeros_if_none(grad_out, out)), q, k, v, out, lse, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
            window_left, window_right, bottom_right, dropout_p, dropout_seed, want_grad_scores)
    impl = _impl(q)
    if impl == "reference":  # e.g. the forward ran under backend("cpu"), the backward under "reference"
        grad_q, grad_k, grad_v, grad_scores = reference.flash_attention_backward(*args)
    else:
        with kernel_scope(impl, q.device):
            grad_q, grad_k, grad_v, grad_scores = torch.ops.seqkern.flash_attention_backward(*args)
    return (grad_q, grad_k, grad_v, grad_scores if want_grad_scores else None) + (None,) * 10


def _impl(like: Tensor) -> str:
    return backends.resolve("flash_attention", like.device, like.dtype, SUPPORTED_DTYPES,
                            kernel="flash_attention_forward")


register_ops(
    fakes={"flash_attention_forward": _forward_fake, "flash_attention_backward": _backward_fake},
    autograd={"flash_attention_forward": Autograd(_backward, _setup_context, reference.flash_attention_forward, (0,))},
    triton_module="seqkern.kernels.flash_attention",
)
register_ops(
    fakes={"flash_attention_decode": _decode_fake}, autograd={}, triton_module="seqkern.kernels.flash_attention_decode"
)
register_no_autograd("flash_attention_decode", "it is for inference; seqkern.attention_decode runs the "
                     "differentiable reference when its inputs require grad, or use seqkern.attention")


# ------------------------------------------------------------------------------------------------------------
# Argument checks shared by the public functions.
# ------------------------------------------------------------------------------------------------------------
def _check_qkv(q: Tensor, k: Tensor, v: Tensor, names: tuple[str, str, str], ndims: tuple[int, ...]) -> None:
    """Same dtype and device; q (..., Hq, Lq, D), k (..., Hkv, Lk, D), v (..., Hkv, Lk, Dv)."""
    for name, t in zip(names, (q, k, v)):
        check_tensor(name, t)
        check_floating(name, t)
        if t.dim() not in ndims:
            expected = " or ".join(f"{n}-D" for n in ndims)
            raise ShapeError(f"{name}: expected a {expected} tensor, got shape {tuple(t.shape)}")
    for name, t in zip(names[1:], (k, v)):
        if t.dtype != q.dtype:
            raise DTypeError(f"{name}: expected dtype {q.dtype} (as {names[0]}), got {t.dtype}")
        if t.device != q.device:
            raise DTypeError(f"{name}: expected a tensor on {q.device} (as {names[0]}), got one on {t.device}")
        if t.dim() != q.dim():
            raise ShapeError(f"{name}: expected {q.dim()} dims (as {names[0]} {tuple(q.shape)}), got {tuple(t.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ShapeError(f"{names[1]}: expected head dim {q.shape[-1]} (the last dim of {names[0]} "
                         f"{tuple(q.shape)}), got shape {tuple(k.shape)}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ShapeError(f"{names[2]}: expected shape {tuple(k.shape[:-1])} + (Dv,) (as {names[1]} "
                         f"{tuple(k.shape)}), got {tuple(v.shape)}")
    if q.dim() == 4 and k.shape[0] != q.shape[0]:
        raise ShapeError(f"{names[1]}: expected batch {q.shape[0]} (as {names[0]} {tuple(q.shape)}), "
                         f"got shape {tuple(k.shape)}")


def _check_heads(q_heads: int, kv_heads: int, enable_gqa: bool) -> None:
    if q_heads == kv_heads:
        return
    if not enable_gqa:
        raise ShapeError(f"key/value: expected {q_heads} heads (as query), got {kv_heads}; pass enable_gqa=True "
                         "for grouped-query attention")
    if kv_heads == 0 or q_heads % kv_heads:
        raise ShapeError(f"key/value: grouped-query attention needs the query heads ({q_heads}) to be a multiple "
                         f"of the key/value heads, got {kv_heads}")


def _window(window_size, is_causal: bool) -> tuple[int, int]:
    """(window_left, window_right) with -1 for unbounded; is_causal caps the right side at 0."""
    if window_size is None:
        left, right = -1, -1
    else:
        if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2
                and all(isinstance(w, int) or w is None for w in window_size)):
            raise ShapeError(f"window_size: expected (left, right) ints (-1 or None: unbounded), got {window_size!r}")
        left, right = (-1 if w is None or w < 0 else w for w in window_size)
    if is_causal:
        right = 0
    return left, right


def _check_alignment(causal_alignment: str) -> bool:
    if causal_alignment not in ALIGNMENTS:
        raise ShapeError(f"causal_alignment: expected one of {ALIGNMENTS}, got {causal_alignment!r}")
    return causal_alignment == "bottom_right"


def _check_dropout(dropout_p: float) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ShapeError(f"dropout_p: expected a probability in [0, 1), got {dropout_p}")


def dropout_seed(dropout_p: float, device: torch.device) -> Tensor | None:
    """A fresh int64 seed from torch's generator (so torch.manual_seed reproduces the mask), or None."""
    if dropout_p == 0.0:
        return None
    return torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64, device=device)


def hiding_mask(hidden: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask, True where a score is hidden -> the additive mask in `dtype`: -inf there, 0 elsewhere."""
    return torch.zeros(hidden.shape, dtype=dtype, device=hidden.device).masked_fill(hidden, float("-inf"))


def _additive_mask(attn_mask: Tensor | None, query: Tensor, scores: tuple[int, ...]) -> Tensor | None:
    """attn_mask (bool: True = take part; or float, query's dtype), broadcastable to the scores' shape
    (*batch, H, Lq, Lk) -> an additive mask of that shape, a view (stride(-1) == 1) where its dims broadcast."""
    if attn_mask is None:
        return None
    check_tensor("attn_mask", attn_mask)
    if attn_mask.device != query.device:
        raise DTypeError(f"attn_mask: expected a tensor on {query.device} (as query), got one on {attn_mask.device}")
    try:
        fits = attn_mask.dim() <= len(scores) and torch.broadcast_shapes(attn_mask.shape, scores) == scores
    except RuntimeError:
        fits = False
    if not fits:
        raise ShapeError(f"attn_mask: expected a shape broadcastable to the scores' {scores} (batch..., heads, Lq, "
                         f"Lk), got {tuple(attn_mask.shape)}")
    if attn_mask.dtype == torch.bool:
        attn_mask = hiding_mask(~attn_mask, query.dtype)
    elif attn_mask.dtype != query.dtype:
        raise DTypeError(f"attn_mask: expected dtype torch.bool or {query.dtype} (as query), got {attn_mask.dtype}")
    len_k = scores[-1]
    if attn_mask.dim() == 0 or attn_mask.shape[-1] != len_k or attn_mask.stride(-1) != 1:
        # The kernels read a mask row as one contiguous run: materialize the key dim only.
        attn_mask = attn_mask.expand(*attn_mask.shape[:-1], len_k).contiguous()
    return attn_mask.expand(scores)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ------------------------------------------------------------------------------------------------------------
# The public functions.
# ------------------------------------------------------------------------------------------------------------
def run_forward(q, k, v, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
                 window_right, bottom_right, dropout_p, dropout_seed) -> tuple[Tensor, Tensor]:
    args = (q, k, v, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
            window_right, bottom_right, dropout_p, dropout_seed)
    impl = _impl(q)
    if impl == "reference":
        return reference.flash_attention_forward(*args)
    with kernel_scope(impl, q.device):
        return run_op("flash_attention_forward", *args)


def _split_lead(name: str, t: Tensor) -> tuple[tuple[int, ...], int]:
    """(..., H, L, D) -> (the batch dims ..., H); a 2-D (L, D) tensor has no batch dims and one head."""
    if t.dim() < 2:
        raise ShapeError(f"{name}: expected at least 2 dims (..., L, D), got shape {tuple(t.shape)}")
    lead = tuple(t.shape[:-2])
    return (lead[:-1], lead[-1]) if lead else ((), 1)


def _broadcast(names: str, *shapes: tuple[int, ...]) -> tuple[int, ...]:
    """torch.broadcast_shapes of the leading dims. Equal shapes (the usual call) return at once: torch's version
    costs ~13 us a call in eager (a quarter of a b1 h1 L17 attention call's time, NOTES.md "Round 19")."""
    if all(shape == shapes[0] for shape in shapes[1:]):
        return tuple(shapes[0])
    try:
        return tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        raise ShapeError(f"{names}: leading dims {' and '.join(str(tuple(s)) for s in shapes)} do not broadcast "
                         "(as torch.nn.functional.scaled_dot_product_attention's)") from None


def _attention_shapes(query: Tensor, key: Tensor, value: Tensor,
                      enable_gqa: bool) -> tuple[tuple[int, ...], int, int]:
    """SDPA's shape rule -> (batch dims, query heads, kv heads the kernel runs with).

    query (..., Hq, Lq, D), key (..., Hk, Lk, D), value (..., Hk, Lk, Dv), at least 2-D each: the leading dims
    broadcast against each other (a missing heads dim is one head), as in SDPA's composed math. The heads dim
    broadcasts too; with enable_gqa Hq may instead be a multiple of Hk. A mask must broadcast to the scores
    without enlarging them (SDPA adds it in place): _additive_mask checks it."""
    (batch_q, heads_q), (batch_k, heads_k), (batch_v, heads_v) = (
        _split_lead(n, t) for n, t in (("query", query), ("key", key), ("value", value)))
    if key.shape[-2] != value.shape[-2]:
        raise ShapeError(f"value: expected {key.shape[-2]} keys (as key {tuple(key.shape)}), got shape "
                         f"{tuple(value.shape)}")
    if key.shape[-1] != query.shape[-1]:
        raise ShapeError(f"key: expected head dim {query.shape[-1]} (the last dim of query {tuple(query.shape)}), "
                         f"got shape {tuple(key.shape)}")
    batch = _broadcast("query, key, value", batch_q, batch_k, batch_v)
    kv_heads = _broadcast("key, value", (heads_k,), (heads_v,))[0]
    if heads_q == kv_heads or kv_heads == 1:  # one kv head serves every query head (the kernels' GQA, no copy)
        heads = heads_q
    elif heads_q == 1:  # one query head broadcasts over the kv heads
        heads = kv_heads
    else:
        _check_heads(heads_q, kv_heads, enable_gqa)
        heads = heads_q
    return batch, heads, kv_heads


def _flatten_batch(t: Tensor, batch: tuple[int, ...], heads: int) -> Tensor:
    """t (..., H or 1, L, X) broadcast to (*batch, heads, L, X) and flattened to (prod(batch), heads, L, X): a
    view (expanded dims have stride 0) unless broadcast batch dims cannot merge into one. A tensor already of that
    shape returns as it is (expand + reshape cost ~3.5 us, three times a call)."""
    if t.dim() == 4 and len(batch) == 1 and t.shape[0] == batch[0] and t.shape[1] == heads:
        return t
    t = t.expand(*batch, heads, *t.shape[-2:])
    return t.reshape(math.prod(batch), heads, *t.shape[-2:])


# ------------------------------------------------------------------------------------------------------------
# Kernel choice: decoding shapes go to the split-KV decode kernel.
# ------------------------------------------------------------------------------------------------------------
# The flash forward parallelizes over (head, query tile) and first re-lays all of K and V into tiles: with a
# handful of queries it runs B*Hq items on two cores and copies the whole cache. The decode kernel instead
# splits the keys across the cores, reads the cache in place (any strides) and streams each kv head once for
# all query heads of its GQA group. 1 query vs 32768 keys, 32/8 heads, d128, bf16, 2 threads: 0.25x SDPA
# through the flash forward, ~5x through the decode kernel (NOTES.md, issue 14).
DECODE_MAX_QUERIES = 16  # the decode kernel's register tiles are sized for Lq = 1..16 per kv-head group


def _key_padding_lengths(mask: Tensor) -> Tensor | None:
    """An additive (B,Hq,Lq,Lk) mask that is one key-padding row per batch entry, broadcast over heads and
    queries, 0 on a prefix of the keys and -inf after it (right padding) -> the prefix lengths (B,) int32;
    None for any other mask. Reads the values (a host sync): eager only."""
    if torch.compiler.is_compiling() or mask.stride(1) != 0 and mask.shape[1] != 1 \
            or mask.stride(2) != 0 and mask.shape[2] != 1:
        return None
    row = mask[:, 0, 0, :]
    lengths = (row == 0).sum(-1)
    prefix = torch.arange(row.shape[-1], device=row.device) < lengths.unsqueeze(-1)
    expected = torch.zeros_like(row).masked_fill_(~prefix, float("-inf"))
    return lengths.to(torch.int32) if torch.equal(row, expected) else None


def decode_route(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, window_left: int,
                 window_right: int, bottom_right: bool, dropout_p: float) -> tuple[Tensor, Tensor] | None:
    """(out, lse) from the split-KV decode kernel when it computes exactly this attention, else None (the caller
    runs the flash forward). Arguments as run_forward's, normalized: q (B,Hq,Lq,D), k (B,Hkv,Lk,D), v (B,Hkv,Lk,Dv)
    with stride(-1) == 1, mask additive (B,Hq,Lq,Lk) or None.

    The rule: decode runs when all of
      * 1 <= Lq <= DECODE_MAX_QUERIES and Lq <= Lk (decoding shapes);
      * no gradient is needed (grad mode off, or none of q, k, v, mask requires grad) and no tangent rides on them
        (forward-mode AD): decode has neither derivative;
      * dropout_p == 0;
      * a kernel (not the reference) serves the decode op on this device and dtype;
      * the visibility is one decode expresses (query i at position p = len - Lq + i of a cache of `len` keys):
        no window, or a window (left, unbounded right) bottom-right aligned, or causal (right = 0) bottom-right
        (len = Lk) or top-left (len = Lq: top-left causal only sees the first Lq keys), with any left window;
      * the mask is None, or (without window or causal) a key-padding mask: one row per batch entry broadcast
        over heads and queries, keeping a prefix of the keys (right padding; the lengths become cache_seqlens).
    """
    len_q, len_k = q.shape[2], k.shape[2]
    # Symbolic lengths (torch.export / dynamic torch.compile): the test below would guard them into a range and
    # specialize the program; such a program keeps the flash forward, which serves every length.
    if not (isinstance(len_q, int) and isinstance(len_k, int)):
        return None
    if not 1 <= len_q <= min(DECODE_MAX_QUERIES, len_k) or dropout_p != 0.0 or differentiated(q, k, v, mask):
        return None
    impl = backends.resolve("flash_attention_decode", q.device, q.dtype, SUPPORTED_DTYPES,
                            kernel="flash_attention_decode")
    if impl == "reference":
        return None
    lengths = None
    if mask is not None:
        if window_left >= 0 or window_right >= 0:
            return None
        lengths = _key_padding_lengths(mask)
        if lengths is None:
            return None
    if window_right > 0 or window_right < 0 and window_left >= 0 and not bottom_right:
        return None
    causal = window_right == 0
    if causal and not bottom_right:
        lengths = torch.full((q.shape[0],), len_q, dtype=torch.int32, device=q.device)
    with kernel_scope(impl, q.device):
        return run_op("flash_attention_decode", q, k, v, lengths, scale, causal, window_left, 0)


def attention(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
    is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False, *,
    window_size: tuple[int, int] | None = None, causal_alignment: str = "top_left", return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact scaled-dot-product attention that never materializes the (Lq, Lk) scores; the semantics of
    torch.nn.functional.scaled_dot_product_attention for the arguments they share.

    query (..., Hq, Lq, D), key (..., Hkv, Lk, D), value (..., Hkv, Lk, Dv), at least 2-D each: the leading dims
    broadcast against each other as in SDPA (e.g. query (Hq, Lq, D) with key (B, Hq, Lk, D); size-1 dims
    broadcast without copies) -> (*broadcast leading dims, Lq, Dv) [, lse (*leading dims, Lq)].
    attn_mask: bool (True = take part) or additive float in query's dtype, broadcastable to the scores
        (*leading dims, Lq, Lk); a float mask that requires grad gets its gradient.
    is_causal / window_size=(left, right): query i sees keys j with i + s - left <= j <= i + s + right (-1 or
        None: unbounded; is_causal sets right = 0), s = 0 for causal_alignment "top_left" (as SDPA) or Lk - Lq
        for "bottom_right" (as FlashAttention: the last query sees the last key).
    enable_gqa: Hq may be a multiple of Hkv (grouped- and multi-query attention).
    dropout_p: applied to the probabilities whenever > 0 (as SDPA: pass 0.0 at eval); the mask comes from a
        seed drawn from torch's generator, so torch.manual_seed reproduces it, and the backward reuses it.
    A query that sees no key gets 0 (forward and backward), never NaN. return_lse also returns the log-sum-exp
    of each row's scores (float32; float64 for float64 inputs; -inf for such rows), not differentiable.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(name, t)
        check_floating(name, t)
        if t is not query and (t.dtype != query.dtype or t.device != query.device):
            raise DTypeError(f"{name}: expected dtype {query.dtype} on {query.device} (as query), got {t.dtype} "
                             f"on {t.device}")
    batch, heads, kv_heads = _attention_shapes(query, key, value, enable_gqa)
    _check_dropout(dropout_p)
    window_left, window_right = _window(window_size, is_causal)
    bottom_right = _check_alignment(causal_alignment)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    len_q, len_k = query.shape[-2], key.shape[-2]
    mask = _additive_mask(attn_mask, query, (*batch, heads, len_q, len_k))
    q = _flatten_batch(query, batch, heads)
    k, v = (_flatten_batch(t, batch, kv_heads) for t in (key, value))
    mask = None if mask is None else mask.reshape(math.prod(batch), heads, len_q, len_k)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    out_lse = decode_route(q, k, v, mask, scale, window_left, window_right, bottom_right, dropout_p)
    if out_lse is None:
        out_lse = run_forward(q, k, v, mask, None, None, 0, 0, scale, window_left, window_right, bottom_right,
                              dropout_p, dropout_seed(dropout_p, q.device))
    out, lse = out_lse
    lead = (*batch, heads) if max(query.dim(), key.dim(), value.dim()) > 2 else ()  # all 2-D: out (Lq, Dv)
    if out.shape[:-2] != lead:
        out = out.view(*lead, len_q, out.shape[-1])
    return (out, lse.view(*lead, len_q).to(_lse_dtype(query.dtype))) if return_lse else out


def _check_cu_seqlens(name: str, cu_seqlens: Tensor, device: torch.device) -> None:
    check_tensor(name, cu_seqlens)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ShapeError(f"{name}: expected a 1-D tensor of N+1 offsets, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise DTypeError(f"{name}: expected dtype torch.int32, got {cu_seqlens.dtype}")
    if cu_seqlens.device != device:
        raise DTypeError(f"{name}: expected a tensor on {device} (as query), got one on {cu_seqlens.device}")


def _check_offsets(name: str, cu_seqlens: Tensor, total: int, max_seqlen: int, max_name: str) -> None:
    """The values of cu_seqlens: from 0, non-decreasing, ending at the packed length; max_seqlen covers them."""
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ShapeError(f"{name}: expected non-decreasing offsets starting at 0, got {bounds[:8]}"
                         f"{'...' if len(bounds) > 8 else ''}")
    if bounds[-1] != total:
        raise ShapeError(f"{name}: the last offset must equal the packed length {total}, got {bounds[-1]}")
    longest = max((b - a for a, b in zip(bounds[:-1], bounds[1:])), default=0)
    if max_seqlen < longest:
        raise ShapeError(f"{max_name}: expected at least the longest sequence, {longest}, got {max_seqlen}")


def attention_varlen(
    query: Tensor, key: Tensor, value: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
    max_seqlen_k: int, dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
    enable_gqa: bool = False, *, window_size: tuple[int, int] | None = None, causal_alignment: str = "top_left",
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention over a packed batch of sequences of different lengths, with no padding (as FlashAttention's
    flash_attn_varlen_func).

    query (total_q, Hq, D), key (total_k, Hkv, D), value (total_k, Hkv, Dv); sequence n owns rows
    [cu_seqlens_q[n], cu_seqlens_q[n+1]) of query and [cu_seqlens_k[n], cu_seqlens_k[n+1]) of key/value
    (cu_seqlens int32 (N+1,), from 0 to the total); max_seqlen_* are the longest lengths.
    -> (total_q, Hq, Dv) [, lse (Hq, total_q)]. Other arguments as `attention`, per sequence.
    """
    _check_qkv(query, key, value, ("query", "key", "value"), (3,))
    _check_heads(query.shape[1], key.shape[1], enable_gqa)
    _check_dropout(dropout_p)
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, query.device)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, query.device)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ShapeError(f"cu_seqlens_k: expected {cu_seqlens_q.numel()} offsets (as cu_seqlens_q), "
                         f"got {cu_seqlens_k.numel()}")
    if not torch.compiler.is_compiling():  # data-dependent: under torch.compile the kernels' checks remain
        _check_offsets("cu_seqlens_q", cu_seqlens_q, query.shape[0], max_seqlen_q, "max_seqlen_q")
        _check_offsets("cu_seqlens_k", cu_seqlens_k, key.shape[0], max_seqlen_k, "max_seqlen_k")
    window_left, window_right = _window(window_size, is_causal)
    bottom_right = _check_alignment(causal_alignment)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    # (total, H, D) -> (1, H, total, D): a strided view the kernels read in place.
    q, k, v = (_last_dim_contiguous(t).transpose(0, 1).unsqueeze(0) for t in (query, key, value))
    out, lse = run_forward(q, k, v, None, cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32),
                            int(max_seqlen_q), int(max_seqlen_k), scale, window_left, window_right, bottom_right,
                            dropout_p, dropout_seed(dropout_p, q.device))
    out = out.squeeze(0).transpose(0, 1)
    return (out, lse.squeeze(0).to(_lse_dtype(query.dtype))) if return_lse else out


def attention_decode(
    query: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor | None = None, *,
    scale: float | None = None, is_causal: bool = False, window_size: tuple[int, int] | None = None,
    num_splits: int = 0, return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Decoding: a few new queries against a long KV cache, split over the cache length across cores and
    merged through the log-sum-exp. For inference: differentiated (inputs that require grad, or tangents under
    forward-mode AD) it runs its reference, at the composed math's speed and memory (`attention` differentiates
    on the flash kernels).

    query (B,Hq,Lq,D), k_cache (B,Hkv,S,D), v_cache (B,Hkv,S,Dv) (any strides with a contiguous last dim: a
    (B,S,Hkv,D) cache passed as .transpose(1, 2) is read in place); cache_seqlens (B,) ints: sequence b holds
    keys [0, cache_seqlens[b]) (None: all S). The queries are each sequence's last Lq positions: is_causal
    hides later keys, window_size=(left, _) keys more than `left` positions back. Hq % Hkv == 0 (GQA).
    num_splits: key chunks per (sequence, kv head); 0 chooses. -> (B,Hq,Lq,Dv) [, lse (B,Hq,Lq)].
    """
    _check_qkv(query, k_cache, v_cache, ("query", "k_cache", "v_cache"), (4,))
    _check_heads(query.shape[1], k_cache.shape[1], enable_gqa=True)
    if cache_seqlens is not None:
        check_tensor("cache_seqlens", cache_seqlens)
        if cache_seqlens.shape != (query.shape[0],) or cache_seqlens.dtype not in (torch.int32, torch.int64):
            raise ShapeError(f"cache_seqlens: expected an int32 tensor of shape ({query.shape[0]},), got "
                             f"{cache_seqlens.dtype} of shape {tuple(cache_seqlens.shape)}")
        if cache_seqlens.device != query.device:
            raise DTypeError(f"cache_seqlens: expected a tensor on {query.device}, got one on {cache_seqlens.device}")
        # Data-dependent: checked eagerly here; under torch.compile the kernels' own bounds checks remain.
        in_range = torch.compiler.is_compiling() or bool(((cache_seqlens >= 0) & (cache_seqlens <= k_cache.shape[2])).all())
        if not in_range:
            raise ShapeError(f"cache_seqlens: expected lengths in [0, {k_cache.shape[2]}] (the cache size), "
                             f"got {cache_seqlens.tolist()[:8]}")
        cache_seqlens = cache_seqlens.to(torch.int32)
    if not isinstance(num_splits, int) or num_splits < 0:
        raise ShapeError(f"num_splits: expected an int >= 0 (0 chooses), got {num_splits!r}")
    window_left, _ = _window(window_size, False)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    args = (*(_last_dim_contiguous(t) for t in (query, k_cache, v_cache)), cache_seqlens, scale, is_causal,
            window_left, num_splits)
    impl = backends.resolve("flash_attention_decode", query.device, query.dtype, SUPPORTED_DTYPES,
                            kernel="flash_attention_decode")
    # Differentiated (gradients, or tangents under forward-mode AD) through the reference: the kernel has no
    # derivative of either kind.
    if impl == "reference" or differentiated(query, k_cache, v_cache):
        out, lse = reference.flash_attention_decode(*args)
    else:
        with kernel_scope(impl, query.device):
            out, lse = run_op("flash_attention_decode", *args)
    return (out, lse) if return_lse else out


def attention_probabilities(
    query: Tensor, key: Tensor, lse: Tensor, attn_mask: Tensor | None, scale: float, window_left: int,
    window_right: int, bottom_right: bool,
) -> Tensor:
    """The attention probabilities, recomputed from the log-sum-exp a forward returned (one matmul, no second
    softmax pass): query (B,Hq,Lq,D), key (B,Hkv,Lk,D), lse (B,Hq,Lq), attn_mask additive (B,Hq,Lq,Lk) or None
    -> (B,Hq,Lq,Lk), rows that see no key all 0. Before dropout. Differentiable in query, key and the mask."""
    group = query.shape[1] // key.shape[1]
    # Scores in float32 (float64 for float64): bf16 scores of magnitude ~8 round by ~0.03, which exp turns into 3%
    # weight errors. The lse (float64 from the forward op) enters as lse_hi + lse_lo in that dtype:
    # (s - lse_hi) is exact near the row's maximum, so exp((s - lse_hi) - lse_lo) keeps the lse's precision.
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    keys = key.repeat_interleave(group, dim=1).transpose(-1, -2).to(compute)
    scores = scale * (query.to(compute) @ keys)
    if attn_mask is not None:
        scores = scores + attn_mask
    seen = visible(query.shape[2], key.shape[2], window_left, window_right, bottom_right, query.device)
    scores = scores.masked_fill(~seen, float("-inf"))
    lse_hi = lse.to(compute).unsqueeze(-1)
    lse_lo = torch.where(torch.isfinite(lse_hi), lse.unsqueeze(-1) - lse_hi.to(lse.dtype), 0.0).to(compute)
    with torch.no_grad():
        exp = torch.exp((scores - lse_hi) - lse_lo)
        # Not live: where exp underflows, and rows without keys (lse -inf: -inf - -inf = nan there). A NaN score or
        # a NaN row (NaN lse) stays live: it passes on, as in the composed softmax.
        live = (exp > 0) | (exp.isnan() & (lse_hi != float("-inf")))
    # p = exp(s - lse) with the kernel's lse has the right value but not logsumexp's dependence on s. Dividing by
    # its row sum (value 1 up to rounding) and multiplying by that sum's value gives p bit for bit, and softmax's
    # derivatives to every order (double backward included). exp of -inf where a key is not live, not exp(nan)
    # masked afterwards: a masked nan still sends nan gradients.
    probs = torch.exp(torch.where(live, (scores - lse_hi) - lse_lo, float("-inf")))
    total = probs.sum(-1, keepdim=True)
    total = torch.where(total > 0, total, 1.0)
    return (probs * (total.detach() / total)).to(query.dtype)
