"""Additive (Bahdanau) attention in plain PyTorch: the oracle of the additive attention kernels.

It is the composed version a user writes, and builds the (B, Lq, Lk, H) tanh tensor the kernels never do.
Signatures and results are those of torch.ops.seqkern.additive_attention_forward / _backward (seqkern/ops/_schemas.py
has the contracts):

    score(i, j) = v . tanh(query_proj_i + key_proj_j)       over the keys that are not padding
    p(i, j) = exp(score(i, j) - lse_i),   lse_i = log sum_j exp(score(i, j))
    out_i = sum_j p(i, j) values_j
"""
from __future__ import annotations

import torch
from torch import Tensor


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """lse and weights: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def additive_scores(query_proj: Tensor, key_proj: Tensor, v: Tensor) -> Tensor:
    """(B,Lq,H), (B,Lk,H), (H,) -> scores (B,Lq,Lk), through the (B,Lq,Lk,H) tanh tensor."""
    return torch.tanh(query_proj.unsqueeze(2) + key_proj.unsqueeze(1)) @ v


def additive_attention_forward(
    query_proj: Tensor, key_proj: Tensor, values: Tensor, v: Tensor, key_padding_mask: Tensor | None,
    return_weights: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> out (B,Lq,Dv), lse (B,Lq), weights (B,Lq,Lk) or empty. Differentiable in every tensor input."""
    scores = additive_scores(query_proj, key_proj, v).to(_stats_dtype(query_proj.dtype))
    padding = torch.zeros_like(scores, dtype=torch.bool)
    if key_padding_mask is not None:
        padding = key_padding_mask.unsqueeze(1).expand_as(scores)
        scores = scores.masked_fill(padding, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # A padding key takes no part (weight 0) even in a NaN row, and a row without keys (all padding: lse = -inf,
    # scores - lse = nan) has weights 0 and out 0. Only there: a NaN score (NaN in a query, key or v) stays NaN, as
    # in the composed softmax. exp of a stand-in there, not exp(nan) masked afterwards: a masked nan still sends
    # nan gradients.
    none = padding | (lse == float("-inf")).unsqueeze(-1)
    weights = torch.where(none, 0.0, torch.exp(torch.where(none, 0.0, scores - lse.unsqueeze(-1))))
    out = (weights.to(values.dtype) @ values)
    return out, lse.detach(), weights if return_weights else query_proj.new_empty(0)


def additive_attention_backward(
    grad_out: Tensor, grad_weights: Tensor | None, query_proj: Tensor, key_proj: Tensor, values: Tensor, v: Tensor,
    out: Tensor, weights: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> grad_query_proj (B,Lq,H), grad_key_proj (B,Lk,H), grad_values (B,Lk,Dv), grad_v (H,).

    The formulas of the contract, written out (not autograd through the forward): the kernels' oracle for the
    gradient reaching the returned weights too.
    """
    stats = weights.dtype
    grad_out_s, values_s, out_s = (t.to(stats) for t in (grad_out, values, out))
    delta = (grad_out_s * out_s).sum(-1)
    through_values = grad_out_s @ values_s.transpose(-1, -2)
    if grad_weights is not None:
        delta = delta + (weights * grad_weights).sum(-1)
        through_values = through_values + grad_weights
    # A key with weight 0 (padding, or underflow) gets no score gradient, also in a NaN row (delta NaN).
    grad_scores = torch.where(weights == 0, 0.0, weights * (through_values - delta.unsqueeze(-1)))
    tanh = torch.tanh(query_proj.to(stats).unsqueeze(2) + key_proj.to(stats).unsqueeze(1))
    grad_pre = grad_scores.unsqueeze(-1) * v.to(stats) * (1 - tanh * tanh)
    grad_v = torch.einsum("bij,bijh->h", grad_scores, tanh)
    grad_values = weights.transpose(-1, -2) @ grad_out_s
    dtype = query_proj.dtype
    return (grad_pre.sum(2).to(dtype), grad_pre.sum(1).to(dtype), grad_values.to(dtype), grad_v.to(dtype))
