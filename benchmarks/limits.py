"""What the machine allows: the fastest any implementation could run each target row of issues 14 and 16, measured.

    python -m benchmarks.limits        # idle machine, ~1 min; prints a table, writes bench_results/limits.json

For each row it takes the default benchmark set's case of that name, times its baseline contender (torch.nn, SDPA,
the composed LayerNorm LSTM: the call the benchmark row times, in the benchmark's allocator state: freed memory kept,
see harness.keep_freed_memory) and measures a *floor*, a time no implementation can beat on this machine:

- GEMM-bound rows: the case's matrix-product work (Case.flops) at the machine's arithmetic peak in float32 (or
  bfloat16), every other part of the work taken as free. The peak is what the units do on registers alone (compiled
  probes: fp32 FMAs; vdpbf16ps or AMX tiles for bf16), or a large square product's rate (MKL / oneDNN through
  torch.mm, both threads) where that is higher. The large product's rate alone is not a bound: MKL's sgemm on an AMD
  Zen 4 runs at ~80% of the FMA units' rate. The table also gives the ratio at that practical rate: what a kernel
  as fast as the best large GEMM would allow (real GEMMs of the rows' shapes, 32-row steps and 256-deep products,
  run slower still).
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
    practical_floor_s: float | None = None  # the floor at the large-GEMM rate (GEMM-bound rows)

    @property
    def best_ratio(self) -> float:
        return self.baseline_s / self.floor_s

    @property
    def practical_ratio(self) -> float | None:
        return None if self.practical_floor_s is None else self.baseline_s / self.practical_floor_s

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


# Probes of what the machine's units do, compiled for this CPU (-march=native):
# - stream_read_sum: a plain streaming read; each thread sums its share of the buffer into four independent 64-byte
#   vectors (GCC vector extensions: one vector add per load, whatever the ISA). torch's x.sum reads at 28-29 GB/s and
#   torch.dot at 32-34 on the 2-core Xeon where this reads at ~36 (and seqkern's decode kernel at ~37): a floor from
#   torch's readers alone was not one.
# - fp32_flops / dpbf16_flops / amx_bf16_flops: the arithmetic units' throughput, every thread running independent
#   chains on registers only: 12 of vector FMAs, 12 of vdpbf16ps (AVX512-BF16), 4 tiles of AMX tdpbf16ps (0 where the
#   CPU or the compiler lacks the instructions). A GEMM's achieved rate is not a bound: MKL's large sgemm on an AMD
#   Zen 4 runs at 188 GFLOP/s where the FMA units do 230 (NOTES.md "Round 24").
_PROBES_SOURCE = r"""
#include <torch/extension.h>
#include <immintrin.h>
#include <omp.h>
#include <chrono>
#include <cstring>
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
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

// FLOP/s of `body(rounds)` on every thread, `flop_per_round` each; body returns a value that depends on every
// instruction (so that none is optimized away).
template <typename Body>
double rate(int64_t rounds, double flop_per_round, const Body& body) {
  double sink = 0;
  const auto start = std::chrono::steady_clock::now();
  int threads = 1;
#pragma omp parallel reduction(+ : sink)
  {
#pragma omp single
    threads = omp_get_num_threads();
    sink += body(rounds);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return sink == 12345.678 ? 0 : threads * rounds * flop_per_round / seconds;
}

// Vectors of the widest width the compiler was given (ymm on AVX2: 12 chains + 2 constants fit 16 registers).
#if defined(__AVX512F__)
typedef float Vec __attribute__((vector_size(64)));
#else
typedef float Vec __attribute__((vector_size(32)));
#endif
constexpr int kChains = 12;

double fp32_flops(int64_t rounds) {
  constexpr int lanes = sizeof(Vec) / sizeof(float);
  return rate(rounds, 2.0 * lanes * kChains, [](int64_t n) {
    Vec acc[kChains];
    for (int i = 0; i < kChains; ++i) acc[i] = Vec{} + 1.0f + i * 1e-7f;
    const Vec b = Vec{} + 0.999999f, c = Vec{} + 1e-7f;
    for (int64_t r = 0; r < n; ++r)
      for (int i = 0; i < kChains; ++i) acc[i] = acc[i] * b + c;  // contracted to one FMA (-ffp-contract=fast)
    double s = 0;
    for (int i = 0; i < kChains; ++i) s += acc[i][0];
    return s;
  });
}

double dpbf16_flops(int64_t rounds) {
#if defined(__AVX512BF16__)
  return rate(rounds, 64.0 * kChains, [](int64_t n) {  // a vdpbf16ps: 16 lanes x 2 products x 2
    __m512 acc[kChains];
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(i);
    const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = (__m512bh)_mm512_set1_epi16(0x3400);
    for (int64_t r = 0; r < n; ++r)
      for (int i = 0; i < kChains; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
    double s = 0;
    for (int i = 0; i < kChains; ++i) s += _mm512_reduce_add_ps(acc[i]);
    return s;
  });
#else
  return 0;
#endif
}

double amx_bf16_flops(int64_t rounds) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  // The process's permission to use the tiles' state (Linux), once for every thread.
  if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) != 0) return 0;
  return rate(rounds, 4 * 16.0 * 16 * 32 * 2, [](int64_t n) {  // 4 tdpbf16ps of 16 x 16 outputs, depth 32
    alignas(64) unsigned char config[64] = {};
    config[0] = 1;  // palette 1: every tile 16 rows x 64 bytes
    for (int t = 0; t < 8; ++t) config[16 + 2 * t] = 64, config[48 + t] = 16;
    _tile_loadconfig(config);
    alignas(64) static thread_local uint16_t data[16 * 32];
    for (int i = 0; i < 16 * 32; ++i) data[i] = 0x3f80;
    _tile_loadd(4, data, 64);
    _tile_loadd(5, data, 64);
    _tile_loadd(6, data, 64);
    _tile_loadd(7, data, 64);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t r = 0; r < n; ++r) {
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    alignas(64) static thread_local float out[16 * 16];
    _tile_stored(0, out, 64);
    _tile_release();
    return static_cast<double>(out[0]);
  });
#else
  return 0;
#endif
}
"""


def _probes() -> ModuleType | None:
    """The compiled probes (for this machine's CPU), or None where they do not build."""
    from torch.utils import cpp_extension
    try:
        return cpp_extension.load_inline(
            "seqkern_limits_probes", _PROBES_SOURCE,
            functions=["stream_read_sum", "fp32_flops", "dpbf16_flops", "amx_bf16_flops"],
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"], extra_ldflags=["-fopenmp"],
            verbose=False)
    except Exception as error:  # no compiler, or an unknown -march: torch's own operations only
        print(f"limits: the machine probes did not build ({type(error).__name__}); torch's operations only")
        return None


def arithmetic_peak_flops(probes: ModuleType | None) -> dict[str, float]:
    """The arithmetic units' rate per dtype, FLOP/s (0 where the probes did not build): fp32 FMAs, and for bf16 the
    fastest of vdpbf16ps and AMX tiles (0 without either), the best of five runs of ~0.1-0.2 s each."""
    if probes is None:
        return {"float32": 0.0, "bfloat16": 0.0}
    best = lambda probe, rounds: max(probe(rounds) for _ in range(5))  # noqa: E731
    return {"float32": best(probes.fp32_flops, 50_000_000),
            "bfloat16": max(best(probes.dpbf16_flops, 50_000_000), best(probes.amx_bf16_flops, 5_000_000))}


def read_bandwidth(probes: ModuleType | None) -> tuple[float, str]:
    """The fastest read of 1 GiB of float32 on every thread, bytes per second, and which reader it was: torch's
    x.sum, torch.dot(x, y) (two buffers) and the compiled streaming read, the best round of each."""
    x, y = torch.ones(GIB // 4), torch.ones(GIB // 4)
    rates = {"torch sum": GIB / _seconds(x.sum, best=True),
             "torch dot": 2 * GIB / _seconds(lambda: torch.dot(x, y), best=True)}
    if probes is not None:
        assert probes.stream_read_sum(x) == x.numel(), "the streaming read must read every element"
        rates["streaming read"] = GIB / _seconds(lambda: probes.stream_read_sum(x), best=True)
    reader = max(rates, key=rates.get)
    return rates[reader], reader


def benchmark_case(module: ModuleType, label: str) -> Case:
    """The default-set case `label` ("op case") of a benchmark module: its work and its baseline, as timed there."""
    return next(case for case in module.cases() if case.label == label)


def _baseline_seconds(case: Case) -> float:
    return _seconds(case.contenders[case.rule_baseline]())


@dataclasses.dataclass(frozen=True)
class Peak:
    """A dtype's rates, FLOP/s: its arithmetic units' (probes; 0 unknown) and a large square product's."""
    arithmetic: float
    gemm: float

    @property
    def bound(self) -> float:
        return max(self.arithmetic, self.gemm)

    def describe(self) -> str:
        return (f"peak {self.bound / 1e9:.0f} GFLOP/s (units {self.arithmetic / 1e9:.0f}, "
                f"large GEMM {self.gemm / 1e9:.0f})")


def gemm_limit(module: ModuleType, label: str, target: float, peaks: dict[str, Peak]) -> Limit:
    """A GEMM-bound row: the case's matrix-product work (Case.flops) at the peak of its dtype."""
    case = benchmark_case(module, label)
    dtype = case.params.get("dtype", "float32")  # the LayerNorm cases are float32 only and do not say it
    peak = peaks[dtype]
    return Limit(label, target, _baseline_seconds(case), case.flops / peak.bound,
                 f"{case.flops / 1e9:.2f} GFLOP at the {dtype} {peak.describe()}", case.flops / peak.gemm)


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


def language_model_limit(target: float, peak: Peak) -> Limit:
    """Amdahl: the step with torch.nn.LSTM's time replaced by the LSTM's own GEMM floor (the step's work without
    its decoder: bench_lstm_lm.flops at vocab 0)."""
    shape = bench_lstm_lm.DEFAULT_SHAPES[0]
    case = benchmark_case(bench_lstm_lm, f"lstm_lm {shape.name}")
    times = time_interleaved({"step": case.contenders[case.rule_baseline](),
                              "lstm": _torch_lstm_training_step(shape)}, DEFAULT_BUDGET)
    step_s, lstm_s = times["step"].median_s, times["lstm"].median_s
    lstm_flops = bench_lstm_lm.flops(dataclasses.replace(shape, vocab=0))
    return Limit(case.label, target, step_s, step_s - lstm_s + lstm_flops / peak.bound,
                 f"step minus torch.nn.LSTM's {lstm_s * 1e3:.1f} ms (fwd+bwd, {lstm_s / step_s:.0%} of the step) "
                 f"plus its GEMM floor {lstm_flops / peak.bound * 1e3:.1f} ms",
                 step_s - lstm_s + lstm_flops / peak.gemm)


def limits() -> list[Limit]:
    probes = _probes()
    arithmetic = arithmetic_peak_flops(probes)
    rates = {name: Peak(arithmetic[name], gemm_peak_flops(dtype))
             for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    bandwidth = read_bandwidth(probes)
    return [
        gemm_limit(bench_lstm, "lstm infer b32 t100 h256", 1.0, rates),
        gemm_limit(bench_lstm, "lstm train b32 t100 h256", 1.5, rates),
        gemm_limit(bench_gru, "gru train b32 t100 h256", 2.0, rates),
        gemm_limit(bench_rnn, "rnn train b32 t100 h256", 2.0, rates),
        gemm_limit(bench_lstm, "lstm infer b32 t100 h256 bfloat16", 1.0, rates),
        gemm_limit(bench_lstm, "lstm train b32 t100 h256 bfloat16", 1.0, rates),
        language_model_limit(1.2, rates["float32"]),
        gemm_limit(bench_layernorm_lstm, "layernorm_lstm train b32 t100 h256", 4.0, rates),  # issue 16
        memory_limit(bench_attention, "attention decode b1 hq32 hkv8 cache32768 d128", 5.0, bandwidth),
        memory_limit(bench_attention, "attention decode b1 hq32 hkv8 cache32768 d128 bfloat16", 5.0, bandwidth),
    ]


def table(rows: list[Limit]) -> str:
    lines = ["| row | target | baseline ms | floor ms | best ratio possible | at the large-GEMM rate | floor |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        verdict = "" if r.reachable else " (target out of reach)"
        practical = "" if r.practical_ratio is None else f"{r.practical_ratio:.2f}x"
        lines.append(f"| {r.row} | {r.target:.1f}x | {r.baseline_s * 1e3:.2f} | {r.floor_s * 1e3:.2f} | "
                     f"{r.best_ratio:.2f}x{verdict} | {practical} | {r.floor_how} |")
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
        {"environment": env,
         "rows": [{**dataclasses.asdict(r), "best_ratio": r.best_ratio, "practical_ratio": r.practical_ratio}
                  for r in rows]},
        indent=2))


if __name__ == "__main__":
    main()
