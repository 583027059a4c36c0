"""The correctness rule of DESIGN.md and small tools the tests share.

    max|seqkern - ref_fp64| <= 2 * max|torch_same_dtype - ref_fp64| + floor(dtype)
"""
from __future__ import annotations

import torch
from torch import Tensor

# Absorbs the case where PyTorch happens to be exact (its error 0) and a few ulps of summation order.
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def assert_rule(name: str, ours: Tensor, theirs: Tensor, ref64: Tensor) -> None:
    """`ours` is no more than twice as far from the float64 reference as PyTorch's `theirs` (plus the floor)."""
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    assert ours.dtype == theirs.dtype, f"{name}: dtype {ours.dtype} != {theirs.dtype}"
    ref64 = ref64.double()
    our_error = (ours.double() - ref64).abs().max().item() if ours.numel() else 0.0
    their_error = (theirs.double() - ref64).abs().max().item() if theirs.numel() else 0.0
    bound = 2 * their_error + FLOOR[ours.dtype]
    assert our_error <= bound, f"{name}: error {our_error:.3e} > 2 x torch's {their_error:.3e} + floor"


def assert_all_rule(ours: dict[str, Tensor], theirs: dict[str, Tensor], ref64: dict[str, Tensor]) -> None:
    assert ours.keys() == theirs.keys() == ref64.keys(), (ours.keys(), theirs.keys(), ref64.keys())
    for name in ours:
        assert_rule(name, ours[name], theirs[name], ref64[name])
