"""LayerNorm GRU benchmark: seqkern.nn.LayerNormGRU against its definition composed in eager PyTorch and against
the composed cell under torch.compile (machinery and shapes: bench_layernorm_lstm.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

import seqkern
from benchmarks.bench_layernorm_lstm import LayerNormLayer, layer_cases
from benchmarks.harness import Case


def gru_step(gx: Tensor, h: Tensor, p: dict[str, Tensor], eps: float) -> tuple[Tensor]:
    """gh = LN(h W_hh^T) + b_hh; r, z = sigmoid(gx + gh) blocks; n = tanh(gx_n + r gh_n); h' = (1 - z) n + z h."""
    gh = F.layer_norm(h @ p["weight_hh"].t(), (gx.shape[-1],), p["ln_hh_weight"], p["ln_hh_bias"], eps) + p["bias_hh"]
    x_r, x_z, x_n = gx.chunk(3, dim=-1)
    h_r, h_z, h_n = gh.chunk(3, dim=-1)
    r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return ((1 - z) * n + z * h,)


LAYER = LayerNormLayer("layernorm_gru", seqkern.nn.LayerNormGRU, 3, 1, gru_step, hidden_bias_in_step=True)


def cases(quick: bool = False) -> list[Case]:
    """The default LayerNorm GRU set, or with `quick` two tiny shapes."""
    return layer_cases(LAYER, quick)
