"""Argument checks with messages that name the argument, the expected and the received value.

The error classes also derive from RuntimeError because torch.nn raises RuntimeError for the same
mistakes: code written against torch.nn that catches RuntimeError keeps working after the swap.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class ShapeError(ValueError, RuntimeError):
    """A tensor argument has the wrong shape (or a value outside its domain)."""


class DTypeError(TypeError, RuntimeError):
    """A tensor argument has the wrong dtype or sits on the wrong device."""


def check_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise DTypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def check_size(name: str, value: object) -> None:
    """A size-like argument: an int >= 1 (a bool is refused, though Python counts it as an int)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ShapeError(f"{name}: expected a positive int, got {value!r}")


def check_floating(name: str, tensor: Tensor) -> None:
    if not tensor.is_floating_point():
        raise DTypeError(f"{name}: expected a floating-point tensor, got dtype {tensor.dtype}")


def check_ndim(name: str, tensor: Tensor, allowed: Sequence[int]) -> None:
    if tensor.dim() not in allowed:
        expected = " or ".join(f"{n}-D" for n in allowed)
        raise ShapeError(f"{name}: expected a {expected} tensor, got shape {tuple(tensor.shape)}")


def check_shape(name: str, tensor: Tensor, expected: Sequence[int]) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ShapeError(f"{name}: expected shape {tuple(expected)}, got {tuple(tensor.shape)}")


def check_matches(name: str, tensor: Tensor, dtype: torch.dtype, device: torch.device, owner: str) -> None:
    """`tensor` must have `dtype` and live on `device`, those of `owner` (e.g. "the module's parameters")."""
    if tensor.device != device:
        raise DTypeError(f"{name}: expected a tensor on {device} (as {owner}), got one on {tensor.device}")
    if tensor.dtype != dtype:
        raise DTypeError(f"{name}: expected dtype {dtype} (as {owner}), got {tensor.dtype}")
