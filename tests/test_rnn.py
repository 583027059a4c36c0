"""The Elman RNN ops (tanh and relu): every implementation (C++, Triton under the interpreter) under the
correctness rule against torch.nn.RNN's own kernels stepped in the test (the cell op: the formula composed in the
test), gradcheck, opcheck and torch.compile."""
from __future__ import annotations

import pytest
import torch

import seqkern
from helpers import (
    CELL_CASES, SINGLE_STATE_LAYER_CASES, SINGLE_STATE_TRITON_CASES, case_id, cell_args, check_compiled_module,
    check_op, composed_rnn_cell, gradcheck_op, layer_args, torch_single_state_layer,
)

OPS = torch.ops.seqkern
TENSOR_NAMES = ("input", "h0", "w_ih", "w_hh", "b_ih", "b_hh")
CELL_NAMES = ("gates_x", "gates_h", "b_ih", "b_hh")
NONLINEARITIES = {"tanh": False, "relu": True}


def _layer_args(*sizes, relu, **options):
    """Arguments of rnn_forward."""
    return (*layer_args(1, *sizes, **options), relu)


def _cell_args(batch, hidden, relu, bias=True):
    return (*cell_args(1, batch, hidden, bias=bias, state=False), relu)


def _op_forward(*args):
    return OPS.rnn_forward(*args)


def _op_cell(*args):
    return (OPS.rnn_cell_forward(*args),)


_ref_cell = composed_rnn_cell


def _ref_forward(*args):
    """rnn_forward's arguments (..., batch_sizes, reverse, relu) -> torch.nn.RNN's kernel stepped."""
    *layer, relu = args
    return torch_single_state_layer(torch._VF.rnn_relu if relu else torch._VF.rnn_tanh, *layer)


CASES = SINGLE_STATE_LAYER_CASES
TRITON_CASES = SINGLE_STATE_TRITON_CASES
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cpu_kernel_against_torch(case, dtype, nonlinearity):
    args = _layer_args(**case, relu=NONLINEARITIES[nonlinearity])
    check_op(_op_forward, _ref_forward, args, TENSOR_NAMES, dtype, "cpu")


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CELL_CASES, ids=case_id)
def test_cpu_cell_kernel_against_formula(case, dtype, nonlinearity):
    args = _cell_args(**case, relu=NONLINEARITIES[nonlinearity])
    check_op(_op_cell, _ref_cell, args, CELL_NAMES, dtype, "cpu")


@pytest.mark.triton
@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", TRITON_CASES, ids=case_id)
def test_triton_sequence_kernel_against_torch(case, dtype, nonlinearity):
    args = _layer_args(**case, relu=NONLINEARITIES[nonlinearity])
    check_op(_op_forward, _ref_forward, args, TENSOR_NAMES, dtype, "triton")


@pytest.mark.triton
@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CELL_CASES[:2], ids=case_id)
def test_triton_cell_kernel_against_formula(case, dtype, nonlinearity):
    args = _cell_args(**case, relu=NONLINEARITIES[nonlinearity])
    check_op(_op_cell, _ref_cell, args, CELL_NAMES, dtype, "triton")


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
@pytest.mark.parametrize("case", [dict(seq_len=3, batch=2, input_size=3, hidden=4),
                                  dict(seq_len=4, batch=3, input_size=2, hidden=3, reverse=True, lengths=[4, 2, 1]),
                                  dict(seq_len=3, batch=2, input_size=2, hidden=3, bias=False)], ids=case_id)
def test_gradcheck(case, nonlinearity):
    assert gradcheck_op(_op_forward, _layer_args(**case, relu=NONLINEARITIES[nonlinearity]))


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_cell_gradcheck(nonlinearity):
    args = [a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in _cell_args(3, 4, NONLINEARITIES[nonlinearity])]
    assert gradcheck_op(_op_cell, args)


def _opcheck_cases():
    for relu in (False, True):
        for case in CASES[1:5]:
            yield OPS.rnn_forward.default, _layer_args(**case, relu=relu, dtype=torch.float32)
        cell = [a.float().requires_grad_() if isinstance(a, torch.Tensor) else a for a in _cell_args(3, 6, relu)]
        yield OPS.rnn_cell_forward.default, tuple(cell)
        hy = OPS.rnn_cell_forward(*[a.detach() if isinstance(a, torch.Tensor) else a for a in cell])
        yield OPS.rnn_cell_backward.default, (torch.randn_like(hy), hy, relu, True)
        args = _layer_args(5, 3, 4, 6, relu=relu, dtype=torch.float32, requires_grad=False)
        output, h_n = OPS.rnn_forward(*args)
        yield OPS.rnn_backward.default, (torch.randn_like(output), torch.randn_like(h_n), *args[:4], output, None, None, None, False, relu, True)


@pytest.mark.parametrize("op,args", list(_opcheck_cases()))
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


@pytest.mark.slow
def test_torch_compile_fullgraph():
    check_compiled_module(seqkern.nn.RNN(4, 6, num_layers=2, bidirectional=True, nonlinearity="relu"), torch.randn(5, 3, 4))
