"""LSTM benchmark: seqkern.nn.LSTM against torch.nn.LSTM (oneDNN on CPU), the eager reference, and
torch.compile of the reference cell; the machinery is shared with the GRU and RNN in _recurrent.py."""
from __future__ import annotations

import torch
from torch import Tensor

import seqkern
from benchmarks import _recurrent
from benchmarks._recurrent import Shape
from benchmarks.harness import Case


def _reference_cell_step(x_proj_t: Tensor, h: Tensor, c: Tensor, w_hh: Tensor) -> tuple[Tensor, Tensor]:
    """One LSTM step on the input projection x W_ih^T + b_ih + b_hh (B,4H), gate order i, f, g, o as torch.nn;
    h, c (B,H), w_hh (4H,H) -> h', c' (B,H)."""
    gates = x_proj_t + h @ w_hh.t()
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, c


LAYER = _recurrent.RecurrentLayer(
    op="lstm", torch_class=torch.nn.LSTM, seqkern_class=seqkern.nn.LSTM, gate_blocks=4, num_states=2,
    cell_step=_reference_cell_step,
)

DEFAULT_SHAPES = (
    *_recurrent.INFERENCE_SHAPES,
    Shape(batch=64, steps=50, hidden=512, training=False),
    *_recurrent.TRAINING_SHAPES,
    *_recurrent.BF16_SHAPES,
    *_recurrent.STEP_SHAPES,
)


def cases(quick: bool = False) -> list[Case]:
    """The default LSTM set, or with `quick` tiny shapes that exercise every contender cheaply; then variable
    lengths (b32 t100 h256, lengths 10..100) against torch.nn with pack_padded_sequence."""
    return _recurrent.cases(LAYER, DEFAULT_SHAPES, quick) + _recurrent.lengths_cases(LAYER, quick)
