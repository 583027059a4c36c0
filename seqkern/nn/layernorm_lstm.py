"""seqkern.nn.LayerNormLSTM (and the machinery it shares with seqkern.nn.LayerNormGRU): multi-layer LayerNorm
recurrent layers with zoneout, variable lengths and resets, on the fused ops of seqkern.ops.layernorm_lstm/_gru.

Parameters per layer k and direction suffix s ("" or "_reverse"), in this order: weight_ih_l{k}{s},
weight_hh_l{k}{s}, bias_ih_l{k}{s}, bias_hh_l{k}{s} (as torch.nn.LSTM/GRU; the biases only with bias=True),
ln_ih_weight_l{k}{s}, ln_ih_bias_l{k}{s}, ln_hh_weight_l{k}{s}, ln_hh_bias_l{k}{s} (G*H) and, for the LSTM,
ln_cell_weight_l{k}{s}, ln_cell_bias_l{k}{s} (H). Weights and biases start as torch.nn's (uniform in
+-1/sqrt(H)), layer-norm weights at 1 and their biases at 0. The step equations are in
seqkern/reference/layernorm_lstm.py and layernorm_gru.py.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from seqkern._checks import DTypeError, ShapeError, check_size, check_tensor
from seqkern.nn import _recurrent
from seqkern.ops.layernorm_lstm import layernorm_lstm_layer


class LayerNormRecurrentBase(torch.nn.Module):
    """What LayerNormLSTM and LayerNormGRU share: constructor, parameters, input layouts and the layer loop.

    A subclass sets GATES, STATES (names of the hx entries), CELL_NORM (whether the cell state has its own
    LayerNorm) and implements `_run_layer(x, states, params, lengths, resets, zoneout, seed, reverse)`
    -> (output, final states) for one layer and direction."""

    GATES: int
    STATES: tuple[str, ...]
    CELL_NORM: bool
    mode: str

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 zoneout: float = 0.0, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            check_size(name, value)
        for name, value in (("dropout", dropout), ("zoneout", zoneout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"eps: expected a positive number, got {eps!r}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.bidirectional = bias, batch_first, bidirectional
        self.dropout, self.zoneout, self.eps = float(dropout), float(zoneout), float(eps)
        factory = {"device": device, "dtype": dtype}
        gates = self.GATES * hidden_size
        self._flat_weights_names: list[str] = []
        for layer in range(num_layers):
            for suffix in ("", "_reverse") if bidirectional else ("",):
                layer_input = input_size if layer == 0 else hidden_size * (2 if bidirectional else 1)
                shapes = [("weight_ih", (gates, layer_input)), ("weight_hh", (gates, hidden_size))]
                if bias:
                    shapes += [("bias_ih", (gates,)), ("bias_hh", (gates,))]
                shapes += [("ln_ih_weight", (gates,)), ("ln_ih_bias", (gates,)), ("ln_hh_weight", (gates,)),
                           ("ln_hh_bias", (gates,))]
                if self.CELL_NORM:
                    shapes += [("ln_cell_weight", (hidden_size,)), ("ln_cell_bias", (hidden_size,))]
                for base, shape in shapes:
                    name = f"{base}_l{layer}{suffix}"
                    self.register_parameter(name, torch.nn.Parameter(torch.empty(shape, **factory)))
                    self._flat_weights_names.append(name)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.startswith("ln_"):
                    param.fill_(1.0 if "_weight_" in name else 0.0)
                else:
                    param.uniform_(-bound, bound)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        for name, default in (("num_layers", 1), ("bias", True), ("batch_first", False), ("dropout", 0.0),
                              ("bidirectional", False), ("zoneout", 0.0), ("eps", 1e-5)):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        return s

    def forward(self, input: Tensor | PackedSequence, hx=None, lengths: Tensor | None = None,
                resets: Tensor | None = None):
        """input (T,B,I), (B,T,I) with batch_first, (T,I) unbatched, or a PackedSequence; hx as torch.nn's
        LSTM ((h_0, c_0)) or GRU (h_0), each (L*D, B, H); lengths (B,) int (not with a PackedSequence):
        as running on pack_padded_sequence(input, lengths, enforce_sorted=False), padded back; resets bool
        (B,T) with batch_first else (T,B) (unidirectional only): where True the state entering that step is
        the initial one again. -> (output, h_n) or (output, (h_n, c_n)) in the caller's layout."""
        x, layout = _recurrent.to_time_major(self, input)
        seq_len, batch = x.shape[0], x.shape[1]
        if layout.packed is not None:
            if lengths is not None:
                raise ValueError("lengths: not accepted with a PackedSequence input (it carries its lengths)")
            lengths = layout.lengths
        else:
            lengths = self._check_lengths(lengths, seq_len, batch, layout.batched, x.device)
        resets = self._check_resets(resets, seq_len, batch, layout.batched, x.device)
        self._check_hx_kind(hx)
        names = ("hx",) if len(self.STATES) == 1 else tuple(f"hx[{i}]" for i in range(len(self.STATES)))
        states = _recurrent.initial_states(self, hx, names, (self.hidden_size,) * len(self.STATES), batch, x, layout)
        output, finals = self._run_stack(x, states, lengths, resets)
        finals = _recurrent.final_states(finals, layout)
        return _recurrent.from_time_major(output, layout), (finals[0] if len(finals) == 1 else tuple(finals))

    def _run_stack(self, x: Tensor, states: Sequence[Tensor], lengths, resets) -> tuple[Tensor, list[Tensor]]:
        directions = 2 if self.bidirectional else 1
        per_direction = len(self._flat_weights_names) // (self.num_layers * directions)
        finals = []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                index = layer * directions + direction
                names = self._flat_weights_names[index * per_direction:(index + 1) * per_direction]
                weights = [_recurrent.parameter(self, name) for name in names]
                weights = _recurrent.in_input_dtype(weights, x, weights[0])  # under torch.autocast
                params = {name.rsplit("_l", 1)[0]: weight for name, weight in zip(names, weights)}
                seed = None
                if self.training and self.zoneout > 0:  # one draw per layer and direction from torch's generator
                    seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=x.device)
                output, final = self._run_layer(x, tuple(s[index] for s in states), params, lengths, resets,
                                                self.zoneout, seed, direction == 1)
                outputs.append(output)
                finals.append(final)
            x = torch.cat(outputs, dim=-1) if directions == 2 else outputs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        return x, [torch.stack(parts) for parts in zip(*finals)]

    def _check_hx_kind(self, hx) -> None:
        if hx is None:
            return
        if len(self.STATES) > 1 and isinstance(hx, Tensor):
            raise ShapeError(f"hx: expected a tuple (h_0, c_0) for a {self.mode}, got a single tensor")
        if len(self.STATES) == 1 and not isinstance(hx, Tensor):
            raise ShapeError(f"hx: expected a single tensor for a {self.mode}, got {type(hx).__name__}")

    def _check_lengths(self, lengths, seq_len: int, batch: int, batched: bool, device) -> Tensor | None:
        """(B,) integer lengths in [1, T] ((), unbatched) -> int64 (B,) on the CPU (the kernels read them there)."""
        if lengths is None:
            return None
        lengths = check_tensor("lengths", lengths)
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise DTypeError(f"lengths: expected an integer tensor, got dtype {lengths.dtype}")
        expected = (batch,) if batched else ()
        if tuple(lengths.shape) != expected:
            raise ShapeError(f"lengths: expected shape {expected}, got {tuple(lengths.shape)}")
        lengths = lengths.reshape(batch).to(device=device, dtype=torch.int64)
        if not torch.compiler.is_compiling() and batch and bool(((lengths < 1) | (lengths > seq_len)).any()):
            raise ShapeError(f"lengths: expected values in [1, {seq_len}] (the sequence length), got {lengths.tolist()}")
        return lengths

    def _check_resets(self, resets, seq_len: int, batch: int, batched: bool, device) -> Tensor | None:
        """bool (B,T) with batch_first else (T,B) ((T,), unbatched) -> (T,B) bool."""
        if resets is None:
            return None
        resets = check_tensor("resets", resets)
        if self.bidirectional:
            raise ValueError("resets: not supported by a bidirectional layer (the reverse direction has no "
                             "episode start to reset at)")
        if resets.dtype != torch.bool:
            raise DTypeError(f"resets: expected a bool tensor, got dtype {resets.dtype}")
        if not batched:
            expected = (seq_len,)
        else:
            expected = (batch, seq_len) if self.batch_first else (seq_len, batch)
        if tuple(resets.shape) != expected:
            raise ShapeError(f"resets: expected shape {expected}, got {tuple(resets.shape)}")
        if resets.device != device:
            raise DTypeError(f"resets: expected a tensor on {device} (as input), got one on {resets.device}")
        if not batched:
            return resets.reshape(seq_len, 1)
        return (resets.t() if self.batch_first else resets).contiguous()


class LayerNormLSTM(LayerNormRecurrentBase):
    """Multi-layer LayerNorm LSTM with zoneout, lengths and resets (issue 16):
        gates = LN(x W_ih^T) + LN(h W_hh^T) + b_ih + b_hh,  i, f, g, o = gates (torch.nn's order)
        c' = sigmoid(f) c + sigmoid(i) tanh(g),   h' = sigmoid(o) tanh(LN(c'))
    forward(input, hx=None, lengths=None, resets=None) -> output, (h_n, c_n), as torch.nn.LSTM."""

    GATES, STATES, CELL_NORM, mode = 4, ("h", "c"), True, "LayerNormLSTM"

    def _run_layer(self, x, states, p, lengths, resets, zoneout, seed, reverse):
        output, h_n, c_n = layernorm_lstm_layer(
            x, states[0], states[1], p["weight_ih"], p["weight_hh"], p.get("bias_ih"), p.get("bias_hh"),
            p["ln_ih_weight"], p["ln_ih_bias"], p["ln_hh_weight"], p["ln_hh_bias"], p["ln_cell_weight"],
            p["ln_cell_bias"], self.eps, lengths, resets, zoneout, seed, reverse)
        return output, (h_n, c_n)
