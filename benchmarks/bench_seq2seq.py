"""Seq2Seq benchmark: one training step of seqkern.models.Seq2Seq (seqkern.nn.LSTM/GRU encoder, fused cell-step
decoder, fused additive attention) against the same model built with layers="torch" (torch.nn.LSTM/GRU, torch.nn's
step-by-step cells, the composed PyTorch attention: what a user writes without seqkern) and, on the training cases,
torch.compile of that torch-built model; plus greedy decoding.

Every contender loads the same state_dict (the torch-built model's, drawn from one seed) and gets the same batch:
source and target length 50, ragged source lengths (uniform in 25..50, the longest 50), additive attention, a
bidirectional encoder, embed 256, hidden 256, vocabulary 1000, dropout 0; float32, and a bfloat16 LSTM training
step (both models in bf16).

  * training step: forward with teacher forcing, cross-entropy (ignore_index = pad), backward to every parameter
    (autograd.grad; no optimizer), LSTM and GRU, batch 32;
  * inference: greedy_decode of 50 tokens, batch 32, under torch.no_grad().

Target (read off the table, not asserted): the training step >= 1.5x the torch.nn-built model.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.harness import SUBJECT, Call, Case, dtype_suffix
from seqkern.models import Seq2Seq

SEED = 0
PAD, BOS, EOS = 0, 1, 2
TORCH_NN = "torch.nn layers"
COMPILED = "torch.compile(torch.nn layers)"


@dataclasses.dataclass(frozen=True)
class Shape:
    """A batch of `batch` sources of up to `src_len` tokens (lengths uniform in src_len/2..src_len) and targets of
    `tgt_len` tokens; `training`: forward + loss + backward, otherwise greedy decoding of `tgt_len` tokens."""

    batch: int
    src_len: int
    tgt_len: int
    embed: int
    hidden: int
    vocab: int
    rnn: str
    training: bool
    attention: str = "additive"
    dtype: torch.dtype = torch.float32

    @property
    def name(self) -> str:
        mode = "train step" if self.training else "greedy decode"
        return (f"{mode} {self.rnn} b{self.batch} s{self.src_len} t{self.tgt_len} e{self.embed} h{self.hidden} "
                f"v{self.vocab}{dtype_suffix(self.dtype)}")

    def build(self, layers: str) -> Seq2Seq:
        """The model with `layers`, holding the weights torch's layers draw from SEED (the same for every contender),
        in the shape's dtype."""
        model = self._model(layers)
        model.load_state_dict(_weights(self))
        return model.to(self.dtype).train(self.training)

    def _model(self, layers: str) -> Seq2Seq:
        return Seq2Seq(self.vocab, self.vocab, embed_dim=self.embed, hidden_size=self.hidden, rnn=self.rnn,
                       bidirectional=True, attention=self.attention, dropout=0.0, pad_id=PAD, bos_id=BOS,
                       eos_id=EOS, layers=layers)


@functools.cache
def _weights(shape: Shape) -> dict[str, Tensor]:
    torch.manual_seed(SEED)
    return shape._model("torch").state_dict()


SHAPES = (
    *(Shape(32, 50, 50, 256, 256, 1000, rnn, training=True) for rnn in ("lstm", "gru")),
    Shape(32, 50, 50, 256, 256, 1000, "lstm", training=False),
    Shape(32, 50, 50, 256, 256, 1000, "lstm", training=True, dtype=torch.bfloat16),
)
QUICK_SHAPES = (
    Shape(3, 7, 5, 16, 16, 23, "lstm", training=True),
    Shape(3, 7, 5, 16, 16, 23, "gru", training=False),
    Shape(3, 7, 5, 16, 16, 23, "gru", training=True, dtype=torch.bfloat16),
)


def flops(shape: Shape, model: Seq2Seq) -> float:
    """The matmul work: 2 flops per weight for every token through it (encoder weights per source token and
    direction, key projection per source token, every other decoder weight per target token: the embeddings
    excluded, they are lookups) and the attention's 4*H + 2*Dv per (target, source) pair; a backward is
    twice a forward."""
    src_tokens, tgt_tokens = shape.batch * shape.src_len, shape.batch * shape.tgt_len
    per_source = sum(p.numel() for name, p in model.named_parameters() if _per_source_token(name))
    per_target = sum(p.numel() for name, p in model.named_parameters()
                     if not _per_source_token(name) and "embed" not in name)
    attention = shape.batch * shape.tgt_len * shape.src_len * (4 * model.attention.hidden_size + 2 * 2 * shape.hidden)
    forward = 2 * (src_tokens * per_source + tgt_tokens * per_target) + attention
    return 3 * forward if shape.training else forward


def _per_source_token(name: str) -> bool:
    return name.startswith("encoder") and "embed" not in name or "key_proj" in name


def _batch(shape: Shape) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """src (B,S) padded after each length, src_lengths (B,), tgt_in (B,T) starting with bos, tgt_out (B,T)."""
    gen = torch.Generator().manual_seed(SEED)
    lengths = torch.randint(shape.src_len // 2, shape.src_len + 1, (shape.batch,), generator=gen)
    lengths[0] = shape.src_len
    src = torch.randint(EOS + 1, shape.vocab, (shape.batch, shape.src_len), generator=gen)
    src = src.masked_fill(torch.arange(shape.src_len) >= lengths[:, None], PAD)
    tgt = torch.randint(EOS + 1, shape.vocab, (shape.batch, shape.tgt_len + 1), generator=gen)
    tgt[:, 0] = BOS
    return src, lengths, tgt[:, :-1].contiguous(), tgt[:, 1:].contiguous()


def _call(shape: Shape, layers: str, compiled: bool = False, dtype: torch.dtype | None = None) -> Call:
    """Training returns the loss and the gradient of every parameter; inference the decoded tokens and scores.
    `dtype`: the model's weights (rounded to the shape's dtype) held in this one (float64: the gate's oracle)."""
    model = shape.build(layers).to(dtype or shape.dtype)
    src, lengths, tgt_in, tgt_out = _batch(shape)
    if not shape.training:
        def decode() -> tuple[Tensor, Tensor]:
            with torch.no_grad():
                decoded = model.greedy_decode(src, lengths, shape.tgt_len)
            return decoded.tokens, decoded.scores
        return decode

    forward = torch.compile(model, dynamic=False) if compiled else model
    parameters = list(model.parameters())

    def train() -> list[Tensor]:
        logits = forward(src, lengths, tgt_in).logits
        loss = F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=PAD)
        # autograd.grad rather than backward(): fresh gradients every call, none accumulating in .grad.
        return [loss.detach(), *torch.autograd.grad(loss, parameters)]
    return train


def _setup(shape: Shape, layers: str, compiled: bool = False) -> Callable[[], Call]:
    return lambda: _call(shape, layers, compiled)


def _case(shape: Shape, quick: bool) -> Case:
    contenders = {SUBJECT: _setup(shape, "seqkern"), TORCH_NN: _setup(shape, "torch")}
    skipped = {}
    if not shape.training:
        skipped[COMPILED] = "greedy decoding stops on data (all rows done): a graph break per step, no fair compile"
    elif quick:
        skipped[COMPILED] = "quick set (compilation takes tens of seconds)"
    else:
        contenders[COMPILED] = _setup(shape, "torch", compiled=True)
    # bf16: the gate checks the rule against the float64 model on the bf16-rounded weights (seqkern's and the
    # torch-built model's bf16 gradients differ by ~10-20% of a tensor's largest magnitude, more than the fixed
    # tolerance of a case without an oracle).
    oracle = (lambda: _call(shape, "torch", dtype=torch.float64)()) if shape.dtype != torch.float32 else None
    return Case(op="seq2seq", name=shape.name, flops=flops(shape, shape.build("torch")), contenders=contenders,
                oracle=oracle, rule_baseline=TORCH_NN if oracle else None,
                skipped=skipped, params={**dataclasses.asdict(shape), "bidirectional": True,
                                         "dtype": str(shape.dtype).removeprefix("torch."),
                                         "src_lengths": f"uniform in {shape.src_len // 2}..{shape.src_len}"})


def cases(quick: bool = False) -> list[Case]:
    """LSTM and GRU training steps and an LSTM greedy decode; with `quick` tiny ones of each kind."""
    return [_case(shape, quick) for shape in (QUICK_SHAPES if quick else SHAPES)]
