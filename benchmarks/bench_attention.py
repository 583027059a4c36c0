"""Attention benchmark: seqkern.attention (flash attention) against PyTorch's
F.scaled_dot_product_attention (SDPA), the naive softmax(QK^T/sqrt(d))V in eager mode and under
torch.compile; seqkern.attention on one query against a long KV cache (it picks its decode kernel) against SDPA;
and the peak memory of a long forward. Self-attention, q/k/v (B,H,L,D), scale 1/sqrt(D), causal attention aligned
top-left; float32, and bfloat16 rows against SDPA in bfloat16. Every timed case passes the correctness gate against
SDPA in float64.

Targets (read off the table, not asserted):
  * forward >= 1.0x SDPA at L 1024 and 4096, d64 and d128, causal and not;
  * forward+backward >= 1.0x SDPA;
  * forward at L 4096 >= 80% of the matmul peak ("% peak"; causal cases count half the work of the others);
  * decode (1 query, 32 query heads over 8 kv heads, d128, 32768 cached keys) >= 5x SDPA(enable_gqa=True);
    "GB/s" is the rate at which it reads the K and V caches;
  * peak extra memory of the forward at 16384 tokens < 5% of the naive score matrix (B*H*L*L*4 bytes, given
    under the table with the naive row that case skips).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import seqkern
from benchmarks.harness import MIB, SUBJECT, Call, Case, dtype_suffix

SEED = 0

SDPA = "SDPA"
NAIVE = "naive (eager)"
COMPILED_NAIVE = "torch.compile(naive)"

# The naive baselines hold (L,L) scores: at L 4096 one forward took 2.3-5.1 s here (2 threads, busy machine)
# against 0.45-1.5 s for SDPA, so they are timed at one L 4096 shape only and skipped at the others.
NAIVE_LONG_LENGTH = 4096
NAIVE_LONG_HEAD_DIM = 64
# The memory case's target: seqkern's peak below this fraction of the naive score matrix.
MEMORY_TARGET_FRACTION = 0.05
# Above this score-matrix size the seqkern row of the memory case is skipped while it runs the pure-PyTorch
# reference: the reference materializes the scores several times over (8 GiB each at 16384 tokens, 8 heads),
# more than this machine's 23 GiB.
REFERENCE_SCORES_LIMIT_BYTES = 2**30


# --------------------------------------------------------------------------------------------------
# Shapes.
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Shape:
    """Self-attention: q, k, v (batch, heads, length, head_dim); `training` adds the backward."""

    batch: int
    heads: int
    length: int
    head_dim: int
    causal: bool
    training: bool = False
    dtype: torch.dtype = torch.float32

    @property
    def name(self) -> str:
        mode = "fwd+bwd" if self.training else "fwd"
        causal = " causal" if self.causal else ""
        return f"{mode} b{self.batch} h{self.heads} l{self.length} d{self.head_dim}{causal}{dtype_suffix(self.dtype)}"

    @property
    def score_bytes(self) -> int:
        """The naive (B,H,L,L) score matrix."""
        return self.batch * self.heads * self.length**2 * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class DecodeShape:
    """One decoding step: q (batch, q_heads, 1, head_dim) against k/v caches (batch, kv_heads, cache_len, head_dim)."""

    batch: int
    q_heads: int
    kv_heads: int
    cache_len: int
    head_dim: int
    dtype: torch.dtype = torch.float32

    @property
    def name(self) -> str:
        return (f"decode b{self.batch} hq{self.q_heads} hkv{self.kv_heads} cache{self.cache_len} d{self.head_dim}"
                f"{dtype_suffix(self.dtype)}")

    @property
    def cache_bytes(self) -> int:
        """K and V caches together: what one step must read at least."""
        return 2 * self.batch * self.kv_heads * self.cache_len * self.head_dim * self.dtype.itemsize


FORWARD_SHAPES = tuple(
    Shape(batch=1, heads=8, length=length, head_dim=head_dim, causal=causal)
    for length in (1024, 4096) for head_dim in (64, 128) for causal in (False, True)
) + (
    # Short sentences in a batch (inference): per-call and per-head costs against 32x32 score tiles.
    Shape(batch=32, heads=4, length=32, head_dim=32, causal=False),
)
TRAINING_SHAPES = tuple(
    Shape(batch=1, heads=8, length=length, head_dim=64, causal=causal, training=True)
    for length in (1024, 4096) for causal in (False, True)
) + (
    # Short sequences, many of them (a small model's batch): fixed costs per head and the padding of 128-row tiles
    # weigh most here, and the causal diagonal tile is the only tile.
    Shape(batch=32, heads=4, length=64, head_dim=32, causal=True, training=True),
)
# bfloat16 against SDPA in bfloat16 (AMX on the Intel machines): the forward at both lengths, and training.
BF16_SHAPES = (
    Shape(batch=1, heads=8, length=1024, head_dim=64, causal=False, dtype=torch.bfloat16),
    Shape(batch=1, heads=8, length=4096, head_dim=64, causal=True, dtype=torch.bfloat16),
    Shape(batch=1, heads=8, length=1024, head_dim=64, causal=False, training=True, dtype=torch.bfloat16),
)
DECODE_SHAPES = (
    DecodeShape(batch=1, q_heads=32, kv_heads=8, cache_len=32768, head_dim=128),
    DecodeShape(batch=1, q_heads=32, kv_heads=8, cache_len=32768, head_dim=128, dtype=torch.bfloat16),
)
# Causal: half the time of the full forward, the same memory.
MEMORY_SHAPE = Shape(batch=1, heads=8, length=16384, head_dim=64, causal=True)

# Tiny versions of each kind of case: the smoke test of every code path in a few seconds.
QUICK_FORWARD_SHAPES = (Shape(batch=1, heads=2, length=64, head_dim=16, causal=True),)
QUICK_TRAINING_SHAPES = (Shape(batch=1, heads=2, length=64, head_dim=16, causal=False, training=True),)
QUICK_BF16_SHAPES = (Shape(batch=1, heads=2, length=64, head_dim=16, causal=True, dtype=torch.bfloat16),)
QUICK_DECODE_SHAPES = (DecodeShape(batch=1, q_heads=4, kv_heads=2, cache_len=256, head_dim=16),)
QUICK_MEMORY_SHAPE = Shape(batch=1, heads=2, length=256, head_dim=16, causal=True)


def flops(shape: Shape) -> float:
    """The matmul work: QK^T and PV, 2*B*H*L*L*D each, half of it when causal. A backward is 2.5 forwards
    (five such matmuls; FlashAttention-2's convention, its recomputation of QK^T not counted)."""
    forward = 4 * shape.batch * shape.heads * shape.length**2 * shape.head_dim / (2 if shape.causal else 1)
    return 3.5 * forward if shape.training else forward


def decode_flops(shape: DecodeShape) -> float:
    """q.k and p.v for every query head and cached key."""
    return 4 * shape.batch * shape.q_heads * shape.cache_len * shape.head_dim


# --------------------------------------------------------------------------------------------------
# The functions compared. Attention: (q, k, v (B,H,L,D), causal) -> out (B,H,L,D).
# --------------------------------------------------------------------------------------------------
Attention = Callable[[Tensor, Tensor, Tensor, bool], Tensor]


def _seqkern_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    return seqkern.attention(q, k, v, is_causal=causal, scale=q.shape[-1] ** -0.5)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=q.shape[-1] ** -0.5)


def _naive_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """softmax(QK^T/sqrt(D) + causal mask) V through the (B,H,L,L) scores, as a user would write it."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if causal:
        length = q.shape[-2]
        future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(dim=-1) @ v


@functools.cache
def _compiled_naive_attention() -> Attention:
    """_naive_attention under torch.compile, created once per process.

    Inductor rewrites the non-causal version into SDPA's own CPU kernel (same numbers as SDPA, checked on
    torch 2.13); the causal one, with its masked_fill, stays a fused softmax between two matmuls. It compiles
    once per shape and causal flag (dynamic=False: code specialised to each case): 5 in the default set,
    within the recompile limit of 8 the harness makes an error.
    """
    return torch.compile(_naive_attention, fullgraph=True, dynamic=False)


def _compiled_naive(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    return _compiled_naive_attention()(q, k, v, causal)


# Decoding: (q (B,Hq,1,D), k_cache, v_cache (B,Hkv,S,D)) -> out (B,Hq,1,D), every cached key visible.
Decode = Callable[[Tensor, Tensor, Tensor], Tensor]


def _seqkern_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> Tensor:
    """What a user writes: the one attention entry, which picks its decode kernel for such shapes by itself."""
    return seqkern.attention(q, k_cache, v_cache, scale=q.shape[-1] ** -0.5, enable_gqa=True)


def _sdpa_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k_cache, v_cache, scale=q.shape[-1] ** -0.5, enable_gqa=True)


# --------------------------------------------------------------------------------------------------
# Timed calls: inputs rebuilt from the same seed by every contender, so all see identical numbers.
# --------------------------------------------------------------------------------------------------
def _randn(*sizes: int, generator: torch.Generator, dtype: torch.dtype, compute_dtype: torch.dtype | None = None,
           requires_grad: bool = False) -> Tensor:
    """Normal numbers rounded to `dtype`, then held in `compute_dtype` (float64 for the gate's oracle: the same
    values the contenders get, computed exactly)."""
    values = torch.randn(sizes, generator=generator).to(dtype).to(compute_dtype or dtype)
    return values.requires_grad_(requires_grad)


def _attention_call(attention: Attention, shape: Shape, compute_dtype: torch.dtype | None = None) -> Call:
    """The forward returns (out,); training returns out and the gradients of <out, grad_out> to q, k, v
    (grad_out (B,H,L,D) random, so that no gradient is trivially structured)."""
    generator = torch.Generator().manual_seed(SEED)
    size = (shape.batch, shape.heads, shape.length, shape.head_dim)
    options = dict(generator=generator, dtype=shape.dtype, compute_dtype=compute_dtype)
    q, k, v = (_randn(*size, **options, requires_grad=shape.training) for _ in range(3))
    if not shape.training:
        def forward() -> tuple[Tensor]:
            with torch.no_grad():
                return (attention(q, k, v, shape.causal),)
        return forward

    grad_out = _randn(*size, **options)

    def train() -> list[Tensor]:
        out = attention(q, k, v, shape.causal)
        # autograd.grad rather than backward(): fresh gradients every call, none accumulating in .grad.
        return [out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out)]
    return train


def _decode_call(decode: Decode, shape: DecodeShape, compute_dtype: torch.dtype | None = None) -> Call:
    """One decoding step over the full caches: returns (out (B,Hq,1,D),)."""
    generator = torch.Generator().manual_seed(SEED)
    options = dict(generator=generator, dtype=shape.dtype, compute_dtype=compute_dtype)
    q = _randn(shape.batch, shape.q_heads, 1, shape.head_dim, **options)
    k_cache, v_cache = (
        _randn(shape.batch, shape.kv_heads, shape.cache_len, shape.head_dim, **options) for _ in range(2)
    )

    def step() -> tuple[Tensor]:
        with torch.no_grad():
            return (decode(q, k_cache, v_cache),)
    return step


# --------------------------------------------------------------------------------------------------
# Contenders and cases.
# --------------------------------------------------------------------------------------------------
def _setup(attention: Attention, shape: Shape) -> Callable[[], Call]:
    return lambda: _attention_call(attention, shape)


def _oracle(shape: Shape) -> Callable[[], list[Tensor]]:
    """The gate's float64 oracle: SDPA in float64 on the same (rounded) inputs, returning what the call returns."""
    return lambda: list(_attention_call(_sdpa, shape, compute_dtype=torch.float64)())


def _decode_oracle(shape: DecodeShape) -> Callable[[], list[Tensor]]:
    return lambda: list(_decode_call(_sdpa_decode, shape, compute_dtype=torch.float64)())


def _implementation(kernel: str, dtype: torch.dtype) -> str:
    """Which seqkern implementation serves CPU tensors of `dtype` for torch.ops.seqkern.<kernel> here
    ("reference" until the C++ kernel is registered, or when the extension is not built)."""
    return seqkern.backends.resolve(
        "flash_attention", torch.device("cpu"), dtype, seqkern.ops.flash_attention.SUPPORTED_DTYPES,
        kernel=kernel,
    )


def _case(
    shape: Shape | DecodeShape, kernel: str, contenders: dict[str, Callable[[], Call]], work: float, *,
    name: str | None = None, notes: dict[str, Any] | None = None, **options: Any,
) -> Case:
    """A Case of `shape` (its name unless `name`) doing `work` FLOPs per call, recording the shape, the dtype
    and which implementation runs `kernel`; `options` are the optional Case fields."""
    params = {**dataclasses.asdict(shape), "dtype": str(shape.dtype).removeprefix("torch.")}
    return Case(
        op="attention", name=name or shape.name, flops=work, contenders=contenders, params=params,
        notes={"seqkern_implementation": _implementation(kernel, shape.dtype), **(notes or {})}, **options,
    )


def _naive_skipped(shape: Shape, quick: bool) -> dict[str, str]:
    """The naive baselines this forward shape leaves out, and why."""
    if quick:
        return {COMPILED_NAIVE: "quick set (its compilation alone takes ~15 s)"}
    if shape.length < NAIVE_LONG_LENGTH or (shape.head_dim == NAIVE_LONG_HEAD_DIM and not shape.causal):
        return {}
    why = (f"seconds per call through its (L,L) scores; timed at L {NAIVE_LONG_LENGTH} on "
           f"d{NAIVE_LONG_HEAD_DIM} non-causal only")
    return {NAIVE: why, COMPILED_NAIVE: why}


def _forward_case(shape: Shape, quick: bool) -> Case:
    """seqkern against SDPA and whichever naive baselines the shape does not skip."""
    candidates = {SUBJECT: _seqkern_attention, SDPA: _sdpa, NAIVE: _naive_attention, COMPILED_NAIVE: _compiled_naive}
    skipped = _naive_skipped(shape, quick)
    contenders = {name: _setup(attention, shape) for name, attention in candidates.items() if name not in skipped}
    return _case(shape, "flash_attention_forward", contenders, flops(shape), skipped=skipped,
                 oracle=_oracle(shape), rule_baseline=SDPA)


def _training_case(shape: Shape) -> Case:
    """seqkern's forward+backward against SDPA's."""
    contenders = {SUBJECT: _setup(_seqkern_attention, shape), SDPA: _setup(_sdpa, shape)}
    return _case(shape, "flash_attention_backward", contenders, flops(shape), oracle=_oracle(shape),
                 rule_baseline=SDPA)


def _decode_case(shape: DecodeShape) -> Case:
    """seqkern.attention against SDPA with grouped-query attention on one query; GB/s counts the K and V caches."""
    contenders = {
        SUBJECT: lambda: _decode_call(_seqkern_decode, shape), SDPA: lambda: _decode_call(_sdpa_decode, shape),
    }
    return _case(shape, "flash_attention_decode", contenders, decode_flops(shape), bytes_moved=shape.cache_bytes,
                 oracle=_decode_oracle(shape), rule_baseline=SDPA)


def _memory_case(shape: Shape) -> Case:
    """One profiled forward each of seqkern and SDPA; the naive score matrix is the yardstick, never built."""
    target = MEMORY_TARGET_FRACTION * shape.score_bytes
    contenders, skipped = {SUBJECT: _setup(_seqkern_attention, shape), SDPA: _setup(_sdpa, shape)}, {}
    implementation = _implementation("flash_attention_forward", shape.dtype)
    if implementation == "reference" and shape.score_bytes > REFERENCE_SCORES_LIMIT_BYTES:
        del contenders[SUBJECT]
        skipped[SUBJECT] = "not run: it runs its pure-PyTorch reference here, which materializes the scores"
    skipped[NAIVE] = (f"not run: its scores alone take {shape.score_bytes / MIB:.2f} MiB (B*H*L*L*4 bytes); "
                      f"target: seqkern < {MEMORY_TARGET_FRACTION:.0%} of that, {target / MIB:.2f} MiB")
    return _case(
        shape, "flash_attention_forward", contenders, flops(shape), name=f"memory {shape.name}",
        skipped=skipped, memory_only=True, notes={"naive_scores_bytes": shape.score_bytes, "target_peak_bytes": target},
    )


def cases(quick: bool = False) -> list[Case]:
    """The default attention set, or with `quick` one tiny case of each kind."""
    forward = QUICK_FORWARD_SHAPES if quick else FORWARD_SHAPES
    training = QUICK_TRAINING_SHAPES if quick else TRAINING_SHAPES
    bf16 = QUICK_BF16_SHAPES if quick else BF16_SHAPES
    return [
        *(_forward_case(shape, quick) for shape in forward),
        *(_training_case(shape) for shape in training),
        *(_training_case(shape) if shape.training else _bf16_forward_case(shape) for shape in bf16),
        *(_decode_case(shape) for shape in (QUICK_DECODE_SHAPES if quick else DECODE_SHAPES)),
        _memory_case(QUICK_MEMORY_SHAPE if quick else MEMORY_SHAPE),
    ]


def _bf16_forward_case(shape: Shape) -> Case:
    """seqkern against SDPA, both in the shape's reduced precision (the naive baselines are float32 rows' business)."""
    contenders = {SUBJECT: _setup(_seqkern_attention, shape), SDPA: _setup(_sdpa, shape)}
    return _case(shape, "flash_attention_forward", contenders, flops(shape), oracle=_oracle(shape), rule_baseline=SDPA)
