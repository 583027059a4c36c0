"""BERT's recipe at laptop scale on seqkern's fused Transformer layers: masked-LM pre-training of a small
BertForMaskedLM on the text that ships with the project, then fine-tuning BertForSequenceClassification (the
pre-trained encoder plus one linear layer) on a small classification task made from the same text, against the same
classifier trained from scratch with the same budget.

Data (both tasks from examples/data/coriolanus_part1.txt, part 1 of Shakespeare's Coriolanus, public domain, shipped
with the project): the speech lines (speaker names dropped), lower-cased words and punctuation, a vocabulary of the
words seen at least twice. The first 80% of the lines are the pre-training text and the fine-tuning training set, the
last 20% the fine-tuning test set (never seen by either phase).
- Pre-training: chunks of the word stream, [CLS] w1 .. wn [SEP], BERT's 15% masking (80% [MASK], 10% random, 10%
  kept), cross-entropy on the selected positions.
- Fine-tuning task, "is this line in Shakespeare's word order?": every line of at least 4 words appears twice, as
  written (label 1) and with its words shuffled (label 0); chance is 50%. Word order is what a masked LM has to learn,
  so this is where transfer should show, if it shows at all at this scale.

    python examples/bert_pretrain_finetune.py            # the full run (~3 minutes on 2 cores)
    python examples/bert_pretrain_finetune.py --quick    # smoke run

Prints the losses, the test accuracy of both classifiers and what pre-training bought (accuracy difference); writes
the loss curves (--out).
"""
from __future__ import annotations

import argparse
import collections
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's seqkern, whatever is installed

from seqkern.models import BertForMaskedLM, BertForSequenceClassification, mask_tokens  # noqa: E402

TEXT = ROOT / "examples" / "data" / "coriolanus_part1.txt"
PAD, UNK, CLS, SEP, MASK = range(5)
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CHUNK = 30  # words per pre-training sequence, [CLS] and [SEP] around them
MAX_LINE = 30  # words kept of a fine-tuning line
MODEL = dict(d_model=96, nhead=4, num_layers=2, dim_feedforward=192, max_len=CHUNK + 2, dropout=0.1)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--finetune-steps", type=int, default=300, help="for each classifier (same budget)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bert_pretrain_finetune.png"))
    parser.add_argument("--quick", action="store_true", help="smoke run: a few steps of each phase")
    args = parser.parse_args()
    if args.quick:
        args.pretrain_steps, args.finetune_steps = 3, 3
    return args


# ------------------------------------------------------------------------------------------------------------
# Data.
# ------------------------------------------------------------------------------------------------------------
def speech_lines(text: str) -> list[list[str]]:
    """The words and punctuation of every line that is not a speaker's name ("First Citizen:") or empty."""
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if not line or (line.endswith(":") and len(line.split()) <= 3):
            continue
        lines.append(re.findall(r"[a-z']+|[.,;:!?]", line.lower()))
    return [words for words in lines if words]


class Vocabulary:
    def __init__(self, lines: list[list[str]]) -> None:
        counts = collections.Counter(word for words in lines for word in words)
        self.words = list(SPECIALS) + sorted(word for word, count in counts.items() if count >= 2)
        self.ids = {word: index for index, word in enumerate(self.words)}

    def encode(self, words: list[str]) -> list[int]:
        return [self.ids.get(word, UNK) for word in words]


def pretraining_chunks(lines: list[list[int]]) -> torch.Tensor:
    """(N, CHUNK + 2): the word stream cut into chunks, [CLS] and [SEP] around each."""
    stream = torch.tensor([token for line in lines for token in line])
    chunks = stream[: len(stream) // CHUNK * CHUNK].view(-1, CHUNK)
    return torch.cat([torch.full((len(chunks), 1), CLS), chunks, torch.full((len(chunks), 1), SEP)], 1)


def word_order_task(lines: list[list[int]], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Every line of >= 4 words as written (1) and shuffled (0): ids (2N, MAX_LINE + 2) padded, labels (2N,)."""
    rows, labels = [], []
    for line in (line[:MAX_LINE] for line in lines if len(line) >= 4):
        shuffled = line
        while shuffled == line:  # a permutation that changes the line (lines of 4+ distinct words: fast)
            shuffled = [line[i] for i in torch.randperm(len(line), generator=generator).tolist()]
        rows += [[CLS, *line, SEP], [CLS, *shuffled, SEP]]
        labels += [1, 0]
    ids = torch.full((len(rows), MAX_LINE + 2), PAD)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return ids, torch.tensor(labels)


# ------------------------------------------------------------------------------------------------------------
# Training.
# ------------------------------------------------------------------------------------------------------------
def pretrain(model: BertForMaskedLM, chunks: torch.Tensor, args, vocab_size: int) -> list[float]:
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-3, total_steps=args.pretrain_steps, pct_start=0.1)
    losses, start = [], time.perf_counter()
    model.train()
    for step in range(args.pretrain_steps):
        batch = chunks[torch.randint(len(chunks), (args.batch_size,), generator=generator)]
        special = (batch == CLS) | (batch == SEP)
        inputs, labels = mask_tokens(batch, MASK, vocab_size, special_tokens_mask=special, generator=generator)
        loss = model(inputs, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % max(1, args.pretrain_steps // 10) == 0:
            print(f"  masked LM step {step + 1:5d}  loss {statistics.mean(losses[-100:]):.3f}  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    return losses


def finetune(model: BertForSequenceClassification, ids: torch.Tensor, labels: torch.Tensor, args,
             label: str) -> list[float]:
    generator = torch.Generator().manual_seed(args.seed + 1)  # the same batches for both classifiers
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
    losses, start = [], time.perf_counter()
    model.train()
    for step in range(args.finetune_steps):
        rows = torch.randint(len(ids), (args.batch_size,), generator=generator)
        loss = model(ids[rows], (ids[rows] != PAD).long(), labels=labels[rows]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % max(1, args.finetune_steps // 5) == 0:
            print(f"  {label}: step {step + 1:4d}  loss {statistics.mean(losses[-50:]):.3f}  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    return losses


@torch.no_grad()
def test_accuracy(model: BertForSequenceClassification, ids: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    predictions = model(ids, (ids != PAD).long()).logits.argmax(-1)
    return (predictions == labels).float().mean().item()


def plot(path: Path, pretraining: list[float], finetuning: dict[str, list[float]]) -> Path:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.8))
    left, right = figure.subplots(1, 2)
    left.plot(pretraining, linewidth=0.6)
    left.set_title("masked-LM pre-training loss")
    left.set_xlabel("step")
    for label, losses in finetuning.items():
        smoothed = [statistics.mean(losses[max(0, i - 19): i + 1]) for i in range(len(losses))]
        right.plot(smoothed, label=label)
    right.axhline(0.6931, color="gray", linestyle=":", label="chance (ln 2)")
    right.set_title("fine-tuning loss (20-step mean)")
    right.set_xlabel("step")
    right.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def main() -> int:
    args = parse_args()
    lines = speech_lines(TEXT.read_text())
    split = int(0.8 * len(lines))
    vocab = Vocabulary(lines[:split])
    encoded = [vocab.encode(words) for words in lines]
    train_lines, test_lines = encoded[:split], encoded[split:]
    chunks = pretraining_chunks(train_lines)
    task_generator = torch.Generator().manual_seed(args.seed)
    train_ids, train_labels = word_order_task(train_lines, task_generator)
    test_ids, test_labels = word_order_task(test_lines, task_generator)
    vocab_size = len(vocab.words)
    print(f"{len(lines)} lines, vocabulary {vocab_size}, {len(chunks)} pre-training chunks of {CHUNK} words; "
          f"word-order task: {len(train_ids)} training / {len(test_ids)} test examples", flush=True)

    torch.manual_seed(args.seed)
    masked_lm = BertForMaskedLM(vocab_size, **MODEL)
    print(f"pre-training ({sum(p.numel() for p in masked_lm.parameters()):,} parameters)", flush=True)
    pretraining = pretrain(masked_lm, chunks, args, vocab_size)

    results, finetuning = {}, {}
    for label, pretrained in (("pre-trained + fine-tuned", True), ("from scratch", False)):
        torch.manual_seed(args.seed + 2)  # the same classifier layer for both
        classifier = BertForSequenceClassification(vocab_size, **MODEL, num_labels=2)
        if pretrained:
            classifier.bert.load_state_dict(masked_lm.bert.state_dict())
        finetuning[label] = finetune(classifier, train_ids, train_labels, args, label)
        results[label] = test_accuracy(classifier, test_ids, test_labels)
    print("\nword-order test accuracy (chance 50%):")
    for label, value in results.items():
        print(f"  {label:26s} {value:.1%}")
    gain = results["pre-trained + fine-tuned"] - results["from scratch"]
    print(f"pre-training bought {gain * 100:+.1f} points with the same fine-tuning budget "
          f"({args.finetune_steps} steps of {args.batch_size})")
    print(f"wrote {plot(args.out, pretraining, finetuning)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
