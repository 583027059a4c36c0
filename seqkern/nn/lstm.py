"""seqkern.nn.LSTM and seqkern.nn.LSTMCell: drop-ins for torch.nn.LSTM and torch.nn.LSTMCell.

LSTM subclasses torch.nn.RNNBase, the class torch.nn.LSTM itself is a thin layer over, so the parameters
(names, shapes, initialization, random draws), state_dict, flatten_parameters(), all_weights, .to() and
pickling are torch.nn's own; only forward runs on seqkern's kernels (seqkern.ops.lstm). It deliberately does
not subclass torch.nn.LSTM: torch.compile refuses to trace any instance of torch.nn.LSTM/GRU/RNN
(torch._dynamo.config.allow_rnn), and seqkern's LSTM is meant to be compiled. LSTMCell subclasses
torch.nn.LSTMCell, which torch.compile traces.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from seqkern import onnx
from seqkern.nn import _recurrent
from seqkern.ops.lstm import lstm_cell, lstm_layer


class LSTM(torch.nn.RNNBase):
    """Multi-layer LSTM, the same module as torch.nn.LSTM (same arguments and returns) on fused kernels.

    forward(input, hx=None, lengths=None, resets=None): input (T,B,I), (B,T,I) with batch_first, (T,I) unbatched,
    or a PackedSequence; hx = (h_0 (L*D,B,P), c_0 (L*D,B,H)) -> output (T,B,D*P) (same layout as input), (h_n, c_n).

    Beyond torch.nn.LSTM (seqkern/ops/_schemas.py defines them):
      * lengths (B,) integers in [0, T]: the result of torch.nn.LSTM on pack_padded_sequence(input, lengths,
        enforce_sorted=False) padded back to T (zeros past each length, h_n and c_n at each last valid step,
        reverse directions from it), without packing, sorting or copying;
      * resets (T,B) bool ((B,T) with batch_first; unidirectional only): where True, that sequence's state
        entering step t is hx (or zeros) again, as if a new sequence started there;
      * zoneout=p (constructor; Krueger et al. 2016): in training each element of h and c keeps its previous
        value with probability p (independent masks from torch's generator, one seed per layer and direction:
        torch.manual_seed reproduces them); in eval the state is p * previous + (1 - p) * new. The output is the
        state after zoneout. p = 0 is torch.nn.LSTM.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, zoneout: float = 0.0, device=None, dtype=None) -> None:
        zoneout = _recurrent.check_zoneout(zoneout)
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, device, dtype)
        self.zoneout = zoneout

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", zoneout={self.zoneout}" if self.zoneout else "")

    def forward(self, input: Tensor | PackedSequence, hx: Sequence[Tensor] | None = None,
                lengths: Tensor | None = None, resets: Tensor | None = None):
        state_sizes = (self.proj_size or self.hidden_size, self.hidden_size)
        run_direction = onnx.direction_for(self) if onnx.exporting() else _run_direction
        return _recurrent.forward(self, input, hx, state_sizes, run_direction, lengths, resets, self.zoneout)


def _run_direction(x, state, weights, batch_sizes, reverse, **flags):
    w_ih, w_hh, b_ih, b_hh, w_hr = _recurrent.split_weights(weights)
    output, h_n, c_n = lstm_layer(x, state[0], state[1], w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse,
                                  **flags)
    return output, (h_n, c_n)


class LSTMCell(torch.nn.LSTMCell):
    """One LSTM step, the same module as torch.nn.LSTMCell, on the fused cell-step kernel.

    forward(input (B,I) or (I,), hx=(h (B,H), c (B,H)) or None) -> (h', c') of the same batchedness.
    """

    @onnx.reference_while_exporting
    def forward(self, input: Tensor, hx: Sequence[Tensor] | None = None):
        x, batched = _recurrent.cell_input(self, input)
        h, c = _recurrent.cell_states(self, hx, ("hx[0]", "hx[1]"), x, batched)
        gates_x, gates_h, b_ih, b_hh = _recurrent.cell_gates(self, x, h)
        hy, cy = lstm_cell(gates_x, gates_h, c, b_ih, b_hh)
        return (hy, cy) if batched else (hy.squeeze(0), cy.squeeze(0))
