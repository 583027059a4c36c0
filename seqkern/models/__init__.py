"""Models built from seqkern's layers."""
from seqkern.models.bert import BertEncoder
from seqkern.models.gpt import GPT, KVCache

__all__ = ["GPT", "KVCache", "BertEncoder"]
