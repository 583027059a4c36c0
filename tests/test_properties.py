"""Property-based tests (hypothesis, derandomized) over every op family on the CPU backend: the recurrent layers
and cells (through seqkern.nn, against torch.nn), flash attention (seqkern.attention, against
F.scaled_dot_product_attention) and additive attention (against the formula composed here).

Each example draws shapes (empty batches, length-1 axes, zero-length sequences), options, a dtype (float32,
float64, bfloat16), a magnitude from 1e-3 to 1e3, masks with fully masked rows, non-contiguous (transposed or
strided) and aliased inputs, and a thread count (1, 2 or 3, restored afterwards). seqkern's outputs and every
gradient obey the correctness rule against the float64 oracle, and two runs with the same thread count are bit
for bit identical. NaN/Inf and second-order gradients are tested elsewhere.
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import seqkern
from helpers import assert_all_rule

DTYPES = (torch.float32, torch.float64, torch.bfloat16)
MAGNITUDES = (1e-3, 1e-1, 1.0, 10.0, 1e3)
LAYOUTS = ("contiguous", "transposed", "strided")
PROPERTY = settings(max_examples=50, derandomize=True, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


@contextlib.contextmanager
def num_threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def leaf(t64: torch.Tensor, dtype, layout: str = "contiguous") -> torch.Tensor:
    """t64's values in `dtype` as a fresh leaf that requires grad, laid out contiguous, with its last two dims
    transposed in memory, or with a stride of 2 on its last dim."""
    t = t64.detach().to(dtype)
    if layout == "transposed" and t.dim() >= 2:
        t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "strided" and t.numel():
        wide = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
        wide[..., ::2] = t
        t = wide[..., ::2]
    return t.detach().requires_grad_()


def randn(gen, *shape, scale=1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def gradients(outputs: dict, leaves: dict, gen_seed: int = 7) -> dict:
    """outputs + the gradient of a fixed random weighting of every output w.r.t. every leaf (0 if unused)."""
    gen = torch.Generator().manual_seed(gen_seed)
    loss = sum((o.double() * randn(gen, *o.shape)).sum() for o in outputs.values())
    wanted = {n: t for n, t in leaves.items() if t.requires_grad}
    grads = torch.autograd.grad(loss, list(wanted.values()), allow_unused=True) if wanted and loss.requires_grad \
        else [None] * len(wanted)
    return {**outputs, **{f"grad_{n}": torch.zeros_like(t) if g is None else g
                          for (n, t), g in zip(wanted.items(), grads)}}


def check(run_ours, run_torch, dtype, threads: int) -> None:
    """The rule against run_torch in float64, and two runs of ours with `threads` threads bit-identical."""
    with num_threads(threads), seqkern.backend("cpu"):
        first, second = run_ours(), run_ours()
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name}: differs between two runs with {threads} threads"
    assert_all_rule(first, run_torch(dtype), run_torch(torch.float64))


# ------------------------------------------------------------------------------------------------------------
# Recurrent layers: seqkern.nn.LSTM / GRU / RNN against torch.nn's.
# ------------------------------------------------------------------------------------------------------------
FAMILIES = {
    "lstm": (torch.nn.LSTM, seqkern.nn.LSTM, {}),
    "gru": (torch.nn.GRU, seqkern.nn.GRU, {}),
    "rnn_tanh": (torch.nn.RNN, seqkern.nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (torch.nn.RNN, seqkern.nn.RNN, {"nonlinearity": "relu"}),
}


@st.composite
def recurrent_cases(draw):
    family = draw(st.sampled_from(sorted(FAMILIES)))
    dtype = draw(st.sampled_from(DTYPES))
    if family == "rnn_relu" and dtype == torch.bfloat16:
        # bf16 rounding moves pre-activations across relu's kink and flips whole gradient entries, differently in
        # torch.nn and seqkern: the rule is ill-conditioned there (see test_nn_recurrent._packed_cases).
        dtype = torch.float32
    hidden = draw(st.integers(1, 9))
    options = dict(input_size=draw(st.integers(1, 6)), hidden_size=hidden, num_layers=draw(st.integers(1, 2)),
                   bias=draw(st.booleans()), batch_first=draw(st.booleans()), bidirectional=draw(st.booleans()),
                   **FAMILIES[family][2])
    if family == "lstm" and hidden > 1 and draw(st.booleans()):
        options["proj_size"] = draw(st.integers(1, hidden - 1))
    batch = draw(st.sampled_from([None, 0, 1, 2, 3, 5]))  # None: an unbatched (T, I) input
    seq_len = draw(st.sampled_from([0, 1, 2, 5, 7]))
    lengths = None
    if batch and seq_len and draw(st.booleans()):
        lengths = draw(st.lists(st.integers(1, seq_len), min_size=batch, max_size=batch))
    with_hx = draw(st.booleans())
    # h_0 and c_0 one tensor: torch.nn accepts it (both are only read); needs equal widths (no projection).
    alias_state = family == "lstm" and with_hx and "proj_size" not in options and draw(st.booleans())
    return dict(family=family, dtype=dtype, options=options, batch=batch, seq_len=seq_len, lengths=lengths,
                with_hx=with_hx, alias_state=alias_state, magnitude=draw(st.sampled_from(MAGNITUDES)),
                layout=draw(st.sampled_from(LAYOUTS)), threads=draw(st.sampled_from([1, 2, 3])))


def _recurrent_inputs(case):
    options = case["options"]
    gen = torch.Generator().manual_seed(0)
    lead = () if case["batch"] is None else (case["batch"],)
    shape = (*lead, case["seq_len"], options["input_size"]) if options["batch_first"] and lead else \
        (case["seq_len"], *lead, options["input_size"])
    x64 = randn(gen, *shape, scale=case["magnitude"])
    states = None
    if case["with_hx"]:
        stacked = options["num_layers"] * (2 if options["bidirectional"] else 1)
        widths = [options.get("proj_size") or options["hidden_size"]]
        if case["family"] == "lstm":
            widths.append(options["hidden_size"])
        states = [randn(gen, stacked, *lead, w) for w in widths[:1 if case["alias_state"] else None]]
    return x64, states


def _run_recurrent(module, case, x64, states64, dtype, layout="contiguous") -> dict:
    x = leaf(x64, dtype, layout)
    states = None if states64 is None else [leaf(s, dtype, layout) for s in states64]
    hx = None
    if states is not None:
        hx = states[0] if case["family"] != "lstm" else (
            (states[0], states[0]) if case["alias_state"] else tuple(states))
    inp = x if case["lengths"] is None else pack_padded_sequence(
        x, torch.tensor(case["lengths"]), batch_first=case["options"]["batch_first"], enforce_sorted=False)
    output, final = module(inp, hx)
    finals = final if isinstance(final, tuple) else (final,)
    outputs = {"output": output.data if isinstance(output, PackedSequence) else output}
    outputs.update({f"state_{i}_n": s for i, s in enumerate(finals)})
    leaves = {"input": x, **{f"state_{i}_0": s for i, s in enumerate(states or [])}}
    return gradients(outputs, {**leaves, **dict(module.named_parameters())})


@PROPERTY
@given(case=recurrent_cases())
def test_recurrent_layers(case):
    torch_cls, ours_cls, _ = FAMILIES[case["family"]]
    torch.manual_seed(0)
    theirs = torch_cls(**case["options"]).double()
    ours = ours_cls(**case["options"]).double()
    ours.load_state_dict(theirs.state_dict())
    x64, states64 = _recurrent_inputs(case)
    if case["seq_len"] == 0:  # torch.nn refuses a zero-length sequence; seqkern the same way
        for module in (theirs, ours):
            with pytest.raises(RuntimeError, match="sequence length"):
                module(x64)
        return
    dtype = case["dtype"]
    ours = ours.to(dtype)

    def run_torch(dt):
        return _run_recurrent(copy.deepcopy(theirs).to(dt), case, x64, states64, dt)

    check(lambda: _run_recurrent(ours, case, x64, states64, dtype, case["layout"]), run_torch, dtype,
          case["threads"])


# ------------------------------------------------------------------------------------------------------------
# Cells: seqkern.nn.LSTMCell / GRUCell / RNNCell against torch.nn's.
# ------------------------------------------------------------------------------------------------------------
CELLS = {
    "lstm": (torch.nn.LSTMCell, seqkern.nn.LSTMCell, {}),
    "gru": (torch.nn.GRUCell, seqkern.nn.GRUCell, {}),
    "rnn_tanh": (torch.nn.RNNCell, seqkern.nn.RNNCell, {"nonlinearity": "tanh"}),
    "rnn_relu": (torch.nn.RNNCell, seqkern.nn.RNNCell, {"nonlinearity": "relu"}),
}


@st.composite
def cell_cases(draw):
    family = draw(st.sampled_from(sorted(CELLS)))
    dtype = draw(st.sampled_from(DTYPES))
    if family == "rnn_relu" and dtype == torch.bfloat16:
        dtype = torch.float32  # relu's kink under bf16 rounding: see recurrent_cases
    return dict(family=family, dtype=dtype, input_size=draw(st.integers(1, 7)), hidden=draw(st.integers(1, 17)),
                bias=draw(st.booleans()), batch=draw(st.sampled_from([None, 0, 1, 3, 8])),
                with_hx=draw(st.booleans()), magnitude=draw(st.sampled_from(MAGNITUDES)),
                layout=draw(st.sampled_from(LAYOUTS)), threads=draw(st.sampled_from([1, 2, 3])))


@PROPERTY
@given(case=cell_cases())
def test_recurrent_cells(case):
    torch_cls, ours_cls, extra = CELLS[case["family"]]
    torch.manual_seed(0)
    theirs = torch_cls(case["input_size"], case["hidden"], bias=case["bias"], **extra).double()
    ours = ours_cls(case["input_size"], case["hidden"], bias=case["bias"], **extra).double()
    ours.load_state_dict(theirs.state_dict())
    gen = torch.Generator().manual_seed(0)
    lead = () if case["batch"] is None else (case["batch"],)
    x64 = randn(gen, *lead, case["input_size"], scale=case["magnitude"])
    count = 2 if case["family"] == "lstm" else 1
    states64 = [randn(gen, *lead, case["hidden"]) for _ in range(count)] if case["with_hx"] else None
    dtype = case["dtype"]
    ours = ours.to(dtype)

    def run(module, dt, layout="contiguous"):
        x = leaf(x64, dt, layout)
        states = None if states64 is None else [leaf(s, dt, layout) for s in states64]
        hx = None if states is None else (tuple(states) if count == 2 else states[0])
        out = module(x, hx)
        outs = out if isinstance(out, tuple) else (out,)
        leaves = {"input": x, **{f"state_{i}": s for i, s in enumerate(states or [])}}
        return gradients({f"out_{i}": o for i, o in enumerate(outs)}, {**leaves, **dict(module.named_parameters())})

    check(lambda: run(ours, dtype, case["layout"]), lambda dt: run(copy.deepcopy(theirs).to(dt), dt), dtype, case["threads"])


# ------------------------------------------------------------------------------------------------------------
# Flash attention: seqkern.attention against F.scaled_dot_product_attention (which also gives 0 on a fully
# masked row in this torch).
# ------------------------------------------------------------------------------------------------------------
@st.composite
def attention_cases(draw, magnitudes):
    kv_heads = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 1, 2]))
    len_q, len_k = draw(st.sampled_from([0, 1, 3, 9])), draw(st.sampled_from([1, 2, 7, 16]))
    head_dim = draw(st.sampled_from([1, 3, 8, 16]))
    alias = group == 1 and len_q == len_k and draw(st.booleans())  # query, key and value one tensor
    value_dim = head_dim if alias else draw(st.sampled_from([1, 4, 8]))
    mask = draw(st.sampled_from([None, "bool", "float", "fully_masked_row", "causal"]))
    return dict(batch=draw(st.sampled_from([None, 0, 1, 2])), heads=kv_heads * group, kv_heads=kv_heads,
                len_q=len_q, len_k=len_k, head_dim=head_dim, value_dim=value_dim, mask=mask, alias=alias,
                scale=draw(st.sampled_from([None, 0.3])), dtype=draw(st.sampled_from(DTYPES)),
                magnitude=draw(st.sampled_from(magnitudes)), layout=draw(st.sampled_from(LAYOUTS)),
                threads=draw(st.sampled_from([1, 2, 3])))


def _attention_inputs(case):
    gen = torch.Generator().manual_seed(0)
    lead = () if case["batch"] is None else (case["batch"],)
    q = randn(gen, *lead, case["heads"], case["len_q"], case["head_dim"], scale=case["magnitude"])
    k = randn(gen, *lead, case["kv_heads"], case["len_k"], case["head_dim"], scale=case["magnitude"])
    v = randn(gen, *lead, case["kv_heads"], case["len_k"], case["value_dim"])
    mask = None
    if case["mask"] in ("bool", "fully_masked_row"):
        mask = torch.rand(case["len_q"], case["len_k"], generator=gen) > 0.4
        if case["mask"] == "fully_masked_row" and case["len_q"]:
            mask[case["len_q"] // 2] = False
    elif case["mask"] == "float":
        mask = randn(gen, case["len_q"], case["len_k"])
    return q, k, v, mask


def _run_attention(case, q64, k64, v64, mask64, dtype, attend, layout="contiguous") -> dict:
    q = leaf(q64, dtype, layout)
    k, v = (q, q) if case["alias"] else (leaf(k64, dtype, layout), leaf(v64, dtype, layout))
    mask = mask64.to(dtype) if mask64 is not None and mask64.is_floating_point() else mask64
    out = attend(q, k, v, attn_mask=mask, is_causal=case["mask"] == "causal", scale=case["scale"],
                 enable_gqa=case["heads"] != case["kv_heads"])
    leaves = {"query": q} if case["alias"] else {"query": q, "key": k, "value": v}
    return gradients({"output": out}, leaves)


def _check_attention(case):
    inputs = _attention_inputs(case)
    dtype = case["dtype"]
    check(lambda: _run_attention(case, *inputs, dtype, seqkern.attention, case["layout"]),
          lambda dt: _run_attention(case, *inputs, dt, F.scaled_dot_product_attention), dtype, case["threads"])


@PROPERTY
@given(case=attention_cases(MAGNITUDES[:3]))
def test_attention(case):
    _check_attention(case)


SATURATION_BUG = ("issue 13 item 4: where the softmax saturates (one visible key, or logits ~100) the true dq and dk "
                  "are ~0 and SDPA gives ~0, but the kernel's dS = P * (dP - D), D = rowsum(dO * O), leaves a "
                  "rounding residue above the float32 floor (dq 2.6e-6)")


@settings(PROPERTY, phases=(Phase.explicit, Phase.generate))  # no shrinking while it fails: the minimal case is below
@given(case=attention_cases(MAGNITUDES[3:]))
def test_attention_saturated(case):
    """Magnitudes 10 and 1e3: logits of 100 and more, near one-hot softmax rows."""
    _check_attention(case)


def test_single_key_gradients_are_exact():
    """The smallest case test_attention_saturated finds: query (3, 1) of magnitude 10, one key, value width 8."""
    _check_attention(dict(batch=None, heads=1, kv_heads=1, len_q=3, len_k=1, head_dim=1, value_dim=8, mask=None,
                          alias=False, scale=None, dtype=torch.float32, magnitude=10.0, layout="contiguous",
                          threads=1))


# ------------------------------------------------------------------------------------------------------------
# Additive (Bahdanau) attention against its definition composed here.
# ------------------------------------------------------------------------------------------------------------
def composed_additive(query, keys, values, w_q, w_k, v, key_padding_mask):
    """context_i = sum_j softmax_j(v . tanh(W_q q_i + W_k k_j)) values_j, with padded keys (True) left out and a
    query with every key padded getting 0 context and 0 weights. -> (context (B,Lq,Dv), weights (B,Lq,Lk))."""
    scores = torch.tanh((query @ w_q.t()).unsqueeze(-2) + (keys @ w_k.t()).unsqueeze(-3)) @ v
    if key_padding_mask is None:
        weights = scores.softmax(-1)
    else:
        hidden = key_padding_mask.unsqueeze(-2).expand_as(scores)
        empty = hidden.all(-1, keepdim=True)
        # Scores of a fully padded row set to 0 before the softmax so that neither pass sees a NaN.
        weights = scores.masked_fill(hidden, float("-inf")).masked_fill(empty, 0.0).softmax(-1).masked_fill(hidden, 0)
    return weights @ values, weights


@st.composite
def additive_cases(draw):
    len_k = draw(st.sampled_from([1, 2, 6]))
    return dict(batch=draw(st.sampled_from([0, 1, 3])), len_q=draw(st.sampled_from([1, 4])), len_k=len_k,
                query_size=draw(st.integers(1, 6)), key_size=draw(st.integers(1, 6)), hidden=draw(st.integers(1, 9)),
                value_dim=draw(st.integers(1, 5)), alias=draw(st.booleans()),
                mask=draw(st.sampled_from([None, "padding", "fully_masked_row"])),
                dtype=draw(st.sampled_from(DTYPES)), magnitude=draw(st.sampled_from(MAGNITUDES)),
                layout=draw(st.sampled_from(LAYOUTS)), threads=draw(st.sampled_from([1, 2, 3])))


@PROPERTY
@given(case=additive_cases())
def test_additive_attention(case):
    gen = torch.Generator().manual_seed(0)
    batch, len_k, hidden = case["batch"], case["len_k"], case["hidden"]
    query64 = randn(gen, batch, case["len_q"], case["query_size"], scale=case["magnitude"])
    keys64 = randn(gen, batch, len_k, case["key_size"], scale=case["magnitude"])
    values64 = None if case["alias"] else randn(gen, batch, len_k, case["value_dim"])  # alias: values = keys
    weights64 = [randn(gen, hidden, case["query_size"], scale=case["query_size"] ** -0.5),
                 randn(gen, hidden, case["key_size"], scale=case["key_size"] ** -0.5),
                 randn(gen, hidden, scale=hidden ** -0.5)]
    mask = None
    if case["mask"]:
        mask = torch.zeros(batch, len_k, dtype=torch.bool)
        mask[:, len_k // 2:] = True if len_k > 1 else False
        if case["mask"] == "fully_masked_row" and batch:
            mask[batch // 2] = True

    def run(attend, dt, layout="contiguous"):
        query, keys = leaf(query64, dt, layout), leaf(keys64, dt, layout)
        values = keys if values64 is None else leaf(values64, dt, layout)
        w_q, w_k, v = (leaf(w, dt, layout) for w in weights64)
        context, weights = attend(query, keys, values, w_q, w_k, v, mask)
        leaves = dict(query=query, keys=keys, w_q=w_q, w_k=w_k, v=v, **({} if values64 is None else {"values": values}))
        return gradients({"context": context, "weights": weights}, leaves)

    def ours(*args):
        return seqkern.additive_attention(*args, return_weights=True)

    check(lambda: run(ours, case["dtype"], case["layout"]), lambda dt: run(composed_additive, dt), case["dtype"],
          case["threads"])
