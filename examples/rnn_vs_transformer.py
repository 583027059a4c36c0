"""RNNs against the Transformer on one task whose dependency distance we control: an LSTM, a GRU and a causal
Transformer of about the same parameter count, trained on CPU with seqkern's fused layers; parameters, training time
per step (seqkern's layers and torch.nn's, same weights), and accuracy against the dependency distance.

Task, "delayed recall": a sequence of T symbols drawn uniformly from K; at every position t >= d the model must output
the symbol it read d positions earlier (y_t = x_{t-d}); chance is 1/K. Every model reads left to right only (the
Transformer through a causal mask), so each must carry x_{t-d} across d steps: in its recurrent state for the RNNs,
by attending d positions back for the Transformer. One model of each kind is trained per distance d, with the same
number of steps, batches and learning rate.

    python examples/rnn_vs_transformer.py            # the full run (~4 minutes on 2 cores)
    python examples/rnn_vs_transformer.py --quick    # smoke run

Prints the parameter counts, the time per training step of each model with seqkern's layers and with torch.nn's
(interleaved rounds, medians), and the held-out accuracy per distance; writes the plots (--out).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's seqkern, whatever is installed

import seqkern  # noqa: E402

SYMBOLS = 8
LENGTH = 64
DISTANCES = (1, 4, 16, 32, 48)
EMBED = 64


class Recurrent(nn.Module):
    """Embedding -> 2-layer LSTM or GRU -> linear over the symbols; x (B, T) -> logits (B, T, K)."""

    def __init__(self, kind: str, hidden: int, layers: str) -> None:
        super().__init__()
        self.embed = nn.Embedding(SYMBOLS, EMBED)
        library = seqkern.nn if layers == "seqkern" else nn
        self.rnn = getattr(library, kind)(EMBED, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, SYMBOLS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(x))[0])


class CausalTransformer(nn.Module):
    """Embedding + learned positions -> 2 pre-norm causal encoder layers -> linear; x (B, T) -> logits (B, T, K)."""

    def __init__(self, d_model: int, layers: str) -> None:
        super().__init__()
        self.embed = nn.Embedding(SYMBOLS, d_model)
        self.position = nn.Parameter(torch.randn(LENGTH, d_model) * 0.02)
        library = seqkern.nn if layers == "seqkern" else nn
        self.layers = nn.ModuleList(
            library.TransformerEncoderLayer(d_model, 4, 2 * d_model, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(2))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, SYMBOLS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.position[: x.shape[1]]
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        for layer in self.layers:
            h = layer(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))


# Sizes chosen for ~the same parameter count (printed by the script).
MODELS = {
    "LSTM": lambda layers: Recurrent("LSTM", 112, layers),
    "GRU": lambda layers: Recurrent("GRU", 130, layers),
    "Transformer": lambda layers: CausalTransformer(104, layers),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=250, help="training steps per model and distance")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("rnn_vs_transformer.png"))
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 steps, 2 distances, 1 timing round")
    return parser.parse_args()


def batch(size: int, distance: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, T) symbols and targets (B, T): x shifted right by `distance`, -100 (ignored) before it."""
    x = torch.randint(SYMBOLS, (size, LENGTH), generator=generator)
    targets = torch.full_like(x, -100)
    targets[:, distance:] = x[:, :-distance]
    return x, targets


def loss_of(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).flatten(0, 1), targets.flatten(), ignore_index=-100)


def train_and_test(name: str, distance: int, args) -> float:
    """Held-out accuracy of a fresh seqkern-layer model of kind `name` trained at `distance`."""
    torch.manual_seed(args.seed)
    model = MODELS[name]("seqkern")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    for _ in range(args.steps):
        loss = loss_of(model, *batch(args.batch_size, distance, generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    model.eval()
    x, targets = batch(512, distance, torch.Generator().manual_seed(args.seed + 1))
    with torch.no_grad():
        predictions = model(x).argmax(-1)
    scored = targets != -100
    return (predictions[scored] == targets[scored]).float().mean().item()


def step_times(args) -> dict[str, dict[str, float]]:
    """Median seconds per training step (forward, loss, backward, Adam) of every model kind with seqkern's layers
    and with torch.nn's (the same weights), interleaved rounds on the same batch."""
    rounds, steps = (1, 1) if args.quick else (5, 3)
    x, targets = batch(args.batch_size, DISTANCES[-1], torch.Generator().manual_seed(0))
    contenders = {}
    for name, make in MODELS.items():
        torch.manual_seed(0)
        ours = make("seqkern")
        theirs = make("torch")
        theirs.load_state_dict(ours.state_dict())
        for layers, model in (("seqkern", ours), ("torch.nn", theirs)):
            contenders[name, layers] = (model.train(), torch.optim.Adam(model.parameters(), lr=1e-4))
    samples = {key: [] for key in contenders}
    for round_index in range(rounds + 1):  # round 0 warms up and is not counted
        for key, (model, optimizer) in contenders.items():
            start = time.perf_counter()
            for _ in range(steps):
                loss = loss_of(model, x, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if round_index:
                samples[key].append((time.perf_counter() - start) / steps)
    times: dict[str, dict[str, float]] = {}
    for (name, layers), values in samples.items():
        times.setdefault(name, {})[layers] = statistics.median(values)
    return times


def plot(path: Path, accuracy: dict[str, dict[int, float]], times: dict[str, dict[str, float]],
         parameters: dict[str, int], batch_size: int) -> Path:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4))
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    for name, rows in accuracy.items():
        left.plot(list(rows), list(rows.values()), marker="o", label=f"{name} ({parameters[name] / 1000:.0f}k params)")
    left.axhline(1 / SYMBOLS, color="gray", linestyle=":", label="chance")
    left.set_xlabel("dependency distance d (y_t = x_{t-d})")
    left.set_ylabel("held-out accuracy")
    left.set_ylim(0, 1.02)
    left.legend(fontsize="small")
    left.set_title("accuracy against dependency distance")
    names = list(times)
    for offset, layers in ((-0.2, "seqkern"), (0.2, "torch.nn")):
        values = [times[name][layers] * 1e3 for name in names]
        bars = right.bar([i + offset for i in range(len(names))], values, width=0.4, label=f"{layers} layers")
        right.bar_label(bars, fmt="%.1f", fontsize=7)
    right.set_xticks(range(len(names)), names)
    right.set_ylabel("ms per training step")
    right.set_title(f"training step, batch {batch_size}, T {LENGTH}")
    right.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def main() -> int:
    args = parse_args()
    distances = DISTANCES[::2][:2] if args.quick else DISTANCES
    if args.quick:
        args.steps = 2
    parameters = {name: sum(p.numel() for p in make("seqkern").parameters()) for name, make in MODELS.items()}
    print("parameters: " + ", ".join(f"{name} {count:,}" for name, count in parameters.items()), flush=True)
    times = step_times(args)
    print(f"training step (batch {args.batch_size}, T {LENGTH}), median ms: seqkern layers / torch.nn layers")
    for name, row in times.items():
        print(f"  {name:12s} {row['seqkern'] * 1e3:7.1f} / {row['torch.nn'] * 1e3:7.1f}  "
              f"({row['torch.nn'] / row['seqkern']:.2f}x)", flush=True)
    accuracy: dict[str, dict[int, float]] = {name: {} for name in MODELS}
    start = time.perf_counter()
    for distance in distances:
        for name in MODELS:
            accuracy[name][distance] = train_and_test(name, distance, args)
        print(f"d = {distance:2d}: " + ", ".join(f"{name} {accuracy[name][distance]:.1%}" for name in MODELS)
              + f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"wrote {plot(args.out, accuracy, times, parameters, args.batch_size)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
