"""seqkern.attention_decode and the flash_attention_decode op: every implementation against full attention
over each sequence's cached prefix (the float64 reference, and SDPA in the same dtype under the correctness
rule), split counts, cache layouts, opcheck, torch.compile and bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import seqkern
from seqkern.reference.flash_attention import visible
from helpers import assert_rule, case_id

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _case(len_q=1, size=300, lengths=None, *, heads=8, kv_heads=2, dim=64, dim_v=None, causal=True, window=-1,
          splits=0, seq_first=False):
    return dict(len_q=len_q, size=size, lengths=lengths, heads=heads, kv_heads=kv_heads, dim=dim,
                dim_v=dim_v or dim, causal=causal, window=window, splits=splits, seq_first=seq_first)


CASES = [
    _case(),
    _case(1, 1000, [1000, 1, 517], splits=7),
    _case(3, 257, [257, 2, 100], dim=40, dim_v=24, window=50),
    _case(5, 130, None, heads=4, kv_heads=4, dim=128, causal=False, seq_first=True),
    _case(1, 64, [0, 64], heads=2, kv_heads=1, dim=512, splits=3),
    _case(2, 4097, [4097], heads=32, kv_heads=8, dim=128, splits=1),
]
TRITON_CASES = [
    _case(1, 70, [70, 1, 33], heads=4, kv_heads=2, dim=16, splits=3),
    _case(3, 45, [45, 20], heads=2, kv_heads=1, dim=40, dim_v=24, window=9, seq_first=True),
    _case(2, 37, None, heads=2, kv_heads=2, dim=64, causal=False),
    # R = 20 query heads x 4 queries = 80 rows on the one kv head: two row blocks (MAX_BLOCK_R 64), one partial
    _case(4, 40, [40, 9], heads=20, kv_heads=1, dim=16, splits=2),
]


def _inputs(case: dict, dtype, seed: int = 0):
    """q (B,Hq,Lq,D), caches (B,Hkv,S,D|Dv) (as .transpose(1, 2) views of (B,S,Hkv,.) caches if seq_first)."""
    gen = torch.Generator().manual_seed(seed)
    batch = 2 if case["lengths"] is None else len(case["lengths"])
    q = torch.randn(batch, case["heads"], case["len_q"], case["dim"], generator=gen, dtype=torch.float64)
    caches = []
    for width in (case["dim"], case["dim_v"]):
        cache = torch.randn(batch, case["size"], case["kv_heads"], width, generator=gen, dtype=torch.float64)
        caches.append(cache.transpose(1, 2) if case["seq_first"] else cache.transpose(1, 2).contiguous())
    lengths = None if case["lengths"] is None else torch.tensor(case["lengths"], dtype=torch.int32)
    return q.to(dtype), caches[0].to(dtype), caches[1].to(dtype), lengths


def _decode(case, q, k_cache, v_cache, lengths):
    return seqkern.attention_decode(q, k_cache, v_cache, lengths, is_causal=case["causal"],
                                    window_size=(case["window"], 0), num_splits=case["splits"])


def _full_attention(case, q, k_cache, v_cache, lengths) -> torch.Tensor:
    """Each sequence's queries as the last Lq positions of its prefix, through SDPA with an explicit mask."""
    outs = []
    for b in range(q.shape[0]):
        length = k_cache.shape[2] if lengths is None else int(lengths[b])
        seen = visible(q.shape[2], length, case["window"], 0 if case["causal"] else -1, True)
        mask = torch.zeros(seen.shape, dtype=q.dtype).masked_fill(~seen, float("-inf"))
        out = F.scaled_dot_product_attention(q[b : b + 1], k_cache[b : b + 1, :, :length],
                                             v_cache[b : b + 1, :, :length], attn_mask=mask, enable_gqa=True)
        outs.append(torch.nan_to_num(out, 0.0))  # a query with no key: SDPA's NaN, our 0
    return torch.cat(outs)


@pytest.mark.parametrize("backend, dtype", [("cpu", d) for d in DTYPES + [torch.float16]] + [
    pytest.param("triton", d, marks=pytest.mark.triton) for d in DTYPES], ids=str)
def test_decode_against_full_attention(backend, dtype):
    cases = CASES if backend == "cpu" else TRITON_CASES
    for case in cases:
        args64 = _inputs(case, torch.float64)
        args = _inputs(case, dtype)
        with seqkern.backend("reference"):
            expected = _decode(case, *args64)
        with seqkern.backend(backend):
            got, lse = seqkern.attention_decode(*args, is_causal=case["causal"], window_size=(case["window"], 0),
                                                num_splits=case["splits"], return_lse=True)
        assert_rule(f"out {case_id(case)}", got, _full_attention(case, *args), expected)
        assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


# The AVX-512 kernel reads fp32 / bf16 rows in chunks of 32 columns (bf16: even columns, then odd ones) and
# tiles 1, 2 or 4 query rows: head dims ending in a partial chunk (72 = 2 * 32 + 8; 16 < one vector; a value
# width whose second 64-column panel is partial, 100), one and two query rows per kv head, and splits and
# lengths that end inside a 64-key block.
CHUNK_CASES = [
    _case(1, 150, [150, 97], heads=2, kv_heads=2, dim=72, dim_v=100, causal=False, splits=3),
    _case(1, 70, None, heads=4, kv_heads=2, dim=16, dim_v=40, splits=2),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_chunk_tails_and_row_tiles(dtype):
    for case in CHUNK_CASES:
        args = _inputs(case, dtype)
        with seqkern.backend("reference"):
            expected = _decode(case, *_inputs(case, torch.float64))
        with seqkern.backend("cpu"):
            got = _decode(case, *args)
        assert_rule(f"out {case_id(case)}", got, _full_attention(case, *args), expected)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.triton)])
def test_split_counts_agree(backend):
    case = _case(2, 200, [200, 77], heads=4, kv_heads=1, dim=32)
    args = _inputs(case, torch.float64)
    with seqkern.backend(backend):
        outs = [seqkern.attention_decode(*args, is_causal=True, num_splits=s, return_lse=True) for s in (1, 2, 5, 64)]
    for out, lse in outs[1:]:
        torch.testing.assert_close(out, outs[0][0])
        torch.testing.assert_close(lse, outs[0][1])


def test_decode_equals_attention_with_bottom_right_causal():
    """Decoding the last token is the last row of causal attention over the whole sequence."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, h, 50, 32, generator=gen) for h in (4, 2, 2))
    full = seqkern.attention(q, k, v, is_causal=True, enable_gqa=True)
    step = seqkern.attention_decode(q[:, :, -1:], k, v, is_causal=True)
    torch.testing.assert_close(step, full[:, :, -1:], atol=1e-5, rtol=1e-5)


def test_inputs_that_require_grad_fall_back_to_the_differentiable_reference():
    q, k, v, lengths = _inputs(_case(1, 20, [20, 9], heads=2, kv_heads=1, dim=8), torch.float64)
    q.requires_grad_()
    out = seqkern.attention_decode(q, k, v, lengths, is_causal=True)
    (grad,) = torch.autograd.grad(out.sum(), q)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_opcheck():
    q, k, v, lengths = _inputs(_case(2, 40, [40, 13], heads=4, kv_heads=2, dim=16), torch.float32)
    torch.library.opcheck(torch.ops.seqkern.flash_attention_decode.default, (q, k, v, lengths, 0.25, True, -1, 3))
    torch.library.opcheck(torch.ops.seqkern.flash_attention_decode.default, (q, k, v, None, 0.25, False, 5, 0))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    q, k, v, lengths = _inputs(_case(1, 64, [64, 30], heads=4, kv_heads=2, dim=16), torch.float32)

    def step(q, k, v, lengths):
        return seqkern.attention_decode(q, k, v, lengths, is_causal=True)

    torch.testing.assert_close(torch.compile(step, fullgraph=True)(q, k, v, lengths), step(q, k, v, lengths))


def _bad(**changes):
    q, k, v, lengths = _inputs(_case(1, 16, [16, 3], heads=4, kv_heads=2, dim=8), torch.float32)
    args = {**dict(query=q, k_cache=k, v_cache=v, cache_seqlens=lengths), **changes}
    return lambda: seqkern.attention_decode(**args)


BAD = [
    ("length beyond the cache", _bad(cache_seqlens=torch.tensor([17, 3], dtype=torch.int32)), ValueError, r"\[0, 16\]"),
    ("negative length", _bad(cache_seqlens=torch.tensor([-1, 3], dtype=torch.int32)), ValueError, "cache_seqlens"),
    ("lengths shape", _bad(cache_seqlens=torch.tensor([3], dtype=torch.int32)), ValueError, r"shape \(2,\)"),
    ("float lengths", _bad(cache_seqlens=torch.tensor([3.0, 3.0])), ValueError, "int32"),
    ("heads", _bad(k_cache=torch.randn(2, 3, 16, 8), v_cache=torch.randn(2, 3, 16, 8)), ValueError, "multiple"),
    ("head dim", _bad(k_cache=torch.randn(2, 2, 16, 6)), ValueError, "head dim 8"),
    ("dtype", _bad(v_cache=torch.randn(2, 2, 16, 8, dtype=torch.float64)), TypeError, "dtype"),
    ("num_splits", _bad(num_splits=-2), ValueError, "num_splits"),
    ("3-D query", _bad(query=torch.randn(4, 1, 8)), ValueError, "4-D"),
]


@pytest.mark.parametrize("name, call, error, words", BAD, ids=[c[0] for c in BAD])
def test_bad_input_gets_a_clear_error(name, call, error, words):
    with pytest.raises(error, match=words):
        call()


# ------------------------------------------------------------------------------------------------------------
# seqkern.attention picks the decode kernel by itself (flash_attention.decode_route's rule).
# ------------------------------------------------------------------------------------------------------------
def _which_kernel(call):
    """(result of call(), "decode" | "flash"): which kernel seqkern.attention / MultiheadAttention ran."""
    from unittest import mock

    from seqkern.ops import flash_attention

    with mock.patch.object(flash_attention, "run_forward", wraps=flash_attention.run_forward) as flash:
        result = call()
    return result, "flash" if flash.called else "decode"


def _routing_inputs(len_q, len_k, dtype, seq_first=False, seed=3):
    """q (2,8,Lq,40), k, v (2,2,Lk,40|24) in float64 and in dtype; seq_first: strided (B,S,H,D) caches."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 8, len_q, 40, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, len_k, 2, d, generator=gen, dtype=torch.float64).transpose(1, 2) for d in (40, 24))
    if not seq_first:
        k, v = k.contiguous(), v.contiguous()
    return (q, k, v), tuple(t.to(dtype) for t in (q, k, v))


def _key_padding(lengths, len_k, holes=False):
    keep = torch.arange(len_k)[None] < torch.tensor(lengths)[:, None]
    if holes:
        keep[0, 1] = False
    return keep[:, None, None, :]


# (name, len_q, len_k, kwargs for seqkern.attention, the explicit bool mask SDPA gets (Lq, Lk) -> (.., Lq, Lk))
ROUTED = [
    ("plain", 1, 300, {}),
    ("plain lq3 seq-first cache", 3, 257, {"seq_first": True}),
    ("causal top-left", 4, 100, {"is_causal": True}),
    ("causal bottom-right", 5, 130, {"is_causal": True, "causal_alignment": "bottom_right"}),
    ("window bottom-right", 2, 200, {"window_size": (50, -1), "causal_alignment": "bottom_right"}),
    ("causal window top-left", 3, 90, {"window_size": (1, 0)}),
    ("key padding", 1, 150, {"padding": [150, 61]}),
]
NOT_ROUTED = [
    ("17 queries", 17, 300, {}),
    ("window right", 1, 300, {"window_size": (-1, 3), "causal_alignment": "bottom_right"}),
    ("window top-left", 2, 300, {"window_size": (7, -1)}),
    ("key padding with holes", 1, 150, {"padding": [150, 61], "holes": True}),
    ("key padding and causal", 2, 150, {"padding": [150, 61], "is_causal": True}),
    ("dropout", 1, 300, {"dropout_p": 0.3}),
    ("requires grad", 1, 300, {"requires_grad": True}),
]


def _routing_call(len_q, len_k, dtype, options):
    options = dict(options)
    seq_first, padding, holes = options.pop("seq_first", False), options.pop("padding", None), options.pop("holes", False)
    requires_grad = options.pop("requires_grad", False)
    args64, args = _routing_inputs(len_q, len_k, dtype, seq_first)
    if requires_grad:
        args[0].requires_grad_()
    mask = None if padding is None else _key_padding(padding, len_k, holes)
    call = lambda a: seqkern.attention(*a, attn_mask=mask, enable_gqa=True, **options)  # noqa: E731
    return call, args64, args, mask, options


def _sdpa_oracle(args, mask, options):
    """SDPA with the visibility spelled out as a bool mask (query i sees keys [i + s - left, i + s + right])."""
    q, k, v = args
    len_q, len_k = q.shape[2], k.shape[2]
    left, right = options.get("window_size") or (-1, -1)
    right = 0 if options.get("is_causal") else right
    seen = visible(len_q, len_k, left, right, options.get("causal_alignment") == "bottom_right")
    if mask is not None:
        seen = seen & mask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=seen, enable_gqa=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name, len_q, len_k, options", ROUTED, ids=[c[0] for c in ROUTED])
def test_attention_runs_the_decode_kernel_on_decoding_shapes(name, len_q, len_k, options, dtype):
    call, args64, args, mask, sdpa_options = _routing_call(len_q, len_k, dtype, options)
    out, kernel = _which_kernel(lambda: call(args))
    assert kernel == "decode", name
    assert_rule(name, out, _sdpa_oracle(args, mask, sdpa_options), _sdpa_oracle(args64, mask, sdpa_options))


@pytest.mark.parametrize("name, len_q, len_k, options", NOT_ROUTED, ids=[c[0] for c in NOT_ROUTED])
def test_attention_keeps_the_flash_kernel_where_decode_cannot_serve(name, len_q, len_k, options):
    call, _, args, _, _ = _routing_call(len_q, len_k, torch.float32, options)
    _, kernel = _which_kernel(lambda: call(args))
    assert kernel == "flash", name


def test_attention_decodes_under_no_grad_even_with_inputs_that_require_grad():
    call, _, args, _, _ = _routing_call(1, 300, torch.float32, {"requires_grad": True})
    with torch.no_grad():
        _, kernel = _which_kernel(lambda: call(args))
    assert kernel == "decode"


@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_decoding_step_runs_the_decode_kernel(need_weights):
    """One new query against 70 source positions with right-padded keys, eval mode: the decode kernel, and
    the output and weights within the rule of torch.nn.MultiheadAttention."""
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(32, 4, dropout=0.1).eval()
    ours = seqkern.nn.MultiheadAttention(32, 4, dropout=0.1).eval()
    ours.load_state_dict(theirs.state_dict())
    query, memory = torch.randn(1, 2, 32, dtype=torch.float64), torch.randn(70, 2, 32, dtype=torch.float64)
    padding = torch.arange(70)[None] >= torch.tensor([70, 33])[:, None]
    with torch.no_grad():
        ref = theirs.double()(query, memory, memory, key_padding_mask=padding, need_weights=need_weights)
        theirs.float()
        same = theirs(query.float(), memory.float(), memory.float(), key_padding_mask=padding,
                      need_weights=need_weights)
        got, kernel = _which_kernel(lambda: ours(query.float(), memory.float(), memory.float(),
                                                 key_padding_mask=padding, need_weights=need_weights))
    assert kernel == "decode"
    assert_rule("output", got[0], same[0], ref[0])
    if need_weights:
        assert_rule("weights", got[1], same[1], ref[1])


@pytest.mark.slow
def test_routed_attention_compiles_fullgraph():
    """Under torch.compile the routing holds (the key-padding check, which reads values, is skipped there)."""
    torch._dynamo.reset()
    _, (q, k, v) = _routing_inputs(1, 100, torch.float32)
    mask = _key_padding([100, 40], 100)

    def step(q, k, v, mask):
        return seqkern.attention(q, k, v, mask, is_causal=mask is None, enable_gqa=True)

    compiled = torch.compile(step, fullgraph=True)
    with torch.no_grad():
        for m in (None, mask):
            torch.testing.assert_close(compiled(q, k, v, m), step(q, k, v, m))
