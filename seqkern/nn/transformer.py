"""seqkern.nn.Transformer and its parts: drop-ins for torch.nn.Transformer, TransformerEncoder(Layer) and
TransformerDecoder(Layer), with self- and cross-attention on seqkern's flash attention.

Each class subclasses its torch.nn counterpart and calls torch.nn's constructor, so the constructor arguments,
attribute names (self_attn, multihead_attn, linear1, linear2, norm1..3, dropout..dropout3, activation,
norm_first), initialization (the same random draws: same seed, same weights) and state_dict are torch.nn's own,
isinstance checks hold, and a subclass may override `_sa_block`, `_mha_block`, `_ff_block` or `forward` as it
would torch.nn's. The attention modules are seqkern.nn.MultiheadAttention.

Differences from torch.nn, all deliberate:
  * No native fast path and no nested tensors: eval mode runs the same code as training (torch.nn's layer
    switches to `torch._transformer_encoder_layer_fwd`, which ignores `is_causal`). seqkern.nn.TransformerEncoder
    still returns what torch.nn's nested-tensor path returns: in the conditions torch.nn takes that path (eval,
    no gradient, enable_nested_tensor, a right-padded src_key_padding_mask, no mask, ...) the padded positions
    of the output are 0 before the final `norm`; otherwise they hold what the layers compute there, as in
    torch.nn.
  * A query whose keys are all masked gets attention output 0 where torch.nn gets NaN (as
    seqkern.nn.MultiheadAttention).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.transformer import _detect_is_causal_mask, _get_seq_len

from seqkern import onnx
from seqkern._checks import DTypeError, ShapeError, check_tensor
from seqkern.nn.multihead_attention import MultiheadAttention

Activation = str | Callable[[Tensor], Tensor]


# ------------------------------------------------------------------------------------------------------------
# Attention computed from a MultiheadAttention's parameters, in the caller's layout.
# ------------------------------------------------------------------------------------------------------------
def _runs_inline(attn: torch.nn.Module) -> bool:
    """Whether `_attend` may call `attn.attend` (the projections and attention from its parameters, no forward
    call): a seqkern MultiheadAttention, its forward not overridden and no hooks on it (torch.nn's fast path
    makes the same hook check)."""
    return (isinstance(attn, MultiheadAttention) and type(attn).forward is MultiheadAttention.forward
            and not attn._forward_hooks and not attn._forward_pre_hooks)


def _attend(attn: torch.nn.Module, query: Tensor, memory: Tensor, attn_mask: Tensor | None,
            key_padding_mask: Tensor | None, is_causal: bool) -> Tensor:
    """attn(query, memory, memory, need_weights=False)[0]; self-attention when `memory is query`.

    query (L,B,E) | (B,L,E) with batch_first | (L,E), memory the same with S positions -> like query, a fresh
    tensor when inline (see _runs_inline and MultiheadAttention.attend).
    """
    if not _runs_inline(attn):
        return attn(query, memory, memory, key_padding_mask=key_padding_mask, need_weights=False,
                    attn_mask=attn_mask, is_causal=is_causal)[0]
    return attn.attend(query, memory, attn_mask, key_padding_mask, is_causal)


# ------------------------------------------------------------------------------------------------------------
# Pieces the layers share.
# ------------------------------------------------------------------------------------------------------------
def _check_sequence(name: str, x: Tensor, layer: torch.nn.Module) -> None:
    """x (L,B,E), (B,L,E) or (L,E) with E = the layer's d_model (its self_attn's embed_dim), in the dtype and on
    the device of the layer's parameters. A layer whose parts a user replaced (seqkern.convert keeps them) may have
    no embed_dim or no parameters: those checks are then left to the parts."""
    check_tensor(name, x)
    if x.dim() not in (2, 3):
        raise ShapeError(f"{name}: expected a 2-D (unbatched) or 3-D tensor, got shape {tuple(x.shape)}")
    width = getattr(layer.self_attn, "embed_dim", None)
    if isinstance(width, int) and x.shape[-1] != width:
        raise ShapeError(f"{name}: expected {width} features (d_model) in the last dim, got shape {tuple(x.shape)}")
    reference = next(layer.parameters(), None)
    if reference is not None and (x.dtype != reference.dtype or x.device != reference.device):
        raise DTypeError(f"{name}: expected {reference.dtype} on {reference.device} (as the module's parameters), "
                         f"got {x.dtype} on {x.device}")


def _owns_block_outputs(layer: torch.nn.Module, cls: type, blocks: tuple[str, ...]) -> bool:
    """Whether the block outputs of `layer` are fresh tensors nothing else holds, which its forward may then
    update in place: the blocks are `cls`'s own (not overridden), its feed-forward and dropouts are stock
    torch.nn.Linear / torch.nn.Dropout, its attention runs inline (_runs_inline) and no submodule has hooks
    (torch.nn's fast path makes the same hook check)."""
    stock_blocks = all(getattr(type(layer), name) is getattr(cls, name) for name in blocks)
    stock_modules = all(type(module) in (torch.nn.Linear, torch.nn.Dropout) for name, module in
                        layer.named_children() if name.startswith(("linear", "dropout")))
    attentions = [module for module in layer.children() if isinstance(module, torch.nn.MultiheadAttention)]
    return (stock_blocks and stock_modules and all(_runs_inline(a) for a in attentions)
            and not any(m._forward_hooks or m._forward_pre_hooks for m in layer.modules()))


def _stock_linear(module: torch.nn.Module) -> bool:
    """A torch.nn.Linear without hooks: calling F.linear with its parameters is exactly calling it."""
    return type(module) is torch.nn.Linear and not module._forward_hooks and not module._forward_pre_hooks


def _feed_forward(layer: torch.nn.Module, x: Tensor) -> Tensor:
    """linear2(dropout(activation(linear1(x)))), x (..., E) -> (..., E).

    With stock linear layers (_stock_linear) the GEMMs run on 2-D rows, so the hidden activations are a fresh
    tensor, not a view: ReLU then runs in place on it (GELU too when no gradient is recorded: its backward reads
    its input), leaving out a second (N, dim_feedforward) buffer, 50 MB at the BERT-base shape, whose
    first-touch page faults made torch.relu 75-110 ms against 16 ms for relu_ here (2 busy cores). On a view
    (what F.linear returns for 3-D input) autograd would wrap the in-place op in CopySlices, which copies the
    whole gradient: 300 ms of the BERT-base training step, measured.
    """
    if not (_stock_linear(layer.linear1) and _stock_linear(layer.linear2)):
        return layer.linear2(layer.dropout(layer.activation(layer.linear1(x))))
    hidden = F.linear(x.flatten(0, -2), layer.linear1.weight, layer.linear1.bias)
    if layer.activation is F.relu:
        hidden = hidden.relu_()
    elif layer.activation is F.gelu and not hidden.requires_grad:
        hidden = torch.ops.aten.gelu_(hidden)
    else:
        hidden = layer.activation(hidden)
    return F.linear(layer.dropout(hidden), layer.linear2.weight, layer.linear2.bias).view(x.shape)


def _residual(block_output: Tensor, x: Tensor, in_place: bool) -> Tensor:
    """x + block_output, in the block's own buffer when `in_place` (the block's output is fresh and no
    autograd node keeps it): one fresh (N,E) buffer less per residual. Not on a view that autograd tracks (an
    eval-mode dropout returns the out-projection's view as is): CopySlices would copy the gradient. Not under
    torch.compile, whose memory planning reuses buffers itself (and dynamo cannot trace _is_view)."""
    if in_place and not torch.compiler.is_compiling() and not (block_output.requires_grad
                                                                and block_output._is_view()):
        return block_output.add_(x)
    return x + block_output


def _layer_args(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first, norm_first,
                bias, device, dtype) -> dict[str, Any]:
    return dict(d_model=d_model, nhead=nhead, dim_feedforward=dim_feedforward, dropout=dropout,
                activation=activation, layer_norm_eps=layer_norm_eps, batch_first=batch_first,
                norm_first=norm_first, bias=bias, device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------------------------
# Layers.
# ------------------------------------------------------------------------------------------------------------
class TransformerEncoderLayer(torch.nn.TransformerEncoderLayer):
    """Drop-in for torch.nn.TransformerEncoderLayer: self-attention and feed-forward, post- or pre-norm.

    forward(src (S,B,E) | (B,S,E) with batch_first | (S,E), src_mask (S,S) or (B*nhead,S,S), bool (True = not
    allowed) or float (added), src_key_padding_mask (B,S) bool (True = ignore) or float, is_causal (a hint that
    src_mask is the causal mask: the causal kernel then runs without reading it)) -> like src.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: Activation = F.relu, layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(**_layer_args(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps,
                                       batch_first, norm_first, bias, device, dtype))
        self.self_attn = MultiheadAttention.from_torch(self.self_attn)

    @onnx.reference_while_exporting
    def forward(self, src: Tensor, src_mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        _check_sequence("src", src, self)
        own = _owns_block_outputs(self, TransformerEncoderLayer, ("_sa_block", "_ff_block"))
        x = src
        if self.norm_first:
            x = _residual(self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal), x, own)
            x = _residual(self._ff_block(self.norm2(x)), x, own)
        else:
            x = self.norm1(_residual(self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal), x, own))
            x = self.norm2(_residual(self._ff_block(x), x, own))
        return x

    def _sa_block(self, x: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None,
                  is_causal: bool = False) -> Tensor:
        return self.dropout1(_attend(self.self_attn, x, x, attn_mask, key_padding_mask, is_causal))

    def _ff_block(self, x: Tensor) -> Tensor:
        return self.dropout2(_feed_forward(self, x))


class TransformerDecoderLayer(torch.nn.TransformerDecoderLayer):
    """Drop-in for torch.nn.TransformerDecoderLayer: self-attention, cross-attention to `memory`, feed-forward.

    forward(tgt (T,B,E) | (B,T,E) with batch_first | (T,E), memory (S,B,E) | (B,S,E) | (S,E), tgt_mask (T,T) or
    (B*nhead,T,T), memory_mask (T,S) or (B*nhead,T,S), tgt_key_padding_mask (B,T), memory_key_padding_mask (B,S)
    (masks bool, True = not allowed, or float), tgt_is_causal, memory_is_causal (hints that tgt_mask /
    memory_mask are causal)) -> like tgt.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: Activation = F.relu, layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(**_layer_args(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps,
                                       batch_first, norm_first, bias, device, dtype))
        self.self_attn = MultiheadAttention.from_torch(self.self_attn)
        self.multihead_attn = MultiheadAttention.from_torch(self.multihead_attn)

    @onnx.reference_while_exporting
    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Tensor | None = None,
                memory_mask: Tensor | None = None, tgt_key_padding_mask: Tensor | None = None,
                memory_key_padding_mask: Tensor | None = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False) -> Tensor:
        _check_sequence("tgt", tgt, self)
        _check_sequence("memory", memory, self)
        if memory.dim() != tgt.dim():
            raise ShapeError(f"memory: expected {tgt.dim()} dims (as tgt {tuple(tgt.shape)}), "
                             f"got shape {tuple(memory.shape)}")
        own = _owns_block_outputs(self, TransformerDecoderLayer, ("_sa_block", "_mha_block", "_ff_block"))
        x = tgt
        if self.norm_first:
            x = _residual(self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal), x, own)
            x = _residual(self._mha_block(self.norm2(x), memory, memory_mask, memory_key_padding_mask,
                                          memory_is_causal), x, own)
            x = _residual(self._ff_block(self.norm3(x)), x, own)
        else:
            x = self.norm1(_residual(self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal), x, own))
            x = self.norm2(_residual(self._mha_block(x, memory, memory_mask, memory_key_padding_mask,
                                                     memory_is_causal), x, own))
            x = self.norm3(_residual(self._ff_block(x), x, own))
        return x

    def _sa_block(self, x: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None,
                  is_causal: bool = False) -> Tensor:
        return self.dropout1(_attend(self.self_attn, x, x, attn_mask, key_padding_mask, is_causal))

    def _mha_block(self, x: Tensor, mem: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None,
                   is_causal: bool = False) -> Tensor:
        return self.dropout2(_attend(self.multihead_attn, x, mem, attn_mask, key_padding_mask, is_causal))

    def _ff_block(self, x: Tensor) -> Tensor:
        return self.dropout3(_feed_forward(self, x))


# ------------------------------------------------------------------------------------------------------------
# Stacks.
# ------------------------------------------------------------------------------------------------------------
class TransformerEncoder(torch.nn.TransformerEncoder):
    """Drop-in for torch.nn.TransformerEncoder: `num_layers` deep copies of `encoder_layer`, then `norm`.

    forward(src, mask, src_key_padding_mask, is_causal=None (None: detected from mask)) with the shapes of
    TransformerEncoderLayer.forward -> like src. Padded positions: see the module docstring.
    """

    def forward(self, src: Tensor, mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None,
                is_causal: bool | None = None) -> Tensor:
        check_tensor("src", src)
        first = self.layers[0]
        batch_first = first.self_attn.batch_first
        is_causal = _detect_is_causal_mask(mask, is_causal, _get_seq_len(src, batch_first))
        output = src
        for layer in self.layers:
            output = layer(output, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=is_causal)
        if self._zeroes_padding(src, mask, src_key_padding_mask):
            output = output.masked_fill(src_key_padding_mask.bool().unsqueeze(-1), 0.0)
        return output if self.norm is None else self.norm(output)

    def _zeroes_padding(self, src: Tensor, mask: Tensor | None, key_padding_mask: Tensor | None) -> bool:
        """Whether torch.nn.TransformerEncoder would run this call on nested tensors (its conditions, in its
        order), returning 0 at the padded positions."""
        first = self.layers[0]
        if not (torch.backends.mha.get_fastpath_enabled() and getattr(self, "use_nested_tensor", False)
                and not first.training and src.dim() == 3 and key_padding_mask is not None and mask is None
                and not torch.is_autocast_enabled()):
            return False
        if getattr(self, "mask_check", True):
            if torch.compiler.is_compiling():
                return False
            padded = key_padding_mask.bool()
            if bool((padded[:, :-1] & ~padded[:, 1:]).any()):  # torch.nn: only right padding (left-aligned)
                return False
        # torch.nn's list of the first layer's tensors (a part a user replaced may lack one: skipped)
        parts = {"self_attn": ("in_proj_weight", "in_proj_bias"), "norm1": ("weight", "bias"),
                 "norm2": ("weight", "bias"), "linear1": ("weight", "bias"), "linear2": ("weight", "bias")}
        parameters = [getattr(getattr(first, part, None), name, None)
                      for part, names in parts.items() for name in names]
        out_proj = getattr(first.self_attn, "out_proj", None)
        parameters += [getattr(out_proj, "weight", None), getattr(out_proj, "bias", None)]
        return not (torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad
                                                    for t in (src, *parameters)))


class TransformerDecoder(torch.nn.TransformerDecoder):
    """Drop-in for torch.nn.TransformerDecoder: `num_layers` deep copies of `decoder_layer`, then `norm`.

    forward(tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask,
    tgt_is_causal=None (None: detected from tgt_mask), memory_is_causal) with the shapes of
    TransformerDecoderLayer.forward -> like tgt.
    """

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Tensor | None = None,
                memory_mask: Tensor | None = None, tgt_key_padding_mask: Tensor | None = None,
                memory_key_padding_mask: Tensor | None = None, tgt_is_causal: bool | None = None,
                memory_is_causal: bool = False) -> Tensor:
        check_tensor("tgt", tgt)
        seq_len = _get_seq_len(tgt, self.layers[0].self_attn.batch_first)
        tgt_is_causal = _detect_is_causal_mask(tgt_mask, tgt_is_causal, seq_len)
        output = tgt
        for layer in self.layers:
            output = layer(output, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                           tgt_key_padding_mask=tgt_key_padding_mask,
                           memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=tgt_is_causal,
                           memory_is_causal=memory_is_causal)
        return output if self.norm is None else self.norm(output)


class Transformer(torch.nn.Transformer):
    """Drop-in for torch.nn.Transformer(d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6,
    dim_feedforward=2048, dropout=0.1, activation=F.relu, custom_encoder=None, custom_decoder=None,
    layer_norm_eps=1e-5, batch_first=False, norm_first=False, bias=True, device=None, dtype=None), built from
    seqkern's encoder and decoder (unless custom ones are given), initialized as torch.nn's.

    forward(src (S,B,E) | (B,S,E) | (S,E), tgt (T,B,E) | (B,T,E) | (T,E), src_mask, tgt_mask, memory_mask,
    src_key_padding_mask, tgt_key_padding_mask, memory_key_padding_mask, src_is_causal, tgt_is_causal,
    memory_is_causal) -> (T,B,E) | (B,T,E) | (T,E). generate_square_subsequent_mask(sz) is torch.nn's.
    """

    def __init__(self, d_model: int = 512, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: Activation = F.relu, custom_encoder: Any | None = None,
                 custom_decoder: Any | None = None, layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, device=None, dtype=None) -> None:
        layer = _layer_args(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first,
                            norm_first, bias, device, dtype)
        norm = dict(eps=layer_norm_eps, bias=bias, device=device, dtype=dtype)
        # Built in torch.nn.Transformer's order (encoder layer, its norm, decoder layer, its norm), so the same
        # seed draws the same weights; torch.nn's constructor then re-initializes them as its own.
        if custom_encoder is None:
            custom_encoder = TransformerEncoder(TransformerEncoderLayer(**layer), num_encoder_layers,
                                                torch.nn.LayerNorm(d_model, **norm))
        if custom_decoder is None:
            custom_decoder = TransformerDecoder(TransformerDecoderLayer(**layer), num_decoder_layers,
                                                torch.nn.LayerNorm(d_model, **norm))
        super().__init__(d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout,
                         activation, custom_encoder, custom_decoder, layer_norm_eps, batch_first, norm_first, bias,
                         device, dtype)

    def forward(self, src: Tensor, tgt: Tensor, src_mask: Tensor | None = None, tgt_mask: Tensor | None = None,
                memory_mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None,
                tgt_key_padding_mask: Tensor | None = None, memory_key_padding_mask: Tensor | None = None,
                src_is_causal: bool | None = None, tgt_is_causal: bool | None = None,
                memory_is_causal: bool = False) -> Tensor:
        for name, x in (("src", src), ("tgt", tgt)):
            check_tensor(name, x)
            if x.shape[-1] != self.d_model:
                raise ShapeError(f"{name}: expected {self.d_model} features (d_model) in the last dim, "
                                 f"got shape {tuple(x.shape)}")
        if src.dim() != tgt.dim():
            raise ShapeError(f"tgt: expected {src.dim()} dims (as src {tuple(src.shape)}), got {tuple(tgt.shape)}")
        batch_dim = 0 if self.batch_first else 1
        if src.dim() == 3 and src.shape[batch_dim] != tgt.shape[batch_dim]:
            raise ShapeError(f"tgt: expected batch {src.shape[batch_dim]} (as src {tuple(src.shape)}), "
                             f"got shape {tuple(tgt.shape)}")
        return super().forward(src, tgt, src_mask, tgt_mask, memory_mask, src_key_padding_mask,
                               tgt_key_padding_mask, memory_key_padding_mask, src_is_causal, tgt_is_causal,
                               memory_is_causal)
