"""seqkern: hand-written fused kernels for sequence models, behind drop-in torch.nn modules.

    import seqkern
    lstm = seqkern.nn.LSTM(256, 256, num_layers=2)      # same arguments and state_dict as torch.nn.LSTM
    with seqkern.backend("reference"): ...             # force an implementation ("cpu", "triton", ...)
    seqkern.empty_cache()                              # free the C++ layers' idle workspace blocks
"""
from seqkern import ops  # noqa: F401  (declares the ops, registers fakes, autograd and Triton kernels)
from seqkern import _extension

_extension.load()  # the C++ CPU kernels of this CPU's level, built on first use
from seqkern import memory
from seqkern.memory import empty_cache

memory.configure()  # the C++ layers' workspace cache: its cap from $SEQKERN_WORKSPACE_CACHE_MB, read once
from seqkern import models, nn
from seqkern.ops.additive_attention import additive_attention, additive_attention_projected
from seqkern.ops.flash_attention import attention, attention_decode, attention_varlen
from seqkern.backends import backend, current as current_backend
from seqkern.conversion import ConversionReport, convert

__version__ = "0.1.0"
__all__ = ["nn", "models", "ops", "attention", "additive_attention", "additive_attention_projected", "attention_varlen", "attention_decode", "backend", "current_backend", "convert", "ConversionReport", "empty_cache", "memory", "__version__"]
