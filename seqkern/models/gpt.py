"""GPT: a decoder-only (causal) language model built from encoder layers, with KV-cache generation.

    model = seqkern.models.GPT(vocab_size=65, d_model=256, nhead=4, num_layers=4, dim_feedforward=1024,
                               max_len=256)
    logits, loss = model(idx, targets)                  # idx, targets (B, T) -> logits (B, T, vocab)
    out = model.generate(prompt, 200, temperature=0.8, top_k=20)

Training runs the layers' own forward (pre-norm, causal flash attention). `generate` runs the prompt through
the layers' weights once (causal `seqkern.attention`), keeping every layer's keys and values in a KV cache,
then each new token alone against that cache (`seqkern.attention_decode`): O(T) work per token where a model
without a cache recomputes the whole sequence.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import seqkern
from seqkern import backends
from seqkern._checks import DTypeError, ShapeError
from seqkern.models._stack import check_token_ids, encoder_layers
from seqkern.ops import flash_attention

# GPT-2's initialization of the embeddings: with the LM head tied to the token embedding, torch's default
# N(0, 1) would make the initial logits' scale grow with sqrt(d_model).
EMBEDDING_INIT_STD = 0.02


class KVCache:
    """The keys and values of every layer of a GPT, for decoding one token at a time.

    buffers[i]: (2, B, heads, max_len, head_dim) — layer i's keys ([0]) and values ([1]), allocated once;
    positions [0, length) are filled. cache_seqlens: (B,) int32, `length` for every sequence (a batch of
    prompts of one length grows in step), the argument of the decode kernel.
    """

    def __init__(self, num_layers: int, batch: int, heads: int, max_len: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.buffers = [torch.empty(2, batch, heads, max_len, head_dim, dtype=dtype, device=device)
                        for _ in range(num_layers)]
        # Each layer's (keys, values) views, made once: unpacking a buffer per step is an aten::unbind call
        # (29 us on average in a profile of d128 decoding, loaded machine).
        self._keys_values = [(buffer[0], buffer[1]) for buffer in self.buffers]
        self.cache_seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.length = 0
        self.scale = head_dim**-0.5
        # The buffers and lengths are this class's own, valid by construction: a step calls the decode kernel
        # directly instead of through seqkern.attention_decode, whose argument checks (a dozen Python checks
        # and a data-dependent range check of cache_seqlens) cost 25-30 us per call against the kernel's ~10 us
        # at B=1, 4 heads, 192 cached keys (1 thread).
        impl = backends.resolve("flash_attention_decode", device, dtype, flash_attention.SUPPORTED_DTYPES,
                                kernel="flash_attention_decode")
        self._direct = impl == "cpu"

    @property
    def max_len(self) -> int:
        return self.buffers[0].shape[3]

    def extend(self, new: int) -> int:
        """Make room for `new` positions; returns where they start. Every layer writes them before reading."""
        if self.length + new > self.max_len:
            raise ShapeError(f"KVCache: {self.length} cached + {new} new positions exceed max_len={self.max_len}")
        start, self.length = self.length, self.length + new
        self.cache_seqlens.fill_(self.length)
        return start

    def write(self, layer: int, start: int, kv: Tensor) -> None:
        """kv (2, B, heads, t, head_dim): layer `layer`'s keys and values of positions [start, start + t)."""
        self.buffers[layer][:, :, :, start:start + kv.shape[3]].copy_(kv)

    def attend(self, layer: int, q: Tensor) -> Tensor:
        """q (B, heads, t, head_dim), the queries of the last t cached positions (last dim contiguous), attends
        causally to layer `layer`'s cache -> (B, heads, t, head_dim)."""
        keys, values = self._keys_values[layer]
        if self._direct:
            return torch.ops.seqkern.flash_attention_decode(q, keys, values, self.cache_seqlens, self.scale, True,
                                                            -1, 0)[0]
        return seqkern.attention_decode(q, keys, values, self.cache_seqlens, scale=self.scale, is_causal=True)


class _Block(NamedTuple):
    """A pre-norm layer's parameters for the decoding step (norms: (weight, bias, eps); weights transposed to
    (in, out) views for addmm), looked up once per generate: reading them through nn.Module attributes at every
    step made 24 Module.__getattr__ calls per layer (~1 us each; cProfile of d64 decoding, 21,400 calls in 50
    generates)."""

    norm1: tuple[Tensor, Tensor, float]
    in_proj_weight_t: Tensor
    in_proj_bias: Tensor
    out_proj_weight_t: Tensor
    out_proj_bias: Tensor
    norm2: tuple[Tensor, Tensor, float]
    linear1_weight_t: Tensor
    linear1_bias: Tensor
    linear2_weight_t: Tensor
    linear2_bias: Tensor
    activation: Callable[[Tensor], Tensor]

    @classmethod
    def of(cls, layer: nn.Module) -> _Block:
        attn, norm1, norm2 = layer.self_attn, layer.norm1, layer.norm2
        linears = (attn.in_proj_weight, attn.in_proj_bias), (attn.out_proj.weight, attn.out_proj.bias), (
            layer.linear1.weight, layer.linear1.bias), (layer.linear2.weight, layer.linear2.bias)
        (w_in, b_in), (w_out, b_out), (w_1, b_1), (w_2, b_2) = (
            (weight.t(), bias if bias is not None else weight.new_zeros(weight.shape[0])) for weight, bias in linears)
        return cls((norm1.weight, norm1.bias, norm1.eps), w_in, b_in, w_out, b_out,
                   (norm2.weight, norm2.bias, norm2.eps), w_1, b_1, w_2, b_2, layer.activation)


class GPT(nn.Module):
    """Token + learned position embeddings, `num_layers` pre-norm causal blocks (`layer_cls` with
    norm_first=True, GELU, batch_first), a final LayerNorm and the LM head (its weight is the token
    embedding's when `tie_embeddings`).

    layer_cls: any class with torch.nn.TransformerEncoderLayer's constructor and attributes; None means
    seqkern.nn.TransformerEncoderLayer. torch.nn's own gives the same model (same state_dict) on torch's kernels.

    forward(idx (B, T) int64, targets (B, T) int64 or None) -> logits (B, T, vocab), or (logits, loss) with
    targets (mean cross-entropy; target -100 is ignored, as in F.cross_entropy).
    """

    def __init__(self, vocab_size: int, d_model: int, nhead: int, num_layers: int, dim_feedforward: int,
                 max_len: int, dropout: float = 0.0, tie_embeddings: bool = True, layer_norm_eps: float = 1e-5,
                 layer_cls: type[nn.Module] | None = None, device=None, dtype=None) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("max_len", max_len)):
            if not isinstance(value, int) or value < 1:
                raise ShapeError(f"{name}: expected a positive int, got {value!r}")
        factory = {"device": device, "dtype": dtype}
        self.vocab_size, self.max_len, self.nhead = vocab_size, max_len, nhead
        self.token_embedding = nn.Embedding(vocab_size, d_model, **factory)
        self.position_embedding = nn.Embedding(max_len, d_model, **factory)
        self.dropout = nn.Dropout(dropout)
        self.layers = encoder_layers(layer_cls, num_layers, d_model, nhead, dim_feedforward, dropout,
                                     layer_norm_eps, norm_first=True, **factory)
        self.norm = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False, **factory)
        nn.init.normal_(self.token_embedding.weight, std=EMBEDDING_INIT_STD)
        nn.init.normal_(self.position_embedding.weight, std=EMBEDDING_INIT_STD)
        if tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight

    @property
    def d_model(self) -> int:
        return self.token_embedding.embedding_dim

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        check_token_ids("idx", idx, self.vocab_size, self.max_len)
        length = idx.shape[1]
        x = self.dropout(self._embed(idx, 0))
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=x.device, dtype=x.dtype)
        for layer in self.layers:
            x = layer(x, src_mask=causal, is_causal=True)
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits
        if not isinstance(targets, Tensor) or targets.shape != idx.shape or targets.dtype != torch.int64:
            got = f"{targets.dtype} of shape {tuple(targets.shape)}" if isinstance(targets, Tensor) else type(targets)
            raise ShapeError(f"targets: expected an int64 tensor of shape {tuple(idx.shape)} (as idx), got {got}")
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def _embed(self, idx: Tensor, start: int) -> Tensor:
        """idx (B, t) at positions [start, start + t) -> token + position embeddings (B, t, d_model)."""
        return self.token_embedding(idx) + self.position_embedding.weight[start:start + idx.shape[1]]

    # --------------------------------------------------------------------------------------------------------
    # Generation.
    # --------------------------------------------------------------------------------------------------------
    def new_cache(self, batch: int) -> KVCache:
        """An empty KV cache for `batch` sequences of up to max_len positions, in the parameters' dtype."""
        weight = self.token_embedding.weight
        return KVCache(len(self.layers), batch, self.nhead, self.max_len, self.d_model // self.nhead,
                       dtype=weight.dtype, device=weight.device)

    @torch.no_grad()
    def forward_cached(self, idx: Tensor, cache: KVCache) -> Tensor:
        """The next `t` positions of every sequence through the layers' weights, their keys and values appended
        to `cache`: idx (B, t) -> logits of the last position (B, vocab). The first call (empty cache) is the
        prompt's prefill (causal `seqkern.attention`); later calls attend to the cache with
        `seqkern.attention_decode`. No dropout (inference)."""
        check_token_ids("idx", idx, self.vocab_size, self.max_len)
        if not isinstance(cache, KVCache) or cache.cache_seqlens.shape[0] != idx.shape[0]:
            got = f"one for batch {cache.cache_seqlens.shape[0]}" if isinstance(cache, KVCache) else type(cache).__name__
            raise ShapeError(f"cache: expected a KVCache of this model (new_cache) for batch {idx.shape[0]}, got {got}")
        return self._step(idx, cache, [_Block.of(layer) for layer in self.layers])

    def _step(self, idx: Tensor, cache: KVCache, blocks: list[_Block]) -> Tensor:
        """forward_cached without its argument checks (generate's tokens are valid by construction)."""
        start = cache.extend(idx.shape[1])
        x = self._embed(idx, start)
        for index, block in enumerate(blocks):
            x = self._cached_block(block, index, x, cache, start)
        return self.lm_head(self.norm(x[:, -1]))

    def _cached_block(self, block: _Block, index: int, x: Tensor, cache: KVCache, start: int) -> Tensor:
        """One pre-norm layer on x (B, t, d) at positions [start, start + t), from its parameters:
        x + out_proj(attention(norm1(x))), then + linear2(activation(linear1(norm2(x)))).

        Per-step overhead cut, measured (CPU time, one core of the loaded machine, medians):
          * functional calls on the parameters, not the layer's five submodules: a module call adds 4.5-7 us of
            Python to its function's (8x8 Linear / LayerNorm: 17-23 us against 13-18);
          * rows (B*t, d) through addmm on pre-transposed weights, the residual added in place, instead of
            F.linear (its transpose and wrapper) and out-of-place adds: 64 tokens of a d128, 3-layer GPT
            35.3 -> 31.8 ms; no change at d256 x 4 layers, where the step is bound by reading the weights.
        The keys and values go into the cache in one copy from the projection's output view."""
        batch, length, d_model = x.shape
        x = x.reshape(batch * length, d_model)
        h = F.layer_norm(x, (d_model,), *block.norm1)
        # (B*t, 3d) -> (3, B, heads, t, head_dim): strided views, nothing copied.
        qkv = torch.addmm(block.in_proj_bias, h, block.in_proj_weight_t).view(batch, length, 3, self.nhead, -1)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        cache.write(index, start, qkv[1:])
        if start == 0:
            out = seqkern.attention(qkv[0], qkv[1], qkv[2], is_causal=True)
        else:
            out = cache.attend(index, qkv[0])
        out = out.transpose(1, 2).reshape(batch * length, d_model)
        x = torch.addmm(block.out_proj_bias, out, block.out_proj_weight_t).add_(x)
        h = block.activation(torch.addmm(block.linear1_bias, F.layer_norm(x, (d_model,), *block.norm2),
                                         block.linear1_weight_t))
        return torch.addmm(block.linear2_bias, h, block.linear2_weight_t).add_(x).view(batch, length, d_model)

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 do_sample: bool = True, generator: torch.Generator | None = None, use_cache: bool = True) -> Tensor:
        """Continue each prompt by `max_new_tokens` tokens: idx (B, T) -> (B, T + max_new_tokens), the prompt
        first. T + max_new_tokens <= max_len.

        do_sample=False takes the most likely token (greedy); otherwise tokens are drawn from
        softmax(logits / temperature), restricted to the `top_k` most likely when given, with `generator`
        (reproducible when seeded). use_cache=False recomputes the whole sequence for every token through
        forward (what a model without a KV cache does; the same tokens). No dropout (inference).
        """
        self._check_generate(idx, max_new_tokens, temperature, top_k, do_sample, generator)
        batch, prompt_len = idx.shape
        out = idx.new_empty(batch, prompt_len + max_new_tokens)
        out[:, :prompt_len] = idx
        if use_cache:
            cache, blocks = self.new_cache(batch), [_Block.of(layer) for layer in self.layers]

            def logits_after(end: int) -> Tensor:  # the next token's logits given out[:, :end]
                return self._step(out[:, end - 1:end], cache, blocks)

            logits = self._step(idx, cache, blocks)  # the prompt's prefill
        else:
            def logits_after(end: int) -> Tensor:
                return self(out[:, :end])[:, -1]

            logits = logits_after(prompt_len)
        for position in range(prompt_len, out.shape[1]):
            out[:, position] = next_token(logits, temperature, top_k, do_sample, generator)
            if position + 1 < out.shape[1]:
                logits = logits_after(position + 1)
        return out

    def _check_generate(self, idx, max_new_tokens, temperature, top_k, do_sample, generator) -> None:
        check_token_ids("idx", idx, self.vocab_size, self.max_len)
        if idx.shape[1] == 0:
            raise ShapeError(f"idx: expected a prompt of at least one token, got shape {tuple(idx.shape)}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ShapeError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
        if idx.shape[1] + max_new_tokens > self.max_len:
            raise ShapeError(f"idx: a prompt of {idx.shape[1]} tokens + max_new_tokens={max_new_tokens} exceeds "
                             f"max_len={self.max_len} (the learned positions)")
        if do_sample and not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ShapeError(f"temperature: expected a number > 0 (do_sample=False for greedy), got {temperature!r}")
        if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= self.vocab_size):
            raise ShapeError(f"top_k: expected None or an int in [1, {self.vocab_size}] (vocab_size), got {top_k!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise DTypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")


def next_token(logits: Tensor, temperature: float, top_k: int | None, do_sample: bool,
               generator: torch.Generator | None) -> Tensor:
    """logits (B, vocab) -> the next token ids (B,): the argmax, or a draw from softmax(logits / temperature)
    over the `top_k` largest logits (all when None)."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)
