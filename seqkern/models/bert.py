"""BertEncoder: an encoder-only (BERT-style) stack on seqkern's layers; BertForMaskedLM and
BertForSequenceClassification put BERT's two heads on it (mask_tokens: the masked-LM corruption).

    encoder = seqkern.models.BertEncoder(vocab_size=30522, d_model=256, nhead=4, num_layers=4,
                                         dim_feedforward=1024)
    sequence_output, pooled_output = encoder(input_ids, attention_mask, token_type_ids)
"""
from __future__ import annotations

import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F
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


# --------------------------------------------------------------------------------------------------------------
# Heads: masked-LM pre-training and sequence classification on one shared encoder.
# --------------------------------------------------------------------------------------------------------------
# Label of the positions a loss ignores (torch.nn.functional.cross_entropy's default ignore_index).
IGNORE_INDEX = -100


class HeadOutput(NamedTuple):
    """logits: (B, T, vocab) for the masked LM, (B, num_labels) for the classifier; loss: the mean cross-entropy
    over the labelled positions / rows when labels were given, else None."""

    logits: Tensor
    loss: Tensor | None


def mask_tokens(input_ids: Tensor, mask_token_id: int, vocab_size: int, special_tokens_mask: Tensor | None = None,
                mlm_probability: float = 0.15, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """BERT's masked-LM corruption (Devlin et al. 2019): each token that is not special is selected with probability
    `mlm_probability`; a selected token is replaced by `mask_token_id` 80% of the time, by a token drawn uniformly
    from the vocabulary 10%, and kept 10%. -> (the corrupted input_ids (B, T), labels (B, T): the original id at the
    selected positions, IGNORE_INDEX elsewhere). special_tokens_mask (B, T) bool: True never selected (e.g. [CLS],
    [SEP], padding). Random draws come from `generator` (or torch's default generator: torch.manual_seed
    reproduces them)."""
    if not 0.0 <= mlm_probability <= 1.0:
        raise ValueError(f"mlm_probability: expected a probability in [0, 1], got {mlm_probability!r}")
    check_token_ids("input_ids", input_ids, vocab_size, sys.maxsize)
    if not isinstance(mask_token_id, int) or isinstance(mask_token_id, bool) or not 0 <= mask_token_id < vocab_size:
        raise ShapeError(f"mask_token_id: expected an int in [0, {vocab_size}), got {mask_token_id!r}")
    if special_tokens_mask is not None and (special_tokens_mask.shape != input_ids.shape
                                            or special_tokens_mask.dtype != torch.bool):
        raise ShapeError(f"special_tokens_mask: expected a bool tensor of shape {tuple(input_ids.shape)}, got "
                         f"{special_tokens_mask.dtype} {tuple(special_tokens_mask.shape)}")

    def uniform() -> Tensor:
        return torch.rand(input_ids.shape, generator=generator, device=input_ids.device)

    selected = uniform() < mlm_probability
    if special_tokens_mask is not None:
        selected &= ~special_tokens_mask
    labels = input_ids.masked_fill(~selected, IGNORE_INDEX)
    action = uniform()  # one draw per position: < 0.8 mask, [0.8, 0.9) random token, >= 0.9 keep
    random_tokens = torch.randint(vocab_size, input_ids.shape, generator=generator, device=input_ids.device)
    corrupted = torch.where(selected & (action < 0.8), mask_token_id, input_ids)
    corrupted = torch.where(selected & (action >= 0.8) & (action < 0.9), random_tokens, corrupted)
    return corrupted, labels


class BertForMaskedLM(nn.Module):
    """BertEncoder (`bert`) + BERT's masked-LM head: transform = LayerNorm(GELU(Linear(h))) (`transform`,
    `transform_norm`), then logits = transform @ word_embeddings^T + `decoder_bias` (the decoder tied to the token
    embeddings: no weight of its own). Constructor: BertEncoder's.

    forward(input_ids, attention_mask=None, token_type_ids=None, labels=None) -> HeadOutput(logits (B, T, vocab),
    loss: mean cross-entropy over the positions whose label is not IGNORE_INDEX (see mask_tokens), or None).
    `bert`'s state_dict keys are BertEncoder's under "bert.", so the pre-trained encoder loads into
    BertForSequenceClassification: `classifier.bert.load_state_dict(mlm.bert.state_dict())`.
    """

    def __init__(self, vocab_size: int, d_model: int, nhead: int, num_layers: int, dim_feedforward: int,
                 layer_norm_eps: float = 1e-12, device=None, dtype=None, **encoder_options) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.bert = BertEncoder(vocab_size, d_model, nhead, num_layers, dim_feedforward,
                                layer_norm_eps=layer_norm_eps, **encoder_options, **factory)
        self.transform = nn.Linear(d_model, d_model, **factory)
        self.transform_norm = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)
        self.decoder_bias = nn.Parameter(torch.zeros(vocab_size, **factory))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                labels: Tensor | None = None) -> HeadOutput:
        sequence, _ = self.bert(input_ids, attention_mask, token_type_ids)
        hidden = self.transform_norm(F.gelu(self.transform(sequence)))
        logits = F.linear(hidden, self.bert.word_embeddings.weight, self.decoder_bias)
        return HeadOutput(logits, None if labels is None else _loss("labels", logits, labels, input_ids.shape))


class BertForSequenceClassification(nn.Module):
    """BertEncoder (`bert`) + one linear layer (`classifier`, after dropout) on the pooled output.
    Constructor: BertEncoder's plus num_labels (and classifier_dropout, default: dropout).

    forward(input_ids, attention_mask=None, token_type_ids=None, labels=None) -> HeadOutput(logits (B, num_labels),
    loss: mean cross-entropy against labels (B,) int64, or None).
    """

    def __init__(self, vocab_size: int, d_model: int, nhead: int, num_layers: int, dim_feedforward: int,
                 num_labels: int, dropout: float = 0.1, classifier_dropout: float | None = None, device=None,
                 dtype=None, **encoder_options) -> None:
        super().__init__()
        if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1:
            raise ShapeError(f"num_labels: expected a positive int, got {num_labels!r}")
        factory = {"device": device, "dtype": dtype}
        self.bert = BertEncoder(vocab_size, d_model, nhead, num_layers, dim_feedforward, dropout=dropout,
                                **encoder_options, **factory)
        self.dropout = nn.Dropout(dropout if classifier_dropout is None else classifier_dropout)
        self.classifier = nn.Linear(d_model, num_labels, **factory)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                labels: Tensor | None = None) -> HeadOutput:
        _, pooled = self.bert(input_ids, attention_mask, token_type_ids)
        logits = self.classifier(self.dropout(pooled))
        return HeadOutput(logits, None if labels is None else _loss("labels", logits, labels, input_ids.shape[:1]))


def _loss(name: str, logits: Tensor, labels: Tensor, expected_shape: torch.Size) -> Tensor:
    """Mean cross-entropy of logits (..., classes) against integer labels of `expected_shape` (IGNORE_INDEX: none)."""
    if not isinstance(labels, Tensor) or labels.shape != expected_shape or labels.is_floating_point():
        got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
        raise ShapeError(f"{name}: expected an integer tensor of shape {tuple(expected_shape)}, got {got}")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(), ignore_index=IGNORE_INDEX)
