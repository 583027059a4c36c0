"""Pure-PyTorch references: the test oracle and the fallback for any device or dtype no kernel serves.

Each function has the signature and the return values of the op of the same name in
`torch.ops.seqkern`, and is differentiable by PyTorch's autograd.
"""
from seqkern.reference.lstm import lstm_cell_forward, lstm_forward

__all__ = ["lstm_forward", "lstm_cell_forward"]
