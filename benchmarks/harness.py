"""The benchmark harness every `benchmarks/bench_<op>.py` shares.

A benchmark module describes *what* to run as `Case`s (one shape of one op, with its contenders: the
seqkern subject and the baselines it is compared against); this module decides *how*: timing (warm-up,
then the median of an adaptive number of repeats), peak extra memory of one call, the machine's
matrix-multiply peak measured in the same process, ratios computed side by side, and the outputs
(table, JSON, PNG bar chart). See DESIGN.md, "Performance rule".

    case = Case(op="lstm", name="infer b32 t100 h256", params={...}, flops=...,
                contenders={"seqkern": setup_fn, "torch.nn.LSTM": setup_fn, ...})
    result = run_case(case, budget, matmul_peak_gflops, progress)

A contender's setup builds its module and inputs and returns the call to time; that call returns the
tensors it computed (outputs, or gradients for training) so the harness can check that every contender
computed the same thing as the subject before trusting its time.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

try:
    import resource
except ImportError:  # not on Windows
    resource = None

import torch
from torch.profiler import ProfilerActivity, profile

from seqkern.info import cpu_model
from seqkern.testing import max_abs_error, rule_bound

SUBJECT = "seqkern"
MIB = 2**20

# What a contender's timed call returns: the tensors it computed, compared across contenders.
Call = Callable[[], Sequence[torch.Tensor]]


def dtype_suffix(dtype: torch.dtype) -> str:
    """The end of a case name: "" for float32 (every benchmark's default dtype), " bfloat16" and the like otherwise."""
    return "" if dtype == torch.float32 else " " + str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------------
# Data model.
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    """One shape of one op and the contenders to time on it.

    `contenders` maps a display name to a setup function returning the call to time; setups run one at
    a time, so only one contender's inputs and weights are alive at once. `flops` is the useful
    floating-point work of one call (for GFLOP/s). The entry named SUBJECT is seqkern; the others are
    baselines, and every ratio is baseline time / seqkern time (>1 means seqkern is faster).

    Optional: `bytes_moved`, the memory traffic one call cannot avoid (for GB/s, on memory-bound ops);
    `skipped`, contenders left out of this case on purpose (display name -> why), listed in the table;
    `memory_only`, for shapes too costly to time: one profiled call per contender, its peak memory only.

    The correctness gate (a failed gate fails the run): with `oracle` (the same computation in float64,
    returning the tensors the contenders return, in the same order) and `rule_baseline` (PyTorch's own
    contender), seqkern's error against the oracle must be within DESIGN.md's rule: at most twice the rule
    baseline's error plus the dtype's floor, tensor by tensor. Without an oracle, every baseline's result must
    agree with seqkern's within RELATIVE_TOLERANCE of its dtype, except the baselines in `differs_on_purpose`
    (name -> why, e.g. dropout masks drawn differently).
    """

    op: str
    name: str
    params: dict[str, Any]
    flops: float
    contenders: dict[str, Callable[[], Call]]
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)
    bytes_moved: float = 0.0
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    memory_only: bool = False
    oracle: Callable[[], Sequence[torch.Tensor]] | None = None
    rule_baseline: str | None = None
    differs_on_purpose: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.op} {self.name}"


@dataclasses.dataclass(frozen=True)
class TimingBudget:
    """How long to warm up and time each contender; the repeat count adapts to the cost of one call."""

    seconds_per_measurement: float
    warmup_seconds: float
    min_repeats: int
    max_repeats: int
    rounds: int


# The whole default set (LSTM, GRU, RNN: 13 cases x 4 contenders, compilation included) took 3 min 38 s on
# this machine when idle (matmul peak 182 GFLOP/s); under a load of 8 on its 2 cores everything ran ~3-5x
# slower. min_repeats bounds a slow case's cost too.
# Contenders are timed in `rounds` interleaved rounds (each round times every contender once, for about
# seconds_per_measurement / rounds): a load that comes and goes during a case then hits every contender alike
# instead of whichever one was being timed in its block.
DEFAULT_BUDGET = TimingBudget(seconds_per_measurement=2.0, warmup_seconds=0.3, min_repeats=7, max_repeats=500,
                              rounds=7)
QUICK_BUDGET = TimingBudget(seconds_per_measurement=0.05, warmup_seconds=0.0, min_repeats=3, max_repeats=5, rounds=3)

# The agreement asked of baselines when a case has no float64 oracle (relative to each tensor's largest
# magnitude, see max_relative_diff); the correctness gate itself is seqkern.testing's rule.
RELATIVE_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@dataclasses.dataclass
class Measurement:
    """One contender on one case. `error` is set (and the numbers are None) if the contender failed,
    `skipped` if the case left it out on purpose; a memory-only case leaves the timing fields None."""

    contender: str
    median_s: float | None = None
    min_s: float | None = None
    max_s: float | None = None
    repeats: int = 0
    first_call_s: float | None = None  # includes one-time costs: torch.compile, lazy init, caches
    gflops: float | None = None
    fraction_of_matmul_peak: float | None = None
    gbytes_per_s: float | None = None  # Case.bytes_moved / median_s, when the case sets bytes_moved
    peak_memory_bytes: int | None = None
    peak_rss_bytes: int | None = None  # resident memory the call added (allocations outside c10's allocator too)
    page_faults_per_call: float | None = None  # minor page faults while timed (see keep_freed_memory)
    max_rel_diff_vs_subject: float | None = None  # see max_relative_diff
    gate: str | None = None  # the correctness gate's verdict on this contender's row, see Case
    gate_failed: bool = False
    error: str | None = None
    skipped: str | None = None


@dataclasses.dataclass
class CaseResult:
    case: Case
    measurements: list[Measurement]

    def measurement(self, contender: str) -> Measurement | None:
        return next((m for m in self.measurements if m.contender == contender), None)

    def ratios(self) -> dict[str, float]:
        """Baseline median time / seqkern median time, for every baseline that ran (>1: seqkern faster)."""
        subject = self.measurement(SUBJECT)
        if subject is None or subject.median_s is None:
            return {}
        return {
            m.contender: m.median_s / subject.median_s
            for m in self.measurements
            if m.contender != SUBJECT and m.median_s is not None
        }

    def failed(self) -> bool:
        return any(m.error is not None or m.gate_failed for m in self.measurements)

    def to_json(self) -> dict[str, Any]:
        return {
            "op": self.case.op,
            "case": self.case.name,
            "params": self.case.params,
            "flops": self.case.flops,
            "notes": self.case.notes,
            "measurements": [dataclasses.asdict(m) for m in self.measurements],
            "ratios_vs_seqkern": self.ratios(),
        }


# --------------------------------------------------------------------------------------------------
# Machine.
# --------------------------------------------------------------------------------------------------
def configure_process() -> None:
    """Settings every benchmark run shares.

    - every core this process may run on, the same thread count for every contender;
    - Inductor compiles in this process: its default pool of compile worker processes would otherwise
      start up after the first compilation and compete with the timings that follow for the 2 cores;
    - a compiled baseline that runs out of recompilations (16 per function) fails loudly instead of silently
      running eager;
    - freed memory stays in the process (keep_freed_memory).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(cores)
    torch._inductor.config.compile_threads = 1
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    # Each recurrent op's compiled reference cell compiles once per shape and grad mode (benchmarks/_recurrent.py
    # _compiled): the LSTM's 9 default rows exceed torch's default limit of 8.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
    keep_freed_memory()


# What keep_freed_memory did, for environment().
_ALLOCATOR = {"state": "as the process started"}


def keep_freed_memory(threshold: int = 2**30) -> None:
    """Makes glibc's malloc keep freed memory in the process: blocks up to `threshold` bytes come from its heaps
    (M_MMAP_THRESHOLD) and freed ones are not handed back to the kernel before `threshold` bytes are free at the
    top (M_TRIM_THRESHOLD).

    Why: by default glibc maps a large block afresh and unmaps it when freed, unless its history of earlier
    frees has raised its (dynamic) threshold above that size, so whether a contender's buffers cost page faults
    (the kernel zeroing every 4 KiB page on first touch) depends on what ran before in the process. torch.nn.LSTM's
    training call at b32 t100 h256 took ~8100 page faults a call in a fresh process and 46-47 ms, 36-39 ms with
    memory kept (Intel Xeon model 167, 2026-12-06): one round's baseline was 31 ms, the next limits run's 45.7 ms,
    on the same machine. Kept memory is also what a long training process or a caching allocator (jemalloc,
    tcmalloc) gives every contender, and it times the kernels rather than the page zeroing. seqkern's own
    workspace blocks are cached (seqkern.memory) either way. No-op where the C library is not glibc.
    """
    libc = _glibc()
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    if libc is not None and libc.mallopt(m_mmap_threshold, threshold) and libc.mallopt(m_trim_threshold, threshold):
        _ALLOCATOR["state"] = f"glibc malloc keeps freed memory (mmap and trim thresholds {threshold >> 20} MiB)"


def _glibc() -> ctypes.CDLL | None:
    """The C library through ctypes if it is glibc (has mallopt and malloc_trim), else None."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def _git_commit() -> str | None:
    try:
        completed = subprocess.run(
            # "-dirty" marks numbers measured on uncommitted changes; a failure just means no commit id.
            ["git", "describe", "--always", "--dirty"], check=False, capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip() or None


def environment() -> dict[str, Any]:
    """Everything a number depends on besides the code: versions, CPU, threads, commit, seqkern's backends."""
    import seqkern

    return {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "seqkern": seqkern.__version__,
        "seqkern_cpu_kernels_built": seqkern.backends.cpu_kernel_available(),
        "seqkern_backend_in_force": seqkern.current_backend(),
        "mkldnn_enabled": torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled,
        "allocator": _ALLOCATOR["state"],
        "git_commit": _git_commit(),
    }


def measure_matmul_peak(budget: TimingBudget, size: int = 2048) -> dict[str, float]:
    """The sgemm rate of a large square float32 matmul, the yardstick for every "fraction of peak".

    Measured in the same process and with the same thread count as the contenders, so a busy shared
    machine lowers the yardstick along with the contenders. 2048 is large enough to reach MKL's plateau
    (~175 GFLOP/s on 2 cores here, 4096 gives ~2% more) and small enough to time in ~0.1 s per call.
    """
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)

    def matmul() -> Sequence[torch.Tensor]:
        torch.mm(a, b, out=out)
        return (out,)

    timing = time_call(matmul, budget)
    return {"size": size, "median_s": timing.median_s, "gflops": 2 * size**3 / timing.median_s / 1e9}


def environment_warnings(env: dict[str, Any]) -> list[str]:
    """What makes "seqkern" in the results something else than seqkern's fast path on this machine."""
    warnings = []
    if not env["seqkern_cpu_kernels_built"]:
        warnings.append("seqkern's C++ extension is not built: the seqkern rows time its pure-PyTorch reference")
    if env["seqkern_backend_in_force"] != "auto":
        warnings.append(f"SEQKERN_BACKEND={env['seqkern_backend_in_force']}: the seqkern rows time that backend")
    return warnings


def busy_machine_warning(peak_at_start: float, peak_at_end: float, tolerance: float = 0.15) -> str | None:
    """A warning if the matmul peak moved by more than `tolerance` between the start and the end of a
    run: other work shared the cores meanwhile, and ratios measured at different moments are suspect."""
    low, high = sorted((peak_at_start, peak_at_end))
    if low >= (1 - tolerance) * high:
        return None
    return (f"the matmul peak moved from {peak_at_start:.0f} to {peak_at_end:.0f} GFLOP/s during the run: "
            "the machine was busy, compare these numbers with care (or rerun on an idle machine)")


# --------------------------------------------------------------------------------------------------
# Measuring one call.
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Timing:
    median_s: float
    min_s: float
    max_s: float
    repeats: int
    page_faults_per_call: float  # minor faults of the whole process over the timed calls


def _timed(call: Call) -> tuple[float, Sequence[torch.Tensor]]:
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def _warm_up(call: Call, budget: TimingBudget) -> float:
    """Calls `call` for budget.warmup_seconds (at least twice) and returns its median time per call."""
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < budget.warmup_seconds or len(times) < 2:
        times.append(_timed(call)[0])
    return statistics.median(times)


def time_call(call: Call, budget: TimingBudget) -> Timing:
    """One call timed on its own (the matmul yardstick): time_interleaved with a single contender."""
    return time_interleaved({"call": call}, budget)["call"]


def time_interleaved(calls: dict[str, Call], budget: TimingBudget) -> dict[str, Timing]:
    """Every contender's time per call, measured in budget.rounds interleaved rounds.

    Each round times every contender on a batch of consecutive calls (sized from its warm-up so that all rounds
    together take about budget.seconds_per_measurement per contender), in an order rotated from round to round;
    a contender's time is the median over rounds of its per-call time. A slow phase of the machine (a compile,
    another process) then lands on every contender alike rather than on whichever was being timed in a block.
    The garbage collector is off while timing, as in `timeit`, so a collection triggered by one contender's
    garbage does not land in another's time. The callers make (and time) each contender's first call first.
    """
    names = list(calls)
    batch = {}
    for name in names:
        per_call = _warm_up(calls[name], budget)
        wanted = math.ceil(budget.seconds_per_measurement / budget.rounds / max(per_call, 1e-9))
        lowest, highest = math.ceil(budget.min_repeats / budget.rounds), max(1, budget.max_repeats // budget.rounds)
        batch[name] = max(1, lowest, min(highest, wanted))
    samples: dict[str, list[float]] = {name: [] for name in names}
    faults = dict.fromkeys(names, 0)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for round_index in range(budget.rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                faults_before, start = _minor_page_faults(), time.perf_counter()
                for _ in range(batch[name]):
                    calls[name]()
                samples[name].append((time.perf_counter() - start) / batch[name])
                faults[name] += _minor_page_faults() - faults_before
    finally:
        if gc_was_enabled:
            gc.enable()
    return {
        name: Timing(statistics.median(times), min(times), max(times), budget.rounds * batch[name],
                      faults[name] / (budget.rounds * batch[name]))
        for name, times in samples.items()
    }


def _minor_page_faults() -> int:
    """The process's minor page faults so far (0 where getrusage is missing)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


@contextlib.contextmanager
def _stderr_silenced():
    """Point file descriptor 2 at /dev/null: kineto logs "USDT ... profiler_start/stop" lines from C++
    on every profile, whatever KINETO_LOG_LEVEL says once torch is loaded, and they break the progress
    line. Exceptions still reach Python and are reported."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_memory_bytes(call: Call) -> int:
    """Peak extra bytes of CPU tensor memory live during one call; see profiled_call."""
    return profiled_call(call)[0]


def profiled_call(call: Call) -> tuple[int, Sequence[torch.Tensor]]:
    """Peak extra bytes of CPU tensor memory live during one call (its outputs and gradients included).

    The profiler with profile_memory=True records every allocation and free that goes through c10's
    CPU allocator, from every thread, with a timestamp; the running sum of those events in time order
    is the memory the call added, and its maximum is the peak (check_peak_memory_measurement verifies
    this on known allocations at the start of every run). Memory that bypasses c10 (a library's own
    malloc, Python objects) is invisible, and so are caches filled during warm-up (oneDNN primitives,
    compiled code): this is the steady-state cost of one more call. Returns the peak and what the call
    returned.
    """
    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        result = call()
    allocations = sorted(
        (event.start_ns(), event.nbytes())
        for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in allocations:
        live += nbytes
        peak = max(peak, live)
    return peak, result


def check_peak_memory_measurement() -> None:
    """Fail early if peak_memory_bytes stops seeing allocations (say, a torch upgrade changes the profiler
    events): a call holding 4 and 2 MiB at once, then freeing the 4 and allocating 1, peaks at 6 MiB."""
    def known_allocations() -> Sequence[torch.Tensor]:
        four, two = torch.empty(4 * MIB, dtype=torch.uint8), torch.empty(2 * MIB, dtype=torch.uint8)
        del four
        return two, torch.empty(MIB, dtype=torch.uint8)

    measured = peak_memory_bytes(known_allocations)
    if measured != 6 * MIB:
        raise RuntimeError(f"peak_memory_bytes measured {measured / MIB:.2f} MiB for a known 6.00 MiB peak")


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _return_free_memory() -> None:
    """glibc's malloc_trim(0): free heap memory back to the kernel (no-op elsewhere)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def peak_rss_bytes(call: Call) -> int | None:
    """Resident memory one call added at its peak, everything included: tensors, and what kernels or libraries
    allocate outside c10's allocator (C++ workspaces, oneDNN scratchpads). None where Linux's counters are not
    available. Writing 5 to /proc/self/clear_refs resets the process's peak RSS (VmHWM) to its current RSS, so
    VmHWM after the call minus VmRSS before it is the call's own peak. malloc first hands its free memory back to
    the kernel (kept there by keep_freed_memory), so the call's buffers count even where malloc reuses them; a
    cache a library holds across calls (a warmed-up oneDNN primitive, seqkern's cached workspace blocks) adds no
    RSS: this is the cost of one more call, as peak_memory_bytes.
    """
    _return_free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        before = _proc_status_kib("VmRSS")
        result = call()
        peak = _proc_status_kib("VmHWM")
    except (OSError, KeyError):
        return None
    del result
    return max(0, peak - before) * 1024


def max_relative_diff(ours: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """max over tensors of max|ours - reference| / max|reference|: how far apart two contenders' results are.

    Relative to each tensor's largest magnitude because weight gradients summed over a long sequence
    reach the hundreds while outputs stay below 1; an absolute difference would mean different things.
    """
    if len(ours) != len(reference):
        raise ValueError(f"contenders returned {len(ours)} and {len(reference)} tensors")
    return max((_relative_diff(a, b) for a, b in zip(ours, reference) if b.numel()), default=0.0)


def _relative_diff(ours: torch.Tensor, reference: torch.Tensor) -> float:
    ours, reference = ours.detach().double(), reference.detach().double()
    return ((ours - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------------------------------
# Running a case.
# --------------------------------------------------------------------------------------------------
class Progress:
    """One status line on stderr, rewritten in place ("\\r"), so a long run shows where it is.

    When stderr is not a terminal (a CI log), each status is a line of its own instead.
    """

    def __init__(self, total: int) -> None:
        self.total, self.done, self._width = total, 0, 0
        self._in_place = sys.stderr.isatty()

    def show(self, text: str) -> None:
        line = f"[{self.done}/{self.total}] {text}"
        if not self._in_place:
            print(line, file=sys.stderr, flush=True)
            return
        sys.stderr.write("\r" + line.ljust(self._width))
        sys.stderr.flush()
        self._width = len(line)

    def step(self) -> None:
        self.done += 1

    def clear(self) -> None:
        """Erase the status line, before printing anything else or at the end."""
        if not self._in_place:
            return
        sys.stderr.write("\r" + " " * self._width + "\r")
        sys.stderr.flush()
        self._width = 0

    def warn(self, message: str) -> None:
        self.clear()
        print(f"warning: {message}", file=sys.stderr)


def _describe(error: Exception) -> str:
    """The exception's type and first line (dispatcher errors go on for a hundred lines)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


@dataclasses.dataclass
class _Prepared:
    """A contender after its setup and first call: the call to time and what it computed."""

    call: Call
    first_call_s: float
    result: Sequence[torch.Tensor]


def _prepare(case: Case, name: str, progress: Progress) -> _Prepared | Measurement:
    """Set up one contender and make its first call (timed: it carries compilation and lazy initialisation, and
    never counts toward the median). A failure becomes a Measurement with its `error`."""
    try:
        progress.show(f"{case.label} | {name} | setup and first call")
        call = case.contenders[name]()
        first_call_s, result = _timed(call)
        return _Prepared(call, first_call_s, result)
    except Exception as error:  # noqa: BLE001 - one broken contender must not hide the others' numbers
        progress.warn(f"{case.label}: {name} failed: {_describe(error)}")
        return Measurement(name, error=_describe(error))


def _memory(case: Case, name: str, prepared: _Prepared, progress: Progress) -> tuple[int, int | None]:
    progress.show(f"{case.label} | {name} | peak memory")
    return peak_memory_bytes(prepared.call), peak_rss_bytes(prepared.call)


def _timed_measurements(case: Case, prepared: dict[str, _Prepared], budget: TimingBudget,
                        matmul_peak_gflops: float, progress: Progress) -> dict[str, Measurement]:
    """Interleaved timing of every prepared contender, then each one's peak memory."""
    progress.show(f"{case.label} | {len(prepared)} contenders | warm-up and {budget.rounds} interleaved rounds")
    try:
        timings = time_interleaved({name: p.call for name, p in prepared.items()}, budget)
    except Exception as error:  # noqa: BLE001
        progress.warn(f"{case.label}: timing failed: {_describe(error)}")
        return {name: Measurement(name, error=_describe(error)) for name in prepared}
    measurements = {}
    for name, p in prepared.items():
        timing = timings[name]
        memory, rss = _memory(case, name, p, progress)
        gflops = case.flops / timing.median_s / 1e9
        measurements[name] = Measurement(
            contender=name, median_s=timing.median_s, min_s=timing.min_s, max_s=timing.max_s,
            repeats=timing.repeats, first_call_s=p.first_call_s, gflops=gflops,
            fraction_of_matmul_peak=gflops / matmul_peak_gflops,
            gbytes_per_s=case.bytes_moved / timing.median_s / 1e9 if case.bytes_moved else None,
            peak_memory_bytes=memory, peak_rss_bytes=rss, page_faults_per_call=timing.page_faults_per_call,
        )
    return measurements


def _memory_only_measurements(case: Case, prepared: dict[str, _Prepared], progress: Progress) -> dict[str, Measurement]:
    return {name: Measurement(name, peak_memory_bytes=memory, peak_rss_bytes=rss)
            for name, p in prepared.items() for memory, rss in [_memory(case, name, p, progress)]}


def rule_verdict(ours: Sequence[torch.Tensor], torch_same_dtype: Sequence[torch.Tensor],
                 oracle: Sequence[torch.Tensor]) -> tuple[bool, str]:
    """DESIGN.md's rule, tensor by tensor: max|ours - oracle| <= 2 max|torch - oracle| + floor(dtype).

    Returns (passed, text): the text gives the worst tensor's error as a fraction of its bound."""
    if not len(ours) == len(torch_same_dtype) == len(oracle):
        raise ValueError(f"the gate got {len(ours)}, {len(torch_same_dtype)} and {len(oracle)} tensors")
    worst = 0.0
    for mine, theirs, exact in zip(ours, torch_same_dtype, oracle):
        worst = max(worst, max_abs_error(mine, exact) / rule_bound(theirs, exact))
    passed = worst <= 1.0
    return passed, f"rule {'ok' if passed else 'FAILED'} ({worst:.2f} of bound)"


def _result_dtype(result: Sequence[torch.Tensor]) -> torch.dtype:
    return next((t.dtype for t in result if t.is_floating_point()), torch.float32)


def _apply_gate(case: Case, prepared: dict[str, _Prepared], measurements: dict[str, Measurement],
                progress: Progress) -> None:
    """The correctness gate of `case` (see Case), written into the measurements' `gate` fields."""
    subject = prepared.get(SUBJECT)
    if subject is None:
        return
    for name, p in prepared.items():
        if name != SUBJECT:
            measurements[name].max_rel_diff_vs_subject = max_relative_diff(p.result, subject.result)
    if case.oracle is not None and case.rule_baseline in prepared:
        progress.show(f"{case.label} | float64 oracle for the correctness gate")
        passed, text = rule_verdict(subject.result, prepared[case.rule_baseline].result, case.oracle())
        measurements[SUBJECT].gate, measurements[SUBJECT].gate_failed = text, not passed
        return
    tolerance = RELATIVE_TOLERANCE[_result_dtype(subject.result)]
    for name, m in measurements.items():
        if name == SUBJECT or m.max_rel_diff_vs_subject is None:
            continue
        if name in case.differs_on_purpose:
            m.gate = "differs on purpose"
            continue
        agrees = m.max_rel_diff_vs_subject <= tolerance
        m.gate, m.gate_failed = ("agrees" if agrees else f"DIFFERS (> {tolerance:.0e})"), not agrees


def run_case(case: Case, budget: TimingBudget, matmul_peak_gflops: float, progress: Progress) -> CaseResult:
    """Every contender of `case` in this process: set up and first call each (the subject first), then timing in
    interleaved rounds, peak memory, the correctness gate; then a row for each contender the case skipped."""
    if SUBJECT not in case.contenders and SUBJECT not in case.skipped:
        raise ValueError(f"{case.label}: no contender named {SUBJECT!r} among {list(case.contenders)}")
    order = sorted(case.contenders, key=lambda name: name != SUBJECT)  # stable: the subject, then the rest
    outcomes = {name: _prepare(case, name, progress) for name in order}
    prepared = {name: o for name, o in outcomes.items() if isinstance(o, _Prepared)}
    measurements = {name: o for name, o in outcomes.items() if isinstance(o, Measurement)}
    if case.memory_only:
        measurements.update(_memory_only_measurements(case, prepared, progress))
    else:
        measurements.update(_timed_measurements(case, prepared, budget, matmul_peak_gflops, progress))
    _apply_gate(case, prepared, measurements, progress)
    for _ in order:
        progress.step()
    del prepared, outcomes
    gc.collect()  # drop this case's modules and inputs before the next case allocates its own
    ordered = [measurements[name] for name in order]
    return CaseResult(case, ordered + [Measurement(name, skipped=why) for name, why in case.skipped.items()])


# --------------------------------------------------------------------------------------------------
# Reporting.
# --------------------------------------------------------------------------------------------------
_COLUMNS = (
    "case", "contender", "median ms", "reps", "1st call s", "GFLOP/s", "% peak", "GB/s", "mem MiB", "RSS MiB",
    "rel diff", "gate", "seqkern x",
)


def _number(value: float | None, spec: str, factor: float = 1.0) -> str:
    return "" if value is None else format(value * factor, spec)


def _row(result: CaseResult, m: Measurement, first: bool) -> tuple[str, ...]:
    case = result.case.label if first else ""
    if m.error is not None or m.skipped is not None:
        return (case, m.contender, "FAILED" if m.error is not None else "skipped") + ("",) * (len(_COLUMNS) - 3)
    timed = m.median_s is not None
    return (
        case, m.contender, _number(m.median_s, ".3f", 1e3), str(m.repeats) if timed else "",
        _number(m.first_call_s, ".2f"), _number(m.gflops, ".1f"), _number(m.fraction_of_matmul_peak, ".1f", 100),
        _number(m.gbytes_per_s, ".1f"), _number(m.peak_memory_bytes, ".2f", 1 / MIB),
        _number(m.peak_rss_bytes, ".2f", 1 / MIB), _number(m.max_rel_diff_vs_subject, ".1e"), m.gate or "",
        _number(result.ratios().get(m.contender), ".2f"),
    )


def format_table(results: Sequence[CaseResult], matmul_peak: dict[str, float]) -> str:
    """A plain-text table, one row per contender; "seqkern x" is that baseline's time / seqkern's, and
    "1st call s" the untimed first call (torch.compile's compilation shows there). "mem MiB" is the peak of
    c10's allocator during one call, "RSS MiB" the peak resident memory it added (everything, also what the
    kernels allocate outside PyTorch's allocator); "gate" the correctness gate's verdict (see Case).

    Failed contenders get a FAILED row, skipped ones a "skipped" row; the errors and the reasons for
    skipping are listed under the table.
    """
    rows = [_COLUMNS] + [
        _row(result, m, index == 0) for result in results for index, m in enumerate(result.measurements)
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    at_end = f", {matmul_peak['gflops_at_end']:.1f} at the end" if "gflops_at_end" in matmul_peak else ""
    header = (
        f"matmul peak: {matmul_peak['gflops']:.1f} GFLOP/s{at_end} (sgemm {matmul_peak['size']}^2, float32, "
        f"{torch.get_num_threads()} threads); seqkern x = baseline time / seqkern time (>1: seqkern faster)"
    )
    errors = [
        f"FAILED {result.case.label} / {m.contender}: {m.error}"
        for result in results for m in result.measurements if m.error is not None
    ] + [
        f"FAILED the correctness gate: {result.case.label} / {m.contender}: {m.gate}"
        for result in results for m in result.measurements if m.gate_failed
    ]
    skips = [
        f"skipped {result.case.label} / {m.contender}: {m.skipped}"
        for result in results for m in result.measurements if m.skipped is not None
    ]
    return "\n".join([header, lines[0], "-" * len(lines[0]), *lines[1:], *skips, *errors])


def write_json(path: Path, results: Sequence[CaseResult], env: dict[str, Any], matmul_peak: dict[str, float],
               budget: TimingBudget) -> None:
    """Results with everything needed to judge them: environment, yardstick, timing budget."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "environment": env,
        "matmul_peak": matmul_peak,
        "timing_budget": dataclasses.asdict(budget),
        "results": [result.to_json() for result in results],
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")  # str: dtypes in params


def plot_ratios(path: Path, results: Sequence[CaseResult]) -> None:
    """seqkern's speedup over each baseline: one panel per op, one group of horizontal bars per case, each bar
    labelled with its ratio, on a log axis with a line at 1.0 (left of it: seqkern slower).

    Memory-only cases have no speedup and no place in it.
    """
    from matplotlib.figure import Figure  # a bare Figure: no pyplot, no global backend switch

    by_op: dict[str, list[CaseResult]] = {}
    for result in results:
        if not result.case.memory_only and result.ratios():
            by_op.setdefault(result.case.op, []).append(result)
    baselines = list(dict.fromkeys(name for rs in by_op.values() for r in rs for name in r.ratios()))
    colors = {name: f"C{index % 10}" for index, name in enumerate(baselines)}
    heights = [max(1.0, 0.32 * sum(len(r.ratios()) + 0.6 for r in rs)) + 0.9 for rs in by_op.values()]
    figure = Figure(figsize=(11, max(3.0, sum(heights))))
    panels = figure.subplots(len(by_op), 1, squeeze=False, gridspec_kw={"height_ratios": heights or [1]})[:, 0]
    for axes, (op, op_results) in zip(panels, by_op.items()):
        _plot_op_panel(axes, op, op_results, colors)
    from matplotlib.patches import Patch

    handles = [Patch(color=colors[name], label=f"vs {name}") for name in baselines]
    figure.legend(handles=handles, loc="upper center", ncol=min(4, max(1, len(handles))), fontsize="small",
                  bbox_to_anchor=(0.5, 1.0))
    total_inches = max(3.0, sum(heights))
    figure.suptitle(f"seqkern speedup = baseline time / seqkern time ({torch.get_num_threads()} threads, "
                    f"{cpu_model()})", y=1.0 - 0.32 / total_inches, fontsize="medium")
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.5 / total_inches))  # the top half inch: legend and title
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def _plot_op_panel(axes, op: str, results: Sequence[CaseResult], colors: dict[str, str]) -> None:
    """One op's cases as groups of horizontal bars (top to bottom in run order), ratios written at the bars."""
    y, ticks, labels = 0.0, [], []
    for result in results:
        ratios = result.ratios()
        start = y
        for baseline, ratio in ratios.items():
            axes.barh(y, ratio, height=0.8, color=colors[baseline])
            axes.annotate(f"{ratio:.2f}x", (ratio, y), xytext=(3, 0), textcoords="offset points", va="center",
                          fontsize=7)
            y += 1
        ticks.append((start + y - 1) / 2)
        labels.append(result.case.name)
        y += 0.6
    axes.axvline(1.0, color="black", linewidth=1, linestyle="--")
    axes.set_xscale("log")  # speedups over an eager Python loop and over oneDNN differ by orders of magnitude
    axes.set_yticks(ticks, labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_title(op, loc="left", fontsize="medium", fontweight="bold")
    low, high = axes.get_xlim()
    axes.set_xlim(min(low, 0.5), high * 1.6)  # room for the labels right of the longest bar
