"""The package around the kernels: import without the extension, `python -m seqkern.info`."""
import subprocess
import sys


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
    assert "lstm       cpu" in result.stdout
