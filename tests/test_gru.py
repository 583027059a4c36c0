"""The GRU ops: every implementation (C++, Triton under the interpreter) under the correctness rule against
torch.nn.GRU's own kernel stepped in the test (the cell op: the formula composed in the test), gradcheck, opcheck
and torch.compile."""
from __future__ import annotations

import pytest
import torch

import seqkern
from helpers import (
    CELL_CASES, SINGLE_STATE_LAYER_CASES, SINGLE_STATE_TRITON_CASES, case_id, cell_args, check_compiled_module,
    check_op, composed_gru_cell, gradcheck_op, layer_args, torch_single_state_layer,
)

OPS = torch.ops.seqkern
TENSOR_NAMES = ("input", "h0", "w_ih", "w_hh", "b_ih", "b_hh")
CELL_NAMES = ("gates_x", "gates_h", "hx", "b_ih", "b_hh")


def _layer_args(*sizes, **options):
    """Arguments of gru_forward without save_workspace."""
    return layer_args(3, *sizes, **options)


def _cell_args(batch, hidden, bias=True):
    return cell_args(3, batch, hidden, bias=bias)


def _op_forward(*args):
    return OPS.gru_forward(*args, True)[:2]


def _ref_forward(*args):
    return torch_single_state_layer(torch._VF.gru, *args)


def _op_cell(*args):
    return OPS.gru_cell_forward(*args)[:1]


_ref_cell = composed_gru_cell


CASES = SINGLE_STATE_LAYER_CASES
TRITON_CASES = SINGLE_STATE_TRITON_CASES


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cpu_kernel_against_torch(case, dtype):
    check_op(_op_forward, _ref_forward, _layer_args(**case), TENSOR_NAMES, dtype, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CELL_CASES, ids=case_id)
def test_cpu_cell_kernel_against_formula(case, dtype):
    check_op(_op_cell, _ref_cell, _cell_args(**case), CELL_NAMES, dtype, "cpu")


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", TRITON_CASES, ids=case_id)
def test_triton_sequence_kernel_against_torch(case, dtype):
    check_op(_op_forward, _ref_forward, _layer_args(**case), TENSOR_NAMES, dtype, "triton")


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CELL_CASES[:2], ids=case_id)
def test_triton_cell_kernel_against_formula(case, dtype):
    check_op(_op_cell, _ref_cell, _cell_args(**case), CELL_NAMES, dtype, "triton")


@pytest.mark.parametrize("case", [CASES[1], dict(seq_len=4, batch=3, input_size=2, hidden=3, reverse=True, lengths=[4, 2, 1]),
                                  dict(seq_len=3, batch=2, input_size=2, hidden=3, bias=False)], ids=case_id)
def test_gradcheck(case):
    case = {**case, "hidden": min(case["hidden"], 5), "seq_len": min(case["seq_len"], 4)}
    assert gradcheck_op(_op_forward, _layer_args(**case))


def test_cell_gradcheck():
    assert gradcheck_op(_op_cell, [a.requires_grad_() for a in _cell_args(3, 4)])


def _opcheck_cases():
    for requires_grad in (True, False):
        for case in CASES[1:5]:
            args = _layer_args(**case, dtype=torch.float32, requires_grad=requires_grad)
            yield OPS.gru_forward.default, (*args, requires_grad)
    cell = [a.float().requires_grad_() if a is not None else None for a in _cell_args(3, 6)]
    yield OPS.gru_cell_forward.default, tuple(cell)
    hy, workspace = OPS.gru_cell_forward(*[c.detach() if c is not None else None for c in cell])
    yield OPS.gru_cell_backward.default, (torch.randn_like(hy), cell[2].detach(), workspace, True)
    args = _layer_args(5, 3, 4, 6, dtype=torch.float32, requires_grad=False)
    output, h_n, workspace = OPS.gru_forward(*args, True)
    yield OPS.gru_backward.default, (torch.randn_like(output), torch.randn_like(h_n), args[0], args[1], args[2], args[3], output, workspace, None, None, None, 0.0, None, False, True)


@pytest.mark.parametrize("op,args", list(_opcheck_cases()))
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


@pytest.mark.slow
def test_torch_compile_fullgraph():
    check_compiled_module(seqkern.nn.GRU(4, 6, num_layers=2, bidirectional=True), torch.randn(5, 3, 4))
