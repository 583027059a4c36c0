"""Drop-in replacements for torch.nn's sequence layers."""
from seqkern.nn.additive_attention import AdditiveAttention
from seqkern.nn.gru import GRU, GRUCell
from seqkern.nn.layernorm_gru import LayerNormGRU
from seqkern.nn.layernorm_lstm import LayerNormLSTM
from seqkern.nn.lstm import LSTM, LSTMCell
from seqkern.nn.luong_attention import LuongAttention
from seqkern.nn.multihead_attention import MultiheadAttention
from seqkern.nn.positional_encoding import PositionalEncoding
from seqkern.nn.rnn import RNN, RNNCell
from seqkern.nn.transformer import (
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

__all__ = ["LSTM", "LSTMCell", "GRU", "GRUCell", "RNN", "RNNCell", "MultiheadAttention", "PositionalEncoding",
           "Transformer", "TransformerEncoder", "TransformerDecoder", "TransformerEncoderLayer",
           "TransformerDecoderLayer", "AdditiveAttention", "LuongAttention", "LayerNormLSTM", "LayerNormGRU"]
