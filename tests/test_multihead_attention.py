"""seqkern.nn.MultiheadAttention against torch.nn.MultiheadAttention with the same weights: every constructor
option and forward argument, outputs, attention weights and every gradient under the correctness rule;
state_dict both ways, dropout, torch.compile and bad input."""
from __future__ import annotations

import pytest
import torch

import seqkern
from helpers import assert_all_rule, case_id

LEN_Q, LEN_K, BATCH = 9, 13, 3

CONSTRUCTOR_CASES = [
    dict(embed_dim=16, num_heads=4),
    dict(embed_dim=24, num_heads=3, batch_first=True),
    dict(embed_dim=16, num_heads=2, bias=False),
    dict(embed_dim=16, num_heads=4, add_bias_kv=True),
    dict(embed_dim=16, num_heads=2, add_zero_attn=True, kdim=5, vdim=7),
    dict(embed_dim=32, num_heads=1, add_bias_kv=True, add_zero_attn=True, batch_first=True),
]
FORWARD_CASES = [
    dict(),
    dict(self_attention=True, attn_mask="causal", is_causal=True, need_weights=False),
    dict(self_attention=True, attn_mask="causal", is_causal=True),
    dict(key_padding_mask="bool", average_attn_weights=False),
    dict(key_padding_mask="float", attn_mask="float_per_head"),
    dict(attn_mask="bool", key_padding_mask="bool"),
    dict(unbatched=True, attn_mask="float"),
]


def _modules(options: dict, dtype):
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(**options)
    ours = seqkern.nn.MultiheadAttention(**options)
    ours.load_state_dict(theirs.state_dict())
    return theirs.to(dtype), ours.to(dtype)


def _forward_args(module, case: dict, dtype) -> dict:
    """Float64 inputs and masks of the case, as leaves in `dtype`."""
    gen = torch.Generator().manual_seed(1)
    len_k = LEN_Q if case.get("self_attention") else LEN_K
    lead = () if case.get("unbatched") else (BATCH,)

    def sequence(length, width):
        shape = (*lead, length, width) if module.batch_first or not lead else (length, *lead, width)
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()

    query = sequence(LEN_Q, module.embed_dim)
    if case.get("self_attention"):
        key = value = query
    else:
        key, value = sequence(len_k, module.kdim), sequence(len_k, module.vdim)
    args = dict(query=query, key=key, value=value)
    for name in ("need_weights", "average_attn_weights", "is_causal"):
        if name in case:
            args[name] = case[name]
    if case.get("key_padding_mask"):
        pad = torch.zeros(*lead, len_k, dtype=torch.bool)
        pad[..., -3:] = True
        if lead:
            pad[0, -5:] = True
        args["key_padding_mask"] = pad if case["key_padding_mask"] == "bool" else (
            torch.zeros(pad.shape, dtype=dtype).masked_fill(pad, float("-inf")))
    mask = case.get("attn_mask")
    if mask == "causal":
        args["attn_mask"] = torch.nn.Transformer.generate_square_subsequent_mask(LEN_Q, dtype=dtype)
    elif mask == "bool":
        args["attn_mask"] = torch.rand(LEN_Q, len_k, generator=gen) > 0.8
    elif mask == "float":
        args["attn_mask"] = torch.randn(LEN_Q, len_k, generator=gen, dtype=torch.float64).to(dtype)
    elif mask == "float_per_head":
        args["attn_mask"] = torch.randn(BATCH * module.num_heads, LEN_Q, len_k, generator=gen,
                                        dtype=torch.float64).to(dtype)
    return args


def _run(module, case: dict, dtype) -> dict:
    args = _forward_args(module, case, dtype)
    output, weights = module(**args)
    gen = torch.Generator().manual_seed(2)
    loss = (output.double() * torch.randn(output.shape, generator=gen, dtype=torch.float64)).sum()
    if weights is not None:
        loss = loss + (weights.double() * torch.randn(weights.shape, generator=gen, dtype=torch.float64)).sum()
    leaves = {"query": args["query"]}
    if not case.get("self_attention"):
        leaves.update(key=args["key"], value=args["value"])
    leaves.update({n: p for n, p in module.named_parameters()})
    grads = torch.autograd.grad(loss, list(leaves.values()))
    results = {"output": output, **{f"grad_{n}": g for n, g in zip(leaves, grads)}}
    if weights is not None:
        results["weights"] = weights
    return results


def _valid(options: dict, case: dict) -> bool:
    """Self-attention passes one tensor as query, key and value: kdim and vdim must be embed_dim."""
    return not (case.get("self_attention") and (options.get("kdim") or options.get("vdim")))


# Every constructor case with every forward case in float32; in float64 and bfloat16 each constructor case once.
PAIRS = [(torch.float32, o, c) for o in CONSTRUCTOR_CASES for c in FORWARD_CASES if _valid(o, c)] + [
    (dtype, o, c) for dtype in (torch.float64, torch.bfloat16)
    for o, c in zip(CONSTRUCTOR_CASES, FORWARD_CASES[1:] + FORWARD_CASES[:1]) if _valid(o, c)
]


@pytest.mark.parametrize("dtype, options, case", PAIRS,
                         ids=[f"{d}-{case_id(o)}-{case_id(c)}" for d, o, c in PAIRS])
def test_matches_torch_nn(options, case, dtype):
    theirs, ours = _modules(options, dtype)
    with seqkern.backend("reference"):
        expected = _run(_modules(options, torch.float64)[1], case, torch.float64)
    assert_all_rule(_run(ours, case, dtype), _run(theirs, case, dtype), expected)


def test_state_dict_loads_both_ways():
    options = dict(embed_dim=16, num_heads=4, add_bias_kv=True, kdim=6, vdim=5)
    theirs, ours = torch.nn.MultiheadAttention(**options), seqkern.nn.MultiheadAttention(**options)
    assert theirs.state_dict().keys() == ours.state_dict().keys()
    for name, tensor in ours.state_dict().items():
        assert tensor.shape == theirs.state_dict()[name].shape, name
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())


def test_initialization_matches_torch_nn():
    torch.manual_seed(3)
    theirs = torch.nn.MultiheadAttention(16, 4, add_bias_kv=True)
    torch.manual_seed(3)
    ours = seqkern.nn.MultiheadAttention(16, 4, add_bias_kv=True)
    for (name, a), (_, b) in zip(theirs.state_dict().items(), ours.state_dict().items()):
        assert torch.equal(a, b), name


def test_dropout_in_training_uses_the_returned_weights():
    """In training the output is out_proj(weights_per_head @ V): the weights returned are those applied."""
    torch.manual_seed(4)
    module = seqkern.nn.MultiheadAttention(16, 2, dropout=0.4).double()
    x = torch.randn(7, 2, 16, dtype=torch.float64)
    output, weights = module(x, x, x, average_attn_weights=False)
    assert (weights == 0).any()  # some probabilities dropped
    v = torch.nn.functional.linear(x, module.in_proj_weight[32:], module.in_proj_bias[32:])
    v = v.view(7, 2, 2, 8).permute(1, 2, 0, 3)
    heads = (weights @ v).permute(2, 0, 1, 3).reshape(7, 2, 16)
    torch.testing.assert_close(output, module.out_proj(heads))
    module.eval()
    _, eval_weights = module(x, x, x)
    torch.testing.assert_close(eval_weights.sum(-1), torch.ones(2, 7, dtype=torch.float64))


def test_fully_masked_query_gives_zero_instead_of_nan():
    module = seqkern.nn.MultiheadAttention(8, 2)
    x = torch.randn(4, 1, 8)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[1] = True
    output, weights = module(x, x, x, attn_mask=mask)
    assert torch.isfinite(output).all() and (weights[0, 1] == 0).all()


@pytest.mark.slow
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    module = seqkern.nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 9, 16, requires_grad=True)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(9)

    def fn(x):
        return module(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)[0]

    got = torch.compile(fn, fullgraph=True)(x)
    want = fn(x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(want.sum(), x)[0])


def _call(**changes):
    module = seqkern.nn.MultiheadAttention(16, 4, kdim=6)
    args = {**dict(query=torch.randn(5, 2, 16), key=torch.randn(7, 2, 6), value=torch.randn(7, 2, 16)), **changes}
    return lambda: module(**args)


BAD = [
    ("query width", _call(query=torch.randn(5, 2, 15)), ValueError, "16 features"),
    ("key width", _call(key=torch.randn(7, 2, 16)), ValueError, "6 features"),
    ("batch", _call(key=torch.randn(7, 3, 6), value=torch.randn(7, 3, 16)), ValueError, "batch 2"),
    ("value length", _call(value=torch.randn(8, 2, 16)), ValueError, "value"),
    ("dtype", _call(query=torch.randn(5, 2, 16, dtype=torch.float64)), TypeError, "float64"),
    ("attn_mask shape", _call(attn_mask=torch.zeros(5, 6)), ValueError, "attn_mask"),
    ("key_padding_mask shape", _call(key_padding_mask=torch.zeros(2, 6, dtype=torch.bool)), ValueError,
     "key_padding_mask"),
    ("integer mask", _call(attn_mask=torch.zeros(5, 7, dtype=torch.int64)), TypeError, "attn_mask"),
    ("is_causal without mask", _call(is_causal=True), ValueError, "attn_mask"),
    ("4-D query", _call(query=torch.randn(1, 5, 2, 16)), ValueError, "3-D"),
]


@pytest.mark.parametrize("name, call, error, words", BAD, ids=[c[0] for c in BAD])
def test_bad_input_gets_a_clear_error(name, call, error, words):
    with pytest.raises(error, match=words):
        call()
