"""Runs the default benchmark set: every `benchmarks/bench_<op>.py` that defines `cases(quick)`.

    python -m benchmarks                    # everything: table on stdout, JSON and PNG in bench_results/
    python -m benchmarks --only lstm        # one op (repeatable, or comma-separated)
    python -m benchmarks --quick            # tiny shapes, few repeats: a smoke test of the whole pipeline
    python -m benchmarks --repeat 3         # the whole selection 3 times: each ratio's spread over the runs

Writes <out>/<op>.json per op, <out>/summary.json (all ops) and <out>/ratios.png (of the last run; with --repeat
also <out>/spread.json, every ratio of every run). Exits 1 if any
contender failed (its row says why), so `make bench` cannot pass over a broken benchmark.
"""
from __future__ import annotations

import argparse
import importlib
import json
import statistics
import pkgutil
import sys
from pathlib import Path
from types import ModuleType

import benchmarks
from benchmarks import harness

MODULE_PREFIX = "bench_"


def available_ops() -> list[str]:
    """The <op> of every benchmarks/bench_<op>.py, found by file name (nothing imported yet)."""
    names = (info.name for info in pkgutil.iter_modules(benchmarks.__path__))
    return sorted(name.removeprefix(MODULE_PREFIX) for name in names if name.startswith(MODULE_PREFIX))


def load(ops: list[str]) -> dict[str, ModuleType]:
    """op -> its imported benchmark module, keeping those that define `cases` (a helper module may not).

    Only the selected ops are imported, so `--only lstm` runs even while another op's benchmark is broken.
    """
    modules = {op: importlib.import_module(f"benchmarks.{MODULE_PREFIX}{op}") for op in ops}
    return {op: module for op, module in modules.items() if callable(getattr(module, "cases", None))}


def parse_args(argv: list[str] | None, available: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], metavar="OP",
                        help=f"run only these ops (repeatable or comma-separated; available: {', '.join(available)})")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repeats, for smoke tests")
    parser.add_argument("--out", type=Path, default=Path("bench_results"), help="output folder (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run the whole selection N times and report each ratio's spread (min / median / max): "
                             "a shared or virtual machine's speed drifts between runs more than within one")
    args = parser.parse_args(argv)
    args.only = [op for value in args.only for op in value.split(",") if op]
    unknown = sorted(set(args.only) - set(available))
    if unknown:
        parser.error(f"--only: unknown op(s) {', '.join(unknown)}; available: {', '.join(available)}")
    if args.repeat < 1:
        parser.error(f"--repeat: expected a positive count, got {args.repeat}")
    return args


def measure(
    selected: dict[str, ModuleType], quick: bool, budget: harness.TimingBudget
) -> tuple[dict[str, list[harness.CaseResult]], dict[str, float]]:
    """Every case of every selected op, between two measurements of the matmul peak (the first is the
    yardstick; the second checks that the machine stayed as idle as it was)."""
    cases_by_op = {op: module.cases(quick=quick) for op, module in selected.items()}
    progress = harness.Progress(total=sum(len(c.contenders) for cases in cases_by_op.values() for c in cases))
    progress.show("checking the memory measurement, then the matmul peak (sgemm)")
    harness.check_peak_memory_measurement()
    matmul_peak = harness.measure_matmul_peak(budget)
    results_by_op = {
        op: [harness.run_case(case, budget, matmul_peak["gflops"], progress) for case in cases]
        for op, cases in cases_by_op.items()
    }
    progress.show("matmul peak again (did the machine stay idle?)")
    matmul_peak["gflops_at_end"] = harness.measure_matmul_peak(budget)["gflops"]
    progress.clear()
    warning = harness.busy_machine_warning(matmul_peak["gflops"], matmul_peak["gflops_at_end"])
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return results_by_op, matmul_peak


def report(results_by_op: dict[str, list[harness.CaseResult]], matmul_peak: dict[str, float],
           budget: harness.TimingBudget, out: Path) -> None:
    """The table on stdout; <out>/<op>.json, <out>/summary.json and <out>/ratios.png."""
    env = harness.environment()
    for warning in harness.environment_warnings(env):
        print(f"warning: {warning}", file=sys.stderr)
    all_results = [result for results in results_by_op.values() for result in results]
    print(harness.format_table(all_results, matmul_peak))
    for op, results in results_by_op.items():
        harness.write_json(out / f"{op}.json", results, env, matmul_peak, budget)
    harness.write_json(out / "summary.json", all_results, env, matmul_peak, budget)
    harness.plot_ratios(out / "ratios.png", all_results)
    print(f"wrote {out}/summary.json, {out}/ratios.png and one JSON per op", file=sys.stderr)


RatiosByCase = dict[str, dict[str, float]]  # "op case" -> baseline -> baseline time / seqkern time


def ratios_by_case(results_by_op: dict[str, list[harness.CaseResult]]) -> RatiosByCase:
    return {result.case.label: result.ratios() for results in results_by_op.values() for result in results}


def ratio_spread(runs: list[RatiosByCase]) -> dict[str, dict[str, list[float]]]:
    """Each (case, baseline) ratio over the runs, in run order; a pair missing from a run (a failed contender)
    has fewer entries."""
    spread: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        for case, ratios in run.items():
            for baseline, ratio in ratios.items():
                spread.setdefault(case, {}).setdefault(baseline, []).append(ratio)
    return spread


def format_spread(spread: dict[str, dict[str, list[float]]]) -> str:
    """One row per (case, baseline): min / median / max of its ratio over the runs."""
    lines = ["| case | baseline | runs | min | median | max |", "|---|---|---|---|---|---|"]
    for case, by_baseline in spread.items():
        for baseline, ratios in by_baseline.items():
            lines.append(f"| {case} | {baseline} | {len(ratios)} | {min(ratios):.2f}x | "
                         f"{statistics.median(ratios):.2f}x | {max(ratios):.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (1 if any contender failed)."""
    available = available_ops()
    args = parse_args(argv, available)
    selected = load(args.only or available)
    budget = harness.QUICK_BUDGET if args.quick else harness.DEFAULT_BUDGET
    harness.configure_process()
    runs, failed = [], False
    for _ in range(args.repeat):
        results_by_op, matmul_peak = measure(selected, args.quick, budget)
        runs.append(ratios_by_case(results_by_op))
        failed |= any(result.failed() for results in results_by_op.values() for result in results)
    report(results_by_op, matmul_peak, budget, args.out)
    if args.repeat > 1:
        spread = ratio_spread(runs)
        print(f"\nratios over {args.repeat} runs:\n{format_spread(spread)}")
        (args.out / "spread.json").write_text(json.dumps(spread, indent=2) + "\n")
    return 1 if failed else 0
