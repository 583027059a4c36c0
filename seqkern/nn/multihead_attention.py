"""seqkern.nn.MultiheadAttention: torch.nn.MultiheadAttention on the flash attention kernels.

Same constructor, parameters (names, shapes, initialization: state_dict loads both ways) and forward arguments;
the attention itself never materializes the (L, S) scores. `need_weights=True` recomputes the probabilities
from the log-sum-exp the kernel returned (one matmul and an exp, no second softmax pass).

Deliberate difference: a query whose keys are all masked gets an output of 0 (and weights 0), where
torch.nn.MultiheadAttention returns NaN.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from seqkern import onnx
from seqkern._checks import DTypeError, ShapeError, check_tensor
from seqkern.ops import flash_attention as ops
from seqkern.reference.flash_attention import apply_dropout


class MultiheadAttention(torch.nn.MultiheadAttention):
    """Drop-in for torch.nn.MultiheadAttention(embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
    add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None, dtype=None).

    forward(query (L,B,E) | (B,L,E) with batch_first | (L,E), key (S,B,kdim), value (S,B,vdim),
            key_padding_mask (B,S) bool (True = ignore) or float, need_weights, attn_mask (L,S) or (B*num_heads,L,S)
            bool (True = not allowed) or float, average_attn_weights, is_causal)
      -> (attn_output like query with E features, weights (B,L,S) averaged or (B,num_heads,L,S), or None).
    """

    @onnx.reference_while_exporting
    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
        need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        for name, t in (("query", query), ("key", key), ("value", value)):
            check_tensor(name, t)
        if self.batch_first and query.dim() == 3:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batched = self._check_inputs(query, key, value)
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        output, weights = self._attend(query, key, value, key_padding_mask, need_weights, attn_mask,
                                       average_attn_weights, is_causal)
        if not batched:
            output = output.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, weights

    @classmethod
    def from_torch(cls, attn: torch.nn.MultiheadAttention) -> MultiheadAttention:
        """seqkern's module holding `attn`'s own parameters (the same Parameter objects: no copy, and no random
        draw, so one seed still gives torch.nn's weights), with its options and training mode."""
        options = dict(embed_dim=attn.embed_dim, num_heads=attn.num_heads, dropout=attn.dropout,
                       bias=attn.in_proj_bias is not None, add_bias_kv=attn.bias_k is not None,
                       add_zero_attn=attn.add_zero_attn, kdim=attn.kdim, vdim=attn.vdim, batch_first=attn.batch_first,
                       device=attn.out_proj.weight.device, dtype=attn.out_proj.weight.dtype)
        module = torch.nn.utils.skip_init(cls, **options)
        module.load_state_dict(attn.state_dict(keep_vars=True), assign=True)
        return module.train(attn.training)

    def attend(self, query: Tensor, key_value: Tensor, attn_mask: Tensor | None = None,
               key_padding_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """Projections + attention + output projection, the output alone, in the caller's layout:
        forward(query, key_value, key_value, key_padding_mask, need_weights=False, attn_mask, is_causal)[0], as a
        fresh tensor nothing else holds. Self-attention when `key_value is query`. The Transformer layers' entry
        (it does not run forward hooks).

        With packed projections (kdim = vdim = embed_dim) and neither bias_kv nor zero attention it skips the
        copies forward makes of a batch-first input: one GEMM projects q, k and v (k and v for cross-attention)
        in the caller's layout, the kernels read the heads as strided views of its output, and the backward of
        `unbind` writes their gradients into one buffer. Measured (BERT-base self-attention, batch-first, eval,
        2 threads): 200-210 ms against 205-217 ms through forward.
        """
        check_tensor("query", query)
        check_tensor("key_value", key_value)
        if not (self._qkv_same_embed_dim and self.bias_k is None and not self.add_zero_attn):
            return self.forward(query, key_value, key_value, key_padding_mask=key_padding_mask, need_weights=False,
                                attn_mask=attn_mask, is_causal=is_causal)[0]
        batch_first = self.batch_first and query.dim() == 3
        to_seq_first = (lambda t: t.transpose(0, 1)) if batch_first else (lambda t: t)
        unbatched = not self._check_inputs(to_seq_first(query), to_seq_first(key_value), to_seq_first(key_value))
        if unbatched:  # (L,E): a batch of one, batch-first (views)
            batch_first, query, key_value = True, query.unsqueeze(0), key_value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if is_causal and attn_mask is None:
            raise ShapeError("is_causal: the attention needs attn_mask with the is_causal hint (as torch.nn); "
                             "torch.nn.Transformer.generate_square_subsequent_mask builds it")
        queries, keys, values = _packed_projection(self, query, key_value)
        q, k, v = (_heads_first(t, batch_first) for t in (queries, keys, values))
        batch, _, len_q, _ = q.shape
        causal_kernel = is_causal and key_padding_mask is None  # as torch.nn: the mask is then taken as causal
        mask = None if causal_kernel else self._mask(attn_mask, key_padding_mask, batch, len_q, k.shape[2], q.dtype)
        out, _, _ = _attention_with_seed(q, k, v, mask, self.dropout if self.training else 0.0, causal_kernel)
        # The kernel writes (B,H,L,D); the out-projection needs the caller's (B,L,H*D) or (L,B,H*D) rows: one
        # copy. Without autograd it lands in the query projection's place, read no more (the GEMM reads rows with
        # any stride): one fresh (N,E) buffer less, 12.6 MB at the BERT-base shape, whose first-touch page faults
        # cost 3-20 ms here depending on the machine's load.
        heads = queries.copy_(_heads_first(out, batch_first, inverse=True)) if not q.requires_grad else \
            _heads_first(out, batch_first, inverse=True).contiguous()
        # 2-D rows (a view either way), so that F.linear is one addmm with the bias fused: on the strided 3-D
        # view it would be mm, then a separate pass adding the bias.
        rows = heads.flatten(-2).flatten(0, 1)
        output = F.linear(rows, self.out_proj.weight, self.out_proj.bias).unflatten(0, heads.shape[:2])
        return output.squeeze(0) if unbatched else output

    # --------------------------------------------------------------------------------------------------------
    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor) -> bool:
        """Shapes and dtypes of (L,B,E)/(S,B,kdim)/(S,B,vdim) or unbatched inputs; returns whether batched."""
        if query.dim() not in (2, 3):
            raise ShapeError(f"query: expected a 2-D (unbatched) or 3-D tensor, got shape {tuple(query.shape)}")
        for name, t, features in (("query", query, self.embed_dim), ("key", key, self.kdim),
                                  ("value", value, self.vdim)):
            if t.dim() != query.dim():
                raise ShapeError(f"{name}: expected {query.dim()} dims (as query), got shape {tuple(t.shape)}")
            if t.shape[-1] != features:
                raise ShapeError(f"{name}: expected {features} features in the last dim, got shape {tuple(t.shape)}")
            if t.dtype != self.out_proj.weight.dtype or t.device != self.out_proj.weight.device:
                raise DTypeError(f"{name}: expected {self.out_proj.weight.dtype} on {self.out_proj.weight.device} "
                                 f"(as the module's parameters), got {t.dtype} on {t.device}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ShapeError(f"value: expected sequence and batch dims {tuple(key.shape[:-1])} (as key), "
                             f"got shape {tuple(value.shape)}")
        if query.dim() == 3 and key.shape[1] != query.shape[1]:
            raise ShapeError(f"key: expected batch {query.shape[1]} (as query), got shape {tuple(key.shape)}")
        return query.dim() == 3

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(L,B,E), (S,B,kdim), (S,B,vdim) -> q (L,B,E), k, v (S,B,E), with the bias_k/bias_v row appended."""
        bias_q = bias_k = bias_v = None
        if self.in_proj_bias is not None:
            bias_q, bias_k, bias_v = self.in_proj_bias.chunk(3)
        if self._qkv_same_embed_dim:
            if query is key and key is value:
                q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
            else:
                w_q, w_k, w_v = self.in_proj_weight.chunk(3)
                q, k, v = F.linear(query, w_q, bias_q), F.linear(key, w_k, bias_k), F.linear(value, w_v, bias_v)
        else:
            q = F.linear(query, self.q_proj_weight, bias_q)
            k = F.linear(key, self.k_proj_weight, bias_k)
            v = F.linear(value, self.v_proj_weight, bias_v)
        if self.bias_k is not None:
            batch = key.shape[1]
            k = torch.cat([k, self.bias_k.expand(1, batch, -1)])
            v = torch.cat([v, self.bias_v.expand(1, batch, -1)])
        return q, k, v

    def _heads(self, x: Tensor) -> Tensor:
        """(L,B,E) -> (B,num_heads,L,head_dim), a strided view (the kernels read it in place)."""
        length, batch, _ = x.shape
        return x.view(length, batch, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

    def _mask(self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, batch: int, len_q: int, len_k: int,
              dtype: torch.dtype) -> Tensor | None:
        """torch.nn's masks (bool True = masked out, or additive float) -> one additive mask broadcastable to
        (B,num_heads,L,S'), S' = len_k with the bias_kv / zero-attention columns (which no mask hides)."""
        merged = None
        if attn_mask is not None:
            check_tensor("attn_mask", attn_mask)
            expected = {2: (len_q, len_k - self._extra_keys()), 3: (batch * self.num_heads, len_q,
                                                                       len_k - self._extra_keys())}
            if attn_mask.dim() not in expected or tuple(attn_mask.shape) != expected[attn_mask.dim()]:
                raise ShapeError(f"attn_mask: expected shape {expected[2]} or {expected[3]}, got "
                                 f"{tuple(attn_mask.shape)}")
            merged = _additive(attn_mask, "attn_mask", dtype)
            if merged.dim() == 3:
                merged = merged.view(batch, self.num_heads, len_q, -1)
            merged = F.pad(merged, (0, self._extra_keys()))
        if key_padding_mask is not None:
            check_tensor("key_padding_mask", key_padding_mask)
            expected = (batch, len_k - self._extra_keys())
            if tuple(key_padding_mask.shape) != expected:
                raise ShapeError(f"key_padding_mask: expected shape {expected}, got {tuple(key_padding_mask.shape)}")
            padding = F.pad(_additive(key_padding_mask, "key_padding_mask", dtype), (0, self._extra_keys()))
            padding = padding.view(batch, 1, 1, len_k)
            merged = padding if merged is None else merged + padding
        return merged

    def _extra_keys(self) -> int:
        """Key columns the module appends: bias_k's and the zero-attention one."""
        return int(self.bias_k is not None) + int(self.add_zero_attn)

    def _attend(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                is_causal) -> tuple[Tensor, Tensor | None]:
        """Batched, sequence-first (L,B,E) inputs -> output (L,B,E), weights or None."""
        if is_causal and attn_mask is None:
            raise ShapeError("is_causal: MultiheadAttention needs attn_mask with the is_causal hint (as torch.nn); "
                             "torch.nn.Transformer.generate_square_subsequent_mask builds it")
        len_q, batch, _ = query.shape
        q, k, v = (self._heads(t) for t in self._project(query, key, value))
        if self.add_zero_attn:
            k = F.pad(k, (0, 0, 0, 1))
            v = F.pad(v, (0, 0, 0, 1))
        use_causal_kernel = is_causal and key_padding_mask is None and not need_weights
        mask = None if use_causal_kernel else self._mask(attn_mask, key_padding_mask, batch, len_q, k.shape[2],
                                                         q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        out, lse, seed = _attention_with_seed(q, k, v, mask, dropout_p, use_causal_kernel)
        output = F.linear(out.permute(2, 0, 1, 3).reshape(len_q, batch, self.embed_dim), self.out_proj.weight,
                          self.out_proj.bias)
        if not need_weights:
            return output, None
        weights = self._weights(q, k, lse, mask, dropout_p, seed)
        return output, weights.mean(dim=1) if average_attn_weights else weights

    def _weights(self, q: Tensor, k: Tensor, lse: Tensor, mask: Tensor | None, dropout_p: float,
                 seed: Tensor | None) -> Tensor:
        """The probabilities the output was computed with (after dropout, as torch.nn returns them)."""
        full_mask = None if mask is None else mask.expand(*q.shape[:3], k.shape[2])
        probs = ops.attention_probabilities(q, k, lse, full_mask, 1.0 / math.sqrt(self.head_dim), -1, -1, False)
        return probs if dropout_p == 0.0 else apply_dropout(probs, seed, dropout_p)


def _additive(mask: Tensor, name: str, dtype: torch.dtype) -> Tensor:
    """torch.nn's mask convention (bool True = masked out, or an additive float mask) -> additive float."""
    if mask.dtype == torch.bool:
        return ops.hiding_mask(mask, dtype)
    if not mask.is_floating_point():
        raise DTypeError(f"{name}: expected a bool or floating-point mask, got {mask.dtype}")
    return mask.to(dtype)


def _attention_with_seed(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float,
                         is_causal: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """seqkern.attention on (B,H,L,hd) views, also returning the lse and the dropout seed it drew."""
    seed = ops.dropout_seed(dropout_p, q.device)
    full_mask = None if mask is None else mask.expand(*q.shape[:3], k.shape[2])
    out, lse = ops.run_forward(q, k, v, full_mask, None, None, 0, 0, 1.0 / math.sqrt(q.shape[-1]), -1,
                               0 if is_causal else -1, False, dropout_p, seed)
    return out, lse, seed


def _packed_projection(attn: MultiheadAttention, query: Tensor, memory: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """query (N0,N1,E), memory (M0,M1,E) -> q (N0,N1,H,D), k, v (M0,M1,H,D): views of one packed projection for
    self-attention (`memory is query`), of two (q; k and v) otherwise."""
    weight, bias, embed, heads = attn.in_proj_weight, attn.in_proj_bias, attn.embed_dim, attn.num_heads
    if memory is query:
        return _split_heads(F.linear(query, weight, bias), 3, heads)
    (q,) = _split_heads(F.linear(query, weight[:embed], None if bias is None else bias[:embed]), 1, heads)
    k, v = _split_heads(F.linear(memory, weight[embed:], None if bias is None else bias[embed:]), 2, heads)
    return q, k, v


def _heads_first(x: Tensor, batch_first: bool, inverse: bool = False) -> Tensor:
    """(B,L,H,D) or (L,B,H,D) -> (B,H,L,D), the kernels' layout (a view); `inverse` goes back."""
    if batch_first:
        return x.transpose(1, 2)
    return x.permute(2, 0, 1, 3) if inverse else x.permute(1, 2, 0, 3)


def _split_heads(packed: Tensor, parts: int, heads: int) -> tuple[Tensor, ...]:
    """(N0,N1,parts*E) -> `parts` views (N0,N1,heads,E/heads)."""
    return packed.unflatten(-1, (parts, heads, -1)).unbind(-3)
