"""Train a small character-level GPT on CPU, sample from it, and time generation with and without a KV cache.

Text: examples/data/coriolanus_part1.txt, the first 32 KB (Act I up to scene IX) of William Shakespeare's
*Coriolanus* (Shakespeare died in 1616: public domain), as it appears at the start of the "tiny shakespeare"
corpus (repository karpathy/char-rnn, data/tinyshakespeare/input.txt). Shipped in the repository: nothing is
downloaded.

    python examples/char_gpt.py                 # ~110 s of CPU time (one thread): ~2 minutes on 2 idle cores
    python examples/char_gpt.py --steps 2 --new-tokens 4      # smoke run

Prints the training loss every --log-every steps and as a sparkline, the validation loss against the unigram
entropy of the text (asserted well below it after a full run), a generated sample, and generation tokens/s of
  * seqkern's GPT: KV cache, prompt through causal seqkern.attention, each token through seqkern.attention_decode;
  * the same weights in the model built from torch.nn.TransformerEncoderLayer, which has no KV cache and so
    recomputes the whole sequence for every token;
  * that torch.nn model with a plain-PyTorch KV cache and F.scaled_dot_product_attention (an honest yardstick:
    benchmarks/bench_gpt.py's generate_with_sdpa_cache).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's seqkern and benchmarks, whatever is installed

from benchmarks.bench_gpt import generate_with_sdpa_cache  # noqa: E402
from seqkern.models import GPT  # noqa: E402

TEXT = ROOT / "examples" / "data" / "coriolanus_part1.txt"
MODEL = dict(d_model=128, nhead=4, num_layers=3, dim_feedforward=512, max_len=128, dropout=0.1)
# The assertion needs a real run: a few hundred steps. A shorter run (a smoke test) only reports.
MIN_STEPS_FOR_LOSS_CHECK = 300
# "Well below": at most this fraction of the unigram entropy (full runs ended at 0.72: 2.35 against 3.28 nats).
LOSS_CHECK_FRACTION = 0.8
# Prompts of the generation timings: the first characters of the validation text.
PROMPT_LEN = 16
SPARKS = "▁▂▃▄▅▆▇█"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="training steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: %(default)s)")
    parser.add_argument("--log-every", type=int, default=50, help="print the loss every N steps")
    parser.add_argument("--new-tokens", type=int, default=MODEL["max_len"] - PROMPT_LEN,
                        help="tokens generated per prompt, for the sample and the timings (default: %(default)s, "
                             "up to max_len)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if min(args.steps, args.batch_size, args.log_every, args.new_tokens) < 1:
        parser.error("--steps, --batch-size, --log-every and --new-tokens must be >= 1")
    if args.new_tokens > MODEL["max_len"] - PROMPT_LEN:
        parser.error(f"--new-tokens: at most {MODEL['max_len'] - PROMPT_LEN} (max_len - the prompt's {PROMPT_LEN})")
    return args


# ------------------------------------------------------------------------------------------------------------
# Data.
# ------------------------------------------------------------------------------------------------------------
class Characters:
    """The text as ids of its distinct characters; the first 90% trains, the rest validates."""

    def __init__(self, text: str) -> None:
        self.alphabet = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.alphabet)}
        ids = self.encode(text)
        split = int(0.9 * len(ids))
        self.train, self.val = ids[:split], ids[split:]

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index[c] for c in text], dtype=torch.int64)

    def decode(self, ids: torch.Tensor) -> str:
        return "".join(self.alphabet[i] for i in ids.tolist())

    def unigram_entropy(self) -> float:
        """Entropy in nats of the training text's character frequencies: the loss of a model that ignores context."""
        p = torch.bincount(self.train, minlength=len(self.alphabet)).double() / len(self.train)
        return -(p[p > 0] * p[p > 0].log()).sum().item()

    def batch(self, split: torch.Tensor, batch_size: int, length: int, generator: torch.Generator):
        """Random windows: inputs (B, length) and their next characters (B, length)."""
        starts = torch.randint(0, len(split) - length - 1, (batch_size,), generator=generator)
        windows = torch.stack([split[s:s + length + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]


# ------------------------------------------------------------------------------------------------------------
# Training.
# ------------------------------------------------------------------------------------------------------------
def learning_rate(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over the first 5% of the steps, then cosine decay to a tenth of the peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model: GPT, data: Characters, args: argparse.Namespace) -> list[float]:
    """AdamW on random windows of max_len characters; returns the loss of every step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed)
    losses, start = [], time.perf_counter()
    model.train()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr)
        inputs, targets = data.batch(data.train, args.batch_size, model.max_len, generator)
        _, loss = model(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            print(f"step {step + 1:5d}  loss {statistics.mean(losses[-args.log_every:]):.3f}  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    return losses


@torch.no_grad()
def validation_loss(model: GPT, data: Characters, batches: int = 8) -> float:
    model.eval()
    generator = torch.Generator().manual_seed(1)
    return statistics.mean(model(*data.batch(data.val, 16, model.max_len, generator))[1].item() for _ in range(batches))


def sparkline(values: list[float], width: int = 60) -> str:
    """The curve as `width` block characters, each the mean of its share of the values."""
    buckets = [values[i * len(values) // width:(i + 1) * len(values) // width] for i in range(width)]
    means = [statistics.mean(b) for b in buckets if b]
    low, high = min(means), max(means)
    return "".join(SPARKS[round((m - low) / (high - low or 1) * (len(SPARKS) - 1))] for m in means)


# ------------------------------------------------------------------------------------------------------------
# Generation speed.
# ------------------------------------------------------------------------------------------------------------
def tokens_per_second(contenders: dict, tokens: int, rounds: int = 5) -> dict[str, tuple[float, torch.Tensor]]:
    """name -> (median tokens/s, output) of each `generate()` producing `tokens` tokens: one warm-up call each,
    then `rounds` rounds timing every contender once, interleaved so that a change in the machine's load hits
    them alike."""
    outputs = {name: generate() for name, generate in contenders.items()}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, generate in contenders.items():
            start = time.perf_counter()
            generate()
            times[name].append(time.perf_counter() - start)
    return {name: (tokens / statistics.median(times[name]), outputs[name]) for name in contenders}


def compare_generation(model: GPT, data: Characters, batch: int, new: int) -> None:
    """Greedy decoding of `new` tokens after `batch` prompts, by the three contenders on the same weights."""
    twin = GPT(len(data.alphabet), **MODEL, layer_cls=torch.nn.TransformerEncoderLayer).eval()
    twin.load_state_dict(model.state_dict())
    prompt = data.val[:PROMPT_LEN].expand(batch, -1).contiguous()
    contenders = {
        "seqkern GPT (KV cache, decode kernel)": lambda: model.generate(prompt, new, do_sample=False),
        "torch.nn layers, recomputing": lambda: twin.generate(prompt, new, do_sample=False, use_cache=False),
        "torch.nn layers + KV cache + SDPA": lambda: generate_with_sdpa_cache(twin, prompt, new),
    }
    results = tokens_per_second(contenders, batch * new)
    ours, ours_out = results.pop("seqkern GPT (KV cache, decode kernel)")
    print(f"batch {batch}, {prompt.shape[1]}-token prompt, {new} new tokens (greedy):")
    print(f"  {'seqkern GPT (KV cache, decode kernel)':40s} {ours:8.0f} tokens/s")
    for name, (rate, out) in results.items():
        same = "same tokens" if torch.equal(out, ours_out) else "DIFFERENT tokens"
        print(f"  {name:40s} {rate:8.0f} tokens/s   seqkern is {ours / rate:5.2f}x  ({same})")


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    data = Characters(TEXT.read_text())
    model = GPT(len(data.alphabet), **MODEL)
    print(f"{TEXT.name}: {len(data.train) + len(data.val)} characters, {len(data.alphabet)} distinct; "
          f"GPT {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; {torch.get_num_threads()} threads")
    losses = train(model, data, args)
    print(f"loss curve  {sparkline(losses)}  {losses[0]:.2f} -> {statistics.mean(losses[-args.log_every:]):.2f}")
    entropy, val = data.unigram_entropy(), validation_loss(model, data)
    print(f"validation loss {val:.3f} nats/char; unigram entropy of the text {entropy:.3f} "
          f"(ratio {val / entropy:.2f})")
    if args.steps >= MIN_STEPS_FOR_LOSS_CHECK:
        assert val < LOSS_CHECK_FRACTION * entropy, f"validation loss {val:.3f} not below {LOSS_CHECK_FRACTION} x {entropy:.3f}"
    else:
        print(f"(loss check skipped: it needs --steps >= {MIN_STEPS_FOR_LOSS_CHECK})")

    model.eval()
    prompt = data.encode("MENENIUS:\n")[None]
    sample = model.generate(prompt, min(args.new_tokens, model.max_len - prompt.shape[1]), temperature=0.8, top_k=10,
                            generator=torch.Generator().manual_seed(args.seed))
    print("--- sample (temperature 0.8, top-k 10) ---")
    print(data.decode(sample[0]))
    print("---")
    for batch in (1, 8):
        compare_generation(model, data, batch, args.new_tokens)


if __name__ == "__main__":
    main()
