"""BertEncoder: an encoder-only (BERT-style) stack on seqkern's layers.

    encoder = seqkern.models.BertEncoder(vocab_size=30522, d_model=256, nhead=4, num_layers=4,
                                         dim_feedforward=1024)
    sequence_output, pooled_output = encoder(input_ids, attention_mask, token_type_ids)
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from seqkern._checks import ShapeError
from seqkern.models._stack import check_token_ids, encoder_layers

# BERT's initialization of the embeddings (its initializer_range).
EMBEDDING_INIT_STD = 0.02


class BertEncoder(nn.Module):
    """Token + position + segment (token-type) embeddings, LayerNorm and dropout, then `num_layers` post-norm
    GELU encoder layers (`layer_cls`, batch_first), and the pooler tanh(Linear(first token)).

    layer_cls: any class with torch.nn.TransformerEncoderLayer's constructor and attributes; None means
    seqkern.nn.TransformerEncoderLayer.

    forward(input_ids (B, T) int64, attention_mask (B, T) or None (1 = a real token, 0 = padding, as in
    Hugging Face's BERT), token_type_ids (B, T) int64 or None (all segment 0))
      -> (sequence_output (B, T, d_model), pooled_output (B, d_model)). Padding takes no part in any
    attention; its own output rows are unspecified.
    """

    def __init__(self, vocab_size: int, d_model: int, nhead: int, num_layers: int, dim_feedforward: int,
                 max_len: int = 512, type_vocab_size: int = 2, dropout: float = 0.1, layer_norm_eps: float = 1e-12,
                 layer_cls: type[nn.Module] | None = None, device=None, dtype=None) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("max_len", max_len), ("type_vocab_size", type_vocab_size)):
            if not isinstance(value, int) or value < 1:
                raise ShapeError(f"{name}: expected a positive int, got {value!r}")
        factory = {"device": device, "dtype": dtype}
        self.vocab_size, self.max_len, self.type_vocab_size = vocab_size, max_len, type_vocab_size
        self.word_embeddings = nn.Embedding(vocab_size, d_model, **factory)
        self.position_embeddings = nn.Embedding(max_len, d_model, **factory)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, d_model, **factory)
        self.embedding_norm = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)
        self.dropout = nn.Dropout(dropout)
        self.layers = encoder_layers(layer_cls, num_layers, d_model, nhead, dim_feedforward, dropout,
                                     layer_norm_eps, norm_first=False, **factory)
        self.pooler = nn.Linear(d_model, d_model, **factory)
        for embedding in (self.word_embeddings, self.position_embeddings, self.token_type_embeddings):
            nn.init.normal_(embedding.weight, std=EMBEDDING_INIT_STD)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_token_ids("input_ids", input_ids, self.vocab_size, self.max_len)
        padding = self._padding(attention_mask, input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        else:
            check_token_ids("token_type_ids", token_type_ids, self.type_vocab_size, self.max_len)
            if token_type_ids.shape != input_ids.shape:
                raise ShapeError(f"token_type_ids: expected shape {tuple(input_ids.shape)} (as input_ids), "
                                 f"got {tuple(token_type_ids.shape)}")
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings(
            token_type_ids)
        x = self.dropout(self.embedding_norm(x))
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=padding)
        return x, torch.tanh(self.pooler(x[:, 0]))

    @staticmethod
    def _padding(attention_mask: Tensor | None, input_ids: Tensor) -> Tensor | None:
        """attention_mask (B, T), 1 = keep -> torch.nn's key padding mask (B, T) bool, True = ignore."""
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
            got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
            raise ShapeError(f"attention_mask: expected a tensor of shape {tuple(input_ids.shape)} (as input_ids), "
                             f"got {got}")
        if attention_mask.is_floating_point() or attention_mask.is_complex():
            raise ShapeError(f"attention_mask: expected 1 (keep) / 0 (padding) as bool or integers, got "
                             f"{attention_mask.dtype}")
        return attention_mask == 0
