"""seqkern.nn.LSTM, GRU, RNN and their cells as drop-ins for torch.nn's: outputs, final states and every
gradient under the correctness rule, across constructor options and input layouts; the module contract
(state_dict, initialization, copies, DDP); bad input."""
from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import seqkern
from helpers import assert_all_rule, case_id, compare_recurrent

DTYPES = [torch.float32, torch.float64, torch.bfloat16]

# (torch.nn class, seqkern class, extra constructor options)
FAMILIES = {
    "lstm": (torch.nn.LSTM, seqkern.nn.LSTM, {}),
    "gru": (torch.nn.GRU, seqkern.nn.GRU, {}),
    "rnn_tanh": (torch.nn.RNN, seqkern.nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (torch.nn.RNN, seqkern.nn.RNN, {"nonlinearity": "relu"}),
}
CELLS = {
    "lstm": (torch.nn.LSTMCell, seqkern.nn.LSTMCell, {}),
    "gru": (torch.nn.GRUCell, seqkern.nn.GRUCell, {}),
    "rnn_tanh": (torch.nn.RNNCell, seqkern.nn.RNNCell, {"nonlinearity": "tanh"}),
    "rnn_relu": (torch.nn.RNNCell, seqkern.nn.RNNCell, {"nonlinearity": "relu"}),
}
OPTIONS = [
    dict(input_size=5, hidden_size=7),
    dict(input_size=3, hidden_size=63, num_layers=2, bias=False, batch_first=True, bidirectional=True),
    dict(input_size=16, hidden_size=127, bidirectional=True),
    dict(input_size=1, hidden_size=1, batch_first=True),
    dict(input_size=12, hidden_size=9, num_layers=3, bias=False),
]
LSTM_PROJ_OPTIONS = [
    dict(input_size=16, hidden_size=127, proj_size=31, bidirectional=True),
    dict(input_size=12, hidden_size=9, num_layers=3, proj_size=4, bias=False),
]


def _cases():
    for family in FAMILIES:
        for options in OPTIONS + (LSTM_PROJ_OPTIONS if family == "lstm" else []):
            yield family, options


def _compare(family, dtype, options, seq_len, batch, **kwargs):
    torch_cls, ours_cls, extra = FAMILIES[family]
    compare_recurrent(torch_cls, ours_cls, dtype, {**options, **extra}, seq_len, batch, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family,options", list(_cases()), ids=lambda v: v if isinstance(v, str) else case_id(v))
@pytest.mark.parametrize("seq_len,batch", [(1, 1), (9, 3), (33, 64)])
def test_matches_torch(family, dtype, options, seq_len, batch):
    _compare(family, dtype, options, seq_len, batch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("family,options", list(_cases()), ids=lambda v: v if isinstance(v, str) else case_id(v))
@pytest.mark.parametrize("batch", [1, 9])
def test_one_step_matches_torch(family, dtype, options, batch):
    """One step, which float32 / float64 layers without a projection run as a cell step on two GEMMs
    (csrc/cpu/recurrence_layer.h single_step), forward and backward; 9 rows: a register block and more."""
    _compare(family, dtype, options, 1, batch)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_large_hidden(family, dtype):
    _compare(family, dtype, dict(input_size=64, hidden_size=500, num_layers=2), seq_len=7, batch=5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("lengths", [None, [5, 3, 5, 1, 4]], ids=["plain", "packed"])
def test_step_products_split_across_threads(family, dtype, threads, lengths):
    """Several threads split each forward step's product (csrc/cpu/recurrence_layer.h step_product): a thread's
    own columns of h_{t-1} before the barrier, the others' after it (below 8 rows). 136 units cut 48 / 48 / 40 over
    three threads, both directions, sequences of unequal lengths (packed: fewer rows in the later steps)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _compare(family, dtype, dict(input_size=20, hidden_size=136, bidirectional=True), seq_len=5, batch=5,
                 lengths=lengths)
    finally:
        torch.set_num_threads(before)


def _packed_cases():
    for dtype in DTYPES:
        for family, options in [(f, o) for f in FAMILIES for o in OPTIONS[:3]] + [("lstm", LSTM_PROJ_OPTIONS[0])]:
            # Not (relu, bfloat16): there the rule is ill-conditioned, not the kernel. bf16 rounding moves
            # some pre-activations across relu's kink, which flips whole gradient entries; torch.nn and
            # seqkern flip different ones, so the two errors differ by 10-20x either way depending on the
            # seed (an fp64 run on the same bf16-rounded inputs has seqkern's error). The unpacked relu
            # cases in bfloat16 above stay in the suite.
            if not (family == "rnn_relu" and dtype == torch.bfloat16):
                yield family, dtype, options


@pytest.mark.parametrize("family,dtype,options", list(_packed_cases()),
                         ids=lambda v: v if isinstance(v, str) else (str(v) if isinstance(v, torch.dtype) else case_id(v)))
def test_packed_sequence(family, dtype, options):
    _compare(family, dtype, options, seq_len=11, batch=5, lengths=torch.tensor([4, 11, 1, 7, 11]))
    _compare(family, dtype, options, seq_len=6, batch=3, with_hx=False, lengths=torch.tensor([6, 6, 2]))
    # One step, every row active (batch_sizes [3]: the single-step path) and one row empty (the loop).
    _compare(family, dtype, options, seq_len=1, batch=3, lengths=torch.tensor([1, 1, 1]))


# Each bfloat16 path of the CPU kernels, forced with SEQKERN_BF16_KERNEL (csrc/cpu/gemm_bf16.h): "fallback"
# upcasts to fp32; "gradients" runs the weight gradients and grad_input through oneDNN's bf16 GEMM, the rest
# fp32; "avx512bf16" also runs the per-step GEMM and input projection on vdpbf16ps; "amx" (the default on this
# CPU; capped to avx512bf16 on one without AMX) runs them on AMX tiles from 2 rows up and on vdpbf16ps for
# 1 row. Sizes cover gate widths that are (GRU 3 x 80) and are not (RNN 127, GRU 3 x 45) whole vectors, depths
# that are not whole AMX tiles (33, 45, 7: the tile's k is 32), a batch above one 16-row AMX tile (19: 16 + a
# 3-row tile), batches below it (5, shrinking to 1 in the packed sequence) and the LSTM's projection.
BF16_PATH_CASES = [
    ("lstm", dict(input_size=33, hidden_size=64)),
    ("lstm", LSTM_PROJ_OPTIONS[0]),
    ("gru", dict(input_size=48, hidden_size=80)),
    ("gru", dict(input_size=45, hidden_size=45)),
    ("rnn_tanh", dict(input_size=7, hidden_size=127, num_layers=2)),
]


@pytest.mark.parametrize("kernel", ["fallback", "gradients", "avx512bf16", "amx"])
@pytest.mark.parametrize("family,options", BF16_PATH_CASES, ids=lambda v: v if isinstance(v, str) else case_id(v))
def test_bfloat16_kernel_paths(kernel, family, options, monkeypatch):
    monkeypatch.setenv("SEQKERN_BF16_KERNEL", kernel)
    _compare(family, torch.bfloat16, options, seq_len=13, batch=19)
    _compare(family, torch.bfloat16, options, seq_len=11, batch=5, lengths=torch.tensor([4, 11, 1, 7, 11]))


def _pair(family, dtype=torch.float32, **options):
    torch_cls, ours_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    theirs = torch_cls(**options, **extra).to(dtype)
    ours = ours_cls(**options, **extra).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _outputs(result):
    output, state = result
    return [output, *(state if isinstance(state, tuple) else (state,))]


def _assert_same(got, want):
    for g, w in zip(_outputs(got), _outputs(want)):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w)


# A NaN in bf16 storage stays NaN through the vectorized bf16 loads/stores (csrc/cpu/simd.h narrows NaN to
# c10's 0x7FC0) and the bf16 units (AMX, vdpbf16ps): the NaN positions of the output and the final state
# are torch.nn's. The finite values are the rule's business (the tests above).
@pytest.mark.parametrize("kernel", ["fallback", "avx512bf16", "amx"])
def test_bfloat16_nan_positions_match_torch(kernel, monkeypatch):
    monkeypatch.setenv("SEQKERN_BF16_KERNEL", kernel)
    ours, theirs = _pair("gru", torch.bfloat16, input_size=20, hidden_size=40)
    x = torch.randn(6, 5, 20).to(torch.bfloat16)
    x[2, 3, 7] = float("nan")
    with torch.no_grad():
        got, want = _outputs(ours(x)), _outputs(theirs(x))
    for g, w in zip(got, want):
        assert w.isnan().any() and torch.equal(g.isnan(), w.isnan())


@pytest.mark.parametrize("family", FAMILIES)
def test_without_initial_state_and_unbatched(family):
    options = dict(input_size=4, hidden_size=6, num_layers=2, **({"proj_size": 3} if family == "lstm" else {}))
    ours, theirs = _pair(family, **options)
    x = torch.randn(10, 4)
    _assert_same(ours(x), theirs(x))
    states = [torch.randn(2, size) for size in ((3, 6) if family == "lstm" else (6,))]
    hx = tuple(states) if family == "lstm" else states[0]
    _assert_same(ours(x, hx), theirs(x, hx))


@pytest.mark.parametrize("family,options", list(_cases()) + [("gru", dict(input_size=4, hidden_size=8, num_layers=3,
                                                                                dropout=0.5))],
                         ids=lambda v: v if isinstance(v, str) else case_id(v))
def test_plain_call_equals_the_general_path(family, options):
    """A plain call (a batched tensor; hx None or tensors of exactly the expected shapes) skips forward's general
    layout and argument handling (_recurrent.plain_call); the same sequence given unbatched takes the general path.
    Outputs, final states and every gradient (input, states, weights) bit for bit the same, also with dropout between
    layers in training (the same generator draws)."""
    ours, _ = _pair(family, **options)
    ours.train()
    directions = 2 if options.get("bidirectional") else 1
    stacked = options.get("num_layers", 1) * directions
    sizes = (options.get("proj_size") or options["hidden_size"], options["hidden_size"]) if family == "lstm" else (
        options["hidden_size"],)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, options["input_size"], generator=gen)
    states = [torch.randn(stacked, size, generator=gen) for size in sizes]
    batch_dim = 0 if options.get("batch_first") else 1

    def run(x, states):
        leaves = [x.requires_grad_(), *(s.requires_grad_() for s in states), *ours.parameters()]
        torch.manual_seed(5)
        output, final = ours(x, tuple(states) if family == "lstm" else states[0])
        finals = final if family == "lstm" else (final,)
        loss = sum((t * torch.linspace(-1, 1, t.numel()).view(t.shape)).sum() for t in (output, *finals))
        return [output, *finals, *torch.autograd.grad(loss, leaves)]

    general = run(x.clone(), [s.clone() for s in states])
    plain = run(x.unsqueeze(batch_dim), [s.unsqueeze(1) for s in states])
    for name, got, want in zip(["output", *(f"h_n[{i}]" for i in range(len(sizes))), "grad_input",
                                *(f"grad_hx[{i}]" for i in range(len(sizes))),
                                *(n for n, _ in ours.named_parameters())], plain, general):
        got = got.squeeze(batch_dim) if name in ("output", "grad_input") else got
        got = got.squeeze(1) if name.startswith(("h_n", "grad_hx")) else got
        assert torch.equal(got, want), name


@pytest.mark.parametrize("family", FAMILIES)
def test_dropout_between_layers_matches_torch(family):
    ours, theirs = _pair(family, input_size=4, hidden_size=8, num_layers=3, dropout=0.5)
    x = torch.randn(7, 3, 4)
    torch.manual_seed(5)
    got = ours(x)
    torch.manual_seed(5)
    _assert_same(got, theirs(x))  # the same generator draws give the same dropout masks
    _assert_same(ours.eval()(x), theirs.eval()(x))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_dropout_masks_match_torch_on_packed_and_length_inputs(family, bidirectional):
    """torch.nn draws the masks between layers over the packed data of a PackedSequence (the active positions,
    time-major, rows in sorted order): seqkern draws the same ones for a PackedSequence and for lengths= (as torch.nn
    on pack_padded_sequence(enforce_sorted=False)); tied lengths included. They were drawn over the padded (T, B, F)
    output, a different stream: outputs 0.05-9 apart for one seed."""
    ours, theirs = _pair(family, torch.float64, input_size=4, hidden_size=6, num_layers=3, dropout=0.5,
                         bidirectional=bidirectional)
    x = torch.randn(7, 5, 4, dtype=torch.float64)
    lengths = torch.tensor([5, 7, 5, 2, 7])
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    torch.manual_seed(8)
    got = ours(packed)
    torch.manual_seed(8)
    want = theirs(packed)
    torch.testing.assert_close(got[0].data, want[0].data)
    torch.manual_seed(8)
    got_lengths = ours(x, lengths=lengths)
    padded = torch.nn.utils.rnn.pad_packed_sequence(want[0], total_length=7)[0]
    torch.testing.assert_close(got_lengths[0], padded)
    for g, w, g2 in zip(_outputs(got)[1:], _outputs(want)[1:], _outputs(got_lengths)[1:]):
        torch.testing.assert_close(g, w)
        torch.testing.assert_close(g2, w)


def _rss_bytes():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


@pytest.mark.parametrize("family", ["lstm", "gru", "rnn_tanh"])
def test_pooled_temporaries_neither_shared_nor_leaked(family):
    """The C++ layers take their large tensors (temporaries, outputs, saved workspaces, grad_input) from blocks
    cached across calls (csrc/cpu/workspace_pool.h): the results of two calls alive at once, and two graphs with
    their saved workspaces, stay intact and share no memory, the profiler's memory events see each temporary
    (the benchmarks' peak memory), and repeated calls do not grow the process (a block kept per call would add
    ~2 MB a call here)."""
    ours, _ = _pair(family, input_size=64, hidden_size=128)
    params = list(ours.parameters())
    x1, x2 = torch.randn(2, 40, 24, 64, requires_grad=True).unbind(0)

    def step(x):
        output, _ = ours(x)
        return [output.detach(), *torch.autograd.grad(output.square().sum(), [x, *params])]

    first = step(x1)
    kept = [t.clone() for t in first]
    second = step(x2)
    for got, want in zip(first, kept):
        assert torch.equal(got, want)
    for got, want in zip(step(x1), kept):
        assert torch.equal(got, want)
    # Two graphs alive at once (each holding its forward's saved workspace), differentiated in reverse order.
    out1, out2 = ours(x1)[0], ours(x2)[0]
    later = torch.autograd.grad(out2.square().sum(), [x2, *params])
    earlier = torch.autograd.grad(out1.square().sum(), [x1, *params])
    for got, want in zip([out1, *earlier], first):
        assert torch.equal(got, want)
    for got, want in zip([out2, *later], second):
        assert torch.equal(got, want)

    def extent(t):
        start = t.untyped_storage().data_ptr()
        return start, start + t.untyped_storage().nbytes()
    for a in map(extent, first):
        for b in map(extent, second):
            assert a[1] <= b[0] or b[1] <= a[0]

    gates = {"lstm": 4, "gru": 3, "rnn_tanh": 1}[family]
    d_gates_bytes = 40 * 24 * gates * 128 * 4
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        step(x1)
    sizes = [event.nbytes() for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"]
    # A reused block may be up to twice the request; the events report the block.
    assert any(d_gates_bytes <= n <= 2 * d_gates_bytes for n in sizes)
    assert any(-2 * d_gates_bytes <= n <= -d_gates_bytes for n in sizes)

    for _ in range(3):
        step(x1)
    before = _rss_bytes()
    for _ in range(30):
        step(x1)
    assert _rss_bytes() - before < 16 * 2**20


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_batch_and_zero_length(family):
    ours, theirs = _pair(family, input_size=4, hidden_size=6, bidirectional=True)
    x = torch.randn(5, 0, 4)
    for got, want in zip(_outputs(ours(x)), _outputs(theirs(x))):
        assert got.shape == want.shape
    with pytest.raises(RuntimeError, match="sequence length"):
        ours(torch.randn(0, 2, 4))


@pytest.mark.parametrize("family", FAMILIES)
def test_module_contract(family, tmp_path):
    options = dict(input_size=4, hidden_size=6, num_layers=2, bidirectional=True, **({"proj_size": 3} if family == "lstm" else {}))
    ours, theirs = _pair(family, **options)
    assert isinstance(ours, torch.nn.RNNBase) and ours.mode == theirs.mode
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()]
    theirs.load_state_dict(ours.state_dict())
    ours.flatten_parameters()
    assert len(ours.all_weights) == 4 and [len(w) for w in ours.all_weights] == [len(w) for w in theirs.all_weights]
    assert repr(ours) == repr(theirs)
    x = torch.randn(5, 2, 4)
    expected = ours(x)[0]
    path = tmp_path / "module.pt"
    torch.save(ours, path)
    for clone in (copy.deepcopy(ours), torch.load(path, weights_only=False)):
        assert type(clone) is type(ours)
        torch.testing.assert_close(clone(x)[0], expected)
    assert copy.deepcopy(ours).double()(x.double())[0].dtype == torch.float64
    assert ours.to(torch.bfloat16)(x.bfloat16())[0].dtype == torch.bfloat16


@pytest.mark.parametrize("family", FAMILIES)
def test_constructor_device_and_dtype(family):
    torch_cls, ours_cls, extra = FAMILIES[family]
    ours = ours_cls(4, 6, device="cpu", dtype=torch.float64, **extra)
    theirs = torch_cls(4, 6, device="cpu", dtype=torch.float64, **extra)
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in ours.parameters())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    _assert_same(ours(x), theirs(x))
    cell_cls, our_cell_cls, cell_extra = CELLS[family]
    cell = our_cell_cls(4, 6, device="cpu", dtype=torch.float64, **cell_extra)
    assert all(p.dtype == torch.float64 for p in cell.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_initialization_matches_torch(family):
    torch_cls, ours_cls, extra = FAMILIES[family]
    torch.manual_seed(3)
    theirs = torch_cls(4, 6, num_layers=2, **extra)
    torch.manual_seed(3)
    ours = ours_cls(4, 6, num_layers=2, **extra)
    for (name, a), (_, b) in zip(theirs.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(a, b, msg=name)


# ------------------------------------------------------------------------------------------------
# Cells
# ------------------------------------------------------------------------------------------------
def _leaf(t: torch.Tensor, dtype) -> torch.Tensor:
    return t.detach().to(dtype).requires_grad_()


def _compare_cell(family, dtype, input_size, hidden, batch, bias, backend="cpu", with_hx=True):
    torch_cls, ours_cls, extra = CELLS[family]
    torch.manual_seed(0)
    theirs = torch_cls(input_size, hidden, bias=bias, **extra).double()
    ours = ours_cls(input_size, hidden, bias=bias, **extra).double()
    ours.load_state_dict(theirs.state_dict())
    oracle = copy.deepcopy(theirs)  # torch.nn's cell in float64
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    states = 2 if family == "lstm" else 1
    x64 = torch.randn(batch, input_size, dtype=torch.float64)
    hx64 = [torch.randn(batch, hidden, dtype=torch.float64) for _ in range(states)] if with_hx else None
    cot = [torch.randn(batch, hidden, dtype=torch.float64) for _ in range(states)]

    def run(module, dt):
        x = _leaf(x64, dt)
        hx = [_leaf(h, dt) for h in hx64] if hx64 is not None else None
        out = module(x, None if hx is None else (tuple(hx) if states == 2 else hx[0]))
        outs = out if isinstance(out, tuple) else (out,)
        module.zero_grad()
        sum((o.double() * c).sum() for o, c in zip(outs, cot)).backward()
        results = {f"state_{i}": o for i, o in enumerate(outs)}
        results["grad_input"] = x.grad
        results.update({f"grad_state_{i}_0": h.grad for i, h in enumerate(hx or [])})
        results.update({f"grad_{n}": p.grad for n, p in module.named_parameters()})
        return results

    with seqkern.backend(backend):
        got = run(ours, dtype)
    assert_all_rule(got, run(theirs, dtype), run(oracle, torch.float64))


@pytest.mark.parametrize("family", CELLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("input_size,hidden,batch,bias", [(5, 7, 3, True), (1, 1, 1, False), (33, 127, 64, True)])
def test_cell_matches_torch(family, dtype, input_size, hidden, batch, bias):
    _compare_cell(family, dtype, input_size, hidden, batch, bias)
    _compare_cell(family, dtype, input_size, hidden, batch, bias, with_hx=False)


@pytest.mark.parametrize("family", CELLS)
def test_cell_unbatched_and_zero_batch(family):
    torch_cls, ours_cls, extra = CELLS[family]
    torch.manual_seed(0)
    theirs, ours = torch_cls(4, 6, **extra), ours_cls(4, 6, **extra)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4)
    for got, want in zip(_as_tuple(ours(x)), _as_tuple(theirs(x))):
        assert got.shape == want.shape == (6,)
        torch.testing.assert_close(got, want)
    assert all(o.shape == (0, 6) for o in _as_tuple(ours(torch.randn(0, 4))))


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


# ------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, raised before any kernel runs.
# ------------------------------------------------------------------------------------------------
COMMON_BAD_INPUT = [
    (lambda: (torch.randn(5, 2, 7),), ValueError, r"input: .*input_size=4.*\(5, 2, 7\)"),
    (lambda: (torch.randn(5, 2, 4, 1),), ValueError, r"input: expected a 2-D or 3-D tensor, got shape \(5, 2, 4, 1\)"),
    (lambda: (torch.randn(4),), ValueError, r"input: expected a 2-D or 3-D"),
    (lambda: (torch.ones(5, 2, 4, dtype=torch.int64),), TypeError, r"input: expected a floating-point tensor, got dtype torch.int64"),
    (lambda: (torch.randn(5, 2, 4, dtype=torch.float64),), TypeError, r"input: expected dtype torch.float32 .*got torch.float64"),
    (lambda: (torch.randn(5, 2, 4, device="meta"),), TypeError, r"input: expected a tensor on cpu .*got one on meta"),
    (lambda: ([[1.0]],), TypeError, r"input: expected a torch.Tensor, got list"),
]
LSTM_BAD_STATE = [
    (lambda: (torch.randn(5, 2, 4), (torch.randn(2, 2, 6), torch.randn(2, 2, 6))), ValueError, r"hx\[0\]: expected shape \(2, 2, 3\), got \(2, 2, 6\)"),
    (lambda: (torch.randn(5, 2, 4), (torch.randn(2, 2, 3), torch.randn(1, 2, 6))), ValueError, r"hx\[1\]: expected shape \(2, 2, 6\), got \(1, 2, 6\)"),
    (lambda: (torch.randn(5, 2, 4), (torch.randn(2, 3), torch.randn(2, 6))), ValueError, r"hx\[0\]: expected shape \(2, 2, 3\), got \(2, 3\)"),
    (lambda: (torch.randn(5, 2, 4), (torch.randn(2, 2, 3).double(), torch.randn(2, 2, 6))), TypeError, r"hx\[0\]: expected dtype torch.float32"),
    (lambda: (torch.randn(5, 2, 4), (torch.randn(2, 2, 3), torch.ones(2, 2, 6, dtype=torch.int32))), TypeError, r"hx\[1\]: expected a floating-point"),
    (lambda: (torch.randn(5, 2, 4), torch.randn(2, 2, 3)), ValueError, r"hx: expected a tuple \(h_0, c_0\)"),
    (lambda: (torch.randn(5, 2, 4), (torch.randn(2, 2, 3),)), ValueError, r"hx: expected 2 tensor"),
]
SINGLE_BAD_STATE = [
    (lambda: (torch.randn(5, 2, 4), torch.randn(2, 3, 6)), ValueError, r"hx: expected shape \(2, 2, 6\), got \(2, 3, 6\)"),
    (lambda: (torch.randn(5, 2, 4), torch.randn(2, 2, 6).double()), TypeError, r"hx: expected dtype torch.float32"),
    (lambda: (torch.randn(5, 2, 4), (torch.randn(2, 2, 6),)), ValueError, r"hx: expected a single tensor"),
]


def _bad_input_cases():
    for family in FAMILIES:
        for case in COMMON_BAD_INPUT + (LSTM_BAD_STATE if family == "lstm" else SINGLE_BAD_STATE):
            yield (family, *case)


@pytest.mark.parametrize("family,make_args,error,pattern", list(_bad_input_cases()))
def test_bad_input(family, make_args, error, pattern):
    options = dict(input_size=4, hidden_size=6, num_layers=2, **({"proj_size": 3} if family == "lstm" else {}))
    module = _pair(family, **options)[0]
    with pytest.raises(error, match=pattern):
        module(*make_args())


@pytest.mark.parametrize("family", CELLS)
@pytest.mark.parametrize(
    "make_args,error,pattern",
    [
        (lambda: (torch.randn(3, 5),), ValueError, r"input: .*input_size=4"),
        (lambda: (torch.randn(3, 2, 4),), ValueError, r"input: expected a 1-D or 2-D"),
        (lambda: (torch.ones(3, 4, dtype=torch.int64),), TypeError, r"input: expected a floating-point"),
        (lambda: (torch.randn(3, 4, dtype=torch.float64),), TypeError, r"input: expected dtype torch.float32"),
    ],
)
def test_cell_bad_input(family, make_args, error, pattern):
    torch_cls, ours_cls, extra = CELLS[family]
    with pytest.raises(error, match=pattern):
        ours_cls(4, 6, **extra)(*make_args())


@pytest.mark.parametrize("family", CELLS)
def test_cell_bad_state(family):
    torch_cls, ours_cls, extra = CELLS[family]
    cell = ours_cls(4, 6, **extra)
    x = torch.randn(3, 4)
    wrong = torch.randn(2, 6)
    with pytest.raises(ValueError, match=r"hx(\[0\])?: expected shape \(3, 6\), got \(2, 6\)"):
        cell(x, (wrong, torch.randn(3, 6)) if family == "lstm" else wrong)
    with pytest.raises(TypeError, match=r"expected dtype torch.float32"):
        cell(x, (torch.randn(3, 6).double(), torch.randn(3, 6)) if family == "lstm" else torch.randn(3, 6).double())


# ------------------------------------------------------------------------------------------------
# DistributedDataParallel, two processes on gloo.
# ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loss(result):
    return sum(o.sum() for o in _outputs(result))


def _ddp_worker(rank, world, port, family, state, inputs, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = _pair(family, input_size=4, hidden_size=6, num_layers=2, bidirectional=True)[0]
    model.load_state_dict(state)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    _loss(ddp(inputs[rank])).backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters()}, result_path)
    # Rank 0 hosts the rendezvous store: without this barrier it could tear the store down while rank 1
    # is still using it, and gloo aborts rank 1 (seen as an occasional SIGABRT).
    dist.barrier()
    dist.destroy_process_group()
    # End the process here, skipping interpreter teardown: freeing `ddp` at return destroys its Reducer's
    # ProcessGroupGloo, whose destructor joins gloo's loop thread while holding the GIL, and that thread can be
    # waiting for the GIL to drop a Python object (torch's teardown deadlock: seen once, a CI run hung here).
    # mp.spawn only needs the exit code; the result file is written and closed above.
    os._exit(0)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["lstm", "gru"])
def test_distributed_data_parallel(family, tmp_path):
    single = _pair(family, input_size=4, hidden_size=6, num_layers=2, bidirectional=True)[0]
    inputs = [torch.randn(5, 3, 4) for _ in range(2)]
    for x in inputs:  # DDP averages the gradients of the two ranks
        (_loss(single(x)) / 2).backward()
    result_path = tmp_path / "grads.pt"
    mp.spawn(_ddp_worker, args=(2, _free_port(), family, single.state_dict(), inputs, str(result_path)), nprocs=2)
    grads = torch.load(result_path)
    for name, p in single.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)


@pytest.mark.parametrize("family", ["lstm", "gru"])
def test_functional_call_uses_the_given_weights(family):
    """torch.func.functional_call (as torch.export) swaps the parameters: the layers must read the swapped ones,
    not the tensors of construction time."""
    ours, theirs = _pair(family, input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    x = torch.randn(5, 2, 3)
    params = {name: p.detach() * 0.5 for name, p in theirs.named_parameters()}
    got = torch.func.functional_call(ours, params, (x,))
    want = torch.func.functional_call(theirs, params, (x,))
    for g, w in zip(_outputs(got), _outputs(want), strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("kind", [*FAMILIES, *(f"{family}_cell" for family in CELLS), "layernorm_lstm",
                                  "layernorm_gru"])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_autocast_runs_float32_modules_in_bfloat16(kind, input_dtype):
    """Under torch.autocast a float32 layer or cell runs in autocast's dtype: inputs (float32, or bf16 from an
    autocast Linear), states and weights cast per call, bf16 out, as the same module in bf16 computes it; the
    gradients reach the float32 parameters. Before, a bf16 input raised and the cells raised on their own products."""
    cell = kind.endswith("_cell")
    layernorm = {"layernorm_lstm": (None, seqkern.nn.LayerNormLSTM, {}),
                 "layernorm_gru": (None, seqkern.nn.LayerNormGRU, {})}
    _, ours_cls, extra = CELLS[kind.removesuffix("_cell")] if cell else layernorm.get(kind) or FAMILIES[kind]
    torch.manual_seed(0)
    ours = ours_cls(5, 7, **extra) if cell else ours_cls(5, 7, num_layers=2, bidirectional=True, **extra)
    as_bf16 = copy.deepcopy(ours).bfloat16()
    x = torch.randn((3, 5) if cell else (6, 3, 5)).to(input_dtype)
    two_states = kind.startswith("lstm") or kind == "layernorm_lstm"
    states = [torch.randn((3, 7) if cell else (4, 3, 7)) for _ in range(2 if two_states else 1)]

    def as_hx(tensors):
        return tuple(tensors) if len(tensors) == 2 else tensors[0]

    def flat(result):
        items = result if isinstance(result, tuple) else (result,)
        return [t for item in items for t in (item if isinstance(item, tuple) else (item,))]

    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ours(x, as_hx(states))
    want = as_bf16(x.bfloat16(), as_hx([s.bfloat16() for s in states]))
    for g, w in zip(flat(got), flat(want), strict=True):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    sum(t.float().sum() for t in flat(got)).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in ours.parameters())
