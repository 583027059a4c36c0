"""benchmarks.gpu_check on a machine without a GPU: it says so and exits 0, writing nothing."""
from __future__ import annotations

import pytest
import torch

from benchmarks import gpu_check


def test_without_a_gpu_it_says_so_and_exits_0(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as here, also on a machine with a GPU
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_the_table_reports_checks_and_speedups():
    report = {"device": "NVIDIA H100", "capability": [9, 0], "seconds": 12.0,
              "checks": [{"name": "attention bfloat16", "passed": True, "verdict": "rule ok (0.40 of bound)"}],
              "benchmarks": [{"name": "decode", "ms": {"seqkern": 1.0, "SDPA": 2.0}, "tflops": {"seqkern": 3.0},
                              "speedup_vs": {"SDPA": 2.0}}, {"name": "gru", "error": "RuntimeError: x"}]}
    table = gpu_check.format_table(report)
    assert "sm_90" in table and "rule ok (0.40 of bound)" in table and "2.00x" in table and "error: RuntimeError" in table


@pytest.mark.triton
def test_the_device_checks_run_on_cpu_tensors_under_the_interpreter():
    """The checks gpu_check runs on CUDA, on tiny CPU shapes (the Triton kernels under the interpreter): each
    builds ours / torch / float64 and passes the rule."""
    cpu = torch.device("cpu")
    checks = [gpu_check._check("attention", gpu_check._attention_check(cpu, torch.float32, 1, 2, 20, 16, True)),
              gpu_check._check("decode", gpu_check._decode_check(cpu, torch.bfloat16, 1, 4, 2, 40, 16)),
              gpu_check._check("additive", gpu_check._additive_check(cpu, torch.float32, 1, 6, 8, 4)),
              gpu_check._check("GRU", gpu_check._recurrent_check(cpu, torch.float32, "GRU", 2, 3, 8)),
              gpu_check._check("LayerNormLSTM", gpu_check._layernorm_lstm_check(cpu, torch.float32, 2, 3, 8))]
    assert all(check["passed"] for check in checks), checks


def test_composed_layernorm_lstm_is_the_definition():
    """gpu_check's oracle for the LayerNorm LSTM rows against tests/test_layernorm_lstm.py's composed layer (issue
    16's equations, written independently): same output in float64."""
    from test_layernorm_lstm import composed_layernorm_lstm as defined

    gen = torch.Generator().manual_seed(0)
    batch, steps, hidden = 2, 4, 5
    x = torch.randn(batch, steps, hidden, generator=gen, dtype=torch.float64)
    names = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0", "ln_ih_weight_l0", "ln_ih_bias_l0",
             "ln_hh_weight_l0", "ln_hh_bias_l0", "ln_cell_weight_l0", "ln_cell_bias_l0")
    shapes = ((4 * hidden, hidden), (4 * hidden, hidden)) + ((4 * hidden,),) * 6 + ((hidden,),) * 2
    params = {name: torch.randn(shape, generator=gen, dtype=torch.float64) for name, shape in zip(names, shapes)}
    zeros = torch.zeros(batch, hidden, dtype=torch.float64)
    ours = gpu_check.composed_layernorm_lstm(x, zeros, zeros, params, 1e-5)
    expected = defined(x.transpose(0, 1), zeros, zeros, *params.values(), 1e-5, None, None, 0.0, None, False)[0]
    torch.testing.assert_close(ours, expected.transpose(0, 1))
