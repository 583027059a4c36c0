"""NaN and +-Inf propagate as in PyTorch (DESIGN.md, "Semantics that the rule alone does not catch").

Each case plants one NaN or Inf in an input, an initial state, a weight, a float mask or an upstream gradient,
runs seqkern (CPU kernels and Triton under the interpreter) forward and backward, and checks every output and
gradient against an independent oracle: the NaN positions and the +-Inf positions must be exactly the
oracle's, and the finite values must satisfy the rule (seqkern's error at most twice torch's own in the same
dtype). Oracles: torch.nn's modules and cells; for attention the composed math
softmax(q k^T * scale [masked_fill hidden, + float mask]) @ v, with torch._safe_softmax so that a query with no
visible key gives 0 (seqkern's one documented difference from SDPA, which gives NaN there); for additive
attention the composed softmax(v . tanh(W_q q + W_k k)) @ values.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import seqkern
from helpers import assert_rule

NAN, INF = float("nan"), float("inf")
F32, F64 = torch.float32, torch.float64
# (backend, dtype) pairs: the CPU kernels in both dtypes; Triton (interpreter: slow) in float32 only.
BACKENDS = [("cpu", F64), ("cpu", F32), ("triton", F32)]
BACKEND_IDS = [f"{b}-{str(d)[6:]}" for b, d in BACKENDS]


def case(*values, backend: str, id: str):
    """A pytest.param, marked `triton` when it runs the Triton kernels."""
    return pytest.param(*values, id=id, marks=[pytest.mark.triton] if backend == "triton" else [])


BACKEND_PARAMS = [case(b, d, backend=b, id=i) for (b, d), i in zip(BACKENDS, BACKEND_IDS)]


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
    with seqkern.backend(backend) if backend else torch.enable_grad():
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
# The Triton interpreter steps every program in Python (~2-8 s a case here): a few cases cover its activations.
TRITON_LAYER_CASES = {("lstm_proj", "x_nan"), ("lstm_bidir", "x_posinf"), ("gru", "w_hh_nan"), ("gru", "grad_nan"),
                      ("rnn_relu", "x_nan"), ("rnn_tanh", "x_posinf")}


def _layer_cases():
    for module in MODULES:
        for plant in LAYER_PLANTS:
            for (backend, dtype), bid in zip(BACKENDS, BACKEND_IDS):
                if backend == "triton" and (module, plant) not in TRITON_LAYER_CASES:
                    continue
                yield case(module, plant, backend, dtype, backend=backend, id=f"{module}-{plant}-{bid}")


def _planted_module(torch_cls, ours_cls, options, plant):
    """(torch float64 module with the plant in its weights, seqkern module with the same state)."""
    torch.manual_seed(0)
    theirs = torch_cls(INPUT, HIDDEN, **options).double()
    target, index, value = LAYER_PLANTS[plant]
    if target is not None and target.startswith("weight"):
        with torch.no_grad():
            getattr(theirs, target)[index] = value
    ours = ours_cls(INPUT, HIDDEN, **options).double()
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


@pytest.mark.parametrize("module,plant,backend,dtype", list(_layer_cases()))
def test_recurrent_module(module, plant, backend, dtype):
    torch_cls, ours_cls, options = MODULES[module]
    theirs64, ours64 = _planted_module(torch_cls, ours_cls, options, plant)
    gen = torch.Generator().manual_seed(1)
    layers = options.get("num_layers", 1) * (2 if options.get("bidirectional") else 1)
    inputs = {"x": torch.randn(SEQ, BATCH, INPUT, generator=gen, dtype=F64),
              "h0": torch.randn(layers, BATCH, options.get("proj_size", 0) or HIDDEN, generator=gen, dtype=F64)}
    if torch_cls is torch.nn.LSTM:
        inputs["c0"] = torch.randn(layers, BATCH, HIDDEN, generator=gen, dtype=F64)
    target, index, value = LAYER_PLANTS[plant]
    if target == "last":
        target = list(inputs)[-1]
    if target in inputs:
        inputs[target][index] = value

    def make(dtype, oracle):
        module = copy.deepcopy(theirs64 if oracle else ours64).to(dtype)

        def run(x, h0, c0=None):
            out, final = module(x, h0 if c0 is None else (h0, c0))
            return (out, *final) if isinstance(final, tuple) else (out, final)
        return _ModuleFn(run, module)

    compare(make, inputs, plant, backend, dtype)


class _ModuleFn(torch.nn.Module):
    """A function over a module's forward whose parameters are the module's (for outputs_and_grads)."""

    def __init__(self, run, module):
        super().__init__()
        self.run, self.inner = run, module

    def forward(self, **inputs):
        return self.run(**inputs)


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
TRITON_CELL_PLANTS = ["x_nan", "h_nan", "grad_nan"]


def _cell_cases():
    for cell in CELLS:
        for plant in CELL_PLANTS:
            for (backend, dtype), bid in zip(BACKENDS, BACKEND_IDS):
                if backend == "triton" and plant not in TRITON_CELL_PLANTS:
                    continue
                yield case(cell, plant, backend, dtype, backend=backend, id=f"{cell}-{plant}-{bid}")


@pytest.mark.parametrize("cell,plant,backend,dtype", list(_cell_cases()))
def test_recurrent_cell(cell, plant, backend, dtype):
    torch_cls, ours_cls, options = CELLS[cell]
    torch.manual_seed(0)
    theirs64 = torch_cls(INPUT, HIDDEN, **options).double()
    target, index, value = CELL_PLANTS[plant]
    if target is not None and target.startswith("weight"):
        with torch.no_grad():
            getattr(theirs64, target)[index] = value
    ours64 = ours_cls(INPUT, HIDDEN, **options).double()
    ours64.load_state_dict(theirs64.state_dict())
    gen = torch.Generator().manual_seed(1)
    inputs = {"x": torch.randn(BATCH, INPUT, generator=gen, dtype=F64),
              "h": torch.randn(BATCH, HIDDEN, generator=gen, dtype=F64)}
    if torch_cls is torch.nn.LSTMCell:
        inputs["c"] = torch.randn(BATCH, HIDDEN, generator=gen, dtype=F64)
    if target == "last":
        target = list(inputs)[-1]
    if target in inputs:
        inputs[target][index] = value

    def make(dtype, oracle):
        module = copy.deepcopy(theirs64 if oracle else ours64).to(dtype)

        def run(x, h, c=None):
            out = module(x, h if c is None else (h, c))
            return out if isinstance(out, tuple) else (out,)
        return _ModuleFn(run, module)

    compare(make, inputs, plant, backend, dtype)


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
    "mask_neginf": ("mask", None, None),  # -inf entries and one fully masked row (output 0, not NaN)
    "mask_nan": ("mask", (1, 0, 5, 2), NAN),
    "grad_nan": ("grad", (1, 1, 5, 0), NAN),
}
TRITON_ATTENTION_CASES = {("q_nan", True), ("k_nan", False), ("v_nan", True), ("q_posinf", False),
                          ("mask_neginf", True), ("mask_nan", False), ("grad_nan", True)}


def _attention_inputs(plant):
    gen = torch.Generator().manual_seed(2)
    inputs = {"q": torch.randn(2, 2, 6, 4, generator=gen, dtype=F64) * 2,
              "k": torch.randn(2, 2, 6, 4, generator=gen, dtype=F64) * 2,
              "v": torch.randn(2, 2, 6, 3, generator=gen, dtype=F64)}
    target, index, value = ATTENTION_PLANTS[plant]
    if target == "mask":
        mask = torch.randn(2, 1, 6, 6, generator=gen, dtype=F64)
        if index is None:
            mask[0, 0, 1, ::2] = -INF
            mask[1, 0, 4, :] = -INF  # query 4 of batch 1 sees no key
        else:
            mask[index] = value
        inputs["attn_mask"] = mask
    elif target in inputs:
        inputs[target][index] = value
    return inputs


def _attention_cases():
    for plant in ATTENTION_PLANTS:
        for causal in (False, True):
            for (backend, dtype), bid in zip(BACKENDS, BACKEND_IDS):
                if backend == "triton" and (plant, causal) not in TRITON_ATTENTION_CASES:
                    continue
                yield case(plant, causal, backend, dtype, backend=backend, id=f"{plant}-causal{int(causal)}-{bid}")


@pytest.mark.parametrize("plant,causal,backend,dtype", list(_attention_cases()))
def test_attention(plant, causal, backend, dtype):
    def make(dtype, oracle):
        def run(q, k, v, attn_mask=None):
            fn = composed_attention if oracle else seqkern.attention
            return (fn(q, k, v, attn_mask, is_causal=causal),)
        return run

    compare(make, _attention_inputs(plant), plant, backend, dtype, grad_index=ATTENTION_PLANTS[plant][1],
            expect_effect=plant != "mask_neginf")


DECODE_PLANTS = {
    "k_nan_visible": ("k_cache", (0, 0, 1, 2), NAN),
    "k_nan_past_length": ("k_cache", (0, 0, 7, 2), NAN),  # beyond cache_seqlens[0] = 5: not part of the cache
    "v_nan_visible": ("v_cache", (1, 0, 8, 0), NAN),
    "q_posinf": ("q", (1, 1, 0, 3), INF),
}


@pytest.mark.parametrize("backend,dtype", BACKEND_PARAMS)
@pytest.mark.parametrize("plant", list(DECODE_PLANTS))
def test_attention_decode(plant, backend, dtype):
    """Forward only (attention_decode has no autograd formula); the oracle attends to each cache's prefix."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 2, 1, 4, generator=gen, dtype=F64)
    k_cache = torch.randn(2, 1, 9, 4, generator=gen, dtype=F64)
    v_cache = torch.randn(2, 1, 9, 3, generator=gen, dtype=F64)
    lengths = [5, 9]
    tensors = {"q": q, "k_cache": k_cache, "v_cache": v_cache}
    target, index, value = DECODE_PLANTS[plant]
    tensors[target][index] = value

    def oracle(q, k_cache, v_cache):
        rows = [composed_attention(q[b], k_cache[b, :, :n].expand(2, -1, -1), v_cache[b, :, :n].expand(2, -1, -1))
                for b, n in enumerate(lengths)]
        return torch.stack(rows)

    cast = {k: t.to(dtype) for k, t in tensors.items()}
    with seqkern.backend(backend):
        got = seqkern.attention_decode(cast["q"], cast["k_cache"], cast["v_cache"],
                                       torch.tensor(lengths, dtype=torch.int32))
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
TRITON_ADDITIVE_PLANTS = ["query_nan", "keys_nan", "values_nan", "query_posinf", "grad_nan"]


def composed_additive(query, keys, values, w_q, w_k, v, key_padding_mask):
    """softmax_j(v . tanh(W_q q_i + W_k k_j)) over the non-padding keys @ values: a padding key takes no part
    (probability 0, no score gradient), also in a NaN row."""
    scores = torch.tanh(F.linear(query, w_q).unsqueeze(2) + F.linear(keys, w_k).unsqueeze(1)) @ v
    padding = key_padding_mask.unsqueeze(1)
    return torch._safe_softmax(scores.masked_fill(padding, -INF), -1).masked_fill(padding, 0) @ values


def _plant_cases(plants, triton_plants):
    for plant in plants:
        for (backend, dtype), bid in zip(BACKENDS, BACKEND_IDS):
            if backend != "triton" or plant in triton_plants:
                yield case(plant, backend, dtype, backend=backend, id=f"{plant}-{bid}")


@pytest.mark.parametrize("plant,backend,dtype", list(_plant_cases(ADDITIVE_PLANTS, TRITON_ADDITIVE_PLANTS)))
def test_additive_attention(plant, backend, dtype):
    gen = torch.Generator().manual_seed(5)
    inputs = {"query": torch.randn(2, 3, 4, generator=gen, dtype=F64),
              "keys": torch.randn(2, 5, 3, generator=gen, dtype=F64),
              "values": torch.randn(2, 5, 4, generator=gen, dtype=F64),
              "w_q": torch.randn(6, 4, generator=gen, dtype=F64), "w_k": torch.randn(6, 3, generator=gen, dtype=F64),
              "v": torch.randn(6, generator=gen, dtype=F64),
              "key_padding_mask": torch.tensor([[False] * 5, [False, False, False, True, True]])}
    target, index, value = ADDITIVE_PLANTS[plant]
    if target is not None:
        inputs[target][index] = value

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


@pytest.mark.parametrize("plant,backend,dtype", list(_plant_cases(MHA_PLANTS, ["query_nan", "attn_mask_nan"])))
def test_multihead_attention(plant, backend, dtype):
    """Against torch.nn.MultiheadAttention (its math path: inputs require grad), output and averaged weights,
    with a float attn_mask and a key_padding_mask (no fully masked query: there torch gives NaN, seqkern 0)."""
    torch.manual_seed(0)
    theirs64 = torch.nn.MultiheadAttention(8, 2, batch_first=True).double()
    target, index, value = MHA_PLANTS[plant]
    if target == "in_proj_weight":
        with torch.no_grad():
            theirs64.in_proj_weight[index] = value
    ours64 = seqkern.nn.MultiheadAttention(8, 2, batch_first=True).double()
    ours64.load_state_dict(theirs64.state_dict())
    gen = torch.Generator().manual_seed(6)
    inputs = {"query": torch.randn(2, 5, 8, generator=gen, dtype=F64),
              "key": torch.randn(2, 6, 8, generator=gen, dtype=F64),
              "value": torch.randn(2, 6, 8, generator=gen, dtype=F64),
              "attn_mask": torch.randn(5, 6, generator=gen, dtype=F64),
              "key_padding_mask": torch.tensor([[False] * 6, [False] * 4 + [True] * 2])}
    if target in inputs:
        inputs[target][index] = value

    def make(dtype, oracle):
        module = copy.deepcopy(theirs64 if oracle else ours64).to(dtype)

        def run(query, key, value, attn_mask, key_padding_mask):
            return module(query, key, value, key_padding_mask=key_padding_mask, attn_mask=attn_mask)
        return _ModuleFn(run, module)

    compare(make, inputs, plant, backend, dtype)
