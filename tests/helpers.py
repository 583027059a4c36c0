"""The correctness rule of DESIGN.md (defined in seqkern/testing.py) and small tools the tests share."""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from seqkern.testing import max_abs_error, rule_bound


def assert_rule(name: str, ours: Tensor, theirs: Tensor, ref64: Tensor) -> None:
    """`ours` is no more than twice as far from the float64 reference as PyTorch's `theirs` (plus the floor)."""
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    assert ours.dtype == theirs.dtype, f"{name}: dtype {ours.dtype} != {theirs.dtype}"
    our_error, bound = max_abs_error(ours, ref64), rule_bound(theirs, ref64)
    assert our_error <= bound, (f"{name}: error {our_error:.3e} > 2 x torch's {max_abs_error(theirs, ref64):.3e} "
                                f"+ floor (bound {bound:.3e})")


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
    """seqkern's module under `backend` vs torch.nn's in `dtype` vs torch.nn's in float64 (the oracle): the rule."""
    import copy

    import seqkern

    torch.manual_seed(0)
    oracle = torch_cls(**options).double()
    ours = ours_cls(**options).double()
    ours.load_state_dict(oracle.state_dict())
    theirs = copy.deepcopy(oracle)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    torch.manual_seed(1)
    batch_first = options.get("batch_first", False)
    stacked = options.get("num_layers", 1) * (2 if options.get("bidirectional") else 1)
    shape = (batch, seq_len, options["input_size"]) if batch_first else (seq_len, batch, options["input_size"])
    x64 = torch.randn(shape, dtype=torch.float64)
    hx64 = None
    if with_hx:
        hx64 = tuple(torch.randn(stacked, batch, size, dtype=torch.float64) for size in state_sizes(torch_cls, options))
    with torch.no_grad():
        probe = run_recurrent_outputs(oracle, x64, lengths)
    cotangents = [torch.randn_like(p) for p in probe]
    with seqkern.backend(backend):
        got = run_recurrent(ours, dtype, x64, hx64, cotangents, lengths)
    expected = run_recurrent(oracle, torch.float64, x64, hx64, cotangents, lengths)
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


def check_op(run, oracle, args64, names, dtype, backend) -> None:
    """`run` under `backend` obeys the rule: `oracle` (torch's own module stepped in the test, or a formula composed
    in the test; never seqkern's reference) in float64 is ref_fp64 and in `dtype` stands for torch_same_dtype."""
    import seqkern

    outputs = oracle(*cast_args(args64, torch.float64))
    gen = torch.Generator().manual_seed(7)
    cotangents = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outputs]
    expected = outputs_and_grads(oracle, cast_args(args64, torch.float64), cotangents, names)
    baseline = outputs_and_grads(oracle, cast_args(args64, dtype), cotangents, names)
    with seqkern.backend(backend):
        got = outputs_and_grads(run, cast_args(args64, dtype), cotangents, names)
    assert_all_rule(got, baseline, expected)


# ------------------------------------------------------------------------------------------------
# Oracles of the recurrent ops, independent of seqkern: torch.nn's own kernels (torch._VF.lstm/gru/rnn_*, what
# torch.nn.LSTM/GRU/RNN call) stepped one time step at a time, which gives the ops' PackedSequence and reverse
# semantics that no single torch call has; the cell ops (pre-computed gate inputs) as formulas composed here.
# ------------------------------------------------------------------------------------------------
def torch_recurrence(step, input: Tensor, states: tuple[Tensor, ...], batch_sizes: Tensor | None,
                     reverse: bool) -> tuple[Tensor, ...]:
    """input (T,B,I), states [(B,S_i)] -> output (T,B,S_0) and the final states. At step t only the first
    batch_sizes[t] rows advance (the others keep their state, their output is 0); reverse walks t = T-1 .. 0.
    step(x (n,I), states [(n,S_i)]) -> new states, the first of which is the step's output."""
    seq_len, batch = input.shape[:2]
    outputs = [input.new_zeros(batch, states[0].shape[1])] * seq_len
    for t in (range(seq_len - 1, -1, -1) if reverse else range(seq_len)):
        n = batch if batch_sizes is None else int(batch_sizes[t])
        new = step(input[t, :n], tuple(s[:n] for s in states))
        states = tuple(torch.cat([a, s[n:]]) for a, s in zip(new, states))
        outputs[t] = torch.cat([new[0], new[0].new_zeros(batch - n, new[0].shape[1])])
    return (torch.stack(outputs) if seq_len else input.new_zeros(0, batch, states[0].shape[1]), *states)


def _vf_params(*tensors):
    """torch.nn's flat weight list of one layer and direction: w_ih, w_hh[, b_ih, b_hh][, w_hr]."""
    return [t for t in tensors if t is not None]


def _no_state_flags(lengths=None, resets=None, zoneout=0.0, zoneout_seed=None) -> None:
    assert lengths is None and resets is None and zoneout == 0.0, "the torch.nn layers have no lengths/resets/zoneout"


def torch_lstm_layer(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, *flags_and_reverse):
    """lstm_forward's (output, h_n, c_n) from torch.nn.LSTM's kernel (with its projection when w_hr is given);
    lengths, resets and zoneout must be unused."""
    *flags, reverse = flags_and_reverse
    _no_state_flags(*flags)
    params, has_bias = _vf_params(w_ih, w_hh, b_ih, b_hh, w_hr), b_ih is not None

    def step(x, states):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "LSTM with projections is not supported with oneDNN")
            _, h, c = torch._VF.lstm(x[None], (states[0][None], states[1][None]), params, has_bias, 1, 0.0, False,
                                     False, False)
        return h[0], c[0]

    return torch_recurrence(step, input, (h0, c0), batch_sizes, reverse)


def torch_single_state_layer(kernel, input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, *flags_and_reverse):
    """gru_forward's / rnn_forward's (output, h_n) from torch.nn.GRU's / RNN's `kernel` (torch._VF.gru,
    torch._VF.rnn_tanh, torch._VF.rnn_relu); lengths, resets (and zoneout) must be unused."""
    *flags, reverse = flags_and_reverse
    _no_state_flags(*flags)
    params, has_bias = _vf_params(w_ih, w_hh, b_ih, b_hh), b_ih is not None

    def step(x, states):
        return (kernel(x[None], states[0][None], params, has_bias, 1, 0.0, False, False, False)[1][0],)

    return torch_recurrence(step, input, (h0,), batch_sizes, reverse)


def _biased(gates: Tensor, bias: Tensor | None) -> Tensor:
    return gates if bias is None else gates + bias


def composed_lstm_cell(gates_x, gates_h, cx, b_ih, b_hh):
    """(hy, cy) of lstm_cell_forward from the definition (torch.nn.LSTMCell's gate order i, f, g, o)."""
    i, f, g, o = (_biased(gates_x, b_ih) + _biased(gates_h, b_hh)).chunk(4, dim=-1)
    cy = f.sigmoid() * cx + i.sigmoid() * g.tanh()
    return o.sigmoid() * cy.tanh(), cy


def composed_gru_cell(gates_x, gates_h, hx, b_ih, b_hh):
    """(hy,) of gru_cell_forward from torch.nn.GRUCell's definition: r, z = sigmoid(x_r,z + h_r,z),
    n = tanh(x_n + r * h_n) (biases inside), hy = (1 - z) n + z h."""
    x_r, x_z, x_n = _biased(gates_x, b_ih).chunk(3, dim=-1)
    h_r, h_z, h_n = _biased(gates_h, b_hh).chunk(3, dim=-1)
    r, z = (x_r + h_r).sigmoid(), (x_z + h_z).sigmoid()
    n = (x_n + r * h_n).tanh()
    return ((hx - n) * z + n,)


def composed_rnn_cell(gates_x, gates_h, b_ih, b_hh, relu):
    """(hy,) of rnn_cell_forward: tanh or relu of x + h + biases."""
    preact = _biased(gates_x, b_ih) + _biased(gates_h, b_hh)
    return (preact.relu() if relu else preact.tanh(),)


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
    """(input, h0, [c0,] w_ih, w_hh, b_ih, b_hh, [w_hr,] batch_sizes, lengths, resets, [zoneout, zoneout_seed,]
    reverse) of a `gates`-gate layer op: the LSTM (gates=4) has c0 and a w_hr slot (None without a projection),
    the GRU (3) and RNN (1) neither; lengths and resets are None, zoneout 0 (the LSTM and GRU only) (`lengths`
    here makes the batch_sizes of a sorted PackedSequence)."""
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
    state_flags = (None, None) + ((0.0, None) if gates in (3, 4) else ())
    return (rand(seq_len, batch, input_size), *states, *weights, *biases, *projection, batch_sizes, *state_flags,
            reverse)


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
    # The forward projects the input inside the team (project_input_in_team): step by step at batch >= 8, where
    # the backward also forms grad_input inside the team (input_gradient_in_team; after the loop below batch 8),
    dict(seq_len=5, batch=9, input_size=7, hidden=21, lengths=[5, 5, 4, 4, 3, 2, 2, 1, 1], reverse=True),
    dict(seq_len=4, batch=11, input_size=5, hidden=19, bias=False),
    dict(seq_len=3, batch=8, input_size=5, hidden=128),  # two threads, the second with no input columns
    # in blocks of steps below (input_block_steps: 32 at batch 1, 11 at batch 3), the last one partial,
    dict(seq_len=37, batch=1, input_size=9, hidden=40, reverse=True),
    dict(seq_len=23, batch=3, input_size=6, hidden=24, lengths=[23, 17, 5], reverse=True),
    # and before (after) the loop where a thread's W_ih slice would not fit in L2 beside its W_hh slice.
    dict(seq_len=2, batch=8, input_size=2100, hidden=256),
]
SINGLE_STATE_TRITON_CASES = [SINGLE_STATE_LAYER_CASES[0], dict(seq_len=4, batch=3, input_size=5, hidden=17),
                             SINGLE_STATE_LAYER_CASES[3], SINGLE_STATE_LAYER_CASES[4]]
CELL_CASES = [dict(batch=1, hidden=1), dict(batch=3, hidden=17, bias=False), dict(batch=64, hidden=127)]


# ------------------------------------------------------------------------------------------------
# Seq2Seq batches (tests/test_seq2seq.py, tests/test_seq2seq_context.py).
# ------------------------------------------------------------------------------------------------
def seq2seq_batch(src_vocab: int, tgt_vocab: int, rows: int = 4, src_len: int = 7, tgt_len: int = 5, seed: int = 1,
                  pad: int = 0, bos: int = 1, eos: int = 2):
    """src (rows, src_len) padded after ragged lengths (the longest src_len, in no order), src_lengths, tgt_in
    starting with bos, tgt_out; token ids above eos."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, src_len + 1, (rows,), generator=gen)
    lengths[rows // 2] = src_len
    src = torch.randint(eos + 1, src_vocab, (rows, src_len), generator=gen)
    src = src.masked_fill(torch.arange(src_len) >= lengths[:, None], pad)
    tgt = torch.randint(eos + 1, tgt_vocab, (rows, tgt_len + 1), generator=gen)
    tgt[:, 0] = bos
    return src, lengths, tgt[:, :-1], tgt[:, 1:]
