"""GPT generation benchmark: tokens/s of greedy decoding with seqkern.models.GPT.generate (a KV cache, the prompt
through causal seqkern.attention, each new token through seqkern.attention_decode) against the same weights in
the model built from torch.nn.TransformerEncoderLayer, which has no KV cache and recomputes the whole sequence
for every token (the issue's baseline), and against that model with a KV cache and
F.scaled_dot_product_attention written in plain PyTorch (`generate_with_sdpa_cache`, an honest yardstick: what
a user gets without seqkern's kernels). Float32, every contender generates the same tokens (checked: "rel diff").

Target (read off the table, not asserted): >= 1.5x the torch.nn model's tokens/s.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.harness import SUBJECT, Call, Case
from seqkern.models import GPT

SEED = 0
RECOMPUTE = "torch.nn (recompute)"
SDPA_CACHE = "torch.nn + KV cache + SDPA"


@dataclasses.dataclass(frozen=True)
class Shape:
    """A GPT of `layers` x `d_model` (heads of 64, feed-forward 4 x d_model, a byte-sized vocabulary) generating
    `new_tokens` after prompts of `prompt` tokens, `batch` at once. `recompute`: whether the model without a KV
    cache is timed too (O(T^2) per sequence: ~10 s per call at batch 1, d512, 6 layers on an idle machine)."""

    batch: int
    prompt: int
    new_tokens: int
    d_model: int
    layers: int
    vocab: int = 256
    recompute: bool = False

    @property
    def name(self) -> str:
        return f"b{self.batch} prompt{self.prompt} new{self.new_tokens} d{self.d_model} l{self.layers}"

    def build(self, layer_cls: type[torch.nn.Module] | None) -> GPT:
        torch.manual_seed(SEED)  # the same weights whatever the layer class: the same draws in the same order
        return GPT(self.vocab, self.d_model, self.d_model // 64, self.layers, 4 * self.d_model,
                   max_len=self.prompt + self.new_tokens, layer_cls=layer_cls).eval()


SHAPES = (
    Shape(batch=1, prompt=128, new_tokens=128, d_model=256, layers=4, recompute=True),
    Shape(batch=1, prompt=128, new_tokens=256, d_model=512, layers=6),
    Shape(batch=8, prompt=64, new_tokens=128, d_model=256, layers=4),
    Shape(batch=8, prompt=128, new_tokens=128, d_model=512, layers=6),
)
QUICK_SHAPES = (Shape(batch=1, prompt=8, new_tokens=8, d_model=64, layers=2, vocab=32, recompute=True),)


def flops(shape: Shape) -> float:
    """The useful work of decoding with a cache: per generated token, 2 flops per weight of the layers and the LM
    head, and 4 * d_model per cached position for q.k and p.v; the prompt's prefill not counted."""
    per_token_weights = 12 * shape.d_model**2 * shape.layers + shape.d_model * shape.vocab
    cached = sum(range(shape.prompt, shape.prompt + shape.new_tokens))
    return shape.batch * (2 * per_token_weights * shape.new_tokens + 4 * shape.d_model * shape.layers * cached)


@torch.no_grad()
def generate_with_sdpa_cache(model: GPT, idx: Tensor, max_new_tokens: int) -> Tensor:
    """Greedy decoding through `model`'s weights in plain PyTorch: per layer a preallocated key and value cache
    (B, heads, max_len, head_dim) written in place, F.scaled_dot_product_attention over its filled part (causal
    for the prompt), the layer's own modules for the rest. idx (B, T) -> (B, T + max_new_tokens)."""
    batch, prompt_len = idx.shape
    heads, d_model = model.nhead, model.d_model
    caches = [torch.empty(2, batch, heads, model.max_len, d_model // heads) for _ in model.layers]
    out = torch.cat([idx, idx.new_empty(batch, max_new_tokens)], dim=1)
    x, start = model.token_embedding(idx) + model.position_embedding.weight[:prompt_len], 0
    for position in range(prompt_len, prompt_len + max_new_tokens):
        end = start + x.shape[1]
        for layer, cache in zip(model.layers, caches):
            attn = layer.self_attn
            qkv = F.linear(layer.norm1(x), attn.in_proj_weight, attn.in_proj_bias)
            q, k, v = qkv.view(batch, -1, 3, heads, d_model // heads).permute(2, 0, 3, 1, 4)
            cache[0, :, :, start:end] = k
            cache[1, :, :, start:end] = v
            y = F.scaled_dot_product_attention(q, cache[0, :, :, :end], cache[1, :, :, :end], is_causal=start == 0)
            x = x + attn.out_proj(y.transpose(1, 2).reshape(batch, -1, d_model))
            x = x + layer.linear2(layer.activation(layer.linear1(layer.norm2(x))))
        out[:, position] = token = model.lm_head(model.norm(x[:, -1])).argmax(dim=-1)
        x, start = model.token_embedding(token[:, None]) + model.position_embedding.weight[end:end + 1], end
    return out


def _prompt(shape: Shape) -> Tensor:
    return torch.randint(0, shape.vocab, (shape.batch, shape.prompt), generator=torch.Generator().manual_seed(SEED))


def _setup(shape: Shape, layer_cls: type[torch.nn.Module] | None,
           generate: Callable[[GPT, Tensor, int], Tensor]) -> Callable[[], Call]:
    def setup() -> Call:
        model, prompt = shape.build(layer_cls), _prompt(shape)
        return lambda: (generate(model, prompt, shape.new_tokens),)
    return setup


def _seqkern(model: GPT, idx: Tensor, new_tokens: int) -> Tensor:
    return model.generate(idx, new_tokens, do_sample=False)


def _recompute(model: GPT, idx: Tensor, new_tokens: int) -> Tensor:
    return model.generate(idx, new_tokens, do_sample=False, use_cache=False)


def _case(shape: Shape) -> Case:
    torch_layer = torch.nn.TransformerEncoderLayer
    contenders = {
        SUBJECT: _setup(shape, None, _seqkern),
        SDPA_CACHE: _setup(shape, torch_layer, generate_with_sdpa_cache),
    }
    skipped = {}
    if shape.recompute:
        contenders[RECOMPUTE] = _setup(shape, torch_layer, _recompute)
    else:
        skipped[RECOMPUTE] = "seconds to minutes per call (O(T^2) per sequence): timed on the smallest shape only"
    tokens = shape.batch * shape.new_tokens
    return Case(op="gpt", name=shape.name, params={**dataclasses.asdict(shape), "dtype": "float32"},
                flops=flops(shape), contenders=contenders, skipped=skipped,
                notes={"generated_tokens_per_call": tokens})


def cases(quick: bool = False) -> list[Case]:
    """Generation throughput at batch 1 and 8 (tokens/s = notes.generated_tokens_per_call / median)."""
    return [_case(shape) for shape in (QUICK_SHAPES if quick else SHAPES)]
