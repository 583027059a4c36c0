"""Elman RNN (tanh) benchmark: seqkern.nn.RNN against torch.nn.RNN (no oneDNN path on CPU), the eager
reference, and torch.compile of the reference cell; the machinery is shared with the LSTM and GRU in
_recurrent.py.

Target (read off the table, not asserted): >= 2x torch.nn.RNN in inference and training.
"""
from __future__ import annotations

import torch
from torch import Tensor

import seqkern
from benchmarks import _recurrent
from benchmarks.harness import Case


def _reference_cell_step(gates_x_t: Tensor, h: Tensor, w_hh: Tensor) -> tuple[Tensor]:
    """One tanh RNN step: gates_x_t = x W_ih^T + b_ih + b_hh (B,H), h (B,H), w_hh (H,H) -> (h' (B,H),)."""
    return (torch.tanh(gates_x_t + h @ w_hh.t()),)


LAYER = _recurrent.RecurrentLayer(
    op="rnn", torch_class=torch.nn.RNN, seqkern_class=seqkern.nn.RNN, gate_blocks=1, num_states=1,
    cell_step=_reference_cell_step, module_kwargs={"nonlinearity": "tanh"},
)

DEFAULT_SHAPES = (*_recurrent.INFERENCE_SHAPES, *_recurrent.TRAINING_SHAPES, *_recurrent.BF16_SHAPES,
                  *_recurrent.STEP_SHAPES)


def cases(quick: bool = False) -> list[Case]:
    """The default RNN set, or with `quick` two tiny shapes that exercise every contender cheaply."""
    return _recurrent.cases(LAYER, DEFAULT_SHAPES, quick)
