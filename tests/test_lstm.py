"""The LSTM ops themselves: every implementation (C++, Triton under the interpreter) against the float64
reference under the correctness rule, gradcheck, opcheck, torch.compile, and the backend switch."""
from __future__ import annotations

import pytest
import torch

import seqkern
from seqkern import reference
from helpers import assert_all_rule

OPS = torch.ops.seqkern
FORWARD_OUTPUTS = ("output", "h_n", "c_n")


def _layer_args(seq_len, batch, input_size, hidden, proj=0, bias=True, lengths=None, reverse=False,
                dtype=torch.float64, requires_grad=True, seed=0):
    """Arguments of lstm_forward (without save_workspace), drawn in float64 then cast to `dtype`."""
    gen = torch.Generator().manual_seed(seed)
    out_size = proj or hidden

    def rand(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
        return t.requires_grad_(requires_grad)

    scale = hidden ** -0.5
    batch_sizes = None
    if lengths is not None:
        lengths = torch.tensor(sorted(lengths, reverse=True))
        batch_sizes = torch.tensor([(lengths > t).sum().item() for t in range(seq_len)], dtype=torch.int64)
    return (
        rand(seq_len, batch, input_size), rand(batch, out_size), rand(batch, hidden),
        rand(4 * hidden, input_size, scale=scale), rand(4 * hidden, out_size, scale=scale),
        rand(4 * hidden, scale=scale) if bias else None, rand(4 * hidden, scale=scale) if bias else None,
        rand(out_size, hidden, scale=scale) if proj else None, batch_sizes, reverse,
    )


def _cast(args, dtype):
    return tuple(a.detach().to(dtype).requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


TENSOR_NAMES = ("input", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")


def _forward_backward(run, args, cotangents):
    """Outputs and the gradient of every floating-point argument under a weighted sum of the outputs."""
    outputs = run(*args)
    results = dict(zip(FORWARD_OUTPUTS, outputs))
    loss = sum((r.double() * c).sum() for r, c in zip(outputs, cotangents))
    tensors = {n: a for n, a in zip(TENSOR_NAMES, args) if isinstance(a, torch.Tensor) and a.requires_grad}
    grads = torch.autograd.grad(loss, list(tensors.values()))
    results.update({f"grad_{n}": g for n, g in zip(tensors, grads)})
    return results


def _op_forward(*args):
    return OPS.lstm_forward(*args, True)[:3]


def _ref_forward(*args):
    return reference.lstm_forward(*args, False)[:3]


def _torch_same_dtype(*args):
    """PyTorch's own LSTM math in the same dtype, for the rule's baseline (the reference run in `dtype`)."""
    return _ref_forward(*args)


CASES = [
    dict(seq_len=1, batch=1, input_size=1, hidden=1),
    dict(seq_len=7, batch=3, input_size=5, hidden=63),
    dict(seq_len=9, batch=5, input_size=4, hidden=127, proj=31, reverse=True),
    dict(seq_len=6, batch=4, input_size=3, hidden=17, bias=False, lengths=[6, 4, 4, 1]),
    dict(seq_len=6, batch=4, input_size=3, hidden=17, proj=5, lengths=[6, 5, 2, 1], reverse=True),
    dict(seq_len=40, batch=32, input_size=33, hidden=256),
]


def _check_against_reference(run, case, dtype, backend):
    args64 = _layer_args(**case)
    outputs = _ref_forward(*_cast(args64, torch.float64))
    cotangents = [torch.randn_like(o) for o in outputs]
    with seqkern.backend("reference"):
        expected = _forward_backward(_ref_forward, _cast(args64, torch.float64), cotangents)
        baseline = _forward_backward(_torch_same_dtype, _cast(args64, dtype), cotangents)
    with seqkern.backend(backend):
        got = _forward_backward(run, _cast(args64, dtype), cotangents)
    assert_all_rule(got, baseline, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_cpu_kernel_against_reference(case, dtype):
    _check_against_reference(_op_forward, case, dtype, "cpu")


def test_inference_returns_no_workspace():
    args = _layer_args(5, 3, 4, 6, requires_grad=False, dtype=torch.float32)
    with seqkern.backend("cpu"):
        output, h_n, c_n, gates, cells = OPS.lstm_forward(*args, False)
    assert gates.numel() == 0 and cells.numel() == 0
    expected = reference.lstm_forward(*args, False)
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
    args = _layer_args(**case)
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]

    def fn(*tensors_in):
        it = iter(tensors_in)
        full = [next(it) if isinstance(a, torch.Tensor) and a.requires_grad else a for a in args]
        return _op_forward(*full)

    assert torch.autograd.gradcheck(fn, tensors)


def test_cell_gradcheck():
    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True) for s in [(3, 8), (3, 8), (3, 2), (8,), (8,)]]
    assert torch.autograd.gradcheck(lambda *a: OPS.lstm_cell_forward(*a)[:2], args)


def _opcheck_cases():
    for requires_grad in (True, False):
        for case in CASES[1:5]:
            args = _layer_args(**case, dtype=torch.float32, requires_grad=requires_grad)
            yield OPS.lstm_forward.default, (*args, requires_grad)
    gx, gh, cx = torch.randn(3, 24), torch.randn(3, 24), torch.randn(3, 6)
    yield OPS.lstm_cell_forward.default, (gx.requires_grad_(), gh.requires_grad_(), cx.requires_grad_(), torch.randn(24), torch.randn(24))
    yield OPS.lstm_cell_forward.default, (gx, gh, cx, None, None)
    hy, cy, workspace = OPS.lstm_cell_forward(gx, gh, cx, None, None)
    yield OPS.lstm_cell_backward.default, (torch.randn(3, 6), torch.randn(3, 6), cx, cy, workspace, True)
    args = _layer_args(5, 3, 4, 6, proj=2, dtype=torch.float32, requires_grad=False)
    output, h_n, c_n, gates, cells = OPS.lstm_forward(*args, True)
    yield OPS.lstm_backward.default, (torch.randn_like(output), torch.randn_like(h_n), torch.randn_like(c_n), args[0], args[1], args[2], args[3], args[4], args[7], output, gates, cells, None, False, True)


@pytest.mark.parametrize("op,args", list(_opcheck_cases()))
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


@pytest.mark.slow
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    module = seqkern.nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3)
    compiled = torch.compile(module, fullgraph=True)
    x = torch.randn(5, 3, 4, requires_grad=True)
    out, (h, c) = compiled(x)
    eager_out, (eager_h, eager_c) = module(x)
    torch.testing.assert_close(out, eager_out)
    torch.testing.assert_close(c, eager_c)
    grad_compiled = torch.autograd.grad(out.sum() + h.sum(), x)[0]
    grad_eager = torch.autograd.grad(eager_out.sum() + eager_h.sum(), x)[0]
    torch.testing.assert_close(grad_compiled, grad_eager)


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
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_triton_sequence_kernel_against_reference(case, dtype):
    _check_against_reference(_op_forward, case, dtype, "triton")


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch,hidden,bias", [(1, 1, True), (3, 17, True), (5, 33, False)])
def test_triton_cell_kernel_against_reference(batch, hidden, bias, dtype):
    gen = torch.Generator().manual_seed(0)
    shapes = [(batch, 4 * hidden), (batch, 4 * hidden), (batch, hidden)] + ([(4 * hidden,)] * 2 if bias else [])
    args64 = [torch.randn(*s, generator=gen, dtype=torch.float64) for s in shapes] + ([] if bias else [None, None])

    def run(dt, backend, fn):
        args = [a.to(dt).requires_grad_() if a is not None else None for a in args64]
        with seqkern.backend(backend):
            hy, cy = fn(*args)[:2]
            cot = [torch.randn(batch, hidden, generator=torch.Generator().manual_seed(1), dtype=torch.float64)] * 2
            loss = (hy.double() * cot[0]).sum() + (cy.double() * 2 * cot[1]).sum()
            tensors = [a for a in args if a is not None]
            grads = torch.autograd.grad(loss, tensors)
        names = ["gates_x", "gates_h", "cx", "b_ih", "b_hh"][: len(tensors)]
        return {"hy": hy, "cy": cy, **{f"grad_{n}": g for n, g in zip(names, grads)}}

    expected = run(torch.float64, "reference", reference.lstm_cell_forward)
    baseline = run(dtype, "reference", reference.lstm_cell_forward)
    got = run(dtype, "triton", OPS.lstm_cell_forward)
    assert_all_rule(got, baseline, expected)


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


# ------------------------------------------------------------------------------------------------
# Backend selection.
# ------------------------------------------------------------------------------------------------
def test_backend_context_and_environment(monkeypatch):
    assert seqkern.current_backend() == "auto"
    with seqkern.backend("reference"):
        assert seqkern.current_backend() == "reference"
        with seqkern.backend("cpu"):
            assert seqkern.current_backend() == "cpu"
        assert seqkern.current_backend() == "reference"
    monkeypatch.setenv("SEQKERN_BACKEND", "triton")
    assert seqkern.current_backend() == "triton"
    monkeypatch.setenv("SEQKERN_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"\$SEQKERN_BACKEND: expected one of .* got 'fast'"):
        seqkern.current_backend()
    with pytest.raises(ValueError, match=r"seqkern.backend\(name\): expected one of"):
        with seqkern.backend("gpu"):
            pass


def test_backend_resolution():
    from seqkern.backends import resolve
    from seqkern.ops.lstm import SUPPORTED_DTYPES as dtypes

    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert resolve("lstm", cpu, torch.float32, dtypes) == "cpu"
    assert resolve("lstm", cpu, torch.float16, dtypes) == "reference"  # auto falls back for a dtype no kernel has
    assert resolve("lstm", meta, torch.float32, dtypes) == "reference"
    with seqkern.backend("cpu"), pytest.raises(TypeError, match="float16"):
        resolve("lstm", cpu, torch.float16, dtypes)
    with seqkern.backend("cpu"), pytest.raises(ValueError, match="meta"):
        resolve("lstm", meta, torch.float32, dtypes)


def test_float16_falls_back_to_reference():
    module = seqkern.nn.LSTM(3, 4).half()
    out, _ = module(torch.randn(2, 1, 3).half())
    assert out.dtype == torch.float16
