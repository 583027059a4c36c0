"""The time loop every recurrent reference shares: steps over a sequence, in either direction, with the
PackedSequence convention of seqkern/ops/_schemas.py (rows b >= batch_sizes[t] are inactive at step t: their state
is carried over and what the step records for them is zero)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# step(projected input rows (active, G), state rows [(active, S_i)]) -> (new state rows, recorded rows)
Step = Callable[[Tensor, tuple[Tensor, ...]], tuple[tuple[Tensor, ...], tuple[Tensor, ...]]]


def scan(
    step: Step, inputs: Tensor, state: tuple[Tensor, ...], batch_sizes: Tensor | None, reverse: bool
) -> tuple[list[Tensor], tuple[Tensor, ...]]:
    """inputs (T,B,G), state [(B,S_i)] -> recorded [(T,B,R_j)] stacked over time, final state."""
    seq_len, batch = inputs.shape[0], inputs.shape[1]
    records: list[tuple[Tensor, ...]] = [()] * seq_len
    for t in (range(seq_len - 1, -1, -1) if reverse else range(seq_len)):
        active = batch if batch_sizes is None else int(batch_sizes[t])
        new_state, recorded = step(inputs[t, :active], tuple(s[:active] for s in state))
        state = tuple(_with_rows(new, old, active) for new, old in zip(new_state, state))
        records[t] = tuple(_pad_rows(r, batch) for r in recorded)
    return [torch.stack(parts) for parts in zip(*records)], state


def _with_rows(new: Tensor, old: Tensor, active: int) -> Tensor:
    return new if active == old.shape[0] else torch.cat([new, old[active:]])


def _pad_rows(rows: Tensor, batch: int) -> Tensor:
    missing = batch - rows.shape[0]
    return rows if missing == 0 else torch.cat([rows, rows.new_zeros(missing, rows.shape[1])])
