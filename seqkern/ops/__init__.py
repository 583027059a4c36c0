"""Op registration (fake implementations, autograd, Triton kernels) and the functional API.

Named by csrc/ops.cpp (`set_python_module`): torch imports this module when it needs the Python
registrations of a seqkern op.
"""
from seqkern.ops import gru, lstm, rnn
from seqkern.ops.gru import gru_cell, gru_layer
from seqkern.ops.lstm import lstm_cell, lstm_layer
from seqkern.ops.rnn import rnn_cell, rnn_layer

__all__ = ["lstm", "gru", "rnn", "lstm_layer", "lstm_cell", "gru_layer", "gru_cell", "rnn_layer", "rnn_cell"]
