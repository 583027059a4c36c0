"""What the machine allows: the fastest any implementation could run each target row of issues 14 and 16, measured.

    python -m benchmarks.limits        # idle machine, ~1 min; prints a table, writes bench_results/limits.json

For each row it takes the default benchmark set's case of that name, times its baseline contender (torch.nn, SDPA,
the composed LayerNorm LSTM: the call the benchmark row times) and measures a *floor*, a time no implementation can
beat on this machine:

- GEMM-bound rows: the case's matrix-product work (Case.flops) at the best float32 (or bfloat16) rate this machine
  reaches on a large square product (MKL / oneDNN through torch.mm, both threads), every other part of the work
  taken as free.
  Real GEMMs of the row's shapes (32-row steps, 256-deep products) run slower than that, so the floor is low.
- Memory-bound rows (decode): the bytes the case must read (Case.bytes_moved) at the machine's read bandwidth (a
  2-thread sum over 1 GiB).
- The language-model row: Amdahl. Only its LSTM is seqkern's; the rest of the step (embedding, the 10000-way
  decoder, cross-entropy, clipping, SGD) is torch's in both contenders. Floor = the step's time minus torch's LSTM
  time at the step's shape plus the LSTM's GEMM floor.

best ratio = baseline time / floor: a target above it cannot be reached on this machine, whatever the kernel.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from benchmarks import bench_attention, bench_gru, bench_layernorm_lstm, bench_lstm, bench_lstm_lm, bench_rnn
from benchmarks.harness import DEFAULT_BUDGET, Case, configure_process, environment, time_call, time_interleaved

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Limit:
    row: str
    target: float
    baseline_s: float
    floor_s: float
    floor_how: str

    @property
    def best_ratio(self) -> float:
        return self.baseline_s / self.floor_s

    @property
    def reachable(self) -> bool:
        return self.best_ratio >= self.target


def _seconds(call: Callable[[], object], best: bool = False) -> float:
    """Median time of a call, or with `best` its fastest round: the machine's peaks are what it can do, so a
    floor built on them takes the fastest round (this VM's speed drifts by 10-20% between runs)."""
    timing = time_call(call, DEFAULT_BUDGET)
    return timing.min_s if best else timing.median_s


def gemm_peak_flops(dtype: torch.dtype) -> float:
    """The best rate of a large square product (2048 and 4096) in `dtype`, FLOP/s."""
    best = 0.0
    for size in (2048, 4096):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        best = max(best, 2 * size**3 / _seconds(lambda: torch.mm(a, b), best=True))
    return best


def read_bandwidth() -> float:
    """Bytes per second a sum over 1 GiB of float32 reads (every thread)."""
    x = torch.ones(GIB // 4)
    return GIB / _seconds(x.sum, best=True)


def benchmark_case(module: ModuleType, label: str) -> Case:
    """The default-set case `label` ("op case") of a benchmark module: its work and its baseline, as timed there."""
    return next(case for case in module.cases() if case.label == label)


def _baseline_seconds(case: Case) -> float:
    return _seconds(case.contenders[case.rule_baseline]())


def gemm_limit(module: ModuleType, label: str, target: float, peaks: dict[str, float]) -> Limit:
    """A GEMM-bound row: the case's matrix-product work (Case.flops) at the peak of its dtype."""
    case = benchmark_case(module, label)
    dtype = case.params.get("dtype", "float32")  # the LayerNorm cases are float32 only and do not say it
    return Limit(label, target, _baseline_seconds(case), case.flops / peaks[dtype],
                 f"{case.flops / 1e9:.2f} GFLOP at the {dtype} peak {peaks[dtype] / 1e9:.0f} GFLOP/s")


def memory_limit(module: ModuleType, label: str, target: float, bandwidth: float) -> Limit:
    """A memory-bound row: the bytes the case must read (Case.bytes_moved) at the read bandwidth."""
    case = benchmark_case(module, label)
    return Limit(label, target, _baseline_seconds(case), case.bytes_moved / bandwidth,
                 f"{case.bytes_moved / 1e6:.0f} MB at {bandwidth / 1e9:.1f} GB/s")


def _torch_lstm_training_step(shape: bench_lstm_lm.Shape) -> Callable[[], None]:
    """torch.nn.LSTM forward and backward at the language model's shape (its embedding size in, bptt steps)."""
    torch.manual_seed(0)
    module = torch.nn.LSTM(shape.embed, shape.hidden, shape.layers)
    x = torch.randn(shape.bptt, shape.batch, shape.embed, requires_grad=True)
    return lambda: module(x)[0].sum().backward()


def language_model_limit(target: float, peak: float) -> Limit:
    """Amdahl: the step with torch.nn.LSTM's time replaced by the LSTM's own GEMM floor (the step's work without
    its decoder: bench_lstm_lm.flops at vocab 0)."""
    shape = bench_lstm_lm.DEFAULT_SHAPES[0]
    case = benchmark_case(bench_lstm_lm, f"lstm_lm {shape.name}")
    times = time_interleaved({"step": case.contenders[case.rule_baseline](),
                              "lstm": _torch_lstm_training_step(shape)}, DEFAULT_BUDGET)
    step_s, lstm_s = times["step"].median_s, times["lstm"].median_s
    lstm_floor = bench_lstm_lm.flops(dataclasses.replace(shape, vocab=0)) / peak
    return Limit(case.label, target, step_s, step_s - lstm_s + lstm_floor,
                 f"step minus torch.nn.LSTM's {lstm_s * 1e3:.1f} ms (fwd+bwd, {lstm_s / step_s:.0%} of the step) "
                 f"plus its GEMM floor {lstm_floor * 1e3:.1f} ms")


def limits() -> list[Limit]:
    peaks = {"float32": gemm_peak_flops(torch.float32), "bfloat16": gemm_peak_flops(torch.bfloat16)}
    bandwidth = read_bandwidth()
    return [
        gemm_limit(bench_lstm, "lstm infer b32 t100 h256", 1.0, peaks),
        gemm_limit(bench_lstm, "lstm train b32 t100 h256", 1.5, peaks),
        gemm_limit(bench_gru, "gru train b32 t100 h256", 2.0, peaks),
        gemm_limit(bench_rnn, "rnn train b32 t100 h256", 2.0, peaks),
        gemm_limit(bench_lstm, "lstm infer b32 t100 h256 bfloat16", 1.0, peaks),
        gemm_limit(bench_lstm, "lstm train b32 t100 h256 bfloat16", 1.0, peaks),
        language_model_limit(1.2, peaks["float32"]),
        gemm_limit(bench_layernorm_lstm, "layernorm_lstm train b32 t100 h256", 4.0, peaks),  # issue 16
        memory_limit(bench_attention, "attention decode b1 hq32 hkv8 cache32768 d128", 5.0, bandwidth),
        memory_limit(bench_attention, "attention decode b1 hq32 hkv8 cache32768 d128 bfloat16", 5.0, bandwidth),
    ]


def table(rows: list[Limit]) -> str:
    lines = ["| row | target | baseline ms | floor ms | best ratio possible | floor |", "|---|---|---|---|---|---|"]
    for r in rows:
        verdict = "" if r.reachable else " (target out of reach)"
        lines.append(f"| {r.row} | {r.target:.1f}x | {r.baseline_s * 1e3:.2f} | {r.floor_s * 1e3:.2f} | "
                     f"{r.best_ratio:.2f}x{verdict} | {r.floor_how} |")
    return "\n".join(lines)


def main() -> None:
    configure_process()
    env = environment()
    rows = limits()
    print(f"{env['cpu_model']}, {env['torch_num_threads']} threads, torch {env['torch']}")
    print(table(rows))
    out = Path("bench_results")
    out.mkdir(exist_ok=True)
    (out / "limits.json").write_text(json.dumps(
        {"environment": env, "rows": [{**dataclasses.asdict(r), "best_ratio": r.best_ratio} for r in rows]},
        indent=2))


if __name__ == "__main__":
    main()
