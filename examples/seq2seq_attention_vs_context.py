"""Why attention exists: the context-vector encoder-decoder against the same model with attention, on sequence
reversal at source lengths from 5 to 60, trained on CPU with seqkern's fused kernels.

Task: a source of 5..60 symbols drawn from 20 (ids 3..22; pad 0, bos 1, eos 2); the target is the source reversed.
Both models (Seq2Seq with attention=None and attention="additive", otherwise identical: bidirectional LSTM encoder,
LSTM decoder, same sizes, same batches, same number of steps) are trained on lengths drawn uniformly from 5..60, then
greedy-decoded on held-out sequences at every length. The context-vector model must squeeze the whole source into the
decoder's initial state; the attention model reads the encoder's outputs at every step.

    python examples/seq2seq_attention_vs_context.py            # the full run (~3-4 minutes on 2 cores)
    python examples/seq2seq_attention_vs_context.py --quick    # smoke run: a few steps, tiny held-out set

Prints the loss during training and, per source-length bucket, the held-out exact match and token accuracy of both
models; writes the accuracy-against-length plot (--out) and the attention heatmap of one long example (--heatmap).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's seqkern, whatever is installed

from seqkern.models import Seq2Seq, plot_attention  # noqa: E402

PAD, BOS, EOS = 0, 1, 2
SYMBOLS = 20
VOCAB = EOS + 1 + SYMBOLS
MIN_LEN, MAX_LEN = 5, 60
BUCKETS = ((5, 10), (11, 20), (21, 30), (31, 40), (41, 50), (51, 60))
MODEL = dict(embed_dim=64, hidden_size=128, rnn="lstm", bidirectional=True, pad_id=PAD, bos_id=BOS, eos_id=EOS)
KINDS = {"context vector (attention=None)": None, "additive attention": "additive"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=700, help="training steps per model (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate, cosine-decayed to 0")
    parser.add_argument("--held-out", type=int, default=40, help="held-out sequences per length bucket")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("seq2seq_attention_vs_context.png"))
    parser.add_argument("--heatmap", type=Path, default=Path("seq2seq_attention_long_example.png"))
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 steps, 2 held-out sequences per bucket")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.held_out, args.log_every = 3, 2, 1
    if min(args.steps, args.batch_size, args.held_out, args.log_every) < 1:
        parser.error("--steps, --batch-size, --held-out and --log-every must be >= 1")
    return args


# ------------------------------------------------------------------------------------------------------------
# Data.
# ------------------------------------------------------------------------------------------------------------
def draw(generator: torch.Generator, low: int = MIN_LEN, high: int = MAX_LEN) -> list[int]:
    length = int(torch.randint(low, high + 1, (), generator=generator))
    return torch.randint(EOS + 1, VOCAB, (length,), generator=generator).tolist()


def collate(sequences: list[list[int]]) -> tuple[torch.Tensor, ...]:
    """src (B,S) padded, src_lengths (B,), tgt_in (B,S+1) = bos + reversed, tgt_out (B,S+1) = reversed + eos."""
    width = max(len(s) for s in sequences)
    src = torch.full((len(sequences), width), PAD)
    tgt_in, tgt_out = torch.full((len(sequences), width + 1), PAD), torch.full((len(sequences), width + 1), PAD)
    for i, seq in enumerate(sequences):
        src[i, :len(seq)] = torch.tensor(seq)
        tgt_in[i, :len(seq) + 1] = torch.tensor([BOS, *seq[::-1]])
        tgt_out[i, :len(seq) + 1] = torch.tensor([*seq[::-1], EOS])
    return src, torch.tensor([len(s) for s in sequences]), tgt_in, tgt_out


def held_out_sets(per_bucket: int, seed: int) -> dict[tuple[int, int], list[list[int]]]:
    """Per length bucket, `per_bucket` sequences from their own generator (a random 5..60 sequence of 20 symbols
    repeats with negligible probability, so training never sees them in practice)."""
    generator = torch.Generator().manual_seed(seed + 1000)
    return {bucket: [draw(generator, *bucket) for _ in range(per_bucket)] for bucket in BUCKETS}


# ------------------------------------------------------------------------------------------------------------
# Training and evaluation.
# ------------------------------------------------------------------------------------------------------------
def train(model: Seq2Seq, args: argparse.Namespace, label: str) -> tuple[list[float], float]:
    """Adam with cosine decay on fresh random batches (the same batches for every model: same seed)."""
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    losses, start = [], time.perf_counter()
    model.train()
    for step in range(args.steps):
        src, lengths, tgt_in, tgt_out = collate([draw(generator) for _ in range(args.batch_size)])
        loss = F.cross_entropy(model(src, lengths, tgt_in).logits.flatten(0, 1), tgt_out.flatten(), ignore_index=PAD)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            print(f"  {label}: step {step + 1:4d}  loss {statistics.mean(losses[-args.log_every:]):.4f}  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    return losses, time.perf_counter() - start


@torch.no_grad()
def accuracy(model: Seq2Seq, sequences: list[list[int]]) -> tuple[float, float]:
    """(exact match, token accuracy) of greedy decoding; a token counts when it equals the target at its position
    (eos included), so a decoding that stops early or runs on loses the positions it gets wrong."""
    model.eval()
    src, lengths, _, tgt_out = collate(sequences)
    tokens = model.greedy_decode(src, lengths, max_len=tgt_out.shape[1]).tokens
    tokens = F.pad(tokens, (0, tgt_out.shape[1] - tokens.shape[1]), value=PAD)
    real = tgt_out != PAD
    exact = ((tokens == tgt_out) | ~real).all(1).float().mean().item()
    per_token = ((tokens == tgt_out) & real).sum().item() / real.sum().item()
    return exact, per_token


def plot(path: Path, table: dict[str, dict[tuple[int, int], tuple[float, float]]], losses: dict[str, list[float]]):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4))
    exact_axes, token_axes, loss_axes = figure.subplots(1, 3)
    centers = [(low + high) / 2 for low, high in BUCKETS]
    for label, rows in table.items():
        exact_axes.plot(centers, [rows[b][0] for b in BUCKETS], marker="o", label=label)
        token_axes.plot(centers, [rows[b][1] for b in BUCKETS], marker="o", label=label)
        loss_axes.plot(losses[label], label=label, linewidth=0.8)
    for axes, title in ((exact_axes, "held-out exact match"), (token_axes, "held-out token accuracy")):
        axes.set_xlabel("source length")
        axes.set_ylim(-0.02, 1.02)
        axes.set_title(title)
        axes.grid(alpha=0.3)
    loss_axes.set_yscale("log")
    loss_axes.set_xlabel("training step")
    loss_axes.set_title("training loss")
    token_axes.legend(fontsize="small")
    figure.suptitle("reversal: the context-vector encoder-decoder vs attention (seqkern, CPU)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def heatmap(model: Seq2Seq, sequence: list[int], path: Path) -> Path:
    model.eval()
    src, lengths, _, _ = collate([sequence])
    decoded = model.greedy_decode(src, lengths, max_len=len(sequence) + 1)
    generated = int(decoded.lengths[0])
    label = lambda token: {PAD: "<pad>", BOS: "<bos>", EOS: "<eos>"}.get(token, f"s{token - EOS - 1}")  # noqa: E731
    return plot_attention(decoded.attention[0, :generated], [label(t) for t in sequence],
                          [label(t) for t in decoded.tokens[0, :generated].tolist()], path,
                          title=f"reversal of {len(sequence)} symbols: attention")


def main() -> int:
    args = parse_args()
    torch.manual_seed(args.seed)
    held_out = held_out_sets(args.held_out, args.seed)
    table, losses, models = {}, {}, {}
    for label, attention in KINDS.items():
        torch.manual_seed(args.seed)
        model = Seq2Seq(VOCAB, VOCAB, **MODEL, attention=attention)
        print(f"{label}: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
        losses[label], seconds = train(model, args, label)
        print(f"  trained {args.steps} steps in {seconds:.0f} s", flush=True)
        table[label] = {bucket: accuracy(model, sequences) for bucket, sequences in held_out.items()}
        models[label] = model
    print("\nheld-out greedy decoding, exact match / token accuracy, by source length:")
    print("length   " + "".join(f"{label:>36}" for label in table))
    for bucket in BUCKETS:
        print(f"{bucket[0]:2d}-{bucket[1]:2d}    " + "".join(
            f"{rows[bucket][0]:>27.1%} / {rows[bucket][1]:>6.1%}" for rows in table.values()))
    print(f"wrote {plot(args.out, table, losses)}")
    long_example = held_out[BUCKETS[-1]][0]
    print(f"wrote {heatmap(models['additive attention'], long_example, args.heatmap)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
