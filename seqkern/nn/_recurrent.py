"""The plumbing every recurrent drop-in shares, written once: input layouts (batch_first, unbatched,
PackedSequence), argument checks, and the layer/direction loop with dropout between layers.

A recurrent layer is described by its per-layer-direction step, `run_direction(x, state, weights,
batch_sizes, reverse, **flags) -> (output, final_state)`, where `state` is a tuple of (B, size) tensors (LSTM:
(h, c); GRU and Elman RNN: (h,)) and `weights` the module's parameters of that layer and direction, in
torch.nn's order. `flags` is empty unless the call uses lengths, resets or zoneout: then it holds lengths
(B,) int64, resets (T,B) bool and (LSTM, GRU) zoneout and that layer-direction's zoneout_seed, the keyword
arguments of seqkern.ops.lstm_layer / gru_layer / rnn_layer. Everything here works on time-major
(T, B, features) tensors.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from seqkern._checks import (
    DTypeError, ShapeError, check_floating, check_matches, check_ndim, check_shape, check_tensor,
)
from seqkern.ops.flash_attention import dropout_seed

State = tuple[Tensor, ...]
DirectionFn = Callable[[Tensor, State, Sequence[Tensor], "Tensor | None", bool], tuple[Tensor, State]]


@dataclass
class SequenceLayout:
    """How the caller's input was laid out, to give the output back in the same layout."""

    batched: bool
    batch_first: bool
    packed: PackedSequence | None = None
    lengths: Tensor | None = None

    @property
    def batch_sizes(self) -> Tensor | None:
        return None if self.packed is None else self.packed.batch_sizes


def autocast_dtype(weight: Tensor) -> torch.dtype | None:
    """The dtype a module whose parameters are like `weight` runs in under torch.autocast on their device: autocast's
    lower-precision dtype for a float32 module (inputs, states and weights cast per call, as autocast casts a
    Linear's, so the bf16 kernels run and return bf16, as torch.nn.LSTM and RNN do there), None otherwise (autocast
    off, or a float64 / bf16 module: autocast leaves those dtypes alone)."""
    if weight.dtype != torch.float32 or not torch.is_autocast_enabled(weight.device.type):
        return None
    dtype = torch.get_autocast_dtype(weight.device.type)
    return None if dtype == torch.float32 else dtype


def cast_floating(value, dtype: torch.dtype | None):
    """A tensor, a PackedSequence or a sequence of tensors with its floating tensors in `dtype` (None: as it is)."""
    if dtype is None or value is None:
        return value
    if isinstance(value, PackedSequence):
        return PackedSequence(cast_floating(value.data, dtype), value.batch_sizes, value.sorted_indices,
                              value.unsorted_indices)
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(cast_floating(v, dtype) for v in value)
    return value


def in_input_dtype(value, x: Tensor, weight: Tensor):
    """`value` (a tensor or a sequence of them: a call's states, a layer's weights) with its floating tensors in the
    dtype of the checked input x where autocast made it differ from the module's (`weight`'s; autocast_dtype), else
    as it is (a wrong dtype is then the caller's, for the checks to report)."""
    return value if x.dtype == weight.dtype else cast_floating(value, x.dtype)


def to_time_major(module: torch.nn.Module, input: Tensor | PackedSequence) -> tuple[Tensor, SequenceLayout]:
    """Checks `input` against the module and returns it as a (T, B, input_size) tensor and its layout, in the
    module's dtype (under torch.autocast in autocast_dtype's: the call's states and weights then follow it,
    in_input_dtype).

    A PackedSequence is padded in its sorted order (batch_sizes then marks the active rows per step).
    """
    weight = module.weight_ih_l0
    dtype = autocast_dtype(weight)
    input = cast_floating(input, dtype)
    if isinstance(input, PackedSequence):
        _check_input_tensor(module, input.data, weight, allowed_ndim=(2,), dtype=dtype)
        layout = SequenceLayout(batched=True, batch_first=False, packed=input)
        padded, lengths = pad_packed_sequence(PackedSequence(input.data, input.batch_sizes))
        layout.lengths = lengths
        return padded, layout
    input = check_tensor("input", input)
    _check_input_tensor(module, input, weight, allowed_ndim=(2, 3), dtype=dtype)
    layout = SequenceLayout(batched=input.dim() == 3, batch_first=module.batch_first)
    if not layout.batched:
        input = input.unsqueeze(1)
    elif module.batch_first:
        input = input.transpose(0, 1)
    if input.shape[0] == 0:
        raise ShapeError("input: expected a sequence length larger than 0, got an empty sequence")
    return input, layout


class InputDTypeError(DTypeError, ValueError):
    """The input's dtype is not the parameters': torch.nn.LSTM/GRU/RNN raise ValueError for it, so the error is a
    ValueError as well as seqkern's DTypeError (TypeError, RuntimeError)."""


def _check_input_tensor(module: torch.nn.Module, input: Tensor, weight: Tensor, allowed_ndim,
                        dtype: torch.dtype | None = None) -> None:
    check_floating("input", input)
    check_ndim("input", input, allowed_ndim)
    if input.shape[-1] != module.input_size:
        raise ShapeError(
            f"input: expected the last dimension to be input_size={module.input_size}, got shape {tuple(input.shape)}"
        )
    dtype = dtype or weight.dtype
    if input.device == weight.device and input.dtype != dtype:
        raise InputDTypeError(f"input: expected dtype {dtype} (as the module's parameters), got {input.dtype}")
    check_matches("input", input, dtype, weight.device, "the module's parameters")


def from_time_major(output: Tensor, layout: SequenceLayout) -> Tensor | PackedSequence:
    """(T, B, F) output -> the caller's layout (PackedSequence, batch_first, or unbatched)."""
    if layout.packed is not None:
        data = pack_padded_sequence(output, layout.lengths, enforce_sorted=True).data
        packed = layout.packed
        return PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
    if not layout.batched:
        return output.squeeze(1)
    return output.transpose(0, 1) if layout.batch_first else output


def initial_states(
    module: torch.nn.Module, hx: Tensor | Sequence[Tensor] | None, names: Sequence[str],
    sizes: Sequence[int], batch: int, like: Tensor, layout: SequenceLayout,
) -> list[Tensor]:
    """Checks the caller's initial states and returns them as (num_layers * num_directions, B, size) tensors.

    `names` are the argument names in messages ("hx" or "hx[0]", "hx[1]"), `sizes` the state widths.
    """
    stacked = module.num_layers * (2 if module.bidirectional else 1)
    if hx is None:
        return [like.new_zeros(stacked, batch, size) for size in sizes]
    hx = in_input_dtype(hx, like, module.weight_ih_l0)
    given = [hx] if isinstance(hx, Tensor) else list(hx)
    if len(given) != len(names):
        raise ShapeError(f"hx: expected {len(names)} tensor(s) ({', '.join(names)}), got {len(given)}")
    states = []
    for name, size, state in zip(names, sizes, given):
        state = check_tensor(name, state)
        check_floating(name, state)
        expected = (stacked, batch, size) if layout.batched else (stacked, size)
        check_shape(name, state, expected)
        check_matches(name, state, like.dtype, like.device, "input")
        state = state if layout.batched else state.unsqueeze(1)
        if layout.packed is not None and layout.packed.sorted_indices is not None:
            state = state.index_select(1, layout.packed.sorted_indices)
        states.append(state)
    return states


def final_states(states: Sequence[Tensor], layout: SequenceLayout) -> list[Tensor]:
    """(L*D, B, size) final states in the caller's batch order (and unbatched if the input was)."""
    if layout.packed is not None and layout.packed.unsorted_indices is not None:
        states = [s.index_select(1, layout.packed.unsorted_indices) for s in states]
    return [s if layout.batched else s.squeeze(1) for s in states]


def cell_input(module: torch.nn.Module, input: Tensor) -> tuple[Tensor, bool]:
    """Checks a cell's input (B, input_size) or (input_size,); returns it as (B, input_size) and whether it was batched."""
    input = check_tensor("input", input)
    check_floating("input", input)
    check_ndim("input", input, (1, 2))
    if input.shape[-1] != module.input_size:
        raise ShapeError(
            f"input: expected the last dimension to be input_size={module.input_size}, got shape {tuple(input.shape)}"
        )
    weight = parameter(module, "weight_ih")
    dtype = autocast_dtype(weight)
    input = cast_floating(input, dtype)
    check_matches("input", input, dtype or weight.dtype, weight.device, "the module's parameters")
    batched = input.dim() == 2
    return (input if batched else input.unsqueeze(0)), batched


def cell_gates(module: torch.nn.Module, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """A cell's x W_ih^T, h W_hh^T and its biases (bias_ih, bias_hh or None) for its fused step, in the dtype of its
    checked input x: the weights are cast per call where autocast made x's dtype differ from the module's (under
    autocast the products alone came out in its dtype beside states in the module's, and the fused step refused
    them: "gates_x must have dtype Float, got BFloat16")."""
    weights = tuple(parameter(module, name) for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
    w_ih, w_hh, b_ih, b_hh = in_input_dtype(weights, x, weights[0])
    return F.linear(x, w_ih), F.linear(h, w_hh), b_ih, b_hh


def cell_states(
    module: torch.nn.Module, hx: Tensor | Sequence[Tensor] | None, names: Sequence[str], x: Tensor, batched: bool
) -> list[Tensor]:
    """Checks a cell's states (each (B, hidden) or (hidden,) as the input); returns them as (B, hidden), zeros if None."""
    if hx is None:
        zeros = x.new_zeros(x.shape[0], module.hidden_size)
        return [zeros] * len(names)
    given = [hx] if isinstance(hx, Tensor) else list(hx)
    if len(given) != len(names) or (len(names) > 1 and isinstance(hx, Tensor)):
        raise ShapeError(f"hx: expected {'a tuple (' + ', '.join(names) + ')' if len(names) > 1 else 'a tensor'}")
    weight = parameter(module, "weight_ih")
    states = []
    for name, state in zip(names, given):
        state = in_input_dtype(check_tensor(name, state), x, weight)
        check_floating(name, state)
        check_shape(name, state, (x.shape[0], module.hidden_size) if batched else (module.hidden_size,))
        check_matches(name, state, x.dtype, x.device, "input")
        states.append(state if batched else state.unsqueeze(0))
    return states


def forward(module: torch.nn.RNNBase, input: Tensor | PackedSequence, hx, state_sizes: Sequence[int],
            run_direction: DirectionFn, lengths=None, resets: Tensor | None = None, zoneout: float | None = None):
    """The whole forward of a recurrent layer, as torch.nn's: `state_sizes` has one width per state
    (LSTM: (proj_size or hidden, hidden); GRU, RNN: (hidden,)). lengths, resets: as the modules' forward;
    zoneout: the module's (None for a layer that has none, the RNN).

    -> (output, h_n) for a one-state layer, (output, (h_n, c_n)) for the LSTM, in the caller's layout.
    """
    plain = plain_call(module, input, hx, state_sizes) if lengths is None and resets is None and not zoneout else None
    if plain is not None:
        x, states = plain
        layout, flags = SequenceLayout(batched=True, batch_first=module.batch_first), NO_STATE_FLAGS
    else:
        x, layout = to_time_major(module, input)
        _check_hx_kind(module, hx, len(state_sizes))
        names = ("hx",) if len(state_sizes) == 1 else tuple(f"hx[{i}]" for i in range(len(state_sizes)))
        states = initial_states(module, hx, names, state_sizes, x.shape[1], x, layout)
        flags = StateFlags(
            check_lengths(lengths, x, layout), check_resets(module, resets, x, layout), zoneout,
            training=module.training,
        )
    output, finals = run_stack(module, x, states, run_direction, layout.batch_sizes, flags)
    finals = final_states(finals, layout)
    return from_time_major(output, layout), (finals[0] if len(finals) == 1 else tuple(finals))


def plain_call(module: torch.nn.RNNBase, input, hx, state_sizes: Sequence[int]) -> tuple[Tensor, list[Tensor]] | None:
    """(x (T,B,I), initial states [(L*D, B, size)]) of a plain call, or None for any other: a batched tensor
    (T,B,I) ((B,T,I) with batch_first) of at least one step in the dtype and on the device of the module's
    parameters, hx None or tensors of exactly the expected shapes, dtype and device, autocast off (the caller
    passes no lengths, resets or zoneout). Such a call needs none of forward's conversions and its checks reduce
    to these comparisons; any other call, a wrong one included, takes forward's general path, which converts or
    reports. Both paths then share forward's tail: run_stack and the layout back (the same results, bit for bit).
    A one-step GRU(64) call at batch 1 spent ~13 us of its ~43 us in the general path's layout and argument handling
    (2026-12-07, Intel Xeon model 167)."""
    weight = module._parameters.get("weight_ih_l0")
    if (type(input) is not Tensor or weight is None or input.dim() != 3 or input.dtype != weight.dtype
            or input.device != weight.device or input.shape[-1] != module.input_size
            or torch.is_autocast_enabled(input.device.type)):
        return None
    x = input.transpose(0, 1) if module.batch_first else input
    if x.shape[0] == 0:
        return None
    stacked, batch = module.num_layers * (2 if module.bidirectional else 1), x.shape[1]
    if hx is None:
        return x, [x.new_zeros(stacked, batch, size) for size in state_sizes]
    if len(state_sizes) == 1:  # one tensor; the LSTM's (h_0, c_0) as a tuple or list
        given = [hx] if type(hx) is Tensor else None
    else:
        given = hx if isinstance(hx, (tuple, list)) and len(hx) == len(state_sizes) else None
    if given is None:
        return None
    for state, size in zip(given, state_sizes):
        if (type(state) is not Tensor or state.shape != (stacked, batch, size) or state.dtype != x.dtype
                or state.device != x.device):
            return None
    return x, list(given)


def _check_hx_kind(module: torch.nn.RNNBase, hx, num_states: int) -> None:
    """An LSTM takes hx as a tuple (h_0, c_0), the other layers as one tensor."""
    if hx is None:
        return
    if num_states > 1 and isinstance(hx, Tensor):
        raise ShapeError("hx: expected a tuple (h_0, c_0) for an LSTM, got a single tensor")
    if num_states == 1 and not isinstance(hx, Tensor):
        raise ShapeError(f"hx: expected a single tensor for a {module.mode}, got {type(hx).__name__}")


def split_weights(weights: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """One layer-direction's parameters in torch.nn's order, w_ih, w_hh[, b_ih, b_hh][, w_hr]
    -> (w_ih, w_hh, b_ih, b_hh, w_hr), None where the layer has none."""
    w_ih, w_hh, *rest = weights
    b_ih, b_hh = (rest[0], rest[1]) if len(rest) >= 2 else (None, None)
    w_hr = rest[-1] if len(rest) in (1, 3) else None
    return w_ih, w_hh, b_ih, b_hh, w_hr


@dataclass
class StateFlags:
    """lengths (B,) int64 and resets (T,B) bool (checked, time-major, on the input's device) or None, and the
    module's zoneout (None: the layer has none). In training a zoneout > 0 draws one seed per layer and
    direction from torch's generator for the input's device (torch.manual_seed reproduces the masks); in
    evaluation the kernels blend (seqkern/ops/_schemas.py)."""

    lengths: Tensor | None = None
    resets: Tensor | None = None
    zoneout: float | None = None
    training: bool = False

    def for_direction(self, device: torch.device) -> dict:
        """The keyword arguments of one layer-direction's call: empty when nothing is used (the plain op
        call, and ONNX export's direction functions, which take none)."""
        zoneout = self.zoneout or 0.0
        if self.lengths is None and self.resets is None and zoneout == 0.0:
            return {}
        flags = dict(lengths=self.lengths, resets=self.resets)
        if self.zoneout is not None:
            flags.update(zoneout=zoneout, zoneout_seed=dropout_seed(zoneout, device) if self.training else None)
        return flags


# A call without lengths, resets or zoneout (forward's plain calls): read, never modified.
NO_STATE_FLAGS = StateFlags()


def check_zoneout(zoneout) -> float:
    """The constructor's zoneout: a probability in [0, 1]."""
    if isinstance(zoneout, bool) or not isinstance(zoneout, (int, float)) or not 0.0 <= zoneout <= 1.0:
        raise ShapeError(f"zoneout: expected a probability in [0, 1], got {zoneout!r}")
    return float(zoneout)


def check_lengths(lengths, x: Tensor, layout: SequenceLayout) -> Tensor | None:
    """The caller's lengths ((B,) integers in [0, T], a tensor on any device or a sequence of ints) -> (B,)
    int64 on the input's device, or None. The range is checked in eager mode only (a value check would
    break a compiled graph; the kernels check it there)."""
    if lengths is None:
        return None
    if layout.packed is not None:
        raise ShapeError("lengths: a PackedSequence carries its own lengths; pass lengths with a padded tensor")
    if not layout.batched:
        raise ShapeError("lengths: expected a batched input (T, B, input_size) or (B, T, input_size)")
    if not isinstance(lengths, Tensor):
        lengths = torch.as_tensor(lengths)
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise DTypeError(f"lengths: expected an integer tensor, got dtype {lengths.dtype}")
    seq_len, batch = x.shape[0], x.shape[1]
    check_shape("lengths", lengths, (batch,))
    lengths = lengths.to(device=x.device, dtype=torch.int64)
    if not torch.compiler.is_compiling() and batch and not bool(((lengths >= 0) & (lengths <= seq_len)).all()):
        raise ShapeError(f"lengths: expected values in [0, {seq_len}] (the input's length), got {lengths.tolist()}")
    return lengths


def check_resets(module: torch.nn.RNNBase, resets: Tensor | None, x: Tensor, layout: SequenceLayout) -> Tensor | None:
    """The caller's resets (bool, (B,T) with batch_first else (T,B); (T,) unbatched) -> (T,B) bool on the
    input's device (a view where possible), or None."""
    if resets is None:
        return None
    resets = check_tensor("resets", resets)
    if resets.dtype != torch.bool:
        raise DTypeError(f"resets: expected a bool tensor, got dtype {resets.dtype}")
    if module.bidirectional:
        raise ShapeError("resets: not defined for a bidirectional layer (an episode boundary has one direction)")
    if layout.packed is not None:
        raise ShapeError("resets: expected a padded tensor input, not a PackedSequence")
    seq_len, batch = x.shape[0], x.shape[1]
    if not layout.batched:
        check_shape("resets", resets, (seq_len,))
        resets = resets.unsqueeze(1)
    elif module.batch_first:
        check_shape("resets", resets, (batch, seq_len))
        resets = resets.t()
    else:
        check_shape("resets", resets, (seq_len, batch))
    return resets.to(x.device)


def run_stack(
    module: torch.nn.Module, input: Tensor, states: Sequence[Tensor], run_direction: DirectionFn,
    batch_sizes: Tensor | None, flags: StateFlags,
) -> tuple[Tensor, list[Tensor]]:
    """The layer/direction loop: input (T,B,I), states [(L*D, B, size)] -> output (T,B,D*out), final states; the
    weights in the input's dtype (in_input_dtype)."""
    directions = 2 if module.bidirectional else 1
    # By name, not module._flat_weights: that list keeps the tensors of construction time, which torch.export
    # and torch.func.functional_call swap out (torch.nn.LSTM.forward refreshes it for the same reason).
    names = module._flat_weights_names
    weights_per_direction = len(names) // (module.num_layers * directions)
    finals: list[State] = []
    layer_input = input
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            index = layer * directions + direction
            first = index * weights_per_direction
            weights = [parameter(module, name) for name in names[first : first + weights_per_direction]]
            weights = in_input_dtype(weights, input, weights[0])
            state = tuple(s[index] for s in states)
            output, final = run_direction(layer_input, state, weights, batch_sizes, direction == 1,
                                          **flags.for_direction(input.device))
            outputs.append(output)
            finals.append(final)
        layer_input = torch.cat(outputs, dim=-1) if directions == 2 else outputs[0]
        if module.dropout and module.training and layer < module.num_layers - 1:
            layer_input = dropout_between_layers(layer_input, module.dropout, batch_sizes, flags.lengths)
    # One layer and direction: the final state as a view (torch.stack copies, ~2 us of a one-step call).
    return layer_input, [parts[0].unsqueeze(0) if len(parts) == 1 else torch.stack(parts) for parts in zip(*finals)]


def parameter(module: torch.nn.Module, name: str) -> Tensor:
    """getattr(module, name) for a weight: from the module's _parameters directly where it is one (what
    torch.func.functional_call and torch.export swap in), else through getattr (a parametrized or weight-normed
    weight). nn.Module.__getattr__ costs ~0.5 us a weight, ~4% of a one-step GRU call."""
    weight = module._parameters.get(name)
    return weight if weight is not None else getattr(module, name)


def dropout_between_layers(x: Tensor, p: float, batch_sizes: Tensor | None, lengths: Tensor | None) -> Tensor:
    """F.dropout of a layer's output x (T, B, F) with torch.nn's masks for the same seed: torch.nn draws them over
    the packed data of a PackedSequence (its rows, time-major), so with a PackedSequence input (x holds its rows in
    their sorted order, batch_sizes (T,) the active rows per step) and with `lengths` (B,) (as torch.nn on
    pack_padded_sequence(x, lengths, enforce_sorted=False), whose torch.sort orders the rows) the mask is drawn
    over the active positions alone, in that order; padded positions stay 0. Plain input: over all of x. Under
    torch.compile (whose generator streams differ from eager anyway) always over all of x: the active count is
    data-dependent."""
    if (batch_sizes is None and lengths is None) or torch.compiler.is_compiling():
        return F.dropout(x, p, training=True)
    order = None
    if batch_sizes is None:
        sorted_lengths, order = torch.sort(lengths.cpu(), descending=True)
        order = order.to(x.device)
        x = x.index_select(1, order)
        active = torch.arange(x.shape[0])[:, None] < sorted_lengths[None, :]
    else:
        active = torch.arange(x.shape[1])[None, :] < batch_sizes.cpu()[:, None]
    active = active.to(x.device).unsqueeze(-1).expand_as(x)
    dropped = torch.zeros_like(x).masked_scatter(active, F.dropout(x[active], p, training=True))
    return dropped if order is None else dropped.index_select(1, torch.argsort(order))
