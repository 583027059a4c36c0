"""Op registration (fake implementations, autograd, Triton kernels) and the functional API.

The schemas are declared in seqkern/ops/_schemas.py; every op's fake implementation, autograd formula and Triton
kernel is registered through seqkern.ops._registry.
"""
from seqkern.ops import additive_attention, flash_attention, gru, layernorm_gru, layernorm_lstm, lstm, rnn
from seqkern.ops.additive_attention import additive_attention_projected
from seqkern.ops.flash_attention import attention, attention_decode, attention_varlen
from seqkern.ops.gru import gru_cell, gru_layer
from seqkern.ops.layernorm_gru import layernorm_gru_layer
from seqkern.ops.layernorm_lstm import layernorm_lstm_layer
from seqkern.ops.lstm import lstm_cell, lstm_layer
from seqkern.ops.rnn import rnn_cell, rnn_layer

__all__ = [
    "additive_attention", "additive_attention_projected",
    "flash_attention", "attention", "attention_varlen", "attention_decode",
    "lstm", "gru", "rnn", "lstm_layer", "lstm_cell", "gru_layer", "gru_cell", "rnn_layer", "rnn_cell",
    "layernorm_lstm", "layernorm_gru", "layernorm_lstm_layer", "layernorm_gru_layer"]
