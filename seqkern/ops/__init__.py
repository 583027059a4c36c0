"""Op registration (fake implementations, autograd, Triton kernels) and the functional API.

Named by csrc/ops.cpp (`set_python_module`): torch imports this module when it needs the Python
registrations of a seqkern op.
"""
from seqkern.ops import lstm
from seqkern.ops.lstm import lstm_cell, lstm_layer

__all__ = ["lstm", "lstm_layer", "lstm_cell"]
