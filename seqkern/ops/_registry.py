"""Wiring shared by every op: Triton implementations, and running them on CPU tensors.

The schema of each op comes from seqkern._C (csrc/ops.cpp); its CPU kernel is C++. This module registers
the Triton launcher of an op as its CUDA kernel, and remembers it so that `seqkern.backend("triton")`
can run it on CPU tensors (under the Triton interpreter). That redirection is a TorchDispatchMode: it
sits below autograd, so the forward and the backward ops keep the one autograd formula of the op and only
the kernel underneath changes.
"""
from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_TRITON_KERNELS: dict[torch._ops.OpOverload, Callable] = {}


def op(name: str) -> torch._ops.OpOverload:
    """torch.ops.seqkern.<name>.default."""
    return getattr(torch.ops.seqkern, name).default


def register_triton(name: str, module: str) -> None:
    """Make `module`.<name> (a Triton launcher with the op's signature) the CUDA kernel of seqkern::<name>.

    The module is imported at the first call, so `import seqkern` does not pay for importing triton.
    """

    def launcher(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    torch.library.register_kernel(f"seqkern::{name}", "cuda", launcher)
    _TRITON_KERNELS[op(name)] = launcher


class _TritonOnCPU(TorchDispatchMode):
    """Runs seqkern ops through their Triton launchers whatever the device (CPU: the interpreter)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        launcher = _TRITON_KERNELS.get(func)
        if launcher is None:
            return func(*args, **(kwargs or {}))
        return launcher(*args, **(kwargs or {}))


def kernel_scope(impl: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context in which torch.ops.seqkern.* runs the kernel of `impl` ("cpu" | "triton") on `device`."""
    if impl == "triton" and device.type != "cuda":
        return _TritonOnCPU()
    return contextlib.nullcontext()
