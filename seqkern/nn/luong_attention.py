"""seqkern.nn.LuongAttention: the three scores of Luong et al. (2015), "Effective Approaches to Attention-based
Neural Machine Translation", on seqkern's fused kernels.

    score(q, k) = q . k                      "dot"      (flash attention kernel, scale 1)
                = (W q) . k                  "general"  (flash attention kernel on the projected query)
                = v . tanh(W [q; k])         "concat"   (the additive attention kernel: W [q; k] = W_q q + W_k k)

softmax over the keys that are not padding, context = weights @ values. The call convention (and argument
checks) is seqkern.nn.AdditiveAttention's: forward(query, keys, values=None, key_padding_mask=None,
need_weights=False, projected_keys=None) -> (context, weights or None); `composed_forward` is the same math in
composed PyTorch (the no-seqkern baseline).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqkern import onnx
from seqkern._checks import ShapeError, check_size
from seqkern.nn.additive_attention import (
    check_attention_call,
    check_projected_keys,
    composed_additive,
)
from seqkern.ops import flash_attention
from seqkern.ops.additive_attention import additive_attention_projected

SCORES = ("dot", "general", "concat")


class LuongAttention(nn.Module):
    """Luong attention with score "dot", "general" or "concat".

    Parameters: "dot" none (query_size must equal key_size); "general" query_proj (nn.Linear(query_size,
    key_size, bias=False)); "concat" concat_proj (nn.Linear(query_size + key_size, hidden_size, bias=False)) and
    v (hidden_size,). hidden_size (concat only) defaults to query_size.
    forward(query (B,Lq,Dq), keys (B,S,Dk), values=None (keys), key_padding_mask=None ((B,S) bool, True =
    padding), need_weights=False, projected_keys=None) -> (context (B,Lq,Dv), weights (B,Lq,S) or None).
    Unbatched (Lq,Dq)/(S,Dk) inputs work too. A query whose keys are all padding gets context 0 and weights 0.
    """

    def __init__(self, query_size: int, key_size: int, score: str = "general", hidden_size: int | None = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        if score not in SCORES:
            raise ValueError(f"score: expected one of {', '.join(map(repr, SCORES))}, got {score!r}")
        check_size("query_size", query_size)
        check_size("key_size", key_size)
        if score == "dot" and query_size != key_size:
            raise ShapeError(f"key_size: the dot score needs query_size == key_size, got {query_size} and {key_size}")
        hidden_size = query_size if hidden_size is None else hidden_size
        check_size("hidden_size", hidden_size)
        factory = {"device": device, "dtype": dtype}
        self.query_size, self.key_size, self.score = query_size, key_size, score
        self.hidden_size = hidden_size if score == "concat" else None
        if score == "general":
            self.query_proj = nn.Linear(query_size, key_size, bias=False, **factory)
        if score == "concat":
            self.concat_proj = nn.Linear(query_size + key_size, hidden_size, bias=False, **factory)
            self.v = nn.Parameter(torch.empty(hidden_size, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.score == "general":
            self.query_proj.reset_parameters()
        if self.score == "concat":
            self.concat_proj.reset_parameters()
            bound = self.hidden_size ** -0.5
            nn.init.uniform_(self.v, -bound, bound)

    def _concat_weights(self) -> tuple[Tensor, Tensor]:
        """W of concat = [W_q | W_k]: W [q; k] = W_q q + W_k k (column views of the one parameter)."""
        weight = self.concat_proj.weight
        return weight[:, : self.query_size], weight[:, self.query_size:]

    def project_keys(self, keys: Tensor) -> Tensor:
        """keys (B,S,key_size) -> what the score needs of them: W_k keys (B,S,hidden) for concat, else keys."""
        return F.linear(keys, self._concat_weights()[1]) if self.score == "concat" else keys

    def _operands(self, query, keys, values, key_padding_mask, projected_keys):
        """-> (the query side of the score, the key side, values), after the argument checks."""
        values = check_attention_call(self, query, keys, values, key_padding_mask)
        width = self.hidden_size if self.score == "concat" else self.key_size
        check_projected_keys(projected_keys, (*keys.shape[:-1], width), keys)
        key_side = self.project_keys(keys) if projected_keys is None else projected_keys
        if self.score == "general":
            return self.query_proj(query), key_side, values
        if self.score == "concat":
            return F.linear(query, self._concat_weights()[0]), key_side, values
        return query, key_side, values

    @onnx.reference_while_exporting
    def forward(self, query: Tensor, keys: Tensor, values: Tensor | None = None,
                key_padding_mask: Tensor | None = None, need_weights: bool = False,
                projected_keys: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        q, k, values = self._operands(query, keys, values, key_padding_mask, projected_keys)
        if self.score == "concat":
            if need_weights:
                return additive_attention_projected(q, k, values, self.v, key_padding_mask, True)
            return additive_attention_projected(q, k, values, self.v, key_padding_mask), None
        return _dot_attention(q, k, values, key_padding_mask, need_weights)

    def composed_forward(self, query: Tensor, keys: Tensor, values: Tensor | None = None,
                         key_padding_mask: Tensor | None = None, need_weights: bool = False,
                         projected_keys: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """forward's math in composed PyTorch (the (B,Lq,S) scores; for concat the (B,Lq,S,H) tanh tensor)."""
        q, k, values = self._operands(query, keys, values, key_padding_mask, projected_keys)
        if self.score == "concat":
            return composed_additive(q, k, values, self.v, key_padding_mask, need_weights)
        scores = q @ k.transpose(-1, -2)
        if key_padding_mask is not None:
            hidden = key_padding_mask.unsqueeze(-2).expand_as(scores)
            # A row with every key hidden: softmax over zeros, then zeroed (no NaN, forward or backward).
            scores = scores.masked_fill(hidden, float("-inf")).masked_fill(hidden.all(-1, keepdim=True), 0.0)
            weights = scores.softmax(-1).masked_fill(hidden, 0.0)
        else:
            weights = scores.softmax(-1)
        return weights @ values, weights if need_weights else None

    def extra_repr(self) -> str:
        hidden = f", hidden_size={self.hidden_size}" if self.score == "concat" else ""
        return f"query_size={self.query_size}, key_size={self.key_size}, score={self.score!r}{hidden}"


def _dot_attention(q: Tensor, k: Tensor, values: Tensor, key_padding_mask: Tensor | None,
                   need_weights: bool) -> tuple[Tensor, Tensor | None]:
    """Unscaled dot-product attention on the flash kernel, one head: q (B,Lq,D), k (B,S,D), values (B,S,Dv)
    (or unbatched) -> (context, weights recomputed from the kernel's log-sum-exp or None)."""
    unbatched = q.dim() == 2
    if unbatched:
        q, k, values = q.unsqueeze(0), k.unsqueeze(0), values.unsqueeze(0)
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
    q4, k4, v4 = q.unsqueeze(1), k.unsqueeze(1), values.unsqueeze(1)  # (B, 1 head, L, D)
    keep = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    context, lse = flash_attention.attention(q4, k4, v4, attn_mask=keep, scale=1.0, return_lse=True)
    weights = None
    if need_weights:
        mask = None if keep is None else flash_attention.hiding_mask(
            key_padding_mask[:, None, None, :].expand(*q4.shape[:3], k4.shape[2]), q.dtype)
        weights = flash_attention.attention_probabilities(q4, k4, lse, mask, 1.0, -1, -1, False).squeeze(1)
    context = context.squeeze(1)
    if unbatched:
        context, weights = context.squeeze(0), None if weights is None else weights.squeeze(0)
    return context, weights
