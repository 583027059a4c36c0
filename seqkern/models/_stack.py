"""The stack of encoder layers both models are built from."""
from __future__ import annotations

import torch

from seqkern._checks import DTypeError, ShapeError
from seqkern.nn import TransformerEncoderLayer


def encoder_layers(layer_cls: type[torch.nn.Module] | None, num_layers: int, d_model: int, nhead: int,
                   dim_feedforward: int, dropout: float, layer_norm_eps: float, norm_first: bool,
                   device=None, dtype=None) -> torch.nn.ModuleList:
    """`num_layers` batch-first GELU layers of `layer_cls` (None: seqkern's), which takes torch.nn.
    TransformerEncoderLayer's constructor arguments and has its attributes (self_attn, linear1/2, norm1/2, ...)."""
    for name, value in (("num_layers", num_layers), ("d_model", d_model), ("nhead", nhead),
                        ("dim_feedforward", dim_feedforward)):
        if not isinstance(value, int) or value < 1:
            raise ShapeError(f"{name}: expected a positive int, got {value!r}")
    if d_model % nhead:
        raise ShapeError(f"nhead: expected a divisor of d_model ({d_model}), got {nhead}")
    if not 0.0 <= dropout < 1.0:
        raise ShapeError(f"dropout: expected a probability in [0, 1), got {dropout}")
    layer_cls = layer_cls or TransformerEncoderLayer
    return torch.nn.ModuleList(
        layer_cls(d_model, nhead, dim_feedforward, dropout, activation="gelu", layer_norm_eps=layer_norm_eps,
                  batch_first=True, norm_first=norm_first, device=device, dtype=dtype)
        for _ in range(num_layers)
    )


def check_token_ids(name: str, ids: torch.Tensor, vocab_size: int, max_len: int) -> None:
    """ids: a (B, T) integer tensor, T <= max_len, every id in [0, vocab_size)."""
    if not isinstance(ids, torch.Tensor):
        raise DTypeError(f"{name}: expected a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise DTypeError(f"{name}: expected an int64 or int32 tensor of token ids, got {ids.dtype}")
    if ids.dim() != 2:
        raise ShapeError(f"{name}: expected a 2-D (batch, length) tensor, got shape {tuple(ids.shape)}")
    if ids.shape[1] > max_len:
        raise ShapeError(f"{name}: expected at most max_len={max_len} positions, got shape {tuple(ids.shape)}")
    # Data-dependent: checked eagerly; under torch.compile the embedding's own bounds check remains.
    if ids.numel() and not torch.compiler.is_compiling() and not bool(((ids >= 0) & (ids < vocab_size)).all()):
        raise ShapeError(f"{name}: expected ids in [0, {vocab_size}), got values from {int(ids.min())} "
                         f"to {int(ids.max())}")
