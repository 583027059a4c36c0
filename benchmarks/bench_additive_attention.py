"""Additive (Bahdanau) attention benchmark: seqkern.additive_attention against the composed PyTorch version a user
writes (torch.tanh of the broadcast sum of the projections, @ v, masked softmax, bmm; eager, float32) and that
version under torch.compile; the decoder step of a Seq2Seq model; the peak memory of a training step.

Shapes: batch 32, Lq = Lk = 100 / 200 / 400, d_q = d_k = d_v = hidden = 256, a random key padding mask (a
quarter of the keys of every sequence is padding); the decoder step: one query per sequence against 50 source
keys projected once (seqkern.additive_attention_projected with the query projected each step), B 32 and 64.
float32, and bfloat16 rows (every contender's inputs and weights in bf16) at Lq = Lk = 100 and the decoder step.

Targets (read off the table, not asserted):
  * forward + backward >= 4x the composed version at batch 32, 100..400 queries and keys, hidden 256;
  * peak extra memory of a training step proportional to B*Lq*Lk, not B*Lq*Lk*H (the memory case).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import seqkern
from benchmarks.harness import MIB, SUBJECT, Call, Case, dtype_suffix

SEED = 0
DTYPE = torch.float32
PADDING_FRACTION = 0.25

COMPOSED = "composed (eager)"
COMPILED = "torch.compile(composed)"

# The composed version holds (B, Lq, Lk, H) tensors: 5.2 GB each at Lq = Lk = 400 (B 32, H 256), three of them
# alive in its backward, more than this shared 24 GiB machine can spare; one forward at Lq = Lk = 200 took
# 1.0-5.8 s here. It is timed up to this length, and its memory measured at the memory case.
COMPOSED_MAX_LENGTH = 200


@dataclasses.dataclass(frozen=True)
class Shape:
    """query (B, Lq, Dq), keys (B, Lk, Dk), values (B, Lk, Dv), hidden H; `decoder`: the keys are projected
    once outside the timed call (a decoder step); `training` adds the backward."""

    batch: int
    len_q: int
    len_k: int
    hidden: int = 256
    dim: int = 256  # d_q = d_k = d_v
    training: bool = False
    decoder: bool = False
    dtype: torch.dtype = DTYPE

    @property
    def name(self) -> str:
        mode = "fwd+bwd" if self.training else "fwd"
        kind = "decoder step " if self.decoder else ""
        return (f"{kind}{mode} b{self.batch} lq{self.len_q} lk{self.len_k} h{self.hidden} d{self.dim}"
                f"{dtype_suffix(self.dtype)}")

    @property
    def tanh_bytes(self) -> int:
        """One (B, Lq, Lk, H) tensor of the composed version."""
        return self.batch * self.len_q * self.len_k * self.hidden * self.dtype.itemsize


LENGTHS = (100, 200, 400)
FORWARD_SHAPES = tuple(Shape(32, n, n) for n in LENGTHS)
TRAINING_SHAPES = tuple(Shape(32, n, n, training=True) for n in LENGTHS)
DECODER_SHAPES = tuple(Shape(b, 1, 50, decoder=True, training=t) for b in (32, 64) for t in (False, True))
BF16_SHAPES = (Shape(32, 100, 100, dtype=torch.bfloat16), Shape(32, 100, 100, training=True, dtype=torch.bfloat16),
               Shape(32, 1, 50, decoder=True, dtype=torch.bfloat16))
MEMORY_SHAPE = Shape(32, 100, 100, training=True)

QUICK_FORWARD_SHAPES = (Shape(2, 9, 11, hidden=16, dim=8),)
QUICK_TRAINING_SHAPES = (Shape(2, 9, 11, hidden=16, dim=8, training=True),)
QUICK_DECODER_SHAPES = (Shape(4, 1, 7, hidden=16, dim=8, decoder=True, training=True),)
QUICK_BF16_SHAPES = (Shape(2, 9, 11, hidden=16, dim=8, training=True, dtype=torch.bfloat16),)
QUICK_MEMORY_SHAPE = Shape(2, 9, 11, hidden=16, dim=8, training=True)


def flops(shape: Shape) -> float:
    """Per (i, j) pair: H adds, H tanh (counted as one flop each), H multiply-adds for the score and 2 Dv for
    P @ values; plus the projections (the query's only, for a decoder step). A backward counts twice that."""
    pairs = shape.batch * shape.len_q * shape.len_k
    rows = shape.batch * (shape.len_q + (0 if shape.decoder else shape.len_k))
    forward = pairs * (4 * shape.hidden + 2 * shape.dim) + 2 * rows * shape.dim * shape.hidden
    return 3 * forward if shape.training else forward


# --------------------------------------------------------------------------------------------------
# The functions compared: (query or query_proj, keys or key_proj, values, w_q, w_k, v, mask) -> context.
# --------------------------------------------------------------------------------------------------
def _composed_scores(query_proj: Tensor, key_proj: Tensor, v: Tensor) -> Tensor:
    return torch.tanh(query_proj.unsqueeze(2) + key_proj.unsqueeze(1)) @ v


def composed(query: Tensor, keys: Tensor, values: Tensor, w_q: Tensor, w_k: Tensor | None, v: Tensor,
             mask: Tensor) -> Tensor:
    """What a user writes; w_k None: `keys` are already projected (a decoder step)."""
    key_proj = keys if w_k is None else F.linear(keys, w_k)
    scores = _composed_scores(F.linear(query, w_q), key_proj, v).masked_fill(mask.unsqueeze(1), float("-inf"))
    return scores.softmax(-1) @ values


def _seqkern(query: Tensor, keys: Tensor, values: Tensor, w_q: Tensor, w_k: Tensor | None, v: Tensor,
             mask: Tensor) -> Tensor:
    if w_k is None:
        return seqkern.additive_attention_projected(F.linear(query, w_q), keys, values, v, mask)
    return seqkern.additive_attention(query, keys, values, w_q, w_k, v, mask)


@functools.cache
def _compiled_composed() -> Callable[..., Tensor]:
    """composed under torch.compile, created once per process (dynamic=False: one compilation per shape)."""
    return torch.compile(composed, fullgraph=True, dynamic=False)


def _compiled(*args: Tensor | None) -> Tensor:
    return _compiled_composed()(*args)


# --------------------------------------------------------------------------------------------------
# Timed calls: inputs rebuilt from the same seed by every contender.
# --------------------------------------------------------------------------------------------------
def _call(attention: Callable[..., Tensor], shape: Shape) -> Call:
    """The forward returns (context,); training returns the context and the gradients of <context, grad_out> to
    every input (query, keys, values, w_q, w_k, v; the projected keys for a decoder step)."""
    gen = torch.Generator().manual_seed(SEED)
    grad = shape.training

    def randn(*sizes: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(sizes, generator=gen, dtype=DTYPE) * scale).to(shape.dtype).requires_grad_(grad)

    b, d, h = shape.batch, shape.dim, shape.hidden
    query, values = randn(b, shape.len_q, d), randn(b, shape.len_k, d)
    keys = randn(b, shape.len_k, h) if shape.decoder else randn(b, shape.len_k, d)
    w_q, v = randn(h, d, scale=d ** -0.5), randn(h, scale=h ** -0.5)
    w_k = None if shape.decoder else randn(h, d, scale=d ** -0.5)
    mask = torch.rand(b, shape.len_k, generator=gen) < PADDING_FRACTION
    mask[:, 0] = False
    args = (query, keys, values, w_q, w_k, v, mask)
    if not grad:
        def forward() -> tuple[Tensor]:
            with torch.no_grad():
                return (attention(*args),)
        return forward

    grad_out = torch.randn(b, shape.len_q, d, generator=gen, dtype=DTYPE).to(shape.dtype)
    inputs = [a for a in args if isinstance(a, Tensor) and a.requires_grad]

    def train() -> list[Tensor]:
        out = attention(*args)
        return [out.detach(), *torch.autograd.grad(out, inputs, grad_out)]
    return train


def _implementation(dtype: torch.dtype) -> str:
    """Which seqkern implementation serves CPU tensors of `dtype` here ("reference" until the C++ kernel is
    registered, or when the extension is not built)."""
    return seqkern.backends.resolve("additive_attention", torch.device("cpu"), dtype,
                                    seqkern.ops.additive_attention.SUPPORTED_DTYPES,
                                    kernel="additive_attention_forward")


def _case(shape: Shape, contenders: dict[str, Callable[[], Call]], *, name: str | None = None,
          notes: dict | None = None, **options) -> Case:
    return Case(op="additive_attention", name=name or shape.name, flops=flops(shape), contenders=contenders,
                params={**dataclasses.asdict(shape), "dtype": str(shape.dtype).removeprefix("torch.")},
                notes={"seqkern_implementation": _implementation(shape.dtype), **(notes or {})}, **options)


def _setup(attention: Callable[..., Tensor], shape: Shape) -> Callable[[], Call]:
    return lambda: _call(attention, shape)


def _timed_case(shape: Shape, quick: bool) -> Case:
    """seqkern against the composed version, eager and compiled, where their memory and time allow."""
    skipped = {}
    if quick:
        skipped[COMPILED] = "quick set (compilation takes tens of seconds)"
    if shape.len_q > COMPOSED_MAX_LENGTH:
        why = (f"its (B,Lq,Lk,H) tensors take {shape.tanh_bytes / MIB:.0f} MiB each, several alive at once; timed "
               f"up to Lq = Lk = {COMPOSED_MAX_LENGTH}")
        skipped.update({COMPOSED: why, COMPILED: why})
    candidates = {SUBJECT: _seqkern, COMPOSED: composed, COMPILED: _compiled}
    contenders = {name: _setup(fn, shape) for name, fn in candidates.items() if name not in skipped}
    return _case(shape, contenders, skipped=skipped)


def _memory_case(shape: Shape) -> Case:
    """One profiled training step each of seqkern and the composed version: peak extra memory."""
    contenders = {SUBJECT: _setup(_seqkern, shape), COMPOSED: _setup(composed, shape)}
    return _case(shape, contenders, name=f"memory {shape.name}", memory_only=True,
                 notes={"tanh_tensor_bytes": shape.tanh_bytes})


def cases(quick: bool = False) -> list[Case]:
    """The default additive attention set, or with `quick` one tiny case of each kind."""
    forward = QUICK_FORWARD_SHAPES if quick else FORWARD_SHAPES
    training = QUICK_TRAINING_SHAPES if quick else TRAINING_SHAPES
    decoder = QUICK_DECODER_SHAPES if quick else DECODER_SHAPES
    bf16 = QUICK_BF16_SHAPES if quick else BF16_SHAPES
    return [
        *(_timed_case(shape, quick) for shape in (*forward, *training, *decoder, *bf16)),
        _memory_case(QUICK_MEMORY_SHAPE if quick else MEMORY_SHAPE),
    ]
