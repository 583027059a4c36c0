"""The time loop every recurrent reference shares: steps over a sequence, in either direction, with the
conventions of seqkern/ops/_schemas.py for which rows are active at a step, where a row starts again from its
initial state, and zoneout.

Row b is active at time t iff b < batch_sizes[t] (a PackedSequence in sorted order) and t < lengths[b]. An
inactive row's state is carried over unchanged and every value the step records for it is zero. So in the
reverse direction a row of length L starts from its initial state at t = L - 1, as torch.nn does on a packed
sequence.

resets (T,B) bool: where resets[t, b], the state entering step t of row b is its initial state again (a new
episode or document starts there). Only for reverse=False (the ops refuse the combination).

Zoneout (Krueger et al. 2016) blends each state element s of an active row with its value before the step:
  * training (a seed is given): s_t = s_{t-1} where keep(t, b, u), else the step's new value; keep is drawn
    from the counter-based bits of seqkern/reference/flash_attention.py's dropout_bits, so every
    implementation draws the same mask from the same seed and a backward redraws it instead of storing it:
        keep(t, b, u) of state k (0: h, 1: c) = dropout_bits(seed, k, t, b * width_k + u) < zoneout_threshold(p)
    with t the time index (not the processing step) and width_k the state's width;
  * evaluation (no seed): s_t = p * s_{t-1} + (1 - p) * new.
The states the step returns are recorded after zoneout: they are the layer's output.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from seqkern.reference.flash_attention import dropout_bits

# step(projected input rows (active, G), state rows [(active, S_i)]) -> (new state rows, extra recorded rows)
Step = Callable[[Tensor, tuple[Tensor, ...]], tuple[tuple[Tensor, ...], tuple[Tensor, ...]]]


def zoneout_threshold(zoneout: float) -> int:
    """keep iff bits < this: floor(p * 2^32), so keep has probability p (always at p = 1, never at p = 0)."""
    return int(zoneout * 2**32)


def zoneout_keep(seed: Tensor | int, state_index: int, t: int, rows: Tensor, width: int, zoneout: float) -> Tensor:
    """(len(rows), width) bool: which elements of state `state_index` keep their previous value at time t."""
    units = torch.arange(width, device=rows.device)
    bits = dropout_bits(seed, state_index, torch.tensor(t, device=rows.device), rows[:, None] * width + units)
    return bits < zoneout_threshold(zoneout)


def scan(
    step: Step,
    inputs: Tensor,
    state: tuple[Tensor, ...],
    batch_sizes: Tensor | None = None,
    reverse: bool = False,
    *,
    lengths: Tensor | None = None,
    resets: Tensor | None = None,
    zoneout: float = 0.0,
    zoneout_seed: Tensor | None = None,
) -> tuple[list[Tensor], tuple[Tensor, ...]]:
    """inputs (T,B,G), state [(B,S_i)] -> recorded [(T,B,R_j)] stacked over time, final state.

    recorded = the states after each step (after zoneout), then the step's extra records.
    lengths (B,) int, resets (T,B) bool, zoneout in [0, 1], zoneout_seed int64 () or None: see the module doc.
    """
    seq_len, batch = inputs.shape[0], inputs.shape[1]
    initial = state
    records: list[tuple[Tensor, ...]] = [()] * seq_len
    for t in (range(seq_len - 1, -1, -1) if reverse else range(seq_len)):
        if resets is not None:
            state = tuple(torch.where(resets[t, :, None], s0, s) for s0, s in zip(initial, state))
        rows = _active_rows(t, batch, batch_sizes, lengths, inputs.device)
        before = tuple(s[rows] for s in state)
        new_state, extras = step(inputs[t, rows], before)
        new_state = tuple(
            _zoneout(new, old, k, t, rows, zoneout, zoneout_seed)
            for k, (new, old) in enumerate(zip(new_state, before))
        )
        state = tuple(_with_rows(s, rows, new) for s, new in zip(state, new_state))
        records[t] = tuple(_scatter_rows(r, rows, batch) for r in (*new_state, *extras))
    return [torch.stack(parts) for parts in zip(*records)], state


def _active_rows(t: int, batch: int, batch_sizes: Tensor | None, lengths: Tensor | None, device) -> Tensor:
    """The indices (int64) of the rows active at time t."""
    active = torch.ones(batch, dtype=torch.bool, device=device)
    if batch_sizes is not None:
        active &= torch.arange(batch, device=device) < int(batch_sizes[t])
    if lengths is not None:
        active &= lengths.to(device) > t
    return active.nonzero().flatten()


def _zoneout(new: Tensor, old: Tensor, state_index: int, t: int, rows: Tensor, zoneout: float,
             seed: Tensor | None) -> Tensor:
    if zoneout == 0:
        return new
    if seed is None:
        return zoneout * old + (1 - zoneout) * new
    return torch.where(zoneout_keep(seed, state_index, t, rows, new.shape[1], zoneout), old, new)


def _with_rows(state: Tensor, rows: Tensor, new: Tensor) -> Tensor:
    """state with rows `rows` replaced by new (out of place: autograd sees both)."""
    return new if rows.numel() == state.shape[0] else state.index_put((rows,), new)


def _scatter_rows(values: Tensor, rows: Tensor, batch: int) -> Tensor:
    """(len(rows), R) -> (batch, R) with zeros in the rows not listed."""
    return values if rows.numel() == batch else values.new_zeros(batch, values.shape[1]).index_put((rows,), values)
