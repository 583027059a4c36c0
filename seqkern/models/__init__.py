"""Models built from seqkern's layers."""
from seqkern.models.attention_plot import plot_attention
from seqkern.models.bert import BertEncoder
from seqkern.models.gpt import GPT, KVCache
from seqkern.models.seq2seq import Decoded, Seq2Seq, Seq2SeqOutput

__all__ = ["GPT", "KVCache", "BertEncoder", "Decoded", "Seq2Seq", "Seq2SeqOutput", "plot_attention"]
