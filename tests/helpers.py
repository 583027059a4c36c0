"""The correctness rule of DESIGN.md and small tools the tests share.

    max|seqkern - ref_fp64| <= 2 * max|torch_same_dtype - ref_fp64| + floor(dtype)
"""
from __future__ import annotations

import torch
from torch import Tensor

# Absorbs the case where PyTorch happens to be exact (its error 0) and a few ulps of summation order.
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def assert_rule(name: str, ours: Tensor, theirs: Tensor, ref64: Tensor) -> None:
    """`ours` is no more than twice as far from the float64 reference as PyTorch's `theirs` (plus the floor)."""
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    assert ours.dtype == theirs.dtype, f"{name}: dtype {ours.dtype} != {theirs.dtype}"
    ref64 = ref64.double()
    our_error = (ours.double() - ref64).abs().max().item() if ours.numel() else 0.0
    their_error = (theirs.double() - ref64).abs().max().item() if theirs.numel() else 0.0
    bound = 2 * their_error + FLOOR[ours.dtype]
    assert our_error <= bound, f"{name}: error {our_error:.3e} > 2 x torch's {their_error:.3e} + floor"


def assert_all_rule(ours: dict[str, Tensor], theirs: dict[str, Tensor], ref64: dict[str, Tensor]) -> None:
    assert ours.keys() == theirs.keys() == ref64.keys(), (ours.keys(), theirs.keys(), ref64.keys())
    for name in ours:
        assert_rule(name, ours[name], theirs[name], ref64[name])


# ------------------------------------------------------------------------------------------------
# Recurrent modules (LSTM, GRU, RNN) against torch.nn with the same weights.
# ------------------------------------------------------------------------------------------------
def _leaf(t: Tensor, dtype) -> Tensor:
    return t.detach().to(dtype).requires_grad_()


def state_sizes(torch_cls, options: dict) -> tuple[int, ...]:
    """Widths of the states of a layer: LSTM (h: proj_size or hidden, c: hidden); GRU, RNN (h: hidden)."""
    hidden = options["hidden_size"]
    if torch_cls is torch.nn.LSTM:
        return (options.get("proj_size", 0) or hidden, hidden)
    return (hidden,)


def _pack(x: Tensor, lengths, batch_first: bool):
    from torch.nn.utils.rnn import pack_padded_sequence

    return x if lengths is None else pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)


def run_recurrent(module, dtype, x64, hx64, cotangents, lengths=None) -> dict[str, Tensor]:
    """Forward + backward of a weighted sum of every output; returns the outputs and all gradients."""
    from torch.nn.utils.rnn import PackedSequence

    x = _leaf(x64, dtype)
    hx = None if hx64 is None else tuple(_leaf(h, dtype) for h in hx64)
    out, final = module(_pack(x, lengths, module.batch_first), hx if hx is None or len(hx) > 1 else hx[0])
    finals = final if isinstance(final, tuple) else (final,)
    results = {"output": out.data if isinstance(out, PackedSequence) else out}
    results.update({f"state_{i}_n": s for i, s in enumerate(finals)})
    loss = sum((r.double() * c).sum() for r, c in zip(results.values(), cotangents))
    module.zero_grad()
    loss.backward()
    results["grad_input"] = x.grad
    for i, h in enumerate(hx or ()):
        results[f"grad_state_{i}_0"] = h.grad
    results.update({f"grad_{name}": p.grad for name, p in module.named_parameters()})
    return results


def compare_recurrent(torch_cls, ours_cls, dtype, options, seq_len, batch, *, with_hx=True, lengths=None,
                      backend="cpu") -> None:
    """seqkern's module under `backend` vs torch.nn's in `dtype` vs the reference in float64: the rule."""
    import copy

    import seqkern

    torch.manual_seed(0)
    theirs = torch_cls(**options).double()
    ours = ours_cls(**options).double()
    ours.load_state_dict(theirs.state_dict())
    ref = copy.deepcopy(ours)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    torch.manual_seed(1)
    batch_first = options.get("batch_first", False)
    stacked = options.get("num_layers", 1) * (2 if options.get("bidirectional") else 1)
    shape = (batch, seq_len, options["input_size"]) if batch_first else (seq_len, batch, options["input_size"])
    x64 = torch.randn(shape, dtype=torch.float64)
    hx64 = None
    if with_hx:
        hx64 = tuple(torch.randn(stacked, batch, size, dtype=torch.float64) for size in state_sizes(torch_cls, options))
    with torch.no_grad(), seqkern.backend("reference"):
        probe = run_recurrent_outputs(ref, x64, lengths)
    cotangents = [torch.randn_like(p) for p in probe]
    with seqkern.backend(backend):
        got = run_recurrent(ours, dtype, x64, hx64, cotangents, lengths)
    with seqkern.backend("reference"):
        expected = run_recurrent(ref, torch.float64, x64, hx64, cotangents, lengths)
    baseline = run_recurrent(theirs, dtype, x64, hx64, cotangents, lengths)
    assert_all_rule(got, baseline, expected)


def run_recurrent_outputs(module, x, lengths) -> list[Tensor]:
    """The output tensors (output, then each final state) of a forward, for drawing cotangents."""
    from torch.nn.utils.rnn import PackedSequence

    out, final = module(_pack(x, lengths, module.batch_first))
    finals = final if isinstance(final, tuple) else (final,)
    return [out.data if isinstance(out, PackedSequence) else out, *finals]


# ------------------------------------------------------------------------------------------------
# Ops: an implementation against the float64 reference, every output and every input gradient.
# ------------------------------------------------------------------------------------------------
def cast_args(args, dtype):
    """Floating-point tensors become fresh leaves in `dtype` that require grad; the rest passes through."""
    return tuple(
        a.detach().to(dtype).requires_grad_() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args
    )


def outputs_and_grads(run, args, cotangents, names) -> dict[str, Tensor]:
    """Outputs of run(*args) and the gradient of each floating-point argument under a weighted sum of them."""
    outputs = run(*args)
    results = {f"out{i}": o for i, o in enumerate(outputs)}
    loss = sum((o.double() * c).sum() for o, c in zip(outputs, cotangents))
    tensors = {n: a for n, a in zip(names, args) if isinstance(a, Tensor) and a.requires_grad}
    grads = torch.autograd.grad(loss, list(tensors.values()))
    results.update({f"grad_{n}": g for n, g in zip(tensors, grads)})
    return results


def check_op(run, reference_fn, args64, names, dtype, backend) -> None:
    """`run` under `backend` obeys the rule, with the reference in `dtype` standing for torch's same-dtype math."""
    import seqkern

    outputs = reference_fn(*cast_args(args64, torch.float64))
    gen = torch.Generator().manual_seed(7)
    cotangents = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outputs]
    with seqkern.backend("reference"):
        expected = outputs_and_grads(reference_fn, cast_args(args64, torch.float64), cotangents, names)
        baseline = outputs_and_grads(reference_fn, cast_args(args64, dtype), cotangents, names)
    with seqkern.backend(backend):
        got = outputs_and_grads(run, cast_args(args64, dtype), cotangents, names)
    assert_all_rule(got, baseline, expected)


def batch_sizes_for(lengths, seq_len: int) -> Tensor:
    """The PackedSequence batch_sizes (T,) of sorted `lengths`."""
    lengths = torch.tensor(sorted(lengths, reverse=True))
    return torch.tensor([(lengths > t).sum().item() for t in range(seq_len)], dtype=torch.int64)


def gradcheck_op(run, args) -> bool:
    """torch.autograd.gradcheck of run(*args) with respect to every argument that requires grad."""
    positions = [i for i, a in enumerate(args) if isinstance(a, Tensor) and a.requires_grad]

    def with_inputs(*tensors):
        full = list(args)
        for i, t in zip(positions, tensors):
            full[i] = t
        return run(*full)

    return torch.autograd.gradcheck(with_inputs, [args[i] for i in positions])


def check_compiled_module(module: torch.nn.Module, x: Tensor) -> None:
    """torch.compile(module, fullgraph=True) gives eager's outputs and input gradient."""
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)
    x = x.detach().requires_grad_()
    flat = [o for out in (compiled(x), module(x)) for o in [out[0], *(out[1] if isinstance(out[1], tuple) else (out[1],))]]
    half = len(flat) // 2
    for got, want in zip(flat[:half], flat[half:]):
        torch.testing.assert_close(got, want)
    grad_compiled = torch.autograd.grad(sum(o.sum() for o in flat[:half]), x)[0]
    grad_eager = torch.autograd.grad(sum(o.sum() for o in flat[half:]), x)[0]
    torch.testing.assert_close(grad_compiled, grad_eager)


# ------------------------------------------------------------------------------------------------
# Arguments of the recurrent ops, drawn in float64 from a fixed seed then cast.
# ------------------------------------------------------------------------------------------------
def case_id(case: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in case.items())


def layer_args(gates: int, seq_len, batch, input_size, hidden, *, proj=0, cell_state=False, bias=True,
               lengths=None, reverse=False, dtype=torch.float64, requires_grad=True, seed=0) -> tuple:
    """(input, h0, [c0,] w_ih, w_hh, b_ih, b_hh, [w_hr,] batch_sizes, reverse) of a `gates`-gate layer op:
    the LSTM (gates=4) has c0 and a w_hr slot (None without a projection), the GRU (3) and RNN (1) neither."""
    gen = torch.Generator().manual_seed(seed)
    out_size = proj or hidden

    def rand(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
        return t.requires_grad_(requires_grad)

    scale = hidden ** -0.5
    states = (rand(batch, out_size), *((rand(batch, hidden),) if cell_state else ()))
    weights = (rand(gates * hidden, input_size, scale=scale), rand(gates * hidden, out_size, scale=scale))
    biases = (rand(gates * hidden, scale=scale), rand(gates * hidden, scale=scale)) if bias else (None, None)
    projection = (rand(out_size, hidden, scale=scale) if proj else None,) if cell_state else ()
    batch_sizes = batch_sizes_for(lengths, seq_len) if lengths is not None else None
    return (rand(seq_len, batch, input_size), *states, *weights, *biases, *projection, batch_sizes, reverse)


def cell_args(gates: int, batch, hidden, *, bias=True, state=True) -> tuple:
    """(gates_x, gates_h, [state,] b_ih, b_hh) of a `gates`-gate cell op, float64."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(batch, gates * hidden), (batch, gates * hidden)] + ([(batch, hidden)] if state else [])
    args = [torch.randn(*s, generator=gen, dtype=torch.float64) for s in shapes]
    biases = [torch.randn(gates * hidden, generator=gen, dtype=torch.float64) for _ in range(2)] if bias else [None, None]
    return (*args, *biases)


# Cases of the single-state layers (GRU, Elman RNN); the LSTM's add projections.
SINGLE_STATE_LAYER_CASES = [
    dict(seq_len=1, batch=1, input_size=1, hidden=1),
    dict(seq_len=7, batch=3, input_size=5, hidden=63),
    dict(seq_len=9, batch=5, input_size=4, hidden=127, reverse=True),
    dict(seq_len=6, batch=4, input_size=3, hidden=17, bias=False, lengths=[6, 4, 4, 1]),
    dict(seq_len=6, batch=4, input_size=3, hidden=17, lengths=[6, 5, 2, 1], reverse=True),
    dict(seq_len=40, batch=32, input_size=33, hidden=256),
]
SINGLE_STATE_TRITON_CASES = [SINGLE_STATE_LAYER_CASES[0], dict(seq_len=4, batch=3, input_size=5, hidden=17),
                             SINGLE_STATE_LAYER_CASES[3], SINGLE_STATE_LAYER_CASES[4]]
CELL_CASES = [dict(batch=1, hidden=1), dict(batch=3, hidden=17, bias=False), dict(batch=64, hidden=127)]
