"""Wiring shared by every op: Triton implementations, and running them on CPU tensors.

The schema of each op comes from seqkern/ops/_schemas.py; its CPU kernel is C++. This module registers
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
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from seqkern import _triton
from seqkern.ops import _schemas  # noqa: F401  (declares torch.ops.seqkern.*, with or without the C++ kernels)

_TRITON_KERNELS: dict[torch._ops.OpOverload, Callable] = {}


def op(name: str) -> torch._ops.OpOverload:
    """torch.ops.seqkern.<name>.default."""
    return getattr(torch.ops.seqkern, name).default


def register_ops(
    fakes: dict[str, Callable],
    autograd: dict[str, tuple[Callable, Callable]],
    triton_module: str,
) -> None:
    """The Python side of a family of ops (e.g. lstm_forward, lstm_backward, lstm_cell_*):

    `fakes` maps each op name to its fake implementation; `autograd` maps the differentiable ops to
    (backward, setup_context); each op's Triton launcher `triton_module`.<name> becomes its CUDA kernel
    if Triton is installed. The schemas are Python's, so this holds whether or not the C++ kernels loaded.
    """
    for name, fake in fakes.items():
        torch.library.register_fake(f"seqkern::{name}", fake)
        if _triton.available():
            register_triton(name, triton_module)
    for name, (backward, setup_context) in autograd.items():
        torch.library.register_autograd(f"seqkern::{name}", backward, setup_context=setup_context)


def register_triton(name: str, module: str) -> None:
    """Make `module`.<name> (a Triton launcher with the op's signature) the CUDA kernel of seqkern::<name>.

    The module is imported at the first call, so `import seqkern` does not pay for importing triton.
    """

    def launcher(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    torch.library.register_kernel(f"seqkern::{name}", "cuda", launcher)
    _TRITON_KERNELS[op(name)] = launcher


class TritonOnCPU(TorchDispatchMode):
    """While the "triton" backend is in force, runs seqkern ops through their Triton launchers whatever
    the device (CPU tensors: under the interpreter). Entered by `seqkern.backend("triton")`, so a direct
    `torch.ops.seqkern.*` call in that block runs Triton too, and by `kernel_scope` for $SEQKERN_BACKEND."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from seqkern import backends

        launcher = _TRITON_KERNELS.get(func)
        if launcher is None or backends.current() != "triton":
            return func(*args, **(kwargs or {}))
        return launcher(*args, **(kwargs or {}))


def kernel_scope(impl: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context in which torch.ops.seqkern.* runs the kernel of `impl` ("cpu" | "triton") on `device`."""
    if impl == "triton" and device.type != "cuda":
        return TritonOnCPU()
    return contextlib.nullcontext()


def empty(like: Tensor) -> Tensor:
    """The (0,)-shaped tensor an op returns for a result its flags leave out."""
    return like.new_empty(0)


def zeros_if_none(grad: Tensor | None, like: Tensor) -> Tensor:
    """Autograd passes None for an output nobody used; the backward kernels want zeros."""
    return torch.zeros_like(like) if grad is None else grad


def needs_grad(*tensors: Tensor | None) -> bool:
    """Whether a forward must save what its backward needs."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
