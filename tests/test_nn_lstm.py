"""seqkern.nn.LSTM and seqkern.nn.LSTMCell as drop-ins for torch.nn's: outputs, final states and every
gradient under the correctness rule, across constructor options and input layouts; the module contract
(state_dict, copies, DDP); bad input."""
from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import seqkern
from helpers import assert_all_rule, compare_recurrent

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _make_pair(dtype, **options):
    """(seqkern module, torch.nn module) with the same weights, in `dtype`; weights drawn in float64."""
    torch.manual_seed(0)
    theirs = torch.nn.LSTM(**options).double()
    ours = seqkern.nn.LSTM(**options).double()
    ours.load_state_dict(theirs.state_dict())
    return ours.to(dtype), theirs.to(dtype)


def _compare(dtype, options, seq_len, batch, with_hx=True, lengths=None, backend="cpu"):
    compare_recurrent(torch.nn.LSTM, seqkern.nn.LSTM, dtype, options, seq_len, batch, with_hx=with_hx,
                      lengths=lengths, backend=backend)


OPTIONS = [
    dict(input_size=5, hidden_size=7),
    dict(input_size=3, hidden_size=63, num_layers=2, bias=False, batch_first=True, bidirectional=True),
    dict(input_size=16, hidden_size=127, proj_size=31, bidirectional=True),
    dict(input_size=1, hidden_size=1, batch_first=True),
    dict(input_size=12, hidden_size=9, num_layers=3, proj_size=4, bias=False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("seq_len,batch", [(1, 1), (9, 3), (33, 64)])
def test_lstm_matches_torch(dtype, options, seq_len, batch):
    _compare(dtype, options, seq_len, batch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_lstm_large_hidden(dtype):
    _compare(dtype, dict(input_size=64, hidden_size=500, num_layers=2), seq_len=7, batch=5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", OPTIONS[:3], ids=["plain", "bidir-batch_first", "proj-bidir"])
def test_lstm_packed_sequence(dtype, options):
    _compare(dtype, options, seq_len=11, batch=5, lengths=torch.tensor([4, 11, 1, 7, 11]))
    _compare(dtype, options, seq_len=6, batch=3, with_hx=False, lengths=torch.tensor([6, 6, 2]))


def test_lstm_without_initial_state_and_unbatched():
    ours, theirs = _make_pair(torch.float32, input_size=4, hidden_size=6, num_layers=2, proj_size=3)
    x = torch.randn(10, 4)
    got_out, (got_h, got_c) = ours(x)
    want_out, (want_h, want_c) = theirs(x)
    assert got_out.shape == want_out.shape == (10, 3) and got_h.shape == want_h.shape == (2, 3)
    torch.testing.assert_close(got_out, want_out)
    torch.testing.assert_close(got_c, want_c)
    hx = (torch.randn(2, 3), torch.randn(2, 6))
    torch.testing.assert_close(ours(x, hx)[0], theirs(x, hx)[0])


def test_lstm_dropout_between_layers_matches_torch():
    ours, theirs = _make_pair(torch.float32, input_size=4, hidden_size=8, num_layers=3, dropout=0.5)
    x = torch.randn(7, 3, 4)
    torch.manual_seed(5)
    got = ours(x)[0]
    torch.manual_seed(5)
    want = theirs(x)[0]
    torch.testing.assert_close(got, want)  # the same generator draws give the same dropout masks
    ours.eval()
    torch.testing.assert_close(ours(x)[0], theirs.eval()(x)[0])


def test_lstm_zero_batch_and_zero_length():
    ours, theirs = _make_pair(torch.float32, input_size=4, hidden_size=6, bidirectional=True)
    out, (h, c) = ours(torch.randn(5, 0, 4))
    want_out, (want_h, want_c) = theirs(torch.randn(5, 0, 4))
    assert out.shape == want_out.shape and h.shape == want_h.shape and c.shape == want_c.shape
    with pytest.raises(RuntimeError, match="sequence length"):
        ours(torch.randn(0, 2, 4))


def test_lstm_module_contract(tmp_path):
    theirs = torch.nn.LSTM(4, 6, num_layers=2, proj_size=3, bidirectional=True)
    ours = seqkern.nn.LSTM(4, 6, num_layers=2, proj_size=3, bidirectional=True)
    assert isinstance(ours, torch.nn.RNNBase) and ours.mode == theirs.mode
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()]
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    ours.flatten_parameters()
    assert len(ours.all_weights) == 4 and len(ours.all_weights[0]) == 5
    x = torch.randn(5, 2, 4)
    expected = ours(x)[0]
    for clone in (copy.deepcopy(ours), _save_load(ours, tmp_path)):
        assert type(clone) is seqkern.nn.LSTM
        torch.testing.assert_close(clone(x)[0], expected)
    doubled = copy.deepcopy(ours).double()
    assert doubled(x.double())[0].dtype == torch.float64
    assert ours.to(torch.bfloat16)(x.bfloat16())[0].dtype == torch.bfloat16


def _save_load(module, tmp_path):
    path = tmp_path / "lstm.pt"
    torch.save(module, path)
    return torch.load(path, weights_only=False)


def test_lstm_initialization_matches_torch():
    torch.manual_seed(3)
    theirs = torch.nn.LSTM(4, 6, num_layers=2, proj_size=2)
    torch.manual_seed(3)
    ours = seqkern.nn.LSTM(4, 6, num_layers=2, proj_size=2)
    for (name, a), (_, b) in zip(theirs.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(a, b, msg=name)


# ------------------------------------------------------------------------------------------------
# LSTMCell
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("input_size,hidden,batch,bias", [(5, 7, 3, True), (1, 1, 1, False), (33, 127, 64, True)])
def test_lstm_cell_matches_torch(dtype, input_size, hidden, batch, bias):
    _compare_cell(dtype, input_size, hidden, batch, bias, backend="cpu")


def _leaf(t: torch.Tensor, dtype) -> torch.Tensor:
    return t.detach().to(dtype).requires_grad_()


def _compare_cell(dtype, input_size, hidden, batch, bias, backend, with_hx=True):
    torch.manual_seed(0)
    theirs = torch.nn.LSTMCell(input_size, hidden, bias=bias).double()
    ours = seqkern.nn.LSTMCell(input_size, hidden, bias=bias).double()
    ours.load_state_dict(theirs.state_dict())
    ref = copy.deepcopy(ours)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    x64 = torch.randn(batch, input_size, dtype=torch.float64)
    hx64 = (torch.randn(batch, hidden, dtype=torch.float64), torch.randn(batch, hidden, dtype=torch.float64)) if with_hx else None
    cot = (torch.randn(batch, hidden, dtype=torch.float64), torch.randn(batch, hidden, dtype=torch.float64))

    def run(module, dt):
        x = _leaf(x64, dt)
        hx = tuple(_leaf(h, dt) for h in hx64) if hx64 is not None else None
        h, c = module(x, hx)
        module.zero_grad()
        ((h.double() * cot[0]).sum() + (c.double() * cot[1]).sum()).backward()
        results = {"h": h, "c": c, "grad_input": x.grad}
        if hx is not None:
            results.update(grad_h0=hx[0].grad, grad_c0=hx[1].grad)
        results.update({f"grad_{n}": p.grad for n, p in module.named_parameters()})
        return results

    with seqkern.backend(backend):
        got = run(ours, dtype)
    with seqkern.backend("reference"):
        expected = run(ref, torch.float64)
    assert_all_rule(got, run(theirs, dtype), expected)


def test_lstm_cell_unbatched_and_default_state():
    torch.manual_seed(0)
    theirs = torch.nn.LSTMCell(4, 6)
    ours = seqkern.nn.LSTMCell(4, 6)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4)
    for got, want in zip(ours(x), theirs(x)):
        assert got.shape == want.shape == (6,)
        torch.testing.assert_close(got, want)
    for got, want in zip(ours(x.unsqueeze(0)), theirs(x.unsqueeze(0))):
        torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, raised before any kernel runs.
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def lstm():
    return seqkern.nn.LSTM(4, 6, num_layers=2, proj_size=3)


@pytest.mark.parametrize(
    "make_args,error,pattern",
    [
        (lambda: (torch.randn(5, 2, 7),), ValueError, r"input: .*input_size=4.*\(5, 2, 7\)"),
        (lambda: (torch.randn(5, 2, 4, 1),), ValueError, r"input: expected a 2-D or 3-D tensor, got shape \(5, 2, 4, 1\)"),
        (lambda: (torch.randn(4),), ValueError, r"input: expected a 2-D or 3-D"),
        (lambda: (torch.ones(5, 2, 4, dtype=torch.int64),), TypeError, r"input: expected a floating-point tensor, got dtype torch.int64"),
        (lambda: (torch.randn(5, 2, 4, dtype=torch.float64),), TypeError, r"input: expected dtype torch.float32 .*got torch.float64"),
        (lambda: (torch.randn(5, 2, 4, device="meta"),), TypeError, r"input: expected a tensor on cpu .*got one on meta"),
        (lambda: ([[1.0]],), TypeError, r"input: expected a torch.Tensor, got list"),
        (lambda: (torch.randn(5, 2, 4), (torch.randn(2, 2, 6), torch.randn(2, 2, 6))), ValueError, r"hx\[0\]: expected shape \(2, 2, 3\), got \(2, 2, 6\)"),
        (lambda: (torch.randn(5, 2, 4), (torch.randn(2, 2, 3), torch.randn(1, 2, 6))), ValueError, r"hx\[1\]: expected shape \(2, 2, 6\), got \(1, 2, 6\)"),
        (lambda: (torch.randn(5, 2, 4), (torch.randn(2, 3), torch.randn(2, 6))), ValueError, r"hx\[0\]: expected shape \(2, 2, 3\), got \(2, 3\)"),
        (lambda: (torch.randn(5, 2, 4), (torch.randn(2, 2, 3).double(), torch.randn(2, 2, 6))), TypeError, r"hx\[0\]: expected dtype torch.float32"),
        (lambda: (torch.randn(5, 2, 4), (torch.randn(2, 2, 3), torch.ones(2, 2, 6, dtype=torch.int32))), TypeError, r"hx\[1\]: expected a floating-point"),
        (lambda: (torch.randn(5, 2, 4), torch.randn(2, 2, 3)), ValueError, r"hx: expected a tuple \(h_0, c_0\)"),
        (lambda: (torch.randn(5, 2, 4), (torch.randn(2, 2, 3),)), ValueError, r"hx: expected 2 tensor"),
    ],
)
def test_lstm_bad_input(lstm, make_args, error, pattern):
    with pytest.raises(error, match=pattern):
        lstm(*make_args())


@pytest.mark.parametrize(
    "make_args,error,pattern",
    [
        (lambda: (torch.randn(3, 5),), ValueError, r"input: .*input_size=4"),
        (lambda: (torch.randn(3, 2, 4),), ValueError, r"input: expected a 1-D or 2-D"),
        (lambda: (torch.ones(3, 4, dtype=torch.int64),), TypeError, r"input: expected a floating-point"),
        (lambda: (torch.randn(3, 4), (torch.randn(2, 6), torch.randn(3, 6))), ValueError, r"hx\[0\]: expected shape \(3, 6\), got \(2, 6\)"),
        (lambda: (torch.randn(3, 4), (torch.randn(3, 6), torch.randn(3, 6, dtype=torch.float64))), TypeError, r"hx\[1\]: expected dtype"),
    ],
)
def test_lstm_cell_bad_input(make_args, error, pattern):
    cell = seqkern.nn.LSTMCell(4, 6)
    with pytest.raises(error, match=pattern):
        cell(*make_args())


def test_lstm_cell_zero_batch():
    cell = seqkern.nn.LSTMCell(4, 6)
    h, c = cell(torch.randn(0, 4))
    assert h.shape == c.shape == (0, 6)


# ------------------------------------------------------------------------------------------------
# DistributedDataParallel, two processes on gloo.
# ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, state, inputs, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = seqkern.nn.LSTM(4, 6, num_layers=2, bidirectional=True)
    model.load_state_dict(state)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    out, (h, c) = ddp(inputs[rank])
    (out.sum() + h.sum() + c.sum()).backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters()}, result_path)
    dist.destroy_process_group()


@pytest.mark.slow
def test_lstm_distributed_data_parallel(tmp_path):
    torch.manual_seed(0)
    single = seqkern.nn.LSTM(4, 6, num_layers=2, bidirectional=True)
    inputs = [torch.randn(5, 3, 4) for _ in range(2)]
    for x in inputs:  # DDP averages the gradients of the two ranks
        out, (h, c) = single(x)
        ((out.sum() + h.sum() + c.sum()) / 2).backward()
    result_path = tmp_path / "grads.pt"
    mp.spawn(_ddp_worker, args=(2, _free_port(), single.state_dict(), inputs, str(result_path)), nprocs=2)
    grads = torch.load(result_path)
    for name, p in single.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)
