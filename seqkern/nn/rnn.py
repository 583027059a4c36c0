"""seqkern.nn.RNN and seqkern.nn.RNNCell: drop-ins for torch.nn.RNN and torch.nn.RNNCell (tanh or relu).

RNN subclasses torch.nn.RNNBase (not torch.nn.RNN, which torch.compile refuses to trace), so parameters,
initialization and state_dict are torch.nn's own; forward runs on seqkern.ops.rnn.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from seqkern import onnx
from seqkern.nn import _recurrent
from seqkern.ops.rnn import rnn_cell, rnn_layer

_MODES = {"tanh": "RNN_TANH", "relu": "RNN_RELU"}


class RNN(torch.nn.RNNBase):
    """Multi-layer Elman RNN, the same module as torch.nn.RNN (same arguments and returns) on fused kernels.

    forward(input, hx=None): input (T,B,I), (B,T,I) with batch_first, (T,I) unbatched, or a PackedSequence;
    hx (L*D,B,H) -> output (T,B,D*H) (same layout as input), h_n (L*D,B,H).
    forward(input, hx=None, lengths=None, resets=None): lengths and resets as seqkern.nn.LSTM.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None) -> None:
        if nonlinearity not in _MODES:
            raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(_MODES[nonlinearity], input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device=device, dtype=dtype)

    def forward(self, input: Tensor | PackedSequence, hx: Tensor | None = None, lengths: Tensor | None = None,
                resets: Tensor | None = None):
        relu = self.nonlinearity == "relu"

        def run_direction(x, state, weights, batch_sizes, reverse, **flags):
            w_ih, w_hh, b_ih, b_hh, _ = _recurrent.split_weights(weights)
            output, h_n = rnn_layer(x, state[0], w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, relu, **flags)
            return output, (h_n,)

        if onnx.exporting():
            run_direction = onnx.direction_for(self)
        return _recurrent.forward(self, input, hx, (self.hidden_size,), run_direction, lengths, resets)


class RNNCell(torch.nn.RNNCell):
    """One Elman step, the same module as torch.nn.RNNCell, with bias and activation fused.

    forward(input (B,I) or (I,), hx (B,H) or (H,) or None) -> h' of the same batchedness.
    """

    @onnx.reference_while_exporting
    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        x, batched = _recurrent.cell_input(self, input)
        (h,) = _recurrent.cell_states(self, hx, ("hx",), x, batched)
        relu = self.nonlinearity == "relu"
        gates_x, gates_h, b_ih, b_hh = _recurrent.cell_gates(self, x, h)
        hy = rnn_cell(gates_x, gates_h, b_ih, b_hh, relu)
        return hy if batched else hy.squeeze(0)
