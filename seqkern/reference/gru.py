"""The GRU in plain PyTorch, in PyTorch's reset-after form (see seqkern/ops/_schemas.py for the op contracts).

Gate order r, z, n, as torch.nn.GRU:
    r = sigmoid(x W_ir^T + b_ir + h W_hr^T + b_hr),  z = sigmoid(x W_iz^T + b_iz + h W_hz^T + b_hz)
    n = tanh(x W_in^T + b_in + r * (h W_hn^T + b_hn)),   h' = (1 - z) * n + z * h
"""
from __future__ import annotations

import torch
from torch import Tensor

from seqkern.reference._scan import scan


def _cell(gates_x: Tensor, gates_h: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """gates_x, gates_h (B,3H) with their biases, h (B,H) -> h' (B,H), workspace (B,4H) = [r, z, n, W_hn h + b_hn]."""
    x_r, x_z, x_n = gates_x.chunk(3, dim=-1)
    h_r, h_z, h_n = gates_h.chunk(3, dim=-1)
    r = (x_r + h_r).sigmoid()
    z = (x_z + h_z).sigmoid()
    n = (x_n + r * h_n).tanh()
    return (1 - z) * n + z * h, torch.cat([r, z, n, h_n], dim=-1)


def _with_bias(gates: Tensor, bias: Tensor | None) -> Tensor:
    return gates if bias is None else gates + bias


def gru_cell_forward(
    gates_x: Tensor, gates_h: Tensor, hx: Tensor, b_ih: Tensor | None, b_hh: Tensor | None
) -> tuple[Tensor, Tensor]:
    """gates_x = x W_ih^T, gates_h = h W_hh^T (B,3H), hx (B,H), biases (3H,) or None -> hy (B,H), workspace (B,4H)."""
    return _cell(_with_bias(gates_x, b_ih), _with_bias(gates_h, b_hh), hx)


def gru_forward(
    input: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
    batch_sizes: Tensor | None, reverse: bool, save_workspace: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """input (T,B,I), h0 (B,H) -> output (T,B,H), h_n (B,H), workspace (T,B,4H) (empty unless save_workspace)."""
    gates_x = _with_bias(input @ w_ih.t(), b_ih)

    def step(gx: Tensor, state: tuple[Tensor, ...]):
        h_new, workspace = _cell(gx, _with_bias(state[0] @ w_hh.t(), b_hh), state[0])
        return (h_new,), (workspace,)

    (output, workspace), (h_n,) = scan(step, gates_x, (h0,), batch_sizes, reverse)
    return output, h_n, workspace if save_workspace else input.new_zeros(0)
