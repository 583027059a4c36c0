"""Models built from seqkern's layers."""
from seqkern.models.attention_plot import plot_attention
from seqkern.models.bert import (BertEncoder, BertForMaskedLM, BertForSequenceClassification, HeadOutput,
                                 mask_tokens)
from seqkern.models.gpt import GPT, KVCache
from seqkern.models.seq2seq import Decoded, Seq2Seq, Seq2SeqOutput

__all__ = ["GPT", "KVCache", "BertEncoder", "BertForMaskedLM", "BertForSequenceClassification", "HeadOutput", "mask_tokens", "Decoded", "Seq2Seq", "Seq2SeqOutput", "plot_attention"]
