"""lengths, resets and zoneout in seqkern.nn.LSTM / GRU / RNN and their layer ops (issue 16; definitions in
seqkern/ops/_schemas.py and seqkern/reference/_scan.py).

Oracles: lengths against torch.nn itself on pack_padded_sequence(..., enforce_sorted=False) padded back; resets and
zoneout against a time loop composed here (cell math from tests/helpers.py's composed cells, the blend and the
resets written below; only the zoneout mask comes from seqkern.reference._scan.zoneout_keep, which defines it).
Every output, final state and gradient (input, initial states, parameters) under the rule, on the "cpu" and the
"triton" (interpreter, small shapes) backends. On "cpu", lengths alone run as the rows sorted by length through
the C++ kernel's batch_sizes (seqkern/ops/lstm.py SORTED_LENGTHS_BACKENDS: faster there); "cpu-kernel" turns that
route off so that the C++ engine's own lengths predicate runs them."""
from __future__ import annotations

import contextlib
import copy
import re

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import seqkern
from helpers import assert_all_rule, composed_gru_cell, composed_lstm_cell, composed_rnn_cell
from seqkern.reference._scan import zoneout_keep

OP_MODULES = (seqkern.ops.lstm, seqkern.ops.gru, seqkern.ops.rnn)


@contextlib.contextmanager
def _backend(name: str):
    """seqkern.backend(name); "cpu-kernel": the cpu backend with lengths alone through the C++ kernel's own lengths
    (not the rows sorted by length)."""
    saved = [m.SORTED_LENGTHS_BACKENDS for m in OP_MODULES]
    try:
        if name == "cpu-kernel":
            for m in OP_MODULES:
                m.SORTED_LENGTHS_BACKENDS = ()
        with seqkern.backend("cpu" if name == "cpu-kernel" else name):
            yield
    finally:
        for m, value in zip(OP_MODULES, saved):
            m.SORTED_LENGTHS_BACKENDS = value

FAMILIES = {
    "lstm": (torch.nn.LSTM, seqkern.nn.LSTM, {}),
    "gru": (torch.nn.GRU, seqkern.nn.GRU, {}),
    "rnn": (torch.nn.RNN, seqkern.nn.RNN, {"nonlinearity": "tanh"}),
}


def _modules(family: str, options: dict, dtype, zoneout: float = 0.0):
    """(float64 torch.nn oracle, torch.nn in dtype, seqkern in dtype) with the same weights."""
    torch_cls, ours_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    oracle = torch_cls(**options, **extra).double()
    ours_options = dict(options, **extra, **({"zoneout": zoneout} if zoneout else {}))
    ours = ours_cls(**ours_options).double()
    ours.load_state_dict(oracle.state_dict())
    return oracle, copy.deepcopy(oracle).to(dtype), ours.to(dtype)


def _state_widths(family: str, options: dict) -> tuple[int, ...]:
    hidden = options["hidden_size"]
    return (options.get("proj_size", 0) or hidden, hidden) if family == "lstm" else (hidden,)


def _inputs(family, options, seq_len, batch):
    gen = torch.Generator().manual_seed(1)
    shape = (batch, seq_len, options["input_size"]) if options.get("batch_first") else (seq_len, batch,
                                                                                          options["input_size"])
    stacked = options.get("num_layers", 1) * (2 if options.get("bidirectional") else 1)
    hx = tuple(torch.randn(stacked, batch, w, generator=gen, dtype=torch.float64)
               for w in _state_widths(family, options))
    return torch.randn(shape, generator=gen, dtype=torch.float64), hx


def _results(module, dtype, x64, hx64, cotangents, call) -> dict:
    """call(module, x, hx) -> (output, finals); every output and the gradients of x, hx and the parameters."""
    x = x64.detach().to(dtype).requires_grad_()
    hx = tuple(h.detach().to(dtype).requires_grad_() for h in hx64)
    out, finals = call(module, x, hx if len(hx) > 1 else hx[0])
    finals = finals if isinstance(finals, tuple) else (finals,)
    results = {"output": out, **{f"state_{i}_n": s for i, s in enumerate(finals)}}
    if cotangents is None:
        return results
    module.zero_grad()
    sum((r.double() * c).sum() for r, c in zip(results.values(), cotangents)).backward()
    results.update(grad_input=x.grad, **{f"grad_state_{i}_0": h.grad for i, h in enumerate(hx)})
    results.update({f"grad_{n}": p.grad for n, p in module.named_parameters()})
    return results


def _cotangents(results: dict) -> list:
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(r.shape, generator=gen, dtype=torch.float64) for r in results.values()]


# ------------------------------------------------------------------------------------------------
# lengths: torch.nn on the packed sequence.
# ------------------------------------------------------------------------------------------------
def _torch_packed(lengths):
    def call(module, x, hx):
        packed = pack_padded_sequence(x, lengths, batch_first=module.batch_first, enforce_sorted=False)
        out, finals = module(packed, hx)
        total = x.shape[1] if module.batch_first else x.shape[0]
        return pad_packed_sequence(out, batch_first=module.batch_first, total_length=total)[0], finals
    return call


def _ours_lengths(lengths):
    return lambda module, x, hx: module(x, hx, lengths=lengths)


# (backend, family, options, lengths): unsorted, a length equal to T and one of 1. The Triton interpreter runs
# every program in Python (~1 s a launch here): its cases are small and single-layer.
_CPU_LENGTH_CASES = [
    ("lstm", dict(input_size=5, hidden_size=7), [3, 6, 1, 4]),
    ("lstm", dict(input_size=3, hidden_size=9, num_layers=2, bidirectional=True, batch_first=True), [2, 6, 6, 1, 5]),
    ("lstm", dict(input_size=4, hidden_size=8, proj_size=3, bidirectional=True), [6, 1, 3]),
    ("gru", dict(input_size=5, hidden_size=7, num_layers=2, bidirectional=True), [1, 6, 2, 4]),
    ("gru", dict(input_size=3, hidden_size=17, bias=False, batch_first=True), [5, 6, 1]),
    ("rnn", dict(input_size=4, hidden_size=6, num_layers=2, bidirectional=True), [4, 1, 6, 2]),
]
# "cpu": the route the ops pick for lengths alone (sorted rows); "cpu-kernel": the kernel's own lengths path.
LENGTH_CASES = [(backend, *case) for backend in ("cpu", "cpu-kernel") for case in _CPU_LENGTH_CASES] + [
    ("triton", "lstm", dict(input_size=3, hidden_size=5, proj_size=2, bidirectional=True), [2, 4, 1]),
    ("triton", "gru", dict(input_size=3, hidden_size=5, bidirectional=True), [4, 1, 3]),
    ("triton", "rnn", dict(input_size=3, hidden_size=5, bidirectional=True, batch_first=True), [1, 4, 2]),
]


@pytest.mark.parametrize("backend,family,options,lengths", LENGTH_CASES,
                         ids=[f"{b}-{f}-{i}" for i, (b, f, _, _) in enumerate(LENGTH_CASES)])
def test_lengths_match_torch_packed(family, options, lengths, backend):
    seq_len = max(lengths) + backend.startswith("cpu")  # on cpu one step past the longest: all-padding steps
    oracle, theirs, ours = _modules(family, options, torch.float32)
    x64, hx64 = _inputs(family, options, seq_len, len(lengths))
    lengths_tensor = torch.tensor(lengths)
    probe = _results(oracle, torch.float64, x64, hx64, None, _torch_packed(lengths_tensor))
    cotangents = _cotangents(probe)
    expected = _results(oracle, torch.float64, x64, hx64, cotangents, _torch_packed(lengths_tensor))
    baseline = _results(theirs, torch.float32, x64, hx64, cotangents, _torch_packed(lengths_tensor))
    with _backend(backend):
        got = _results(ours, torch.float32, x64, hx64, cotangents, _ours_lengths(lengths_tensor))
    assert_all_rule(got, baseline, expected)


@pytest.mark.parametrize("backend", ["cpu", "cpu-kernel"])
@pytest.mark.parametrize("family", ["lstm", "gru"])
def test_lengths_bfloat16(family, backend):
    options = dict(input_size=6, hidden_size=16, bidirectional=True)
    lengths = torch.tensor([5, 2, 7, 1])
    oracle, theirs, ours = _modules(family, options, torch.bfloat16)
    x64, hx64 = _inputs(family, options, 7, 4)
    cotangents = _cotangents(_results(oracle, torch.float64, x64, hx64, None, _torch_packed(lengths)))
    expected = _results(oracle, torch.float64, x64, hx64, cotangents, _torch_packed(lengths))
    baseline = _results(theirs, torch.bfloat16, x64, hx64, cotangents, _torch_packed(lengths))
    with _backend(backend):
        got = _results(ours, torch.bfloat16, x64, hx64, cotangents, _ours_lengths(lengths))
    assert_all_rule(got, baseline, expected)


# ------------------------------------------------------------------------------------------------
# resets and zoneout: a time loop composed in the test.
# ------------------------------------------------------------------------------------------------
def _composed_layer(family, x, state0, weights, resets, zoneout, seed, reverse, lengths=None, w_hr=None):
    """One layer-direction from the definitions: x (T,B,I), state0 [(B,S)] -> output (T,B,S), final states.

    resets[t, b]: the state entering step t of row b is state0 again; zoneout with a seed: each state element
    keeps its previous value where keep (zoneout_keep, the definition of the mask), else takes the new one;
    without a seed: zoneout * previous + (1 - zoneout) * new; lengths[b]: row b is active at t < lengths[b]
    (an inactive row keeps its state and outputs 0); w_hr: the LSTM's projection of h."""
    w_ih, w_hh, b_ih, b_hh = weights
    seq_len, batch = x.shape[:2]
    rows = torch.arange(batch)
    state, outputs = tuple(state0), [None] * seq_len
    for t in (range(seq_len - 1, -1, -1) if reverse else range(seq_len)):
        if resets is not None:
            state = tuple(torch.where(resets[t, :, None], s0, s) for s0, s in zip(state0, state))
        gates_x, gates_h = x[t] @ w_ih.t(), state[0] @ w_hh.t()
        if family == "lstm":
            new = composed_lstm_cell(gates_x, gates_h, state[1], b_ih, b_hh)
            new = new if w_hr is None else (new[0] @ w_hr.t(), new[1])
        elif family == "gru":
            new = composed_gru_cell(gates_x, gates_h, state[0], b_ih, b_hh)
        else:
            new = composed_rnn_cell(gates_x, gates_h, b_ih, b_hh, False)
        if zoneout and seed is None:
            new = tuple(zoneout * old + (1 - zoneout) * s for old, s in zip(state, new))
        elif zoneout:
            new = tuple(torch.where(zoneout_keep(seed, k, t, rows, s.shape[1], zoneout), old, s)
                        for k, (old, s) in enumerate(zip(state, new)))
        active = None if lengths is None else (t < lengths)[:, None]
        state = new if active is None else tuple(torch.where(active, s, old) for s, old in zip(new, state))
        outputs[t] = state[0] if active is None else torch.where(active, state[0], 0)
    return torch.stack(outputs), state


def _composed_module(family, seeds, resets, zoneout, lengths=None):
    """call(module, x, hx) of a unidirectional multi-layer module through _composed_layer (seeds: one per layer)."""
    def call(module, x, hx):
        hx = hx if isinstance(hx, tuple) else (hx,)
        x = x.transpose(0, 1) if module.batch_first else x
        finals = []
        for layer in range(module.num_layers):
            weights = [getattr(module, f"{n}_l{layer}", None) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            x, final = _composed_layer(family, x, [h[layer] for h in hx], weights, resets, zoneout,
                                       seeds[layer] if seeds else None, False, lengths,
                                       getattr(module, f"weight_hr_l{layer}", None))
            finals.append(final)
        out = x.transpose(0, 1) if module.batch_first else x
        stacked = tuple(torch.stack(parts) for parts in zip(*finals))
        return out, stacked if family == "lstm" else stacked[0]
    return call


def _seeds(num_layers: int, manual_seed: int) -> list:
    """The seeds the modules draw in training: one per layer (and direction) from torch's generator."""
    torch.manual_seed(manual_seed)
    return [torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64) for _ in range(num_layers)]


def _resets(seq_len, batch, batch_first=False):
    gen = torch.Generator().manual_seed(3)
    resets = torch.rand(seq_len, batch, generator=gen) < 0.3
    resets[0, 0] = resets[2, 0] = True  # a reset at the first step and one inside
    return resets.t().contiguous() if batch_first else resets


FLAG_CASES = [  # (backend, family, options, use resets, zoneout, training)
    ("cpu", "lstm", dict(input_size=5, hidden_size=7, num_layers=2), True, 0.0, False),
    ("cpu", "lstm", dict(input_size=4, hidden_size=9, batch_first=True), True, 0.3, True),
    ("cpu", "lstm", dict(input_size=4, hidden_size=6, num_layers=2), False, 0.25, True),
    ("cpu", "lstm", dict(input_size=4, hidden_size=6), True, 0.4, False),
    ("cpu", "gru", dict(input_size=5, hidden_size=7, num_layers=2, batch_first=True), True, 0.2, True),
    ("cpu", "gru", dict(input_size=3, hidden_size=17, bias=False), False, 0.5, False),
    ("cpu", "rnn", dict(input_size=4, hidden_size=6, num_layers=2), True, 0.0, False),
    ("triton", "lstm", dict(input_size=3, hidden_size=5), True, 0.3, True),
    ("triton", "lstm", dict(input_size=3, hidden_size=5, batch_first=True), False, 0.4, False),
    ("triton", "gru", dict(input_size=3, hidden_size=5), True, 0.3, True),
    ("triton", "gru", dict(input_size=3, hidden_size=5, bias=False), True, 0.5, False),
    ("triton", "rnn", dict(input_size=3, hidden_size=5), True, 0.0, False),
]


@pytest.mark.parametrize("backend,family,options,use_resets,zoneout,training", FLAG_CASES,
                         ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(FLAG_CASES)])
def test_resets_and_zoneout_match_composed_loop(family, options, use_resets, zoneout, training, backend):
    _check_against_composed(backend, family, options, use_resets, zoneout, training)


# The C++ engine with several flags at once, the projection and bfloat16: (family, options, use resets, zoneout,
# training, lengths, dtype). A length of 0 and one of T included.
CPU_FLAG_CASES = [
    ("lstm", dict(input_size=4, hidden_size=8, proj_size=3), True, 0.3, True, [6, 2, 4], torch.float32),
    ("lstm", dict(input_size=3, hidden_size=5, proj_size=2, num_layers=2), False, 0.4, False, [3, 6, 1], torch.float32),
    ("gru", dict(input_size=4, hidden_size=7, batch_first=True), True, 0.3, True, [6, 0, 3], torch.float32),
    ("rnn", dict(input_size=4, hidden_size=6), True, 0.0, False, [2, 6, 5], torch.float32),
    ("lstm", dict(input_size=6, hidden_size=16), True, 0.3, True, None, torch.bfloat16),
    ("lstm", dict(input_size=6, hidden_size=16, proj_size=4), False, 0.3, True, [5, 6, 2], torch.bfloat16),
    ("gru", dict(input_size=6, hidden_size=16), True, 0.25, False, [4, 6, 1], torch.bfloat16),
    # batch >= 8: the input projected inside the team, step by step (project_input_per_step)
    ("lstm", dict(input_size=5, hidden_size=9, proj_size=4), True, 0.3, True, [6, 2, 4, 0, 6, 1, 3, 5, 2], torch.float32),
    ("gru", dict(input_size=5, hidden_size=9), True, 0.25, True, [3, 6, 1, 6, 2, 5, 4, 0, 6], torch.float32),
    ("rnn", dict(input_size=5, hidden_size=9), True, 0.0, True, [6, 5, 4, 3, 2, 1, 6, 6, 2], torch.float32),
    # below 8 rows with enough work per step for two threads: each step's product split over them (step_product)
    ("lstm", dict(input_size=5, hidden_size=72), True, 0.3, True, [6, 2, 4, 0, 6, 1, 3], torch.float32),
    ("gru", dict(input_size=5, hidden_size=72), True, 0.25, True, [3, 6, 1, 6, 2, 5, 0], torch.float32),
    ("rnn", dict(input_size=5, hidden_size=112), True, 0.0, True, [6, 5, 4, 3, 2, 1, 6], torch.float32),
]


@pytest.mark.parametrize("family,options,use_resets,zoneout,training,lengths,dtype", CPU_FLAG_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CPU_FLAG_CASES)])
def test_cpu_flags_combined_match_composed_loop(family, options, use_resets, zoneout, training, lengths, dtype):
    _check_against_composed("cpu", family, options, use_resets, zoneout, training, lengths, dtype)


def _check_against_composed(backend, family, options, use_resets, zoneout, training, lengths=None,
                            dtype=torch.float32):
    """seqkern.nn's module on `backend` against the composed loop: every output, state and gradient, in dtype."""
    seq_len, batch = (6, 3) if backend.startswith("cpu") else (4, 3)
    batch = batch if lengths is None else len(lengths)
    oracle, theirs, ours = _modules(family, options, dtype, zoneout)
    x64, hx64 = _inputs(family, options, seq_len, batch)
    resets = _resets(seq_len, batch, options.get("batch_first", False)) if use_resets else None
    resets_tm = None if resets is None else (resets.t() if options.get("batch_first") else resets)
    lengths = None if lengths is None else torch.tensor(lengths)
    num_layers = options.get("num_layers", 1)
    seeds = _seeds(num_layers, 11) if training and zoneout else None
    composed = _composed_module(family, seeds, resets_tm, zoneout, lengths)
    ours.train(training)

    def call_ours(module, x, hx):
        torch.manual_seed(11)  # the module then draws the seeds _seeds drew
        return module(x, hx, resets=resets, **({} if lengths is None else {"lengths": lengths}))

    cotangents = _cotangents(_results(oracle, torch.float64, x64, hx64, None, composed))
    expected = _results(oracle, torch.float64, x64, hx64, cotangents, composed)
    baseline = _results(theirs, dtype, x64, hx64, cotangents, composed)
    with _backend(backend):
        got = _results(ours, dtype, x64, hx64, cotangents, call_ours)
    assert_all_rule(got, baseline, expected)


def test_resets_batch_first_transposes():
    options = dict(input_size=3, hidden_size=5, batch_first=True)
    _, _, ours = _modules("gru", options, torch.float64)
    x64, hx64 = _inputs("gru", options, 6, 3)
    resets = _resets(6, 3, batch_first=True)
    out, _ = ours(x64, hx64[0], resets=resets)
    out_tm, _ = _modules("gru", dict(options, batch_first=False), torch.float64)[2](x64.transpose(0, 1), hx64[0],
                                                                                   resets=resets.t())
    torch.testing.assert_close(out, out_tm.transpose(0, 1))


# ------------------------------------------------------------------------------------------------
# Zoneout masks: rate, reproducibility, evaluation.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["lstm", "gru"])
def test_zoneout_keeps_about_p_of_the_state(family):
    p, seq_len, batch, hidden = 0.3, 20, 8, 64
    module = FAMILIES[family][1](4, hidden, zoneout=p)
    x = torch.randn(seq_len, batch, 4)
    h0 = torch.randn(1, batch, hidden)
    hx = (h0, torch.randn(1, batch, hidden)) if family == "lstm" else h0
    with torch.no_grad():
        out, _ = module(x, hx)
    previous = torch.cat([h0, out[:-1]])
    kept = (out == previous).double().mean().item()
    assert abs(kept - p) < 0.03, kept


def test_zoneout_reproducible_with_manual_seed():
    module = seqkern.nn.LSTM(4, 8, num_layers=2, zoneout=0.4)
    x = torch.randn(5, 3, 4)
    outs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        outs.append(module(x)[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert not torch.equal(outs[0], outs[2])
    module.eval()
    torch.testing.assert_close(module(x)[0], module(x)[0], rtol=0, atol=0)  # the blend draws nothing


def test_zoneout_bidirectional_against_composed_directions():
    """Training zoneout in both directions of a bidirectional layer: seeds drawn forward then reverse."""
    options = dict(input_size=3, hidden_size=5, bidirectional=True)
    module = seqkern.nn.GRU(**options, zoneout=0.3).double()
    x64, hx64 = _inputs("gru", options, 5, 2)
    torch.manual_seed(4)
    out, h_n = module(x64, hx64[0])
    seeds = _seeds(2, 4)
    expected = []
    for direction, suffix in enumerate(("", "_reverse")):
        weights = [getattr(module, f"{n}_l0{suffix}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        expected.append(_composed_layer("gru", x64, [hx64[0][direction]], weights, None, 0.3, seeds[direction],
                                        direction == 1))
    torch.testing.assert_close(out, torch.cat([expected[0][0], expected[1][0]], dim=-1))
    torch.testing.assert_close(h_n, torch.stack([expected[0][1][0], expected[1][1][0]]))


# ------------------------------------------------------------------------------------------------
# The ops: gradcheck with the flags (float64), opcheck, torch.compile.
# ------------------------------------------------------------------------------------------------
def _op_args(family, seq_len=4, batch=3, input_size=3, hidden=4, **flags):
    gen = torch.Generator().manual_seed(2)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * 0.5

    gates = {"lstm": 4, "gru": 3, "rnn": 1}[family]
    args = [rand(seq_len, batch, input_size), rand(batch, hidden)]
    if family == "lstm":
        args += [rand(batch, hidden)]
    args += [rand(gates * hidden, input_size), rand(gates * hidden, hidden), rand(gates * hidden),
             rand(gates * hidden)]
    if family == "lstm":
        args += [None]  # w_hr
    args += [None, flags.get("lengths"), flags.get("resets")]  # batch_sizes, lengths, resets
    if family != "rnn":
        args += [flags.get("zoneout", 0.0), flags.get("zoneout_seed")]
    args += [flags.get("reverse", False)]
    return args


OP_FLAG_CASES = [
    ("lstm", dict(lengths=torch.tensor([2, 4, 1]), reverse=True)),
    ("lstm", dict(resets=torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 0, 1]], dtype=torch.bool),
                  zoneout=0.3, zoneout_seed=torch.tensor(123))),
    ("lstm", dict(lengths=torch.tensor([3, 1, 4]), zoneout=0.5)),
    ("gru", dict(lengths=torch.tensor([4, 2, 0]), zoneout=0.4, zoneout_seed=torch.tensor(-7))),
    ("gru", dict(resets=torch.tensor([[0, 0, 1], [0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool),
                 zoneout=0.25)),
    ("rnn", dict(lengths=torch.tensor([1, 4, 3]), resets=torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0],
                                                                       [0, 0, 1]], dtype=torch.bool))),
]


def _layer_call(family, args, requires_grad: bool):
    op = getattr(torch.ops.seqkern, f"{family}_forward")
    extra = () if family == "rnn" else (requires_grad,)
    if family == "rnn":
        extra = (False,)  # relu
    outputs = op(*args, *extra)
    return outputs[:3] if family == "lstm" else outputs[:2]


@pytest.mark.parametrize("family,flags", OP_FLAG_CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(OP_FLAG_CASES)])
def test_op_gradcheck_cpu_with_flags(family, flags):
    """The C++ kernels' backward with the flags in float64, against finite differences of their forward (the
    zoneout masks are fixed by the seed), with respect to the input, the initial states and the weights."""
    args = _op_args(family, **flags)
    positions = [i for i, a in enumerate(args[:7]) if isinstance(a, torch.Tensor)]

    def run(*tensors):
        full = list(args)
        for i, t in zip(positions, tensors):
            full[i] = t
        return _layer_call(family, full, True)

    with seqkern.backend("cpu"):
        assert torch.autograd.gradcheck(run, [args[i].detach().requires_grad_() for i in positions])


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("family,flags", [OP_FLAG_CASES[3]], ids=["gru"])
def test_op_double_backward_with_flags(family, flags, backend):
    """create_graph=True differentiates the reference (redrawing the same zoneout masks): gradgradcheck with
    respect to the input, on tiny shapes (the numerical second derivative runs the reference many times)."""
    args = _op_args(family, seq_len=2, batch=3, input_size=1, hidden=1, **{
        k: (v[:2] if k == "resets" else v.clamp(max=2) if k == "lengths" else v) for k, v in flags.items()})
    positions = [0]

    def run(*tensors):
        full = list(args)
        for i, t in zip(positions, tensors):
            full[i] = t
        return _layer_call(family, full, True)

    with seqkern.backend(backend):
        assert torch.autograd.gradgradcheck(run, [args[i].requires_grad_() for i in positions])


@pytest.mark.parametrize("family", ["lstm"])
def test_compiled_module_with_lengths(family):
    """One graph with lengths (on CPU the rows run sorted by length through the C++ kernel's batch_sizes: tensor
    ops only, so the graph does not break)."""
    torch._dynamo.reset()
    module = FAMILIES[family][1](3, 5, num_layers=2, bidirectional=True, **FAMILIES[family][2])
    x = torch.randn(6, 4, 3, requires_grad=True)
    lengths = torch.tensor([6, 2, 1, 4])
    compiled = torch.compile(module, fullgraph=True)
    got, want = compiled(x, lengths=lengths), module(x, lengths=lengths)
    torch.testing.assert_close(got[0], want[0])
    grad_got = torch.autograd.grad(got[0].sum(), x)[0]
    grad_want = torch.autograd.grad(want[0].sum(), x)[0]
    torch.testing.assert_close(grad_got, grad_want)


def _float32_args(family, **flags):
    return [a.float().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in _op_args(family, **flags)]


@pytest.mark.parametrize("family,flags", OP_FLAG_CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(OP_FLAG_CASES)])
def test_opcheck_cpu_with_flags(family, flags):
    """The C++ kernels with lengths, resets and zoneout against their fakes and autograd registration."""
    op = getattr(torch.ops.seqkern, f"{family}_forward")
    last = (False,) if family == "rnn" else (True,)  # relu / save_workspace
    torch.library.opcheck(op, (*_float32_args(family, **flags), *last))


# One graph per op with flags on CPU (the C++ kernels take them: no reference scan, no graph break); the zoneout
# seed is an op argument here, so the compiled and the eager call draw the same masks.
COMPILE_FLAG_CASES = [
    ("lstm", dict(resets=OP_FLAG_CASES[1][1]["resets"], zoneout=0.3, zoneout_seed=torch.tensor(5))),
    ("gru", dict(lengths=torch.tensor([4, 2, 0]), zoneout=0.4)),
    ("rnn", OP_FLAG_CASES[5][1]),
]


@pytest.mark.slow
@pytest.mark.parametrize("family,flags", COMPILE_FLAG_CASES, ids=[f for f, _ in COMPILE_FLAG_CASES])
def test_compiled_layer_with_flags(family, flags):
    torch._dynamo.reset()
    layer = getattr(seqkern.ops, f"{family}_layer")
    args = _float32_args(family, **flags)
    tensors, flag_kwargs = _layer_arguments(family, args)

    def run(*tensors):
        return layer(*tensors, **flag_kwargs)[0]

    compiled = torch.compile(run, fullgraph=True)
    with seqkern.backend("cpu"):
        got, want = compiled(*tensors), run(*tensors)
        torch.testing.assert_close(got, want)
        cotangent = torch.randn_like(want)
        grads_got = torch.autograd.grad(got, tensors, cotangent)
        grads_want = torch.autograd.grad(want, tensors, cotangent)
    for g, w in zip(grads_got, grads_want):
        torch.testing.assert_close(g, w)


def _layer_arguments(family, args):
    """_op_args' list -> (the positional tensors of seqkern.ops.<family>_layer, its flag keywords)."""
    count = {"lstm": 7, "gru": 6, "rnn": 6}[family]  # input, h0, (c0,) w_ih, w_hh, b_ih, b_hh
    rest = args[count + (1 if family == "lstm" else 0):]  # after w_hr: batch_sizes, lengths, resets, ...
    flags = dict(lengths=rest[1], resets=rest[2])
    if family != "rnn":
        flags.update(zoneout=rest[3], zoneout_seed=rest[4])
    return args[:count], flags


# ------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, before any kernel runs.
# ------------------------------------------------------------------------------------------------
BAD_MODULE_CALLS = [
    ("lengths", TypeError, lambda m, x: m(x, lengths=torch.tensor([2.0, 3.0, 1.0]))),
    ("lengths", ValueError, lambda m, x: m(x, lengths=torch.tensor([2, 3]))),
    ("lengths", ValueError, lambda m, x: m(x, lengths=torch.tensor([2, 7, 1]))),
    ("lengths", ValueError, lambda m, x: m(x, lengths=torch.tensor([2, -1, 1]))),
    ("lengths", ValueError, lambda m, x: m(pack_padded_sequence(x, [4, 3, 1]), lengths=torch.tensor([4, 3, 1]))),
    ("resets", TypeError, lambda m, x: m(x, resets=torch.zeros(4, 3))),
    ("resets", ValueError, lambda m, x: m(x, resets=torch.zeros(3, 4, dtype=torch.bool))),
]


@pytest.mark.parametrize("name,error,call", BAD_MODULE_CALLS, ids=[f"{n}-{i}" for i, (n, _, _) in
                                                                    enumerate(BAD_MODULE_CALLS)])
def test_bad_module_input(name, error, call):
    module = seqkern.nn.LSTM(2, 3)
    with pytest.raises(error, match=re.escape(name)):
        call(module, torch.randn(4, 3, 2))


def test_bidirectional_with_resets_refused():
    module = seqkern.nn.GRU(2, 3, bidirectional=True)
    with pytest.raises(ValueError, match="resets"):
        module(torch.randn(4, 3, 2), resets=torch.zeros(4, 3, dtype=torch.bool))


@pytest.mark.parametrize("zoneout", [-0.1, 1.5, "0.2"])
def test_zoneout_outside_unit_interval_refused(zoneout):
    with pytest.raises(ValueError, match="zoneout"):
        seqkern.nn.LSTM(2, 3, zoneout=zoneout)
    with pytest.raises(ValueError, match="zoneout"):
        seqkern.nn.GRU(2, 3, zoneout=zoneout)


OP_BAD = [  # (family, argument named, flags): refused eagerly (the backend's kernel) and by the fake
    ("lstm", "lengths", dict(lengths=torch.tensor([1, 2, 3], dtype=torch.int32))),
    ("lstm", "lengths", dict(lengths=torch.tensor([1, 2]))),
    ("gru", "resets", dict(resets=torch.zeros(4, 3))),
    ("rnn", "resets", dict(resets=torch.zeros(3, 3, dtype=torch.bool))),
    ("gru", "zoneout", dict(zoneout=1.5)),
    ("lstm", "zoneout_seed", dict(zoneout=0.5, zoneout_seed=torch.tensor([1, 2]))),
]
OP_BAD_VALUES = [  # ValueError
    ("lstm", "resets", dict(resets=torch.zeros(4, 3, dtype=torch.bool), reverse=True)),
    ("gru", "batch_sizes", dict(lengths=torch.tensor([4, 2, 1]), batch_sizes=torch.tensor([3, 2, 1, 1]))),
]


def _bad_op_call(family, flags):
    batch_sizes = flags.pop("batch_sizes", None)
    args = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in _op_args(family, **flags)]
    if batch_sizes is not None:
        args[6] = batch_sizes
    op = getattr(torch.ops.seqkern, f"{family}_forward")
    return op, (*args, False)


@pytest.mark.parametrize("family,name,flags", OP_BAD + OP_BAD_VALUES,
                         ids=[f"{f}-{n}-{i}" for i, (f, n, _) in enumerate(OP_BAD + OP_BAD_VALUES)])
def test_bad_op_arguments(family, name, flags):
    from torch._subclasses.fake_tensor import FakeTensorMode

    error = ValueError if (family, name, flags) in OP_BAD_VALUES else RuntimeError
    op, args = _bad_op_call(family, dict(flags))
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(error, match=re.escape(name)):
            op(*fake)
    with seqkern.backend("triton"), pytest.raises(error, match=re.escape(name)):
        op(*args)
    with seqkern.backend("cpu"), pytest.raises(RuntimeError, match=re.escape(name)):  # the C++ kernel's TORCH_CHECK
        op(*args)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_lengths_outside_the_sequence_refused_by_the_kernel(backend):
    """lengths' values are data (the fakes cannot see them): the kernels check them, naming the argument."""
    op, args = _bad_op_call("gru", dict(lengths=torch.tensor([1, 5, 2])))
    with seqkern.backend(backend), pytest.raises(RuntimeError, match="lengths"):
        op(*args)


def test_readme_rollout_example_runs():
    """README's RL rollout with resets (it checks itself against stepping the environments one at a time)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- rollout-example -->", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    torch.manual_seed(0)
    exec(compile(block, "README.md (rollout example)", "exec"), {})
