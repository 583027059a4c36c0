"""seqkern.additive_attention / additive_attention_projected and the additive_attention_forward/_backward ops:
every implementation (C++, Triton under the interpreter, the reference) under the correctness rule against the
composed PyTorch version in float64 (autograd through the (B, Lq, Lk, H) tanh tensor) with the same composed
version in the test dtype as the yardstick, for the context, the returned weights and the gradients of every
input (gradients flowing in through the weights too); padding (fully padded rows, no keys, empty batch),
strided and unbatched inputs, the tanh's accuracy, determinism, opcheck, gradcheck, torch.compile and bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import seqkern
from helpers import assert_all_rule, case_id

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
IMPLS = ["cpu", pytest.param("triton", marks=pytest.mark.triton), "reference"]
KERNELS = ["cpu", pytest.param("triton", marks=pytest.mark.triton)]


# ------------------------------------------------------------------------------------------------------------
# Cases and the composed version.
# ------------------------------------------------------------------------------------------------------------
def _case(len_q, len_k, hidden, *, batch=2, dim_q=None, dim_k=None, dim_v=None, mask=None, unbatched=False,
          projected=False):
    return dict(batch=batch, len_q=len_q, len_k=len_k, hidden=hidden, dim_q=dim_q or hidden + 2,
                dim_k=dim_k or hidden + 1, dim_v=dim_v or 7, mask=mask, unbatched=unbatched, projected=projected)


CASES = [
    _case(1, 1, 1, batch=1, dim_q=1, dim_k=1, dim_v=1),
    _case(3, 5, 3, batch=3, dim_v=7, mask="padded"),  # batch entry 1 is all padding
    _case(1, 127, 64, batch=3, dim_v=64, mask="random"),  # a decoder step
    _case(63, 127, 64, batch=3, dim_v=64, mask="random"),
    _case(127, 500, 257, batch=1, dim_q=33, dim_k=40, dim_v=7),
    _case(63, 5, 1, batch=3, dim_v=1, mask="random", projected=True),
    _case(3, 127, 257, batch=1, dim_v=64, projected=True, mask="padded"),
    _case(9, 13, 17, unbatched=True, mask="random"),
    _case(5, 7, 3, unbatched=True, projected=True),
]
TRITON_CASES = [CASES[0], CASES[1], _case(3, 9, 17, batch=2, dim_v=5, mask="random"),
                _case(4, 6, 8, unbatched=True, projected=True)]


def _inputs(case: dict, seed: int = 0) -> dict:
    """float64 arguments of the public function of the case: (query, keys, values, w_q, w_k, v) or
    (query_proj, key_proj, values, v), and key_padding_mask."""
    gen = torch.Generator().manual_seed(seed)
    lead = () if case["unbatched"] else (case["batch"],)
    hidden = case["hidden"]

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    if case["projected"]:
        tensors = dict(query_proj=rand(*lead, case["len_q"], hidden), key_proj=rand(*lead, case["len_k"], hidden))
    else:
        tensors = dict(query=rand(*lead, case["len_q"], case["dim_q"]), keys=rand(*lead, case["len_k"], case["dim_k"]))
    tensors["values"] = rand(*lead, case["len_k"], case["dim_v"])
    if not case["projected"]:
        tensors["w_q"] = rand(hidden, case["dim_q"], scale=case["dim_q"] ** -0.5)
        tensors["w_k"] = rand(hidden, case["dim_k"], scale=case["dim_k"] ** -0.5)
    tensors["v"] = rand(hidden)
    mask = None
    if case["mask"] is not None:
        batch = case["batch"] if not case["unbatched"] else 1
        mask = torch.rand(batch, case["len_k"], generator=gen) < 0.3
        mask[:, 0] = False
        if case["mask"] == "padded":
            mask[min(1, batch - 1)] = True
        if case["unbatched"]:
            mask = mask[0]
    return dict(tensors=tensors, mask=mask)


def composed(query, keys, values, w_q, w_k, v, key_padding_mask=None):
    """What a user writes: the (B, Lq, Lk, H) tanh tensor, masked softmax, bmm. -> (context, weights)."""
    scores = torch.tanh(F.linear(query, w_q).unsqueeze(-2) + F.linear(keys, w_k).unsqueeze(-3)) @ v
    return _softmax_and_context(scores, values, key_padding_mask)


def composed_projected(query_proj, key_proj, values, v, key_padding_mask=None):
    scores = torch.tanh(query_proj.unsqueeze(-2) + key_proj.unsqueeze(-3)) @ v
    return _softmax_and_context(scores, values, key_padding_mask)


def _softmax_and_context(scores, values, key_padding_mask):
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask.unsqueeze(-2), float("-inf"))
    weights = scores.softmax(-1).nan_to_num(0.0)  # a fully padded row: NaN -> 0
    return weights @ values, weights


def _public(case: dict):
    return seqkern.additive_attention_projected if case["projected"] else seqkern.additive_attention


def _run(fn, inputs: dict, dtype, cotangents) -> dict:
    """Context and weights of fn(*inputs in dtype), and the gradient of every tensor input under a weighted sum of
    both outputs (so a gradient flows in through the weights as well)."""
    args = {n: t.detach().to(dtype).requires_grad_() for n, t in inputs["tensors"].items()}
    out, weights = fn(*args.values(), key_padding_mask=inputs["mask"])
    loss = (out.double() * cotangents[0]).sum() + (weights.double() * cotangents[1]).sum()
    grads = torch.autograd.grad(loss, list(args.values()), allow_unused=True)
    grads = [torch.zeros_like(a) if g is None else g for a, g in zip(args.values(), grads)]
    return {"out": out, "weights": weights, **{f"grad_{n}": g for n, g in zip(args, grads)}}


def check_case(case: dict, dtype, impl: str) -> None:
    inputs = _inputs(case)
    baseline_fn = composed_projected if case["projected"] else composed
    with torch.no_grad():
        probe = baseline_fn(*inputs["tensors"].values(), inputs["mask"])
    gen = torch.Generator().manual_seed(1)
    cotangents = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in probe]
    public = _public(case)

    def ours(*args, key_padding_mask):
        return public(*args, key_padding_mask=key_padding_mask, return_weights=True)

    expected = _run(baseline_fn, inputs, torch.float64, cotangents)
    baseline = _run(baseline_fn, inputs, dtype, cotangents)
    with seqkern.backend(impl):
        got = _run(ours, inputs, dtype, cotangents)
    assert_all_rule(got, baseline, expected)


# ------------------------------------------------------------------------------------------------------------
# The rule, per implementation.
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("impl", ["cpu", "reference"])
def test_rule_against_composed_pytorch(impl, case, dtype):
    check_case(case, dtype, impl)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", TRITON_CASES, ids=case_id)
def test_triton_rule_against_composed_pytorch(case, dtype):
    check_case(case, dtype, "triton")


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck(impl):
    gen = torch.Generator().manual_seed(2)
    query, keys, values = (torch.randn(2, n, d, generator=gen, dtype=torch.float64, requires_grad=True)
                           for n, d in ((3, 4), (5, 6), (5, 2)))
    w_q, w_k = (torch.randn(3, d, generator=gen, dtype=torch.float64, requires_grad=True) for d in (4, 6))
    v = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[False, True, False, False, True], [True] * 5])

    def fn(*args):
        return seqkern.additive_attention(*args, key_padding_mask=mask, return_weights=True)

    with seqkern.backend(impl):  # fast mode under the slow Triton interpreter (full: ~1 min there)
        assert torch.autograd.gradcheck(fn, (query, keys, values, w_q, w_k, v), fast_mode=impl == "triton")


# ------------------------------------------------------------------------------------------------------------
# Padding, empty and strided inputs.
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_padded_rows_give_zeros_and_zero_gradients(impl, dtype):
    gen = torch.Generator().manual_seed(3)
    qp, kp = (torch.randn(2, n, 8, generator=gen, dtype=dtype, requires_grad=True) for n in (3, 4))
    values = torch.randn(2, 4, 5, generator=gen, dtype=dtype, requires_grad=True)
    v = torch.randn(8, generator=gen, dtype=dtype, requires_grad=True)
    mask = torch.tensor([[False, True, False, True], [True] * 4])
    with seqkern.backend(impl):
        out, weights = seqkern.additive_attention_projected(qp, kp, values, v, mask, return_weights=True)
        (out.sum() + weights.sum()).backward()
    assert (out[1] == 0).all() and (weights[1] == 0).all() and (weights[0][:, [1, 3]] == 0).all()
    torch.testing.assert_close(weights[0].sum(-1).float(), torch.ones(3))
    for t in (qp, kp, values, v):
        assert torch.isfinite(t.grad).all()
    assert (qp.grad[1] == 0).all() and (kp.grad[1] == 0).all() and (values.grad[1] == 0).all()
    assert (kp.grad[0][[1, 3]] == 0).all() and (values.grad[0][[1, 3]] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 4), (2, 3, 0)], ids=["batch0", "queries0", "keys0"])
def test_empty_inputs(impl, shape):
    batch, len_q, len_k = shape
    query = torch.randn(batch, len_q, 6, requires_grad=True)
    keys = torch.randn(batch, len_k, 5, requires_grad=True)
    values = torch.randn(batch, len_k, 3, requires_grad=True)
    w_q, w_k = torch.randn(4, 6, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    v = torch.randn(4, requires_grad=True)
    with seqkern.backend(impl):
        out, weights = seqkern.additive_attention(query, keys, values, w_q, w_k, v, return_weights=True)
        out.sum().backward()
    assert out.shape == (batch, len_q, 3) and weights.shape == (batch, len_q, len_k)
    assert (out == 0).all()
    for t in (query, keys, values, w_q, w_k, v):
        assert t.grad is not None and (t.grad == 0).all()


@pytest.mark.parametrize("impl", KERNELS)
def test_strided_inputs(impl):
    """Non-contiguous arguments (transposed and sliced storage, stride(-1) == 1 or not) give the contiguous result."""
    gen = torch.Generator().manual_seed(4)
    qp = torch.randn(7, 3, 2, 19, generator=gen)[:, :, 0, 2:18].transpose(0, 1)  # (3, 7, 16)
    kp = torch.randn(3, 16, 11, generator=gen).transpose(1, 2)  # (3, 11, 16), stride(-1) != 1
    values = torch.randn(3, 11, 10, generator=gen)[..., ::2]  # (3, 11, 5), stride(-1) == 2
    v = torch.randn(32, generator=gen)[::2]
    mask = torch.rand(3, 2, 11, generator=gen)[:, 0] < 0.3
    with seqkern.backend(impl):
        got = seqkern.additive_attention_projected(qp, kp, values, v, mask, return_weights=True)
        want = seqkern.additive_attention_projected(*(t.contiguous() for t in (qp, kp, values, v, mask)),
                                                    return_weights=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("impl", KERNELS)
def test_backward_is_deterministic(impl):
    """Batch 1 splits a batch entry's queries over the workers (private grad_key_proj buffers), batch 9 does not."""
    for batch in (1, 9):
        gen = torch.Generator().manual_seed(5)
        args = [torch.randn(*s, generator=gen, requires_grad=True)
                for s in ((batch, 70, 32), (batch, 50, 32), (batch, 50, 8), (32,))]
        runs = []
        for _ in range(2):
            with seqkern.backend(impl):
                out = seqkern.additive_attention_projected(*args)
            runs.append(torch.autograd.grad((out * out).sum(), args))
        for first, second in zip(*runs):
            assert torch.equal(first, second)


def test_tanh_accuracy():
    """The kernel's fp32 tanh, read off the op with one key and H = 1 (then lse = score = tanh(q + k)): at most 3
    ulp from tanh in float64 (its comment states the measured maximum, 2.5) over [-12, 12] and near 0."""
    x = torch.cat([torch.linspace(-12, 12, 1 << 20), torch.linspace(-1e-3, 1e-3, 1 << 16),
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 9.0, 30.0, -1e4])])
    ones = torch.ones(1, 1, 1)
    with seqkern.backend("cpu"):
        _, lse, _ = torch.ops.seqkern.additive_attention_forward(x.view(1, -1, 1), torch.zeros(1, 1, 1), ones,
                                                                  torch.ones(1), None, False)
    want = torch.tanh(x.double())
    magnitude = want.abs().float()
    ulp = torch.nextafter(magnitude, torch.tensor(float("inf"))).double() - magnitude.double()
    ulps = ((lse.view(-1).double() - want).abs() / ulp).max().item()
    assert ulps <= 3, ulps


@pytest.mark.parametrize("impl", KERNELS)
def test_op_outputs_match_the_reference(impl):
    """out, lse and weights of the forward op, and the four gradients of the backward op (grad_weights given)."""
    from seqkern import reference

    gen = torch.Generator().manual_seed(6)
    qp, kp = torch.randn(3, 9, 20, generator=gen, dtype=torch.float64), torch.randn(3, 12, 20, generator=gen,
                                                                                  dtype=torch.float64)
    values, v = torch.randn(3, 12, 6, generator=gen, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    mask = torch.rand(3, 12, generator=gen) < 0.4
    mask[2] = True
    with seqkern.backend(impl):
        got = torch.ops.seqkern.additive_attention_forward(qp, kp, values, v, mask, True)
    want = reference.additive_attention_forward(qp, kp, values, v, mask, True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    grad_out, grad_weights = torch.randn_like(got[0]), torch.randn_like(got[2])
    args = (grad_out, grad_weights, qp, kp, values, v, want[0], want[2])
    with seqkern.backend(impl):
        got_grads = torch.ops.seqkern.additive_attention_backward(*args)
    for g, w in zip(got_grads, reference.additive_attention_backward(*args)):
        torch.testing.assert_close(g, w)


# ------------------------------------------------------------------------------------------------------------
# opcheck and torch.compile.
# ------------------------------------------------------------------------------------------------------------
def _op_args(return_weights: bool, mask: bool):
    gen = torch.Generator().manual_seed(7)
    qp, kp = torch.randn(2, 3, 8, generator=gen, requires_grad=True), torch.randn(2, 5, 8, generator=gen,
                                                                                 requires_grad=True)
    values, v = torch.randn(2, 5, 4, generator=gen, requires_grad=True), torch.randn(8, generator=gen,
                                                                                   requires_grad=True)
    key_padding_mask = torch.tensor([[False, True, False, False, False], [True] * 5]) if mask else None
    return (qp, kp, values, v, key_padding_mask, return_weights)


@pytest.mark.parametrize("options", [dict(return_weights=True, mask=True), dict(return_weights=False, mask=False)],
                         ids=case_id)
def test_opcheck_forward_and_backward(options):
    args = _op_args(**options)
    torch.library.opcheck(torch.ops.seqkern.additive_attention_forward.default, args)
    with torch.no_grad():
        out, _, weights = torch.ops.seqkern.additive_attention_forward(*args[:5], True)
    grad_weights = torch.randn_like(weights) if options["return_weights"] else None
    grad_args = (torch.randn_like(out), grad_weights, *(t.detach() for t in args[:4]), out, weights)
    torch.library.opcheck(torch.ops.seqkern.additive_attention_backward.default, grad_args)


@pytest.mark.slow
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(8)
    query, keys, values = (torch.randn(2, n, d, generator=gen, requires_grad=True) for n, d in ((3, 6), (7, 5), (7, 4)))
    w_q, w_k, v = (torch.randn(*s, generator=gen, requires_grad=True) for s in ((8, 6), (8, 5), (8,)))
    mask = torch.rand(2, 7, generator=gen) < 0.3

    def fn(*args):
        return seqkern.additive_attention(*args, key_padding_mask=mask, return_weights=True)

    inputs = (query, keys, values, w_q, w_k, v)
    got, want = torch.compile(fn, fullgraph=True)(*inputs), fn(*inputs)
    torch.testing.assert_close(got, want)
    loss_got, loss_want = got[0].sum() + got[1].square().sum(), want[0].sum() + want[1].square().sum()
    for g, w in zip(torch.autograd.grad(loss_got, inputs), torch.autograd.grad(loss_want, inputs)):
        torch.testing.assert_close(g, w)


# ------------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, before any kernel runs.
# ------------------------------------------------------------------------------------------------------------
def _full(**changes):
    """Valid (query, keys, values, w_q, w_k, v) with some replaced."""
    args = dict(query=torch.randn(2, 3, 6), keys=torch.randn(2, 5, 4), values=torch.randn(2, 5, 7),
                w_q=torch.randn(8, 6), w_k=torch.randn(8, 4), v=torch.randn(8))
    args.update(changes)
    return args


def _projected(**changes):
    args = dict(query_proj=torch.randn(2, 3, 8), key_proj=torch.randn(2, 5, 8), values=torch.randn(2, 5, 7),
                v=torch.randn(8))
    args.update(changes)
    return args


BAD = [
    ("query 4-D", lambda: seqkern.additive_attention(**_full(query=torch.randn(1, 2, 3, 6))), ValueError, "query"),
    ("query integer", lambda: seqkern.additive_attention(**_full(query=torch.ones(2, 3, 6, dtype=torch.long))),
     TypeError, "query"),
    ("keys batch", lambda: seqkern.additive_attention(**_full(keys=torch.randn(3, 5, 4))), ValueError, "keys"),
    ("keys dtype", lambda: seqkern.additive_attention(**_full(keys=torch.randn(2, 5, 4).double())), TypeError, "keys"),
    ("values length", lambda: seqkern.additive_attention(**_full(values=torch.randn(2, 4, 7))), ValueError, "values"),
    ("values device", lambda: seqkern.additive_attention(**_full(values=torch.randn(2, 5, 7, device="meta"))),
     TypeError, "values"),
    ("w_q shape", lambda: seqkern.additive_attention(**_full(w_q=torch.randn(8, 5))), ValueError, "w_q"),
    ("w_k hidden", lambda: seqkern.additive_attention(**_full(w_k=torch.randn(7, 4))), ValueError, "w_k"),
    ("w_k dtype", lambda: seqkern.additive_attention(**_full(w_k=torch.randn(8, 4).bfloat16())), TypeError, "w_k"),
    ("v shape", lambda: seqkern.additive_attention(**_full(v=torch.randn(7))), ValueError, "v"),
    ("mask dtype", lambda: seqkern.additive_attention(**_full(), key_padding_mask=torch.zeros(2, 5)), TypeError,
     "key_padding_mask"),
    ("mask shape", lambda: seqkern.additive_attention(**_full(), key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)),
     ValueError, "key_padding_mask"),
    ("query_proj 1-D", lambda: seqkern.additive_attention_projected(**_projected(query_proj=torch.randn(8))),
     ValueError, "query_proj"),
    ("key_proj hidden", lambda: seqkern.additive_attention_projected(**_projected(key_proj=torch.randn(2, 5, 9))),
     ValueError, "key_proj"),
    ("projected v", lambda: seqkern.additive_attention_projected(**_projected(v=torch.randn(8, 1))), ValueError, "v"),
]


@pytest.mark.parametrize("name, call, error, words", BAD, ids=[c[0] for c in BAD])
def test_bad_input_gets_a_clear_error(name, call, error, words):
    with pytest.raises(error, match=words):
        call()


OP_BAD = [
    ("key_proj", dict(key_proj=torch.randn(2, 5, 9)), "key_proj must have shape"),
    ("values", dict(values=torch.randn(2, 4, 7)), "values must have shape"),
    ("v", dict(v=torch.randn(9)), "v must have shape"),
    ("query_proj dtype", dict(query_proj=torch.randn(2, 3, 8).half()), "query_proj must be float32"),
    ("key_proj stride", dict(key_proj=torch.randn(2, 8, 5).transpose(1, 2)), "key_proj must have stride"),
    ("mask", dict(key_padding_mask=torch.zeros(2, 5)), "key_padding_mask must be a bool"),
]


@pytest.mark.parametrize("name, changes, words", OP_BAD, ids=[c[0] for c in OP_BAD])
def test_op_bad_input_gets_a_clear_error(name, changes, words):
    """A direct call of the C++ op checks its arguments too (it must never read out of bounds)."""
    args = dict(_projected(), key_padding_mask=None, return_weights=False)
    args.update(changes)
    with seqkern.backend("cpu"), pytest.raises(RuntimeError, match=words):
        torch.ops.seqkern.additive_attention_forward(*args.values())


BACKWARD_OP_BAD = [
    ("grad_out", dict(grad_out=torch.randn(2, 3, 6)), "grad_out must have shape"),
    ("weights dtype", dict(weights=torch.rand(2, 3, 5, dtype=torch.float64)), "weights must have dtype"),
    ("weights layout", dict(weights=torch.rand(2, 3, 10)[..., :5]), "weights must be contiguous"),
    ("grad_weights", dict(grad_weights=torch.rand(2, 3, 4)), "grad_weights must have shape"),
    ("out", dict(out=torch.randn(2, 3, 7).bfloat16()), "out must have dtype"),
]


@pytest.mark.parametrize("name, changes, words", BACKWARD_OP_BAD, ids=[c[0] for c in BACKWARD_OP_BAD])
def test_backward_op_bad_input_gets_a_clear_error(name, changes, words):
    projected = _projected()
    args = dict(grad_out=torch.randn(2, 3, 7), grad_weights=None, **projected, out=torch.randn(2, 3, 7),
                weights=torch.rand(2, 3, 5))
    args.update(changes)
    with seqkern.backend("cpu"), pytest.raises(RuntimeError, match=words):
        torch.ops.seqkern.additive_attention_backward(*args.values())
