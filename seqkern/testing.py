"""The correctness rule of DESIGN.md, as the test suite and the benchmarks' gate apply it.

    max|ours - ref_fp64| <= 2 * max|torch_same_dtype - ref_fp64| + floor(dtype) * max(1, max|ref_fp64|)

The floor absorbs the cases where PyTorch happens to be (nearly) exact and a few roundings of a different
summation order. It scales with the tensor's magnitude above 1 because rounding does: with an absolute floor,
a gradient of magnitude 26 got a floor below one float32 ulp of itself, and the rule then judged rounding luck
on tiny tensors, not kernels. Measured (NOTES.md, "Correctness rule: the floor"): on 60 random 2-layer
bidirectional GRUs at T=3, H=3 with inputs in (-9, 9), torch's own composed float32 formula (seqkern's
reference backend) exceeded 2x torch.nn's float32 error on one gradient or another in 10-15% of the draws, at
median ratio 1.00.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

# floor(dtype) per unit of magnitude: ~17 float32 ulps, ~2.5 bfloat16 ulps, ~2 float16 ulps of 1.
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def max_abs_error(value: Tensor, oracle: Tensor) -> float:
    """max|value - oracle| in float64 (0 for empty tensors)."""
    return (value.detach().double() - oracle.detach().double()).abs().max().item() if oracle.numel() else 0.0


def rule_floor(dtype: torch.dtype, oracle: Tensor) -> float:
    """floor(dtype) for a tensor whose float64 oracle is `oracle` (any shape)."""
    scale = oracle.detach().double().abs().max().item() if oracle.numel() else 0.0
    return FLOOR.get(dtype, 0.0) * max(1.0, scale)


def rule_bound(torch_same_dtype: Tensor, oracle: Tensor) -> float:
    """The largest error the rule allows a kernel whose PyTorch counterpart gives `torch_same_dtype`."""
    return 2 * max_abs_error(torch_same_dtype, oracle) + rule_floor(torch_same_dtype.dtype, oracle)


@contextlib.contextmanager
def allow_tf32(allow: bool) -> Iterator[None]:
    """torch.backends.cuda.matmul.allow_tf32 set for the block (pytest's monkeypatch cannot: it is a module
    property). The float32 Triton launchers choose their products (tf32 or full accuracy) and config lists from
    it, so the compile matrix, the interpreter tests and the GPU check set it both ways."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
