"""seqkern.nn.GRU and seqkern.nn.GRUCell: drop-ins for torch.nn.GRU and torch.nn.GRUCell.

GRU subclasses torch.nn.RNNBase (not torch.nn.GRU, which torch.compile refuses to trace), so parameters,
initialization and state_dict are torch.nn's own; forward runs on seqkern.ops.gru.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from seqkern import onnx
from seqkern.nn import _recurrent
from seqkern.ops.gru import gru_cell, gru_layer


class GRU(torch.nn.RNNBase):
    """Multi-layer GRU, the same module as torch.nn.GRU (same arguments and returns) on fused kernels.

    forward(input, hx=None, lengths=None, resets=None): input (T,B,I), (B,T,I) with batch_first, (T,I) unbatched,
    or a PackedSequence; hx (L*D,B,H) -> output (T,B,D*H) (same layout as input), h_n (L*D,B,H).
    lengths, resets and zoneout=p (constructor; on h): as seqkern.nn.LSTM.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 zoneout: float = 0.0, device=None, dtype=None) -> None:
        zoneout = _recurrent.check_zoneout(zoneout)
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device=device, dtype=dtype)
        self.zoneout = zoneout

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", zoneout={self.zoneout}" if self.zoneout else "")

    def forward(self, input: Tensor | PackedSequence, hx: Tensor | None = None, lengths: Tensor | None = None,
                resets: Tensor | None = None):
        run_direction = onnx.direction_for(self) if onnx.exporting() else _run_direction
        return _recurrent.forward(self, input, hx, (self.hidden_size,), run_direction, lengths, resets, self.zoneout)


def _run_direction(x, state, weights, batch_sizes, reverse, **flags):
    w_ih, w_hh, b_ih, b_hh, _ = _recurrent.split_weights(weights)
    output, h_n = gru_layer(x, state[0], w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, **flags)
    return output, (h_n,)


class GRUCell(torch.nn.GRUCell):
    """One GRU step, the same module as torch.nn.GRUCell, on the fused cell-step kernel.

    forward(input (B,I) or (I,), hx (B,H) or (H,) or None) -> h' of the same batchedness.
    """

    @onnx.reference_while_exporting
    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        x, batched = _recurrent.cell_input(self, input)
        (h,) = _recurrent.cell_states(self, hx, ("hx",), x, batched)
        gates_x, gates_h, b_ih, b_hh = _recurrent.cell_gates(self, x, h)
        hy = gru_cell(gates_x, gates_h, h, b_ih, b_hh)
        return hy if batched else hy.squeeze(0)
