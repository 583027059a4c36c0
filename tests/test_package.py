"""The package around the kernels: backend selection, import without the extension, `python -m seqkern.info`."""
import subprocess
import sys

import pytest
import torch

import seqkern


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_without_extension_falls_back_to_reference():
    result = _run(
        "import sys, warnings; sys.modules['seqkern._C'] = None\n"
        "import torch, seqkern\n"
        "m = seqkern.nn.LSTM(3, 4)\n"
        "print(m(torch.randn(2, 1, 3))[0].shape)\n"
        "print(seqkern.backends.resolve('lstm', torch.device('cpu'), torch.float32, seqkern.ops.lstm.SUPPORTED_DTYPES))\n"
    )
    assert result.returncode == 0, result.stderr
    assert "torch.Size([2, 1, 4])" in result.stdout and "reference" in result.stdout
    assert result.stderr.count("the C++ extension seqkern._C is not available") == 1


def test_info_reports_backends():
    result = subprocess.run([sys.executable, "-m", "seqkern.info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "cpu        available" in result.stdout
    table = result.stdout.split("\nop ", 1)[1].splitlines()[1:]
    rows = {line.split()[0]: line.split()[1] for line in table if line.strip()}
    for op in ("lstm", "gru", "rnn", "flash_attention", "flash_attention_decode", "additive_attention"):
        assert rows.get(op) == "cpu", result.stdout


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
