"""What the machine allows: the fastest any implementation could run each target row of issues 14 and 16, measured.

    python -m benchmarks.limits        # idle machine, ~1 min; prints a table, writes bench_results/limits.json

For each row it times the baseline (torch.nn / SDPA, as the benchmark row does) and measures a *floor*, a time no
implementation can beat on this machine:

- GEMM-bound rows: the row's matrix-product work at the best float32 (or bfloat16) rate this machine reaches on a
  large square product (MKL / oneDNN through torch.mm, both threads), every other part of the work taken as free.
  Real GEMMs of the row's shapes (32-row steps, 256-deep products) run slower than that, so the floor is low.
- Memory-bound rows (decode): the bytes the row must read at the machine's read bandwidth (a 2-thread sum over
  1 GiB).
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

import torch
import torch.nn.functional as F

from benchmarks import bench_layernorm_lstm, bench_lstm_lm
from benchmarks.harness import DEFAULT_BUDGET, configure_process, environment, time_call, time_interleaved

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
    timing = time_call(lambda: (call(), ())[1], DEFAULT_BUDGET)
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


def recurrent_gemm_flops(gates: int, batch: int, steps: int, hidden: int, training: bool) -> float:
    """Input projection and recurrent products, forward (2) or forward and backward (6: + grad_input, grad_h,
    both weight gradients), each 2 * steps * batch * gates * hidden * hidden (input size = hidden)."""
    return (6 if training else 2) * 2 * steps * batch * gates * hidden * hidden


def _recurrent_step(module_type: type, dtype: torch.dtype, batch: int, steps: int, hidden: int,
                    training: bool, layers: int = 1) -> Callable[[], object]:
    torch.manual_seed(0)
    module = module_type(hidden, hidden, layers).to(dtype)
    x = torch.randn(steps, batch, hidden, dtype=dtype, requires_grad=training)

    def call() -> object:
        if not training:
            with torch.no_grad():
                return module(x)
        module(x)[0].sum().backward()
        return None
    return call


def recurrent_limit(name: str, module_type: type, gates: int, dtype: torch.dtype, training: bool, target: float,
                    peak: float, batch: int = 32, steps: int = 100, hidden: int = 256) -> Limit:
    baseline = _seconds(_recurrent_step(module_type, dtype, batch, steps, hidden, training))
    work = recurrent_gemm_flops(gates, batch, steps, hidden, training)
    return Limit(name, target, baseline, work / peak,
                 f"{work / 1e9:.2f} GFLOP at the {dtype_name(dtype)} peak {peak / 1e9:.0f} GFLOP/s")


def language_model_limit(target: float, peak: float) -> Limit:
    shape = bench_lstm_lm.DEFAULT_SHAPES[0]
    step = bench_lstm_lm._contenders(shape)[bench_lstm_lm.TORCH_MODEL]()
    lstm = _recurrent_step(torch.nn.LSTM, torch.float32, shape.batch, shape.bptt, shape.hidden, True, shape.layers)
    times = time_interleaved({"step": step, "lstm": lambda: (lstm(), ())[1]}, DEFAULT_BUDGET)
    step_s, lstm_s = times["step"].median_s, times["lstm"].median_s
    lstm_floor = shape.layers * recurrent_gemm_flops(4, shape.batch, shape.bptt, shape.hidden, True) / peak
    return Limit(f"lstm_lm {shape.name}", target, step_s, step_s - lstm_s + lstm_floor,
                 f"step minus torch.nn.LSTM's {lstm_s * 1e3:.1f} ms (fwd+bwd, {lstm_s / step_s:.0%} of the step) "
                 f"plus its GEMM floor {lstm_floor * 1e3:.1f} ms")


def layernorm_lstm_limit(target: float, peak: float) -> Limit:
    """Issue 16's row: LayerNormLSTM training b32 t100 h256 against the composed definition in eager PyTorch (the
    benchmark's contender); the floor is the LSTM's products alone, the LayerNorms taken as free."""
    shape = bench_layernorm_lstm.DEFAULT_SHAPES[1]
    composed = bench_layernorm_lstm._contenders(bench_layernorm_lstm.LAYER, shape)["composed (eager)"]()
    work = recurrent_gemm_flops(4, shape.batch, shape.steps, shape.hidden, shape.training)
    return Limit(f"layernorm_lstm {shape.name} vs composed eager", target, _seconds(composed), work / peak,
                 f"{work / 1e9:.2f} GFLOP at the float32 peak {peak / 1e9:.0f} GFLOP/s")


def decode_limit(dtype: torch.dtype, target: float, bandwidth: float) -> Limit:
    """1 query, 32 query heads over 8 kv heads, 32768 cached keys, d128: SDPA against reading K and V once."""
    torch.manual_seed(0)
    q = torch.randn(1, 32, 1, 128, dtype=dtype)
    k, v = (torch.randn(1, 8, 32768, 128, dtype=dtype) for _ in range(2))
    baseline = _seconds(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    cache_bytes = 2 * k.numel() * k.element_size()
    return Limit(f"decode 1q 32768 keys 32/8 heads d128 {dtype_name(dtype)}", target, baseline,
                 cache_bytes / bandwidth, f"{cache_bytes / 1e6:.0f} MB at {bandwidth / 1e9:.1f} GB/s")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def limits() -> list[Limit]:
    fp32, bf16, bandwidth = gemm_peak_flops(torch.float32), gemm_peak_flops(torch.bfloat16), read_bandwidth()
    lstm, gru, rnn = torch.nn.LSTM, torch.nn.GRU, torch.nn.RNN
    return [
        recurrent_limit("lstm infer b32 t100 h256", lstm, 4, torch.float32, False, 1.0, fp32),
        recurrent_limit("lstm train b32 t100 h256", lstm, 4, torch.float32, True, 1.5, fp32),
        recurrent_limit("gru train b32 t100 h256", gru, 3, torch.float32, True, 2.0, fp32),
        recurrent_limit("rnn train b32 t100 h256", rnn, 1, torch.float32, True, 2.0, fp32),
        recurrent_limit("lstm infer b32 t100 h256 bfloat16", lstm, 4, torch.bfloat16, False, 1.0, bf16),
        recurrent_limit("lstm train b32 t100 h256 bfloat16", lstm, 4, torch.bfloat16, True, 1.0, bf16),
        language_model_limit(1.2, fp32),
        layernorm_lstm_limit(4.0, fp32),
        decode_limit(torch.float32, 5.0, bandwidth),
        decode_limit(torch.bfloat16, 5.0, bandwidth),
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
