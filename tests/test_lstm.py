"""The LSTM ops themselves: every implementation (C++, Triton under the interpreter) under the correctness rule
against torch.nn.LSTM's own kernel stepped in the test (the cell op: the formula composed in the test), gradcheck,
opcheck, torch.compile, and the backend switch."""
from __future__ import annotations

import pytest
import torch

import seqkern
from helpers import (
    CELL_CASES, case_id, cell_args, check_compiled_module, check_op, composed_lstm_cell, gradcheck_op, layer_args,
    torch_lstm_layer,
)

OPS = torch.ops.seqkern


def _layer_args(*sizes, **options):
    """Arguments of lstm_forward (without save_workspace)."""
    return layer_args(4, *sizes, cell_state=True, **options)


TENSOR_NAMES = ("input", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")


def _op_forward(*args):
    return OPS.lstm_forward(*args, True)[:3]


_ref_forward = torch_lstm_layer


CELL_NAMES = ("gates_x", "gates_h", "cx", "b_ih", "b_hh")


def _cell_args(batch, hidden, bias=True):
    return cell_args(4, batch, hidden, bias=bias)


def _op_cell(*args):
    return OPS.lstm_cell_forward(*args)[:2]


_ref_cell = composed_lstm_cell


CASES = [
    dict(seq_len=1, batch=1, input_size=1, hidden=1),
    dict(seq_len=7, batch=3, input_size=5, hidden=63),
    dict(seq_len=9, batch=5, input_size=4, hidden=127, proj=31, reverse=True),
    dict(seq_len=6, batch=4, input_size=3, hidden=17, bias=False, lengths=[6, 4, 4, 1]),
    dict(seq_len=6, batch=4, input_size=3, hidden=17, proj=5, lengths=[6, 5, 2, 1], reverse=True),
    dict(seq_len=40, batch=32, input_size=33, hidden=256),
    # The forward projects the input inside the team (project_input_in_team): step by step at batch >= 8, where
    # the backward also forms grad_input inside the team (input_gradient_in_team; after the loop below batch 8),
    dict(seq_len=5, batch=9, input_size=7, hidden=21, proj=6, lengths=[5, 5, 4, 4, 3, 2, 2, 1, 1], reverse=True),
    dict(seq_len=4, batch=11, input_size=5, hidden=19, bias=False),
    dict(seq_len=3, batch=8, input_size=5, hidden=128),  # two threads, the second with no input columns
    # in blocks of steps below (input_block_steps: 32 at batch 1, 11 at batch 3), the last one partial,
    dict(seq_len=37, batch=1, input_size=9, hidden=40, reverse=True),
    dict(seq_len=23, batch=3, input_size=6, hidden=24, proj=6, lengths=[23, 17, 5], reverse=True),
    # and before (after) the loop where a thread's W_ih slice would not fit in L2 beside its W_hh slice.
    dict(seq_len=2, batch=8, input_size=2100, hidden=256),
]


def _check_against_torch(run, case, dtype, backend):
    check_op(run, _ref_forward, _layer_args(**case), TENSOR_NAMES, dtype, backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cpu_kernel_against_torch(case, dtype):
    _check_against_torch(_op_forward, case, dtype, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("threads", [1, 3, 4])
@pytest.mark.parametrize("case", [dict(seq_len=6, batch=9, input_size=70, hidden=33, proj=17),
                                  dict(seq_len=3, batch=2, input_size=5, hidden=3, proj=2)], ids=case_id)
def test_weight_gradients_at_any_thread_count(case, threads, dtype):
    """The weight gradients run side by side, their output rows cut into one run of equal work per thread
    (csrc/cpu/outer_sum.h): an input wider than the hidden state (unequal work per gradient), a projection (a third
    gradient), gradients narrower than a 16-row run, and thread counts other than the suite's."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_against_torch(_op_forward, case, dtype, "cpu")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CELL_CASES, ids=case_id)
def test_cpu_cell_kernel_against_formula(case, dtype):
    check_op(_op_cell, _ref_cell, _cell_args(**case), CELL_NAMES, dtype, "cpu")


def test_inference_returns_no_workspace():
    args = _layer_args(5, 3, 4, 6, requires_grad=False, dtype=torch.float32)
    with seqkern.backend("cpu"):
        output, h_n, c_n, gates, cells = OPS.lstm_forward(*args, False)
    assert gates.numel() == 0 and cells.numel() == 0
    expected = torch_lstm_layer(*args)
    for got, want in zip((output, h_n, c_n), expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "case",
    [dict(seq_len=3, batch=2, input_size=3, hidden=4),
     dict(seq_len=4, batch=3, input_size=2, hidden=3, proj=2, reverse=True, lengths=[4, 2, 1]),
     dict(seq_len=3, batch=2, input_size=2, hidden=3, bias=False)],
    ids=["plain", "proj-reverse-packed", "no-bias"],
)
def test_gradcheck(case):
    assert gradcheck_op(_op_forward, _layer_args(**case))


def test_cell_gradcheck():
    assert gradcheck_op(_op_cell, [a.requires_grad_() for a in _cell_args(3, 2)])


def _opcheck_cases():
    for requires_grad in (True, False):
        for case in CASES[1:5]:
            args = _layer_args(**case, dtype=torch.float32, requires_grad=requires_grad)
            yield OPS.lstm_forward.default, (*args, requires_grad)
    cell = [a.float() if a is not None else None for a in _cell_args(3, 6)]
    yield OPS.lstm_cell_forward.default, tuple(a.clone().requires_grad_() for a in cell)
    yield OPS.lstm_cell_forward.default, (*cell[:3], None, None)
    hy, cy, workspace = OPS.lstm_cell_forward(*cell)
    yield OPS.lstm_cell_backward.default, (torch.randn_like(hy), torch.randn_like(cy), cell[2], cy, workspace, True)
    args = _layer_args(5, 3, 4, 6, proj=2, dtype=torch.float32, requires_grad=False)
    output, h_n, c_n, gates, cells = OPS.lstm_forward(*args, True)
    yield OPS.lstm_backward.default, (torch.randn_like(output), torch.randn_like(h_n), torch.randn_like(c_n), args[0], args[1], args[2], args[3], args[4], args[7], output, gates, cells, None, None, None, 0.0, None, False, True)


@pytest.mark.parametrize("op,args", list(_opcheck_cases()))
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


@pytest.mark.slow
def test_torch_compile_fullgraph():
    check_compiled_module(seqkern.nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3), torch.randn(5, 3, 4))


# ------------------------------------------------------------------------------------------------
# Triton kernels, under the interpreter on CPU tensors (small shapes: every program runs in Python).
# ------------------------------------------------------------------------------------------------
TRITON_CASES = [
    dict(seq_len=1, batch=1, input_size=1, hidden=1),
    dict(seq_len=4, batch=3, input_size=5, hidden=17),
    dict(seq_len=5, batch=3, input_size=4, hidden=33, proj=7, reverse=True),
    dict(seq_len=6, batch=4, input_size=3, hidden=9, bias=False, lengths=[6, 4, 4, 1]),
    dict(seq_len=5, batch=5, input_size=3, hidden=17, proj=5, lengths=[5, 5, 3, 2, 1], reverse=True),
]


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", TRITON_CASES, ids=case_id)
def test_triton_sequence_kernel_against_torch(case, dtype):
    _check_against_torch(_op_forward, case, dtype, "triton")


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CELL_CASES[:2] + [dict(batch=5, hidden=33)], ids=case_id)
def test_triton_cell_kernel_against_formula(case, dtype):
    check_op(_op_cell, _ref_cell, _cell_args(**case), CELL_NAMES, dtype, "triton")


@pytest.mark.triton
def test_triton_module_matches_torch():
    torch.manual_seed(0)
    theirs = torch.nn.LSTM(3, 9, num_layers=2, bidirectional=True)
    ours = seqkern.nn.LSTM(3, 9, num_layers=2, bidirectional=True)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 2, 3)
    with seqkern.backend("triton"):
        out, (h, c) = ours(x)
    want, (want_h, want_c) = theirs(x)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c, want_c, atol=1e-5, rtol=1e-5)
