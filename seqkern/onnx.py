"""What seqkern's modules compute while `torch.onnx.export(model, args, dynamo=True)` traces them.

The fused kernels are custom ops (torch.ops.seqkern.*) that the ONNX exporter cannot translate, and registering
translations with it needs onnxscript imported before the export starts (its registry is built from a global
list at the start of each export: importing that list costs ~4 s, too much for `import seqkern`). So during an
ONNX export (torch.onnx.is_in_onnx_export(), which torch.compile folds to False) the modules trace plain ONNX
instead, and a plain export call works:

  * recurrent layers: each layer-direction becomes one standard ONNX LSTM / GRU / RNN node (gates reordered to
    ONNX's i,o,f,c and z,r,h; GRU with linear_before_reset=1, torch's formulation; a call's `lengths` become the
    node's sequence_lens, whose semantics are the same; resets and zoneout have no ONNX form and are refused with
    a ValueError); an LSTM with proj_size, which ONNX's LSTM lacks, becomes a Scan over time (torch's scan
    higher-order op, which the exporter translates; not with lengths);
  * everything else (cells, attention, Transformer layers) runs seqkern's pure-PyTorch reference, which exports as
    ordinary ops (attention: MatMul / Softmax-style math, with seqkern's semantics: a query with no visible key
    gets 0).

Both keep the sequence length and the batch size dynamic. torch.export (and AOTInductor) are not affected: the
flag is only set by torch.onnx.export, so their graphs keep the seqkern ops and run the fused kernels.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch._higher_order_ops.scan import scan

from seqkern import reference
from seqkern.backends import backend
from seqkern.nn._recurrent import DirectionFn, State, split_weights

# Gate blocks of torch.nn's weights, in the order ONNX's operators want them.
_LSTM_ORDER = (0, 3, 1, 2)   # torch i, f, g, o -> ONNX i, o, f, c
_GRU_ORDER = (1, 0, 2)       # torch r, z, n    -> ONNX z, r, h


# A constant of the trace, read when tracing: dynamo would otherwise fold is_in_onnx_export() to False, and the ONNX
# exporter traces with dynamo (torch.export strict=True) when its non-strict first attempt fails.
@torch.compiler.assume_constant_result
def exporting() -> bool:
    """Whether torch.onnx.export is tracing the model."""
    return torch.onnx.is_in_onnx_export()


def reference_while_exporting(forward: Callable) -> Callable:
    """Decorates a module's forward: during an ONNX export it runs under seqkern.backend("reference")."""

    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        if not exporting():
            return forward(*args, **kwargs)
        with backend("reference"):
            return forward(*args, **kwargs)

    return wrapper


def direction_for(module: torch.nn.RNNBase) -> DirectionFn:
    """The ONNX form of one layer-direction of `module` (seqkern.nn.LSTM, GRU or RNN), with the signature of
    seqkern.nn._recurrent's DirectionFn."""
    if module.mode == "LSTM":
        return lstm_direction
    if module.mode == "GRU":
        return gru_direction
    return functools.partial(rnn_direction, relu=module.mode == "RNN_RELU")


# ------------------------------------------------------------------------------------------------------------
# One layer in one direction: x (T,B,I), state tuple of (B,S) -> output (T,B,S), final state tuple.
# `weights` are torch.nn's of that layer-direction: w_ih, w_hh[, b_ih, b_hh][, w_hr].
# ------------------------------------------------------------------------------------------------------------
def lstm_direction(x: Tensor, state: State, weights: Sequence[Tensor], batch_sizes: Tensor | None,
                   reverse: bool, **flags) -> tuple[Tensor, State]:
    lengths = _exportable_lengths(batch_sizes, flags)
    w_ih, w_hh, b_ih, b_hh, w_hr = split_weights(weights)
    if w_hr is not None:
        if lengths is not None:
            raise ValueError("lengths: an LSTM with proj_size cannot be exported to ONNX with lengths by seqkern "
                             "(its projection is a Scan over time, which does not mask); export without lengths")
        return _projected_lstm(x, state, w_ih, w_hh, b_ih, b_hh, w_hr, reverse)
    return _onnx_recurrent("LSTM", _LSTM_ORDER, x, state, w_ih, w_hh, b_ih, b_hh, reverse, lengths)


def gru_direction(x: Tensor, state: State, weights: Sequence[Tensor], batch_sizes: Tensor | None,
                  reverse: bool, **flags) -> tuple[Tensor, State]:
    lengths = _exportable_lengths(batch_sizes, flags)
    w_ih, w_hh, b_ih, b_hh, _ = split_weights(weights)
    return _onnx_recurrent("GRU", _GRU_ORDER, x, state, w_ih, w_hh, b_ih, b_hh, reverse, lengths,
                           linear_before_reset=1)


def rnn_direction(x: Tensor, state: State, weights: Sequence[Tensor], batch_sizes: Tensor | None,
                  reverse: bool, relu: bool = False, **flags) -> tuple[Tensor, State]:
    lengths = _exportable_lengths(batch_sizes, flags)
    w_ih, w_hh, b_ih, b_hh, _ = split_weights(weights)
    return _onnx_recurrent("RNN", (0,), x, state, w_ih, w_hh, b_ih, b_hh, reverse, lengths,
                           activations=["Relu" if relu else "Tanh"])


def _exportable_lengths(batch_sizes: Tensor | None, flags: dict) -> Tensor | None:
    """The call's lengths (B,) as ONNX's sequence_lens, whose semantics are the modules' (outputs 0 past each
    length, the final states at each last valid step, reverse directions from there); errors for what an ONNX
    recurrent node cannot express."""
    if batch_sizes is not None:
        raise ValueError("input: a PackedSequence cannot be exported to ONNX by seqkern; export the module with "
                         "a padded (T, B, I) tensor and lengths=... (pack_padded_sequence is not traceable with "
                         "dynamic shapes)")
    if flags.get("resets") is not None:
        raise ValueError("resets: cannot be exported to ONNX by seqkern (ONNX's LSTM/GRU/RNN nodes cannot restart "
                         "a sequence mid-way); export the module without resets")
    if flags.get("zoneout"):
        raise ValueError("zoneout: a layer with zoneout > 0 cannot be exported to ONNX by seqkern (its evaluation "
                         "blend is not an ONNX recurrent node); export a copy with zoneout = 0.0")
    lengths = flags.get("lengths")
    return None if lengths is None else lengths.to(torch.int32)


def _gates(t: Tensor, order: Sequence[int]) -> Tensor:
    """Reorders the gate blocks of a (G*H, ...) weight or (G*H,) bias."""
    blocks = t.chunk(len(order))
    return torch.cat([blocks[i] for i in order]) if len(order) > 1 else t


@torch._dynamo.dont_skip_tracing  # dynamo skips torch.onnx.ops; strict torch.export must trace into it
def _onnx_recurrent(op: str, order: Sequence[int], x: Tensor, state: State, w_ih: Tensor, w_hh: Tensor,
                    b_ih: Tensor | None, b_hh: Tensor | None, reverse: bool, lengths: Tensor | None,
                    **attributes) -> tuple[Tensor, State]:
    """One ONNX LSTM/GRU/RNN node (num_directions 1): inputs X, W, R, B, sequence_lens, initial_h[, initial_c];
    outputs Y (T,1,B,H), Y_h (1,B,H)[, Y_c]."""
    seq_len, batch, hidden = x.shape[0], x.shape[1], w_hh.shape[1]
    bias = None if b_ih is None else torch.cat([_gates(b_ih, order), _gates(b_hh, order)]).unsqueeze(0)
    inputs = [x, _gates(w_ih, order).unsqueeze(0), _gates(w_hh, order).unsqueeze(0), bias, lengths,
              *(s.unsqueeze(0) for s in state)]
    attributes.update(hidden_size=int(hidden), direction="reverse" if reverse else "forward")
    output, *finals = torch.onnx.ops.symbolic_multi_out(
        op, inputs, attributes, dtypes=[x.dtype] * (1 + len(state)),
        shapes=[(seq_len, 1, batch, hidden)] + [(1, batch, hidden)] * len(state),
    )
    return output.squeeze(1), tuple(f.squeeze(0) for f in finals)


def _projected_lstm(x: Tensor, state: State, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
                    b_hh: Tensor | None, w_hr: Tensor, reverse: bool) -> tuple[Tensor, State]:
    """An LSTM with a projection (h = (o * tanh(c)) W_hr^T) as a Scan over time: ONNX's LSTM has no projection.
    The input GEMM runs once over the whole sequence, outside the loop."""
    bias = None if b_ih is None else b_ih + b_hh
    gates_x = torch.nn.functional.linear(x, w_ih, bias)

    def step(carry: State, gx: Tensor) -> tuple[State, Tensor]:
        h, c = carry
        h, c, _ = reference.lstm_cell_forward(gx, h @ w_hh.t(), c, None, None)
        h = h @ w_hr.t()
        return (h, c), h.clone()  # scan's outputs may not alias its carry

    (h_n, c_n), output = scan(step, tuple(state), gates_x, reverse=reverse)
    return output, (h_n, c_n)
