"""GRU benchmark: seqkern.nn.GRU against torch.nn.GRU (no oneDNN path on CPU), the eager reference, and
torch.compile of the reference cell; the machinery is shared with the LSTM and RNN in _recurrent.py.

Targets (read off the table, not asserted): inference >= 3x torch.nn.GRU at batch 1 and >= 1.5x at
batch 32; training >= 2x.
"""
from __future__ import annotations

import torch
from torch import Tensor

import seqkern
from benchmarks import _recurrent
from benchmarks.harness import Case


def _reference_cell_step(gates_x_t: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor) -> tuple[Tensor]:
    """One GRU step in PyTorch's reset-after form, gate order r, z, n as torch.nn: gates_x_t = x W_ih^T + b_ih
    (B,3H), h (B,H), w_hh (3H,H), b_hh (3H,) -> (h' (B,H),).

    b_hh stays here rather than in the input projection because r multiplies the n part of W_hh h + b_hh.
    """
    x_r, x_z, x_n = gates_x_t.chunk(3, dim=-1)
    h_r, h_z, h_n = (h @ w_hh.t() + b_hh).chunk(3, dim=-1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return ((1 - z) * n + z * h,)


LAYER = _recurrent.RecurrentLayer(
    op="gru", torch_class=torch.nn.GRU, seqkern_class=seqkern.nn.GRU, gate_blocks=3, num_states=1,
    cell_step=_reference_cell_step, hidden_bias_in_step=True,
)

DEFAULT_SHAPES = (*_recurrent.INFERENCE_SHAPES, *_recurrent.TRAINING_SHAPES, *_recurrent.BF16_SHAPES,
                  *_recurrent.STEP_SHAPES)


def cases(quick: bool = False) -> list[Case]:
    """The default GRU set, or with `quick` two tiny shapes that exercise every contender cheaply; plus episode
    resets (b32 t100 h256, ~2% of the steps) against torch.nn.GRUCell stepped in Python with the resets applied."""
    return _recurrent.cases(LAYER, DEFAULT_SHAPES, quick) + _recurrent.resets_cases(LAYER, quick)
