"""The LSTM in plain PyTorch, written for clarity (see seqkern/ops/_schemas.py for the op contracts).

Gate order i, f, g, o, as torch.nn.LSTM:
    i, f, o = sigmoid(.), g = tanh(.) of  x W_ih^T + b_ih + h W_hh^T + b_hh
    c' = f * c + i * g,   h' = o * tanh(c'),   and with a projection h' = (o * tanh(c')) W_hr^T.
"""
from __future__ import annotations

import torch
from torch import Tensor

from seqkern.reference._scan import scan


def _activate(preact: Tensor) -> Tensor:
    """(..., 4H) pre-activations -> (..., 4H) activated gates [sigmoid i, sigmoid f, tanh g, sigmoid o]."""
    i, f, g, o = preact.chunk(4, dim=-1)
    return torch.cat([i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()], dim=-1)


def _cell_update(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """Activated gates (B,4H), c (B,H) -> (o * tanh(c'), c')."""
    i, f, g, o = gates.chunk(4, dim=-1)
    c_new = f * c + i * g
    return o * c_new.tanh(), c_new


def lstm_cell_forward(
    gates_x: Tensor, gates_h: Tensor, cx: Tensor, b_ih: Tensor | None, b_hh: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """gates_x, gates_h (B,4H), cx (B,H), b_ih, b_hh (4H,) or None -> hy (B,H), cy (B,H), gates (B,4H)."""
    preact = gates_x + gates_h
    if b_ih is not None:
        preact = preact + b_ih + b_hh
    gates = _activate(preact)
    hy, cy = _cell_update(gates, cx)
    return hy, cy, gates


def lstm_forward(
    input: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
    b_hh: Tensor | None, w_hr: Tensor | None, batch_sizes: Tensor | None, reverse: bool, save_workspace: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One layer, one direction, whole sequence.

    input (T,B,I), h0 (B,P), c0 (B,H) -> output (T,B,P), h_n (B,P), c_n (B,H), gates (T,B,4H), cells (T,B,H)
    (gates and cells empty unless save_workspace).
    """
    gates_x = input @ w_ih.t()
    if b_ih is not None:
        gates_x = gates_x + (b_ih + b_hh)

    def step(gx: Tensor, state: tuple[Tensor, ...]):
        h, c = state
        gates = _activate(gx + h @ w_hh.t())
        r, c_new = _cell_update(gates, c)
        h_new = r @ w_hr.t() if w_hr is not None else r
        return (h_new, c_new), (gates,)

    (output, cells, gates), (h_n, c_n) = scan(step, gates_x, (h0, c0), batch_sizes, reverse)
    if not save_workspace:
        gates, cells = input.new_zeros(0), input.new_zeros(0)
    return output, h_n, c_n, gates, cells
