"""seqkern.nn.PositionalEncoding: the sinusoidal position encoding of "Attention Is All You Need" (Vaswani et
al., 2017, section 3.5), added to the input, then dropout.

    PE[pos, 2i]   = sin(pos / 10000^(2i/d_model))
    PE[pos, 2i+1] = cos(pos / 10000^(2i/d_model))

The table is a non-persistent buffer: it follows .to()/.double() but stays out of state_dict, so a model using
this module has the state_dict of the same model without it.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from seqkern._checks import DTypeError, ShapeError, check_tensor


def sinusoidal_table(length: int, d_model: int, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """(length, d_model): sin on the even features, cos on the odd ones; an odd d_model ends with a sin.
    Computed in float64, then cast (positions up to 5000 times frequencies near 1 lose digits in float32)."""
    position = torch.arange(length, dtype=torch.float64, device=device).unsqueeze(1)
    # 1 / 10000^(2i/d) for the feature pairs (2i, 2i+1); ceil covers the last, lone sin of an odd d_model.
    inverse_frequency = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64, device=device)
                                  * (-math.log(10000.0) / d_model))
    angles = position * inverse_frequency  # (length, ceil(d_model/2))
    table = torch.empty(length, d_model, dtype=torch.float64, device=device)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles[:, : d_model // 2])
    return table.to(dtype)


class PositionalEncoding(torch.nn.Module):
    """x + PE[:L], then dropout.

    PositionalEncoding(d_model, dropout=0.1, max_len=5000, batch_first=False)
    forward(x (L,B,d_model), or (B,L,d_model) with batch_first, or (L,d_model)) -> like x; L <= max_len.
    """

    def __init__(self, d_model: int, dropout: float = 0.1, max_len: int = 5000, batch_first: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        if d_model < 1 or max_len < 1:
            raise ShapeError(f"d_model, max_len: expected positive sizes, got d_model={d_model}, max_len={max_len}")
        if not 0.0 <= dropout <= 1.0:
            raise ShapeError(f"dropout: expected a probability in [0, 1], got {dropout}")
        self.d_model, self.max_len, self.batch_first = d_model, max_len, batch_first
        self.dropout = torch.nn.Dropout(dropout)
        self.register_buffer("pe", sinusoidal_table(max_len, d_model, dtype or torch.get_default_dtype(), device),
                             persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        check_tensor("x", x)
        if x.dim() not in (2, 3) or x.shape[-1] != self.d_model:
            raise ShapeError(f"x: expected (L, B, {self.d_model}), (B, L, {self.d_model}) with batch_first or "
                             f"(L, {self.d_model}), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise DTypeError(f"x: expected a floating-point tensor, got {x.dtype}")
        length_dim = 1 if self.batch_first and x.dim() == 3 else 0
        length = x.shape[length_dim]
        if length > self.max_len:
            raise ShapeError(f"x: sequence length {length} (dim {length_dim} of shape {tuple(x.shape)}) exceeds "
                             f"max_len={self.max_len}; construct PositionalEncoding with a larger max_len")
        pe = self.pe[:length].to(x.dtype)
        if x.dim() == 3 and not self.batch_first:
            pe = pe.unsqueeze(1)  # (L,1,E) against (L,B,E)
        return self.dropout(x + pe)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, max_len={self.max_len}, batch_first={self.batch_first}"
