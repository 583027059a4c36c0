"""Drop-in replacements for torch.nn's sequence layers."""
from seqkern.nn.gru import GRU, GRUCell
from seqkern.nn.lstm import LSTM, LSTMCell
from seqkern.nn.multihead_attention import MultiheadAttention
from seqkern.nn.rnn import RNN, RNNCell

__all__ = ["LSTM", "LSTMCell", "GRU", "GRUCell", "RNN", "RNNCell", "MultiheadAttention"]
