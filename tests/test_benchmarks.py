"""`make bench` keeps working: the benchmark entry point runs its quick set end to end (tiny shapes, every
contender, table, JSON and PNG). Timings are not judged here; see benchmarks/."""
import ctypes
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize("op", ["lstm", "lstm_lm", "attention", "transformer", "seq2seq"])
def test_quick_benchmark_run(tmp_path, op):
    # A subprocess, so torch.compile settings the harness makes do not leak into the test session.
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only", op, "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary, "empty summary"
    assert (tmp_path / "ratios.png").stat().st_size > 0
    assert "seqkern" in result.stdout


def test_rule_gate_passes_within_twice_torch_error_and_fails_beyond():
    from benchmarks.harness import rule_verdict

    oracle = [torch.zeros(4, dtype=torch.float64)]
    torch_result = [torch.full((4,), 1e-3)]
    assert rule_verdict([torch.full((4,), 1.9e-3)], torch_result, oracle)[0]
    passed, text = rule_verdict([torch.full((4,), 2.1e-3)], torch_result, oracle)
    assert not passed and "FAILED" in text


def test_interleaved_timing_times_every_contender_in_every_round():
    from benchmarks.harness import TimingBudget, time_interleaved

    calls = []
    budget = TimingBudget(seconds_per_measurement=0.01, warmup_seconds=0.0, min_repeats=3, max_repeats=6, rounds=3)
    timings = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, budget)
    assert set(timings) == {"a", "b"}
    assert all(t.repeats >= 3 and 0 < t.min_s <= t.median_s <= t.max_s for t in timings.values())
    timed = calls[4:]  # after two warm-up calls each, the rounds alternate between the contenders
    assert timed[: timings["a"].repeats // 3] == ["a"] * (timings["a"].repeats // 3)
    assert "b" in timed[: timings["a"].repeats // 3 + 1]


def test_limits_floor_arithmetic_and_verdicts():
    # benchmarks/limits.py times 4096-square products and a 1 GiB read, too slow for the suite: here its
    # arithmetic, on made-up times, and the work it takes from the benchmark cases. An LSTM layer's training step
    # is six (T*B x 4H x H) products.
    from benchmarks import bench_attention, bench_gru, bench_lstm
    from benchmarks.limits import Limit, Peak, benchmark_case, table

    assert benchmark_case(bench_lstm, "lstm train b32 t100 h256").flops == 6 * 2 * 100 * 32 * 1024 * 256
    assert benchmark_case(bench_gru, "gru infer b32 t100 h256").flops == 2 * 2 * 100 * 32 * 768 * 256
    decode = benchmark_case(bench_attention, "attention decode b1 hq32 hkv8 cache32768 d128 bfloat16")
    assert decode.bytes_moved == 2 * 8 * 32768 * 128 * 2
    reachable = Limit("a", target=1.5, baseline_s=0.040, floor_s=0.020, floor_how="x", practical_floor_s=0.025)
    out_of_reach = Limit("b", target=1.5, baseline_s=0.040, floor_s=0.030, floor_how="y")
    assert reachable.best_ratio == pytest.approx(2.0) and reachable.reachable
    assert reachable.practical_ratio == pytest.approx(1.6) and out_of_reach.practical_ratio is None
    assert out_of_reach.best_ratio == pytest.approx(4 / 3) and not out_of_reach.reachable
    text = table([reachable, out_of_reach])
    assert "| a | 1.5x | 40.00 | 20.00 | 2.00x | 1.60x | x |" in text
    assert "| b | 1.5x | 40.00 | 30.00 | 1.33x (target out of reach) |  | y |" in text
    # The floor's rate is the faster of the units' and a large GEMM's: a GEMM's achieved rate is no bound (MKL on
    # a Zen 4 runs at ~80% of the FMA units'), and a probe that did not build (0) leaves the GEMM's.
    assert Peak(arithmetic=230e9, gemm=188e9).bound == 230e9
    assert Peak(arithmetic=0.0, gemm=188e9).bound == 188e9


def test_repeat_reports_each_ratio_over_the_runs():
    from benchmarks.run import format_spread, parse_args, ratio_spread

    runs = [{"lstm infer b1": {"torch.nn.LSTM": 1.4, "reference (eager)": 7.0}},
            {"lstm infer b1": {"torch.nn.LSTM": 1.2}},  # the eager contender failed in this run
            {"lstm infer b1": {"torch.nn.LSTM": 1.5, "reference (eager)": 6.0}}]
    spread = ratio_spread(runs)
    assert spread == {"lstm infer b1": {"torch.nn.LSTM": [1.4, 1.2, 1.5], "reference (eager)": [7.0, 6.0]}}
    table = format_spread(spread)
    assert "| lstm infer b1 | torch.nn.LSTM | 3 | 1.20x | 1.40x | 1.50x |" in table
    assert "| lstm infer b1 | reference (eager) | 2 | 6.00x | 6.50x | 7.00x |" in table
    assert parse_args(["--repeat", "3"], ["lstm"]).repeat == 3
    with pytest.raises(SystemExit):
        parse_args(["--repeat", "0"], ["lstm"])


def test_benchmark_process_keeps_freed_memory():
    try:
        ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        pytest.skip("the C library is not glibc: the harness leaves its allocator as it is")
    # A subprocess: the malloc settings would otherwise hold freed memory for the rest of the test session.
    # A 48 MiB block malloc'd, touched and freed, three times: glibc maps a block above 32 MiB afresh each time
    # (12288 page faults on touching it), whatever its history, unless keep_freed_memory holds it in the heap.
    script = """
import ctypes, resource
from benchmarks import harness
harness.configure_process()
assert "glibc" in harness.environment()["allocator"], harness.environment()["allocator"]
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(48 << 20)
    ctypes.memset(block, 1, 48 << 20)
    libc.free(block)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert int(result.stdout.split()[-1]) < 100
