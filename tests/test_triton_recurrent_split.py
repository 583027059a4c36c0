"""The recurrent forward and backward with the hidden units split across programs (kernels/_recurrent_split.py,
issue 17 item 1) under the Triton interpreter, and the rule that picks a launch mode per shape (kernels/_recurrent.py
recurrent_mode; the backward follows it as the forward does).

Without a GPU the rule picks the row-block kernels, so the tests force a mode (`forced_mode`). "per_step" runs as
on a GPU (one launch per step over every program); "persistent" runs with one program per barrier group
(BLOCK_U >= H: under the interpreter programs run one after another, so a barrier among several would never
open), which still walks the single-launch time loop, the double buffer and the barrier's counter. The oracles
are torch.nn's kernels stepped in the test (helpers.py) and, for resets and lengths, the tests of
test_recurrent_state_flags.py run again in the forced mode; every output, final state and gradient (inputs,
weights, biases, initial states: the split backward, in the same forced mode) under the rule. The barrier's memory
ordering on a GPU is checked by the compiler tests (test_gpu_compile.py) and by reading, not here.
"""
from __future__ import annotations

import pytest
import torch

import seqkern
import test_recurrent_state_flags as state_flags
from helpers import case_id, check_op, layer_args, torch_lstm_layer, torch_single_state_layer
from seqkern.kernels._recurrent import (
    RESIDENT_BYTES, RESIDENT_MAX_HIDDEN, ROWS_MAX_HIDDEN, backward_mode, forced_mode, recurrent_mode, unit_blocks,
)

OPS = torch.ops.seqkern
pytestmark = pytest.mark.triton


def _lstm(*args):
    return OPS.lstm_forward(*args, True)[:3]


def _gru(*args):
    return OPS.gru_forward(*args, True)[:2]


def _rnn_tanh(*args):
    return OPS.rnn_forward(*args, False)


def _rnn_relu(*args):
    return OPS.rnn_forward(*args, True)


def _torch_gru(*args):
    return torch_single_state_layer(torch._VF.gru, *args)


def _torch_rnn_tanh(*args):
    return torch_single_state_layer(torch._VF.rnn_tanh, *args)


def _torch_rnn_relu(*args):
    return torch_single_state_layer(torch._VF.rnn_relu, *args)


# (op, torch oracle, gates, names of the tensor arguments)
OPS_UNDER_TEST = {
    "lstm": (_lstm, torch_lstm_layer, 4, ("input", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")),
    "gru": (_gru, _torch_gru, 3, ("input", "h0", "w_ih", "w_hh", "b_ih", "b_hh")),
    "rnn_tanh": (_rnn_tanh, _torch_rnn_tanh, 1, ("input", "h0", "w_ih", "w_hh", "b_ih", "b_hh")),
    "rnn_relu": (_rnn_relu, _torch_rnn_relu, 1, ("input", "h0", "w_ih", "w_hh", "b_ih", "b_hh")),
}
# (mode, BLOCK_U, RESIDENT[, BLOCK_B]): 33 units in 16-unit slices = 3 programs per batch block, the last one
# partial; the per-step mode's 64-row batch tiles (here 32 rows over 3 batch rows).
MODES = [("per_step", 16, False), ("per_step", 16, True), ("per_step", 32, False, 32), ("persistent", 64, True),
         ("persistent", 64, False)]
CASES = [
    dict(seq_len=5, batch=3, input_size=4, hidden=33),
    dict(seq_len=4, batch=18, input_size=3, hidden=17, bias=False),  # two batch blocks
    dict(seq_len=6, batch=4, input_size=3, hidden=20, lengths=[6, 4, 4, 1], reverse=True),  # batch_sizes
]


def _args(op: str, case: dict) -> tuple:
    gates = OPS_UNDER_TEST[op][2]
    return layer_args(gates, **case, cell_state=op == "lstm")


@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"{m[0]}-u{m[1]}{'-resident' if m[2] else ''}"
                         f"{'-b' + str(m[3]) if len(m) > 3 else ''}")
@pytest.mark.parametrize("op", list(OPS_UNDER_TEST))
def test_split_forward_against_torch(op, mode):
    run, oracle, _, names = OPS_UNDER_TEST[op]
    with forced_mode(*mode):
        check_op(run, oracle, _args(op, CASES[0]), names, torch.float32, "triton")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES[1:], ids=case_id)
@pytest.mark.parametrize("op", ["lstm", "gru", "rnn_tanh"])
def test_split_forward_dtypes_and_packed(op, case, dtype):
    run, oracle, _, names = OPS_UNDER_TEST[op]
    with forced_mode("per_step", 16):
        check_op(run, oracle, _args(op, case), names, dtype, "triton")


@pytest.mark.parametrize("family", ["lstm", "gru", "rnn"])
def test_split_forward_resets(family):
    """Resets (and for the row-block kernel zoneout, not implemented by the split kernel) against the loop
    composed in test_recurrent_state_flags.py; 20 units in 16-unit slices."""
    with forced_mode("per_step", 16):
        state_flags.test_resets_and_zoneout_match_composed_loop(
            family, dict(input_size=3, hidden_size=20), True, 0.0, False, "triton")


# (mode, family, use resets, zoneout, training, lengths, dtype): zoneout (mask and evaluation blend), resets and lengths
# together, through the split forward and backward. 20 units: two programs per batch block per step, or (persistent)
# one of 32.
ZONEOUT_CASES = [
    (("per_step", 16), "lstm", True, 0.3, True, None, torch.float32),
    (("per_step", 16), "gru", True, 0.4, False, [4, 1, 3], torch.float32),
    (("persistent", 32), "lstm", True, 0.4, False, [2, 4, 3], torch.float32),
    (("persistent", 32), "gru", True, 0.3, True, None, torch.float32),
    (("per_step", 16), "lstm", False, 0.3, True, [4, 2, 3], torch.bfloat16),
]


@pytest.mark.parametrize("mode,family,resets,zoneout,training,lengths,dtype", ZONEOUT_CASES,
                         ids=[f"{c[0][0]}-{c[1]}-{i}" for i, c in enumerate(ZONEOUT_CASES)])
def test_split_zoneout_resets_lengths(mode, family, resets, zoneout, training, lengths, dtype):
    """Against the loop composed in test_recurrent_state_flags.py (the same zoneout mask bits as the row-block
    kernels): every output, state and gradient."""
    with forced_mode(*mode):
        state_flags._check_against_composed("triton", family, dict(input_size=3, hidden_size=20), resets, zoneout,
                                            training, lengths, dtype)


@pytest.mark.parametrize("family", ["lstm", "gru", "rnn"])
def test_forced_mode_runs_the_split_backward(family, monkeypatch):
    """A forced split mode reaches the backward too (so every gradient test above checks the split backward):
    its launcher runs once per layer and direction, and its gradients match the row-block backward's."""
    from seqkern.kernels import _recurrent_split

    calls = []
    original = _recurrent_split.split_backward
    monkeypatch.setattr(_recurrent_split, "split_backward", lambda *a, **k: calls.append(a[1]) or original(*a, **k))
    module = {"lstm": seqkern.nn.LSTM, "gru": seqkern.nn.GRU, "rnn": seqkern.nn.RNN}[family](
        3, 20, bidirectional=True).double()
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    grads = []
    with seqkern.backend("triton"):
        for mode in (("rows",), ("per_step", 16)):
            with forced_mode(*mode):
                output, _ = module(x)
                grads.append(torch.autograd.grad(output.square().sum(), [x, *module.parameters()]))
    assert [call["mode"] for call in calls] == ["per_step", "per_step"]
    for split, rows in zip(grads[1], grads[0]):
        torch.testing.assert_close(split, rows, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("family", ["lstm", "gru"])
def test_split_forward_lengths_bidirectional(family):
    """lengths, both directions, against torch.nn on the packed sequence (test_recurrent_state_flags.py)."""
    with forced_mode("persistent", 32):
        state_flags.test_lengths_match_torch_packed(family, dict(input_size=3, hidden_size=20, bidirectional=True),
                                                    [2, 4, 1], "triton")


def test_split_forward_inference_returns_no_workspace():
    args = _args("lstm", CASES[0])
    args = tuple(a.detach().float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    with seqkern.backend("triton"):
        want = OPS.lstm_forward(*args, False)
        with forced_mode("per_step", 16):
            got = OPS.lstm_forward(*args, False)
    assert got[3].numel() == 0 and got[4].numel() == 0
    for ours, theirs in zip(got[:3], want[:3]):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


# The LSTM's projection in the split kernels (two phases per step): (mode, hidden, proj, dtype, lengths). 17 units /
# 5 columns in 16-unit slices: the second program has units but no columns; 33 / 20: two of three have columns.
PROJECTION_CASES = [
    (("per_step", 16), 17, 5, torch.float32, None),
    (("per_step", 16), 33, 20, torch.float64, [4, 3, 1]),
    (("per_step", 16, False, 32), 33, 20, torch.bfloat16, None),
    (("persistent", 64, True), 33, 20, torch.float32, [4, 4, 2]),
    (("persistent", 64), 17, 5, torch.float64, None),
]


@pytest.mark.parametrize("mode,hidden,proj,dtype,lengths", PROJECTION_CASES,
                         ids=[f"{c[0][0]}-h{c[1]}-p{c[2]}-{i}" for i, c in enumerate(PROJECTION_CASES)])
def test_split_projection_against_torch(mode, hidden, proj, dtype, lengths):
    """h_t = (o * tanh(c_t)) W_hr^T: every output, state and gradient (w_hr's included) against torch.nn's LSTM;
    reverse with packed lengths."""
    args = layer_args(4, 4, 3, 3, hidden, proj=proj, cell_state=True, lengths=lengths, reverse=lengths is not None)
    with forced_mode(*mode):
        check_op(_lstm, torch_lstm_layer, args, OPS_UNDER_TEST["lstm"][3], dtype, "triton")


@pytest.mark.parametrize("mode", [("per_step", 16), ("persistent", 32)], ids=lambda m: m[0])
def test_split_projection_zoneout_resets(mode):
    """The projection with zoneout (training mask) and resets against the loop composed in
    test_recurrent_state_flags.py."""
    with forced_mode(*mode):
        state_flags._check_against_composed("triton", "lstm", dict(input_size=3, hidden_size=20, proj_size=7), True,
                                            0.3, True, [4, 2, 3])


@pytest.mark.parametrize("mode", [("per_step", 16), ("persistent", 32)], ids=lambda m: m[0])
def test_split_projection_wider_than_hidden(mode):
    """The op (not torch.nn.LSTM) allows proj_size > hidden_size: the split grid then covers the P columns (programs
    past the units own columns only). Against torch's own LSTM kernel (torch._VF.lstm takes it)."""
    args = layer_args(4, 3, 2, 3, 6, proj=20, cell_state=True)
    with forced_mode(*mode):
        check_op(_lstm, torch_lstm_layer, args, OPS_UNDER_TEST["lstm"][3], torch.float32, "triton")


def test_persistent_under_the_interpreter_needs_one_program_per_barrier():
    args = tuple(a.detach().float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in _args("gru", CASES[0]))
    with seqkern.backend("triton"), forced_mode("persistent", 16), pytest.raises(ValueError, match="BLOCK_U"):
        OPS.gru_forward(*args, False)


def test_forced_mode_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        with forced_mode("cooperative"):
            pass


# ------------------------------------------------------------------------------------------------
# The selection rule.
# ------------------------------------------------------------------------------------------------
H100, A100 = 132, 108


def test_rule_without_a_gpu_keeps_the_row_block_kernel():
    assert recurrent_mode(1, 1024, 4, torch.float32, 0) == {"mode": "rows"}


@pytest.mark.parametrize("hidden", [1, 17, 64])
def test_rule_small_hidden_keeps_the_row_block_kernel(hidden):
    assert recurrent_mode(1, hidden, 4, torch.bfloat16, H100)["mode"] == "rows"


def test_rule_examples():
    # Batch 1, LSTM 1024 units: 64 programs of 16 units on one H100, the slice (128 KB) streamed from L1/L2.
    assert recurrent_mode(1, 1024, 4, torch.bfloat16, H100) == {
        "mode": "persistent", "BLOCK_B": 16, "BLOCK_U": 16, "RESIDENT": False, "num_warps": 2, "num_stages": 1,
        "maxnreg": 255}
    # ... 32 programs of 32 units in float32 (16-unit slices spilled with tf32x3).
    assert recurrent_mode(1, 1024, 4, torch.float32, H100)["BLOCK_U"] == 32
    # Batch 1, GRU 128 units in bfloat16: 8 programs, each slice 3 x 16 x 128 x 2 = 12 KB held in registers.
    assert recurrent_mode(1, 128, 3, torch.bfloat16, H100)["RESIDENT"] is True
    assert recurrent_mode(1, 128, 3, torch.float32, H100)["RESIDENT"] is False  # tf32x3: spilled resident
    # Batch 64, 1024 units: 4 batch blocks x 32 slices of 32 units = 128 <= 132 programs.
    assert recurrent_mode(64, 1024, 4, torch.float32, H100)["BLOCK_U"] == 32
    # ... but 4 x 16 of 64 units on an A100 (108 SMs).
    assert recurrent_mode(64, 1024, 4, torch.float32, A100)["BLOCK_U"] == 64
    # Batch 4096 at 128 units: the row blocks (256) fill the GPU; at 1024 units: one launch per step.
    assert recurrent_mode(4096, 128, 4, torch.float32, H100) == {"mode": "rows"}
    assert recurrent_mode(4096, 1024, 4, torch.float32, H100)["mode"] == "per_step"
    # Per step, W_hh crosses L2 once per 64 batch rows (tiles of 64 rows x 32 units; 16 x 64 in float32).
    assert recurrent_mode(4096, 1024, 4, torch.bfloat16, H100)["BLOCK_B"] == 64
    # ... the backward's at most 32 (its 64-row LSTM tile spilled); other modes as the forward's.
    assert backward_mode(recurrent_mode(4096, 1024, 4, torch.bfloat16, H100))["BLOCK_B"] == 32
    assert backward_mode(recurrent_mode(1, 1024, 4, torch.bfloat16, H100)) == recurrent_mode(1, 1024, 4, torch.bfloat16,
                                                                                              H100)
    assert recurrent_mode(2200, 333, 4, torch.float32, A100)["BLOCK_B"] == 16


@pytest.mark.parametrize("sms", [H100, A100])
def test_rule_properties(sms):
    """Over a grid of shapes: a persistent launch never has more programs than SMs (co-residency), a resident
    slice (16-bit only) never exceeds RESIDENT_BYTES nor RESIDENT_MAX_HIDDEN, and the row-block kernel is never
    picked above ROWS_MAX_HIDDEN."""
    for gates in (1, 3, 4):
        for dtype in (torch.bfloat16, torch.float32):
            for hidden in (65, 100, 128, 256, 333, 512, 1000, 1024):
                for batch in (1, 5, 16, 17, 100, 512, 1024, 5000):
                    mode = recurrent_mode(batch, hidden, gates, dtype, sms)
                    if mode["mode"] == "rows":
                        assert triton_next_pow2(hidden) <= ROWS_MAX_HIDDEN
                        continue
                    assert mode["BLOCK_U"] in unit_blocks(dtype)
                    programs = -(-batch // mode["BLOCK_B"]) * -(-hidden // mode["BLOCK_U"])
                    if mode["mode"] == "persistent":
                        assert programs <= sms, (batch, hidden, mode)
                    else:
                        assert not mode["RESIDENT"]
                    if mode["RESIDENT"]:
                        assert dtype.itemsize == 2 and triton_next_pow2(hidden) <= RESIDENT_MAX_HIDDEN
                        size = gates * mode["BLOCK_U"] * triton_next_pow2(hidden) * dtype.itemsize
                        assert size <= RESIDENT_BYTES


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()



def test_gpu_check_recurrent_check_runs_the_split_path_on_cpu():
    """benchmarks.gpu_check's on-device recurrent check, on tiny CPU shapes in the per-step mode: ours / torch /
    float64 built and the rule passed (on a GPU the rule picks the mode; tests/test_gpu_check.py has the rest)."""
    from benchmarks import gpu_check

    cpu = torch.device("cpu")
    with forced_mode("per_step", 16):
        check = gpu_check._check("LSTM split", gpu_check._recurrent_check(cpu, torch.float32, "LSTM", 2, 3, 20))
    assert check["passed"], check
    assert gpu_check._rule_mode(cpu, torch.float32, "LSTM", 1, 1024) == "rows"  # no GPU: the row-block kernel
