"""The LayerNorm LSTM in plain PyTorch, written for clarity (seqkern/ops/_schemas.py has the op contract).

With LN(v; w, b) the layer normalization of v over its last axis (eps as given), gate order i, f, g, o:
    gates = LN(x W_ih^T; ln_ih) + LN(h W_hh^T; ln_hh) + b_ih + b_hh
    c' = sigmoid(f) * c + sigmoid(i) * tanh(g),   h' = sigmoid(o) * tanh(LN(c'; ln_cell))
Lengths, resets and zoneout are those of seqkern/reference/_scan.py.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from seqkern.reference._scan import scan


def layernorm_lstm_forward(
    input: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
    ln_ih_weight: Tensor, ln_ih_bias: Tensor, ln_hh_weight: Tensor, ln_hh_bias: Tensor, ln_cell_weight: Tensor,
    ln_cell_bias: Tensor, eps: float, lengths: Tensor | None, resets: Tensor | None, zoneout: float,
    zoneout_seed: Tensor | None, reverse: bool, save_workspace: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One layer, one direction, whole sequence: input (T,B,I), h0, c0 (B,H) -> output (T,B,H), h_n, c_n (B,H),
    workspace (the kernels' backward record; always empty here: autograd differentiates this function)."""
    gates = w_hh.shape[0]  # 4H
    gates_x = F.layer_norm(input @ w_ih.t(), (gates,), ln_ih_weight, ln_ih_bias, eps)
    if b_ih is not None:
        gates_x = gates_x + (b_ih + b_hh)

    def step(gx: Tensor, state: tuple[Tensor, ...]):
        h, c = state
        i, f, g, o = (gx + F.layer_norm(h @ w_hh.t(), (gates,), ln_hh_weight, ln_hh_bias, eps)).chunk(4, dim=-1)
        c_new = f.sigmoid() * c + i.sigmoid() * g.tanh()
        h_new = o.sigmoid() * F.layer_norm(c_new, (c_new.shape[-1],), ln_cell_weight, ln_cell_bias, eps).tanh()
        return (h_new, c_new), ()

    (output, _), (h_n, c_n) = scan(step, gates_x, (h0, c0), None, reverse, lengths=lengths, resets=resets,
                                   zoneout=zoneout, zoneout_seed=zoneout_seed)
    return output, h_n, c_n, input.new_zeros(0)
