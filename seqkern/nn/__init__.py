"""Drop-in replacements for torch.nn's sequence layers."""
from seqkern.nn.lstm import LSTM, LSTMCell

__all__ = ["LSTM", "LSTMCell"]
