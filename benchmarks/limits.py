"""What the machine allows: the fastest any implementation could run each target row of issues 14 and 16, measured.

    python -m benchmarks.limits        # idle machine, ~1 min; prints a table, writes bench_results/limits.json

For each row it takes the default benchmark set's case of that name, times its baseline contender (torch.nn, SDPA,
the composed LayerNorm LSTM: the call the benchmark row times, in the benchmark's allocator state: freed memory kept,
see harness.keep_freed_memory) and measures a *floor*, a time no implementation can beat on this machine:

- GEMM-bound rows: the case's matrix-product work (Case.flops) at the best float32 (or bfloat16) rate this machine
  reaches on a large square product (MKL / oneDNN through torch.mm, both threads), every other part of the work
  taken as free.
  Real GEMMs of the row's shapes (32-row steps, 256-deep products) run slower than that, so the floor is low.
- Memory-bound rows (decode): the bytes the case must read (Case.bytes_moved) at the machine's read bandwidth (the
  fastest of torch's sum, torch's dot and a compiled streaming read over 1 GiB, every thread).
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


# A plain streaming read: each thread sums its share of the buffer into four independent 64-byte vectors (GCC
# vector extensions: one vector add per load, whatever the ISA). torch's x.sum reads at 28-29 GB/s and torch.dot at
# 32-34 on the 2-core Xeon where this reads at ~36 (and seqkern's decode kernel at ~37): a floor from torch's
# readers alone was not one.
_STREAM_READ_SOURCE = """
#include <torch/extension.h>
#include <omp.h>
#include <cstring>
typedef float Lanes __attribute__((vector_size(64)));
double stream_read_sum(const torch::Tensor& x) {
  const float* data = x.data_ptr<float>();
  const int64_t n = x.numel();
  double total = 0;
#pragma omp parallel reduction(+ : total)
  {
    const int64_t parts = omp_get_num_threads(), part = omp_get_thread_num();
    const int64_t begin = n / parts * part, end = part == parts - 1 ? n : begin + n / parts;
    Lanes sum[4] = {};
    int64_t i = begin;
    for (; i + 64 <= end; i += 64)
      for (int v = 0; v < 4; ++v) {
        Lanes chunk;
        std::memcpy(&chunk, data + i + 16 * v, sizeof(chunk));
        sum[v] += chunk;
      }
    for (const Lanes& lanes : sum)
      for (int l = 0; l < 16; ++l) total += lanes[l];
    for (; i < end; ++i) total += data[i];
  }
  return total;
}
"""


def _stream_reader() -> Callable[[torch.Tensor], float] | None:
    """The compiled streaming read (for this machine's CPU), or None where it does not build."""
    from torch.utils import cpp_extension
    try:
        module = cpp_extension.load_inline(
            "seqkern_limits_stream_read", _STREAM_READ_SOURCE, functions=["stream_read_sum"],
            extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # no compiler, or an unknown -march: torch's readers alone
        print(f"limits: the streaming read did not build ({type(error).__name__}); torch's readers only")
        return None
    return module.stream_read_sum


def read_bandwidth() -> tuple[float, str]:
    """The fastest read of 1 GiB of float32 on every thread, bytes per second, and which reader it was: torch's
    x.sum, torch.dot(x, y) (two buffers) and a compiled streaming read, the best round of each."""
    x, y = torch.ones(GIB // 4), torch.ones(GIB // 4)
    rates = {"torch sum": GIB / _seconds(x.sum, best=True),
             "torch dot": 2 * GIB / _seconds(lambda: torch.dot(x, y), best=True)}
    stream_read = _stream_reader()
    if stream_read is not None:
        assert stream_read(x) == x.numel(), "the streaming read must read every element"
        rates["streaming read"] = GIB / _seconds(lambda: stream_read(x), best=True)
    reader = max(rates, key=rates.get)
    return rates[reader], reader


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


def memory_limit(module: ModuleType, label: str, target: float, bandwidth: tuple[float, str]) -> Limit:
    """A memory-bound row: the bytes the case must read (Case.bytes_moved) at the read bandwidth."""
    case = benchmark_case(module, label)
    rate, reader = bandwidth
    return Limit(label, target, _baseline_seconds(case), case.bytes_moved / rate,
                 f"{case.bytes_moved / 1e6:.0f} MB at {rate / 1e9:.1f} GB/s ({reader})")


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
