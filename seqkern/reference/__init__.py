"""Pure-PyTorch references: the test oracle and the fallback for any device or dtype no kernel serves.

Each function has the signature and the return values of the op of the same name in
`torch.ops.seqkern`, and is differentiable by PyTorch's autograd.
"""
from seqkern.reference.additive_attention import additive_attention_backward, additive_attention_forward
from seqkern.reference.flash_attention import (
    flash_attention_backward,
    flash_attention_decode,
    flash_attention_forward,
)
from seqkern.reference.gru import gru_cell_forward, gru_forward
from seqkern.reference.layernorm_gru import layernorm_gru_forward
from seqkern.reference.layernorm_lstm import layernorm_lstm_forward
from seqkern.reference.lstm import lstm_cell_forward, lstm_forward
from seqkern.reference.rnn import rnn_cell_forward, rnn_forward

__all__ = [
    "additive_attention_forward", "additive_attention_backward",
    "flash_attention_forward", "flash_attention_backward", "flash_attention_decode",
    "lstm_forward", "lstm_cell_forward", "gru_forward", "gru_cell_forward", "rnn_forward", "rnn_cell_forward",
    "layernorm_lstm_forward", "layernorm_gru_forward"]
