"""seqkern.nn.AdditiveAttention and seqkern.nn.LuongAttention ("dot", "general", "concat"): the fused forward
under the correctness rule against the modules' composed-PyTorch forward (the yardstick in the test dtype, the
oracle in float64) for the context, the returned weights and the gradients of the query, keys, values and every
parameter; padding (a fully padded row gives zeros and zero gradients), unbatched inputs, keys projected once,
the Triton kernels under the interpreter, torch.compile, and bad input."""
from __future__ import annotations

import copy

import pytest
import torch

import seqkern
from helpers import assert_all_rule

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
QUERY, KEY, VALUE, HIDDEN = 6, 10, 5, 9

MODULES = {
    "additive": lambda **f: seqkern.nn.AdditiveAttention(QUERY, KEY, HIDDEN, **f),
    "additive-bias": lambda **f: seqkern.nn.AdditiveAttention(QUERY, KEY, HIDDEN, bias=True, **f),
    "dot": lambda **f: seqkern.nn.LuongAttention(KEY, KEY, "dot", **f),
    "general": lambda **f: seqkern.nn.LuongAttention(QUERY, KEY, "general", **f),
    "concat": lambda **f: seqkern.nn.LuongAttention(QUERY, KEY, "concat", hidden_size=HIDDEN, **f),
}


def _module(kind: str, dtype=torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODULES[kind](dtype=dtype)


def _inputs(module, batch, len_q, len_k, *, mask: str | None, unbatched=False, seed=1) -> dict:
    """float64 query, keys, values and the key padding mask ("padded": row 1 all padding, "random")."""
    gen = torch.Generator().manual_seed(seed)
    lead = () if unbatched else (batch,)
    inputs = dict(query=torch.randn(*lead, len_q, module.query_size, generator=gen, dtype=torch.float64),
                  keys=torch.randn(*lead, len_k, module.key_size, generator=gen, dtype=torch.float64),
                  values=torch.randn(*lead, len_k, VALUE, generator=gen, dtype=torch.float64))
    key_padding_mask = None
    if mask is not None:
        key_padding_mask = torch.rand(*lead, len_k, generator=gen) < 0.3
        key_padding_mask[..., 0] = False
        if mask == "padded" and not unbatched:
            key_padding_mask[min(1, batch - 1)] = True
    return dict(tensors=inputs, mask=key_padding_mask)


def _run(module, forward_name: str, inputs: dict, dtype, projected: bool) -> dict:
    """The context, the weights and the gradients of <context, c1> + <weights, c2> to every tensor and
    parameter, in `dtype` (module and inputs cast)."""
    module = copy.deepcopy(module).to(dtype)
    tensors = {name: t.to(dtype).requires_grad_() for name, t in inputs["tensors"].items()}
    forward = getattr(module, forward_name)
    projected_keys = module.project_keys(tensors["keys"]) if projected else None
    context, weights = forward(tensors["query"], tensors["keys"], tensors["values"],
                               key_padding_mask=inputs["mask"], need_weights=True, projected_keys=projected_keys)
    gen = torch.Generator().manual_seed(7)
    c1 = torch.randn(context.shape, generator=gen, dtype=torch.float64).to(dtype)
    c2 = torch.randn(weights.shape, generator=gen, dtype=torch.float64).to(dtype)
    leaves = {**tensors, **dict(module.named_parameters())}
    grads = torch.autograd.grad((context * c1).sum() + (weights * c2).sum(), list(leaves.values()))
    return {"context": context, "weights": weights,
            **{f"grad_{name}": g for name, g in zip(leaves, grads)}}


CASES = [
    dict(batch=3, len_q=5, len_k=7, mask="padded"),
    dict(batch=2, len_q=1, len_k=63, mask="random"),  # a decoder step
    dict(batch=1, len_q=17, len_k=3, mask=None),
    dict(batch=1, len_q=4, len_k=9, mask="random", unbatched=True),
]


@pytest.mark.parametrize("projected", [False, True], ids=["keys", "projected_keys"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rule_against_composed_pytorch(kind, case, projected, dtype):
    module = _module(kind)
    options = dict(case)
    inputs = _inputs(module, options.pop("batch"), options.pop("len_q"), options.pop("len_k"), **options)
    ours = _run(module, "forward", inputs, dtype, projected)
    theirs = _run(module, "composed_forward", inputs, dtype, projected)
    ref64 = _run(module, "composed_forward", inputs, torch.float64, projected)
    assert_all_rule(ours, theirs, ref64)


@pytest.mark.triton
@pytest.mark.parametrize("kind", ["additive", "dot", "concat"])
def test_triton_rule_against_composed_pytorch(kind):
    module = _module(kind)
    inputs = _inputs(module, 2, 3, 6, mask="padded")
    with seqkern.backend("triton"):
        ours = _run(module, "forward", inputs, torch.float32, projected=False)
    theirs = _run(module, "composed_forward", inputs, torch.float32, projected=False)
    ref64 = _run(module, "composed_forward", inputs, torch.float64, projected=False)
    assert_all_rule(ours, theirs, ref64)


@pytest.mark.parametrize("kind", MODULES)
def test_fully_padded_row_gives_zeros_and_zero_gradients(kind):
    module = _module(kind, torch.float32)
    inputs = _inputs(module, 3, 4, 5, mask="padded")
    out = _run(module, "forward", inputs, torch.float32, projected=False)
    assert torch.equal(out["context"][1], torch.zeros_like(out["context"][1]))
    assert torch.equal(out["weights"][1], torch.zeros_like(out["weights"][1]))
    for name in ("grad_query", "grad_keys", "grad_values"):
        assert torch.equal(out[name][1], torch.zeros_like(out[name][1])), name
    assert all(torch.isfinite(t).all() for t in out.values())


@pytest.mark.parametrize("kind", MODULES)
def test_weights_are_a_distribution_over_the_keys_not_padding(kind):
    module = _module(kind, torch.float32)
    inputs = _inputs(module, 3, 4, 8, mask="random")
    tensors = {name: t.float() for name, t in inputs["tensors"].items()}
    context, weights = module(**tensors, key_padding_mask=inputs["mask"], need_weights=True)
    assert torch.allclose(weights.sum(-1), torch.ones(3, 4), atol=1e-5)
    assert (weights.masked_select(inputs["mask"].unsqueeze(1).expand_as(weights)) == 0).all()
    no_weights = module(**tensors, key_padding_mask=inputs["mask"])
    assert no_weights[1] is None and torch.allclose(no_weights[0], context, atol=1e-6)


def test_values_default_to_the_keys():
    module = _module("general", torch.float32)
    query, keys = torch.randn(2, 3, QUERY), torch.randn(2, 5, KEY)
    assert torch.equal(module(query, keys)[0], module(query, keys, keys)[0])


def test_parameters_and_their_initialization():
    names = {kind: sorted(name for name, _ in _module(kind).named_parameters()) for kind in MODULES}
    assert names == {"additive": ["key_proj.weight", "query_proj.weight", "v"],
                     "additive-bias": ["key_proj.bias", "key_proj.weight", "query_proj.weight", "v"],
                     "dot": [], "general": ["query_proj.weight"], "concat": ["concat_proj.weight", "v"]}
    module = _module("additive")
    assert module.v.abs().max() <= HIDDEN ** -0.5
    assert all(torch.equal(a, b) for a, b in zip(module.parameters(), _module("additive").parameters()))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["additive", "general"])
def test_torch_compile_fullgraph(kind):
    module = _module(kind, torch.float32)
    inputs = _inputs(module, 2, 3, 6, mask="random")
    tensors = {name: t.float().requires_grad_() for name, t in inputs["tensors"].items()}

    def step(query, keys, values):
        context, weights = module(query, keys, values, key_padding_mask=inputs["mask"], need_weights=True)
        return context.sum() + weights.square().sum()

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(**tensors)
    grads = torch.autograd.grad(loss, list(tensors.values()))
    expected = step(**tensors)
    expected_grads = torch.autograd.grad(expected, list(tensors.values()))
    torch.testing.assert_close(loss, expected)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


def _bad_calls():
    query, keys = torch.randn(2, 3, QUERY), torch.randn(2, 5, KEY)
    additive = seqkern.nn.AdditiveAttention(QUERY, KEY, HIDDEN)
    dot = seqkern.nn.LuongAttention(KEY, KEY, "dot")
    return [
        ("query size", lambda: additive(torch.randn(2, 3, QUERY + 1), keys), ValueError, "query_size=6"),
        ("query ndim", lambda: additive(torch.randn(3, QUERY, 1, 1), keys), ValueError, "query"),
        ("keys size", lambda: additive(query, torch.randn(2, 5, KEY - 1)), ValueError, "keys"),
        ("keys batch", lambda: additive(query, torch.randn(3, 5, KEY)), ValueError, "keys"),
        ("values length", lambda: additive(query, keys, torch.randn(2, 4, VALUE)), ValueError, "values"),
        ("query dtype", lambda: additive(query.double(), keys.double()), TypeError, "query"),
        ("keys dtype", lambda: additive(query, keys.double()), TypeError, "keys"),
        ("dot query dtype", lambda: dot(torch.randn(2, 3, KEY).double(), keys), TypeError, "keys"),
        ("mask dtype", lambda: additive(query, keys, key_padding_mask=torch.zeros(2, 5)), TypeError,
         "key_padding_mask"),
        ("mask shape", lambda: dot(torch.randn(2, 3, KEY), keys, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)),
         ValueError, "key_padding_mask"),
        ("projected keys", lambda: additive(query, keys, projected_keys=torch.randn(2, 5, HIDDEN + 1)), ValueError,
         "projected_keys"),
        ("not a tensor", lambda: additive([1.0], keys), TypeError, "query"),
        ("score", lambda: seqkern.nn.LuongAttention(4, 4, "cosine"), ValueError, "score"),
        ("dot sizes", lambda: seqkern.nn.LuongAttention(4, 5, "dot"), ValueError, "query_size == key_size"),
        ("hidden size", lambda: seqkern.nn.AdditiveAttention(4, 5, 0), ValueError, "hidden_size"),
    ]


@pytest.mark.parametrize("name, call, error, words", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_input_gets_a_clear_error(name, call, error, words):
    with pytest.raises(error, match=words):
        call()
