"""seqkern.nn.AdditiveAttention: Bahdanau attention on the fused additive attention kernel.

    attn = seqkern.nn.AdditiveAttention(query_size=256, key_size=512, hidden_size=256)
    context, weights = attn(query, keys, values, key_padding_mask=padding, need_weights=True)
    # a decoder: project the source keys once, reuse them every step
    projected = attn.project_keys(keys)
    context, _ = attn(query_t, keys, values, key_padding_mask=padding, projected_keys=projected)

score(i, j) = v . tanh(W_q q_i + W_k k_j (+ b)), softmax over the keys that are not padding, context_i =
sum_j p(i, j) values_j. The module holds W_q, W_k (and b) as nn.Linear layers and v; the fused op
(seqkern.additive_attention_projected) never builds the (B, Lq, Lk, hidden) tanh tensor. `composed_forward` is
the same math in composed PyTorch, which builds it: what a model written without seqkern runs (the baseline of
seqkern.models.Seq2Seq(layers="torch")).

The call convention is shared with seqkern.nn.LuongAttention, so a model swaps one for the other; the shared
argument checks live here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqkern import onnx, reference
from seqkern._checks import DTypeError, ShapeError, check_floating, check_size, check_tensor
from seqkern.ops.additive_attention import additive_attention_projected


def check_attention_call(module: nn.Module, query: Tensor, keys: Tensor, values: Tensor | None,
                         key_padding_mask: Tensor | None) -> Tensor:
    """The arguments of an attention module's forward against its sizes and parameters -> values (keys if None).

    query (B,Lq,query_size) or unbatched (Lq,query_size); keys (B,S,key_size) and values (B,S,Dv) of the same
    batchedness; key_padding_mask (B,S) or (S,) bool. Errors name the argument, the expected and the received.
    """
    for name, t in (("query", query), ("keys", keys)):
        check_tensor(name, t)
        check_floating(name, t)
    if query.dim() not in (2, 3):
        raise ShapeError(f"query: expected a 3-D (batch, queries, {module.query_size}) or 2-D (queries, "
                         f"{module.query_size}) tensor, got shape {tuple(query.shape)}")
    if query.shape[-1] != module.query_size:
        raise ShapeError(f"query: expected the last dimension to be query_size={module.query_size}, "
                         f"got shape {tuple(query.shape)}")
    like = next(module.parameters(), query)
    if query.dtype != like.dtype or query.device != like.device:
        raise DTypeError(f"query: expected dtype {like.dtype} on {like.device} (the module's parameters), "
                         f"got {query.dtype} on {query.device}")
    if keys.dim() != query.dim() or keys.shape[-1] != module.key_size or keys.shape[:-2] != query.shape[:-2]:
        expected = (*query.shape[:-2], "S", module.key_size)
        raise ShapeError(f"keys: expected shape {expected} (as query {tuple(query.shape)}, key_size="
                         f"{module.key_size}), got {tuple(keys.shape)}")
    values = keys if values is None else values
    check_tensor("values", values)
    if values.shape[:-1] != keys.shape[:-1]:
        raise ShapeError(f"values: expected shape {tuple(keys.shape[:-1])} + (Dv,) (as keys {tuple(keys.shape)}), "
                         f"got {tuple(values.shape)}")
    for name, t in (("keys", keys), ("values", values)):
        if t.dtype != query.dtype or t.device != query.device:
            raise DTypeError(f"{name}: expected dtype {query.dtype} on {query.device} (as query), "
                             f"got {t.dtype} on {t.device}")
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask)
        if key_padding_mask.dtype != torch.bool:
            raise DTypeError(f"key_padding_mask: expected dtype torch.bool (True = padding), "
                             f"got {key_padding_mask.dtype}")
        if key_padding_mask.shape != keys.shape[:-1] or key_padding_mask.device != keys.device:
            raise ShapeError(f"key_padding_mask: expected shape {tuple(keys.shape[:-1])} (batch, keys) on "
                             f"{keys.device}, got {tuple(key_padding_mask.shape)} on {key_padding_mask.device}")
    return values


def check_projected_keys(projected_keys: Tensor | None, expected: tuple[int, ...], keys: Tensor) -> None:
    """projected_keys, when given, is what project_keys(keys) returns: `expected` shape, keys' dtype."""
    if projected_keys is None:
        return
    check_tensor("projected_keys", projected_keys)
    if tuple(projected_keys.shape) != expected or projected_keys.dtype != keys.dtype:
        raise ShapeError(f"projected_keys: expected project_keys(keys), shape {expected} and dtype {keys.dtype}, "
                         f"got shape {tuple(projected_keys.shape)} and dtype {projected_keys.dtype}")


def composed_additive(query_proj: Tensor, key_proj: Tensor, values: Tensor, v: Tensor,
                      key_padding_mask: Tensor | None, need_weights: bool) -> tuple[Tensor, Tensor | None]:
    """v . tanh(query_proj_i + key_proj_j) attention in composed PyTorch, through the (B,Lq,S,H) tanh tensor
    (the reference's math) -> (context (B,Lq,Dv), weights (B,Lq,S) or None). Unbatched inputs too."""
    unbatched = query_proj.dim() == 2
    if unbatched:
        query_proj, key_proj, values = query_proj.unsqueeze(0), key_proj.unsqueeze(0), values.unsqueeze(0)
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
    context, _, weights = reference.additive_attention_forward(query_proj, key_proj, values, v, key_padding_mask,
                                                               True)
    weights = weights.to(context.dtype)
    if unbatched:
        context, weights = context.squeeze(0), weights.squeeze(0)
    return context, weights if need_weights else None


class AdditiveAttention(nn.Module):
    """Bahdanau (additive) attention: score = v . tanh(W_q q + W_k k (+ b)).

    Parameters: query_proj (nn.Linear(query_size, hidden_size, bias=False)), key_proj (nn.Linear(key_size,
    hidden_size, bias=bias)), v (hidden_size,) drawn from U(-1/sqrt(hidden), 1/sqrt(hidden)) like a Linear row.
    forward(query (B,Lq,Dq), keys (B,S,Dk), values=None (keys), key_padding_mask=None ((B,S) bool, True =
    padding), need_weights=False, projected_keys=None (project_keys(keys), reused across decoder steps))
    -> (context (B,Lq,Dv), weights (B,Lq,S) or None). Unbatched (Lq,Dq)/(S,Dk) inputs work too. A query whose
    keys are all padding gets context 0 and weights 0.
    """

    def __init__(self, query_size: int, key_size: int, hidden_size: int, bias: bool = False, device=None,
                 dtype=None) -> None:
        super().__init__()
        for name, value in (("query_size", query_size), ("key_size", key_size), ("hidden_size", hidden_size)):
            check_size(name, value)
        factory = {"device": device, "dtype": dtype}
        self.query_size, self.key_size, self.hidden_size = query_size, key_size, hidden_size
        self.query_proj = nn.Linear(query_size, hidden_size, bias=False, **factory)
        self.key_proj = nn.Linear(key_size, hidden_size, bias=bias, **factory)
        self.v = nn.Parameter(torch.empty(hidden_size, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.query_proj.reset_parameters()
        self.key_proj.reset_parameters()
        bound = self.hidden_size ** -0.5
        nn.init.uniform_(self.v, -bound, bound)

    def project_keys(self, keys: Tensor) -> Tensor:
        """keys (B,S,key_size) -> W_k keys (+ b): (B,S,hidden_size)."""
        return self.key_proj(keys)

    def _projections(self, query, keys, values, key_padding_mask, projected_keys):
        values = check_attention_call(self, query, keys, values, key_padding_mask)
        key_proj = self.project_keys(keys) if projected_keys is None else projected_keys
        check_projected_keys(projected_keys, (*keys.shape[:-1], self.hidden_size), keys)
        return self.query_proj(query), key_proj, values

    @onnx.reference_while_exporting
    def forward(self, query: Tensor, keys: Tensor, values: Tensor | None = None,
                key_padding_mask: Tensor | None = None, need_weights: bool = False,
                projected_keys: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        query_proj, key_proj, values = self._projections(query, keys, values, key_padding_mask, projected_keys)
        if need_weights:
            return additive_attention_projected(query_proj, key_proj, values, self.v, key_padding_mask, True)
        return additive_attention_projected(query_proj, key_proj, values, self.v, key_padding_mask), None

    def composed_forward(self, query: Tensor, keys: Tensor, values: Tensor | None = None,
                         key_padding_mask: Tensor | None = None, need_weights: bool = False,
                         projected_keys: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """forward's math in composed PyTorch (builds the (B,Lq,S,H) tanh tensor): the no-seqkern baseline."""
        query_proj, key_proj, values = self._projections(query, keys, values, key_padding_mask, projected_keys)
        return composed_additive(query_proj, key_proj, values, self.v, key_padding_mask, need_weights)

    def extra_repr(self) -> str:
        return f"query_size={self.query_size}, key_size={self.key_size}, hidden_size={self.hidden_size}"
