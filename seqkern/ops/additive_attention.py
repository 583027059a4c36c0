"""Additive (Bahdanau) attention: fake implementations, autograd, Triton registration, and the functional API.

torch.ops.seqkern.additive_attention_forward / _backward have their contracts in seqkern/ops/_schemas.py. The public
functions (`additive_attention`, `additive_attention_projected`, exported as seqkern.additive_attention, ...)
check the user's arguments, run the two projections as ordinary GEMMs, and pick the implementation
(seqkern.backend) of the fused part: scores, softmax and the weighted sum of the values.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from seqkern import backends, reference
from seqkern._checks import DTypeError, ShapeError, check_floating, check_tensor
from seqkern.ops._contract import Contract
from seqkern.ops._registry import (
    Autograd, empty, kernel_scope, needs_grad, register_ops, run_op, save_inputs, saved_inputs, zeros_if_none,
)

SUPPORTED_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16),
    "triton": (torch.float32, torch.float64, torch.bfloat16, torch.float16),  # math in float32
}


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# Fake implementations: the ops' contract (shapes, dtypes; see _contract.py) and their result shapes.
def _check_inputs(contract: Contract, query_proj, key_proj, values, v):
    """The arguments both ops share -> (B, Lq, Lk, H, Dv) (csrc/cpu/additive_attention.cpp check_inputs)."""
    contract.supported_dtype(query_proj, "query_proj")
    contract.dims(query_proj, 3, "(B, Lq, H)", "query_proj")
    contract.dims(key_proj, 3, "(B, Lk, H)", "key_proj")
    contract.dims(values, 3, "(B, Lk, Dv)", "values")
    (batch, len_q, hidden), len_k, dim_v = query_proj.shape, key_proj.shape[1], values.shape[2]
    contract.last_dim_contiguous(query_proj, "query_proj")
    for name, t, shape in (("key_proj", key_proj, (batch, len_k, hidden)), ("values", values, (batch, len_k, dim_v)),
                           ("v", v, (hidden,))):
        contract.tensor(t, query_proj, shape, name)
        contract.last_dim_contiguous(t, name)
    contract.contiguous(v, "v")
    return batch, len_q, len_k, hidden, dim_v


def _forward_fake(query_proj, key_proj, values, v, key_padding_mask, return_weights):
    contract = Contract("additive_attention_forward")
    batch, len_q, len_k, _, dim_v = _check_inputs(contract, query_proj, key_proj, values, v)
    if key_padding_mask is not None:
        contract.tensor(key_padding_mask, query_proj, (batch, len_k), "key_padding_mask", dtype=torch.bool)
        contract.contiguous(key_padding_mask, "key_padding_mask")
    stats = _stats_dtype(query_proj.dtype)
    out = values.new_empty(batch, len_q, dim_v)
    weights = query_proj.new_empty(batch, len_q, len_k, dtype=stats) if return_weights else empty(query_proj)
    return out, query_proj.new_empty(batch, len_q, dtype=stats), weights


def _backward_fake(grad_out, grad_weights, query_proj, key_proj, values, v, out, weights):
    contract = Contract("additive_attention_backward")
    batch, len_q, len_k, _, dim_v = _check_inputs(contract, query_proj, key_proj, values, v)
    for name, t in (("grad_out", grad_out), ("out", out)):
        contract.tensor(t, query_proj, (batch, len_q, dim_v), name)
        contract.last_dim_contiguous(t, name)
    stats = _stats_dtype(query_proj.dtype)
    for name, t in (("weights", weights), ("grad_weights", grad_weights)):
        if t is not None:
            contract.tensor(t, query_proj, (batch, len_q, len_k), name, dtype=stats)
            contract.contiguous(t, name)
    return (query_proj.new_empty(query_proj.shape), key_proj.new_empty(key_proj.shape), values.new_empty(values.shape),
            v.new_empty(v.shape))


def _setup_context(ctx, inputs, output):
    out, lse, weights = output
    ctx.mark_non_differentiable(lse)
    save_inputs(ctx, inputs, out, weights)


def _backward(ctx, grad_out, _grad_lse, grad_weights):
    (query_proj, key_proj, values, v, key_padding_mask, _), (out, weights) = saved_inputs(ctx)
    if weights.numel() != out.shape[0] * out.shape[1] * key_proj.shape[1]:
        # Called with return_weights=False (the public functions never do when a gradient is wanted): one more
        # forward for the probabilities the backward reads.
        _, _, weights = _run_forward(query_proj, key_proj, values, v, key_padding_mask, True)
        grad_weights = None
    args = (_last_dim_contiguous(zeros_if_none(grad_out, out)), _contiguous_or_none(grad_weights), query_proj, key_proj,
            values, v, out, weights)
    impl = _impl(query_proj)
    if impl == "reference":
        grads = reference.additive_attention_backward(*args)
    else:
        with kernel_scope(impl, query_proj.device):
            grads = torch.ops.seqkern.additive_attention_backward(*args)
    return (*grads, None, None)


def _impl(like: Tensor) -> str:
    return backends.resolve("additive_attention", like.device, like.dtype, SUPPORTED_DTYPES,
                            kernel="additive_attention_forward")


register_ops(
    fakes={"additive_attention_forward": _forward_fake, "additive_attention_backward": _backward_fake},
    autograd={"additive_attention_forward": Autograd(_backward, _setup_context, reference.additive_attention_forward,
                                                     (0, 2))},
    triton_module="seqkern.kernels.additive_attention",
)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _contiguous_or_none(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _run_forward(query_proj, key_proj, values, v, key_padding_mask, return_weights) -> tuple[Tensor, Tensor, Tensor]:
    args = (query_proj, key_proj, values, v, key_padding_mask, return_weights)
    impl = _impl(query_proj)
    if impl == "reference":
        return reference.additive_attention_forward(*args)
    with kernel_scope(impl, query_proj.device):
        return run_op("additive_attention_forward", *args)


# ------------------------------------------------------------------------------------------------------------
# Argument checks.
# ------------------------------------------------------------------------------------------------------------
def _check_same(name: str, t: Tensor, like: Tensor, like_name: str) -> None:
    check_tensor(name, t)
    check_floating(name, t)
    if t.dtype != like.dtype:
        raise DTypeError(f"{name}: expected dtype {like.dtype} (as {like_name}), got {t.dtype}")
    if t.device != like.device:
        raise DTypeError(f"{name}: expected a tensor on {like.device} (as {like_name}), got one on {t.device}")


def _check_sequences(query: Tensor, keys: Tensor, values: Tensor, names: tuple[str, str, str]) -> None:
    """query (B,Lq,*) or (Lq,*), keys (B,Lk,*), values (B,Lk,Dv): matching dims, batch and key length."""
    check_tensor(names[0], query)
    check_floating(names[0], query)
    if query.dim() not in (2, 3):
        raise ShapeError(f"{names[0]}: expected a 3-D (batch, queries, features) or 2-D (queries, features) "
                         f"tensor, got shape {tuple(query.shape)}")
    for name, t in zip(names[1:], (keys, values)):
        _check_same(name, t, query, names[0])
        if t.dim() != query.dim():
            raise ShapeError(f"{name}: expected {query.dim()} dims (as {names[0]} {tuple(query.shape)}), "
                             f"got shape {tuple(t.shape)}")
    if query.dim() == 3 and keys.shape[0] != query.shape[0]:
        raise ShapeError(f"{names[1]}: expected batch {query.shape[0]} (as {names[0]} {tuple(query.shape)}), "
                         f"got shape {tuple(keys.shape)}")
    if values.shape[:-1] != keys.shape[:-1]:
        raise ShapeError(f"{names[2]}: expected shape {tuple(keys.shape[:-1])} + (Dv,) (as {names[1]} "
                         f"{tuple(keys.shape)}), got {tuple(values.shape)}")


def _check_mask(key_padding_mask: Tensor | None, keys: Tensor) -> None:
    if key_padding_mask is None:
        return
    check_tensor("key_padding_mask", key_padding_mask)
    if key_padding_mask.dtype != torch.bool:
        raise DTypeError(f"key_padding_mask: expected dtype torch.bool (True = padding), got {key_padding_mask.dtype}")
    if key_padding_mask.shape != keys.shape[:-1]:
        raise ShapeError(f"key_padding_mask: expected shape {tuple(keys.shape[:-1])} (batch, keys), "
                         f"got {tuple(key_padding_mask.shape)}")
    if key_padding_mask.device != keys.device:
        raise DTypeError(f"key_padding_mask: expected a tensor on {keys.device}, got one on {key_padding_mask.device}")


def _check_v(v: Tensor, like: Tensor, hidden: int) -> None:
    _check_same("v", v, like, "query")
    if v.shape != (hidden,):
        raise ShapeError(f"v: expected shape ({hidden},) (the attention's hidden size), got {tuple(v.shape)}")


def _check_weight(name: str, weight: Tensor, like: Tensor, in_features: int, in_name: str) -> None:
    _check_same(name, weight, like, "query")
    if weight.dim() != 2 or weight.shape[1] != in_features:
        raise ShapeError(f"{name}: expected shape (hidden, {in_features}) (hidden x the last dim of {in_name}), "
                         f"got {tuple(weight.shape)}")


# ------------------------------------------------------------------------------------------------------------
# The public functions.
# ------------------------------------------------------------------------------------------------------------
def additive_attention_projected(
    query_proj: Tensor, key_proj: Tensor, values: Tensor, v: Tensor, key_padding_mask: Tensor | None = None,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Additive attention on already projected queries and keys (a decoder projects its source keys once and
    reuses them every step).

    query_proj (B,Lq,H) or (Lq,H), key_proj (B,Lk,H), values (B,Lk,Dv), v (H,), key_padding_mask (B,Lk) bool
    (True = padding) -> context (B,Lq,Dv) [, weights (B,Lq,Lk)]:
        score(i, j) = v . tanh(query_proj_i + key_proj_j),  weights = softmax_j(score),  context = weights @ values.
    A query whose keys are all padding gets context 0 and weights 0. Differentiable in every tensor (the
    weights too); the (B,Lq,Lk,H) tanh tensor is never built.
    """
    _check_sequences(query_proj, key_proj, values, ("query_proj", "key_proj", "values"))
    if key_proj.shape[-1] != query_proj.shape[-1]:
        raise ShapeError(f"key_proj: expected hidden size {query_proj.shape[-1]} (as query_proj "
                         f"{tuple(query_proj.shape)}), got shape {tuple(key_proj.shape)}")
    _check_v(v, query_proj, query_proj.shape[-1])
    _check_mask(key_padding_mask, key_proj)
    unbatched = query_proj.dim() == 2
    if unbatched:
        query_proj, key_proj, values = query_proj.unsqueeze(0), key_proj.unsqueeze(0), values.unsqueeze(0)
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
    want_weights = return_weights or needs_grad(query_proj, key_proj, values, v)
    out, _, weights = _run_forward(
        *(_last_dim_contiguous(t) for t in (query_proj, key_proj, values)), v.contiguous(),
        None if key_padding_mask is None else key_padding_mask.contiguous(), want_weights,
    )
    if unbatched:
        out, weights = out.squeeze(0), weights.squeeze(0) if return_weights else weights
    return (out, weights.to(out.dtype)) if return_weights else out


def additive_attention(
    query: Tensor, keys: Tensor, values: Tensor, w_q: Tensor, w_k: Tensor, v: Tensor,
    key_padding_mask: Tensor | None = None, return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Bahdanau attention, fused: score(i, j) = v . tanh(W_q q_i + W_k k_j), softmax over j, context_i =
    sum_j p(i, j) values_j.

    query (B,Lq,Dq) or (Lq,Dq), keys (B,Lk,Dk), values (B,Lk,Dv); w_q (H,Dq) and w_k (H,Dk) laid out as
    nn.Linear weights; v (H,); key_padding_mask (B,Lk) bool, True where a key is padding (as
    nn.MultiheadAttention) -> context (B,Lq,Dv) [, weights (B,Lq,Lk) when return_weights].
    Fully masked rows return 0. Gradients reach query, keys, values, w_q, w_k, v (and flow from the weights).
    """
    _check_sequences(query, keys, values, ("query", "keys", "values"))
    _check_weight("w_q", w_q, query, query.shape[-1], "query")
    _check_weight("w_k", w_k, query, keys.shape[-1], "keys")
    if w_k.shape[0] != w_q.shape[0]:
        raise ShapeError(f"w_k: expected {w_q.shape[0]} rows (the hidden size of w_q {tuple(w_q.shape)}), "
                         f"got shape {tuple(w_k.shape)}")
    return additive_attention_projected(F.linear(query, w_q), F.linear(keys, w_k), values, v, key_padding_mask,
                                        return_weights)
