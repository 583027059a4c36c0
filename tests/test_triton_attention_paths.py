"""The GPU-scale paths of the attention Triton kernels, checked under the interpreter: the forward's unmasked
middle key range next to the masked diagonal / window / boundary ranges, float16, the scale and dropout scale
as runtime arguments (a new value compiles nothing), the tf32 / tf32x3 choice and the hardware tanh (CUDA
only). What needs a compiler (spills, shared memory, the tf32 instructions) is in test_gpu_compile.py."""
from __future__ import annotations


import pytest
import torch
import triton

import seqkern
from seqkern.kernels import _launch
from seqkern.kernels import additive_attention as additive
from seqkern.kernels import flash_attention as flash
from seqkern.kernels import flash_attention_decode as decode
from seqkern.testing import allow_tf32
from test_flash_attention import _case, check_attention

CUDA = torch.device("cuda")
CPU = torch.device("cpu")

pytestmark = pytest.mark.triton


@pytest.mark.parametrize("case", [
    _case(40, 70, dim=16, batch=1, heads=2),  # no window: unmasked blocks, then the partial last one
    _case(70, dim=16, batch=1, heads=1, causal=True, mask="bool"),  # left of the diagonal unmasked
    _case(50, 70, dim=16, batch=1, heads=1, window=(20, 5), alignment="bottom_right", mask="float_grad"),
    _case(40, 70, dim=16, batch=1, heads=2, kv_heads=1, window=(-1, 3), causal=False),
], ids=["full", "causal", "window", "right_window"])
def test_masked_and_unmasked_key_ranges_with_small_tiles(case, monkeypatch):
    """16 x 16 tiles, so that a query block's keys (and a key block's queries, in the dK/dV kernel) fall in all
    three ranges (masked, unmasked, masked): the result under the rule against SDPA and the float64 reference,
    gradients included."""
    for kernel in ("forward", "query_gradients", "key_gradients"):
        monkeypatch.setitem(flash._INTERPRETER_CONFIGS, kernel, (16, 16, 4, 1))
    check_attention(case, torch.float32, "triton")


@pytest.mark.parametrize("case", [_case(33, 17, dim=40, kv_heads=1, dim_v=24, mask="float_grad"),
                                  _case(17, 33, dim=16, heads=2, causal=True, alignment="bottom_right")],
                         ids=["mask", "causal"])
def test_float16_flash_attention(case):
    check_attention(case, torch.float16, "triton")


def test_float16_decode_and_additive_attention():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 2, 32, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 40, 32, generator=gen, dtype=torch.float64) for _ in range(2))

    def sdpa(dtype):
        return torch.nn.functional.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), enable_gqa=True,
                                                                attn_mask=torch.ones(2, 40, dtype=torch.bool).tril(38))
    with seqkern.backend("triton"):
        ours = seqkern.attention_decode(q.half(), k.half(), v.half(), is_causal=True)
    from helpers import assert_rule
    assert ours.dtype == torch.float16
    assert_rule("decode out", ours, sdpa(torch.float16), sdpa(torch.float64))

    query_proj, key_proj = (torch.randn(2, n, 24, generator=gen, dtype=torch.float64) for n in (5, 9))
    values, w = torch.randn(2, 9, 8, generator=gen, dtype=torch.float64), torch.randn(24, generator=gen,
                                                                                      dtype=torch.float64)

    def composed(dtype):
        scores = torch.tanh(query_proj.to(dtype)[:, :, None] + key_proj.to(dtype)[:, None]) @ w.to(dtype)
        return torch.softmax(scores, -1) @ values.to(dtype)
    with seqkern.backend("triton"):
        ours = seqkern.additive_attention_projected(query_proj.half(), key_proj.half(), values.half(), w.half())
    assert_rule("additive out", ours, composed(torch.float16), composed(torch.float64))


def _recorded_launches(monkeypatch, module) -> list[tuple[str, dict]]:
    """Records every launch_tuned of `module`: the kernel's name and the arguments it is compiled for (its
    constexpr parameters: a new value of any of them is a new compiled kernel on a GPU)."""
    launches = []

    def recording(kernel, configs, interpreter_config, grid, device, key):
        run = _launch.launch_tuned(kernel, configs, interpreter_config, grid, device, key)
        constexprs = {p.name for p in kernel.params if p.is_constexpr}

        def call(*args, **kwargs):
            launches.append((kernel.__name__, {n: v for n, v in kwargs.items() if n in constexprs}, kwargs))
            return run(*args, **kwargs)
        return call
    monkeypatch.setattr(module, "launch_tuned", recording)
    return launches


def test_a_new_scale_or_dropout_p_compiles_no_new_kernel(monkeypatch):
    """scale and the dropout scale are runtime arguments: the constexprs of every launch are the same for
    another scale and another dropout_p, while the runtime halves carry the new values."""
    launches = _recorded_launches(monkeypatch, flash)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=gen, requires_grad=True) for _ in range(3))
    outs = []
    for scale, dropout_p in ((0.3, 0.1), (0.7, 0.25)):
        torch.manual_seed(0)
        with seqkern.backend("triton"):
            out = seqkern.attention(q, k, v, scale=scale, dropout_p=dropout_p)
            out.sum().backward()
        outs.append(out)
    assert len(launches) == 6  # forward, dQ, dK/dV, twice
    for first, second in zip(launches[:3], launches[3:]):
        assert first[0] == second[0] and first[1] == second[1]
        assert first[2]["scale_hi"] != second[2]["scale_hi"]
        assert first[2]["dropout_scale_hi"] != second[2]["dropout_scale_hi"]
    assert not torch.equal(outs[0], outs[1])


def test_float64_scale_keeps_its_low_bits():
    """The float32 halves hold 48 bits of a float64 scale: the runtime argument rounds nothing visible."""
    for value in (0.37, 1 / 3 ** 0.5, 1 / (1 - 0.1)):
        halves = _launch.float_halves("x", value)
        assert abs(halves["x_hi"] + halves["x_lo"] - value) <= 2 ** -47 * value
        assert halves["x_hi"] != value  # not representable in float32: the low half matters


def test_tf32_choice_follows_torch(monkeypatch):
    """float32 products on a GPU: tf32 where torch.backends.cuda.matmul.allow_tf32 allows it, else the kernel's
    full-accuracy path (tf32x3 by default; float32 FMAs, "ieee", in flash attention, with its own config lists);
    "ieee" for every other dtype and under the interpreter (where tl.dot is exact: the ieee path is what the
    tests check). test_gpu_compile.py checks the instructions it compiles to."""
    for allow, expected in ((True, "tf32"), (False, "tf32x3")):
        with allow_tf32(allow):
            assert _launch.dot_precision(torch.float32, CUDA) == expected
            assert _launch.dot_precision(torch.float32, CUDA, flash.FLOAT32_PRECISION) == (
                "tf32" if allow else "ieee")
            assert flash.unit(torch.float32, CUDA) == ("tf32" if allow else "fma32")
            assert flash.unit(torch.float32, CPU) == "interpreter"
            assert _launch.dot_precision(torch.float32, CPU) == "ieee"
            for dtype in (torch.bfloat16, torch.float16, torch.float64):
                assert _launch.dot_precision(dtype, CUDA) == "ieee"
            assert flash.configs("forward", torch.float32, CUDA, 128, 128) == [
                flash._config(*tile) for tile in flash._GPU_CONFIGS["forward", "tf32" if allow else "fma32"][128]]
    launches = _recorded_launches(monkeypatch, flash)
    q = torch.randn(1, 1, 20, 16)  # 20 queries: flash attention, not the decode kernel
    with seqkern.backend("triton"):
        seqkern.attention(q, q, q)
    assert launches[0][1]["PRECISION"] == "ieee"


def test_hardware_tanh_only_for_16_bit_dtypes_on_a_gpu(monkeypatch):
    assert additive._fast_tanh(torch.bfloat16, CUDA) and additive._fast_tanh(torch.float16, CUDA)
    assert not additive._fast_tanh(torch.float32, CUDA) and not additive._fast_tanh(torch.bfloat16, CPU)
    launches = _recorded_launches(monkeypatch, additive)
    x = torch.randn(1, 3, 8, dtype=torch.bfloat16)
    with seqkern.backend("triton"):
        seqkern.additive_attention_projected(x, x, x, torch.randn(8, dtype=torch.bfloat16))
    assert launches[0][1]["FAST_TANH"] is False


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("head_dim", [16, 40, 64, 100, 128, 256, 512, 1024])
def test_config_selection(dtype, head_dim):
    """On CUDA a non-empty autotune list of tiles no larger than the interpreter's, tl.dot-sized, and for the
    decode kernel 64 keys per tile up to head dim 128 with 16 rows; under the interpreter one config."""
    for kernel in ("forward", "query_gradients", "key_gradients"):
        tuned = flash.configs(kernel, dtype, CUDA, head_dim, head_dim)
        assert tuned and all(c["BLOCK_M"] >= 16 and c["BLOCK_N"] >= 16 for c in tuned)
        assert len(flash.configs(kernel, dtype, CPU, head_dim, head_dim)) == 1
        light = flash.configs(kernel, dtype, CUDA, head_dim, head_dim, light=True)
        if kernel in flash.CHUNKED:  # head-dim chunks only in float32 / float64, at most two up to head dim 256
            width = max(16, triton.next_power_of_2(head_dim))
            assert all(c["CHUNK"] == 0 or (dtype.itemsize >= 4 and c["CHUNK"] >= min(width, 256) // 2)
                       for c in tuned + light)
        else:
            assert all("CHUNK" not in c for c in tuned + light)
    tuned = decode.configs(dtype, CUDA, head_dim, head_dim)
    assert tuned and all(c["BLOCK_N"] >= 16 for c in tuned)
    if dtype in (torch.float16, torch.bfloat16) and head_dim <= 128:
        assert all(c["BLOCK_N"] == 64 for c in tuned)
    assert len(decode.configs(dtype, CPU, head_dim, head_dim)) == 1


@pytest.mark.parametrize("rows", [1, 16, 17, 80, 1024])
def test_decode_rows_past_one_tile_become_a_grid_axis(rows):
    """The decode kernel's rows per program stop at MAX_BLOCK_R (16: the rows the compiled configs hold), so no
    R launches a larger tile than tests/test_gpu_compile.py compiles (before, R was one tile: 1024 rows)."""
    assert decode.MAX_BLOCK_R == 16
    assert decode._split_blocks(rows, 128, 128)["BLOCK_R"] == min(max(16, triton.next_power_of_2(rows)), 16)


def _recorded_grids(monkeypatch) -> list[tuple[str, int, tuple]]:
    """Records every flash attention launch: the kernel's name, its CHUNK (None for the forward) and its grid."""
    launches = []

    def recording(kernel, configs, interpreter_config, grid, device, key):
        launches.append((kernel.__name__, interpreter_config.get("CHUNK"), grid(interpreter_config)))
        return _launch.launch_tuned(kernel, configs, interpreter_config, grid, device, key)
    monkeypatch.setattr(flash, "launch_tuned", recording)
    return launches


# The head-dim chunked backward (kernels/flash_attention.py CHUNK), forced: several chunks over q / k with grouped
# heads, a mask's gradient (dS, written by the first chunk only) and v narrower than one chunk; v wider than q / k
# (the last chunks hold value columns only) with a window; one chunk of the whole head dim, as the GPU lists use it.
CHUNKED_CASES = [
    (_case(20, 17, dim=256, batch=1, heads=2, kv_heads=1, dim_v=40, causal=True, alignment="bottom_right",
           mask="float_grad"), 64, 4),
    (_case(17, 24, dim=128, batch=1, heads=1, dim_v=200, window=(9, 3), mask="bool"), 64, 4),
    (_case(20, 17, dim=128, batch=1, heads=2, causal=True), 128, 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case, chunk, chunks", CHUNKED_CASES, ids=["chunks", "wide_v", "one_chunk"])
def test_chunked_backward_against_sdpa_and_reference(case, chunk, chunks, dtype, monkeypatch):
    """dQ, dK, dV (and the mask's gradient) through the chunked kernels, under the rule against SDPA and the
    float64 reference; the launches prove the path: both backward kernels with CHUNK and `chunks` programs on the
    grid's third axis."""
    launches = _recorded_grids(monkeypatch)
    with flash.forced_chunk(chunk):
        check_attention(case, dtype, "triton")
    backward = [(name, forced, grid[2]) for name, forced, grid in launches if forced is not None]
    assert sorted(backward) == [("_key_gradients_kernel", chunk, chunks), ("_query_gradients_kernel", chunk, chunks)]


def test_chunked_backward_with_dropout_and_varlen_matches_the_unchunked_one():
    """Dropout (the same kept pairs in every chunk's program) and packed sequences: the chunked gradients are the
    unchunked ones in float64 up to the order of the head-dim sums."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(30, 2, 48, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    cu_seqlens = torch.tensor([0, 13, 30], dtype=torch.int32)
    grad = torch.randn(30, 2, 48, generator=gen, dtype=torch.float64)

    def gradients():
        torch.manual_seed(0)
        with seqkern.backend("triton"):
            out = seqkern.attention_varlen(q, k, v, cu_seqlens, cu_seqlens, 17, 17, dropout_p=0.3, is_causal=True)
            return torch.autograd.grad(out, (q, k, v), grad)
    plain = gradients()
    with flash.forced_chunk(16):
        chunked = gradients()
    for got, want in zip(chunked, plain):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_forced_chunk_refuses_a_width_tl_dot_cannot_take():
    for width in (8, 48):
        with pytest.raises(ValueError, match="power of two"):
            with flash.forced_chunk(width):
                pass
