"""Transformer encoder layer benchmark: seqkern.nn.TransformerEncoderLayer against torch.nn's with the same
weights, post-norm, ReLU, batch_first, dropout 0.1, float32 and (both modules in it) bfloat16.

  * forward: eval mode under torch.no_grad(), where torch.nn runs its native fast path
    (torch._transformer_encoder_layer_fwd: fused bias/rescale/transpose of q, k, v, bmm-softmax-bmm attention);
  * forward+backward: training mode (dropout on), the gradients to the input and every parameter of
    <output, grad_out>. The dropout masks differ between the two modules (torch.nn draws Bernoulli tensors,
    seqkern's attention hashes a seed), so "rel diff" compares different random draws there.

Targets (read off the table, not asserted): >= 1.0x torch.nn at the BERT-base shape (d_model 768, 12 heads,
dim_feedforward 3072, batch 8, 512 tokens), forward and forward+backward. The small causal layer (64 tokens, head
dim 32, a causal src_mask as GPT-style models and examples/rnn_vs_transformer.py pass it) is where short sequences
and masked tiles cost most: its training step was 0.63x torch.nn's before round 18 (NOTES.md).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

import seqkern
from benchmarks.harness import SUBJECT, Call, Case, dtype_suffix

SEED = 0
DTYPE = torch.float32
DROPOUT = 0.1
TORCH_NN = "torch.nn"


@dataclasses.dataclass(frozen=True)
class Shape:
    """One encoder layer on x (batch, length, d_model); `training` adds the backward."""

    batch: int
    length: int
    d_model: int
    heads: int
    dim_feedforward: int
    training: bool
    dtype: torch.dtype = DTYPE
    causal: bool = False  # a causal src_mask with is_causal=True

    @property
    def name(self) -> str:
        mode = "fwd+bwd train" if self.training else "fwd eval"
        return (f"{mode} b{self.batch} l{self.length} d{self.d_model} h{self.heads} "
                f"ff{self.dim_feedforward}{' causal' if self.causal else ''}{dtype_suffix(self.dtype)}")


def _shapes(batch: int, length: int, d_model: int, heads: int, dim_feedforward: int,
            dtype: torch.dtype = DTYPE, causal: bool = False) -> tuple[Shape, Shape]:
    return tuple(Shape(batch, length, d_model, heads, dim_feedforward, training, dtype, causal)
                 for training in (False, True))


BERT_BASE = _shapes(batch=8, length=512, d_model=768, heads=12, dim_feedforward=3072)
SMALL = _shapes(batch=8, length=128, d_model=256, heads=4, dim_feedforward=1024)
SMALL_CAUSAL = _shapes(batch=32, length=64, d_model=128, heads=4, dim_feedforward=512, causal=True)
# bfloat16: the attention's tile products (forward and backward) and torch's GEMMs on the bf16 units.
BERT_BASE_BF16 = _shapes(batch=8, length=512, d_model=768, heads=12, dim_feedforward=3072, dtype=torch.bfloat16)
SMALL_BF16 = _shapes(batch=8, length=128, d_model=256, heads=4, dim_feedforward=1024, dtype=torch.bfloat16)
QUICK = _shapes(batch=2, length=16, d_model=32, heads=2, dim_feedforward=64) + _shapes(
    batch=2, length=16, d_model=32, heads=2, dim_feedforward=64, dtype=torch.bfloat16)


def flops(shape: Shape) -> float:
    """The matmul work: the q/k/v, output and two feed-forward projections (2*N*(4*E*E + 2*E*F) for
    N = batch*length tokens) and the attention's QK^T and PV (4*B*L*L*E). A backward doubles the projections
    and is 2.5 attention forwards (bench_attention.py's convention); a causal mask halves the attention's."""
    tokens = shape.batch * shape.length
    projections = 2 * tokens * (4 * shape.d_model**2 + 2 * shape.d_model * shape.dim_feedforward)
    attention = 4 * shape.batch * shape.length**2 * shape.d_model / (2 if shape.causal else 1)
    return 3 * projections + 3.5 * attention if shape.training else projections + attention


def _layer_call(cls: type[torch.nn.TransformerEncoderLayer], shape: Shape) -> Call:
    """A layer of `cls` with the weights every contender gets (drawn by torch.nn from SEED) and its timed call."""
    torch.manual_seed(SEED)
    weights = torch.nn.TransformerEncoderLayer(shape.d_model, shape.heads, shape.dim_feedforward, DROPOUT,
                                               batch_first=True, dtype=DTYPE).state_dict()
    layer = cls(shape.d_model, shape.heads, shape.dim_feedforward, DROPOUT, batch_first=True, dtype=shape.dtype)
    layer.load_state_dict(weights)
    layer.train(shape.training)
    generator = torch.Generator().manual_seed(SEED)
    x = torch.randn(shape.batch, shape.length, shape.d_model, generator=generator, dtype=DTYPE).to(shape.dtype)
    causal_mask = torch.nn.Transformer.generate_square_subsequent_mask
    mask = causal_mask(shape.length, dtype=shape.dtype) if shape.causal else None
    if not shape.training:
        def forward() -> tuple[Tensor]:
            with torch.no_grad():
                return (layer(x, src_mask=mask, is_causal=shape.causal),)
        return forward

    x.requires_grad_()
    grad_out = torch.randn(x.shape, generator=generator, dtype=DTYPE).to(shape.dtype)
    leaves = (x, *layer.parameters())

    def train() -> list[Tensor]:
        out = layer(x, src_mask=mask, is_causal=shape.causal)
        # autograd.grad rather than backward(): fresh gradients every call, none accumulating in .grad.
        return [out.detach(), *torch.autograd.grad(out, leaves, grad_out)]
    return train


def _setup(cls: type[torch.nn.TransformerEncoderLayer], shape: Shape) -> Callable[[], Call]:
    return lambda: _layer_call(cls, shape)


def _case(shape: Shape) -> Case:
    contenders = {SUBJECT: _setup(seqkern.nn.TransformerEncoderLayer, shape),
                  TORCH_NN: _setup(torch.nn.TransformerEncoderLayer, shape)}
    # In training mode both layers draw dropout masks, from different generators (seqkern's attention dropout is a
    # counter hash of the seed): their results differ by design there. tests/test_transformer.py compares them
    # with dropout at 0 and with the same masks.
    differs = {TORCH_NN: f"dropout {DROPOUT} in training mode draws different masks"} if shape.training else {}
    return Case(op="transformer", name=shape.name, flops=flops(shape), contenders=contenders,
                params={**dataclasses.asdict(shape), "dtype": str(shape.dtype).removeprefix("torch."),
                        "dropout": DROPOUT, "batch_first": True, "norm_first": False, "activation": "relu"},
                differs_on_purpose=differs)


def cases(quick: bool = False) -> list[Case]:
    """BERT-base, a smaller layer and a small causal one, forward and forward+backward, float32 then bfloat16 (not
    the causal one); with `quick` one tiny layer in each dtype."""
    return [_case(shape) for shape in (QUICK if quick else (*BERT_BASE, *SMALL, *SMALL_CAUSAL, *BERT_BASE_BF16,
                                                             *SMALL_BF16))]
