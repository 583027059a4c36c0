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
import struct
import threading
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl


# Launch keywords for the compiler and the driver only (triton.Config's options, the cooperative launch). Configs
# and launchers pass them whatever the device; an interpreted launch drops them here, the one place that knows the
# interpreter has no use for them (triton 3.9's interpreter happens to ignore unknown keywords too: not relied on).
COMPILE_OPTIONS = frozenset({"num_warps", "num_stages", "num_ctas", "maxnreg", "launch_cooperative_grid",
                             "launch_pdl"})


def launch(kernel, grid: Sequence[int], device: torch.device) -> Callable:
    """`kernel[grid]` for tensors on `device`: call the result with the kernel's arguments and, optionally, the
    COMPILE_OPTIONS (used on CUDA, dropped under the interpreter)."""
    grid = tuple(grid)
    if device.type == "cuda":
        return torch.library.wrap_triton(kernel)[grid]

    def run_interpreted(*args, **kwargs):
        arguments = {name: value for name, value in kwargs.items() if name not in COMPILE_OPTIONS}
        with _INTERPRETER_LOCK, _jit_helpers_interpreted():
            return _interpreted(kernel.fn)[grid](*args, **arguments)

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
    """Within the block, calling a @triton.jit function from Python interprets it instead of raising, and float32
    tl.dot products are the host-independent ones of _float32_dot."""
    from triton.runtime.interpreter import InterpreterBuilder
    from triton.runtime.jit import JITFunction

    def call_interpreted(jit_function, *args, **kwargs):
        return _interpreted(jit_function.fn)(*args, **kwargs)

    refuse, host_dot = JITFunction.__call__, InterpreterBuilder.create_dot
    JITFunction.__call__ = call_interpreted
    InterpreterBuilder.create_dot = functools.partialmethod(_float32_dot, host_dot)
    try:
        yield
    finally:
        JITFunction.__call__, InterpreterBuilder.create_dot = refuse, host_dot


def _float32_dot(builder, host_dot, a, b, d, input_precision, max_num_imprecise_acc):
    """The interpreter's tl.dot (triton 3.9: numpy's matmul, then + d), with float32 products summed in float64
    and rounded once before d is added: the same result for either operand order and any tile shape.

    Why: the flash-attention kernels recompute in the backward the scores of the forward, S^T = K Q^T there and
    S = Q K^T here, and rely on getting them bit for bit (P = exp(s - lse) is exact at a row's maximum only then),
    as a GPU's float32 FMA loop gives. numpy's float32 matmul is the host's BLAS: OpenBLAS on an AMD EPYC (Zen 1)
    rounded a quarter of the scores differently when the operands were swapped or the tile was cut differently,
    and the saturated-softmax tests failed there (dV 30x SDPA's error) while they passed on an Intel Xeon.
    Products of two float32 are exact in float64, and a tile's depth of them summed in float64 rounds to the
    correctly rounded float32 dot product but in the rarest ties: host-independent, and more accurate than a
    GPU's float32 FMA loop, whose rounding within a tile these tests therefore do not see (the rule's margins
    are in the kernels' own arithmetic around the products). Every other dtype goes to the interpreter's own dot.
    """
    import numpy as np

    operands = (a.data, b.data, d.data)
    if not all(x.dtype == np.float32 for x in operands):
        return host_dot(builder, a, b, d, input_precision, max_num_imprecise_acc)
    from triton.runtime.interpreter import TensorHandle

    exact = np.matmul(a.data.astype(np.float64), b.data.astype(np.float64)).astype(np.float32)
    return TensorHandle(exact + d.data, d.dtype.scalar)


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


def dot_precision(dtype: torch.dtype, device: torch.device, float32: str = "tf32x3") -> str:
    """tl.dot's input_precision for operands of `dtype` on `device`, as torch chooses for float32 matmuls.

    float32 on CUDA: "tf32" (tensor cores, 10-bit mantissas) where torch.backends.cuda.matmul.allow_tf32
    allows it, as torch's own float32 matmuls; else the kernel's full-accuracy choice `float32`: "tf32x3"
    (each operand split into two tf32 halves, three tensor-core products: about float32's accuracy at
    tensor-core speed, but four operand tiles live at once) or "ieee" (float32 FMAs, what torch runs without
    tf32: flash attention, whose tf32x3 tiles spilled registers at every tile size, and decoding, see
    kernels/flash_attention.py and flash_attention_decode.py). Everything else, and everything under the
    interpreter (where tl.dot is numpy arithmetic whatever is asked: _float32_dot), is "ieee"; the setting only
    matters for float32 operands.
    """
    if dtype == torch.float32 and device.type == "cuda":
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else float32
    return "ieee"


def launch_tuned(kernel, configs: Sequence[dict], interpreter_config: dict, grid: Callable[[dict], tuple],
                 device: torch.device, key: Sequence[str]) -> Callable:
    """`kernel` autotuned over `configs` for tensors on `device`: call the result with the kernel's arguments
    minus the tuned ones.

    A config is a dict of the kernel's tuned constexprs (e.g. BLOCK_M, BLOCK_N) plus num_warps and num_stages
    (and optionally maxnreg, ptxas's register cap; `launch` drops these three under the interpreter); `grid` maps
    one (the meta-parameters) to the launch grid. On CUDA triton.autotune times every config once per distinct
    value of the `key` arguments and keeps the fastest. The interpreter would run every config
    in Python each time, so there the one `interpreter_config` is launched: deterministic, and the fewest,
    largest tiles (the interpreter's cost is per program).
    """
    if device.type == "cuda":
        return torch.library.wrap_triton(_autotuner(kernel, _frozen(configs), tuple(key)))[grid]
    return functools.partial(launch(kernel, grid(interpreter_config), device), **interpreter_config)


def _frozen(configs: Sequence[dict]) -> tuple:
    return tuple(tuple(sorted(config.items())) for config in configs)


@functools.lru_cache(maxsize=None)
def _autotuner(kernel, configs: tuple, key: tuple):
    """One triton.autotune wrapper per (kernel, config list, key), reused across calls (it keeps the timings)."""
    tuned = []
    for items in configs:
        meta = dict(items)
        num_warps, num_stages, maxnreg = meta.pop("num_warps"), meta.pop("num_stages"), meta.pop("maxnreg", None)
        tuned.append(triton.Config(meta, num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg))
    return triton.autotune(configs=tuned, key=list(key))(kernel)


def float_halves(name: str, value: float) -> dict:
    """{name_hi, name_lo}: float32 hi = value rounded, lo = the rest rounded; the kernels add them in float64
    for float64 inputs (48 bits of the value: triton passes a Python float as float32) and use hi otherwise."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    return {f"{name}_hi": hi, f"{name}_lo": struct.unpack("f", struct.pack("f", value - hi))[0]}


@triton.jit
def runtime_float(hi, lo, ACC: tl.constexpr):
    """A float the launcher passed as two float32 halves (float_halves): triton passes a Python float as float32,
    which would round the scales of float64 inputs. hi + lo in float64 (48 bits), hi alone otherwise."""
    if ACC == tl.float64:
        value = tl.cast(hi, tl.float32).to(tl.float64) + tl.cast(lo, tl.float32).to(tl.float64)
    else:
        value = tl.cast(hi, tl.float32).to(ACC)
    return value
