"""Triton kernels for flash_attention_decode (contract in seqkern/ops/_schemas.py, oracle in
seqkern.reference.flash_attention.flash_attention_decode).

Flash decoding: a few queries (Lq = 1..16) against a long KV cache, which a decode step is bound to read.
  1. split kernel, a program per (sequence b * kv head h, split s, block of rows): it serves up to MAX_BLOCK_R of
     the R = G * Lq query rows that read kv head h (the G = Hq / Hkv query heads of its group, Lq queries each;
     row r = g * Lq + i), so every cache row is read once per group (once per 16 rows of it), not once per query
     head. It sweeps split s of the keys any of those queries
     can see in BLOCK_N tiles with an online softmax (running max m, sum l, accumulator, fp32 or fp64) and
     leaves a partial: out_s = acc / l and lse_s = m + log l (-inf for a split that sees nothing);
  2. merge kernel, a program per query row: lse = log sum_s e^lse_s and out = sum_s e^(lse_s - lse) out_s.

Visibility (seqkern/ops/_schemas.py): query i of sequence b sits at p = cache_seqlens[b] - Lq + i; is_causal hides keys
j > p, window_left >= 0 hides keys j < p - window_left. A row that sees no key gets out 0 and lse -inf.
Head dims are padded to powers of two >= 16 (tl.dot's minimum) with masked loads, and so is R.

Supported dtypes: float32, float64, bfloat16, float16 (math and lse in float32; float64 for float64). The launcher takes
CPU tensors too: kernels/_launch.py runs the kernels under the Triton interpreter then.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from seqkern._checks import DTypeError, ShapeError

from ._launch import dot_operand_dtype, dot_precision, float_halves, launch, launch_tuned, runtime_float
from ._recurrent import accumulator_dtype, store

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# tl.dot needs every dimension >= 16: blocks and padded sizes are at least this.
MIN_DOT_SIZE = 16
# num_splits = 0: about this many programs per streaming multiprocessor, so that a decode step over few
# sequences and kv heads still fills the GPU (B=1, 8 kv heads on 108 SMs -> 27 splits) ...
PROGRAMS_PER_SM = 2
# ... but no split shorter than this many keys: a program's fixed costs (loading R query rows, writing an
# R x Dv partial that the merge re-reads) stay small next to streaming its share of K and V.
MIN_SPLIT_KEYS = 256
# Query rows per split program at most (R = G * Lq is unbounded: 64 query heads on one kv head with 16 queries
# is 1024 rows); more rows become a grid axis, each block of them re-reading the cache split (from L2 when the
# blocks run together). 16, not 64: ptxas spilled 64-row tiles at every head dim but bf16 d64 (bf16 d128 64 keys
# / 8 warps 60 bytes, 32 / 4 472; float32 d64 216-432, d128 1.0 KB; float64 d128 / d256 1.1-2.2 KB; sm_90 mostly),
# and every 16-row list compiles clean (tests/test_gpu_compile.py), so no row count can pick a tile that spills.
MAX_BLOCK_R = 16
# The split kernel's softmax runs in base 2.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


# ==================================================================================================
# Kernels.
# ==================================================================================================
@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, seqlens_ptr,  # q (B,Hq,Lq,D), k_cache (B,Hkv,S,D), v_cache (B,Hkv,S,Dv), (B,) int32
    part_out_ptr, part_lse_ptr,  # out (B*Hkv, splits, R, Dv), (B*Hkv, splits, R) in ACC
    q_stride_b, q_stride_h, q_stride_i, k_stride_b, k_stride_h, k_stride_s, v_stride_b, v_stride_h, v_stride_s,
    Hkv, S, Lq, R, D, Dv, splits, scale_hi, scale_lo, window_left,
    HAS_SEQLENS: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    row_block = tl.program_id(2)  # R > BLOCK_R (many query heads per kv head, or many queries): blocks of rows
    # int64 offsets: b * k_stride_b passes 2^31 elements for large caches.
    b = (bh // Hkv).to(tl.int64)
    h = (bh % Hkv).to(tl.int64)
    if HAS_SEQLENS:
        # Clamped into [0, S] so that a bad length can never read outside the cache (the launcher also checks
        # CPU lengths; checking CUDA ones would cost a device sync per decode step).
        length = tl.minimum(tl.maximum(tl.load(seqlens_ptr + b), 0), S)
    else:
        length = S

    rows = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    position = length - Lq + rows % Lq  # of query i = r % Lq; its query head is h * G + r // Lq
    dims = tl.arange(0, BLOCK_D)
    dims_v = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + b * q_stride_b + (h * (R // Lq) + rows // Lq)[:, None] * q_stride_h
                + (rows % Lq)[:, None] * q_stride_i + dims[None, :],
                mask=row_mask[:, None] & (dims < D)[None, :], other=0)

    # This program's share of the keys any query of the group sees: [first visible, length) in `splits` parts.
    first = 0
    if HAS_WINDOW:
        first = tl.maximum(length - Lq - window_left, 0)
    count = tl.maximum(length - first, 0)
    begin = first + split.to(tl.int64) * count // splits  # int64: split * count can pass 2^31
    end = first + (split.to(tl.int64) + 1) * count // splits

    # Base 2: the scores times log2(e) (folded into the scale), p = exp2(s - m) (a GPU's exp is exp2 of
    # x log2(e) anyway, so this saves a multiply per score); lse back in natural units at the end.
    scale_log2 = runtime_float(scale_hi, scale_lo, ACC) * LOG2E
    m = tl.full((BLOCK_R,), float("-inf"), ACC)
    l = tl.zeros((BLOCK_R,), ACC)
    acc = tl.zeros((BLOCK_R, BLOCK_DV), ACC)
    k_base = k_ptr + b * k_stride_b + h * k_stride_h
    v_base = v_ptr + b * v_stride_b + h * v_stride_h
    for start in range(begin, end, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_mask = keys < end
        k = tl.load(k_base + keys[:, None] * k_stride_s + dims[None, :],
                    mask=key_mask[:, None] & (dims < D)[None, :], other=0)
        # The scale multiplies the products' sum, not a rounded q. PRECISION: dot_precision (tf32 / tf32x3 for
        # float32 on a GPU, as torch.backends.cuda.matmul.allow_tf32 says).
        scores = tl.dot(q.to(DOT), tl.trans(k.to(DOT)), out_dtype=ACC, input_precision=PRECISION) * scale_log2
        seen = row_mask[:, None] & key_mask[None, :]
        if IS_CAUSAL:
            seen &= keys[None, :] <= position[:, None]
        if HAS_WINDOW:
            seen &= keys[None, :] >= position[:, None] - window_left
        scores = tl.where(seen, scores, float("-inf"))

        m_new = tl.maximum(m, tl.max(scores, 1))
        # Rows that have seen nothing yet keep m = -inf: subtract 0 instead, so that p = e^-inf = 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0, m_new)
        p = tl.math.exp2(scores - m_safe[:, None])
        alpha = tl.math.exp2(m - m_safe)
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_base + keys[:, None] * v_stride_s + dims_v[None, :],
                    mask=key_mask[:, None] & (dims_v < Dv)[None, :], other=0)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v.to(DOT), out_dtype=ACC, input_precision=PRECISION)
        m = m_new

    seen_any = l != 0  # a NaN sum (NaN scores) counts as seen and passes on, unlike `l > 0`
    lse = tl.where(seen_any, (m + tl.math.log2(tl.where(seen_any, l, 1))) * LN2, float("-inf"))
    out = acc / tl.where(seen_any, l, 1)[:, None]
    part = bh * splits + split
    tl.store(part_lse_ptr + part * R + rows, lse, mask=row_mask)
    tl.store(part_out_ptr + (part * R + rows)[:, None] * Dv + dims_v[None, :], out,
             mask=row_mask[:, None] & (dims_v < Dv)[None, :])


@triton.jit
def _decode_merge_kernel(
    part_out_ptr, part_lse_ptr,  # (B*Hkv, splits, R, Dv), (B*Hkv, splits, R) from the split kernel
    out_ptr, lse_ptr,  # out (B,Hq,Lq,Dv) in q's dtype, (B,Hq,Lq) in ACC
    Hkv, Lq, R, Dv, splits,
    ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    row = tl.program_id(0)  # over (b * Hkv + h) * R + r
    bh = row // R
    r = row % R
    dims_v = tl.arange(0, BLOCK_DV)
    dim_mask = dims_v < Dv
    lse_base = part_lse_ptr + bh * splits * R + r
    out_base = part_out_ptr + (bh * splits * R + r) * Dv

    top = tl.full((BLOCK_S,), float("-inf"), ACC)
    for s0 in range(0, splits, BLOCK_S):
        parts = s0 + tl.arange(0, BLOCK_S)
        top = tl.maximum(top, tl.load(lse_base + parts * R, mask=parts < splits, other=float("-inf")))
    top_all = tl.max(top, 0)
    top_safe = tl.where(top_all == float("-inf"), 0, top_all)  # no split saw a key: every weight is 0

    total = tl.zeros((BLOCK_S,), ACC)
    acc = tl.zeros((BLOCK_DV,), ACC)
    for s0 in range(0, splits, BLOCK_S):
        parts = s0 + tl.arange(0, BLOCK_S)
        part_mask = parts < splits
        weight = tl.exp(tl.load(lse_base + parts * R, mask=part_mask, other=float("-inf")) - top_safe)
        total += weight
        partial = tl.load(out_base + (parts * R * Dv)[:, None] + dims_v[None, :],
                          mask=part_mask[:, None] & dim_mask[None, :], other=0)
        acc += tl.sum(weight[:, None] * partial, 0)
    total_all = tl.sum(total, 0)
    seen_any = total_all != 0  # NaN passes on (see above)

    # Row r = g * Lq + i of (b, h) is query i of query head h * G + g: out (B,Hq,Lq,...) index b*Hq*Lq + ...
    # = (b * Hkv + h) * R + r, since Hq * Lq = Hkv * R.
    store(out_ptr + row * Dv + dims_v, acc / tl.where(seen_any, total_all, 1), dim_mask)
    tl.store(lse_ptr + row, tl.where(seen_any, top_all + tl.log(tl.where(seen_any, total_all, 1)), float("-inf")))


# ==================================================================================================
# Launcher: the op signature of seqkern/ops/_schemas.py.
# ==================================================================================================
def _check_attention_tensor(name: str, tensor: Tensor, like: Tensor, layout: str) -> None:
    if tensor.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise DTypeError(f"{name}: the Triton flash_attention_decode kernels support {names}; got {tensor.dtype}")
    if tensor.dtype != like.dtype:
        raise DTypeError(f"{name}: expected dtype {like.dtype} (as q), got {tensor.dtype}")
    if tensor.device != like.device:
        raise DTypeError(f"{name}: expected a tensor on {like.device} (as q), got {tensor.device}")
    if tensor.dim() != 4:
        raise ShapeError(f"{name}: expected a {layout} tensor, got shape {tuple(tensor.shape)}")
    if tensor.stride(-1) != 1 and tensor.shape[-1] > 1:
        raise ShapeError(f"{name}: expected stride(-1) == 1, got strides {tensor.stride()}")


def _check_args(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor | None, num_splits: int) -> None:
    _check_attention_tensor("q", q, q, "(B,Hq,Lq,D)")
    _check_attention_tensor("k_cache", k_cache, q, "(B,Hkv,S,D)")
    _check_attention_tensor("v_cache", v_cache, q, "(B,Hkv,S,Dv)")
    batch, q_heads, _, head_dim = q.shape
    kv_heads, seq = k_cache.shape[1], k_cache.shape[2]
    if kv_heads < 1 or q_heads % kv_heads:
        raise ShapeError(f"q: expected a multiple of the {kv_heads} kv heads of k_cache, got {q_heads} query heads")
    if tuple(k_cache.shape) != (batch, kv_heads, seq, head_dim):
        raise ShapeError(f"k_cache: expected shape {(batch, kv_heads, seq, head_dim)}, got {tuple(k_cache.shape)}")
    if tuple(v_cache.shape[:3]) != (batch, kv_heads, seq):
        raise ShapeError(f"v_cache: expected shape {(batch, kv_heads, seq)} + (Dv,), got {tuple(v_cache.shape)}")
    if num_splits < 0:
        raise ShapeError(f"num_splits: expected >= 0, got {num_splits}")
    if cache_seqlens is None:
        return
    if cache_seqlens.dtype != torch.int32:
        raise DTypeError(f"cache_seqlens: expected dtype torch.int32, got {cache_seqlens.dtype}")
    if tuple(cache_seqlens.shape) != (batch,):
        raise ShapeError(f"cache_seqlens: expected shape {(batch,)}, got {tuple(cache_seqlens.shape)}")
    # Values are checked where that is free (CPU); on CUDA the kernel clamps them into [0, S] instead.
    if cache_seqlens.device.type == "cpu" and batch and bool(((cache_seqlens < 0) | (cache_seqlens > seq)).any()):
        raise ShapeError(f"cache_seqlens: expected values in [0, {seq}] (S = k_cache.shape[2]), got "
                         f"{cache_seqlens.tolist()}")


def _choose_splits(num_splits: int, items: int, seq: int, device: torch.device) -> int:
    """num_splits > 0 as given (capped at S: more splits than keys would only add empty ones); 0: enough
    programs to fill the GPU (PROGRAMS_PER_SM), no split under MIN_SPLIT_KEYS. The bound is S, not the
    longest cache_seqlens, which would cost a device sync."""
    if num_splits > 0:
        return max(1, min(num_splits, seq))
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    by_programs = triton.cdiv(PROGRAMS_PER_SM * sms, max(items, 1))
    return max(1, min(by_programs, seq // MIN_SPLIT_KEYS))


# float32 products without tf32 (torch.backends.cuda.matmul.allow_tf32 off): float32 FMAs, as torch's own float32
# matmuls and flash attention's kernels. A decode step is memory-bound (4-16 FLOP per byte of cache, below the
# FMA units' ridge of ~20 on an H100), so the FMA products cost little; tf32x3 spilled at d256 in every tile
# (172-480 bytes) and at 128 keys / d64 on sm_90.
FLOAT32_PRECISION = "ieee"

# The split kernel's configs (BLOCK_N keys, num_warps, num_stages) on CUDA,
# autotuned, per operand unit ("mma": 16-bit operands, "tf32": float32 on the tensor cores where allow_tf32, "fma32":
# float32 FMAs where not, "fma": float64) and padded head dim (up to 64, 128, 256), for MAX_BLOCK_R rows. A decode
# step streams the cache once, so the key tile is what matters: 64 keys per tile (128-key tiles spilled on sm_90
# with lengths + causal + window: 224 bytes at d64, 40 at d128; 32 at d256), 2-3 stages of K/V tiles in flight to
# hide the memory latency. Every config is compiled for sm_80 and sm_90 by tests/test_gpu_compile.py (no spills,
# shared memory within the limit), so a list holds only configs that fit.
_GPU_CONFIGS = {
    "mma": {64: [(64, 8, 3), (64, 4, 3)], 128: [(64, 8, 3)], 256: [(32, 4, 2)]},
    # float32 (ptxas, 2026-12-05): 3 stages spilled 32-40 bytes on sm_90 at d64 / d128 (4 or 8 warps), so 2; the
    # fma32 64-key tile at d128 spilled 144 on sm_80, 32 keys / 4 warps at d256 25 KB on sm_90, 32 keys / 8 warps at
    # d256 24 bytes on sm_90 (32 at 255 registers with a cap).
    "tf32": {64: [(64, 8, 2), (32, 4, 2)], 128: [(64, 4, 2), (32, 8, 2)], 256: [(32, 8, 1), (16, 4, 1)]},
    "fma32": {64: [(64, 8, 2), (32, 4, 2)], 128: [(32, 8, 2)], 256: [(16, 4, 1)]},
    "fma": {64: [(64, 8, 2)], 128: [(32, 8, 2)], 256: [(16, 8, 1)]},
}
# Under the interpreter one config (no autotuning; the fewest programs are fastest). The old GPU tiles
# (16-32 keys, "ieee" float32) are gone with it.
_INTERPRETER_CONFIG = (64, 4, 1)


def _padded(size: int) -> int:
    return max(MIN_DOT_SIZE, triton.next_power_of_2(size))


def configs(dtype: torch.dtype, device: torch.device, head_dim: int, value_dim: int) -> list[dict]:
    """The split kernel's configs ({"BLOCK_N", "num_warps", "num_stages"}) for MAX_BLOCK_R query rows
    per program (any R: more rows are a grid axis, _split_blocks): the autotune list on CUDA, the interpreter's one
    config on CPU. Past a padded head dim of 256 the largest list's key tiles shrink in proportion (down to
    MIN_DOT_SIZE), with one stage."""
    if device.type != "cuda":
        block_n, num_warps, num_stages = _INTERPRETER_CONFIG
        return [{"BLOCK_N": block_n, "num_warps": num_warps, "num_stages": num_stages}]
    width = max(_padded(head_dim), _padded(value_dim))
    unit = {torch.float64: "fma"}.get(dtype, "mma")
    if dtype == torch.float32:
        unit = "tf32" if dot_precision(dtype, device, FLOAT32_PRECISION) == "tf32" else "fma32"
    lists = _GPU_CONFIGS[unit]
    shrink = max(width // 256, 1)
    return [{"BLOCK_N": max(MIN_DOT_SIZE, block_n // shrink), "num_warps": num_warps,
             "num_stages": num_stages if shrink == 1 else 1}
            for block_n, num_warps, num_stages in lists[min(max(width, 64), 256)]]


def _split_blocks(rows: int, head_dim: int, value_dim: int) -> dict:
    """The split kernel's padded sizes (not tuned): rows per program (at most MAX_BLOCK_R), head dim, value dim."""
    return {"BLOCK_R": min(_padded(rows), MAX_BLOCK_R), "BLOCK_D": _padded(head_dim), "BLOCK_DV": _padded(value_dim)}


def flash_attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor | None, scale: float,
                           is_causal: bool, window_left: int, num_splits: int) -> tuple[Tensor, Tensor]:
    """q (B,Hq,Lq,D), k_cache (B,Hkv,S,D), v_cache (B,Hkv,S,Dv), cache_seqlens (B,) int32 or None
    -> out (B,Hq,Lq,Dv) in q's dtype, lse (B,Hq,Lq) (float64 for float64, else float32)."""
    _check_args(q, k_cache, v_cache, cache_seqlens, num_splits)
    batch, q_heads, len_q, head_dim = q.shape
    kv_heads, seq, value_dim = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = q.new_empty(batch, q_heads, len_q, value_dim)
    lse = q.new_empty(batch, q_heads, len_q, dtype=acc_dtype)
    if lse.numel() == 0:
        return out, lse

    rows = (q_heads // kv_heads) * len_q
    items = batch * kv_heads
    splits = _choose_splits(num_splits, items, seq, q.device)
    part_out = q.new_empty(items, splits, rows, value_dim, dtype=acc_dtype)
    part_lse = q.new_empty(items, splits, rows, dtype=acc_dtype)
    blocks = _split_blocks(rows, head_dim, value_dim)
    acc = accumulator_dtype(q.dtype)
    choices = configs(q.dtype, q.device, head_dim, value_dim)
    grid = (items, splits, triton.cdiv(rows, blocks["BLOCK_R"]))  # row blocks: the third axis (MAX_BLOCK_R)
    # Tuned per head dims and rows; not per cache length (every decode step has a new one).
    launch_tuned(_decode_split_kernel, choices, choices[0], lambda meta: grid, q.device, ("D", "Dv", "R"))(
        q, k_cache, v_cache, cache_seqlens, part_out, part_lse,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        kv_heads, seq, len_q, rows, head_dim, value_dim, splits, *float_halves("scale", float(scale)).values(),
        max(int(window_left), 0),
        HAS_SEQLENS=cache_seqlens is not None, IS_CAUSAL=bool(is_causal), HAS_WINDOW=window_left >= 0,
        ACC=acc, DOT=dot_operand_dtype(q.dtype, q.device),
        PRECISION=dot_precision(q.dtype, q.device, FLOAT32_PRECISION), **blocks,
    )
    launch(_decode_merge_kernel, (items * rows,), q.device)(
        part_out, part_lse, out, lse, kv_heads, len_q, rows, value_dim, splits,
        ACC=acc, BLOCK_S=min(16, triton.next_power_of_2(splits)), BLOCK_DV=blocks["BLOCK_DV"],
    )
    return out, lse
