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
              gpu_check._check("GRU", gpu_check._recurrent_check(cpu, torch.float32, "GRU", 2, 3, 8))]
    assert all(check["passed"] for check in checks), checks
