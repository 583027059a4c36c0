"""Launching a Triton kernel on the tensors' device: compiled on CUDA, interpreted on CPU.

On CUDA the kernel goes through `torch.library.wrap_triton`, so torch.compile and make_fx trace the launch
instead of running it. On CPU (this project's test machines have no GPU) it runs under the Triton
interpreter without TRITON_INTERPRET=1 having been set when triton and the kernel were imported: the
interpreter wraps the decorated kernel at run time.

The wrinkle (triton 3.9): a kernel decorated without TRITON_INTERPRET calls its @triton.jit helpers, and
triton's own (tl.zeros, tl.sigmoid, ...), as compiled JITFunctions, whose __call__ raises "Cannot call
@triton.jit'd outside of the scope of a kernel" outside the compiler. For the duration of an interpreted
launch, such calls run the helper's interpreted version instead.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Sequence

import torch
import triton.language as tl


def launch(kernel, grid: Sequence[int], device: torch.device) -> Callable:
    """`kernel[grid]` for tensors on `device`: call the result with the kernel's arguments."""
    grid = tuple(grid)
    if device.type == "cuda":
        return torch.library.wrap_triton(kernel)[grid]

    def run_interpreted(*args, **kwargs):
        with _INTERPRETER_LOCK, _jit_helpers_interpreted():
            return _interpreted(kernel.fn)[grid](*args, **kwargs)

    return run_interpreted


# One interpreted launch at a time: the patch below is process-wide, and a launch that ends must not undo
# it under another still running (the interpreter holds the GIL throughout anyway).
_INTERPRETER_LOCK = threading.Lock()


@functools.lru_cache(maxsize=None)
def _interpreted(python_function):
    """The interpreter's version of the Python function under a @triton.jit, built once per function.

    Keyed by the plain function: hashing a JITFunction parses its source, which fails mid-interpretation.
    """
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(python_function)


@contextlib.contextmanager
def _jit_helpers_interpreted():
    """Within the block, calling a @triton.jit function from Python interprets it instead of raising."""
    from triton.runtime.jit import JITFunction

    def call_interpreted(jit_function, *args, **kwargs):
        return _interpreted(jit_function.fn)(*args, **kwargs)

    refuse = JITFunction.__call__
    JITFunction.__call__ = call_interpreted
    try:
        yield
    finally:
        JITFunction.__call__ = refuse


def dot_operand_dtype(dtype: torch.dtype, device: torch.device):
    """The triton dtype to feed tl.dot for tensors of `dtype` on `device`.

    The interpreter (triton 3.9) multiplies the raw uint16 bit patterns of bfloat16 tl.dot operands, so
    there bfloat16 operands go in as float32: the same products (bfloat16 x bfloat16 is exact in float32)
    accumulated in float32, as a GPU's bfloat16 tl.dot does.
    """
    if dtype == torch.bfloat16 and device.type != "cuda":
        return tl.float32
    return {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
            torch.float16: tl.float16}[dtype]
