"""`seqkern.convert(model)`: swap the sequence layers of an existing model for seqkern's drop-ins.

    model, report = seqkern.convert(model)          # a converted copy; inplace=True converts `model` itself
    print(report)                                   # what was replaced, what was left alone and why

Every torch.nn.LSTM, GRU, RNN, LSTMCell, GRUCell, RNNCell, MultiheadAttention, TransformerEncoderLayer,
TransformerDecoderLayer, TransformerEncoder, TransformerDecoder and Transformer found in the module tree is
rebuilt as its seqkern.nn counterpart from the module's own hyper-parameters, on its device and dtype, then given
its weights through load_state_dict (strict: the state_dicts are identical by design), its training mode, the
requires_grad flag of every parameter, and its hooks. A module shared by several parents is converted once and
stays shared.

Left alone, with the reason in the report:
  * subclasses of those torch.nn classes (user code may override forward; their children are still converted);
  * modules with parametrized weights (torch.nn.utils.parametrize: the weights are computed, not stored);
  * any module whose rebuild or weights do not carry over (the error is the reason);
  * every other leaf module type (no seqkern drop-in), counted per type.
"""
from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn
from torch.nn.utils import parametrize

import seqkern.nn as sk


@dataclass
class Replacement:
    path: str          # dotted name in the model ("" for the model itself)
    source: str        # e.g. "torch.nn.LSTM"
    target: str        # e.g. "seqkern.nn.LSTM"


@dataclass
class LeftAlone:
    path: str
    kind: str          # the module's class name
    reason: str


@dataclass
class ConversionReport:
    """What `convert` replaced, what it left alone (and why), and how many leaf modules of other types it
    passed over (they have no seqkern counterpart: Linear, Embedding, LayerNorm, ...)."""

    replaced: list[Replacement] = field(default_factory=list)
    left_alone: list[LeftAlone] = field(default_factory=list)
    other_modules: Counter = field(default_factory=Counter)

    def __str__(self) -> str:
        lines = [f"seqkern.convert: replaced {len(self.replaced)} module(s), left {len(self.left_alone)} alone"]
        lines += [f"  replaced   {r.path or '<model>'}: {r.source} -> {r.target}" for r in self.replaced]
        lines += [f"  left alone {r.path or '<model>'} ({r.kind}): {r.reason}" for r in self.left_alone]
        if self.other_modules:
            counts = ", ".join(f"{name} x{n}" for name, n in sorted(self.other_modules.items()))
            lines.append(f"  no seqkern counterpart (unchanged): {counts}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# How to rebuild each supported module: torch.nn class -> (seqkern.nn class name, its constructor arguments).
# ------------------------------------------------------------------------------------------------------------
def _factory(module: nn.Module) -> dict:
    """device and dtype of the module's parameters (every torch.nn constructor takes them)."""
    param = next(module.parameters(), None)
    return {} if param is None else {"device": param.device, "dtype": param.dtype}


def _rnn_args(m: nn.RNNBase) -> dict:
    args = dict(input_size=m.input_size, hidden_size=m.hidden_size, num_layers=m.num_layers, bias=m.bias,
                batch_first=m.batch_first, dropout=float(m.dropout), bidirectional=m.bidirectional)
    if isinstance(m, nn.LSTM):
        args["proj_size"] = m.proj_size
    if isinstance(m, nn.RNN):
        args["nonlinearity"] = m.nonlinearity
    return args


def _cell_args(m: nn.RNNCellBase) -> dict:
    args = dict(input_size=m.input_size, hidden_size=m.hidden_size, bias=m.bias)
    if isinstance(m, nn.RNNCell):
        args["nonlinearity"] = m.nonlinearity
    return args


def _mha_args(m: nn.MultiheadAttention) -> dict:
    return dict(embed_dim=m.embed_dim, num_heads=m.num_heads, dropout=m.dropout, bias=m.out_proj.bias is not None,
                add_bias_kv=m.bias_k is not None, add_zero_attn=m.add_zero_attn, kdim=m.kdim, vdim=m.vdim,
                batch_first=m.batch_first)


def _layer_args(m: nn.TransformerEncoderLayer | nn.TransformerDecoderLayer) -> dict:
    return dict(d_model=m.linear1.in_features, nhead=m.self_attn.num_heads, dim_feedforward=m.linear1.out_features,
                dropout=m.dropout.p, activation=m.activation, layer_norm_eps=m.norm1.eps,
                batch_first=m.self_attn.batch_first, norm_first=m.norm_first, bias=m.linear1.bias is not None)


def _stack_args(m: nn.TransformerEncoder | nn.TransformerDecoder, convert_child: Callable) -> dict:
    """A stack is rebuilt around its already converted layers (heterogeneous stacks stay as they are)."""
    layers = nn.ModuleList(convert_child(layer, f"layers.{i}") for i, layer in enumerate(m.layers))
    args = {"norm": None if m.norm is None else convert_child(m.norm, "norm"), "_layers": layers}
    if isinstance(m, nn.TransformerEncoder):
        args.update(enable_nested_tensor=m.enable_nested_tensor, mask_check=m.mask_check)
    return args


def _transformer_args(m: nn.Transformer, convert_child: Callable) -> dict:
    return dict(d_model=m.d_model, nhead=m.nhead, batch_first=m.batch_first,
                custom_encoder=convert_child(m.encoder, "encoder"), custom_decoder=convert_child(m.decoder, "decoder"))


_SIMPLE = {
    nn.LSTM: ("LSTM", _rnn_args), nn.GRU: ("GRU", _rnn_args), nn.RNN: ("RNN", _rnn_args),
    nn.LSTMCell: ("LSTMCell", _cell_args), nn.GRUCell: ("GRUCell", _cell_args), nn.RNNCell: ("RNNCell", _cell_args),
    nn.MultiheadAttention: ("MultiheadAttention", _mha_args),
    nn.TransformerEncoderLayer: ("TransformerEncoderLayer", _layer_args),
    nn.TransformerDecoderLayer: ("TransformerDecoderLayer", _layer_args),
}
_CONTAINERS = {
    nn.TransformerEncoder: ("TransformerEncoder", _stack_args),
    nn.TransformerDecoder: ("TransformerDecoder", _stack_args),
    nn.Transformer: ("Transformer", _transformer_args),
}
SUPPORTED = tuple(_SIMPLE) + tuple(_CONTAINERS)


def _build_stack(cls: type, args: dict) -> nn.Module:
    """seqkern.nn.TransformerEncoder/Decoder holding exactly `layers` (the constructor would clone one layer)."""
    layers = args.pop("_layers")
    if not len(layers):
        raise ValueError("an empty stack has nothing to convert")
    stack = cls(layers[0], num_layers=0, **args)  # num_layers=0: no clones of the first layer
    stack.layers = layers
    stack.num_layers = len(layers)
    return stack


# ------------------------------------------------------------------------------------------------------------
class _Converter:
    def __init__(self) -> None:
        self.report = ConversionReport()
        self.done: dict[int, nn.Module] = {}   # id(original) -> its replacement (shared modules stay shared)

    def module(self, module: nn.Module, path: str) -> nn.Module:
        """The replacement of `module` (itself, with converted children, when it has none)."""
        if id(module) in self.done:
            return self.done[id(module)]
        kind = type(module)
        supported = kind in _SIMPLE or kind in _CONTAINERS
        reason = self._refusal(module, supported)
        if supported and reason is None:
            try:
                result = self._rebuild(module, path)
            except (RuntimeError, ValueError, TypeError) as error:
                reason = f"could not be rebuilt: {error}"
            else:
                self.done[id(module)] = result
                self.report.replaced.append(Replacement(path, f"torch.nn.{kind.__name__}", f"seqkern.nn.{kind.__name__}"))
                return result
        if reason is not None:
            self.report.left_alone.append(LeftAlone(path, kind.__qualname__, reason))
        elif not list(module.children()):
            self.report.other_modules[kind.__name__] += 1
        self._children(module, path)
        self.done[id(module)] = module
        return module

    @staticmethod
    def _refusal(module: nn.Module, supported: bool) -> str | None:
        """Why a module of (or derived from) a supported class is not replaced; None: no objection."""
        base = next((cls for cls in SUPPORTED if isinstance(module, cls)), None)
        if base is None:
            return None
        # Checked first: parametrize swaps the module's class for a generated subclass.
        if parametrize.is_parametrized(module):
            return "its weights are parametrized (torch.nn.utils.parametrize): they are computed, not stored"
        if not supported:
            return f"a subclass of torch.nn.{base.__name__} (it may override forward; its children are converted)"
        return None

    def _children(self, module: nn.Module, path: str) -> None:
        for name, child in list(module._modules.items()):  # not named_children(): it skips repeated modules
            if child is None:
                continue
            converted = self.module(child, f"{path}.{name}" if path else name)
            if converted is not child:
                setattr(module, name, converted)

    def _rebuild(self, module: nn.Module, path: str) -> nn.Module:
        kind = type(module)
        if kind in _SIMPLE:
            name, arguments = _SIMPLE[kind]
            replacement = getattr(sk, name)(**arguments(module), **_factory(module))
        else:
            name, arguments = _CONTAINERS[kind]
            args = arguments(module, lambda child, name: self.module(child, f"{path}.{name}" if path else name))
            cls = getattr(sk, name)
            replacement = _build_stack(cls, args) if "_layers" in args else cls(**args, **_factory(module))
        replacement.load_state_dict(module.state_dict(), strict=True)
        _carry_over(module, replacement)
        return replacement


def _carry_over(old: nn.Module, new: nn.Module) -> None:
    """Training mode, requires_grad flags and hooks of `old` onto its replacement."""
    new.train(old.training)
    new_params = dict(new.named_parameters())
    for name, param in old.named_parameters():
        new_params[name].requires_grad_(param.requires_grad)
    for attribute in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                      "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
                      "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks"):
        getattr(new, attribute).update(getattr(old, attribute))


def convert(model: nn.Module, inplace: bool = False) -> tuple[nn.Module, ConversionReport]:
    """Replace every supported torch.nn sequence layer in `model` by its seqkern.nn drop-in (module docstring).

    -> (the converted model: `model` itself when inplace, else a converted deep copy; the report).
    The converted model's outputs and gradients match the original's within seqkern's correctness rule.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    converter = _Converter()
    return converter.module(model, ""), converter.report


__all__ = ["convert", "ConversionReport", "Replacement", "LeftAlone", "SUPPORTED"]
