"""`python -m benchmarks.gpu_check [--out DIR] [--quick]` (or `make gpu-check`): the one-command check for the
day a CUDA GPU is available. No GPU on this project's machines: there it says so and exits 0.

On a CUDA machine, in under 10 minutes:
  1. correctness on the device: every attention op's Triton kernel (flash forward + backward, decode, additive
     forward + backward) and the recurrent modules (LSTM, GRU, LayerNorm LSTM), in float16 / bfloat16 / float32 (TF32 off: float32 FMAs in
     flash attention and decoding, tf32x3 in the other kernels), on CUDA tensors, under DESIGN.md's rule (max|ours - fp64|
     <= 2 max|torch same dtype - fp64| + floor); the pytest suite's Triton tests build CPU tensors (they run under the interpreter), so this is their
     on-device counterpart, on larger shapes;
  2. the GPU benchmark set, each seqkern call timed against its torch counterpart interleaved (A, B, A, B ...,
     CUDA events, median): LSTM / GRU vs torch.nn (cuDNN), attention forward and forward + backward vs SDPA's
     flash backend, decode vs SDPA, additive attention vs the composed torch version. The first call of each
     seqkern kernel autotunes (triton.autotune); warm-up calls absorb it.
Writes DIR/gpu_check.json and DIR/gpu_check.txt (the table) and prints the table. Exits 1 if a correctness
check failed, else 0.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.harness import environment, rule_verdict
from seqkern.testing import allow_tf32

DEFAULT_OUT = Path("bench_results")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for gpu_check.json / .txt")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller shapes (a smoke test)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing to check. "
              "Run it on a machine with an NVIDIA GPU (sm_80 or newer) and a CUDA build of torch.")
        return 0
    import seqkern  # noqa: F401  (after the check: importing it builds the CPU kernels on first use)

    started = time.perf_counter()
    device = torch.device("cuda")
    checks = [_check(name, run) for name, run in _correctness_cases(device, args.quick)]
    rows = [_benchmark(case, repeats=5 if args.quick else 25) for case in _benchmark_cases(device, args.quick)]
    report = {"environment": environment(), "device": torch.cuda.get_device_name(device),
              "capability": list(torch.cuda.get_device_capability(device)), "checks": checks, "benchmarks": rows,
              "seconds": time.perf_counter() - started}
    table = format_table(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (args.out / "gpu_check.txt").write_text(table)
    print(table)
    return 0 if all(check["passed"] for check in checks) else 1


# ------------------------------------------------------------------------------------------------------------
# 1. Correctness on the device.
# ------------------------------------------------------------------------------------------------------------
Tensors = list[torch.Tensor]


def _check(name: str, run: Callable[[], tuple[Tensors, Tensors, Tensors]]) -> dict:
    """run() -> (ours, torch in the same dtype, the float64 oracle); the rule's verdict, or the error."""
    try:
        passed, text = rule_verdict(*run())
    except Exception as error:  # a kernel that fails to compile or launch is a failed check, not a crash
        passed, text = False, f"{type(error).__name__}: {error}"
    print(f"  check {name}: {text}", flush=True)
    return {"name": name, "passed": passed, "verdict": text}


def _grads(out: torch.Tensor, inputs: Tensors, cotangent: torch.Tensor) -> Tensors:
    return [out.detach(), *torch.autograd.grad((out.double() * cotangent).sum(), inputs)]


def _leaves(tensors: Tensors, dtype: torch.dtype) -> Tensors:
    return [t.detach().to(dtype).requires_grad_() for t in tensors]


def _attention_check(device, dtype, batch, heads, length, dim, causal):
    def run():
        import seqkern

        base = [torch.randn(batch, heads, length, dim, device=device, dtype=torch.float64) for _ in range(3)]
        cotangent = torch.randn(batch, heads, length, dim, device=device, dtype=torch.float64)

        def through(fn, dtype_):
            inputs = _leaves(base, dtype_)
            return _grads(fn(*inputs, is_causal=causal), inputs, cotangent)
        with seqkern.backend("triton"):
            ours = through(seqkern.attention, dtype)
        return ours, through(F.scaled_dot_product_attention, dtype), \
            through(F.scaled_dot_product_attention, torch.float64)
    return run


def _decode_check(device, dtype, batch, heads, kv_heads, cache, dim):
    def run():
        import seqkern

        q = torch.randn(batch, heads, 1, dim, device=device, dtype=torch.float64)
        k, v = (torch.randn(batch, kv_heads, cache, dim, device=device, dtype=torch.float64) for _ in range(2))

        def sdpa(dtype_):
            return [F.scaled_dot_product_attention(q.to(dtype_), k.to(dtype_), v.to(dtype_), enable_gqa=True)]
        with seqkern.backend("triton"):
            ours = [seqkern.attention_decode(q.to(dtype), k.to(dtype), v.to(dtype))]
        return ours, sdpa(dtype), sdpa(torch.float64)
    return run


def composed_additive(query_proj, key_proj, values, v):
    """The torch composition additive attention replaces: the (B,Lq,Lk,H) tanh tensor in memory."""
    scores = torch.tanh(query_proj[:, :, None, :] + key_proj[:, None, :, :]) @ v
    return torch.softmax(scores, dim=-1) @ values


def _additive_check(device, dtype, batch, length, hidden, dim):
    def run():
        import seqkern

        base = [torch.randn(batch, length, hidden, device=device, dtype=torch.float64) * 0.5,
                torch.randn(batch, length, hidden, device=device, dtype=torch.float64) * 0.5,
                torch.randn(batch, length, dim, device=device, dtype=torch.float64),
                torch.randn(hidden, device=device, dtype=torch.float64)]
        cotangent = torch.randn(batch, length, dim, device=device, dtype=torch.float64)

        def through(fn, dtype_):
            inputs = _leaves(base, dtype_)
            return _grads(fn(*inputs), inputs, cotangent)
        with seqkern.backend("triton"):
            ours = through(seqkern.additive_attention_projected, dtype)
        return ours, through(composed_additive, dtype), through(composed_additive, torch.float64)
    return run


def _recurrent_check(device, dtype, kind: str, batch, steps, hidden):
    def run():
        import seqkern

        torch.manual_seed(0)
        reference = getattr(torch.nn, kind)(hidden, hidden, batch_first=True).to(device, torch.float64)
        x = torch.randn(batch, steps, hidden, device=device, dtype=torch.float64)

        def through(module, dtype_):
            module = module.to(dtype_)
            inputs = _leaves([x], dtype_)
            out, _ = module(*inputs)
            return _grads(out, inputs, torch.ones_like(out, dtype=torch.float64))
        ours_module = getattr(seqkern.nn, kind)(hidden, hidden, batch_first=True).to(device)
        ours_module.load_state_dict(reference.state_dict())
        with seqkern.backend("triton"):
            ours = through(ours_module, dtype)
        return ours, through(copy.deepcopy(reference), dtype), through(reference, torch.float64)
    return run


def composed_layernorm_lstm(x, h0, c0, params: dict, eps: float):
    """One LayerNorm LSTM layer (batch first) from issue 16's equations, in torch ops: gates = LN(x W_ih^T) +
    LN(h W_hh^T) + b_ih + b_hh (i, f, g, o), c' = sigmoid(f) c + sigmoid(i) tanh(g), h' = sigmoid(o) tanh(LN(c'))."""
    gates = params["weight_ih_l0"].shape[0]
    h, c, outputs = h0, c0, []
    for t in range(x.shape[1]):
        pre = (F.layer_norm(x[:, t] @ params["weight_ih_l0"].t(), (gates,), params["ln_ih_weight_l0"],
                            params["ln_ih_bias_l0"], eps)
               + F.layer_norm(h @ params["weight_hh_l0"].t(), (gates,), params["ln_hh_weight_l0"],
                              params["ln_hh_bias_l0"], eps)
               + params["bias_ih_l0"] + params["bias_hh_l0"])
        i, f, g, o = pre.chunk(4, dim=-1)
        c = f.sigmoid() * c + i.sigmoid() * g.tanh()
        h = o.sigmoid() * F.layer_norm(c, (c.shape[1],), params["ln_cell_weight_l0"], params["ln_cell_bias_l0"],
                                       eps).tanh()
        outputs.append(h)
    return torch.stack(outputs, 1)


def _layernorm_lstm_check(device, dtype, batch, steps, hidden):
    """seqkern.nn.LayerNormLSTM on the Triton kernels (forward + backward; the rule's: at hidden > 64 the split ones,
    kernels/_layernorm_split.py) against the composed layer."""
    def run():
        import seqkern

        torch.manual_seed(0)
        module = seqkern.nn.LayerNormLSTM(hidden, hidden, batch_first=True).to(device)
        names = [name for name, _ in module.named_parameters()]
        base = [torch.randn(batch, steps, hidden, device=device, dtype=torch.float64),
                *(p.detach().double() for _, p in module.named_parameters())]
        cotangent = torch.randn(batch, steps, hidden, device=device, dtype=torch.float64)
        zeros = torch.zeros(batch, hidden, device=device)

        def composed(dtype_):
            inputs = _leaves(base, dtype_)
            out = composed_layernorm_lstm(inputs[0], zeros.to(dtype_), zeros.to(dtype_),
                                          dict(zip(names, inputs[1:])), module.eps)
            return _grads(out, inputs, cotangent)
        inputs = _leaves(base, dtype)
        ours_module = module.to(dtype)
        with torch.no_grad():
            for parameter, value in zip(ours_module.parameters(), inputs[1:]):
                parameter.copy_(value)
        with seqkern.backend("triton"):
            out, _ = ours_module(inputs[0])
            ours = _grads(out, [inputs[0], *ours_module.parameters()], cotangent)
        return ours, composed(dtype), composed(torch.float64)
    return run


def _correctness_cases(device, quick: bool) -> list[tuple[str, Callable]]:
    length = 256 if quick else 1024
    cases = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        for dim in (64, 128):
            cases.append((f"attention {name} L{length} d{dim} causal",
                          _attention_check(device, dtype, 2, 4, length, dim, True)))
        cases.append((f"decode {name} 8q/2kv heads cache 4096 d128", _decode_check(device, dtype, 2, 8, 2, 4096, 128)))
        cases.append((f"additive {name} L256 H128 Dv64", _additive_check(device, dtype, 2, 256, 128, 64)))
        # LayerNorm inside the step, forward + backward: the split kernels at h256 (kernels/_layernorm_split.py,
        # persistent: 32 programs), the row-block ones at h64 (kernels/layernorm_lstm.py).
        cases.append((f"LayerNormLSTM {name} b16 t50 h256", _layernorm_lstm_check(device, dtype, 16, 50, 256)))
        cases.append((f"LayerNormLSTM {name} b16 t50 h64", _layernorm_lstm_check(device, dtype, 16, 50, 64)))
        for kind in ("LSTM", "GRU"):
            cases.append((f"{kind} {name} b16 t50 h256", _recurrent_check(device, dtype, kind, 16, 50, 256)))
            # The split launch modes (kernels/_recurrent_split.py), each where the rule picks it on an
            # A100 / H100: batch 1 -> persistent (grid barrier per step), batch 512 at 1024 units -> per step.
            for batch, hidden in ((1, 1024), (4, 512), (512, 1024)):
                mode = _rule_mode(device, dtype, kind, batch, hidden)
                cases.append((f"{kind} {name} b{batch} t{20 if quick else 50} h{hidden} [{mode}]",
                              _recurrent_check(device, dtype, kind, batch, 20 if quick else 50, hidden)))
    return cases


def _rule_mode(device, dtype, kind: str, batch: int, hidden: int) -> str:
    """The launch mode kernels/_recurrent.py's rule picks for a recurrent forward on `device` (name only)."""
    from seqkern.kernels._recurrent import recurrent_mode, sm_count

    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[kind]
    return recurrent_mode(batch, hidden, gates, dtype, sm_count(device))["mode"]


# ------------------------------------------------------------------------------------------------------------
# 2. Benchmarks: seqkern vs torch, interleaved, CUDA events.
# ------------------------------------------------------------------------------------------------------------
def time_interleaved_cuda(calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds of each call, timed in turns (A, B, A, B, ...) so that clock and thermal drift
    reach every contender alike; each call is bracketed by CUDA events."""
    for call in calls.values():
        for _ in range(warmup):  # includes the autotuning of the first seqkern call
            call()
    torch.cuda.synchronize()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end))
    return {name: statistics.median(values) for name, values in times.items()}


def _attention_bench(device, dtype, batch, heads, length, dim, train: bool, tf32: bool = False):
    """seqkern's flash attention against SDPA's flash backend (16-bit dtypes) or its memory-efficient one (float32,
    which the flash backend refuses), both under torch.backends.cuda.matmul.allow_tf32 = `tf32` (float32: tf32
    tensor-core products, else float32 FMAs in seqkern's kernels)."""
    import seqkern
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.EFFICIENT_ATTENTION if dtype == torch.float32 else SDPBackend.FLASH_ATTENTION

    q, k, v = (torch.randn(batch, heads, length, dim, device=device, dtype=dtype, requires_grad=train)
               for _ in range(3))
    grad = torch.randn_like(q)

    def ours():
        with seqkern.backend("triton"), allow_tf32(tf32):
            out = seqkern.attention(q, k, v, is_causal=True)
            if train:
                torch.autograd.grad(out, (q, k, v), grad)

    def sdpa():
        with sdpa_kernel(backend), allow_tf32(tf32):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            if train:
                torch.autograd.grad(out, (q, k, v), grad)
    # causal: half the score matrix; 4 matmul-like products of L x L x d forward, 2.5x that with backward
    flops = 4 * batch * heads * length * length * dim / 2 * (3.5 if train else 1)
    return {"seqkern": ours, "SDPA flash" if backend == SDPBackend.FLASH_ATTENTION else "SDPA efficient": sdpa}, flops, 0


def _decode_bench(device, dtype, batch, heads, kv_heads, cache, dim):
    import seqkern

    q = torch.randn(batch, heads, 1, dim, device=device, dtype=dtype)
    k, v = (torch.randn(batch, kv_heads, cache, dim, device=device, dtype=dtype) for _ in range(2))
    calls = {"seqkern": lambda: seqkern.attention_decode(q, k, v),
             "SDPA": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)}
    return calls, 4 * batch * heads * cache * dim, 2 * k.numel() * k.element_size()


def _additive_bench(device, dtype, batch, length, hidden, dim, train: bool):
    import seqkern

    tensors = [torch.randn(batch, length, hidden, device=device, dtype=dtype, requires_grad=train) * 0.5,
               torch.randn(batch, length, hidden, device=device, dtype=dtype, requires_grad=train) * 0.5,
               torch.randn(batch, length, dim, device=device, dtype=dtype, requires_grad=train),
               torch.randn(hidden, device=device, dtype=dtype, requires_grad=train)]
    tensors = [t.detach().requires_grad_(train) for t in tensors]

    def run(fn):
        def call():
            out = fn(*tensors)
            if train:
                torch.autograd.grad(out.sum(), tensors)
        return call

    def ours(*inputs):
        with seqkern.backend("triton"):
            return seqkern.additive_attention_projected(*inputs)
    # the tanh count dominates: Lq * Lk * H per batch (plus the P @ values product)
    return {"seqkern": run(ours), "composed torch": run(composed_additive)}, \
        batch * length * length * (2 * hidden + 2 * dim) * (3 if train else 1), 0


def _recurrent_bench(device, dtype, kind: str, batch, steps, hidden, train: bool, modes: tuple = ()):
    """seqkern's module (the rule's launch mode) against torch.nn's (cuDNN), and against seqkern forced into
    each of `modes` ("rows", "per_step": kernels/_recurrent.py forced_mode) to measure what the rule gains."""
    import seqkern
    from seqkern.kernels._recurrent import PER_STEP_TILE, forced_mode

    reference = getattr(torch.nn, kind)(hidden, hidden, batch_first=True).to(device, dtype)
    ours_module = getattr(seqkern.nn, kind)(hidden, hidden, batch_first=True).to(device, dtype)
    ours_module.load_state_dict(reference.state_dict())
    x = torch.randn(batch, steps, hidden, device=device, dtype=dtype, requires_grad=train)
    rows, units = PER_STEP_TILE[dtype.itemsize]  # the rule's per-step tile, for the forced comparison row

    def run(module, backend: str | None, mode: str | None = None):
        def call():
            with contextlib.ExitStack() as stack:
                if backend:
                    stack.enter_context(seqkern.backend(backend))
                if mode:
                    stack.enter_context(forced_mode(mode, block_u=units, block_b=rows))
                out, _ = module(x)
            if train:
                torch.autograd.grad(out.sum(), [x, *module.parameters()])
        return call
    gates = {"LSTM": 4, "GRU": 3}[kind]
    flops = 2 * 2 * batch * steps * hidden * gates * hidden * (3 if train else 1)
    calls = {"seqkern": run(ours_module, "triton"), f"torch.nn.{kind} (cuDNN)": run(reference, None)}
    for mode in modes:
        call = run(ours_module, "triton", mode)
        try:  # a forced mode the rule would not pick may not launch (e.g. the row-block kernel at 1024 units)
            call()
        except Exception as error:
            print(f"  bench {kind} b{batch} h{hidden}: seqkern {mode} left out: {type(error).__name__}: {error}")
            continue
        calls[f"seqkern {mode}"] = call
    return calls, flops, 0


def _benchmark_cases(device, quick: bool) -> list[tuple[str, Callable]]:
    scale = 4 if quick else 1
    cases = []
    for dtype in (torch.bfloat16, torch.float16):
        name = str(dtype).removeprefix("torch.")
        for dim in (64, 128):
            for train in (False, True):
                length = 4096 // scale
                cases.append((f"attention {name} b4 h16 L{length} d{dim} causal {'fwd+bwd' if train else 'fwd'}",
                              lambda d=dtype, dm=dim, t=train: _attention_bench(device, d, 4, 16, length, dm, t)))
        cases.append((f"decode {name} b8 32q/8kv cache {32768 // scale} d128",
                       lambda d=dtype: _decode_bench(device, d, 8, 32, 8, 32768 // scale, 128)))
        for train in (False, True):
            cases.append((f"additive {name} b8 L{512 // scale} H256 Dv128 {'fwd+bwd' if train else 'fwd'}",
                          lambda d=dtype, t=train: _additive_bench(device, d, 8, 512 // scale, 256, 128, t)))
    # float32 flash attention: float32 FMAs (TF32 off, torch's default) and tf32 products, against SDPA's
    # memory-efficient backend in the same setting; a shorter sequence (the FMA path is ~10x slower than bf16).
    for tf32 in (False, True):
        for train in (False, True):
            length = 2048 // scale
            cases.append((f"attention float32{' tf32' if tf32 else ''} b4 h16 L{length} d128 causal "
                          f"{'fwd+bwd' if train else 'fwd'}",
                          lambda t=train, f=tf32, n=length: _attention_bench(device, torch.float32, 4, 16, n, 128, t, f)))
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        for kind in ("LSTM", "GRU"):
            for hidden in (256, 1024):
                for train in (False, True):
                    cases.append((f"{kind} {name} b32 t{200 // scale} h{hidden} {'train' if train else 'infer'}",
                                  lambda d=dtype, k=kind, h=hidden, t=train:
                                  _recurrent_bench(device, d, k, 32, 200 // scale, h, t)))
            # The split modes against the row-block kernel and cuDNN, inference, where the rule picks them:
            # small batches (persistent: one program per SM, a grid barrier per step) and a large one at
            # 1024 units (per step).
            for batch, hidden in ((1, 1024), (8, 512), (64, 1024), (512, 1024)):
                mode = _rule_mode(device, dtype, kind, batch, hidden)
                cases.append((f"{kind} {name} b{batch} t{200 // scale} h{hidden} infer [{mode}]",
                              lambda d=dtype, k=kind, b=batch, h=hidden:
                              _recurrent_bench(device, d, k, b, 200 // scale, h, False, ("rows", "per_step"))))
        for train in (False, True):
            cases.append((f"LayerNormLSTM {name} b32 t{200 // scale} h256 {'train' if train else 'infer'}",
                          lambda d=dtype, t=train: _layernorm_lstm_bench(device, d, 32, 200 // scale, 256, t)))
    return cases


def _layernorm_lstm_bench(device, dtype, batch, steps, hidden, train: bool):
    """seqkern.nn.LayerNormLSTM (the row-block kernels) against the same layer composed of torch ops (no cuDNN
    LayerNorm LSTM exists); the FLOPs are the two GEMMs per step."""
    import seqkern

    module = seqkern.nn.LayerNormLSTM(hidden, hidden, batch_first=True).to(device, dtype)
    params = dict(module.named_parameters())
    x = torch.randn(batch, steps, hidden, device=device, dtype=dtype, requires_grad=train)
    zeros = torch.zeros(batch, hidden, device=device, dtype=dtype)

    def run(forward):
        def call():
            out = forward()
            if train:
                torch.autograd.grad(out.sum(), [x, *params.values()])
        return call
    flops = 2 * 2 * batch * steps * hidden * 4 * hidden * (3 if train else 1)
    with_seqkern = run(lambda: _under_triton(module, x))
    composed = run(lambda: composed_layernorm_lstm(x, zeros, zeros, params, module.eps))
    return {"seqkern": with_seqkern, "composed torch ops": composed}, flops, 0


def _under_triton(module, x):
    import seqkern

    with seqkern.backend("triton"):
        return module(x)[0]


def _benchmark(case: tuple[str, Callable], repeats: int) -> dict:
    name, build = case
    try:
        calls, flops, bytes_moved = build()
        times = time_interleaved_cuda(calls, repeats)
    except Exception as error:
        print(f"  bench {name}: {type(error).__name__}: {error}", flush=True)
        return {"name": name, "error": f"{type(error).__name__}: {error}"}
    ours = times["seqkern"]
    row = {"name": name, "ms": times, "tflops": {k: flops / (t * 1e-3) / 1e12 for k, t in times.items()},
           "speedup_vs": {k: t / ours for k, t in times.items() if k != "seqkern"}}
    if bytes_moved:
        row["gb_per_s"] = {k: bytes_moved / (t * 1e-3) / 1e9 for k, t in times.items()}
    print(f"  bench {name}: " + ", ".join(f"{k} {t:.3f} ms" for k, t in times.items()), flush=True)
    return row


def format_table(report: dict) -> str:
    lines = [f"GPU check on {report['device']} (sm_{''.join(map(str, report['capability']))}), "
             f"{report['seconds']:.0f} s", "", "Correctness on the device (DESIGN.md rule):"]
    lines += [f"  {'ok    ' if c['passed'] else 'FAILED'} {c['name']}: {c['verdict']}" for c in report["checks"]]
    lines += ["", f"{'case':<58} {'seqkern ms':>11} {'baseline':>24} {'ms':>9} {'speedup':>8} {'TFLOP/s':>8}"]
    for row in report["benchmarks"]:
        if "error" in row:
            lines.append(f"{row['name']:<58} error: {row['error']}")
            continue
        for baseline, speedup in row["speedup_vs"].items():
            lines.append(f"{row['name']:<58} {row['ms']['seqkern']:>11.3f} {baseline:>24} "
                         f"{row['ms'][baseline]:>9.3f} {speedup:>7.2f}x {row['tflops']['seqkern']:>8.1f}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
