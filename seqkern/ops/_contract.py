"""The argument contract of each op (csrc/ops.cpp documents the schemas), checked once: in the op's fake
implementation, with torch._check, so torch.compile (which runs the fakes) refuses what eager refuses.

The conditions are those of the C++ kernels' checks (csrc/cpu/recurrence_layer.h `ArgChecker`, the attention
kernels' FA_CHECK), and raise the same exception type: RuntimeError, as TORCH_CHECK. Data-dependent conditions
(values of batch_sizes, cu_seqlens, cache_seqlens) cannot be checked on fake tensors: the kernels keep them.
The modules and public functions of seqkern check the user's arguments before this, in their own terms.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

RECURRENT_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
ATTENTION_DTYPES = RECURRENT_DTYPES + (torch.float16,)


class Contract:
    """torch._check helpers whose messages name the op: "seqkern lstm_forward: h0 must have shape ..."."""

    def __init__(self, op: str, dtypes: tuple[torch.dtype, ...] = RECURRENT_DTYPES):
        self.op, self.dtypes = op, dtypes

    def check(self, condition, message: str) -> None:
        torch._check(condition, lambda: f"seqkern {self.op}: {message}")

    def dims(self, t: Tensor, ndim: int, layout: str, name: str) -> None:
        self.check(t.dim() == ndim, f"{name} must be {layout}, got shape {tuple(t.shape)}")

    def shape(self, t: Tensor, expected: Sequence, name: str) -> None:
        """One torch._check per dim: symbolic sizes get a runtime assertion instead of a specialization."""
        self.check(t.dim() == len(expected), f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")
        for size, want in zip(t.shape, expected):
            self.check(size == want, f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")

    def like(self, t: Tensor, like: Tensor, name: str, dtype: torch.dtype | None = None) -> None:
        """t has like's device and `dtype` (default: like's)."""
        dtype = like.dtype if dtype is None else dtype
        self.check(t.device == like.device, f"{name} must be on {like.device}, got {t.device}")
        self.check(t.dtype == dtype, f"{name} must have dtype {dtype}, got {t.dtype}")

    def tensor(self, t: Tensor, like: Tensor, expected: Sequence, name: str, dtype: torch.dtype | None = None) -> None:
        self.shape(t, expected, name)
        self.like(t, like, name, dtype)

    def supported_dtype(self, t: Tensor, name: str) -> None:
        self.check(t.dtype in self.dtypes, f"{name} must be one of {self.dtypes}, got {t.dtype}")

    def last_dim_contiguous(self, t: Tensor, name: str) -> None:
        self.check(t.numel() == 0 or t.dim() == 0 or t.stride(-1) == 1 or t.shape[-1] <= 1,
                   f"{name} must have stride(-1) == 1, got strides {t.stride()}")

    def contiguous(self, t: Tensor, name: str) -> None:
        self.check(t.is_contiguous(), f"{name} must be contiguous")

    def biases(self, b_ih: Tensor | None, b_hh: Tensor | None, size, like: Tensor) -> None:
        """Both biases or neither, each (size,) like `like`."""
        self.check((b_ih is None) == (b_hh is None), "b_ih and b_hh must be given together")
        for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
            if b is not None:
                self.tensor(b, like, (size,), name)

    def batch_sizes(self, batch_sizes: Tensor | None, seq_len) -> None:
        """(T,) int64; its values (non-increasing, in [0, B]) are data: the kernels check them."""
        if batch_sizes is not None:
            self.check(batch_sizes.dtype == torch.int64, f"batch_sizes must be int64, got {batch_sizes.dtype}")
            self.shape(batch_sizes, (seq_len,), "batch_sizes")

    def state_flags(self, input: Tensor, batch_sizes: Tensor | None, lengths: Tensor | None,
                    resets: Tensor | None, reverse: bool, zoneout: float = 0.0,
                    zoneout_seed: Tensor | None = None) -> None:
        """lengths (B,) int64, resets (T,B) bool on the input's device, zoneout in [0, 1], zoneout_seed int64 ()
        (seqkern/ops/_schemas.py). The values of lengths ([0, T]) are data: the kernels check them. Combinations
        the ops do not define raise ValueError (torch._check_value) naming the argument."""
        seq_len, batch = input.shape[0], input.shape[1]
        if lengths is not None:
            torch._check_value(batch_sizes is None, lambda: f"seqkern {self.op}: lengths and batch_sizes cannot be "
                               "given together (a PackedSequence's batch_sizes already say which rows are active)")
            self.tensor(lengths, input, (batch,), "lengths", torch.int64)
        if resets is not None:
            torch._check_value(not reverse, lambda: f"seqkern {self.op}: resets cannot be given with reverse=True "
                               "(an episode boundary is defined in the forward direction only)")
            self.tensor(resets, input, (seq_len, batch), "resets", torch.bool)
        self.check(0.0 <= zoneout <= 1.0, f"zoneout must be in [0, 1], got {zoneout}")
        if zoneout_seed is not None:
            self.tensor(zoneout_seed, input, (), "zoneout_seed", torch.int64)

    def layer(self, gates: int, input: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, w_hr: Tensor | None = None):
        """input (T,B,I), w_ih (gates*H, I), w_hh (gates*H, P), h0 (B,P), w_hr (P,H) or None
        -> (T, B, I, H, P): the shared arguments of every recurrent layer op (P = H without a projection)."""
        self.supported_dtype(input, "input")
        self.dims(input, 3, "(T, B, input_size)", "input")
        self.dims(w_ih, 2, f"({gates}*hidden, input_size)", "w_ih")
        self.check(w_ih.shape[0] % gates == 0, f"w_ih must be ({gates}*hidden, input_size), got {tuple(w_ih.shape)}")
        seq_len, batch, input_size = input.shape
        hidden = w_ih.shape[0] // gates
        if w_hr is not None:
            self.dims(w_hr, 2, "(proj_size, hidden)", "w_hr")
        out_size = hidden if w_hr is None else w_hr.shape[0]
        self.tensor(w_ih, input, (gates * hidden, input_size), "w_ih")
        self.tensor(w_hh, input, (gates * hidden, out_size), "w_hh")
        self.tensor(h0, input, (batch, out_size), "h0")
        if w_hr is not None:
            self.tensor(w_hr, input, (out_size, hidden), "w_hr")
        return seq_len, batch, input_size, hidden, out_size

    def cell_state(self, state: Tensor, name: str):
        """The (B, hidden) tensor a cell op takes its sizes from -> (B, hidden)."""
        self.supported_dtype(state, name)
        self.dims(state, 2, "(B, hidden)", name)
        return state.shape
