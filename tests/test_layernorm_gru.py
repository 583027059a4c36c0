"""The LayerNorm GRU (issue 16): the op (C++ and Triton under the interpreter) and seqkern.nn.LayerNormGRU under the
correctness rule against the definition composed HERE in float64 (the loop with lengths, resets and zoneout is
tests/test_layernorm_lstm.py's composed_scan), every output, state and parameter gradient; gradcheck, double
backward, opcheck, torch.compile, NaN/Inf, bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import seqkern
from helpers import case_id, check_op, gradcheck_op
from test_layernorm_lstm import (
    SPLIT_DTYPE_CASES, check_lengths_match_packing, check_module_against_composed, check_split_kernels, composed_scan,
    random_layer_args,
)

OPS = torch.ops.seqkern


def composed_layernorm_gru(x, h0, w_ih, w_hh, b_ih, b_hh, ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, eps, lengths, resets,
                           zoneout, seed, reverse):
    """(output, h_n) of one layer from issue 16's equations (reset-after, as torch.nn.GRU)."""
    gates = w_ih.shape[0]

    def cell(x_t, states):
        (h,) = states
        gx = F.layer_norm(x_t @ w_ih.t(), (gates,), ln_ih_w, ln_ih_b, eps)
        gh = F.layer_norm(h @ w_hh.t(), (gates,), ln_hh_w, ln_hh_b, eps)
        if b_ih is not None:
            gx, gh = gx + b_ih, gh + b_hh
        x_r, x_z, x_n = gx.chunk(3, dim=-1)
        h_r, h_z, h_n = gh.chunk(3, dim=-1)
        r, z = (x_r + h_r).sigmoid(), (x_z + h_z).sigmoid()
        n = (x_n + r * h_n).tanh()
        return ((1 - z) * n + z * h,)

    return composed_scan(cell, x, (h0,), lengths, resets, zoneout, seed, reverse)


TENSOR_NAMES = ("input", "h0", "w_ih", "w_hh", "b_ih", "b_hh", "ln_ih_weight", "ln_ih_bias", "ln_hh_weight",
                "ln_hh_bias")


def layer_args(*sizes, **options):
    return random_layer_args(3, False, *sizes, **options)


def op_forward(*args):
    return OPS.layernorm_gru_forward(*args, True)[:2]


CASES = [
    dict(seq_len=1, batch=1, input_size=1, hidden=1),
    dict(seq_len=7, batch=3, input_size=5, hidden=63),
    dict(seq_len=9, batch=5, input_size=4, hidden=127, reverse=True),
    dict(seq_len=6, batch=4, input_size=3, hidden=17, bias=False, lengths=[4, 6, 1, 4]),
    dict(seq_len=6, batch=4, input_size=3, hidden=17, lengths=[2, 6, 5, 1], reverse=True),
    dict(seq_len=8, batch=5, input_size=3, hidden=19, resets=True, zoneout=0.3, train=True),
    dict(seq_len=7, batch=3, input_size=6, hidden=33, zoneout=0.25, lengths=[7, 3, 5], reverse=True),
    dict(seq_len=5, batch=3, input_size=4, hidden=16, scale=8.0),  # large magnitudes: saturated gates
]
# The large shape runs in float32 and bfloat16 only (its float64 run adds time, not coverage).
LARGE_CASE = dict(seq_len=20, batch=32, input_size=33, hidden=256)


def _dtype_cases():
    for i, case in enumerate(CASES):
        for dtype in (torch.float32, torch.float64) + ((torch.bfloat16,) if i in (1, 5) else ()):
            yield case, dtype
    yield LARGE_CASE, torch.float32
    yield LARGE_CASE, torch.bfloat16


@pytest.mark.parametrize("case,dtype", list(_dtype_cases()), ids=lambda v: str(v) if isinstance(v, torch.dtype) else case_id(v))
def test_cpu_kernel_against_composed(case, dtype):
    check_op(op_forward, composed_layernorm_gru, layer_args(**case), TENSOR_NAMES, dtype, "cpu")


def _grad_args(*sizes, **options):
    return [a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in layer_args(*sizes, **options)]


def test_gradcheck_with_every_option():
    with seqkern.backend("cpu"):
        assert gradcheck_op(op_forward, _grad_args(5, 3, 2, 4, lengths=[5, 2, 4], resets=True, zoneout=0.4, train=True))
        assert gradcheck_op(op_forward, _grad_args(4, 2, 3, 3, lengths=[1, 4], zoneout=0.3, reverse=True))


def test_double_backward_goes_through_the_reference():
    args = _grad_args(2, 2, 2, 3, lengths=[2, 1], zoneout=0.2)
    positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

    def run(*tensors):
        full = list(args)
        for i, t in zip(positions, tensors):
            full[i] = t
        return op_forward(*full)

    with seqkern.backend("cpu"):
        assert torch.autograd.gradgradcheck(run, [args[i] for i in positions], fast_mode=True)


@pytest.mark.parametrize("where", ["input", "h0"])
def test_nan_and_inf_propagate_as_torch(where):
    args = list(layer_args(4, 3, 3, 5, lengths=[4, 2, 3]))
    index = TENSOR_NAMES.index(where)
    args[index] = args[index].clone()
    args[index][0, 1] = float("nan")
    args[index][0, 2] = float("inf")
    args32 = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    want = composed_layernorm_gru(*args32)
    with seqkern.backend("cpu"):
        got = op_forward(*args32)
    for g, w in zip(got, want):
        assert torch.equal(g.isnan(), w.isnan()) and torch.equal(g.isinf(), w.isinf())


def _float32(args, requires_grad=False):
    return [a.float().requires_grad_(requires_grad) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in args]


def _opcheck_cases():
    for requires_grad, case in ((True, CASES[5]), (True, CASES[6]), (False, CASES[3])):
        yield OPS.layernorm_gru_forward.default, (*_float32(layer_args(**case), requires_grad), requires_grad)
    args = _float32(layer_args(5, 3, 4, 6, lengths=[5, 3, 1], resets=True, zoneout=0.5, train=True))
    output, h_n, workspace = OPS.layernorm_gru_forward(*args, True)
    x, h0, w_ih, w_hh, _, _, ln_ih_w, _, ln_hh_w, _, _, lengths, resets, zoneout, seed, reverse = args
    yield OPS.layernorm_gru_backward.default, (torch.randn_like(output), torch.randn_like(h_n), x, h0, w_ih, w_hh,
                                               ln_ih_w, ln_hh_w, output, workspace, lengths, resets, zoneout, seed,
                                               reverse)


@pytest.mark.parametrize("op,args", list(_opcheck_cases()))
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


def test_bad_op_arguments_are_refused_before_the_kernel():
    args = list(layer_args(4, 2, 3, 5))
    for index, value, match in ((-5, torch.tensor([1, -1]), "lengths"), (-5, torch.tensor([1.0, 2.0]), "lengths"),
                                (-4, torch.zeros(3, 2, dtype=torch.bool), "resets"), (-3, -0.5, "zoneout")):
        bad = list(args)
        bad[index] = value
        with seqkern.backend("cpu"), pytest.raises(RuntimeError, match=match):
            OPS.layernorm_gru_forward(*bad, False)


# ------------------------------------------------------------------------------------------------
# The module.
# ------------------------------------------------------------------------------------------------
MODULE_OPTIONS = [
    dict(input_size=5, hidden_size=7),
    dict(input_size=3, hidden_size=33, num_layers=2, bias=False, batch_first=True, bidirectional=True),
    dict(input_size=4, hidden_size=9, zoneout=0.3, eps=1e-3),
]


@pytest.mark.parametrize("options,dtype", [(MODULE_OPTIONS[0], torch.float64)] + [(o, torch.float32) for o in MODULE_OPTIONS],
                         ids=lambda v: str(v) if isinstance(v, torch.dtype) else case_id(v))
def test_module_against_composed(options, dtype):
    check_module_against_composed(seqkern.nn.LayerNormGRU, composed_layernorm_gru, 1, options, dtype)


def test_module_lengths_and_resets_against_composed():
    check_module_against_composed(seqkern.nn.LayerNormGRU, composed_layernorm_gru, 1,
                                  dict(input_size=3, hidden_size=10, num_layers=2), torch.float32,
                                  lengths=[6, 2, 5, 1], resets=True)


def test_lengths_match_packed_sequence():
    with seqkern.backend("cpu"):
        check_lengths_match_packing(seqkern.nn.LayerNormGRU(3, 8, num_layers=2, bidirectional=True))


def test_parameters_and_bad_input():
    module = seqkern.nn.LayerNormGRU(3, 5)
    assert [n for n, _ in module.named_parameters()] == [
        "weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0", "ln_ih_weight_l0", "ln_ih_bias_l0",
        "ln_hh_weight_l0", "ln_hh_bias_l0"]
    x = torch.randn(4, 2, 3)
    with pytest.raises(ValueError, match="single tensor"):
        module(x, (torch.zeros(1, 2, 5),))
    with pytest.raises(ValueError, match="lengths"):
        module(x, lengths=torch.tensor([5, 1]))
    with pytest.raises(ValueError, match="zoneout"):
        seqkern.nn.LayerNormGRU(3, 5, zoneout=2)


@pytest.mark.slow
def test_torch_compile_fullgraph_with_lengths_and_resets():
    module = seqkern.nn.LayerNormGRU(4, 6, zoneout=0.2).eval()
    x, lengths = torch.randn(5, 3, 4), torch.tensor([5, 2, 4])
    resets = torch.zeros(5, 3, dtype=torch.bool)
    resets[2, 0] = True
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)
    with seqkern.backend("cpu"):
        got, h = compiled(x, lengths=lengths, resets=resets)
        want, wh = module(x, lengths=lengths, resets=resets)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(h, wh)


# ------------------------------------------------------------------------------------------------
# Triton, under the interpreter on CPU tensors (small shapes).
# ------------------------------------------------------------------------------------------------
TRITON_CASES = [CASES[0], dict(seq_len=4, batch=3, input_size=5, hidden=17), CASES[3], CASES[5],
                dict(seq_len=4, batch=3, input_size=3, hidden=9, zoneout=0.25, lengths=[2, 4, 3], reverse=True)]


@pytest.mark.triton
@pytest.mark.parametrize("case,dtype", [(c, torch.float64) for c in TRITON_CASES]
                         + [(TRITON_CASES[1], torch.float32), (TRITON_CASES[3], torch.float32)],
                         ids=lambda v: str(v) if isinstance(v, torch.dtype) else case_id(v))
def test_triton_kernel_against_composed(case, dtype):
    check_op(op_forward, composed_layernorm_gru, layer_args(**case), TENSOR_NAMES, dtype, "triton")


@pytest.mark.triton
@pytest.mark.parametrize("case,dtype", SPLIT_DTYPE_CASES,
                         ids=lambda v: str(v) if isinstance(v, torch.dtype) else case_id(v))
def test_triton_split_kernels_against_composed(case, dtype, monkeypatch):
    """The split forward and backward (kernels/_layernorm_split.py), forced, as test_layernorm_lstm.py's."""
    check_split_kernels(op_forward, composed_layernorm_gru, layer_args(**case), TENSOR_NAMES, dtype, monkeypatch)
