"""NaN and +-Inf propagate as in PyTorch (DESIGN.md, "Semantics that the rule alone does not catch").

Each case plants one NaN or Inf in an input, an initial state, a weight, a float mask or an upstream gradient,
runs seqkern (CPU kernels and Triton under the interpreter) forward and backward, and checks every output and
gradient against an independent oracle: the NaN positions and the +-Inf positions must be exactly the
oracle's, and the finite values must satisfy the rule (seqkern's error at most twice torch's own in the same
dtype). Oracles: torch.nn's modules and cells (LSTM, GRU, RNN, MultiheadAttention); for attention the composed
softmax(q k^T * scale + float mask) @ v, for additive attention softmax(v . tanh(W_q q + W_k k)) @ values, both
over the keys a query sees (a hidden key takes no part, also in a NaN row) and with torch._safe_softmax, so that
a query with no visible key gives 0 (seqkern's documented difference from SDPA, which gives NaN there).
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

import seqkern
from helpers import assert_rule

NAN, INF = float("nan"), float("inf")
F32, F64 = torch.float32, torch.float64
# (backend, dtype) pairs: the CPU kernels in both dtypes; Triton (interpreter: slow) and the pure-PyTorch
# reference (what runs when the C++ kernels could not be built, and on devices no kernel serves) in float32.
BACKENDS = [("cpu", F64), ("cpu", F32), ("triton", F32), ("reference", F32)]
BACKEND_IDS = [f"{b}-{str(d)[6:]}" for b, d in BACKENDS]


def case(*values, backend: str, id: str):
    """A pytest.param, marked `triton` when it runs the Triton kernels."""
    return pytest.param(*values, id=id, marks=[pytest.mark.triton] if backend == "triton" else [])


BACKEND_PARAMS = [case(b, d, backend=b, id=i) for (b, d), i in zip(BACKENDS, BACKEND_IDS)]


def _as_tuple(key) -> tuple:
    return key if isinstance(key, tuple) else (key,)


def cases(keys, triton_keys) -> list:
    """(*key, backend, dtype) for every key on the CPU in both dtypes, and on Triton for the keys in
    triton_keys (the interpreter steps every program in Python: 1-5 s a case here, so a few cover it)."""
    triton_keys = {_as_tuple(key) for key in triton_keys}
    params = []
    for key in map(_as_tuple, keys):
        for (backend, dtype), bid in zip(BACKENDS, BACKEND_IDS):
            if backend != "triton" or key in triton_keys:
                params.append(case(*key, backend, dtype, backend=backend, id="-".join(map(str, key)) + "-" + bid))
    return params


def place(tensors: dict, spec, module=None) -> None:
    """Writes value at index into the tensor named by spec = (name, index, value): an input in `tensors`
    ("last": the last one), or a parameter of `module`. name None: nothing (the plant is in the gradient)."""
    name, index, value = spec
    if name == "last" and tensors:
        name = list(tensors)[-1]
    if name in tensors:
        tensors[name][index] = value
    elif name is not None and module is not None and hasattr(module, name):
        with torch.no_grad():
            getattr(module, name)[index] = value


def assert_nan_rule(name: str, ours: torch.Tensor, theirs: torch.Tensor, ref64: torch.Tensor) -> None:
    """NaN and +-Inf exactly where the float64 oracle has them; the finite values under the rule."""
    ref64 = ref64.double()
    for label, where in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        expected = where(ref64)
        # torch in the test's dtype must agree with its float64 self, else the case itself is ill-posed.
        assert torch.equal(where(theirs), expected), f"{name}: torch's own {label} pattern differs by dtype"
        got = where(ours)
        assert torch.equal(got, expected), (
            f"{name}: {label} at {int((got & ~expected).sum())} positions where torch has none, missing at "
            f"{int((expected & ~got).sum())} of {int(expected.sum())}")
    finite = torch.isfinite(ref64)
    assert_rule(name, ours.masked_fill(~finite, 0), theirs.masked_fill(~finite, 0), ref64.masked_fill(~finite, 0))


def assert_all_nan_rule(ours: dict, theirs: dict, ref64: dict) -> None:
    assert ours.keys() == theirs.keys() == ref64.keys(), (ours.keys(), theirs.keys(), ref64.keys())
    for name in ours:
        assert_nan_rule(name, ours[name], theirs[name], ref64[name])


def outputs_and_grads(fn, inputs: dict, cotangents: list, backend: str | None) -> dict:
    """Outputs of fn(**inputs) and the gradients of sum_i <output_i, cotangent_i> with respect to every input
    and every parameter of fn (when fn is a module). Leaves are fresh copies: callers' tensors stay untouched."""
    leaves = {k: v.detach().clone().requires_grad_() if v.is_floating_point() else v for k, v in inputs.items()}
    params = dict(fn.named_parameters()) if isinstance(fn, torch.nn.Module) else {}
    with seqkern.backend(backend) if backend else contextlib.nullcontext():
        outputs = fn(**leaves)
        results = {f"out{i}": o for i, o in enumerate(outputs)}
        loss = sum((o.double() * c).sum() for o, c in zip(outputs, cotangents))
        wrt = {k: v for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.requires_grad}
        wrt.update({f"param_{k}": p for k, p in params.items()})
        grads = torch.autograd.grad(loss, list(wrt.values()), allow_unused=True)
    results.update({f"grad_{k}": torch.zeros_like(v) if g is None else g for (k, v), g in zip(wrt.items(), grads)})
    return results


def cotangents_for(outputs, plant: str, index=None) -> list:
    """Random float64 cotangents shaped like `outputs`; when plant == "grad_nan", a NaN in the first one at
    `index`, by default at the largest |output| (nonzero, so a relu passes its gradient)."""
    gen = torch.Generator().manual_seed(3)
    cots = [torch.randn(o.shape, generator=gen, dtype=F64) for o in outputs]
    if plant == "grad_nan":
        if index is None:
            cots[0].view(-1)[outputs[0].nan_to_num(0).abs().argmax()] = NAN
        else:
            cots[0][index] = NAN
    return cots


def compare(make_fn, inputs64: dict, plant: str, backend: str, dtype, grad_index=None, expect_effect=True) -> None:
    """make_fn(dtype, oracle) -> a callable (module or function) in that dtype: seqkern's (oracle=False) under
    `backend` in `dtype` against the oracle's in float64 and in `dtype`."""
    oracle64 = make_fn(F64, oracle=True)
    with torch.no_grad():
        probe = oracle64(**inputs64)
    cots = cotangents_for(probe, plant, grad_index)
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs64.items()}
    expected = outputs_and_grads(oracle64, inputs64, cots, None)
    baseline = outputs_and_grads(make_fn(dtype, oracle=True), cast, cots, None)
    got = outputs_and_grads(make_fn(dtype, oracle=False), cast, cots, backend)
    assert_all_nan_rule(got, baseline, expected)
    if expect_effect:
        assert any(torch.isnan(v).any() or torch.isinf(v).any() for v in expected.values()), "the plant had no effect"


class _ModuleFn(torch.nn.Module):
    """call(module, **inputs) as a module whose parameters are `module`'s (their gradients are compared too)."""

    def __init__(self, call, module):
        super().__init__()
        self.call, self.inner = call, module

    def forward(self, **inputs):
        return self.call(self.inner, **inputs)


def module_maker(theirs64, ours64, call):
    """make(dtype, oracle) for compare(): a copy of torch's or seqkern's module in dtype, run through call."""
    def make(dtype, oracle):
        return _ModuleFn(call, copy.deepcopy(theirs64 if oracle else ours64).to(dtype))
    return make


def planted_modules(torch_cls, ours_cls, args, options, spec):
    """torch's float64 module (the plant in its weights, if it names one) and seqkern's with the same state."""
    torch.manual_seed(0)
    theirs = torch_cls(*args, **options).double()
    place({}, spec, theirs)
    ours = ours_cls(*args, **options).double()
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


# ================================================================================================
# Recurrent modules and cells against torch.nn.
# ================================================================================================
SEQ, BATCH, INPUT, HIDDEN = 4, 3, 5, 6

MODULES = {
    "lstm2": (torch.nn.LSTM, seqkern.nn.LSTM, dict(num_layers=2)),
    "lstm_proj": (torch.nn.LSTM, seqkern.nn.LSTM, dict(proj_size=3)),
    "lstm_bidir": (torch.nn.LSTM, seqkern.nn.LSTM, dict(bidirectional=True)),
    "gru": (torch.nn.GRU, seqkern.nn.GRU, {}),
    "rnn_tanh": (torch.nn.RNN, seqkern.nn.RNN, dict(nonlinearity="tanh")),
    "rnn_relu": (torch.nn.RNN, seqkern.nn.RNN, dict(nonlinearity="relu", bidirectional=True)),
}
# Where the NaN / Inf goes: (tensor, index, value); "grad_nan" is the upstream gradient of the output.
LAYER_PLANTS = {
    "x_nan": ("x", (2, 1, 0), NAN),
    "x_posinf": ("x", (2, 1, 0), INF),
    "x_neginf": ("x", (1, 0, 2), -INF),
    "h0_nan": ("h0", (0, 2, 1), NAN),
    "last_state_inf": ("last", (0, 1, 0), INF),  # c0 of the LSTM, h0 of the others
    "w_hh_nan": ("weight_hh_l0", (0, 0), NAN),
    "grad_nan": (None, None, None),
}
TRITON_LAYER_CASES = {("lstm_proj", "x_nan"), ("lstm_bidir", "x_posinf"), ("gru", "w_hh_nan"), ("rnn_relu", "x_nan")}


def _run_layer(module, x, h0, c0=None):
    # torch.nn.LSTM's oneDNN path took 0.5-1.5 s a call at these sizes on the shared 2-core machine (OpenMP
    # threads waiting on each other); its native path is the same module and math (seqkern ignores the flag).
    with torch.backends.mkldnn.flags(enabled=False):
        out, final = module(x, h0 if c0 is None else (h0, c0))
    return (out, *final) if isinstance(final, tuple) else (out, final)


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # raised by mkldnn.flags
@pytest.mark.parametrize("module,plant,backend,dtype",
                         cases([(m, p) for m in MODULES for p in LAYER_PLANTS], TRITON_LAYER_CASES))
def test_recurrent_module(module, plant, backend, dtype):
    torch_cls, ours_cls, options = MODULES[module]
    theirs64, ours64 = planted_modules(torch_cls, ours_cls, (INPUT, HIDDEN), options, LAYER_PLANTS[plant])
    gen = torch.Generator().manual_seed(1)
    layers = options.get("num_layers", 1) * (2 if options.get("bidirectional") else 1)
    inputs = {"x": torch.randn(SEQ, BATCH, INPUT, generator=gen, dtype=F64),
              "h0": torch.randn(layers, BATCH, options.get("proj_size", 0) or HIDDEN, generator=gen, dtype=F64)}
    if torch_cls is torch.nn.LSTM:
        inputs["c0"] = torch.randn(layers, BATCH, HIDDEN, generator=gen, dtype=F64)
    place(inputs, LAYER_PLANTS[plant])
    compare(module_maker(theirs64, ours64, _run_layer), inputs, plant, backend, dtype)


CELLS = {
    "lstm_cell": (torch.nn.LSTMCell, seqkern.nn.LSTMCell, {}),
    "gru_cell": (torch.nn.GRUCell, seqkern.nn.GRUCell, {}),
    "rnn_cell_tanh": (torch.nn.RNNCell, seqkern.nn.RNNCell, dict(nonlinearity="tanh")),
    "rnn_cell_relu": (torch.nn.RNNCell, seqkern.nn.RNNCell, dict(nonlinearity="relu")),
}
CELL_PLANTS = {
    "x_nan": ("x", (1, 0), NAN),
    "x_posinf": ("x", (1, 0), INF),
    "h_nan": ("h", (2, 1), NAN),
    "last_state_neginf": ("last", (0, 3), -INF),  # c of the LSTM cell, h of the others
    "w_ih_nan": ("weight_ih", (1, 2), NAN),
    "grad_nan": (None, None, None),
}


def _run_cell(module, x, h, c=None):
    out = module(x, h if c is None else (h, c))
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("cell,plant,backend,dtype", cases([(c, p) for c in CELLS for p in CELL_PLANTS],
                                                           {(c, p) for c in CELLS for p in ("x_nan", "h_nan")}))
def test_recurrent_cell(cell, plant, backend, dtype):
    torch_cls, ours_cls, options = CELLS[cell]
    theirs64, ours64 = planted_modules(torch_cls, ours_cls, (INPUT, HIDDEN), options, CELL_PLANTS[plant])
    gen = torch.Generator().manual_seed(1)
    inputs = {"x": torch.randn(BATCH, INPUT, generator=gen, dtype=F64),
              "h": torch.randn(BATCH, HIDDEN, generator=gen, dtype=F64)}
    if torch_cls is torch.nn.LSTMCell:
        inputs["c"] = torch.randn(BATCH, HIDDEN, generator=gen, dtype=F64)
    place(inputs, CELL_PLANTS[plant])
    compare(module_maker(theirs64, ours64, _run_cell), inputs, plant, backend, dtype)


# ================================================================================================
# Attention against the composed softmax math.
# ================================================================================================
def composed_attention(q, k, v, attn_mask=None, is_causal=False):
    """softmax(q k^T / sqrt(D) + float mask) @ v over the keys each query sees. A hidden key takes no part: its
    probability is 0 (and its score gets no gradient), also in a NaN row; a query that sees no key, or whose
    mask is -inf everywhere, gives 0 (torch._safe_softmax)."""
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if attn_mask is not None:
        scores = scores + attn_mask
    if not is_causal:
        return torch._safe_softmax(scores, -1) @ v
    hidden = ~torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    return torch._safe_softmax(scores.masked_fill(hidden, -INF), -1).masked_fill(hidden, 0) @ v


# (tensor, index, value). Lq = Lk: the last query and key 0 / value row 0 take part in every row or column,
# causal or not. (A NaN in a query that does not see every key would reach the gradients of the keys it does
# not see only through 0 * NaN inside a matrix product, which even torch's result leaves to its BLAS.)
ATTENTION_PLANTS = {
    "q_nan": ("q", (0, 1, 5, 0), NAN),
    "k_nan": ("k", (1, 0, 0, 1), NAN),
    "v_nan": ("v", (0, 0, 0, 2), NAN),
    "q_posinf": ("q", (0, 0, 5, 0), INF),  # scores +-inf: the row's softmax is NaN
    "k_neginf": ("k", (1, 1, 0, 2), -INF),
    "mask_neginf": ("attn_mask", None, None),  # -inf entries and a fully masked row (output 0, not NaN)
    "mask_nan": ("attn_mask", (1, 0, 5, 2), NAN),
    "grad_nan": (None, (1, 1, 5, 0), NAN),  # index: where the upstream gradient is NaN
}
TRITON_ATTENTION_CASES = {("q_nan", True), ("k_nan", True), ("mask_neginf", True), ("mask_nan", False),
                          ("grad_nan", False)}


@pytest.mark.parametrize("plant,causal,backend,dtype",
                         cases([(p, c) for p in ATTENTION_PLANTS for c in (False, True)], TRITON_ATTENTION_CASES))
def test_attention(plant, causal, backend, dtype):
    gen = torch.Generator().manual_seed(2)
    inputs = {"q": torch.randn(2, 2, 6, 4, generator=gen, dtype=F64) * 2,
              "k": torch.randn(2, 2, 6, 4, generator=gen, dtype=F64) * 2,
              "v": torch.randn(2, 2, 6, 3, generator=gen, dtype=F64)}
    if plant.startswith("mask"):
        inputs["attn_mask"] = torch.randn(2, 1, 6, 6, generator=gen, dtype=F64)  # broadcast over heads
    if plant == "mask_neginf":
        inputs["attn_mask"][0, 0, 1, ::2] = -INF
        inputs["attn_mask"][1, 0, 4, :] = -INF  # query 4 of batch 1 sees no key
    else:
        place(inputs, ATTENTION_PLANTS[plant])

    def make(dtype, oracle):
        def run(q, k, v, attn_mask=None):
            return ((composed_attention if oracle else seqkern.attention)(q, k, v, attn_mask, is_causal=causal),)
        return run

    compare(make, inputs, plant, backend, dtype, grad_index=ATTENTION_PLANTS[plant][1],
            expect_effect=plant != "mask_neginf")


DECODE_PLANTS = {
    "k_nan_visible": ("k_cache", (0, 0, 1, 2), NAN),
    "k_nan_past_length": ("k_cache", (0, 0, 7, 2), NAN),  # beyond cache_seqlens[0] = 5: not part of the cache
    "v_nan_visible": ("v_cache", (1, 0, 8, 0), NAN),
    "q_posinf": ("q", (1, 1, 0, 3), INF),
}


@pytest.mark.parametrize("plant,backend,dtype", cases(DECODE_PLANTS, set(DECODE_PLANTS)))
def test_attention_decode(plant, backend, dtype):
    """Forward only (attention_decode has no autograd formula); the oracle attends to each cache's prefix."""
    gen = torch.Generator().manual_seed(4)
    tensors = {"q": torch.randn(2, 2, 1, 4, generator=gen, dtype=F64),
               "k_cache": torch.randn(2, 1, 9, 4, generator=gen, dtype=F64),
               "v_cache": torch.randn(2, 1, 9, 3, generator=gen, dtype=F64)}
    lengths = [5, 9]
    place(tensors, DECODE_PLANTS[plant])

    def oracle(q, k_cache, v_cache):
        return torch.stack([composed_attention(q[b], k_cache[b, :, :n].expand(2, -1, -1),
                                               v_cache[b, :, :n].expand(2, -1, -1)) for b, n in enumerate(lengths)])

    cast = {k: t.to(dtype) for k, t in tensors.items()}
    with seqkern.backend(backend):
        got = seqkern.attention_decode(*cast.values(), torch.tensor(lengths, dtype=torch.int32))
    assert_nan_rule("out", got, oracle(**cast), oracle(**tensors))


ADDITIVE_PLANTS = {
    "query_nan": ("query", (0, 1, 2), NAN),
    "keys_nan": ("keys", (1, 0, 1), NAN),
    "values_nan": ("values", (0, 2, 0), NAN),
    "query_posinf": ("query", (1, 0, 0), INF),  # tanh saturates: finite scores
    "v_nan": ("v", (3,), NAN),
    "w_k_neginf": ("w_k", (2, 0), -INF),
    "grad_nan": (None, None, None),
}


def composed_additive(query, keys, values, w_q, w_k, v, key_padding_mask):
    """softmax_j(v . tanh(W_q q_i + W_k k_j)) over the non-padding keys @ values: a padding key takes no part
    (probability 0, no score gradient), also in a NaN row."""
    scores = torch.tanh(F.linear(query, w_q).unsqueeze(2) + F.linear(keys, w_k).unsqueeze(1)) @ v
    padding = key_padding_mask.unsqueeze(1)
    return torch._safe_softmax(scores.masked_fill(padding, -INF), -1).masked_fill(padding, 0) @ values


@pytest.mark.parametrize("plant,backend,dtype",
                         cases(ADDITIVE_PLANTS, {"query_nan", "keys_nan", "query_posinf", "grad_nan"}))
def test_additive_attention(plant, backend, dtype):
    gen = torch.Generator().manual_seed(5)
    inputs = {"query": torch.randn(2, 3, 4, generator=gen, dtype=F64),
              "keys": torch.randn(2, 5, 3, generator=gen, dtype=F64),
              "values": torch.randn(2, 5, 4, generator=gen, dtype=F64),
              "w_q": torch.randn(6, 4, generator=gen, dtype=F64), "w_k": torch.randn(6, 3, generator=gen, dtype=F64),
              "v": torch.randn(6, generator=gen, dtype=F64),
              "key_padding_mask": torch.tensor([[False] * 5, [False, False, False, True, True]])}
    place(inputs, ADDITIVE_PLANTS[plant])

    def make(dtype, oracle):
        def run(**kw):
            return ((composed_additive if oracle else seqkern.additive_attention)(**kw),)
        return run

    compare(make, inputs, plant, backend, dtype)


MHA_PLANTS = {
    "query_nan": ("query", (1, 2, 0), NAN),
    "key_nan": ("key", (0, 0, 3), NAN),
    "value_posinf": ("value", (1, 1, 5), INF),
    "in_proj_nan": ("in_proj_weight", (9, 1), NAN),  # a key-projection row: one head's scores NaN
    "attn_mask_nan": ("attn_mask", (2, 4), NAN),
    "grad_nan": (None, None, None),
}


def _run_mha(module, query, key, value, attn_mask, key_padding_mask):
    return module(query, key, value, key_padding_mask=key_padding_mask, attn_mask=attn_mask)


@pytest.mark.parametrize("plant,backend,dtype", cases(MHA_PLANTS, {"attn_mask_nan"}))
def test_multihead_attention(plant, backend, dtype):
    """Against torch.nn.MultiheadAttention (its math path: inputs require grad), output and averaged weights,
    with a float attn_mask and a key_padding_mask (no fully masked query: there torch gives NaN, seqkern 0)."""
    theirs64, ours64 = planted_modules(torch.nn.MultiheadAttention, seqkern.nn.MultiheadAttention, (8, 2),
                                       dict(batch_first=True), MHA_PLANTS[plant])
    gen = torch.Generator().manual_seed(6)
    inputs = {"query": torch.randn(2, 5, 8, generator=gen, dtype=F64),
              "key": torch.randn(2, 6, 8, generator=gen, dtype=F64),
              "value": torch.randn(2, 6, 8, generator=gen, dtype=F64),
              "attn_mask": torch.randn(5, 6, generator=gen, dtype=F64),
              "key_padding_mask": torch.tensor([[0.0] * 6, [0.0] * 4 + [-INF] * 2], dtype=F64)}  # float, as attn_mask
    place(inputs, MHA_PLANTS[plant])
    compare(module_maker(theirs64, ours64, _run_mha), inputs, plant, backend, dtype)
