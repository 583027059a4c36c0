"""Which implementation of an op runs: the pure-PyTorch reference, the C++ CPU kernel, or Triton.

    with seqkern.backend("reference"):   # or "cpu", "triton", "auto"
        y = lstm(x)

or the environment variable SEQKERN_BACKEND. "auto" (the default) picks the C++ kernel for CPU tensors
and Triton for CUDA tensors, falling back to the reference for anything neither serves (another device,
a dtype the kernel lacks, C++ kernels that did not build, no triton). The references of the sequence ops
loop over time steps in Python and those of attention hold the (Lq, Lk) scores, so such a fallback warns,
once per op and reason. Forcing "triton" on CPU tensors runs the Triton kernels
under the Triton interpreter: that is how the test suite checks them on a machine without a GPU.
Forcing a backend that cannot serve the call raises instead of falling back silently.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterator

import torch

from seqkern import _extension, _triton

BACKENDS = ("auto", "reference", "cpu", "triton")
ENV_VAR = "SEQKERN_BACKEND"

# A plain module-level stack rather than a threading.local: torch.compile traces reads of it as a
# guarded constant, where a thread-local would break the graph.
_override_stack: list[str] = []


def _checked(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: expected one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force `name` for every seqkern op called inside the block, over $SEQKERN_BACKEND.

    It governs the modules and functional API, and direct `torch.ops.seqkern.*` calls too: under
    "triton" those run the Triton launchers even on CPU tensors (under "reference" they still run their
    kernels: an op *is* a kernel; the reference lives in seqkern.reference).
    """
    _override_stack.append(_checked(name, "seqkern.backend(name)"))
    try:
        with _op_routing(name):
            yield
    finally:
        _override_stack.pop()


def _op_routing(name: str) -> contextlib.AbstractContextManager:
    if name != "triton":
        return contextlib.nullcontext()
    from seqkern.ops._registry import TritonOnCPU

    return TritonOnCPU()


def current() -> str:
    """The backend in force: the innermost `backend()` block, else $SEQKERN_BACKEND, else "auto"."""
    if _override_stack:
        return _override_stack[-1]
    value = os.environ.get(ENV_VAR) if torch.compiler.is_compiling() else _read_env_var()
    return _checked(value or "auto", f"${ENV_VAR}")


def _environment_reader(name: str):
    """A function returning os.environ.get(name), read on every call (a test or a user may set it at any time), but
    from the dict that CPython's os.environ keeps its values in (`_data`, under encoded keys; every os.environ
    assignment updates it, and os.environ.get sees nothing else either) rather than through its Mapping layers:
    ~0.6 us a read measured alone, ~2.2 us inside a one-step RNN layer call (rnn_layer 21.9 -> 19.7 us with the read
    skipped; 2026-12-07, Intel Xeon model 167), and every op call reads it. Falls back to os.environ.get where
    os.environ lacks those internals."""
    data = getattr(os.environ, "_data", None)
    encode, decode = getattr(os.environ, "encodekey", None), getattr(os.environ, "decodevalue", None)
    if not isinstance(data, dict) or encode is None or decode is None:
        return lambda: os.environ.get(name)
    key = encode(name)

    def read() -> str | None:
        raw = data.get(key)
        return None if raw is None else decode(raw)

    return read


_read_env_var = _environment_reader(ENV_VAR)


def cpu_kernel_available() -> bool:
    return _extension.AVAILABLE


def triton_available() -> bool:
    """Triton is installed (the op schemas are declared in Python: the C++ kernels are not needed)."""
    return _triton.available()


@torch.compiler.assume_constant_result  # a fact of the loaded build: dynamo must not trace the C++ query
def kernel_registered(kernel: str, dispatch_key: str) -> bool:
    """Whether the loaded seqkern._C has torch.ops.seqkern.<kernel> with an implementation for
    `dispatch_key` ("CPU", "CUDA"): an extension built from an older checkout lacks newer ops."""
    return _kernel_registered(kernel, dispatch_key)


# Asked on every auto-resolved op call: the dispatcher query takes 5.5 us; caching it took a 1-query attention
# call from 39 to 30 us.
# The answer cannot change: every kernel is registered when seqkern is imported (C++ when seqkern._C loads,
# Triton in seqkern.ops), before any call asks. (A separate function: dynamo traces into a cached function
# marked assume_constant_result instead of calling it.)
@functools.cache
def _kernel_registered(kernel: str, dispatch_key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"seqkern::{kernel}", dispatch_key)
    except RuntimeError:  # the build does not even declare the op
        return False


def resolve(
    op: str, device: torch.device, dtype: torch.dtype, supported: dict[str, tuple[torch.dtype, ...]],
    kernel: str | None = None, warn: bool = True,
) -> str:
    """The implementation ("reference" | "cpu" | "triton") that runs `op` on `device`/`dtype`.

    `supported` maps "cpu" and "triton" to the dtypes that implementation serves. With `kernel` (the name
    of one of the op's torch.ops.seqkern entries), "auto" also checks that the loaded extension has it.
    warn=False: no fallback warning (for a report of what would run, not a call).
    """
    name = current()
    if name == "reference":
        return "reference"
    if name == "auto":
        return _auto(op, device, dtype, supported, kernel, warn)
    if name == "cpu" and device.type != "cpu":
        raise ValueError(f"seqkern.backend('cpu') cannot run {op} on a {device.type} tensor")
    if name == "cpu" and not cpu_kernel_available():
        raise RuntimeError(f"seqkern.backend('cpu'): the C++ kernels are not loaded ({_extension.IMPORT_ERROR})")
    if name == "triton" and not triton_available():
        raise RuntimeError("seqkern.backend('triton'): triton is not installed (pip install triton)")
    if dtype not in supported[name]:
        raise TypeError(f"seqkern.backend({name!r}): {op} supports {supported[name]}, got {dtype}")
    return name


def _auto(op: str, device: torch.device, dtype: torch.dtype, supported: dict[str, tuple[torch.dtype, ...]],
          kernel: str | None, warn: bool) -> str:
    """"auto": the device's kernel ("cpu" for CPU tensors, "triton" for CUDA ones) if it can serve the call,
    else the reference, with a warning naming the op and the reason."""
    native = {"cpu": "cpu", "cuda": "triton"}.get(device.type)
    if native is None:
        return "reference" if device.type == "meta" else _fallback(warn, op, f"no kernel runs on {device.type} tensors")
    if native == "cpu" and not cpu_kernel_available():
        return _fallback(warn, op, f"the C++ kernels are not loaded ({_extension.IMPORT_ERROR})")
    if native == "triton" and not triton_available():
        return _fallback(warn, op, "triton is not installed")
    if dtype not in supported[native]:
        return _fallback(warn, op, f"its {native} kernel does not serve {dtype} (it serves {supported[native]})")
    if kernel is not None and not kernel_registered(kernel, device.type.upper()):
        return _fallback(warn, op, f"the loaded C++ library has no {kernel} kernel (built from older sources?)")
    return native


_warned: set[tuple[str, str]] = set()


def _fallback(warn: bool, op: str, reason: str) -> str:
    """Warns once per (op, reason) that `op` runs its reference, then answers "reference". Silent while
    torch.compile traces (the eager call warned already, and a warning would break the graph)."""
    if warn and not torch.compiler.is_compiling() and (op, reason) not in _warned:
        _warned.add((op, reason))
        warnings.warn(f"seqkern: {op} runs its pure-PyTorch reference: {reason}", RuntimeWarning, stacklevel=4)
    return "reference"
