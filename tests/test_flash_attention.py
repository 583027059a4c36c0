"""seqkern.attention / attention_varlen and the flash_attention_forward/_backward ops: every implementation
(C++, Triton under the interpreter) under the correctness rule against the float64 reference and SDPA in the
same dtype, for the output and dq, dk, dv and the mask's gradient; dropout, fully masked rows, varlen, opcheck,
gradcheck, torch.compile and bad input."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import seqkern
from seqkern.reference.flash_attention import visible
from helpers import assert_all_rule, assert_rule, case_id

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
CPU_DTYPES = DTYPES + [torch.float16]  # float16: the C++ kernels; Triton's float16 is for GPUs, not checked here


# ------------------------------------------------------------------------------------------------------------
# Cases: sizes and options of one attention call.
# ------------------------------------------------------------------------------------------------------------
def _case(len_q, len_k=None, dim=64, *, batch=2, heads=3, kv_heads=None, dim_v=None, causal=False,
          alignment="top_left", window=None, mask=None, unbatched=False):
    return dict(batch=batch, heads=heads, kv_heads=kv_heads or heads, len_q=len_q,
                len_k=len_q if len_k is None else len_k, dim=dim, dim_v=dim_v or dim, causal=causal,
                alignment=alignment, window=window, mask=mask, unbatched=unbatched)


CASES = [
    _case(1),
    _case(97, dim=40, causal=True),
    _case(200, 131, dim=80, kv_heads=1, dim_v=24, mask="bool"),
    _case(131, 200, dim=16, causal=True, alignment="bottom_right", mask="float_grad"),
    _case(1025, dim=64, batch=1, heads=2, causal=True),
    _case(300, dim=128, heads=4, kv_heads=2, window=(37, 5)),
    _case(63, 127, dim=256, batch=1, heads=2, window=(20, -1), alignment="bottom_right", mask="float"),
    _case(33, 45, dim=512, batch=1, heads=1, causal=True, alignment="bottom_right"),
    _case(9, 500, dim=1024, batch=1, heads=2, kv_heads=1, dim_v=40),
    _case(17, dim=40, heads=2, unbatched=True, mask="bool"),
    _case(45, 60, dim=32, heads=4, kv_heads=2, causal=True),  # one tile per sequence, grouped heads
    # one key tile, three query tiles, a two-sided window: the key-major forward's row groups and their key ranges
    _case(300, 100, dim=24, heads=4, kv_heads=2, dim_v=40, window=(50, 10)),
    # masks the same for every query (the key-major forward adds them by key): padding over two key tiles, causal;
    # a float one with its gradient, grouped heads
    _case(150, 150, dim=32, heads=2, causal=True, mask="key_bool"),
    _case(40, 70, dim=24, heads=3, kv_heads=1, mask="key_float_grad"),
]
TRITON_CASES = [
    _case(1, dim=16, heads=2),
    _case(33, 17, dim=40, kv_heads=1, dim_v=24, mask="float_grad"),
    _case(17, 33, dim=16, heads=2, causal=True, alignment="bottom_right", mask="bool"),
    _case(97, dim=64, batch=1, heads=2, window=(9, 3)),
    _case(5, 9, dim=512, batch=1, heads=1, causal=True),
]


def _inputs(case: dict, seed: int = 0) -> dict:
    """float64 q, k, v (and mask) of the case, drawn from a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    lead = () if case["unbatched"] else (case["batch"],)
    q = torch.randn(*lead, case["heads"], case["len_q"], case["dim"], generator=gen, dtype=torch.float64)
    k = torch.randn(*lead, case["kv_heads"], case["len_k"], case["dim"], generator=gen, dtype=torch.float64)
    v = torch.randn(*lead, case["kv_heads"], case["len_k"], case["dim_v"], generator=gen, dtype=torch.float64)
    inputs = dict(query=q, key=k, value=v)
    if case["mask"] == "bool":  # broadcast over heads; every query keeps its diagonal key so no row is empty
        keep = torch.rand(*lead[:1], 1, case["len_q"], case["len_k"], generator=gen) > 0.3
        keep[..., torch.arange(case["len_q"]), torch.arange(case["len_q"]) % case["len_k"]] = True
        inputs["attn_mask"] = keep
    elif case["mask"] in ("float", "float_grad"):
        inputs["attn_mask"] = torch.randn(case["heads"], case["len_q"], case["len_k"], generator=gen,
                                          dtype=torch.float64)
    elif case["mask"] == "key_bool":  # a key-padding mask: one row per batch entry, for every head and query
        keep = torch.rand(*lead[:1], 1, 1, case["len_k"], generator=gen) > 0.3
        keep[..., 0] = True
        inputs["attn_mask"] = keep
    elif case["mask"] == "key_float_grad":  # one row per batch entry and head, for every query
        inputs["attn_mask"] = torch.randn(*lead[:1], case["heads"], 1, case["len_k"], generator=gen,
                                          dtype=torch.float64)
    return inputs


def _options(case: dict) -> dict:
    return dict(is_causal=case["causal"], enable_gqa=case["kv_heads"] != case["heads"])


def _seqkern_options(case: dict) -> dict:
    return dict(**_options(case), window_size=case["window"], causal_alignment=case["alignment"])


def _visibility_mask(case: dict) -> torch.Tensor | None:
    """The bool (Lq, Lk) mask that gives SDPA our causal alignment and window, or None if SDPA's own does."""
    if case["window"] is None and (not case["causal"] or case["alignment"] == "top_left"):
        return None
    left, right = case["window"] or (-1, -1)
    return visible(case["len_q"], case["len_k"], left, 0 if case["causal"] else right,
                   case["alignment"] == "bottom_right")


def _sdpa(case: dict, query, key, value, attn_mask=None):
    """SDPA with the case's semantics spelled out as an explicit mask where SDPA lacks the option."""
    seen = _visibility_mask(case)
    options = _options(case)
    if seen is not None:
        options["is_causal"] = False
        extra = torch.zeros(seen.shape, dtype=query.dtype).masked_fill(~seen, float("-inf"))
        if attn_mask is None:
            attn_mask = extra
        elif attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype).masked_fill(~attn_mask, float("-inf")) + extra
        else:
            attn_mask = attn_mask + extra
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, **options)


def _run(fn, inputs: dict, dtype, case: dict, cotangent) -> dict:
    """Output of fn(**inputs cast to dtype) and the gradients of q, k, v (and a float mask that asks)."""
    args = {}
    for name, t in inputs.items():
        t = t.detach().to(dtype) if t.is_floating_point() else t
        if name != "attn_mask" or case["mask"] in ("float_grad", "key_float_grad"):
            t.requires_grad_()
        args[name] = t
    out = fn(**args)
    grads = torch.autograd.grad((out.double() * cotangent).sum(), [t for t in args.values() if t.requires_grad])
    names = [n for n, t in args.items() if t.requires_grad]
    return {"out": out, **{f"grad_{n}": g for n, g in zip(names, grads)}}


def check_attention(case: dict, dtype, backend: str) -> None:
    inputs = _inputs(case)
    cotangent = torch.randn(
        *inputs["query"].shape[:-1], case["dim_v"], generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )

    def ours(**args):
        return seqkern.attention(**args, **_seqkern_options(case))

    with seqkern.backend("reference"):
        expected = _run(ours, inputs, torch.float64, case, cotangent)
    baseline = _run(lambda **a: _sdpa(case, **a), inputs, dtype, case, cotangent)
    with seqkern.backend(backend):
        got = _run(ours, inputs, dtype, case, cotangent)
    assert_all_rule(got, baseline, expected)


# ------------------------------------------------------------------------------------------------------------
# The rule, per implementation.
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cpu_kernel_against_sdpa_and_reference(case, dtype):
    check_attention(case, dtype, "cpu")


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", TRITON_CASES, ids=case_id)
def test_triton_kernel_against_sdpa_and_reference(case, dtype):
    check_attention(case, dtype, "triton")


BACKENDS = ["cpu", pytest.param("triton", marks=pytest.mark.triton)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    case = _case(7, 5, dim=4, batch=1, heads=2, kv_heads=1, dim_v=3, causal=True, alignment="bottom_right",
                 mask="float_grad")
    inputs = {n: t.requires_grad_() for n, t in _inputs(case).items()}  # the float mask too: its gradient is checked
    # Under the Triton interpreter the full check takes 39 s (two forward calls per input element, one backward per
    # output element); fast mode's random projections u^T J v take 1.2 s and miss a wrong Jacobian entry with
    # probability 0. The C++ kernels keep the full check.
    with seqkern.backend(backend):
        assert torch.autograd.gradcheck(
            lambda q, k, v, m: seqkern.attention(q, k, v, m, **_seqkern_options(case)), tuple(inputs.values()),
            fast_mode=backend == "triton",
        )


# ------------------------------------------------------------------------------------------------------------
# Rows that see no key, lse, scale, empty inputs.
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["bool_mask", "float_mask", "bottom_right", "window"])
def test_rows_without_keys_give_zero_and_finite_gradients(backend, how):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, 16, generator=gen, requires_grad=True) for n in (9, 6, 6))
    options, mask = {}, None
    if how == "bool_mask":
        mask = torch.ones(9, 6, dtype=torch.bool)
        mask[[0, 4]] = False
    elif how == "float_mask":
        mask = torch.zeros(9, 6)
        mask[[0, 4]] = float("-inf")
    elif how == "bottom_right":  # Lq > Lk: the first Lq - Lk queries come before every key
        options = dict(is_causal=True, causal_alignment="bottom_right")
    else:  # a window of width 0 to the left and right of a diagonal that leaves the keys
        options = dict(window_size=(0, 0), causal_alignment="bottom_right")
    with seqkern.backend(backend):
        out, lse = seqkern.attention(q, k, v, mask, return_lse=True, **options)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
    with seqkern.backend("reference"):
        ref_out, ref_lse = seqkern.attention(q, k, v, mask, return_lse=True, **options)
        ref_grads = torch.autograd.grad(ref_out.sum(), (q, k, v))
    dead = torch.isinf(ref_lse)
    assert dead.any()
    assert torch.equal(torch.isinf(lse), dead)
    assert (out[dead] == 0).all()
    assert all(torch.isfinite(g).all() for g in (out, *grads))
    assert (grads[0][dead] == 0).all()
    for got, want in zip((out, lse.masked_fill(dead, 0), *grads), (ref_out, ref_lse.masked_fill(dead, 0), *ref_grads)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_deterministic(backend):
    """Run to run, bit for bit: no atomics, and per-thread partial sums added in a fixed order."""
    gen = torch.Generator().manual_seed(9)
    length = 300 if backend == "cpu" else 70
    q, k, v = (torch.randn(1, 4, length, 32, generator=gen, requires_grad=True) for _ in range(3))
    with seqkern.backend(backend):
        runs = [torch.autograd.grad(seqkern.attention(q, k, v, is_causal=True).sum(), (q, k, v)) for _ in range(3)]
    for run in runs[1:]:
        for got, first in zip(run, runs[0]):
            assert torch.equal(got, first)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_and_scale(backend):
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, n, 24, generator=gen, dtype=torch.float64) for n in (11, 13, 13))
    with seqkern.backend(backend):
        out, lse = seqkern.attention(q, k, v, scale=0.37, return_lse=True)
    assert lse.dtype == torch.float64 and lse.shape == (2, 3, 11)
    torch.testing.assert_close(lse, torch.logsumexp(0.37 * q @ k.transpose(-1, -2), dim=-1))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.37))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 2, 5, 5), (1, 2, 0, 5), (1, 2, 5, 0)], ids=str)
def test_empty_inputs(backend, shape):
    batch, heads, len_q, len_k = shape
    q = torch.randn(batch, heads, len_q, 8, requires_grad=True)
    k = torch.randn(batch, heads, len_k, 8, requires_grad=True)
    v = torch.randn(batch, heads, len_k, 4, requires_grad=True)
    with seqkern.backend(backend):
        out = seqkern.attention(q, k, v)
        out.sum().backward()
    assert out.shape == (batch, heads, len_q, 4)
    assert (out == 0).all() and (k.grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [16, 12])
@pytest.mark.parametrize("len_q, len_k", [(10, 12), (140, 131)])
def test_strided_inputs_are_read_in_place(dtype, dim, len_q, len_k):
    """(B, L, H, D) projections passed as .transpose(1, 2) views, as MultiheadAttention does, and a strided output
    gradient: the kernels read K, V, Q and dO rows where they lie (D a multiple of the lanes) or copy them (D 12),
    over one key tile or two; outputs and every gradient as SDPA's."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, n, 3, dim, generator=gen, dtype=dtype).transpose(1, 2).requires_grad_()
               for n in (len_q, len_k, len_k))
    cotangent = torch.randn(2, len_q, 3, dim, generator=gen, dtype=dtype).transpose(1, 2)
    out = seqkern.attention(q, k, v, is_causal=True)
    grads = torch.autograd.grad(out, (q, k, v), cotangent)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    want_grads = torch.autograd.grad(want, (q, k, v), cotangent)
    torch.testing.assert_close(out, want)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected)


# ------------------------------------------------------------------------------------------------------------
# Dropout.
# ------------------------------------------------------------------------------------------------------------
def _dropout_probe(dropout_p: float, seed: int, backend: str, len_k: int = 256):
    """With equal scores every probability is 1/Lk and value = identity: out[i, j] = keep(i, j) / ((1-p) Lk)."""
    q = torch.zeros(2, 2, 256, 8, requires_grad=True)
    k = torch.zeros(2, 2, len_k, 8)
    v = torch.eye(len_k).expand(2, 2, len_k, len_k).clone().requires_grad_()
    torch.manual_seed(seed)
    with seqkern.backend(backend):
        out = seqkern.attention(q, k, v, dropout_p=dropout_p)
        out.backward(torch.ones_like(out))
    return out, v.grad


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
def test_dropout_keeps_one_minus_p_and_backward_uses_the_same_mask(backend, dropout_p):
    len_k = 256 if backend == "cpu" else 64
    out, grad_v = _dropout_probe(dropout_p, 11, backend, len_k)
    kept = out > 0
    assert abs(kept.double().mean().item() - (1 - dropout_p)) < 0.01
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / ((1 - dropout_p) * len_k)))
    # d out / d v[j] under a cotangent of ones: sum over queries of the kept, scaled probabilities.
    torch.testing.assert_close(grad_v[..., 0], out.sum(dim=2))
    ref_out, ref_grad_v = _dropout_probe(dropout_p, 11, "reference", len_k)
    assert torch.equal(kept, ref_out > 0)
    torch.testing.assert_close(grad_v, ref_grad_v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_is_reproducible_from_the_generator_and_matches_the_reference(backend):
    case = _case(37, 29, dim=16, batch=2, heads=2, kv_heads=1, causal=True, mask="float_grad")
    inputs = _inputs(case)
    cotangent = torch.randn(2, 2, 37, 16, dtype=torch.float64)

    def ours(**args):
        torch.manual_seed(123)
        return seqkern.attention(**args, dropout_p=0.3, **_seqkern_options(case))

    with seqkern.backend(backend):
        first = _run(ours, inputs, torch.float32, case, cotangent)
        second = _run(ours, inputs, torch.float32, case, cotangent)
    with seqkern.backend("reference"):
        expected = _run(ours, inputs, torch.float64, case, cotangent)
        baseline = _run(ours, inputs, torch.float32, case, cotangent)
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert_all_rule(first, baseline, expected)
    torch.manual_seed(124)
    other = seqkern.attention(inputs["query"].float(), inputs["key"].float(), inputs["value"].float(), dropout_p=0.3,
                              enable_gqa=True)
    assert not torch.equal(other, first["out"].detach())


# ------------------------------------------------------------------------------------------------------------
# Variable-length batches.
# ------------------------------------------------------------------------------------------------------------
def _varlen_inputs(lengths_q, lengths_k, heads, kv_heads, dim, dim_v, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lengths_q), heads, dim, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    k = torch.randn(sum(lengths_k), kv_heads, dim, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    v = torch.randn(sum(lengths_k), kv_heads, dim_v, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()

    def offsets(lengths):
        return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)

    return q, k, v, offsets(lengths_q), offsets(lengths_k)


VARLEN_CASES = [
    dict(lengths_q=[5, 1, 17, 0, 9], lengths_k=[5, 3, 17, 4, 0], causal=False, alignment="top_left", window=None),
    dict(lengths_q=[7, 30, 2], lengths_k=[9, 30, 11], causal=True, alignment="bottom_right", window=None),
    dict(lengths_q=[40, 13], lengths_k=[40, 13], causal=False, alignment="top_left", window=(6, 2)),
]


# kv_heads 4 (one query head per kv head) and 2 (groups of two): the CPU kernels pack each item's tiles inside the
# item where every sequence is one tile (the forward only without groups), and a sequence may have no keys there.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv_heads", [2, 4])
@pytest.mark.parametrize("case", VARLEN_CASES, ids=case_id)
def test_varlen_matches_a_loop_over_sequences(backend, case, kv_heads):
    q, k, v, cu_q, cu_k = _varlen_inputs(case["lengths_q"], case["lengths_k"], 4, kv_heads, 16, 8, torch.float32)
    options = dict(is_causal=case["causal"], enable_gqa=True, window_size=case["window"],
                   causal_alignment=case["alignment"])
    with seqkern.backend(backend):
        out, lse = seqkern.attention_varlen(q, k, v, cu_q, cu_k, max(case["lengths_q"]), max(case["lengths_k"]),
                                            return_lse=True, **options)
        cotangent = torch.randn_like(out)
        grads = torch.autograd.grad((out * cotangent).sum(), (q, k, v))
    assert out.shape == (q.shape[0], 4, 8) and lse.shape == (4, q.shape[0])
    want_out, want_grads = [], [torch.zeros_like(t) for t in (q, k, v)]
    for n in range(len(case["lengths_q"])):
        rows, keys = slice(cu_q[n], cu_q[n + 1]), slice(cu_k[n], cu_k[n + 1])
        one = [t.detach()[s].transpose(0, 1).requires_grad_() for t, s in ((q, rows), (k, keys), (v, keys))]
        with seqkern.backend("reference"):
            o = seqkern.attention(*one, **options)
        g = torch.autograd.grad((o * cotangent[rows].transpose(0, 1)).sum(), one)
        want_out.append(o.transpose(0, 1).detach())
        for acc, s, gi in zip(want_grads, (rows, keys, keys), g):
            acc[s] = gi.transpose(0, 1)
    torch.testing.assert_close(out, torch.cat(want_out), atol=2e-5, rtol=1e-4)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------------
# opcheck and torch.compile.
# ------------------------------------------------------------------------------------------------------------
def _op_args(mask: bool, varlen: bool, dropout: bool):
    gen = torch.Generator().manual_seed(6)
    if varlen:
        q, k, v = (torch.randn(1, 2, n, 8, generator=gen, requires_grad=True) for n in (12, 15, 15))
        cu = (torch.tensor([0, 5, 12], dtype=torch.int32), torch.tensor([0, 9, 15], dtype=torch.int32))
        lengths = (7, 9)
    else:
        q, k, v = (torch.randn(2, h, n, 8, generator=gen, requires_grad=True) for h, n in ((4, 6), (2, 7), (2, 7)))
        cu, lengths = (None, None), (0, 0)
    attn_mask = torch.randn(1, q.shape[1], q.shape[2], k.shape[2], generator=gen, requires_grad=True) if mask else None
    if attn_mask is not None:
        attn_mask = attn_mask.expand(q.shape[0], -1, -1, -1)
    seed = torch.tensor(99) if dropout else None
    return (q, k, v, attn_mask, *cu, *lengths, 0.35, -1, 0, True, 0.25 if dropout else 0.0, seed)


@pytest.mark.parametrize("options", [dict(mask=True, varlen=False, dropout=False),
                                     dict(mask=False, varlen=True, dropout=True),
                                     dict(mask=False, varlen=False, dropout=True)], ids=case_id)
def test_opcheck_forward_and_backward(options):
    args = _op_args(**options)
    torch.library.opcheck(torch.ops.seqkern.flash_attention_forward.default, args)
    out, lse = torch.ops.seqkern.flash_attention_forward(*args)
    grad_args = (torch.randn_like(out), *args[:3], out.detach(), lse, *args[3:], options["mask"])
    torch.library.opcheck(torch.ops.seqkern.flash_attention_backward.default,
                          tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in grad_args))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, 4, n, 16, generator=gen, requires_grad=True) for n in (9, 11, 11))
    mask = torch.randn(9, 11, generator=gen, requires_grad=True)

    def fn(q, k, v, mask):
        return seqkern.attention(q, k, v, mask, is_causal=False, window_size=(4, -1), causal_alignment="bottom_right")

    compiled = torch.compile(fn, fullgraph=True)
    got = compiled(q, k, v, mask)
    want = fn(q, k, v, mask)
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got.sum(), (q, k, v, mask)), torch.autograd.grad(want.sum(), (q, k, v, mask))):
        torch.testing.assert_close(g, w)


# ------------------------------------------------------------------------------------------------------------
# Bad input: a clear error before any kernel runs.
# ------------------------------------------------------------------------------------------------------------
def _qkv(heads=4, kv_heads=4, dim=8, dim_v=8, len_q=5, len_k=6, dtype=torch.float32):
    return (torch.randn(2, heads, len_q, dim, dtype=dtype), torch.randn(2, kv_heads, len_k, dim, dtype=dtype),
            torch.randn(2, kv_heads, len_k, dim_v, dtype=dtype))


BAD_ATTENTION = [
    ("heads without enable_gqa", lambda: seqkern.attention(*_qkv(kv_heads=2)), ValueError, "enable_gqa"),
    ("heads not a multiple", lambda: seqkern.attention(*_qkv(kv_heads=3), enable_gqa=True), ValueError, "multiple"),
    ("head dims", lambda: seqkern.attention(_qkv()[0], *_qkv(dim=6)[1:]), ValueError, "head dim 8"),
    ("value length", lambda: seqkern.attention(*_qkv()[:2], _qkv(len_k=7)[2]), ValueError, "value"),
    ("dtypes", lambda: seqkern.attention(_qkv()[0], *_qkv(dtype=torch.float64)[1:]), TypeError, "dtype"),
    ("devices", lambda: seqkern.attention(_qkv()[0], *(t.to("meta") for t in _qkv()[1:])), TypeError, "meta"),
    ("integer query", lambda: seqkern.attention(*(t.long() for t in _qkv())), TypeError, "floating"),
    ("1-D query", lambda: seqkern.attention(_qkv()[0][0, 0, 0], *_qkv()[1:]), ValueError, "at least 2 dims"),
    ("mask shape", lambda: seqkern.attention(*_qkv(), attn_mask=torch.ones(5, 5, dtype=torch.bool)), ValueError,
     "broadcastable"),
    ("mask dtype", lambda: seqkern.attention(*_qkv(), attn_mask=torch.ones(5, 6, dtype=torch.float64)), TypeError,
     "attn_mask"),
    ("mask device", lambda: seqkern.attention(*_qkv(), attn_mask=torch.ones(5, 6, device="meta")), TypeError,
     "attn_mask"),
    ("dropout_p", lambda: seqkern.attention(*_qkv(), dropout_p=1.0), ValueError, "dropout_p"),
    ("window", lambda: seqkern.attention(*_qkv(), window_size=3), ValueError, "window_size"),
    ("alignment", lambda: seqkern.attention(*_qkv(), causal_alignment="left"), ValueError, "causal_alignment"),
]


def _varlen_call(cu_q, cu_k, max_q=9, max_k=9):
    q, k, v, _, _ = _varlen_inputs([4, 5], [4, 5], 2, 2, 8, 8, torch.float32)
    return lambda: seqkern.attention_varlen(q, k, v, torch.tensor(cu_q, dtype=torch.int32),
                                            torch.tensor(cu_k, dtype=torch.int32), max_q, max_k)


BAD_VARLEN = [
    ("not increasing", _varlen_call([0, 6, 4, 9], [0, 3, 4, 9]), ValueError, "non-decreasing"),
    ("does not start at 0", _varlen_call([1, 9], [0, 9]), ValueError, "starting at 0"),
    ("total mismatch", _varlen_call([0, 4, 8], [0, 4, 9]), ValueError, "packed length 9"),
    ("count mismatch", _varlen_call([0, 4, 9], [0, 9]), ValueError, "offsets"),
    ("max_seqlen too small", _varlen_call([0, 4, 9], [0, 4, 9], max_q=3), ValueError, "max_seqlen_q"),
]


@pytest.mark.parametrize("name, call, error, words", BAD_ATTENTION + BAD_VARLEN, ids=[c[0] for c in BAD_ATTENTION + BAD_VARLEN])
def test_bad_input_gets_a_clear_error(name, call, error, words):
    with pytest.raises(error, match=words):
        call()


# ------------------------------------------------------------------------------------------------------------
# Random cases across the C++ kernel's tile edges (128 queries x 128 keys), in float64 against the reference.
# ------------------------------------------------------------------------------------------------------------
@st.composite
def _random_case(draw):
    kv_heads = draw(st.sampled_from([1, 2]))
    window = draw(st.sampled_from([None, (0, 0), (5, -1), (-1, 3), (130, 2)]))
    return _case(draw(st.integers(1, 300)), draw(st.integers(1, 300)), draw(st.sampled_from([1, 8, 17, 64])),
                 batch=draw(st.integers(1, 2)), heads=kv_heads * draw(st.sampled_from([1, 3])), kv_heads=kv_heads,
                 dim_v=draw(st.sampled_from([None, 5, 33])), causal=draw(st.booleans()),
                 alignment=draw(st.sampled_from(["top_left", "bottom_right"])), window=window,
                 mask=draw(st.sampled_from([None, "bool", "float_grad", "key_bool"])))


@settings(max_examples=60, deadline=None)
@given(case=_random_case())
def test_random_cases_in_float64_match_the_reference(case):
    inputs = _inputs(case)
    cotangent = torch.randn(*inputs["query"].shape[:-1], case["dim_v"], dtype=torch.float64)

    def ours(**args):
        return seqkern.attention(**args, **_seqkern_options(case))

    with seqkern.backend("reference"):
        expected = _run(ours, inputs, torch.float64, case, cotangent)
    with seqkern.backend("cpu"):
        got = _run(ours, inputs, torch.float64, case, cotangent)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-10, rtol=1e-9, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------------------------------------
# bfloat16 on each of the CPU's bf16 units (csrc/cpu/tile_gemm_bf16.h), forced through SEQKERN_BF16_GEMM: AMX
# and AVX512-BF16 where this CPU has them (a path the CPU lacks falls back to the next one down), and the fp32
# fallback that CPUs without bf16 units run.
# ------------------------------------------------------------------------------------------------------------
BF16_PATHS = ["amx", "avx512bf16", "fp32"]


@pytest.mark.parametrize("path", BF16_PATHS[1:])  # the default (best) path runs in test_cpu_kernel_against_sdpa...
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bf16_units_against_sdpa_and_reference(case, path, monkeypatch):
    monkeypatch.setenv("SEQKERN_BF16_GEMM", path)
    check_attention(case, torch.bfloat16, "cpu")


@pytest.mark.parametrize("path", BF16_PATHS)
def test_bf16_units_with_dropout_against_the_reference(path, monkeypatch):
    """The bf16 forward's fused softmax pass drops probabilities after taking their row sum (as the fp32 path), and
    the backward's products on the same unit read the dropped P^T and dS^T rounded to bf16: output and gradients
    against the float64 reference with the same mask, within the rule of the reference run in bf16."""
    monkeypatch.setenv("SEQKERN_BF16_GEMM", path)
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, n, 40, generator=gen, dtype=torch.float64) for n in (150, 150, 150))
    cotangent = torch.randn(1, 2, 150, 40, generator=gen, dtype=torch.float64)

    def run(dtype, backend):
        torch.manual_seed(3)
        inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        with seqkern.backend(backend):
            out = seqkern.attention(*inputs, is_causal=True, dropout_p=0.3)
        return {"out": out, **dict(zip(("grad_q", "grad_k", "grad_v"),
                                       torch.autograd.grad(out, inputs, cotangent.to(dtype))))}

    assert_all_rule(run(torch.bfloat16, "cpu"), run(torch.bfloat16, "reference"), run(torch.float64, "reference"))


@pytest.mark.parametrize("path", BF16_PATHS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_scores_rising_from_key_tile_to_key_tile(dtype, path, monkeypatch):
    """The online softmax keeps a row's running maximum while a key tile's scores rise less than kMaxRiseKept (8)
    above it and rescales past that: head 0's tile maxima rise by ~2-3 per 128-key tile, head 1's by ~10-12,
    over 5 tiles (odd sizes, a partial last tile). Output and log-sum-exp within the rule of SDPA's (and the
    formula's) error in the same dtype, against float64."""
    monkeypatch.setenv("SEQKERN_BF16_GEMM", path)
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(1, 2, 131, 40, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 2, 600, 40, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 2, 600, 40, generator=gen, dtype=torch.float64)
    tile = (torch.arange(600, dtype=torch.float64) // 128 + 1)[:, None]
    k = k * tile * torch.tensor([1.0, 4.5], dtype=torch.float64)[None, :, None, None]

    def lse(q, k):
        return torch.logsumexp((q @ k.transpose(-1, -2)).double() * q.shape[-1] ** -0.5, dim=-1)

    low = [t.to(dtype) for t in (q, k, v)]
    out, ours_lse = seqkern.attention(*low, return_lse=True)
    assert_rule(f"out {path}", out, F.scaled_dot_product_attention(*low), F.scaled_dot_product_attention(q, k, v))
    assert_rule(f"lse {path}", ours_lse, lse(low[0], low[1]).to(ours_lse.dtype), lse(q, k))


def _outputs_and_gradients(attention, tensors, cotangent, dtype, **options):
    """{"out", "grad_q", "grad_k", "grad_v"} of attention(q, k, v, **options) on `tensors` (q, k, v) cast to dtype."""
    inputs = [t.to(dtype).requires_grad_() for t in tensors]
    out = attention(*inputs, **options)
    return {"out": out, **dict(zip(("grad_q", "grad_k", "grad_v"),
                                   torch.autograd.grad(out, inputs, cotangent.to(dtype))))}


@pytest.mark.parametrize("path", BF16_PATHS)
def test_bf16_units_on_saturated_scores_against_sdpa(path, monkeypatch):
    """Scores in the hundreds (one key takes nearly all the weight of a row), odd sizes, causal: output and
    gradients within the rule of SDPA's own bf16 error, against SDPA in float64."""
    monkeypatch.setenv("SEQKERN_BF16_GEMM", path)
    gen = torch.Generator().manual_seed(5)
    qkv = [torch.randn(2, 3, n, 72, generator=gen, dtype=torch.float64) * s
           for n, s in ((257, 4.0), (257, 4.0), (257, 1.0))]
    cotangent = torch.randn(2, 3, 257, 72, generator=gen, dtype=torch.float64)

    def run(attention, dtype):
        return _outputs_and_gradients(attention, qkv, cotangent, dtype, is_causal=True)

    assert_all_rule(run(seqkern.attention, torch.bfloat16), run(F.scaled_dot_product_attention, torch.bfloat16),
                    run(F.scaled_dot_product_attention, torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_one_hot_rows_over_several_key_tiles_have_zero_grad_q(dtype, causal):
    """Over several key tiles the fp32 / fp64 backward takes delta = dO . O (output_delta) rather than a first pass.
    On a row whose softmax is exactly one-hot (query i is 60 k_i: its own key scores ~500, the others at least 119
    below it, their exp exactly 0) dS = P (dP - delta) must be exactly 0, so that grad_q is exactly 0, which it is only
    because delta repeats the dP^T tile product's arithmetic (summed in another order it was off by an ulp of dP).
    257 keys: two key tiles, the second partial. Output and gradients also within the rule against float64 (in
    float64 too, whose delta is the same dot product)."""
    gen = torch.Generator().manual_seed(5)
    k = torch.randn(2, 3, 257, 72, generator=gen, dtype=torch.float64)
    qkv = [60 * k, k, torch.randn(2, 3, 257, 72, generator=gen, dtype=torch.float64)]
    cotangent = torch.randn(2, 3, 257, 72, generator=gen, dtype=torch.float64)

    def run(attention, dtype):
        return _outputs_and_gradients(attention, qkv, cotangent, dtype, is_causal=causal)

    got = run(seqkern.attention, dtype)
    if dtype == torch.float32:  # in float64 the other keys' weights, e^-119 and below, are not 0
        assert torch.count_nonzero(got["grad_q"]) == 0
    if dtype == torch.float64:  # SDPA in float64 is the oracle itself: the float64 reference is the baseline
        with seqkern.backend("reference"):
            baseline = run(seqkern.attention, dtype)
    else:
        baseline = run(F.scaled_dot_product_attention, dtype)
    assert_all_rule(got, baseline, run(F.scaled_dot_product_attention, torch.float64))


@pytest.mark.parametrize("path", BF16_PATHS)
def test_bf16_units_varlen_against_the_reference(path, monkeypatch):
    """Packed sequences of unequal lengths (query and key tiles of several sequences, short last tiles, an empty
    one), GQA, causal bottom-right with a left window, on each bf16 unit: output and gradients against the
    float64 reference, within the rule of the reference run in bf16."""
    monkeypatch.setenv("SEQKERN_BF16_GEMM", path)
    lengths_q, lengths_k = [300, 45, 0, 130], [300, 260, 7, 200]
    q, k, v, cu_q, cu_k = _varlen_inputs(lengths_q, lengths_k, 4, 2, 40, 24, torch.float64, seed=8)
    cotangent = torch.randn(q.shape[0], 4, 24, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def run(dtype, backend):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        with seqkern.backend(backend):
            out = seqkern.attention_varlen(*inputs, cu_q, cu_k, max(lengths_q), max(lengths_k), is_causal=True,
                                           causal_alignment="bottom_right", window_size=(90, -1), enable_gqa=True)
        return {"out": out, **dict(zip(("grad_q", "grad_k", "grad_v"),
                                       torch.autograd.grad(out, inputs, cotangent.to(dtype))))}

    assert_all_rule(run(torch.bfloat16, "cpu"), run(torch.bfloat16, "reference"), run(torch.float64, "reference"))


@pytest.mark.parametrize("path", BF16_PATHS)
def test_bf16_backward_is_deterministic(path, monkeypatch):
    """The bf16 backward on each unit, bit for bit: run to run at 1 and at 2 threads (its key tiles are dealt in a
    fixed pattern and the workers' dQ^T sums added in worker order), and dK, dV at any thread count (a key tile's
    rows are summed by the one item that owns them, over the query tiles in order). Odd sizes, GQA, causal."""
    monkeypatch.setenv("SEQKERN_BF16_GEMM", path)
    gen = torch.Generator().manual_seed(12)
    q = torch.randn(1, 4, 301, 40, generator=gen).bfloat16().requires_grad_()
    k, v = (torch.randn(1, 2, 333, 40, generator=gen).bfloat16().requires_grad_() for _ in range(2))
    threads = torch.get_num_threads()
    runs = {}
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            for _ in range(2):
                out = seqkern.attention(q, k, v, is_causal=True, causal_alignment="bottom_right", enable_gqa=True)
                runs.setdefault(count, []).append(torch.autograd.grad(out.float().square().sum(), (q, k, v)))
    finally:
        torch.set_num_threads(threads)
    for count, (first, again) in runs.items():
        for name, got, want in zip("qkv", again, first):
            assert torch.equal(got, want), f"grad_{name} at {count} threads"
        for name, got, want in zip("kv", first[1:], runs[1][0][1:]):
            assert torch.equal(got, want), f"grad_{name} at {count} threads against 1"


# ------------------------------------------------------------------------------------------------------------
# Thread counts.
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, path", [(torch.float32, "fp32")] + [(torch.bfloat16, path) for path in BF16_PATHS],
                         ids=str)
def test_forward_is_the_same_at_any_thread_count(dtype, path, monkeypatch):
    """The forward deals its query tiles to the workers that packed their keys (each worker's own tiles first,
    then the others'), and each tile is computed from scratch: out and lse are bit-identical at 1, 2, 3 and 4
    threads. Varlen sequences of unequal length (tiles of unequal cost and a short last key tile), GQA, causal."""
    monkeypatch.setenv("SEQKERN_BF16_GEMM", path)
    q, k, v, cu_q, cu_k = _varlen_inputs([300, 45, 520], [300, 260, 700], 6, 2, 72, 40, dtype, seed=4)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3, 4):
            torch.set_num_threads(count)
            with torch.no_grad():
                results.append(seqkern.attention_varlen(q, k, v, cu_q, cu_k, 520, 700, is_causal=True,
                                                        causal_alignment="bottom_right", enable_gqa=True,
                                                        return_lse=True))
    finally:
        torch.set_num_threads(threads)
    for count, (out, lse) in zip((2, 3, 4), results[1:]):
        assert torch.equal(out, results[0][0]), f"out at {count} threads"
        assert torch.equal(lse, results[0][1]), f"lse at {count} threads"
