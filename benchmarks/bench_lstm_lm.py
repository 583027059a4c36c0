"""A classic word-level LSTM language model's training step (PyTorch's word_language_model example: embedding,
2-layer LSTM, linear decoder, truncated backpropagation through time), built from torch.nn, against the same model
after `seqkern.convert` (its LSTM swapped for seqkern.nn.LSTM, nothing else touched).

One timed call is one step of truncated BPTT as the example trains: the hidden state carried over from the
previous step (detached), forward over `bptt` tokens, cross-entropy on the next tokens, backward, gradient clipping
at 0.25, and an SGD update. It returns the loss and every parameter's gradient of that step, which the correctness
gate compares (first call, from the seed's weights and a zero state) with the torch.nn model in float64. float32,
and a bfloat16 row: both models held and trained in bf16 (the float64 oracle starts from the bf16-rounded weights).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import seqkern
from benchmarks.harness import SUBJECT, Call, Case, dtype_suffix

SEED = 0
TORCH_MODEL = "torch.nn model"
CLIP = 0.25  # the example's default
LEARNING_RATE = 0.1


@dataclasses.dataclass(frozen=True)
class Shape:
    vocab: int
    embed: int
    hidden: int
    layers: int
    batch: int
    bptt: int
    dtype: torch.dtype = torch.float32

    @property
    def name(self) -> str:
        return (f"train step v{self.vocab} e{self.embed} h{self.hidden} x{self.layers} "
                f"b{self.batch} bptt{self.bptt}{dtype_suffix(self.dtype)}")


DEFAULT_SHAPES = (Shape(vocab=10000, embed=256, hidden=256, layers=2, batch=32, bptt=35),
                  Shape(vocab=10000, embed=256, hidden=256, layers=2, batch=32, bptt=35, dtype=torch.bfloat16))
QUICK_SHAPES = (Shape(vocab=50, embed=16, hidden=16, layers=2, batch=3, bptt=5),
                Shape(vocab=50, embed=16, hidden=16, layers=2, batch=3, bptt=5, dtype=torch.bfloat16))


class WordLanguageModel(nn.Module):
    """Embedding -> dropout-free multi-layer LSTM -> linear decoder over the vocabulary; input (bptt, B) ids."""

    def __init__(self, shape: Shape) -> None:
        super().__init__()
        self.encoder = nn.Embedding(shape.vocab, shape.embed)
        self.rnn = nn.LSTM(shape.embed, shape.hidden, shape.layers)
        self.decoder = nn.Linear(shape.hidden, shape.vocab)

    def forward(self, ids: Tensor, hidden: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        output, hidden = self.rnn(self.encoder(ids), hidden)
        return self.decoder(output), hidden


def flops(shape: Shape) -> float:
    """GEMM work of one step: the LSTM layers and the decoder, forward once and backward twice over."""
    tokens = shape.batch * shape.bptt
    lstm = sum(2 * tokens * 4 * shape.hidden * ((shape.embed if layer == 0 else shape.hidden) + shape.hidden)
               for layer in range(shape.layers))
    decoder = 2 * tokens * shape.hidden * shape.vocab
    return 3 * (lstm + decoder)


def _model(shape: Shape, dtype: torch.dtype) -> WordLanguageModel:
    torch.manual_seed(SEED)
    return WordLanguageModel(shape).to(dtype)


def _data(shape: Shape) -> tuple[Tensor, Tensor]:
    """(bptt, B) input ids and the (bptt, B) next-token targets."""
    generator = torch.Generator().manual_seed(SEED)
    stream = torch.randint(shape.vocab, (shape.bptt + 1, shape.batch), generator=generator)
    return stream[:-1], stream[1:]


def _training_step(model: nn.Module, shape: Shape, dtype: torch.dtype) -> Call:
    """One truncated-BPTT step per call, the hidden state carried from call to call (detached)."""
    ids, targets = _data(shape)
    parameters = list(model.parameters())
    state = [torch.zeros(shape.layers, shape.batch, shape.hidden, dtype=dtype) for _ in range(2)]

    def step() -> Sequence[Tensor]:
        for parameter in parameters:
            parameter.grad = None
        logits, (h, c) = model(ids, (state[0], state[1]))
        state[0], state[1] = h.detach(), c.detach()
        loss = F.cross_entropy(logits.reshape(-1, shape.vocab), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, CLIP)
        with torch.no_grad():
            for parameter in parameters:
                parameter.add_(parameter.grad, alpha=-LEARNING_RATE)
        return [loss.detach(), *(parameter.grad for parameter in parameters)]
    return step


def _contenders(shape: Shape) -> dict[str, Callable[[], Call]]:
    def torch_model() -> Call:
        return _training_step(_model(shape, shape.dtype), shape, shape.dtype)

    def converted() -> Call:
        converted_model, _report = seqkern.convert(_model(shape, shape.dtype))
        return _training_step(converted_model, shape, shape.dtype)

    return {SUBJECT: converted, TORCH_MODEL: torch_model}


def _oracle(shape: Shape) -> Callable[[], Sequence[Tensor]]:
    return lambda: _training_step(_model(shape, shape.dtype).to(torch.float64), shape, torch.float64)()


def cases(quick: bool = False) -> list[Case]:
    return [
        Case(op="lstm_lm", name=shape.name,
             params={**dataclasses.asdict(shape), "dtype": str(shape.dtype).removeprefix("torch.")},
             flops=flops(shape), contenders=_contenders(shape), oracle=_oracle(shape), rule_baseline=TORCH_MODEL)
        for shape in (QUICK_SHAPES if quick else DEFAULT_SHAPES)
    ]
