"""The LayerNorm GRU in plain PyTorch, reset-after as torch.nn.GRU (seqkern/ops/_schemas.py has the op contract).

With LN(v; w, b) the layer normalization of v over its last axis (eps as given), gate order r, z, n:
    gx = LN(x W_ih^T; ln_ih) + b_ih,   gh = LN(h W_hh^T; ln_hh) + b_hh
    r = sigmoid(gx_r + gh_r),  z = sigmoid(gx_z + gh_z),  n = tanh(gx_n + r * gh_n),  h' = (1 - z) * n + z * h
Lengths, resets and zoneout are those of seqkern/reference/_scan.py.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from seqkern.reference._scan import scan


def _with_bias(gates: Tensor, bias: Tensor | None) -> Tensor:
    return gates if bias is None else gates + bias


def layernorm_gru_forward(
    input: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
    ln_ih_weight: Tensor, ln_ih_bias: Tensor, ln_hh_weight: Tensor, ln_hh_bias: Tensor, eps: float,
    lengths: Tensor | None, resets: Tensor | None, zoneout: float, zoneout_seed: Tensor | None, reverse: bool,
    save_workspace: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """One layer, one direction, whole sequence: input (T,B,I), h0 (B,H) -> output (T,B,H), h_n (B,H), workspace
    (the kernels' backward record; always empty here: autograd differentiates this function)."""
    gates = w_hh.shape[0]  # 3H
    gates_x = _with_bias(F.layer_norm(input @ w_ih.t(), (gates,), ln_ih_weight, ln_ih_bias, eps), b_ih)

    def step(gx: Tensor, state: tuple[Tensor, ...]):
        (h,) = state
        gh = _with_bias(F.layer_norm(h @ w_hh.t(), (gates,), ln_hh_weight, ln_hh_bias, eps), b_hh)
        x_r, x_z, x_n = gx.chunk(3, dim=-1)
        h_r, h_z, h_n = gh.chunk(3, dim=-1)
        r, z = (x_r + h_r).sigmoid(), (x_z + h_z).sigmoid()
        n = (x_n + r * h_n).tanh()
        return ((1 - z) * n + z * h,), ()

    (output,), (h_n,) = scan(step, gates_x, (h0,), None, reverse, lengths=lengths, resets=resets, zoneout=zoneout,
                             zoneout_seed=zoneout_seed)
    return output, h_n, input.new_zeros(0)
