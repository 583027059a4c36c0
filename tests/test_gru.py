"""The GRU ops: every implementation (C++, Triton under the interpreter) against the float64 reference
under the correctness rule, gradcheck, opcheck and torch.compile."""
from __future__ import annotations

import pytest
import torch

import seqkern
from seqkern import reference
from helpers import batch_sizes_for, check_compiled_module, check_op, gradcheck_op

OPS = torch.ops.seqkern
TENSOR_NAMES = ("input", "h0", "w_ih", "w_hh", "b_ih", "b_hh")
CELL_NAMES = ("gates_x", "gates_h", "hx", "b_ih", "b_hh")


def _layer_args(seq_len, batch, input_size, hidden, bias=True, lengths=None, reverse=False, requires_grad=True,
                dtype=torch.float64):
    """Arguments of gru_forward without save_workspace."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).requires_grad_(requires_grad)

    scale = hidden ** -0.5
    return (
        rand(seq_len, batch, input_size), rand(batch, hidden),
        rand(3 * hidden, input_size, scale=scale), rand(3 * hidden, hidden, scale=scale),
        rand(3 * hidden, scale=scale) if bias else None, rand(3 * hidden, scale=scale) if bias else None,
        batch_sizes_for(lengths, seq_len) if lengths is not None else None, reverse,
    )


def _cell_args(batch, hidden, bias=True):
    gen = torch.Generator().manual_seed(0)
    shapes = [(batch, 3 * hidden), (batch, 3 * hidden), (batch, hidden)]
    args = [torch.randn(*s, generator=gen, dtype=torch.float64) for s in shapes]
    return (*args, *([torch.randn(3 * hidden, generator=gen, dtype=torch.float64) for _ in range(2)] if bias else [None, None]))


def _op_forward(*args):
    return OPS.gru_forward(*args, True)[:2]


def _ref_forward(*args):
    return reference.gru_forward(*args, False)[:2]


def _op_cell(*args):
    return OPS.gru_cell_forward(*args)[:1]


def _ref_cell(*args):
    return reference.gru_cell_forward(*args)[:1]


CASES = [
    dict(seq_len=1, batch=1, input_size=1, hidden=1),
    dict(seq_len=7, batch=3, input_size=5, hidden=63),
    dict(seq_len=9, batch=5, input_size=4, hidden=127, reverse=True),
    dict(seq_len=6, batch=4, input_size=3, hidden=17, bias=False, lengths=[6, 4, 4, 1]),
    dict(seq_len=6, batch=4, input_size=3, hidden=17, lengths=[6, 5, 2, 1], reverse=True),
    dict(seq_len=40, batch=32, input_size=33, hidden=256),
]
CELL_CASES = [dict(batch=1, hidden=1), dict(batch=3, hidden=17, bias=False), dict(batch=64, hidden=127)]
TRITON_CASES = [CASES[0], dict(seq_len=4, batch=3, input_size=5, hidden=17), CASES[3], CASES[4]]


def _id(case):
    return "-".join(f"{k}={v}" for k, v in case.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_cpu_kernel_against_reference(case, dtype):
    check_op(_op_forward, _ref_forward, _layer_args(**case), TENSOR_NAMES, dtype, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CELL_CASES, ids=_id)
def test_cpu_cell_kernel_against_reference(case, dtype):
    check_op(_op_cell, _ref_cell, _cell_args(**case), CELL_NAMES, dtype, "cpu")


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", TRITON_CASES, ids=_id)
def test_triton_sequence_kernel_against_reference(case, dtype):
    check_op(_op_forward, _ref_forward, _layer_args(**case), TENSOR_NAMES, dtype, "triton")


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CELL_CASES[:2], ids=_id)
def test_triton_cell_kernel_against_reference(case, dtype):
    check_op(_op_cell, _ref_cell, _cell_args(**case), CELL_NAMES, dtype, "triton")


@pytest.mark.parametrize("case", [CASES[1], dict(seq_len=4, batch=3, input_size=2, hidden=3, reverse=True, lengths=[4, 2, 1]),
                                  dict(seq_len=3, batch=2, input_size=2, hidden=3, bias=False)], ids=_id)
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
    yield OPS.gru_backward.default, (torch.randn_like(output), torch.randn_like(h_n), args[0], args[1], args[2], args[3], output, workspace, None, False, True)


@pytest.mark.parametrize("op,args", list(_opcheck_cases()))
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


@pytest.mark.slow
def test_torch_compile_fullgraph():
    check_compiled_module(seqkern.nn.GRU(4, 6, num_layers=2, bidirectional=True), torch.randn(5, 3, 4))
