"""The Elman RNN in plain PyTorch (see seqkern/ops/_schemas.py for the op contracts):
    h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh)   (or relu, nonlinearity="relu")
"""
from __future__ import annotations

from torch import Tensor

from seqkern.reference._scan import scan


def _activate(preact: Tensor, relu: bool) -> Tensor:
    return preact.relu() if relu else preact.tanh()


def rnn_cell_forward(
    gates_x: Tensor, gates_h: Tensor, b_ih: Tensor | None, b_hh: Tensor | None, relu: bool
) -> Tensor:
    """gates_x = x W_ih^T, gates_h = h W_hh^T (B,H), biases (H,) or None -> hy (B,H)."""
    preact = gates_x + gates_h
    if b_ih is not None:
        preact = preact + b_ih + b_hh
    return _activate(preact, relu)


def rnn_forward(
    input: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
    batch_sizes: Tensor | None, reverse: bool, relu: bool,
) -> tuple[Tensor, Tensor]:
    """input (T,B,I), h0 (B,H) -> output (T,B,H), h_n (B,H). The output is all the backward needs."""
    gates_x = input @ w_ih.t()
    if b_ih is not None:
        gates_x = gates_x + (b_ih + b_hh)

    def step(gx: Tensor, state: tuple[Tensor, ...]):
        h_new = _activate(gx + state[0] @ w_hh.t(), relu)
        return (h_new,), ()

    (output,), (h_n,) = scan(step, gates_x, (h0,), batch_sizes, reverse)
    return output, h_n
