"""plot_attention: an attention heatmap (generated tokens x source tokens) written to a PNG.

    decoded = model.eval().greedy_decode(src, src_lengths, max_len=50)
    n, m = int(src_lengths[0]), int(decoded.lengths[0])
    plot_attention(decoded.attention[0, :m, :n], source_labels, target_labels, "attention.png")

matplotlib is an optional dependency (`pip install seqkern[plot]`), imported only when a plot is drawn. The figure is
a bare matplotlib.figure.Figure, never pyplot: it renders without a display and leaves the caller's backend (a
notebook's, say) and pyplot's list of open figures as they were.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from seqkern._checks import DTypeError, ShapeError, check_tensor

# Inches per heatmap cell, and the bounds of the figure's side: legible labels for 5 tokens and for 100.
CELL_INCHES, MIN_INCHES, MAX_INCHES = 0.35, 3.0, 24.0


def plot_attention(weights: Tensor, source_tokens: Sequence[str], target_tokens: Sequence[str],
                   path: str | Path, title: str | None = None) -> Path:
    """Draw weights (T generated, S source) as a heatmap: one row per generated token, one column per source token.

    source_tokens: S labels of the columns, target_tokens: T labels of the rows (e.g. the decoded tokens, eos
    included). Returns the path of the PNG written (its folder is created).
    """
    check_tensor("weights", weights)
    if weights.dim() != 2 or not weights.dtype.is_floating_point:
        raise ShapeError(f"weights: expected a 2-D floating tensor (generated tokens, source tokens), "
                         f"got {weights.dim()}-D {weights.dtype}")
    for name, labels, size in (("source_tokens", source_tokens, weights.shape[1]),
                               ("target_tokens", target_tokens, weights.shape[0])):
        if isinstance(labels, str) or not all(isinstance(label, str) for label in labels):
            raise DTypeError(f"{name}: expected a sequence of str labels, got {type(labels).__name__}")
        if len(labels) != size:
            raise ShapeError(f"{name}: expected {size} labels (weights is {tuple(weights.shape)}), got {len(labels)}")

    from matplotlib.figure import Figure

    rows, cols = weights.shape
    figure = Figure(figsize=[min(max(CELL_INCHES * n + 1.5, MIN_INCHES), MAX_INCHES) for n in (cols, rows)])
    axes = figure.subplots()
    image = axes.imshow(weights.detach().float().cpu().numpy(), cmap="viridis", vmin=0.0, vmax=1.0,
                        aspect="auto", interpolation="nearest")
    axes.set_xticks(range(cols), list(source_tokens), rotation=90)
    axes.set_yticks(range(rows), list(target_tokens))
    axes.set_xlabel("source token")
    axes.set_ylabel("generated token")
    if title:
        axes.set_title(title)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path
