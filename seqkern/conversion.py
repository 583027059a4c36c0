"""`seqkern.convert(model)`: turn the sequence layers of an existing model into seqkern's drop-ins.

    model, report = seqkern.convert(model)          # a converted copy; inplace=True converts `model` itself
    print(report)                                   # what was replaced, what was left alone and why

Every torch.nn.LSTM, GRU, RNN, LSTMCell, GRUCell, RNNCell, MultiheadAttention, TransformerEncoderLayer,
TransformerDecoderLayer, TransformerEncoder, TransformerDecoder and Transformer found in the module tree (the exact
class) is converted where it stands: the module object takes its seqkern.nn counterpart as its class and keeps
everything else it holds. Its Parameters and buffers stay the same objects (weights tied between modules stay tied;
an optimizer built on the model before `convert(model, inplace=True)` goes on updating the converted model), and so
do its child modules (a user's module put in a layer's place, hooks on a child), its hooks, training mode,
requires_grad flags and every attribute a user may have changed after construction (a LayerNorm's eps, a dropout
rate, TransformerEncoder.use_nested_tensor). The seqkern.nn classes have torch.nn's layouts (their constructors
are torch.nn's, see seqkern/nn); the attributes a seqkern constructor adds beyond torch.nn's (`_ADDED_ATTRIBUTES`,
checked against the constructors by tests/test_convert.py) are set to the values that keep torch.nn's behaviour.

Rebuilding each module from its hyper-parameters and copying its state_dict (what convert did until round 15) lost
all of that silently: copies of tied weights drifted apart in training, an optimizer kept stepping the old tensors,
hooks on children and attributes outside the state_dict went back to their defaults, and a user's subclass inside a
layer was replaced.

Left alone, with the reason in the report:
  * subclasses of those torch.nn classes, wherever they sit (user code may override forward; their children are
    still converted);
  * modules with parametrized weights (torch.nn.utils.parametrize: the weights are computed, not stored);
  * every other module type (no seqkern drop-in), counted per type when it is a leaf.
"""
from __future__ import annotations

import copy
from collections import Counter
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


# The torch.nn class -> its seqkern.nn drop-in.
TARGETS: dict[type[nn.Module], type[nn.Module]] = {
    nn.LSTM: sk.LSTM, nn.GRU: sk.GRU, nn.RNN: sk.RNN,
    nn.LSTMCell: sk.LSTMCell, nn.GRUCell: sk.GRUCell, nn.RNNCell: sk.RNNCell,
    nn.MultiheadAttention: sk.MultiheadAttention,
    nn.TransformerEncoderLayer: sk.TransformerEncoderLayer, nn.TransformerDecoderLayer: sk.TransformerDecoderLayer,
    nn.TransformerEncoder: sk.TransformerEncoder, nn.TransformerDecoder: sk.TransformerDecoder,
    nn.Transformer: sk.Transformer,
}
SUPPORTED = tuple(TARGETS)
_SEQKERN_CLASSES = frozenset(TARGETS.values())

# Attributes a seqkern.nn constructor sets that torch.nn's does not, with the value that keeps torch.nn's
# behaviour (zoneout off).
_ADDED_ATTRIBUTES: dict[type[nn.Module], dict[str, object]] = {sk.LSTM: {"zoneout": 0.0}, sk.GRU: {"zoneout": 0.0}}


def _refusal(module: nn.Module) -> str | None:
    """Why a module of (or derived from) a supported class is left alone; None: no objection (or not ours)."""
    if type(module) in _SEQKERN_CLASSES:
        return "already a seqkern.nn module"
    base = next((cls for cls in SUPPORTED if isinstance(module, cls)), None)
    if base is None:
        return None
    # Checked first: parametrize swaps the module's class for a generated subclass.
    if parametrize.is_parametrized(module):
        return "its weights are parametrized (torch.nn.utils.parametrize): they are computed, not stored"
    if type(module) is not base:
        return f"a subclass of torch.nn.{base.__name__} (it may override forward; its children are converted)"
    return None


def _convert_in_place(module: nn.Module, target: type[nn.Module]) -> None:
    """`module` becomes a `target` holding everything it held (see the module docstring)."""
    module.__class__ = target
    for name, value in _ADDED_ATTRIBUTES.get(target, {}).items():
        if name not in module.__dict__:
            setattr(module, name, value)


class _Converter:
    def __init__(self) -> None:
        self.report = ConversionReport()
        self.seen: set[int] = set()   # ids of the modules visited (a shared module is converted once)

    def visit(self, module: nn.Module, path: str) -> None:
        if id(module) in self.seen:
            return
        self.seen.add(id(module))
        kind = type(module)
        reason = _refusal(module)
        if reason is not None:
            self.report.left_alone.append(LeftAlone(path, kind.__qualname__, reason))
        elif kind in TARGETS:
            _convert_in_place(module, TARGETS[kind])
            self.report.replaced.append(Replacement(path, f"torch.nn.{kind.__name__}", f"seqkern.nn.{kind.__name__}"))
        elif not module._modules:
            self.report.other_modules[kind.__name__] += 1
        for name, child in module._modules.items():  # not named_children(): it skips repeated modules
            if child is not None:
                self.visit(child, f"{path}.{name}" if path else name)


def convert(model: nn.Module, inplace: bool = False) -> tuple[nn.Module, ConversionReport]:
    """Convert every supported torch.nn sequence layer in `model` to its seqkern.nn drop-in (module docstring).

    -> (the converted model: `model` itself when inplace, else a converted deep copy; the report).
    The converted model's outputs and gradients match the original's within seqkern's correctness rule.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    converter = _Converter()
    converter.visit(model, "")
    return model, converter.report


__all__ = ["convert", "ConversionReport", "Replacement", "LeftAlone", "SUPPORTED"]
